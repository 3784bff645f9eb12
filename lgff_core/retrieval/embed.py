"""Embed a shard dataset with a trained LGFF model (or the GeM baseline): one embeddings shard per input shard.

Input: a dataset prefix (DESIGN.md section 4). Output: an embeddings set (`lgff_core.data.embeddings`): for input shard
``part-NNNNN.parquet`` the output shard has the same name and the same rows in the same order, with the
descriptor (B, D) float32 L2-normalised (D = 4C = 2048 for LGFFN-E with C = 512; the backbone's last-level channels
for the baseline).

Resumable and parallel: ``shard=(i, n)`` embeds the contiguous block i of n of the input shards (faiss contrib
``(nsplit, rank)`` style). Each output shard is written atomically, then a small done marker
``_done/part-NNNNN.json`` (rows, sha256, input shard sha256, model fingerprint). A rerun skips shards whose marker
matches the input shard and the model fingerprint, so a killed run resumes where it stopped.
Replacing a published output: a run whose model/settings or dataset differ from the published manifest's writes
its shards and markers beside the old ones, under ``_v/<version>/`` (version = hash of model fingerprint + dataset
fingerprint), publishes by writing ``_manifest.json`` last (listing ``_v/<version>/part-...``), and only then
removes the old version's files. Readers follow the manifest, so they see the old set or the new one, never a
mixture; a kill at any point leaves the old manifest (and its shards) in place.
One writer per output prefix: every run (and `finalize`, `collect`, a block) holds the prefix's writer lease
(`storage.lease`) while it writes there, and confirms it before publishing; a second run into the same prefix waits
``storage.lease_wait_s`` or fails naming the holder, so two models never interleave shards and manifest.
Publishing: the manifest is written by whichever run finds every input shard done (so N jobs writing to one prefix
take turns under the lease, and the last to finish publishes it). When the N jobs write to N different prefixes (in
parallel; one kfp artifact each), `collect_embeddings` (``lgff embed collect PART... --out URI``) copies the shards
into one prefix and writes the manifest; ``lgff embed finalize --out URI --data URI`` re-checks and publishes
explicitly.

Speed (DESIGN.md section 5): batched, `torch.inference_mode`, channels-last memory format and bf16 autocast when
``embed.channels_last`` / ``embed.bf16`` are true, or "auto" and the device supports them (a CPU with AMX /
AVX-512 BF16; on CUDA "auto" = channels-last only: `lgff_core.device` holds the policy). bf16 output is cast to float32 and re-normalised. Memory: one batch of images plus one
input shard's embeddings (n_rows x D float32), independent of the dataset size.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch

from .. import storage
from ..config import LGFFConfig
from ..data.embeddings import (DONE_DIR, embeddings_to_table, write_embeddings_manifest,
                               write_embeddings_shard)
from ..device import frozen_backbone_precision, resolve_device
from ..errors import DataError, LGFFError

logger = logging.getLogger(__name__)

__all__ = [
    "BASELINES",
    "resolve_speed_options",
    "Embedder",
    "load_embedder",
    "embed_images",
    "embed_dataset",
    "finalize_embeddings",
    "collect_embeddings",
    "embed_block",
]

# `--baseline NAME` -> what it is; the name recorded in manifests and metrics starts with "baseline"
BASELINES = {"gem-last": "baseline-gem-last"}
META_COLUMNS = ["sample_id", "label", "label_name", "group", "split"]


def resolve_speed_options(cfg: LGFFConfig, device: torch.device) -> dict:
    """``{"channels_last": bool, "bf16": bool}`` of the frozen backbone (`lgff_core.device` decides "auto")."""
    p = frozen_backbone_precision(cfg, device)
    return {"channels_last": p.channels_last, "bf16": p.bf16}


@dataclasses.dataclass
class Embedder:
    """A ready-to-run embedding model with what the outputs must record about it."""

    model: torch.nn.Module
    name: str  # recorded as "model" in manifests / metrics ("baseline-..." for baselines)
    fingerprint: str  # changes whenever the embeddings would change
    image_size: int
    data_config: dict
    device: torch.device
    channels_last: bool
    bf16: bool

    @property
    def dim(self) -> int:
        return int(self.model.embedding_dim)


def _device(cfg: LGFFConfig) -> torch.device:
    return resolve_device(cfg.embed.device)


def load_embedder(model_uri: Optional[str], cfg: LGFFConfig, baseline: Optional[str] = None,
                  device: Optional[torch.device] = None, weights: Optional[str] = None) -> Embedder:
    """The LGFF model from an inference model, a checkpoint prefix or a training output directory (its best/),
    or (``baseline="gem-last"``) the frozen backbone + GeM."""
    device = device or _device(cfg)
    trained_size = None  # a checkpoint embeds at the size it was trained at unless embed.image_size says otherwise
    if baseline is not None:
        from ..models import build_baseline

        if baseline not in BASELINES:
            raise LGFFError(f"--baseline {baseline!r}: known baselines are {', '.join(BASELINES)}")
        model = build_baseline(cfg, weights=weights)
        name = BASELINES[baseline]
        ident = {"baseline": baseline, "backbone": cfg.model.backbone.name,
                 "weights_hash": model.backbone.weights_hash, "gem_p": cfg.model.baseline_gem_p}
    else:
        if not model_uri:
            raise LGFFError("embed needs --model CHECKPOINT_URI or --baseline gem-last")
        from ..train.checkpoint import load_model_from_checkpoint, weights_identity

        model, meta = load_model_from_checkpoint(model_uri, device="cpu")
        name = meta.get("name") or str(model_uri).rstrip("/")
        # content only (the weights' sha256 + architecture), never the path or the training state: pipeline tasks
        # load the same model from different pod-local copies, and a checkpoint and its inference model
        # (`lgff models export`) embed alike, so their outputs must agree on the model
        ident = weights_identity(meta)
        trained_size = ((meta.get("config") or {}).get("train") or {}).get("image_size")
    model.eval().to(device)
    speed = resolve_speed_options(cfg, device)
    if speed["channels_last"]:
        model.to(memory_format=torch.channels_last)
    data_config = dict(model.backbone.data_config)
    image_size = int(cfg.embed.image_size or trained_size or data_config["input_size"][-1])
    ident.update(image_size=image_size, **speed)
    fingerprint = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()
    logger.info("embedding with %s (dim %d, %d px, channels_last=%s, bf16=%s, %s)", name, model.embedding_dim,
                image_size, speed["channels_last"], speed["bf16"], device)
    return Embedder(model, name, fingerprint, image_size, data_config, device, **speed)


def embed_images(embedder: Embedder, images: torch.Tensor) -> np.ndarray:
    """(B, 3, S, S) normalised images -> (B, D) float32 L2-normalised descriptors."""
    x = images.to(embedder.device, non_blocking=True)
    if embedder.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast(embedder.device.type, dtype=torch.bfloat16, enabled=embedder.bf16):
        out = embedder.model(x)
    out = torch.nn.functional.normalize(out.float(), dim=1)
    return out.cpu().numpy()


VERSIONS_DIR = "_v"


def _version_key(fingerprint: str, data_manifest) -> str:
    return hashlib.sha256(f"{fingerprint}/{data_manifest.source_fingerprint}".encode()).hexdigest()[:16]


def _published(out_uri: str) -> Optional[dict]:
    from ..data.embeddings import read_embeddings_manifest

    try:
        return read_embeddings_manifest(out_uri)
    except DataError:
        return None


def _published_root(out_uri: str, published: dict) -> str:
    """The prefix holding the shards a published manifest names (the output itself or one `_v/<version>`)."""
    names = [s["name"] for s in published.get("shards", [])]
    head = names[0].rsplit("/", 1)[0] if names and "/" in names[0] else ""
    return storage.join(out_uri, head) if head else str(out_uri).rstrip("/")


def _write_root(out_uri: str, fingerprint: str, data_manifest) -> str:
    """Where a run with `fingerprint` writes its shards and markers (see the module docstring)."""
    out_uri = str(out_uri).rstrip("/")
    published = _published(out_uri)
    if published is None:
        return out_uri
    if (published.get("model_fingerprint") == fingerprint
            and published.get("source_fingerprint") == data_manifest.source_fingerprint):
        return _published_root(out_uri, published)
    return storage.join(out_uri, VERSIONS_DIR, _version_key(fingerprint, data_manifest))


def _remove_old_version(out_uri: str, old: Optional[dict], new_root: str) -> None:
    """After a new manifest is published: delete the files of the version it replaced (best effort)."""
    if old is None:
        return
    old_root = _published_root(out_uri, old)
    if old_root == new_root:
        return
    try:
        if old_root != str(out_uri).rstrip("/"):
            storage.delete(old_root, retry=False)
            return
        for entry in old.get("shards", []):
            storage.delete(storage.join(out_uri, entry["name"]), retry=False)
            storage.delete(_marker_uri(out_uri, entry["name"]), retry=False)
    except LGFFError as exc:  # the new version is published; leftovers only cost space
        logger.warning("%s: could not remove the replaced version's files: %s", out_uri, exc)


def _marker_uri(out_uri: str, name: str) -> str:
    return storage.join(out_uri, DONE_DIR, name.replace(".parquet", ".json"))


def _read_marker(out_uri: str, name: str) -> Optional[dict]:
    uri = _marker_uri(out_uri, name)
    if not storage.exists(uri):
        return None
    try:
        return json.loads(storage.read_text(uri))
    except json.JSONDecodeError:
        return None  # a corrupt marker means "not done"


def _embed_units(embedder: Embedder, data_uri: str, manifest, units: Sequence[tuple[int, int]], batch_size: int,
                 num_workers: int, progress: Optional[Callable[[int], None]], where: str,
                 max_pixels: Optional[int] = None) -> tuple:
    """(metadata table, (n, D) embeddings) of the (shard, row group) `units`, rows in unit order. Memory: the
    units' embeddings plus one batch of images, whatever the dataset size."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from torch.utils.data import DataLoader

    from ..data.dataset import ShardedImageDataset
    from ..data.transforms import eval_transform

    offsets = manifest.shard_offsets()
    metas, starts, block_pos, n = [], [], [], 0
    open_si, pf = None, None
    for si, gi in units:
        if si != open_si:
            pf = pq.ParquetFile(storage.open_input_file(manifest.shard_uri(si)))
            open_si = si
        metas.append(pf.read_row_group(gi, columns=META_COLUMNS))
        starts.append(offsets[si] + sum(manifest.shards[si].row_groups[:gi]))
        block_pos.append(n)
        n += metas[-1].num_rows
    meta = pa.concat_tables(metas) if metas else None
    starts_arr, pos_arr = np.asarray(starts, dtype=np.int64), np.asarray(block_pos, dtype=np.int64)
    order = np.argsort(starts_arr)
    starts_arr, pos_arr = starts_arr[order], pos_arr[order]
    xb = np.zeros((n, embedder.dim), dtype=np.float32)
    filled = np.zeros(n, dtype=bool)
    ds = ShardedImageDataset(data_uri, transform=eval_transform(embedder.data_config, embedder.image_size),
                             units=units, max_pixels=max_pixels)
    loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers,
                        collate_fn=lambda rows: (torch.stack([r["image"] for r in rows]),
                                                 np.array([r["index"] for r in rows], dtype=np.int64)))
    for images, index in loader:
        unit = np.searchsorted(starts_arr, index, side="right") - 1
        rows = pos_arr[unit] + (index - starts_arr[unit])
        if (unit < 0).any() or rows.max() >= n:
            raise DataError(f"{where}: reader returned row {int(index.max())} outside the block")
        xb[rows] = embed_images(embedder, images)
        filled[rows] = True
        if progress is not None:
            progress(len(rows))
    if not filled.all():
        raise DataError(f"{where}: {int((~filled).sum())} row(s) were not read")
    return meta, xb


