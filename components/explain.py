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
    """``model``: a train task's inference model (weights + model.json). ``explain.num_queries`` queries of the
    indexed dataset's ``evaluate.query_split`` and their ``explain.top`` hits; ``explain_dir`` holds the PNG grids,
    explain.json and explain.html (also copied to ``html`` for the KFP UI)."""
    import shutil

    from lgff_core.kfp.runtime import bulk_of, input_path, model_checkpoint_uri, run_cli, write_config

    out = explain_dir.path  # a few PNGs and a page, uploaded by the launcher
    run_cli(["explain", "--config", write_config(config_yaml), "--model", model_checkpoint_uri(input_path(model)),
             "--index", bulk_of(index, "index.json"), "--sample", "--out", out])
    shutil.copyfile(f"{out}/explain.html", html.path)
