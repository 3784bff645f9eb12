"""Training of LGFFDM (Mask R-CNN on the frozen backbone + LGFFN-D / BiFPN neck; DESIGN.md section 2).

Data: a COCO-form dataset (`data.detection.DetectionDataset`): polygons / RLE -> masks, boxes, labels; images
without annotations stay in as negatives. Augmentation (train split only, `train.augment`): flips and random
90-degree rotations on tv_tensors. Optimiser: AdamW over the stem + neck + RPN + RoI heads (the backbone is frozen)
at `train.lr` / `train.weight_decay` with the per-step cosine schedule of `schedule.py` (thesis: lr 1e-3, wd 1e-5,
12 epochs, batch 2 per process). Loss: the sum of torchvision's Mask R-CNN losses. Precision: `lgff_core.device`
("detection": bf16 autocast on CUDA, fp32 on CPU).

Order: per epoch a permutation seeded by (seed, epoch); under torchrun (WORLD_SIZE > 1) rank r takes every
world-th item of it, so `train.batch_size` is per process, the global batch is world x batch_size and every rank
takes the same number of steps (DistributedDataParallel averages the gradients; gloo on CPU, nccl on CUDA).

Outputs and conventions are the shared loop machinery's (`loop.py`): `_staging/` -> `last/` (every epoch),
`best/` (lowest validation loss; no val split -> the last epoch), `metrics.jsonl`, resume from the newest complete
checkpoint with optimizer, schedule and RNG state. Validation loss = the same losses on the val split with the
neck / heads in eval-mode normalisation, no augmentation and a fixed sampling seed, so epochs compare.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from ..config import ConfigError, LGFFConfig, config_to_dict
from ..device import Precision, precision_for, resolve_device
from ..errors import CheckpointError, DataError
from . import checkpoint as ckpt
from . import loop
from .schedule import WarmupCosineSchedule
from .sync_norm import convert_to_global_batchnorm

__all__ = ["train_detection", "epoch_order"]

log = logging.getLogger(__name__)


def epoch_order(n: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> list[int]:
    """This rank's item order for `epoch`: a (seed, epoch) permutation, every world-th item, equal length per rank."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g)
    per_rank = n // world
    return order[rank::world][:per_rank].tolist()


def _to_device(targets: list[dict], device: torch.device) -> list[dict]:
    return [{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in t.items()} for t in targets]


def _loss(model: nn.Module, images: list[torch.Tensor], targets: list[dict], precision: Precision):
    with precision.autocast():
        losses = model(images, targets)
    return sum(v.float() for v in losses.values()), {k: float(v.detach()) for k, v in losses.items()}


@torch.no_grad()
def _val_loss(model: nn.Module, dataset, precision: Precision, batch_size: int, seed: int) -> Optional[float]:
    if dataset is None or len(dataset) == 0:
        return None
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.eval()
    total, n, device = 0.0, 0, precision.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # RPN / RoI sampling: the same draws every epoch
        for b0 in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(b0, min(b0 + batch_size, len(dataset)))]
            images = [im.to(device) for im, _ in items]
            loss, _ = _loss(model, images, _to_device([t for _, t in items], device), precision)
            total += float(loss) * len(items)
            n += len(items)
    for m in norms:
        m.train()
    return total / max(1, n)


