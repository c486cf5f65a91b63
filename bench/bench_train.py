"""Training benchmark: the seed recipe against ours on the same data and split, measured in one run.

    python bench/bench_train.py --data DIR                      # seed and ours, binary, 224 px, from scratch
    python bench/bench_train.py --data DIR --runs ours --size 128 --epochs 60   # ours at the from-scratch default
    python bench/bench_train.py --data DIR --runs ours --set compile=true --epochs 40
    python bench/bench_train.py --data DIR --size 128 --runs ours,ours+seed=1,ours+wd=0.1,ours+wd=0.1+seed=1
    python bench/bench_train.py --data DIR --runs ours+recipe=cpu+weights=FILE,ours+size=64+epochs=12 --set bs=64
    python bench/bench_train.py --data DIR --recipes runs1.jsonl runs2.jsonl   # compare what those runs wrote
    python bench/bench_train.py --smoke                         # seconds on a CPU; CI runs it to keep it working

The seed recipe is fastai's defaults as the seed projects wrote them: DataBlock reading files with `Resize(460)`
(scaled with --size), `aug_transforms(size)`, bs 64, fp16 (on a GPU), `fit_one_cycle` at fastai's default rate.
Ours is `skincancer.train` with its defaults (presized cache on the GPU, bf16, channels_last, the from-scratch
recipe), overridden by --set. Both train from random weights at --size (224 unless given; the from-scratch default
is 128) on the package's lesion-grouped split, unless a run names a recipe (`ours+recipe=cpu`), which then decides.

A run named `ours+key=value+...` is ours with those TrainConfig overrides on top of --set's: several in one
`--runs` measure a change against ours in one process (repeat them in the other order too: a process's later
runs find caches warm). Prints, per run: training images/s end to end (every epoch's training and validation,
divided into the training images seen) and in the steady state (the median epoch after the first), the fit's wall
time, the time to prepare the data, and AUROC and balanced accuracy on valid and test; then ours / seed, and each
later `ours...` run against the first: its speed ratios, and its valid and test AUROC and balanced accuracy minus
the first's with a paired bootstrap interval (lesions resampled; it covers which images the split drew, not the
noise between two trainings; choose on valid, confirm on test). Every run trains on one split, drawn with --set
seed (42 unless given), so a run's own seed changes only its training: `--runs ours,ours+seed=1,ours+seed=2` shows
the noise between trainings of one recipe. Where a recipe is trained more than once, it ends with each recipe (the
mean of its trainings) against ours: the difference, its interval over the images, and a wider one that adds the
noise between trainings, pooled over the recipes trained twice or more (with --out, a last line named "recipes"),
and each such recipe's trainings averaged (an ensemble of their probabilities) against their mean.
With --out each ours line also holds its predictions, so runs spread over several processes (a GPU session's calls)
are compared afterwards, anywhere the data is: `--recipes a.jsonl b.jsonl` trains nothing. It asserts nothing about
speed: compare figures measured in one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from common import SHARED, sync, write_csv
from fastai.callback.core import Callback
from fastai.vision.all import (CategoryBlock, ColReader, ColSplitter, DataBlock, ImageBlock, Resize, aug_transforms,
                               resnet50, vision_learner)
from scipy.stats import t as student_t

from skincancer.classifier import predict_frame
from skincancer.config import TrainConfig
from skincancer.data import prepare
from skincancer.labels import classes_for
from skincancer.metrics import classification_metrics, malignant_scores, paired_bootstrap
from skincancer.model import metrics_for
from skincancer.train import fit, seed_everything, setup


def epoch_timer():
    """A fastai callback recording each epoch's wall time, and the part of it spent validating."""
    class EpochTimer(Callback):
        order = 100

        def before_fit(self):
            self.times, self.valid_times = [], []

        def before_epoch(self):
            sync()
            self.start = time.perf_counter()

        def before_validate(self):
            sync()
            self.valid_start = time.perf_counter()

        def after_validate(self):
            sync()
            self.valid_times.append(time.perf_counter() - self.valid_start)

        def after_epoch(self):
            sync()
            self.times.append(time.perf_counter() - self.start)

    return EpochTimer()


