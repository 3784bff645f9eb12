"""One training stage of the LGFF embedding model (DESIGN.md section 3).

The backbone is frozen; the stem + neck + head and the Sub-center ArcFace class weights train with AdamW (class
weights in their own parameter group at `train.loss_lr`), a per-step cosine schedule lr -> lr_min with optional
linear warm-up (`schedule.py`), gradient clipping, and bf16 autocast on CUDA. Launched under torchrun (env RANK /
WORLD_SIZE) it wraps the trainable part in DistributedDataParallel; every rank reads its own share of the data
(ShardedImageDataset's rank split, or a strided share of the feature cache); rank 0 validates and writes.

Per step (both paths share the head computation):
    features = model.forward_features(train_transform(images))    # frozen, no grad  [image path]
    features = dihedral_augment(cache[rows])                       # [feature-cache path]
    loss     = SubCenterArcFace(model.forward_head(features), class_index)

Validation every epoch (documented protocol): embeddings of the `val` split (queries) and the `train` split
(database), un-augmented, with the current model; cosine kNN (inner product of L2-normalised descriptors, exact);
Recall@1 = fraction of queries whose nearest database item has the query's label; mAP@100 = AP over each query's
100 nearest items, divided by min(100, number of relevant items). With no `val` rows it falls back to
leave-one-out within the train split (the query itself excluded).

Outputs under `out`: `last/` (every epoch), `best/` (best val Recall@1, ties broken by val mAP@100, then the
earlier epoch: Recall@1 of n queries moves in steps of 1/n and saturates on small or easy validation splits, where
"earlier epoch" alone kept a barely trained model),
`_staging/` (the checkpoint being published; a complete one there is a valid resume point), `metrics.jsonl`
(one JSON line per epoch). A checkpoint is written to `_staging/` first, then copied to `last/` (sidecar last).
Resume = the complete checkpoint with the highest epoch among `last/` and `_staging/`; its RNG state, optimizer
and schedule are restored, and the data order is a function of (seed, epoch), so a resumed run matches an
uninterrupted one bit for bit on CPU.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn as nn

from .. import storage
from ..config import ConfigError, LGFFConfig, config_to_dict
from ..errors import CheckpointError, DataError
from . import checkpoint as ckpt
from .feature_cache import FeatureCache, build_feature_cache, cache_key, dataset_fingerprint, dihedral_augment
from .sync_norm import convert_to_global_batchnorm
from .schedule import WarmupCosineSchedule

__all__ = ["train_stage", "TrainStep", "recall_at_1", "validation_scores", "resolve_device", "bf16_supported", "StopTraining"]

log = logging.getLogger(__name__)

STAGING = "_staging"
LAST = "last"
BEST = ckpt.BEST_DIR
METRICS = "metrics.jsonl"


class StopTraining(Exception):
    """Raised by an `on_epoch_end` hook to end the run after the current epoch's checkpoint (tests, time limits)."""


# ----------------------------------------------------------------------------------------------- helpers


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def bf16_supported(device: torch.device) -> bool:
    """CUDA, or a CPU with native bf16 matmul (AMX / AVX-512 BF16): where bf16 autocast is a speed-up."""
    if device.type == "cuda":
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def _flag(value: Any, device: torch.device) -> bool:
    return bf16_supported(device) if value == "auto" else bool(value)


def _similarity_blocks(xq: torch.Tensor, xb: torch.Tensor, leave_one_out: bool, block: int):
    """(first query, cosine block of `block` queries x database); with `leave_one_out` (xq is xb) each query's own
    row is -inf."""
    for q0 in range(0, xq.shape[0], block):
        s = xq[q0:q0 + block].float() @ xb.float().T
        if leave_one_out:
            rows = torch.arange(s.shape[0])
            s[rows, rows + q0] = -float("inf")
        yield q0, s


def recall_at_1(xq: torch.Tensor, yq: np.ndarray, xb: torch.Tensor, yb: np.ndarray,
                leave_one_out: bool = False, block: int = 1024) -> float:
    """Exact cosine kNN Recall@1 of L2-normalised queries `xq` (nq, D) against database `xb` (nb, D).

    Ties go to the lower database position; with `leave_one_out` (xq is xb) each query's own row is excluded.
    """
    return validation_scores(xq, yq, xb, yb, leave_one_out=leave_one_out, k=0, block=block)[0]


