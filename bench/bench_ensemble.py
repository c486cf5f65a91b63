"""Several exported models averaged, against each of them, paired on the split they share: no training involved.

    python bench/bench_ensemble.py --models a.pkl b.pkl [c.pkl ...] --data DIR
    python bench/bench_ensemble.py --smoke      # two throwaway 32 px models, seconds; CI runs it

Train the models on one split (the others with `--split-from` the first's NAME.split.csv; another `--seed` then
changes only the training). Each predicts the valid and test images of that split, and their calibrated
probabilities of malignancy are averaged, as `predict_lesion` averages a lesion's photos. Prints, for each split,
every model's AUROC, sensitivity, specificity and balanced accuracy, and the average's; then the average minus the
models' mean (the models as several runs of one side of `paired_bootstrap`), and minus each model, with 95%
intervals over resampled lesions. The calls are at each model's own threshold from its card, and the average's at a
threshold chosen on valid the same way (the first card's target sensitivity). The intervals cover which images the
split drew, given these trainings; whether averaging pays in general wants the trainings' noise too (see
bench_train.py's recipes). It asserts nothing: read the table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from common import SHARED, write_csv

from skincancer.config import N_BOOT
from skincancer.data import lesion_groups, read_metadata, read_split
from skincancer.files import model_files, write_json_atomic
from skincancer.metrics import call_statistics, choose_threshold, malignant_scores, paired_bootstrap
from skincancer.predict import load
from skincancer.train import TrainConfig, train

STATISTICS = ("auroc", "sensitivity", "specificity", "balanced_accuracy")


def shared_split(models: list[Path], df):
    """The split every model recorded beside it (NAME.split.csv), or SystemExit naming the first that differs."""
    splits = [read_split(model_files(m)["split"], df) for m in models]
    for model, split in zip(models[1:], splits[1:]):
        for part in ("valid", "test"):
            if not (split == part).equals(splits[0] == part):
                sys.exit(f"{model.name} and {models[0].name} have different {part} images: train the others with "
                         f"--split-from {model_files(models[0])['split']}")
    return splits[0]


def probabilities(clf, items) -> tuple[np.ndarray, np.ndarray]:
    """(truth, calibrated probability of malignancy) of `items` by one loaded model, through its inference copy."""
    probs, targets = clf.predict_frame(items)
    return malignant_scores(probs, targets, clf.classes, clf.calibration)


def measure(clfs: list, df, target_sensitivity: float, n_boot: int) -> dict[str, dict]:
    """For valid and test: each model's and the average's statistics, and the average's paired differences."""
    out, threshold = {}, None
    for split in ("valid", "test"):
        items = df[df["split"] == split].reset_index(drop=True)
        runs = [probabilities(clf, items) for clf in clfs]
        truth, p = runs[0][0], np.stack([p for _, p in runs])
        average = p.mean(axis=0)
        if threshold is None:  # chosen on valid, as training chooses each model's
            threshold = choose_threshold(average, truth, target_sensitivity)
        thresholds = [clf.threshold for clf in clfs]
        ones = np.ones((1, len(truth)))
        rows = [{k: float(v[0]) for k, v in call_statistics(truth, q, t, ones).items()}
                for q, t in zip([*p, average], [*thresholds, threshold])]
        groups = lesion_groups(items)
        paired = {"models' mean": paired_bootstrap(truth, p, average, thresholds, threshold, n_boot, groups=groups)}
        for clf, q, t in zip(clfs, p, thresholds):
            paired[clf.path.name] = paired_bootstrap(truth, q, average, t, threshold, n_boot, groups=groups)
        out[split] = {"n": len(truth), "n_malignant": int(truth.sum()), "rows": rows, "threshold": threshold,
                      "paired": paired}
    return out


