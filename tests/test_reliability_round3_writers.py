"""Issue 19 (reliability round 3), failures 8-14: outputs (names with '$', report escaping, hit images) and the
index / embed writers (mixed appends, concurrent writers, emptied indexes). Each test fails on the code before
the fix."""
from __future__ import annotations

import json
import os
import re

import numpy as np
import pyarrow.parquet as pq
import pytest

from lgff_core import index as ix
from lgff_core import storage
from lgff_core.cli import main
from lgff_core.data.embeddings import EmbeddingTable, write_embeddings
from lgff_core.data.shards import read_manifest
from lgff_core.errors import DataError, IndexError_

from test_reliability import SIZE, _dataset, _one_line, _rewrite_shard

D = 8
EVIL = r"$\evil$"


def _emb(uri, ids, label_names=("a", "b"), seed=0, **meta):
    rng = np.random.default_rng(seed)
    n = len(ids)
    x = rng.normal(size=(n, D)).astype(np.float32)
    table = EmbeddingTable(ids=np.array(ids, dtype=object), labels=(np.arange(n) % 2).astype(np.int64),
                           groups=np.array([f"g{i}" for i in range(n)], dtype=object),
                           splits=np.array(["train"] * n, dtype=object),
                           xb=x / np.linalg.norm(x, axis=1, keepdims=True), label_names=list(label_names))
    write_embeddings(uri, table, num_shards=2, **meta)
    return uri


def _ids(prefix, n, first=0):
    return [f"{prefix}{i:03d}" for i in range(first, first + n)]


def run(*argv):
    return main(["-q", *argv])


# ------------------------------------------------------------------------------------------- failure 8


def test_dollar_in_names_draws_the_explain_grid_and_the_detection_overlay():
    from lgff_core.evaluate.detection import draw_overlay
    from lgff_core.retrieval.explain import COLLAPSE, NODE_LABELS, render_grid
    import torch

    maps = {f"layer1/{c}": np.zeros((8, 8), np.float32) for c in (*NODE_LABELS, COLLAPSE)}
    png = render_grid(np.zeros((8, 8, 3), np.float32), maps, f"hit1: {EVIL}  score 0.5  [{EVIL}]")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    overlay = draw_overlay(np.zeros((8, 8, 3), np.uint8), {"scores": torch.zeros(0)}, 0.5, f"{EVIL}: 0 predicted")
    assert overlay[:8] == b"\x89PNG\r\n\x1a\n"


def _metrics(tmp_path, model, class_names, emb_uri=None):
    out = tmp_path / f"m-{len(list(tmp_path.iterdir()))}.json"
    out.write_text(json.dumps({
        "model": model, "kind": "retrieval", "protocol": "test-vs-train", "n_queries": 4, "database_size": 8,
        "metrics": {"eta_p": 0.5, "recall@1": 0.5}, "embeddings": emb_uri,
        "per_class": [{"label": i, "name": n, "n_queries": 2, "accuracy": 0.5} for i, n in enumerate(class_names)]}))
    return str(out)


def test_dollar_in_class_and_run_names_report_exits_0_with_its_figures(tmp_path):
    emb = _emb(str(tmp_path / "emb"), _ids("s", 20), label_names=(EVIL, "b$"))
    metrics = _metrics(tmp_path, EVIL, [EVIL, "b$"], emb)
    out = tmp_path / "rep"
    assert run("report", "--metrics", metrics, "--out", str(out)) == 0
    assert (out / "report.html").exists()
    assert {p.name for p in (out / "figures").iterdir()} == {"per_class_accuracy.png", "projection_0.png"}


# ------------------------------------------------------------------------------------------- failure 9


