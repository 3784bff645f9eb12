"""evaluate_detection: COCO AP / AR (bbox, segm) of a trained LGFFDM (`lgff evaluate detection`)."""
from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from ._image import LGFF_IMAGE


@dsl.component(base_image=LGFF_IMAGE, install_kfp_package=False)
def evaluate_detection(
    config_yaml: str,
    label: str,
    data_uri: str,
    data_fingerprint: str,
    model: Input[Model],
    results: Output[Dataset],
    metrics: Output[Metrics],
):
    """``data_uri`` + ``data_fingerprint`` (cache key on content) name the dataset. The predictions.json, overlays/
    and report.md/.html go to the bulk prefix; ``results`` holds metrics.json naming them (read by the report
    stage); the scalar metrics (bbox_AP, segm_AP, ...) also go to ``metrics``."""
    from lgff_core.kfp.runtime import (bulk_uri, input_path, model_checkpoint_uri, publish_pointer, run_cli,
                                            write_config, write_json_artifact)

    bulk = bulk_uri(results)
    run_cli(["evaluate", "detection", "--config", write_config(config_yaml), "--model",
             model_checkpoint_uri(input_path(model)), "--data", data_uri, "--label", label, "--out", bulk])
    values = publish_pointer(results, bulk, "metrics.json")
    results.metadata["data_fingerprint"] = data_fingerprint
    for key, value in values.get("metrics", {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics.log_metric(key, value)
    results.metadata["label"] = label
    write_json_artifact(metrics.path, {k: v for k, v in values.items() if k != "bulk"})
