"""Which score tells dermoscopy photos from everything else, measured on a trained model: the channel statistics of
early layers (the shipped check, at several layers), the final pooled features, the energy score and the softmax
confidence; each fitted on training photos, its threshold set so 99% of the validation photos pass.

    python bench/bench_check.py --models models/heldout_rosendahl.pkl ... --data DIR  # exports with their split
    python bench/bench_check.py --smoke                                           # seconds on a CPU; CI runs it

Dermoscopy photos measured: the model's test split (with a model trained with --test-source, a clinic the fit never
saw) and HAM10000's full-size originals. Photos that are not dermoscopy, made offline: the sample photos shipped
with scikit-learn, matplotlib, Gradio and networkx, crops of them, and photos drawn with Pillow (flat colours, noise,
gradients, text screenshots, shapes, dermoscopy photos turned into grey document scans). They come in two sets drawn
alike from different files and seeds: `choose` picks which score the package ships (TAP_STRIDES), `measure` only
reports. A photo `open_photo` refuses (too small, one flat colour) counts as refused, as `predict` refuses it.
Writes a CSV row per score (--csv).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import ROOT, SHARED, write_csv
from PIL import Image, ImageDraw, ImageFilter, ImageOps
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score

from skincancer.activations import TAP_STRIDES, Taps, tap_names
from skincancer.check import CHECK_FIT_PHOTOS, CHECK_PASS, fit_check
from skincancer.classifier import Classifier, batch_preds
from skincancer.data import read_metadata, read_split
from skincancer.errors import SkinCancerError
from skincancer.files import model_files
from skincancer.images import open_image, open_photo
from skincancer.predict import load

SITE = Path(np.__file__).resolve().parents[1]  # site-packages: the libraries' own sample photos
SHIPPED = {  # photos that come with installed libraries, by set
    "choose": ["sklearn/datasets/images/china.jpg", "sklearn/datasets/images/flower.jpg",
               "matplotlib/mpl-data/sample_data/grace_hopper.jpg", "gradio/media_assets/images/groot.jpeg",
               "networkx/drawing/tests/baseline/test_display_complex.png"],
    "measure": ["gradio/media_assets/images/cheetah.jpg", "gradio/media_assets/images/cheetah1.jpg",
                "gradio/media_assets/images/lion.jpg", "gradio/media_assets/images/tower.jpg",
                "gradio/media_assets/images/bus.png", "gradio/media_assets/images/avatar.png",
                "gradio/media_assets/images/logo.png", "gradio/media_assets/images/screenshot.gif",
                "gradio/test_data/cheetah2.jpg", "gradio/test_data/test_image.png",
                "matplotlib/mpl-data/sample_data/Minduka_Present_Blue_Pack.png",
                "matplotlib/mpl-data/sample_data/logo2.png",
                "networkx/drawing/tests/baseline/test_display_house_with_colors.png",
                "networkx/drawing/tests/baseline/test_display_shortest_path.png"]}
SEEDS = {"choose": 0, "measure": 1}
STRIDES = (2, 4, 8, 16, 32)  # every layer a candidate score reads, tapped in one pass
CANDIDATES = {  # name: the strides whose channel statistics it scores
    "channel statistics, stride 2": (2,), "channel statistics, stride 4": (4,), "channel statistics, stride 8": (8,),
    "channel statistics, strides 4 and 8": (4, 8), "channel statistics, strides 2, 4 and 8": (2, 4, 8),
    "channel statistics, stride 16": (16,)}
COLUMNS = ("model", "test_split", "score", "shipped", "auroc_test_vs_measure", "valid_pass", "test_pass",
           "originals_pass", "choose_refused", "measure_refused", "threshold", "test_photos", "measure_photos")


def crops(img: Image.Image) -> list[Image.Image]:
    """The photo and two crops of it (half its sides from the top left, 70% from the bottom right)."""
    w, h = img.size
    return [img, img.crop((0, 0, w // 2, h // 2)), img.crop((w - int(0.7 * w), h - int(0.7 * h), w, h))]


def drawn(seed: int, dermoscopy: list[str], n: int = 6) -> list[Image.Image]:
    """Photos drawn with Pillow: flat colours, noise, gradients, text screenshots, shapes, grey scans of lesions."""
    r = np.random.default_rng(seed)
    out: list[Image.Image] = []
    for k in range(n):
        out.append(Image.new("RGB", (400, 300), tuple(int(c) for c in r.integers(0, 256, 3))))
        out.append(Image.fromarray(r.integers(0, 256, (300, 400, 3), dtype=np.uint8)))
        out.append(Image.fromarray(r.integers(0, 256, (30, 40, 3), dtype=np.uint8)).resize((400, 300)).filter(
            ImageFilter.GaussianBlur(8)))
        ramp = np.linspace(0, 1, 400)[None, :, None] * r.uniform(0.2, 1, 3) * 255
        out.append(Image.fromarray((ramp * np.ones((300, 1, 1))).astype(np.uint8)))
        shot = Image.new("RGB", (640, 400), "white" if k % 2 else (30, 30, 30))
        d = ImageDraw.Draw(shot)
        for y in range(12, 390, 16):
            d.text((12, y), " ".join(r.choice(["lesion", "report", "the", "of", "patient", "data", "42"], 9)),
                   fill="black" if k % 2 else "white")
        out.append(shot)
        shapes = Image.new("RGB", (400, 300), tuple(int(c) for c in r.integers(0, 256, 3)))
        d = ImageDraw.Draw(shapes)
        for _ in range(12):
            x, y = r.integers(0, 400), r.integers(0, 300)
            d.ellipse((x, y, x + r.integers(10, 120), y + r.integers(10, 120)),
                      fill=tuple(int(c) for c in r.integers(0, 256, 3)))
        out.append(shapes)
        lesion = open_image(dermoscopy[int(r.integers(len(dermoscopy)))])
        out.append(ImageOps.grayscale(lesion).point(lambda v: min(255, v + 70)).convert("RGB"))
    return out


def others(which: str, dermoscopy: list[str]) -> list:
    """The `which` set of photos that are not dermoscopy: shipped ones and their crops, then drawn ones."""
    shipped = [img for p in SHIPPED[which] if (SITE / p).is_file() for img in crops(open_image(SITE / p))]
    return shipped + drawn(SEEDS[which], dermoscopy)


def others_labels(which: str, n: int = 6) -> list[str]:
    """What each photo of `others(which)` is, in its order: the file (and crop), or what was drawn."""
    shipped = [f"{Path(p).name}{crop}" for p in SHIPPED[which] if (SITE / p).is_file()
               for crop in ("", " (top-left half)", " (bottom-right 70%)")]
    kinds = ("flat colour", "noise", "blurred noise", "gradient", "text screenshot", "shapes", "grey scan of a lesion")
    return shipped + [f"drawn {kind} {k}" for k in range(n) for kind in kinds]


def features(clf: Classifier, taps: Taps, images: list, bs: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tapped statistics, logits, whether open_photo let it through) of images; refused ones get no row."""
    kept, ok = [], []
    for img in images:
        try:
            kept.append(open_photo(img))
            ok.append(True)
        except SkinCancerError:
            ok.append(False)
    head = [m for m in clf.model.modules() if isinstance(m, torch.nn.Linear)][-1]
    logits: list = []
    hook = head.register_forward_hook(lambda _m, _i, out: logits.append(out.detach().float()))
    try:
        with taps:
            batch_preds(clf.learn, clf.learn.dls.test_dl(kept, bs=bs, num_workers=0), clf.model, taps=taps)
            stats = taps.collected()
    finally:
        hook.remove()
    return stats, torch.cat(logits).numpy(), np.array(ok)


