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

import logging
from typing import Iterable, Optional, Sequence

import numpy as np

from ..errors import DataError

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
    "average_precision_at_k_rows",
    "bootstrap_ci",
    "per_query_table",
    "confidence_intervals",
    "per_class_table",
    "full_ranking",
    "retrieval_metrics",
    "revisited_average_precision",
    "revisited_map",
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


def average_precision_at_k_rows(relevant: np.ndarray, k: int, num_relevant: np.ndarray) -> np.ndarray:
    """`average_precision_at_k` of many rankings at once: `relevant` (nq, >= k) bool, `num_relevant` (nq,) = R per
    query; (nq,) float64, nan where R == 0. The trainer's validation mAP@100 is its mean."""
    rel = np.asarray(relevant, dtype=bool)[:, :k]
    ranks = np.arange(1, rel.shape[1] + 1)
    precision = np.cumsum(rel, axis=1) / ranks
    norm = np.minimum(int(k), np.asarray(num_relevant, dtype=np.int64))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (precision * rel).sum(axis=1) / norm
    return np.where(norm > 0, out, np.nan)


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
