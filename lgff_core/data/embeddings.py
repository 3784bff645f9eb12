"""Embeddings Parquet: one row per image, written by `lgff embed`, read by index / evaluate / report.

Layout (DESIGN.md section 5), a prefix like a dataset's:
    part-NNNNN.parquet   columns sample_id string, label int32, label_name string, group string, split string,
                         embedding fixed_size_list<float32>[D]; one output shard per input dataset shard
                         (same part name), each written atomically
    _done/part-NNNNN.json  per-shard completion marker (rows, sha256, input shard sha256, model fingerprint)
    _manifest.json       written last, when every shard is done: a prefix without it is not an embeddings set

`read_embeddings(uri, split=None) -> EmbeddingTable` with ``ids, labels, groups, splits, xb`` (xb: (n, D) float32).
Shards are checked on read against the manifest's sha256 (a shard replaced after publication is a `DataError`
naming it; readers never use a mixture of two versions). Vectors are checked too: NaN / inf or a dimension that disagrees with the manifest is a `DataError` naming the
shard and row.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
from typing import Iterable, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import storage
from ..errors import DataError

logger = logging.getLogger(__name__)

__all__ = [
    "EMBEDDINGS_SCHEMA_VERSION",
    "MANIFEST_NAME",
    "EmbeddingTable",
    "embeddings_schema",
    "embeddings_to_table",
    "write_embeddings_shard",
    "read_embeddings_manifest",
    "write_embeddings_manifest",
    "read_embeddings",
    "read_embeddings_shard",
    "check_vectors",
]

EMBEDDINGS_SCHEMA_VERSION = 1
MANIFEST_NAME = "_manifest.json"
DONE_DIR = "_done"


@dataclasses.dataclass
class EmbeddingTable:
    """Embeddings in memory. ``xb`` (n, D) float32; the other fields are length-n arrays in row order."""

    ids: np.ndarray  # object (str)
    labels: np.ndarray  # int64
    groups: np.ndarray  # object (str)
    splits: np.ndarray  # object (str)
    xb: np.ndarray  # (n, D) float32
    label_names: list[str] = dataclasses.field(default_factory=list)  # index = label id
    meta: dict = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.xb.shape[0])

    @property
    def dim(self) -> int:
        return int(self.xb.shape[1])

    def subset(self, mask_or_index: np.ndarray) -> "EmbeddingTable":
        sel = np.asarray(mask_or_index)
        return EmbeddingTable(self.ids[sel], self.labels[sel], self.groups[sel], self.splits[sel],
                              np.ascontiguousarray(self.xb[sel]), list(self.label_names), dict(self.meta))

    def with_split(self, split: Optional[str | Sequence[str]]) -> "EmbeddingTable":
        if split is None:
            return self
        wanted = [split] if isinstance(split, str) else list(split)
        return self.subset(np.isin(self.splits, wanted))


def check_vectors(x: np.ndarray, d: Optional[int] = None, where: str = "embeddings") -> np.ndarray:
    """float32 C-contiguous (n, d) or `DataError` (wrong rank / dimension, NaN or inf) naming `where` and the row."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise DataError(f"{where}: expected a (n, d) matrix, got shape {x.shape}")
    if d is not None and x.shape[1] != d:
        raise DataError(f"{where}: vectors have dimension {x.shape[1]}, expected {d}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise DataError(f"{where}: {int((~finite).sum())} vector(s) contain NaN or inf (first at row {row})")
    return x


def embeddings_schema(dim: int) -> pa.Schema:
    return pa.schema([
        ("sample_id", pa.string()),
        ("label", pa.int32()),
        ("label_name", pa.string()),
        ("group", pa.string()),
        ("split", pa.string()),
        ("embedding", pa.list_(pa.float32(), dim)),
    ])


def embeddings_to_table(ids: Sequence[str], labels: Sequence[int], label_names: Sequence[str],
                        groups: Sequence[str], splits: Sequence[str], xb: np.ndarray) -> pa.Table:
    xb = check_vectors(xb)
    n, d = xb.shape
    for name, col in (("sample_id", ids), ("label", labels), ("label_name", label_names), ("group", groups),
                      ("split", splits)):
        if len(col) != n:
            raise DataError(f"embeddings: column {name} has {len(col)} values for {n} vectors")
    emb = pa.FixedSizeListArray.from_arrays(pa.array(xb.reshape(-1), type=pa.float32()), d)
    return pa.Table.from_arrays(
        [pa.array(list(ids), pa.string()), pa.array(np.asarray(labels, dtype=np.int32), pa.int32()),
         pa.array(list(label_names), pa.string()), pa.array(list(groups), pa.string()),
         pa.array(list(splits), pa.string()), emb],
        schema=embeddings_schema(d),
    )


def write_embeddings_shard(uri: str, table: pa.Table) -> dict:
    """Write one shard atomically; returns its manifest entry ``{"num_rows", "sha256", "split_rows"}``: the sha256
    of the written bytes and the rows per split (so a reader of one split's block never scans every shard)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    data = buf.getvalue()
    storage.write_bytes(uri, data)
    splits = table.column("split").value_counts().to_pylist() if table.num_rows else []
    return {"num_rows": table.num_rows, "sha256": hashlib.sha256(data).hexdigest(),
            "split_rows": {str(v["values"]): int(v["counts"]) for v in splits}}


def read_embeddings_manifest(uri: str) -> dict:
    path = storage.join(uri, MANIFEST_NAME)
    if not storage.exists(path):
        raise DataError(f"{uri}: no {MANIFEST_NAME}; not an embeddings set (or `lgff embed` has not finished)")
    manifest = storage.read_json(path)
    if manifest.get("kind") != "embeddings":
        raise DataError(f"{path}: kind={manifest.get('kind')!r}, expected 'embeddings' (is this a dataset?)")
    return manifest


def write_embeddings_manifest(uri: str, shards: list[dict], dim: int, label_names: Sequence[str], **meta) -> dict:
    manifest = {
        "kind": "embeddings",
        "schema_version": EMBEDDINGS_SCHEMA_VERSION,
        "dim": int(dim),
        "num_rows": int(sum(s["num_rows"] for s in shards)),
        "label_names": list(label_names),
        "shards": shards,
        **meta,
    }
    storage.write_text(storage.join(uri, MANIFEST_NAME), json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def _table_to_arrays(table: pa.Table, dim: int, where: str):
    emb = table.column("embedding").combine_chunks()
    if not pa.types.is_fixed_size_list(emb.type):
        raise DataError(f"{where}: column 'embedding' is {emb.type}, expected fixed_size_list<float32>")
    if emb.type.list_size != dim:
        raise DataError(f"{where}: embedding dimension {emb.type.list_size} differs from the manifest's {dim}")
    if emb.null_count:
        raise DataError(f"{where}: {emb.null_count} null embedding(s)")
    xb = emb.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)
    xb = check_vectors(xb, dim, where)
    return (np.asarray(table.column("sample_id").to_pylist(), dtype=object),
            table.column("label").to_numpy().astype(np.int64),
            np.asarray(table.column("group").to_pylist(), dtype=object),
            np.asarray(table.column("split").to_pylist(), dtype=object), xb)


def read_embeddings_shard(uri: str, dim: int, columns: Optional[list[str]] = None) -> pa.Table:
    with storage.open_input_file(uri) as f:
        return pq.read_table(f, columns=columns)


def read_embeddings(uri: str, split: Optional[str | Sequence[str]] = None,
                    shards: Optional[Iterable[int]] = None) -> EmbeddingTable:
    """All (or the listed) shards of an embeddings set, optionally only rows of `split`."""
    manifest = read_embeddings_manifest(uri)
    dim = int(manifest["dim"])
    entries = manifest["shards"]
    chosen = range(len(entries)) if shards is None else list(shards)
    parts = []
    for i in chosen:
        entry = entries[i]
        where = storage.resolve(uri, entry["name"])  # absolute in pointer manifests (collect, pipeline artifacts)
        data = storage.read_bytes(where)
        if entry.get("sha256") and hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise DataError(f"{where}: shard does not match the embeddings manifest (sha256 differs): replaced or "
                            f"corrupted after publication; re-run `lgff embed`")
        try:
            table = pq.read_table(pa.BufferReader(data))
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"{where}: not a readable embeddings shard ({exc})") from None
        if table.num_rows != entry["num_rows"]:
            raise DataError(f"{where}: {table.num_rows} rows, manifest says {entry['num_rows']}")
        parts.append(_table_to_arrays(table, dim, where))
    if parts:
        ids, labels, groups, splits, xb = (np.concatenate([p[j] for p in parts]) for j in range(5))
    else:
        ids, labels, groups, splits = (np.empty(0, dtype=o) for o in (object, np.int64, object, object))
        xb = np.empty((0, dim), np.float32)
    meta = {k: v for k, v in manifest.items() if k not in ("shards", "label_names")}
    meta["uri"] = str(uri)
    out = EmbeddingTable(ids, labels, groups, splits, xb.astype(np.float32, copy=False),
                         list(manifest.get("label_names", [])), meta)
    out = out.with_split(split)
    logger.info("read %d embeddings of dimension %d from %s%s", len(out), dim, uri,
                f" (split {split})" if split else "")
    return out


def write_embeddings(uri: str, emb: EmbeddingTable, num_shards: int = 1, **meta) -> dict:
    """Write an in-memory `EmbeddingTable` as an embeddings set (contiguous row blocks; manifest last)."""
    n = len(emb)
    names = emb.label_names
    shards = []
    for s in range(num_shards):
        rows = np.arange(n * s // num_shards, n * (s + 1) // num_shards)
        part = emb.subset(rows)
        row_names = [names[l] if 0 <= l < len(names) else str(l) for l in part.labels]
        table = embeddings_to_table(part.ids, part.labels, row_names, part.groups, part.splits, part.xb)
        name = f"part-{s:05d}.parquet"
        shards.append({"name": name, **write_embeddings_shard(storage.join(uri, name), table)})
    reserved = {"uri", "dim", "kind", "schema_version", "num_rows", "shards", "label_names"}
    extra = {k: v for k, v in {**emb.meta, **meta}.items() if k not in reserved}
    return write_embeddings_manifest(uri, shards, emb.dim, names, **extra)
