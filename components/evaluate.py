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
    """Searches ``index`` with the protocol's queries (config ``evaluate``). ``results`` holds ``metrics.json``
    (small; it names ``neighbors.parquet`` in the bulk prefix); the scalar metrics also go to ``metrics`` (shown
    by the KFP UI)."""
    from lgff_core.kfp.runtime import (bulk_of, bulk_uri, input_path, publish_pointer, run_cli,
                                            write_config, write_json_artifact)

    bulk = bulk_uri(results)
    run_cli(["evaluate", "retrieval", "--config", write_config(config_yaml), "--embeddings", input_path(embeddings),
             "--index", bulk_of(index, "index.json"), "--label", label, "--out", bulk])
    values = publish_pointer(results, bulk, "metrics.json")
    for key, value in values.get("metrics", {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics.log_metric(key, value)
    results.metadata["label"] = label
    write_json_artifact(metrics.path, {k: v for k, v in values.items() if k != "bulk"})