VAL_MAP_K = 100


def validation_scores(xq: torch.Tensor, yq: np.ndarray, xb: torch.Tensor, yb: np.ndarray,
                      leave_one_out: bool = False, k: int = VAL_MAP_K, block: int = 1024) -> tuple[float, float]:
    """(Recall@1, mAP@k) of exact cosine kNN, from one similarity pass. Recall@1: ties go to the lower database
    position. AP@k of a query = precision@r summed over the relevant ranks r <= k, divided by min(k, R) (R =
    relevant database items; queries with R = 0 are left out): a continuous score that breaks Recall@1 ties between
    epochs. ``k=0`` computes Recall@1 only (mAP nan)."""
    if xq.shape[0] == 0:
        return float("nan"), float("nan")
    yb_t = torch.as_tensor(yb)
    counts = torch.bincount(yb_t[yb_t >= 0], minlength=int(max(yb.max(initial=0), yq.max(initial=0))) + 1)
    kk = min(k, xb.shape[0] - (1 if leave_one_out else 0))
    hits, aps = 0, []
    for q0, s in _similarity_blocks(xq, xb, leave_one_out, block):
        yq_t = torch.as_tensor(yq[q0:q0 + block])
        hits += int((yb_t[torch.argmax(s, dim=1)] == yq_t).sum())
        if kk < 1:
            continue
        idx = torch.topk(s, kk, dim=1).indices
        rel = (yb_t[idx] == yq_t[:, None]).float()
        R = counts[yq_t.clamp(min=0)] - (1 if leave_one_out else 0)
        prec = rel.cumsum(1) / torch.arange(1, kk + 1)
        norm = torch.minimum(R, torch.tensor(kk)).float()
        ap = (prec * rel).sum(1) / norm.clamp(min=1)
        aps.append(ap[(R > 0) & (yq_t >= 0)])
    aps_t = torch.cat(aps) if aps else torch.empty(0)
    return hits / xq.shape[0], float(aps_t.mean()) if aps_t.numel() else float("nan")


