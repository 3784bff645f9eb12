"""Index stages behind `lgff index build|train|add|merge|search|remove` (and the kfp components that call them).

IVF factories (pure `IndexIVF*`) are built with their inverted lists on disk and never hold the archive in RAM:
build = sample-train, encode block by block into partial files, merge them into one list file; the sharded form
splits the same steps over tasks (`train` -> `add` per block -> `merge`). Other factories (Flat, HNSW, IVF with a
refine stage) are built in RAM and are refused above ``index.max_in_ram_vectors``. Appending embeddings to an index
or removing sample ids writes a new index (a new version with ``parent`` in its manifest); the parent is only read.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
from typing import Optional, Sequence

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import storage
from ..errors import DataError, IndexError_
from .core import (_is_pure_ivf, build_index, merge_shards, prepare_vectors, search_neighbours_batched, train_index)
from .ondisk import (EmbeddingsSource, IdMapWriter, append_lists, block_ranges, check_fits_in_ram, encode_block,
                     is_ondisk_factory, merge_partials_ondisk, raw_block, remove_file, remove_lists, write_partial,
                     rows_not_in, first_occurrences)
from .ondisk import train_sample as sample_for_training
from .store import (IDMAP_FILE, INDEX_FILE, IVFDATA_FILE, META_FILE, PARTIAL_META, TRAINED_FILE, IdMap, LocalFiles,
                    Staging, file_digest, idmap_table, load_index, read_faiss_file, read_manifest, save_index,
                    legacy_local_path, writer_lease)

logger = logging.getLogger(__name__)

DEFAULT_BLOCK_ROWS = 250_000


def _writes_out(action: str):
    """Run the stage under the writer lease of its ``out_uri`` (taken before it reads anything it builds on)."""
    def wrap(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def leased(*args, **kwargs):
            out_uri = signature.bind(*args, **kwargs).arguments["out_uri"]
            with writer_lease(out_uri, f"lgff index {action}"):
                return fn(*args, **kwargs)
        return leased
    return wrap


def shard_range(num_items: int, index: int, count: int) -> range:
    """Contiguous block `index` of `count` over `num_items` (faiss contrib (nsplit, rank) convention)."""
    if count < 1 or not 0 <= index < count:
        raise IndexError_(f"shard {index}/{count}: need 0 <= I < N")
    return range(num_items * index // count, num_items * (index + 1) // count)


def _source_meta(src: EmbeddingsSource, factory: str, metric: str, nprobe: Optional[int]) -> dict:
    return {"factory": factory, "metric": metric, "embeddings": src.uri, "split": src.split, "nprobe": nprobe,
            "label_names": src.label_names, "model": src.manifest.get("model"),
            "model_fingerprint": src.manifest.get("model_fingerprint"), "source": src.manifest.get("source"),
            "holds": [{"embeddings": src.uri, "split": src.split, "rows": src.num_rows}], "parent": None}


def _nonempty(src: EmbeddingsSource, what: str = "embeddings") -> int:
    n = src.num_rows
    if n == 0:
        raise IndexError_(f"{src.uri}: no {what}" + (f" in split {src.split!r}" if src.split else ""))
    return n


def _publish_ondisk(stage: Staging, index: faiss.Index, trained: faiss.Index, meta: dict) -> dict:
    faiss.write_index(index, stage.path(INDEX_FILE))
    faiss.write_index(trained, stage.path(TRAINED_FILE))
    meta = {**meta, "kind": "index", "d": int(index.d), "ntotal": int(index.ntotal), "ondisk": True,
            "index_type": type(faiss.downcast_index(index)).__name__,
            "quantizer_sha256": file_digest(stage.path(TRAINED_FILE))["sha256"]}
    return stage.publish(meta, [INDEX_FILE, IVFDATA_FILE, TRAINED_FILE, IDMAP_FILE])


def _encode_to_files(stage: Staging, trained: faiss.Index, src: EmbeddingsSource, metric: str, id_offset: int,
                     idmap: IdMapWriter, block_rows: int, keep: Optional[np.ndarray] = None) -> list[str]:
    """Encode every selected row of `src` (where the mask `keep` is true) block by block into partial files in the
    staging directory; ids are consecutive from `id_offset` over the encoded rows."""
    paths = []
    select = None if keep is None else (lambda block: keep[block.first:block.first + len(block)])
    for a, b in block_ranges(0, src.num_rows, block_rows):
        if keep is not None and not keep[a:b].any():
            continue
        partial = encode_block(trained, src, a, b, metric, id_offset, idmap, select)
        id_offset += int(partial.ntotal)
        paths.append(stage.path(f"part-{len(paths):05d}.faiss"))
        write_partial(partial, paths[-1])
        del partial
    return paths


@_writes_out("build")
def build_from_embeddings(embeddings_uri: str, out_uri: str, factory: str = "Flat", metric: str = "ip",
                          split: Optional[str | Sequence[str]] = None, train_sample: Optional[int] = None,
                          seed: int = 0, *, nprobe: Optional[int] = None, max_in_ram: Optional[int] = None,
                          block_rows: int = DEFAULT_BLOCK_ROWS) -> dict:
    """`lgff index build`: one index over (the `split` rows of) an embeddings set, in one process."""
    src = EmbeddingsSource(embeddings_uri, split)
    n = _nonempty(src)
    check_fits_in_ram(factory, n, src.dim, metric, max_in_ram)
    meta = _source_meta(src, factory, metric, nprobe)
    if not is_ondisk_factory(src.dim, factory, metric):
        from ..data.embeddings import read_embeddings

        emb = read_embeddings(embeddings_uri, split=split)
        index = build_index(emb.xb, factory, metric, train_sample, seed)
        return save_index(index, idmap_table(emb), out_uri, meta)
    trained = train_index(sample_for_training(src, train_sample, seed, metric), factory, metric, seed)
    with Staging(out_uri) as stage:
        idmap = IdMapWriter(stage.path(IDMAP_FILE))
        parts = _encode_to_files(stage, trained, src, metric, 0, idmap, block_rows)
        idmap.close()
        index = merge_partials_ondisk(trained, parts, stage.path(IVFDATA_FILE))
        for path in parts:
            remove_file(path)
        return _publish_ondisk(stage, index, trained, meta)


@_writes_out("train")
def train_from_embeddings(embeddings_uri: str, out_uri: str, factory: str, metric: str = "ip",
                          split: Optional[str | Sequence[str]] = None, train_sample: Optional[int] = 100000,
                          seed: int = 0, *, nprobe: Optional[int] = None, max_in_ram: Optional[int] = None) -> dict:
    """`lgff index train`: the empty trained index (quantizers) on a streamed sample, for sharded adds."""
    src = EmbeddingsSource(embeddings_uri, split)
    n = _nonempty(src, "embeddings to train on")
    check_fits_in_ram(factory, n, src.dim, metric, max_in_ram)
    xt = sample_for_training(src, train_sample, seed, metric)
    index = train_index(xt, factory, metric, seed)
    with Staging(out_uri) as stage:
        faiss.write_index(index, stage.path(TRAINED_FILE))
        meta = {**_source_meta(src, factory, metric, nprobe), "kind": "trained-index", "d": int(index.d),
                "trained_on": len(xt), "rows": n,
                "quantizer_sha256": file_digest(stage.path(TRAINED_FILE))["sha256"]}
        return stage.publish(meta, [TRAINED_FILE])


def _load_trained(trained_uri: str) -> tuple[faiss.Index, dict, list]:
    meta = read_manifest(trained_uri, "a trained index; run `lgff index train` first")
    keep: list = []
    if "files" in meta:
        local = LocalFiles(trained_uri, meta, [TRAINED_FILE])
        keep.append(local)
        path = local.paths[TRAINED_FILE]
    else:
        path = legacy_local_path(trained_uri, TRAINED_FILE, keep)
    return faiss.read_index(path), meta, keep


@_writes_out("add")
def add_from_embeddings(trained_uri: str, embeddings_uri: str, out_uri: str, shard: Optional[tuple[int, int]] = None,
                        split: Optional[str | Sequence[str]] = None, *, rows: Optional[tuple[int, int]] = None) -> dict:
    """`lgff index add --shard I/N` (embeddings shards block I of N) or `--rows A:B` (selected rows [A, B)):
    a partial index of that block (IVF codes with global ids, or raw vectors for in-RAM index types)."""
    trained, tmeta, _keep = _load_trained(trained_uri)
    src = EmbeddingsSource(embeddings_uri, split if split is not None else tmeta.get("split"))
    if (shard is None) == (rows is None):
        raise IndexError_("add needs exactly one of a shard block (I/N) or a row range (A:B)")
    if shard is not None:
        a, b = src.shard_rows(shard_range(len(src.entries), *shard))
    else:
        a, b = max(0, int(rows[0])), min(src.num_rows, int(rows[1]))
        if a > b:
            raise IndexError_(f"rows {rows[0]}:{rows[1]} are outside the {src.num_rows} selected rows")
    with Staging(out_uri, PARTIAL_META) as stage:
        idmap = IdMapWriter(stage.path(IDMAP_FILE))
        if _is_pure_ivf(trained):
            partial = encode_block(trained, src, a, b, tmeta["metric"], a, idmap)
        else:
            partial = raw_block(src, a, b, tmeta["metric"], trained.d, idmap)
        idmap.close()
        write_partial(partial, stage.path(INDEX_FILE))
        meta = {"kind": "partial-index", "shard": list(shard) if shard else None, "rows": [a, b], "id_offset": a,
                "ntotal": int(partial.ntotal), "trained": str(trained_uri), "embeddings": str(embeddings_uri),
                "quantizer_sha256": tmeta.get("quantizer_sha256")}
        return stage.publish(meta, [INDEX_FILE, IDMAP_FILE])


@_writes_out("merge")
def merge_partials(trained_uri: str, partial_uris: Sequence[str], out_uri: str, *,
                   max_in_ram: Optional[int] = None) -> dict:
    """`lgff index merge`: the partials (any order on input; merged in row order) -> the final index."""
    trained, tmeta, _keep = _load_trained(trained_uri)
    loaded = []
    for uri in partial_uris:
        if not storage.exists(storage.join(uri, PARTIAL_META)):
            raise IndexError_(f"{uri}: no {PARTIAL_META}; that `lgff index add` did not finish")
        loaded.append((read_manifest(uri, name=PARTIAL_META), uri))
    if not loaded:
        raise IndexError_("no partial indexes to merge")
    loaded.sort(key=lambda mu: mu[0]["rows"][0])
    covered = [tuple(m["rows"]) for m, _ in loaded]
    total = tmeta.get("rows")
    contiguous = covered[0][0] == 0 and all(p[1] == q[0] for p, q in zip(covered, covered[1:]))
    if not contiguous or (total is not None and covered[-1][1] != total):
        raise IndexError_(f"partials cover rows {covered}; need contiguous blocks covering 0..{total}, each once")
    for m, uri in loaded:
        if m.get("quantizer_sha256") != tmeta.get("quantizer_sha256"):
            raise IndexError_(f"{uri}: encoded with another trained index than {trained_uri}")
    meta = {k: v for k, v in tmeta.items() if k not in ("d", "trained_on", "rows", "kind", "files", "version",
                                                       "schema_version", "quantizer_sha256")}
    meta["merged_from"] = len(loaded)
    files = [LocalFiles(uri, m, [INDEX_FILE, IDMAP_FILE]) for m, uri in loaded]
    n = sum(int(m["ntotal"]) for m, _ in loaded)
    if not _is_pure_ivf(trained):
        check_fits_in_ram(tmeta["factory"], n, trained.d, tmeta["metric"], max_in_ram)
        index = merge_shards(trained, [faiss.read_index(f.paths[INDEX_FILE]) for f in files])
        idmap = pa.concat_tables([pq.read_table(f.paths[IDMAP_FILE]) for f in files])
        return save_index(index, idmap, out_uri, meta)
    with Staging(out_uri) as stage:
        index = merge_partials_ondisk(trained, [f.paths[INDEX_FILE] for f in files], stage.path(IVFDATA_FILE))
        idmap = IdMapWriter(stage.path(IDMAP_FILE))
        for f in files:
            idmap.copy_from(f.paths[IDMAP_FILE])
        idmap.close()
        return _publish_ondisk(stage, index, trained, meta)


def _parent_info(uri: str) -> dict:
    raw = storage.read_bytes(storage.join(uri, META_FILE))
    meta = json.loads(raw)
    return {"uri": str(uri), "version": meta.get("version"), "manifest_sha256": hashlib.sha256(raw).hexdigest()}


def _child_meta(pmeta: dict, parent_uri: str) -> dict:
    drop = ("files", "version", "schema_version", "ntotal", "uri", "merged_from")
    return {**{k: v for k, v in pmeta.items() if k not in drop}, "parent": _parent_info(parent_uri),
            "holds": list(pmeta.get("holds") or [{"embeddings": pmeta.get("embeddings"), "split": pmeta.get("split"),
                                                  "rows": pmeta.get("ntotal")}])}



def _check_appendable(pmeta: dict, index_uri: str, src: EmbeddingsSource) -> list:
    """Refuse embeddings that would mix unrelated data into the index; returns the child's label names."""
    where = f"{src.uri}: cannot append to {index_uri}:"
    if src.dim != int(pmeta["d"]):
        raise DataError(f"{where} dimension {src.dim}, the index has {pmeta['d']}")
    if src.manifest.get("metric") not in (None, pmeta.get("metric", "ip")):
        raise DataError(f"{where} embeddings for metric {src.manifest['metric']!r}, the index uses "
                        f"{pmeta.get('metric', 'ip')!r}")
    for key, what in (("model_fingerprint", "model fingerprint"), ("model", "model")):
        ours, theirs = pmeta.get(key), src.manifest.get(key)
        if ours and theirs:
            if ours != theirs:
                raise DataError(f"{where} embedded with another model ({what} {str(theirs)[:16]}, the index's is "
                                f"{str(ours)[:16]}); re-embed NEW with the index's model or build a new index")
            break
    old, new = list(pmeta.get("label_names") or []), src.label_names
    for label, (a, b) in enumerate(zip(old, new)):
        if a != b:
            raise DataError(f"{where} label {label} is {b!r} in the embeddings but {a!r} in the index (label ids "
                            "must name the same classes)")
    return new if len(new) > len(old) else old


