"""Architectures by name (torchvision's or timm's) and the normalisation their pretrained weights expect."""

from __future__ import annotations

from typing import Callable

import timm
import torchvision.models as tvm

from .datablock import IMAGENET_STATS, Stats
from .errors import SkinCancerError


def resolve_arch(arch: str | Callable) -> str | Callable:
    """A torchvision model function for a torchvision name (e.g. 'resnet50'), else the name itself for timm."""
    if callable(arch):
        return arch
    fn = getattr(tvm, arch, None)
    if callable(fn) and not isinstance(fn, type):
        return fn
    if not timm.is_model(arch):
        raise SkinCancerError(f"arch: {arch!r} is neither a torchvision nor a timm model name")
    return arch


def arch_name(arch: str | Callable) -> str:
    """An architecture's name, for messages and the model card."""
    return arch if isinstance(arch, str) else getattr(arch, "__name__", str(arch))


def normalization(arch: str | Callable) -> Stats:
    """The per-channel (mean, std) the architecture's pretrained weights expect: ImageNet's, or timm's config."""
    fn = resolve_arch(arch)
    if callable(fn):
        return IMAGENET_STATS
    cfg = timm.get_pretrained_cfg(fn)
    if cfg is None:
        return IMAGENET_STATS
    return tuple(map(float, cfg.mean)), tuple(map(float, cfg.std))
