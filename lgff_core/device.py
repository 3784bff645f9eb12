"""The one device / precision policy: which device a stage runs on, whether it autocasts to bf16, and whether its
images go channels-last. Train, embed, search / serve, explain, detection training and evaluation, and the
benchmarks ask here instead of deciding for themselves, so a model is never trained on features computed at one
precision and embedded at another.

Rules (``auto`` settings; an explicit true / false in the config always wins):

========================  ======================  =====================================================
stage                     CPU                     CUDA
========================  ======================  =====================================================
``frozen_backbone``       bf16 + channels-last    channels-last only: bf16 autocast missed the fp32 cosine
(embed, serve, search,    when the CPU has        check on an H200 (torch 2.11, demo model and
train's feature cache)    AMX / AVX-512 BF16      lgffem_cpu), so ``auto`` keeps it off there
``train_step``            fp32                    bf16 autocast (trainable neck / head / loss)
(neck + head + loss)
``detection``             fp32                    bf16 autocast
``explain``               fp32                    fp32: a CAM's target must be reproduced exactly
========================  ======================  =====================================================
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .errors import LGFFError

__all__ = ["resolve_device", "cpu_supports_bf16", "Precision", "precision_for", "frozen_backbone_precision", "STAGES"]

STAGES = ("frozen_backbone", "train_step", "detection", "explain")


def resolve_device(name: str) -> torch.device:
    """``auto`` = the first CUDA device when there is one, else the CPU; anything else is a torch device name."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@functools.lru_cache(maxsize=1)
def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 matrix / dot-product instructions (AMX-BF16 or AVX-512 BF16): where bf16
    autocast is a speed-up rather than an emulation."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return bool(set(line.split()) & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    capability = str(torch.backends.cpu.get_cpu_capability()).upper()  # no /proc (macOS, some sandboxes)
    return "AMX" in capability or "BF16" in capability


@dataclass(frozen=True)
class Precision:
    """How one stage computes on one device."""
    device: torch.device
    bf16: bool
    channels_last: bool

    @property
    def name(self) -> str:
        """``bf16`` or ``fp32``: recorded in feature-cache keys, embeddings manifests and lineage."""
        return "bf16" if self.bf16 else "fp32"

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """A batch of images on the device, in the stage's memory format."""
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def as_dict(self) -> dict:
        return {"device": str(self.device), "bf16": self.bf16, "channels_last": self.channels_last}


def _auto(stage: str, device: torch.device) -> tuple[bool, bool]:
    """(bf16, channels_last) of an ``auto`` setting."""
    if stage == "frozen_backbone":
        if device.type == "cuda":
            return False, True
        fast = device.type == "cpu" and cpu_supports_bf16()
        return fast, fast
    if stage in ("train_step", "detection"):
        return device.type == "cuda", False
    return False, False  # explain


def _setting(value: Any, auto: bool, key: str) -> bool:
    if value == "auto":
        return auto
    if isinstance(value, bool):
        return value
    raise LGFFError(f"{key}={value!r}: expected true, false or auto")


def precision_for(stage: str, device: torch.device, bf16: Any = "auto", channels_last: Any = "auto") -> Precision:
    """The precision of `stage` on `device`; `bf16` / `channels_last` are the config's settings (true / false /
    "auto"). ``explain`` is always fp32, whatever the settings say."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")
    if stage == "explain":
        return Precision(device, False, False)
    auto_bf16, auto_cl = _auto(stage, device)
    return Precision(device, _setting(bf16, auto_bf16, "embed.bf16"),
                     _setting(channels_last, auto_cl, "embed.channels_last"))


def frozen_backbone_precision(cfg, device: torch.device, bf16: Optional[Any] = None) -> Precision:
    """The frozen backbone's precision from the config's ``embed`` section: `lgff embed`, `lgff serve` /
    `search` and the training feature cache all call this, so they agree."""
    return precision_for("frozen_backbone", device, cfg.embed.bf16 if bf16 is None else bf16,
                         cfg.embed.channels_last)
