"""train: one strategy stage (`lgff train`); stages chain through ``init`` (the previous stage's model)."""
from typing import Optional

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from ._image import LGFF_IMAGE


@dsl.component(base_image=LGFF_IMAGE, install_kfp_package=False)
def train(
    config_yaml: str,
    stage_name: str,
    data: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
    init: Optional[Input[Model]] = None,
):
    """``config_yaml`` is a single-stage config (the stage's overrides applied); ``model`` is the training run
    directory (``best/``, ``last/``, ``metrics.jsonl``) and ``best/`` the model later stages use."""
    import json
    import os

    from lgff_core.pipeline_runtime import (artifact_uri, model_checkpoint_uri, model_facts, run_cli,
                                            write_json_artifact, write_config)

    out = artifact_uri(model)
    argv = ["train", "--config", write_config(config_yaml), "--data", artifact_uri(data), "--out", out]
    if init is not None:
        argv += ["--init", model_checkpoint_uri(artifact_uri(init))]
    run_cli(argv)
    model.metadata.update(model_facts(out))
    model.metadata["stage"] = stage_name
    # last epoch's row of metrics.jsonl (loss, val recall, ...) -> scalar metrics
    last = {}
    rows_path = os.path.join(out, "metrics.jsonl")
    if os.path.exists(rows_path):
        with open(rows_path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        last = rows[-1] if rows else {}
    for key, value in sorted(last.items()):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics.log_metric(key, value)
    write_json_artifact(metrics.path, last)
