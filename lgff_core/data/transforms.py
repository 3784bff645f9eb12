"""Image transforms for training and evaluation (torchvision transforms v2).

Both pipelines take a PIL image (or a uint8 CHW tensor) and return a float32 tensor of shape (3, S, S),
S = `image_size`, normalised with the backbone's `data_config` (`mean`, `std`, `interpolation`, `crop_pct`):

- eval:  resize the shorter side to round(S / crop_pct) -> center crop S -> float in [0, 1] -> normalise.
- train: the eval geometry, then (when `AugmentConfig.enabled`) random horizontal / vertical flips, a random
  multiple of 90 degree rotation (histology has no canonical orientation, so the 8 dihedral views are all
  valid), a light Gaussian blur (focus variation) and a light colour jitter (stain variation); then normalise.

Geometric augmentation runs on the uint8 tensor after the crop, so it is exact (no interpolation) and cheap.
Random draws come from torch's global RNG, so a seeded run with restored RNG state is reproducible.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2

__all__ = ["eval_transform", "train_transform", "RandomRot90", "resize_size"]

_INTERPOLATION = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
}


class RandomRot90(v2.Transform):
    """Rotate by k * 90 degrees, k uniform in {0, 1, 2, 3}; exact (torch.rot90 on the last two dims)."""

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"k": int(torch.randint(0, 4, ()).item())}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, torch.Tensor):
            raise TypeError(f"RandomRot90 expects a tensor image, got {type(inpt).__name__}")
        if params["k"] == 0:
            return inpt
        out = torch.rot90(inpt, params["k"], dims=(-2, -1))
        # keep the tv_tensors subclass (Image) so later v2 transforms dispatch the same way
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else out


def resize_size(data_config: Mapping[str, Any], image_size: int, crop_pct: Optional[float] = None) -> int:
    """Shorter-side size before the center crop: round(image_size / crop_pct) (timm's eval convention)."""
    pct = float(crop_pct if crop_pct is not None else data_config.get("crop_pct", 1.0) or 1.0)
    if not 0.0 < pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {pct}")
    return int(round(image_size / pct))


def _geometry(data_config: Mapping[str, Any], image_size: int, crop_pct: Optional[float]) -> list:
    interp = _INTERPOLATION.get(str(data_config.get("interpolation", "bicubic")), InterpolationMode.BICUBIC)
    return [
        v2.ToImage(),
        v2.Resize(resize_size(data_config, image_size, crop_pct), interpolation=interp, antialias=True),
        v2.CenterCrop(image_size),
    ]


def _normalise(data_config: Mapping[str, Any]) -> list:
    return [
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(data_config["mean"]), std=list(data_config["std"])),
        v2.ToPureTensor(),
    ]


def eval_transform(data_config: Mapping[str, Any], image_size: int, crop_pct: Optional[float] = None) -> v2.Compose:
    """Deterministic evaluation / embedding transform: PIL or uint8 tensor -> float (3, S, S), normalised."""
    return v2.Compose(_geometry(data_config, image_size, crop_pct) + _normalise(data_config))


def train_transform(data_config: Mapping[str, Any], image_size: int, augment_cfg: Any = None,
                    crop_pct: Optional[float] = None) -> v2.Compose:
    """Training transform: the eval geometry + the augmentations switched on in `augment_cfg`.

    `augment_cfg` is an `AugmentConfig` (None or `enabled=False` gives exactly `eval_transform`).
    """
    steps = _geometry(data_config, image_size, crop_pct)
    if augment_cfg is not None and augment_cfg.enabled:
        if augment_cfg.hflip > 0:
            steps.append(v2.RandomHorizontalFlip(p=augment_cfg.hflip))
        if augment_cfg.vflip > 0:
            steps.append(v2.RandomVerticalFlip(p=augment_cfg.vflip))
        if augment_cfg.rotate90:
            steps.append(RandomRot90())
        jitter = (augment_cfg.brightness, augment_cfg.contrast, augment_cfg.saturation, augment_cfg.hue)
        if any(j > 0 for j in jitter):
            steps.append(v2.ColorJitter(brightness=augment_cfg.brightness or None,
                                        contrast=augment_cfg.contrast or None,
                                        saturation=augment_cfg.saturation or None,
                                        hue=augment_cfg.hue or None))
        if augment_cfg.blur_prob > 0:
            lo, hi = (list(augment_cfg.blur_sigma) + [augment_cfg.blur_sigma[0]])[:2]
            kernel = 2 * int(round(3 * hi)) + 1  # covers +-3 sigma of the widest blur
            steps.append(v2.RandomApply([v2.GaussianBlur(kernel_size=kernel, sigma=(lo, hi))],
                                        p=augment_cfg.blur_prob))
    return v2.Compose(steps + _normalise(data_config))
