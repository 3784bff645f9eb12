"""`lgff search`: a query image that is in the index finds itself first (cosine 1.0) and the same neighbours as
`lgff index search` for its stored embedding; thumbnails by sample_id via locations.parquet; bad input exits 2."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from lgff_core.cli import main
from lgff_core.data.shards import read_table
from lgff_core.data.embeddings import read_embeddings, write_embeddings
from lgff_core.index import load_index
from lgff_core.retrieval.search import LOCATIONS_FILE, index_locations

from search_support import TINY_SET, build_index_for, make_checkpoint
from test_train_support import make_dataset

pytestmark = pytest.mark.slow  # builds a model, embeddings and two indexes (~80 s on 2 cores)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    data = make_dataset(str(root / "data"), n_per_class=(6, 2, 2), rows_per_group=4)
    ckpt = make_checkpoint(str(root / "ckpt"))
    idx = build_index_for(ckpt, data, str(root / "emb"), str(root / "idx"))
    base_idx = build_index_for(None, data, str(root / "emb-base"), str(root / "idx-base"), baseline="gem-last")
    return {"root": root, "data": data, "ckpt": ckpt, "idx": idx, "base_idx": base_idx}


def _image_of(data, sid) -> bytes:
    t = read_table(data, columns=["sample_id", "image"])
    return t.column("image")[t.column("sample_id").to_pylist().index(sid)].as_py()


def _run(*argv):
    return main(list(argv) + [a for kv in TINY_SET for a in ("--set", kv)])


def test_self_query_first_with_cosine_one_and_same_neighbours_as_index_search(world, tmp_path):
    sid = "s01-0003"
    q = tmp_path / "q.png"
    q.write_bytes(_image_of(world["data"], sid))
    out = tmp_path / "out"
    assert _run("search", "--model", world["ckpt"], "--index", world["idx"], "--images", str(q), "--k", "6",
                "--out", str(out)) == 0
    doc = json.loads((out / "results.json").read_text())
    hits = doc["queries"][0]["hits"]
    assert len(hits) == 6 and set(hits[0]) == {"sample_id", "label", "label_name", "group", "score"}
    assert hits[0]["sample_id"] == sid and abs(hits[0]["score"] - 1.0) < 1e-5
    assert hits[0]["label"] == 1 and hits[0]["label_name"] == "class1"
    assert all(a["score"] >= b["score"] for a, b in zip(hits, hits[1:]))

    # the same embedding through `lgff index search` (stored vector of sid, self not excluded)
    emb = read_embeddings(str(Path(world["root"]) / "emb"))
    qemb = str(tmp_path / "qemb")
    write_embeddings(qemb, emb.subset(np.flatnonzero(emb.ids == sid)))
    nb = tmp_path / "nb.parquet"
    assert main(["index", "search", "--index", world["idx"], "--queries", qemb, "--k", "6", "--no-exclude-self",
                 "--out", str(nb)]) == 0
    row = pq.read_table(nb).to_pylist()[0]
    assert row["neighbor_ids"] == [h["sample_id"] for h in hits]
    np.testing.assert_allclose(row["neighbor_scores"], [h["score"] for h in hits], atol=1e-5)

    # the page shows the query and every hit with class and score; thumbnails are embedded images
    page = (out / "results.html").read_text()
    assert page.count("<img") == 1 + 6 and "score 1.0000" in page and "class1" in page


def test_query_by_dataset_id_equals_query_by_file_and_locations_are_kept(world, tmp_path):
    out = tmp_path / "byid"
    assert _run("search", "--model", world["ckpt"], "--index", world["idx"], "--dataset", world["data"],
                "--ids", "s02-0001", "s00-0007", "--out", str(out)) == 0
    doc = json.loads((out / "results.json").read_text())
    assert [q["hits"][0]["sample_id"] for q in doc["queries"]] == ["s02-0001", "s00-0007"]
    assert doc["queries"][0]["query"]["label_name"] == "class2" and len(doc["queries"][0]["hits"]) == 5

    # locations.parquet beside the index: (shard, row) of every database position, in index order
    locs = pq.read_table(Path(world["idx"]) / LOCATIONS_FILE)
    bundle = load_index(world["idx"])
    assert locs.column("sample_id").to_pylist() == list(bundle.ids)
    for pos in (0, len(bundle.ids) - 1):
        shard, row = locs.column("shard")[pos].as_py(), locs.column("row")[pos].as_py()
        t = read_table(world["data"], columns=["sample_id"], shards=[shard])
        assert t.column("sample_id")[row].as_py() == bundle.ids[pos]
    assert index_locations(world["idx"], bundle, write=False).equals(locs)  # reused, not rebuilt differently


def test_baseline_search(world, tmp_path):
    sid = "s00-0002"
    q = tmp_path / "q.png"
    q.write_bytes(_image_of(world["data"], sid))
    out = tmp_path / "base"
    assert _run("search", "--baseline", "--weights", "package:efficientnet-lite0", "--index", world["base_idx"], "--images", str(tmp_path),
                "--k", "3", "--out", str(out)) == 0
    hits = json.loads((out / "results.json").read_text())["queries"][0]["hits"]
    assert hits[0]["sample_id"] == sid and abs(hits[0]["score"] - 1.0) < 1e-5


@pytest.mark.parametrize("case", ["not-image", "missing-file", "unknown-id", "both", "wrong-index", "k0"])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(world, tmp_path, capsys, case):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not a png")
    good = tmp_path / "good.png"
    good.write_bytes(_image_of(world["data"], "s00-0001"))
    model, index, query = ["--model", world["ckpt"]], world["idx"], ["--images", str(good)]
    expect = {"not-image": "bad.png: not a readable image", "missing-file": "nope.png: no such file",
              "unknown-id": "no sample_id 'zzz'", "both": "give either --images", "wrong-index": "dimension",
              "k0": "--k 0"}[case]
    if case == "not-image":
        query = ["--images", str(bad)]
    elif case == "missing-file":
        query = ["--images", str(tmp_path / "nope.png")]
    elif case == "unknown-id":
        query = ["--dataset", world["data"], "--ids", "zzz"]
    elif case == "both":
        query += ["--dataset", world["data"], "--ids", "s00-0001"]
    elif case == "wrong-index":
        index = world["base_idx"]
    out = tmp_path / "out"
    extra = ["--k", "0"] if case == "k0" else []
    assert _run("search", *model, "--index", index, *query, *extra, "--out", str(out)) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("lgff search: error:")]
    assert len(lines) == 1 and expect in lines[0] and "Traceback" not in err, err
    assert not out.exists()
