"""Index outputs on storage: versioned bulk files, an ``index.json`` manifest written last, verified reads.

Layout of an index URI (a prefix)::

    index.json          manifest (written last): kind, version, parent, factory, metric, d, ntotal, nprobe, the
                        embeddings it holds, trained-quantizer digest and ``files`` {role: {path, size, sha256}}
    v<N>/index.faiss    the index (for an on-disk IVF: quantizer + list offsets only)
    v<N>/index.ivfdata  on-disk IVF only: the inverted lists (faiss OnDiskInvertedLists), memory-mapped by search
    v<N>/trained.faiss  IVF only: the empty trained index (coarse quantizer + codec), for appends
    v<N>/idmap.parquet  sample_id, label, group, split in faiss-id order (faiss id = row)

Writing into a prefix that already holds a version writes v<N+1> beside it and publishes by replacing index.json;
the old version's files are deleted only after that, so a writer killed at any moment leaves the previous manifest
describing the previous, intact files. Readers check every file's size and sha256 against the manifest before
loading it. A prefix written before versioning (files at the top, no ``files`` key) is still readable.

One writer per prefix: every writer holds the prefix's writer lease (`writer_lease`, `storage.lease`) from before
it reads what it builds on until it has published; a second writer waits ``storage.lease_wait_s`` or fails naming
the holder. `Staging` never deletes a version folder that a manifest of the prefix names (not when it starts, not
when it aborts) and publishes only while it still holds the lease and the manifest is the one it started from.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
from typing import Optional, Sequence

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import storage
from ..data.embeddings import EmbeddingTable
from ..errors import IndexError_, StorageError
from .params import set_search_params

logger = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
IVFDATA_FILE = "index.ivfdata"
TRAINED_FILE = "trained.faiss"
IDMAP_FILE = "idmap.parquet"
META_FILE = "index.json"
PARTIAL_META = "partial.json"  # manifest of a partial index (`lgff index add --trained`)
MANIFEST_NAMES = (META_FILE, PARTIAL_META)
MANIFEST_SCHEMA_VERSION = 2
IDMAP_ROW_GROUP = 65536


# ------------------------------------------------------------------------------------------------ id map


def idmap_table(table: EmbeddingTable) -> pa.Table:
    return idmap_from_arrays(table.ids, table.labels, table.groups, table.splits)


def idmap_from_arrays(ids, labels, groups, splits) -> pa.Table:
    return pa.table({
        "sample_id": pa.array(list(ids), pa.string()),
        "label": pa.array(np.asarray(labels).astype(np.int32), pa.int32()),
        "group": pa.array(list(groups), pa.string()),
        "split": pa.array(list(splits), pa.string()),
    })


class IdMap:
    """Database rows in faiss-id order, without holding the sample_id strings in RAM.

    Kept per row: ``labels`` (int64) and dictionary codes of ``group`` and ``split`` (int32, -1 = null).
    ``take(column, positions)`` and ``find(sample_ids)`` read the Parquet row group by row group, through file
    handles opened once here: a writer that publishes the next version and deletes this one's files does not break
    an id map that is already open (the deleted file stays readable through its handle), so a long-lived reader
    (the search service) answers from the version it loaded until it loads the next one.
    """

    def __init__(self, source: pa.Table | str):
        self._table = source if isinstance(source, pa.Table) else None
        self._path = None if isinstance(source, pa.Table) else str(source)
        self._lock = threading.Lock()  # one reader per Parquet handle at a time (concurrent searches)
        if self._path is not None:
            self._file = pq.ParquetFile(self._path)
            self._coded = pq.ParquetFile(self._path, read_dictionary=["group", "split"])
        cols = self._columns(["label", "split"])
        self.num_rows = len(cols["label"])
        # 4 + 1..4 bytes per database row; group codes only when a search excludes same-group rows
        self.labels = cols["label"].to_numpy().astype(np.int32, copy=False) if self.num_rows else np.empty(0, np.int32)
        self.split_codes, self.split_names = _codes(cols["split"])
        self._groups = None

    def _columns(self, names: list[str]) -> dict:
        if self._table is not None:
            return {c: self._table.column(c) for c in names}
        with self._lock:
            t = self._coded.read(columns=names)
        return {c: t.column(c) for c in names}

    @property
    def group_codes(self) -> np.ndarray:
        if self._groups is None:
            self._groups = _codes(self._columns(["group"])["group"])
        return self._groups[0]

    @property
    def group_names(self) -> list:
        self.group_codes
        return self._groups[1]

    def _row_groups(self):
        """(first row, table) per row group (one in-memory table = one group)."""
        if self._table is not None:
            yield 0, self._table
            return
        start = 0
        for g in range(self._file.num_row_groups):
            with self._lock:
                t = self._file.read_row_group(g, columns=["sample_id", "group", "split"])
            yield start, t
            start += t.num_rows

    def take(self, column: str, positions: np.ndarray) -> np.ndarray:
        """Values of `column` at `positions` (object array, same shape)."""
        pos = np.asarray(positions, dtype=np.int64).ravel()
        out = np.empty(len(pos), dtype=object)
        if self._table is not None:
            out[:] = self._table.column(column).take(pa.array(pos)).to_pylist() if len(pos) else []
            return out.reshape(np.shape(positions))
        order = np.argsort(pos, kind="stable")
        sorted_pos = pos[order]
        for start, t in self._row_groups():
            a, b = np.searchsorted(sorted_pos, [start, start + t.num_rows])
            if a < b:
                out[order[a:b]] = t.column(column).take(pa.array(sorted_pos[a:b] - start)).to_pylist()
        return out.reshape(np.shape(positions))

    def find(self, sample_ids: Sequence[str]) -> np.ndarray:
        """Database position of each sample_id (-1 when absent; first occurrence)."""
        wanted = pa.array(list(sample_ids), pa.string())
        out = np.full(len(wanted), -1, dtype=np.int64)
        for start, t in self._row_groups():
            hit = pc.index_in(wanted, value_set=t.column("sample_id").combine_chunks()).fill_null(-1).to_numpy()
            new = (hit >= 0) & (out < 0)
            out[new] = start + hit[new].astype(np.int64)
        return out

    def positions_of(self, sample_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(sorted database positions of every row whose sample_id is among `sample_ids`, and per given id whether
        any row holds it)."""
        wanted = pa.array(list(sample_ids), pa.string())
        held = np.zeros(len(wanted), dtype=bool)
        hits = [np.empty(0, np.int64)]
        for start, t in self._row_groups():
            col = t.column("sample_id").combine_chunks()
            hits.append(start + np.flatnonzero(pc.is_in(col, value_set=wanted).fill_null(False).to_numpy(
                zero_copy_only=False)))
            held |= pc.is_in(wanted, value_set=col).fill_null(False).to_numpy(zero_copy_only=False)
        return np.concatenate(hits).astype(np.int64), held

    def table(self) -> pa.Table:
        if self._table is not None:
            return self._table
        with self._lock:
            return self._file.read()

    @property
    def path(self) -> Optional[str]:
        return self._path

    def column(self, column: str) -> np.ndarray:
        """A whole column as an object array (small indexes and tests only)."""
        return self.take(column, np.arange(self.num_rows))


