"""reindex: an existing model (``model_uri``) + an archive (``data_uri``) -> scan (fingerprints, never cached) ->
plan -> embed fan-out -> collect -> index -> evaluate + report (``pipeline.reindex_evaluate``).

Scheduled as a recurring run it follows the content: unchanged data and model are cache hits all the way; a new
shard (a republished manifest) changes the data fingerprint, so the plan, the new block's embed, the index and the
evaluation rerun. Always a rebuild of the index (an append mode needs `lgff index add --to`).
"""
from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Dataset

import components as c
from lgff_core.config import LGFFConfig
from lgff_core.pipeline_config import stage_config_yaml

from ._wiring import configure_task, pipeline_root_for
from .train_and_index import embed_fanout, evaluate_task, index_tasks, plan_task, scan_task

NAME = "lgff-reindex"


def build_pipeline(cfg: LGFFConfig):
    Outputs = NamedTuple("Outputs", [("index", Artifact), ("embeddings", Dataset)])

    @dsl.pipeline(name=NAME, description="LGFF: embed an archive with an existing model and (re)build its index",
                  pipeline_root=pipeline_root_for(cfg))
    def reindex(model_uri: str, data_uri: str, rows_per_task: int = cfg.pipeline.rows_per_task) -> Outputs:
        scan = scan_task(cfg, data_uri, model_uri)
        plan = plan_task(cfg, data_uri, scan.outputs["data_fingerprint"], rows_per_task)
        emb = embed_fanout(cfg, plan, "model", model_uri=model_uri,
                           model_fingerprint=scan.outputs["model_fingerprint"]).outputs["embeddings"]
        idx = index_tasks(cfg, emb, plan, "model")
        if cfg.pipeline.reindex_evaluate:
            ev = evaluate_task(cfg, emb, idx, "model")
            configure_task(c.report(config_yaml=stage_config_yaml(cfg, "report"), model_results=ev.outputs["results"]),
                           cfg, "report", "report")
        return Outputs(index=idx.outputs["index"], embeddings=emb)

    return reindex
