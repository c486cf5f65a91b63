"""Training benchmark: the seed recipe against ours on the same data and split, measured in one run.

    python bench/bench_train.py --data DIR                      # seed and ours, binary, 224 px, from scratch
    python bench/bench_train.py --data DIR --runs ours --size 128 --epochs 60   # ours at the from-scratch default
    python bench/bench_train.py --data DIR --runs ours --epochs 40 --set mixup=0.4 --set size=160
    python bench/bench_train.py --data DIR --runs ours --set augment=one-pass --set compile=true
    python bench/bench_train.py --data DIR --runs ours,ours+loss_on_device=true --epochs 12   # a change, one run
    python bench/bench_train.py --data DIR --runs ours,ours+reproducible=false --epochs 12 --synthetic
    python bench/bench_train.py --data DIR --size 128 --runs ours,ours+seed=1,ours+mixup=0.2,ours+mixup=0.2+seed=1
    python bench/bench_train.py --smoke                         # seconds on a CPU; CI runs it to keep it working

The seed recipe is fastai's defaults as the seed projects wrote them: DataBlock reading files with `Resize(460)`
(scaled with --size), `aug_transforms(size)`, bs 64, fp16 (on a GPU), `fit_one_cycle` at fastai's default rate.
Ours is `skincancer.train` with its defaults (presized cache on the GPU, bf16, channels_last, the from-scratch
recipe), overridden by --set. Both train from random weights at --size (224 unless given; the from-scratch default
is 128) on the package's lesion-grouped split.

A run named `ours+key=value+...` is ours with those TrainConfig overrides on top of --set's: several in one
`--runs` measure a change against ours in one process (repeat them in the other order too: a process's later
runs find caches warm). Prints, per run: training images/s end to end (every epoch's training and validation,
divided into the training images seen) and in the steady state (the median epoch after the first), the fit's wall
time, the time to prepare the data, and AUROC and balanced accuracy on valid and test; then ours / seed, and each
later `ours...` run against the first: its speed ratios, and its valid and test AUROC and balanced accuracy minus
the first's with a paired bootstrap interval (lesions resampled; it covers which images the split drew, not the
noise between two trainings; choose on valid, confirm on test). Every run trains on one split, drawn with --set
seed (42 unless given), so a run's own seed changes only its training: `--runs ours,ours+seed=1,ours+seed=2` shows
the noise between trainings of one recipe. It asserts nothing about speed: compare figures measured in one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

from common import SHARED, sync


def epoch_timer():
    """A fastai callback recording each epoch's wall time, and the part of it spent validating."""
    from fastai.callback.core import Callback

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
    from skincancer.evaluate import classification_metrics, malignant_scores, predict_frame

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
    from skincancer.evaluate import paired_bootstrap

    result = paired_bootstrap(first[0], first[1], later[1], n_boot=1000, groups=lesions)
    return {k: {"difference": result[k]["difference"], "ci95": result[k]["ci"], "p_value": result[k]["p_value"]}
            for k in ("auroc", "balanced_accuracy")}


def seed_run(df, size: int, epochs: int, bs: int = 64) -> dict:
    """The seed recipe: files decoded every epoch, Resize(460), aug_transforms, fp16, fit_one_cycle."""
    import torch
    from fastai.vision.all import (CategoryBlock, ColReader, ColSplitter, DataBlock, ImageBlock, Resize,
                                   aug_transforms, resnet50, vision_learner)

    from skincancer.data import classes_for
    from skincancer.train import metrics_for

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


def our_run(df, data: str, overrides: dict, cache_dir: str) -> dict:
    """skincancer.train's setup and fit with its defaults and `overrides`, on the split in `df`."""
    from skincancer import train as T

    config = T.TrainConfig(data=data, pretrained=False, out=str(Path(tempfile.mkdtemp()) / "bench.pkl"),
                           cache_dir=cache_dir, **overrides)
    start = time.perf_counter()
    config, split_df, learn = T.setup(config)
    by_image = split_df.set_index("image_id")["split"].sort_index()
    assert by_image.equals(df.set_index("image_id")["split"].sort_index()), "every run must see one split"
    prep = time.perf_counter() - start
    timer = epoch_timer()
    learn.add_cb(timer)
    with learn.no_bar():
        sync()
        start = time.perf_counter()
        best = T.fit(learn, config, T.monitor_for(config.task))
        sync()
        wall = time.perf_counter() - start
    learn.remove_cb(timer)
    keys = ("seed", "epochs", "size", "bs", "lr", "wd", "label_smoothing", "mixup", "augment", "imbalance", "compile",
            "loss_on_device", "reproducible", "cache")
    return dict(learn=learn, prep_s=prep, fit_s=wall, epoch_s=timer.times, valid_s=timer.valid_times, best_epoch=best,
                settings={k: getattr(config, k) for k in keys})


