"""What KFP v2's *driver* decides before a task's pod starts, as pure functions the runner calls (test tool).

Each rule names the kubeflow/pipelines Go code it follows (read at tag 2.17.0, ``backend/src/v2/``):

- `pipeline_root`: ``driver/root_dag.go`` ``RootDAG`` + ``config/env.go`` ``Config.DefaultPipelineRoot``: the run's
  runtime config ``pipeline_root`` (the API's ``gcs_output_directory``), else the namespace's ``kfp-launcher``
  ConfigMap key ``defaultPipelineRoot``, else ``minio://mlpipeline/v2/artifacts``. The compiled spec's
  ``defaultPipelineRoot`` is never read.
- `run_root`: ``metadata/client.go`` ``GetPipeline`` / ``GenerateOutputURI``: ``<root>/<pipeline name>/<run id>``,
  the run context's pipeline root, from which ``driver.go`` ``provisionOutputs`` places every output artifact at
  ``<run root>/<task name>/<uuid>/<output name>`` and the launcher opens its default bucket.
- `check_parameters`: ``driver/resolve.go`` ``resolveInputs`` -> ``handleParamTypeValidationAndConversion``: every
  input parameter is checked against the component's declared type; a non-STRING value bound to a STRING input
  becomes its JSON text (``metadata/converter.go`` ``PbValueToText``); a string for any other type, or another
  mismatch, fails the driver. The iterator driver of a ParallelFor skips the item input, its iteration drivers skip
  the items input (``resolveInputs``: ``isIterationDriver``).
- `oneof_artifact_selector`: ``driver/resolve.go`` ``GetProducerTask``: from 2.17.0 (kubeflow/pipelines #13436,
  PR #13437) the first selector whose producer completed (or was cached); before, always the last selector.
- `type_flow_problems`: a static consequence of `check_parameters` on a compiled IR: a DAG input declared STRING
  always reaches its tasks as a string, so a task input bound to it whose own type is not STRING fails.

Messages reproduce the Go format strings; the Go code adds the task's driver options and DAG execution ids where
this shows the runner's task path.
"""
from __future__ import annotations

import json
import re
from decimal import Decimal
from typing import Any, Iterable, Mapping, Optional

from kfp.pipeline_spec import pipeline_spec_pb2 as pb

__all__ = ["DEFAULT_PIPELINE_ROOT", "LATEST_BACKEND", "DriverError", "backend_at_least", "check_parameters",
           "oneof_artifact_selector", "parse_version", "pipeline_root", "run_root", "type_flow_problems"]

DEFAULT_PIPELINE_ROOT = "minio://mlpipeline/v2/artifacts"  # config/env.go defaultPipelineRoot
LAUNCHER_CONFIGMAP_ROOT_KEY = "defaultPipelineRoot"  # config/env.go configKeyDefaultPipelineRoot
LATEST_BACKEND = "2.17.0"
ONEOF_ARTIFACTS_FIXED = (2, 17, 0)  # kubeflow/pipelines PR #13437


class DriverError(ValueError):
    """What the driver of a task returns as its error: the run fails before the task's pod starts."""