def _codes(col: pa.ChunkedArray) -> tuple[np.ndarray, list]:
    if col.num_chunks == 0 or len(col) == 0:
        return np.empty(0, np.int32), []
    if not pa.types.is_dictionary(col.type):
        col = pc.dictionary_encode(col)
    chunks = col.unify_dictionaries().chunks
    names = chunks[0].dictionary.to_pylist()
    dtype = np.int8 if len(names) < 127 else np.int32
    codes = np.concatenate([c.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(dtype) for c in chunks])
    return codes, names


def code_of(names: list, values: Sequence) -> np.ndarray:
    """Codes of `values` in a dictionary `names` (-2 = not present, never equal to a database code)."""
    lookup = {n: i for i, n in enumerate(names)}
    return np.array([lookup.get(v, -2) for v in values], dtype=np.int32)


class IndexBundle:
    """A loaded index with its id map (faiss id = id-map row) and manifest."""

    def __init__(self, index: faiss.Index, idmap: pa.Table | IdMap, meta: dict):
        self.rows = idmap if isinstance(idmap, IdMap) else IdMap(idmap)
        if self.rows.num_rows != index.ntotal:
            raise IndexError_(f"id map has {self.rows.num_rows} rows but the index holds {index.ntotal} vectors"
                              + (f" ({meta['uri']})" if meta.get("uri") else ""))
        self.index = index
        self.meta = meta
        self.labels = self.rows.labels

    @property
    def idmap(self) -> pa.Table:
        """The whole id map as a table (reads it all: small indexes, appends and removals of in-RAM indexes)."""
        return self.rows.table()

    @property
    def metric(self) -> str:
        return self.meta.get("metric", "ip")

    @property
    def ids(self) -> np.ndarray:
        return self.rows.column("sample_id")

    @property
    def groups(self) -> np.ndarray:
        return self.rows.column("group")

    @property
    def splits(self) -> np.ndarray:
        return self.rows.column("split")

    def split_mask(self, split: str | Sequence[str]) -> np.ndarray:
        wanted = [split] if isinstance(split, str) else list(split)
        codes = [i for i, n in enumerate(self.rows.split_names) if n in wanted]
        return np.isin(self.rows.split_codes, codes)


