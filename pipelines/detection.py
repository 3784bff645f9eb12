"""detection: prep (COCO dataset URI, or the real `samples:nuclei-coco` set) -> train LGFFDM with the LGFFN-D neck
and with the BiFPN baseline neck (same config and schedule, side by side) -> evaluate both (COCO bbox / segm) ->
report in the layout of the thesis's Table 5.3."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Markdown, Model

import components as c
from lgff_core.config import ConfigError, LGFFConfig, apply_overrides
from lgff_core.kfp.pipeline import is_prep_source
from lgff_core.kfp.config import stage_config_yaml, train_stage_config_yaml

from ._wiring import configure_task, pipeline_root_for
from .train_and_index import dataset_source

NAME = "lgff-detection"
NECKS = ("lgffn_d", "bifpn")


def build_pipeline(cfg: LGFFConfig):
    """The kfp pipeline function for a detection config (`model.kind: detection`, e.g. preset lgffdm_cpu)."""
    if cfg.model.kind != "detection":
        raise ConfigError(f"the detection pipeline needs model.kind=detection; config {cfg.name!r} has "
                          f"{cfg.model.kind!r} (try --config lgffdm_cpu)")
    source_default = cfg.pipeline.source
    source_is_uri = not is_prep_source(source_default)
    Outputs = NamedTuple("Outputs", [("model", Model), ("report", HTML), ("report_md", Markdown)])

    @dsl.pipeline(name=NAME, description="LGFFDM: LGFFN-D vs BiFPN necks, Mask R-CNN, COCO AP (Table 5.3)",
                  pipeline_root=pipeline_root_for(cfg))
    def detection(source: str = source_default) -> Outputs:
        data_uri, data_fp = dataset_source(cfg, source, source_is_uri)
        models, results = {}, {}
        for neck in NECKS:
            neck_cfg = apply_overrides(cfg, {"model.neck": neck, "name": f"{cfg.name}-{neck}"})
            train = c.train(config_yaml=train_stage_config_yaml(neck_cfg, 0), stage_name=neck, data_uri=data_uri,
                            data_fingerprint=data_fp, nproc=max(1, cfg.pipeline.gpu_count))
            models[neck] = configure_task(train, cfg, "train", f"train-{neck}").outputs["model"]
            ev = c.evaluate_detection(config_yaml=stage_config_yaml(neck_cfg, "evaluate_detection"), label=neck,
                                      data_uri=data_uri, data_fingerprint=data_fp, model=models[neck])
            results[neck] = configure_task(ev, cfg, "evaluate", f"evaluate-{neck}").outputs["results"]
        rep = c.report(config_yaml=stage_config_yaml(cfg, "report"), model_results=results["lgffn_d"],
                       baseline_results=results["bifpn"])
        configure_task(rep, cfg, "report", "report")
        return Outputs(model=models["lgffn_d"], report=rep.outputs["html"], report_md=rep.outputs["markdown"])

    return detection
