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

Outputs, resume and publishing follow `loop.py`; `best/` = the epoch with the best val Recall@1, ties broken by
val mAP@100, then the earlier epoch (Recall@1 of n queries moves in steps of 1/n and saturates on small or easy
validation splits, where "earlier epoch" alone kept a barely trained model). Device and precision come from
`lgff_core.device`: the frozen backbone's features at the precision `lgff embed` uses (so the model is trained on
the features it will later be embedded with), the trainable part under the `train_step` rule.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn as nn

from .. import storage
from ..config import LGFFConfig, config_to_dict
from ..device import Precision, frozen_backbone_precision, precision_for, resolve_device
from ..errors import CheckpointError, DataError
from ..evaluate.metrics import average_precision_at_k_rows
from . import checkpoint as ckpt
from . import loop
from .feature_cache import FeatureCache, build_feature_cache, cache_key, dataset_fingerprint, dihedral_augment
from .schedule import WarmupCosineSchedule
from .sync_norm import convert_to_global_batchnorm

__all__ = ["train_stage", "TrainStep", "recall_at_1", "validation_scores", "VAL_MAP_K"]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- validation


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
        rel = (yb_t[idx] == yq_t[:, None]).numpy()
        R = (counts[yq_t.clamp(min=0)] - (1 if leave_one_out else 0)).numpy()
        ap = average_precision_at_k_rows(rel, kk, R)
        aps.append(ap[(R > 0) & (yq_t.numpy() >= 0)])
    aps_all = np.concatenate(aps) if aps else np.empty(0)
    return hits / xq.shape[0], float(aps_all.mean()) if aps_all.size else float("nan")