# ------------------------------------------------------------------------------------------------ manifest


def file_digest(path: str) -> dict:
    digest, size = storage.stream_sha256(path)
    return {"size": size, "sha256": digest}


def read_manifest(uri: str, what: str = "an index", name: str = META_FILE) -> dict:
    meta_uri = storage.join(uri, name)
    if not storage.exists(meta_uri):
        raise IndexError_(f"{uri}: no {name}; not {what} (or its build did not finish)")
    return storage.read_json(meta_uri, IndexError_)


_HELD_LEASES: dict[str, "storage.Lease"] = {}


@contextlib.contextmanager
def writer_lease(out_uri: str, owner: str):
    """The writer lease of an index output prefix, re-entrant within a process: a stage takes it before reading
    the version it builds on, and the `Staging` it opens (or `save_index`) reuses it."""
    key = str(out_uri).rstrip("/")
    if key in _HELD_LEASES:
        yield _HELD_LEASES[key]
        return
    with storage.lease(key, owner=owner) as held:
        _HELD_LEASES[key] = held
        try:
            yield held
        finally:
            del _HELD_LEASES[key]


def named_versions(out_uri: str) -> set[str]:
    """The version folders (``v<N>``) that a manifest of `out_uri` (index or partial) names."""
    named = set()
    for name in MANIFEST_NAMES:
        try:
            meta = read_manifest(out_uri, name=name)
        except IndexError_:
            continue
        for entry in (meta.get("files") or {}).values():
            head = str(entry.get("path", "")).split("/", 1)
            if len(head) == 2:
                named.add(head[0])
    return named


