"""Serving benchmark: a .pkl model's `predict_batch` against its ONNX exports (fp32 and int8) on the CPU, in one run;
int8's AUROC against fp32's on the validation and test splits; the command line's time from start to a first
result; and the size of a serve-only install.

    python bench/bench_serve.py --model models/NAME.pkl --data DIR     # a trained model: speed, AUROC, start-up
    python bench/bench_serve.py --size 224                             # no model: a throwaway one, for speed
    python bench/bench_serve.py --serve-venv .venv-serve               # also time the CLI there, and measure it
    python bench/bench_serve.py --smoke                                # seconds; CI runs it to keep it working

Throughput is of `predict_batch` on the same decoded photos at one batch size (8 unless --bs), each figure the best
of --repeats runs. The export writes NAME.onnx and NAME.int8.onnx beside the model (the int8 one calibrated on its
training photos). It asserts nothing about speed: compare ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_predict import throwaway_model
from common import ROOT, SHARED, write_csv
from sklearn.metrics import roc_auc_score

from skincancer.data import read_metadata, read_split
from skincancer.onnx_export import export_onnx
from skincancer.files import model_files
from skincancer.images import open_image
from skincancer.labels import MALIGNANT_DX
from skincancer.predict import load


def images_per_s(clf, photos: list, bs: int, repeats: int) -> float:
    """The best rate of `repeats` timed `predict_batch` runs over the decoded `photos`."""
    clf.predict_batch(photos[:bs], bs=bs)  # warm-up: first-call allocations, the inference copy
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        clf.predict_batch(photos, bs=bs)
        best = min(best, time.perf_counter() - start)
    return len(photos) / best


def auroc(clf, frame) -> float:
    """The malignant AUROC of `clf` on a labelled frame (`path`, `dx`)."""
    p = [r["malignant_probability"] for r in clf.predict_batch(list(frame["path"]))]
    return float(roc_auc_score(frame["dx"].isin(MALIGNANT_DX), p))


def cli_seconds(python: str, model: Path, photo: Path, repeats: int = 3) -> float:
    """The best wall time of `python -m skincancer predict --model MODEL PHOTO` from start to its result."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run = subprocess.run([python, "-m", "skincancer", "predict", "--model", str(model), str(photo)],
                             capture_output=True, text=True, cwd=ROOT)
        best = min(best, time.perf_counter() - start)
        if run.returncode != 0:
            raise SystemExit(f"{python} -m skincancer predict failed: {run.stderr[-500:]}")
    return best