def _embed_shard(embedder: Embedder, data_uri: str, manifest, si: int, batch_size: int, num_workers: int,
                 progress: Optional[Callable[[int], None]], max_pixels: Optional[int] = None) -> tuple:
    """(metadata table, (n, D) embeddings) of input shard `si`, rows in the shard's order."""
    units = [(si, gi) for gi in range(len(manifest.shards[si].row_groups))]
    meta, xb = _embed_units(embedder, data_uri, manifest, units, batch_size, num_workers, progress,
                            manifest.shard_uri(si), max_pixels)
    if meta is None:
        from ..data.shards import read_table

        meta = read_table(data_uri, columns=META_COLUMNS, shards=[si], manifest=manifest)
    return meta, xb


def _meta_to_table(meta, xb: np.ndarray):
    return embeddings_to_table(meta.column("sample_id").to_pylist(), meta.column("label").to_numpy(),
                               meta.column("label_name").to_pylist(), meta.column("group").to_pylist(),
                               meta.column("split").to_pylist(), xb)


def embed_block(block: dict, out_uri: str, cfg: LGFFConfig, model_uri: Optional[str] = None,
                baseline: Optional[str] = None, *, embedder: Optional[Embedder] = None,
                progress: Optional[Callable[[int], None]] = None) -> dict:
    """Embed one work block of `lgff_core.kfp.plan.plan_blocks` into `out_uri` (one shard + manifest; the manifest names
    the block, its dataset and the model). The block's shards are checked against the dataset manifest by name and
    sha256, so a dataset republished since the plan fails loudly instead of mixing versions."""
    from ..data.shards import read_manifest

    data_uri = block["dataset"]
    manifest = read_manifest(data_uri)
    if manifest.kind not in ("images", "coco"):
        raise DataError(f"{data_uri}: dataset kind {manifest.kind!r} has no images to embed")
    by_name = {s.name: i for i, s in enumerate(manifest.shards)}
    units = []
    for unit in block["units"]:
        si = by_name.get(unit["shard"])
        if si is None or manifest.shards[si].sha256 != unit["sha256"]:
            raise DataError(f"{data_uri}: shard {unit['shard']} of block {block['block']} is missing or changed "
                            "since the plan was made (rerun the plan)")
        g0, g1 = (int(g) for g in unit["row_groups"])  # a kfp struct parameter turns ints into floats
        units += [(si, gi) for gi in range(g0, g1)]
    embedder = embedder or load_embedder(model_uri, cfg, baseline)
    with storage.lease(out_uri, owner=f"lgff embed block {block['block']} ({embedder.name})") as held:
        t0 = time.perf_counter()
        meta, xb = _embed_units(embedder, data_uri, manifest, units, cfg.embed.batch_size, cfg.embed.num_workers,
                                progress, f"{data_uri} block {block['block']}", cfg.data.max_pixels)
        seconds = time.perf_counter() - t0
        shards = []
        if meta is not None and meta.num_rows:
            name = "part-00000.parquet"
            shards.append({"name": name,
                           **write_embeddings_shard(storage.join(out_uri, name), _meta_to_table(meta, xb))})
        held.check()
        out = write_embeddings_manifest(
            out_uri, shards, embedder.dim, manifest.label_names, model=embedder.name,
            model_fingerprint=embedder.fingerprint, source=str(data_uri).rstrip("/"),
            source_fingerprint=manifest.source_fingerprint, is_baseline=embedder.name.startswith("baseline"),
            block=int(block["block"]), block_units=block["units"])
    rows = out["num_rows"]
    logger.info("block %s: %d rows in %.1f s (%.1f img/s)", block["block"], rows, seconds, rows / max(seconds, 1e-9))
    return out


