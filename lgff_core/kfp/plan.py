"""Run-time fan-out and content fingerprints for the pipelines (DESIGN.md section 7).

`plan_blocks` reads a dataset manifest and splits it into work blocks of about ``rows_per_task`` rows: whole shards
are grouped while they fit, a shard larger than that is split at Parquet row-group boundaries (the manifest lists
each shard's row-group sizes, so no shard is opened). A block is a small JSON object, the item of the pipelines'
``ParallelFor``: it names the dataset, and for each shard it covers the shard's name, sha256 and row-group range,
so an embed task's cache key follows the bytes it reads, and a block over unchanged shards stays a cache hit when
other shards are added.

`fingerprint_source` is what the non-cached ``scan`` task computes for a source imported by URI: the sha256 of its
manifest (a dataset or embeddings set: the manifest lists every shard's sha256), or, for anything else (a model
checkpoint, raw files), the sha256 over its files' relative keys, sizes and modification times. Same bytes ->
same fingerprint -> cache hits downstream; a new shard -> a new fingerprint -> the readers rerun.

`reindex_base` checks the reindex pipeline's ``mode`` / ``base_index_uri`` run parameters (in the same scan task, so
a bad value fails the run before anything else starts) and fingerprints the base index of ``mode=append``: the
sha256 of its ``index.json``, which lists every index file's sha256. The base must fit what the run appends to it:
vectors of the model's embedding size (its checkpoint sidecar's ``embedding_dim``) and the run's ``index.metric``;
otherwise the append would fail, or mix, only after the whole archive is embedded.
"""
from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import pyarrow.fs as pafs

from .. import storage
from ..errors import DataError

__all__ = ["plan_blocks", "fingerprint_source", "read_block", "reindex_base", "model_embedding_facts",
           "REINDEX_MODES"]

log = logging.getLogger(__name__)

MANIFEST_NAME = "_manifest.json"
INDEX_MANIFEST = "index.json"
MODEL_SIDECAR = "model.json"  # lgff_core.train.checkpoint.SIDECAR_FILE (not imported: the scan needs no torch)
REINDEX_MODES = ("rebuild", "append")


def plan_blocks(data_uri: str, rows_per_task: int) -> list[dict[str, Any]]:
    """Work blocks of about `rows_per_task` rows over the dataset at `data_uri` (every row in exactly one block,
    in dataset order). Each block: ``{"block", "dataset", "rows", "units": [{"shard", "sha256", "row_groups":
    [first, stop], "rows"}]}``."""
    from ..data.shards import read_manifest

    if rows_per_task <= 0:
        raise DataError(f"rows_per_task must be > 0, got {rows_per_task}")
    manifest = read_manifest(data_uri)
    dataset = str(data_uri).rstrip("/")
    blocks: list[dict[str, Any]] = []
    current: list[dict[str, Any]] = []
    current_rows = 0

    def close() -> None:
        nonlocal current, current_rows
        if current:
            blocks.append({"block": len(blocks), "dataset": dataset, "rows": current_rows, "units": current})
        current, current_rows = [], 0

    for info in manifest.shards:
        if info.num_rows == 0:
            continue  # every block has rows: one embeddings shard per block (index add relies on it)
        groups = list(info.row_groups) or [info.num_rows]
        if info.num_rows > rows_per_task and len(groups) > 1:
            # a large shard: its own blocks, cut at row groups near every `rows_per_task` rows
            close()
            start, rows = 0, 0
            for gi, n in enumerate(groups):
                rows += n
                if rows >= rows_per_task or gi == len(groups) - 1:
                    current = [{"shard": info.name, "sha256": info.sha256, "row_groups": [start, gi + 1],
                                "rows": rows}]
                    current_rows = rows
                    close()
                    start, rows = gi + 1, 0
            continue
        if current and current_rows + info.num_rows > rows_per_task:
            close()
        current.append({"shard": info.name, "sha256": info.sha256, "row_groups": [0, len(groups)],
                        "rows": info.num_rows})
        current_rows += info.num_rows
    close()
    log.info("%s: %d rows in %d shards -> %d block(s) of about %d rows", dataset, manifest.num_rows,
             manifest.num_shards, len(blocks), rows_per_task)
    return blocks


def read_block(text_or_uri: str) -> dict[str, Any]:
    """A block from its JSON text or a JSON file / URI holding it (what `lgff embed block --block` takes)."""
    text = text_or_uri if text_or_uri.lstrip().startswith("{") else storage.read_text(text_or_uri)
    try:
        block = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"--block: not valid JSON ({exc})") from None
    missing = [k for k in ("block", "dataset", "units") if not isinstance(block, dict) or k not in block]
    if missing:
        raise DataError(f"--block: missing key(s) {', '.join(missing)} (write blocks with `lgff plan`)")
    return block


def _file_listing_digest(uri: str) -> tuple[str, int, int]:
    fs, path = storage.get_filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    h = hashlib.sha256()
    count = total = 0
    for info in sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path):
        rel = info.path[len(path):].lstrip("/")
        mtime = info.mtime_ns if info.mtime_ns is not None else 0
        h.update(f"{rel}\0{info.size}\0{mtime}\n".encode())
        count += 1
        total += int(info.size or 0)
    return h.hexdigest(), count, total


