"""Training checkpoints: safetensors tensors + one JSON sidecar, published sidecar-last.

A checkpoint is a prefix (local directory or object-store prefix) holding

    model.safetensors      trainable weights of the embedding model (stem + neck + head; never the frozen backbone)
    loss.safetensors       Sub-center ArcFace class weights (optional; only training resumes / --init need them)
    optimizer.safetensors  optimizer tensors ("state.<param index>.<name>") and RNG states ("rng.torch")  (optional)
    model.json             the sidecar: config dict, backbone name + weights hash, class names, epoch, metrics,
                           optimizer scalars / param groups, scheduler state and the sha256 + size of every file above

The sidecar is written last and removed first when a prefix is overwritten, so a prefix with a readable sidecar
whose listed files match their sha256 is complete; anything else is refused (`CheckpointError`). A copy killed
half-way (``last/``, ``best/``) therefore leaves an incomplete prefix, never a mixture, and `repair_published`
redoes it on resume from the resume point, which is always complete. Only safetensors
are read: pickled checkpoints (.pt / .pth / .ckpt / .bin / torch zip archives) are refused, nothing is unpickled.

An *inference model* (`export_model`; format ``lgff-model/1``) is the same layout reduced to what embed, search,
explain, serve and detection evaluation load: ``model.safetensors`` (byte for byte the checkpoint's) and a
``model.json`` without the optimizer / schedule state, plus the preprocessing and the source checkpoint's digest.
No ArcFace class weights (`loss.safetensors`): no descriptor depends on them. It is what the pipelines pass to
those tasks, since the KFP launcher downloads a task's input artifact whole; the training directory (``last/``,
``best/``, ``metrics.jsonl``) stays the separate artifact that ``--init`` / ``--resume`` read. Every loader here
takes either form.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .. import storage
from ..errors import CheckpointError

__all__ = [
    "CHECKPOINT_FORMAT",
    "MODEL_FORMAT",
    "MODEL_FILE",
    "LOSS_FILE",
    "OPTIMIZER_FILE",
    "SIDECAR_FILE",
    "save_checkpoint",
    "read_sidecar",
    "is_complete",
    "load_tensors",
    "copy_checkpoint",
    "repair_published",
    "flatten_optimizer_state",
    "unflatten_optimizer_state",
    "checkpoint_prefix",
    "load_model_from_checkpoint",
    "backbone_weights_id",
    "export_model",
    "weights_identity",
]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "lgff-checkpoint/1"
MODEL_FORMAT = "lgff-model/1"  # an inference model (`export_model`): weights + description, no training state
MODEL_FILE = "model.safetensors"
LOSS_FILE = "loss.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
SIDECAR_FILE = "model.json"
# a training run's best-validation checkpoint, under its output directory (the trainer's `best/`)
BEST_DIR = "best"
_LOGGED_RUN_DIRS: set[str] = set()
_PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle", ".tar")
# sidecar entries only a resume reads: left out of an inference model
_TRAINING_STATE_KEYS = ("optimizer", "schedule")


def _refuse_pickle(uri: str) -> None:
    if str(uri).lower().endswith(_PICKLE_SUFFIXES):
        raise CheckpointError(
            f"{uri}: pickled PyTorch checkpoints are not loaded (unsafe and not portable); "
            f"give a checkpoint prefix holding {MODEL_FILE} + {SIDECAR_FILE}")


def checkpoint_prefix(uri: str) -> str:
    """The checkpoint prefix of `uri`: the prefix itself, its model.safetensors / model.json, or a training output
    directory (`lgff train --out`), whose `best/` checkpoint is used (logged)."""
    uri = str(uri).rstrip("/")
    _refuse_pickle(uri)
    for name in (MODEL_FILE, SIDECAR_FILE):
        if uri.endswith("/" + name) or uri == name:
            return uri[: -len(name)].rstrip("/") or "."
    best = storage.join(uri, BEST_DIR)
    if not storage.exists(storage.join(uri, SIDECAR_FILE)) and storage.exists(storage.join(best, SIDECAR_FILE)):
        if uri not in _LOGGED_RUN_DIRS:  # once per process: the prefix is resolved by every loader call
            _LOGGED_RUN_DIRS.add(uri)
            log.info("%s is a training output directory: using its best checkpoint %s", uri, best)
        return best
    return uri


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def _sidecar_bytes(sidecar: dict[str, Any]) -> bytes:
    return json.dumps(sidecar, indent=1, sort_keys=True, default=_json_default).encode()


def _publish(prefix: str, payload: dict[str, Any], sidecar: bytes) -> None:
    """Write `payload` (file name -> bytes, or a function reading them when needed; None deletes a stale file of
    that name) under `prefix` between removing the sidecar and writing `sidecar`, so the prefix reads as incomplete
    until every file is in place."""
    sidecar_uri = storage.join(prefix, SIDECAR_FILE)
    if storage.exists(sidecar_uri):  # mark the prefix incomplete before any tensor file changes
        storage.delete(sidecar_uri)
    for name, data in payload.items():
        uri = storage.join(prefix, name)
        if data is not None:
            storage.write_bytes(uri, data() if callable(data) else data)
        elif storage.exists(uri):
            storage.delete(uri)
    storage.write_bytes(sidecar_uri, sidecar)


def save_checkpoint(
    prefix: str,
    model_state: dict[str, torch.Tensor],
    meta: dict[str, Any],
    loss_state: Optional[dict[str, torch.Tensor]] = None,
    optimizer_tensors: Optional[dict[str, torch.Tensor]] = None,
) -> dict[str, Any]:
    """Write a checkpoint under `prefix`; the sidecar (meta + file hashes) is published last. Returns the sidecar."""
    prefix = str(prefix).rstrip("/")
    payload = {name: None if tensors is None else st_save(_contiguous(tensors))
               for name, tensors in ((MODEL_FILE, model_state), (LOSS_FILE, loss_state),
                                     (OPTIMIZER_FILE, optimizer_tensors))}
    files = {name: {"sha256": _sha256(data), "bytes": len(data)} for name, data in payload.items() if data is not None}
    sidecar = {"format": CHECKPOINT_FORMAT, **meta, "files": files}
    _publish(prefix, payload, _sidecar_bytes(sidecar))
    log.debug("checkpoint written to %s (%s)", prefix, ", ".join(files))
    return sidecar


def _json_default(obj: Any) -> Any:
    if isinstance(obj, tuple):
        return list(obj)
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_sidecar(uri: str) -> dict[str, Any]:
    """The sidecar of a complete checkpoint (files present with the recorded sizes), else `CheckpointError`."""
    prefix = checkpoint_prefix(uri)
    sidecar_uri = storage.join(prefix, SIDECAR_FILE)
    if not storage.exists(sidecar_uri):
        pickles = []
        if storage.is_dir(prefix):
            pickles = [f for f in storage.list_files(prefix, recursive=False) if f.lower().endswith(_PICKLE_SUFFIXES)]
        if pickles:
            raise CheckpointError(f"{prefix}: holds pickled checkpoint(s) ({', '.join(map(storage.basename, pickles))}), "
                                  f"which are not loaded; expected {MODEL_FILE} + {SIDECAR_FILE}")
        raise CheckpointError(f"{prefix}: no {SIDECAR_FILE}: not a checkpoint, or an incomplete one")
    meta = storage.read_json(sidecar_uri, error=CheckpointError)
    if not isinstance(meta, dict) or meta.get("format") not in (CHECKPOINT_FORMAT, MODEL_FORMAT):
        raise CheckpointError(f"{sidecar_uri}: not an LGFF checkpoint sidecar (format {meta.get('format')!r}, "
                              f"expected {CHECKPOINT_FORMAT!r} or {MODEL_FORMAT!r})" if isinstance(meta, dict) else
                              f"{sidecar_uri}: not an LGFF checkpoint sidecar")
    if MODEL_FILE not in meta.get("files", {}):
        raise CheckpointError(f"{sidecar_uri}: lists no {MODEL_FILE}")
    for name, info in meta["files"].items():
        file_uri = storage.join(prefix, name)
        if not storage.exists(file_uri):
            raise CheckpointError(f"{prefix}: incomplete checkpoint, {name} is missing")
        if storage.file_size(file_uri) != info["bytes"]:
            raise CheckpointError(f"{file_uri}: size {storage.file_size(file_uri)} != {info['bytes']} recorded "
                                  f"in {SIDECAR_FILE} (incomplete or modified)")
    return meta


def is_complete(uri: str) -> bool:
    try:
        read_sidecar(uri)
        return True
    except CheckpointError:
        return False


def load_tensors(uri: str, name: str = MODEL_FILE, meta: Optional[dict] = None,
                 device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Tensors of one checkpoint file, checked against the sha256 in the sidecar (safetensors only)."""
    prefix = checkpoint_prefix(uri)
    meta = meta if meta is not None else read_sidecar(prefix)
    info = meta["files"].get(name)
    if info is None:
        raise CheckpointError(f"{prefix}: checkpoint has no {name}")
    file_uri = storage.join(prefix, name)
    data = _verified_bytes(prefix, name, meta)
    try:
        tensors = st_load(data)
    except (SafetensorError, Exception) as exc:  # safetensors raises several types on foreign bytes
        raise CheckpointError(f"{file_uri}: not a safetensors file ({exc}); pickled checkpoints are refused") from None
    return {k: v.to(device) for k, v in tensors.items()}


