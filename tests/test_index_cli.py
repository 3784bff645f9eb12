"""`lgff index` / `lgff evaluate` end to end on small embeddings sets, and their bad-input errors (exit 2)."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lgff_core.cli import main
from lgff_core.data.embeddings import EmbeddingTable, read_embeddings, write_embeddings
from lgff_core.index import read_neighbours

D = 16
N_CLASSES = 4


def make_embeddings(n_train=120, n_test=40, seed=0, d=D):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(N_CLASSES, d))
    n = n_train + n_test
    labels = np.arange(n) % N_CLASSES
    x = centers[labels] + 0.8 * rng.normal(size=(n, d))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return EmbeddingTable(
        ids=np.array([f"s{i:04d}" for i in range(n)], dtype=object),
        labels=labels.astype(np.int64),
        groups=np.array([f"scan{i % 7}" for i in range(n)], dtype=object),
        splits=np.array(["train"] * n_train + ["test"] * n_test, dtype=object),
        xb=x,
        label_names=[f"class{c}" for c in range(N_CLASSES)],
    )


@pytest.fixture
def emb_uri(tmp_path):
    uri = str(tmp_path / "emb")
    write_embeddings(uri, make_embeddings(), num_shards=3, model="lgff-test", source="file:///data/x")
    return uri


def run(*argv):
    return main(["-q", *argv])


def test_embeddings_roundtrip(emb_uri):
    emb = read_embeddings(emb_uri)
    ref = make_embeddings()
    np.testing.assert_array_equal(emb.xb, ref.xb)
    assert emb.ids.tolist() == ref.ids.tolist() and emb.label_names == ref.label_names
    assert len(read_embeddings(emb_uri, split="test")) == 40


def test_build_search_evaluate(emb_uri, tmp_path):
    idx, nb, mj = (str(tmp_path / p) for p in ("idx", "nb.parquet", "m.json"))
    assert run("index", "build", "--embeddings", emb_uri, "--split", "train", "--out", idx) == 0
    assert run("index", "search", "--index", idx, "--queries", emb_uri, "--query-split", "test", "--k", "10",
               "--out", nb) == 0
    table, meta = read_neighbours(nb)
    assert table.num_rows == 40 and meta["k"] == 10 and meta["query_split"] == "test"
    assert all(len(r) == 10 for r in table.column("neighbor_ids").to_pylist())
    assert run("evaluate", "retrieval", "--neighbors", nb, "--protocol", "test-vs-train", "--out", mj) == 0
    res = json.loads(open(mj).read())
    assert res["model"] == "lgff-test" and res["is_baseline"] is False
    assert res["dataset"] == "file:///data/x" and res["neighbors"] == nb
    assert "map_at_10" in res["metrics"] and "map" not in res["metrics"]
    # same numbers as the exact full-ranking path restricted to the top 10
    mj2 = str(tmp_path / "m2.json")
    assert run("evaluate", "retrieval", "--embeddings", emb_uri, "--protocol", "test-vs-train", "--out", mj2) == 0
    full = json.loads(open(mj2).read())
    assert full["full_ranking"] and "map" in full["metrics"]
    for key in ("eta_p", "eta_w", "eta_tot", "recall@1", "recall@5", "recall@10", "mmv@5", "precision@10"):
        assert res["metrics"][key] == pytest.approx(full["metrics"][key]), key
    assert full["metrics"]["eta_p"] > 0.5  # well-separated clusters
    assert [r["n_queries"] for r in full["per_class"]] == [10, 10, 10, 10]


def test_leave_one_out_needs_self_exclusion(emb_uri, tmp_path):
    idx, nb, mj = (str(tmp_path / p) for p in ("idx", "nb.parquet", "m.json"))
    run("index", "build", "--embeddings", emb_uri, "--split", "test", "--out", idx)
    run("index", "search", "--index", idx, "--queries", emb_uri, "--query-split", "test", "--k", "5",
        "--no-exclude-self", "--out", nb)
    assert run("evaluate", "retrieval", "--neighbors", nb, "--protocol", "leave-one-out", "--out", mj) == 2
    run("index", "search", "--index", idx, "--queries", emb_uri, "--query-split", "test", "--k", "all",
        "--exclude-self", "--out", nb)
    assert run("evaluate", "retrieval", "--neighbors", nb, "--protocol", "leave-one-out", "--out", mj) == 0
    via_nb = json.loads(open(mj).read())
    assert via_nb["full_ranking"] is True
    run("evaluate", "retrieval", "--embeddings", emb_uri, "--protocol", "leave-one-out", "--out", mj)
    direct = json.loads(open(mj).read())
    assert via_nb["metrics"] == pytest.approx(direct["metrics"])


@pytest.mark.parametrize("factory", ["IVF8,Flat", "Flat"])
def test_sharded_cli_build_equals_one_shot(emb_uri, tmp_path, factory):
    one, trained = str(tmp_path / "one"), str(tmp_path / "trained")
    # trained on a 60-row sample of the train split: both paths must draw the same sample
    common = ["--embeddings", emb_uri, "--factory", factory, "--split", "train", "--train-sample", "60"]
    assert run("index", "build", *common, "--out", one) == 0
    assert run("index", "train", *common, "--out", trained) == 0
    parts = []
    for i in (2, 0, 1):  # any order; 3 blocks over the 3 embeddings shards
        parts.append(str(tmp_path / f"part{i}"))
        assert run("index", "add", "--trained", trained, "--embeddings", emb_uri, "--shard", f"{i}/3",
                   "--out", parts[-1]) == 0
    merged = str(tmp_path / "merged")
    assert run("index", "merge", "--trained", trained, "--partials", *parts, "--out", merged) == 0
    results = []
    for idx in (one, merged):
        out = str(tmp_path / f"nb-{len(results)}.parquet")
        assert run("index", "search", "--index", idx, "--queries", emb_uri, "--k", "8", "--nprobe", "2",
                   "--out", out) == 0
        results.append(read_neighbours(out)[0].to_pydict())
    assert all(set(r) <= {f"s{i:04d}" for i in range(120)} for r in results[0]["neighbor_ids"])  # train rows only
    assert results[0]["neighbor_ids"] == results[1]["neighbor_ids"]
    assert results[0]["neighbor_positions"] == results[1]["neighbor_positions"]
    # incomplete partial set
    assert run("index", "merge", "--trained", trained, "--partials", parts[0], "--out", merged + "x") == 2


def test_bad_inputs_exit_2(emb_uri, tmp_path, capsys):
    idx = str(tmp_path / "idx")
    run("index", "build", "--embeddings", emb_uri, "--split", "train", "--out", idx)
    # k larger than the database
    assert run("index", "search", "--index", idx, "--queries", emb_uri, "--k", "500",
               "--out", str(tmp_path / "n.parquet")) == 2
    assert "larger than the database: 120" in capsys.readouterr().err
    # queries of another dimension
    other = make_embeddings(d=8)
    write_embeddings(str(tmp_path / "e8"), other)
    assert run("index", "search", "--index", idx, "--queries", str(tmp_path / "e8"), "--k", "3",
               "--out", str(tmp_path / "n.parquet")) == 2
    assert "dimension 8" in capsys.readouterr().err
    # id map rewritten after publication (valid Parquet, fewer rows): its sha256 no longer matches index.json
    listed = json.loads(open(f"{idx}/index.json").read())["files"]["idmap.parquet"]["path"]
    idmap = pq.read_table(f"{idx}/{listed}")
    pq.write_table(idmap.slice(0, 100), f"{idx}/{listed}")
    assert run("index", "search", "--index", idx, "--queries", emb_uri, "--k", "3",
               "--out", str(tmp_path / "n.parquet")) == 2
    assert "differ from index.json" in capsys.readouterr().err
    # query labels unknown to the database
    e = make_embeddings()
    e.labels[e.splits == "test"] = 9
    write_embeddings(str(tmp_path / "eu"), e)
    assert run("evaluate", "retrieval", "--embeddings", str(tmp_path / "eu"), "--protocol", "test-vs-train",
               "--out", str(tmp_path / "m.json")) == 2
    assert "unknown to the database" in capsys.readouterr().err
    # NaN in a stored shard
    bad = str(tmp_path / "nan")
    write_embeddings(bad, make_embeddings())
    t = pq.read_table(f"{bad}/part-00000.parquet")
    x = np.stack(t.column("embedding").to_pylist()).astype(np.float32)
    x[5, 0] = np.inf
    emb_col = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel(), pa.float32()), D)
    pq.write_table(t.set_column(5, "embedding", emb_col), f"{bad}/part-00000.parquet")
    assert run("index", "build", "--embeddings", bad, "--out", str(tmp_path / "i2")) == 2
    assert "part-00000.parquet: shard does not match the embeddings manifest" in capsys.readouterr().err
    # ... and with a manifest that matches the tampered bytes, the vectors themselves are checked
    import hashlib

    manifest = json.loads(open(f"{bad}/_manifest.json").read())
    manifest["shards"][0]["sha256"] = hashlib.sha256(open(f"{bad}/part-00000.parquet", "rb").read()).hexdigest()
    open(f"{bad}/_manifest.json", "w").write(json.dumps(manifest))
    assert run("index", "build", "--embeddings", bad, "--out", str(tmp_path / "i2")) == 2
    assert "NaN or inf (first at row 5)" in capsys.readouterr().err
    assert not (tmp_path / "i2" / "index.json").exists()


def test_evaluate_through_an_index_over_all_splits(emb_uri, tmp_path):
    """An index over every split, restricted to the protocol's database split, equals the exact in-memory path."""
    idx, out = str(tmp_path / "idx"), str(tmp_path / "eval")
    run("index", "build", "--embeddings", emb_uri, "--out", idx)  # train + test rows
    for protocol in ("test-vs-train", "leave-one-out"):
        assert run("evaluate", "retrieval", "--embeddings", emb_uri, "--index", idx, "--protocol", protocol,
                   "--label", "baseline-gem-last", "--out", out) == 0
        via_index = json.loads(open(f"{out}/metrics.json").read())
        table, _ = read_neighbours(f"{out}/neighbors.parquet")
        splits = set(read_embeddings(emb_uri).with_split("train" if protocol == "test-vs-train" else "test").ids)
        assert all(set(r) <= splits for r in table.column("neighbor_ids").to_pylist())
        assert via_index["is_baseline"] is True and via_index["full_ranking"] is True
        run("evaluate", "retrieval", "--embeddings", emb_uri, "--protocol", protocol, "--out", str(tmp_path / "x.json"))
        exact = json.loads(open(tmp_path / "x.json").read())
        assert via_index["metrics"] == pytest.approx(exact["metrics"]), protocol


