"""Feature cache: frozen-backbone features of un-augmented images, computed once, reused every epoch.

DESIGN.md section 3: the backbone is frozen, so `model.forward_features(eval_transform(image))` does not change
during training. We store those per-level maps (float16) once and train the stem + neck + head with
`model.forward_head(features)`, which skips the backbone (most of the compute) in every epoch.

Layout under the cache URI (one URI can hold caches for several datasets / backbones / image sizes):

    {cache}/{key_digest}/{split}-chunk-NNNNN.npz   rows [N * chunk_size, (N + 1) * chunk_size) of that split in
                                                   dataset order; arrays level_0 .. level_{L-1} (n, C_i, H_i, W_i)
                                                   float16, label int64, sample_id / group unicode
    {cache}/{key_digest}/_cache.json               the key + chunk list, written last (no manifest = no cache)

key = sha256 of (dataset manifest bytes, backbone name, backbone weights hash, image size, crop_pct, splits,
levels' shapes, autocast mode). Chunks are written atomically one by one, so an interrupted build resumes at the
first missing chunk (its backbone forward is skipped for chunks already on storage).

Augmentation with a cache: only the dihedral group (flips, 90 degree rotations) is applied, directly to the cached
feature maps of every level (`dihedral_augment`). A CNN's features are not exactly equivariant to these
transforms, so this approximates image-level flips / rotations; colour jitter and blur are not available from a
cache (they would need new backbone passes). The whole cache is held in memory (float16); e.g. 64 px
tf_efficientnet_lite0 features take ~23 KB per image, 224 px ~290 KB.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import torch

from .. import storage
from ..errors import DataError

__all__ = ["FeatureCache", "cache_key", "build_feature_cache", "dihedral_augment", "CACHE_MANIFEST"]

log = logging.getLogger(__name__)

CACHE_MANIFEST = "_cache.json"
CACHE_FORMAT = "lgff-feature-cache/1"


@dataclass
class FeatureCache:
    """Cached backbone features of one split: `levels[i]` (N, C_i, H_i, W_i) float16, `labels` (N,) int64."""

    levels: list[torch.Tensor]
    labels: np.ndarray
    sample_ids: np.ndarray
    groups: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, index: torch.Tensor | np.ndarray, device: torch.device | str = "cpu") -> list[torch.Tensor]:
        """float32 feature maps of the rows `index`, one tensor per level."""
        idx = torch.as_tensor(np.asarray(index), dtype=torch.long)
        return [lvl.index_select(0, idx).to(device=device, dtype=torch.float32) for lvl in self.levels]


def cache_key(dataset_fingerprint: str, backbone_name: str, weights_hash: str, image_size: int,
              crop_pct: Optional[float], split: str, autocast: str) -> tuple[dict, str]:
    key = {"dataset": dataset_fingerprint, "backbone": backbone_name, "weights_hash": weights_hash,
           "image_size": int(image_size), "crop_pct": crop_pct, "split": split, "autocast": autocast}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return key, digest


def dataset_fingerprint(data_uri: str) -> str:
    """sha256 of the dataset's manifest (which itself lists every shard's sha256)."""
    return hashlib.sha256(storage.read_bytes(storage.join(data_uri, "_manifest.json"))).hexdigest()


def _save_chunk(uri: str, arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    storage.write_bytes(uri, buf.getvalue())


def _load_chunk(uri: str) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def build_feature_cache(
    extract: Callable[[torch.Tensor], list[torch.Tensor]],
    batches: Callable[[], Iterable[dict]],
    cache_uri: str,
    key: dict,
    digest: str,
    num_rows: int,
    chunk_size: int = 512,
    progress: Optional[Callable[[int], None]] = None,
) -> FeatureCache:
    """Load the cache `{cache_uri}/{digest}`, building (or finishing) it first when its manifest is missing.

    `batches()` iterates the split in dataset order as collated dicts ("image" (B, 3, S, S), "label",
    "sample_id", "group"); `extract(images)` returns the backbone levels. Only rows of missing chunks are sent
    through `extract`. `progress(n)` is called with the number of rows done.
    """
    prefix = storage.join(cache_uri, digest)
    manifest_uri = storage.join(prefix, CACHE_MANIFEST)
    if storage.exists(manifest_uri):
        manifest = json.loads(storage.read_text(manifest_uri))
        if manifest.get("key") != key:
            raise DataError(f"{manifest_uri}: cache key does not match (expected {key}, found {manifest.get('key')})")
        log.info("feature cache hit: %s (%d rows)", prefix, manifest["num_rows"])
        return _load(prefix, manifest)

    split = key["split"]
    chunk_names = [f"{split}-chunk-{i:05d}.npz" for i in range((num_rows + chunk_size - 1) // chunk_size)]
    present = {storage.basename(u) for u in storage.list_files(prefix, recursive=False)}
    if present & set(chunk_names):
        log.info("feature cache %s: resuming, %d/%d chunks present", prefix, len(present & set(chunk_names)),
                 len(chunk_names))
    pending: dict[str, list] = {}
    row = 0
    for batch in batches():
        n = len(batch["label"])
        chunk_of_rows = [(row + j) // chunk_size for j in range(n)]
        todo = [j for j in range(n) if chunk_names[chunk_of_rows[j]] not in present]
        if todo:
            images = batch["image"][todo] if len(todo) < n else batch["image"]
            with torch.no_grad():
                feats = [f.to(torch.float16).cpu().numpy() for f in extract(images)]
            for t, j in enumerate(todo):
                entry = pending.setdefault(chunk_names[chunk_of_rows[j]], [])
                entry.append(([f[t] for f in feats], int(batch["label"][j]), str(batch["sample_id"][j]),
                              str(batch["group"][j])))
        row += n
        for name in [c for c in pending if (chunk_names.index(c) + 1) * chunk_size <= row or row >= num_rows]:
            _flush(prefix, name, pending.pop(name))
        if progress is not None:
            progress(n)
    for name in list(pending):
        _flush(prefix, name, pending.pop(name))
    if row != num_rows:
        raise DataError(f"{key['dataset'][:12]}: split {split!r} yielded {row} rows, manifest says {num_rows}")
    manifest = {"format": CACHE_FORMAT, "key": key, "num_rows": num_rows, "chunk_size": chunk_size,
                "chunks": chunk_names}
    storage.write_text(manifest_uri, json.dumps(manifest, indent=1, sort_keys=True))
    log.info("feature cache written: %s (%d rows, %d chunks)", prefix, num_rows, len(chunk_names))
    return _load(prefix, manifest)


def _flush(prefix: str, name: str, rows: list) -> None:
    levels = [np.stack([r[0][i] for r in rows]) for i in range(len(rows[0][0]))]
    arrays = {f"level_{i}": a for i, a in enumerate(levels)}
    arrays["label"] = np.asarray([r[1] for r in rows], dtype=np.int64)
    arrays["sample_id"] = np.asarray([r[2] for r in rows], dtype=str)
    arrays["group"] = np.asarray([r[3] for r in rows], dtype=str)
    _save_chunk(storage.join(prefix, name), arrays)


def _load(prefix: str, manifest: dict) -> FeatureCache:
    chunks = [_load_chunk(storage.join(prefix, name)) for name in manifest["chunks"]]
    if not chunks:
        raise DataError(f"{prefix}: feature cache holds no rows (split {manifest['key']['split']!r} is empty)")
    n_levels = len([k for k in chunks[0] if k.startswith("level_")])
    levels = [torch.from_numpy(np.concatenate([c[f"level_{i}"] for c in chunks])) for i in range(n_levels)]
    labels = np.concatenate([c["label"] for c in chunks])
    if labels.shape[0] != manifest["num_rows"]:
        raise DataError(f"{prefix}: cache holds {labels.shape[0]} rows, manifest says {manifest['num_rows']}")
    return FeatureCache(levels=levels, labels=labels,
                        sample_ids=np.concatenate([c["sample_id"] for c in chunks]),
                        groups=np.concatenate([c["group"] for c in chunks]), meta=manifest)


# ----------------------------------------------------------------------------------------------- augmentation


def dihedral_augment(levels: Sequence[torch.Tensor], hflip: float = 0.5, vflip: float = 0.5,
                     rotate90: bool = True, generator: Optional[torch.Generator] = None) -> list[torch.Tensor]:
    """Per sample, the same random flip / 90 degree rotation on every level's (B, C, H, W) map (H == W).

    Draws come from `generator` (default: torch's global RNG): per sample a horizontal flip (prob `hflip`),
    a vertical flip (prob `vflip`) and, when `rotate90`, k in {0, 1, 2, 3} quarter turns.
    """
    b = levels[0].shape[0]
    h = torch.rand(b, generator=generator) < hflip
    v = torch.rand(b, generator=generator) < vflip
    k = torch.randint(0, 4, (b,), generator=generator) if rotate90 else torch.zeros(b, dtype=torch.long)
    code = h.long() * 8 + v.long() * 4 + k
    out = [lvl.clone() for lvl in levels]
    for c in torch.unique(code).tolist():
        if c == 0:
            continue
        sel = (code == c).nonzero(as_tuple=True)[0]
        for i, lvl in enumerate(levels):
            x = lvl.index_select(0, sel.to(lvl.device))
            if c & 8:
                x = torch.flip(x, dims=(-1,))
            if c & 4:
                x = torch.flip(x, dims=(-2,))
            if c & 3:
                x = torch.rot90(x, c & 3, dims=(-2, -1))
            out[i][sel.to(lvl.device)] = x
    return out