def test_report_markdown_is_escaped_and_links_run_no_script(tmp_path, capsys):
    hostile = "[x](javascript:alert(1)) <script>alert(2)</script> *bold* | cell"
    metrics = _metrics(tmp_path, "run|1 <b>", [hostile, "b"])
    out = tmp_path / "rep"
    # a javascript: (or data:, vbscript:) link is refused before anything is written
    for link, why in (("x=javascript:alert(1)", "links are not allowed"), ("x=JavaScript:alert(1)", "not allowed"),
                      ("x=data:text/html,<script>1</script>", "not allowed"), ("x=java\tscript:alert(1)", "control")):
        assert run("report", "--metrics", metrics, "--out", str(out), "--link", link) == 2
        assert why in _one_line(capsys.readouterr().err)
        assert not out.exists()
    assert run("report", "--metrics", metrics, "--out", str(out), "--title", f"# {hostile}",
               "--link", f"{hostile}=https://example.org/explain page.html",
               "--link", "cam=s3://bucket/run/explain.html") == 0
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    # no Markdown link, image, raw HTML or extra table cell can come from a name, the title or a link text
    assert not re.search(r"(?<!\\)\]\(javascript", md) and not re.search(r"(?<!\\)<(script|b>|/script)", md)
    assert md.splitlines()[0] == r"# \# [x\](javascript:alert(1)) \<script>alert(2)\</script> \*bold\* \| cell"
    row = next(line for line in md.splitlines() if line.startswith("| 0 |"))
    assert row.count(" | ") == 3 and r"\| cell" in row  # label, class, queries, accuracy: the '|' stays in its cell
    assert "(<https://example.org/explain%20page.html>)" in md and "(<s3://bucket/run/explain.html>)" in md
    assert "href='https://example.org/explain%20page.html'" in html and "href='s3://bucket/run/explain.html'" in html
    assert not re.search(r"href=['\"]\s*javascript", html, re.I) and "<script" not in html


def test_detection_report_markdown_is_escaped(tmp_path):
    from lgff_core.evaluate.detection_report import _md_table

    table = _md_table(["model"], [["a|b <img src=x onerror=alert(1)> `c`"]])
    assert table.splitlines()[-1] == r"| a\|b \<img src=x onerror=alert(1)> \`c\` |"


# ------------------------------------------------------------------------------------------- failure 10


def test_hit_images_come_only_from_shards_that_match_the_manifest(tmp_path):
    from lgff_core.retrieval.search import ImageLocator

    data = _dataset(str(tmp_path / "data"))
    m = read_manifest(data)
    first = pq.read_table(os.path.join(data, m.shards[1].name)).column("image")[0].as_py()
    assert ImageLocator(data).read([(1, 0)])[(1, 0)] == first
    name = _rewrite_shard(data, 1)  # valid Parquet, other bytes than the manifest's sha256
    with pytest.raises(DataError, match=f"{name}.*does not match the dataset manifest"):
        ImageLocator(data).read([(0, 0), (1, 0)])


# ------------------------------------------------------------------------------------------- failure 11


@pytest.fixture
def base(tmp_path):
    emb = _emb(str(tmp_path / "emb"), _ids("o", 10), model="m1", model_fingerprint="f1")
    idx = str(tmp_path / "idx")
    assert run("index", "build", "--embeddings", emb, "--out", idx) == 0
    return emb, idx


@pytest.mark.parametrize("case,pattern", [
    ("labels", "label 0 is 'x' in the embeddings but 'a' in the index"),
    ("model", "another model"),
    ("metric", "metric 'l2'"),
])
def test_append_refuses_embeddings_that_do_not_belong_to_the_index(base, tmp_path, capsys, case, pattern):
    _, idx = base
    meta = {"labels": {"label_names": ("x", "b"), "model": "m1", "model_fingerprint": "f1"},
            "model": {"label_names": ("a", "b"), "model": "m2", "model_fingerprint": "f2"},
            "metric": {"label_names": ("a", "b"), "model": "m1", "model_fingerprint": "f1", "metric": "l2"}}[case]
    new = _emb(str(tmp_path / "new"), _ids("n", 6), seed=1, **meta)
    out = tmp_path / "out"
    assert run("index", "add", "--to", idx, "--embeddings", new, "--out", str(out)) == 2
    assert pattern in _one_line(capsys.readouterr().err)
    assert not (out / "index.json").exists()