def parse_version(text: str) -> tuple[int, int, int]:
    m = re.fullmatch(r"v?(\d+)\.(\d+)(?:\.(\d+))?(?:[-+].*)?", str(text).strip())
    if not m:
        raise ValueError(f"backend version {text!r}: expected MAJOR.MINOR[.PATCH], e.g. {LATEST_BACKEND}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def backend_at_least(version: str, minimum: tuple[int, int, int]) -> bool:
    return parse_version(version) >= minimum


# ------------------------------------------------------------------------------------------------ pipeline root


def pipeline_root(runtime_root: Optional[str], launcher_config: Optional[Mapping[str, str]]) -> tuple[str, str]:
    """``(root, where it came from)`` as ``RootDAG`` chooses it; the spec's ``defaultPipelineRoot`` plays no part.
    `launcher_config`: the ``kfp-launcher`` ConfigMap's data (None: no ConfigMap in the namespace)."""
    if runtime_root:
        return runtime_root, "runtime config"
    if launcher_config and launcher_config.get(LAUNCHER_CONFIGMAP_ROOT_KEY):
        return launcher_config[LAUNCHER_CONFIGMAP_ROOT_KEY], "kfp-launcher ConfigMap"
    return DEFAULT_PIPELINE_ROOT, "KFP default"


def run_root(root: str, pipeline_name: str, run_id: str) -> str:
    """``GenerateOutputURI(root, [pipeline name, run id], preserveQueryString=true)``."""
    base, sep, query = root.partition("?")
    return f"{base.rstrip('/')}/{pipeline_name}/{run_id}" + (f"?{query}" if sep else "")


# ------------------------------------------------------------------------------------------------ parameter types


def _kind(value: Any) -> str:
    """The ``structpb.Value`` kind a JSON value travels as."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "struct"
    raise TypeError(f"not a JSON value: {type(value).__name__}")


def pb_value_to_text(value: Any) -> str:
    """``metadata.PbValueToText``: numbers as ``strconv.FormatFloat(f, 'f', -1, 64)``, bools as true/false, lists
    and structs as JSON (compact; Go's protojson may space it differently), null as the empty string."""
    kind = _kind(value)
    if kind == "null":
        return ""
    if kind == "string":
        return value
    if kind == "bool":
        return "true" if value else "false"
    if kind == "number":
        return str(value) if isinstance(value, int) else format(Decimal(repr(float(value))).normalize(), "f")
    return json.dumps(value, separators=(",", ":"))


def check_parameters(driver: str, where: str, comp: pb.ComponentSpec, task: pb.PipelineTaskSpec,
                     values: dict[str, Any], iteration: Optional[bool] = None) -> dict[str, Any]:
    """``handleParamTypeValidationAndConversion`` over `comp`'s input definitions: returns `values` with the
    driver's conversions; raises `DriverError` where the driver fails. `driver`: "Container" or "DAG";
    `iteration`: for a ParallelFor task, False in its iterator driver, True in an iteration's driver."""
    out = dict(values)
    it = task.parameter_iterator if task.HasField("parameter_iterator") else None

    def fail(message: str) -> DriverError:
        return DriverError(f"driver.{driver}({where}) failed: failed to resolve inputs: {message}")

    for name, spec in comp.input_definitions.parameters.items():
        if it is not None:
            if not iteration and it.item_input == name:
                continue  # only the iterations get the item
            if iteration and it.items.input_parameter == name:
                continue  # only the iterator gets the items
        has_value = name in out
        if not has_value:
            if spec.is_optional:
                continue  # the launcher adds the default
            if not spec.HasField("default_value"):
                raise fail(f'neither value nor default value provided for non-optional parameter "{name}"')
        value = out.get(name)
        declared = pb.ParameterType.ParameterTypeEnum.Name(spec.parameter_type)
        kind = _kind(value) if has_value else "unset"
        if declared == "STRING":
            if kind != "string":
                out[name] = "" if kind == "unset" else pb_value_to_text(value)
            continue
        if kind == "unset":
            raise fail(f"parameter {name} has unknown protobuf.Value type: <nil>")
        if kind == "null":
            raise fail(f'got null for input parameter "{name}"')
        allowed = {"string": ("STRING",), "number": ("NUMBER_DOUBLE", "NUMBER_INTEGER"), "bool": ("BOOLEAN",),
                   "list": ("LIST",), "struct": ("STRUCT", "TASK_FINAL_STATUS", "TASK_CONFIG")}[kind]
        if declared not in allowed:
            raise fail(f'input parameter "{name}" type mismatch: expect {declared}, got {kind}')
    return out


def type_flow_problems(spec: pb.PipelineSpec) -> list[str]:
    """Task inputs that `check_parameters` rejects on every run: bound to a DAG input declared STRING (which every
    driver of that DAG has turned into text) while the task's component declares another type."""
    problems = []
    dags = [("root", spec.root)] + [(n, c) for n, c in spec.components.items() if c.HasField("dag")]
    for dag_name, dag in dags:
        declared = dag.input_definitions.parameters
        for tname, task in dag.dag.tasks.items():
            consumer = spec.components[task.component_ref.name].input_definitions.parameters
            for pname, binding in task.inputs.parameters.items():
                source = binding.component_input_parameter
                if not source or source not in declared or pname not in consumer or \
                        binding.parameter_expression_selector:
                    continue
                have = pb.ParameterType.ParameterTypeEnum.Name(declared[source].parameter_type)
                want = pb.ParameterType.ParameterTypeEnum.Name(consumer[pname].parameter_type)
                if have == "STRING" and want != "STRING":
                    problems.append(f"{dag_name}/{tname}: input {pname!r} ({want}) is bound to {source!r}, "
                                    f"which the driver passes as STRING")
    return problems


# ------------------------------------------------------------------------------------------------ dsl.OneOf


def oneof_artifact_selector(key: str, selectors: Iterable[pb.DagOutputsSpec.ArtifactSelectorSpec],
                            completed: Mapping[str, bool], backend: str) -> pb.DagOutputsSpec.ArtifactSelectorSpec:
    """The selector ``GetProducerTask`` follows for DAG output artifact `key`; `completed`: producer task -> whether
    it completed or was a cache hit (False: skipped / not triggered). From 2.17.0 one selector is followed as is
    and of several the first completed one; earlier backends always took the last selector."""
    selectors = list(selectors)
    if len(selectors) == 1 or not backend_at_least(backend, ONEOF_ARTIFACTS_FIXED):
        return selectors[-1]
    for sel in selectors:
        if completed.get(sel.producer_subtask):
            return sel
    raise DriverError(f'processing OneOf: No successful task found for output key "{key}"')
