"""train: one strategy stage (`lgff train`, then `lgff models export`); stages chain through ``init`` (the previous
stage's training directory)."""
from typing import Optional

from kfp import dsl
from kfp.dsl import Artifact, Input, Metrics, Model, Output

from ._image import LGFF_IMAGE


@dsl.component(base_image=LGFF_IMAGE, install_kfp_package=False)
def train(
    config_yaml: str,
    stage_name: str,
    data_uri: str,
    data_fingerprint: str,
    model: Output[Model],
    checkpoints: Output[Artifact],
    metrics: Output[Metrics],
    nproc: int = 1,
    init: Optional[Input[Artifact]] = None,
):
    """``data_uri``: the dataset (its manifest; shards are streamed), ``data_fingerprint`` keys the cache on its
    content. ``checkpoints`` is the training run directory (``best/``, ``last/`` with the optimizer state,
    ``metrics.jsonl``): what ``--init`` of the next stage and a resume read. ``model`` is the inference model of its
    ``best/`` (`lgff models export`: model.safetensors + model.json, nothing else): what embed / explain / evaluate
    / serve load, and the KFP launcher downloads an input artifact whole into every pod that reads it, so they get
    the weights only. ``nproc`` > 1: DDP over that many GPUs of the pod (`lgff train --nproc`)."""
    import json
    import os

    from lgff_core.kfp.runtime import (input_path, model_checkpoint_uri, model_facts, run_cli,
                                            write_json_artifact, write_config)

    out = checkpoints.path
    argv = ["train", "--config", write_config(config_yaml), "--data", data_uri, "--out", out]
    if init is not None:
        argv += ["--init", model_checkpoint_uri(input_path(init))]
    if nproc > 1:
        argv += ["--nproc", str(nproc)]
    run_cli(argv)
    run_cli(["models", "export", out, "--out", model.path])
    model.metadata.update(model_facts(model.path))
    model.metadata["stage"] = stage_name
    model.metadata["data_fingerprint"] = data_fingerprint
    model.metadata["checkpoints"] = checkpoints.uri
    checkpoints.metadata.update(stage=stage_name, data_fingerprint=data_fingerprint)
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
