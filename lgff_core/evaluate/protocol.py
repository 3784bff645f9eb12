"""Evaluation protocols as stages: which queries against which database, from neighbours, embeddings or an index,
and the `metrics.json` / per-query tables they write. The arithmetic lives in `metrics` (pure numpy)."""
from __future__ import annotations

import json
import logging
from typing import Optional, Sequence

import numpy as np

from ..errors import DataError
from .metrics import check_query_labels, full_ranking, per_query_table, retrieval_metrics, revisited_map

logger = logging.getLogger(__name__)


PROTOCOLS = ("test-vs-train", "leave-one-out")


def _padded(lists: list, fill, dtype) -> np.ndarray:
    width = max((len(r) for r in lists), default=0)
    out = np.full((len(lists), width), fill, dtype=dtype)
    for q, row in enumerate(lists):
        out[q, :len(row)] = row
    return out


def check_protocol(protocol: str, query_splits: Optional[Sequence[str]], meta: dict,
                   where: str) -> tuple[Optional[str], list[str]]:
    """Refuse neighbours that were not searched the way `protocol` defines (one-line `DataError`).

    test-vs-train: the queries come from one split and the database holds none of that split's rows.
    leave-one-out: the queries and the database are the same single split and each query's own row was excluded.
    Returns (query split, database splits); either is unknown (None / []) for neighbour files that do not record it.
    """
    qs = sorted({str(s) for s in query_splits}) if query_splits is not None else []
    db = meta.get("database_splits")
    if db is None and meta.get("database_split"):
        db = [meta["database_split"]] if isinstance(meta["database_split"], str) else list(meta["database_split"])
    db = sorted(db or [])
    hint = ("search the protocol's queries against its database (e.g. `lgff index build --split train`, then "
            "`lgff index search --query-split test`), or evaluate with --embeddings, which applies the protocol")
    if len(qs) > 1:
        raise DataError(f"{where}: neighbours do not match protocol {protocol}: the queries come from splits "
                        f"{', '.join(qs)} (one split expected) against a database of "
                        f"{', '.join(db) or 'unknown'} rows; {hint}")
    if protocol == "test-vs-train" and qs and db and qs[0] in db:
        raise DataError(f"{where}: neighbours do not match protocol test-vs-train: the database holds the query "
                        f"split {qs[0]!r} (database splits: {', '.join(db)}); {hint}")
    if protocol == "leave-one-out" and qs and db and (db != qs or not meta.get("exclude_self")):
        raise DataError(f"{where}: neighbours do not match protocol leave-one-out: queries of split {qs[0]!r} "
                        f"against database splits {', '.join(db)}"
                        + ("" if meta.get("exclude_self") else " without --exclude-self")
                        + "; search the split against itself with --exclude-self")
    return (qs[0] if qs else None), db


def protocol_caption(protocol: str, n_queries: int, database_size: Optional[int], query_split: Optional[str],
                     database_splits: Sequence[str], exclude_self: bool, exclude_same_group: bool) -> str:
    """One sentence stating what was searched, e.g. '340 test queries against the 917 train rows (...)'."""
    q = f"{n_queries} {query_split + ' ' if query_split else ''}queries"
    db = f"{database_size if database_size is not None else '?'} " + (
        f"{'/'.join(database_splits)} rows" if database_splits else "database rows")
    extra = [e for e, on in (("own row excluded", exclude_self), ("same-group rows excluded", exclude_same_group))
             if on]
    return f"{protocol}: {q} against the {db}" + (f" ({', '.join(extra)})" if extra else "")


