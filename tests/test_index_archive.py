"""Archive-scale index: on-disk IVF merge, append / remove versions, size refusal, sampled evaluation, atomic rebuild."""
import json
import os

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest

from lgff_core import index as ix
from lgff_core.evaluate import metrics as M
from lgff_core.evaluate import protocol as P
from lgff_core.cli import main
from lgff_core.data.embeddings import EmbeddingTable, read_embeddings, write_embeddings

faiss.omp_set_num_threads(1)
D = 16
FACTORY = "IVF8,SQ8"


def make(n, seed=0, first=0, n_classes=4, split="train"):
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(99).normal(size=(n_classes, D))
    labels = (np.arange(n) + first) % n_classes
    x = centers[labels] + 0.7 * rng.normal(size=(n, D))
    return EmbeddingTable(
        ids=np.array([f"s{i:05d}" for i in range(first, first + n)], dtype=object),
        labels=labels.astype(np.int64),
        groups=np.array([f"slide{i % 9}" for i in range(first, first + n)], dtype=object),
        splits=np.array([split] * n, dtype=object),
        xb=x.astype(np.float32),
        label_names=[f"c{c}" for c in range(n_classes)],
    )


def concat(*tables):
    return EmbeddingTable(*(np.concatenate([getattr(t, f) for t in tables]) for f in
                            ("ids", "labels", "groups", "splits", "xb")), label_names=tables[0].label_names)


def run(*argv):
    return main(["-q", *argv])


def reference(trained: faiss.Index, xb: np.ndarray, nprobe: int) -> faiss.Index:
    """The same IVF built in RAM in one shot: the trained quantizer plus every vector, ids = rows."""
    index = faiss.clone_index(trained)
    index.add(ix.prepare_vectors(xb, "ip"))
    ix.set_search_params(index, nprobe=nprobe)
    return index


def trained_of(uri):
    meta = ix.read_manifest(uri)
    return faiss.read_index(os.path.join(uri, meta["files"]["trained.faiss"]["path"]))


@pytest.fixture
def sets(tmp_path):
    a, b = make(300), make(120, seed=1, first=300)
    q = make(25, seed=2, first=10_000, split="test")
    uris = {name: str(tmp_path / name) for name in ("a", "b", "all", "q")}
    write_embeddings(uris["a"], a, num_shards=3)
    write_embeddings(uris["b"], b, num_shards=2)
    write_embeddings(uris["all"], concat(a, b), num_shards=4)
    write_embeddings(uris["q"], q)
    return uris, a, b, q


def test_sharded_ondisk_merge_equals_in_ram_one_shot(sets, tmp_path):
    uris, a, b, q = sets
    trained, merged = str(tmp_path / "t"), str(tmp_path / "m")
    assert run("index", "train", "--embeddings", uris["all"], "--factory", FACTORY, "--out", trained) == 0
    parts = []
    for rows in ("200:420", "0:130", "130:200"):  # row blocks in any order, not aligned with shards
        parts.append(str(tmp_path / f"p{rows}"))
        assert run("index", "add", "--trained", trained, "--embeddings", uris["all"], "--rows", rows,
                   "--out", parts[-1]) == 0
    # a partial holds its lists only: the coarse quantizer is the trained index's, not copied into every partial
    part_meta = ix.read_manifest(parts[0], name=ix.PARTIAL_META)
    part = faiss.read_index(os.path.join(parts[0], part_meta["files"]["index.faiss"]["path"]), faiss.IO_FLAG_MMAP)
    assert faiss.extract_index_ivf(part).quantizer.ntotal == 0 and part.ntotal == 220
    assert run("index", "merge", "--trained", trained, "--partials", *parts, "--out", merged) == 0
    meta = ix.read_manifest(merged)
    assert meta["ondisk"] is True and meta["ntotal"] == 420 and meta["nprobe"] == 16
    files = meta["files"]
    assert set(files) == {"index.faiss", "index.ivfdata", "trained.faiss", "idmap.parquet"}
    assert files["index.ivfdata"]["size"] > files["index.faiss"]["size"]
    bundle = ix.load_index(merged)
    assert isinstance(faiss.downcast_InvertedLists(faiss.extract_index_ivf(bundle.index).invlists),
                      faiss.OnDiskInvertedLists)
    ref = reference(trained_of(trained), concat(a, b).xb, nprobe=3)
    ix.set_search_params(bundle.index, nprobe=3)
    xq = ix.prepare_vectors(q.xb, "ip")
    D1, I1 = ix.search(ref, xq, 10)
    D2, I2 = ix.search(bundle.index, xq, 10)
    np.testing.assert_array_equal(I1, I2)
    np.testing.assert_array_equal(D1, D2)
    assert bundle.ids.tolist() == concat(a, b).ids.tolist()
    # a missing block is refused
    assert run("index", "merge", "--trained", trained, "--partials", parts[0], parts[1], "--out",
               str(tmp_path / "m2")) == 2