def synthetic_ceiling(size: int, bs: int = 256, steps: int = 30, compile: bool = False,
                      reproducible: bool = True) -> float:
    """Images/s of bare ResNet50 training steps on random GPU tensors (bf16 autocast, channels_last)."""
    import torch
    import torchvision

    from skincancer.train import seed_everything

    seed_everything(0, reproducible)  # cuDNN's algorithms as a training run with the same setting picks them
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
    from skincancer.train import TrainConfig

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


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print a table and write JSON lines to --out."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(SHARED / "ham10000_200x150"))
    p.add_argument("--runs", default="seed,ours",
                   help="comma-separated: seed, ours, or ours+key=value+... (ours with more TrainConfig overrides)")
    p.add_argument("--epochs", type=int, help="epochs for both (default: 5 for seed, the recipe's for ours)")
    p.add_argument("--size", type=int, help="image size of both runs (default 224; --set size=N overrides ours)")
    p.add_argument("--limit", type=int)
    p.add_argument("--set", action="append", default=[], help="TrainConfig override for ours, key=value")
    p.add_argument("--tta", action="store_true", help="also score ours with test-time augmentation")
    p.add_argument("--synthetic", action="store_true", help="also time bare ResNet50 steps (GPU ceiling)")
    p.add_argument("--cache-dir", default=None, help="presize cache (default: a temporary folder)")
    p.add_argument("--out", help="append one JSON line per run here")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run: 200 images, 32 px, 1 epoch")
    args = p.parse_args(argv)

    import torch

    from skincancer.data import prepare

    overrides = parse_sets(args.set)
    if args.smoke:
        args.limit, args.size, args.epochs = 200, args.size or 32, 1
        overrides = {"bs": 32, "checkpoint_every": 0, **overrides}
    args.size = args.size or 224
    # one size for both unless told otherwise, so that the printed ratio compares like with like
    overrides.setdefault("size", args.size)
    if args.epochs:
        overrides.setdefault("epochs", args.epochs)
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="skincancer-cache-")
    df = prepare(args.data, "binary", seed=overrides.get("seed", 42), limit=args.limit)
    # every run trains on this one split: a run's own seed (ours+seed=N) changes only its training
    split_csv = Path(tempfile.mkdtemp(prefix="skincancer-bench-")) / "bench.split.csv"
    df[["image_id", "lesion_id", "split"]].to_csv(split_csv, index=False)
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
    first_preds, lesions = None, {s: df.loc[df["split"] == s, "lesion_id"].to_numpy() for s in ("valid", "test")}
    for name in names:
        if name == "seed":
            res = seed_run(df, args.size, args.epochs or 5)
        else:
            res = our_run(df, args.data, {**overrides, **variants[name]}, cache_dir)
        learn = res.pop("learn")
        epochs = len(res["epoch_s"])
        scored, preds = scores(learn, df)
        res.update(name=name, images_per_s=n_train * epochs / res["fit_s"], epochs=epochs, device=device, **scored)
        if name != "seed":
            if first_preds is None:
                first_preds = preds
            else:  # the runs share one split (our_run checks it): their predictions pair image by image
                res["vs_first_ours"] = {s: paired(first_preds[s], preds[s], lesions[s]) for s in ("valid", "test")}
        if args.tta and name == "ours":
            res.update({f"tta_{k}": v for k, v in scores(learn, df, tta=True)[0].items()})
        later = sorted(res["epoch_s"][1:]) or res["epoch_s"]
        res["steady_images_per_s"] = n_train / later[len(later) // 2]  # median epoch after the first
        res["valid_share"] = sum(res["valid_s"]) / sum(res["epoch_s"])  # of the epochs' time, spent validating
        rows.append(res)
        print(json.dumps({k: v for k, v in res.items() if k not in ("epoch_s", "valid_s")}), flush=True)
        if args.out:
            with open(args.out, "a", encoding="utf-8") as f:
                f.write(json.dumps(res) + "\n")
        del learn
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    if args.synthetic and torch.cuda.is_available():
        for compiled in (False, True):
            for reproducible in (True, False):
                rate = synthetic_ceiling(args.size, compile=compiled, reproducible=reproducible)
                print(f"synthetic ResNet50 step at {args.size}px, bs 256, bf16, channels_last, compile={compiled}, "
                      f"reproducible={reproducible}: {rate:.0f} images/s", flush=True)

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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