class TrainStep(nn.Module):
    """model.forward_head + loss as one module, so DistributedDataParallel sees every trainable parameter."""

    def __init__(self, model: nn.Module, loss: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, features: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        embeddings = self.model.forward_head(features)
        return self.loss(embeddings.float(), labels)


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


# ------------------------------------------------------------------------------------------------ the stage


@dataclass
class _Stage:
    """What one training stage builds, handed from the build / data / optimiser phases to the epochs."""
    cfg: LGFFConfig
    data_uri: str
    out_uri: str
    init: Optional[str]
    device: torch.device
    dist: loop.Dist
    manifest: Any
    classes: list
    class_names: list
    to_class: np.ndarray
    n_train: int
    n_val: int
    progress: bool
    model: nn.Module = None
    loss_fn: nn.Module = None
    backbone_info: dict = None
    features: Precision = None  # the frozen backbone's precision (shared with `lgff embed`)
    step: Precision = None      # the trainable part's
    eval_tf: Callable = None
    caches: dict = field(default_factory=dict)
    train_dataset: Any = None
    steps_per_epoch: int = 1
    optimizer: torch.optim.Optimizer = None
    schedule: WarmupCosineSchedule = None
    trainable: list = field(default_factory=list)
    step_module: nn.Module = None
    best_r1: float = -1.0
    best_map: float = -1.0
    best_epoch: int = 0
    history: list = field(default_factory=list)

    def extract(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Frozen backbone features of a batch of images, as float32 for the trainable part."""
        with torch.no_grad(), self.features.autocast():
            feats = self.model.forward_features(self.features.images(images))
        return [f.float().contiguous() for f in feats]


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
    if cfg.model.kind != "embedding":
        raise DataError(f"lgff train trains embedding models; config {cfg.name!r} has model.kind={cfg.model.kind!r}")
    data_uri = str(data_uri).rstrip("/")
    out_uri = str(out_uri).rstrip("/")
    tc = cfg.train
    loop.check_lr(tc)
    feature_cache = feature_cache or tc.feature_cache
    if feature_cache == "auto":
        feature_cache = storage.join(out_uri, "_feature_cache")
    manifest, split_labels, classes = _labels_by_split(data_uri, cfg)
    to_class = np.full(len(manifest.label_names), -1, dtype=np.int64)
    to_class[classes] = np.arange(len(classes))

    # resume point / init checkpoint are checked before anything is built or written
    resume_from = loop.find_resume_point(out_uri) if resume else None
    if resume and resume_from is None:
        log.info("--resume: no complete checkpoint under %s; starting from epoch 0", out_uri)
    init_meta = ckpt.read_sidecar(init) if init and resume_from is None else None

    dist, device = loop.init_distributed(resolve_device(tc.device))
    torch.manual_seed(cfg.seed)
    st = _Stage(cfg, data_uri, out_uri, init, device, dist, manifest, classes,
                [manifest.label_names[c] for c in classes], to_class, int(split_labels[tc.train_split].size),
                int(split_labels[tc.val_split].size), progress)
    _build_model(st, init_meta)
    _build_data(st, feature_cache)
    _build_optimiser(st)
    start_epoch = _restore(st, resume_from) if resume_from is not None else 0
    st.step_module = TrainStep(st.model, st.loss_fn)
    if dist.world > 1:
        st.step_module = nn.parallel.DistributedDataParallel(
            st.step_module, device_ids=[device.index] if device.type == "cuda" else None)

    summary: dict[str, Any] = {"out": out_uri, "classes": len(classes), "n_train": st.n_train, "n_val": st.n_val,
                               "feature_cache": bool(st.caches), "device": str(device),
                               "precision": {"features": st.features.name, "train_step": st.step.name},
                               "start_epoch": start_epoch, "stopped_early": False}
    config_dict = config_to_dict(cfg)
    loop.run_epochs(start_epoch, tc.epochs, dist, lambda epoch: _train_epoch(st, epoch),
                    lambda epoch, row: _finish_epoch(st, epoch, row, config_dict), on_epoch_end, summary)
    summary.update(best_epoch=st.best_epoch, best_val_recall_at_1=st.best_r1, best_val_map_at_100=st.best_map,
                   **loop.epoch_summary(out_uri))
    dist.close()
    return summary


def _build_model(st: _Stage, init_meta: Optional[dict]) -> None:
    """The model and the Sub-center ArcFace class weights, from `--init` when given, on the stage's device."""
    from ..models import SubCenterArcFace, build_model

    cfg, init = st.cfg, st.init
    model = build_model(cfg)
    if st.dist.world > 1:
        # batch statistics over every rank's share, so N processes x batch B train like one process x N*B
        # (before the optimiser is built: the conversion makes new parameter tensors)
        convert_to_global_batchnorm(model, torch.distributed.new_group())
    backbone_info = {"name": cfg.model.backbone.name, "weights": cfg.model.backbone.weights,
                     "weights_hash": ckpt.backbone_weights_id(model, cfg)}
    loss_fn = SubCenterArcFace(model.embedding_dim, len(st.classes), margin_deg=cfg.loss.margin_deg,
                               scale=cfg.loss.scale, num_subcenters=cfg.loss.num_subcenters)
    if init_meta is not None:
        other = init_meta.get("backbone", {})
        if other.get("name") != backbone_info["name"] or other.get("weights_hash") != backbone_info["weights_hash"]:
            raise CheckpointError(
                f"--init {init}: trained on backbone {other.get('name')!r} (weights {str(other.get('weights_hash'))[:12]}), "
                f"this stage uses {backbone_info['name']!r} (weights {str(backbone_info['weights_hash'])[:12]}); "
                f"a stage can only continue from the same frozen backbone")
        try:
            model.load_trainable_state_dict(ckpt.load_tensors(init, ckpt.MODEL_FILE, init_meta))
        except (RuntimeError, KeyError, ValueError) as exc:
            raise CheckpointError(f"--init {init}: weights do not fit this model ({exc})") from None
        loss_state = (ckpt.load_tensors(init, ckpt.LOSS_FILE, init_meta)
                      if ckpt.LOSS_FILE in init_meta["files"] else None)
        same_shape = loss_state is not None and all(
            k in loss_state and loss_state[k].shape == v.shape for k, v in loss_fn.state_dict().items())
        if init_meta.get("class_names") == st.class_names and same_shape:
            loss_fn.load_state_dict(loss_state)
            log.info("--init %s: stem/neck/head and class weights carried over", init)
        else:  # other label set (or sub-center count): fresh class weights
            log.info("--init %s: stem/neck/head carried over; class weights re-created (%d classes)", init,
                     len(st.classes))
    model.to(st.device)
    loss_fn.to(st.device)
    st.features = frozen_backbone_precision(cfg, st.device)
    st.step = precision_for("train_step", st.device)
    if st.features.channels_last:
        model.backbone.to(memory_format=torch.channels_last)
    st.model, st.loss_fn, st.backbone_info = model, loss_fn, backbone_info


def _build_data(st: _Stage, feature_cache: Optional[str]) -> None:
    """The feature caches of the train / val splits (built once), or the streaming image dataset without one."""
    from ..data.dataset import ShardedImageDataset
    from ..data.transforms import eval_transform, train_transform

    cfg, tc, dist = st.cfg, st.cfg.train, st.dist
    data_config = dict(st.model.backbone.data_config)
    image_size = int(tc.image_size)
    st.eval_tf = eval_transform(data_config, image_size)
    if feature_cache:
        fingerprint = dataset_fingerprint(st.data_uri)
        for split, n in ((tc.train_split, st.n_train), (tc.val_split, st.n_val)):
            if n == 0:
                continue
            key, digest = cache_key(fingerprint, st.backbone_info["name"], str(st.backbone_info["weights_hash"]),
                                    image_size, data_config.get("crop_pct"), split, st.features.name)
            if not dist.main:
                dist.barrier()
            bar = loop.progress_bar(st.progress and dist.main, total=n, desc=f"feature cache {split}", unit="img")
            st.caches[split] = build_feature_cache(
                st.extract, lambda s=split: _iter_split_batches(st.data_uri, s, st.eval_tf, tc.batch_size,
                                                               st.manifest, cfg.data.max_pixels),
                feature_cache, key, digest, n, progress=bar.update)
            bar.close()
            if dist.main:
                dist.barrier()
    aug = tc.augment
    if st.caches and aug.enabled and (aug.blur_prob > 0 or aug.brightness or aug.contrast or aug.saturation
                                      or aug.hue):
        log.info("feature cache: colour jitter and blur are not applied (only flips / rot90 on the feature maps)")
    if not st.caches:
        st.train_dataset = ShardedImageDataset(st.data_uri, split=tc.train_split,
                                               transform=train_transform(data_config, image_size, tc.augment),
                                               shuffle=True, shuffle_buffer=tc.shuffle_buffer, seed=cfg.seed,
                                               max_pixels=cfg.data.max_pixels)
    st.steps_per_epoch = max(1, math.ceil(st.n_train / dist.world / tc.batch_size))


def _build_optimiser(st: _Stage) -> None:
    """AdamW with the class weights in their own group (at `train.loss_lr`) and the per-step warm-up cosine."""
    tc = st.cfg.train
    head_params = [p for p in st.model.parameters() if p.requires_grad]
    loss_params = [p for p in st.loss_fn.parameters() if p.requires_grad]
    if not head_params:
        raise DataError("the model has no trainable parameters (is everything frozen?)")
    st.optimizer = torch.optim.AdamW(
        [{"params": head_params, "lr": tc.lr, "name": "model"},
         {"params": loss_params, "lr": tc.loss_lr if tc.loss_lr is not None else tc.lr, "name": "loss"}],
        lr=tc.lr, weight_decay=tc.weight_decay)
    st.schedule = WarmupCosineSchedule(st.optimizer, st.steps_per_epoch * tc.epochs, lr_min_ratio=tc.lr_min / tc.lr,
                                       warmup_steps=round(tc.warmup_epochs * st.steps_per_epoch))
    st.trainable = head_params + loss_params


def _restore(st: _Stage, prefix: str) -> int:
    """Continue from a resume point of this same stage; returns the epoch to start at."""
    meta = ckpt.read_sidecar(prefix)
    if meta.get("class_names") != st.class_names:
        raise CheckpointError(f"--resume {prefix}: checkpoint classes {meta.get('class_names')} differ from the "
                              f"data's {st.class_names}; use a new --out (or --init) for different data")
    if meta.get("backbone", {}).get("weights_hash") != st.backbone_info["weights_hash"]:
        raise CheckpointError(f"--resume {prefix}: checkpoint was trained on other backbone weights")
    meta, st.history = loop.restore_training_state(prefix, st.out_uri, st.model, st.loss_fn, st.optimizer,
                                                   st.schedule, st.device)
    best = meta.get("best", {})
    # a checkpoint from before the mAP tie-break has no val_map: -1 lets a later equal-Recall@1 epoch win
    st.best_r1 = float(best.get("val_recall@1", -1.0))
    st.best_map = float(best.get(f"val_map@{VAL_MAP_K}", -1.0))
    st.best_epoch = int(best.get("epoch", 0))
    return int(meta["epoch"])


def _train_epoch(st: _Stage, epoch: int) -> dict:
    """One pass over the training split (this rank's share); returns the epoch's metrics row."""
    tc, aug, device = st.cfg.train, st.cfg.train.augment, st.device
    st.model.train()
    st.model.backbone.eval()  # frozen: BatchNorm statistics stay the pretrained ones
    st.loss_fn.train()
    clock = loop.EpochClock()
    loss_sum, seen, steps = 0.0, 0, 0
    bar = loop.progress_bar(st.progress and st.dist.main, total=st.steps_per_epoch,
                            desc=f"epoch {epoch + 1}/{tc.epochs}", unit="step")
    dihedral = st.caches and aug.enabled and (aug.hflip > 0 or aug.vflip > 0 or aug.rotate90)
    for feats, y in _in_step(_epoch_batches(st.caches.get(tc.train_split), st.train_dataset, epoch, st.cfg, st.dist,
                                            st.extract, device), st.dist, device):
        y = torch.as_tensor(st.to_class[y.numpy()], device=device)
        if dihedral:
            feats = dihedral_augment(feats, aug.hflip, aug.vflip, aug.rotate90)
        st.optimizer.zero_grad(set_to_none=True)
        with st.step.autocast():
            loss = st.step_module(feats, y)
        if not torch.isfinite(loss):
            raise DataError(f"training diverged at epoch {epoch + 1} step {steps + 1}: loss={loss.item()} "
                            f"(lower train.lr or loss.scale)")
        loss.backward()
        if tc.grad_clip:
            torch.nn.utils.clip_grad_norm_(st.trainable, tc.grad_clip)
        st.optimizer.step()
        st.schedule.step()
        loss_sum += float(loss.detach()) * y.shape[0]
        seen += y.shape[0]
        steps += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", lr=f"{st.optimizer.param_groups[0]['lr']:.2e}")
    bar.close()
    times = clock.row()
    loss_sum, seen = st.dist.sum_over_ranks(device, loss_sum, seen)
    seen = int(seen)
    return {"epoch": epoch + 1, "train_loss": loss_sum / max(1, seen), "lr": st.optimizer.param_groups[0]["lr"],
            "img_per_s": seen / times["train_time_s"] if times["train_time_s"] > 0 else None, **times,
            "steps": steps, "images": seen}


def _finish_epoch(st: _Stage, epoch: int, row: dict, config_dict: dict) -> None:
    """Rank 0: validate, pick best, publish the checkpoint, then write metrics.jsonl."""
    t1 = time.perf_counter()
    r1, val_map, protocol = _validate(st)
    row.update({"val_recall@1": r1, f"val_map@{VAL_MAP_K}": val_map, "val_protocol": protocol,
                "val_time_s": time.perf_counter() - t1})
    # nan (no relevant item anywhere) compares False: never "improved" by mAP alone
    improved = r1 > st.best_r1 or (r1 == st.best_r1 and val_map > st.best_map)
    if improved:
        st.best_r1, st.best_map, st.best_epoch = r1, val_map, epoch + 1
    st.history = loop.fresh_history(st.history, epoch, row)
    meta = {"name": st.cfg.name, "config": config_dict, "backbone": st.backbone_info, "class_names": st.class_names,
            "embedding_dim": int(st.model.embedding_dim), "epoch": epoch + 1,
            "global_step": st.schedule.last_step, "metrics": row,
            "best": {"epoch": st.best_epoch, "val_recall@1": st.best_r1, f"val_map@{VAL_MAP_K}": st.best_map},
            "data": {"uri": st.data_uri, "fingerprint": st.manifest.source_fingerprint}, "init": st.init}
    loop.publish(st.out_uri, st.model, st.loss_fn, st.optimizer, st.schedule, meta, improved, st.device)
    loop.write_metrics(st.out_uri, st.history)
    log.info("epoch %d/%d: loss %.4f, lr %.2e, %.1f img/s, val Recall@1 %.4f%s", epoch + 1, st.cfg.train.epochs,
             row["train_loss"], row["lr"], row["img_per_s"] or 0.0, r1, " (best)" if improved else "")


def _in_step(batches: Iterator, dist: loop.Dist, device: torch.device) -> Iterator:
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


def _epoch_batches(cache: Optional[FeatureCache], dataset, epoch: int, cfg: LGFFConfig, dist: loop.Dist,
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


def _validate(st: _Stage) -> tuple[float, float, str]:
    """(val Recall@1, val mAP@100, protocol) of the current model: val queries against the train split, or
    leave-one-out within the train split when there is no val split."""
    tc = st.cfg.train
    st.model.eval()
    bs = max(tc.batch_size, 64)

    def source(split):
        return lambda: _iter_split_batches(st.data_uri, split, st.eval_tf, bs, st.manifest, st.cfg.data.max_pixels)

    xb, yb = _embed(st.model, st.caches.get(tc.train_split), source(tc.train_split), st.extract, st.device, bs)
    if st.caches.get(tc.val_split) is not None or (not st.caches and st.manifest.split_counts.get(tc.val_split, 0)):
        xq, yq = _embed(st.model, st.caches.get(tc.val_split), source(tc.val_split), st.extract, st.device, bs)
        if xq.shape[0]:
            return (*validation_scores(xq, yq, xb, yb), f"{tc.val_split}-vs-{tc.train_split}")
    return (*validation_scores(xb, yb, xb, yb, leave_one_out=True), f"leave-one-out-{tc.train_split}")