class Staging:
    """Where a new version's files are written before publication.

    Local outputs: the version directory itself (no copy of multi-GB lists); remote: a temporary directory whose
    files `publish` uploads. The version number is one above the published one, skipping any folder a manifest
    names. Holds the prefix's writer lease (`writer_lease`) from construction until publish / abort.
    """

    def __init__(self, out_uri: str, manifest_name: str = META_FILE, owner: str = "lgff index"):
        self.out_uri = str(out_uri)
        self.manifest_name = manifest_name
        self._lease_scope = contextlib.ExitStack()
        self.lease = self._lease_scope.enter_context(writer_lease(self.out_uri, owner))
        try:
            self._start()
        except BaseException:
            self._lease_scope.close()
            raise

    def _start(self) -> None:
        try:
            self.previous = read_manifest(self.out_uri, name=self.manifest_name)
        except IndexError_:
            self.previous = None
        named = named_versions(self.out_uri)
        self.version = int((self.previous or {}).get("version", 0) or 0) + 1
        while f"v{self.version}" in named:  # a manifest names it: never reuse (nor delete) that folder
            self.version += 1
        self.prefix = f"v{self.version}"
        self._tmp = None
        if storage.is_local(self.out_uri):
            self.dir = storage.local_path(storage.join(self.out_uri, self.prefix))
            if os.path.isdir(self.dir):  # left by a writer killed before it published: no manifest names it
                shutil.rmtree(self.dir)
            os.makedirs(self.dir)
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="lgff-index-")
            self.dir = self._tmp.name

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def publish(self, meta: dict, names: Sequence[str]) -> dict:
        """Upload (remote) and digest the files, then write index.json; then delete the previous version."""
        files = {}
        for name in names:
            rel = f"{self.prefix}/{name}"
            files[name] = {"path": rel, **file_digest(self.path(name))}
            if self._tmp is not None:
                storage.upload_file(self.path(name), storage.join(self.out_uri, rel))
        manifest = {**meta, "kind": meta.get("kind", "index"), "schema_version": MANIFEST_SCHEMA_VERSION,
                    "version": self.version, "files": files}
        self._check_still_ours()
        storage.write_text(storage.join(self.out_uri, self.manifest_name),
                           json.dumps(manifest, indent=2, sort_keys=True))
        self._remove_previous(files)
        if self._tmp is not None:
            self._tmp.cleanup()
        self._lease_scope.close()
        return manifest

    def _check_still_ours(self) -> None:
        """Publish only under the lease and over the manifest this writer started from."""
        self.lease.check()
        try:
            now = read_manifest(self.out_uri, name=self.manifest_name)
        except IndexError_:
            now = None
        if (now or {}).get("version") != (self.previous or {}).get("version"):
            raise IndexError_(f"{self.out_uri}: another writer published version {now.get('version') if now else '-'} "
                              "meanwhile; nothing published")

    def _remove_previous(self, files: dict) -> None:
        if self.previous is None:
            return
        keep = {f["path"] for f in files.values()}
        if "files" in self.previous:
            old = [f["path"] for f in self.previous["files"].values()]
        else:  # unversioned layout
            old = [INDEX_FILE, IDMAP_FILE, TRAINED_FILE, PARTIAL_META]
        for rel in old:
            if rel not in keep:
                storage.delete(storage.join(self.out_uri, rel))
        if "files" in self.previous and storage.is_local(self.out_uri):
            old_dir = storage.local_path(storage.join(self.out_uri, f"v{self.previous.get('version')}"))
            if os.path.isdir(old_dir) and not os.listdir(old_dir):
                os.rmdir(old_dir)

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:  # any exception (KeyboardInterrupt, SystemExit too) drops the unpublished files
            self.abort()

    def abort(self) -> None:
        """Drop the unpublished version (a killed writer's leftovers are removed by the next writer instead);
        a folder that a manifest names meanwhile is left alone."""
        try:
            if self._tmp is not None:
                self._tmp.cleanup()
            elif os.path.isdir(self.dir) and self.prefix not in named_versions(self.out_uri):
                shutil.rmtree(self.dir, ignore_errors=True)
        finally:
            self._lease_scope.close()


class LocalFiles:
    """Verified local copies of an index output's files (remote files are streamed to a temporary directory)."""

    def __init__(self, uri: str, manifest: dict, roles: Sequence[str]):
        self._tmp = None
        self.paths = {}
        files = manifest.get("files") or {}
        for role in roles:
            if role not in files:
                raise IndexError_(f"{uri}: {META_FILE} lists no {role}")
            entry = files[role]
            src = storage.join(uri, entry["path"])
            if not storage.exists(src):
                raise IndexError_(f"{src}: listed in {META_FILE} but missing")
            if storage.is_local(src):
                path = storage.local_path(src)
            else:
                if self._tmp is None:
                    self._tmp = tempfile.TemporaryDirectory(prefix="lgff-index-")
                path = os.path.join(self._tmp.name, os.path.basename(entry["path"]))
                storage.download_file(src, path)
            got = file_digest(path)
            if got["size"] != entry["size"] or got["sha256"] != entry["sha256"]:
                raise IndexError_(f"{src}: size {got['size']} / sha256 {got['sha256'][:12]}... differ from "
                                  f"{META_FILE} ({entry['size']} / {entry['sha256'][:12]}...); the file was changed "
                                  "or belongs to another version")
            self.paths[role] = path


@contextlib.contextmanager
def faiss_chatter_to_stderr():
    """faiss's on-disk lists printf progress ("resizing ...") to C stdout, which is the CLI's result channel:
    send file descriptor 1 to stderr meanwhile (C buffers flushed before it is restored)."""
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    libc.fflush(None)
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)