def embed_dataset(model_uri: Optional[str], data_uri: str, out_uri: str, cfg: LGFFConfig,
                  baseline: Optional[str] = None, shard: tuple[int, int] = (0, 1), *,
                  embedder: Optional[Embedder] = None, progress: Optional[Callable[[int], None]] = None,
                  publish: bool = True) -> dict:
    """Embed input-shard block ``shard=(i, n)`` of `data_uri` into `out_uri`; skip shards already done.

    Returns a summary: shards embedded / skipped, rows, seconds, images/s, and whether the manifest was published.
    `progress(n_images)` is called after each batch (the CLI passes a tqdm update).
    """
    from ..data.shards import read_manifest, shard_subset

    manifest = read_manifest(data_uri)
    if manifest.kind not in ("images", "coco"):
        raise DataError(f"{data_uri}: dataset kind {manifest.kind!r} has no images to embed")
    try:
        block = shard_subset(manifest.num_shards, *shard)
    except ValueError as exc:
        raise LGFFError(f"--shard {shard[0]}/{shard[1]}: {exc}") from None
    embedder = embedder or load_embedder(model_uri, cfg, baseline)
    with storage.lease(out_uri, owner=f"lgff embed ({embedder.name})") as held:
        return _embed_dataset_leased(embedder, data_uri, manifest, block, out_uri, cfg, progress, publish, held)


