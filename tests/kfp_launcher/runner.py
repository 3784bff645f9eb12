"""Run a compiled KFP v2 pipeline YAML task by task under the contract of KFP's driver + launcher (test tool).

What it emulates (kubeflow/pipelines ``backend/src/v2``: ``driver/``, ``component/launcher_v2.go``,
``component/importer_launcher.go``, ``cacheutils/cache.go``):

- the root DAG, nested DAGs (pipelines used as components, ``dsl.If/Elif/Else`` condition DAGs whose CEL trigger
  condition is evaluated on the task's inputs), ``ParallelFor`` over a literal list or over a parameter (a task
  output: a JSON list of primitives or dicts; ``parseJson(string_value)["key"]`` item selectors), ``dsl.Collected``
  of parameters (a list) and artifacts (an artifact list), ``dsl.OneOf``;
- the driver's rules (`driver`, each naming its Go function): the run's pipeline root from its runtime config, else
  a ``kfp-launcher`` ConfigMap fixture, else KFP's default, never the spec's; every DAG, iteration and container
  driver validates and converts its input parameters against the component's types (a failure raises
  `DriverFailed`, the task's pod never starts); a ``dsl.OneOf`` of artifacts as the `backend_version` resolves it
  (2.17: the branch that ran; older: always the last branch);
- per container task, what the driver resolves: input parameters / artifacts, output artifact URIs
  ``<pipeline_root>/<pipeline name>/<run id>/<task name>/<uuid>/<output name>`` (the driver's ``provisionOutputs``),
  output parameter files ``/tmp/kfp/outputs/<name>``, the executor output file
  ``<local task root>/output_metadata.json``;
  the container's env, and ``secretAsEnv`` of the kubernetes platform spec from a dict of fake secrets;
- the launcher, in the task's own sandbox or container (`shim.py`): every input artifact downloaded to
  ``/s3/<bucket>/<key>`` (``/minio/...``) through the object-store sessions ``fetchNonDefaultBuckets`` opens (the
  run's root, plus the bucket of each input list's *first* artifact when it lies outside the run's root: a later
  artifact of another run fails the task with ``failed to get bucket when downloading input artifact``), the
  placeholders substituted (``{{$}}`` with component defaults added,
  ``{{$.inputs.parameters['x']}}``, ``{{$.inputs.artifacts['x'].uri|path}}``, ``{{$.outputs.artifacts['x'].uri|path}}``,
  ``{{$.outputs.parameters['x'].output_file}}``), the command run, every output's local path uploaded to its URI,
  output metadata merged from the executor output, output parameters read from the executor output or their files;
- the importer (``artifactUri`` constant or runtime parameter; ``reimport=False`` reuses an artifact with the same
  URI, type and metadata in the same pipeline, ``reimport=True`` always creates a new one);
- KFP's cache: fingerprint = sha256 of the JSON of {input artifact *names* (MLMD ids, not content), input parameter
  values, output artifact specs (name, type, metadata; URI wiped), output parameter types, {image, command + args as
  written in the IR}}, or of component name + ``cachingOptions.cacheKey``; looked up per pipeline name. A cache hit
  reuses the earlier execution's output artifacts (same ids, so downstream keys match too). Artifact ids and
  executions persist in a JSON file (``cache_path``), so a second run of the same YAML is all hits.
- ``retryPolicy.maxRetryCount`` (retried at once, no backoff).

What it does not do: it runs every task and every ``ParallelFor`` iteration one after another (``parallelism`` is
therefore always respected); on a failing task the run stops (KFP lets independent branches finish); resources,
accelerators, node selectors, tolerations, pod metadata and image pull settings are scheduling hints with no effect
here and are ignored; any other IR or platform feature (exit handlers, artifact iterators, volumes, config maps,
custom placeholders such as ``Concat`` / ``IfPresent``, ...) is refused with `UnsupportedFeature` before anything runs.
Fingerprints use the same fields and construction as KFP but are not guaranteed byte-identical to Go's JSON.

Executors: ``subprocess`` runs each task in a fresh temp directory (HOME, cwd, TMPDIR and the ``/s3`` mount root)
with a cleared environment and this venv's ``python3`` first on PATH; the kfp SDK's ``/s3/`` prefix is rebased under
the sandbox (see `shim.SITECUSTOMIZE`), so the executor input is the cluster's except for local file paths.
``docker`` runs each task in its own container (``--read-only``, tmpfs ``/tmp`` and ``/s3``, uid 1000, host network to
reach the S3 endpoint on 127.0.0.1, all capabilities dropped). The user command sees only the task's env, the
secrets it references and `env`; the launcher's object-store settings reach only the shim.
"""
from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml
from google.protobuf import json_format, struct_pb2
from kfp.kubernetes import kubernetes_executor_config_pb2 as k8s_pb2
from kfp.pipeline_spec import pipeline_spec_pb2 as pb

from . import driver, shim

log = logging.getLogger(__name__)

__all__ = ["DriverFailed", "RunResult", "TaskFailed", "TaskRecord", "UnsupportedFeature", "parse_pipeline_spec",
           "run_pipeline"]