class TrainStep(nn.Module):
    """model.forward_head + loss as one module, so DistributedDataParallel sees every trainable parameter."""

    def __init__(self, model: nn.Module, loss: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, features: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        embeddings = self.model.forward_head(features)
        return self.loss(embeddings.float(), labels)


@dataclass
class _Dist:
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


def _init_distributed(device: torch.device) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    owns = False
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns = True
    return _Dist(rank=torch.distributed.get_rank(), world=torch.distributed.get_world_size(), owns_group=owns)


def _labels_by_split(data_uri: str, cfg: LGFFConfig):
    """Label ids of the train and val splits; rejects missing labels and single-class training sets."""
    from ..data.shards import read_manifest, read_table

    manifest = read_manifest(data_uri)
    table = read_table(data_uri, columns=["sample_id", "label", "split"], manifest=manifest)
    splits = np.asarray(table.column("split").to_pylist(), dtype=object)
    label_col = table.column("label")
    labels = np.asarray(label_col.fill_null(-1).to_numpy(zero_copy_only=False), dtype=np.int64)
    ids = table.column("sample_id").to_pylist()
    out = {}
    for split in (cfg.train.train_split, cfg.train.val_split):
        mask = splits == split
        bad = np.flatnonzero(mask & ((labels < 0) | (labels >= len(manifest.label_names))))
        if bad.size:
            shown = ", ".join(repr(ids[i]) for i in bad[:5])
            raise DataError(f"{data_uri}: {bad.size} row(s) of split {split!r} have no valid label (null, -1 or "
                            f"outside label_names), e.g. sample_id {shown}; embedding training needs a label per image")
        out[split] = labels[mask]
    train = out[cfg.train.train_split]
    if train.size == 0:
        present = sorted(set(splits.tolist()))
        raise DataError(f"{data_uri}: no rows in train split {cfg.train.train_split!r} (splits present: {present})")
    classes = sorted(set(train.tolist()))
    if len(classes) < 2:
        name = manifest.label_names[classes[0]]
        raise DataError(f"{data_uri}: split {cfg.train.train_split!r} has one class only ({name!r}); "
                        f"metric learning needs at least 2 classes")
    return manifest, out, classes


def _iter_split_batches(data_uri: str, split: str, transform: Callable, batch_size: int,
                        manifest=None, cfg_max_pixels: Optional[int] = None) -> Iterator[dict]:
    """Every row of `split` in dataset order (no rank / worker split), collated into batches of images."""
    from ..data.images import DEFAULT_MAX_PIXELS, decode_image

    cfg_max_pixels = cfg_max_pixels or DEFAULT_MAX_PIXELS
    from ..data.shards import iter_record_batches

    images, labels, ids, groups = [], [], [], []

    def emit():
        batch = {"image": torch.stack(images), "label": torch.as_tensor(labels, dtype=torch.long),
                 "sample_id": list(ids), "group": list(groups)}
        images.clear(), labels.clear(), ids.clear(), groups.clear()
        return batch

    for rb in iter_record_batches(data_uri, columns=["sample_id", "image", "label", "group", "split"],
                                  manifest=manifest, batch_size=max(64, batch_size)):
        cols = rb.to_pydict()
        for i, s in enumerate(cols["split"]):
            if s != split:
                continue
            images.append(transform(decode_image(cols["image"][i], cfg_max_pixels, cols["sample_id"][i])))
            labels.append(int(cols["label"][i]) if cols["label"][i] is not None else -1)
            ids.append(cols["sample_id"][i])
            groups.append(cols["group"][i])
            if len(images) == batch_size:
                yield emit()
    if images:
        yield emit()


def _write_metrics(out_uri: str, rows: list[dict]) -> None:
    storage.write_text(storage.join(out_uri, METRICS), "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def _read_metrics(out_uri: str) -> list[dict]:
    uri = storage.join(out_uri, METRICS)
    if not storage.exists(uri):
        return []
    return [json.loads(line) for line in storage.read_text(uri).splitlines() if line.strip()]


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


# ----------------------------------------------------------------------------------------------- the stage


def train_stage(
    cfg: LGFFConfig,
    data_uri: str,
    out_uri: str,
    init: Optional[str] = None,
    resume: bool = False,
    feature_cache: Optional[str] = None,
    progress: bool = False,
    on_epoch_end: Optional[Callable[[dict], None]] = None,
) -> dict:
    """Train one strategy stage (`cfg` already has the stage's overrides applied). Returns a summary dict.

    `init`: checkpoint prefix of the previous stage (stem/neck/head carried over; class weights kept only when
    the class names are identical). `resume`: continue from the last complete checkpoint under `out_uri`.
    `feature_cache`: URI of a feature cache (built on first use; default `cfg.train.feature_cache`, "auto" =
    `{out}/_feature_cache`). `on_epoch_end(row)` runs after each epoch's
    checkpoint is published; raising `StopTraining` there ends the run cleanly (used to test resume).
    """
    from ..data.dataset import ShardedImageDataset
    from ..data.transforms import eval_transform, train_transform
    from ..models import SubCenterArcFace, build_model

    if cfg.model.kind != "embedding":
        raise DataError(f"lgff train trains embedding models; config {cfg.name!r} has model.kind={cfg.model.kind!r}")
    data_uri = str(data_uri).rstrip("/")
    out_uri = str(out_uri).rstrip("/")
    tc = cfg.train
    if not tc.lr > 0 or tc.lr_min < 0 or tc.lr_min > tc.lr:
        raise ConfigError(f"train.lr must be > 0 and 0 <= train.lr_min <= train.lr (got lr={tc.lr}, "
                          f"lr_min={tc.lr_min})")
    device = resolve_device(tc.device)
    feature_cache = feature_cache or tc.feature_cache
    if feature_cache == "auto":
        feature_cache = storage.join(out_uri, "_feature_cache")
    manifest, split_labels, classes = _labels_by_split(data_uri, cfg)
    class_names = [manifest.label_names[c] for c in classes]
    to_class = np.full(len(manifest.label_names), -1, dtype=np.int64)
    to_class[classes] = np.arange(len(classes))
    n_train = int(split_labels[tc.train_split].size)
    n_val = int(split_labels[tc.val_split].size)

    # resume point / init checkpoint are checked before anything is built or written
    resume_from = find_resume_point(out_uri) if resume else None
    if resume and resume_from is None:
        log.info("--resume: no complete checkpoint under %s; starting from epoch 0", out_uri)
    init_meta = ckpt.read_sidecar(init) if init and resume_from is None else None

    dist = _init_distributed(device)
    if device.type == "cuda" and dist.world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", dist.rank)))
        torch.cuda.set_device(device)
    torch.manual_seed(cfg.seed)

    model = build_model(cfg)
    if dist.world > 1:
        # batch statistics over every rank's share, so N processes x batch B train like one process x N*B
        # (before the optimiser is built: the conversion makes new parameter tensors)
        convert_to_global_batchnorm(model, torch.distributed.new_group())
    backbone_info = {"name": cfg.model.backbone.name, "weights": cfg.model.backbone.weights,
                     "weights_hash": ckpt.backbone_weights_id(model, cfg)}
    loss_fn = SubCenterArcFace(model.embedding_dim, len(classes), margin_deg=cfg.loss.margin_deg,
                               scale=cfg.loss.scale, num_subcenters=cfg.loss.num_subcenters)
    if init_meta is not None:
        meta = init_meta
        other = meta.get("backbone", {})
        if other.get("name") != backbone_info["name"] or other.get("weights_hash") != backbone_info["weights_hash"]:
            raise CheckpointError(
                f"--init {init}: trained on backbone {other.get('name')!r} (weights {str(other.get('weights_hash'))[:12]}), "
                f"this stage uses {backbone_info['name']!r} (weights {str(backbone_info['weights_hash'])[:12]}); "
                f"a stage can only continue from the same frozen backbone")
        try:
            model.load_trainable_state_dict(ckpt.load_tensors(init, ckpt.MODEL_FILE, meta))
        except (RuntimeError, KeyError, ValueError) as exc:
            raise CheckpointError(f"--init {init}: weights do not fit this model ({exc})") from None
        loss_state = ckpt.load_tensors(init, ckpt.LOSS_FILE, meta) if ckpt.LOSS_FILE in meta["files"] else None
        same_shape = loss_state is not None and all(
            k in loss_state and loss_state[k].shape == v.shape for k, v in loss_fn.state_dict().items())
        if meta.get("class_names") == class_names and same_shape:
            loss_fn.load_state_dict(loss_state)
            log.info("--init %s: stem/neck/head and class weights carried over", init)
        else:  # other label set (or sub-center count): fresh class weights
            log.info("--init %s: stem/neck/head carried over; class weights re-created (%d classes)", init,
                     len(classes))
    model.to(device)
    loss_fn.to(device)

    # frozen-backbone settings shared with `lgff embed` (channels-last, bf16 autocast where the hardware has it)
    use_bf16 = _flag(cfg.embed.bf16, device)
    channels_last = _flag(cfg.embed.channels_last, device)
    if channels_last:
        model.backbone.to(memory_format=torch.channels_last)
    data_config = dict(model.backbone.data_config)
    image_size = int(tc.image_size)

    def extract(images: torch.Tensor) -> list[torch.Tensor]:
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            feats = model.forward_features(images)
        return [f.float().contiguous() for f in feats]

    # ------------------------------------------------------------------ data
    eval_tf = eval_transform(data_config, image_size)
    caches: dict[str, FeatureCache] = {}
    if feature_cache:
        fingerprint = dataset_fingerprint(data_uri)
        for split, n in ((tc.train_split, n_train), (tc.val_split, n_val)):
            if n == 0:
                continue
            key, digest = cache_key(fingerprint, backbone_info["name"], str(backbone_info["weights_hash"]),
                                    image_size, data_config.get("crop_pct"), split,
                                    "bf16" if use_bf16 else "fp32")
            if not dist.main:
                dist.barrier()
            bar = _bar(progress and dist.main, total=n, desc=f"feature cache {split}", unit="img")
            caches[split] = build_feature_cache(
                extract, lambda s=split: _iter_split_batches(data_uri, s, eval_tf, tc.batch_size, manifest,
                                                            cfg.data.max_pixels),
                feature_cache, key, digest, n, progress=bar.update)
            bar.close()
            if dist.main:
                dist.barrier()
    aug = tc.augment
    if caches and aug.enabled and (aug.blur_prob > 0 or aug.brightness or aug.contrast or aug.saturation or aug.hue):
        log.info("feature cache: colour jitter and blur are not applied (only flips / rot90 on the feature maps)")
    train_dataset = None
    if not caches:
        train_dataset = ShardedImageDataset(data_uri, split=tc.train_split,
                                            transform=train_transform(data_config, image_size, tc.augment),
                                            shuffle=True, shuffle_buffer=tc.shuffle_buffer, seed=cfg.seed,
                                            max_pixels=cfg.data.max_pixels)
    steps_per_epoch = max(1, math.ceil(n_train / dist.world / tc.batch_size))
    total_steps = steps_per_epoch * tc.epochs

    # ------------------------------------------------------------------ optimizer / schedule
    head_params = [p for p in model.parameters() if p.requires_grad]
    loss_params = [p for p in loss_fn.parameters() if p.requires_grad]
    if not head_params:
        raise DataError("the model has no trainable parameters (is everything frozen?)")
    optimizer = torch.optim.AdamW(
        [{"params": head_params, "lr": tc.lr, "name": "model"},
         {"params": loss_params, "lr": tc.loss_lr if tc.loss_lr is not None else tc.lr, "name": "loss"}],
        lr=tc.lr, weight_decay=tc.weight_decay)
    schedule = WarmupCosineSchedule(optimizer, total_steps, lr_min_ratio=tc.lr_min / tc.lr,
                                    warmup_steps=round(tc.warmup_epochs * steps_per_epoch))

    start_epoch, best_r1, best_map, best_epoch = 0, -1.0, -1.0, 0
    history: list[dict] = []
    if resume_from is not None:
        start_epoch, best_r1, best_map, best_epoch, history = _restore(resume_from, model, loss_fn, optimizer, schedule,
                                                             class_names, backbone_info, out_uri, device)

    step_module: nn.Module = TrainStep(model, loss_fn)
    if dist.world > 1:
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None)

    config_dict = config_to_dict(cfg)
    summary: dict[str, Any] = {"out": out_uri, "classes": len(classes), "n_train": n_train, "n_val": n_val,
                               "feature_cache": bool(caches), "device": str(device), "start_epoch": start_epoch,
                               "stopped_early": False}

    # ------------------------------------------------------------------ epochs
    for epoch in range(start_epoch, tc.epochs):
        model.train()
        model.backbone.eval()  # frozen: BatchNorm statistics stay the pretrained ones
        loss_fn.train()
        t0, cpu0 = time.perf_counter(), time.process_time()
        loss_sum, seen, steps = 0.0, 0, 0
        bar = _bar(progress and dist.main, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{tc.epochs}", unit="step")
        for feats, y in _in_step(_epoch_batches(caches.get(tc.train_split), train_dataset, epoch, cfg, dist,
                                                extract, device), dist, device):
            y = torch.as_tensor(to_class[y.numpy()], device=device)
            if caches and aug.enabled and (aug.hflip > 0 or aug.vflip > 0 or aug.rotate90):
                feats = dihedral_augment(feats, aug.hflip, aug.vflip, aug.rotate90)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = step_module(feats, y)
            if not torch.isfinite(loss):
                raise DataError(f"training diverged at epoch {epoch + 1} step {steps + 1}: loss={loss.item()} "
                                f"(lower train.lr or loss.scale)")
            loss.backward()
            if tc.grad_clip:
                torch.nn.utils.clip_grad_norm_(head_params + loss_params, tc.grad_clip)
            optimizer.step()
            schedule.step()
            loss_sum += float(loss.detach()) * y.shape[0]
            seen += y.shape[0]
            steps += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        bar.close()
        train_time = time.perf_counter() - t0
        train_cpu = time.process_time() - cpu0
        loss_sum, seen = dist.sum_over_ranks(device, loss_sum, seen)
        seen = int(seen)

        row = {"epoch": epoch + 1, "train_loss": loss_sum / max(1, seen), "lr": optimizer.param_groups[0]["lr"],
               "img_per_s": seen / train_time if train_time > 0 else None, "train_time_s": train_time,
               "train_cpu_s": train_cpu,  # process CPU time: comparable across runs on a shared machine
               "steps": steps, "images": seen}
        if dist.main:
            t1 = time.perf_counter()
            r1, val_map, protocol = _validate(model, caches, data_uri, cfg, eval_tf, extract, device, manifest,
                                              progress)
            row.update({"val_recall@1": r1, f"val_map@{VAL_MAP_K}": val_map, "val_protocol": protocol,
                        "val_time_s": time.perf_counter() - t1})
            # nan (no relevant item anywhere) compares False: never "improved" by mAP alone
            improved = r1 > best_r1 or (r1 == best_r1 and val_map > best_map)
            if improved:
                best_r1, best_map, best_epoch = r1, val_map, epoch + 1
            history = [h for h in history if h["epoch"] <= epoch] + [row]
            meta = {"name": cfg.name, "config": config_dict, "backbone": backbone_info, "class_names": class_names,
                    "embedding_dim": int(model.embedding_dim), "epoch": epoch + 1,
                    "global_step": schedule.last_step, "metrics": row, "best": {"epoch": best_epoch,
                                                                                "val_recall@1": best_r1,
                                                                                f"val_map@{VAL_MAP_K}": best_map},
                    "data": {"uri": data_uri, "fingerprint": manifest.source_fingerprint},
                    "init": init}
            _publish(out_uri, model, loss_fn, optimizer, schedule, meta, improved, device)
            _write_metrics(out_uri, history)
            log.info("epoch %d/%d: loss %.4f, lr %.2e, %.1f img/s, val Recall@1 %.4f%s", epoch + 1, tc.epochs,
                     row["train_loss"], row["lr"], row["img_per_s"] or 0.0, r1, " (best)" if improved else "")
        dist.barrier()
        summary.update(last=row, epochs_done=epoch + 1)
        if on_epoch_end is not None:
            try:
                on_epoch_end(row)
            except StopTraining:
                summary["stopped_early"] = True
                break

    summary.update(best_epoch=best_epoch, best_val_recall_at_1=best_r1, best_val_map_at_100=best_map,
                   last_checkpoint=storage.join(out_uri, LAST), best_checkpoint=storage.join(out_uri, BEST),
                   metrics=storage.join(out_uri, METRICS))
    if dist.owns_group:
        torch.distributed.destroy_process_group()
    return summary


def _bar(enabled: bool, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(disable=not enabled, leave=False, **kwargs)


def _in_step(batches: Iterator, dist: _Dist, device: torch.device) -> Iterator:
    """Batches of >= 2 samples (BatchNorm1d in the head needs 2); under DDP every rank stops as soon as one rank
    runs out, so all ranks take the same number of optimizer steps (the dataset's rank split can be uneven:
    the surplus rows of the other ranks are skipped this epoch; their order changes with the epoch)."""
    it = iter(batches)
    while True:
        item = next(it, None)
        ok = item is not None and item[1].shape[0] >= 2
        if dist.world > 1:
            flag = torch.tensor([1 if ok else 0], device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            ok = bool(flag.item())
            if not ok:
                return
        elif item is None:
            return
        if ok:
            yield item


def _epoch_batches(cache: Optional[FeatureCache], dataset, epoch: int, cfg: LGFFConfig, dist: _Dist,
                   extract: Callable, device: torch.device) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
    """(features, dataset label ids) per training batch; the order is a function of (seed, epoch, rank)."""
    bs = cfg.train.batch_size
    if cache is not None:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        order = torch.randperm(len(cache), generator=g)
        per_rank = len(order) // dist.world if dist.world > 1 else len(order)
        order = order[dist.rank::dist.world][:per_rank]  # equal step counts on every rank
        labels = torch.from_numpy(cache.labels)
        for b0 in range(0, len(order), bs):
            idx = order[b0:b0 + bs]
            yield cache.batch(idx, device), labels[idx]
        return
    from torch.utils.data import DataLoader

    dataset.set_epoch(epoch)
    loader = DataLoader(dataset, batch_size=bs, num_workers=cfg.train.num_workers,
                        persistent_workers=False, pin_memory=device.type == "cuda")
    for batch in loader:
        yield extract(batch["image"]), batch["label"]


@torch.no_grad()
def _embed(model, cache: Optional[FeatureCache], batches: Optional[Callable[[], Iterator[dict]]], extract,
           device, bs: int) -> tuple[torch.Tensor, np.ndarray]:
    outs, labels = [], []
    if cache is not None:
        for b0 in range(0, len(cache), bs):
            idx = np.arange(b0, min(b0 + bs, len(cache)))
            outs.append(model.forward_head(cache.batch(idx, device)).float().cpu())
        return torch.cat(outs), cache.labels
    for batch in batches():
        outs.append(model.forward_head(extract(batch["image"])).float().cpu())
        labels.append(batch["label"].numpy())
    if not outs:
        return torch.zeros(0, model.embedding_dim), np.zeros(0, dtype=np.int64)
    return torch.cat(outs), np.concatenate(labels)


def _validate(model, caches, data_uri, cfg, eval_tf, extract, device, manifest, progress
              ) -> tuple[float, float, str]:
    tc = cfg.train
    model.eval()
    bs = max(tc.batch_size, 64)

    def source(split):
        return lambda: _iter_split_batches(data_uri, split, eval_tf, bs, manifest, cfg.data.max_pixels)

    xb, yb = _embed(model, caches.get(tc.train_split), source(tc.train_split), extract, device, bs)
    if caches.get(tc.val_split) is not None or (not caches and manifest.split_counts.get(tc.val_split, 0)):
        xq, yq = _embed(model, caches.get(tc.val_split), source(tc.val_split), extract, device, bs)
        if xq.shape[0]:
            return (*validation_scores(xq, yq, xb, yb), f"{tc.val_split}-vs-{tc.train_split}")
    return (*validation_scores(xb, yb, xb, yb, leave_one_out=True), f"leave-one-out-{tc.train_split}")


def _rng_tensors(device: torch.device) -> dict[str, torch.Tensor]:
    out = {"rng.torch": torch.get_rng_state()}
    if device.type == "cuda":
        out["rng.cuda"] = torch.cuda.get_rng_state(device)
    return out


def _restore_rng(tensors: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(tensors["rng.torch"].cpu())
    if "rng.cuda" in tensors and device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"].cpu(), device)


def _publish(out_uri, model, loss_fn, optimizer, schedule, meta, improved, device) -> None:
    opt_tensors, opt_rest = ckpt.flatten_optimizer_state(optimizer.state_dict())
    opt_tensors.update(_rng_tensors(device))
    meta = dict(meta, optimizer=opt_rest, schedule=schedule.state_dict())
    staging = storage.join(out_uri, STAGING)
    ckpt.save_checkpoint(staging, model.trainable_state_dict(), meta,
                         loss_state=loss_fn.state_dict() if loss_fn is not None else None,
                         optimizer_tensors=opt_tensors)
    ckpt.copy_checkpoint(staging, storage.join(out_uri, LAST))
    if improved:
        ckpt.copy_checkpoint(staging, storage.join(out_uri, BEST))


def _restore(prefix, model, loss_fn, optimizer, schedule, class_names, backbone_info, out_uri, device):
    meta = ckpt.read_sidecar(prefix)
    # a kill while copying into last/ or best/ leaves them incomplete (or one epoch behind): redo the copies
    ckpt.repair_published(prefix, meta, storage.join(out_uri, LAST), storage.join(out_uri, BEST))
    if meta.get("class_names") != class_names:
        raise CheckpointError(f"--resume {prefix}: checkpoint classes {meta.get('class_names')} differ from the "
                              f"data's {class_names}; use a new --out (or --init) for different data")
    if meta.get("backbone", {}).get("weights_hash") != backbone_info["weights_hash"]:
        raise CheckpointError(f"--resume {prefix}: checkpoint was trained on other backbone weights")
    model.load_trainable_state_dict(ckpt.load_tensors(prefix, ckpt.MODEL_FILE, meta, device))
    loss_fn.load_state_dict(ckpt.load_tensors(prefix, ckpt.LOSS_FILE, meta, device))
    tensors = ckpt.load_tensors(prefix, ckpt.OPTIMIZER_FILE, meta, device)
    optimizer.load_state_dict(ckpt.unflatten_optimizer_state(tensors, meta["optimizer"]))
    schedule.load_state_dict(meta["schedule"])
    _restore_rng(tensors, device)
    history = [h for h in _read_metrics(out_uri) if h["epoch"] <= meta["epoch"]]
    if meta.get("metrics") and not any(h["epoch"] == meta["epoch"] for h in history):
        # killed between publishing the checkpoint and writing metrics.jsonl: the sidecar holds that epoch's row
        history.append(meta["metrics"])
    best = meta.get("best", {})
    log.info("resuming from %s after epoch %d", prefix, meta["epoch"])
    # a checkpoint from before the mAP tie-break has no val_map: -1 lets a later equal-Recall@1 epoch win
    return (int(meta["epoch"]), float(best.get("val_recall@1", -1.0)), float(best.get(f"val_map@{VAL_MAP_K}", -1.0)),
            int(best.get("epoch", 0)), history)