def test_append_equals_rebuild_with_same_quantizer_and_parent_stays(sets, tmp_path):
    uris, a, b, q = sets
    idx_a, idx_ab = str(tmp_path / "ia"), str(tmp_path / "iab")
    assert run("index", "build", "--embeddings", uris["a"], "--factory", FACTORY, "--out", idx_a,
               "--set", "index.block_rows=70") == 0
    assert run("index", "add", "--to", idx_a, "--embeddings", uris["b"], "--out", idx_ab,
               "--set", "index.block_rows=50") == 0
    meta = ix.read_manifest(idx_ab)
    assert meta["parent"]["uri"] == idx_a and meta["parent"]["version"] == 1 and meta["ntotal"] == 420
    assert [h["rows"] for h in meta["holds"]] == [300, 120]
    assert meta["quantizer_sha256"] == ix.read_manifest(idx_a)["quantizer_sha256"]
    ref = reference(trained_of(idx_a), concat(a, b).xb, nprobe=4)
    for uri, n in ((idx_ab, 420), (idx_a, 300)):  # the parent is still there and unchanged
        bundle = ix.load_index(uri)
        assert bundle.index.ntotal == n
    appended = ix.load_index(idx_ab)
    ix.set_search_params(appended.index, nprobe=4)
    xq = ix.prepare_vectors(q.xb, "ip")
    np.testing.assert_array_equal(ix.search(appended.index, xq, 12)[1], ix.search(ref, xq, 12)[1])
    assert appended.ids.tolist() == concat(a, b).ids.tolist()


def _search_all(uri, xq, k, nprobe):
    bundle = ix.load_index(uri)
    ix.set_search_params(bundle.index, nprobe=nprobe)
    D_, I_ = ix.search(bundle.index, xq, k)
    return D_, I_, bundle


