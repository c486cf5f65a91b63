"""fastai's batch augmentation, computing the same images without reading values back from the GPU.

fastai's affine pipeline copies constant tables from Python lists, solves its warp with error checks, and asks the GPU
whether to shrink a source: each of these stalls the CPU until the GPU catches up. The versions here compute the same
images (tests compare them with fastai's under one seed) without those reads; `without_host_syncs` swaps them into
the transforms that `aug_transforms` returns. docs/speed.md has the counts and timings.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from fastai.torch_core import TensorImage
from fastai.vision import augment as fa
from torch import ones_like as t1
from torch import zeros_like as t0

# Rows: x sign, y sign, and the two masks that swap axes, for each of the 8 dihedral draws (fastai's order).
_DIHEDRAL = ((1, -1, 1, -1, -1, 1, 1, -1), (1, 1, -1, 1, -1, -1, 1, -1),
             (1, 1, 1, 0, 1, 0, 0, 0), (0, 0, 0, 1, 0, 1, 1, 1))
_CORNERS = ((-1, -1), (-1, 1), (1, -1), (1, 1))


@functools.lru_cache(maxsize=None)
def _constant(values: tuple, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`values` as a tensor on `device`, copied there once rather than at every batch."""
    return torch.tensor(values, dtype=dtype, device=device)


def dihedral_mat(x: torch.Tensor, p: float = 0.5, draw=None, batch: bool = False) -> torch.Tensor:
    """fastai's `dihedral_mat` (a random flip/rotation by 90 degrees per image) with its tables kept on the device."""
    def _def_draw(x):
        return torch.randint(0, 8, (x.size(0),), device=x.device)

    def _def_draw_b(x):
        return random.randint(0, 7) + x.new_zeros((x.size(0),)).long()

    idx = fa._draw_mask(x, _def_draw_b if batch else _def_draw, draw=draw, p=p, batch=batch).long()
    xs, ys, m0, m1 = _constant(_DIHEDRAL, x.device, torch.long)[:, idx]
    return fa.affine_mat(xs * m0, xs * m1, t0(xs), ys * m1, ys * m0, t0(xs)).float()


def find_coeffs(p1: torch.Tensor, p2: torch.Tensor) -> torch.Tensor:
    """fastai's perspective coefficients from points `p1` to `p2`, solved without checking for errors on the host."""
    p = p1[:, 0, 0]
    rows = []
    for i in range(p1.shape[1]):
        rows.append(torch.stack([p2[:, i, 0], p2[:, i, 1], t1(p), t0(p), t0(p), t0(p),
                                 -p1[:, i, 0] * p2[:, i, 0], -p1[:, i, 0] * p2[:, i, 1]]))
        rows.append(torch.stack([t0(p), t0(p), t0(p), p2[:, i, 0], p2[:, i, 1], t1(p),
                                 -p1[:, i, 1] * p2[:, i, 0], -p1[:, i, 1] * p2[:, i, 1]]))
    a = torch.stack(rows).permute(2, 0, 1)
    # solve_ex leaves its error code on the device; the warp's small random corners never make a singular system
    return torch.linalg.solve_ex(a, p1.view(p1.shape[0], 8, 1), check_errors=False)[0]


