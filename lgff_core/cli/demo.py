"""`lgff demo --out DIR`: the full train_and_index pipeline, locally (kfp.local), on real H&E sample data.

    lgff demo --out runs/demo [--config demo] [--set train.epochs=2 ...]

Runs the pipeline's stages in order: prep (`lgff prep samples`: the histolytics-nuclei nucleus crops from the
installed `histolytics` package) -> train (config `demo`, or `lgffem_cpu` when that preset is absent) -> embed
(model and GeM baseline, 2 shard jobs each) -> index -> evaluate -> report; then prints model-vs-baseline metrics
and where the report is. Everything lands under DIR/pipeline-root; a second `lgff demo` with the same settings is
served from the task cache in seconds.
"""
from __future__ import annotations

import argparse
import shutil

from . import add_config_args
from .pipeline import print_result, progress_printer
from ..config import ConfigError, load_config, parse_set_args, resolve_config_path

DEMO_SOURCE = "samples:histolytics-nuclei"
# demo-sized settings applied before the user's --set (which win): small shards so the embed fan-out has work for
# both shard jobs
DEMO_DEFAULTS = {"data.shard_mb": 2.0, "pipeline.sharded_index": False}
# only when the `demo` preset is missing: keep the lgffem_cpu fallback inside the 15-minute / 2-core budget
FALLBACK_DEFAULTS = {"train.epochs": 3, "train.image_size": 64, "embed.image_size": 64, "train.feature_cache": "auto"}


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run the train_and_index pipeline locally on real sample data",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="output directory (pipeline root, logs, report)")
    add_config_args(p, default=None)
    p.add_argument("--fresh", action="store_true", help="delete DIR first (no cache hits)")
    p.set_defaults(func=run)


def demo_config(config: str | None, overrides: list[str], out: str):
    """The demo config: `config`, else preset `demo`, else `lgffem_cpu`; demo defaults, then the user's --set."""
    name = config
    settings = dict(DEMO_DEFAULTS)
    if name is None:
        try:
            resolve_config_path("demo")
            name = "demo"
        except ConfigError:
            name = "lgffem_cpu"
            settings.update(FALLBACK_DEFAULTS)
    settings["pipeline.source"] = DEMO_SOURCE
    settings["pipeline.pipeline_root"] = f"{out.rstrip('/')}/pipeline-root"
    settings.update(parse_set_args(overrides))
    return load_config(name, settings)


def run(args) -> int:
    from rich.console import Console

    from ..kfp.pipeline import run_local

    if args.fresh:
        shutil.rmtree(args.out, ignore_errors=True)
    cfg = demo_config(args.config, args.overrides, args.out)
    out, err = Console(), Console(stderr=True)
    err.print(f"[bold]lgff demo[/]: train_and_index on {cfg.pipeline.source} with config [bold]{cfg.name}[/] "
              f"({cfg.train.epochs} epoch(s), backbone {cfg.model.backbone.name}); "
              f"pipeline root {cfg.pipeline.pipeline_root}")
    result = run_local("train_and_index", cfg, on_event=progress_printer(err))
    print_result(result, out)
    if "model" in result.metrics and "baseline" in result.metrics:
        m, b = result.metrics["model"], result.metrics["baseline"]
        keys = [k for k in ("recall@1", "map", "mmv@5") if isinstance(m.get(k), float) and isinstance(b.get(k), float)]
        out.print("[bold]model vs baseline[/] (same data, index and protocol): "
                  + ", ".join(f"{k} {m[k]:.4f} vs {b[k]:.4f}" for k in keys))
    report = result.outputs.get("report")
    if report:
        out.print(f"report: {report}")
        if result.outputs.get("report_md"):
            out.print(f"report (Markdown): {result.outputs['report_md']}")
    return 0