def passed(got: dict, scores: dict, threshold: float, k: str) -> float:
    """The share of set `k` that passes: within the threshold, and not refused by open_photo before the network."""
    ok = got[k][2]
    through = np.zeros(len(ok), dtype=bool)
    through[ok] = scores[k] <= threshold
    return float(through.mean())


def lw_distance(train: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Mahalanobis distance of rows of x from train's, with a Ledoit-Wolf covariance."""
    lw = LedoitWolf().fit(train)
    d = x - lw.location_
    return np.sqrt(np.maximum(((d @ lw.precision_) * d).sum(1), 0))


def measure(model: str, data: str, originals: str, fit_photos: int) -> list[dict]:
    """Every candidate score of one export, on every set: its CSV rows."""
    start = time.perf_counter()
    clf = load(model)
    assert isinstance(clf, Classifier), "the benchmark taps the fastai model"
    df = read_metadata(data)
    df = df.assign(split=read_split(model_files(model)["split"], df)).dropna(subset=["split"])
    train_df = df[df["split"] == "train"].sample(min(fit_photos, int((df["split"] == "train").sum())), random_state=0)
    taps = Taps(clf.model, tap_names(clf.model, clf.card.size, STRIDES))
    sets = {"train": train_df["path"].tolist(), "valid": df.loc[df["split"] == "valid", "path"].tolist(),
            "test": df.loc[df["split"] == "test", "path"].tolist(),
            "originals": sorted(str(p) for p in Path(originals).glob("*.jpg"))}
    sets["choose"], labels = others("choose", sets["train"]), {}
    sets["measure"], labels["measure"] = others("measure", sets["test"]), others_labels("measure")
    got = {name: features(clf, taps, images) for name, images in sets.items() if images}
    widths = np.cumsum([0, *taps.widths])
    columns = {s: slice(widths[i], widths[i + 1]) for i, s in enumerate(STRIDES)}
    print(f"{Path(model).name}: " + ", ".join(f"{k} {len(v[2])}" for k, v in got.items())
          + f" photos ({time.perf_counter() - start:.0f} s)")

    def scored(name: str) -> dict[str, np.ndarray]:
        if name in CANDIDATES:
            strides = CANDIDATES[name]
            cols = np.r_[tuple(np.arange(columns[s].start, columns[s].stop) for s in strides)]
            check = fit_check(got["train"][0][:, cols], got["valid"][0][:, cols], [str(s) for s in strides],
                              [columns[s].stop - columns[s].start for s in strides])
            return {k: check.scores(v[0][:, cols]) for k, v in got.items()}
        if name == "final pooled features (Mahalanobis)":
            means = columns[32].start, columns[32].start + (columns[32].stop - columns[32].start) // 2
            return {k: lw_distance(got["train"][0][:, slice(*means)], v[0][:, slice(*means)]) for k, v in got.items()}
        if name == "energy":
            return {k: -torch.logsumexp(torch.from_numpy(v[1]), 1).numpy() for k, v in got.items()}
        return {k: -torch.softmax(torch.from_numpy(v[1]), 1).max(1).values.numpy() for k, v in got.items()}

    shipped = next(name for name, strides in CANDIDATES.items() if strides == TAP_STRIDES)
    held_out = clf.card.test_source or clf.card.config.get("test_source")  # cards before 0.3 keep it in config
    test_split = f"{held_out} (held out)" if held_out else "random lesion split"
    rows = []
    for name in [*CANDIDATES, "final pooled features (Mahalanobis)", "energy", "softmax confidence"]:
        s = scored(name)
        threshold = float(np.quantile(s["valid"], CHECK_PASS))
        measure_scores = np.full(len(got["measure"][2]), np.inf)
        measure_scores[got["measure"][2]] = s["measure"]
        auroc = roc_auc_score(np.r_[np.zeros(len(s["test"])), np.ones(len(measure_scores))],
                              np.r_[s["test"], np.minimum(measure_scores, 1e12)])
        share = {k: round(passed(got, s, threshold, k), 4) for k in got if k != "train"}
        if name == shipped:
            through = np.flatnonzero(got["measure"][2])[s["measure"] <= threshold]
            print(f"{Path(model).stem}: measured photos that are not dermoscopy yet pass: "
                  + (", ".join(labels["measure"][i] for i in through) or "none"))
        rows.append({"model": Path(model).stem, "test_split": test_split, "score": name, "shipped": name == shipped,
                     "auroc_test_vs_measure": round(float(auroc), 4),
                     "valid_pass": share["valid"], "test_pass": share["test"],
                     "originals_pass": share.get("originals", ""), "choose_refused": round(1 - share["choose"], 4),
                     "measure_refused": round(1 - share["measure"], 4), "threshold": round(threshold, 4),
                     "test_photos": len(got["test"][2]), "measure_photos": len(got["measure"][2])})
    return rows


def main(argv: list[str] | None = None) -> None:
    """Score every candidate on every set of each model; write and print the CSV."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", help="exports (NAME.pkl), each with its split beside it")
    parser.add_argument("--data", default=str(SHARED / "ham10000_200x150"))
    parser.add_argument("--originals", default=str(SHARED / "ham10000_originals" / "images"))
    parser.add_argument("--csv", default=str(ROOT / "docs" / "results" / "dermoscopy_check_cpu.csv"))
    parser.add_argument("--smoke", action="store_true", help="a tiny model trained here, into a temporary folder")
    args = parser.parse_args(argv)
    fit_photos = CHECK_FIT_PHOTOS
    if args.smoke:
        from skincancer.config import TrainConfig
        from skincancer.train import train

        tmp = Path(tempfile.mkdtemp(prefix="bench_check_"))
        args.models, args.csv, fit_photos = [str(tmp / "m.pkl")], str(tmp / "check.csv"), 200
        train(TrainConfig(data=args.data, out=args.models[0], limit=300, epochs=1, size=32, presize=40, bs=16,
                          pretrained=False, recipe="scratch", arch="resnet18", cache_dir=str(tmp / "cache")))
    if not args.models:
        parser.error("--models (or --smoke) is required")
    rows = [row for model in args.models for row in measure(model, args.data, args.originals, fit_photos)]
    write_csv(args.csv, [{c: r[c] for c in COLUMNS} for r in rows])
    print(f"{'model':<20}{'score':<42}{'AUROC':>8}{'test pass':>11}{'originals':>11}{'choose refused':>16}"
          f"{'measure refused':>17}")
    for r in rows:
        print(f"{r['model']:<20}{r['score'] + (' *' if r['shipped'] else ''):<42}{r['auroc_test_vs_measure']:>8.4f}"
              f"{r['test_pass']:>11.3f}{str(r['originals_pass']):>11}{r['choose_refused']:>16.3f}"
              f"{r['measure_refused']:>17.3f}")
    print(f"(* the check the package ships) wrote {args.csv}")


if __name__ == "__main__":
    main()