def scores(learn, df, tta: bool = False) -> tuple[dict, dict]:
    """AUROC and balanced accuracy (at 0.5) on valid and test, and each split's truth and malignant probabilities."""
    classes = [str(c) for c in learn.dls.vocab]
    out, preds = {}, {}
    for split in ("valid", "test"):
        probs, targets = predict_frame(learn, df[df["split"] == split], tta=tta)
        m = classification_metrics(probs, targets, classes, threshold=0.5, n_boot=0)
        out[f"{split}_auroc"], out[f"{split}_bal_acc"] = m["auroc"], m["balanced_accuracy"]
        preds[split] = malignant_scores(probs, targets, classes)
    return out, preds


def paired(first: tuple, later: tuple, lesions) -> dict:
    """A later run's AUROC and balanced accuracy (at 0.5) against the first's on the same images, paired by lesion."""
    result = paired_bootstrap(first[0], first[1], later[1], n_boot=1000, groups=lesions)
    return {k: {"difference": result[k]["difference"], "ci95": result[k]["ci"], "p_value": result[k]["p_value"]}
            for k in ("auroc", "balanced_accuracy")}


def recipe_of(name: str) -> str:
    """A run's recipe: its name without `+seed=N` (which trains the same recipe again), settings in a fixed order."""
    head, *parts = name.split("+")
    return "+".join([head, *sorted(p for p in parts if not p.startswith("seed="))])


def training_noise(values: dict[str, list[float]]) -> tuple[float | None, int]:
    """The pooled standard deviation between trainings of one recipe, and its degrees of freedom (None, 0 if none)."""
    df = sum(len(v) - 1 for v in values.values())
    if df == 0:
        return None, 0
    return float(np.sqrt(sum(np.var(v, ddof=1) * (len(v) - 1) for v in values.values() if len(v) > 1) / df)), df


def compare_recipes(runs: dict[str, dict], preds: dict[str, dict], lesions: dict, level: float = 0.95) -> dict:
    """Each recipe's trainings (mean) against the first recipe's, on valid and test: the difference, its interval over
    the images drawn (paired bootstrap), and a wider one that adds the noise between trainings of one recipe.

    `runs` and `preds` are keyed by run name, first run first; the noise is the pooled sd of a statistic between
    trainings of one recipe, so recipes need two trainings or more (`+seed=N`) for the wider interval. It assumes the
    two sources add: var = se(images)^2 + sd^2 (1/k_a + 1/k_b), with Student's t on the pooled degrees of freedom.
    """


    recipes: dict[str, list[str]] = {}
    for name in runs:
        recipes.setdefault(recipe_of(name), []).append(name)
    first, *others = recipes
    out = {"trainings": {r: len(names) for r, names in recipes.items()}, "first": first, "noise": {}, "vs_first": {},
           "averaged": {}}
    for split in ("valid", "test"):
        truth = next(iter(preds.values()))[split][0]
        for recipe, names in recipes.items():
            if len(names) < 2:
                continue
            # an ensemble of the recipe's trainings (their probabilities averaged) against those trainings (mean)
            runs_p = np.stack([preds[n][split][1] for n in names])
            res = paired_bootstrap(truth, runs_p, runs_p.mean(axis=0), n_boot=1000, level=level,
                                   groups=lesions[split])
            for key in ("auroc", "balanced_accuracy"):
                out["averaged"].setdefault(recipe, {})[f"{split}_{key}"] = {
                    "difference": res[key]["difference"], "ci_images": res[key]["ci"], "average": res[key]["b"]}
        for key, column in (("auroc", "auroc"), ("balanced_accuracy", "bal_acc")):
            sd, df = training_noise({r: [runs[n][f"{split}_{column}"] for n in names] for r, names in recipes.items()})
            out["noise"][f"{split}_{key}"] = {"sd": sd, "df": df}
        for recipe in others:
            res = paired_bootstrap(truth, np.stack([preds[n][split][1] for n in recipes[first]]),
                                   np.stack([preds[n][split][1] for n in recipes[recipe]]), n_boot=1000,
                                   level=level, groups=lesions[split])
            ka, kb = len(recipes[first]), len(recipes[recipe])
            for key in ("auroc", "balanced_accuracy"):
                d, noise = res[key], out["noise"][f"{split}_{key}"]
                entry = {"difference": d["difference"], "ci_images": d["ci"], "p_value_images": d["p_value"]}
                if d["se"] is not None and noise["sd"] is not None:
                    se = float(np.hypot(d["se"], noise["sd"] * np.sqrt(1 / ka + 1 / kb)))
                    half = float(student_t.ppf((1 + level) / 2, noise["df"])) * se
                    # a difference of two proportions stays within [-1, 1], whatever the normal approximation says
                    lo, hi = d["difference"] - half, d["difference"] + half
                    entry["ci_with_training_noise"] = [max(-1.0, lo), min(1.0, hi)]
                out["vs_first"].setdefault(recipe, {})[f"{split}_{key}"] = entry
    return out


