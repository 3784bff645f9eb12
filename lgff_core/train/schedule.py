"""Per-step learning-rate schedule: optional linear warm-up, then cosine annealing to a floor.

For optimizer step t (0-based) of T total, W warm-up steps, base rate lr and floor lr_min (DESIGN.md section 3:
AdamW, cosine annealing 5e-3 -> 8e-5):

    t <  W:  lr_t = lr * (t + 1) / W
    t >= W:  lr_t = lr_min + (lr - lr_min) * (1 + cos(pi * (t - W) / max(1, T - W))) / 2

Each parameter group keeps its own base rate (the ArcFace class weights may train at `train.loss_lr`); the floor
scales with it (`lr_min_g = lr_min * lr_g / lr`), so every group follows the same curve shape.
The schedule's whole state is the step counter, so it serialises as JSON.
"""
from __future__ import annotations

import math

import torch

__all__ = ["cosine_warmup_lr", "WarmupCosineSchedule"]


def cosine_warmup_lr(step: int, total_steps: int, lr: float, lr_min: float, warmup_steps: int = 0) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total_steps` (formula in the module docstring)."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    return lr_min + (lr - lr_min) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosineSchedule:
    """Sets each param group's lr before every optimizer step; `step()` advances one optimizer step."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        lr_min_ratio: float,
        warmup_steps: int = 0,
    ) -> None:
        self.optimizer = optimizer
        self.total_steps = int(total_steps)
        self.lr_min_ratio = float(lr_min_ratio)
        self.warmup_steps = int(warmup_steps)
        self.base_lrs = [float(g.get("initial_lr", g["lr"])) for g in optimizer.param_groups]
        for group, base in zip(optimizer.param_groups, self.base_lrs):
            group["initial_lr"] = base
        self.last_step = 0
        self._apply()

    def lrs(self) -> list[float]:
        return [
            cosine_warmup_lr(self.last_step, self.total_steps, base, base * self.lr_min_ratio, self.warmup_steps)
            for base in self.base_lrs
        ]

    def _apply(self) -> None:
        for group, lr in zip(self.optimizer.param_groups, self.lrs()):
            group["lr"] = lr

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"last_step": self.last_step, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "lr_min_ratio": self.lr_min_ratio, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict) -> None:
        self.last_step = int(state["last_step"])
        self.total_steps = int(state["total_steps"])
        self.warmup_steps = int(state["warmup_steps"])
        self.lr_min_ratio = float(state["lr_min_ratio"])
        self.base_lrs = [float(x) for x in state["base_lrs"]]
        self._apply()
