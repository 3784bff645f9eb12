"""The run-time fan-out (`lgff_core.kfp.plan.plan_blocks`, `lgff plan`) and the scan fingerprints (`lgff scan`)."""
from __future__ import annotations

import json

import pytest

from lgff_core.cli import main
from lgff_core.data.shards import Manifest, ShardInfo, shard_name, write_manifest
from lgff_core.errors import DataError
from lgff_core.kfp.plan import fingerprint_source, plan_blocks, read_block


def _manifest(uri, shard_groups):
    """A dataset manifest (the plan reads nothing else) with one shard per entry of row-group sizes."""
    shards = [ShardInfo(name=shard_name(i), num_rows=sum(g), sha256=f"{i:064x}", bytes=100, row_groups=list(g))
              for i, g in enumerate(shard_groups)]
    write_manifest(Manifest(uri=str(uri), shards=shards, label_names=["a", "b"]))
    return str(uri)


def _covered(blocks):
    return [(u["shard"], g) for b in blocks for u in b["units"] for g in range(*u["row_groups"])]


def test_five_shards_five_blocks_then_three_when_rows_per_task_grows(tmp_path):
    data = _manifest(tmp_path / "ds", [[4]] * 5)
    five = plan_blocks(data, 4)
    assert [b["block"] for b in five] == [0, 1, 2, 3, 4] and [b["rows"] for b in five] == [4] * 5
    three = plan_blocks(data, 8)
    assert [b["rows"] for b in three] == [8, 8, 4]
    assert [[u["shard"] for u in b["units"]] for b in three] == [
        ["part-00000.parquet", "part-00001.parquet"], ["part-00002.parquet", "part-00003.parquet"],
        ["part-00004.parquet"]]
    assert _covered(five) == _covered(three)  # every row group in exactly one block, in dataset order
    assert all(b["dataset"] == data for b in three)
    assert three[0]["units"][0]["sha256"] == f"{0:064x}"  # content enters the block (the embed cache key)


def test_large_shard_is_split_at_row_groups(tmp_path):
    data = _manifest(tmp_path / "ds", [[3], [5, 5, 5, 5, 2], [2]])
    blocks = plan_blocks(data, 10)
    assert [b["rows"] for b in blocks] == [3, 10, 10, 2, 2]  # the big shard's tail is a block of its own
    assert [u["row_groups"] for b in blocks[1:4] for u in b["units"]] == [[0, 2], [2, 4], [4, 5]]
    assert sum(b["rows"] for b in blocks) == 27 and len(_covered(blocks)) == 7


def test_appending_a_shard_keeps_earlier_blocks(tmp_path):
    before = plan_blocks(_manifest(tmp_path / "ds", [[4]] * 4), 4)
    after = plan_blocks(_manifest(tmp_path / "ds", [[4]] * 5), 4)
    assert after[:4] == before and len(after) == 5  # unchanged blocks keep their parameters -> cache hits


def test_plan_cli_and_errors(tmp_path, capsys):
    data = _manifest(tmp_path / "ds", [[4]] * 5)
    out = tmp_path / "blocks.json"
    assert main(["plan", "--data", data, "--rows-per-task", "8", "--out", str(out)]) == 0
    blocks = json.loads(out.read_text())
    assert len(blocks) == 3 and "20 rows -> 3 block(s)" in capsys.readouterr().out
    assert read_block(json.dumps(blocks[1])) == blocks[1]
    assert main(["plan", "--data", data, "--set", "pipeline.rows_per_task=4"]) == 0
    assert "5 block(s)" in capsys.readouterr().out
    assert main(["plan", "--data", str(tmp_path / "nothing")]) == 2
    assert "not a dataset" in capsys.readouterr().err
    with pytest.raises(DataError, match="missing key"):
        read_block('{"block": 0}')


def test_scan_fingerprint_follows_content(tmp_path, capsys):
    data = _manifest(tmp_path / "ds", [[4]] * 4)
    first = fingerprint_source(data)
    assert fingerprint_source(data) == first and first["num_shards"] == 4
    _manifest(tmp_path / "ds", [[4]] * 5)  # a new shard, manifest republished
    assert fingerprint_source(data)["fingerprint"] != first["fingerprint"]
    model = tmp_path / "model" / "best"
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"w1")
    fp = fingerprint_source(str(tmp_path / "model"))
    assert fp["kind"] == "files" and fp["num_files"] == 1
    (model / "model.safetensors").write_bytes(b"w2-longer")
    assert fingerprint_source(str(tmp_path / "model"))["fingerprint"] != fp["fingerprint"]
    assert main(["scan", data, "--out", str(tmp_path / "scan.json")]) == 0
    assert json.loads((tmp_path / "scan.json").read_text())[data]["kind"] == "images"
    assert main(["scan", str(tmp_path / "empty")]) == 2
    assert "nothing there" in capsys.readouterr().err


