"""The in-task half of the launcher-contract runner: what KFP v2's launcher does inside a task's pod.

Run as ``python3 shim.py LAUNCH.json`` in the task's container (or sandbox). Standard library + pyarrow only
(both are in the project image). Steps, in the launcher's order (``launcher_v2.go``: ``execute`` then
``uploadOutputArtifacts``):

1. download every input artifact (every artifact of a list, so ``Collected`` inputs too) from its URI to its local
   path: a single object to a file, or every object under ``<key>/`` to the same relative path under a directory.
   Object-store sessions as ``downloadArtifacts`` / ``fetchNonDefaultBuckets`` open them: the default bucket is the
   run's root ``<pipeline root>/<pipeline name>/<run id>``; an artifact outside it needs a session for its bucket,
   and such sessions are opened only for the *first* artifact of each input list, so a later artifact of a list
   outside the run's root whose bucket no first artifact opened fails the task before its command starts;
2. create the parent directories of the output artifacts' local paths, output parameter files and the executor
   output file;
3. run the already-substituted command with the user environment (the launcher's own ``KFP_LAUNCHER_*`` object-store
   settings are removed first, so the user code sees only what the task spec gives it);
4. on success: read the executor output file (if written), merge each output artifact's ``uri`` / ``metadata`` /
   ``custom_path`` from it, upload each output's local path (file, or directory recursively; a missing path is
   skipped, as the launcher allows) and read output parameter files not already in the executor output.

The last stdout line is ``KFP_RUNNER_RESULT <json>`` (bytes moved, seconds, the executor output, raw parameter texts).
URI -> local path follows ``LocalPathForURI``: ``s3://b/k`` -> ``/s3/b/k``, ``minio://b/k`` -> ``/minio/b/k``, both
under ``mount_root`` (empty in a container; the sandbox directory under the subprocess executor, where a generated
``sitecustomize`` moves the kfp SDK's mount prefixes to the same place).
"""
from __future__ import annotations

import json
import os
import posixpath
import re
import subprocess
import sys
import time

RESULT_MARKER = "KFP_RUNNER_RESULT "
LAUNCHER_ENV_PREFIX = "KFP_LAUNCHER_"
MOUNT_ROOT_ENV = "KFP_RUNNER_MOUNT_ROOT"
_SCHEMES = {"s3://": "/s3/", "minio://": "/minio/"}
_CHUNK = 8 << 20
# objectstore/config.go bucketPattern and the schemes ParseBucketPathToConfig accepts
_BUCKET_PATTERN = re.compile(r"(^[a-z][a-z0-9]+:///?)([^/?]+)(/[^?]*)?(\?.+)?$")
_BUCKET_SCHEMES = ("gs://", "s3://", "minio://", "mem://")

# Loaded by every Python process of a sandboxed task (PYTHONPATH): the kfp SDK derives `Artifact.path` from the URI
# with fixed prefixes (/s3/, /minio/, /gcs/); rebase them under the sandbox so the SDK sees the launcher's copies.
SITECUSTOMIZE = f'''import os
_root = os.environ.get("{MOUNT_ROOT_ENV}")
if _root:
    try:
        from kfp.dsl.types import artifact_types as _t
    except ImportError:
        pass
    else:
        for _name in ("_S3_LOCAL_MOUNT_PREFIX", "_MINIO_LOCAL_MOUNT_PREFIX", "_GCS_LOCAL_MOUNT_PREFIX"):
            if not getattr(_t, _name).startswith(_root):
                setattr(_t, _name, _root + getattr(_t, _name))
'''


def split_uri(uri: str) -> tuple[str, str, str]:
    """``(scheme, bucket, key)`` of an ``s3://`` / ``minio://`` URI; ValueError for anything else."""
    for scheme in _SCHEMES:
        if uri.startswith(scheme):
            bucket, _, key = uri[len(scheme):].partition("/")
            if not bucket:
                break
            return scheme, bucket, key.rstrip("/")
    raise ValueError(f"artifact URI {uri!r}: the runner handles s3:// and minio:// URIs only")


def local_path_for_uri(uri: str, mount_root: str = "") -> str:
    scheme, bucket, key = split_uri(uri)
    return mount_root + _SCHEMES[scheme] + bucket + ("/" + key if key else "")