def _verified_bytes(prefix: str, name: str, meta: dict) -> bytes:
    file_uri = storage.join(prefix, name)
    data = storage.read_bytes(file_uri)
    if _sha256(data) != meta["files"][name]["sha256"]:
        raise CheckpointError(f"{file_uri}: sha256 does not match {SIDECAR_FILE} (corrupt or modified)")
    return data


def copy_checkpoint(src: str, dst: str) -> None:
    """Copy a complete checkpoint; the destination's sidecar is removed first and written last."""
    meta = read_sidecar(src)
    prefix = checkpoint_prefix(src)
    # one file in memory at a time (an optimizer state is twice the weights)
    payload = {name: functools.partial(storage.read_bytes, storage.join(prefix, name)) if name in meta["files"]
               else None for name in (MODEL_FILE, LOSS_FILE, OPTIMIZER_FILE)}
    _publish(str(dst).rstrip("/"), payload, storage.read_bytes(storage.join(prefix, SIDECAR_FILE)))


def _epoch_of(prefix: str) -> Optional[int]:
    try:
        return int(read_sidecar(prefix).get("epoch", -1))
    except CheckpointError:
        return None


def repair_published(resume_from: str, meta: dict[str, Any], last: str, best: str) -> list[str]:
    """After a kill during publication: make `last` hold the resume point's epoch and `best` the epoch its
    ``meta["best"]`` names, copying from `resume_from` (a complete checkpoint). Returns the prefixes repaired."""
    repaired = []
    epoch = int(meta["epoch"])
    best_epoch = int(meta.get("best", {}).get("epoch", 0))
    wanted = [(last, epoch)] + ([(best, best_epoch)] if best_epoch else [])
    for dst, want in wanted:
        dst = str(dst).rstrip("/")
        if dst == checkpoint_prefix(resume_from) or _epoch_of(dst) == want:
            continue
        if want != epoch:
            # only the resume point's epoch can be restored; an older best that is gone was removed by hand
            raise CheckpointError(f"{dst}: should hold epoch {want} (recorded as best) but holds "
                                  f"{_epoch_of(dst) or 'no complete checkpoint'}; it cannot be rebuilt from "
                                  f"{resume_from} (epoch {epoch})")
        log.warning("%s: incomplete or stale (interrupted while publishing epoch %d): copying it again from %s",
                    dst, want, resume_from)
        copy_checkpoint(resume_from, dst)
        repaired.append(dst)
    return repaired


