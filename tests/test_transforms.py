"""Train / eval transforms (torchvision v2)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lgff_core.config import AugmentConfig
from lgff_core.data.transforms import RandomRot90, eval_transform, resize_size, train_transform

DC = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic", "crop_pct": 0.875}


def _image(h=80, w=100, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_eval_transform_geometry_and_normalisation():
    assert resize_size(DC, 56) == 64
    x = eval_transform(DC, 56)(_image())
    assert type(x) is torch.Tensor and x.dtype == torch.float32 and x.shape == (3, 56, 56)
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0
    # crop_pct 1 + a square image of the target size = pure normalisation: (v / 255 - 0.5) / 0.5
    dc1 = dict(DC, crop_pct=1.0)
    img = _image(32, 32)
    ref = (torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    assert torch.allclose(eval_transform(dc1, 32)(img), ref, atol=1e-6)


def test_augmentation_off_equals_eval_and_on_is_seeded():
    img = _image()
    ev = eval_transform(DC, 48)(img)
    assert torch.equal(train_transform(DC, 48, AugmentConfig(enabled=False))(img), ev)
    assert torch.equal(train_transform(DC, 48, None)(img), ev)
    tf = train_transform(DC, 48, AugmentConfig(blur_prob=1.0))
    torch.manual_seed(3)
    a = torch.stack([tf(img) for _ in range(6)])
    torch.manual_seed(3)
    b = torch.stack([tf(img) for _ in range(6)])
    assert torch.equal(a, b)
    assert not all(torch.equal(a[0], a[i]) for i in range(1, 6))  # views differ


def test_geometric_augmentation_is_exact_dihedral():
    """Flips / rotations only (no colour, no blur): every output is one of the 8 exact dihedral views."""
    img = _image(48, 48)
    dc1 = dict(DC, crop_pct=1.0)
    base = eval_transform(dc1, 48)(img)
    views = [torch.rot90(v, k, dims=(1, 2)) for v in (base, torch.flip(base, dims=(2,))) for k in range(4)]
    cfg = AugmentConfig(blur_prob=0.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
    tf = train_transform(dc1, 48, cfg)
    torch.manual_seed(0)
    seen = set()
    for _ in range(40):
        out = tf(img)
        match = [i for i, v in enumerate(views) if torch.equal(out, v)]
        assert len(match) == 1
        seen.add(match[0])
    assert len(seen) >= 6  # the random draws reach (nearly) all 8 views


def test_rot90_rejects_pil():
    with pytest.raises(TypeError):
        RandomRot90()(_image())
