"""Run, compile, submit and schedule the registered kfp pipelines (`pipelines/` registers its own) for a config.

Local path (the embedded default, DESIGN.md section 6): `run_local` executes the pipeline with ``kfp.local`` and the
``SubprocessRunner(use_venv=False)``: every task is a subprocess of this venv's Python running the component body,
which calls ``lgff_core.cli.main`` exactly as the shell does. Nothing is installed at run time (components are
built with ``install_kfp_package=False``).

Caching: kfp 2.17's ``kfp.local`` has a file-backed task cache (``enable_caching=True``; entries under
``<pipeline_root>/.kfp_cache``). A task's key is sha256(component name, image, command, its input values, and for
input artifacts their URI + metadata). Every artifact our components write is materialised as a file or directory
(a missing artifact path makes kfp.local treat the entry as a miss) and carries a content digest in its metadata.
Because a cached task returns the *original* output URIs, an identical second run is all cache hits, and changing
one stage's inputs (e.g. its config slice, see `lgff_core.kfp.config`) reruns that task and only the tasks
downstream of it.

Cluster path: `compile_pipeline` writes the pipeline YAML (GPU requests, node selector, tolerations and the S3
Secret reference live in its platform spec; kfp.local ignores that part); `submit` / `schedule` hand it to
``kfp.Client`` (``create_run_from_pipeline_package`` / ``create_recurring_run``) with the run's pipeline root in its
runtime config (the backend ignores the spec's own root) and ``enable_caching=None`` (the compiled per-task caching
stands), after checking that the API's release is at least `MIN_BACKEND`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import re
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from ..config import LGFFConfig
from ..errors import LGFFError

__all__ = [
    "PipelineError",
    "TaskRecord",
    "LocalRunResult",
    "pipeline_names",
    "register_pipeline",
    "registered_pipelines",
    "build",
    "run_local",
    "compile_pipeline",
    "submit",
    "schedule",
    "check_backend",
    "run_pipeline_root",
    "MIN_BACKEND",
]

log = logging.getLogger(__name__)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EXECUTING = re.compile(r"Executing task '([^']+)'")
_FINISHED = re.compile(r"Task '([^']+)' finished with status (\w+)")
# the one-line error of an `lgff` command in a task's output (lgff_core.cli.main): the reason a task failed
_TASK_ERROR = re.compile(r"^\s*(lgff [\w-]+: error: .+?)\s*$")


class PipelineError(LGFFError):
    """A pipeline name, argument or run failed; the message names the task and the log file."""


@dataclass
class TaskRecord:
    task: str  # task name in the DAG (repeats across ParallelFor iterations)
    display_name: str
    status: str  # "executed", "cached", "imported" (dsl.importer) or "failed"
    outputs: dict[str, Any] = field(default_factory=dict)  # output name -> URI (artifact) or value (parameter)


@dataclass
class LocalRunResult:
    pipeline: str
    pipeline_root: str
    log_file: str
    seconds: float
    tasks: list[TaskRecord]
    outputs: dict[str, str]  # pipeline output name -> URI
    metrics: dict[str, dict[str, Any]]  # evaluate label -> metrics.json contents

    @property
    def cache_hits(self) -> int:
        return sum(t.status == "cached" for t in self.tasks)

    @property
    def executed(self) -> int:
        return sum(t.status == "executed" for t in self.tasks)

    def to_json(self) -> dict[str, Any]:
        return {
            "pipeline": self.pipeline,
            "pipeline_root": self.pipeline_root,
            "log_file": self.log_file,
            "seconds": round(self.seconds, 2),
            "outputs": self.outputs,
            "metrics": self.metrics,
            "tasks": [t.__dict__ for t in self.tasks],
        }


# Pipeline registry. lgff_core is the layer below `pipelines/` and never imports it: pipeline definitions register
# themselves, either as entry points of the group below (`pyproject.toml`, found once the project is installed) or
# by calling `register_pipeline` (the `pipelines` package does so when imported).
ENTRY_POINT_GROUP = "lgff.pipelines"
_REGISTRY: dict[str, Callable[[LGFFConfig], Any]] = {}


def register_pipeline(name: str, builder: Callable[[LGFFConfig], Any]) -> None:
    """Make `builder(cfg) -> kfp pipeline function` available as `lgff pipeline ... name`."""
    _REGISTRY[name] = builder


def registered_pipelines() -> dict[str, Callable[[LGFFConfig], Any]]:
    """Every registered pipeline builder: those registered in-process, then the `lgff.pipelines` entry points."""
    from importlib.metadata import entry_points

    found = dict(_REGISTRY)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in found:
            found[ep.name] = ep
    return found


PREP_SOURCES = ("samples:", "imagefolder:")


def is_prep_source(source: str) -> bool:
    """A source the pipeline builds with its prep task (``samples:NAME``, ``imagefolder:DIR``), not a dataset URI."""
    return str(source).startswith(PREP_SOURCES)


def check_datasets(cfg: LGFFConfig, arguments: Optional[dict[str, Any]] = None) -> None:
    """Before a run: every dataset URI the run imports (strategy stages, pipeline source) must be a dataset (hold a
    `_manifest.json`); otherwise a `PipelineError` names the missing URI and where the config sets it."""
    from .. import storage

    wanted = [(f"strategy[{i}].data ({s.name})", s.data) for i, s in enumerate(cfg.strategy) if s.data]
    source = (arguments or {}).get("source", cfg.pipeline.source)
    wanted.append(("source" if arguments and "source" in arguments else "pipeline.source", source))
    for where, uri in wanted:
        if not uri or is_prep_source(uri):
            continue
        manifest = storage.join(str(uri), "_manifest.json")
        try:
            found = storage.exists(manifest)
        except LGFFError as exc:
            raise PipelineError(f"dataset {uri} ({where}) cannot be read: {exc}") from None
        if not found:
            raise PipelineError(f"dataset {uri} ({where}) is missing: no {manifest}; prep it first "
                                "(`lgff prep ... --out URI`) or point the config at it")


def _parameters(func) -> set[str]:
    """Parameter names of a kfp pipeline function (its component spec's inputs)."""
    spec = getattr(func, "component_spec", None)
    return set((spec.inputs or {}).keys()) if spec is not None else set()


def pipeline_names() -> list[str]:
    return sorted(registered_pipelines())


def build(name: str, cfg: LGFFConfig):
    """The kfp pipeline function `name` built for `cfg`."""
    from importlib.metadata import EntryPoint

    found = registered_pipelines()
    if name not in found:
        known = ", ".join(sorted(found)) or (f"none registered (entry point group {ENTRY_POINT_GROUP!r}: "
                                             "install the project, e.g. `pip install -e .`)")
        raise PipelineError(f"unknown pipeline {name!r}; pipelines: {known}")
    builder = found[name]
    if isinstance(builder, EntryPoint):
        builder = builder.load()
    return builder(cfg)


# ----------------------------------------------------------------------------------------------- local run


class _LineTee(io.TextIOBase):
    """stdout replacement during a local run: every line goes to the log file, and kfp.local's task events
    (executing / cache hit / finished) are passed to `on_event` for progress display."""

    def __init__(self, log_file: io.TextIOBase, on_event: Callable[[str, str], None]):
        self._log = log_file
        self._on_event = on_event
        self._buf = ""
        self._lock = threading.Lock()
        self.failures: list[str] = []  # `lgff CMD: error: ...` lines of the tasks, in order, each once

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self._lock:
            if not self._log.closed:  # kfp.local may leave a handler on this stream after the run
                self._log.write(text)
            self._buf += text
            *lines, self._buf = self._buf.split("\n")
        for line in lines:
            plain = _ANSI.sub("", line)
            m = _TASK_ERROR.match(plain)
            if m and m.group(1) not in self.failures:
                self.failures.append(m.group(1))
            for pattern, event in ((_EXECUTING, "executing"), (_FINISHED, "finished")):
                m = pattern.search(plain)
                if m:
                    self._on_event(event, m.group(1) if event != "finished" else f"{m.group(1)} {m.group(2)}")
        return len(text)

    def flush(self) -> None:
        if not self._log.closed:
            self._log.flush()


def _artifact_or_value(value: Any) -> Any:
    if isinstance(value, list):
        return [_artifact_or_value(v) for v in value]
    uri = getattr(value, "uri", None)
    return uri if uri is not None else value


@contextlib.contextmanager
def _record_tasks(records: list[TaskRecord], root: str, on_event: Callable[[str, str], None]) -> Iterator[None]:
    """Record every task kfp.local runs: name, display name, outputs, and whether it ran or was served from the
    cache (a cached task's artifact URIs point into an earlier run's directory, not this run's). Wraps
    ``kfp.local.orchestrator.task_executor.execute_single_task`` (kfp 2.17 internals); if that hook is missing the
    run still works, only the per-task table is empty."""
    try:
        from kfp.local import cache as cache_module
        from kfp.local.orchestrator import task_executor
    except ImportError:  # pragma: no cover - other kfp versions
        yield
        return
    original = task_executor.execute_single_task
    original_get = cache_module.LocalCache.get
    lock = threading.Lock()
    hits = threading.local()  # a task's cache lookup runs on the thread that executes the task

    def cache_get(self, key):
        found = original_get(self, key)
        hits.hit = found is not None
        return found

    def wrapper(*args, **kwargs):
        hits.hit = False
        outputs, task_status = original(*args, **kwargs)
        name = kwargs.get("task_name", "?")
        spec = kwargs.get("task_spec")
        display = spec.task_info.name if spec is not None and spec.task_info.name else name
        run_dir = os.path.join(root, str(kwargs.get("pipeline_resource_name", "")).split("/")[0])
        uris = {k: _artifact_or_value(v) for k, v in outputs.items()}
        # artifact URIs only: a parameter may be a path into another run (reindex's scan outputs its base index)
        paths = [v.uri for v in outputs.values() if isinstance(getattr(v, "uri", None), str) and os.path.isabs(v.uri)]
        if getattr(task_status, "name", str(task_status)) != "SUCCESS":
            status = "failed"
        elif _is_importer(kwargs):
            status = "imported"
        elif hits.hit or (paths and not any(u.startswith(run_dir + os.sep) for u in paths)):
            status = "cached"
        else:
            status = "executed"
        with lock:
            records.append(TaskRecord(name, display, status, uris))
        if status == "cached":
            on_event("cached", display)
        return outputs, task_status

    task_executor.execute_single_task = wrapper
    cache_module.LocalCache.get = cache_get
    try:
        yield
    finally:
        task_executor.execute_single_task = original
        cache_module.LocalCache.get = original_get


@contextlib.contextmanager
def _oneof_artifacts() -> Iterator[None]:
    """Let kfp.local resolve a ``dsl.OneOf`` of artifacts (the reindex pipeline's index from its append or rebuild
    branch): kfp 2.17's local orchestrator resolves OneOf for parameters only and refuses a DAG artifact output with
    several selectors. Same rule as its parameter path: the one branch that produced the artifact. Patches
    ``OrchestratorUtils.get_dag_output_artifacts`` (kfp 2.17 internals) for the run; other versions run unpatched."""
    try:
        from kfp.local.orchestrator.orchestrator_utils import OrchestratorUtils
    except ImportError:  # pragma: no cover - other kfp versions
        yield
        return
    original = OrchestratorUtils.__dict__.get("get_dag_output_artifacts")

    def get_dag_output_artifacts(cls, dag_outputs_spec, io_store):
        outputs = {}
        for key, spec in dag_outputs_spec.artifacts.items():
            found = []
            for selector in spec.artifact_selectors:
                try:
                    found.append(io_store.get_task_output(selector.producer_subtask, selector.output_artifact_key))
                except (KeyError, ValueError):  # a branch that did not run
                    continue
            if len(found) != 1:
                raise ValueError(f"DAG output artifact {key!r}: {len(found)} of {len(spec.artifact_selectors)} "
                                 "selectors produced a value, expected exactly one")
            outputs[key] = found[0]
        return outputs

    if original is None:  # pragma: no cover - other kfp versions
        yield
        return
    OrchestratorUtils.get_dag_output_artifacts = classmethod(get_dag_output_artifacts)
    try:
        yield
    finally:
        OrchestratorUtils.get_dag_output_artifacts = original


def _is_importer(kwargs: dict) -> bool:
    """A dsl.importer task (registers an existing URI; never executes or caches)."""
    try:
        comp = kwargs["components"][kwargs["task_spec"].component_ref.name]
        return kwargs["executors"][comp.executor_label].WhichOneof("spec") == "importer"
    except (KeyError, AttributeError):
        return False


def _display_names(func) -> dict[str, str]:
    """Task name -> display name, over the pipeline's DAG and its sub-DAGs (ParallelFor bodies)."""
    spec = getattr(func, "pipeline_spec", None)
    if spec is None:  # pragma: no cover - other kfp versions
        return {}
    out = {}
    dags = [spec.root.dag] + [c.dag for c in spec.components.values() if c.WhichOneof("implementation") == "dag"]
    for dag in dags:
        for name, task in dag.tasks.items():
            if task.task_info.name:
                out[name] = task.task_info.name
    return out


def _read_metrics(uri: str) -> dict[str, Any]:
    """The metric values of an evaluate output (``metrics.json``: {"model", "metrics": {...}, ...})."""
    path = Path(uri) / "metrics.json"
    if path.is_file():
        data = json.loads(path.read_text())
        return data.get("metrics", data) if isinstance(data, dict) else {}
    return {}


def run_local(
    name: str,
    cfg: LGFFConfig,
    pipeline_root: Optional[str] = None,
    arguments: Optional[dict[str, Any]] = None,
    on_event: Optional[Callable[[str, str], None]] = None,
    heartbeat_s: float = 60.0,
    runner: Any = None,
) -> LocalRunResult:
    """Run pipeline `name` with kfp.local (SubprocessRunner, this venv) under a local pipeline root.

    `runner`: another kfp.local runner, e.g. ``kfp.local.DockerRunner(user="1000:1000", read_only=True, ...)`` to run
    every task in the image ``cfg.pipeline.image`` (kfp mounts the pipeline root at the same path in the container).

    `arguments` are the pipeline's parameters (e.g. ``{"source": "/data/ds"}``). Task output (the components'
    own logs) goes to ``<pipeline_root>/logs/<pipeline>-<time>.log``; `on_event(kind, task)` is called on
    "executing" (task name), "cached" (display name), "finished" ("name STATUS") and, every `heartbeat_s`
    seconds while tasks run, "running" (comma-separated display names) events for progress display.
    Raises `PipelineError` on a failed task.
    """
    from kfp import local

    root = os.path.abspath(pipeline_root or cfg.pipeline.pipeline_root)
    if "://" in root or (pipeline_root or cfg.pipeline.pipeline_root).startswith(("s3://", "gs://")):
        raise PipelineError(f"local runs need a local pipeline root, got {pipeline_root or cfg.pipeline.pipeline_root!r}"
                            " (use --root DIR; s3:// roots are for cluster runs)")
    # the tasks put bulk data under <root>/.bulk/ (LGFF_PIPELINE_ROOT, set from the config): this run's root
    cfg = dataclasses.replace(cfg, pipeline=dataclasses.replace(cfg.pipeline, pipeline_root=root))
    func = build(name, cfg)
    if "source" in _parameters(func):  # a training pipeline: fail at once on missing data, before any task runs
        check_datasets(cfg, arguments)
    os.makedirs(os.path.join(root, "logs"), exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    log_path = os.path.join(root, "logs", f"{name}-{stamp}.log")
    records: list[TaskRecord] = []
    root_logger = logging.getLogger()
    saved_logging = (root_logger.level, root_logger.handlers[:])

    display = _display_names(func)
    running: dict[str, int] = {}
    running_lock = threading.Lock()

    def event(kind: str, task: str) -> None:
        with running_lock:
            if kind == "executing":
                running[task] = running.get(task, 0) + 1
            elif kind == "finished":
                name = task.rpartition(" ")[0]
                if running.get(name, 0) > 1:
                    running[name] -= 1
                else:
                    running.pop(name, None)
        if on_event is not None:
            if kind == "executing":
                task = display.get(task, task)
            on_event(kind, task)

    stop_heartbeat = threading.Event()

    def heartbeat() -> None:
        # long tasks (training) print nothing for minutes: say what is still running, once a minute
        while not stop_heartbeat.wait(heartbeat_s):
            with running_lock:
                names = sorted(display.get(n, n) for n in running)
            if names and on_event is not None:
                on_event("running", ", ".join(names))

    local.init(runner=runner or local.SubprocessRunner(use_venv=False), pipeline_root=root,
               enable_caching=cfg.pipeline.enable_caching, raise_on_error=True)
    t0 = time.time()
    with open(log_path, "w") as log_file, warnings.catch_warnings():
        # kfp.local warns that the project image is not a python image and that resources / accelerators /
        # display names have no local effect: both are expected here.
        warnings.filterwarnings("ignore", message=".*custom or non-Python base image.*")
        warnings.filterwarnings("ignore", message=".*no effect in the current local runner.*")
        tee = _LineTee(log_file, event)
        # kfp.local logs some events (cache hits) outside its own logging context: send them to the log file too
        tee_handler = logging.StreamHandler(tee)
        tee_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root_logger.handlers[:] = [tee_handler]
        beat = threading.Thread(target=heartbeat, name="lgff-pipeline-heartbeat", daemon=True)
        beat.start()
        try:
            with contextlib.redirect_stdout(tee), _record_tasks(records, root, event), _oneof_artifacts():
                task = func(**(arguments or {}))
        except Exception as exc:  # kfp raises RuntimeError naming the failed task, not why it failed
            failed = [r.display_name for r in records if r.status == "failed"]
            # the failed commands' own error lines (the last few) say why; kfp's message when there is none
            reason = "; ".join(tee.failures[-3:]) or _ANSI.sub("", str(exc))
            raise PipelineError(f"pipeline {name} failed{' in task ' + ', '.join(failed) if failed else ''}: "
                                f"{reason} (task logs: {log_path})") from None
        finally:
            stop_heartbeat.set()
            tee.flush()
            # kfp.local swaps the root logger's handlers per task; with parallel tasks the swaps can interleave
            # and leave a handler on our (closing) stream: put the caller's logging back as it was
            root_logger.setLevel(saved_logging[0])
            root_logger.handlers[:] = saved_logging[1]
            seconds = time.time() - t0
    outputs = {k: _artifact_or_value(v) for k, v in (task.outputs or {}).items()}
    metrics = {}
    for rec in records:
        if rec.task.startswith("evaluate") and rec.status != "failed" and "results" in rec.outputs:
            m = _read_metrics(rec.outputs["results"])
            label = rec.display_name.removeprefix("evaluate-")
            if m:
                metrics[label] = m
    result = LocalRunResult(name, root, log_path, seconds, records, outputs, metrics)
    summary = os.path.join(root, "logs", f"{name}-{stamp}.json")
    with open(summary, "w") as f:
        json.dump(result.to_json(), f, indent=2, default=str)
    log.info("pipeline %s: %d task(s) executed, %d cache hit(s) in %.1f s; summary %s", name, result.executed,
             result.cache_hits, seconds, summary)
    return result


# ----------------------------------------------------------------------------------------------- cluster path


def compile_pipeline(name: str, cfg: LGFFConfig, out: str | os.PathLike) -> str:
    """Compile pipeline `name` for `cfg` to a pipeline YAML at `out` (atomically) and return its path."""
    from kfp import compiler

    func = build(name, cfg)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".lgff-pipeline-", suffix=".yaml", dir=out.parent)
    os.close(fd)
    try:
        compiler.Compiler().compile(func, tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return str(out)


# Token for a multi-user Kubeflow API (e.g. `kubectl create token` or an OIDC id token); never on the command line
# when it can be avoided (shell history, process list).
TOKEN_ENV = "KF_PIPELINES_TOKEN"


def client_auth(token: Optional[str] = None, sa_token_path: Optional[str] = None) -> dict[str, Any]:
    """``kfp.Client`` keyword arguments that authenticate to a multi-user Kubeflow Pipelines API.

    In order: an explicit `token`, then the environment variable ``KF_PIPELINES_TOKEN``, then a projected service
    account token file (`sa_token_path`, ``KF_PIPELINES_SA_TOKEN_PATH``, or the path KFP mounts into pods,
    ``/var/run/secrets/kubeflow/pipelines/token``) read by kfp's ``ServiceAccountTokenVolumeCredentials`` (it rereads
    the file, which the kubelet rotates). Nothing found -> no credentials (single-user installs, port-forwards).
    """
    from kfp.client import KF_PIPELINES_SA_TOKEN_ENV, KF_PIPELINES_SA_TOKEN_PATH

    token = token or os.environ.get(TOKEN_ENV)
    if token:
        return {"existing_token": token}
    path = sa_token_path or os.environ.get(KF_PIPELINES_SA_TOKEN_ENV)
    if sa_token_path and not os.path.isfile(sa_token_path):
        raise PipelineError(f"--sa-token-file {sa_token_path}: no such file")
    path = path or (KF_PIPELINES_SA_TOKEN_PATH if os.path.isfile(KF_PIPELINES_SA_TOKEN_PATH) else None)
    if path:
        from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials

        return {"credentials": ServiceAccountTokenVolumeCredentials(path)}
    return {}


# Oldest KFP backend whose driver runs these pipelines correctly: `dsl.OneOf` over artifacts (reindex's
# append / rebuild index) picked the last branch until 2.17.0 (kubeflow/pipelines #13436, fixed by #13437);
# `dsl.Collected` of artifacts needs 2.14 (#11725) and ParallelFor `parallelism` 2.4.
MIN_BACKEND = (2, 17)
_RELEASE = re.compile(r"^v?(\d+)\.(\d+)(?:\.(\d+))?")
# schemes of a pipeline root that pods on a cluster can reach (a local path is only for kfp.local)
REMOTE_ROOT_SCHEMES = ("s3://", "gs://", "minio://")


def _client(host: str, namespace: Optional[str] = None, token: Optional[str] = None,
            sa_token_path: Optional[str] = None):
    import kfp

    kwargs: dict[str, Any] = {"host": host, **client_auth(token, sa_token_path)}
    if namespace:
        kwargs["namespace"] = namespace
    try:
        return kfp.Client(**kwargs)
    except TimeoutError as exc:  # single-user: the constructor asks healthz whether the API is multi-user
        raise PipelineError(f"KFP API at {host}: {exc}") from None


def _healthz(client: Any, host: str) -> dict[str, Any]:
    """The API's healthz answer as JSON. kfp-server-api's typed model keeps only ``multi_user`` /
    ``pipeline_store``, while the server also sends ``commit_sha`` and ``tag_name`` (its release), so the raw body is
    read through the client's own configured API (auth, TLS, proxy)."""
    import kfp_server_api

    try:
        resp = client._healthz_api.healthz_service_get_healthz(_preload_content=False)
        return json.loads(resp.data)
    except (kfp_server_api.ApiException, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or type(exc).__name__
        raise PipelineError(f"KFP API at {host}: GET /apis/v2beta1/healthz failed ({reason})") from None


def check_backend(client: Any, host: str) -> str:
    """The release the KFP API at `host` reports (``GET /apis/v2beta1/healthz`` ``tag_name``); raises
    `PipelineError` (one line) for a release older than `MIN_BACKEND` or one that names no release."""
    tag = str(_healthz(client, host).get("tag_name") or "").strip()
    need = ".".join(map(str, MIN_BACKEND))
    m = _RELEASE.match(tag)
    if not m:
        raise PipelineError(
            f"KFP API at {host} reports release {tag!r}, not a version: LGFF needs KFP {need} or later; "
            "for a development build known to be that new, pass --skip-backend-check")
    if (int(m.group(1)), int(m.group(2))) < MIN_BACKEND:
        raise PipelineError(
            f"KFP backend at {host} is {tag}: LGFF needs {need} or later (its driver picks an artifact from "
            f"dsl.OneOf correctly only from 2.17.0, kubeflow/pipelines #13436; Collected artifacts need 2.14)")
    return tag


def run_pipeline_root(cfg: LGFFConfig) -> str:
    """The pipeline root a cluster run is submitted with (its runtime config; the backend never reads the compiled
    spec's root): ``pipeline.pipeline_root``, the same root the tasks write bulk data under."""
    root = cfg.pipeline.pipeline_root
    if not root.startswith(REMOTE_ROOT_SCHEMES):
        raise PipelineError(
            f"pipeline.pipeline_root {root!r} is a local path: a cluster run needs an object-store root "
            f"({' '.join(s + '...' for s in REMOTE_ROOT_SCHEMES)}), e.g. --set pipeline.pipeline_root=s3://BUCKET/PREFIX")
    return root


def _connect(cfg: LGFFConfig, host: str, namespace: Optional[str], token: Optional[str],
             sa_token_path: Optional[str], client: Any, check: bool) -> tuple[Any, str]:
    """(client, run pipeline root): everything that can be refused is refused before anything is created."""
    root = run_pipeline_root(cfg)
    client = client or _client(host, namespace, token, sa_token_path)
    if check:
        check_backend(client, host)
    return client, root


def submit(
    name: str,
    cfg: LGFFConfig,
    host: str,
    experiment: str = "lgff",
    arguments: Optional[dict[str, Any]] = None,
    run_name: Optional[str] = None,
    namespace: Optional[str] = None,
    service_account: Optional[str] = None,
    token: Optional[str] = None,
    sa_token_path: Optional[str] = None,
    client: Any = None,
    check_version: bool = True,
) -> str:
    """Compile and submit one run to the KFP endpoint at `host`; returns the run id.

    `namespace`: the Kubeflow profile namespace (multi-user); `service_account`: the Kubernetes service account the
    run's pods use (default: the profile's ``default-editor``); `token` / `sa_token_path`: see `client_auth`.
    The run carries ``pipeline.pipeline_root`` in its runtime config; ``enable_caching=None`` leaves each task's
    compiled caching as it is (kfp.Client would otherwise set it on every task, `scan` included). `check_version`:
    refuse a backend older than `MIN_BACKEND`.
    """
    client, root = _connect(cfg, host, namespace, token, sa_token_path, client, check_version)
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(name, cfg, Path(tmp) / f"{name}.yaml")
        run = client.create_run_from_pipeline_package(
            package, arguments=arguments or {}, run_name=run_name, experiment_name=experiment, namespace=namespace,
            pipeline_root=root, enable_caching=None, service_account=service_account)
    return getattr(run, "run_id", str(run))


def schedule(
    name: str,
    cfg: LGFFConfig,
    host: str,
    cron: str,
    experiment: str = "lgff",
    arguments: Optional[dict[str, Any]] = None,
    job_name: Optional[str] = None,
    max_concurrency: int = 1,
    namespace: Optional[str] = None,
    service_account: Optional[str] = None,
    catchup: bool = False,
    token: Optional[str] = None,
    sa_token_path: Optional[str] = None,
    client: Any = None,
    check_version: bool = True,
) -> str:
    """Create a recurring run (KFP cron: 6 fields, seconds first, e.g. ``0 0 3 * * *``); returns its id.

    ``catchup=False`` (default) sends ``no_catchup=True``: a schedule that was paused or missed runs starts once
    when it resumes instead of backfilling every missed interval (each a full reindex). Pipeline root, caching and
    the backend check as in `submit`.
    """
    fields = cron.split()
    if len(fields) not in (5, 6):
        raise PipelineError(f"--cron {cron!r}: expected a cron expression with 5 or 6 fields")
    if len(fields) == 5:  # standard 5-field cron -> KFP's 6-field form (seconds first)
        cron = "0 " + cron
    client, root = _connect(cfg, host, namespace, token, sa_token_path, client, check_version)
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(name, cfg, Path(tmp) / f"{name}.yaml")
        exp = client.create_experiment(name=experiment, namespace=namespace)
        exp_id = getattr(exp, "experiment_id", None) or getattr(exp, "id", None)
        job = client.create_recurring_run(
            experiment_id=exp_id, job_name=job_name or f"{name}-{cfg.name}", cron_expression=cron,
            max_concurrency=max_concurrency, pipeline_package_path=package, params=arguments or {},
            pipeline_root=root, enable_caching=None, no_catchup=not catchup, service_account=service_account)
    return getattr(job, "recurring_run_id", None) or getattr(job, "id", None) or str(job)