# ----------------------------------------------------------------------------------------------- optimizer state


def flatten_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """torch optimizer `state_dict()` -> (tensors for safetensors, JSON-able rest)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in state_dict["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if not name.startswith("state."):
            continue
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for idx, entry in rest.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(entry)
    groups = []
    for group in rest["param_groups"]:
        group = dict(group)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


# ----------------------------------------------------------------------------------------------- model loading


def backbone_weights_id(model, cfg) -> Optional[str]:
    """The frozen backbone's weights hash; a random init ("none") is identified by the seed it was built with."""
    value = getattr(model.backbone, "weights_hash", None)
    if value == "random" or cfg.model.backbone.weights == "none":
        return f"random:seed={cfg.seed}"
    return value


def load_model_from_checkpoint(uri: str, device: str | torch.device = "cpu"):
    """Rebuild the model from a checkpoint's (or an inference model's) sidecar config and load its trained weights.

    The frozen backbone is rebuilt from the config's weights source and must hash to the weights the checkpoint
    was trained on. Returns `(model, meta)`, model in eval mode on `device`.
    """
    from ..config import ConfigError, config_from_dict
    from ..models import build_model

    prefix = checkpoint_prefix(uri)
    meta = read_sidecar(prefix)
    try:
        cfg = config_from_dict(meta["config"], origin=f"{prefix}/{SIDECAR_FILE}:config")
    except (ConfigError, KeyError) as exc:
        raise CheckpointError(f"{prefix}: sidecar config is invalid ({exc})") from None
    # the trainer builds under torch.manual_seed(cfg.seed): a randomly initialised ("none") backbone and any
    # other random init come out identical here (without touching the caller's RNG state)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_model(cfg)
    expected = meta.get("backbone", {}).get("weights_hash")
    actual = backbone_weights_id(model, cfg)
    if expected and actual and expected != actual:
        raise CheckpointError(
            f"{prefix}: trained on backbone {meta['backbone'].get('name')} weights {expected[:12]}..., but "
            f"{cfg.model.backbone.weights!r} gives weights {actual[:12]}...")
    state = load_tensors(prefix, MODEL_FILE, meta)
    try:
        model.load_trainable_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{prefix}: weights do not fit the model built from its config ({exc})") from None
    model.to(device).eval()
    return model, meta


