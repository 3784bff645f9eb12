"""Archive-scale IVF: streamed embeddings, sample training, block partials, on-disk merge, append and remove.

Memory is bounded by a block, never by the archive:
- `EmbeddingsSource` streams an embeddings set row group by row group (pyarrow), optionally only one split's rows;
  rows are numbered in manifest order over the selected rows ("selected row" = faiss id in a full build).
- `train_sample` keeps only the seeded random sample of selected rows while streaming (sample + one row group).
- `encode_block` adds one block (a range of selected rows) to a copy of the trained index: an IVF partial holding
  that block's codes with global ids.
- `merge_partials_ondisk` concatenates partials into one index whose inverted lists live in one file
  (faiss `OnDiskInvertedLists`, the file `faiss.contrib.ondisk.merge_ondisk` would write, written by `write_lists`
  with bounded resident memory); search memory-maps the lists (`mapped`).
- `append_lists` / `remove_lists` write a new list file from an existing one plus a partial / minus some ids, one
  inverted list at a time (the old version is only read); `rows_not_in` is the keep-mask of an append that skips
  the sample ids the index already holds (`encode_block(..., keep=)` encodes only those rows).

Exact (Flat) and graph (HNSW) indexes, and IVF with a refine stage, keep every vector in RAM: above
``index.max_in_ram_vectors`` they are refused by `check_fits_in_ram` with an IVF factory that fits.
"""
from __future__ import annotations

import logging
import math
import os
import time
from typing import Callable, Iterator, Optional, Sequence

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import storage
from . import mapped
from ..data.embeddings import EmbeddingTable, _table_to_arrays, read_embeddings_manifest
from ..errors import DataError, IndexError_
from .core import _is_pure_ivf, faiss_metric, new_index
from .store import IDMAP_ROW_GROUP, IVFDATA_FILE, IdMap, faiss_chatter_to_stderr, idmap_from_arrays

logger = logging.getLogger(__name__)

BATCH_ROWS = 32768
ID_CHUNK = 1 << 20  # sample ids looked up in an index's id map at a time (`rows_not_in`)
IDMAP_SCHEMA = pa.schema([("sample_id", pa.string()), ("label", pa.int32()), ("group", pa.string()),
                          ("split", pa.string())])


# ------------------------------------------------------------------------------------------------ streaming


class Block:
    """Rows of one streamed batch: ``ids, labels, groups, splits`` arrays, ``xb`` (n, d) float32, ``first`` =
    selected-row number of the first row."""

    __slots__ = ("first", "ids", "labels", "groups", "splits", "xb")

    def __init__(self, first, ids, labels, groups, splits, xb):
        self.first, self.ids, self.labels, self.groups, self.splits, self.xb = first, ids, labels, groups, splits, xb

    def __len__(self) -> int:
        return int(self.xb.shape[0])

    def select(self, mask: np.ndarray) -> "Block":
        """The rows where `mask` is true (``first`` keeps the block's first row number)."""
        if mask.all():
            return self
        return Block(self.first, self.ids[mask], self.labels[mask], self.groups[mask], self.splits[mask],
                     self.xb[mask])