def read_faiss_file(path: str, ondisk: bool = False) -> faiss.Index:
    """Read an index file without loading on-disk lists (they are memory-mapped from beside the file)."""
    if ondisk:
        lists = os.path.join(os.path.dirname(path), IVFDATA_FILE)
        if os.path.exists(lists) and os.path.getsize(lists) == 0:
            # every vector removed: faiss cannot map an empty list file, and there is nothing in it to map
            index = faiss.read_index(path, faiss.IO_FLAG_SKIP_IVF_DATA)
            ivf = faiss.extract_index_ivf(index)
            empty = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
            ivf.replace_invlists(empty, True)
            empty.this.disown()
            return index
        with faiss_chatter_to_stderr():
            return faiss.read_index(path, faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
    return faiss.read_index(path)


def legacy_local_path(uri: str, name: str, tmp_holder: list) -> str:
    src = storage.join(uri, name)
    if not storage.exists(src):
        raise IndexError_(f"{src}: no such index file")
    if storage.is_local(src):
        return storage.local_path(src)
    tmp = tempfile.TemporaryDirectory(prefix="lgff-index-")
    tmp_holder.append(tmp)
    path = os.path.join(tmp.name, name)
    storage.download_file(src, path)
    return path


def save_index(index: faiss.Index, idmap: pa.Table, out_uri: str, meta: dict,
               trained: Optional[faiss.Index] = None) -> dict:
    """Publish an in-RAM index (Flat, HNSW, in-RAM IVF) as a new version of `out_uri`."""
    if idmap.num_rows != index.ntotal:
        raise IndexError_(f"id map has {idmap.num_rows} rows but the index holds {index.ntotal} vectors")
    with Staging(out_uri) as stage:
        faiss.write_index(index, stage.path(INDEX_FILE))
        pq.write_table(idmap, stage.path(IDMAP_FILE), row_group_size=IDMAP_ROW_GROUP)
        names = [INDEX_FILE, IDMAP_FILE]
        if trained is not None:
            faiss.write_index(trained, stage.path(TRAINED_FILE))
            names.append(TRAINED_FILE)
        meta = {**meta, "d": int(index.d), "ntotal": int(index.ntotal), "ondisk": False,
                "index_type": type(faiss.downcast_index(index)).__name__}
        if trained is not None:
            meta["quantizer_sha256"] = file_digest(stage.path(TRAINED_FILE))["sha256"]
        return stage.publish(meta, names)


LOAD_ATTEMPTS = 3


def load_index(uri: str) -> IndexBundle:
    """The published version of an index; on-disk inverted lists are memory-mapped, not read.

    A writer may publish the next version, and delete this one's files, while they are being opened: the load then
    starts over from the new manifest (up to `LOAD_ATTEMPTS` times), so a reader gets one whole version or an
    `IndexError_`, never a raw FileNotFoundError. Once loaded, the bundle reads only through handles it holds.
    """
    for attempt in range(LOAD_ATTEMPTS):
        meta = read_manifest(uri)
        try:
            return _load_version(uri, meta)
        except (IndexError_, StorageError, OSError, RuntimeError) as exc:
            if attempt + 1 < LOAD_ATTEMPTS and _republished(uri, meta):
                logger.info("%s: version %s was replaced while it was being loaded; loading the new one", uri,
                            meta.get("version"))
                continue
            if isinstance(exc, (IndexError_, StorageError)):
                raise
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise IndexError_(f"{uri}: cannot read version {meta.get('version')} ({reason})") from None
    raise AssertionError("unreachable")


def _republished(uri: str, meta: dict) -> bool:
    """True when the manifest at `uri` no longer describes the version `meta` describes."""
    try:
        now = read_manifest(uri)
    except IndexError_:
        return False
    return (now.get("version"), now.get("files")) != (meta.get("version"), meta.get("files"))


def _load_version(uri: str, meta: dict) -> IndexBundle:
    holder: list = []
    if "files" in meta:
        roles = [INDEX_FILE, IDMAP_FILE] + ([IVFDATA_FILE] if meta.get("ondisk") else [])
        local = LocalFiles(uri, meta, roles)
        index = read_faiss_file(local.paths[INDEX_FILE], ondisk=bool(meta.get("ondisk")))
        idmap = IdMap(local.paths[IDMAP_FILE])
        holder.append(local)
    else:
        index = read_faiss_file(legacy_local_path(uri, INDEX_FILE, holder))
        with storage.open_input_file(storage.join(uri, IDMAP_FILE)) as f:
            idmap = IdMap(pq.read_table(f))
    if meta.get("nprobe") is not None:
        set_search_params(index, nprobe=int(meta["nprobe"]))
    meta["uri"] = str(uri)
    bundle = IndexBundle(index, idmap, meta)
    bundle._keep = holder  # temporary local copies live as long as the bundle
    return bundle