def test_evaluate_roxford_cli(tmp_path):
    """Revisited Oxford layout: database / query names matched to sample_ids; hand-checkable rankings."""
    import pickle

    # database of 4 images on a circle; the query sits at angle 0
    angles = np.array([0.1, 0.5, 1.0, 1.5])
    xb = np.stack([np.cos(angles), np.sin(angles)], 1).astype(np.float32)
    names = ["all_souls_000001", "all_souls_000002", "bodleian_000003", "christ_church_000004"]
    write_embeddings(str(tmp_path / "db"), EmbeddingTable(
        ids=np.array([n + ".jpg" for n in names], dtype=object), labels=np.zeros(4, np.int64),
        groups=np.array(names, dtype=object), splits=np.array(["db"] * 4, dtype=object), xb=xb))
    write_embeddings(str(tmp_path / "q"), EmbeddingTable(
        ids=np.array(["all_souls_q"], dtype=object), labels=np.zeros(1, np.int64),
        groups=np.array(["q"], dtype=object), splits=np.array(["q"], dtype=object),
        xb=np.array([[1.0, 0.0]], np.float32)))
    # ranking of the query: 0, 1, 2, 3. easy = [1], hard = [2], junk = [0]
    gnd = {"imlist": names, "qimlist": ["all_souls_q"], "gnd": [{"easy": [1], "hard": [2], "junk": [0]}]}
    (tmp_path / "gnd.pkl").write_bytes(pickle.dumps(gnd))
    out = str(tmp_path / "rox.json")
    assert run("evaluate", "roxford", "--gnd", str(tmp_path / "gnd.pkl"), "--embeddings", str(tmp_path / "db"),
               "--queries", str(tmp_path / "q"), "--out", out) == 0
    res = json.loads(open(out).read())["metrics"]
    assert res["easy"]["map"] == pytest.approx(1.0)    # junk 0 and hard 2 ignored -> easy 1 first
    assert res["medium"]["map"] == pytest.approx(1.0)  # junk 0 ignored -> 1, 2 first
    assert res["hard"]["map"] == pytest.approx(1.0)    # 0 and 1 ignored -> 2 first
    gnd["gnd"] = [{"easy": [3], "hard": [], "junk": []}]
    (tmp_path / "gnd.pkl").write_bytes(pickle.dumps(gnd))
    run("evaluate", "roxford", "--gnd", str(tmp_path / "gnd.pkl"), "--embeddings", str(tmp_path / "db"),
        "--queries", str(tmp_path / "q"), "--out", out)
    res = json.loads(open(out).read())["metrics"]
    assert res["easy"]["map"] == pytest.approx((0 / 3 + 1 / 4) / 2)  # hit at rank r=3, j=0: (j/r + (j+1)/(r+1)) / 2
    assert res["hard"]["map"] is None and res["hard"]["n_queries"] == 0
    # a name missing from the embeddings
    gnd["imlist"] = names[:3] + ["radcliffe_camera_000009"]
    (tmp_path / "gnd.pkl").write_bytes(pickle.dumps(gnd))
    assert run("evaluate", "roxford", "--gnd", str(tmp_path / "gnd.pkl"), "--embeddings", str(tmp_path / "db"),
               "--queries", str(tmp_path / "q"), "--out", out) == 2
