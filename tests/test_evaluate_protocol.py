"""What `lgff evaluate` reports must be what it computed: protocol checks, the searched database size, AP@k and
revisitop mP@k definitions, bootstrap intervals and the per-query table (issue 14)."""
import json

import numpy as np
import pandas as pd
import pytest

from lgff_core.evaluate import metrics as M
from lgff_core.data.embeddings import write_embeddings
from test_index_cli import make_embeddings, run


@pytest.fixture
def emb_uri(tmp_path):
    uri = str(tmp_path / "emb")
    write_embeddings(uri, make_embeddings(), num_shards=2, model="lgff-test", source="file:///data/x")
    return uri


def test_all_vs_all_neighbours_are_refused_for_test_vs_train(emb_uri, tmp_path, capsys):
    # the reported case: every row searched against an index of every row, then evaluated as test-vs-train
    idx, nb = str(tmp_path / "idx"), str(tmp_path / "nb.parquet")
    assert run("index", "build", "--embeddings", emb_uri, "--out", idx) == 0
    assert run("index", "search", "--index", idx, "--queries", emb_uri, "--k", "10", "--out", nb) == 0
    capsys.readouterr()
    out = tmp_path / "m.json"
    assert run("evaluate", "retrieval", "--neighbors", nb, "--protocol", "test-vs-train", "--out", str(out)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "do not match protocol test-vs-train" in err and "test, train" in err
    assert not out.exists()
    # test queries against an index that also holds the test rows: refused too
    assert run("index", "search", "--index", idx, "--queries", emb_uri, "--query-split", "test", "--k", "10",
               "--out", nb) == 0
    assert run("evaluate", "retrieval", "--neighbors", nb, "--protocol", "test-vs-train", "--out", str(out)) == 2
    assert "database holds the query split 'test'" in capsys.readouterr().err


def test_database_size_is_the_searched_split_and_per_query_table(emb_uri, tmp_path):
    idx, out = str(tmp_path / "idx"), tmp_path / "ev"
    assert run("index", "build", "--embeddings", emb_uri, "--out", idx) == 0  # 160 rows: train + test
    assert run("evaluate", "retrieval", "--embeddings", emb_uri, "--index", idx, "--protocol", "test-vs-train",
               "--out", str(out)) == 0
    res = json.loads((out / "metrics.json").read_text())
    assert res["database_size"] == 120 and res["index_size"] == 160
    assert res["protocol_caption"] == "test-vs-train: 40 test queries against the 120 train rows"
    table = pd.read_parquet(out / "per_query.parquet")
    assert len(table) == 40 and table["sample_id"].str.startswith("s").all()
    assert table["hit@1"].mean() == pytest.approx(res["metrics"]["recall@1"])
    assert table["ap"].mean() == pytest.approx(res["metrics"]["map"])
    pd.testing.assert_frame_equal(pd.read_csv(out / "per_query.csv", dtype={"sample_id": str}), table,
                                  check_dtype=False)
    for key in ("recall@1", "recall@5", "recall@10", "map"):
        low, high = res["ci95"][key]
        assert low <= res["metrics"][key] <= high and high - low < 0.5
    assert res["per_query"]["parquet"].endswith("per_query.parquet")


def test_ap_at_k_is_normalised_by_min_k_and_relevant():
    rel = np.zeros(10, bool)
    rel[:10] = True
    assert M.average_precision_at_k(rel, 10, num_relevant=250) == pytest.approx(1.0)  # was 10 / 250
    rel = np.array([1, 0, 1, 0, 0], bool)
    assert M.average_precision_at_k(rel, 5, num_relevant=2) == pytest.approx((1 + 2 / 3) / 2)
    assert M.average_precision_at_k(rel, 5, num_relevant=9) == pytest.approx((1 + 2 / 3) / 5)
    out = M.retrieval_metrics(np.zeros(2, int), np.zeros((2, 10), int), num_relevant=np.array([250, 250]), ks=(1,))
    assert out["map_at_10"] == pytest.approx(1.0)


def test_revisited_mp_at_k_follows_revisitop_compute_map():
    # two positives at (1-based) ranks 1 and 3: revisitop divides by min(k, 3) -> 2/3 at k = 5 and 10
    out = M.revisited_map(np.array([[0, 9, 1, 5, 6, 7, 8, 2, 3, 4]]), [{"easy": [0, 1], "hard": [], "junk": []}],
                          ks=(1, 2, 5, 10))
    assert out["easy"]["mp@10"] == pytest.approx(2 / 3)
    assert out["easy"]["mp@5"] == pytest.approx(2 / 3)
    assert out["easy"]["mp@2"] == pytest.approx(0.5)
    assert out["easy"]["mp@1"] == pytest.approx(1.0)


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    values = np.random.default_rng(1).random(200) > 0.3
    a = M.bootstrap_ci(values, seed=0)
    assert a == M.bootstrap_ci(values, seed=0) and a != M.bootstrap_ci(values, seed=1)
    assert a[0] < values.mean() < a[1] and 0.05 < a[1] - a[0] < 0.2
