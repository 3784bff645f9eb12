"""Per-level input stem of the first neck layer (LGFF, DESIGN.md section 2).

    1x1 conv C_i -> C_i/2 (no bias) -> LayerNorm over channels -> GELU -> 1x1 conv C_i/2 -> C

Maps the backbone level's C_i channels onto the neck width C. Shape contract: (B, C_i, H, W) -> (B, C, H, W).

Detection necks use the thesis code's stems instead (`DetectionStem`, Table 5.3 counts them with the neck):

    LGFFN-D: 1x1 conv C_i -> C (no bias) -> InstanceNorm (affine)
    BiFPN:   1x1 conv C_i -> C (bias)    -> BatchNorm
"""
from __future__ import annotations

import torch
from timm.layers import LayerNorm2d
from torch import nn

__all__ = ["Stem", "DetectionStem", "DETECTION_STEMS", "build_stems", "build_detection_stems"]


class Stem(nn.Module):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
    ) -> None:
        super().__init__()
        hidden = max(in_channels // 2, 1)
        self.reduce = nn.Conv2d(in_channels, hidden, kernel_size=1, bias=False)
        self.norm = LayerNorm2d(hidden)
        self.act = nn.GELU()
        self.proj = nn.Conv2d(hidden, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.norm(self.reduce(x))))


def build_stems(in_channels: list[int], out_channels: int) -> nn.ModuleList:
    """One `Stem` per backbone level, sized from the backbone's ``feature_info`` channels."""
    return nn.ModuleList(Stem(c, out_channels) for c in in_channels)


class DetectionStem(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, norm: str = "instance", bias: bool = False) -> None:
        norms = {"instance": lambda c: nn.InstanceNorm2d(c, affine=True), "batch": nn.BatchNorm2d}
        super().__init__(nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=bias), norms[norm](out_channels))


# neck name -> DetectionStem settings (thesis code); other necks keep the LayerNorm `Stem`
DETECTION_STEMS = {"lgffn_d": {"norm": "instance", "bias": False}, "bifpn": {"norm": "batch", "bias": True}}


def build_detection_stems(in_channels: list[int], out_channels: int, neck: str) -> nn.ModuleList:
    """The per-level stems of a detection neck named `neck` (`DETECTION_STEMS`, else `Stem`)."""
    settings = DETECTION_STEMS.get(neck)
    if settings is None:
        return build_stems(in_channels, out_channels)
    return nn.ModuleList(DetectionStem(c, out_channels, **settings) for c in in_channels)
