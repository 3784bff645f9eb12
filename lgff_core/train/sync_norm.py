"""Batch statistics shared across DDP ranks, on any backend.

`torch.nn.SyncBatchNorm` runs on CUDA only; on CPU (gloo) each rank would normalise its own share of the batch,
so N processes x batch B would not equal one process x batch N*B. `GlobalBatchNorm` reduces sum and sum of squares
over the ranks with the autograd-aware `torch.distributed.nn.functional.all_reduce` (gradients flow through the
shared statistics, as for one big batch) and then normalises like `nn.BatchNorm*d`. Outside training, or with one
process, it is plain batch norm. The reduction runs in its own process group: DDP's gradient buckets are reduced from
autograd hooks in an order that may differ between ranks, and collectives of one group must match across ranks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GlobalBatchNorm", "convert_to_global_batchnorm"]


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over the union of every rank's batch (input (N, C) or (N, C, ...)); parameters and buffers as
    `nn.BatchNorm1d/2d`, so state dicts load either way. `group`: the process group of the statistics."""

    group = None

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input (got {input.dim()}-D)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if not (self.training and distributed and torch.distributed.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce  # autograd-aware

        c = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        xf = x.float()
        count = xf.new_tensor([xf.numel() / c])
        stats = all_reduce(torch.cat([xf.sum(dims), (xf * xf).sum(dims), count]), group=self.group)
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp(min=0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1).clamp(min=1), alpha=m)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


_PLAIN_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def convert_to_global_batchnorm(module: nn.Module, group=None) -> nn.Module:
    """Replace every trainable `nn.BatchNorm1d/2d/3d` in `module` (in place, same parameters and buffers) by `GlobalBatchNorm`
    reducing over `group` (create it with `torch.distributed.new_group()` on every rank); frozen or eval-mode parts
    behave as before (they are not in training mode)."""
    for name, child in module.named_children():
        # plain BatchNorm only (subclasses such as timm's BatchNormAct2d carry more), and only trainable ones:
        # the frozen backbone keeps its own, in eval mode
        trainable = any(p.requires_grad for p in child.parameters(recurse=False))
        if type(child) in _PLAIN_BATCHNORMS and trainable:
            new = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                  child.track_running_stats)
            new.group = group
            new.load_state_dict(child.state_dict())
            new.train(child.training)
            new.to(next(iter(child.buffers()), torch.empty(0)).device)
            for p_new, p_old in zip(new.parameters(), child.parameters()):
                p_new.requires_grad_(p_old.requires_grad)
            setattr(module, name, new)
        else:
            convert_to_global_batchnorm(child, group)
    return module
