"""The training loop machinery that the embedding and the detection trainers share: distributed setup, RNG state,
checkpoint publish / restore, `metrics.jsonl`, resume points, progress bars and the per-epoch bookkeeping.

Outputs under a training directory `out`: `last/` (every epoch), `best/` (the trainer's notion of best),
`_staging/` (the checkpoint being published; a complete one there is a valid resume point) and `metrics.jsonl` (one
JSON line per epoch). A checkpoint is written to `_staging/` first, then copied to `last/` (and `best/`), sidecar
last. Resume = the complete checkpoint with the highest epoch among `last/` and `_staging/`; its RNG state,
optimizer and schedule are restored, and the data order is a function of (seed, epoch), so a resumed run matches an
uninterrupted one bit for bit on CPU.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from .. import storage
from ..config import ConfigError, TrainConfig
from ..errors import CheckpointError
from . import checkpoint as ckpt

log = logging.getLogger(__name__)

__all__ = ["STAGING", "LAST", "BEST", "METRICS", "StopTraining", "Dist", "init_distributed", "check_lr",
           "write_metrics", "read_metrics", "find_resume_point", "rng_tensors", "restore_rng", "publish",
           "restore_training_state", "progress_bar", "EpochClock", "run_epochs", "fresh_history", "epoch_summary"]

STAGING = "_staging"
LAST = "last"
BEST = ckpt.BEST_DIR
METRICS = "metrics.jsonl"


class StopTraining(Exception):
    """Raised by an `on_epoch_end` hook to end the run after the current epoch's checkpoint (tests, time limits)."""


@dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without one)."""
    rank: int = 0
    world: int = 1
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def sum_over_ranks(self, device: torch.device, *values: float) -> list[float]:
        """Each of `values` summed over the ranks (as is with one process): epoch totals of loss and items."""
        if self.world <= 1:
            return [float(v) for v in values]
        totals = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(totals)
        return totals.tolist()

    def close(self) -> None:
        if self.owns_group:
            torch.distributed.destroy_process_group()


def init_distributed(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the torchrun job named by WORLD_SIZE / RANK (gloo on CPU, nccl on CUDA); on CUDA each rank takes its
    LOCAL_RANK's GPU. Returns the job and the device this rank computes on."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), device
    owns = False
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns = True
    dist = Dist(rank=torch.distributed.get_rank(), world=torch.distributed.get_world_size(), owns_group=owns)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", dist.rank)))
        torch.cuda.set_device(device)
    return dist, device


def check_lr(tc: TrainConfig) -> None:
    if not tc.lr > 0 or tc.lr_min < 0 or tc.lr_min > tc.lr:
        raise ConfigError(f"train.lr must be > 0 and 0 <= train.lr_min <= train.lr (got lr={tc.lr}, "
                          f"lr_min={tc.lr_min})")


# ------------------------------------------------------------------------------------------ metrics.jsonl


def write_metrics(out_uri: str, rows: list[dict]) -> None:
    storage.write_text(storage.join(out_uri, METRICS), "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def read_metrics(out_uri: str) -> list[dict]:
    uri = storage.join(out_uri, METRICS)
    if not storage.exists(uri):
        return []
    return [json.loads(line) for line in storage.read_text(uri).splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------ checkpoints


def find_resume_point(out_uri: str) -> Optional[str]:
    """The complete checkpoint with the highest epoch among `{out}/last` and `{out}/_staging`, or None."""
    best, best_epoch = None, -1
    for name in (LAST, STAGING):
        prefix = storage.join(out_uri, name)
        try:
            meta = ckpt.read_sidecar(prefix)
        except CheckpointError:
            continue
        if meta.get("epoch", -1) > best_epoch:
            best, best_epoch = prefix, meta["epoch"]
    return best


def rng_tensors(device: torch.device) -> dict[str, torch.Tensor]:
    out = {"rng.torch": torch.get_rng_state()}
    if device.type == "cuda":
        out["rng.cuda"] = torch.cuda.get_rng_state(device)
    return out


def restore_rng(tensors: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(tensors["rng.torch"].cpu())
    if "rng.cuda" in tensors and device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"].cpu(), device)


def publish(out_uri: str, model, loss_fn, optimizer, schedule, meta: dict, improved: bool,
            device: torch.device) -> None:
    """Write the epoch's checkpoint to `_staging/`, then copy it to `last/` (and `best/` when `improved`)."""
    opt_tensors, opt_rest = ckpt.flatten_optimizer_state(optimizer.state_dict())
    opt_tensors.update(rng_tensors(device))
    meta = dict(meta, optimizer=opt_rest, schedule=schedule.state_dict())
    staging = storage.join(out_uri, STAGING)
    ckpt.save_checkpoint(staging, model.trainable_state_dict(), meta,
                         loss_state=loss_fn.state_dict() if loss_fn is not None else None,
                         optimizer_tensors=opt_tensors)
    ckpt.copy_checkpoint(staging, storage.join(out_uri, LAST))
    if improved:
        ckpt.copy_checkpoint(staging, storage.join(out_uri, BEST))


