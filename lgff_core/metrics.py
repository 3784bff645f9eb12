"""Retrieval metrics: plain functions over numpy arrays of neighbour labels / ids.

Notation (faiss style): ``nq`` queries, ``k`` neighbours per query, ``I`` (nq, k) database positions of the neighbours
in ranking order, ``D`` (nq, k) their scores. Functions here take the *labels* of those neighbours,
``neighbor_labels`` (nq, k) int, and the queries' labels ``query_labels`` (nq,) int.

Ranking order is whatever the caller passes; `lgff_core.index` produces it with a deterministic tie-break
(score descending, then database position ascending), and `full_ranking` below uses the same rule.

Kimia Path24 (Babaie et al. 2017; Shafiei et al.; Yang et al.):
    eta_p   = (correct top-1) / n_queries
    eta_w   = mean over classes c that have >= 1 query of (correct top-1 in c) / (queries in c)
    eta_tot = eta_p * eta_w
Classes without queries ("empty classes") are listed in the per-class table with ``n_queries = 0`` and
``accuracy = None`` and do not enter eta_w.

Recall@k   = fraction of queries with at least one neighbour of the query's label among the top k (a "hit").
Precision@k = mean over queries of (neighbours of the query's label among the top k) / k.
mMV@k (majority vote, as reported by SISH / RetCCL) = fraction of queries whose majority label among the top k
    equals the query label; a tie in vote counts goes to the tied label ranked highest (closest neighbour).
AP (full ranking) = (1 / R) * sum over ranks r (1-based) holding a relevant item of precision@r, where R is the
    number of relevant items (same label) in the database after exclusions (self / same group). mAP = mean AP.
    "Full ranking" means every database item that survives the exclusions is ranked.
AP@k (only the top k known, reported as ``map_at_k``) = (1 / min(k, R)) * sum over ranks r <= k holding a relevant
    item of precision@r: the common normalisation, so a query whose top k are all relevant scores 1 (dividing by R
    instead would cap AP@10 at 10 / R). It equals full AP when k covers every relevant item.
Confidence intervals: 95% percentile bootstrap over queries (queries resampled with replacement, seeded), reported
    for Recall@k and (m)AP as ``ci95`` {metric: [low, high]}.

Revisited Oxford / Paris (Radenovic et al., CVPR 2018): per query the ground truth has 'easy', 'hard' and 'junk'
database indices. Easy: positives = easy, ignored = junk + hard. Medium: positives = easy + hard, ignored = junk.
Hard: positives = hard, ignored = junk + easy. Ignored items are removed from the ranking before AP is computed;
AP uses the trapezoidal precision of the revisitop protocol; queries without positives are skipped.
mP@k follows revisitop ``compute_map``: with the positives' 1-based (junk-free) ranks p_1 < ... < p_n,
k' = min(k, p_n) and P@k = |{p_i <= k'}| / k' (a query whose positives all sit in the top k' is not penalised for
having fewer than k positives).
"""
from __future__ import annotations

import json
import logging
from typing import Iterable, Optional, Sequence

import numpy as np

from .errors import DataError

logger = logging.getLogger(__name__)

__all__ = [
    "check_query_labels",
    "top1_correct",
    "kimia_eta",
    "recall_at_k",
    "precision_at_k",
    "majority_vote_at_k",
    "average_precision",
    "mean_average_precision",
    "average_precision_at_k",
    "bootstrap_ci",
    "per_query_table",
    "confidence_intervals",
    "per_class_table",
    "full_ranking",
    "retrieval_metrics",
    "revisited_average_precision",
    "revisited_map",
    "sample_queries",
]


def _as_2d_labels(neighbor_labels: np.ndarray) -> np.ndarray:
    nl = np.asarray(neighbor_labels)
    if nl.ndim != 2:
        raise DataError(f"neighbor labels must be (n_queries, k), got shape {nl.shape}")
    return nl


