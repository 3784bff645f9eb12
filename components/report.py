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
    from lgff_core import storage
    from lgff_core.pipeline_runtime import artifact_uri, run_cli, write_config

    out = artifact_uri(report_dir)
    argv = ["report", "--config", write_config(config_yaml), "--out", out, "--metrics", artifact_uri(model_results)]
    if baseline_results is not None:
        argv += ["--metrics", artifact_uri(baseline_results)]
    if explain is not None:
        argv += ["--link", "Ablation CAM explanations=" + storage.join(artifact_uri(explain), "explain.html")]
    run_cli(argv)
    with open(html.path, "wb") as f:
        f.write(storage.read_bytes(storage.join(out, "report.html")))
    with open(markdown.path, "wb") as f:
        f.write(storage.read_bytes(storage.join(out, "report.md")))