def _embed_dataset_leased(embedder: Embedder, data_uri: str, manifest, block: Sequence[int], out_uri: str,
                          cfg: LGFFConfig, progress: Optional[Callable[[int], None]], publish: bool,
                          held: storage.Lease) -> dict:
    root = _write_root(out_uri, embedder.fingerprint, manifest)
    if root != str(out_uri).rstrip("/") and not storage.exists(storage.join(root, DONE_DIR)):
        logger.info("%s holds embeddings with other settings: writing the new version beside them (%s); the old "
                    "one stays published until every shard is done", out_uri, root)
    done, skipped, rows, seconds = [], [], 0, 0.0
    for si in block:
        info = manifest.shards[si]
        marker = _read_marker(root, info.name)
        if (marker and marker.get("input_sha256") == info.sha256 and marker.get("fingerprint") == embedder.fingerprint
                and storage.exists(storage.join(root, info.name))):
            logger.info("%s: already embedded, skipping", info.name)
            skipped.append(info.name)
            if progress is not None:
                progress(info.num_rows)
            continue
        t0 = time.perf_counter()
        meta, xb = _embed_shard(embedder, data_uri, manifest, si, cfg.embed.batch_size, cfg.embed.num_workers,
                                progress, cfg.data.max_pixels)
        dt = time.perf_counter() - t0
        written = write_embeddings_shard(storage.join(root, info.name), _meta_to_table(meta, xb))
        marker = {"name": info.name, **written, "input_sha256": info.sha256, "fingerprint": embedder.fingerprint,
                  "model": embedder.name, "dim": embedder.dim, "shard_index": si,
                  "source": str(data_uri).rstrip("/"), "source_shards": manifest.num_shards}
        storage.write_text(_marker_uri(root, info.name), json.dumps(marker, indent=1, sort_keys=True))
        logger.info("%s: %d rows in %.1f s (%.1f img/s)", info.name, info.num_rows, dt, info.num_rows / max(dt, 1e-9))
        done.append(info.name)
        rows += info.num_rows
        seconds += dt
    published = False
    if publish:
        published = _finalize_leased(out_uri, data_uri, embedder.fingerprint, False, held) is not None
    return {"embedded": done, "skipped": skipped, "rows": rows, "seconds": seconds,
            "images_per_s": rows / seconds if seconds else None, "published": published, "model": embedder.name,
            "dim": embedder.dim, "bf16": embedder.bf16, "channels_last": embedder.channels_last}


