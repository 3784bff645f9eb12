"""report: HTML + Markdown comparison of the evaluated indexes, model vs baseline (`lgff report`)."""
from typing import Optional

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Output

from ._image import LGFF_IMAGE


@dsl.component(base_image=LGFF_IMAGE, install_kfp_package=False)
def report(
    config_yaml: str,
    model_results: Input[Dataset],
    report_dir: Output[Dataset],
    html: Output[HTML],
    markdown: Output[Markdown],
    baseline_results: Optional[Input[Dataset]] = None,
    explain: Optional[Input[Dataset]] = None,
):
    """``*_results``: evaluate outputs; ``html`` / ``markdown`` are single files the KFP UI renders, copies of
    ``report.html`` / ``report.md`` in ``report_dir``."""
    import shutil

    from lgff_core import storage
    from lgff_core.kfp.runtime import input_path, object_uri, run_cli, write_config

    out = report_dir.path  # a few small files, uploaded by the launcher
    argv = ["report", "--config", write_config(config_yaml), "--out", out, "--metrics", input_path(model_results)]
    if baseline_results is not None:
        argv += ["--metrics", input_path(baseline_results)]
    if explain is not None:
        argv += ["--link", "Ablation CAM explanations=" + storage.join(object_uri(explain), "explain.html")]
    run_cli(argv)
    shutil.copyfile(f"{out}/report.html", html.path)
    shutil.copyfile(f"{out}/report.md", markdown.path)