def _new_rows(src: EmbeddingsSource, rows: IdMap, skip_existing: bool,
              index_uri: str) -> tuple[Optional[np.ndarray], int, int]:
    """(keep-mask over the selected rows of `src` or None = all, rows already in the index, repeated ids in
    `src`). Without `skip_existing` either kind of row is an error: an index holds each sample_id once."""
    not_held = rows_not_in(src, rows)
    if not skip_existing and not not_held.all():
        first = src.column("sample_id")[int(np.flatnonzero(~not_held)[0])]
        raise DataError(f"{src.uri}: {int((~not_held).sum())} sample id(s) are already in {index_uri}, e.g. "
                        f"{first!r}; --skip-existing appends only the new rows")
    first_seen = first_occurrences(src, not_held)
    repeated = not_held & ~first_seen
    if not skip_existing and repeated.any():
        sid = src.column("sample_id")[int(np.flatnonzero(repeated)[0])]
        raise DataError(f"{src.uri}: sample id {sid!r} appears more than once ({int(repeated.sum())} repeated "
                        "row(s)); --skip-existing appends the first of each")
    keep = not_held & first_seen
    return (None if keep.all() else keep), int((~not_held).sum()), int(repeated.sum())


@_writes_out("add --to")
def append_to_index(index_uri: str, embeddings_uri: str, out_uri: str, split: Optional[str | Sequence[str]] = None,
                    *, skip_existing: bool = False, block_rows: int = DEFAULT_BLOCK_ROWS,
                    max_in_ram: Optional[int] = None) -> dict:
    """`lgff index add --to INDEX --embeddings NEW --out NEWINDEX [--skip-existing]`: NEW's rows appended with the
    parent's trained quantizer (ids continue after the parent's); NEWINDEX is a new version naming its parent.

    `skip_existing` leaves out the rows whose sample_id the parent already holds, and repeats of a sample_id
    within NEW after its first row, so appending a grown embeddings set (the parent's rows + new ones) appends only
    the new rows and a rerun is idempotent; without it such rows are an error. When no row is new, NEWINDEX is
    still written: a new version holding exactly the parent's rows (its ``holds`` entry says 0 rows), so a caller
    always gets an index at NEWINDEX and the parent is never referenced as someone else's output.

    NEW must be comparable with the parent: same dimension and metric, the same label ids for the same class names
    (NEW may add classes after the parent's), and the same model (fingerprint, else name, when both record one)."""
    pmeta = read_manifest(index_uri)
    src = EmbeddingsSource(embeddings_uri, split)
    n_rows = _nonempty(src)
    label_names = _check_appendable(pmeta, index_uri, src)
    meta = {**_child_meta(pmeta, index_uri), "label_names": label_names}
    metric = pmeta.get("metric", "ip")
    ondisk = bool(pmeta.get("ondisk"))
    if ondisk:
        local = LocalFiles(index_uri, pmeta, [INDEX_FILE, IVFDATA_FILE, TRAINED_FILE, IDMAP_FILE])
        rows = IdMap(local.paths[IDMAP_FILE])
    else:
        bundle = load_index(index_uri)
        rows = bundle.rows
    keep, n_held, n_repeated = _new_rows(src, rows, skip_existing, index_uri)
    n_new = n_rows if keep is None else int(keep.sum())
    meta["holds"].append({"embeddings": src.uri, "split": src.split, "rows": n_new,
                          **({"skipped": n_held} if skip_existing else {}),
                          **({"repeated": n_repeated} if n_repeated else {})})
    logger.info("%s: appending %d of %d rows to %s (%d skipped: already there, %d repeated ids)", embeddings_uri,
                n_new, n_rows, index_uri, n_held, n_repeated)
    if not ondisk:
        from ..data.embeddings import read_embeddings

        check_fits_in_ram(pmeta["factory"], int(pmeta["ntotal"]) + n_new, src.dim, metric, max_in_ram)
        emb = read_embeddings(embeddings_uri, split=split)
        if keep is not None:
            emb = emb.subset(keep)
        index = faiss.clone_index(bundle.index)
        if len(emb):
            index.add(prepare_vectors(emb.xb, metric, index.d, where=str(embeddings_uri)))
        new_rows = idmap_table(emb)
        return save_index(index, pa.concat_tables([bundle.idmap.cast(new_rows.schema), new_rows]), out_uri, meta)
    parent = read_faiss_file(local.paths[INDEX_FILE], ondisk=True)
    trained = faiss.read_index(local.paths[TRAINED_FILE])
    with Staging(out_uri) as stage:
        idmap = IdMapWriter(stage.path(IDMAP_FILE))
        idmap.copy_from(local.paths[IDMAP_FILE])
        parts = _encode_to_files(stage, trained, src, metric, int(parent.ntotal), idmap, block_rows, keep)
        idmap.close()
        index = append_lists(trained, parent, parts, stage.path(IVFDATA_FILE))
        for path in parts:
            remove_file(path)
        return _publish_ondisk(stage, index, trained, meta)