@pytest.mark.parametrize("factory", [FACTORY, "Flat"])
def test_append_skip_existing_equals_appending_only_the_new_rows(sets, tmp_path, capsys, factory):
    """The reindex pipeline's append: the collected embeddings = the parent's rows + new ones, interleaved."""
    uris, a, b, q = sets
    grown = concat(a.subset(np.arange(100)), b.subset(np.arange(60)), a.subset(np.arange(100, 300)),
                   b.subset(np.arange(60, 120)))
    uris["grown"] = str(tmp_path / "grown")
    write_embeddings(uris["grown"], grown, num_shards=5)
    base, only_new, skipped = (str(tmp_path / n) for n in ("base", "only-new", "skipped"))
    assert run("index", "build", "--embeddings", uris["a"], "--factory", factory, "--out", base) == 0
    small_blocks = ["--set", "index.block_rows=50"]  # blocks wholly old, wholly new and mixed
    assert run("index", "add", "--to", base, "--embeddings", uris["b"], "--out", only_new, *small_blocks) == 0
    capsys.readouterr()
    assert main(["index", "add", "--to", base, "--embeddings", uris["grown"], "--skip-existing",  # logs INFO
                 "--out", skipped, *small_blocks]) == 0
    out = capsys.readouterr()
    assert "appended 120 vectors" in out.out and "300 skipped" in out.out
    assert "appending 120 of 420 rows" in out.err  # the library's log line
    meta = ix.read_manifest(skipped)
    assert meta["ntotal"] == 420 and meta["parent"]["uri"] == base
    assert meta["holds"][-1] == {"embeddings": uris["grown"], "split": None, "rows": 120, "skipped": 300}
    xq = ix.prepare_vectors(q.xb, "ip")
    D1, I1, got = _search_all(skipped, xq, 20, nprobe=4)
    D2, I2, ref_bundle = _search_all(only_new, xq, 20, nprobe=4)
    np.testing.assert_array_equal(I1, I2)
    np.testing.assert_array_equal(D1, D2)
    assert got.ids.tolist() == ref_bundle.ids.tolist() == concat(a, b).ids.tolist()
    if factory == FACTORY:  # and = a rebuild over every row with the parent's trained quantizer
        D3, I3 = ix.search(reference(trained_of(base), concat(a, b).xb, nprobe=4), xq, 20)
        np.testing.assert_array_equal(I1, I3)
        np.testing.assert_array_equal(D1, D3)
    # a rerun over the same rows appends nothing: still a new version (parent = the index appended to) holding
    # exactly its rows, so the caller always gets an index at --out
    again = str(tmp_path / "again")
    assert run("index", "add", "--to", skipped, "--embeddings", uris["grown"], "--skip-existing", "--out", again) == 0
    assert "appended 0 vectors" in capsys.readouterr().out
    meta = ix.read_manifest(again)
    assert meta["ntotal"] == 420 and meta["parent"]["uri"] == skipped and meta["version"] == 1
    assert meta["holds"][-1]["rows"] == 0 and meta["holds"][-1]["skipped"] == 420
    D4, I4, same = _search_all(again, xq, 20, nprobe=4)
    np.testing.assert_array_equal(I4, I1)
    np.testing.assert_array_equal(D4, D1)
    assert same.ids.tolist() == got.ids.tolist()
    # --skip-existing belongs to --to
    assert run("index", "add", "--trained", base, "--embeddings", uris["b"], "--rows", "0:10", "--skip-existing",
               "--out", str(tmp_path / "p")) == 2


def test_remove_ids_removes_exactly_them(sets, tmp_path):
    uris, a, b, q = sets
    idx, out = str(tmp_path / "i"), str(tmp_path / "r")
    assert run("index", "build", "--embeddings", uris["all"], "--factory", FACTORY, "--out", idx) == 0
    everything = concat(a, b)
    gone = ["s00000", "s00007", "s00299", "s00300", "s00419"]
    (tmp_path / "ids.txt").write_text("\n".join(gone) + "\n")
    assert run("index", "remove", "--index", idx, "--ids", str(tmp_path / "ids.txt"), "--out", out) == 0
    meta = ix.read_manifest(out)
    assert meta["ntotal"] == 415 and meta["removed"] == 5 and meta["parent"]["uri"] == idx
    keep = ~np.isin(everything.ids, gone)
    removed = ix.load_index(out)
    assert removed.ids.tolist() == everything.ids[keep].tolist()
    ref = reference(trained_of(idx), everything.xb[keep], nprobe=8)
    ix.set_search_params(removed.index, nprobe=8)  # nprobe = nlist: every remaining vector is reachable
    xq = ix.prepare_vectors(everything.xb, "ip")
    D1, I1 = ix.search(removed.index, xq, 415)
    np.testing.assert_array_equal(I1, ix.search(ref, xq, 415)[1])
    assert set(removed.ids[I1[0]].tolist()) == set(everything.ids[keep].tolist())
    assert ix.load_index(idx).index.ntotal == 420  # the parent still holds them
    # an id the index does not hold is an error, nothing written
    (tmp_path / "bad.txt").write_text("s00001\nnot-there\n")
    assert run("index", "remove", "--index", idx, "--ids", str(tmp_path / "bad.txt"), "--out",
               str(tmp_path / "r2")) == 2
    assert not (tmp_path / "r2" / "index.json").exists()


