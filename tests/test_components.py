"""Component bodies (``component.python_func``) with the `lgff` call recorded instead of run: each component turns
its artifacts into the right CLI argv, and records metadata / metrics from what the stage wrote."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from kfp.dsl import HTML, Artifact, Dataset, Markdown, Metrics, Model

import components as c
from lgff_core.kfp import runtime as pipeline_runtime


@pytest.fixture
def calls(monkeypatch):
    """Record run_cli argv; `effects[argv[0]]` may write the files the real stage would."""
    class Recorded(list):
        effects: dict = {}

    recorded = Recorded()
    effects = recorded.effects = {}

    def fake_run_cli(argv):
        argv = [str(a) for a in argv]
        recorded.append(argv)
        if argv[0] in effects:
            effects[argv[0]](argv)

    monkeypatch.setattr(pipeline_runtime, "run_cli", fake_run_cli)
    return recorded


def _arg(argv, flag):
    return argv[argv.index(flag) + 1]


def _checkpoint(path: Path) -> Path:
    (path / "best").mkdir(parents=True)
    (path / "best" / "model.safetensors").write_bytes(b"weights")
    (path / "best" / "model.json").write_text("{}")
    return path


@pytest.fixture
def root(tmp_path, monkeypatch):
    """A local pipeline root (LGFF_PIPELINE_ROOT, as the pipelines set it); artifacts live at <root>/run/task/out."""
    monkeypatch.setenv(pipeline_runtime.PIPELINE_ROOT_ENV, str(tmp_path / "root"))
    return tmp_path / "root"


def _out(root: Path, task: str, cls=Dataset):
    return cls(uri=str(root / "run" / task / "out"))


def _write_set(out: Path, rows=(3,), kind="embeddings", name="_manifest.json", **extra):
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for i, n in enumerate(rows):
        (out / f"part-{i:05d}.parquet").write_bytes(b"x" * n)
        shards.append({"name": f"part-{i:05d}.parquet", "num_rows": n, "sha256": f"{i:064x}"})
    (out / name).write_text(json.dumps({"kind": kind, "num_rows": sum(rows), "shards": shards, **extra}))


def _fake_export(argv):
    """`lgff models export RUN --out DIR`: the run's best/ weights + sidecar, nothing else."""
    out = Path(_arg(argv, "--out"))
    out.mkdir(parents=True)
    for name in ("model.safetensors", "model.json"):
        (out / name).write_bytes((Path(argv[2]) / "best" / name).read_bytes())


def test_train_chains_init_from_checkpoints_exports_the_model_and_logs_last_epoch(tmp_path, calls):
    prev = _checkpoint(tmp_path / "prev")

    def fake_train(argv):
        out = Path(_arg(argv, "--out"))
        _checkpoint(out)
        (out / "last").mkdir()
        (out / "last" / "optimizer.safetensors").write_bytes(b"adam" * 100)
        rows = [{"epoch": 0, "loss": 2.0}, {"epoch": 1, "loss": 1.5, "val_recall_at_1": 0.75, "note": "x"}]
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    calls.effects.update(train=fake_train, models=_fake_export)
    model = Model(uri=str(tmp_path / "model"))
    checkpoints = Artifact(uri=str(tmp_path / "checkpoints"))
    metrics = Metrics(uri=str(tmp_path / "metrics"))
    c.train.python_func(config_yaml="train: {epochs: 1}\n", stage_name="b", data_uri="s3://b/d",
                        data_fingerprint="f" * 64, model=model, checkpoints=checkpoints, metrics=metrics, nproc=2,
                        init=Artifact(uri=str(prev)))
    argv, export = calls
    assert argv[0] == "train" and _arg(argv, "--data") == "s3://b/d" and _arg(argv, "--nproc") == "2"
    assert _arg(argv, "--init") == str(prev / "best") and _arg(argv, "--out") == checkpoints.path
    assert yaml.safe_load(Path(_arg(argv, "--config")).read_text()) == {"train": {"epochs": 1}}
    # the inference model is exported from the training directory into the `model` output
    assert export == ["models", "export", checkpoints.path, "--out", model.path]
    assert sorted(p.name for p in Path(model.path).iterdir()) == ["model.json", "model.safetensors"]
    assert metrics.metadata == {"epoch": 1, "loss": 1.5, "val_recall_at_1": 0.75}
    assert json.loads(Path(metrics.path).read_text())["note"] == "x"  # the Metrics artifact exists as a file
    assert model.metadata["stage"] == "b" and len(model.metadata["digest"]) == 64
    assert model.metadata["checkpoints"] == checkpoints.uri and checkpoints.metadata["stage"] == "b"