def print_recipes(summary: dict) -> None:
    """compare_recipes' summary as lines: trainings, the noise between them, each recipe's differences, averages."""
    print("\nrecipes, each the mean of its trainings (choose on valid, confirm on test): "
          + ", ".join(f"{r} x{k}" for r, k in summary["trainings"].items()))
    noise = {k: v for k, v in summary["noise"].items() if v["sd"] is not None}
    if noise:
        df = next(iter(noise.values()))["df"]
        print(f"  between trainings of one recipe (pooled sd, {df} df): "
              + ", ".join(f"{k.replace('_', ' ')} {v['sd']:.4f}" for k, v in noise.items()))
    else:
        print("  no recipe trained twice (add +seed=N runs): the noise between trainings is not known")
    for recipe, stats in summary["vs_first"].items():
        for key, e in stats.items():
            if e["difference"] is None:
                continue
            line = f"  {key.replace('_', ' ')} {recipe} - {summary['first']}: {e['difference']:+.3f}"
            if e["ci_images"]:
                line += f" (images: {e['ci_images'][0]:+.3f} to {e['ci_images'][1]:+.3f}"
                wide = e.get("ci_with_training_noise")
                line += f"; with training noise: {wide[0]:+.3f} to {wide[1]:+.3f})" if wide else ")"
            print(line)
    for recipe, stats in summary.get("averaged", {}).items():
        for key, e in stats.items():
            if e["difference"] is None:
                continue
            ci = f" (images: {e['ci_images'][0]:+.3f} to {e['ci_images'][1]:+.3f})" if e["ci_images"] else ""
            print(f"  {key.replace('_', ' ')} {recipe}, its {summary['trainings'][recipe]} trainings' probabilities "
                  f"averaged: {e['average']:.3f}, {e['difference']:+.3f} on their mean{ci}")


def report_recipes(runs: dict[str, dict], preds: dict[str, dict], lesions: dict) -> dict:
    """compare_recipes, printed as lines and as one JSON line; returns the summary."""
    summary = compare_recipes(runs, preds, lesions)
    print_recipes(summary)
    print(json.dumps({"recipes": summary}))
    return summary