def train_detection(
    cfg: LGFFConfig,
    data_uri: str,
    out_uri: str,
    init: Optional[str] = None,
    resume: bool = False,
    progress: bool = False,
    on_epoch_end: Optional[Callable[[dict], None]] = None,
) -> dict:
    """Train LGFFDM on a COCO-form dataset; returns a summary dict (see the module docstring)."""
    from ..data.detection import DetectionDataset, collate_detection, detection_eval_transform, detection_train_transform
    from ..models import build_model

    if cfg.model.kind != "detection":
        raise ConfigError(f"train_detection needs model.kind=detection; config {cfg.name!r} has {cfg.model.kind!r}")
    data_uri = str(data_uri).rstrip("/")
    out_uri = str(out_uri).rstrip("/")
    tc = cfg.train
    loop.check_lr(tc)
    aug = tc.augment
    train_tf = (detection_train_transform(aug.hflip, aug.vflip, aug.rotate90) if aug.enabled
                else detection_eval_transform())
    agnostic = cfg.model.det_class_agnostic
    train_ds = DetectionDataset(data_uri, tc.train_split, transform=train_tf, class_agnostic=agnostic)
    val_ds = DetectionDataset(data_uri, tc.val_split, class_agnostic=agnostic, manifest=train_ds.manifest)
    if len(train_ds) == 0:
        present = sorted(train_ds.manifest.split_counts)
        raise DataError(f"{data_uri}: no rows in train split {tc.train_split!r} (splits present: {present})")
    if cfg.model.num_classes != len(train_ds.label_names):
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} but {data_uri} gives {len(train_ds.label_names)} "
                          f"classes including background ({', '.join(train_ds.label_names)}; "
                          f"model.det_class_agnostic={agnostic})")

    resume_from = loop.find_resume_point(out_uri) if resume else None
    if resume and resume_from is None:
        log.info("--resume: no complete checkpoint under %s; starting from epoch 0", out_uri)
    init_meta = ckpt.read_sidecar(init) if init and resume_from is None else None

    dist, device = loop.init_distributed(resolve_device(tc.device))
    precision = precision_for("detection", device)
    if len(train_ds) < dist.world * 1:
        raise DataError(f"{data_uri}: {len(train_ds)} training image(s) for {dist.world} processes")
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    if dist.world > 1:  # the neck's BatchNorms see every rank's images (batch 2 per process is tiny)
        convert_to_global_batchnorm(model, torch.distributed.new_group())
    backbone_info = {"name": cfg.model.backbone.name, "weights": cfg.model.backbone.weights,
                     "weights_hash": ckpt.backbone_weights_id(model, cfg)}
    if init_meta is not None:
        if init_meta.get("backbone", {}).get("weights_hash") != backbone_info["weights_hash"]:
            raise CheckpointError(f"--init {init}: trained on other backbone weights; a detection model can only "
                                  f"continue from the same frozen backbone")
        model.load_trainable_state_dict(ckpt.load_tensors(init, ckpt.MODEL_FILE, init_meta), origin=f"--init {init}")
    model.to(device)

    params = model.trainable_parameters()
    optimizer = torch.optim.AdamW([{"params": params, "lr": tc.lr, "name": "model"}], lr=tc.lr,
                                  weight_decay=tc.weight_decay)
    steps_per_epoch = max(1, math.ceil((len(train_ds) // dist.world) / tc.batch_size))
    schedule = WarmupCosineSchedule(optimizer, steps_per_epoch * tc.epochs, lr_min_ratio=tc.lr_min / tc.lr,
                                    warmup_steps=round(tc.warmup_epochs * steps_per_epoch))
    start_epoch, state = 0, {"best_loss": math.inf, "best_epoch": 0, "history": []}
    if resume_from is not None:
        if ckpt.read_sidecar(resume_from).get("backbone", {}).get("weights_hash") != backbone_info["weights_hash"]:
            raise CheckpointError(f"--resume {resume_from}: checkpoint was trained on other backbone weights")
        meta, state["history"] = loop.restore_training_state(resume_from, out_uri, model, None, optimizer, schedule,
                                                             device)
        start_epoch = int(meta["epoch"])
        best = meta.get("best", {})
        state["best_loss"] = best.get("val_loss") if best.get("val_loss") is not None else math.inf
        state["best_epoch"] = int(best.get("epoch", 0))

    step_model: nn.Module = model
    if dist.world > 1:
        step_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    config_dict = config_to_dict(cfg)
    summary: dict[str, Any] = {"out": out_uri, "n_train": len(train_ds), "n_val": len(val_ds),
                               "labels": train_ds.label_names, "device": str(device), "precision": precision.name,
                               "world_size": dist.world, "start_epoch": start_epoch, "stopped_early": False}

    def train_epoch(epoch: int) -> dict:
        model.train()  # the frozen backbone stays in eval mode (FrozenBackbone.train)
        clock = loop.EpochClock()
        order = epoch_order(len(train_ds), cfg.seed, epoch, dist.rank, dist.world)
        loss_sum, seen, steps, parts_sum = 0.0, 0, 0, {}
        bar = loop.progress_bar(progress and dist.main, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{tc.epochs}",
                                unit="step")
        for b0 in range(0, len(order), tc.batch_size):
            images, targets = collate_detection([train_ds[i] for i in order[b0:b0 + tc.batch_size]])
            images = [im.to(device, non_blocking=True) for im in images]
            optimizer.zero_grad(set_to_none=True)
            loss, parts = _loss(step_model, images, _to_device(targets, device), precision)
            if not torch.isfinite(loss):
                raise DataError(f"training diverged at epoch {epoch + 1} step {steps + 1}: loss={loss.item()} "
                                f"(lower train.lr)")
            loss.backward()
            if tc.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
            optimizer.step()
            schedule.step()
            loss_sum += float(loss.detach()) * len(images)
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v * len(images)
            seen += len(images)
            steps += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        bar.close()
        times = clock.row()
        loss_sum, seen = dist.sum_over_ranks(device, loss_sum, seen)
        seen = int(seen)
        return {"epoch": epoch + 1, "train_loss": loss_sum / max(1, seen), "lr": optimizer.param_groups[0]["lr"],
                "s_per_iter": times["train_time_s"] / max(1, steps), **times, "steps": steps, "images": seen,
                **{f"train_{k}": v / max(1, seen) for k, v in parts_sum.items()}}  # rank 0's share for the parts

    def finish_epoch(epoch: int, row: dict) -> None:
        vloss = _val_loss(model, val_ds, precision, tc.batch_size, cfg.seed)
        model.train()
        row["val_loss"] = vloss
        improved = (vloss is None) or vloss < state["best_loss"]
        if improved:
            state["best_loss"], state["best_epoch"] = (vloss if vloss is not None else math.inf), epoch + 1
        state["history"] = loop.fresh_history(state["history"], epoch, row)
        best_loss = None if math.isinf(state["best_loss"]) else state["best_loss"]
        meta = {"name": cfg.name, "kind": "detection", "config": config_dict, "backbone": backbone_info,
                "class_names": train_ds.label_names, "epoch": epoch + 1, "global_step": schedule.last_step,
                "metrics": row, "best": {"epoch": state["best_epoch"], "val_loss": best_loss},
                "data": {"uri": data_uri, "fingerprint": train_ds.manifest.source_fingerprint}, "init": init}
        loop.publish(out_uri, model, None, optimizer, schedule, meta, improved, device)
        loop.write_metrics(out_uri, state["history"])
        log.info("epoch %d/%d: loss %.4f, val loss %s, %.2f s/iter", epoch + 1, tc.epochs, row["train_loss"],
                 "-" if vloss is None else f"{vloss:.4f}", row["s_per_iter"])

    loop.run_epochs(start_epoch, tc.epochs, dist, train_epoch, finish_epoch, on_epoch_end, summary)
    summary.update(best_epoch=state["best_epoch"], **loop.epoch_summary(out_uri))
    dist.close()
    return summary
