"""Does colour constancy carry the recipe to a clinic it never saw? The `cpu` recipe with one source held out, trained
on the photos as they are and on their shades-of-gray copies, paired on the held-out source's photos.

    python bench/bench_constancy.py --data DIR --weights LITE0_FILE --baseline reports/bench_sources.jsonl
    python bench/bench_constancy.py --smoke          # a tiny pair of trainings: about a minute on a CPU

Shades of gray (Finlayson and Trezzi, 2004; used by the ISIC 2018-2019 winners) estimates each photo's illuminant as
the Minkowski p-norm (p = 6) of each colour channel and divides it out, so that every photo looks lit by white light:
a different lamp or camera white balance at a new clinic then matters less. The copy is written once (PNG, no second
JPEG loss) beside the metadata; each arm is the recipe trained alike on the same lesion split (the split depends on
the metadata alone). `--baseline` reuses a held-out run bench_sources already recorded instead of training it again.
The CSV holds, per source recorded in both arms and per threshold rule, each arm's held-out AUROC, sensitivity and
specificity at the threshold the rule chose on valid, and constancy minus plain with its 95% interval over resampled
lesions (`paired_bootstrap`). Valid chooses; the held-out source only measures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from bench_sources import read_records, rule_threshold, run_config, train_run
from common import ROOT, SHARED, write_csv
from PIL import Image
from sklearn.metrics import roc_auc_score

from skincancer.config import N_BOOT, TARGET_SENSITIVITY
from skincancer.data import add_labels, read_metadata, sample_by_label
from skincancer.images import open_image
from skincancer.metrics import paired_bootstrap

ARMS = ("plain", "constancy")
NORM = 6  # the Minkowski norm of shades of gray: 1 is grey world, infinity is max-RGB; 6 as in the ISIC winners


def shades_of_gray(rgb: np.ndarray, p: int = NORM) -> np.ndarray:
    """An RGB photo (uint8, H x W x 3) with its illuminant, each channel's p-norm, divided out."""
    x = rgb.astype(np.float64)
    illuminant = np.power(np.mean(np.power(x, p), axis=(0, 1)), 1 / p)
    illuminant = illuminant / (np.linalg.norm(illuminant) + 1e-12)
    return np.clip(x / (illuminant * np.sqrt(3) + 1e-12), 0, 255).round().astype(np.uint8)


