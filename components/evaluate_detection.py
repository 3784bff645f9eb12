"""evaluate_detection: COCO AP / AR (bbox, segm) of a trained LGFFDM (`lgff evaluate detection`)."""
from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from ._image import LGFF_IMAGE


@dsl.component(base_image=LGFF_IMAGE, install_kfp_package=False)
def evaluate_detection(
    config_yaml: str,
    label: str,
    data: Input[Dataset],
    model: Input[Model],
    results: Output[Dataset],
    metrics: Output[Metrics],
):
    """``results`` holds predictions.json, overlays/, report.md/.html and metrics.json (read by the report stage);
    the scalar metrics (bbox_AP, segm_AP, ...) also go to ``metrics``."""
    from lgff_core import storage
    from lgff_core.pipeline_runtime import (artifact_uri, model_checkpoint_uri, run_cli, write_config,
                                            write_json_artifact)

    out = artifact_uri(results)
    run_cli(["evaluate", "detection", "--config", write_config(config_yaml), "--model",
             model_checkpoint_uri(artifact_uri(model)), "--data", artifact_uri(data), "--label", label, "--out", out])
    values = storage.read_json(storage.join(out, "metrics.json"))
    for key, value in values.get("metrics", {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics.log_metric(key, value)
    results.metadata["label"] = label
    write_json_artifact(metrics.path, values)
