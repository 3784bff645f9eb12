"""The Parquet shard format (DESIGN.md section 4): schema, manifest, writer and block readers.

A dataset is a prefix (local directory or ``s3://`` prefix) holding ``part-NNNNN.parquet`` files and a
``_manifest.json`` written **last**; a prefix without a manifest is not a dataset.

Row schema (one row per image)::

    sample_id  string   stable, unique, rows sorted by it
    image      binary   encoded bytes: the original file when it is JPEG/PNG, lossless PNG otherwise
    label      int32    index into manifest.label_names (-1 = no image-level label, e.g. COCO)
    label_name string
    group      string   scan / slide / source image (grouped metrics, leakage-free splits)
    split      string   train / val / test
    width      int32
    height     int32
    source     string   where the row came from (relative path, "file.npy[index]", ...)
    # COCO datasets add:
    image_id   int64
    annotations list<struct{id, category_id, bbox list<double>[x,y,w,h], area, iscrowd,
                            segmentation_polygons list<list<double>>, segmentation_rle struct{size list<int32>,
                            counts string (compressed COCO RLE)}}>

Shards are byte-deterministic: fixed writer options, no timestamps, rows in sample_id order, row groups cut at a
fixed budget (<= 256 rows / 4 MB: the unit of work that `ShardedImageDataset` deals to workers and ranks), shards
closed at ``shard_mb``. The manifest records each shard's sha256, bytes, rows, row-group sizes and per-split counts.
Readers are block iterators (faiss ``contrib`` style): nothing loads a whole dataset.

Readers verify: before a process reads a shard for the first time, the shard's bytes are streamed once through
sha256 and compared with the manifest (`verify_shard`); a mismatch (a shard rewritten after publication, flipped
bytes) is a one-line `DataError` naming the shard. Verified shards are remembered per process by
``(uri, sha256, size, mtime)``, so a shard is hashed once however many blocks are read from it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator, Optional, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from .. import storage
from ..errors import DataError, StorageError

__all__ = [
    "SCHEMA_VERSION",
    "MANIFEST_NAME",
    "IMAGE_SCHEMA",
    "COCO_SCHEMA",
    "ANNOTATION_TYPE",
    "ShardInfo",
    "Manifest",
    "ShardWriter",
    "read_manifest",
    "write_manifest",
    "shard_name",
    "shard_uri",
    "iter_record_batches",
    "read_table",
    "shard_subset",
    "row_subset",
    "iter_row_range",
    "verify_dataset",
    "verify_shard",
    "open_shard",
    "list_stale_parts",
]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST_NAME = "_manifest.json"
PART_RE = re.compile(r"^part-(\d{5})\.parquet$")

IMAGE_FIELDS = [
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("image", pa.binary(), nullable=False),
    pa.field("label", pa.int32(), nullable=False),
    pa.field("label_name", pa.string(), nullable=False),
    pa.field("group", pa.string(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
]
IMAGE_SCHEMA = pa.schema(IMAGE_FIELDS)

RLE_TYPE = pa.struct([pa.field("size", pa.list_(pa.int32())), pa.field("counts", pa.string())])
ANNOTATION_TYPE = pa.struct([
    pa.field("id", pa.int64()),
    pa.field("category_id", pa.int32()),
    pa.field("bbox", pa.list_(pa.float64())),
    pa.field("area", pa.float64()),
    pa.field("iscrowd", pa.int32()),
    pa.field("segmentation_polygons", pa.list_(pa.list_(pa.float64()))),
    pa.field("segmentation_rle", RLE_TYPE),
])
COCO_SCHEMA = pa.schema(IMAGE_FIELDS + [
    pa.field("image_id", pa.int64(), nullable=False),
    pa.field("annotations", pa.list_(ANNOTATION_TYPE)),
])

# Fixed writer options: same rows -> same bytes. Encoded images are already compressed, so the image column is
# stored as-is; the small columns use zstd with dictionaries.
_WRITER_OPTIONS = dict(
    compression={"image": "NONE"},  # filled in for the other columns per schema
    use_dictionary=["label_name", "group", "split", "source"],
    write_statistics=["sample_id", "label", "split", "width", "height"],
    data_page_size=1 << 20,
    version="2.6",
    write_page_index=False,
    store_schema=True,
)


def _writer_options(schema: pa.Schema) -> dict:
    opts = dict(_WRITER_OPTIONS)
    opts["compression"] = {f.name: ("NONE" if f.name == "image" else "ZSTD") for f in schema}
    return opts


# ----------------------------------------------------------------------------------------------- manifest


@dataclass
class ShardInfo:
    name: str
    num_rows: int
    sha256: str
    bytes: int
    # rows per Parquet row group (lets readers split work below shard level without opening footers)
    row_groups: list[int] = field(default_factory=list)
    # rows per split inside this shard (lets a split-filtered reader know its length up front)
    split_counts: dict[str, int] = field(default_factory=dict)


@dataclass
class Manifest:
    """The `_manifest.json` of a dataset prefix. `label_names[i]` is the name of label id i."""

    uri: str = ""
    schema_version: int = SCHEMA_VERSION
    kind: str = "images"  # "images" or "coco"
    shards: list[ShardInfo] = field(default_factory=list)
    label_names: list[str] = field(default_factory=list)
    split_counts: dict[str, int] = field(default_factory=dict)
    label_counts: dict[str, int] = field(default_factory=dict)
    source_fingerprint: str = ""
    converter: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    schema: list[list[str]] = field(default_factory=list)
    total_bytes: int = 0
    # converter-specific facts (COCO categories, split rule, label source, ...)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        return sum(s.num_rows for s in self.shards)

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    def shard_uri(self, index: int) -> str:
        """Where shard `index` is: its name joined to the dataset prefix, or the absolute URI a pointer manifest
        lists (a pipeline artifact whose bulk shards live under ``<pipeline_root>/.bulk/``)."""
        return storage.resolve(self.uri, self.shards[index].name)

    def shard_offsets(self) -> list[int]:
        """Global row index of each shard's first row (plus the total at the end)."""
        out, total = [], 0
        for s in self.shards:
            out.append(total)
            total += s.num_rows
        return out + [total]

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("uri")
        return json.dumps(data, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, uri: str = "") -> "Manifest":
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("top level is not an object")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"schema_version {version!r} is not supported (expected {SCHEMA_VERSION})")
        shards = [ShardInfo(**s) for s in data.pop("shards", [])]
        known = {f for f in cls.__dataclass_fields__}
        return cls(uri=uri, shards=shards, **{k: v for k, v in data.items() if k in known and k != "uri"})


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def shard_uri(uri: str, index: int) -> str:
    return storage.join(uri, shard_name(index))


