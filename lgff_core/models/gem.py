"""Generalized-mean (GeM) pooling (Radenovic, Tolias & Chum, TPAMI 2019).

    GeM(x)_c = ( mean over (H, W) of clamp(x_c, min=eps)^p )^(1/p)

p = 1 is average pooling (of the clamped map), p -> inf approaches max pooling. ``learn_p`` chooses whether ``p`` is
an ``nn.Parameter`` or a fixed buffer. Computed in float32 (p ~ 4.6 under- / overflows in half precision) and
returned in the input dtype. Shape contract: (B, C, H, W) -> (B, C).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GeM"]


class GeM(nn.Module):
    def __init__(
        self,
        p: float = 3.0,
        eps: float = 1e-6,
        learn_p: bool = True,
    ) -> None:
        super().__init__()
        self.eps = eps
        self.learn_p = learn_p
        p_tensor = torch.tensor(float(p))
        if learn_p:
            self.p = nn.Parameter(p_tensor)
        else:
            self.register_buffer("p", p_tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p.float()
        pooled = F.adaptive_avg_pool2d(x.float().clamp(min=self.eps).pow(p), 1).pow(1.0 / p)
        return pooled.flatten(1).to(x.dtype)

    def extra_repr(self) -> str:
        return f"p={float(self.p):.4g}, eps={self.eps}, learn_p={self.learn_p}"