def _shard_entry(name: str, marker: dict) -> dict:
    """The embeddings manifest's entry for a shard, from its marker (markers written before ``split_rows`` existed
    lack it; readers then count splits from the shard)."""
    keys = ("num_rows", "sha256", "split_rows")
    return {"name": name, **{k: marker[k] for k in keys if k in marker}}


def _manifest_from_markers(out_uri: str, markers: Sequence[dict], data_manifest, data_uri: str,
                           held: storage.Lease, subdir: str = "") -> dict:
    fps = {m["fingerprint"] for m in markers}
    if len(fps) != 1:
        raise DataError(f"{out_uri}: shards were embedded with {len(fps)} different models/settings; re-embed")
    shards = [_shard_entry(storage.join(subdir, m["name"]) if subdir else m["name"], m) for m in markers]
    held.check()
    return write_embeddings_manifest(
        out_uri, shards, markers[0]["dim"], data_manifest.label_names,
        model=markers[0]["model"], model_fingerprint=markers[0]["fingerprint"], source=str(data_uri).rstrip("/"),
        source_fingerprint=data_manifest.source_fingerprint,
        is_baseline=str(markers[0]["model"]).startswith("baseline"))


def finalize_embeddings(out_uri: str, data_uri: str, fingerprint: Optional[str] = None,
                        required: bool = True) -> Optional[dict]:
    """Write the manifest when every input shard of `data_uri` has a matching done marker in `out_uri`.

    Returns the manifest, or None (``required=False``) / `DataError` (``required=True``) when shards are missing.
    """
    with storage.lease(out_uri, owner="lgff embed finalize") as held:
        return _finalize_leased(out_uri, data_uri, fingerprint, required, held)


def _finalize_leased(out_uri: str, data_uri: str, fingerprint: Optional[str], required: bool,
                     held: storage.Lease) -> Optional[dict]:
    from ..data.shards import read_manifest

    manifest = read_manifest(data_uri)
    out_uri = str(out_uri).rstrip("/")
    old = _published(out_uri)
    if fingerprint is not None:
        root = _write_root(out_uri, fingerprint, manifest)
    else:  # `lgff embed finalize`: the newest complete version beside the published one, else the output itself
        versions = storage.list_files(storage.join(out_uri, VERSIONS_DIR)) if old is not None else []
        roots = sorted({u.split(f"/{DONE_DIR}/")[0] for u in versions if f"/{DONE_DIR}/" in u})
        root = roots[-1] if len(roots) == 1 else (_published_root(out_uri, old) if old else out_uri)
    markers, missing = [], []
    for info in manifest.shards:
        m = _read_marker(root, info.name)
        if not m or m.get("input_sha256") != info.sha256 or (fingerprint and m.get("fingerprint") != fingerprint):
            missing.append(info.name)
        else:
            markers.append(m)
    if missing:
        if required:
            raise DataError(f"{out_uri}: {len(missing)} of {manifest.num_shards} shard(s) not embedded yet, "
                            f"e.g. {missing[:3]}")
        logger.info("%s: %d shard(s) still missing; manifest not written yet", out_uri, len(missing))
        return None
    subdir = root[len(out_uri):].strip("/")
    out = _manifest_from_markers(out_uri, markers, manifest, data_uri, held, subdir)
    _remove_old_version(out_uri, old, root)
    logger.info("%s: manifest written (%d rows, %d shards)", out_uri, out["num_rows"], len(markers))
    return out