class EmbeddingsSource:
    """An embeddings set read by streaming, restricted to `split` (None = every row)."""

    def __init__(self, uri: str, split: Optional[str | Sequence[str]] = None, batch_rows: int = BATCH_ROWS):
        self.uri = str(uri)
        self.manifest = read_embeddings_manifest(self.uri)
        self.dim = int(self.manifest["dim"])
        self.entries = self.manifest["shards"]
        self.split = split
        self.wanted = None if split is None else ([split] if isinstance(split, str) else list(split))
        self.batch_rows = int(batch_rows)
        self._counts = None

    @property
    def label_names(self) -> list:
        return list(self.manifest.get("label_names", []))

    def shard_uri(self, i: int) -> str:
        return storage.resolve(self.uri, self.entries[i]["name"])

    def counts(self) -> np.ndarray:
        """Selected rows per shard: from the manifest (``split_rows`` per shard); for a set written without them,
        from each shard's split column."""
        if self._counts is None:
            if self.wanted is None:
                self._counts = np.array([int(e["num_rows"]) for e in self.entries], dtype=np.int64)
            elif all("split_rows" in e for e in self.entries):
                self._counts = np.array([sum(int(e["split_rows"].get(w, 0)) for w in self.wanted)
                                         for e in self.entries], dtype=np.int64)
            else:
                out = []
                for i in range(len(self.entries)):
                    with storage.open_input_file(self.shard_uri(i)) as f:
                        col = pq.read_table(f, columns=["split"]).column("split")
                    out.append(int(np.isin(np.asarray(col.to_pylist(), dtype=object), self.wanted).sum()))
                self._counts = np.array(out, dtype=np.int64)
        return self._counts

    @property
    def num_rows(self) -> int:
        return int(self.counts().sum())

    def blocks(self, start: int = 0, stop: Optional[int] = None) -> Iterator[Block]:
        """Selected rows ``[start, stop)`` in order, one row group batch at a time."""
        counts = self.counts()
        stop = int(counts.sum()) if stop is None else int(stop)
        starts = np.concatenate([[0], np.cumsum(counts)])
        for i in range(len(self.entries)):
            if starts[i + 1] <= start or starts[i] >= stop or counts[i] == 0:
                continue
            where = self.shard_uri(i)
            seen, raw = int(starts[i]), 0
            with storage.open_input_file(where) as f:
                pf = pq.ParquetFile(f)
                if pf.metadata.num_rows != int(self.entries[i]["num_rows"]):
                    raise DataError(f"{where}: {pf.metadata.num_rows} rows, manifest says {self.entries[i]['num_rows']}")
                for batch in pf.iter_batches(batch_size=self.batch_rows):
                    table = pa.Table.from_batches([batch])
                    ids, labels, groups, splits, xb = _table_to_arrays(table, self.dim, f"{where} (rows from {raw})")
                    raw += len(ids)
                    if self.wanted is not None:
                        keep = np.isin(splits, self.wanted)
                        ids, labels, groups, splits, xb = ids[keep], labels[keep], groups[keep], splits[keep], xb[keep]
                    a, b = max(start - seen, 0), min(stop - seen, len(ids))
                    first = seen
                    seen += len(ids)
                    if a < b:
                        yield Block(first + a, ids[a:b], labels[a:b], groups[a:b], splits[a:b], xb[a:b])
                    if seen >= stop:
                        return

    def iter_column(self, name: str, arrow: bool = False) -> Iterator[np.ndarray | pa.ChunkedArray]:
        """One scalar column over the selected rows, one shard at a time (reads that column and split only);
        numpy arrays, or Arrow arrays with ``arrow=True`` (compact strings)."""
        cols = [name] if self.wanted is None or name == "split" else [name, "split"]
        for i in range(len(self.entries)):
            with storage.open_input_file(self.shard_uri(i)) as f:
                t = pq.read_table(f, columns=cols)
            values = t.column(name)
            if self.wanted is not None:
                values = values.filter(pa.array(np.isin(np.asarray(t.column("split").to_pylist(), dtype=object),
                                                        self.wanted)))
            yield values if arrow else values.to_numpy(zero_copy_only=False)

    def column(self, name: str) -> np.ndarray:
        """One scalar column over the selected rows."""
        out = list(self.iter_column(name))
        return np.concatenate(out) if out else np.empty(0)

    def take(self, rows: np.ndarray) -> EmbeddingTable:
        """The selected rows at sorted positions `rows`, as an in-memory table (memory = those rows)."""
        rows = np.asarray(rows, dtype=np.int64)
        parts = []
        for block in self.blocks(int(rows[0]) if len(rows) else 0, int(rows[-1]) + 1 if len(rows) else 0):
            a, b = np.searchsorted(rows, [block.first, block.first + len(block)])
            if a < b:
                pick = rows[a:b] - block.first
                parts.append((block.ids[pick], block.labels[pick], block.groups[pick], block.splits[pick],
                              np.ascontiguousarray(block.xb[pick])))
        if parts:
            ids, labels, groups, splits, xb = (np.concatenate([p[j] for p in parts]) for j in range(5))
        else:
            ids, labels, groups, splits = (np.empty(0, dtype=o) for o in (object, np.int64, object, object))
            xb = np.empty((0, self.dim), np.float32)
        meta = {k: v for k, v in self.manifest.items() if k not in ("shards", "label_names")}
        meta["uri"] = self.uri
        return EmbeddingTable(ids, labels, groups, splits, xb, self.label_names, meta)

    def shard_rows(self, shards: range) -> tuple[int, int]:
        """Selected-row range covered by embeddings shards ``shards`` (a contiguous range)."""
        starts = np.concatenate([[0], np.cumsum(self.counts())])
        return int(starts[shards.start]), int(starts[shards.stop])


