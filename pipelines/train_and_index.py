"""train_and_index: prep -> train (strategy stages chained by init) -> embed fan-out (model and baseline) ->
collect -> index (one shot, or train/add fan-out/merge) -> evaluate (model and baseline) -> report."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Dataset, Markdown, Model

import components as c
from lgff_core.config import LGFFConfig
from lgff_core.pipeline import is_prep_source
from lgff_core.pipeline_config import stage_config_yaml, train_stage_config_yaml

from ._wiring import configure_task, pipeline_root_for

NAME = "lgff-train-and-index"


def dataset_task(cfg: LGFFConfig, source, source_is_uri: bool) -> dsl.PipelineTask:
    """The dataset: built by the prep component, or an existing dataset URI imported as an artifact."""
    if source_is_uri:
        task = dsl.importer(artifact_uri=source, artifact_class=Dataset, reimport=False)
        task.set_display_name("import-dataset")
        return task
    return configure_task(c.prep(source=source, config_yaml=stage_config_yaml(cfg, "prep")), cfg, "prep", "prep")


def embed_fanout(cfg: LGFFConfig, data, model, label: str) -> dsl.PipelineTask:
    """embed over `pipeline.embed_shards` shard ranges in a ParallelFor, then collect; returns the collect task."""
    n = cfg.pipeline.embed_shards
    embed_cfg = stage_config_yaml(cfg, "embed")
    with dsl.ParallelFor(items=list(range(n)), parallelism=cfg.pipeline.embed_parallelism, name=f"embed-{label}") as i:
        kwargs = {"model": model} if model is not None else {}
        shard = c.embed(config_yaml=embed_cfg, shard_index=i, num_shards=n, data=data, **kwargs)
        configure_task(shard, cfg, "embed", f"embed-{label}")
    collect = c.collect_embeddings(parts=dsl.Collected(shard.outputs["embeddings"]))
    return configure_task(collect, cfg, "report", f"collect-embeddings-{label}")


def index_tasks(cfg: LGFFConfig, embeddings, label: str) -> dsl.PipelineTask:
    """One-shot build, or (``pipeline.sharded_index``) train -> add per shard range (ParallelFor) -> merge."""
    index_cfg = stage_config_yaml(cfg, "index")
    if not cfg.pipeline.sharded_index:
        build = c.index_build(config_yaml=index_cfg, embeddings=embeddings)
        return configure_task(build, cfg, "index", f"index-build-{label}")
    trained = configure_task(c.index_train(config_yaml=index_cfg, embeddings=embeddings), cfg, "index",
                             f"index-train-{label}")
    n = cfg.pipeline.embed_shards
    with dsl.ParallelFor(items=list(range(n)), parallelism=cfg.pipeline.embed_parallelism, name=f"index-add-{label}") as i:
        add = c.index_add(shard_index=i, num_shards=n, trained=trained.outputs["trained"],
                          embeddings=embeddings)
        configure_task(add, cfg, "index", f"index-add-{label}")
    merge = c.index_merge(trained=trained.outputs["trained"],
                          partials=dsl.Collected(add.outputs["partial"]))
    return configure_task(merge, cfg, "index", f"index-merge-{label}")


def evaluate_task(cfg: LGFFConfig, embeddings, index, label: str) -> dsl.PipelineTask:
    task = c.evaluate(config_yaml=stage_config_yaml(cfg, "evaluate"), label=label, embeddings=embeddings,
                      index=index.outputs["index"])
    return configure_task(task, cfg, "evaluate", f"evaluate-{label}")


def build_pipeline(cfg: LGFFConfig):
    """The kfp pipeline function for `cfg` (compile with kfp.compiler or call under kfp.local)."""
    source_default = cfg.pipeline.source
    source_is_uri = not is_prep_source(source_default)
    Outputs = NamedTuple("Outputs", [("model", Model), ("report", HTML), ("report_md", Markdown)])

    @dsl.pipeline(name=NAME, description="LGFF: train, embed (model + GeM baseline), index, evaluate, report",
                  pipeline_root=pipeline_root_for(cfg))
    def train_and_index(source: str = source_default) -> Outputs:
        data = dataset_task(cfg, source, source_is_uri)
        dataset = data.outputs["artifact"] if source_is_uri else data.outputs["dataset"]

        model = None
        for i, stage in enumerate(cfg.strategy):
            stage_data = dataset
            if stage.data:  # the stage's own dataset: prepped (samples: / imagefolder:) or imported
                stage_is_uri = not is_prep_source(stage.data)
                stage_task = dataset_task(cfg, stage.data, stage_is_uri)
                stage_task.set_display_name(f"{'import' if stage_is_uri else 'prep'}-{stage.name}")
                stage_data = stage_task.outputs["artifact" if stage_is_uri else "dataset"]
            kwargs = {"init": model.outputs["model"]} if model is not None else {}
            task = c.train(config_yaml=train_stage_config_yaml(cfg, i), stage_name=stage.name, data=stage_data,
                           **kwargs)
            model = configure_task(task, cfg, "train", f"train-{i}-{stage.name}")

        results = {}
        for label, trained in (("model", model.outputs["model"]), ("baseline", None)):
            emb = embed_fanout(cfg, dataset, trained, label).outputs["embeddings"]
            idx = index_tasks(cfg, emb, label)
            results[label] = evaluate_task(cfg, emb, idx, label).outputs["results"]
        rep = c.report(config_yaml=stage_config_yaml(cfg, "report"), model_results=results["model"],
                       baseline_results=results["baseline"])
        configure_task(rep, cfg, "report", "report")
        return Outputs(model=model.outputs["model"], report=rep.outputs["html"], report_md=rep.outputs["markdown"])

    return train_and_index
