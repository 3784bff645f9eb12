"""faiss index core: vectors, build / train / add / merge in RAM, exact tie-broken search, neighbours tables.

Plain functions over float32 numpy with faiss's names: ``xb`` (nb, d) database, ``xq`` (nq, d) queries,
``xt`` training sample, ``k`` neighbours, ``D`` (nq, k) scores, ``I`` (nq, k) database positions, ``metric``
("ip" = inner product on L2-normalised vectors, i.e. cosine, the paper's setting; or "l2").

Any `faiss.index_factory` string works ("Flat", "HNSW32", "IVF256,Flat", "IVF4096,PQ64", "IVF1024,PQ64x4fs,RFlat").
Database position p (0-based row of the id map) is the faiss id of a vector, for one-shot and sharded builds alike.

In-RAM sharded build: `train_index` on a sample once; `add_shard` per contiguous block (a partial index with local
ids 0..n_i-1); `merge_shards` concatenates the partials in order. Pure IVF indexes merge their inverted lists
(`IndexIVF.merge_from` with the id offset); any other index type (Flat, HNSW, refine wrappers, ...) keeps the raw
vectors in the partial (an IndexFlat) and the merge adds their concatenation to the trained index in one call (so an
HNSW graph is built exactly as in a one-shot build). Archive-scale IVF builds with inverted lists on disk live in
`lgff_core.index.ondisk`.

Ranking and ties: results are ordered by score (descending for "ip", ascending distance for "l2"), ties broken by
database position ascending. To make that exact at the k-th place, a search that finds the score at the last
returned place equal to the k-th kept score widens the search (doubling, up to the whole database).
"""
from __future__ import annotations

import json
import logging
import time
from typing import Optional, Sequence

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import storage
from ..data.embeddings import EmbeddingTable, check_vectors
from ..errors import DataError, IndexError_
from . import mapped
from .params import set_search_params
from .store import IndexBundle, code_of

logger = logging.getLogger(__name__)


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


def _order_key(D: np.ndarray, metric: int) -> np.ndarray:
    """Sort key where smaller is better."""
    return -D if metric == faiss.METRIC_INNER_PRODUCT else D


def check_not_empty(index: faiss.Index, where: str = "the index") -> None:
    """An index whose every vector was removed (`lgff index remove`) answers no search: one clear error."""
    if index.ntotal == 0:
        raise IndexError_(f"{where} holds no vectors (every sample id was removed); nothing to search")


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
    check_not_empty(index)
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
        D, I = _search_in_rounds(index, xq[todo], kk)
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


def _search_in_rounds(index: faiss.Index, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """`index.search`; over memory-mapped lists in rounds of queries whose probed lists fit the resident budget,
    handing the mapped pages back after each round (the process's RSS stays bounded whatever the archive's size)."""
    per_round = mapped.queries_per_round(index)
    if per_round is None or per_round >= len(xq):
        D, I = index.search(xq, k)
        mapped.release(mapped.mapped_lists(index))
        return D, I
    lists = mapped.mapped_lists(index)
    D = np.empty((len(xq), k), dtype=np.float32)
    I = np.empty((len(xq), k), dtype=np.int64)
    for q0 in range(0, len(xq), per_round):
        D[q0:q0 + per_round], I[q0:q0 + per_round] = index.search(xq[q0:q0 + per_round], k)
        mapped.release(lists)
    return D, I


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
    check_not_empty(index, bundle.meta.get("uri") or "the index")
    xq = prepare_vectors(queries.xb, bundle.metric, index.d, where="queries")
    set_search_params(index, nprobe, ef_search, k_factor_rf)
    idmap = bundle.rows
    if database_split is None:
        allowed = np.ones(index.ntotal, dtype=bool)
    else:
        allowed = bundle.split_mask(database_split)
        if not allowed.any():
            raise IndexError_(f"the index holds no rows of split {database_split!r} "
                              f"(splits: {sorted(n for n in idmap.split_names if n is not None)})")
    # database-side facts are per-row integer codes: the sample_id strings stay in the id map's Parquet
    self_pos = idmap.find(list(queries.ids)) if exclude_self else np.full(len(queries), -1, np.int64)
    db_group = idmap.group_codes if exclude_same_group else None
    q_group = code_of(idmap.group_names, list(queries.groups)) if exclude_same_group else None
    db_labels = bundle.labels

    top = int(max(db_labels.max(initial=0), queries.labels.max(initial=0))) + 1
    n_excluded = np.zeros(len(queries), dtype=np.int64)
    n_excluded_rel = np.zeros(len(queries), dtype=np.int64)
    if exclude_same_group:
        group_count = np.bincount(db_group[allowed & (db_group >= 0)], minlength=len(idmap.group_names) + 1)
        n_excluded = np.where(q_group >= 0, group_count[np.maximum(q_group, 0)], 0)
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
        self_extra = in_db & ~((db_group[safe_self] == q_group) if exclude_same_group else False)
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

    keep = I >= 0
    flat_pos = I[keep]
    ids_flat = idmap.take("sample_id", flat_pos)
    groups_flat = idmap.take("group", flat_pos)
    cuts = np.cumsum(keep.sum(axis=1))[:-1]
    rows_pos = np.split(flat_pos, cuts)
    rows_ids = [r.tolist() for r in np.split(ids_flat, cuts)]
    rows_groups = [r.tolist() for r in np.split(groups_flat, cuts)]
    rows_labels = [r.astype(np.int32) for r in np.split(db_labels[flat_pos], cuts)]
    rows_scores = [r.astype(np.float32) for r in np.split(D[keep], cuts)]
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
        "database_splits": sorted(str(idmap.split_names[c]) for c in np.unique(idmap.split_codes[allowed]) if c >= 0),
        "index": bundle.meta.get("uri"),
        "embeddings": bundle.meta.get("embeddings"),
        "database_labels": np.unique(db_labels[allowed]).tolist(),
        "label_names": bundle.meta.get("label_names") or queries.label_names,
        "queries": queries.meta.get("uri"),
        "dataset": queries.meta.get("source") or bundle.meta.get("source"),
        "model": queries.meta.get("model") or bundle.meta.get("model"),
    }
    return table.replace_schema_metadata({"lgff": json.dumps(meta)})


def search_neighbours_batched(bundle: IndexBundle, queries: EmbeddingTable, k: Optional[int], batch: int,
                              **kwargs) -> pa.Table:
    """`search_neighbours` over query batches of `batch` rows (each batch holds at most batch x k results, or
    batch x database for a full ranking); the same table as one call."""
    batch = max(1, int(batch or len(queries)))
    tables, metas = [], []
    for q0 in range(0, len(queries), batch):
        t = search_neighbours(bundle, queries.subset(np.arange(q0, min(len(queries), q0 + batch))), k, **kwargs)
        metas.append(json.loads(t.schema.metadata[b"lgff"]))
        tables.append(t.replace_schema_metadata(None))
    meta = metas[0]
    meta["full_ranking"] = all(m["full_ranking"] for m in metas)
    return pa.concat_tables(tables).replace_schema_metadata({"lgff": json.dumps(meta)})


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


