"""Component bodies (``component.python_func``) with the `lgff` call recorded instead of run: each component turns
its artifacts into the right CLI argv, and records metadata / metrics from what the stage wrote."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from kfp.dsl import HTML, Artifact, Dataset, Markdown, Metrics, Model

import components as c
from lgff_core import pipeline_runtime


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


def test_train_chains_init_best_and_logs_last_epoch(tmp_path, calls):
    prev = _checkpoint(tmp_path / "prev")

    def fake_train(argv):
        out = Path(_arg(argv, "--out"))
        _checkpoint(out)
        rows = [{"epoch": 0, "loss": 2.0}, {"epoch": 1, "loss": 1.5, "val_recall_at_1": 0.75, "note": "x"}]
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    calls.effects["train"] = fake_train
    model = Model(uri=str(tmp_path / "model"))
    metrics = Metrics(uri=str(tmp_path / "metrics"))
    c.train.python_func(config_yaml="train: {epochs: 1}\n", stage_name="b", data=Dataset(uri=str(tmp_path / "d")),
                        model=model, metrics=metrics, init=Model(uri=str(prev)))
    (argv,) = calls
    assert argv[0] == "train" and _arg(argv, "--data") == str(tmp_path / "d")
    assert _arg(argv, "--init") == str(prev / "best")
    assert yaml.safe_load(Path(_arg(argv, "--config")).read_text()) == {"train": {"epochs": 1}}
    assert metrics.metadata == {"epoch": 1, "loss": 1.5, "val_recall_at_1": 0.75}
    assert json.loads(Path(metrics.path).read_text())["note"] == "x"  # the Metrics artifact exists as a file
    assert model.metadata["stage"] == "b" and len(model.metadata["digest"]) == 64


def test_train_first_stage_has_no_init(tmp_path, calls):
    calls.effects["train"] = lambda argv: _checkpoint(Path(_arg(argv, "--out")))
    c.train.python_func(config_yaml="{}", stage_name="a", data=Dataset(uri=str(tmp_path / "d")),
                        model=Model(uri=str(tmp_path / "m")), metrics=Metrics(uri=str(tmp_path / "x")))
    assert "--init" not in calls[0]


def test_embed_model_vs_baseline(tmp_path, calls):
    ckpt = _checkpoint(tmp_path / "run")
    c.embed.python_func(config_yaml="{}", shard_index=1, num_shards=3, data=Dataset(uri=str(tmp_path / "d")),
                        embeddings=Dataset(uri=str(tmp_path / "e1")), model=Model(uri=str(ckpt)))
    emb = Dataset(uri=str(tmp_path / "e2"))
    c.embed.python_func(config_yaml="{}", shard_index=0, num_shards=3, data=Dataset(uri=str(tmp_path / "d")),
                        embeddings=emb)
    model_argv, base_argv = calls
    assert _arg(model_argv, "--shard") == "1/3" and _arg(model_argv, "--model") == str(ckpt / "best")
    assert "--baseline" in base_argv and "--model" not in base_argv
    assert emb.metadata["model"] == "baseline"


def test_index_sharded_argv(tmp_path, calls):
    c.index_add.python_func(shard_index=2, num_shards=4, trained=Artifact(uri=str(tmp_path / "t")),
                            embeddings=Dataset(uri=str(tmp_path / "e")), partial=Artifact(uri=str(tmp_path / "p")))
    parts = [Artifact(uri=str(tmp_path / f"p{i}")) for i in range(2)]
    c.index_merge.python_func(trained=Artifact(uri=str(tmp_path / "t")), partials=parts,
                              index=Artifact(uri=str(tmp_path / "i")))
    add, merge = calls
    assert add[:2] == ["index", "add"] and _arg(add, "--shard") == "2/4"
    assert merge[merge.index("--partials") + 1:merge.index("--out")] == [str(tmp_path / "p0"), str(tmp_path / "p1")]


def test_evaluate_logs_scalar_metrics(tmp_path, calls):
    def fake_eval(argv):
        out = Path(_arg(argv, "--out"))
        out.mkdir(parents=True)
        (out / "metrics.json").write_text(json.dumps({"model": "baseline", "metrics": {"recall@1": 0.5, "map": 0.25,
                                                      "per_class": {"a": 1.0}}}))

    calls.effects["evaluate"] = fake_eval
    metrics = Metrics(uri=str(tmp_path / "m"))
    results = Dataset(uri=str(tmp_path / "r"))
    c.evaluate.python_func(config_yaml="{}", label="baseline", embeddings=Dataset(uri=str(tmp_path / "e")),
                           index=Artifact(uri=str(tmp_path / "i")), results=results, metrics=metrics)
    assert calls[0][:2] == ["evaluate", "retrieval"] and _arg(calls[0], "--label") == "baseline"
    assert metrics.metadata == {"recall@1": 0.5, "map": 0.25}
    assert Path(metrics.path).is_file() and results.metadata["label"] == "baseline"


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


def test_artifact_uri_direct_io(monkeypatch):
    a = Dataset(uri="s3://bucket/run/embed/embeddings")
    assert pipeline_runtime.artifact_uri(a) == "/s3/bucket/run/embed/embeddings"
    monkeypatch.setenv(pipeline_runtime.DIRECT_IO_ENV, "1")
    assert pipeline_runtime.artifact_uri(a) == "s3://bucket/run/embed/embeddings"
    assert pipeline_runtime.artifact_uri(Dataset(uri="/local/x")) == "/local/x"


def test_dataset_digest_follows_manifest(tmp_path):
    (tmp_path / "_manifest.json").write_text(json.dumps({"shards": [{"name": "part-00000.parquet", "num_rows": 3},
                                                                    {"name": "part-00001.parquet", "num_rows": 4}]}))
    facts = pipeline_runtime.dataset_facts(str(tmp_path))
    assert facts["num_rows"] == 7 and facts["num_shards"] == 2
    (tmp_path / "_manifest.json").write_text(json.dumps({"shards": [{"name": "part-00000.parquet", "num_rows": 3}]}))
    assert pipeline_runtime.dataset_facts(str(tmp_path))["digest"] != facts["digest"]


def test_components_install_nothing_at_run_time():
    for name in c.__all__:
        comp = getattr(c, name)
        if name == "LGFF_IMAGE":
            continue
        container = comp.component_spec.implementation.container
        command = " ".join(container.command)
        assert "pip install" not in command, name
        assert container.image == c.LGFF_IMAGE