def check_query_labels(query_labels: np.ndarray, database_labels: np.ndarray, query_ids: Optional[Sequence] = None) -> None:
    """Raise `DataError` when a query's label does not occur in the database (its metrics would be undefined)."""
    known = np.unique(np.asarray(database_labels))
    ql = np.asarray(query_labels)
    bad = ~np.isin(ql, known)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        who = f"query {query_ids[first]!r}" if query_ids is not None else f"query row {first}"
        raise DataError(
            f"{int(bad.sum())} query(ies) have labels unknown to the database, e.g. {who} with label "
            f"{int(ql[first])}; database labels: {known.tolist()[:20]}"
        )


def top1_correct(query_labels: np.ndarray, neighbor_labels: np.ndarray) -> np.ndarray:
    """(nq,) bool: the first neighbour has the query's label."""
    nl = _as_2d_labels(neighbor_labels)
    if nl.shape[1] < 1:
        raise DataError("need at least one neighbour per query")
    return nl[:, 0] == np.asarray(query_labels)


def kimia_eta(query_labels: np.ndarray, neighbor_labels: np.ndarray) -> dict:
    """eta_p, eta_w, eta_tot (fractions in [0, 1]) of the Kimia Path24 family."""
    ql = np.asarray(query_labels)
    correct = top1_correct(ql, neighbor_labels)
    eta_p = float(correct.mean()) if len(ql) else float("nan")
    classes = np.unique(ql)
    per_class = [float(correct[ql == c].mean()) for c in classes]
    eta_w = float(np.mean(per_class)) if per_class else float("nan")
    return {"eta_p": eta_p, "eta_w": eta_w, "eta_tot": eta_p * eta_w}


def recall_at_k(query_labels: np.ndarray, neighbor_labels: np.ndarray, k: int) -> float:
    nl = _check_k(neighbor_labels, k)
    hits = (nl[:, :k] == np.asarray(query_labels)[:, None]).any(axis=1)
    return float(hits.mean())


def precision_at_k(query_labels: np.ndarray, neighbor_labels: np.ndarray, k: int) -> float:
    nl = _check_k(neighbor_labels, k)
    rel = nl[:, :k] == np.asarray(query_labels)[:, None]
    return float(rel.mean(axis=1).mean())


def _check_k(neighbor_labels: np.ndarray, k: int) -> np.ndarray:
    nl = _as_2d_labels(neighbor_labels)
    if k < 1 or k > nl.shape[1]:
        raise DataError(f"k={k} but only {nl.shape[1]} neighbours per query are available")
    return nl


def majority_vote_at_k(query_labels: np.ndarray, neighbor_labels: np.ndarray, k: int = 5) -> float:
    """mMV@k; ties in the vote go to the tied label that appears first in the ranking."""
    nl = _check_k(neighbor_labels, k)[:, :k]
    ql = np.asarray(query_labels)
    correct = np.empty(len(ql), dtype=bool)
    for q, row in enumerate(nl):
        labels, first_pos, counts = np.unique(row, return_index=True, return_counts=True)
        best = np.lexsort((first_pos, -counts))[0]  # most votes, then earliest rank
        correct[q] = labels[best] == ql[q]
    return float(correct.mean())


def average_precision(relevant: np.ndarray, num_relevant: Optional[int] = None) -> float:
    """AP of one ranking. `relevant` (n,) bool in ranking order; `num_relevant` = R (default: relevant.sum()).

    Returns nan when R == 0 (the query has no relevant item; callers exclude it and say so).
    """
    rel = np.asarray(relevant, dtype=bool)
    R = int(rel.sum()) if num_relevant is None else int(num_relevant)
    if R == 0:
        return float("nan")
    hit_ranks = np.flatnonzero(rel) + 1  # 1-based ranks of relevant items
    precisions = np.arange(1, len(hit_ranks) + 1) / hit_ranks
    return float(precisions.sum() / R)


