"""kfp pipeline definitions: they only wire components and set caching, retries, resources and scheduling.

Each module exposes ``build_pipeline(cfg) -> pipeline function``; the config is read at build (compile) time, so
each task gets its config slice as a constant input (`lgff_core.kfp.config`) and a config change reruns only
the tasks whose slice changed. `PIPELINES` maps the CLI names to the builders; they are registered with
`lgff_core.kfp.pipeline` here and as `lgff.pipelines` entry points (pyproject.toml), since lgff_core never imports this
package.
"""
from lgff_core.kfp.pipeline import register_pipeline

from . import detection, reindex, train_and_index

PIPELINES = {
    "train_and_index": train_and_index.build_pipeline,
    "reindex": reindex.build_pipeline,
    "detection": detection.build_pipeline,
}

for _name, _builder in PIPELINES.items():
    register_pipeline(_name, _builder)

__all__ = ["PIPELINES"]