class LauncherError(RuntimeError):
    """The launcher fails the task before its command runs."""


def prefixed_bucket(path: str, with_prefix: bool = True) -> str:
    """``Config.PrefixedBucket()`` of ``ParseBucketPathToConfig(path)`` (scheme + bucket + prefix, path-cleaned), or
    with `with_prefix` False of ``ParseBucketConfigForArtifactURI(path)`` (scheme + bucket: the session key)."""
    m = _BUCKET_PATTERN.match(path)
    if not m or m.group(1) not in _BUCKET_SCHEMES:
        raise LauncherError(f"parse bucket config failed: unsupported Cloud bucket: {path!r}")
    scheme, bucket, prefix = m.group(1), m.group(2), (m.group(3) or "").lstrip("/") if with_prefix else ""
    return scheme + posixpath.normpath(posixpath.join(bucket, prefix))


def bucket_sessions(downloads: list[dict], default_bucket: str) -> set[str]:
    """``fetchNonDefaultBuckets``: the session keys opened besides the default bucket's, one per input list, from
    the list's first artifact only."""
    first: dict[str, str] = {}
    for item in downloads:
        first.setdefault(item["name"], item["uri"])
    return {prefixed_bucket(uri, with_prefix=False) for uri in first.values()
            if not uri.startswith("oci://") and not uri.startswith(default_bucket)}


def check_bucket(name: str, uri: str, default_bucket: str, sessions: set[str]) -> None:
    """``downloadArtifacts``: an artifact outside the default bucket needs an opened session for its bucket."""
    if uri.startswith(default_bucket):
        return
    key = prefixed_bucket(uri, with_prefix=False)
    if key not in sessions:  # Go formats the nil error it wraps with %w as %!w(<nil>)
        raise LauncherError(f"failed to get bucket when downloading input artifact {name} with bucket key {key}: "
                            "%!w(<nil>)")


def _filesystem():
    from pyarrow import fs as pafs

    endpoint = os.environ.get(LAUNCHER_ENV_PREFIX + "S3_ENDPOINT", "")
    kwargs = {"region": os.environ.get(LAUNCHER_ENV_PREFIX + "S3_REGION") or "us-east-1"}
    if endpoint:
        scheme, _, netloc = endpoint.partition("://")
        kwargs.update(endpoint_override=netloc.rstrip("/"), scheme=scheme)
    if os.environ.get(LAUNCHER_ENV_PREFIX + "S3_ACCESS_KEY"):
        kwargs.update(access_key=os.environ[LAUNCHER_ENV_PREFIX + "S3_ACCESS_KEY"],
                      secret_key=os.environ[LAUNCHER_ENV_PREFIX + "S3_SECRET_KEY"])
    return pafs, pafs.S3FileSystem(**kwargs)


def _copy(src, dst) -> int:
    n = 0
    while True:
        chunk = src.read(_CHUNK)
        if not chunk:
            return n
        dst.write(chunk)
        n += len(chunk)


def download(pafs, fs, uri: str, local: str) -> int:
    """Every object at ``key`` or under ``key/`` -> ``local`` (same relative layout); returns bytes copied."""
    _, bucket, key = split_uri(uri)
    base = f"{bucket}/{key}"
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.File:
        files = [info]
    elif info.type == pafs.FileType.Directory:
        files = [f for f in fs.get_file_info(pafs.FileSelector(base, recursive=True)) if f.type == pafs.FileType.File]
    else:
        return 0  # nothing stored at the URI: the launcher downloads nothing and does not fail
    total = 0
    for f in files:
        rel = os.path.relpath(f.path, base) if f.path != base else "."
        if ".." in rel.split("/"):
            raise ValueError(f"object key {f.path!r} escapes {base!r}")
        target = os.path.normpath(os.path.join(local, rel))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with fs.open_input_stream(f.path) as src, open(target, "wb") as dst:
            total += _copy(src, dst)
    return total