def restore_training_state(prefix: str, out_uri: str, model, loss_fn, optimizer, schedule,
                           device: torch.device) -> tuple[dict, list[dict]]:
    """Load a resume point's weights, optimizer, schedule and RNG state; returns its sidecar and the
    `metrics.jsonl` rows up to its epoch. Redoes the copies into `last/` / `best/` that a kill interrupted."""
    meta = ckpt.read_sidecar(prefix)
    ckpt.repair_published(prefix, meta, storage.join(out_uri, LAST), storage.join(out_uri, BEST))
    model.load_trainable_state_dict(ckpt.load_tensors(prefix, ckpt.MODEL_FILE, meta, device))
    if loss_fn is not None:
        loss_fn.load_state_dict(ckpt.load_tensors(prefix, ckpt.LOSS_FILE, meta, device))
    tensors = ckpt.load_tensors(prefix, ckpt.OPTIMIZER_FILE, meta, device)
    optimizer.load_state_dict(ckpt.unflatten_optimizer_state(tensors, meta["optimizer"]))
    schedule.load_state_dict(meta["schedule"])
    restore_rng(tensors, device)
    history = [h for h in read_metrics(out_uri) if h["epoch"] <= meta["epoch"]]
    if meta.get("metrics") and not any(h["epoch"] == meta["epoch"] for h in history):
        # killed between publishing the checkpoint and writing metrics.jsonl: the sidecar holds that epoch's row
        history.append(meta["metrics"])
    log.info("resuming from %s after epoch %d", prefix, meta["epoch"])
    return meta, history


# ------------------------------------------------------------------------------------------ epochs


def progress_bar(enabled: bool, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(disable=not enabled, leave=False, **kwargs)


class EpochClock:
    """Wall and process CPU time of one epoch's training part (CPU time is comparable across runs on a shared
    machine, wall time is what a user waits)."""

    def __init__(self) -> None:
        self.t0, self.cpu0 = time.perf_counter(), time.process_time()

    def row(self) -> dict:
        return {"train_time_s": time.perf_counter() - self.t0, "train_cpu_s": time.process_time() - self.cpu0}


def run_epochs(start_epoch: int, epochs: int, dist: Dist, train_epoch: Callable[[int], dict],
               finish_epoch: Callable[[int, dict], None], on_epoch_end: Optional[Callable[[dict], None]],
               summary: dict) -> dict:
    """The epoch loop: `train_epoch(epoch) -> row` on every rank, `finish_epoch(epoch, row)` (validate, publish,
    write metrics) on rank 0, a barrier, then the caller's `on_epoch_end(row)`, where `StopTraining` ends the run
    after the epoch's checkpoint. Updates `summary` with `last`, `epochs_done` and `stopped_early`."""
    summary.setdefault("stopped_early", False)
    for epoch in range(start_epoch, epochs):
        row = train_epoch(epoch)
        if dist.main:
            finish_epoch(epoch, row)
        dist.barrier()
        summary.update(last=row, epochs_done=epoch + 1)
        if on_epoch_end is not None:
            try:
                on_epoch_end(row)
            except StopTraining:
                summary["stopped_early"] = True
                break
    return summary


def fresh_history(history: list[dict], epoch: int, row: dict) -> list[dict]:
    """`metrics.jsonl` rows after epoch `epoch` (0-based) finished with `row`: rows of a redone epoch replaced."""
    return [h for h in history if h["epoch"] <= epoch] + [row]


def epoch_summary(out_uri: str) -> dict[str, Any]:
    return {"last_checkpoint": storage.join(out_uri, LAST), "best_checkpoint": storage.join(out_uri, BEST),
            "metrics": storage.join(out_uri, METRICS)}
