"""train_and_index: prep (or scan of an existing dataset URI) -> plan -> train (strategy stages chained by init) ->
embed fan-out over the plan's blocks (model and baseline) -> collect -> index (one shot, or train / add per block /
merge) -> evaluate (model and baseline) -> report.

The dataset travels as parameters (its URI and a content fingerprint), the fan-out width is the plan's output
(``rows_per_task`` is a run parameter): nothing about the data size is fixed at compile time (DESIGN.md section 7).
"""

from typing import NamedTuple, Optional

from kfp import dsl
from kfp.dsl import HTML, Markdown, Model

import components as c
from lgff_core.config import LGFFConfig
from lgff_core.kfp.pipeline import is_prep_source
from lgff_core.kfp.config import stage_config_yaml, train_stage_config_yaml

from ._explain import explain_task, report_kwargs
from ._wiring import configure_task, pipeline_root_for

NAME = "lgff-train-and-index"


def scan_task(cfg: LGFFConfig, data_uri, model_uri="", display_name: str = "scan", mode="rebuild",
              base_index_uri="") -> dsl.PipelineTask:
    """Fingerprint sources imported by URI (and check the reindex mode / fingerprint its base index); never cached,
    so a changed source is always seen."""
    task = c.scan(data_uri=data_uri, model_uri=model_uri, mode=mode, base_index_uri=base_index_uri,
                  index_metric=cfg.index.metric)
    task = configure_task(task, cfg, "plan", display_name)
    task.set_caching_options(enable_caching=False)
    # what the scan refuses (a bad run parameter, a missing or unfitting source) does not heal on a retry; its
    # object-store reads retry within lgff_core.storage's deadline
    task.set_retry(num_retries=0)
    return task


def dataset_source(cfg: LGFFConfig, source, source_is_uri: bool, stage_name: str = "") -> tuple:
    """(data_uri, data_fingerprint) channels: prep's outputs, or an existing dataset URI and its scan. A strategy
    stage with its own dataset names its tasks after the stage."""
    suffix = f"-{stage_name}" if stage_name else ""
    if source_is_uri:
        return source, scan_task(cfg, source, display_name=f"scan-dataset{suffix}").outputs["data_fingerprint"]
    prep = configure_task(c.prep(source=source, config_yaml=stage_config_yaml(cfg, "prep")), cfg, "prep",
                          f"prep{suffix}")
    return prep.outputs["uri"], prep.outputs["fingerprint"]


def plan_task(cfg: LGFFConfig, data_uri, data_fingerprint, rows_per_task) -> dsl.PipelineTask:
    task = c.plan(data_uri=data_uri, data_fingerprint=data_fingerprint, rows_per_task=rows_per_task)
    return configure_task(task, cfg, "plan", "plan")


def embed_fanout(cfg: LGFFConfig, plan: dsl.PipelineTask, label: str, model=None, model_uri=None,
                 model_fingerprint=None) -> dsl.PipelineTask:
    """embed per plan block in a ParallelFor (``pipeline.max_parallel`` at a time), then collect; returns the
    collect task. The model: a train output (``model``), one imported by URI (``model_uri`` + fingerprint), or
    neither (the GeM baseline)."""
    embed_cfg = stage_config_yaml(cfg, "embed")
    with dsl.ParallelFor(items=plan.output, parallelism=cfg.pipeline.max_parallel,
                         name=f"embed-{label}") as block:
        kwargs = {}
        if model is not None:
            kwargs["model"] = model
        elif model_uri is not None:
            kwargs.update(model_uri=model_uri, model_fingerprint=model_fingerprint)
        task = configure_task(c.embed(config_yaml=embed_cfg, block=block, **kwargs), cfg, "embed", f"embed-{label}")
    # the blocks' bulk prefixes as a parameter list, not their artifacts (components.embed says why)
    collect = c.collect_embeddings(parts=dsl.Collected(task.outputs["Output"]))
    return configure_task(collect, cfg, "report", f"collect-embeddings-{label}")


