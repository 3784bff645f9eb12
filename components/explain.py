"""explain: Ablation CAM of a few test queries and their top hits on every terminal neck node (`lgff explain`)."""
from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Model, Output

from ._image import LGFF_IMAGE


@dsl.component(base_image=LGFF_IMAGE, install_kfp_package=False)
def explain(
    config_yaml: str,
    model: Input[Model],
    index: Input[Artifact],
    explain_dir: Output[Dataset],
    html: Output[HTML],
):
    """``explain.num_queries`` queries of the indexed dataset's ``evaluate.query_split`` and their
    ``explain.top`` hits; ``explain_dir`` holds the PNG grids, explain.json and explain.html (also copied to
    ``html`` for the KFP UI)."""
    from lgff_core import storage
    from lgff_core.pipeline_runtime import artifact_uri, model_checkpoint_uri, run_cli, write_config

    out = artifact_uri(explain_dir)
    run_cli(["explain", "--config", write_config(config_yaml), "--model", model_checkpoint_uri(artifact_uri(model)),
             "--index", artifact_uri(index), "--sample", "--out", out])
    with open(html.path, "wb") as f:
        f.write(storage.read_bytes(storage.join(out, "explain.html")))