def folder_mb(path: Path) -> float:
    """Megabytes on disk under `path`."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink()) / 1e6


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, measure, print the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="an exported model (.pkl with its card and split beside it)")
    p.add_argument("--data", type=Path, default=SHARED / "ham10000_200x150", help="the HAM10000 folder it learnt")
    p.add_argument("--size", type=int, default=224, help="without --model: the throwaway model's input size")
    p.add_argument("--n", type=int, default=256, help="photos to time")
    p.add_argument("--bs", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--serve-venv", type=Path, help="a serve-only environment (make install-serve): its size, its CLI")
    p.add_argument("--smoke", action="store_true", help="a 32 px throwaway model, 16 photos, one repeat")
    p.add_argument("--out", type=Path, help="also write the figures here as JSON")
    p.add_argument("--csv", type=Path, help="also write the table here (docs/results/serving_*.csv)")
    args = p.parse_args(argv)
    if args.smoke:
        args.size, args.n, args.repeats = 32, 16, 1
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            model = throwaway_model(Path(tmp), args.size)
        elif args.model.parent != Path(tmp):  # the export writes beside the model: work on a copy
            for path in model_files(args.model).values():
                if path.exists():
                    shutil.copy(path, Path(tmp) / path.name)
            model = Path(tmp) / args.model.name
        export_onnx(model, int8=True, data=args.data)
        files = model_files(model)
        clfs = {"pkl": load(model), "onnx fp32": load(files["onnx"]), "onnx int8": load(files["int8"])}
        photos = [open_image(path) for path in sorted((args.data / "images").glob("*.jpg"))[:args.n]] \
            if (args.data / "images").is_dir() else None
        if not photos:
            meta = read_metadata(args.data)
            photos = [open_image(path) for path in meta["path"][:args.n]]
        rates = {name: images_per_s(clf, photos, args.bs, args.repeats) for name, clf in clfs.items()}
        result: dict = {"size": clfs["pkl"].card.size, "bs": args.bs, "photos": len(photos), "images_per_s": rates,
                        "threads": os.cpu_count(), "int8": clfs["pkl"].card.onnx["int8"],
                        "mb": {name: files[k].stat().st_size / 1e6 for name, k in
                               (("pkl", "model"), ("safetensors", "weights"), ("onnx fp32", "onnx"),
                                ("onnx int8", "int8"))}}
        if args.model is not None:  # a trained model: int8's AUROC against fp32's on both held-out splits
            meta = read_metadata(args.data)
            meta = meta.assign(split=read_split(files["split"], meta)).dropna(subset=["split"])
            result["auroc"] = {split: {name: auroc(clfs[name], meta[meta["split"] == split])
                                       for name in ("onnx fp32", "onnx int8")} for split in ("valid", "test")}
        photo = sorted((args.data / "images").glob("*.jpg"))[0] if (args.data / "images").is_dir() else \
            Path(read_metadata(args.data)["path"][0])
        result["cli_s"] = {"pkl, this environment": cli_seconds(sys.executable, model, photo, args.repeats),
                           "onnx int8, this environment": cli_seconds(sys.executable, files["int8"], photo,
                                                                      args.repeats)}
        if args.serve_venv:
            result["cli_s"]["onnx int8, serve-only environment"] = cli_seconds(
                str(args.serve_venv / "bin" / "python"), files["int8"], photo, args.repeats)
            result["serve_install_mb"] = folder_mb(args.serve_venv)
    print(f"\nserving at {result['size']} px on the CPU ({result['threads']} cores), {result['photos']} photos, "
          f"bs {args.bs}, best of {args.repeats}")
    for name, rate in rates.items():
        print(f"  {name:<10} {rate:8.1f} images/s   {rate / rates['pkl']:5.2f}x the .pkl   "
              f"file {result['mb'][name]:6.1f} MB")
    q = result["int8"]
    print(f"  int8 against fp32 on {q['valid_images']:,} validation photos (at export): AUROC "
          f"{q['valid_auroc_fp32']:.4f} and {q['valid_auroc_int8']:.4f}; probability of malignancy moved "
          f"{q['mean_probability_change']:.4f} on average, {q['largest_probability_change']:.4f} at most")
    for split, aurocs in result.get("auroc", {}).items():
        a, b = aurocs["onnx fp32"], aurocs["onnx int8"]
        print(f"  {split}: AUROC fp32 {a:.4f}, int8 {b:.4f}, int8 - fp32 {b - a:+.4f}")
    for name, seconds in result["cli_s"].items():
        print(f"  predict one photo from start to result, {name}: {seconds:.2f} s")
    if "serve_install_mb" in result:
        print(f"  serve-only environment on disk: {result['serve_install_mb']:.0f} MB")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    if args.csv:
        print(f"wrote {write_csv(args.csv, csv_rows(result))}")
    return 0


def csv_rows(result: dict) -> list[dict]:
    """One row a model file: its speed against the .pkl's, its size, its AUROCs, one photo's time: one number a cell."""
    rates, cli = result["images_per_s"], result["cli_s"]
    one_photo = {"pkl": cli.get("pkl, this environment"), "onnx int8": cli.get("onnx int8, this environment")}
    out = []
    for name, rate in rates.items():
        aurocs = {split: a.get(name) for split, a in result.get("auroc", {}).items()}
        out.append({"file": name, "size": result["size"], "bs": result["bs"], "threads": result["threads"],
                    "images_per_s": round(rate, 1), "vs_pkl": round(rate / rates["pkl"], 2),
                    "file_mb": round(result["mb"][name], 1),
                    "valid_auroc": "" if aurocs.get("valid") is None else round(aurocs["valid"], 4),
                    "test_auroc": "" if aurocs.get("test") is None else round(aurocs["test"], 4),
                    "predict_one_photo_s": "" if one_photo.get(name) is None else round(one_photo[name], 2),
                    "predict_one_photo_serve_only_s": round(cli["onnx int8, serve-only environment"], 2)
                    if name == "onnx int8" and "onnx int8, serve-only environment" in cli else ""})
    return out


if __name__ == "__main__":
    raise SystemExit(main())