# ----------------------------------------------------------------------------------------------- inference model


def export_model(src: str, dst: str) -> dict[str, Any]:
    """Write the inference model of checkpoint `src` (a prefix, or a training output directory: its ``best/``) to
    `dst`: ``model.safetensors`` copied byte for byte (sha256 checked) and a ``model.json`` of format
    ``lgff-model/1`` holding the checkpoint's description (config, backbone, class names, embedding dim, epoch,
    metrics) without its optimizer / schedule state, plus ``preprocess`` (the input transform: the backbone's
    mean / std / interpolation / crop_pct and the trained image size) and the source checkpoint's sidecar digest.
    The model is rebuilt and its weights loaded first, so nothing that does not load is published. Sidecar last,
    like a checkpoint. Returns the new sidecar."""
    prefix = checkpoint_prefix(src)
    model, meta = load_model_from_checkpoint(prefix)
    weights = _verified_bytes(prefix, MODEL_FILE, meta)
    source_sidecar = storage.read_bytes(storage.join(prefix, SIDECAR_FILE))
    sidecar = {k: v for k, v in meta.items() if k not in _TRAINING_STATE_KEYS}
    # an inference model exported again keeps naming the training checkpoint it came from
    source = meta.get("checkpoint") if meta["format"] == MODEL_FORMAT else None
    sidecar.update(format=MODEL_FORMAT, files={MODEL_FILE: meta["files"][MODEL_FILE]},
                   preprocess=_preprocess(model, meta),
                   checkpoint=source or {"epoch": meta.get("epoch"), "sidecar_sha256": _sha256(source_sidecar)})
    _publish(str(dst).rstrip("/"), {MODEL_FILE: weights, LOSS_FILE: None, OPTIMIZER_FILE: None},
             _sidecar_bytes(sidecar))
    log.info("inference model of %s (epoch %s, %d bytes of weights) written to %s", prefix, meta.get("epoch"),
             len(weights), dst)
    return sidecar


def _preprocess(model, meta: dict[str, Any]) -> dict[str, Any]:
    """The input transform the model was trained with (recorded for consumers outside lgff; lgff rebuilds it)."""
    backbone = getattr(model, "frozen_backbone", None)
    backbone = model.backbone if backbone is None else backbone  # detection: MaskRCNN.backbone is the neck
    data_config = {k: list(v) if isinstance(v, tuple) else v for k, v in backbone.data_config.items()}
    trained = ((meta.get("config") or {}).get("train") or {}).get("image_size")
    return {**data_config, "image_size": int(trained or data_config["input_size"][-1])}


def weights_identity(meta: dict[str, Any]) -> dict[str, Any]:
    """What the outputs of a loaded model depend on: its trained weights' sha256, the architecture config and the
    frozen backbone's weights. Equal for a checkpoint and its inference model (`export_model`)."""
    arch = json.dumps((meta.get("config") or {}).get("model"), sort_keys=True, default=str)
    return {"weights": meta["files"][MODEL_FILE]["sha256"], "model_config": _sha256(arch.encode()),
            "backbone": (meta.get("backbone") or {}).get("weights_hash")}
