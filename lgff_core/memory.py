"""Peak-memory estimate of `lgff train` / `lgff embed` before they start, and the check that refuses a run that
would not fit (issue: a partial config trained the paper model at batch 64 and the kernel killed it at 17.5 GB).

The dominant term is the neck's activations: LGFFN-E keeps C channels at the four pyramid levels (strides 4..32)
for each of its layers, so per image it holds about ``4 bytes * P * C * num_layers * k`` with
``P = sum over levels of (S / stride)^2`` pixels. ``k`` was measured on CPU (peak RSS of one step of
`build_model` at 224 px, batch 4 vs 16, C = 128 x 2 layers and C = 512 x 3 layers): about 22 live tensors per
level and layer when training (activations kept for backward + gradients), about 4 at inference. The frozen
backbone adds its early high-resolution maps, and the process itself (torch, the model) about 1 GB.
The estimate is deliberately simple and conservative; `--no-memory-check` skips it.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from .errors import LGFFError

__all__ = ["MemoryEstimate", "estimate_peak_bytes", "available_bytes", "check_memory"]

log = logging.getLogger(__name__)

STRIDES = (4, 8, 16, 32)
TRAIN_TENSORS_PER_LEVEL_LAYER = 22.0
EMBED_TENSORS_PER_LEVEL_LAYER = 4.0
BACKBONE_BYTES_PER_INPUT_PIXEL = 32.0  # stride-2 stem maps (~32 ch fp32 at S/2 x S/2, a few alive at once)
PROCESS_BYTES = 1 << 30


@dataclass
class MemoryEstimate:
    per_image: float
    fixed: float
    batch_size: int

    @property
    def peak(self) -> float:
        return self.fixed + self.per_image * self.batch_size

    def batch_that_fits(self, available: float) -> int:
        return max(0, int((available - self.fixed) // self.per_image))


def estimate_peak_bytes(stage: str, model_cfg, image_size: int, batch_size: int, neck: bool = True
                        ) -> MemoryEstimate:
    """Peak resident bytes of `stage` ("train" or "embed") for an embedding model (`model_cfg`: the config's
    ``model`` section) at `image_size` px and `batch_size`; ``neck=False`` for the no-neck GeM baseline."""
    if stage not in ("train", "embed"):
        raise ValueError(f"stage must be train or embed, got {stage!r}")
    levels = sum((image_size / s) ** 2 for s in STRIDES)
    k = TRAIN_TENSORS_PER_LEVEL_LAYER if stage == "train" else EMBED_TENSORS_PER_LEVEL_LAYER
    neck_bytes = 4.0 * levels * model_cfg.channels * model_cfg.num_layers * k if neck else 0.0
    per_image = neck_bytes + BACKBONE_BYTES_PER_INPUT_PIXEL * image_size ** 2
    return MemoryEstimate(per_image=per_image, fixed=float(PROCESS_BYTES), batch_size=int(batch_size))


def _cgroup_room() -> float | None:
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit == "max":
            return None
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        return max(0.0, float(int(limit) - used))
    except (OSError, ValueError):
        return None


def available_bytes() -> float:
    """Memory this process can still use: MemAvailable, bounded by the container's cgroup limit."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = float(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    room = _cgroup_room()
    candidates = [v for v in (avail, room) if v is not None]
    return min(candidates) if candidates else float("inf")


def check_memory(stage: str, model_cfg, image_size: int, batch_size: int, neck: bool = True,
                 available: float | None = None) -> MemoryEstimate:
    """Refuse (`LGFFError`, with a batch size that fits) when the estimated peak exceeds the available memory."""
    est = estimate_peak_bytes(stage, model_cfg, image_size, batch_size, neck)
    available = available_bytes() if available is None else available
    gib = 1 << 30
    log.info("%s: estimated peak memory %.1f GiB (batch %d, %.0f MiB per image), available %.1f GiB", stage,
             est.peak / gib, est.batch_size, est.per_image / (1 << 20), available / gib)
    if est.peak > available:
        fits = est.batch_that_fits(available)
        key = "train.batch_size" if stage == "train" else "embed.batch_size"
        advice = (f"try --set {key}={fits}" if fits >= 1 else
                  f"even batch 1 does not fit: lower {stage}.image_size or model.channels")
        model = f"C={model_cfg.channels} x {model_cfg.num_layers} layers" if neck else "baseline (no neck)"
        raise LGFFError(f"{stage} would need about {est.peak / gib:.1f} GiB ({model}, {image_size} px, batch "
                        f"{est.batch_size}) but {available / gib:.1f} GiB is available; {advice} "
                        f"(or pass --no-memory-check)")
    return est