def constancy_copy(data: str, out: Path, limit: int | None = None, seed: int = 42) -> Path:
    """The shades-of-gray copy of a data folder (its images as PNG, its metadata), written once, complete or absent;
    only the photos a `limit`-sized run trains on where one is given."""
    done = out / "COMPLETE"
    if done.is_file():
        return out
    df = read_metadata(data)
    if limit:
        df = sample_by_label(add_labels(df, "binary"), limit, seed=seed).drop(columns="label")
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    (tmp / "images").mkdir()
    for image_id, path in zip(df["image_id"], df["path"]):
        rgb = np.asarray(open_image(path).convert("RGB"))
        Image.fromarray(shades_of_gray(rgb)).save(tmp / "images" / f"{image_id}.png")
    df.drop(columns="path").to_csv(tmp / "HAM10000_metadata.csv", index=False)
    (tmp / "COMPLETE").write_text(f"{len(df)} images\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def compare(plain: dict, constancy: dict, target: float, n_boot: int) -> list[dict]:
    """Per threshold rule: each arm's held-out figures and constancy minus plain, with lesion-bootstrap intervals."""
    a, b = plain["test"], constancy["test"]
    if a["lesion"] != b["lesion"] or a["truth"] != b["truth"]:
        raise SystemExit("the two arms tested different photos: a paired comparison needs one split")
    y = np.asarray(a["truth"], dtype=bool)
    rows = []
    for rule in ("plain", "confident"):
        t_a, t_b = rule_threshold(rule, plain["valid"], target), rule_threshold(rule, constancy["valid"], target)
        d = paired_bootstrap(y, a["p"], b["p"], t_a, t_b, n_boot=n_boot, groups=a["lesion"])
        row = {"source": plain["run"].split(":")[2], "seed": plain["seed"], "rule": rule, "test_images": len(y),
               "plain_valid_auroc": round(float(roc_auc_score(plain["valid"]["truth"], plain["valid"]["p"])), 4),
               "constancy_valid_auroc": round(float(roc_auc_score(constancy["valid"]["truth"],
                                                                  constancy["valid"]["p"])), 4)}
        for stat in ("auroc", "sensitivity", "specificity"):
            s = d[stat]
            row.update({f"plain_{stat}": round(s["a"], 4), f"constancy_{stat}": round(s["b"], 4),
                        f"{stat}_difference": round(s["difference"], 4),
                        f"{stat}_difference_lo": round(s["ci"][0], 4), f"{stat}_difference_hi": round(s["ci"][1], 4)})
        row.update(plain_minutes=round(plain["train_minutes"], 1),
                   constancy_minutes=round(constancy["train_minutes"], 1))
        rows.append(row)
    return rows


def paired_rows(recorded: dict[str, dict], target: float, n_boot: int) -> list[dict]:
    """`compare` for every held-out run recorded in both arms, in the order they were recorded."""
    pairs = [run.partition(":")[2] for run in recorded if run.startswith("plain:")]
    return [row for key in pairs if f"constancy:{key}" in recorded
            for row in compare(recorded[f"plain:{key}"], recorded[f"constancy:{key}"], target, n_boot)]


def main(argv: list[str] | None = None) -> None:
    """Write the copy, train the arms not yet recorded, then write and print the paired comparison."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(SHARED / "ham10000_200x150"))
    parser.add_argument("--weights", help="EfficientNet-Lite0 ImageNet weights (the cpu recipe's starting point)")
    parser.add_argument("--source", default="rosendahl")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--copy", default=str(ROOT / "reports" / "constancy_data"), help="where the copy is written")
    parser.add_argument("--baseline", help="bench_sources's JSON lines: its held-out run of --source is the plain arm")
    parser.add_argument("--jsonl", default=str(ROOT / "reports" / "bench_constancy.jsonl"))
    parser.add_argument("--csv", default=str(ROOT / "docs" / "results" / "constancy_cpu.csv"))
    parser.add_argument("--smoke", action="store_true", help="tiny runs into a temporary folder")
    args = parser.parse_args(argv)
    overrides: dict = {"recipe": "cpu", "seed": args.seed}
    if args.weights:
        overrides["weights"] = args.weights
    n_boot = N_BOOT
    workdir = Path(tempfile.mkdtemp(prefix="bench_constancy_"))
    if args.smoke:
        overrides.update(limit=300, epochs=1, size=32, presize=40, bs=16, pretrained=False, recipe="scratch",
                         arch="resnet18", cache_dir=str(workdir / "cache"))
        args.jsonl, args.csv, args.copy, n_boot = (str(workdir / "runs.jsonl"), str(workdir / "runs.csv"),
                                                   str(workdir / "copy"), 50)
    copy = constancy_copy(args.data, Path(args.copy), overrides.get("limit"), args.seed)
    jsonl = Path(args.jsonl)
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    recorded = {r["run"]: r for r in read_records(jsonl)}
    heldout = f"heldout:{args.source}:seed{args.seed}"
    if args.baseline and f"plain:{heldout}" not in recorded:
        found = {r["run"]: r for r in read_records(Path(args.baseline))}.get(heldout)
        if found is None:
            raise SystemExit(f"{args.baseline} records no run {heldout}")
        recorded[f"plain:{heldout}"] = {**found, "run": f"plain:{heldout}"}
        with open(jsonl, "a", encoding="utf-8") as f:
            f.write(json.dumps(recorded[f"plain:{heldout}"]) + "\n")
    for arm, data in zip(ARMS, (args.data, str(copy))):
        name = f"{arm}:{heldout}"
        if name in recorded:
            print(f"{name}: recorded in {jsonl}, not trained again")
            continue
        print(f"== {name}", flush=True)
        record = train_run(name, run_config("heldout", args.source, data, overrides, workdir))
        recorded[name] = {**record, "run": name}
        with open(jsonl, "a", encoding="utf-8") as f:
            f.write(json.dumps(recorded[name]) + "\n")
    rows = paired_rows(recorded, TARGET_SENSITIVITY, n_boot)
    write_csv(args.csv, rows)
    for r in rows:
        print(f"{r['source']:<13} {r['rule']:<10} AUROC {r['plain_auroc']:.3f} -> {r['constancy_auroc']:.3f} "
              f"({r['auroc_difference']:+.3f}, {r['auroc_difference_lo']:+.3f} to {r['auroc_difference_hi']:+.3f})  "
              f"sensitivity {r['plain_sensitivity']:.3f} -> {r['constancy_sensitivity']:.3f}  "
              f"specificity {r['plain_specificity']:.3f} -> {r['constancy_specificity']:.3f}")
    print(f"wrote {args.csv} from {jsonl}")


if __name__ == "__main__":
    main()