def fingerprint_source(uri: str) -> dict[str, Any]:
    """``{"uri", "kind", "fingerprint", ...}`` of a source imported by URI (see the module docstring)."""
    uri = str(uri).rstrip("/")
    manifest_uri = storage.join(uri, MANIFEST_NAME)
    if storage.exists(manifest_uri):
        raw = storage.read_bytes(manifest_uri)
        try:
            manifest = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DataError(f"{manifest_uri}: not valid JSON ({exc})") from None
        return {"uri": uri, "kind": manifest.get("kind") or "dataset", "fingerprint": hashlib.sha256(raw).hexdigest(),
                "num_rows": sum(int(s.get("num_rows", 0)) for s in manifest.get("shards", [])),
                "num_shards": len(manifest.get("shards", []))}
    digest, count, total = _file_listing_digest(uri)
    if count == 0:
        raise DataError(f"{uri}: nothing there to import (no files)")
    return {"uri": uri, "kind": "files", "fingerprint": digest, "num_files": count, "bytes": total}


def _index_facts(uri: str, given: str) -> dict[str, Any]:
    uri = str(uri).rstrip("/")
    manifest_uri = storage.join(uri, INDEX_MANIFEST)
    if not storage.exists(manifest_uri):
        raise DataError(f"base_index_uri {given}: no {INDEX_MANIFEST} at {uri}; expected an index prefix "
                        "(e.g. the bulk prefix of a reindex run's index output)")
    raw = storage.read_bytes(manifest_uri)
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise DataError(f"base_index_uri {given}: {manifest_uri} is not valid JSON ({exc})") from None
    prefix = str((manifest.get("bulk") or {}).get("prefix") or "").rstrip("/")
    if prefix and prefix != uri:  # a pipeline artifact's pointer: the index lives at its bulk prefix
        return _index_facts(prefix, given)
    if manifest.get("kind", "index") != "index":
        raise DataError(f"base_index_uri {given}: {manifest_uri} is a {manifest['kind']}, not an index")
    return {"uri": uri, "kind": "index", "fingerprint": hashlib.sha256(raw).hexdigest(),
            "ntotal": manifest.get("ntotal"), "version": manifest.get("version"), "d": manifest.get("d"),
            "metric": manifest.get("metric")}


def model_embedding_facts(model_uri: str) -> dict[str, Any]:
    """``{"checkpoint", "kind", "embedding_dim"}`` of the model checkpoint at `model_uri` (a checkpoint prefix or a
    training run's output, whose ``best/`` is used), read from its sidecar without loading the weights; empty when
    it has no sidecar (nothing to check against)."""
    from .runtime import model_checkpoint_uri

    ckpt = model_checkpoint_uri(str(model_uri).rstrip("/"))
    sidecar_uri = storage.join(ckpt, MODEL_SIDECAR)
    if not storage.exists(sidecar_uri):
        return {}
    try:
        sidecar = json.loads(storage.read_bytes(sidecar_uri))
    except json.JSONDecodeError as exc:
        raise DataError(f"model_uri {model_uri}: {sidecar_uri} is not valid JSON ({exc})") from None
    if not isinstance(sidecar, dict):
        raise DataError(f"model_uri {model_uri}: {sidecar_uri} is not a checkpoint sidecar (not a JSON object)")
    model_cfg = (sidecar.get("config") or {}).get("model") or {}
    dim = sidecar.get("embedding_dim")
    return {"checkpoint": ckpt, "kind": model_cfg.get("kind"),
            "embedding_dim": dim if isinstance(dim, int) and not isinstance(dim, bool) else None}


def _check_base_fits(base: dict[str, Any], given: str, model_uri: str, metric: str) -> None:
    """The base index takes the rows this run appends: same vector size as the model's, the run's metric."""
    where = f"base_index_uri {given}"
    if metric and base.get("metric") and base["metric"] != metric:
        raise DataError(f"{where}: the index compares vectors by {base['metric']}, this run's index.metric is "
                        f"{metric}; append to an index built with {metric}, or set index.metric={base['metric']}")
    if not model_uri:
        return
    model = model_embedding_facts(model_uri)
    if model.get("kind") not in (None, "embedding"):
        raise DataError(f"model_uri {model_uri}: a {model['kind']} model, not an embedding model")
    dim = model.get("embedding_dim")
    if dim is None:
        log.info("model_uri %s: no embedding size in its sidecar; the base index's dimension is checked at append",
                 model_uri)
        return
    if base.get("d") is not None and int(base["d"]) != dim:
        raise DataError(f"{where}: the index holds {base['d']}-d vectors, the model {model_uri} makes {dim}-d "
                        "embeddings; append to an index built with this model, or use mode=rebuild")


def reindex_base(mode: str, base_index_uri: str, model_uri: str = "", metric: str = "") -> dict[str, Any] | None:
    """The base index of a reindex run: None for ``mode=rebuild``; for ``mode=append`` the facts of the index at
    `base_index_uri` (``uri`` = its index prefix, a pipeline artifact's pointer followed to its bulk prefix;
    ``fingerprint`` = sha256 of its index.json; ``d``, ``metric``). A bad mode, a missing base index, or one that does
    not fit the rows to append (dimension of `model_uri`'s embeddings, the run's `metric`; unchecked when empty) is
    a `ConfigError` / `DataError` naming the run parameter."""
    from ..config import ConfigError

    if mode not in REINDEX_MODES:
        raise ConfigError(f"mode {mode!r}: expected one of {', '.join(REINDEX_MODES)}")
    if mode == "rebuild":
        return None
    if not str(base_index_uri or "").strip():
        raise ConfigError("mode append needs base_index_uri: the index to append to (a prefix holding index.json)")
    base = _index_facts(base_index_uri, base_index_uri)
    _check_base_fits(base, base_index_uri, model_uri, metric)
    return base
