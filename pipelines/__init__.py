"""kfp pipeline definitions: they only wire components and set caching, retries, resources and scheduling.

Each module exposes ``build_pipeline(cfg) -> pipeline function``; the config is read at build (compile) time, so
each task gets its config slice as a constant input (`lgff_core.pipeline_config`) and a config change reruns only
the tasks whose slice changed. `PIPELINES` maps the CLI names to the builders.
"""
from . import detection, reindex, train_and_index

PIPELINES = {
    "train_and_index": train_and_index.build_pipeline,
    "reindex": reindex.build_pipeline,
    "detection": detection.build_pipeline,
}

__all__ = ["PIPELINES"]
