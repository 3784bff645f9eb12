"""embed: embeddings of one work block of the plan (`lgff embed block`), and the collect step that names every
block's output in one embeddings manifest (`lgff embed collect`; it copies nothing).

The blocks reach collect as parameters (each embed task's bulk prefix), not as a collected artifact list: KFP's
launcher opens object-store sessions from the first artifact of a list only (`fetchNonDefaultBuckets`), so a list
whose first block ran in this run and whose others are earlier runs' cache hits would fail to download
(DESIGN.md section 7)."""
from typing import List, Optional

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from ._image import LGFF_IMAGE


@dsl.component(base_image=LGFF_IMAGE, install_kfp_package=False)
def embed(
    config_yaml: str,
    block: dict,
    embeddings: Output[Dataset],
    model_uri: str = "",
    model_fingerprint: str = "",
    model: Optional[Input[Model]] = None,
) -> str:
    """The model is ``model`` (a train task's inference model: model.safetensors + model.json, all the launcher
    downloads here) or ``model_uri`` (imported by URI, read directly; ``model_fingerprint`` from the scan task keys
    the cache); with neither, the GeM baseline. The block's rows are streamed from the dataset's shards; the output
    shard goes to the bulk prefix, the artifact is its manifest. Returns the bulk prefix (what collect reads)."""
    import os
    import tempfile

    from lgff_core.kfp.runtime import (bulk_uri, dataset_facts, input_path, model_checkpoint_uri,
                                            publish_pointer, run_cli, write_config, write_json_file)

    bulk = bulk_uri(embeddings)
    block_file = write_json_file(os.path.join(tempfile.mkdtemp(prefix="lgff-block-"), "block.json"), block)
    argv = ["embed", "block", "--config", write_config(config_yaml), "--block", block_file, "--out", bulk]
    if model is not None:
        argv += ["--model", model_checkpoint_uri(input_path(model))]
    elif model_uri:
        argv += ["--model", model_checkpoint_uri(model_uri)]
    else:
        argv += ["--baseline"]
    run_cli(argv)
    embeddings.metadata.update(dataset_facts(publish_pointer(embeddings, bulk, "_manifest.json")))
    embeddings.metadata["block"] = int(block["block"])
    embeddings.metadata["model"] = (model.metadata.get("digest", "") if model is not None
                                    else model_fingerprint or "baseline")
    return bulk


@dsl.component(base_image=LGFF_IMAGE, install_kfp_package=False)
def collect_embeddings(parts: List[str], embeddings: Output[Dataset]):
    """One manifest naming every block output's shard by URI (`lgff embed collect PART... --out`); `parts`: the
    embed tasks' bulk prefixes (their outputs, collected over the ParallelFor)."""
    from lgff_core.kfp.runtime import dataset_facts, read_pointer, run_cli

    run_cli(["embed", "collect", *parts, "--out", embeddings.path])
    embeddings.metadata.update(dataset_facts(read_pointer(embeddings, "_manifest.json")))
