"""CPU inference benchmark: batched predict_batch against a per-image learn.predict loop, measured in one run.

    python bench/bench_predict.py --model models/skincancer.pkl --images DIR [--n 256] [--bs 64]
    python bench/bench_predict.py --smoke      # seconds: trains a tiny model first; CI runs this to keep it working

Prints model load times, single-image latency, and images/s of both ways with their ratio. It asserts nothing about
speed: figures depend on the machine, so compare ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import SHARED


def timed(fn, *args, **kwargs):
    """(result, seconds) of one call."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def tiny_model(folder: Path) -> Path:
    """Train the smallest real model (one epoch, 32 px, ~120 images) for --smoke."""
    from skincancer.train import TrainConfig, train

    out = folder / "tiny.pkl"
    train(TrainConfig(data=str(SHARED / "ham10000_200x150"), pretrained=False, epochs=1, size=32, bs=32, limit=120,
                      num_workers=0, out=str(out)))
    return out


def run(model: Path, images: list[Path], bs: int) -> dict:
    """Measure load, latency and throughput; return the figures."""
    import fastai.vision.all  # noqa: F401  (imports are not load time)
    import torch

    from skincancer import predict as P

    P._CACHE.clear()
    clf, load_safe = timed(P.load, model)
    P._CACHE.clear()
    pickled, load_pickle = timed(P.load, model, trusted=True)
    learn = pickled.learn
    decoded = [P.open_image(p) for p in images]

    clf.predict(images[0])  # warm-up: first-call allocations are not latency
    latencies = [timed(clf.predict, p)[1] for p in images[: min(20, len(images))]]

    with learn.no_bar():
        learn.predict(decoded[0])
        _, loop_s = timed(lambda: [learn.predict(img) for img in decoded])
    _, batch_s = timed(clf.predict_batch, images, bs=bs)
    return {"images": len(images), "threads": torch.get_num_threads(), "load_safetensors_s": load_safe,
            "load_pickle_s": load_pickle, "latency_median_ms": 1000 * statistics.median(latencies),
            "loop_images_per_s": len(images) / loop_s, "batch_images_per_s": len(images) / batch_s,
            "ratio": loop_s / batch_s}


def main(argv=None) -> int:
    """Parse arguments, run the benchmark, print the figures."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, help="exported model (.pkl with .safetensors and .json beside it)")
    p.add_argument("--images", type=Path, default=SHARED / "ham10000_200x150" / "images")
    p.add_argument("--n", type=int, default=256, help="images to predict")
    p.add_argument("--bs", type=int, default=64)
    p.add_argument("--smoke", action="store_true", help="tiny model, 16 images: checks the script runs")
    args = p.parse_args(argv)
    images = sorted(args.images.glob("*.jpg"))[: 16 if args.smoke else args.n]
    if not images:
        print(f"no .jpg images in {args.images}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or (tiny_model(Path(tmp)) if args.smoke else None)
        if model is None:
            print("--model is required (or --smoke)", file=sys.stderr)
            return 2
        r = run(model, images, args.bs)
    print(f"\nCPU inference, {r['images']} images of {args.images}, bs {args.bs}, {r['threads']} torch threads")
    print(f"  load (safetensors, default)  {r['load_safetensors_s']:8.2f} s")
    print(f"  load (pickle, trusted)       {r['load_pickle_s']:8.2f} s")
    print(f"  single-image latency         {r['latency_median_ms']:8.1f} ms (median, predict())")
    print(f"  per-image learn.predict loop {r['loop_images_per_s']:8.1f} images/s")
    print(f"  predict_batch                {r['batch_images_per_s']:8.1f} images/s")
    print(f"  ratio batch / loop           {r['ratio']:8.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