def read_id_list(uri: str) -> list[str]:
    """Sample ids to remove: a Parquet file with a sample_id column, or text with one id per line."""
    if not storage.exists(uri):
        raise DataError(f"{uri}: no such ids file")
    if uri.endswith(".parquet"):
        try:
            with storage.open_input_file(uri) as f:
                table = pq.read_table(f)
        except pa.ArrowException as exc:
            raise DataError(f"{uri}: not a readable Parquet file ({str(exc).strip().splitlines()[0]})") from None
        if "sample_id" not in table.column_names:
            raise DataError(f"{uri}: no sample_id column (has {table.column_names})")
        return [str(v) for v in table.column("sample_id").to_pylist()]
    try:
        text = storage.read_text(uri)
    except UnicodeDecodeError:
        raise DataError(f"{uri}: not UTF-8 text with one sample_id per line (a Parquet file needs the .parquet "
                        "suffix)") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


@_writes_out("remove")
def remove_from_index(index_uri: str, ids_uri: str, out_uri: str) -> dict:
    """`lgff index remove --index INDEX --ids FILE --out NEWINDEX`: NEWINDEX without those sample ids."""
    pmeta = read_manifest(index_uri)
    ids = read_id_list(ids_uri)
    bundle = load_index(index_uri)
    drop, held = bundle.rows.positions_of(ids)  # every row of each id (an index may hold an id twice)
    if not held.all():
        first = ids[int(np.flatnonzero(~held)[0])]
        raise DataError(f"{ids_uri}: {int((~held).sum())} sample id(s) are not in {index_uri}, e.g. {first!r}")
    meta = {**_child_meta(pmeta, index_uri), "removed": int(len(drop)), "removed_ids": str(ids_uri)}
    if not pmeta.get("ondisk"):
        index = faiss.clone_index(bundle.index)
        try:
            index.remove_ids(faiss.IDSelectorBatch(drop.astype(np.int64)))
        except RuntimeError as exc:
            raise IndexError_(f"{index_uri}: {pmeta.get('factory')} cannot remove vectors "
                              f"({str(exc).strip().splitlines()[-1]}); rebuild without those ids") from None
        table = bundle.idmap
        keep = np.ones(table.num_rows, bool)
        keep[drop] = False
        return save_index(index, table.filter(pa.array(keep)), out_uri, meta)
    local = LocalFiles(index_uri, pmeta, [TRAINED_FILE])
    trained = faiss.read_index(local.paths[TRAINED_FILE])
    with Staging(out_uri) as stage:
        index = remove_lists(trained, bundle.index, drop, stage.path(IVFDATA_FILE))
        idmap = IdMapWriter(stage.path(IDMAP_FILE))
        idmap.copy_from(bundle.rows.path, drop)
        idmap.close()
        return _publish_ondisk(stage, index, trained, meta)


