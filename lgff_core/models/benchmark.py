"""Forward-throughput benchmark of an embedding model in the CPU/GPU execution modes the embed stage can use.

`benchmark_forward(model, modes=...)` times ``model(images)`` on a random batch per mode (``fp32``,
``channels_last``, ``channels_last+bf16``; bf16 = ``torch.autocast(device, dtype=torch.bfloat16)``) and compares
each mode's descriptors to fp32 by cosine similarity (DESIGN.md section 5 asks for >= 0.999). Returns plain rows
for the CLI; timings are the best and the median of ``iters`` runs after one warm-up.
"""
from __future__ import annotations

import logging
import statistics
import time
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MODES", "benchmark_forward"]

log = logging.getLogger(__name__)

MODES = ("fp32", "channels_last", "channels_last+bf16")


@torch.no_grad()
def benchmark_forward(
    model: nn.Module,
    batch_size: int = 32,
    image_size: int = 224,
    iters: int = 3,
    modes: Sequence[str] = MODES,
    device: str = "cpu",
    seed: int = 0,
) -> list[dict]:
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown benchmark mode(s) {unknown}; choose from {', '.join(MODES)}")
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=generator).to(device)
    model = model.eval().to(device)
    reference = None
    rows = []
    for mode in modes:
        memory_format = torch.channels_last if mode.startswith("channels_last") else torch.contiguous_format
        model = model.to(memory_format=memory_format)
        x = images.contiguous(memory_format=memory_format)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=mode.endswith("bf16")):
            out = model(x).float()
            times = []
            for _ in range(iters):
                start = time.perf_counter()
                out = model(x).float()
                times.append(time.perf_counter() - start)
        if reference is None and mode == "fp32":
            reference = out
        cosine = float(F.cosine_similarity(out, reference).min()) if reference is not None else float("nan")
        row = {"mode": mode, "batch_size": batch_size, "image_size": image_size, "iters": iters,
               "best_img_per_s": batch_size / min(times), "median_img_per_s": batch_size / statistics.median(times),
               "min_cosine_vs_fp32": cosine}
        log.info("%s: %.1f img/s (best), %.1f (median), cosine vs fp32 >= %.5f", mode, row["best_img_per_s"],
                 row["median_img_per_s"], cosine)
        rows.append(row)
    model.to(memory_format=torch.contiguous_format)
    return rows
