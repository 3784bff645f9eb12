"""`lgff pipeline run|compile|submit|schedule|list`: the kfp pipelines, locally (kfp.local) or on a KFP cluster.

    lgff pipeline run train_and_index --config lgffem_cpu [--set k=v] [--root runs/pipeline-root] [--arg source=...]
    lgff pipeline compile reindex --config lgffem_cpu --out build/reindex.yaml
    lgff pipeline submit train_and_index --config lgffem_paper --set pipeline.pipeline_root=s3://b/root \
        --host https://kfp.example.org [--experiment lgff]
    lgff pipeline schedule reindex --config lgffem_paper --set pipeline.pipeline_root=s3://b/root --host URL \
        --cron "0 0 3 * * *" --arg model_uri=... --arg data_uri=...

submit / schedule compile with the same config as compile (so pass the same --set), send pipeline.pipeline_root as
the run's pipeline root, keep each task's compiled caching, and refuse a KFP backend older than 2.17.

A second identical `run` is served from kfp.local's cache; to rerun one stage by hand against an earlier run, run
that stage's `lgff` command on the artifact URIs printed by `run` (and saved in <root>/logs/*.json).
"""
from __future__ import annotations

import argparse
import time
from typing import Any

from . import add_config_args, load_args_config
from ..config import parse_set_args


def register(subparsers) -> None:
    p = subparsers.add_parser("pipeline", help="run / compile / submit / schedule the kfp pipelines")
    sub = p.add_subparsers(dest="pipeline_command", metavar="ACTION")
    sub.required = True

    run = sub.add_parser("run", help="run a pipeline locally with kfp.local (cached per task)")
    _common(run)
    run.add_argument("--root", default=None, help="local pipeline root (default: pipeline.pipeline_root)")
    run.set_defaults(func=cmd_run)

    comp = sub.add_parser("compile", help="compile a pipeline to KFP pipeline YAML")
    _common(comp)
    comp.add_argument("--out", required=True, help="output YAML file")
    comp.set_defaults(func=cmd_compile)

    sm = sub.add_parser("submit", help="submit one run to a KFP endpoint")
    _common(sm)
    _remote(sm)
    sm.add_argument("--run-name", default=None)
    sm.set_defaults(func=cmd_submit)

    sc = sub.add_parser("schedule", help="create a recurring run on a KFP endpoint")
    _common(sc)
    _remote(sc)
    sc.add_argument("--cron", required=True, help="cron expression (KFP: 6 fields, seconds first; 5 fields accepted)")
    sc.add_argument("--job-name", default=None)
    sc.add_argument("--max-concurrency", type=int, default=1)
    sc.add_argument("--catchup", action="store_true",
                    help="backfill every interval missed while the schedule was paused (default: no catch-up)")
    sc.set_defaults(func=cmd_schedule)

    ls = sub.add_parser("list", help="list the pipelines")
    ls.set_defaults(func=cmd_list)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="pipeline name: train_and_index or reindex")
    add_config_args(p, default="lgffem_cpu")
    p.add_argument("--arg", dest="pipeline_args", action="append", default=[], metavar="KEY=VALUE",
                   help="pipeline parameter, e.g. --arg source=/data/ds or --arg model_uri=s3://... (repeatable)")