def average_precision_at_k(relevant: np.ndarray, k: int, num_relevant: int) -> float:
    """AP@k of one ranking: precision@r summed over relevant ranks r <= k, divided by min(k, R); nan when R == 0."""
    rel = np.asarray(relevant, dtype=bool)[:k]
    norm = min(int(k), int(num_relevant))
    if norm <= 0:
        return float("nan")
    hit_ranks = np.flatnonzero(rel) + 1
    return float((np.arange(1, len(hit_ranks) + 1) / hit_ranks).sum() / norm)


def bootstrap_ci(values: np.ndarray, n_resamples: int = 1000, level: float = 0.95, seed: int = 0) -> list[float]:
    """Percentile bootstrap interval of the mean of per-query `values` (nan values are dropped), seeded."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_resamples, v.size))].mean(axis=1)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return [float(low), float(high)]


def mean_average_precision(relevant: np.ndarray, num_relevant: Optional[np.ndarray] = None) -> float:
    """Mean AP over queries with R > 0; `relevant` (nq, n) bool, `num_relevant` (nq,) or None."""
    rel = np.asarray(relevant, dtype=bool)
    R = rel.sum(axis=1) if num_relevant is None else np.asarray(num_relevant)
    aps = np.array([average_precision(rel[q], R[q]) for q in range(rel.shape[0])])
    valid = ~np.isnan(aps)
    if not valid.any():
        return float("nan")
    return float(aps[valid].mean())


def per_class_table(query_labels: np.ndarray, neighbor_labels: np.ndarray,
                    label_names: Optional[Sequence[str]] = None) -> list[dict]:
    """One row per class: label, name, n_queries, n_correct (top-1), accuracy (None when n_queries == 0)."""
    ql = np.asarray(query_labels)
    correct = top1_correct(ql, neighbor_labels)
    labels = set(np.unique(ql).tolist())
    if label_names is not None:
        labels |= set(range(len(label_names)))
    rows = []
    for c in sorted(labels):
        mask = ql == c
        n = int(mask.sum())
        rows.append({
            "label": int(c),
            "name": (label_names[c] if label_names is not None and 0 <= c < len(label_names) else str(c)),
            "n_queries": n,
            "n_correct": int(correct[mask].sum()),
            "accuracy": float(correct[mask].mean()) if n else None,
        })
    return rows


def full_ranking(xq: np.ndarray, xb: np.ndarray, exclude: Optional[np.ndarray] = None,
                 block: int = 1024) -> Iterable[tuple[int, np.ndarray, np.ndarray]]:
    """Exact inner-product ranking of the whole database for each query, in blocks of queries.

    Yields ``(q0, I, D)`` with I (nb_q, nb) database positions sorted by score descending then position
    ascending (the deterministic tie-break). ``exclude`` (nq, nb) bool marks items to drop (self / same group);
    they are moved to the end with I = -1 so every row keeps length nb.
    """
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    nb = xb.shape[0]
    positions = np.arange(nb)
    for q0 in range(0, xq.shape[0], block):
        S = xq[q0:q0 + block] @ xb.T
        if exclude is not None:
            S = np.where(exclude[q0:q0 + block], -np.inf, S)
        # lexsort: last key is primary -> (-score, position)
        order = np.lexsort((np.broadcast_to(positions, S.shape), -S), axis=1)
        D = np.take_along_axis(S, order, axis=1)
        I = np.where(np.isneginf(D), -1, order)
        yield q0, I, D


def per_query_table(query_labels: np.ndarray, neighbor_labels: np.ndarray, *,
                    num_relevant: Optional[np.ndarray] = None, full_ranking: bool = False,
                    ks: Sequence[int] = (1, 5, 10), query_ids: Optional[Sequence] = None,
                    label_names: Optional[Sequence[str]] = None):
    """pandas DataFrame, one row per query: sample_id, label, label_name, top1_label, hit@k / precision@k for the
    available k, num_relevant and ``ap`` (full ranking) or ``ap@K`` (top K only, normalised by min(K, R))."""
    import pandas as pd

    ql = np.asarray(query_labels)
    nl = _as_2d_labels(neighbor_labels)
    k_avail = nl.shape[1]
    rel = nl == ql[:, None]
    names = list(label_names or [])
    df = pd.DataFrame({
        "sample_id": [str(s) for s in query_ids] if query_ids is not None else np.arange(len(ql)).astype(str),
        "label": ql.astype(np.int64),
        "label_name": [names[c] if 0 <= c < len(names) else str(c) for c in ql.tolist()],
        "top1_label": nl[:, 0].astype(np.int64),
    })
    for k in ks:
        if k <= k_avail:
            df[f"hit@{k}"] = rel[:, :k].any(axis=1)
            df[f"precision@{k}"] = rel[:, :k].mean(axis=1)
    if num_relevant is not None:
        R = np.asarray(num_relevant, dtype=np.int64)
        df["num_relevant"] = R
        if full_ranking:
            df["ap"] = [average_precision(rel[q], R[q]) for q in range(len(ql))]
        else:
            df[f"ap@{k_avail}"] = [average_precision_at_k(rel[q], k_avail, R[q]) for q in range(len(ql))]
    return df


def confidence_intervals(per_query, seed: int = 0, n_resamples: int = 1000) -> dict:
    """95% bootstrap intervals of Recall@k and (m)AP from a `per_query_table` (metric key -> [low, high])."""
    out = {}
    for col in per_query.columns:
        if col.startswith("hit@"):
            out[f"recall@{col[4:]}"] = bootstrap_ci(per_query[col].to_numpy(float), n_resamples, seed=seed)
        elif col == "ap" or col.startswith("ap@"):
            key = "map" if col == "ap" else f"map_at_{col[3:]}"
            out[key] = bootstrap_ci(per_query[col].to_numpy(float), n_resamples, seed=seed)
    return out


def retrieval_metrics(query_labels: np.ndarray, neighbor_labels: np.ndarray, *,
                      num_relevant: Optional[np.ndarray] = None, full_ranking: bool = False,
                      ks: Sequence[int] = (1, 5, 10), label_names: Optional[Sequence[str]] = None,
                      mv_k: int = 5, query_ids: Optional[Sequence] = None, seed: int = 0) -> dict:
    """All list-based metrics for one protocol. Values are fractions in [0, 1].

    `num_relevant` (nq,): relevant database items per query after exclusions; needed for mAP.
    `full_ranking`: the neighbour lists rank every candidate database item, so ``map`` is reported;
    otherwise ``map_at_k`` (AP@k normalised by min(k, R)). Padded neighbours (label -1, rows shorter than the
    widest) never count as relevant. Also returned: ``ci95`` (seeded bootstrap over queries) and
    ``per_query_table`` (a DataFrame, see `per_query_table`).
    """
    ql = np.asarray(query_labels)
    nl = _as_2d_labels(neighbor_labels)
    if nl.shape[0] != len(ql):
        raise DataError(f"{len(ql)} query labels but {nl.shape[0]} neighbour rows")
    k_avail = nl.shape[1]
    out: dict = {"n_queries": int(len(ql)), "k": int(k_avail)}
    out.update(kimia_eta(ql, nl))
    for k in ks:
        if k <= k_avail:
            out[f"recall@{k}"] = recall_at_k(ql, nl, k)
            out[f"precision@{k}"] = precision_at_k(ql, nl, k)
        else:
            logger.warning("recall@%d / precision@%d skipped: only %d neighbours per query", k, k, k_avail)
    if mv_k <= k_avail:
        out[f"mmv@{mv_k}"] = majority_vote_at_k(ql, nl, mv_k)
    table = per_query_table(ql, nl, num_relevant=num_relevant, full_ranking=full_ranking, ks=ks,
                            query_ids=query_ids, label_names=label_names)
    if num_relevant is not None:
        ap = table["ap" if full_ranking else f"ap@{k_avail}"].to_numpy(float)
        out["map" if full_ranking else f"map_at_{k_avail}"] = float(np.nanmean(ap)) if (~np.isnan(ap)).any() \
            else float("nan")
        n_empty = int((np.asarray(num_relevant) == 0).sum())
        if n_empty:
            out["map_queries_without_relevant"] = n_empty
    out["ci95"] = confidence_intervals(table, seed=seed)
    out["per_class"] = per_class_table(ql, nl, label_names)
    out["per_query_table"] = table
    return out


# ------------------------------------------------------------------------------------ revisited Oxford / Paris


def revisited_average_precision(ranks: np.ndarray, positives: Sequence[int], junk: Sequence[int]) -> float:
    """Revisitop AP of one query. `ranks` (nb,) database indices in ranking order; junk items are skipped.

    With the positives found at (junk-free, 0-based) ranks r_0 < r_1 < ..., the precision is interpolated
    trapezoidally between the rank before and at each hit: sum_j (j / r_j + (j+1) / (r_j + 1)) / 2 / n_pos,
    with j / r_j taken as 1 when r_j = 0.
    """
    pos = np.asarray(positives, dtype=np.int64)
    if len(pos) == 0:
        return float("nan")
    ranks = np.asarray(ranks)
    keep = ~np.isin(ranks, np.asarray(junk, dtype=np.int64))
    clean = ranks[keep]
    hit_ranks = np.flatnonzero(np.isin(clean, pos)).astype(np.float64)
    j = np.arange(len(hit_ranks), dtype=np.float64)
    prec_before = np.where(hit_ranks == 0, 1.0, j / np.maximum(hit_ranks, 1))
    prec_at = (j + 1) / (hit_ranks + 1)
    return float(((prec_before + prec_at) / 2).sum() / len(pos))


def _precision_at_ks(ranks: np.ndarray, positives, junk, ks) -> list[float]:
    """revisitop mP@k of one query: the cut-off is min(k, rank of the last positive) (module docstring)."""
    ranks = np.asarray(ranks)
    clean = ranks[~np.isin(ranks, np.asarray(junk, dtype=np.int64))]
    pos = np.flatnonzero(np.isin(clean, np.asarray(positives, dtype=np.int64))) + 1  # 1-based ranks
    if pos.size == 0:
        return [0.0 for _ in ks]
    return [float((pos <= min(k, pos[-1])).sum() / min(k, pos[-1])) for k in ks]


def revisited_map(ranks: np.ndarray, gnd: Sequence[dict], ks: Sequence[int] = (1, 5, 10)) -> dict:
    """mAP and mP@k for Easy / Medium / Hard. `ranks` (nq, nb) database indices per query in ranking order;
    `gnd[q]` has 'easy', 'hard', 'junk' lists of database indices (revisitop ``gnd_*.pkl`` layout)."""
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or ranks.shape[0] != len(gnd):
        raise DataError(f"ranks must be (n_queries={len(gnd)}, n_database), got shape {ranks.shape}")
    setups = {
        "easy": lambda g: (g["easy"], list(g["junk"]) + list(g["hard"])),
        "medium": lambda g: (list(g["easy"]) + list(g["hard"]), g["junk"]),
        "hard": lambda g: (g["hard"], list(g["junk"]) + list(g["easy"])),
    }
    out = {}
    for name, split in setups.items():
        aps, pks = [], []
        for q, g in enumerate(gnd):
            for key in ("easy", "hard", "junk"):
                if key not in g:
                    raise DataError(f"gnd[{q}] has no {key!r} list")
            positives, junk = split(g)
            if len(positives) == 0:
                continue
            aps.append(revisited_average_precision(ranks[q], positives, junk))
            pks.append(_precision_at_ks(ranks[q], positives, junk, ks))
        out[name] = {
            "map": float(np.mean(aps)) if aps else float("nan"),
            "n_queries": len(aps),
            **{f"mp@{k}": float(np.mean([p[i] for p in pks])) if pks else float("nan") for i, k in enumerate(ks)},
        }
    return out


# ------------------------------------------------------------------------------------ stages (CLI / kfp)

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
    from .index import read_neighbours

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
    from . import index as ix
    from .embeddings import read_embeddings

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
    from .index import EmbeddingsSource

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

    from . import storage
    from .embeddings import read_embeddings

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
    from . import storage

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