def normalise(x: np.ndarray, metric: str, where: str) -> np.ndarray:
    """L2-normalised for "ip" (in place when the block is writable); zero vectors are an error."""
    if metric == "ip" and len(x):
        if not x.flags.writeable:  # a zero-copy view of an Arrow buffer
            x = x.copy()
        zero = ~np.einsum("ij,ij->i", x, x).astype(bool)  # (np.linalg.norm takes 10x longer)
        if zero.any():
            raise DataError(f"{where}: {int(zero.sum())} zero vector(s) (row {int(np.argmax(zero))}) "
                            "cannot be normalised for inner-product search")
        faiss.normalize_L2(x)  # bit-identical to the in-RAM path (prepare_vectors)
    return x


def rows_not_in(src: EmbeddingsSource, rows: IdMap, chunk: int = ID_CHUNK) -> np.ndarray:
    """Boolean mask over the selected rows of `src`: True where the sample_id is not among `rows` (an index's id
    map). Ids are looked up `chunk` at a time (one pass over the id map per chunk), so memory is a chunk of ids
    plus one byte per row, never the vectors."""
    masks, pending, held = [], [], 0

    def flush():
        nonlocal pending, held
        if pending:
            masks.append(rows.find(np.concatenate(pending)) < 0)
        pending, held = [], 0

    for ids in src.iter_column("sample_id"):
        pending.append(ids)
        held += len(ids)
        if held >= chunk:
            flush()
    flush()
    return np.concatenate(masks) if masks else np.zeros(0, bool)


def first_occurrences(src: EmbeddingsSource, among: np.ndarray) -> np.ndarray:
    """Boolean mask over the selected rows of `src`: True at the first row of each sample_id among the rows where
    `among` is true. Memory: those rows' ids as Arrow strings (plus 4 bytes per row), never the vectors."""
    chunks, start = [], 0
    for ids in src.iter_column("sample_id", arrow=True):
        chunks += ids.filter(pa.array(among[start:start + len(ids)])).chunks
        start += len(ids)
    first = np.zeros(len(among), bool)
    if chunks:
        codes = pa.chunked_array(chunks, pa.string()).combine_chunks().dictionary_encode().indices
        _, at = np.unique(codes.to_numpy(zero_copy_only=False), return_index=True)
        first[np.flatnonzero(among)[at]] = True
    return first


# ------------------------------------------------------------------------------------------------ size checks