def test_train_first_stage_has_no_init_and_one_process(tmp_path, calls):
    calls.effects.update(train=lambda argv: _checkpoint(Path(_arg(argv, "--out"))), models=_fake_export)
    c.train.python_func(config_yaml="{}", stage_name="a", data_uri=str(tmp_path / "d"), data_fingerprint="",
                        model=Model(uri=str(tmp_path / "m")), checkpoints=Artifact(uri=str(tmp_path / "c")),
                        metrics=Metrics(uri=str(tmp_path / "x")))
    assert "--init" not in calls[0] and "--nproc" not in calls[0]


def test_embed_writes_bulk_and_a_pointer(root, tmp_path, calls):
    ckpt = _checkpoint(tmp_path / "run")
    calls.effects["embed"] = lambda argv: _write_set(Path(_arg(argv, "--out")), rows=(4,), block=1)
    block = {"block": 1.0, "dataset": "s3://b/d", "rows": 4, "units": []}
    emb = _out(root, "embed")
    assert c.embed.python_func(config_yaml="{}", block=block, embeddings=emb, model=Model(uri=str(ckpt))) == \
        str(root / ".bulk" / "run" / "embed" / "out")  # the bulk prefix: what collect gets
    c.embed.python_func(config_yaml="{}", block=block, embeddings=_out(root, "embed-2"), model_uri=str(ckpt),
                        model_fingerprint="abc")
    base = _out(root, "embed-3")
    c.embed.python_func(config_yaml="{}", block=block, embeddings=base)
    model_argv, uri_argv, base_argv = calls
    assert model_argv[:2] == ["embed", "block"] and _arg(model_argv, "--model") == str(ckpt / "best")
    assert json.loads(Path(_arg(model_argv, "--block")).read_text())["block"] == 1.0
    # bulk goes to <root>/.bulk/<artifact path>, outside the artifact; the artifact holds only the manifest
    assert _arg(model_argv, "--out") == str(root / ".bulk" / "run" / "embed" / "out")
    assert [p.name for p in Path(emb.path).iterdir()] == ["_manifest.json"]
    pointer = json.loads((Path(emb.path) / "_manifest.json").read_text())
    assert pointer["shards"][0]["name"] == str(root / ".bulk" / "run" / "embed" / "out" / "part-00000.parquet")
    assert pointer["bulk"]["files"] == [{"uri": pointer["shards"][0]["name"], "size": 4, "sha256": "0" * 64}]
    assert _arg(uri_argv, "--model") == str(ckpt / "best")
    assert "--baseline" in base_argv and "--model" not in base_argv
    assert emb.metadata["block"] == 1 and emb.metadata["num_rows"] == 4 and base.metadata["model"] == "baseline"


def test_index_sharded_argv(root, calls):
    def fake_index(argv):
        out = Path(_arg(argv, "--out"))
        out.mkdir(parents=True)
        (out / "index.faiss").write_bytes(b"faiss")
        (out / ("partial.json" if argv[1] == "add" else "index.json")).write_text(json.dumps({"ntotal": 3}))

    calls.effects["index"] = fake_index
    emb = _out(root, "collect")
    _write_set(Path(emb.path), rows=(3, 3, 3, 3))
    trained = _out(root, "train", Artifact)
    c.index_train.python_func(config_yaml="{}", embeddings=emb, trained=trained)
    parts = [_out(root, f"add-{i}", Artifact) for i in range(2)]
    bulks = [c.index_add.python_func(block={"block": float(i + 2)}, trained=trained, embeddings=emb, partial=part)
             for i, part in enumerate(parts)]
    assert bulks == [str(root / ".bulk" / "run" / f"add-{i}" / "out") for i in range(2)]  # what the merge gets
    c.index_merge.python_func(trained=trained, partials=bulks, index=_out(root, "merge", Artifact))
    train, add, _, merge = calls
    assert _arg(train, "--embeddings") == emb.path  # the manifest's local copy; shards are read by URI
    assert add[:2] == ["index", "add"] and _arg(add, "--shard") == "2/4"  # one embeddings shard per block
    assert _arg(add, "--trained") == str(root / ".bulk" / "run" / "train" / "out")
    assert merge[merge.index("--partials") + 1:merge.index("--out")] == [
        str(root / ".bulk" / "run" / f"add-{i}" / "out") for i in range(2)]
    assert json.loads((Path(parts[0].path) / "partial.json").read_text())["bulk"]["files"][0]["size"] == 5


