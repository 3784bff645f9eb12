"""reindex: an existing model + a (new) dataset -> embed fan-out -> index -> optional evaluation + report."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Model

import components as c
from lgff_core.config import LGFFConfig
from lgff_core.pipeline_config import stage_config_yaml

from ._wiring import configure_task, pipeline_root_for
from .train_and_index import embed_fanout, evaluate_task, index_tasks

NAME = "lgff-reindex"


def build_pipeline(cfg: LGFFConfig):
    Outputs = NamedTuple("Outputs", [("index", Artifact), ("embeddings", Dataset)])

    @dsl.pipeline(name=NAME, description="LGFF: embed an archive with an existing model and (re)build its index",
                  pipeline_root=pipeline_root_for(cfg))
    def reindex(model_uri: str, data_uri: str) -> Outputs:
        model = dsl.importer(artifact_uri=model_uri, artifact_class=Model, reimport=False)
        model.set_display_name("import-model")
        data = dsl.importer(artifact_uri=data_uri, artifact_class=Dataset, reimport=False)
        data.set_display_name("import-dataset")
        emb = embed_fanout(cfg, data.outputs["artifact"], model.outputs["artifact"], "model").outputs["embeddings"]
        idx = index_tasks(cfg, emb, "model")
        if cfg.pipeline.reindex_evaluate:
            ev = evaluate_task(cfg, emb, idx, "model")
            configure_task(c.report(config_yaml=stage_config_yaml(cfg, "report"), model_results=ev.outputs["results"]),
                           cfg, "report", "report")
        return Outputs(index=idx.outputs["index"], embeddings=emb)

    return reindex
