"""train: one strategy stage (`lgff train`); stages chain through ``init`` (the previous stage's model)."""
from typing import Optional

from kfp import dsl
from kfp.dsl import Input, Metrics, Model, Output

from ._image import LGFF_IMAGE


@dsl.component(base_image=LGFF_IMAGE, install_kfp_package=False)
def train(
    config_yaml: str,
    stage_name: str,
    data_uri: str,
    data_fingerprint: str,
    model: Output[Model],
    metrics: Output[Metrics],
    nproc: int = 1,
    init: Optional[Input[Model]] = None,
):
    """``data_uri``: the dataset (its manifest; shards are streamed), ``data_fingerprint`` keys the cache on its
    content. ``model`` is the training run directory (``best/``, ``last/``, ``metrics.jsonl``), written locally and
    uploaded by the launcher: a checkpoint is needed whole by the tasks that use it. ``nproc`` > 1: DDP over that
    many GPUs of the pod (`lgff train --nproc`)."""
    import json
    import os

    from lgff_core.kfp.runtime import (input_path, model_checkpoint_uri, model_facts, run_cli,
                                            write_json_artifact, write_config)

    out = model.path
    argv = ["train", "--config", write_config(config_yaml), "--data", data_uri, "--out", out]
    if init is not None:
        argv += ["--init", model_checkpoint_uri(input_path(init))]
    if nproc > 1:
        argv += ["--nproc", str(nproc)]
    run_cli(argv)
    model.metadata.update(model_facts(out))
    model.metadata["stage"] = stage_name
    model.metadata["data_fingerprint"] = data_fingerprint
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