def read_manifest(uri: str) -> Manifest:
    """The manifest of dataset prefix `uri`; `DataError` when there is none (then it is not a dataset)."""
    uri = str(uri).rstrip("/")
    murl = storage.join(uri, MANIFEST_NAME)
    try:
        text = storage.read_text(murl)
    except StorageError:
        if not storage.exists(murl):
            raise DataError(f"{uri}: not a dataset (no {MANIFEST_NAME}; an interrupted prep leaves none)") from None
        raise
    try:
        return Manifest.from_json(text, uri=uri)
    except (ValueError, TypeError, KeyError) as exc:
        raise DataError(f"{murl}: malformed manifest: {exc}") from None


def write_manifest(manifest: Manifest) -> None:
    storage.write_text(storage.join(manifest.uri, MANIFEST_NAME), manifest.to_json())


def list_stale_parts(uri: str) -> list[str]:
    """Part files and temp files under `uri` (what a killed writer leaves behind)."""
    out = []
    for f in storage.list_files(uri, recursive=False):
        name = storage.basename(f)
        if PART_RE.match(name) or (name.startswith(".part-") and ".tmp-" in name):
            out.append(f)
    return out


# ----------------------------------------------------------------------------------------------- writer


class _HashingFile:
    """File wrapper handed to ParquetWriter: sha256 and size of everything written, computed on the fly."""

    def __init__(self, f):
        self._f = f
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.closed = False

    def write(self, data) -> int:
        data = bytes(data)
        self.sha256.update(data)
        self.size += len(data)
        self._f.write(data)
        return len(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:  # the underlying file is closed by storage.atomic_output
        self.closed = True


class ShardWriter:
    """Write rows (dicts, already in sample_id order) as ``part-NNNNN.parquet`` shards under `uri`.

    A shard is closed once its encoded size reaches ``shard_mb``; row groups are cut every ``row_group_mb`` (or
    ``row_group_rows``). Each shard goes through `storage.atomic_output`, so a part file is complete or absent.
    Memory holds at most one row group.
    """

    def __init__(
        self,
        uri: str,
        schema: pa.Schema = IMAGE_SCHEMA,
        shard_mb: float = 128.0,
        row_group_mb: float = 4.0,
        row_group_rows: int = 256,
    ):
        if shard_mb <= 0:
            raise DataError(f"shard size must be > 0 MB, got {shard_mb}")
        self.uri = str(uri).rstrip("/")
        self.schema = schema
        self.shard_bytes = int(shard_mb * (1 << 20))
        self.row_group_bytes = max(1, min(int(row_group_mb * (1 << 20)), self.shard_bytes))
        self.row_group_rows = row_group_rows
        self.shards: list[ShardInfo] = []
        self._rows: list[dict] = []
        self._rows_bytes = 0
        self._ctx = None
        self._hfile: Optional[_HashingFile] = None
        self._writer: Optional[pq.ParquetWriter] = None
        self._shard_rows = 0
        self._shard_payload = 0
        self._row_groups: list[int] = []
        self._split_counts: dict[str, int] = {}

    def _open_shard(self) -> None:
        name = shard_name(len(self.shards))
        self._ctx = storage.atomic_output(storage.join(self.uri, name))
        f = self._ctx.__enter__()
        self._hfile = _HashingFile(f)
        self._writer = pq.ParquetWriter(self._hfile, self.schema, **_writer_options(self.schema))
        self._shard_rows = 0
        self._shard_payload = 0
        self._row_groups = []
        self._split_counts = {}

    def _flush_row_group(self) -> None:
        if not self._rows:
            return
        if self._writer is None:
            self._open_shard()
        table = pa.Table.from_pylist(self._rows, schema=self.schema)
        self._writer.write_table(table, row_group_size=len(self._rows))
        self._row_groups.append(len(self._rows))
        self._shard_rows += len(self._rows)
        self._shard_payload += self._rows_bytes
        for r in self._rows:
            self._split_counts[r["split"]] = self._split_counts.get(r["split"], 0) + 1
        self._rows = []
        self._rows_bytes = 0
        if self._shard_payload >= self.shard_bytes:
            self._close_shard()

    def _close_shard(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._ctx.__exit__(None, None, None)
        info = ShardInfo(
            name=shard_name(len(self.shards)),
            num_rows=self._shard_rows,
            sha256=self._hfile.sha256.hexdigest(),
            bytes=self._hfile.size,
            row_groups=self._row_groups,
            split_counts=dict(sorted(self._split_counts.items())),
        )
        self.shards.append(info)
        log.debug("wrote %s: %d rows, %d bytes", info.name, info.num_rows, info.bytes)
        self._writer = None
        self._ctx = None
        self._hfile = None

    def write(self, row: dict) -> None:
        self._rows.append(row)
        self._rows_bytes += len(row["image"]) + 256
        if (self._rows_bytes >= self.row_group_bytes or len(self._rows) >= self.row_group_rows
                or self._shard_payload + self._rows_bytes >= self.shard_bytes):
            self._flush_row_group()

    def close(self) -> list[ShardInfo]:
        self._flush_row_group()
        self._close_shard()
        return self.shards

    def abort(self) -> None:
        """Drop the shard being written (its temp file is removed; nothing is published)."""
        if self._ctx is not None:
            try:
                self._writer.close()
            except Exception:  # noqa: BLE001 - the writer may be in any state
                pass
            try:
                self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)
            except RuntimeError:
                pass
            self._ctx = None
            self._writer = None


# ----------------------------------------------------------------------------------------------- readers


def _shard_indices(manifest: Manifest, shards: Optional[Iterable[int]]) -> list[int]:
    if shards is None:
        return list(range(manifest.num_shards))
    out = list(shards)
    for i in out:
        if not 0 <= i < manifest.num_shards:
            raise DataError(f"{manifest.uri}: no shard {i} (dataset has {manifest.num_shards})")
    return out


_VERIFIED: set[tuple] = set()


def _identity(uri: str) -> tuple:
    """What changes when a file is rewritten: its size and modification time."""
    info = storage._info(uri)
    if info.type == storage.pafs.FileType.NotFound:
        raise DataError(f"{uri}: shard listed in the manifest is missing")
    return (info.size, info.mtime_ns if info.mtime is not None else None)


def verify_shard(manifest: Manifest, index: int) -> str:
    """Check shard `index` against the manifest's sha256 and size (once per process); returns its URI."""
    info = manifest.shards[index]
    uri = manifest.shard_uri(index)
    key = (uri, info.sha256, info.bytes) + _identity(uri)
    if key in _VERIFIED:
        return uri
    digest, size = storage.stream_sha256(uri)
    if digest != info.sha256 or size != info.bytes:
        raise DataError(f"{uri}: shard does not match the dataset manifest (sha256 {digest[:12]}..., {size} bytes; "
                        f"manifest {info.sha256[:12]}..., {info.bytes} bytes): modified or corrupt after "
                        f"publication; re-run prep")
    _VERIFIED.add(key)
    return uri


def _check_schema(manifest: Manifest, uri: str, pf: pq.ParquetFile) -> None:
    expected = COCO_SCHEMA if manifest.kind == "coco" else IMAGE_SCHEMA
    actual = pf.schema_arrow
    for f in expected:
        if actual.get_field_index(f.name) < 0:
            raise DataError(f"{uri}: shard has no column {f.name!r} (not a {manifest.kind} shard)")
        if not actual.field(f.name).type.equals(f.type):
            raise DataError(f"{uri}: column {f.name!r} is {actual.field(f.name).type}, expected {f.type}")


def open_shard(manifest: Manifest, index: int) -> pq.ParquetFile:
    """The verified shard `index` of a dataset (checksum and schema), opened for reading."""
    uri = verify_shard(manifest, index)
    pf = _parquet_file(uri)
    _check_schema(manifest, uri, pf)
    return pf


def _parquet_file(uri: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(storage.open_input_file(uri))
    except (pa.ArrowInvalid, OSError) as exc:
        if isinstance(exc, StorageError):
            raise
        raise DataError(f"{uri}: not a readable Parquet shard: {exc}") from None


def iter_record_batches(
    uri: str,
    columns: Optional[Sequence[str]] = None,
    shards: Optional[Iterable[int]] = None,
    batch_size: int = 256,
    manifest: Optional[Manifest] = None,
) -> Iterator[pa.RecordBatch]:
    """Record batches of the given shards (all by default), in row order. Memory: one batch."""
    manifest = manifest or read_manifest(uri)
    for i in _shard_indices(manifest, shards):
        pf = open_shard(manifest, i)
        yield from pf.iter_batches(batch_size=batch_size, columns=list(columns) if columns else None)


def read_table(
    uri: str,
    columns: Optional[Sequence[str]] = None,
    shards: Optional[Iterable[int]] = None,
    manifest: Optional[Manifest] = None,
) -> pa.Table:
    """The given columns of the given shards as one table (ask for small columns: images are large)."""
    manifest = manifest or read_manifest(uri)
    idx = _shard_indices(manifest, shards)
    tables = [open_shard(manifest, i).read(columns=list(columns) if columns else None) for i in idx]
    if not tables:
        schema = COCO_SCHEMA if manifest.kind == "coco" else IMAGE_SCHEMA
        if columns:
            schema = pa.schema([schema.field(c) for c in columns])
        return schema.empty_table()
    return pa.concat_tables(tables)


def shard_subset(num_shards: int, index: int, count: int) -> range:
    """Contiguous shard range of part `index` of `count` (faiss contrib ``(nsplit, rank)`` style)."""
    if count <= 0 or not 0 <= index < count:
        raise ValueError(f"part {index} of {count} is not valid")
    return range(num_shards * index // count, num_shards * (index + 1) // count)


def row_subset(num_rows: int, index: int, count: int) -> tuple[int, int]:
    """Contiguous row range ``[start, stop)`` of part `index` of `count`."""
    r = shard_subset(num_rows, index, count)
    return r.start, r.stop


def iter_row_range(
    uri: str,
    start: int,
    stop: int,
    columns: Optional[Sequence[str]] = None,
    batch_size: int = 256,
    manifest: Optional[Manifest] = None,
) -> Iterator[tuple[int, pa.RecordBatch]]:
    """``(global_row_index_of_first_row, batch)`` for the rows ``[start, stop)`` of the dataset.

    Uses the row-group sizes from the manifest to open only the shards and row groups that overlap the range
    (the reader for "shard i of n" embedding: `iter_row_range(uri, *row_subset(m.num_rows, i, n))`).
    """
    manifest = manifest or read_manifest(uri)
    offsets = manifest.shard_offsets()
    cols = list(columns) if columns else None
    for si, info in enumerate(manifest.shards):
        s0, s1 = offsets[si], offsets[si + 1]
        if s1 <= start or s0 >= stop:
            continue
        pf = open_shard(manifest, si)
        groups = info.row_groups or [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
        g0 = s0
        for gi, n in enumerate(groups):
            g1 = g0 + n
            if g1 > start and g0 < stop:
                table = pf.read_row_group(gi, columns=cols)
                lo, hi = max(start, g0) - g0, min(stop, g1) - g0
                table = table.slice(lo, hi - lo)
                pos = g0 + lo
                for batch in table.to_batches(max_chunksize=batch_size):
                    yield pos, batch
                    pos += batch.num_rows
            g0 = g1


def verify_dataset(uri: str) -> list[str]:
    """Check every shard's sha256, size, row count and schema against the manifest; returns the problems."""
    manifest = read_manifest(uri)
    expected = COCO_SCHEMA if manifest.kind == "coco" else IMAGE_SCHEMA
    problems = []
    for i, info in enumerate(manifest.shards):
        suri = manifest.shard_uri(i)
        try:
            digest, size = storage.stream_sha256(suri)
        except StorageError as exc:
            problems.append(f"{info.name}: cannot read ({exc})")
            continue
        if digest != info.sha256:
            problems.append(f"{info.name}: sha256 {digest} != manifest {info.sha256}")
            continue
        if size != info.bytes:
            problems.append(f"{info.name}: {size} bytes != manifest {info.bytes}")
        try:
            pf = _parquet_file(suri)
        except DataError as exc:
            problems.append(str(exc))
            continue
        schema = pf.schema_arrow
        if not schema.remove_metadata().equals(expected.remove_metadata()):
            problems.append(f"{info.name}: schema differs from the {manifest.kind} shard schema")
        if pf.metadata.num_rows != info.num_rows:
            problems.append(f"{info.name}: {pf.metadata.num_rows} rows != manifest {info.num_rows}")
    return problems