def test_flat_above_max_in_ram_is_refused_with_an_ivf_factory(sets, tmp_path, capsys):
    uris, *_ = sets
    out = tmp_path / "flat"
    for factory in ("Flat", "HNSW16"):
        assert run("index", "build", "--embeddings", uris["all"], "--factory", factory, "--out", str(out),
                   "--set", "index.max_in_ram_vectors=400") == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        assert "420 vectors in RAM" in err and "index.max_in_ram_vectors=400" in err
        assert "--factory IVF64,SQ8" in err
        assert not out.exists()
    assert run("index", "train", "--embeddings", uris["all"], "--factory", "Flat", "--out", str(out),
               "--set", "index.max_in_ram_vectors=400") == 2
    assert run("index", "build", "--embeddings", uris["all"], "--factory", "IVF64,SQ8", "--out", str(out),
               "--set", "index.max_in_ram_vectors=400") == 0


def test_query_sample_is_stratified_and_seeded():
    labels = np.array([0] * 500 + [1] * 300 + [2] * 190 + [3] * 10)
    s = P.sample_queries(labels, 100, seed=1)
    assert len(s) == 100 and len(np.unique(s)) == 100 and np.all(np.diff(s) > 0)
    assert np.bincount(labels[s]).tolist() == [50, 30, 19, 1]
    assert np.array_equal(s, P.sample_queries(labels, 100, seed=1))
    assert not np.array_equal(s, P.sample_queries(labels, 100, seed=2))
    assert np.array_equal(P.sample_queries(labels, 5000, seed=1), np.arange(1000))  # few enough: all, in order


def test_evaluate_sampled_through_ondisk_index_reports_the_sample(tmp_path):
    emb = concat(make(400), make(120, seed=3, first=400, split="test"))
    uri, idx, out = str(tmp_path / "e"), str(tmp_path / "i"), str(tmp_path / "ev")
    write_embeddings(uri, emb, num_shards=3)
    assert run("index", "build", "--embeddings", uri, "--split", "train", "--factory", FACTORY, "--out", idx) == 0
    assert run("evaluate", "retrieval", "--embeddings", uri, "--index", idx, "--protocol", "test-vs-train",
               "--max-queries", "40", "--query-batch", "16", "--out", out, "--set", "evaluate.k=10") == 0
    res = json.loads(open(f"{out}/metrics.json").read())
    assert res["n_queries"] == 40
    assert res["sample"] == {"n_queries": 40, "n_queries_total": 120, "sampled": True, "seed": 0,
                             "stratified_by": "label", "max_queries": 40, "k": 10, "query_batch": 16}
    assert [r["n_queries"] for r in res["per_class"]] == [10, 10, 10, 10]
    table, _ = ix.read_neighbours(f"{out}/neighbors.parquet")
    assert table.num_rows == 40 and all(len(r) == 10 for r in table.column("neighbor_ids").to_pylist())
    # the same seed draws the same queries
    assert run("evaluate", "retrieval", "--embeddings", uri, "--index", idx, "--protocol", "test-vs-train",
               "--max-queries", "40", "--out", str(tmp_path / "ev2"), "--set", "evaluate.k=10") == 0
    again, _ = ix.read_neighbours(str(tmp_path / "ev2" / "neighbors.parquet"))
    assert again.column("sample_id").to_pylist() == table.column("sample_id").to_pylist()


