"""Helpers that run *inside* a kfp component: the one place that knows the KFP v2 launcher's artifact contract.

The contract (DESIGN.md section 7; kubeflow/pipelines ``backend/src/v2/component/launcher_v2.go``): before the
command starts, the launcher downloads every input artifact to a local path (``s3://b/k`` -> ``/s3/b/k``); the
artifact's ``.path`` is that local copy and ``.uri`` the object-store URI. After the command it uploads every output
artifact's local ``.path`` to its ``.uri``. Under kfp.local ``.path`` and ``.uri`` are the same local directory.

So artifacts are *pointers*: the local content of a Dataset / Embeddings / Index artifact is its manifest
(``_manifest.json``, ``index.json``, ...), which names the bulk files by absolute URI with size and sha256. Stages
write bulk data straight to `bulk_uri` = ``<pipeline_root>/.bulk/<artifact path under the root>`` (never under the
artifact's own prefix, which the launcher would copy into every downstream pod), then `publish_pointer` writes the
manifest into the output's local path. Readers take the manifest from the input's local copy (`input_path`, tiny)
and stream the bulk files from their URIs (`bulk_of` for stages whose readers take a prefix). Bulk files are never
rewritten once a manifest names them: every task run writes under its own artifact's bulk prefix.

A model checkpoint is needed whole by the task that uses it, so it lives inside its artifact (`model_checkpoint_uri`).
Parameters that follow content (fingerprints, block lists) are computed by `lgff_core.kfp.plan`.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import sys
import tempfile
from typing import IO, Any, Optional, Sequence

from .. import storage
from ..errors import DataError

__all__ = [
    "PIPELINE_ROOT_ENV",
    "BULK_DIR",
    "object_uri",
    "bulk_uri",
    "input_path",
    "bulk_of",
    "publish_pointer",
    "read_pointer",
    "run_cli",
    "write_config",
    "write_json_file",
    "dataset_facts",
    "model_checkpoint_uri",
    "model_facts",
    "write_json_artifact",
]

log = logging.getLogger(__name__)

# Set on every task by the pipelines when the configured root is local (kfp.local: the run's root). A cluster run's
# root is chosen at run time (its runtime config, else the namespace's kfp-launcher ConfigMap, else KFP's default),
# so there the root is read off the output artifact's URI instead (`_root_and_rest`).
PIPELINE_ROOT_ENV = "LGFF_PIPELINE_ROOT"
# KFP's driver places every output artifact at <root>/<pipeline name>/<run id>/<task name>/<uuid>/<output name>
# (kubeflow/pipelines backend/src/v2: metadata.GetPipeline + driver.provisionOutputs); kfp.local at
# <root>/<pipeline run>/<task name>/<output name>
_KFP_OUTPUT_DEPTH = 5
_LOCAL_OUTPUT_DEPTH = 3
BULK_DIR = ".bulk"
# manifests whose shard entries are rewritten to absolute URIs, so any lgff reader can open the local copy
_SHARDED_MANIFESTS = ("_manifest.json",)


def object_uri(artifact: Any) -> str:
    """The artifact's URI as `lgff_core.storage` reads it (``minio://`` is S3 under another name)."""
    uri = str(getattr(artifact, "uri", "") or "")
    return "s3://" + uri[len("minio://"):] if uri.startswith("minio://") else uri


def _root_and_rest(uri: str) -> tuple[str, str]:
    """(pipeline root, path of `uri` below it) of an output artifact. An object-store URI was placed by KFP's
    driver: its root is the URI less the driver's five trailing segments, whatever root the run was given (the
    compiled spec's ``defaultPipelineRoot`` is never used by KFP). A local path (kfp.local): ``LGFF_PIPELINE_ROOT``
    when it prefixes the path, else the kfp.local layout ``<root>/<run>/<task>/<output>``."""
    if not storage.is_local(uri):
        scheme, _, rest = uri.partition("://")
        bucket, _, key = rest.partition("/")
        parts = [p for p in key.split("/") if p]
        if len(parts) < _KFP_OUTPUT_DEPTH:  # not a driver-placed output: its bucket is the root
            return f"{scheme}://{bucket}", key
        return (f"{scheme}://" + "/".join([bucket, *parts[:-_KFP_OUTPUT_DEPTH]]),
                "/".join(parts[-_KFP_OUTPUT_DEPTH:]))
    path = storage.local_path(uri)
    root = os.environ.get(PIPELINE_ROOT_ENV, "").rstrip("/")
    if root and storage.is_local(root):
        root = storage.local_path(root)
        if path.startswith(root + "/"):
            return root, path[len(root) + 1:]
    parts = path.rstrip("/").split("/")
    return "/".join(parts[:-_LOCAL_OUTPUT_DEPTH]) or "/", "/".join(parts[-_LOCAL_OUTPUT_DEPTH:])


def bulk_uri(artifact: Any) -> str:
    """Where a task writes the bulk data of output `artifact`: ``<pipeline_root>/.bulk/<artifact path>``."""
    root, rest = _root_and_rest(object_uri(artifact))
    return storage.join(root, BULK_DIR, rest)


def input_path(artifact: Any) -> str:
    """The local copy of an input artifact (the launcher's download; under kfp.local the artifact itself)."""
    return str(artifact.path)


def _file_entry(uri: str) -> dict[str, Any]:
    digest, size = storage.stream_sha256(uri)
    return {"uri": uri, "size": size, "sha256": digest}