def suggest_ivf(n: int, d: int) -> str:
    nlist = 2 ** max(4, round(math.log2(4 * math.sqrt(max(n, 1)))))
    pq_m = next((m for m in (d // 8, d // 16, d // 4) if m and d % m == 0), None)
    return f"IVF{nlist},SQ8" + (f" (or IVF{nlist},PQ{pq_m} for 4x smaller lists)" if pq_m else "")


def is_ondisk_factory(d: int, factory: str, metric: str) -> bool:
    return _is_pure_ivf(new_index(d, factory, metric))


def check_fits_in_ram(factory: str, n: int, d: int, metric: str, max_in_ram: Optional[int]) -> None:
    if max_in_ram is None or n <= max_in_ram or is_ondisk_factory(d, factory, metric):
        return
    raise IndexError_(f"index {factory!r} keeps all {n} vectors in RAM, above index.max_in_ram_vectors={max_in_ram}; "
                      f"use an IVF index with on-disk lists, e.g. --factory {suggest_ivf(n, d)}")


# ------------------------------------------------------------------------------------------------ train / encode


def train_sample(src: EmbeddingsSource, sample: Optional[int], seed: int, metric: str) -> np.ndarray:
    """The seeded random sample of selected rows (all when `sample` is None or larger), normalised."""
    from .core import _sample_rows

    total = src.num_rows
    chosen = _sample_rows(total, sample, seed)
    xt = np.empty((len(chosen), src.dim), np.float32)
    filled = 0
    for block in src.blocks():
        a, b = np.searchsorted(chosen, [block.first, block.first + len(block)])
        if a < b:
            xt[filled:filled + b - a] = block.xb[chosen[a:b] - block.first]
            filled += b - a
    return normalise(xt[:filled], metric, "training sample")


class IdMapWriter:
    """Streams id-map rows to a Parquet file (fixed row groups, so readers can take rows group by group)."""

    def __init__(self, path: str):
        self.path = path
        self.writer = pq.ParquetWriter(path, IDMAP_SCHEMA)
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            self.writer.write_table(table.cast(IDMAP_SCHEMA), row_group_size=IDMAP_ROW_GROUP)
            self.rows += table.num_rows

    def write_block(self, block: Block) -> None:
        self.write(idmap_from_arrays(block.ids, block.labels, block.groups, block.splits))

    def copy_from(self, path: str, drop: Optional[np.ndarray] = None) -> None:
        """Append another id map's rows, without the rows at the sorted positions `drop`."""
        pf = pq.ParquetFile(path)
        start = 0
        for g in range(pf.num_row_groups):
            t = pf.read_row_group(g)
            if drop is not None and len(drop):
                a, b = np.searchsorted(drop, [start, start + t.num_rows])
                if a < b:
                    keep = np.ones(t.num_rows, bool)
                    keep[drop[a:b] - start] = False
                    t = t.filter(pa.array(keep))
            start += pf.metadata.row_group(g).num_rows
            self.write(t)

    def close(self) -> None:
        self.writer.close()


def encode_block(trained: faiss.Index, src: EmbeddingsSource, start: int, stop: int, metric: str,
                 id_offset: int, idmap: IdMapWriter,
                 keep: Optional[Callable[[Block], np.ndarray]] = None) -> faiss.Index:
    """IVF partial: a copy of the trained index holding selected rows [start, stop) with consecutive ids from
    `id_offset`; `keep(block)` (a boolean mask per streamed block) leaves rows out."""
    partial = faiss.clone_index(trained)
    partial.reset()
    t0 = time.perf_counter()
    for block in src.blocks(start, stop):
        if keep is not None:
            block = block.select(keep(block))
            if not len(block):
                continue
        x = normalise(block.xb, metric, f"{src.uri} rows {block.first}..")
        ids = np.arange(partial.ntotal, partial.ntotal + len(block), dtype=np.int64) + id_offset
        partial.add_with_ids(x, ids)
        idmap.write_block(block)
    logger.info("encoded rows %d..%d (%d vectors) in %.1f s", start, stop, partial.ntotal, time.perf_counter() - t0)
    return partial


def write_partial(partial: faiss.Index, path: str) -> None:
    """Write an IVF partial with an empty placeholder in place of its coarse quantizer.

    Every partial is a copy of the trained index, so each would otherwise carry the whole quantizer (nlist x d
    floats: 134 MB for IVF16384 at 2048-d) and a merge of P partials would load it P times; the merge takes only
    their lists and the trained index's quantizer (the manifest's ``quantizer_sha256`` ties them together)."""
    ivf = _ivf(partial) if _is_pure_ivf(partial) else None
    if ivf is None:
        faiss.write_index(partial, path)
        return
    quantizer = ivf.quantizer
    ivf.quantizer = faiss.IndexFlat(partial.d, partial.metric_type)
    try:
        faiss.write_index(partial, path)
    finally:
        placeholder, ivf.quantizer = ivf.quantizer, quantizer  # the placeholder is Python's, freed with `placeholder`
        del placeholder


def raw_block(src: EmbeddingsSource, start: int, stop: int, metric: str, d: int,
              idmap: IdMapWriter) -> faiss.Index:
    """Partial of an in-RAM index type: the raw (normalised) vectors in an IndexFlat, added in order at merge."""
    partial = faiss.IndexFlat(d, faiss_metric(metric))
    for block in src.blocks(start, stop):
        partial.add(normalise(block.xb, metric, f"{src.uri} rows {block.first}.."))
        idmap.write_block(block)
    return partial


# ------------------------------------------------------------------------------------------------ on-disk lists


def _detach_filename(index: faiss.Index) -> None:
    """Store only the list file's basename: readers find it beside the index file (IO_FLAG_ONDISK_SAME_DIR)."""
    invlists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    invlists.filename = IVFDATA_FILE


def merge_partials_ondisk(trained: faiss.Index, partial_paths: Sequence[str], ivfdata_path: str) -> faiss.Index:
    """One IVF over the partial files (in the given order; ids as stored) with its lists in `ivfdata_path`.

    The result is the index `faiss.contrib.ondisk.merge_ondisk` makes (the same list file, byte for byte), but
    written by `write_lists` with bounded resident memory: the partials are memory-mapped and read list by list."""
    t0 = time.perf_counter()
    partials = _read_partials(partial_paths)
    index = _with_lists(trained, write_lists([_ivf(p).invlists for p in partials], ivfdata_path))
    del partials
    logger.info("merged %d partials (%d vectors) into on-disk lists in %.1f s", len(partial_paths), index.ntotal,
                time.perf_counter() - t0)
    return index


def _ivf(index: faiss.Index):
    return faiss.extract_index_ivf(index)


def _read_partials(paths: Sequence[str]) -> list[faiss.Index]:
    """Partial files with their lists memory-mapped, not loaded."""
    with faiss_chatter_to_stderr():
        return [faiss.read_index(p, faiss.IO_FLAG_MMAP) for p in paths]


def append_lists(trained: faiss.Index, parent: faiss.Index, partial_paths: Sequence[str],
                 ivfdata_path: str) -> faiss.Index:
    """New on-disk IVF = the parent's lists followed by the partial files'; the parent's list file is only read."""
    partials = _read_partials(partial_paths)
    return _with_lists(trained, write_lists([_ivf(s).invlists for s in (parent, *partials)], ivfdata_path))


def remove_lists(trained: faiss.Index, parent: faiss.Index, drop: np.ndarray, ivfdata_path: str) -> faiss.Index:
    """New on-disk IVF without the ids `drop` (sorted); the remaining ids are renumbered to stay id-map rows."""
    def without_dropped(ids: np.ndarray, codes: np.ndarray):
        keep = ~np.isin(ids, drop)
        kept = ids[keep]
        return kept - np.searchsorted(drop, kept), codes[keep]

    return _with_lists(trained, write_lists([_ivf(parent).invlists], ivfdata_path, transform=without_dropped))


def write_lists(sources: Sequence, ivfdata_path: str, transform=None) -> "faiss.OnDiskInvertedLists":
    """Stream the concatenation of `sources`' inverted lists (list j = list j of every source, in order) into a
    list file in faiss's on-disk layout, and return the `OnDiskInvertedLists` describing it (not mapped).

    faiss's own merge (`OnDiskInvertedLists.merge_from_multiple`) writes through a shared mapping of the whole file,
    so the merging process ends up with every byte of the archive's lists resident; here the file is written with
    plain sequential writes and the sources' mapped pages are handed back every `RESIDENT_BYTES` read
    (`mapped.release`). Layout (faiss's): list j at ``offset_j`` holds its codes, then its ids at
    ``offset_j + capacity_j * code_size``; lists follow each other with capacity = size, as merge_from_multiple lays
    them out. `transform(ids, codes) -> (ids, codes)` may drop or renumber entries of a list.
    """
    first = faiss.downcast_InvertedLists(sources[0])
    nlist, code_size = int(first.nlist), int(first.code_size)
    for s in sources:
        if (int(s.nlist), int(s.code_size)) != (nlist, code_size):
            raise IndexError_(f"inverted lists differ: nlist/code_size {s.nlist}/{s.code_size} vs {nlist}/{code_size}"
                              " (partials of another trained index?)")
    mapped_sources = [m for m in (mapped.mapped_lists(s) for s in sources) if m is not None]
    layout = np.zeros((nlist, 2), dtype=np.int64)  # (size, offset) per list
    offset, unreleased = 0, 0
    with open(ivfdata_path, "wb") as f:
        for j in range(nlist):
            ids_parts, code_parts = [], []
            for s in sources:
                n = int(s.list_size(j))
                if n:
                    ids_ptr, codes_ptr = s.get_ids(j), s.get_codes(j)
                    ids_parts.append(faiss.rev_swig_ptr(ids_ptr, n).copy())
                    code_parts.append(faiss.rev_swig_ptr(codes_ptr, n * code_size).reshape(n, code_size).copy())
                    s.release_ids(j, ids_ptr)
                    s.release_codes(j, codes_ptr)
                    unreleased += n * (code_size + 8)
            if ids_parts:
                ids, codes = np.concatenate(ids_parts), np.concatenate(code_parts)
                if transform is not None:
                    ids, codes = transform(ids, codes)
                f.write(np.ascontiguousarray(codes, dtype=np.uint8).tobytes())
                f.write(np.ascontiguousarray(ids, dtype=np.int64).tobytes())
                layout[j] = (len(ids), offset)
                offset += len(ids) * (code_size + 8)
            else:
                layout[j, 1] = offset
            if unreleased >= mapped.RESIDENT_BYTES:
                for m in mapped_sources:
                    mapped.release(m)
                unreleased = 0
        f.flush()
        os.fsync(f.fileno())
    for m in mapped_sources:
        mapped.release(m)
    invlists = faiss.OnDiskInvertedLists(nlist, code_size, ivfdata_path)
    invlists.lists.clear()
    for size, off in layout.tolist():
        entry = faiss.OnDiskOneList()
        entry.size = entry.capacity = size
        entry.offset = off
        invlists.lists.push_back(entry)
    invlists.totsize = offset
    return invlists


def _with_lists(trained: faiss.Index, invlists) -> faiss.Index:
    """A copy of the trained (empty) index that owns `invlists`, its list file named by basename only."""
    index = faiss.clone_index(trained)
    index.reset()
    ivf = _ivf(index)
    ivf.replace_invlists(invlists, True)
    invlists.this.disown()
    index.ntotal = ivf.ntotal = int(faiss.downcast_InvertedLists(ivf.invlists).compute_ntotal())
    _detach_filename(index)
    return index


def block_ranges(start: int, stop: int, block_rows: int) -> list[tuple[int, int]]:
    block_rows = max(1, int(block_rows))
    return [(a, min(stop, a + block_rows)) for a in range(start, stop, block_rows)]


def remove_file(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
