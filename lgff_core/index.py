"""faiss index: build / train / add / merge / search, with the id map stored beside the index.

Plain functions over float32 numpy with faiss's names: ``xb`` (nb, d) database, ``xq`` (nq, d) queries,
``xt`` training sample, ``k`` neighbours, ``D`` (nq, k) scores, ``I`` (nq, k) database positions, ``metric``
("ip" = inner product on L2-normalised vectors, i.e. cosine, the paper's setting; or "l2").

Any `faiss.index_factory` string works ("Flat", "HNSW32", "IVF256,Flat", "IVF4096,PQ64", "IVF1024,PQ64x4fs,RFlat").
Database position p (0-based row of the id map) is the faiss id of a vector, for one-shot and sharded builds alike.

Sharded build for large archives (faiss contrib/ondisk style): `train_index` on a sample once; `add_shard` for each
contiguous block of embeddings shards independently (each a partial index with local ids 0..n_i-1); `merge_shards`
concatenates the partials in shard order. Pure IVF indexes merge their inverted lists (`IndexIVF.merge_from` with the
id offset); any other index type (Flat, HNSW, refine wrappers, ...) keeps the raw vectors in the partial (an IndexFlat)
and the merge adds their concatenation, in shard order, to the trained index in one call (so an HNSW graph is
built exactly as in a one-shot build; this needs the whole database in memory, as those index types do anyway). Either way the result searches like a one-shot build.

Ranking and ties: results are ordered by score (descending for "ip", ascending distance for "l2"), ties broken by
database position ascending. To make that exact at the k-th place, a search that finds the score at the last
returned place equal to the k-th kept score widens the search (doubling, up to the whole database).

On-storage layout of an index URI (a prefix): ``index.faiss``, ``idmap.parquet`` (sample_id, label, group, split,
in database order), ``index.json`` (factory, metric, d, ntotal, label_names, source embeddings) written last.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from typing import Optional, Sequence

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import storage
from .embeddings import EmbeddingTable, check_vectors
from .errors import DataError, IndexError_

logger = logging.getLogger(__name__)

__all__ = [
    "INDEX_FILE",
    "IDMAP_FILE",
    "META_FILE",
    "faiss_metric",
    "prepare_vectors",
    "new_index",
    "train_index",
    "build_index",
    "add_shard",
    "merge_shards",
    "set_search_params",
    "search",
    "IndexBundle",
    "idmap_table",
    "save_index",
    "load_index",
    "search_neighbours",
    "write_neighbours",
    "read_neighbours",
]

INDEX_FILE = "index.faiss"
IDMAP_FILE = "idmap.parquet"
META_FILE = "index.json"


def faiss_metric(metric: str) -> int:
    try:
        return {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}[metric]
    except KeyError:
        raise IndexError_(f"metric {metric!r} is not one of ip, l2") from None


def prepare_vectors(x: np.ndarray, metric: str, d: Optional[int] = None, where: str = "vectors") -> np.ndarray:
    """Checked float32 copy; L2-normalised for "ip" (so inner product = cosine). Zero vectors are an error."""
    x = check_vectors(x, d, where).copy()
    if metric == "ip" and len(x):
        norms = np.linalg.norm(x, axis=1)
        if (norms == 0).any():
            raise DataError(f"{where}: {int((norms == 0).sum())} zero vector(s) (row {int(np.argmin(norms))}) "
                            "cannot be normalised for inner-product search")
        faiss.normalize_L2(x)
    return x


def new_index(d: int, factory: str, metric: str = "ip") -> faiss.Index:
    try:
        return faiss.index_factory(int(d), factory, faiss_metric(metric))
    except RuntimeError as exc:
        raise IndexError_(f"faiss cannot build index_factory({d}, {factory!r}): {str(exc).strip().splitlines()[-1]}") from None


def _sample_rows(n: int, sample: Optional[int], seed: int) -> np.ndarray:
    if sample is None or sample >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=sample, replace=False))


def train_index(xt: np.ndarray, factory: str, metric: str = "ip", seed: int = 0) -> faiss.Index:
    """An empty, trained index (`xt` already prepared with `prepare_vectors`)."""
    index = new_index(xt.shape[1], factory, metric)
    if not index.is_trained:
        _seed_clustering(index, seed)
        t0 = time.perf_counter()
        try:
            index.train(xt)
        except RuntimeError as exc:
            raise IndexError_(f"training {factory!r} on {len(xt)} vectors failed: "
                              f"{str(exc).strip().splitlines()[-1]}") from None
        logger.info("trained %s on %d vectors in %.1f s", factory, len(xt), time.perf_counter() - t0)
    return index


def _seed_clustering(index: faiss.Index, seed: int) -> None:
    """Fix the k-means seed of an IVF coarse quantizer (faiss defaults to a fixed seed too; this makes it ours)."""
    try:
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.seed = int(seed) + 1234
    except (RuntimeError, AttributeError):
        pass


def build_index(xb: np.ndarray, factory: str = "Flat", metric: str = "ip", train_sample: Optional[int] = None,
                seed: int = 0) -> faiss.Index:
    """One-shot build: train on (a sample of) `xb`, then add all of it; ids = row positions."""
    xb = prepare_vectors(xb, metric, where="database")
    if len(xb) == 0:
        raise IndexError_("cannot build an index over an empty database")
    index = train_index(xb[_sample_rows(len(xb), train_sample, seed)], factory, metric, seed)
    t0 = time.perf_counter()
    index.add(xb)
    logger.info("added %d vectors to %s in %.1f s", len(xb), factory, time.perf_counter() - t0)
    return index


def _is_pure_ivf(index: faiss.Index) -> bool:
    return isinstance(faiss.downcast_index(index), faiss.IndexIVF)


def add_shard(trained: faiss.Index, xb: np.ndarray, metric: str = "ip") -> faiss.Index:
    """Partial index for one block of the database (local ids 0..n-1); `trained` is not modified."""
    xb = prepare_vectors(xb, metric, trained.d, where="shard")
    if _is_pure_ivf(trained):
        partial = faiss.clone_index(trained)
        partial.reset()
    else:
        partial = faiss.IndexFlat(trained.d, trained.metric_type)  # raw vectors; added sequentially at merge
    partial.add(xb)
    return partial


def merge_shards(trained: faiss.Index, partials: Sequence[faiss.Index]) -> faiss.Index:
    """Concatenate partial indexes (in the given order) into one index equivalent to a one-shot build."""
    merged = faiss.clone_index(trained)
    merged.reset()
    ivf = _is_pure_ivf(trained)
    blocks = []
    for i, part in enumerate(partials):
        if part.d != trained.d:
            raise IndexError_(f"partial {i} has dimension {part.d}, the trained index {trained.d}")
        if ivf:
            part = faiss.downcast_index(part)
            if not isinstance(part, faiss.IndexIVF):
                raise IndexError_(f"partial {i} is {type(part).__name__}, expected an IVF partial")
            try:
                faiss.downcast_index(merged).merge_from(part, merged.ntotal)
            except RuntimeError as exc:
                raise IndexError_(f"partial {i} cannot be merged: {str(exc).strip().splitlines()[-1]}") from None
        else:
            blocks.append(part.reconstruct_n(0, part.ntotal) if part.ntotal else np.empty((0, trained.d), np.float32))
    if not ivf and blocks:
        # one add of the concatenation: graph indexes (HNSW) then match a one-shot build exactly
        merged.add(np.concatenate(blocks))
    return merged


def set_search_params(index: faiss.Index, nprobe: Optional[int] = None, ef_search: Optional[int] = None,
                      k_factor_rf: Optional[float] = None) -> None:
    """Set search-time parameters where the index has them (silently skipped otherwise)."""
    ps = faiss.ParameterSpace()
    for name, value in (("nprobe", nprobe), ("efSearch", ef_search), ("k_factor_rf", k_factor_rf)):
        if value is None:
            continue
        try:
            ps.set_index_parameter(index, name, value)
        except RuntimeError:
            logger.debug("index has no parameter %s", name)


def _order_key(D: np.ndarray, metric: int) -> np.ndarray:
    """Sort key where smaller is better."""
    return -D if metric == faiss.METRIC_INNER_PRODUCT else D


def search(index: faiss.Index, xq: np.ndarray, k: int, *, exclude: Optional[callable] = None,
           max_excluded: int = 0, metric: Optional[str] = None) -> tuple[np.ndarray, np.ndarray]:
    """k nearest neighbours with the deterministic tie-break (score, then database position).

    `xq` must already be prepared (`prepare_vectors`). `exclude(q0, I) -> bool mask` marks results to drop
    (self / same group) for queries q0..q0+len(I); `max_excluded` bounds how many database items any query can
    lose to it, so searching ``k + max_excluded`` is exact. Rows that end up short (approximate indexes) are
    padded with I = -1 and D = nan.
    """
    nq = xq.shape[0]
    ntotal = index.ntotal
    if k < 1:
        raise IndexError_(f"k must be >= 1, got {k}")
    if k + max_excluded > ntotal:
        raise IndexError_(f"k={k} is larger than the database: {ntotal} vectors"
                          + (f", up to {max_excluded} excluded per query" if max_excluded else ""))
    if xq.shape[1] != index.d:
        raise DataError(f"queries have dimension {xq.shape[1]}, the index {index.d}")
    kk = min(ntotal, k + max_excluded)
    D_out = np.full((nq, k), np.nan, dtype=np.float32)
    I_out = np.full((nq, k), -1, dtype=np.int64)
    todo = np.arange(nq)
    while len(todo):
        D, I = index.search(xq[todo], kk)
        valid = I >= 0
        if exclude is not None:
            valid &= ~exclude(todo, I)
        key = np.where(valid, _order_key(D, index.metric_type), np.inf)
        pos = np.where(valid, I, np.iinfo(np.int64).max)
        order = np.lexsort((pos, key), axis=1)[:, :k]  # primary: score key, secondary: position
        Dk = np.take_along_axis(D, order, axis=1)
        Ik = np.where(np.take_along_axis(valid, order, axis=1), np.take_along_axis(I, order, axis=1), -1)
        # a tie at the boundary (k-th kept score == score at the last searched place) may hide a lower position
        kth_key = np.take_along_axis(key, order[:, -1:], axis=1)[:, 0]
        last_key = _order_key(D[:, -1], index.metric_type)
        tie = (kk < ntotal) & (Ik[:, -1] >= 0) & (last_key == kth_key)
        done = ~tie
        Dk = np.where(Ik >= 0, Dk, np.nan)
        D_out[todo[done]] = Dk[done]
        I_out[todo[done]] = Ik[done]
        todo = todo[tie]
        if len(todo):
            kk = min(ntotal, 2 * kk)
            logger.debug("ties at the k-th place for %d queries: widening the search to %d", len(todo), kk)
    return D_out, I_out


# ------------------------------------------------------------------------------------------------ storage


class IndexBundle:
    """A loaded index with its id map (database order) and metadata."""

    def __init__(self, index: faiss.Index, idmap: pa.Table, meta: dict):
        if idmap.num_rows != index.ntotal:
            raise IndexError_(f"id map has {idmap.num_rows} rows but the index holds {index.ntotal} vectors"
                              + (f" ({meta['uri']})" if meta.get("uri") else ""))
        self.index = index
        self.idmap = idmap
        self.meta = meta
        self.ids = np.asarray(idmap.column("sample_id").to_pylist(), dtype=object)
        self.labels = idmap.column("label").to_numpy().astype(np.int64)
        self.groups = np.asarray(idmap.column("group").to_pylist(), dtype=object)
        self.splits = np.asarray(idmap.column("split").to_pylist(), dtype=object)

    @property
    def metric(self) -> str:
        return self.meta.get("metric", "ip")


def idmap_table(table: EmbeddingTable) -> pa.Table:
    return pa.table({
        "sample_id": pa.array(list(table.ids), pa.string()),
        "label": pa.array(table.labels.astype(np.int32), pa.int32()),
        "group": pa.array(list(table.groups), pa.string()),
        "split": pa.array(list(table.splits), pa.string()),
    })


def _write_faiss(index: faiss.Index, uri: str) -> None:
    with tempfile.TemporaryDirectory(prefix="lgff-index-") as tmp:
        path = os.path.join(tmp, INDEX_FILE)
        faiss.write_index(index, path)
        storage.upload_file(path, uri)


def _read_faiss(uri: str) -> faiss.Index:
    if not storage.exists(uri):
        raise IndexError_(f"{uri}: no such index file")
    if storage.is_local(uri):
        return faiss.read_index(storage.local_path(uri))
    with tempfile.TemporaryDirectory(prefix="lgff-index-") as tmp:
        path = os.path.join(tmp, INDEX_FILE)
        with open(path, "wb") as f:
            f.write(storage.read_bytes(uri))
        return faiss.read_index(path)


def save_index(index: faiss.Index, idmap: pa.Table, out_uri: str, meta: dict) -> dict:
    """Write index.faiss, idmap.parquet, then index.json (last: its presence means the index is complete)."""
    if idmap.num_rows != index.ntotal:
        raise IndexError_(f"id map has {idmap.num_rows} rows but the index holds {index.ntotal} vectors")
    _write_faiss(index, storage.join(out_uri, INDEX_FILE))
    with storage.atomic_output(storage.join(out_uri, IDMAP_FILE)) as f:
        pq.write_table(idmap, f)
    meta = {**meta, "d": int(index.d), "ntotal": int(index.ntotal), "index_type": type(faiss.downcast_index(index)).__name__}
    storage.write_text(storage.join(out_uri, META_FILE), json.dumps(meta, indent=2, sort_keys=True))
    return meta


def load_index(uri: str) -> IndexBundle:
    meta_uri = storage.join(uri, META_FILE)
    if not storage.exists(meta_uri):
        raise IndexError_(f"{uri}: no {META_FILE}; not an index (or its build did not finish)")
    meta = json.loads(storage.read_text(meta_uri))
    index = _read_faiss(storage.join(uri, INDEX_FILE))
    idmap_uri = storage.join(uri, IDMAP_FILE)
    if not storage.exists(idmap_uri):
        raise IndexError_(f"{uri}: no {IDMAP_FILE}")
    with storage.open_input_file(idmap_uri) as f:
        idmap = pq.read_table(f)
    meta["uri"] = str(uri)
    return IndexBundle(index, idmap, meta)


# ------------------------------------------------------------------------------------------------ neighbours


def search_neighbours(bundle: IndexBundle, queries: EmbeddingTable, k: Optional[int], *,
                      exclude_self: bool = False, exclude_same_group: bool = False,
                      database_split: Optional[str | Sequence[str]] = None,
                      nprobe: Optional[int] = None, ef_search: Optional[int] = None,
                      k_factor_rf: Optional[float] = None) -> pa.Table:
    """Neighbours table: one row per query with lists of neighbour ids / labels / groups / scores / positions.

    ``k=None`` ranks the whole database (after exclusions) for every query: the "full ranking" that mAP needs.
    Excluded: database rows outside `database_split` (when given: restricts an index over several splits to
    the protocol's database), the row with the query's sample_id (`exclude_self`) and every row sharing the
    query's group (`exclude_same_group`). Per query, ``num_candidates`` = database rows left after exclusions
    and ``num_relevant`` = those with the query's label. Exclusion is exact: the search asks for k plus the
    largest number of rows any query can lose, then filters.
    """
    index = bundle.index
    xq = prepare_vectors(queries.xb, bundle.metric, index.d, where="queries")
    set_search_params(index, nprobe, ef_search, k_factor_rf)
    if database_split is None:
        allowed = np.ones(index.ntotal, dtype=bool)
    else:
        allowed = np.isin(bundle.splits, [database_split] if isinstance(database_split, str) else database_split)
        if not allowed.any():
            raise IndexError_(f"the index holds no rows of split {database_split!r} "
                              f"(splits: {sorted(set(bundle.splits.tolist()))})")
    db_pos = {sid: p for p, sid in enumerate(bundle.ids)}
    self_pos = np.array([db_pos.get(s, -1) for s in queries.ids], dtype=np.int64)
    _, group_codes = np.unique(np.concatenate([bundle.groups, queries.groups]).astype(str), return_inverse=True)
    db_group, q_group = group_codes[:len(bundle.groups)], group_codes[len(bundle.groups):]
    db_labels = bundle.labels

    top = int(max(db_labels.max(initial=0), queries.labels.max(initial=0))) + 1
    n_excluded = np.zeros(len(queries), dtype=np.int64)
    n_excluded_rel = np.zeros(len(queries), dtype=np.int64)
    if exclude_same_group:
        group_count = np.bincount(db_group[allowed], minlength=group_codes.max() + 1)
        n_excluded = group_count[q_group]
        # database rows sharing the query's (group, label): relevant items lost to the group exclusion
        pair_codes, pair_counts = np.unique(db_group[allowed].astype(np.int64) * (top + 1) + db_labels[allowed] + 1,
                                            return_counts=True)
        q_codes = q_group.astype(np.int64) * (top + 1) + queries.labels + 1
        at = np.minimum(np.searchsorted(pair_codes, q_codes), len(pair_codes) - 1)  # allowed is never empty
        n_excluded_rel = np.where(pair_codes[at] == q_codes, pair_counts[at], 0).astype(np.int64)
    if exclude_self:
        safe_self = np.maximum(self_pos, 0)
        in_db = (self_pos >= 0) & allowed[safe_self]
        # self is in its own group: only count it when the group is not already excluded
        self_extra = in_db & ~(exclude_same_group & (db_group[safe_self] == q_group))
        n_excluded = n_excluded + self_extra
        n_excluded_rel = n_excluded_rel + (self_extra & (db_labels[safe_self] == queries.labels))
    label_count = np.bincount(db_labels[allowed & (db_labels >= 0)], minlength=top)
    num_relevant = np.where(queries.labels >= 0, label_count[np.maximum(queries.labels, 0)], 0) - n_excluded_rel
    num_candidates = int(allowed.sum()) - n_excluded
    max_excluded = int(n_excluded.max(initial=0)) + int((~allowed).sum())
    restrict = database_split is not None and not allowed.all()

    def exclude(rows: np.ndarray, I: np.ndarray) -> np.ndarray:
        mask = np.zeros(I.shape, dtype=bool)
        safe = np.maximum(I, 0)
        if restrict:
            mask |= ~allowed[safe]
        if exclude_self:
            mask |= I == self_pos[rows][:, None]
        if exclude_same_group:
            mask |= db_group[safe] == q_group[rows][:, None]
        return mask & (I >= 0)

    full = k is None
    if full:
        if int(num_candidates.min(initial=1)) < 1:
            raise IndexError_("a query has no database rows left after exclusions")
    elif k > int(num_candidates.min(initial=index.ntotal)) and max_excluded:
        raise IndexError_(f"k={k} is larger than the database: {int(allowed.sum())} rows"
                          + (f" of split {database_split!r}" if restrict else "")
                          + f", up to {int(n_excluded.max(initial=0))} excluded per query")
    t0 = time.perf_counter()
    use_exclude = exclude if (exclude_self or exclude_same_group or restrict) else None
    if full:
        # rank everything; rows with fewer exclusions are longer, so search the whole database and filter
        D, I = search(index, xq, index.ntotal, exclude=use_exclude, max_excluded=0)
    else:
        D, I = search(index, xq, k, exclude=use_exclude, max_excluded=max_excluded)
    logger.info("searched %d queries (k=%s) in %.2f s", len(queries), "all" if full else k, time.perf_counter() - t0)

    rows_ids, rows_labels, rows_groups, rows_scores, rows_pos = [], [], [], [], []
    for q in range(len(queries)):
        keep = I[q] >= 0
        pos = I[q][keep]
        rows_pos.append(pos)
        rows_ids.append(bundle.ids[pos].tolist())
        rows_labels.append(bundle.labels[pos].astype(np.int32))
        rows_groups.append(bundle.groups[pos].tolist())
        rows_scores.append(D[q][keep].astype(np.float32))
    table = pa.table({
        "sample_id": pa.array(list(queries.ids), pa.string()),
        "label": pa.array(queries.labels.astype(np.int32), pa.int32()),
        "group": pa.array(list(queries.groups), pa.string()),
        "split": pa.array(list(queries.splits), pa.string()),
        "neighbor_ids": pa.array(rows_ids, pa.list_(pa.string())),
        "neighbor_labels": pa.array(rows_labels, pa.list_(pa.int32())),
        "neighbor_groups": pa.array(rows_groups, pa.list_(pa.string())),
        "neighbor_scores": pa.array(rows_scores, pa.list_(pa.float32())),
        "neighbor_positions": pa.array(rows_pos, pa.list_(pa.int64())),
        "num_candidates": pa.array(num_candidates, pa.int64()),
        "num_relevant": pa.array(num_relevant, pa.int64()),
    })
    meta = {
        "k": None if full else int(k),
        # every candidate ranked (an approximate index may return fewer rows than asked for)
        "full_ranking": bool(all(len(p) >= c for p, c in zip(rows_pos, num_candidates))),
        "database_split": database_split,
        "exclude_self": bool(exclude_self),
        "exclude_same_group": bool(exclude_same_group),
        "database_size": int(index.ntotal),
        # the database actually ranked: the index rows of `database_split` (all rows when not restricted)
        "searched_database_size": int(allowed.sum()),
        "database_splits": sorted({str(v) for v in np.asarray(bundle.splits)[allowed].tolist()}),
        "index": bundle.meta.get("uri"),
        "embeddings": bundle.meta.get("embeddings"),
        "database_labels": sorted(set(db_labels[allowed].tolist())),
        "label_names": bundle.meta.get("label_names") or queries.label_names,
        "queries": queries.meta.get("uri"),
        "dataset": queries.meta.get("source") or bundle.meta.get("source"),
        "model": queries.meta.get("model") or bundle.meta.get("model"),
    }
    return table.replace_schema_metadata({"lgff": json.dumps(meta)})


def write_neighbours(table: pa.Table, uri: str) -> None:
    with storage.atomic_output(uri) as f:
        pq.write_table(table, f)


def read_neighbours(uri: str) -> tuple[pa.Table, dict]:
    if not storage.exists(uri):
        raise DataError(f"{uri}: no such neighbours file")
    with storage.open_input_file(uri) as f:
        table = pq.read_table(f)
    missing = {"sample_id", "label", "neighbor_ids", "neighbor_labels"} - set(table.column_names)
    if missing:
        raise DataError(f"{uri}: not a neighbours table (missing columns {sorted(missing)})")
    raw = (table.schema.metadata or {}).get(b"lgff")
    meta = json.loads(raw) if raw else {}
    meta["uri"] = str(uri)
    return table, meta


# ------------------------------------------------------------------------------------------------ stages (CLI / kfp)

TRAINED_FILE = "trained.faiss"
PARTIAL_META = "partial.json"


def shard_range(num_items: int, index: int, count: int) -> range:
    """Contiguous block `index` of `count` over `num_items` (faiss contrib (nsplit, rank) convention)."""
    if count < 1 or not 0 <= index < count:
        raise IndexError_(f"shard {index}/{count}: need 0 <= I < N")
    return range(num_items * index // count, num_items * (index + 1) // count)


def _source_meta(emb: EmbeddingTable, embeddings_uri: str, factory: str, metric: str, split) -> dict:
    return {"factory": factory, "metric": metric, "embeddings": str(embeddings_uri), "split": split,
            "label_names": list(emb.label_names), "model": emb.meta.get("model"), "source": emb.meta.get("source")}


def build_from_embeddings(embeddings_uri: str, out_uri: str, factory: str = "Flat", metric: str = "ip",
                          split: Optional[str | Sequence[str]] = None, train_sample: Optional[int] = None,
                          seed: int = 0) -> dict:
    """`lgff index build`: one-shot index over (the `split` rows of) an embeddings set."""
    from .embeddings import read_embeddings

    emb = read_embeddings(embeddings_uri, split=split)
    if len(emb) == 0:
        raise IndexError_(f"{embeddings_uri}: no embeddings" + (f" in split {split!r}" if split else ""))
    index = build_index(emb.xb, factory, metric, train_sample, seed)
    return save_index(index, idmap_table(emb), out_uri, _source_meta(emb, embeddings_uri, factory, metric, split))


def train_from_embeddings(embeddings_uri: str, out_uri: str, factory: str, metric: str = "ip",
                          split: Optional[str | Sequence[str]] = None, train_sample: Optional[int] = 100000,
                          seed: int = 0) -> dict:
    """`lgff index train`: the empty trained index (quantizers) on a sample, for sharded adds."""
    from .embeddings import read_embeddings, read_embeddings_manifest, read_embeddings_shard

    # one shard at a time, keeping only the sampled rows: memory = one shard + the sample, not the archive
    manifest = read_embeddings_manifest(embeddings_uri)
    wanted = None if split is None else ([split] if isinstance(split, str) else list(split))
    sizes = []
    for entry in manifest["shards"]:
        if wanted is None:
            sizes.append(int(entry["num_rows"]))
        else:
            col = read_embeddings_shard(storage.resolve(embeddings_uri, entry["name"]), 0, columns=["split"])
            sizes.append(int(np.isin(np.asarray(col.column("split").to_pylist(), dtype=object), wanted).sum()))
    total = int(sum(sizes))
    if total == 0:
        raise IndexError_(f"{embeddings_uri}: no embeddings to train on" + (f" in split {split!r}" if split else ""))
    chosen = _sample_rows(total, train_sample, seed)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    blocks, emb = [], None
    for i in range(len(sizes)):
        rows = chosen[(chosen >= starts[i]) & (chosen < starts[i + 1])] - starts[i]
        if len(rows):
            emb = read_embeddings(embeddings_uri, split=split, shards=[i])
            blocks.append(emb.xb[rows])
    xt = prepare_vectors(np.concatenate(blocks), metric, where="training sample")
    index = train_index(xt, factory, metric, seed)
    _write_faiss(index, storage.join(out_uri, TRAINED_FILE))
    meta = {**_source_meta(emb, embeddings_uri, factory, metric, split), "d": int(index.d), "trained_on": len(xt)}
    storage.write_text(storage.join(out_uri, META_FILE), json.dumps(meta, indent=2, sort_keys=True))
    return meta


def _load_trained(trained_uri: str) -> tuple[faiss.Index, dict]:
    meta_uri = storage.join(trained_uri, META_FILE)
    if not storage.exists(meta_uri):
        raise IndexError_(f"{trained_uri}: no {META_FILE}; run `lgff index train` first")
    return _read_faiss(storage.join(trained_uri, TRAINED_FILE)), json.loads(storage.read_text(meta_uri))


def add_from_embeddings(trained_uri: str, embeddings_uri: str, out_uri: str, shard: tuple[int, int],
                        split: Optional[str | Sequence[str]] = None) -> dict:
    """`lgff index add --shard I/N`: partial index over contiguous embeddings shards block I of N."""
    from .embeddings import read_embeddings, read_embeddings_manifest

    trained, tmeta = _load_trained(trained_uri)
    n_shards = len(read_embeddings_manifest(embeddings_uri)["shards"])
    block = shard_range(n_shards, *shard)
    emb = read_embeddings(embeddings_uri, split=split if split is not None else tmeta.get("split"), shards=block)
    partial = add_shard(trained, emb.xb, tmeta["metric"]) if len(emb) else add_shard(
        trained, np.empty((0, trained.d), np.float32), tmeta["metric"])
    _write_faiss(partial, storage.join(out_uri, INDEX_FILE))
    with storage.atomic_output(storage.join(out_uri, IDMAP_FILE)) as f:
        pq.write_table(idmap_table(emb), f)
    meta = {"shard": list(shard), "embeddings_shards": [block.start, block.stop], "ntotal": int(partial.ntotal),
            "trained": str(trained_uri), "embeddings": str(embeddings_uri)}
    storage.write_text(storage.join(out_uri, PARTIAL_META), json.dumps(meta, indent=2, sort_keys=True))
    return meta


def merge_partials(trained_uri: str, partial_uris: Sequence[str], out_uri: str) -> dict:
    """`lgff index merge`: all N partials (any order on input; merged in shard order) -> the final index."""
    trained, tmeta = _load_trained(trained_uri)
    loaded = []
    for uri in partial_uris:
        meta_uri = storage.join(uri, PARTIAL_META)
        if not storage.exists(meta_uri):
            raise IndexError_(f"{uri}: no {PARTIAL_META}; that `lgff index add` did not finish")
        loaded.append((json.loads(storage.read_text(meta_uri)), uri))
    if not loaded:
        raise IndexError_("no partial indexes to merge")
    n = loaded[0][0]["shard"][1]
    got = sorted(m["shard"][0] for m, _ in loaded)
    if any(m["shard"][1] != n for m, _ in loaded) or got != list(range(n)):
        raise IndexError_(f"partials cover shards {got} of {[m['shard'][1] for m, _ in loaded]}; need each of 0..{n - 1} once")
    loaded.sort(key=lambda mu: mu[0]["shard"][0])
    partials, idmaps = [], []
    for meta, uri in loaded:
        part = _read_faiss(storage.join(uri, INDEX_FILE))
        with storage.open_input_file(storage.join(uri, IDMAP_FILE)) as f:
            idmap = pq.read_table(f)
        if idmap.num_rows != part.ntotal:
            raise IndexError_(f"{uri}: id map has {idmap.num_rows} rows but the partial holds {part.ntotal} vectors")
        partials.append(part)
        idmaps.append(idmap)
    index = merge_shards(trained, partials)
    idmap = pa.concat_tables(idmaps)
    meta = {k: v for k, v in tmeta.items() if k not in ("d", "trained_on")}
    return save_index(index, idmap, out_uri, {**meta, "merged_from": len(partials)})


def search_to_parquet(index_uri: str, queries_uri: str, out_uri: str, k: Optional[int], *,
                      query_split: Optional[str] = None, exclude_self: bool = False,
                      exclude_same_group: bool = False, nprobe: Optional[int] = None,
                      ef_search: Optional[int] = None) -> dict:
    """`lgff index search`: neighbours Parquet for the queries (the `query_split` rows of an embeddings set)."""
    from .embeddings import read_embeddings

    bundle = load_index(index_uri)
    queries = read_embeddings(queries_uri, split=query_split)
    if len(queries) == 0:
        raise DataError(f"{queries_uri}: no queries" + (f" in split {query_split!r}" if query_split else ""))
    table = search_neighbours(bundle, queries, k, exclude_self=exclude_self, exclude_same_group=exclude_same_group,
                              nprobe=nprobe, ef_search=ef_search)
    meta = json.loads(table.schema.metadata[b"lgff"])
    meta["query_split"] = query_split
    table = table.replace_schema_metadata({"lgff": json.dumps(meta)})
    write_neighbours(table, out_uri)
    return {"n_queries": table.num_rows, **meta}