def upload(fs, local: str, uri: str) -> int:
    """``local`` (a file, or a directory recursively) -> ``uri``; returns bytes copied, 0 if ``local`` is absent."""
    _, bucket, key = split_uri(uri)
    if os.path.isfile(local):
        pairs = [(local, key)]
    elif os.path.isdir(local):
        pairs = []
        for dirpath, _, names in os.walk(local):
            for name in sorted(names):
                path = os.path.join(dirpath, name)
                pairs.append((path, key + "/" + os.path.relpath(path, local).replace(os.sep, "/")))
    else:
        print(f"[launcher] output path {local} does not exist: nothing uploaded to {uri}", file=sys.stderr)
        return 0
    total = 0
    for path, object_key in pairs:
        with open(path, "rb") as src, fs.open_output_stream(f"{bucket}/{object_key}") as dst:
            total += _copy(src, dst)
    return total


def _install_sitecustomize(mount_root: str, env: dict) -> None:
    site_dir = os.path.join(mount_root, ".launcher-site")
    os.makedirs(site_dir, exist_ok=True)
    with open(os.path.join(site_dir, "sitecustomize.py"), "w") as f:
        f.write(SITECUSTOMIZE)
    env[MOUNT_ROOT_ENV] = mount_root
    env["PYTHONPATH"] = os.pathsep.join(p for p in (site_dir, env.get("PYTHONPATH", "")) if p)


def main(spec_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    root = spec["mount_root"]
    pafs, fs = _filesystem()
    result = {"bytes_downloaded": 0, "bytes_uploaded": 0}

    t0 = time.monotonic()
    default_bucket = prefixed_bucket(spec["run_root"])
    try:
        sessions = bucket_sessions(spec["downloads"], default_bucket)
        for item in spec["downloads"]:
            check_bucket(item["name"], item["uri"], default_bucket, sessions)
            result["bytes_downloaded"] += download(pafs, fs, item["uri"], local_path_for_uri(item["uri"], root))
    except LauncherError as exc:
        print(f"[launcher] failed to execute component: {exc}", file=sys.stderr, flush=True)
        result.update(returncode=1, launcher_error=str(exc), seconds_download=time.monotonic() - t0,
                      executor_output={}, parameter_texts={}, output_artifacts={}, seconds_upload=0.0)
        print("\n" + RESULT_MARKER + json.dumps(result), flush=True)
        return 0
    outputs = spec["output_artifacts"]  # name -> runtime artifact (uri, metadata, ...)
    dirs = [os.path.dirname(local_path_for_uri(a["uri"], root)) for a in outputs.values()]
    dirs += [os.path.dirname(p) for p in spec["output_parameter_files"].values()]
    dirs.append(os.path.dirname(spec["output_file"]))
    for d in dirs:
        os.makedirs(d, exist_ok=True)

    t1 = time.monotonic()
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_ENV_PREFIX)}
    if root:
        _install_sitecustomize(root, env)
    sys.stdout.flush()
    rc = subprocess.call(spec["command"], env=env)
    t2 = time.monotonic()
    result.update(returncode=rc, seconds_download=t1 - t0, seconds_run=t2 - t1, executor_output={},
                  parameter_texts={}, output_artifacts={})
    if rc == 0:
        if os.path.exists(spec["output_file"]):
            with open(spec["output_file"]) as f:
                result["executor_output"] = json.load(f)
        produced = result["executor_output"].get("artifacts", {})
        for name, artifact in outputs.items():
            merged = dict(artifact, metadata=dict(artifact.get("metadata") or {}))
            reported = (produced.get(name) or {}).get("artifacts") or [{}]
            merged["uri"] = reported[0].get("uri") or merged["uri"]
            merged["metadata"].update(reported[0].get("metadata") or {})
            custom = reported[0].get("custom_path") or reported[0].get("customPath")
            local = custom or local_path_for_uri(merged["uri"], root)
            result["bytes_uploaded"] += upload(fs, local, merged["uri"])
            result["output_artifacts"][name] = merged
        given = result["executor_output"].get("parameterValues", {})
        for name, path in spec["output_parameter_files"].items():
            if name not in given and os.path.exists(path):
                with open(path) as f:
                    result["parameter_texts"][name] = f.read()
    result["seconds_upload"] = time.monotonic() - t2
    print("\n" + RESULT_MARKER + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
