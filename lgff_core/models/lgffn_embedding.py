"""LGFFN-E, the embedding neck of LGFF (DESIGN.md section 2).

Node graph: `pyramid.NODE_GRAPH`, with
- same-level and downsampled inputs of top-down nodes / downsampled inputs of bottom-up nodes gated by the
  `GlobalAggregator` (GA), the others by the `LocalAggregator` (LA), exactly as
  ``P3_1 = fuse(GA(P3_0), LA(up(P4_0)))`` ... ``P4_2 = fuse(LA(P4_0), GA(down(P3_2)))``;
- ``fuse`` = `FastNormalizedFusion` (w = relu(param), init 1, eps 1e-4), nothing after it;
- ``up`` = learned 2x upsampling (`model.upsample`: depthwise ConvTranspose 2x2/s2 initialised to nearest, default;
  or bilinear + 1x1 conv), ``down`` = depthwise 3x3 stride-2 conv.
L layers are stacked (paper: 3). Shape contract: 4 x (B, C, H/s, W/s), s = 4..32 -> the same.
"""
from __future__ import annotations

from torch import nn

from .aggregators import GlobalAggregator, LocalAggregator
from .fusion import FastNormalizedFusion
from .pyramid import PyramidLayer, PyramidNeck
from .resample import DepthwiseDownsample2x, LearnedUpsample2x

__all__ = ["LGFFNE"]


def _aggregator(kind: str, channels: int) -> nn.Module:
    return GlobalAggregator(channels) if kind == "global" else LocalAggregator(channels)


class LGFFNE(PyramidNeck):
    def __init__(
        self,
        channels: int,
        num_layers: int = 3,
        upsample: str = "convtranspose",
    ) -> None:
        super().__init__()
        self.channels = channels
        self.layers = nn.ModuleList(
            PyramidLayer(
                channels,
                make_transform=_aggregator,
                make_up=lambda c: LearnedUpsample2x(c, upsample),
                make_down=DepthwiseDownsample2x,
                make_combine=FastNormalizedFusion,
                make_post=lambda c: nn.Identity(),
            )
            for _ in range(num_layers)
        )