def test_append_with_new_classes_after_the_index_keeps_the_old_ids(base, tmp_path):
    _, idx = base
    new = _emb(str(tmp_path / "new"), _ids("n", 6), seed=1, label_names=("a", "b", "c"), model="m1",
               model_fingerprint="f1")
    out = str(tmp_path / "out")
    assert run("index", "add", "--to", idx, "--embeddings", new, "--out", out) == 0
    assert ix.read_manifest(out)["label_names"] == ["a", "b", "c"]
    assert ix.read_manifest(out)["model_fingerprint"] == "f1"


def test_append_never_holds_an_id_twice(base, tmp_path, capsys):
    emb, idx = base
    repeated = _emb(str(tmp_path / "rep"), ["o001", "n000", "n001", "n000", "n002", "n001"], seed=2, model="m1",
                    model_fingerprint="f1")
    # without --skip-existing: ids already in the index, or repeated in the new rows, are an error
    assert run("index", "add", "--to", idx, "--embeddings", repeated, "--out", str(tmp_path / "x")) == 2
    assert "already in" in _one_line(capsys.readouterr().err)
    only_repeats = _emb(str(tmp_path / "rep2"), ["n000", "n001", "n000"], seed=2, model="m1", model_fingerprint="f1")
    assert run("index", "add", "--to", idx, "--embeddings", only_repeats, "--out", str(tmp_path / "x")) == 2
    assert "'n000' appears more than once" in _one_line(capsys.readouterr().err)
    # with it: the first row of each new id, once
    out = str(tmp_path / "out")
    assert run("index", "add", "--to", idx, "--embeddings", repeated, "--skip-existing", "--out", out) == 0
    ids = ix.load_index(out).ids.tolist()
    assert ids == _ids("o", 10) + ["n000", "n001", "n002"]
    assert ix.read_manifest(out)["holds"][-1] == {"embeddings": repeated, "split": None, "rows": 3, "skipped": 1,
                                                  "repeated": 2}


@pytest.mark.parametrize("factory", ["Flat", "IVF2,Flat"])
def test_remove_of_an_id_held_twice_removes_both(tmp_path, capsys, factory):
    emb = _emb(str(tmp_path / "emb"), _ids("s", 10) + ["s003"], model="m1")  # an index built before ids were unique
    idx, out = str(tmp_path / "idx"), str(tmp_path / "out")
    assert run("index", "build", "--embeddings", emb, "--factory", factory, "--out", idx) == 0
    (tmp_path / "ids.txt").write_text("s003\ns005\n")
    capsys.readouterr()
    assert run("index", "remove", "--index", idx, "--ids", str(tmp_path / "ids.txt"), "--out", out) == 0
    assert "removed 3 vectors" in capsys.readouterr().out
    bundle = ix.load_index(out)
    assert bundle.ids.tolist() == [i for i in _ids("s", 10) if i not in ("s003", "s005")]
    assert bundle.index.ntotal == 8 and ix.read_manifest(out)["removed"] == 3


# ------------------------------------------------------------------------------------------- failure 12


def test_second_index_writer_fails_naming_the_holder_and_the_published_index_stays(base, tmp_path, capsys):
    emb, idx = base
    new = _emb(str(tmp_path / "new"), _ids("n", 6), seed=1, model="m1", model_fingerprint="f1")
    out = str(tmp_path / "out")
    assert run("index", "add", "--to", idx, "--embeddings", new, "--out", out) == 0
    published = ix.read_manifest(out)
    with storage.lease(out, owner="lgff index add --to (first)"):
        for argv in (["add", "--to", idx, "--embeddings", new, "--out", out],
                     ["build", "--embeddings", emb, "--out", out],
                     ["remove", "--index", idx, "--ids", str(_write(tmp_path / "ids.txt", "o001")), "--out", out]):
            assert main(["index", *argv]) == 2
            line = _one_line(capsys.readouterr().err)
            assert "another writer" in line and "lgff index add --to (first)" in line
    assert ix.read_manifest(out) == published and ix.load_index(out).index.ntotal == 16
    assert sorted(os.listdir(out)) == ["index.json", "v1"]