def test_small_set_keeps_exact_full_ranking_numbers(tmp_path):
    """Below max_queries, batched evaluation = the exact full ranking of every query (mAP over everything)."""
    emb = concat(make(90), make(30, seed=3, first=90, split="test"))
    uri = str(tmp_path / "e")
    write_embeddings(uri, emb, num_shards=2)
    outs = []
    for batch in ("7", "1000"):
        out = str(tmp_path / f"m{batch}.json")
        assert run("evaluate", "retrieval", "--embeddings", uri, "--protocol", "test-vs-train",
                   "--query-batch", batch, "--out", out) == 0
        outs.append(json.loads(open(out).read()))
    assert outs[0]["metrics"] == outs[1]["metrics"] and outs[0]["full_ranking"] is True
    assert outs[0]["sample"]["sampled"] is False and outs[0]["n_queries"] == 30
    test, train = emb.with_split("test"), emb.with_split("train")
    xq = test.xb / np.linalg.norm(test.xb, axis=1, keepdims=True)
    xb = train.xb / np.linalg.norm(train.xb, axis=1, keepdims=True)
    (_, I, _), = list(M.full_ranking(xq, xb))
    exact = M.retrieval_metrics(test.labels, train.labels[I], num_relevant=np.bincount(train.labels)[test.labels],
                                full_ranking=True, ks=(1, 5, 10))
    for key in ("eta_p", "eta_w", "recall@5", "precision@10", "mmv@5", "map"):
        assert outs[0]["metrics"][key] == pytest.approx(exact[key], abs=1e-12), key


def test_rebuild_killed_after_index_file_keeps_a_consistent_index(tmp_path, monkeypatch):
    """Issue 13 item 2: Flat -> HNSW rebuild into the same output, killed right after the index file is written."""
    emb = make(200)
    uri, idx = str(tmp_path / "e"), str(tmp_path / "idx")
    write_embeddings(uri, emb)
    assert run("index", "build", "--embeddings", uri, "--factory", "Flat", "--out", idx) == 0
    before = ix.load_index(idx)
    xq = ix.prepare_vectors(emb.xb[:5], "ip")
    expected = ix.search(before.index, xq, 5)[1]

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed after the index file was written")

    monkeypatch.setattr(pq, "write_table", killed)  # the id map is written after the index file
    with pytest.raises(KeyboardInterrupt):
        ix.build_from_embeddings(uri, idx, "HNSW16")
    monkeypatch.undo()
    after = ix.load_index(idx)
    assert after.meta["factory"] == "Flat"
    assert isinstance(faiss.downcast_index(after.index), faiss.IndexFlat)  # not the HNSW file of the killed run
    np.testing.assert_array_equal(ix.search(after.index, xq, 5)[1], expected)
    # the next rebuild publishes a new version and removes the old one's files
    assert run("index", "build", "--embeddings", uri, "--factory", "HNSW16", "--out", idx) == 0
    meta = ix.read_manifest(idx)
    assert meta["factory"] == "HNSW16" and meta["version"] == 2
    assert sorted(os.listdir(idx)) == ["index.json", "v2"]
    assert type(faiss.downcast_index(ix.load_index(idx).index)).__name__ == "IndexHNSWFlat"
    assert read_embeddings(uri).ids.tolist() == ix.load_index(idx).ids.tolist()


