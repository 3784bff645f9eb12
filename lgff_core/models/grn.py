"""Global Response Normalization (GRN), ConvNeXt V2 (Woo et al., 2023, eq. 1-3), over the spatial dims.

For a channels-first map ``x`` of shape (B, C, H, W):

    g_c = ||x_c||_2 over (H, W)                  (global aggregation, one value per channel)
    n_c = g_c / (mean_c' g_c' + eps)             (divisive normalisation across channels)
    out = gamma * (x * n) + beta + x             (gamma, beta per channel, initialised to 0 -> identity)

The norm is taken over the spatial dims (2, 3). A known public port normalises over a size-1 axis, which makes
``n`` identically 1 and GRN a no-op; `normalizer` is exposed so a test can show ``n`` varies across channels.
Shape contract: (B, C, H, W) -> (B, C, H, W); works for any memory format.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["GlobalResponseNorm"]


class GlobalResponseNorm(nn.Module):
    def __init__(
        self,
        num_channels: int,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.zeros(1, num_channels, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, num_channels, 1, 1))

    def normalizer(self, x: torch.Tensor) -> torch.Tensor:
        """``n`` of shape (B, C, 1, 1): per-channel spatial L2 norm divided by its mean over channels."""
        g = torch.linalg.vector_norm(x.float(), ord=2, dim=(2, 3), keepdim=True)
        return (g / (g.mean(dim=1, keepdim=True) + self.eps)).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gamma * (x * self.normalizer(x)) + self.beta + x
