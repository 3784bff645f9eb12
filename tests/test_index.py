"""faiss index helpers (lgff_core.index) against exact numpy search and hand-worked exclusions."""
import faiss
import numpy as np
import pytest

from lgff_core import index as ix
from lgff_core.evaluate import metrics as M
from lgff_core.data.embeddings import EmbeddingTable
from lgff_core.errors import DataError, IndexError_

faiss.omp_set_num_threads(1)


def clustered(n, d, n_clusters=8, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_clusters, d)).astype(np.float32)
    labels = rng.integers(0, n_clusters, size=n)
    x = centers[labels] + 0.3 * rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), labels


def table(x, labels, groups=None, prefix="db", split="train"):
    n = len(x)
    return EmbeddingTable(
        ids=np.array([f"{prefix}{i}" for i in range(n)], dtype=object),
        labels=np.asarray(labels, np.int64),
        groups=np.array(groups if groups is not None else [f"g{i}" for i in range(n)], dtype=object),
        splits=np.array([split] * n, dtype=object),
        xb=np.asarray(x, np.float32),
    )


def bundle_of(t, factory="Flat"):
    index = ix.build_index(t.xb, factory)
    return ix.IndexBundle(index, ix.idmap_table(t), {"metric": "ip", "factory": factory})


def test_flat_search_matches_exact_numpy():
    xb, _ = clustered(300, 16)
    xq, _ = clustered(20, 16, seed=1)
    index = ix.build_index(xb, "Flat")
    D, I = ix.search(index, ix.prepare_vectors(xq, "ip"), 10)
    (_, I_ref, D_ref), = list(M.full_ranking(xq, xb))
    np.testing.assert_array_equal(I, I_ref[:, :10])
    np.testing.assert_allclose(D, D_ref[:, :10], rtol=1e-5, atol=1e-5)


def test_ties_are_broken_by_database_position():
    e0, e1 = [1.0, 0.0], [0.0, 1.0]
    # 40 exact duplicates of e0 spread over the database, e1 in between
    xb = np.array([e1 if i % 3 == 0 else e0 for i in range(60)], np.float32)
    index = ix.build_index(xb, "Flat")
    xq = np.array([e0, e1], np.float32)
    D, I = ix.search(index, xq, 5)
    dup0 = [i for i in range(60) if i % 3]
    assert I[0].tolist() == dup0[:5]
    assert I[1].tolist() == [0, 3, 6, 9, 12]
    assert np.all(D[0] == 1.0)


def test_exclude_self_and_same_group_hand_worked():
    # 1-D-ish vectors on a circle: similarity ordering is known
    angles = np.array([0.0, 0.1, 0.2, 0.3, 1.5, 1.6])
    x = np.stack([np.cos(angles), np.sin(angles)], 1)
    labels = [0, 0, 1, 1, 2, 2]
    groups = ["A", "A", "B", "C", "C", "D"]
    db = table(x, labels, groups)
    b = bundle_of(db)
    # queries = the database itself (leave-one-out)
    plain = ix.search_neighbours(b, db, 3).to_pydict()
    assert plain["neighbor_positions"][0] == [0, 1, 2]
    selfx = ix.search_neighbours(b, db, 3, exclude_self=True).to_pydict()
    assert selfx["neighbor_positions"][0] == [1, 2, 3]
    assert selfx["neighbor_positions"][3] == [2, 1, 0]
    assert selfx["num_relevant"] == [1, 1, 1, 1, 1, 1]
    grp = ix.search_neighbours(b, db, 3, exclude_self=True, exclude_same_group=True).to_pydict()
    assert grp["neighbor_positions"][0] == [2, 3, 4]  # 1 is in group A with query 0
    assert grp["neighbor_positions"][3] == [2, 1, 0]  # 4 shares group C
    assert grp["num_relevant"] == [0, 0, 1, 1, 1, 1]  # q0's only same-label item (1) is in its group
    assert grp["num_candidates"] == [4, 4, 5, 4, 4, 5]
    assert grp["neighbor_ids"][3] == ["db2", "db1", "db0"]