def test_scan_checks_the_reindex_mode_and_fingerprints_the_base_index(tmp_path, capsys):
    """reindex's `mode` / `base_index_uri` run parameters: checked by the (first, never cached) scan task."""
    import hashlib

    import numpy as np

    from lgff_core.data.embeddings import EmbeddingTable, write_embeddings

    data = _manifest(tmp_path / "ds", [[4]] * 2)
    emb, idx = str(tmp_path / "emb"), str(tmp_path / "idx")
    rng = np.random.default_rng(0)
    write_embeddings(emb, EmbeddingTable(np.array([f"s{i}" for i in range(20)], dtype=object), np.zeros(20, np.int64),
                                         np.array(["g"] * 20, dtype=object), np.array(["train"] * 20, dtype=object),
                                         rng.normal(size=(20, 8)).astype(np.float32), ["a"]))
    assert main(["-q", "index", "build", "--embeddings", emb, "--factory", "Flat", "--out", idx]) == 0
    out = tmp_path / "scan.json"

    def scan(*argv):
        capsys.readouterr()
        code = main(["-q", "scan", data, *argv, "--out", str(out)])
        return code, capsys.readouterr().err.strip()

    assert scan("--mode", "rebuild", "--base-index", "") == (0, "")
    assert set(json.loads(out.read_text())) == {data}  # nothing about an index for a rebuild
    assert scan("--mode", "append", "--base-index", idx) == (0, "")
    facts = json.loads(out.read_text())[idx]
    first = hashlib.sha256((tmp_path / "idx" / "index.json").read_bytes()).hexdigest()
    assert facts == {"uri": idx, "kind": "index", "fingerprint": first, "ntotal": 20, "version": 1, "d": 8,
                     "metric": "ip"}
    # a pipeline artifact's pointer (index.json naming its bulk prefix) is followed to the index
    pointer = tmp_path / "artifact" / "index"
    pointer.mkdir(parents=True)
    (pointer / "index.json").write_text(json.dumps({"kind": "index", "bulk": {"prefix": idx, "files": []}}))
    assert scan("--mode", "append", "--base-index", str(pointer)) == (0, "")
    assert json.loads(out.read_text())[str(pointer)]["uri"] == idx
    # a new version of the base index: a new fingerprint (so the append task is not a stale cache hit)
    assert main(["-q", "index", "build", "--embeddings", emb, "--factory", "Flat", "--out", idx]) == 0
    assert scan("--mode", "append", "--base-index", idx) == (0, "")
    assert json.loads(out.read_text())[idx]["fingerprint"] != first
    # bad values: exit 2, one line naming the run parameter (and the URI), nothing written
    out.unlink()
    for argv, words in ((["--mode", "apend"], ["mode 'apend'", "rebuild, append"]),
                        (["--mode", "append", "--base-index", ""], ["base_index_uri"]),
                        (["--mode", "append", "--base-index", str(tmp_path / "nope")],
                         ["base_index_uri", str(tmp_path / "nope"), "no index.json"]),
                        (["--mode", "append", "--base-index", data], ["base_index_uri", "no index.json"])):
        code, err = scan(*argv)
        assert code == 2 and len(err.splitlines()) == 1 and err.startswith("lgff scan: error:"), (argv, err)
        assert all(w in err for w in words), (argv, err)
        assert not out.exists()


def _flat_index(tmp_path, d=8, metric="ip"):
    import numpy as np

    from lgff_core.data.embeddings import EmbeddingTable, write_embeddings

    emb, idx = str(tmp_path / f"emb{d}"), str(tmp_path / f"idx{d}{metric}")
    x = np.random.default_rng(0).normal(size=(12, d)).astype(np.float32)
    write_embeddings(emb, EmbeddingTable(np.array([f"s{i}" for i in range(12)], dtype=object), np.zeros(12, np.int64),
                                         np.array(["g"] * 12, dtype=object), np.array(["train"] * 12, dtype=object),
                                         x, ["a"]))
    assert main(["-q", "index", "build", "--embeddings", emb, "--factory", "Flat", "--metric", metric,
                 "--out", idx]) == 0
    return idx


def _checkpoint(prefix, embedding_dim=8, kind="embedding"):
    """A checkpoint as the scan sees it: weights + sidecar (the scan reads only the sidecar)."""
    prefix.mkdir(parents=True)
    (prefix / "model.safetensors").write_bytes(b"weights")
    (prefix / "model.json").write_text(json.dumps({"embedding_dim": embedding_dim, "config": {
        "model": {"kind": kind}, "index": {"metric": "ip"}}}))
    return str(prefix)