def _write(path, text):
    path.write_text(text)
    return path


def test_staging_never_deletes_a_version_folder_a_manifest_names(base, tmp_path):
    emb, idx = base
    # a partial index and a full index in one prefix: the build must not reuse (delete) the partial's v1
    trained, shared = str(tmp_path / "t"), str(tmp_path / "shared")
    assert run("index", "train", "--embeddings", emb, "--factory", "IVF2,Flat", "--out", trained) == 0
    assert run("index", "add", "--trained", trained, "--embeddings", emb, "--rows", "0:10", "--out", shared) == 0
    assert run("index", "build", "--embeddings", emb, "--out", shared) == 0
    ix.store.LocalFiles(shared, ix.read_manifest(shared, name=ix.PARTIAL_META), ["index.faiss", "idmap.parquet"])
    assert ix.load_index(shared).index.ntotal == 10
    # a version published into the folder this writer staged (a writer that lost its lease) is never deleted
    out = str(tmp_path / "out")
    stage = ix.store.Staging(out)
    with open(stage.path("x"), "w") as f:
        f.write("theirs")
    storage.write_text(storage.join(out, "index.json"), json.dumps(
        {"version": 1, "files": {"x": {"path": "v1/x", "size": 6, "sha256": "-"}}}))
    with pytest.raises(IndexError_, match="another writer published version 1"):
        stage.publish({"kind": "index"}, ["x"])
    stage.abort()
    assert open(os.path.join(out, "v1", "x")).read() == "theirs"
    assert not os.path.exists(os.path.join(out, storage.LEASE_NAME))  # the lease went with the abort


# ------------------------------------------------------------------------------------------- failure 13


def test_second_embed_writer_fails_naming_the_holder_and_writes_nothing(tmp_path, capsys):
    data = _dataset(str(tmp_path / "data"))
    out = tmp_path / "emb"
    base = ["--set", f"embed.image_size={SIZE}", "--set", "embed.bf16=false", "--set", "embed.channels_last=false"]
    with storage.lease(str(out), owner="lgff embed (first model)"):
        assert main(["embed", "--baseline", "--data", data, "--out", str(out), *base]) == 2
        line = _one_line(capsys.readouterr().err)
        assert "another writer" in line and "lgff embed (first model)" in line
        assert os.listdir(out) == [storage.LEASE_NAME]
        assert main(["embed", "finalize", "--data", data, "--out", str(out)]) == 2
        assert "another writer" in _one_line(capsys.readouterr().err)


# ------------------------------------------------------------------------------------------- failure 14


@pytest.mark.parametrize("factory", ["Flat", "IVF2,Flat"])
def test_searching_an_emptied_index_is_one_clear_line(tmp_path, capsys, factory):
    from lgff_core.retrieval.search import Searcher

    emb = _emb(str(tmp_path / "emb"), _ids("s", 10))
    idx, empty = str(tmp_path / "idx"), str(tmp_path / "empty")
    assert run("index", "build", "--embeddings", emb, "--factory", factory, "--out", idx) == 0
    assert run("index", "remove", "--index", idx, "--ids", str(_write(tmp_path / "ids.txt", "\n".join(_ids("s", 10)))),
               "--out", empty) == 0
    capsys.readouterr()
    assert main(["index", "search", "--index", empty, "--queries", emb, "--k", "3",
                 "--out", str(tmp_path / "nb.parquet")]) == 2
    assert "holds no vectors" in _one_line(capsys.readouterr().err)
    bundle = ix.load_index(empty)  # an emptied on-disk IVF loads (faiss cannot map an empty list file)
    searcher = Searcher.__new__(Searcher)  # the query-image path, without a model
    searcher.bundle, searcher.index_uri = bundle, empty
    with pytest.raises(IndexError_, match="holds no vectors"):
        searcher.search_vectors(np.zeros((1, D), np.float32), 3)
    # and it can grow again
    again = str(tmp_path / "again")
    assert run("index", "add", "--to", empty, "--embeddings", emb, "--out", again) == 0
    assert ix.load_index(again).index.ntotal == 10
