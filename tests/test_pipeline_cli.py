"""`lgff demo` config resolution and the `lgff pipeline` result printing (no pipeline run here)."""
from __future__ import annotations

import io

from rich.console import Console

from lgff_core.cli.demo import DEMO_DEFAULTS, DEMO_SOURCE, demo_config
from lgff_core.cli.pipeline import print_metrics, print_result
from lgff_core.config import CONFIG_DIR
from lgff_core.kfp.pipeline import LocalRunResult, TaskRecord


def test_demo_config_defaults_and_user_overrides():
    cfg = demo_config(None, ["pipeline.rows_per_task=3", "train.epochs=1"], "runs/x/")
    expected = "demo" if (CONFIG_DIR / "demo.yaml").is_file() else "lgffem_cpu"
    assert cfg.name == expected
    assert cfg.pipeline.source == DEMO_SOURCE
    assert cfg.pipeline.pipeline_root == "runs/x/pipeline-root"
    assert cfg.pipeline.rows_per_task == 3  # the user's --set wins over the demo defaults
    assert cfg.train.epochs == 1
    assert cfg.data.shard_mb == DEMO_DEFAULTS["data.shard_mb"]
    explicit = demo_config("lgffem_cpu", [], "out")
    assert explicit.name == "lgffem_cpu" and explicit.pipeline.rows_per_task == 20000


def _console():
    buf = io.StringIO()
    return Console(file=buf, width=200, color_system=None), buf


def test_print_result_lists_tasks_outputs_and_metrics():
    result = LocalRunResult(
        pipeline="train_and_index", pipeline_root="/r", log_file="/r/logs/x.log", seconds=12.5,
        tasks=[TaskRecord("train", "train-0-stage", "executed", {"model": "/r/run1/train/model"}),
               TaskRecord("prep", "prep", "cached", {"dataset": "/r/run0/prep/dataset"})],
        outputs={"report": "/r/run1/report/html"},
        metrics={"model": {"recall@1": 0.8125, "map": 0.5, "per_class": {"a": 1}},
                 "baseline": {"recall@1": 0.5, "map": 0.25}})
    console, buf = _console()
    print_result(result, console)
    text = buf.getvalue()
    assert "1 executed, 1 cached" in text
    assert "/r/run1/train/model" in text and "/r/run0/prep/dataset" in text and "/r/run1/report/html" in text
    row = next(line for line in text.splitlines() if "recall@1" in line)
    assert "0.8125" in row and "0.5000" in row
    assert "per_class" not in text  # only scalar metrics are tabulated


def test_print_metrics_empty_prints_nothing():
    console, buf = _console()
    print_metrics({}, console)
    assert buf.getvalue() == ""



def test_importer_tasks_are_told_apart_from_cache_hits():
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2

    from lgff_core.config import load_config
    from lgff_core.kfp.pipeline import _display_names, _is_importer, build

    func = build("reindex", load_config("lgffem_cpu"))
    spec = func.pipeline_spec
    deployment = json_format.ParseDict(json_format.MessageToDict(spec.deployment_spec),
                                       pipeline_spec_pb2.PipelineDeploymentConfig())
    kwargs = {"components": dict(spec.components), "executors": dict(deployment.executors)}
    tasks = spec.root.dag.tasks
    assert not _is_importer({**kwargs, "task_spec": tasks["scan"]})  # sources are scanned, not imported
    assert not _is_importer({**kwargs, "task_spec": tasks["index-build"]})
    assert not _is_importer({})
    names = _display_names(func)
    assert names["scan"] == "scan" and names["embed"] == "embed-model"


def test_local_runs_resolve_a_oneof_of_artifacts():
    """reindex returns dsl.OneOf(append's index, rebuild's index); kfp 2.17's kfp.local resolves OneOf for
    parameters only, `run_local` patches the artifact case for the run (the branch that produced one wins)."""
    import pytest
    from kfp.local.orchestrator.orchestrator_utils import OrchestratorUtils
    from kfp.pipeline_spec import pipeline_spec_pb2

    from lgff_core.kfp.pipeline import _oneof_artifacts

    spec = pipeline_spec_pb2.DagOutputsSpec()
    for task in ("index-append", "index-merge"):
        spec.artifacts["index"].artifact_selectors.add(producer_subtask=task, output_artifact_key="index")

    class Store:
        def __init__(self, ran):
            self.ran = ran

        def get_task_output(self, task, key):
            if task not in self.ran:
                raise ValueError(f"task {task!r} did not run")
            return f"{task}/{key}"

    with pytest.raises(ValueError, match="Expected 1 artifact"):  # kfp.local alone: the gap this patches
        OrchestratorUtils.get_dag_output_artifacts(spec, Store({"index-merge"}))
    with _oneof_artifacts():
        assert OrchestratorUtils.get_dag_output_artifacts(spec, Store({"index-merge"})) == {"index": "index-merge/index"}
        assert OrchestratorUtils.get_dag_output_artifacts(spec, Store({"index-append"})) == {
            "index": "index-append/index"}
        with pytest.raises(ValueError, match="0 of 2 selectors"):
            OrchestratorUtils.get_dag_output_artifacts(spec, Store(set()))
    with pytest.raises(ValueError, match="Expected 1 artifact"):  # restored after the run
        OrchestratorUtils.get_dag_output_artifacts(spec, Store({"index-merge"}))