EXECUTORS = ("subprocess", "docker")
_PASSTHROUGH_ENV = ("LANG", "LC_ALL", "TZ", "PYTHONPATH", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
_IGNORED_PLATFORM = {"nodeSelector", "tolerations", "nodeAffinity", "podMetadata", "imagePullPolicy",
                     "imagePullSecret"}
_SUPPORTED_TASK_FIELDS = {"task_info", "inputs", "dependent_tasks", "caching_options", "component_ref",
                          "trigger_policy", "parameter_iterator", "retry_policy", "iterator_policy"}
_SELECTOR = re.compile(r"""^parseJson\(string_value\)\[("[^"]*"|'[^']*')\]$""")
_STRING = re.compile(r"""('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")""")


class UnsupportedFeature(ValueError):
    """The compiled pipeline uses an IR or platform feature this runner does not implement."""


class TaskFailed(RuntimeError):
    """A task's command failed; ``result`` holds the records of the tasks that ran before it, ``log`` its output."""

    def __init__(self, message: str, result: "RunResult", log_text: str = ""):
        super().__init__(message)
        self.result, self.log = result, log_text


class DriverFailed(TaskFailed):
    """A task's driver failed (`driver` rules: input parameter types, OneOf resolution): its pod never started."""


@dataclass
class TaskRecord:
    name: str  # the task's key in its DAG (what KFP calls the task name)
    display_name: str  # taskInfo.name (set_display_name)
    path: str  # unique within the run, e.g. "for-loop-2[1]/embed"
    iteration: Optional[int]  # innermost ParallelFor index, None outside loops
    status: str  # "executed" | "cached" | "imported" | "skipped" | "driver failed"
    bytes_downloaded: int = 0
    bytes_uploaded: int = 0
    seconds: float = 0.0
    outputs: dict[str, list[dict]] = field(default_factory=dict)  # artifact name -> [{"uri", "metadata", ...}]
    parameters: dict[str, Any] = field(default_factory=dict)  # output parameter name -> value
    fingerprint: str = ""
    attempts: int = 0
    timings: dict[str, float] = field(default_factory=dict)  # last attempt: download / run / upload seconds


@dataclass
class RunResult:
    pipeline_name: str
    run_id: str
    pipeline_root: str
    pipeline_root_source: str = "runtime config"  # or "kfp-launcher ConfigMap" / "KFP default" (driver.pipeline_root)
    backend_version: str = driver.LATEST_BACKEND
    tasks: list[TaskRecord] = field(default_factory=list)
    outputs: dict[str, Any] = field(default_factory=dict)  # pipeline outputs: {"parameters": ..., "artifacts": ...}

    def by_display_name(self, name: str) -> list[TaskRecord]:
        return [t for t in self.tasks if t.display_name == name]

    def count(self, status: str) -> int:
        return sum(t.status == status for t in self.tasks)

    def summary_table(self) -> str:
        rows = [("task", "display name", "status", "downloaded", "uploaded", "seconds")]
        for t in self.tasks:
            rows.append((t.path, t.display_name, t.status, f"{t.bytes_downloaded:,}", f"{t.bytes_uploaded:,}",
                         f"{t.seconds:.1f}"))
        rows.append(("total", "", f"{self.count('executed')} executed, {self.count('cached')} cached",
                     f"{sum(t.bytes_downloaded for t in self.tasks):,}",
                     f"{sum(t.bytes_uploaded for t in self.tasks):,}", f"{sum(t.seconds for t in self.tasks):.1f}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        right = {3, 4, 5}
        return "\n".join("  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in
                                   enumerate(zip(r, widths))).rstrip() for r in rows)


# ------------------------------------------------------------------------------------------------ spec parsing


def parse_pipeline_spec(path: str | os.PathLike) -> tuple[pb.PipelineSpec, Optional[pb.PlatformSpec]]:
    """The compiled YAML's ``PipelineSpec`` and ``PlatformSpec`` (None if absent), unknown fields rejected
    (`json_format.ParseError`). The spec's ``deploymentSpec`` (a Struct in the proto) must also parse as a
    ``PipelineDeploymentConfig``, each kubernetes executor config as kfp-kubernetes' ``KubernetesExecutorConfig``."""
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    if not docs or len(docs) > 2:
        raise ValueError(f"{path}: expected a pipeline spec and an optional platform spec, got {len(docs)} documents")
    spec = json_format.ParseDict(docs[0], pb.PipelineSpec(), ignore_unknown_fields=False)
    deployment_config(spec)
    platform = None
    if len(docs) == 2:
        platform = json_format.ParseDict(docs[1], pb.PlatformSpec(), ignore_unknown_fields=False)
        for name, single in platform.platforms.items():
            for label, config in single.deployment_spec.executors.items():
                json_format.ParseDict(json_format.MessageToDict(config), k8s_pb2.KubernetesExecutorConfig(),
                                      ignore_unknown_fields=False)
    return spec, platform


def deployment_config(spec: pb.PipelineSpec) -> pb.PipelineDeploymentConfig:
    return json_format.ParseDict(json_format.MessageToDict(spec.deployment_spec), pb.PipelineDeploymentConfig(),
                                 ignore_unknown_fields=False)


def _plain(value: Any) -> Any:
    """JSON value with integral floats as ints (protojson prints 2.0 as 2; so do placeholders and cache keys)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _value(v: struct_pb2.Value) -> Any:
    return _plain(json_format.MessageToDict(v))


def _struct(s: struct_pb2.Struct) -> dict:
    return _plain(json_format.MessageToDict(s))


def _type_dict(schema: pb.ArtifactTypeSchema) -> dict:
    return json_format.MessageToDict(schema)


def _parameter_from_text(text: str, ptype: int) -> Any:
    """The launcher's ``TextToPbValue``: an output parameter file's text -> its typed value."""
    kind = pb.ParameterType.ParameterTypeEnum.Name(ptype)
    if kind == "STRING":
        return text
    if kind == "BOOLEAN":
        return text.strip().lower() == "true"
    return _plain(json.loads(text))


def _check_cel(expr: str) -> str:
    """Translate the CEL subset KFP emits for ``dsl.If`` into a Python expression over ``pv``."""
    parts = _STRING.split(expr)
    for i in range(0, len(parts), 2):  # outside string literals only
        p = parts[i].replace("inputs.parameter_values", "pv").replace("&&", " and ").replace("||", " or ")
        p = re.sub(r"!(?!=)", " not ", p)
        p = re.sub(r"\btrue\b", "True", re.sub(r"\bfalse\b", "False", p))
        parts[i] = re.sub(r"\bdouble\(", "float(", re.sub(r"\bstring\(", "str(", p))
    py = "".join(parts)
    allowed = (ast.Expression, ast.BoolOp, ast.And, ast.Or, ast.UnaryOp, ast.Not, ast.USub, ast.Compare, ast.Eq,
               ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.In, ast.NotIn, ast.Call, ast.Name, ast.Load,
               ast.Subscript, ast.Constant)
    tree = ast.parse(py.strip(), mode="eval")
    for node in ast.walk(tree):
        if not isinstance(node, allowed) or (isinstance(node, ast.Name) and node.id not in
                                             {"pv", "int", "float", "str", "True", "False"}):
            raise UnsupportedFeature(f"trigger condition {expr!r}: unsupported CEL construct {type(node).__name__}")
    return py.strip()


# ------------------------------------------------------------------------------------------------ cache store


class _Store:
    """Artifact ids (MLMD's role) and cached executions (the cache server's role), optionally in a JSON file."""

    def __init__(self, path: Optional[str]):
        self.path = path
        self.data = {"next_id": 1, "artifacts": {}, "executions": {}}
        if path and os.path.exists(path):
            with open(path) as f:
                self.data = json.load(f)

    def save(self) -> None:
        if self.path:
            tmp = f"{self.path}.tmp-{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(self.data, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)

    def new_artifact(self, pipeline: str, uri: str, type_: dict, metadata: dict) -> dict:
        art_id = str(self.data["next_id"])
        self.data["next_id"] += 1
        self.data["artifacts"][art_id] = {"pipeline": pipeline, "uri": uri, "type": type_, "metadata": metadata}
        return {"name": art_id, "uri": uri, "type": type_, "metadata": metadata}

    def match_artifact(self, pipeline: str, uri: str, type_: dict, metadata: dict) -> Optional[dict]:
        for art_id, a in self.data["artifacts"].items():
            if (a["pipeline"] == pipeline and a["uri"] == uri and a["type"].get("schemaTitle") ==
                    type_.get("schemaTitle") and all(a["metadata"].get(k) == v for k, v in metadata.items())):
                return {"name": art_id, "uri": a["uri"], "type": a["type"], "metadata": a["metadata"]}
        return None

    def artifact(self, art_id: str) -> dict:
        a = self.data["artifacts"][art_id]
        return {"name": art_id, "uri": a["uri"], "type": a["type"], "metadata": a["metadata"]}


# ------------------------------------------------------------------------------------------------ executors


class _Sandbox:
    """Where one task runs: ``mount_root`` is prefixed to every local path the task sees."""

    def __init__(self, executor: str, image: Optional[str], keep: bool):
        self.executor, self.image, self.keep = executor, image, keep
        self.dir = tempfile.mkdtemp(prefix="kfp-task-")
        self.mount_root = self.dir if executor == "subprocess" else ""
        if executor == "docker":
            os.chmod(self.dir, 0o755)

    def run(self, launch: dict, env: dict[str, str]) -> tuple[dict, str]:
        """Run the shim with `launch`; returns (its result, the task's combined output)."""
        if self.executor == "subprocess":
            home, tmp = os.path.join(self.dir, "home"), os.path.join(self.dir, "tmp")
            os.makedirs(home), os.makedirs(tmp)
            base = {k: os.environ[k] for k in _PASSTHROUGH_ENV if k in os.environ}
            base.update(HOME=home, TMPDIR=tmp, PATH=os.pathsep.join(
                [os.path.dirname(sys.executable), "/usr/local/bin", "/usr/bin", "/bin"]))
            spec_path = os.path.join(self.dir, "launch.json")
            argv = [sys.executable, shim.__file__, spec_path]
            proc_env, cwd = dict(base, **env), home
        else:
            spec_path = os.path.join(self.dir, "launch.json")
            shutil.copy(shim.__file__, os.path.join(self.dir, "shim.py"))
            env = dict(env, HOME="/tmp", TMPDIR="/tmp")
            argv = ["docker", "run", "--rm", "--network", "host", "--user", "1000:1000", "--read-only",
                    "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--tmpfs", "/tmp:rw,exec,size=8g",
                    "--tmpfs", "/s3:rw,size=8g", "--tmpfs", "/minio:rw,size=8g", "-w", "/tmp",
                    "-v", f"{self.dir}:/kfp-launcher:ro"]
            for k in sorted(env):
                argv += ["-e", k]  # values travel in docker's environment, never on its command line
            argv += [self.image, "python3", "/kfp-launcher/shim.py", "/kfp-launcher/launch.json"]
            proc_env, cwd = dict(os.environ, **env), None
        with open(spec_path, "w") as f:
            json.dump(launch, f)
        proc = subprocess.run(argv, env=proc_env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, errors="replace")
        output = proc.stdout
        head, marker, tail = output.rpartition(shim.RESULT_MARKER)
        if not marker:
            return {"returncode": proc.returncode or 1}, output
        return json.loads(tail.strip().splitlines()[0]), head

    def close(self) -> None:
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ the run


@dataclass
class _Unresolved:
    """A DAG output artifact the driver cannot resolve (`driver.oneof_artifact_selector`): fails its consumer."""
    message: str


@dataclass
class _Scope:
    """One DAG execution: its inputs and the outputs of its finished tasks (None = skipped)."""
    params: dict[str, Any]
    artifacts: dict[str, list[dict]]
    path: str
    iteration: Optional[int]
    tasks: dict[str, Optional[dict]] = field(default_factory=dict)


class _Run:
    def __init__(self, spec: pb.PipelineSpec, platform: Optional[pb.PlatformSpec], *, pipeline_root: str,
                 root_source: str, backend_version: str, executor: str, image: Optional[str], store: _Store,
                 env: dict, secrets: dict, run_id: str, s3_endpoint: Optional[str], keep_sandboxes: bool):
        self.spec, self.executor, self.image, self.store = spec, executor, image, store
        self.backend = backend_version
        self.env, self.secrets, self.keep = dict(env), secrets, keep_sandboxes
        self.pipeline = spec.pipeline_info.name
        self.executors = deployment_config(spec).executors
        self.k8s = {}
        if platform is not None and "kubernetes" in platform.platforms:
            self.k8s = {label: _struct(cfg) for label, cfg in
                        platform.platforms["kubernetes"].deployment_spec.executors.items()}
        self.result = RunResult(self.pipeline, run_id, pipeline_root.rstrip("/"), root_source, backend_version)
        self.run_root = driver.run_root(pipeline_root, self.pipeline, run_id)  # the launcher's default bucket
        self.task_root = self.run_root.partition("?")[0]  # output URIs never carry the root's query
        own = os.environ  # the launcher's object-store settings (a cluster's kfp-launcher config + secret)
        self.launcher_env = {shim.LAUNCHER_ENV_PREFIX + k: v for k, v in {
            "S3_ENDPOINT": s3_endpoint or own.get("AWS_ENDPOINT_URL", ""), "S3_REGION": own.get("AWS_REGION", ""),
            "S3_ACCESS_KEY": own.get("AWS_ACCESS_KEY_ID", ""), "S3_SECRET_KEY": own.get("AWS_SECRET_ACCESS_KEY", ""),
        }.items()}

    # ---- validation (before anything runs)

    def validate(self) -> None:
        problems = []
        for cname, comp in self.spec.components.items():
            for f, _ in comp.ListFields():
                if f.name not in {"input_definitions", "output_definitions", "dag", "executor_label"}:
                    problems.append(f"component {cname}: {f.name}")
            for tname, task in comp.dag.tasks.items():
                problems += self._task_problems(f"{cname}/{tname}", task)
        for tname, task in self.spec.root.dag.tasks.items():
            problems += self._task_problems(f"root/{tname}", task)
        if self.spec.root.input_definitions.artifacts:
            problems.append("pipeline-level input artifacts")
        for label, ex in self.executors.items():
            if ex.HasField("container"):
                extra = {f.name for f, _ in ex.container.ListFields()} - {"image", "command", "args", "env",
                                                                           "resources"}
                problems += [f"executor {label}: container.{n}" for n in sorted(extra)]
                for arg in [*ex.container.command, *ex.container.args]:
                    if arg.lstrip().startswith(("{\"Concat\"", "{\"IfPresent\"")):
                        problems.append(f"executor {label}: structured placeholder {arg[:40]}")
            elif ex.HasField("importer"):
                if ex.importer.download_to_workspace:
                    problems.append(f"executor {label}: importer downloadToWorkspace")
            else:
                problems.append(f"executor {label}: {ex.WhichOneof('spec')}")
        for label, cfg in self.k8s.items():
            extra = set(cfg) - _IGNORED_PLATFORM - {"secretAsEnv"}
            problems += [f"kubernetes executor {label}: {n}" for n in sorted(extra)]
        if problems:
            raise UnsupportedFeature("not implemented by the launcher-contract runner: " + "; ".join(problems))

    @staticmethod
    def _task_problems(where: str, task: pb.PipelineTaskSpec) -> list[str]:
        out = [f"task {where}: {f.name}" for f, _ in task.ListFields() if f.name not in _SUPPORTED_TASK_FIELDS]
        if task.trigger_policy.strategy > 1:
            out.append(f"task {where}: trigger strategy {task.trigger_policy.strategy} (exit handler)")
        if task.trigger_policy.condition:
            try:
                _check_cel(task.trigger_policy.condition)
            except (SyntaxError, UnsupportedFeature) as e:
                out.append(f"task {where}: condition ({e})")
        for pname, p in task.inputs.parameters.items():
            if p.HasField("task_final_status"):
                out.append(f"task {where}: input {pname} taskFinalStatus")
            if p.parameter_expression_selector and not _SELECTOR.match(p.parameter_expression_selector):
                out.append(f"task {where}: input {pname} selector {p.parameter_expression_selector!r}")
        for aname, a in task.inputs.artifacts.items():
            if a.WhichOneof("kind") not in ("task_output_artifact", "component_input_artifact"):
                out.append(f"task {where}: input artifact {aname} {a.WhichOneof('kind')}")
        return out

    # ---- DAG walking

    def run(self, arguments: dict) -> RunResult:
        params = {}
        for name, d in self.spec.root.input_definitions.parameters.items():
            if name in arguments:
                params[name] = self._coerce(name, arguments[name], d.parameter_type)
            elif d.HasField("default_value"):
                params[name] = _value(d.default_value)
            elif not d.is_optional:
                raise ValueError(f"pipeline input {name!r} is required and has no default")
        unknown = set(arguments) - set(self.spec.root.input_definitions.parameters)
        if unknown:
            raise ValueError(f"unknown pipeline argument(s): {', '.join(sorted(unknown))}")
        self.result.outputs = self._run_dag(self.spec.root, _Scope(params, {}, "", None))
        return self.result

    @staticmethod
    def _coerce(name: str, value: Any, ptype: int) -> Any:
        kind = pb.ParameterType.ParameterTypeEnum.Name(ptype)
        if kind != "STRING" and isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass  # reported below as a type mismatch
        ok = {"STRING": str, "NUMBER_INTEGER": int, "NUMBER_DOUBLE": (int, float), "BOOLEAN": bool,
              "LIST": list, "STRUCT": dict}.get(kind, object)
        if not isinstance(value, ok) or (kind == "NUMBER_INTEGER" and isinstance(value, bool)):
            raise ValueError(f"pipeline argument {name!r}: expected {kind}, got {value!r}")
        return _plain(value)

    def _run_dag(self, comp: pb.ComponentSpec, scope: _Scope) -> dict:
        for tname in self._order(comp.dag):
            scope.tasks[tname] = self._run_task(tname, comp.dag.tasks[tname], scope)
        outs = {"parameters": {}, "artifacts": {}}
        for name, spec in comp.dag.outputs.parameters.items():
            selectors = ([spec.value_from_parameter] if spec.HasField("value_from_parameter")
                         else list(spec.value_from_oneof.parameter_selectors))
            for sel in selectors:  # GetProducerTask, ValueFromOneof: the first branch that ran (every version)
                produced = scope.tasks.get(sel.producer_subtask)
                if produced is not None:
                    outs["parameters"][name] = produced["parameters"][sel.output_parameter_key]
                    break
        for name, spec in comp.dag.outputs.artifacts.items():
            # resolved when a consumer's driver asks (the root DAG's outputs: never), so a failure is recorded here
            # and raised there (_resolve_inputs)
            ran = {t: out is not None for t, out in scope.tasks.items()}
            try:
                sel = driver.oneof_artifact_selector(name, spec.artifact_selectors, ran, self.backend)
            except driver.DriverError as e:
                outs["artifacts"][name] = _Unresolved(str(e))
                continue
            produced = scope.tasks.get(sel.producer_subtask)
            if produced is None:  # a skipped branch: its DAG execution exists, the task inside it does not
                inner = self.spec.components[comp.dag.tasks[sel.producer_subtask].component_ref.name]
                sub = inner.dag.outputs.artifacts[sel.output_artifact_key].artifact_selectors[-1].producer_subtask \
                    if inner.HasField("dag") else sel.producer_subtask
                outs["artifacts"][name] = _Unresolved(f"subTaskName, {sub}, not in tasks")
            else:
                outs["artifacts"][name] = produced["artifacts"][sel.output_artifact_key]
        return outs

    @staticmethod
    def _order(dag: pb.DagSpec) -> list[str]:
        deps = {}
        for name, t in dag.tasks.items():
            d = set(t.dependent_tasks)
            d |= {p.task_output_parameter.producer_task for p in t.inputs.parameters.values()
                  if p.HasField("task_output_parameter")}
            d |= {a.task_output_artifact.producer_task for a in t.inputs.artifacts.values()
                  if a.HasField("task_output_artifact")}
            deps[name] = d
        order, done = [], set()
        while len(order) < len(deps):
            ready = sorted(n for n in deps if n not in done and deps[n] <= done)
            if not ready:
                raise ValueError(f"dependency cycle among tasks {sorted(set(deps) - done)}")
            order += ready
            done |= set(ready)
        return order

    def _resolve_inputs(self, task: pb.PipelineTaskSpec, scope: _Scope, where: str) -> tuple[dict, dict]:
        params, artifacts = {}, {}
        for name, p in task.inputs.parameters.items():
            kind = p.WhichOneof("kind")
            if kind == "runtime_value":
                value = _value(p.runtime_value.constant)
            elif kind == "component_input_parameter":
                if p.component_input_parameter not in scope.params:
                    continue  # an optional pipeline / DAG input left unset
                value = scope.params[p.component_input_parameter]
            else:
                src = p.task_output_parameter
                produced = scope.tasks.get(src.producer_task)
                if produced is None:
                    raise ValueError(f"{where}: input {name!r} comes from skipped task {src.producer_task!r}")
                value = produced["parameters"][src.output_parameter_key]
            if p.parameter_expression_selector:
                key = _SELECTOR.match(p.parameter_expression_selector).group(1)[1:-1]
                value = (json.loads(value) if isinstance(value, str) else value)[key]
            params[name] = value
        for name, a in task.inputs.artifacts.items():
            if a.HasField("component_input_artifact"):
                if a.component_input_artifact in scope.artifacts:
                    artifacts[name] = scope.artifacts[a.component_input_artifact]
                continue
            src = a.task_output_artifact
            produced = scope.tasks.get(src.producer_task)
            if produced is None:
                raise ValueError(f"{where}: input artifact {name!r} comes from skipped task {src.producer_task!r}")
            artifacts[name] = produced["artifacts"][src.output_artifact_key]
        for name, value in artifacts.items():
            if isinstance(value, _Unresolved):  # resolveInputArtifact -> resolveUpstreamArtifacts -> GetProducerTask
                kind = "DAG" if self.spec.components[task.component_ref.name].HasField("dag") else "Container"
                self._driver_failed(task, where, scope, driver.DriverError(
                    f"driver.{kind}({where}) failed: failed to resolve inputs: failed to resolve input artifact "
                    f"{name}: {value.message}"))
        return params, artifacts

    def _driver_failed(self, task: pb.PipelineTaskSpec, where: str, scope: "_Scope", error: Exception):
        self.result.tasks.append(TaskRecord(where.rsplit("/", 1)[-1], task.task_info.name, where, scope.iteration,
                                            "driver failed"))
        raise DriverFailed(str(error), self.result) from None

    def _run_task(self, tname: str, task: pb.PipelineTaskSpec, scope: _Scope) -> Optional[dict]:
        where = f"{scope.path}{tname}"
        comp = self.spec.components[task.component_ref.name]
        params, artifacts = self._resolve_inputs(task, scope, where)
        executor = None if comp.HasField("dag") else self.executors[comp.executor_label]
        if executor is None or executor.HasField("container"):  # the importer's driver checks no types
            try:
                params = driver.check_parameters("DAG" if executor is None else "Container", where, comp, task,
                                                 params, iteration=False)
            except driver.DriverError as e:
                self._driver_failed(task, where, scope, e)
        if task.trigger_policy.condition:
            pv = dict(params)
            if not eval(_check_cel(task.trigger_policy.condition), {"__builtins__": {}},  # noqa: S307 (AST-checked)
                        {"pv": pv, "int": int, "float": float, "str": str}):
                self.result.tasks.append(TaskRecord(tname, task.task_info.name, where, scope.iteration, "skipped"))
                return None
        if comp.HasField("dag"):
            if not task.HasField("parameter_iterator"):
                return self._run_dag(comp, _Scope(params, artifacts, where + "/", scope.iteration))
            it = task.parameter_iterator
            items = json.loads(it.items.raw) if it.items.raw else params[it.items.input_parameter]
            items = _plain(json.loads(items) if isinstance(items, str) else items)
            per_iteration = []
            for i, item in enumerate(items):  # each iteration's DAG driver: the items input out, the item in
                given = {k: v for k, v in params.items() if k != it.items.input_parameter}
                try:
                    given = driver.check_parameters("DAG", f"{where}[{i}]", comp, task,
                                                    dict(given, **{it.item_input: item}), iteration=True)
                except driver.DriverError as e:
                    self._driver_failed(task, f"{where}[{i}]", _Scope({}, {}, scope.path, i), e)
                per_iteration.append(self._run_dag(comp, _Scope(given, artifacts, f"{where}[{i}]/", i)))
            collected = {"parameters": {}, "artifacts": {}}
            for name in comp.output_definitions.parameters:
                collected["parameters"][name] = [o["parameters"].get(name) for o in per_iteration]
            for name in comp.output_definitions.artifacts:
                lists = [o["artifacts"].get(name, []) for o in per_iteration]
                bad = next((lst for lst in lists if isinstance(lst, _Unresolved)), None)
                collected["artifacts"][name] = bad or [a for lst in lists for a in lst]
            return collected
        if executor.HasField("importer"):
            return self._import(tname, task, executor.importer, params, where, scope.iteration)
        return self._container(tname, task, comp, executor.container, params, artifacts, where, scope.iteration)

    # ---- importer

    def _import(self, tname, task, importer, params, where, iteration) -> dict:
        uri = (_value(importer.artifact_uri.constant) if importer.artifact_uri.HasField("constant")
               else params[importer.artifact_uri.runtime_parameter])
        shim.split_uri(uri)  # only object-store URIs can be downloaded by the launcher
        metadata = _struct(importer.metadata)
        if "{{$" in json.dumps(metadata):
            raise UnsupportedFeature(f"{where}: importer metadata with placeholders")
        type_ = _type_dict(importer.type_schema)
        found = None if importer.reimport else self.store.match_artifact(self.pipeline, uri, type_, metadata)
        artifact = found or self.store.new_artifact(self.pipeline, uri, type_, metadata)
        self.store.save()
        self.result.tasks.append(TaskRecord(tname, task.task_info.name, where, iteration, "imported",
                                            outputs={"artifact": [artifact]}))
        return {"parameters": {}, "artifacts": {"artifact": [artifact]}}

    # ---- container tasks

    def _fingerprint(self, task, comp, container, inputs: dict, outputs: dict) -> str:
        if task.caching_options.cache_key:
            return hashlib.sha256(task.component_ref.name.encode() + b"\0" +
                                  task.caching_options.cache_key.encode()).hexdigest()
        key = {
            "inputArtifactNames": {n: {"artifactNames": [a["name"] for a in lst]}
                                   for n, lst in inputs["artifacts"].items()},
            "inputParameterValues": inputs["parameterValues"],
            "outputArtifactsSpec": {n: {"name": lst["artifacts"][0]["name"], "type": lst["artifacts"][0]["type"],
                                        "metadata": lst["artifacts"][0]["metadata"]}
                                    for n, lst in outputs["artifacts"].items()},
            "outputParametersSpec": {n: pb.ParameterType.ParameterTypeEnum.Name(d.parameter_type)
                                     for n, d in comp.output_definitions.parameters.items()},
            "containerSpec": {"image": container.image, "cmdArgs": [*container.command, *container.args]},
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def _task_env(self, container, label: str, where: str) -> dict[str, str]:
        env = dict(self.env)
        for e in container.env:
            if "{{$" in e.value:
                raise UnsupportedFeature(f"{where}: env {e.name} uses a placeholder")
            env[e.name] = e.value
        for ref in self.k8s.get(label, {}).get("secretAsEnv", []):
            name = ref.get("secretNameParameter", {}).get("runtimeValue", {}).get("constant") or ref["secretName"]
            secret = self.secrets.get(name)
            if secret is None:
                if ref.get("optional"):
                    continue
                raise ValueError(f"{where}: secret {name!r} is not among the runner's secrets {sorted(self.secrets)}")
            for pair in ref.get("keyToEnv", []):
                if pair["secretKey"] not in secret:
                    raise ValueError(f"{where}: secret {name!r} has no key {pair['secretKey']!r}")
                env[pair["envVar"]] = secret[pair["secretKey"]]
        return env

    def _container(self, tname, task, comp, container, params, artifacts, where, iteration) -> dict:
        record = TaskRecord(tname, task.task_info.name, where, iteration, "executed")
        task_root = f"{self.task_root}/{tname}/{uuid.uuid4()}"
        outputs = {"artifacts": {n: {"artifacts": [{"name": n, "uri": f"{task_root}/{n}",
                                                    "type": _type_dict(d.artifact_type),
                                                    "metadata": _struct(d.metadata)}]}
                                 for n, d in comp.output_definitions.artifacts.items()}}
        inputs = {"parameterValues": params, "artifacts": {n: lst for n, lst in artifacts.items()}}
        fp = ""
        if task.caching_options.enable_cache:
            fp = record.fingerprint = self._fingerprint(task, comp, container, inputs, outputs)
            hit = self.store.data["executions"].get(f"{self.pipeline}|{fp}")
            if hit is not None:
                record.status = "cached"
                record.parameters = hit["parameters"]
                record.outputs = {n: [self.store.artifact(i) for i in ids] for n, ids in hit["artifacts"].items()}
                self.result.tasks.append(record)
                return {"parameters": record.parameters, "artifacts": record.outputs}

        label = comp.executor_label
        env = self._task_env(container, label, where)
        defaults = {n: _value(d.default_value) for n, d in comp.input_definitions.parameters.items()
                    if d.HasField("default_value") and n not in params}
        start = time.monotonic()
        for attempt in range(1 + max(0, task.retry_policy.max_retry_count)):
            record.attempts = attempt + 1
            box = _Sandbox(self.executor, self.image, self.keep)
            try:
                outcome, text = self._launch(box, comp, container, inputs, outputs, task_root, defaults, env)
            finally:
                box.close()
            if outcome.get("returncode") == 0:
                break
            log.warning("%s: attempt %d failed (exit code %s)", where, attempt + 1, outcome.get("returncode"))
        record.seconds = time.monotonic() - start
        record.bytes_downloaded = outcome.get("bytes_downloaded", 0)
        record.bytes_uploaded = outcome.get("bytes_uploaded", 0)
        record.timings = {k: outcome[f"seconds_{k}"] for k in ("download", "run", "upload")
                          if f"seconds_{k}" in outcome}
        log.debug("%s output:\n%s", where, text)
        if outcome.get("returncode") != 0:
            self.result.tasks.append(record)
            tail = "\n".join(text.splitlines()[-40:])
            raise TaskFailed(f"task {where} ({record.display_name}) failed with exit code "
                             f"{outcome.get('returncode')} after {record.attempts} attempt(s):\n{tail}",
                             self.result, text)
        produced = outcome["executor_output"].get("parameterValues", {})
        for name, d in comp.output_definitions.parameters.items():
            if name in produced:
                record.parameters[name] = _plain(produced[name])
            elif name in outcome["parameter_texts"]:
                record.parameters[name] = _parameter_from_text(outcome["parameter_texts"][name], d.parameter_type)
            else:
                raise TaskFailed(f"task {where}: output parameter {name!r} was not written", self.result, text)
        for name, art in outcome["output_artifacts"].items():
            record.outputs[name] = [self.store.new_artifact(self.pipeline, art["uri"], art["type"],
                                                            _plain(art["metadata"]))]
        if fp:
            self.store.data["executions"][f"{self.pipeline}|{fp}"] = {
                "parameters": record.parameters,
                "artifacts": {n: [a["name"] for a in lst] for n, lst in record.outputs.items()}}
        self.store.save()
        self.result.tasks.append(record)
        return {"parameters": record.parameters, "artifacts": record.outputs}

    def _launch(self, box: _Sandbox, comp, container, inputs, outputs, task_root, defaults, env):
        root = box.mount_root
        param_files = {n: f"{root}/tmp/kfp/outputs/{n}" for n in comp.output_definitions.parameters}
        executor_input = {
            "inputs": {"parameterValues": dict(defaults, **inputs["parameterValues"]),
                       "artifacts": {n: {"artifacts": lst} for n, lst in inputs["artifacts"].items()}},
            "outputs": dict(outputs, parameters={n: {"outputFile": p} for n, p in param_files.items()},
                            outputFile=shim.local_path_for_uri(task_root, root) + "/output_metadata.json"),
        }
        command = [self._substitute(s, executor_input, root) for s in [*container.command, *container.args]]
        launch = {"mount_root": root, "command": command, "output_file": executor_input["outputs"]["outputFile"],
                  "downloads": [{"name": n, "uri": a["uri"]} for n, lst in inputs["artifacts"].items() for a in lst],
                  "run_root": self.run_root,
                  "output_artifacts": {n: lst["artifacts"][0] for n, lst in outputs["artifacts"].items()},
                  "output_parameter_files": param_files}
        return box.run(launch, dict(env, **self.launcher_env))

    @staticmethod
    def _substitute(text: str, executor_input: dict, root: str) -> str:
        """``compileCmdAndArgs``: ``{{$}}`` and the per-input / per-output placeholders."""
        text = text.replace("{{$}}", json.dumps(executor_input, separators=(",", ":")))
        holders = {}
        for name, lst in executor_input["inputs"]["artifacts"].items():
            if lst["artifacts"]:
                holders[f"{{{{$.inputs.artifacts['{name}'].uri}}}}"] = lst["artifacts"][0]["uri"]
                holders[f"{{{{$.inputs.artifacts['{name}'].path}}}}"] = shim.local_path_for_uri(
                    lst["artifacts"][0]["uri"], root)
        for name, lst in executor_input["outputs"]["artifacts"].items():
            holders[f"{{{{$.outputs.artifacts['{name}'].uri}}}}"] = lst["artifacts"][0]["uri"]
            holders[f"{{{{$.outputs.artifacts['{name}'].path}}}}"] = shim.local_path_for_uri(
                lst["artifacts"][0]["uri"], root)
        for name, value in executor_input["inputs"]["parameterValues"].items():
            holders[f"{{{{$.inputs.parameters['{name}']}}}}"] = (
                value if isinstance(value, str) else json.dumps(value, separators=(",", ":")))
        for name, p in executor_input["outputs"]["parameters"].items():
            holders[f"{{{{$.outputs.parameters['{name}'].output_file}}}}"] = p["outputFile"]
        for key, value in holders.items():
            text = text.replace(key, value)
        if "{{$" in text:
            raise UnsupportedFeature(f"unresolved placeholder in {text[:120]!r}")
        return text


def run_pipeline(
    package_path: str | os.PathLike,
    *,
    pipeline_root: Optional[str] = None,
    launcher_config: Optional[dict[str, str]] = None,
    backend_version: str = driver.LATEST_BACKEND,
    arguments: Optional[dict] = None,
    executor: str = "subprocess",
    image: Optional[str] = None,
    cache_path: Optional[str] = None,
    env: Optional[dict[str, str]] = None,
    secrets: Optional[dict[str, dict[str, str]]] = None,
    run_id: Optional[str] = None,
    s3_endpoint: Optional[str] = None,
    keep_sandboxes: bool = False,
) -> RunResult:
    """Execute the compiled pipeline at `package_path`; see the module docstring for the contract.

    pipeline_root: the run's runtime config ``pipeline_root`` (``s3://bucket/prefix``); without it the
    ``defaultPipelineRoot`` of `launcher_config` (the ``kfp-launcher`` ConfigMap's data), else KFP's
    ``minio://mlpipeline/v2/artifacts`` (`driver.pipeline_root`); never the spec's ``defaultPipelineRoot``.
    backend_version: the KFP backend whose version-dependent driver rules apply (`driver`). executor: ``subprocess``
    or ``docker`` (then `image` runs every task; the IR's image still enters the cache key). cache_path: JSON file
    of artifact ids and cached executions (None: in memory, caching only within this run). env: environment every
    task gets (what a cluster would inject, e.g. ``AWS_ENDPOINT_URL``); secrets: ``{secret name: {key: value}}``
    for the platform spec's ``secretAsEnv``. The launcher's own S3 access uses `s3_endpoint` (default
    ``$AWS_ENDPOINT_URL``) and the ``AWS_*`` credentials of this process. Raises `UnsupportedFeature`,
    `TaskFailed` (with the partial `RunResult`) or ValueError (bad arguments, missing secret).
    """
    if executor not in EXECUTORS:
        raise ValueError(f"executor {executor!r}: expected one of {EXECUTORS}")
    if executor == "docker" and not image:
        raise ValueError("the docker executor needs an image")
    spec, platform = parse_pipeline_spec(package_path)
    driver.parse_version(backend_version)
    root, source = driver.pipeline_root(pipeline_root, launcher_config)
    shim.split_uri(root.partition("?")[0].rstrip("/") + "/x")
    run = _Run(spec, platform, pipeline_root=root, root_source=source, backend_version=backend_version,
               executor=executor, image=image, store=_Store(cache_path),
               env=env or {}, secrets=secrets or {}, run_id=run_id or uuid.uuid4().hex[:12],
               s3_endpoint=s3_endpoint, keep_sandboxes=keep_sandboxes)
    run.validate()
    return run.run(dict(arguments or {}))