def apply_perspective(coords: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """fastai's `apply_perspective`; a point the perspective would send to infinity keeps its place."""
    sz = coords.shape
    coords = coords.view(sz[0], -1, 2)
    coeffs = torch.cat([coeffs, t1(coeffs[:, :1])], dim=1).view(coeffs.shape[0], 3, 3)
    projected = coords @ coeffs[..., :2].transpose(1, 2) + coeffs[..., 2].unsqueeze(1)
    w = projected[..., 2:]
    # fastai asks the GPU whether any w is 0 and then leaves the whole batch unwarped; this decides point by point
    return torch.where(w == 0, coords, projected[..., :2] / w).view(*sz)


class SyncFreeWarpCoord(fa._WarpCoord):
    """fastai's random perspective warp of the sampling grid, with its corner points kept on the device."""

    def before_call(self, x):
        x_t = fa._draw_mask(x, self._def_draw, self.draw_x, p=self.p, batch=self.batch)
        y_t = fa._draw_mask(x, self._def_draw, self.draw_y, p=self.p, batch=self.batch)
        self.orig_pts = _constant(_CORNERS, x.device, x.dtype).unsqueeze(0).expand(x.size(0), 4, 2)
        targ_pts = torch.stack([torch.stack([-1 - y_t, -1 - x_t]), torch.stack([-1 + y_t, 1 + x_t]),
                                torch.stack([1 + y_t, -1 + x_t]), torch.stack([1 - y_t, 1 - x_t])])
        self.targ_pts = targ_pts.permute(2, 0, 1)

    def __call__(self, x, invert=False):
        src, dst = (self.targ_pts, self.orig_pts) if invert else (self.orig_pts, self.targ_pts)
        return apply_perspective(x, find_coeffs(src, dst))


def grid_sample(x: torch.Tensor, coords: torch.Tensor, mode: str = "bilinear", padding_mode: str = "reflection",
                align_corners: bool | None = None) -> torch.Tensor:
    """fastai's `_grid_sample`, reading the zoom back from the GPU only when the source is over twice the output."""
    if mode == "bilinear":
        d = min(x.shape[-2] / coords.shape[-2], x.shape[-1] / coords.shape[-1]) / 2
        if d > 1:  # fastai first shrinks such a source by area unless the transform zooms in by more than d
            z = 1 / (coords.max() - coords.min()).item() * 2
            if d > z:
                x = F.interpolate(x, scale_factor=1 / d, mode="area", recompute_scale_factor=True)
    return F.grid_sample(x, coords, mode=mode, padding_mode=padding_mode, align_corners=align_corners)


class SyncFreeAffineCoordTfm(fa.AffineCoordTfm):
    """fastai's combined affine and coordinate transform; images are resampled by this module's `grid_sample`."""

    def _encode(self, x, mode, reverse=False):
        if not isinstance(x, TensorImage):
            return super()._encode(x, mode, reverse)
        coord_tfm = (None if len(self.coord_fs) == 0 or self.split_idx
                     else functools.partial(fa.compose_tfms, tfms=self.coord_fs, reverse=reverse))
        if self.mat is None and coord_tfm is None and self.size is None:
            return x
        size = tuple(x.shape[-2:]) if self.size is None else (
            (self.size, self.size) if isinstance(self.size, int) else tuple(self.size))
        mat = fa._init_mat(x)[:, :2] if self.mat is None else self.mat
        coords = F.affine_grid(mat, x.shape[:2] + size, align_corners=self.align_corners)
        if coord_tfm is not None:
            coords = coord_tfm(coords)
        return TensorImage(grid_sample(x, coords, mode=mode, padding_mode=self.pad_mode,
                                       align_corners=self.align_corners))


def _swap_affine(f):
    """This module's dihedral in place of fastai's; any other affine function unchanged."""
    if isinstance(f, functools.partial) and f.func is fa.dihedral_mat:
        return functools.partial(dihedral_mat, *f.args, **f.keywords)
    return f


def _swap_coord(c):
    """This module's warp in place of fastai's; any other coordinate transform unchanged."""
    if type(c) is fa._WarpCoord:
        return SyncFreeWarpCoord(magnitude=c.magnitude, p=c.p, draw_x=c.draw_x, draw_y=c.draw_y, batch=c.batch)
    return c


def without_host_syncs(tfms: Sequence) -> list:
    """`tfms` (as from fastai's `aug_transforms`) with their affine and coordinate transforms made sync-free."""
    out = []
    for t in tfms:
        if isinstance(t, fa.AffineCoordTfm):
            t = SyncFreeAffineCoordTfm(aff_fs=[_swap_affine(f) for f in t.aff_fs],
                                       coord_fs=[_swap_coord(c) for c in t.coord_fs], size=t.size, mode=t.mode,
                                       pad_mode=t.pad_mode, mode_mask=t.mode_mask, align_corners=t.align_corners,
                                       p=t.p)
        out.append(t)
    return out


def _fastai_affine(f):
    """fastai's dihedral in place of this module's; any other affine function unchanged."""
    if isinstance(f, functools.partial) and f.func is dihedral_mat:
        return functools.partial(fa.dihedral_mat, *f.args, **f.keywords)
    return f


def _fastai_coord(c):
    """fastai's warp in place of this module's; any other coordinate transform unchanged."""
    if isinstance(c, SyncFreeWarpCoord):
        return fa._WarpCoord(magnitude=c.magnitude, p=c.p, draw_x=c.draw_x, draw_y=c.draw_y, batch=c.batch)
    return c


def with_fastai_classes(tfms: Sequence) -> list:
    """`without_host_syncs` undone: fastai's own transforms, as a fastai user's export holds them (for pickling)."""
    out = []
    for t in tfms:
        if isinstance(t, SyncFreeAffineCoordTfm):
            t = fa.AffineCoordTfm(aff_fs=[_fastai_affine(f) for f in t.aff_fs],
                                  coord_fs=[_fastai_coord(c) for c in t.coord_fs], size=t.size, mode=t.mode,
                                  pad_mode=t.pad_mode, mode_mask=t.mode_mask, align_corners=t.align_corners, p=t.p)
        out.append(t)
    return out
