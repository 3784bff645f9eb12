"""reindex: an existing model (``model_uri``) + an archive (``data_uri``) -> scan (fingerprints, never cached) ->
plan -> embed fan-out -> collect -> index -> evaluate + report (``pipeline.reindex_evaluate``).

``mode`` (a run parameter) chooses the index step:
- ``rebuild`` (default): a new index over every collected row (one shot, or train / add per block / merge).
- ``append``: a new index version = the index at ``base_index_uri`` (an index prefix holding index.json, e.g. the
  bulk prefix of an earlier run's index output; an artifact's pointer is followed) + the collected rows whose
  sample_id it does not hold yet, with its trained quantizer (`lgff index add --to --skip-existing`). Written under
  the task's own bulk prefix; its manifest names the base as parent; the base is only read. When no row is new the
  output is a new version holding the base's rows.
The scan checks the mode (anything else, or append without a readable base index, fails the run at once) and passes
the base index's fingerprint (sha256 of its index.json) to the append task, so a changed base is not a cache hit.

Scheduled as a recurring run it follows the content: unchanged data and model are cache hits all the way; a new
shard (a republished manifest) changes the data fingerprint, so the plan, the new block's embed, the index and the
evaluation rerun.
"""
from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Dataset

import components as c
from lgff_core.config import LGFFConfig
from lgff_core.kfp.config import stage_config_yaml

from ._wiring import configure_task, pipeline_root_for
from .train_and_index import embed_fanout, evaluate_task, index_tasks, plan_task, scan_task

NAME = "lgff-reindex"


def index_append_task(cfg: LGFFConfig, embeddings, scan: dsl.PipelineTask, label: str) -> dsl.PipelineTask:
    task = c.index_append(config_yaml=stage_config_yaml(cfg, "index"), base_index=scan.outputs["base_index"],
                          base_index_fingerprint=scan.outputs["base_index_fingerprint"], embeddings=embeddings)
    return configure_task(task, cfg, "index", f"index-append-{label}")


def build_pipeline(cfg: LGFFConfig):
    Outputs = NamedTuple("Outputs", [("index", Artifact), ("embeddings", Dataset)])

    @dsl.pipeline(name=NAME, description="LGFF: embed an archive with an existing model and rebuild its index or "
                                         "append the new rows to an existing one",
                  pipeline_root=pipeline_root_for(cfg))
    def reindex(model_uri: str, data_uri: str, rows_per_task: int = cfg.pipeline.rows_per_task,
                mode: str = "rebuild", base_index_uri: str = "") -> Outputs:
        scan = scan_task(cfg, data_uri, model_uri, mode=mode, base_index_uri=base_index_uri)
        plan = plan_task(cfg, data_uri, scan.outputs["data_fingerprint"], rows_per_task)
        emb = embed_fanout(cfg, plan, "model", model_uri=model_uri,
                           model_fingerprint=scan.outputs["model_fingerprint"]).outputs["embeddings"]
        with dsl.If(mode == "append", name="append"):
            appended = index_append_task(cfg, emb, scan, "model")
        with dsl.Else(name="rebuild"):  # the scan has refused any other mode
            rebuilt = index_tasks(cfg, emb, plan, "model")
        index = dsl.OneOf(appended.outputs["index"], rebuilt.outputs["index"])
        if cfg.pipeline.reindex_evaluate:
            ev = evaluate_task(cfg, emb, index, "model")
            configure_task(c.report(config_yaml=stage_config_yaml(cfg, "report"), model_results=ev.outputs["results"]),
                           cfg, "report", "report")
        return Outputs(index=index, embeddings=emb)

    return reindex