def test_streamed_list_file_is_what_faiss_merge_ondisk_writes(sets, tmp_path):
    """The merge writes its list file with sequential writes and bounded resident pages; the result must be the
    file (and the index header) that faiss's own `merge_ondisk` writes through a mapping."""
    from faiss.contrib.ondisk import merge_ondisk

    from lgff_core.index.ondisk import merge_partials_ondisk

    uris, a, b, q = sets
    xb = ix.prepare_vectors(concat(a, b).xb, "ip")
    trained = ix.train_index(xb, FACTORY, "ip", seed=0)
    paths = []
    for i, (lo, hi) in enumerate([(0, 130), (130, 300), (300, 420)]):
        part = faiss.clone_index(trained)
        part.add_with_ids(xb[lo:hi], np.arange(lo, hi, dtype=np.int64))
        paths.append(str(tmp_path / f"part{i}.faiss"))
        faiss.write_index(part, paths[-1])
    ours_dir, theirs_dir = tmp_path / "ours", tmp_path / "theirs"
    ours_dir.mkdir(), theirs_dir.mkdir()
    ours = merge_partials_ondisk(trained, paths, str(ours_dir / ix.IVFDATA_FILE))
    theirs = faiss.clone_index(trained)
    merge_ondisk(theirs, paths, str(theirs_dir / ix.IVFDATA_FILE))
    assert (ours_dir / ix.IVFDATA_FILE).read_bytes() == (theirs_dir / ix.IVFDATA_FILE).read_bytes()
    lists = [faiss.downcast_InvertedLists(faiss.extract_index_ivf(i).invlists) for i in (ours, theirs)]
    layout = [[(l.lists.at(j).size, l.lists.at(j).capacity, l.lists.at(j).offset) for j in range(l.nlist)]
              for l in lists]
    assert layout[0] == layout[1] and lists[0].totsize == lists[1].totsize
    assert ours.ntotal == theirs.ntotal == 420
    # (faiss's merge also records the whole file as one free slot; ours records none, as nothing is free)


def test_search_over_mapped_lists_in_rounds_equals_one_call(sets, tmp_path, monkeypatch):
    """Searching an on-disk index in rounds that hand back the mapped pages returns the one-call results."""
    from lgff_core.index import mapped

    uris, a, b, q = sets
    out = str(tmp_path / "idx")
    assert run("index", "build", "--embeddings", uris["all"], "--factory", FACTORY, "--out", out) == 0
    bundle = ix.load_index(out)
    lists = mapped.mapped_lists(bundle.index)
    assert lists is not None and lists.totsize > 0
    xq = ix.prepare_vectors(q.xb, "ip")
    assert mapped.queries_per_round(bundle.index) >= len(xq)  # a tiny index: one round
    D1, I1 = ix.search(bundle.index, xq, 10)
    monkeypatch.setattr(mapped, "RESIDENT_BYTES", 1)  # one query per round, released after each
    assert mapped.queries_per_round(bundle.index) == 1
    D2, I2 = ix.search(bundle.index, xq, 10)
    np.testing.assert_array_equal(I1, I2)
    np.testing.assert_array_equal(D1, D2)


def test_block_rows_of_a_split_come_from_the_manifest_without_reading_shards(tmp_path, monkeypatch):
    """An add task selects its block among one split's rows: the rows per split are in the manifest, so it does
    not read the split column of every shard of the archive (that cost grew with the archive)."""
    from lgff_core import storage

    t = concat(make(40), make(30, seed=3, first=40, split="test"), make(20, seed=4, first=70))
    uri = str(tmp_path / "emb")
    write_embeddings(uri, t, num_shards=3)
    entries = storage.read_json(os.path.join(uri, "_manifest.json"))["shards"]
    assert sum(e["split_rows"].get("train", 0) for e in entries) == 60
    assert sum(e["split_rows"].get("test", 0) for e in entries) == 30

    def no_reads(*a, **k):
        raise AssertionError("a shard was read to count its rows")

    monkeypatch.setattr(storage, "open_input_file", no_reads)
    src = ix.EmbeddingsSource(uri, "train")
    assert src.counts().tolist() == [e["split_rows"].get("train", 0) for e in entries]
    assert src.num_rows == 60
    monkeypatch.undo()
    # the rows it then streams are exactly the split's, in order
    got = np.concatenate([b.ids for b in ix.EmbeddingsSource(uri, "train").blocks(10, 50)])
    assert got.tolist() == t.ids[t.splits == "train"][10:50].tolist()