def metrics_from_neighbours(table, meta: dict, protocol: str, ks: Sequence[int] = (1, 5, 10), mv_k: int = 5,
                            model: Optional[str] = None) -> dict:
    """Metrics JSON (a dict) from a neighbours table (`lgff_core.index.search_neighbours` layout)."""
    if protocol not in PROTOCOLS:
        raise DataError(f"protocol {protocol!r} is not one of {', '.join(PROTOCOLS)}")
    where = meta.get("uri", "neighbours")
    cols = table.to_pydict()
    qids = cols["sample_id"]
    ql = np.asarray(cols["label"], dtype=np.int64)
    if len(ql) == 0:
        raise DataError(f"{where}: no queries")
    for q, (qid, nids) in enumerate(zip(qids, cols["neighbor_ids"])):
        if qid in nids:
            raise DataError(f"{where}: query {qid!r} (row {q}) is among its own neighbours: the database holds the "
                            f"queries; for {protocol} search with --exclude-self"
                            + (" or against the train split" if protocol == "test-vs-train" else ""))
    if meta.get("database_labels") is not None:
        check_query_labels(ql, np.asarray(meta["database_labels"]), qids)
    query_split, database_splits = check_protocol(protocol, cols.get("split"), meta, where)
    nl = _padded(cols["neighbor_labels"], -1, np.int64)
    if nl.shape[1] == 0:
        raise DataError(f"{where}: the neighbour lists are empty")
    num_relevant = np.asarray(cols["num_relevant"]) if "num_relevant" in cols else None
    full = bool(meta.get("full_ranking")) or (
        "num_candidates" in cols and all(len(r) >= c for r, c in zip(cols["neighbor_ids"], cols["num_candidates"])))
    label_names = meta.get("label_names") or None
    m = retrieval_metrics(ql, nl, num_relevant=num_relevant, full_ranking=full, ks=ks, label_names=label_names,
                          mv_k=mv_k, query_ids=qids)
    per_class = m.pop("per_class")
    per_query = m.pop("per_query_table")
    ci95 = m.pop("ci95")
    model = model or meta.get("model") or "unknown"
    # the database actually ranked: the index rows of the protocol's split(s), not the whole index
    searched = meta.get("searched_database_size", meta.get("database_size"))
    return {
        "kind": "retrieval",
        "model": model,
        "is_baseline": str(model).startswith("baseline"),
        "protocol": protocol,
        "protocol_caption": protocol_caption(protocol, len(ql), searched, query_split, database_splits,
                                             bool(meta.get("exclude_self")), bool(meta.get("exclude_same_group"))),
        "full_ranking": full,
        "exclude_self": meta.get("exclude_self"),
        "exclude_same_group": meta.get("exclude_same_group"),
        "query_split": meta.get("query_split") or query_split,
        "n_queries": int(len(ql)),
        "database_size": searched,
        "index_size": meta.get("database_size"),
        "database_split": meta.get("database_split") or (",".join(database_splits) if database_splits else None),
        "metrics": m,
        "ci95": ci95,
        "ci_method": "95% percentile bootstrap over queries, 1000 resamples, seed 0",
        "per_class": per_class,
        "per_query_table": per_query,
        "neighbors": meta.get("uri"),
        "embeddings": meta.get("embeddings"),
        "queries": meta.get("queries"),
        "index": meta.get("index"),
        "dataset": meta.get("dataset"),
    }


def evaluate_neighbours(neighbours_uri: str, protocol: str, ks: Sequence[int] = (1, 5, 10), mv_k: int = 5,
                        model: Optional[str] = None) -> dict:
    """`lgff evaluate retrieval --neighbors URI`."""
    from ..index import read_neighbours

    table, meta = read_neighbours(neighbours_uri)
    return metrics_from_neighbours(table, meta, protocol, ks, mv_k, model)


