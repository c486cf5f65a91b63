"""Averages of the weights (`--ema`) against the weights themselves, paired on one training run.

    python bench/bench_average.py --data DIR --size 64 --bs 64 --lr 1e-3 --epochs 12   # the README's CPU figures
    python bench/bench_average.py --data DIR --decays 0.99,0.998       # the from-scratch recipe (a GPU: ~2 minutes)
    python bench/bench_average.py --smoke                              # seconds on a CPU; CI runs it

One training run of the from-scratch recipe (`skincancer.train`'s setup, overridden by the flags and --set, then
fastai's fit_one_cycle as `train` runs it), with a `weight_average` for each decay that follows the weights but
never validates: training is exactly the plain run's, so the differences printed are the averages' alone, free of
the noise between two trainings (that noise is the reason a recipe comparison needs several runs; README, Speed).
After every epoch: validation AUROC of the weights (what `train` would see) and of each average; at the end, test
AUROC of each. `train --ema` validates with the average and keeps its best epoch; here, "best" is the best epoch of
each column. It asserts nothing: read the table.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

from common import SHARED


def auroc(probs, targets) -> float:
    """AUROC of malignant (class 1) from softmax probabilities."""
    import numpy as np

    from skincancer.train import auroc_or_nan

    return auroc_or_nan(np.asarray(targets), np.asarray(probs)[:, 1])


def main(argv: list[str] | None = None) -> int:
    """Train once, print the paired table."""
    from bench_train import parse_sets

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(SHARED / "ham10000_200x150"))
    p.add_argument("--decays", default="0.99,0.995,0.998", help="comma-separated decays of the averages")
    p.add_argument("--size", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--bs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--set", action="append", default=[], help="another TrainConfig override, key=value")
    p.add_argument("--out", help="append each epoch's figures to this file as JSON lines")
    p.add_argument("--smoke", action="store_true", help="200 images at 32 px, 2 epochs: checks the script runs")
    args = p.parse_args(argv)

    from fastai.callback.core import Callback
    from fastai.torch_core import get_model

    from skincancer import train as T
    from skincancer.callbacks import weight_average
    from skincancer.evaluate import predict_frame
    from skincancer.predict import batch_preds

    decays = [float(d) for d in args.decays.split(",")]
    flags = {k: v for k, v in dict(size=args.size, epochs=args.epochs, bs=args.bs, lr=args.lr).items() if v}
    if args.smoke:
        flags = dict(size=32, epochs=2, bs=16, limit=200, num_workers=0, **flags)
    config = T.TrainConfig(data=args.data, pretrained=False, out="models/bench_average.pkl",
                           **{**flags, **parse_sets(args.set)})
    config, df, learn = T.setup(config)
    averages = {}
    for d in decays:
        averages[d] = weight_average(d)
        averages[d].before_validate = lambda: None  # it follows the weights, never stands in for them
    columns = ["weights", *(f"ema {d:g}" for d in decays)]
    print(f"{config.size} px, bs {config.bs}, lr {config.lr:g}, {config.epochs} epochs, split seed {config.seed}: "
          f"valid AUROC after each epoch")
    print("epoch  " + "  ".join(f"{c:>9}" for c in columns), flush=True)

    class Measure(Callback):
        order = 100

        def before_fit(self):
            self.copy, self.valid = copy.deepcopy(get_model(self.learn.model)), []

        def models(self):
            yield get_model(learn.model)
            for average in averages.values():
                self.copy.load_state_dict(average.averaged_state())
                yield self.copy

        def after_epoch(self):
            start = time.perf_counter()
            row = [auroc(*batch_preds(learn, learn.dls.valid, m.eval())) for m in self.models()]
            names, values = self.recorder.metric_names[1:-1], self.recorder.values[-1]
            if abs(row[0] - values[names.index("auroc")]) > 1e-4:  # this path must measure what fastai measured
                raise SystemExit(f"valid AUROC {row[0]:.6f} here, {values[names.index('auroc')]:.6f} in fastai's")
            self.valid.append(row)
            print(f"{self.epoch + 1:>5}  " + "  ".join(f"{v:>9.4f}" for v in row) +
                  f"   ({time.perf_counter() - start:.0f} s to measure)", flush=True)

    measure = Measure()
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(config.epochs, config.lr, wd=config.wd, cbs=[*averages.values(), measure])
    test_part = df[df["split"] == "test"]
    test = [auroc(*predict_frame(learn, test_part, model=m.eval())) for m in measure.models()]
    best = [max(range(len(measure.valid)), key=lambda e: measure.valid[e][i]) for i in range(len(columns))]
    print("best   " + "  ".join(f"{measure.valid[e][i]:>9.4f}" for i, e in enumerate(best)) + "   (valid, best epoch)")
    print("epoch  " + "  ".join(f"{e + 1:>9}" for e in best))
    print("test   " + "  ".join(f"{v:>9.4f}" for v in test) + "   (after the last epoch)")
    print("each average minus the weights, last epoch: valid " +
          ", ".join(f"{c} {measure.valid[-1][i] - measure.valid[-1][0]:+.4f}" for i, c in enumerate(columns) if i) +
          "; test " + ", ".join(f"{c} {test[i] - test[0]:+.4f}" for i, c in enumerate(columns) if i))
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(json.dumps({"settings": {k: getattr(config, k) for k in ("size", "bs", "lr", "epochs", "seed")},
                                "columns": columns, "valid": measure.valid, "test": test}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