def search_to_parquet(index_uri: str, queries_uri: str, out_uri: str, k: Optional[int], *,
                      query_split: Optional[str] = None, exclude_self: bool = False,
                      exclude_same_group: bool = False, nprobe: Optional[int] = None,
                      ef_search: Optional[int] = None, query_batch: int = 1024) -> dict:
    """`lgff index search`: neighbours Parquet for the queries (the `query_split` rows of an embeddings set)."""
    from .core import write_neighbours

    bundle = load_index(index_uri)
    source = EmbeddingsSource(queries_uri, query_split)  # streamed: only the query rows are kept
    queries = source.take(np.arange(source.num_rows))
    if len(queries) == 0:
        raise DataError(f"{queries_uri}: no queries" + (f" in split {query_split!r}" if query_split else ""))
    table = search_neighbours_batched(bundle, queries, k, query_batch, exclude_self=exclude_self,
                                      exclude_same_group=exclude_same_group, nprobe=nprobe, ef_search=ef_search)
    meta = json.loads(table.schema.metadata[b"lgff"])
    meta["query_split"] = query_split
    table = table.replace_schema_metadata({"lgff": json.dumps(meta)})
    write_neighbours(table, out_uri)
    return {"n_queries": table.num_rows, **meta}


__all__ = ["PARTIAL_META", "shard_range", "build_from_embeddings", "train_from_embeddings", "add_from_embeddings",
           "merge_partials", "append_to_index", "remove_from_index", "read_id_list", "search_to_parquet"]
