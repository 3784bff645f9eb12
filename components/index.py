"""index: faiss index over an embeddings set, one shot (`lgff index build`) or sharded, faiss-contrib style
(`lgff index train` on a sample -> `lgff index add` per shard range -> `lgff index merge`)."""
from typing import List

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output

from ._image import LGFF_IMAGE


@dsl.component(base_image=LGFF_IMAGE, install_kfp_package=False)
def index_build(config_yaml: str, embeddings: Input[Dataset], index: Output[Artifact]):
    from lgff_core.pipeline_runtime import artifact_uri, dataset_facts, run_cli, write_config

    out = artifact_uri(index)
    run_cli(["index", "build", "--config", write_config(config_yaml), "--embeddings", artifact_uri(embeddings),
             "--out", out])
    index.metadata.update(dataset_facts(out))


@dsl.component(base_image=LGFF_IMAGE, install_kfp_package=False)
def index_train(config_yaml: str, embeddings: Input[Dataset], trained: Output[Artifact]):
    from lgff_core.pipeline_runtime import artifact_uri, dataset_facts, run_cli, write_config

    out = artifact_uri(trained)
    run_cli(["index", "train", "--config", write_config(config_yaml), "--embeddings", artifact_uri(embeddings),
             "--out", out])
    trained.metadata.update(dataset_facts(out))


@dsl.component(base_image=LGFF_IMAGE, install_kfp_package=False)
def index_add(
    shard_index: int,
    num_shards: int,
    trained: Input[Artifact],
    embeddings: Input[Dataset],
    partial: Output[Artifact],
):
    """Partial index over embeddings shard block ``shard_index`` of ``num_shards`` (settings from ``trained``)."""
    from lgff_core.pipeline_runtime import artifact_uri, dataset_facts, run_cli

    out = artifact_uri(partial)
    run_cli(["index", "add", "--trained", artifact_uri(trained),
             "--embeddings", artifact_uri(embeddings), "--shard", f"{shard_index}/{num_shards}", "--out", out])
    partial.metadata.update(dataset_facts(out))


@dsl.component(base_image=LGFF_IMAGE, install_kfp_package=False)
def index_merge(trained: Input[Artifact], partials: List[Artifact], index: Output[Artifact]):
    from lgff_core.pipeline_runtime import artifact_uri, dataset_facts, run_cli

    out = artifact_uri(index)
    run_cli(["index", "merge", "--trained", artifact_uri(trained), "--partials",
             *[artifact_uri(p) for p in partials], "--out", out])
    index.metadata.update(dataset_facts(out))
