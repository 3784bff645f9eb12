"""Compiled pipeline YAML (cluster path): fan-out, GPU scheduling, Secret by name, no credential values; plus the
per-stage config slices that make caching precise. Submit / schedule: test_pipeline_submit.py (real kfp.Client)."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lgff_core.config import load_config
from lgff_core.kfp.pipeline import PipelineError, compile_pipeline
from lgff_core.kfp.config import stage_config_yaml, train_stage_config_yaml

FAKE_KEY_ID = "AKIAFAKEKEYID1234567"
FAKE_SECRET = "fake/secret+Value0123456789abcdefghijklmn"


def _compile(name: str, tmp_path: Path, monkeypatch, overrides=None) -> tuple[str, list[dict]]:
    # credentials in the compiling shell must never leak into the package
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    cfg = load_config("lgffem_cpu", overrides or [])
    path = compile_pipeline(name, cfg, tmp_path / f"{name}.yaml")
    text = Path(path).read_text()
    return text, list(yaml.safe_load_all(text))


def _executors_for(spec: dict, component_prefix: str) -> list[dict]:
    comps = spec["components"]
    labels = [c["executorLabel"] for name, c in comps.items() if name.startswith(component_prefix) and "executorLabel" in c]
    return [spec["deploymentSpec"]["executors"][label] for label in labels]


def _all_tasks(spec: dict):
    yield from spec["root"]["dag"]["tasks"].items()
    for comp in spec["components"].values():
        yield from comp.get("dag", {}).get("tasks", {}).items()


@pytest.mark.parametrize("name", ["train_and_index", "reindex"])
@pytest.mark.parametrize("sharded", [False, True])
def test_compiled_pipeline(name, sharded, tmp_path, monkeypatch):
    text, docs = _compile(name, tmp_path, monkeypatch, [f"pipeline.sharded_index={str(sharded).lower()}",
                                                         "pipeline.max_parallel=3", "pipeline.gpu_count=1"])
    spec, platform = docs[0], docs[1]
    assert FAKE_KEY_ID not in text and FAKE_SECRET not in text

    # ParallelFor over the plan task's output (decided at run time), at most pipeline.max_parallel at a time
    loops = [t for _, t in _all_tasks(spec) if "parameterIterator" in t]
    assert loops, "no ParallelFor in the compiled IR"
    embed_loops = [t for t in loops if "embed" in t["taskInfo"]["name"]]
    assert embed_loops
    for loop in loops:
        assert loop["iteratorPolicy"]["parallelismLimit"] == 3
        items = loop["parameterIterator"]["items"]
        assert "raw" not in items and items["inputParameter"] == "pipelinechannel--plan-Output"
    assert len(loops) == len(embed_loops) * (2 if sharded else 1)
    # the row budget per task is a run parameter: another value needs no recompile
    assert spec["root"]["inputDefinitions"]["parameters"]["rows_per_task"]["defaultValue"] == 20000
    # the collect step consumes the loop's outputs as a list (dsl.Collected) of bulk prefixes: a parameter, never an
    # artifact list (KFP's launcher opens extra object-store sessions from a list's first artifact only)
    collect = spec["components"]["comp-collect-embeddings"]["inputDefinitions"]
    assert collect["parameters"]["parts"]["parameterType"] == "LIST" and "artifacts" not in collect

    # GPU stages request nvidia.com/gpu and run the GPU image; CPU stages don't
    gpu_prefixes = ["comp-embed"] + (["comp-train"] if name == "train_and_index" else [])
    for prefix in gpu_prefixes:
        for ex in _executors_for(spec, prefix):
            acc = ex["container"]["resources"]["accelerator"]
            assert acc["resourceType"] == "nvidia.com/gpu" and acc["resourceCount"] == "1"
            assert ex["container"]["image"] == "ghcr.io/lgff/lgff:0.1.0-cuda"
    for ex in _executors_for(spec, "comp-index") + _executors_for(spec, "comp-evaluate"):
        assert "accelerator" not in ex["container"].get("resources", {})
        assert ex["container"]["image"] == "ghcr.io/lgff/lgff:0.1.0"
    # no run-time pip installs: the image already holds kfp + lgff_core
    containers = {k: ex for k, ex in spec["deploymentSpec"]["executors"].items() if "container" in ex}
    for ex in containers.values():
        cmd = " ".join(ex["container"]["command"])
        assert "pip install" not in cmd

    # platform spec: Secret by name on every task, node selector + toleration on GPU tasks
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(k8s) == set(containers)
    for label, conf in k8s.items():
        (secret,) = conf["secretAsEnv"]
        assert secret["secretName"] == "lgff-s3-credentials"
        assert {m["envVar"] for m in secret["keyToEnv"]} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
        is_gpu = any(label.startswith(p.replace("comp-", "exec-")) for p in gpu_prefixes)
        assert ("nodeSelector" in conf) == is_gpu, label
        if is_gpu:
            assert conf["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
            assert conf["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_train_stages_chain_with_init(tmp_path, monkeypatch):
    over = ["strategy=[{name: a}, {name: b, overrides: {loss.margin_deg: 17.2}}]", "explain.enabled=true"]
    _, docs = _compile("train_and_index", tmp_path, monkeypatch, over)
    spec = docs[0]
    tasks = dict(_all_tasks(spec))
    train_tasks = {t["taskInfo"]["name"]: t for t in tasks.values() if t["componentRef"]["name"].startswith("comp-train")}
    assert set(train_tasks) == {"train-0-a", "train-1-b"}
    assert "init" not in train_tasks["train-0-a"]["inputs"].get("artifacts", {})
    init = train_tasks["train-1-b"]["inputs"]["artifacts"]["init"]["taskOutputArtifact"]
    assert tasks[init["producerTask"]]["taskInfo"]["name"] == "train-0-a"
    # init takes the training directory (class weights, for the next stage); every task that loads the model
    # (the embed-model ParallelFor, explain) takes the inference model, the only thing its pods download
    taken = {(t["taskInfo"]["name"], v["taskOutputArtifact"]["outputArtifactKey"])
             for t in tasks.values() for v in t.get("inputs", {}).get("artifacts", {}).values()
             if v.get("taskOutputArtifact", {}).get("producerTask", "").startswith("train")}
    assert taken == {("train-1-b", "checkpoints"), ("embed-model", "model"), ("explain", "model")}
    # each train task gets a single-stage config with its own overrides applied
    cfg_b = yaml.safe_load(train_tasks["train-1-b"]["inputs"]["parameters"]["config_yaml"]["runtimeValue"]["constant"])
    assert cfg_b["loss"]["margin_deg"] == 17.2 and len(cfg_b["strategy"]) == 1
    # retries and per-task resources
    assert train_tasks["train-0-a"]["retryPolicy"]["maxRetryCount"] == 2


def test_stage_slices_isolate_config_changes():
    base = load_config("lgffem_cpu")
    changed = load_config("lgffem_cpu", ["index.factory=IVF4,Flat"])
    for stage in ("prep", "train", "embed", "report"):
        assert stage_config_yaml(base, stage) == stage_config_yaml(changed, stage), stage
    assert stage_config_yaml(base, "index") != stage_config_yaml(changed, "index")
    assert stage_config_yaml(base, "evaluate") != stage_config_yaml(changed, "evaluate")
    epochs = load_config("lgffem_cpu", ["train.epochs=3"])
    assert train_stage_config_yaml(base, 0) != train_stage_config_yaml(epochs, 0)
    assert stage_config_yaml(base, "embed") == stage_config_yaml(epochs, "embed")
    # a slice is a loadable config
    sliced = yaml.safe_load(stage_config_yaml(changed, "index"))
    assert sliced == {"seed": 0, "index": sliced["index"], "pipeline": {"pipeline_root": "runs/pipeline-root",
                                                                         "s3_endpoint": None}}
    assert sliced["index"]["factory"] == "IVF4,Flat"


def test_compile_rejects_unknown_pipeline(tmp_path):
    with pytest.raises(PipelineError, match="unknown pipeline 'nope'.*reindex"):
        compile_pipeline("nope", load_config("lgffem_cpu"), tmp_path / "x.yaml")
    assert not list(tmp_path.iterdir())


def test_cli_compile(tmp_path, capsys):
    from lgff_core.cli import main

    out = tmp_path / "p.yaml"
    assert main(["pipeline", "compile", "reindex", "--config", "lgffem_cpu", "--set", "pipeline.rows_per_task=4",
                 "--out", str(out)]) == 0
    spec = yaml.safe_load_all(out.read_text()).__next__()
    assert spec["pipelineInfo"]["name"] == "lgff-reindex"
    assert spec["root"]["inputDefinitions"]["parameters"]["rows_per_task"]["defaultValue"] == 4
    assert main(["pipeline", "compile", "reindex", "--set", "pipeline.embed_shards=4", "--out", str(out)]) == 2
    assert "embed_shards was removed" in capsys.readouterr().err
    assert main(["pipeline", "compile", "bogus", "--out", str(out)]) == 2
    assert "unknown pipeline" in capsys.readouterr().err


def test_dataset_uri_source_is_scanned_not_prepped(tmp_path):
    from lgff_core.cli import main

    out = tmp_path / "t.yaml"
    assert main(["pipeline", "compile", "train_and_index", "--arg", "source=s3://bucket/datasets/kimia",
                 "--out", str(out)]) == 0
    spec = next(yaml.safe_load_all(out.read_text()))
    assert "comp-prep" not in spec["components"] and "exec-importer" not in spec["deploymentSpec"]["executors"]
    tasks = dict(_all_tasks(spec))
    assert tasks["scan"]["cachingOptions"].get("enableCache", False) is False
    plan_inputs = tasks["plan"]["inputs"]["parameters"]
    assert plan_inputs["data_uri"]["componentInputParameter"] == "source"
    assert plan_inputs["data_fingerprint"]["taskOutputParameter"] == {"producerTask": "scan",
                                                                      "outputParameterKey": "data_fingerprint"}
    assert spec["root"]["inputDefinitions"]["parameters"]["source"]["defaultValue"] == "s3://bucket/datasets/kimia"