def test_index_append_argv_and_counts(root, calls):
    def fake_append(argv):
        out = Path(_arg(argv, "--out"))
        out.mkdir(parents=True)
        (out / "index.faiss").write_bytes(b"faiss")
        holds = [{"rows": 30}, {"rows": 6, "skipped": 30}]
        (out / "index.json").write_text(json.dumps({"ntotal": 36, "holds": holds, "parent": {"uri": "s3://b/i"}}))

    calls.effects["index"] = fake_append
    emb, index = _out(root, "collect"), _out(root, "append", Artifact)
    _write_set(Path(emb.path), rows=(18, 18))
    c.index_append.python_func(config_yaml="{}", base_index="s3://b/i", base_index_fingerprint="ab" * 32,
                               embeddings=emb, index=index)
    (argv,) = calls
    assert argv[:2] == ["index", "add"] and _arg(argv, "--to") == "s3://b/i" and "--skip-existing" in argv
    assert _arg(argv, "--embeddings") == emb.path
    assert _arg(argv, "--out") == str(root / ".bulk" / "run" / "append" / "out")
    assert index.metadata["num_rows"] == 36 and (index.metadata["appended"], index.metadata["skipped"]) == (6, 30)
    assert json.loads((Path(index.path) / "index.json").read_text())["parent"] == {"uri": "s3://b/i"}


def test_scan_outputs_the_base_index_for_append_only(tmp_path, calls):
    def fake_scan(argv):
        facts = {u: {"fingerprint": f"fp-{u}"} for u in argv[1:argv.index("--mode")]}
        if _arg(argv, "--mode") == "append":
            facts[_arg(argv, "--base-index")] = {"uri": "s3://b/bulk/i", "fingerprint": "fp-index"}
        Path(_arg(argv, "--out")).write_text(json.dumps(facts))

    calls.effects["scan"] = fake_scan
    got = c.scan.python_func(data_uri="s3://b/d", model_uri="s3://b/m", mode="append", base_index_uri="s3://b/a/i",
                             index_metric="ip")
    assert tuple(got) == ("fp-s3://b/d", "fp-s3://b/m", "s3://b/bulk/i", "fp-index")
    # the base must fit the model's embeddings and the run's metric: the scan checks both
    assert (_arg(calls[-1], "--model"), _arg(calls[-1], "--metric")) == ("s3://b/m", "ip")
    got = c.scan.python_func(data_uri="s3://b/d")
    assert tuple(got) == ("fp-s3://b/d", "", "", "")
    assert calls[-1][calls[-1].index("--mode"):calls[-1].index("--out")] == [
        "--mode", "rebuild", "--base-index", "", "--model", "", "--metric", ""]


def test_evaluate_logs_scalar_metrics(root, calls):
    """Defect 1: the metrics are read from where the stage wrote them (not `open()` on an s3:// string)."""
    def fake_eval(argv):
        out = Path(_arg(argv, "--out"))
        out.mkdir(parents=True)
        (out / "neighbors.parquet").write_bytes(b"n")
        (out / "metrics.json").write_text(json.dumps({"model": "baseline", "metrics": {"recall@1": 0.5, "map": 0.25,
                                                      "per_class": {"a": 1.0}}}))

    calls.effects["evaluate"] = fake_eval
    index = _out(root, "index", Artifact)
    Path(index.path).mkdir(parents=True)
    (Path(index.path) / "index.json").write_text(json.dumps({"bulk": {"prefix": "/bulk/index", "files": []}}))
    metrics = Metrics(uri=str(root / "run" / "evaluate" / "metrics"))
    results = _out(root, "evaluate")
    c.evaluate.python_func(config_yaml="{}", label="baseline", embeddings=_out(root, "collect"), index=index,
                           results=results, metrics=metrics)
    assert calls[0][:2] == ["evaluate", "retrieval"] and _arg(calls[0], "--label") == "baseline"
    assert _arg(calls[0], "--index") == "/bulk/index"
    assert metrics.metadata == {"recall@1": 0.5, "map": 0.25}
    assert Path(metrics.path).is_file() and results.metadata["label"] == "baseline"
    local = json.loads((Path(results.path) / "metrics.json").read_text())  # what the report task reads
    assert local["metrics"]["recall@1"] == 0.5 and local["bulk"]["files"][0]["uri"].endswith("neighbors.parquet")


