"""2x resampling between adjacent pyramid levels (strides 4/8/16/32).

LGFFN-E (DESIGN.md section 2) uses *learned* resampling:
- ``LearnedUpsample2x("convtranspose")``: depthwise ConvTranspose2d, kernel 2, stride 2 (the default). Its weights
  are initialised to 1 and bias to 0, so at initialisation it equals nearest-neighbour upsampling and training
  only has to learn a per-channel 2x2 refinement.
- ``LearnedUpsample2x("bilinear")``: bilinear interpolation (align_corners=False) followed by a 1x1 conv.
- ``DepthwiseDownsample2x``: depthwise 3x3 conv, stride 2, padding 1.
LGFFN-D and BiFPN use the fixed ``nearest`` upsampling and 3x3 / stride-2 max pooling (EfficientDet).

Shape contract for even H, W: up (B, C, H, W) -> (B, C, 2H, 2W); down (B, C, H, W) -> (B, C, H/2, W/2). Inputs
whose sides are divisible by 32 give matching sizes on every level.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LearnedUpsample2x", "DepthwiseDownsample2x", "NearestUpsample2x", "MaxPoolDownsample2x", "UPSAMPLE_MODES"]

UPSAMPLE_MODES = ("convtranspose", "bilinear")


class _ConvTransposeUp(nn.Module):
    """Depthwise ConvTranspose2d(k=2, s=2). The kernels do not overlap, so output pixel (2h+i, 2w+j) of channel c
    is ``x[c, h, w] * weight[c, 0, i, j] + bias[c]``; computed as a broadcast product + pixel shuffle, which is the same
    function as ``self.conv(x)`` but avoids PyTorch's slow grouped transposed convolution on CPU (tens of ms per
    call at stride 4, worse in bf16). Parameters live in ``self.conv`` (state dict unchanged)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2, groups=channels)
        nn.init.ones_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        weight = self.conv.weight.to(x.dtype).view(1, c, 4, 1, 1)
        y = F.pixel_shuffle((x.unsqueeze(2) * weight).reshape(b, c * 4, h, w), 2)
        return y + self.conv.bias.to(x.dtype).view(1, c, 1, 1)


class _BilinearUp(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False))


def LearnedUpsample2x(channels: int, mode: str = "convtranspose") -> nn.Module:  # noqa: N802 - reads as a layer
    """Learned 2x upsampling; ``mode`` is chosen once here, never in ``forward``."""
    if mode == "convtranspose":
        return _ConvTransposeUp(channels)
    if mode == "bilinear":
        return _BilinearUp(channels)
    raise ValueError(f"upsample mode {mode!r} is not one of {', '.join(UPSAMPLE_MODES)}")


class DepthwiseDownsample2x(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1, groups=channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class NearestUpsample2x(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="nearest")


class MaxPoolDownsample2x(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
