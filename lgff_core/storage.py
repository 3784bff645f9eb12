"""One way to read, write, list and atomically publish any URI: local path, ``file://`` or ``s3://bucket/key``.

Built on `pyarrow.fs` (LocalFileSystem / S3FileSystem). S3 settings come from the standard AWS environment
variables: ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (an ``http://`` endpoint selects scheme http, e.g. MinIO
or moto), ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_REGION`` /
``AWS_DEFAULT_REGION``. Credentials are passed to pyarrow and never logged.

Atomicity (STYLE.md 7): on local disk an output is written to a hidden temp file in the target directory and moved
into place with `os.replace`; on S3 the bytes are spooled to a local temp file and uploaded with one PUT (an S3
object appears whole or not at all). Writers of multi-file outputs (datasets) publish their manifest last.

Transient S3 errors are retried twice over: by the AWS SDK's standard retry strategy inside pyarrow
(``max_attempts``) and by a bounded exponential backoff around each high-level operation here.
"""
from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import IO, Callable, Iterator, TypeVar
from urllib.parse import urlparse

import pyarrow.fs as pafs

from .errors import DataError, StorageError

__all__ = [
    "get_filesystem",
    "join",
    "exists",
    "is_dir",
    "read_bytes",
    "write_bytes",
    "read_text",
    "write_text",
    "list_files",
    "delete",
    "open_input_stream",
    "open_input_file",
    "open_output_stream",
    "atomic_output",
    "upload_file",
    "is_local",
    "is_s3",
    "local_path",
    "file_size",
    "basename",
    "resolve",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

# SDK-level retries (per request) and our own per-operation retries with exponential backoff.
S3_SDK_MAX_ATTEMPTS = 5
RETRY_ATTEMPTS = 3
RETRY_BASE_DELAY_S = 0.25
RETRY_MAX_DELAY_S = 4.0

_S3_CACHE: dict[tuple, pafs.S3FileSystem] = {}
_S3_LOCK = threading.Lock()
_LOCAL_FS = pafs.LocalFileSystem()


# ----------------------------------------------------------------------------------------------- URIs


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def is_local(uri: str) -> bool:
    """True for plain paths and ``file://`` URIs."""
    uri = str(uri)
    return "://" not in uri or uri.startswith("file://")


def local_path(uri: str | os.PathLike) -> str:
    """Absolute local path of a local URI (raises `StorageError` for object-store URIs)."""
    uri = str(uri)
    if not is_local(uri):
        raise StorageError(f"{uri}: not a local path")
    if uri.startswith("file://"):
        parsed = urlparse(uri)
        uri = parsed.path if not parsed.netloc else f"/{parsed.netloc}{parsed.path}"
    return os.path.abspath(os.path.expanduser(uri))


def join(uri: str | os.PathLike, *parts: str) -> str:
    """Join path components with ``/`` (for every scheme); keeps the scheme of `uri`."""
    out = str(uri)
    for part in parts:
        part = str(part).strip("/")
        if not part:
            continue
        out = out.rstrip("/") + "/" + part if out else part
    return out


def resolve(base: str | os.PathLike, name: str) -> str:
    """`name` as listed in a manifest at `base`: an absolute URI / path is used as is (pointer manifests of
    pipeline artifacts name bulk files elsewhere), a relative name is joined to `base` (CLI-made datasets)."""
    name = str(name)
    if "://" in name or name.startswith("/"):
        return name
    return join(base, name)


def basename(uri: str) -> str:
    return str(uri).rstrip("/").rsplit("/", 1)[-1]


def _s3_settings() -> dict:
    env = os.environ
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    kwargs: dict = {}
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
        kwargs["scheme"] = parsed.scheme or "https"
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        kwargs["access_key"] = env["AWS_ACCESS_KEY_ID"]
        kwargs["secret_key"] = env["AWS_SECRET_ACCESS_KEY"]
        if env.get("AWS_SESSION_TOKEN"):
            kwargs["session_token"] = env["AWS_SESSION_TOKEN"]
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return kwargs


def _s3_filesystem() -> pafs.S3FileSystem:
    settings = _s3_settings()
    key = tuple(sorted(settings.items()))  # re-created when the environment changes (tests, rotated keys)
    with _S3_LOCK:
        fs = _S3_CACHE.get(key)
        if fs is None:
            log.debug("S3 filesystem: endpoint=%s scheme=%s region=%s",
                      settings.get("endpoint_override", "<aws default>"), settings.get("scheme", "https"),
                      settings.get("region", "<default>"))
            fs = pafs.S3FileSystem(
                **settings,
                retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_SDK_MAX_ATTEMPTS),
                connect_timeout=10,
                request_timeout=60,
            )
            _S3_CACHE[key] = fs
        return fs