def collect_embeddings(part_uris: Iterable[str], out_uri: str) -> dict:
    """One embeddings manifest at `out_uri` naming the shards of `part_uris` by absolute URI; copies nothing.

    A part is an embed block output (its manifest names the block; parts are ordered by block) or a prefix written
    by `lgff embed --shard I/N` (its done markers; ordered as the dataset's shards). The parts must come from one
    dataset and one model and cover every row of the dataset exactly once.
    """
    from ..data.shards import read_manifest
    from ..data.embeddings import MANIFEST_NAME as EMB_MANIFEST, read_embeddings_manifest

    part_uris = [str(p).rstrip("/") for p in part_uris]
    blocks, markers = [], {}
    for part in part_uris:
        if storage.exists(storage.join(part, EMB_MANIFEST)):
            m = read_embeddings_manifest(part)
            blocks.append((m.get("block", len(blocks)), part, m))
            continue
        for uri in storage.list_files(storage.join(part, DONE_DIR)):
            if uri.endswith(".json"):
                m = storage.read_json(uri)
                markers.setdefault(m["name"], (part, m))
    if not blocks and not markers:
        raise DataError(f"no embedded shards under {part_uris}")
    sources = {m["source"] for _, _, m in blocks} | {m["source"] for _, m in markers.values()}
    if len(sources) != 1:
        raise DataError(f"parts were embedded from different datasets: {sorted(sources)}")
    data_uri = sources.pop()
    manifest = read_manifest(data_uri)
    fps = {m["model_fingerprint"] for _, _, m in blocks} | {m["fingerprint"] for _, m in markers.values()}
    if len(fps) != 1:
        raise DataError(f"parts were embedded with {len(fps)} different models/settings; re-embed")
    shards = []
    if blocks:
        if markers:
            raise DataError("cannot collect block outputs and --shard outputs together")
        blocks.sort(key=lambda b: b[0])
        ids = [b[0] for b in blocks]
        if len(set(ids)) != len(ids):
            raise DataError(f"block(s) {sorted({i for i in ids if ids.count(i) > 1})} given more than once")
        for _, part, m in blocks:
            shards += [{**s, "name": storage.resolve(part, s["name"])} for s in m["shards"]]
        first = blocks[0][2]
        dim, model, fingerprint = first["dim"], first["model"], first["model_fingerprint"]
    else:
        missing = [s.name for s in manifest.shards if s.name not in markers]
        if missing:
            raise DataError(f"{len(missing)} of {manifest.num_shards} shard(s) missing from the parts, "
                            f"e.g. {missing[:3]}")
        for info in manifest.shards:
            part, m = markers[info.name]
            if m["input_sha256"] != info.sha256:
                raise DataError(f"{part}/{info.name} was embedded from a different version of {data_uri}/{info.name}")
            shards.append(_shard_entry(storage.join(part, info.name), m))
        first = markers[manifest.shards[0].name][1]
        dim, model, fingerprint = first["dim"], first["model"], first["fingerprint"]
    rows = sum(int(s["num_rows"]) for s in shards)
    if rows != manifest.num_rows:
        raise DataError(f"parts hold {rows} embeddings but {data_uri} has {manifest.num_rows} rows "
                        "(a block is missing or given twice)")
    with storage.lease(out_uri, owner="lgff embed collect") as held:
        held.check()
        out = write_embeddings_manifest(
            out_uri, shards, dim, manifest.label_names, model=model, model_fingerprint=fingerprint,
            source=str(data_uri).rstrip("/"), source_fingerprint=manifest.source_fingerprint,
            is_baseline=str(model).startswith("baseline"))
    logger.info("%s: manifest naming %d shard(s) of %d part(s), %d rows", out_uri, len(shards), len(part_uris), rows)
    return out
