"""Test-time choices for one exported model, paired on its own validation and test splits: no training involved.

    python bench/bench_views.py --model models/skincancer.pkl --data DIR [--sizes 112,128,144,160]
    python bench/bench_views.py --smoke      # seconds: a throwaway model at 32 px; CI runs it

Predicts the images of the model's recorded valid and test splits (NAME.split.csv) at each test-time size (the photo
squished to the size, presized in the model's proportion, as `predict` does at the training size), and at the
training size also averaged over the eight flips and quarter turns of each image (a lesion has no up or down, and
these move pixels without resampling them, so they add no blur) and with fastai's `learn.tta` (four passes with the
training augmentation, mixed with a plain one). Prints the malignant AUROC of each choice, and its paired difference
from the plain prediction at the training size with a 95% interval over resampled lesions. One model predicts every
row, so the differences are the choices' alone, free of the noise between trainings; valid decides, test checks. It
asserts nothing: read the table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from itertools import islice

import pandas as pd
import torch
from common import SHARED, write_csv
from fastai.torch_core import set_seed

from skincancer.classifier import lent_model
from skincancer.config import N_BOOT
from skincancer.data import add_labels, lesion_groups, read_metadata, read_split
from skincancer.datablock import make_datablock
from skincancer.files import model_files
from skincancer.labels import is_malignant_class, malignant_probability
from skincancer.metrics import paired_bootstrap
from skincancer.rebuild import card_stats
from skincancer.predict import load


def loader(card, size: int, presize: int, items, bs: int):
    """A DataLoader of `items` through the validation pipeline at `size` (the `predict` pipeline at that size)."""
    # fastai sets transforms up on a training set; one image stands in for it and is never predicted
    frame = pd.concat([items.iloc[:1].assign(is_valid=False), items.assign(is_valid=True)], ignore_index=True)
    return make_datablock(card.task, size, presize, card_stats(card)).dataloaders(frame, bs=bs, num_workers=0).valid


def views(x):
    """The eight flips and quarter turns of a batch of square images."""
    for k in range(4):
        turned = torch.rot90(x, k, (2, 3))
        yield turned
        yield torch.flip(turned, (3,))


def view_probs(learn, model, dl, n_views: int = 8) -> tuple:
    """(probabilities of the first `n_views` views, shape (n_views, n, classes); targets) of every batch of `dl`."""
    activation = getattr(learn.loss_func, "activation", lambda x: x)
    probs, targets = [], []
    with torch.inference_mode():
        for x, y in dl:
            x = x.contiguous(memory_format=torch.channels_last)
            probs.append(torch.stack([activation(model(v)).float().cpu() for v in islice(views(x), n_views)]))
            targets.append(y.cpu())
    return torch.cat(probs, 1).numpy(), torch.cat(targets).numpy()


def measure(clf, items, sizes: list[int], bs: int, n_boot: int) -> list[dict]:
    """Malignant AUROC of every test-time choice on `items`, each paired against the plain training-size one."""
    size, presize = clf.card.size, clf.card.presize
    scores, is_malignant = {}, None
    for s in sizes:
        dl = loader(clf.card, s, round(s * presize / size), items, bs)
        probs, targets = view_probs(clf.learn, clf.model, dl, n_views=8 if s == size else 1)
        scores[f"{s} px"] = malignant_probability(probs[0], clf.classes)
        if s == size:
            is_malignant = is_malignant_class(clf.classes)[targets]
            scores[f"{s} px, flips and quarter turns (8 views)"] = malignant_probability(probs.mean(0), clf.classes)
            set_seed(0)  # fastai's augmentation draws from Python's, NumPy's and torch's generators
            dl = loader(clf.card, s, presize, items, bs)
            with lent_model(clf.learn, clf.model), clf.learn.no_bar():
                tta, _ = clf.learn.tta(dl=dl)
            scores[f"{s} px, fastai's tta (4 augmented + plain)"] = malignant_probability(tta.numpy(), clf.classes)
    plain = scores[f"{size} px"]
    rows = []
    for name, p in scores.items():
        auroc = paired_bootstrap(is_malignant, plain, p, n_boot=n_boot, groups=lesion_groups(items))["auroc"]
        rows.append({"choice": name, "auroc": auroc["b"], "difference": auroc["difference"], "ci": auroc["ci"]})
    return rows


def main(argv: list[str] | None = None) -> int:
    """Predict both held-out splits every way, print the paired table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="exported model, with its NAME.json card and NAME.split.csv")
    p.add_argument("--data", default=str(SHARED / "ham10000_200x150"), help="the data set the model was trained on")
    p.add_argument("--sizes", help="comma-separated test-time sizes (default: 7/8, 1, 9/8 and 5/4 of the training "
                   "size, in multiples of 8)")
    p.add_argument("--bs", type=int, default=64)
    p.add_argument("--bootstrap", type=int, default=N_BOOT, help="replicates for the paired intervals")
    p.add_argument("--csv", type=Path, help="also write the table here (docs/results/test_time_*.csv)")
    p.add_argument("--smoke", action="store_true", help="a throwaway 32 px model, 100 bootstrap replicates")
    args = p.parse_args(argv)
    if not args.model and not args.smoke:
        p.error("--model is required (or --smoke)")

    from bench_predict import throwaway_model


    with tempfile.TemporaryDirectory() as tmp:
        model = throwaway_model(Path(tmp), 32) if args.smoke else args.model
        clf = load(model)
        size = clf.card.size
        sizes = args.sizes or ("24,40" if args.smoke else None)
        sizes = ({int(s) for s in sizes.split(",")} if sizes
                 else {round(size * f / 8) * 8 for f in (0.875, 1, 1.125, 1.25)})
        sizes = sorted(sizes | {size})  # the training size is the baseline every choice is paired against
        df = add_labels(read_metadata(args.data), clf.card.task)
        df["split"] = read_split(model_files(model)["split"], df)
        tables = {split: measure(clf, df[df["split"] == split].reset_index(drop=True), sizes, args.bs,
                                 100 if args.smoke else args.bootstrap) for split in ("valid", "test")}
    print(f"\n{Path(model).name}: {clf.card.task}, trained at {size} px; malignant AUROC by test-time choice, and "
          f"B - A against the plain {size} px prediction (95% interval, lesions resampled)")
    for split, rows in tables.items():
        recorded = clf.card.metrics.get(split, {}).get("auroc")
        print(f"\n{split} ({(df['split'] == split).sum()} images; AUROC in the model card: "
              f"{'none' if recorded is None else f'{recorded:.4f}'})")
        for r in rows:
            if r["choice"] == f"{size} px":
                paired = "the baseline"
            else:
                ci = "" if r["ci"] is None else f" ({r['ci'][0]:+.4f} to {r['ci'][1]:+.4f})"
                paired = f"{r['difference']:+.4f}{ci}"
            print(f"  {r['choice']:<46} {r['auroc']:.4f}   {paired}")
    if args.csv:
        print(f"wrote {write_csv(args.csv, csv_rows(tables, size))}")
    return 0


def csv_rows(tables: dict[str, list[dict]], size: int) -> list[dict]:
    """One row a test-time choice: each split's AUROC and its paired difference from the plain prediction."""
    out = []
    for i, choice in enumerate(r["choice"] for r in tables["valid"]):
        row = {"at_test_time": choice + (" (plain)" if choice == f"{size} px" else "")}
        for split, rows in tables.items():
            r = rows[i]
            base = r["choice"] == f"{size} px" or r["ci"] is None
            row.update({f"{split}_auroc": round(r["auroc"], 4),
                        f"{split}_minus_plain": "" if base else round(r["difference"], 4),
                        f"{split}_ci_low": "" if base else round(r["ci"][0], 4),
                        f"{split}_ci_high": "" if base else round(r["ci"][1], 4)})
        out.append(row)
    return out


if __name__ == "__main__":
    sys.exit(main())