def report(clfs: list, result: dict) -> None:
    """The tables: statistics per model and for the average, then the average minus the others."""
    names = [clf.path.name for clf in clfs] + [f"average of {len(clfs)}"]
    width = max(len(n) for n in [*names, "- models' mean"]) + 4
    for split, r in result.items():
        print(f"\n{split} ({r['n']} images, {r['n_malignant']} malignant); the average's threshold "
              f"{r['threshold']:.4f}, chosen on valid")
        print(f"  {'':<{width}}" + "".join(f"{k:>27}" for k in STATISTICS))
        for name, row in zip(names, r["rows"]):
            print(f"  {name:<{width}}" + "".join(f"{row[k]:>27.4f}" for k in STATISTICS))
        for against, paired in r["paired"].items():
            cells = []
            for k in STATISTICS:
                d = paired[k]
                ci = "" if d["ci"] is None else f" ({d['ci'][0]:+.3f} to {d['ci'][1]:+.3f})"
                cells.append("n/a" if d["difference"] is None else f"{d['difference']:+.3f}{ci}")
            print(f"  {'- ' + against:<{width}}" + "".join(f"{c:>27}" for c in cells))


def throwaway_pair(folder: Path, size: int) -> list[Path]:
    """Two real models at `size` on ~120 images for one epoch, on one split, trained with different seeds."""
    from bench_predict import throwaway_model

    first = throwaway_model(folder, size)
    second = folder / "second.pkl"
    train(TrainConfig(data=str(SHARED / "ham10000_200x150"), pretrained=False, epochs=1, size=size, bs=32,
                      seed=1, split_from=str(model_files(first)["split"]), num_workers=0, out=str(second)))
    return [first, second]


def main(argv: list[str] | None = None) -> int:
    """Predict both held-out splits with every model, print the models, their average and the paired differences."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=Path, nargs="+", help="two or more exported models trained on one split")
    p.add_argument("--data", default=str(SHARED / "ham10000_200x150"), help="the data set the models were trained on")
    p.add_argument("--bootstrap", type=int, default=N_BOOT, help="replicates for the paired intervals")
    p.add_argument("--smoke", action="store_true", help="two throwaway 32 px models, 100 bootstrap replicates")
    p.add_argument("--out", type=Path, help="also write the figures here as JSON")
    p.add_argument("--csv", type=Path, help="also write the table here (docs/results/ensemble_*.csv)")
    args = p.parse_args(argv)
    if not args.smoke and len(args.models or []) < 2:
        p.error("--models needs two or more exported models (or --smoke)")

    with tempfile.TemporaryDirectory() as tmp:
        models = throwaway_pair(Path(tmp), 32) if args.smoke else args.models
        clfs = [load(m) for m in models]
        df = read_metadata(args.data)
        df["split"] = shared_split(models, df)
        rule = clfs[0].card.threshold_rule or {}
        target = rule.get("target_sensitivity", 0.9) if isinstance(rule, dict) else 0.9
        result = measure(clfs, df, target, 100 if args.smoke else args.bootstrap)
    print(f"\n{len(clfs)} models averaged (calibrated probability of malignancy); each statistic, then the average "
          "minus each other row, B - A (95% interval, lesions resampled); calls at each one's threshold")
    report(clfs, result)
    if args.out:
        write_json_atomic(args.out, {"models": [str(m) for m in models], "cards": [clf.card.to_dict() for clf in clfs],
                                     "splits": result})
    if args.csv:
        print(f"wrote {write_csv(args.csv, csv_rows(clfs, result))}")
    return 0


def csv_rows(clfs: list, result: dict) -> list[dict]:
    """One row a split and model (the average last), then one a split and difference: one number a cell."""
    names = [clf.path.stem for clf in clfs] + [f"average of {len(clfs)}"]
    out = []
    for split, r in result.items():
        for name, row in zip(names, r["rows"]):
            out.append({"split": split, "row": name, **{k: round(row[k], 4) for k in STATISTICS},
                        **{f"{k}_ci_{end}": "" for k in STATISTICS for end in ("low", "high")}})
        for against, paired in r["paired"].items():
            cells: dict = {}
            for k in STATISTICS:
                d = paired[k]
                cells[k] = "" if d["difference"] is None else round(d["difference"], 4)
                for end, i in (("low", 0), ("high", 1)):
                    cells[f"{k}_ci_{end}"] = "" if d["ci"] is None else round(d["ci"][i], 4)
            out.append({"split": split, "row": f"average - {against}", **cells})
    return out


if __name__ == "__main__":
    sys.exit(main())