def index_tasks(cfg: LGFFConfig, embeddings, plan: dsl.PipelineTask, label: str) -> dsl.PipelineTask:
    """One-shot build, or (``pipeline.sharded_index``) train -> add per plan block (ParallelFor) -> merge."""
    index_cfg = stage_config_yaml(cfg, "index")
    if not cfg.pipeline.sharded_index:
        build = c.index_build(config_yaml=index_cfg, embeddings=embeddings)
        return configure_task(build, cfg, "index", f"index-build-{label}")
    trained = configure_task(c.index_train(config_yaml=index_cfg, embeddings=embeddings), cfg, "index",
                             f"index-train-{label}")
    with dsl.ParallelFor(items=plan.output, parallelism=cfg.pipeline.max_parallel,
                         name=f"index-add-{label}") as block:
        add = c.index_add(block=block, trained=trained.outputs["trained"], embeddings=embeddings)
        configure_task(add, cfg, "index", f"index-add-{label}")
    merge = c.index_merge(trained=trained.outputs["trained"], partials=dsl.Collected(add.outputs["Output"]))
    return configure_task(merge, cfg, "index", f"index-merge-{label}")


def evaluate_task(cfg: LGFFConfig, embeddings, index, label: str) -> dsl.PipelineTask:
    """`index`: the index artifact channel (a task output, or a `dsl.OneOf` of the reindex branches)."""
    task = c.evaluate(config_yaml=stage_config_yaml(cfg, "evaluate"), label=label, embeddings=embeddings,
                      index=index)
    return configure_task(task, cfg, "evaluate", f"evaluate-{label}")


def build_pipeline(cfg: LGFFConfig):
    """The kfp pipeline function for `cfg` (compile with kfp.compiler or call under kfp.local)."""
    source_default = cfg.pipeline.source
    source_is_uri = not is_prep_source(source_default)
    Outputs = NamedTuple("Outputs", [("model", Model), ("report", HTML), ("report_md", Markdown)])

    @dsl.pipeline(name=NAME, description="LGFF: train, embed (model + GeM baseline), index, evaluate, report",
                  pipeline_root=pipeline_root_for(cfg))
    def train_and_index(source: str = source_default, rows_per_task: int = cfg.pipeline.rows_per_task) -> Outputs:
        data_uri, data_fp = dataset_source(cfg, source, source_is_uri)
        plan = plan_task(cfg, data_uri, data_fp, rows_per_task)

        model: Optional[dsl.PipelineTask] = None
        for i, stage in enumerate(cfg.strategy):
            stage_uri, stage_fp = data_uri, data_fp
            if stage.data:  # the stage's own dataset: prepped (samples: / imagefolder:) or scanned by URI
                stage_uri, stage_fp = dataset_source(cfg, stage.data, not is_prep_source(stage.data), stage.name)
            # a stage continues from the previous one's training directory (its class weights too); the tasks
            # below get the inference model only (`model`: weights + model.json)
            kwargs = {"init": model.outputs["checkpoints"]} if model is not None else {}
            task = c.train(config_yaml=train_stage_config_yaml(cfg, i), stage_name=stage.name, data_uri=stage_uri,
                           data_fingerprint=stage_fp, nproc=max(1, cfg.pipeline.gpu_count), **kwargs)
            model = configure_task(task, cfg, "train", f"train-{i}-{stage.name}")

        results, indexes = {}, {}
        for label, trained in (("model", model.outputs["model"]), ("baseline", None)):
            emb = embed_fanout(cfg, plan, label, model=trained).outputs["embeddings"]
            idx = indexes[label] = index_tasks(cfg, emb, plan, label)
            results[label] = evaluate_task(cfg, emb, idx.outputs["index"], label).outputs["results"]
        explain = explain_task(cfg, model.outputs["model"], indexes["model"])
        rep = c.report(config_yaml=stage_config_yaml(cfg, "report"), model_results=results["model"],
                       baseline_results=results["baseline"], **report_kwargs(explain))
        configure_task(rep, cfg, "report", "report")
        return Outputs(model=model.outputs["model"], report=rep.outputs["html"], report_md=rep.outputs["markdown"])

    return train_and_index