def get_filesystem(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path)`` for a URI: local paths are made absolute, ``s3://b/k`` becomes ``b/k``."""
    uri = str(uri)
    if is_local(uri):
        return _LOCAL_FS, local_path(uri)
    if is_s3(uri):
        path = uri[len("s3://"):].rstrip("/")
        if not path:
            raise StorageError(f"{uri}: missing bucket name")
        return _s3_filesystem(), path
    raise StorageError(f"{uri}: unsupported URI scheme (use a local path, file:// or s3://)")


# ----------------------------------------------------------------------------------------------- retries


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if not isinstance(exc, OSError):
        return False
    text = str(exc).lower()
    permanent = ("access denied", "access_denied", "no such bucket", "no_such_bucket", "not found",
                 "invalidaccesskeyid", "signaturedoesnotmatch", "forbidden", "path does not exist")
    return not any(p in text for p in permanent)


def _with_retry(uri: str, what: str, fn: Callable[[], T]) -> T:
    """Run `fn`; retry transient S3 errors with bounded exponential backoff. Errors -> `StorageError`."""
    attempts = RETRY_ATTEMPTS if is_s3(uri) else 1
    for attempt in range(attempts):
        try:
            return fn()
        except StorageError:
            raise
        except FileNotFoundError as exc:
            raise StorageError(f"{uri}: not found ({what})") from exc
        except OSError as exc:
            if attempt + 1 < attempts and _is_transient(exc):
                delay = min(RETRY_MAX_DELAY_S, RETRY_BASE_DELAY_S * (2 ** attempt))
                log.warning("%s %s failed (%s); retry %d/%d in %.2fs", what, uri, exc, attempt + 1,
                            attempts - 1, delay)
                time.sleep(delay)
                continue
            raise StorageError(f"{uri}: cannot {what}: {exc}") from exc
    raise AssertionError("unreachable")  # pragma: no cover


# ----------------------------------------------------------------------------------------------- queries


def _info(uri: str) -> pafs.FileInfo:
    fs, path = get_filesystem(uri)
    return _with_retry(uri, "stat", lambda: fs.get_file_info(path))


def exists(uri: str) -> bool:
    """True when a file (or directory / S3 prefix) exists at `uri`."""
    return _info(str(uri)).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    return _info(str(uri)).type == pafs.FileType.Directory


def file_size(uri: str) -> int:
    info = _info(str(uri))
    if info.type != pafs.FileType.File:
        raise StorageError(f"{uri}: not a file")
    return int(info.size)


def list_files(uri: str, recursive: bool = True) -> list[str]:
    """Sorted URIs of the files under a directory / prefix (empty list when it does not exist)."""
    uri = str(uri).rstrip("/") or str(uri)
    fs, path = get_filesystem(uri)
    selector = pafs.FileSelector(path, recursive=recursive, allow_not_found=True)
    infos = _with_retry(uri, "list", lambda: fs.get_file_info(selector))
    out = []
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(path):].lstrip("/")
        out.append(join(uri, rel))
    return sorted(out)


# ----------------------------------------------------------------------------------------------- reading


def open_input_stream(uri: str):
    """A sequential binary input stream (pyarrow NativeFile; use as a context manager)."""
    fs, path = get_filesystem(uri)
    return _with_retry(str(uri), "open", lambda: fs.open_input_stream(path))


def open_input_file(uri: str):
    """A random-access binary input file (pyarrow NativeFile; what Parquet readers need)."""
    fs, path = get_filesystem(uri)
    return _with_retry(str(uri), "open", lambda: fs.open_input_file(path))


def read_bytes(uri: str) -> bytes:
    fs, path = get_filesystem(uri)

    def _read() -> bytes:
        with fs.open_input_stream(path) as f:
            return f.read()

    return _with_retry(str(uri), "read", _read)