def test_full_ranking_with_exclusions_and_metrics():
    x, labels = clustered(40, 8, n_clusters=4)
    db = table(x, labels, groups=[f"s{i % 5}" for i in range(40)])
    b = bundle_of(db)
    nb = ix.search_neighbours(b, db, None, exclude_self=True, exclude_same_group=True).to_pydict()
    for q in range(40):
        assert len(nb["neighbor_positions"][q]) == nb["num_candidates"][q] == 32
        assert f"s{q % 5}" not in nb["neighbor_groups"][q]
        rel = np.array(nb["neighbor_labels"][q]) == labels[q]
        assert rel.sum() == nb["num_relevant"][q]


def test_k_larger_than_database_is_an_error():
    x, labels = clustered(10, 4)
    b = bundle_of(table(x, labels))
    with pytest.raises(IndexError_, match="larger than the database: 10"):
        ix.search_neighbours(b, table(x[:2], labels[:2], prefix="q"), 11)
    with pytest.raises(IndexError_, match="1 excluded"):
        ix.search_neighbours(b, table(x, labels), 10, exclude_self=True)


def test_bad_vectors_and_idmap_mismatch():
    x, labels = clustered(10, 4)
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(DataError, match="NaN or inf.*row 3"):
        ix.build_index(bad, "Flat")
    b = bundle_of(table(x, labels))
    with pytest.raises(DataError, match="dimension 5, expected 4"):
        ix.search_neighbours(b, table(np.ones((2, 5)), [0, 0], prefix="q"), 1)
    with pytest.raises(IndexError_, match="id map has 9 rows but the index holds 10"):
        ix.IndexBundle(b.index, b.idmap.slice(0, 9), {})
    with pytest.raises(IndexError_, match="cannot build"):
        ix.new_index(4, "NotAFactory", "ip")


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat", "IVF16,SQ8", "HNSW16", "IVF16,PQ4x4fs,RFlat"])
def test_sharded_build_matches_one_shot(factory):
    xb, _ = clustered(1200, 32, n_clusters=16)
    xq, _ = clustered(30, 32, seed=3)
    xb_p = ix.prepare_vectors(xb, "ip")
    trained = ix.train_index(xb_p, factory)
    one_shot = faiss.clone_index(trained)
    one_shot.add(xb_p)
    bounds = [0, 250, 700, 1200]
    partials = [ix.add_shard(trained, xb[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    merged = ix.merge_shards(trained, partials)
    assert merged.ntotal == 1200
    xq_p = ix.prepare_vectors(xq, "ip")
    for index in (one_shot, merged):
        ix.set_search_params(index, nprobe=4, ef_search=32)
    D1, I1 = ix.search(one_shot, xq_p, 10)
    D2, I2 = ix.search(merged, xq_p, 10)
    np.testing.assert_array_equal(I1, I2)
    np.testing.assert_allclose(D1, D2, rtol=1e-5)
    if factory == "Flat":
        (_, I_ref, _), = list(M.full_ranking(xq, xb))
        np.testing.assert_array_equal(I1, I_ref[:, :10])


def test_save_load_roundtrip(tmp_path):
    x, labels = clustered(50, 8)
    t = table(x, labels)
    index = ix.build_index(t.xb, "IVF4,Flat")
    meta = ix.save_index(index, ix.idmap_table(t), str(tmp_path / "idx"), {"factory": "IVF4,Flat", "metric": "ip"})
    assert meta["ntotal"] == 50
    b = ix.load_index(str(tmp_path / "idx"))
    assert b.ids.tolist() == t.ids.tolist() and b.labels.tolist() == list(labels)
    with pytest.raises(IndexError_, match="not an index"):
        ix.load_index(str(tmp_path / "nothing"))
