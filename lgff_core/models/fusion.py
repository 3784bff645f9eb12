"""Fast normalized fusion (EfficientDet, Tan et al., 2020, sec. 3.3).

    out = sum_i w_i * x_i / (sum_j w_j + eps),   w = relu(param),  param initialised to 1,  eps = 1e-4

All inputs share one shape (B, C, H, W); the output has that shape. `weights()` returns the effective,
non-negative and normalised weights (they sum to just under 1).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["FastNormalizedFusion"]


class FastNormalizedFusion(nn.Module):
    def __init__(
        self,
        num_inputs: int,
        eps: float = 1e-4,
    ) -> None:
        super().__init__()
        if num_inputs < 1:
            raise ValueError(f"num_inputs must be >= 1, got {num_inputs}")
        self.num_inputs = num_inputs
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_inputs))

    def weights(self) -> torch.Tensor:
        w = torch.relu(self.weight)
        return w / (w.sum() + self.eps)

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(inputs) != self.num_inputs:
            raise ValueError(f"expected {self.num_inputs} inputs, got {len(inputs)}")
        w = self.weights()
        out = inputs[0] * w[0].to(inputs[0].dtype)
        for i in range(1, self.num_inputs):
            out = torch.addcmul(out, inputs[i], w[i].to(inputs[i].dtype))  # fused multiply-add
        return out
