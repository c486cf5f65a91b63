"""CPU inference benchmark: batched predict_batch against a per-image learn.predict loop, measured in one run.

    python bench/bench_predict.py --model models/skincancer.pkl --images DIR [--n 256] [--bs N]
    python bench/bench_predict.py --size 224   # no model at hand: trains a throwaway one at that size (1 epoch)
    python bench/bench_predict.py --smoke      # seconds: a tiny model at 32 px; CI runs this to keep it working

Prints model load times, single-image latency, and images/s of a per-image `learn.predict` loop, of fastai's
batched `learn.get_preds` at bs 64, and of `predict_batch`, with the ratios; then fastai's test-time augmentation
(`learn.tta`: five passes) through the learner's own network and through the inference copy, as `evaluate --tta` runs
it, on the first `--tta-n` images; and the latency of a Grad-CAM map and of `explain` (the app's call: predict and
Grad-CAM in one pass). Timings depend on
the input size and the machine, not on how well the weights were trained. It asserts nothing about speed: compare
ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import fastai.vision.all  # noqa: F401  (imported before any clock starts: imports are not load time)
import pandas as pd
import torch
from common import SHARED

from skincancer import predict as P
from skincancer.classifier import predict_frame
from skincancer.gradcam import gradcam
from skincancer.images import open_image
from skincancer.train import TrainConfig, train


def timed(fn, *args, **kwargs):
    """(result, seconds) of one call."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def throwaway_model(folder: Path, size: int) -> Path:
    """Train a real model of the default architecture at `size` on ~120 images for one epoch, to time inference."""
    out = folder / f"throwaway{size}.pkl"
    train(TrainConfig(data=str(SHARED / "ham10000_200x150"), pretrained=False, epochs=1, size=size, bs=32, limit=120,
                      num_workers=0, out=str(out)))
    return out


def tta_seconds(clf, images: list[Path], bs: int, model=None) -> float:
    """Seconds of `evaluate --tta`'s predictions of `images`, through `model` (default: the learner's own network)."""
    df = pd.DataFrame({"path": images, "dx": "nv"})  # the labels are not scored, only needed by the pipeline
    return timed(predict_frame, clf.learn, df, tta=True, bs=bs, model=model)[1]


def gradcam_latency(learn, images: list) -> float:
    """Median ms of one Grad-CAM map (`gradcam`) on `images`."""
    target = len(learn.dls.vocab) - 1  # a binary model's malignant
    gradcam(learn, images[0], target=target)  # warm-up
    return 1000 * statistics.median(timed(gradcam, learn, image, target=target)[1] for image in images)


def run(model: Path, images: list[Path], bs: int | None, tta_n: int) -> dict:
    """Measure load, latency and throughput; return the figures."""
    P._CACHE.clear()
    clf, load_safe = timed(P.load, model)
    _, prepare_s = timed(lambda: clf.model)  # made at the first prediction, once per loaded model
    P._CACHE.clear()
    pickled, load_pickle = timed(P.load, model, trusted=True)
    learn = pickled.learn
    decoded = [open_image(p) for p in images]

    clf.predict(images[0])  # warm-up: first-call allocations are not latency
    latencies = [timed(clf.predict, p)[1] for p in images[: min(20, len(images))]]

    with learn.no_bar():
        learn.predict(decoded[0])
        _, loop_s = timed(lambda: [learn.predict(img) for img in decoded])
        _, fastai_s = timed(lambda: learn.get_preds(dl=learn.dls.test_dl(decoded, bs=64, num_workers=0)))
    bs = bs or clf.batch_size
    _, batch_s = timed(clf.predict_batch, images, bs=bs)
    with clf.learn.no_bar():
        tta_fastai_s = tta_seconds(clf, images[:tta_n], bs)
        tta_copy_s = tta_seconds(clf, images[:tta_n], bs, model=clf.model)
    n_tta = len(images[:tta_n])
    gradcam_ms = gradcam_latency(clf.learn, decoded[: min(20, len(decoded))])
    explain_ms = 1000 * statistics.median(timed(clf.explain, p)[1] for p in images[: min(20, len(images))])
    return {"gradcam_ms": gradcam_ms, "explain_ms": explain_ms, "tta_images": n_tta,
            "tta_fastai_images_per_s": n_tta / tta_fastai_s, "tta_copy_images_per_s": n_tta / tta_copy_s,
            "tta_ratio": tta_fastai_s / tta_copy_s,
            "images": len(images), "size": clf.card.size, "bs": bs, "threads": torch.get_num_threads(),
            "load_safetensors_s": load_safe, "load_pickle_s": load_pickle, "prepare_s": prepare_s,
            "latency_median_ms": 1000 * statistics.median(latencies), "loop_images_per_s": len(images) / loop_s,
            "get_preds_images_per_s": len(images) / fastai_s, "batch_images_per_s": len(images) / batch_s,
            "ratio": loop_s / batch_s}


def main(argv=None) -> int:
    """Parse arguments, run the benchmark, print the figures."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, help="exported model (.pkl with .safetensors and .json beside it)")
    p.add_argument("--images", type=Path, default=SHARED / "ham10000_200x150" / "images")
    p.add_argument("--n", type=int, default=256, help="images to predict")
    p.add_argument("--bs", type=int, help="predict_batch's batch size (default: the model's, `Classifier.batch_size`)")
    p.add_argument("--tta-n", type=int, default=64, help="images to predict with test-time augmentation")
    p.add_argument("--size", type=int, default=224, help="without --model: the throwaway model's input size")
    p.add_argument("--smoke", action="store_true", help="a 32 px model, 16 images: checks the script runs")
    args = p.parse_args(argv)
    images = sorted(args.images.glob("*.jpg"))[: 16 if args.smoke else args.n]
    if not images:
        print(f"no .jpg images in {args.images}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or throwaway_model(Path(tmp), 32 if args.smoke else args.size)
        r = run(model, images, args.bs, 8 if args.smoke else args.tta_n)
    print(f"\nCPU inference, {r['images']} images of {args.images} at {r['size']} px, {r['threads']} torch threads")
    print(f"  load (safetensors, default)  {r['load_safetensors_s']:8.2f} s")
    print(f"  load (pickle, trusted)       {r['load_pickle_s']:8.2f} s")
    print(f"  inference copy (first call)  {r['prepare_s']:8.2f} s (BatchNorm folded, channels_last)")
    print(f"  single-image latency         {r['latency_median_ms']:8.1f} ms (median, predict())")
    print(f"  per-image learn.predict loop {r['loop_images_per_s']:8.1f} images/s")
    print(f"  learn.get_preds, bs 64       {r['get_preds_images_per_s']:8.1f} images/s")
    print(f"  predict_batch, bs {r['bs']:<3d}        {r['batch_images_per_s']:8.1f} images/s")
    print(f"  ratio batch / loop           {r['ratio']:8.2f}x")
    print(f"  TTA (learn.tta), {r['tta_images']} images, bs {r['bs']}: five passes each")
    print(f"    through the learner's network {r['tta_fastai_images_per_s']:6.1f} images/s")
    print(f"    through the inference copy    {r['tta_copy_images_per_s']:6.1f} images/s ({r['tta_ratio']:.2f}x)")
    print(f"  Grad-CAM map, one photo      {r['gradcam_ms']:8.1f} ms (median, gradcam())")
    print(f"  explain: predict + Grad-CAM  {r['explain_ms']:8.1f} ms (median, one pass; the app's call on a photo)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