def read_text(uri: str, encoding: str = "utf-8") -> str:
    return read_bytes(uri).decode(encoding)


def read_json(uri: str, error: type[Exception] = DataError):
    """Parsed JSON at `uri`; malformed content raises `error` naming the URI and the parse position."""
    try:
        return json.loads(read_text(uri))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{uri}: not valid JSON ({exc})") from None


# ----------------------------------------------------------------------------------------------- writing


def _make_parent(uri: str) -> None:
    if is_local(uri):
        os.makedirs(os.path.dirname(local_path(uri)) or ".", exist_ok=True)


def open_output_stream(uri: str):
    """A plain (non-atomic) output stream; prefer `atomic_output` for anything a reader may see half-written."""
    _make_parent(uri)
    fs, path = get_filesystem(uri)
    return _with_retry(str(uri), "open for writing", lambda: fs.open_output_stream(path))


def upload_file(local_file: str | os.PathLike, uri: str) -> None:
    """Copy a local file to `uri`: temp + rename locally, one object PUT / multipart upload on S3."""
    uri = str(uri)
    if is_local(uri):
        dest = local_path(uri)
        os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
        tmp = os.path.join(os.path.dirname(dest), f".{os.path.basename(dest)}.tmp-{uuid.uuid4().hex[:12]}")
        try:
            shutil.copyfile(local_file, tmp)
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return
    fs, path = get_filesystem(uri)

    def _put() -> None:
        # One write of the whole (memory-mapped) file: pyarrow's S3 output stream has no abort, and closing it after
        # a partial write (a read error or Ctrl-C between two chunks) would publish a truncated object.
        with open(local_file, "rb") as src:
            if os.fstat(src.fileno()).st_size == 0:
                with fs.open_output_stream(path) as dst:
                    dst.write(b"")
                return
            with mmap.mmap(src.fileno(), 0, access=mmap.ACCESS_READ) as data:
                with fs.open_output_stream(path) as dst:
                    dst.write(data)

    _with_retry(uri, "upload", _put)


@contextlib.contextmanager
def atomic_output(uri: str) -> Iterator[IO[bytes]]:
    """Context manager yielding a binary file; the output appears at `uri` only if the block succeeds.

    Local: a hidden temp file beside the target, fsync'd and `os.replace`d into place.
    S3: a local spool file uploaded in one piece after the block (an object is never visible half-written).
    """
    uri = str(uri)
    if is_local(uri):
        dest = local_path(uri)
        directory = os.path.dirname(dest) or "."
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"{uri}: cannot create directory: {exc}") from exc
        tmp = os.path.join(directory, f".{os.path.basename(dest)}.tmp-{uuid.uuid4().hex[:12]}")
        try:
            with open(tmp, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        except OSError as exc:
            raise StorageError(f"{uri}: cannot write: {exc}") from exc
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return
    get_filesystem(uri)  # validate the URI before doing any work
    with tempfile.TemporaryDirectory(prefix="lgff-upload-") as tmpdir:
        spool = Path(tmpdir) / "object"
        with open(spool, "wb") as f:
            yield f
        upload_file(spool, uri)


def write_bytes(uri: str, data: bytes) -> None:
    """Atomically write `data` to `uri`."""
    uri = str(uri)
    if is_local(uri):
        with atomic_output(uri) as f:
            f.write(data)
        return
    fs, path = get_filesystem(uri)

    def _put() -> None:
        with fs.open_output_stream(path) as dst:
            dst.write(data)

    _with_retry(uri, "write", _put)


def write_text(uri: str, text: str, encoding: str = "utf-8") -> None:
    write_bytes(uri, text.encode(encoding))


def delete(uri: str) -> None:
    """Delete a file, or a directory / prefix with everything under it; a missing target is not an error."""
    uri = str(uri)
    fs, path = get_filesystem(uri)
    info = _info(uri)
    if info.type == pafs.FileType.NotFound:
        return
    if info.type == pafs.FileType.Directory:
        _with_retry(uri, "delete", lambda: fs.delete_dir(path))
    else:
        _with_retry(uri, "delete", lambda: fs.delete_file(path))
