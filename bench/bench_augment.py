"""Input-pipeline benchmark: training batches from the presized cache, with fastai's batch transforms and with
skincancer.augment's (the same images, without reading values back from the GPU).

    python bench/bench_augment.py --data DIR [--size 224] [--bs 256] [--batches 50]
    python bench/bench_augment.py --smoke      # seconds on a CPU; CI runs it to keep it working

Times what a training epoch spends before the model sees a batch: gathering it from the presized cache (on the GPU
when there is one) and the batch augmentation. On CUDA it also counts the host synchronisations per batch, which
stop the CPU from queueing the next kernels while the GPU works. It asserts nothing about speed: compare the ratio
measured in one run.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
import warnings
from unittest import mock

import torch
from common import SHARED, sync

from skincancer.data import prepare
from skincancer.datablock import make_dataloaders


def time_loader(dl, batches: int) -> tuple[float, float | None]:
    """(seconds per batch, host syncs per batch or None off CUDA) over `batches` batches after one warm-up batch."""
    cuda = torch.cuda.is_available()
    it = iter(dl)
    next(it)
    sync()
    n = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        start = time.perf_counter()
        try:
            for _ in range(batches):
                next(it)
                n += 1
        except StopIteration:
            pass
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode(0)
        sync()
        seconds = time.perf_counter() - start
        syncs = sum("synchroniz" in str(w.message) for w in caught)
    if n == 0:
        raise SystemExit("no batch after the warm-up one: use more images (--limit) or a smaller --bs")
    return seconds / n, (syncs / n if cuda else None)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a table with the ratio."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(SHARED / "ham10000_200x150"))
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--bs", type=int, default=256)
    p.add_argument("--batches", type=int, default=50, help="timed batches per variant (at most one epoch)")
    p.add_argument("--limit", type=int)
    p.add_argument("--cache-dir", help="presize cache, kept (default: a temporary folder, then removed)")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run: 200 images, 32 px, bs 16, 4 batches")
    args = p.parse_args(argv)
    if args.smoke:
        args.limit, args.size, args.bs, args.batches = 200, 32, 16, 4
    df = prepare(args.data, "binary", limit=args.limit)
    with tempfile.TemporaryDirectory(prefix="skincancer-cache-") as tmp:  # removed at the end unless --cache-dir
        return time_all(args, df, args.cache_dir or tmp)


def time_all(args, df, cache_dir: str) -> int:
    """Time the training loader with fastai's transforms and ours; print ms/batch, images/s and the ratio."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {device}; {int((df['split'] == 'train').sum())} training images, {args.size} px, bs {args.bs}, "
          f"torch {torch.__version__}")
    rows = {}
    for transforms in ("fastai", "ours"):
        # fastai's: the transforms as `aug_transforms` returns them; ours: skincancer.augment's sync-free ones
        fastais = mock.patch("skincancer.datablock.without_host_syncs", list)
        with fastais if transforms == "fastai" else contextlib.nullcontext():
            dls = make_dataloaders(df, "binary", args.size, args.bs, cache=cache_dir)
        per_batch, syncs = time_loader(dls.train, args.batches)
        rows[transforms] = per_batch
        print(f"{transforms:<7} {per_batch * 1000:8.1f} ms/batch {args.bs / per_batch:9.0f} images/s"
              + ("" if syncs is None else f"   {syncs:.1f} host syncs/batch"), flush=True)
    print(f"ratio ours / fastai's transforms, images/s: {rows['fastai'] / rows['ours']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