def append_line(path: str, record: dict) -> None:
    """Append `record` to the JSON-lines file at `path`."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def seed_run(df, size: int, epochs: int, bs: int = 64) -> dict:
    """The seed recipe: files decoded every epoch, Resize(460), aug_transforms, fp16, fit_one_cycle."""
    # PyTorch's cuDNN defaults, as a script that never calls set_seed runs, whatever an earlier run here chose
    torch.backends.cudnn.deterministic = torch.backends.cudnn.benchmark = False
    start = time.perf_counter()
    items = df[df["split"].isin(["train", "valid"])].reset_index(drop=True)
    items = items.assign(is_valid=items["split"] == "valid")
    dblock = DataBlock(blocks=(ImageBlock, CategoryBlock(vocab=list(classes_for("binary")))),
                       get_x=ColReader("path"), get_y=ColReader("label"), splitter=ColSplitter("is_valid"),
                       item_tfms=Resize(round(460 * size / 224)), batch_tfms=aug_transforms(size=size))
    dls = dblock.dataloaders(items, bs=bs)
    learn = vision_learner(dls, resnet50, pretrained=False, metrics=metrics_for("binary"))
    if torch.cuda.is_available():
        learn = learn.to_fp16()
    prep = time.perf_counter() - start
    timer = epoch_timer()
    with learn.no_bar():
        sync()
        start = time.perf_counter()
        learn.fit_one_cycle(epochs, cbs=[timer])
        sync()
        wall = time.perf_counter() - start
    return dict(learn=learn, prep_s=prep, fit_s=wall, epoch_s=timer.times, valid_s=timer.valid_times,
                settings=dict(size=size, bs=bs))


def our_run(df, data: str, overrides: dict, cache_dir: str, workdir: Path, size: int) -> dict:
    """skincancer.train's setup and fit with its defaults and `overrides`, on the split in `df`, under `workdir`.

    From random weights at `size` unless the overrides name a recipe, whose own choices stand.
    """
    start_from = {} if "recipe" in overrides else {"pretrained": False, "size": size}
    config = TrainConfig(data=data, out=str(Path(tempfile.mkdtemp(dir=workdir)) / "bench.pkl"),
                         cache_dir=cache_dir, **{**start_from, **overrides})
    start = time.perf_counter()
    config, split_df, learn = setup(config)
    by_image = split_df.set_index("image_id")["split"].sort_index()
    assert by_image.equals(df.set_index("image_id")["split"].sort_index()), "every run must see one split"
    prep = time.perf_counter() - start
    timer = epoch_timer()
    learn.add_cb(timer)
    with learn.no_bar():
        sync()
        start = time.perf_counter()
        best = fit(learn, config)
        sync()
        wall = time.perf_counter() - start
    learn.remove_cb(timer)
    settings = {**config.identity(), "compile": config.compile, "cache": config.cache}
    return dict(learn=learn, prep_s=prep, fit_s=wall, epoch_s=timer.times, valid_s=timer.valid_times, best_epoch=best,
                settings=settings)


def synthetic_ceiling(size: int, bs: int = 256, steps: int = 30, compile: bool = False) -> float:
    """Images/s of bare ResNet50 training steps on random GPU tensors (bf16 autocast, channels_last)."""
    seed_everything(0)  # cuDNN's algorithms as a training run picks them
    model = torchvision.models.resnet50(num_classes=2).cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step_model = torch.compile(model) if compile else model
    x = torch.randn(bs, 3, size, size, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (bs,), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(step_model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return bs * steps / (time.perf_counter() - start)


def parse_sets(pairs: list[str]) -> dict:
    """key=value pairs (--set, or a run's +key=value) as TrainConfig overrides, values parsed as JSON if they can be."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in fields:
            raise SystemExit(f"{pair}: {key!r} is not a TrainConfig field")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def split_identity(df, seed: int, limit: int | None) -> tuple[str, dict]:
    """The split CSV that every run trains on, and what identifies it (seed, limit, the CSV's sha256)."""
    text = df[["image_id", "lesion_id", "split"]].to_csv(index=False)
    return text, {"seed": seed, "limit": limit, "sha256": hashlib.sha256(text.encode()).hexdigest()}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print a table and write JSON lines to --out."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(SHARED / "ham10000_200x150"))
    p.add_argument("--runs", default="seed,ours",
                   help="comma-separated: seed, ours, or ours+key=value+... (ours with more TrainConfig overrides)")
    p.add_argument("--epochs", type=int, help="epochs for both (default: 5 for seed, the recipe's for ours)")
    p.add_argument("--size", type=int,
                   help="image size of seed and of ours without a recipe (default 224; --set size=N overrides ours)")
    p.add_argument("--limit", type=int)
    p.add_argument("--set", action="append", default=[], help="TrainConfig override for ours, key=value")
    p.add_argument("--tta", action="store_true", help="also score ours with test-time augmentation")
    p.add_argument("--synthetic", action="store_true", help="also time bare ResNet50 steps (GPU ceiling)")
    p.add_argument("--cache-dir", default=None,
                   help="presize cache, kept (default: a temporary folder, cold for the first run, then removed)")
    p.add_argument("--out", help="append one JSON line per run here")
    p.add_argument("--csv", help="also write the table here, a row a run (docs/results/*.csv)")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run: 200 images, 32 px, 1 epoch")
    p.add_argument("--recipes", nargs="+", metavar="JSONL",
                   help="train nothing: compare the recipes of the ours runs that earlier runs wrote with --out "
                        "(from one split of --data), e.g. runs split over several processes")
    args = p.parse_args(argv)
    if args.recipes:
        return recipes_from_files(args.recipes, args.data)
    overrides = parse_sets(args.set)
    if args.smoke:
        args.limit, args.size, args.epochs = 200, args.size or 32, 1
        overrides = {"bs": 32, "checkpoint_every": 0, **overrides}
    # one size for the seed and ours unless told otherwise, so that the printed ratio compares like with like
    args.size = args.size or 224
    if args.epochs:
        overrides.setdefault("epochs", args.epochs)
    # the split file and (without --cache-dir) a cold presize cache, removed when the runs end or fail
    with tempfile.TemporaryDirectory(prefix="skincancer-bench-") as tmp:
        return run_all(args, overrides, Path(tmp), args.cache_dir or str(Path(tmp) / "cache"))


def run_all(args, overrides: dict, workdir: Path, cache_dir: str) -> int:
    """Train every run of --runs on one split written in `workdir`; print and --out each, then the comparisons."""
    df = prepare(args.data, "binary", seed=overrides.get("seed", 42), limit=args.limit)
    # every run trains on this one split: a run's own seed (ours+seed=N) changes only its training
    split_csv = workdir / "bench.split.csv"
    text, split = split_identity(df, seed=overrides.get("seed", 42), limit=args.limit)
    split_csv.write_text(text, encoding="utf-8")
    overrides.setdefault("split_from", str(split_csv))
    n_train = int((df["split"] == "train").sum())
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {device}; {len(df)} images, {n_train} for training; torch {torch.__version__}")

    rows = []
    names = [r.strip() for r in args.runs.split(",") if r.strip()]
    variants = {name: parse_sets(name.split("+")[1:]) for name in names if name.split("+")[0] == "ours"}
    unknown = [name for name in names if name != "seed" and name not in variants]
    if unknown:
        raise SystemExit(f"--runs: unknown run(s) {unknown} (seed, ours, ours+key=value+...)")
    lesions = {s: df.loc[df["split"] == s, "lesion_id"].to_numpy() for s in ("valid", "test")}
    ours_runs, ours_preds = {}, {}  # by name: a name run twice (same seed) is not another training
    for name in names:
        if name == "seed":
            res = seed_run(df, args.size, args.epochs or 5)
        else:
            res = our_run(df, args.data, {**overrides, **variants[name]}, cache_dir, workdir, args.size)
        learn = res.pop("learn")
        epochs = len(res["epoch_s"])
        scored, preds = scores(learn, df)
        res.update(name=name, images_per_s=n_train * epochs / res["fit_s"], epochs=epochs, device=device, **scored)
        if name != "seed":
            if ours_preds:  # the runs share one split (our_run checks it): their predictions pair image by image
                first = next(iter(ours_preds.values()))
                res["vs_first_ours"] = {s: paired(first[s], preds[s], lesions[s]) for s in ("valid", "test")}
            ours_runs.setdefault(name, res)
            ours_preds.setdefault(name, preds)
            # what --recipes needs to pair this run with runs of other processes on the same split
            res.update(split=split, predictions={s: np.round(preds[s][1], 6).tolist() for s in ("valid", "test")})
        if args.tta and name == "ours":
            res.update({f"tta_{k}": v for k, v in scores(learn, df, tta=True)[0].items()})
        later = sorted(res["epoch_s"][1:]) or res["epoch_s"]
        res["steady_images_per_s"] = n_train / later[len(later) // 2]  # median epoch after the first
        res["valid_share"] = sum(res["valid_s"]) / sum(res["epoch_s"])  # of the epochs' time, spent validating
        rows.append(res)
        print(json.dumps({k: v for k, v in res.items() if k not in ("epoch_s", "valid_s", "predictions")}), flush=True)
        if args.out:
            append_line(args.out, res)
        del learn
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    if args.synthetic and torch.cuda.is_available():
        for compiled in (False, True):
            rate = synthetic_ceiling(args.size, compile=compiled)
            print(f"synthetic ResNet50 step at {args.size}px, bs 256, bf16, channels_last, compile={compiled}: "
                  f"{rate:.0f} images/s", flush=True)

    width = max(len(r["name"]) for r in rows) if rows else 3
    print(f"\n{'run':<{width}} {'size':>4} {'epochs':>6} {'images/s':>9} {'steady/s':>9} {'fit s':>7} {'valid %':>7} "
          f"{'prep s':>7} {'valid AUROC':>11} {'test AUROC':>10} {'valid bal acc':>13}")
    for r in rows:
        print(f"{r['name']:<{width}} {r['settings']['size']:>4} {r['epochs']:>6} {r['images_per_s']:>9.0f} "
              f"{r['steady_images_per_s']:>9.0f} {r['fit_s']:>7.1f} {100 * r['valid_share']:>7.1f} {r['prep_s']:>7.1f} "
              f"{r['valid_auroc']:>11.3f} {r['test_auroc']:>10.3f} {r['valid_bal_acc']:>13.3f}")
    by_name = {r["name"]: r for r in rows}
    ours = [r for r in rows if r["name"] != "seed"]
    if "seed" in by_name and ours:
        if by_name["seed"]["settings"]["size"] != ours[0]["settings"]["size"]:
            print("note: the two runs used different image sizes, so the ratio is not like for like")
        print(f"ratio {ours[0]['name']} / seed, images/s end to end: "
              f"{ours[0]['images_per_s'] / by_name['seed']['images_per_s']:.2f}x")
    for r in ours[1:]:
        print(f"ratio {r['name']} / {ours[0]['name']}, images/s end to end: "
              f"{r['images_per_s'] / ours[0]['images_per_s']:.2f}x, steady: "
              f"{r['steady_images_per_s'] / ours[0]['steady_images_per_s']:.2f}x")
        for split, stats in r["vs_first_ours"].items():
            for k, d in stats.items():
                if d["difference"] is None:
                    continue
                ci = f" (95% CI {d['ci95'][0]:+.3f} to {d['ci95'][1]:+.3f}, p {d['p_value']:.2f})" if d["ci95"] else ""
                print(f"  {split} {k.replace('_', ' ')} {r['name']} - {ours[0]['name']}: {d['difference']:+.3f}{ci}")
    if ours[1:]:
        print("(differences are paired by lesion: an interval covers which images the split drew, not the noise "
              "between two trainings; choose on valid, confirm on test)")
    n_recipes = len({recipe_of(n) for n in ours_runs})
    if 1 < n_recipes < len(ours_runs):  # several recipes, one of them trained more than once
        summary = report_recipes(ours_runs, ours_preds, lesions)
        if args.out:
            append_line(args.out, {"name": "recipes", **summary})
    if args.csv and rows:
        print(f"wrote {write_csv(args.csv, [csv_row(r) for r in rows])}")
    return 0


def csv_row(run: dict) -> dict:
    """A run's table row: its settings and every figure that is one number, a column each."""
    settings = {f"setting_{k}": v for k, v in run["settings"].items() if isinstance(v, (int, float, str, bool))}
    figures = {k: round(v, 4) if isinstance(v, float) else v for k, v in run.items()
               if isinstance(v, (int, float, str, bool)) and v is not None}
    return {**figures, **settings}


def recipes_from_files(files: list[str], data: str) -> int:
    """--recipes: compare_recipes over the `ours` runs that earlier benchmark runs wrote with --out, on one split."""
    runs: dict[str, dict] = {}
    for file in files:
        for line in Path(file).read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if "predictions" in row:
                runs.setdefault(row["name"], row)  # a name again is the same seed: not another training
    if not runs:
        raise SystemExit(f"{', '.join(files)}: no runs with predictions (written by this script's --out)")
    splits = {json.dumps(r["split"], sort_keys=True) for r in runs.values()}
    if len(splits) > 1:
        raise SystemExit(f"{', '.join(files)}: the runs were trained on {len(splits)} different splits; "
                         "a paired comparison needs one")
    split = next(iter(runs.values()))["split"]
    df = prepare(data, "binary", seed=split["seed"], limit=split["limit"])
    if split_identity(df, split["seed"], split["limit"])[1] != split:
        raise SystemExit(f"{data}: gives another split than the one these runs were trained on (seed "
                         f"{split['seed']}, limit {split['limit']}); pass the --data they used")
    parts = {s: df[df["split"] == s] for s in ("valid", "test")}
    lesions = {s: part["lesion_id"].to_numpy() for s, part in parts.items()}
    truth = {s: part["label"].to_numpy() == "malignant" for s, part in parts.items()}
    preds = {name: {s: (truth[s], np.asarray(r["predictions"][s])) for s in parts} for name, r in runs.items()}
    report_recipes(runs, preds, lesions)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
