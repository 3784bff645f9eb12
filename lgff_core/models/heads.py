"""GeM embedding head of LGFFEM (DESIGN.md section 2).

One mini-head per terminal node P1_2..P4_2 of the last neck layer:

    GeM(p learnable, init 4.6, eps 1e-6) -> BatchNorm1d -> Dropout -> Linear(C, C) -> L2-normalise -> Linear(C, C)

and the four outputs are concatenated into a descriptor of size 4C (the model L2-normalises it).
Shape contract: 4 x (B, C, H_i, W_i) -> (B, 4C).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .gem import GeM

__all__ = ["GeMMiniHead", "GeMHead"]


class GeMMiniHead(nn.Module):
    def __init__(
        self,
        channels: int,
        p: float = 4.6,
        eps: float = 1e-6,
        learn_p: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.pool = GeM(p=p, eps=eps, learn_p=learn_p)
        self.bn = nn.BatchNorm1d(channels)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc1 = nn.Linear(channels, channels)
        self.fc2 = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc1(self.drop(self.bn(self.pool(x))))
        return self.fc2(F.normalize(y, dim=1))


class GeMHead(nn.Module):
    def __init__(
        self,
        channels: int,
        num_levels: int = 4,
        p: float = 4.6,
        eps: float = 1e-6,
        learn_p: bool = True,
        dropout: float = 0.0,
        level_norm: bool = False,
    ) -> None:
        super().__init__()
        self.heads = nn.ModuleList(
            GeMMiniHead(channels, p=p, eps=eps, learn_p=learn_p, dropout=dropout) for _ in range(num_levels)
        )
        self.out_dim = channels * num_levels
        # L2-normalise each level's output before concatenating: every level then weighs the same in the cosine of
        # the (re-normalised) descriptor, instead of the level whose fc2 output happens to be largest dominating it
        self.level_norm = level_norm

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(features) != len(self.heads):
            raise ValueError(f"GeMHead expects {len(self.heads)} levels, got {len(features)}")
        outs = [head(x) for head, x in zip(self.heads, features)]
        if self.level_norm:
            outs = [F.normalize(o, dim=1) for o in outs]
        return torch.cat(outs, dim=1)
