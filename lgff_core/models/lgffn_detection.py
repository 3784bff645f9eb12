"""LGFFN-D, the detection neck of LGFFDM, and its FMBConvCA block (DESIGN.md section 2).

FMBConvCA (fused-MBConv-like block with channel attention):

    FMBConvCA(x) = x + BN(PW(CA(GELU(BN(DW3x3(x))))))
    local  CA(y) = y * sigmoid(PW(GELU(PW(y))))          (per-position gate)
    global CA(y) = y * sigmoid(PW(GELU(PW(GAP(y)))))     (SE-like, pooled over H, W)

The attention MLPs reduce C -> C/2 (no bias) -> C (bias), the same ratio as LGFFN-E's aggregators. The two
BatchNorms (as in a fused-MBConv block) and the bias layout are the ones that reproduce the thesis code's parameter
count exactly: with the detection stem (`stem.DetectionStem`, 1x1 conv + InstanceNorm) a ConvNeXt-S LGFFN-D
(C=256, 5 layers) has 9,832,448 parameters, the figure behind Table 5.3's 9.8M. Nodes are direct sums
(``P3_1 = Fg(P3_0) + FL(up(P4_0))`` ...; graph in `pyramid.NODE_GRAPH`), up = nearest, down = 3x3/s2 max pool,
each standardised per sample by a parameter-free GroupNorm(1) (`node_norm`: without it 5 layers of sums of residual
edges blow the features up ~9x per layer and Mask R-CNN diverges).
Paper: 5 layers, C = 256. Shape contract: 4 x (B, C, H/s, W/s), s = 4..32 -> the same.
"""
from __future__ import annotations

import torch
from torch import nn

from .pyramid import PyramidLayer, PyramidNeck, SumFusion
from .resample import MaxPoolDownsample2x, NearestUpsample2x

__all__ = ["LocalChannelAttention", "GlobalChannelAttention", "FMBConvCA", "LGFFND"]


class LocalChannelAttention(nn.Module):
    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Sequential(nn.Conv2d(channels, hidden, 1, bias=False), nn.GELU(), nn.Conv2d(hidden, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.gate(x))


class GlobalChannelAttention(nn.Module):
    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Sequential(nn.Conv2d(channels, hidden, 1, bias=False), nn.GELU(), nn.Conv2d(hidden, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.gate(x.mean(dim=(2, 3), keepdim=True)))


class FMBConvCA(nn.Module):
    def __init__(
        self,
        channels: int,
        attention: str = "local",
        reduction: int = 2,
    ) -> None:
        super().__init__()
        hidden = max(channels // reduction, 1)
        attn_cls = {"local": LocalChannelAttention, "global": GlobalChannelAttention}[attention]
        self.dw = nn.Conv2d(channels, channels, kernel_size=3, padding=1, groups=channels)
        self.dw_norm = nn.BatchNorm2d(channels)
        self.act = nn.GELU()
        self.ca = attn_cls(channels, hidden)
        self.pw = nn.Conv2d(channels, channels, kernel_size=1)
        self.pw_norm = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pw_norm(self.pw(self.ca(self.act(self.dw_norm(self.dw(x))))))


def node_norm(channels: int) -> nn.Module:
    """Parameter-free per-sample normalisation (mean 0, std 1 over C, H, W) of a node's sum.

    Without it the features grow geometrically: every edge is ``x + branch`` and a node sums 2-3 edges whose
    inputs share ancestors, so each layer multiplies the std by ~9 (5 layers at C=256: std 3 -> 5e4 at
    initialisation, Mask R-CNN losses ~1e5 and divergence). affine=False keeps the thesis parameter count.
    """
    return nn.GroupNorm(1, channels, affine=False)


class LGFFND(PyramidNeck):
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
                make_transform=lambda kind, c: FMBConvCA(c, attention=kind),
                make_up=lambda c: NearestUpsample2x(),
                make_down=lambda c: MaxPoolDownsample2x(),
                make_combine=SumFusion,
                make_post=node_norm,
            )
            for _ in range(num_layers)
        )
