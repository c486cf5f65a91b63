"""The GPU augmentation without host synchronisations computes fastai's images."""

import pickle
import random
from unittest import mock

import torch
from fastai.vision.all import IntToFloatTensor, Pipeline, TensorImage
from fastai.vision.augment import apply_perspective as fastai_apply_perspective

from skincancer import augment
from skincancer.datablock import augmentations


def run(tfms, x, split: int, seed: int):
    """`tfms` applied to the uint8 batch `x` as a fastai loader would, with every random draw seeded."""
    random.seed(seed)
    torch.manual_seed(seed)
    return Pipeline([IntToFloatTensor(), *tfms], split_idx=split)(x)


def test_sync_free_augmentation_computes_fastais_images():
    ours = augmentations(48)
    with mock.patch("skincancer.datablock.without_host_syncs", list):  # fastai's own transforms, same settings
        theirs = augmentations(48)
    affine = [t for t in ours if isinstance(t, augment.SyncFreeAffineCoordTfm)]
    assert len(affine) == 1 and not any(isinstance(t, augment.SyncFreeAffineCoordTfm) for t in theirs)
    assert any(getattr(f, "func", None) is augment.dihedral_mat for f in affine[0].aff_fs)
    assert [type(c) for c in affine[0].coord_fs] == [augment.SyncFreeWarpCoord]

    torch.manual_seed(0)
    x = TensorImage(torch.randint(0, 256, (8, 3, 72, 72), dtype=torch.uint8))
    for split in (0, 1):  # training (flips, rotation, zoom, warp, lighting) and validation (the resize alone)
        for seed in (1, 2):
            expected = run(theirs, x, split, seed)
            assert torch.allclose(run(ours, x, split, seed), expected, atol=1e-5), (split, seed)
    assert not torch.allclose(run(ours, x, 0, 1), run(ours, x, 0, 2), atol=1e-2)  # the draws do change the images
    # an exported learner pickles its transforms; they must come back working
    assert torch.allclose(run(pickle.loads(pickle.dumps(ours)), x, 0, 1), run(theirs, x, 0, 1), atol=1e-5)


def test_a_point_the_warp_would_send_to_infinity_keeps_its_place():
    coords = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]])  # (batch, h, w, xy)
    identity = torch.tensor([[1.0, 0, 0, 0, 1, 0, 0, 0]])
    assert torch.allclose(augment.apply_perspective(coords, identity), coords)
    tilted = torch.tensor([[1.0, 0, 0, 0, 1, 0, -0.5, 0]])  # w = 1 - x / 2: no point at infinity
    assert torch.allclose(augment.apply_perspective(coords, tilted), fastai_apply_perspective(coords, tilted))
    degenerate = torch.tensor([[1.0, 0, 0, 0, 1, 0, -1, 0]])  # w = 1 - x: (1, 0) would go to infinity
    out = augment.apply_perspective(coords, degenerate)
    assert torch.equal(out[0, 0, 0], coords[0, 0, 0])
    assert torch.allclose(out[0, 0, 1], torch.tensor([1.0, 1.0]))  # (0.5, 0.5) / w = 0.5
