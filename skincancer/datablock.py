"""The fastai DataBlock and DataLoaders: presizing, dermoscopy augmentation, the weights' normalisation, and
loaders that read a presized uint8 cache instead of decoding files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from fastai.callback.data import WeightedDL
from fastai.data.core import TfmdDL
from fastai.torch_core import TensorCategory, TensorImage
from fastai.vision.all import (CategoryBlock, ColReader, ColSplitter, DataBlock, ImageBlock, Normalize, Resize,
                               ResizeMethod, aug_transforms)

from .augment import without_host_syncs
from .config import default_presize
from .data import class_weights
from .errors import SkinCancerError
from .labels import classes_for
from .presize import presized_images

Stats = tuple[tuple[float, ...], tuple[float, ...]]  # (mean, std) per channel, on a 0-1 scale
IMAGENET_STATS: Stats = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def augmentations(size: int, stats: Stats = IMAGENET_STATS) -> list:
    """Batch transforms for dermoscopy: any rotation, both flips, zoom, warp, lighting, then the weights' normalisation.

    fastai's `aug_transforms(size, min_scale=0.75)`: flip, rotation, zoom and warp resample the presized image, then
    a random square crop of at least 3/4 of its area is resampled to `size`; validation images are only resized to
    `size`. The affine part computes fastai's images without reading values back from the GPU (skincancer.augment).
    """
    # a lesion has no up or down: flip both axes and rotate freely (reflection padding fills the corners)
    tfms = aug_transforms(size=size, flip_vert=True, max_rotate=180.0, max_lighting=0.2, max_warp=0.1, p_affine=0.9,
                          min_scale=0.75, max_zoom=1.1)
    return [*without_host_syncs(tfms), Normalize.from_stats(*stats)]


def make_datablock(task: str = "binary", size: int = 224, presize: int | None = None,
                   stats: Stats = IMAGENET_STATS) -> DataBlock:
    """DataBlock over a metadata frame with `path`, `label` and `is_valid` columns, using fastai presizing."""
    # squish, not crop: a square crop of a 4:3 photo can cut off the lesion border, which carries signal
    return DataBlock(blocks=(ImageBlock, CategoryBlock(vocab=list(classes_for(task)))),
                     get_x=ColReader("path"), get_y=ColReader("label"), splitter=ColSplitter("is_valid"),
                     item_tfms=Resize(presize or default_presize(size), method=ResizeMethod.Squish),
                     batch_tfms=augmentations(size, stats))


def make_dataloaders(df: pd.DataFrame, task: str = "binary", size: int = 224, bs: int = 64,
                     presize: int | None = None, sampler: bool = False, num_workers: int | None = None,
                     path: str | Path = ".", device=None, cache: bool | str | Path = False,
                     stats: Stats = IMAGENET_STATS):
    """DataLoaders on the train and valid splits of `df`; with `sampler`, training batches are class-balanced.

    With `cache` (True, or a folder), train and valid read a presized uint8 array of all of `df`'s images (see
    skincancer.presize) instead of decoding files, kept on the GPU when there is one; `test_dl` and exported learners
    read files.
    """
    missing = [c for c in ("path", "label", "split") if c not in df.columns]
    if missing:
        raise SkinCancerError(f"metadata frame: missing column(s) {missing}; build it with skincancer.data.prepare")
    items = df[df["split"].isin(["train", "valid"])].reset_index(drop=True)
    items = items.assign(is_valid=items["split"] == "valid")
    presize = presize or default_presize(size)
    dblock = make_datablock(task, size, presize, stats)
    kwargs: dict = dict(bs=bs, path=path, device=device)
    if num_workers is not None or cache:
        kwargs["num_workers"] = 0 if cache else num_workers
    if sampler:
        classes = classes_for(task)
        w = class_weights(items.loc[~items["is_valid"], "label"], classes)
        # one weight per item, valid included: fastai picks the training items' weights by the split indices
        per_item = w[[classes.index(lbl) for lbl in items["label"]]]
        dls = dblock.weighted_dataloaders(items, wgts=per_item, **kwargs)
    else:
        dls = dblock.dataloaders(items, **kwargs)
    if cache:
        # one cache for every image of the frame, test included, in path order: another seed's split or another
        # held-out source reuses it instead of writing one more copy of the data set
        paths = pd.Index(sorted(set(df["path"].astype(str))))
        images = presized_images(paths, presize, None if cache is True else cache)
        rows = paths.get_indexer(items["path"].astype(str))
        targets = np.array([dls.vocab.o2i[lbl] for lbl in items["label"]])
        dls.loaders = [presized_loader(dl, images[rows[idx]], targets[idx])
                       for dl, idx in zip(dls.loaders, dblock.splitter(items))]
    return dls


class PresizedDL(TfmdDL):
    """A fastai loader whose batches are gathered from a presized uint8 array (N, H, W, 3), not decoded.

    Sampling and batch transforms (augmentation, normalisation) are fastai's. Anything built from it with `new`
    for other items (`test_dl`, the export's empty loaders) is a plain TfmdDL, reading files again.
    """

    plain: type = TfmdDL

    def __init__(self, dataset=None, images=None, targets=None, **kwargs):
        self.images, self.targets = images, targets
        super().__init__(dataset, **kwargs)

    def create_batches(self, samps):
        batches = [list(idxs) for idxs in self.chunkify(samps)]
        flat = torch.as_tensor([i for idxs in batches for i in idxs], dtype=torch.long)
        if self.images.is_cuda:  # one asynchronous copy an epoch, not a blocking one every batch
            flat = flat.pin_memory().to(self.images.device, non_blocking=True)
        for i in torch.split(flat, [len(idxs) for idxs in batches]):
            # NHWC storage seen as NCHW: the batch arrives in channels_last layout at no cost
            yield TensorImage(self.images[i].permute(0, 3, 1, 2)), TensorCategory(self.targets[i])

    def new(self, dataset=None, cls=None, **kwargs):
        if cls is None:  # a loader for other items: read files, with fastai's default workers
            cls = self.plain
            kwargs.setdefault("num_workers", None)
        return super().new(dataset, cls, **kwargs)


class PresizedWeightedDL(PresizedDL, WeightedDL):
    """PresizedDL drawing class-balanced batches, as fastai's WeightedDL does (--imbalance sampler)."""

    plain = WeightedDL


def presized_loader(dl, images: np.ndarray, targets: np.ndarray):
    """A PresizedDL in place of the fastai loader `dl`, reading `images` and `targets` (in `dl.dataset` order)."""
    device = dl.device if dl.device is not None else torch.device("cpu")
    weighted = isinstance(dl, WeightedDL)
    extra = {"wgts": dl.wgts} if weighted else {}
    return dl.new(cls=PresizedWeightedDL if weighted else PresizedDL,
                  images=torch.from_numpy(np.ascontiguousarray(images)).to(device),
                  targets=torch.as_tensor(targets, device=device), **extra)
