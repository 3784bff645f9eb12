"""Local and global aggregators of LGFFN-E (LGFF, DESIGN.md section 2).

Both gate their input with a learned attention map and blend with the identity through a learnable scalar ``a``
(an ``nn.Parameter`` of shape (), initialised to 0, so training starts from the fully gated branch):

    LA(x) = a*x + (1-a) * x * sigmoid(L(x)),   L = LayerNorm -> PW(C->C/2) -> GELU -> PW(C/2->C)
    GA(x) = a*x + (1-a) * x * sigmoid(G(x)),   G = DW3x3 -> PW(C->C/2) -> GELU -> GRN -> PW(C/2->C)

LA attends per position (pointwise context only); GA adds spatial context (depthwise 3x3) and the GRN's
channel competition over the whole map. Shape contract: (B, C, H, W) -> (B, C, H, W).
"""
from __future__ import annotations

import torch
from timm.layers import LayerNorm2d
from torch import nn

from .grn import GlobalResponseNorm

__all__ = ["LocalAggregator", "GlobalAggregator"]


class _GatedAggregator(nn.Module):
    """``a*x + (1-a) * x * sigmoid(attn(x))``; subclasses only build ``attn``."""

    attn: nn.Module

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a.to(x.dtype)
        # a*x + (1-a)*x*s == x * (a + (1-a)*s): fewer passes over the map (memory bound on CPU)
        return x * (torch.sigmoid(self.attn(x)) * (1 - a) + a)


class LocalAggregator(_GatedAggregator):
    def __init__(
        self,
        channels: int,
    ) -> None:
        super().__init__()
        hidden = max(channels // 2, 1)
        self.attn = nn.Sequential(
            LayerNorm2d(channels),
            nn.Conv2d(channels, hidden, kernel_size=1),
            nn.GELU(),
            nn.Conv2d(hidden, channels, kernel_size=1),
        )


class GlobalAggregator(_GatedAggregator):
    def __init__(
        self,
        channels: int,
    ) -> None:
        super().__init__()
        hidden = max(channels // 2, 1)
        self.attn = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size=3, padding=1, groups=channels),
            nn.Conv2d(channels, hidden, kernel_size=1),
            nn.GELU(),
            GlobalResponseNorm(hidden),
            nn.Conv2d(hidden, channels, kernel_size=1),
        )
