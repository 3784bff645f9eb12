"""index: faiss index over an embeddings set, one shot (`lgff index build`) or sharded, faiss-contrib style
(`lgff index train` on a sample -> `lgff index add` per plan block -> `lgff index merge`), or appended to an existing
index (`lgff index add --to`). faiss files go to the bulk prefix; each artifact is the stage's JSON manifest
(``index.json`` / ``partial.json``) naming them. The partials reach the merge as parameters (each add task's bulk
prefix), for the reason `components.embed` gives for collect."""
from typing import List

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output

from ._image import LGFF_IMAGE


@dsl.component(base_image=LGFF_IMAGE, install_kfp_package=False)
def index_build(config_yaml: str, embeddings: Input[Dataset], index: Output[Artifact]):
    from lgff_core.kfp.runtime import bulk_uri, dataset_facts, input_path, publish_pointer, run_cli, write_config

    bulk = bulk_uri(index)
    run_cli(["index", "build", "--config", write_config(config_yaml), "--embeddings", input_path(embeddings),
             "--out", bulk])
    index.metadata.update(dataset_facts(publish_pointer(index, bulk, "index.json")))


@dsl.component(base_image=LGFF_IMAGE, install_kfp_package=False)
def index_train(config_yaml: str, embeddings: Input[Dataset], trained: Output[Artifact]):
    from lgff_core.kfp.runtime import bulk_uri, dataset_facts, input_path, publish_pointer, run_cli, write_config

    bulk = bulk_uri(trained)
    run_cli(["index", "train", "--config", write_config(config_yaml), "--embeddings", input_path(embeddings),
             "--out", bulk])
    trained.metadata.update(dataset_facts(publish_pointer(trained, bulk, "index.json")))


@dsl.component(base_image=LGFF_IMAGE, install_kfp_package=False)
def index_add(block: dict, trained: Input[Artifact], embeddings: Input[Dataset], partial: Output[Artifact]) -> str:
    """Partial index over plan block ``block``: collect lists one embeddings shard per block, in block order, so
    the block is shard ``block`` of as many as the collected manifest lists. Returns the bulk prefix (what the
    merge reads)."""
    from lgff_core.kfp.runtime import (bulk_of, bulk_uri, dataset_facts, input_path, publish_pointer,
                                            read_pointer, run_cli)

    num_blocks = len(read_pointer(embeddings, "_manifest.json")["shards"])
    bulk = bulk_uri(partial)
    run_cli(["index", "add", "--trained", bulk_of(trained, "index.json"), "--embeddings", input_path(embeddings),
             "--shard", f"{int(block['block'])}/{num_blocks}", "--out", bulk])
    partial.metadata.update(dataset_facts(publish_pointer(partial, bulk, "partial.json")))
    return bulk


@dsl.component(base_image=LGFF_IMAGE, install_kfp_package=False)
def index_merge(trained: Input[Artifact], partials: List[str], index: Output[Artifact]):
    """`partials`: the add tasks' bulk prefixes (their outputs, collected over the ParallelFor)."""
    from lgff_core.kfp.runtime import bulk_of, bulk_uri, dataset_facts, publish_pointer, run_cli

    bulk = bulk_uri(index)
    run_cli(["index", "merge", "--trained", bulk_of(trained, "index.json"), "--partials", *partials, "--out", bulk])
    index.metadata.update(dataset_facts(publish_pointer(index, bulk, "index.json")))


@dsl.component(base_image=LGFF_IMAGE, install_kfp_package=False)
def index_append(config_yaml: str, base_index: str, base_index_fingerprint: str, embeddings: Input[Dataset],
                 index: Output[Artifact]):
    """A new index version: the index at prefix ``base_index`` plus the rows of ``embeddings`` whose sample_id it
    does not hold yet, written to this task's own bulk prefix (its manifest names the base as parent; the base is
    only read). ``base_index_fingerprint`` (sha256 of the base's index.json, from the scan) only enters the cache
    key: a changed base index is appended to again."""
    from lgff_core.kfp.runtime import bulk_uri, dataset_facts, input_path, publish_pointer, run_cli, write_config

    bulk = bulk_uri(index)
    run_cli(["index", "add", "--config", write_config(config_yaml), "--to", base_index, "--embeddings",
             input_path(embeddings), "--skip-existing", "--out", bulk])
    manifest = publish_pointer(index, bulk, "index.json")
    index.metadata.update(dataset_facts(manifest))
    index.metadata.update(appended=manifest["holds"][-1]["rows"], skipped=manifest["holds"][-1].get("skipped", 0))
