"""Helpers that run *inside* a kfp component (in the project image, or in the local venv under kfp.local).

A component body stays a few lines: it turns its artifacts into URIs (`artifact_uri`), writes its config slice to
a file (`write_config`), runs the stage's `lgff` command through the same entry point as the shell
(`run_cli` -> `lgff_core.cli.main`), and records small facts about its outputs in ``artifact.metadata``
(`dataset_facts`, `model_facts`). Facts include a content digest, which enters downstream cache keys.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from typing import Any, Sequence

from . import storage

__all__ = [
    "DIRECT_IO_ENV",
    "artifact_uri",
    "run_cli",
    "write_config",
    "dataset_facts",
    "model_checkpoint_uri",
    "model_facts",
    "write_json_artifact",
]

log = logging.getLogger(__name__)

# Set on every task by the pipelines (config pipeline.direct_artifact_io): read / write remote artifacts at their
# s3:// URI instead of the launcher's local copy, so a task that only needs a manifest or one shard does not depend
# on what the launcher copied into its pod. Local paths (kfp.local) are unaffected. Not tested on a real cluster.
DIRECT_IO_ENV = "LGFF_DIRECT_ARTIFACT_IO"
_REMOTE = ("s3://", "gs://", "minio://")


def artifact_uri(artifact: Any) -> str:
    """Where a task reads / writes an artifact's data.

    kfp.local gives every artifact a local ``.path`` (its URI); on a cluster the launcher also maps remote URIs
    to local paths, but with ``LGFF_DIRECT_ARTIFACT_IO=1`` and a remote ``.uri`` the stage uses that URI through
    `lgff_core.storage` (big data passed as URIs; credentials from the task's AWS_* env).
    """
    uri = getattr(artifact, "uri", "") or ""
    if os.environ.get(DIRECT_IO_ENV) == "1" and uri.startswith(_REMOTE):
        # the launcher uploads the local path of each output after the task: leave it an empty directory
        os.makedirs(artifact.path, exist_ok=True)
        return uri.replace("minio://", "s3://", 1)
    return artifact.path


def run_cli(argv: Sequence[str]) -> None:
    """Run ``lgff <argv>`` in-process (the exact CLI code path) and fail the task on a non-zero exit code."""
    from .cli import main

    argv = [str(a) for a in argv]
    log.info("running: lgff %s", " ".join(argv))
    code = main(argv)
    if code != 0:
        raise RuntimeError(f"`lgff {' '.join(argv)}` exited with code {code}")


def write_config(config_yaml: str) -> str:
    """Write a task's config slice to a temp YAML file and return its path (for ``--config``)."""
    fd, path = tempfile.mkstemp(prefix="lgff-task-", suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        f.write(config_yaml)
    return path


def _digest_files(uri: str, names: Sequence[str] | None = None) -> str:
    """sha256 over (relative name, bytes digest) of the files under `uri` (or only `names`)."""
    h = hashlib.sha256()
    files = sorted(storage.list_files(uri)) if names is None else [storage.join(uri, n) for n in names]
    for f in files:
        rel = f[len(uri):].lstrip("/") if f.startswith(uri) else f
        h.update(rel.encode())
        h.update(hashlib.sha256(storage.read_bytes(f)).digest())
    return h.hexdigest()


def dataset_facts(uri: str) -> dict[str, Any]:
    """num_rows / num_shards / digest of a sharded Parquet dataset (or embeddings) at `uri`.

    The digest hashes the manifest, which already lists every shard's sha256, so it is cheap and content-addressed.
    """
    manifest_uri = storage.join(uri, "_manifest.json")
    if not storage.exists(manifest_uri):
        return {"digest": _digest_files(uri)}
    raw = storage.read_bytes(manifest_uri)
    facts: dict[str, Any] = {"digest": hashlib.sha256(raw).hexdigest()}
    try:
        manifest = json.loads(raw)
    except ValueError:
        return facts
    shards = manifest.get("shards") or []
    facts["num_shards"] = len(shards)
    if "num_rows" in manifest:
        facts["num_rows"] = manifest["num_rows"]
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
    """Digest of the model weights + sidecar, and the training summary if the run wrote one."""
    ckpt = model_checkpoint_uri(uri)
    names = [n for n in ("model.safetensors", "model.json") if storage.exists(storage.join(ckpt, n))]
    facts: dict[str, Any] = {"checkpoint": ckpt, "digest": _digest_files(ckpt, names) if names else _digest_files(uri)}
    return facts


def write_json_artifact(path: str, data: dict[str, Any]) -> None:
    """Materialise a Metrics artifact as a file too: kfp.local treats an output whose path does not exist as a
    cache miss, and kfp only stores Metrics in metadata."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