def test_report_copies_html_and_markdown(tmp_path, calls):
    def fake_report(argv):
        out = Path(_arg(argv, "--out"))
        out.mkdir(parents=True)
        (out / "report.html").write_text("<h1>r</h1>")
        (out / "report.md").write_text("# r")

    calls.effects["report"] = fake_report
    html, md = HTML(uri=str(tmp_path / "h.html")), Markdown(uri=str(tmp_path / "r.md"))
    c.report.python_func(config_yaml="{}", model_results=Dataset(uri=str(tmp_path / "a")),
                         report_dir=Dataset(uri=str(tmp_path / "rep")), html=html, markdown=md,
                         baseline_results=Dataset(uri=str(tmp_path / "b")))
    argv = calls[0]
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--metrics"] == [str(tmp_path / "a"), str(tmp_path / "b")]
    assert Path(html.path).read_text() == "<h1>r</h1>" and Path(md.path).read_text() == "# r"


def test_prep_rejects_unknown_source(tmp_path, calls):
    with pytest.raises(ValueError, match="samples:NAME or imagefolder:DIR"):
        c.prep.python_func(source="/some/uri", config_yaml="{}", dataset=Dataset(uri=str(tmp_path / "d")))
    assert not calls


def test_run_cli_raises_on_nonzero_exit():
    with pytest.raises(RuntimeError, match="exited with code 2"):
        pipeline_runtime.run_cli(["pipeline", "compile", "no-such-pipeline", "--out", "/dev/null"])


def test_bulk_uri_is_outside_the_artifact(monkeypatch, tmp_path):
    # KFP's driver places outputs at <root>/<pipeline>/<run id>/<task>/<uuid>/<output>, under the run's root (its
    # runtime config / kfp-launcher ConfigMap / KFP default), whatever root a task's env names
    monkeypatch.setenv(pipeline_runtime.PIPELINE_ROOT_ENV, "s3://bucket/compiled-root")
    a = Dataset(uri="s3://bucket/run-root/lgff-reindex/run-1/embed/0f3a/embeddings")
    assert pipeline_runtime.bulk_uri(a) == "s3://bucket/run-root/.bulk/lgff-reindex/run-1/embed/0f3a/embeddings"
    assert pipeline_runtime.bulk_uri(Dataset(uri="minio://mlpipeline/v2/artifacts/p/r/t/u/o")) == \
        "s3://mlpipeline/v2/artifacts/.bulk/p/r/t/u/o"
    assert pipeline_runtime.bulk_uri(Dataset(uri="s3://other/p/r/t/u/o")) == "s3://other/.bulk/p/r/t/u/o"
    assert pipeline_runtime.bulk_uri(Dataset(uri="s3://other/t/o")) == "s3://other/.bulk/t/o"  # not driver-placed
    monkeypatch.delenv(pipeline_runtime.PIPELINE_ROOT_ENV)
    local = Dataset(uri=str(tmp_path / "root" / "run-1" / "embed" / "embeddings"))
    assert pipeline_runtime.bulk_uri(local) == str(tmp_path / "root" / ".bulk" / "run-1" / "embed" / "embeddings")


def test_dataset_digest_follows_manifest():
    manifest = {"shards": [{"name": "part-00000.parquet", "num_rows": 3}, {"name": "part-00001.parquet",
                                                                            "num_rows": 4}]}
    facts = pipeline_runtime.dataset_facts(manifest)
    assert facts["num_rows"] == 7 and facts["num_shards"] == 2
    assert pipeline_runtime.dataset_facts({"shards": manifest["shards"][:1]})["digest"] != facts["digest"]


def test_components_install_nothing_at_run_time():
    for name in c.__all__:
        comp = getattr(c, name)
        if name == "LGFF_IMAGE":
            continue
        container = comp.component_spec.implementation.container
        command = " ".join(container.command)
        assert "pip install" not in command, name
        assert container.image == c.LGFF_IMAGE
