"""Retrieval metrics against hand-computed values (lgff_core.evaluate.metrics)."""
import math

import numpy as np
import pytest

from lgff_core.evaluate import metrics as M
from lgff_core.errors import DataError

# 4 queries, 3 neighbours each (labels). Worked by hand in the comments.
QL = np.array([0, 0, 1, 2])
NL = np.array([
    [0, 1, 0],  # top1 correct, 2/3 relevant, AP(R=2) = (1/1 + 2/3) / 2
    [1, 0, 0],  # top1 wrong,   2/3 relevant, AP(R=2) = (1/2 + 2/3) / 2
    [1, 1, 0],  # top1 correct, 2/3 relevant, AP(R=2) = (1 + 1) / 2
    [0, 1, 1],  # top1 wrong,   0 relevant
])


def test_kimia_eta_hand_computed():
    out = M.kimia_eta(QL, NL)
    assert out["eta_p"] == pytest.approx(2 / 4)
    # classes 0: 1/2, 1: 1/1, 2: 0/1
    assert out["eta_w"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert out["eta_tot"] == pytest.approx(0.5 * 0.5)


def test_kimia_eta_weighting_differs_from_eta_p():
    ql = np.array([0, 0, 0, 1])
    nl = np.array([[0], [0], [0], [0]])
    out = M.kimia_eta(ql, nl)
    assert out["eta_p"] == pytest.approx(0.75)
    assert out["eta_w"] == pytest.approx(0.5)  # class 1 has 0/1


def test_recall_precision_at_k():
    assert M.recall_at_k(QL, NL, 1) == pytest.approx(0.5)
    assert M.recall_at_k(QL, NL, 2) == pytest.approx(1.0 * 3 / 4)  # q0 yes, q1 yes, q2 yes, q3 no
    assert M.recall_at_k(QL, NL, 3) == pytest.approx(0.75)
    assert M.precision_at_k(QL, NL, 3) == pytest.approx((2 / 3 + 2 / 3 + 2 / 3 + 0) / 4)
    assert M.precision_at_k(QL, NL, 1) == pytest.approx(0.5)
    with pytest.raises(DataError, match="k=4"):
        M.recall_at_k(QL, NL, 4)


def test_majority_vote_and_its_tie_break():
    # k=3: q0 -> 0 (2 votes) ok, q1 -> 0 ok, q2 -> 1 ok, q3 -> 1 wrong
    assert M.majority_vote_at_k(QL, NL, 3) == pytest.approx(0.75)
    # k=2: every row is a 1-1 tie except q2 -> the label ranked first wins
    # q0 [0,1] -> 0 ok; q1 [1,0] -> 1 wrong; q2 [1,1] -> 1 ok; q3 [0,1] -> 0 wrong
    assert M.majority_vote_at_k(QL, NL, 2) == pytest.approx(0.5)


def test_average_precision_full_and_truncated():
    assert M.average_precision([1, 0, 1]) == pytest.approx((1 + 2 / 3) / 2)
    # truncated list with R = 3 relevant in the database: the missing one contributes 0
    assert M.average_precision([1, 0, 1], num_relevant=3) == pytest.approx((1 + 2 / 3) / 3)
    assert math.isnan(M.average_precision([0, 0, 0]))
    rel = NL == QL[:, None]
    expected = np.mean([(1 + 2 / 3) / 2, (1 / 2 + 2 / 3) / 2, 1.0])  # q3 has no relevant -> skipped
    assert M.mean_average_precision(rel) == pytest.approx(expected)


def test_per_class_table_lists_empty_classes():
    rows = M.per_class_table(QL, NL, label_names=["a", "b", "c", "d"])
    assert [r["label"] for r in rows] == [0, 1, 2, 3]
    assert rows[0] == {"label": 0, "name": "a", "n_queries": 2, "n_correct": 1, "accuracy": 0.5}
    assert rows[3]["n_queries"] == 0 and rows[3]["accuracy"] is None
    # the empty class does not change eta_w
    out = M.retrieval_metrics(QL, NL, ks=(1, 3), label_names=["a", "b", "c", "d"])
    assert out["eta_w"] == pytest.approx(0.5)


def test_retrieval_metrics_full_vs_truncated_map():
    num_rel = np.array([2, 2, 2, 0])
    full = M.retrieval_metrics(QL, NL, num_relevant=num_rel, full_ranking=True, ks=(1,), mv_k=3)
    assert "map" in full and full["map_queries_without_relevant"] == 1
    assert full["map"] == pytest.approx(np.mean([(1 + 2 / 3) / 2, (1 / 2 + 2 / 3) / 2, 1.0]))
    trunc = M.retrieval_metrics(QL, NL, num_relevant=np.array([3, 3, 3, 1]), ks=(1,), mv_k=3)
    assert "map" not in trunc
    assert trunc["map_at_3"] == pytest.approx(np.mean([(1 + 2 / 3) / 3, (1 / 2 + 2 / 3) / 3, 2 / 3, 0.0]))


def test_unknown_query_labels_are_an_error():
    M.check_query_labels(np.array([0, 1]), np.array([1, 0, 0]))
    with pytest.raises(DataError, match="unknown to the database.*'q7'.*label 5"):
        M.check_query_labels(np.array([0, 5]), np.array([0, 1]), query_ids=["q0", "q7"])


def test_full_ranking_tie_break_is_by_database_position():
    xb = np.array([[1, 0], [0, 1], [1, 0], [1, 0], [0.6, 0.8]], np.float32)
    xq = np.array([[1, 0]], np.float32)
    (_, I, D), = list(M.full_ranking(xq, xb))
    assert I[0].tolist() == [0, 2, 3, 4, 1]
    exclude = np.zeros((1, 5), bool)
    exclude[0, 2] = True
    (_, I, D), = list(M.full_ranking(xq, xb, exclude=exclude))
    assert I[0].tolist() == [0, 3, 4, 1, -1]


def test_revisited_map_hand_computed():
    # database of 6; ranking for one query
    ranks = np.array([[3, 0, 5, 1, 2, 4]])
    gnd = [{"easy": [0], "hard": [1], "junk": [5]}]
    out = M.revisited_map(ranks, gnd, ks=(1, 2))
    # Easy: ignore 5 and 1 -> [3, 0, 2, 4], hit at rank 1: ((0/1) + (1/2)) / 2 = 0.25
    assert out["easy"]["map"] == pytest.approx(0.25)
    # Medium: ignore 5 -> [3, 0, 1, 2, 4], hits at 1, 2: ((0 + 1/2)/2 + (1/2 + 2/3)/2) / 2
    assert out["medium"]["map"] == pytest.approx((0.25 + (0.5 + 2 / 3) / 2) / 2)
    # Hard: ignore 5 and 0 -> [3, 1, 2, 4], hit at 1 -> 0.25
    assert out["hard"]["map"] == pytest.approx(0.25)
    assert out["medium"]["mp@2"] == pytest.approx(0.5)
    assert out["easy"]["mp@1"] == 0.0
    # a perfect ranking has AP 1; a query without positives is skipped
    perfect = M.revisited_map(np.array([[0, 1, 2], [2, 1, 0]]), [{"easy": [0], "hard": [], "junk": []},
                                                                {"easy": [], "hard": [], "junk": [0]}])
    assert perfect["easy"]["map"] == 1.0 and perfect["easy"]["n_queries"] == 1
    assert math.isnan(perfect["hard"]["map"])