def sample_queries(labels: np.ndarray, max_queries: Optional[int], seed: int = 0) -> np.ndarray:
    """Sorted positions of a seeded query sample stratified by class (all positions when there are few enough).

    Each class gets its share of `max_queries` (largest remainders), at least one query while it has any, so
    per-class numbers (eta_w) stay defined; the draw within a class is uniform without replacement.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if max_queries is None or n <= max_queries:
        return np.arange(n)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    quota = counts * (max_queries / n)
    alloc = np.minimum(np.maximum(1, np.floor(quota)).astype(np.int64), counts)
    for c in np.argsort(-(quota - np.floor(quota)), kind="stable"):
        if alloc.sum() >= max_queries:
            break
        if alloc[c] < counts[c]:
            alloc[c] += 1
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(inverse == c), size=int(alloc[c]), replace=False) for c in range(len(classes))]
    return np.sort(np.concatenate(chosen))


def evaluate_embeddings(embeddings_uri: str, protocol: str, *, index_uri: Optional[str] = None,
                        query_split: str = "test", database_split: str = "train", k: Optional[int] = None,
                        exclude_same_group: bool = False, ks: Sequence[int] = (1, 5, 10), mv_k: int = 5,
                        model: Optional[str] = None, neighbours_out: Optional[str] = None,
                        max_queries: Optional[int] = None, seed: int = 0, query_batch: Optional[int] = None,
                        max_full_ranking: Optional[int] = None, k_at_scale: int = 100,
                        max_in_ram: Optional[int] = None) -> dict:
    """`lgff evaluate retrieval --embeddings URI [--index URI]`: search, then the metrics.

    test-vs-train: queries = `query_split` rows, database = `database_split` rows.
    leave-one-out: queries = database = `query_split` rows, each query's own row excluded.
    Without `index_uri` the database is searched exactly (Flat inner product, in RAM: at most `max_in_ram` rows).
    With it, the index's rows outside the protocol's database split are excluded from the results (exactly, see
    `index.search_neighbours`). ``k=None`` ranks the whole database, which full mAP needs, unless
    n_queries x database exceeds `max_full_ranking` (then k = `k_at_scale`).
    Archive scale: only the queries are read (a seeded, class-stratified sample of at most `max_queries`) and they
    are searched `query_batch` at a time; the result's ``sample`` says which sample was used.
    """
    from .. import index as ix
    from ..data.embeddings import read_embeddings

    if protocol not in PROTOCOLS:
        raise DataError(f"protocol {protocol!r} is not one of {', '.join(PROTOCOLS)}")
    source = ix.EmbeddingsSource(embeddings_uri, query_split)
    db_split = query_split if protocol == "leave-one-out" else database_split
    n_total = source.num_rows
    if n_total == 0:
        raise DataError(f"{embeddings_uri}: no queries (split {query_split!r}); splits present: "
                        f"{_splits_present(embeddings_uri)}")
    rows = sample_queries(source.column("label"), max_queries, seed)
    queries = source.take(rows)
    if index_uri is None:
        n_db = ix.EmbeddingsSource(embeddings_uri, db_split).num_rows
        if n_db == 0:
            raise DataError(f"{embeddings_uri}: no database rows (split {db_split!r}); splits present: "
                            f"{_splits_present(embeddings_uri)}")
        if max_in_ram is not None and n_db > max_in_ram:
            raise DataError(f"{embeddings_uri}: the {db_split!r} database has {n_db} rows, above "
                            f"index.max_in_ram_vectors={max_in_ram} for an exact in-RAM search; build an index "
                            f"(lgff index build --factory {ix.suggest_ivf(n_db, source.dim)}) and pass --index")
        database = read_embeddings(embeddings_uri, split=db_split)
        bundle = ix.IndexBundle(ix.build_index(database.xb, "Flat"), ix.idmap_table(database),
                                {"metric": "ip", "uri": None, "embeddings": str(embeddings_uri),
                                 "label_names": source.label_names})
        del database
    else:
        bundle = ix.load_index(index_uri)
    db_mask = bundle.split_mask(db_split)
    check_query_labels(queries.labels, bundle.labels[db_mask], queries.ids)
    if k is None and max_full_ranking is not None and len(queries) * int(db_mask.sum()) > max_full_ranking:
        logger.warning("full ranking of %d queries x %d database rows exceeds evaluate.max_full_ranking=%d: "
                       "using k=%d", len(queries), int(db_mask.sum()), max_full_ranking, k_at_scale)
        k = k_at_scale
    table = ix.search_neighbours_batched(bundle, queries, k, query_batch or len(queries),
                                         exclude_self=protocol == "leave-one-out",
                                         exclude_same_group=exclude_same_group, database_split=db_split)
    meta = json.loads(table.schema.metadata[b"lgff"])
    meta["query_split"] = query_split
    meta["embeddings"] = str(embeddings_uri)
    if neighbours_out:
        meta["uri"] = str(neighbours_out)
        ix.write_neighbours(table.replace_schema_metadata({"lgff": json.dumps(meta)}), neighbours_out)
    else:
        meta["uri"] = None
    result = metrics_from_neighbours(table, meta, protocol, ks, mv_k, model)
    result["sample"] = {"n_queries": int(len(queries)), "n_queries_total": int(n_total),
                        "sampled": bool(len(queries) < n_total), "seed": int(seed), "stratified_by": "label",
                        "max_queries": max_queries, "k": k, "query_batch": query_batch}
    return result


def _splits_present(embeddings_uri: str) -> list:
    from ..index import EmbeddingsSource

    return sorted(set(EmbeddingsSource(embeddings_uri).column("split").tolist()))


def _match_names(names: Sequence[str], ids: np.ndarray, what: str) -> np.ndarray:
    """Row index in `ids` of each name (exact sample_id, or sample_id without a file extension)."""
    lookup = {}
    for row, sid in enumerate(ids):
        lookup.setdefault(str(sid), row)
        lookup.setdefault(str(sid).rsplit(".", 1)[0], row)
    missing = [n for n in names if n not in lookup]
    if missing:
        raise DataError(f"{len(missing)} {what} name(s) from the ground truth have no embedding, e.g. {missing[:3]}")
    return np.array([lookup[n] for n in names], dtype=np.int64)


def evaluate_roxford(gnd_uri: str, embeddings_uri: str, queries_uri: Optional[str] = None,
                     ks: Sequence[int] = (1, 5, 10), model: Optional[str] = None) -> dict:
    """`lgff evaluate roxford`: revisited Oxford / Paris mAP (Easy / Medium / Hard) from embeddings.

    The ground truth is the revisitop ``gnd_*.pkl`` (a pickle: only load files you trust) with 'imlist',
    'qimlist' and 'gnd'. Database rows are matched to 'imlist' names and query rows to 'qimlist' names by
    sample_id (with or without file extension); the ranking is the exact inner-product full ranking.
    """
    import pickle

    from .. import storage
    from ..data.embeddings import read_embeddings

    try:
        cfg = pickle.loads(storage.read_bytes(gnd_uri))
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as exc:
        raise DataError(f"{gnd_uri}: not a revisitop gnd pickle ({exc})") from None
    for key in ("imlist", "qimlist", "gnd"):
        if key not in cfg:
            raise DataError(f"{gnd_uri}: no {key!r} key (has {sorted(cfg)[:10]})")
    if len(cfg["gnd"]) != len(cfg["qimlist"]):
        raise DataError(f"{gnd_uri}: {len(cfg['gnd'])} gnd entries for {len(cfg['qimlist'])} queries")
    db = read_embeddings(embeddings_uri)
    qs = read_embeddings(queries_uri) if queries_uri else db
    xb = db.xb[_match_names(cfg["imlist"], db.ids, "database")]
    xq = qs.xb[_match_names(cfg["qimlist"], qs.ids, "query")]
    xb = xb / np.linalg.norm(xb, axis=1, keepdims=True)
    xq = xq / np.linalg.norm(xq, axis=1, keepdims=True)
    ranks = np.concatenate([I for _, I, _ in full_ranking(xq, xb)])
    result = revisited_map(ranks, cfg["gnd"], ks)
    model = model or db.meta.get("model") or "unknown"
    return {"kind": "revisited", "model": model, "is_baseline": str(model).startswith("baseline"),
            "gnd": str(gnd_uri), "embeddings": str(embeddings_uri), "queries": str(queries_uri or embeddings_uri),
            "n_queries": len(cfg["qimlist"]), "database_size": len(cfg["imlist"]), "metrics": result}


PER_QUERY_STEM = "per_query"


def write_metrics(result: dict, out_uri: str) -> dict:
    """Write the metrics JSON to `out_uri`; a result carrying a ``per_query_table`` also gets it beside the JSON as
    ``per_query.parquet`` and ``per_query.csv`` (named in the JSON under ``per_query``), written first so the JSON,
    published last, only ever names complete files. Returns the JSON-side dict."""
    from .. import storage

    result = dict(result)
    table = result.pop("per_query_table", None)
    if table is not None:
        base = out_uri.rsplit("/", 1)[0] if "/" in str(out_uri) else "."
        stem = storage.join(base, PER_QUERY_STEM)
        with storage.atomic_output(stem + ".parquet") as f:
            table.to_parquet(f, index=False)
        storage.write_text(stem + ".csv", table.to_csv(index=False))
        result["per_query"] = {"parquet": stem + ".parquet", "csv": stem + ".csv"}
    storage.write_text(out_uri, json.dumps(_no_nan(result), indent=2, default=_json_default, allow_nan=False) + "\n")
    return result


def _no_nan(o):
    """NaN (undefined metric, e.g. mAP with no relevant items) -> null, so the file is strict JSON."""
    if isinstance(o, dict):
        return {k: _no_nan(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_no_nan(v) for v in o]
    if isinstance(o, (float, np.floating)) and not np.isfinite(o):
        return None
    return o


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