def publish_pointer(artifact: Any, bulk: str, manifest_name: str, extra: Optional[dict] = None) -> dict:
    """Write the pointer of output `artifact`: the stage's manifest at ``bulk/manifest_name``, with every bulk file
    listed by absolute URI, size and sha256 (``"bulk": {"prefix", "files"}``) and, for sharded sets, the shard
    names made absolute. Written into the artifact's local path (the launcher uploads it); returns it."""
    manifest = storage.read_json(storage.join(bulk, manifest_name))
    if not isinstance(manifest, dict):
        raise DataError(f"{storage.join(bulk, manifest_name)}: expected a JSON object")
    if manifest_name in _SHARDED_MANIFESTS:
        for shard in manifest.get("shards", []):
            shard["name"] = storage.resolve(bulk, shard["name"])
    # shards already carry their sha256: only stat them; other bulk files (faiss, id maps) are hashed here
    known = {s["name"]: s["sha256"] for s in manifest.get("shards", []) if "sha256" in s}
    files = []
    for uri in storage.list_files(bulk):
        name = storage.basename(uri)
        if name == manifest_name or "/_done/" in uri or name.startswith("."):
            continue
        files.append({"uri": uri, "size": storage.file_size(uri), "sha256": known[uri]} if uri in known
                     else _file_entry(uri))
    manifest["bulk"] = {"prefix": bulk, "files": files}
    manifest.update(extra or {})
    write_json_file(os.path.join(str(artifact.path), manifest_name), manifest)
    return manifest


def read_pointer(artifact: Any, manifest_name: str) -> dict:
    """The pointer manifest of input `artifact` (read from its local copy)."""
    path = os.path.join(input_path(artifact), manifest_name)
    if not os.path.isfile(path):
        raise DataError(f"{path}: input artifact {getattr(artifact, 'uri', '')} has no {manifest_name} "
                        "(not written by an lgff task?)")
    with open(path) as f:
        return json.load(f)


def bulk_of(artifact: Any, manifest_name: str) -> str:
    """The bulk prefix an input pointer names (for stages whose readers open a prefix, e.g. an index)."""
    pointer = read_pointer(artifact, manifest_name)
    try:
        return pointer["bulk"]["prefix"]
    except (KeyError, TypeError):
        raise DataError(f"{input_path(artifact)}/{manifest_name}: not a pointer manifest (no bulk.prefix)") from None


class _StderrTee(io.TextIOBase):
    """stderr during `run_cli`: passes everything on and keeps the command's own error line (``lgff CMD: ...``)."""

    def __init__(self, stream: IO[str], prefix: str):
        self._stream, self._prefix, self._buf = stream, prefix, ""
        self.reason = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._stream.write(text)
        self._buf += text
        *lines, self._buf = self._buf.split("\n")
        for line in lines:
            if line.startswith(self._prefix):
                self.reason = line.strip()
        return len(text)

    def flush(self) -> None:
        self._stream.flush()


def run_cli(argv: Sequence[str]) -> None:
    """Run ``lgff <argv>`` in-process (the exact CLI code path) and fail the task on a non-zero exit code, with the
    command's error line first in the exception (what the run reports as the task's failure)."""
    from ..cli import main

    argv = [str(a) for a in argv]
    log.info("running: lgff %s", " ".join(argv))
    tee = _StderrTee(sys.stderr, f"lgff {argv[0]}: " if argv else "lgff")
    with contextlib.redirect_stderr(tee):
        code = main(argv)
    if code != 0:
        reason = f"{tee.reason} " if tee.reason else ""
        raise RuntimeError(f"{reason}(`lgff {' '.join(argv)}` exited with code {code})")


def write_config(config_yaml: str) -> str:
    """Write a task's config slice to a temp YAML file and return its path (for ``--config``)."""
    fd, path = tempfile.mkstemp(prefix="lgff-task-", suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        f.write(config_yaml)
    return path


def write_json_file(path: str, data: Any) -> str:
    """Write JSON to a local file (directories created); returns the path."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True, default=str)
    return path


def dataset_facts(manifest: dict) -> dict[str, Any]:
    """num_rows / num_shards / digest of a (pointer) manifest, for ``artifact.metadata``."""
    facts: dict[str, Any] = {"digest": hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()}
    shards = manifest.get("shards") or []
    if shards:
        facts["num_shards"] = len(shards)
    if "num_rows" in manifest:
        facts["num_rows"] = manifest["num_rows"]
    elif "ntotal" in manifest:
        facts["num_rows"] = manifest["ntotal"]
    elif shards and all("num_rows" in s for s in shards):
        facts["num_rows"] = sum(int(s["num_rows"]) for s in shards)
    return facts


def model_checkpoint_uri(uri: str) -> str:
    """The checkpoint prefix inside a model artifact: a training run's ``best/`` if present, else `uri` itself."""
    best = storage.join(uri, "best")
    if storage.exists(storage.join(best, "model.safetensors")):
        return best
    return uri


def model_facts(uri: str) -> dict[str, Any]:
    """Digest of the checkpoint's weights + sidecar."""
    ckpt = model_checkpoint_uri(uri)
    names = [n for n in ("model.safetensors", "model.json") if storage.exists(storage.join(ckpt, n))]
    h = hashlib.sha256()
    for name in names or sorted(storage.basename(f) for f in storage.list_files(ckpt, recursive=False)):
        h.update(name.encode())
        h.update(hashlib.sha256(storage.read_bytes(storage.join(ckpt, name))).digest())
    return {"checkpoint": ckpt, "digest": h.hexdigest()}


def write_json_artifact(path: str, data: dict[str, Any]) -> None:
    """Materialise a Metrics artifact as a file too: kfp.local treats an output whose path does not exist as a
    cache miss, and kfp only stores Metrics in metadata."""
    write_json_file(path, data)
