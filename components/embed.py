"""embed: embeddings of one contiguous range of dataset shards (`lgff embed --shard I/N`), and the collect step
that joins the per-shard outputs of a ParallelFor into one embeddings set with its manifest."""
from typing import List, Optional

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from ._image import LGFF_IMAGE


@dsl.component(base_image=LGFF_IMAGE, install_kfp_package=False)
def embed(
    config_yaml: str,
    shard_index: int,
    num_shards: int,
    data: Input[Dataset],
    embeddings: Output[Dataset],
    model: Optional[Input[Model]] = None,
):
    """With ``model`` unset, embeds with the GeM baseline (frozen backbone + GeM) instead of a trained model."""
    import os

    from lgff_core.pipeline_runtime import artifact_uri, model_checkpoint_uri, run_cli, write_config

    out = artifact_uri(embeddings)
    argv = ["embed", "--config", write_config(config_yaml), "--data", artifact_uri(data),
            "--out", out, "--shard", f"{shard_index}/{num_shards}"]
    argv += ["--model", model_checkpoint_uri(artifact_uri(model))] if model is not None else ["--baseline"]
    run_cli(argv)
    if "://" not in out:
        os.makedirs(out, exist_ok=True)  # an empty shard block writes nothing; the artifact must still exist
    embeddings.metadata["shard"] = f"{shard_index}/{num_shards}"
    embeddings.metadata["model"] = "baseline" if model is None else model.metadata.get("digest", "")


@dsl.component(base_image=LGFF_IMAGE, install_kfp_package=False)
def collect_embeddings(parts: List[Dataset], embeddings: Output[Dataset]):
    """Join the shard outputs (`lgff embed collect PART... --out`) and write the manifest."""
    from lgff_core.pipeline_runtime import artifact_uri, dataset_facts, run_cli

    out = artifact_uri(embeddings)
    run_cli(["embed", "collect", *[artifact_uri(p) for p in parts], "--out", out])
    embeddings.metadata.update(dataset_facts(out))
