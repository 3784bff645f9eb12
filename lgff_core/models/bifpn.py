"""BiFPN baseline neck (EfficientDet, Tan et al., 2020), on the same node graph as LGFFN (`pyramid.NODE_GRAPH`).

Each node: fast normalized fusion of its (resampled) inputs -> depthwise 3x3 conv -> pointwise 1x1 conv -> BN ->
SiLU. Up = nearest 2x, down = 3x3/s2 max pool; the edges carry no transform. Shape contract: 4 x (B, C, H/s, W/s),
s = 4..32 -> the same.
"""
from __future__ import annotations

import torch
from torch import nn

from .fusion import FastNormalizedFusion
from .pyramid import PyramidLayer, PyramidNeck
from .resample import MaxPoolDownsample2x, NearestUpsample2x

__all__ = ["SeparableConvBNAct", "BiFPN"]


class SeparableConvBNAct(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(channels, channels, kernel_size=3, padding=1, groups=channels, bias=False)
        self.pw = nn.Conv2d(channels, channels, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.pw(self.dw(x))))


class BiFPN(PyramidNeck):
    def __init__(
        self,
        channels: int,
        num_layers: int = 5,
    ) -> None:
        super().__init__()
        self.channels = channels
        self.layers = nn.ModuleList(
            PyramidLayer(
                channels,
                make_transform=lambda kind, c: nn.Identity(),
                make_up=lambda c: NearestUpsample2x(),
                make_down=lambda c: MaxPoolDownsample2x(),
                make_combine=FastNormalizedFusion,
                make_post=SeparableConvBNAct,
            )
            for _ in range(num_layers)
        )