def _remote(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", required=True, help="KFP API endpoint, e.g. https://kfp.example.org/pipeline")
    p.add_argument("--experiment", default="lgff")
    p.add_argument("--namespace", default=None, help="Kubeflow profile namespace (multi-user installs)")
    p.add_argument("--service-account", default=None,
                   help="Kubernetes service account of the run's pods (default: the profile's default-editor)")
    p.add_argument("--token", default=None,
                   help="API token for multi-user Kubeflow (prefer the env variable KF_PIPELINES_TOKEN; default: "
                        "that, else the service account token file, see --sa-token-file)")
    p.add_argument("--sa-token-file", default=None,
                   help="projected service account token (default: $KF_PIPELINES_SA_TOKEN_PATH, else "
                        "/var/run/secrets/kubeflow/pipelines/token when it exists, as inside a Kubeflow pod)")
    p.add_argument("--skip-backend-check", action="store_true",
                   help="do not refuse a KFP API whose healthz reports no release >= 2.17 (development builds)")


def _remote_kwargs(args) -> dict[str, Any]:
    return {"namespace": args.namespace, "service_account": args.service_account, "token": args.token,
            "sa_token_path": args.sa_token_file, "check_version": not args.skip_backend_check}


def _pipeline_args(args) -> dict[str, Any]:
    return {k: (str(v) if not isinstance(v, (bool, int, float)) else v)
            for k, v in parse_set_args(args.pipeline_args).items()}


def _config(args):
    """The run config; ``--arg source=X`` also sets ``pipeline.source`` so the pipeline is wired for X's kind
    (prep for samples:/imagefolder: sources, an importer for an existing dataset URI)."""
    from ..config import apply_overrides

    cfg = load_args_config(args)
    source = _pipeline_args(args).get("source")
    if source is not None and args.name == "train_and_index":
        cfg = apply_overrides(cfg, {"pipeline.source": source}, origin="--arg source")
    return cfg


def cmd_list(args) -> int:
    from ..kfp.pipeline import pipeline_names

    for name in pipeline_names():
        print(name)
    return 0


def cmd_compile(args) -> int:
    from ..kfp.pipeline import compile_pipeline

    cfg = _config(args)
    path = compile_pipeline(args.name, cfg, args.out)
    print(f"compiled {args.name} ({cfg.name}) -> {path}")
    return 0


def cmd_submit(args) -> int:
    from ..kfp.pipeline import submit

    cfg = _config(args)
    run_id = submit(args.name, cfg, args.host, experiment=args.experiment, arguments=_pipeline_args(args),
                    run_name=args.run_name, **_remote_kwargs(args))
    print(f"submitted {args.name} to {args.host}: run {run_id}")
    return 0


def cmd_schedule(args) -> int:
    from ..kfp.pipeline import schedule

    cfg = _config(args)
    job_id = schedule(args.name, cfg, args.host, args.cron, experiment=args.experiment,
                      arguments=_pipeline_args(args), job_name=args.job_name,
                      max_concurrency=args.max_concurrency, catchup=args.catchup, **_remote_kwargs(args))
    print(f"scheduled {args.name} on {args.host} ({args.cron}): recurring run {job_id}")
    return 0


def progress_printer(console):
    """on_event callback: one line per task start / cache hit / finish, with elapsed time."""
    t0 = time.time()

    def on_event(kind: str, task: str) -> None:
        elapsed = f"{time.time() - t0:6.0f}s"
        if kind == "executing":
            console.print(f"[dim]{elapsed}[/]  running  [cyan]{task}[/]")
        elif kind == "cached":
            console.print(f"[dim]{elapsed}[/]  cached   [green]{task}[/]")
        elif kind == "running":
            console.print(f"[dim]{elapsed}  still running {task}[/]")
        elif kind == "finished":
            name, _, status = task.rpartition(" ")
            if status != "SUCCESS":
                console.print(f"[dim]{elapsed}[/]  [red]{status}[/]   {name}")

    return on_event


def print_result(result, console) -> None:
    from rich.table import Table

    tasks = Table(title=f"{result.pipeline}: tasks ({result.executed} executed, {result.cache_hits} cached)")
    tasks.add_column("task")
    tasks.add_column("status")
    tasks.add_column("outputs", overflow="fold")
    for t in result.tasks:
        outs = "\n".join(f"{k}: {v}" for k, v in t.outputs.items())
        style = {"cached": "green", "executed": "cyan", "imported": "magenta", "failed": "red"}.get(t.status, "")
        tasks.add_row(t.display_name, f"[{style}]{t.status}[/]", outs)
    console.print(tasks)
    if result.outputs:
        outs = Table(title="pipeline outputs")
        outs.add_column("output")
        outs.add_column("uri", overflow="fold")
        for k, v in result.outputs.items():
            outs.add_row(k, str(v))
        console.print(outs)
    print_metrics(result.metrics, console)
    console.print(f"{result.seconds:.1f} s; task logs: {result.log_file}")


def print_metrics(metrics: dict[str, dict[str, Any]], console) -> None:
    """Metric rows x evaluated index columns (model, baseline, ...), scalars only."""
    from rich.table import Table

    if not metrics:
        return
    labels = list(metrics)
    keys: list[str] = []
    for m in metrics.values():
        for k, v in m.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in keys:
                keys.append(k)
    table = Table(title="retrieval metrics")
    table.add_column("metric")
    for label in labels:
        table.add_column(label, justify="right")
    for k in keys:
        row = []
        for label in labels:
            v = metrics[label].get(k)
            row.append("" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v)))
        table.add_row(k, *row)
    console.print(table)


def cmd_run(args) -> int:
    from rich.console import Console

    from ..kfp.pipeline import run_local

    cfg = _config(args)
    console = Console(stderr=False)
    err = Console(stderr=True)
    err.print(f"running pipeline [bold]{args.name}[/] ({cfg.name}) locally with kfp.local")
    result = run_local(args.name, cfg, pipeline_root=args.root, arguments=_pipeline_args(args),
                       on_event=progress_printer(err))
    print_result(result, console)
    return 0
