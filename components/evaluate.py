"""evaluate: retrieval metrics of one index (`lgff evaluate retrieval`)."""
from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Output

from ._image import LGFF_IMAGE


@dsl.component(base_image=LGFF_IMAGE, install_kfp_package=False)
def evaluate(
    config_yaml: str,
    label: str,
    embeddings: Input[Dataset],
    index: Input[Artifact],
    results: Output[Dataset],
    metrics: Output[Metrics],
):
    """Searches ``index`` with the protocol's queries (config ``evaluate``); ``results`` holds ``metrics.json`` and
    ``neighbors.parquet``, the scalar metrics also go to ``metrics`` (shown by the KFP UI)."""
    import json
    import os

    from lgff_core.pipeline_runtime import artifact_uri, run_cli, write_config, write_json_artifact

    out = artifact_uri(results)
    run_cli(["evaluate", "retrieval", "--config", write_config(config_yaml), "--embeddings", artifact_uri(embeddings),
             "--index", artifact_uri(index), "--label", label, "--out", out])
    with open(os.path.join(out, "metrics.json")) as f:
        values = json.load(f)
    scalars = {k: v for k, v in values.get("metrics", {}).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for key, value in scalars.items():
        metrics.log_metric(key, value)
    results.metadata["label"] = label
    write_json_artifact(metrics.path, values)