def test_scan_refuses_a_base_index_that_does_not_fit_the_model_or_metric(tmp_path, capsys):
    """Before: a base of another dimension passed the scan and failed at append, after the whole archive was
    embedded; a base of another metric was appended to silently with its own metric."""
    from lgff_core.config import ConfigError
    from lgff_core.kfp.plan import reindex_base

    idx8 = _flat_index(tmp_path)
    model8 = _checkpoint(tmp_path / "m8")
    run = tmp_path / "run"  # a training run's output: its best/ checkpoint is the model
    _checkpoint(run / "best", embedding_dim=16)
    assert reindex_base("append", idx8, model_uri=model8, metric="ip")["d"] == 8
    with pytest.raises(DataError, match=rf"base_index_uri {idx8}: the index holds 8-d vectors, the model {run} "
                                        r"makes 16-d embeddings"):
        reindex_base("append", idx8, model_uri=str(run), metric="ip")
    with pytest.raises(DataError, match=r"compares vectors by ip, this run's index.metric is l2"):
        reindex_base("append", idx8, model_uri=model8, metric="l2")
    with pytest.raises(DataError, match="a detection model, not an embedding model"):
        reindex_base("append", idx8, model_uri=_checkpoint(tmp_path / "det", kind="detection"), metric="ip")
    (tmp_path / "nosidecar").mkdir()
    (tmp_path / "nosidecar" / "weights.bin").write_bytes(b"w")  # nothing to check against: the append checks
    assert reindex_base("append", idx8, model_uri=str(tmp_path / "nosidecar"), metric="ip")["d"] == 8
    with pytest.raises(ConfigError, match="mode 'bogus'"):
        reindex_base("bogus", idx8, model_uri=model8, metric="ip")
    # the CLI the scan component runs: exit 2, one line naming the run parameter
    data = _manifest(tmp_path / "ds", [[4]])
    capsys.readouterr()
    code = main(["-q", "scan", data, str(run), "--mode", "append", "--base-index", idx8, "--model", str(run),
                 "--metric", "ip"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("lgff scan: error: base_index_uri"), err
    assert "16-d" in err


def test_scan_component_fails_with_the_reason_and_is_never_retried(tmp_path):
    """The scan task's error names why (not only "exited with code 2"), and a retry cannot heal it: no retries."""
    import components as c
    from lgff_core.config import load_config
    from lgff_core.kfp.pipeline import build

    data = _manifest(tmp_path / "ds", [[4]])
    idx8 = _flat_index(tmp_path)
    model16 = _checkpoint(tmp_path / "m16", embedding_dim=16)
    with pytest.raises(RuntimeError, match=r"^lgff scan: error: base_index_uri .*8-d vectors.*16-d embeddings"):
        c.scan.python_func(data_uri=data, model_uri=model16, mode="append", base_index_uri=idx8, index_metric="ip")
    with pytest.raises(RuntimeError, match=r"^lgff scan: error: .*index.metric is l2"):
        c.scan.python_func(data_uri=data, model_uri=model16, mode="append", base_index_uri=idx8, index_metric="l2")
    ok = c.scan.python_func(data_uri=data, model_uri=_checkpoint(tmp_path / "m8"), mode="append",
                            base_index_uri=idx8, index_metric="ip")
    assert ok.base_index == idx8 and ok.base_index_fingerprint
    spec = build("reindex", load_config("lgffem_cpu", ["pipeline.retries=2"])).pipeline_spec
    tasks = spec.root.dag.tasks
    assert tasks["scan"].retry_policy.max_retry_count == 0
    assert tasks["scan"].inputs.parameters["index_metric"].runtime_value.constant.string_value == "ip"
    assert tasks["plan"].retry_policy.max_retry_count == 2  # tasks whose failures may heal keep their retries


def test_reindex_input_error_fails_the_run_at_once_with_the_reason(tmp_path, capsys):
    """Before: `mode=bogus` failed after 3 attempts of the scan (about 92 s with the presets' retries) and the
    run's error line said only "Inner task failed: 'scan'"."""
    import time

    data = _manifest(tmp_path / "ds", [[4]])
    model = _checkpoint(tmp_path / "m8")
    t0 = time.monotonic()
    code = main(["pipeline", "run", "reindex", "--config", "lgffem_cpu", "--root", str(tmp_path / "root"),
                 "--arg", f"data_uri={data}", "--arg", f"model_uri={model}", "--arg", "mode=bogus"])
    elapsed = time.monotonic() - t0
    err = capsys.readouterr().err
    line = [l for l in err.splitlines() if l.startswith("lgff pipeline: error:")]
    assert code == 2 and len(line) == 1, err
    assert "failed in task scan: lgff scan: error: mode 'bogus': expected one of rebuild, append" in line[0]
    assert elapsed < 25, elapsed  # the presets retry tasks twice, 30 s then 60 s apart: the scan is not retried


def test_removed_pipeline_keys_name_the_replacement():
    from lgff_core.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="embed_shards was removed.*rows_per_task"):
        load_config("lgffem_cpu", ["pipeline.embed_shards=3"])
    with pytest.raises(ConfigError, match="renamed to pipeline.max_parallel"):
        load_config(None, {"pipeline.embed_parallelism": 2})
