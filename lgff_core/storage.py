"""One way to read, write, list and atomically publish any URI: local path, ``file://`` or ``s3://bucket/key``.

Built on `pyarrow.fs` (LocalFileSystem / S3FileSystem). S3 settings come from the standard AWS environment
variables: ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (an ``http://`` endpoint selects scheme http, e.g. MinIO
or moto), ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_REGION`` /
``AWS_DEFAULT_REGION``. Credentials are passed to pyarrow and never logged.

Atomicity (STYLE.md 7): on local disk an output is written to a hidden temp file in the target directory and moved
into place with `os.replace`; on S3 the bytes are spooled to a local temp file and uploaded with one PUT (an S3
object appears whole or not at all). Writers of multi-file outputs (datasets) publish their manifest last.

Bounded object-store calls: every S3 request has a connect timeout and a read (low-speed) timeout, and every
high-level operation here (stat, list, read, write, upload, delete) has a total deadline; transient errors are
retried with jittered exponential backoff only while the deadline leaves room for another attempt, so an endpoint
that accepts connections and never answers fails the operation within its deadline with one `StorageError` line.
Cleanup deletes after a failure are tried once (``retry=False``). Settings: `configure` (the CLI passes the config's
``storage`` section; `StorageSettings` holds the defaults).

One writer per output prefix: `lease(prefix)` takes ``<prefix>/_lease.json`` (owner, host, pid, heartbeat, expiry)
before writing, renews it from a heartbeat thread, and `Lease.check()` confirms ownership before publishing. Local
disk takes it with an exclusive create; on S3 (no conditional put in pyarrow) the lease is written, then read back
after a settle delay, and the later writer of a race sees the other's lease and backs off.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import mmap
import os
import random
import shutil
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import IO, Any, Callable, Iterator, TypeVar
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
    "stream_sha256",
    "download_file",
    "StorageSettings",
    "configure",
    "settings",
    "Lease",
    "lease",
    "LEASE_NAME",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Our per-operation retries (jittered exponential backoff, never past the operation's deadline). The SDK makes one
# attempt per request: retries hidden inside a call (with the SDK's own backoff) would break the deadline and make
# a one-shot cleanup delete take minutes again. A transient error in the middle of a streaming read therefore fails
# the stage, which the pipeline's task retries cover.
S3_SDK_MAX_ATTEMPTS = 1
RETRY_ATTEMPTS = 3
RETRY_BASE_DELAY_S = 0.25
RETRY_MAX_DELAY_S = 4.0


@dataclasses.dataclass(frozen=True)
class StorageSettings:
    """Object-store limits (the config's ``storage`` section)."""

    connect_timeout_s: float = 5.0
    # a request that receives nothing for this long fails (curl low-speed timeout: also bounds a silent endpoint)
    request_timeout_s: float = 30.0
    # total time of one high-level operation, retries included
    deadline_s: float = 120.0
    retries: int = RETRY_ATTEMPTS
    # writer lease of an output prefix: expiry without heartbeat, and how long a second writer waits for it
    lease_ttl_s: float = 60.0
    lease_wait_s: float = 0.0


_SETTINGS = StorageSettings()


def configure(**kwargs) -> StorageSettings:
    """Replace the object-store limits (keys of `StorageSettings`); returns the new settings."""
    global _SETTINGS
    known = {f.name for f in dataclasses.fields(StorageSettings)}
    new = dataclasses.replace(_SETTINGS, **{k: v for k, v in kwargs.items() if k in known})
    if new.deadline_s <= 0 or new.request_timeout_s <= 0 or new.connect_timeout_s <= 0 or new.retries < 1:
        raise StorageError(f"storage settings must be positive (got {new})")
    _SETTINGS = new
    return new


def settings() -> StorageSettings:
    return _SETTINGS


def _request_timeout(limits: StorageSettings) -> float:
    """Per-request timeout: the configured one, shortened so the SDK's attempts fit in one deadline."""
    return min(limits.request_timeout_s, limits.deadline_s / S3_SDK_MAX_ATTEMPTS)

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
    limits = _SETTINGS
    # per request: never longer than the whole operation may take
    request_timeout = _request_timeout(limits)
    connect_timeout = min(limits.connect_timeout_s, limits.deadline_s)
    # re-created when the environment or the limits change (tests, rotated keys)
    key = tuple(sorted(settings.items())) + (request_timeout, connect_timeout)
    with _S3_LOCK:
        fs = _S3_CACHE.get(key)
        if fs is None:
            log.debug("S3 filesystem: endpoint=%s scheme=%s region=%s",
                      settings.get("endpoint_override", "<aws default>"), settings.get("scheme", "https"),
                      settings.get("region", "<default>"))
            fs = pafs.S3FileSystem(
                **settings,
                retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_SDK_MAX_ATTEMPTS),
                connect_timeout=connect_timeout,
                request_timeout=request_timeout,
                # small objects (manifests, markers, leases) go up in one PUT: no multipart upload to leave behind
                allow_delayed_open=True,
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


def _backoff(attempt: int) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(max, base * 2**attempt)]."""
    return random.uniform(0.0, min(RETRY_MAX_DELAY_S, RETRY_BASE_DELAY_S * (2 ** attempt)))


def _with_retry(uri: str, what: str, fn: Callable[[], T], retry: bool = True) -> T:
    """Run `fn`; retry transient S3 errors with jittered backoff within the operation deadline.

    Errors become one-line `StorageError`s; ``retry=False`` makes one attempt (cleanup after a failure).
    """
    remote = is_s3(uri)
    limits = _SETTINGS
    attempts = max(RETRY_ATTEMPTS, limits.retries) if remote and retry else 1
    start = time.monotonic()
    for attempt in range(attempts):
        try:
            return fn()
        except StorageError:
            raise
        except FileNotFoundError as exc:
            raise StorageError(f"{uri}: not found ({what})") from exc
        except OSError as exc:
            elapsed = time.monotonic() - start
            reason = " ".join(str(exc).split())[:300]
            if remote and elapsed >= limits.deadline_s:
                raise StorageError(f"{uri}: cannot {what}: deadline of {limits.deadline_s:g} s exceeded after "
                                   f"{attempt + 1} attempt(s) ({reason})") from None
            delay = _backoff(attempt)
            # another attempt only if it can still finish (one request timeout) inside the deadline
            room = limits.deadline_s - elapsed - delay - S3_SDK_MAX_ATTEMPTS * _request_timeout(limits)
            if attempt + 1 < attempts and _is_transient(exc) and room > 0:
                log.warning("%s %s failed (%s); retry %d/%d in %.2fs", what, uri, reason, attempt + 1,
                            attempts - 1, delay)
                time.sleep(delay)
                continue
            raise StorageError(f"{uri}: cannot {what}: {reason}") from None
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


_STREAM_CHUNK = 8 << 20


def stream_sha256(uri: str | os.PathLike) -> tuple[str, int]:
    """(sha256 hex digest, size in bytes) of the file at `uri`, read as a stream (memory: one chunk)."""
    h = hashlib.sha256()
    size = 0
    with open_input_stream(str(uri)) as f:
        while chunk := f.read(_STREAM_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def download_file(uri: str, local_file: str | os.PathLike) -> None:
    """Copy the object at `uri` to the local file `local_file`, streamed (the reverse of `upload_file`)."""
    with open_input_stream(uri) as f, open(local_file, "wb") as out:
        while chunk := f.read(_STREAM_CHUNK):
            out.write(chunk)


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


def delete(uri: str, retry: bool = True) -> None:
    """Delete a file, or a directory / prefix with everything under it; a missing target is not an error.

    ``retry=False``: one attempt per call (cleanup after a failure must not spend minutes on a dead endpoint).
    """
    uri = str(uri)
    fs, path = get_filesystem(uri)
    info = _with_retry(uri, "stat", lambda: fs.get_file_info(path), retry=retry)
    if info.type == pafs.FileType.NotFound:
        return
    if info.type == pafs.FileType.Directory:
        _with_retry(uri, "delete", lambda: fs.delete_dir(path), retry=retry)
    else:
        _with_retry(uri, "delete", lambda: fs.delete_file(path), retry=retry)


# ----------------------------------------------------------------------------------------------- lease

LEASE_NAME = "_lease.json"
LEASE_S3_SETTLE_S = 1.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    """One writer per prefix (see the module docstring). Use through `lease(...)`."""

    def __init__(self, prefix: str, owner: str, ttl_s: float):
        self.prefix = str(prefix).rstrip("/")
        self.uri = join(self.prefix, LEASE_NAME)
        self.ttl_s = float(ttl_s)
        self.record = {"owner": owner, "host": socket.gethostname(), "pid": os.getpid(),
                       "token": uuid.uuid4().hex}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._made_dir: str | None = None
        self.lost: str | None = None

    def _body(self) -> bytes:
        now = time.time()
        return json.dumps(dict(self.record, heartbeat=now, expires=now + self.ttl_s), sort_keys=True).encode()

    def _read_record(self) -> tuple[dict | None, str | None]:
        """(record, None) for a well-formed lease, (None, None) when there is none, (None, what is wrong) for a
        corrupt one. An unreachable store is a `StorageError`: nobody can take a lease they cannot read."""
        fs, path = get_filesystem(self.uri)

        def _read() -> bytes | None:
            try:
                with fs.open_input_stream(path) as f:
                    return f.read()
            except FileNotFoundError:
                return None

        raw = _with_retry(self.uri, "read", _read)
        if raw is None:
            return None, None
        try:
            data = json.loads(raw)
        except ValueError:
            return None, "not valid JSON"
        problem = _lease_record_problem(data)
        return (data, None) if problem is None else (None, problem)

    def holder(self) -> dict | None:
        """The current lease record, or None when there is none or it is corrupt (unreadable, or a field of the
        wrong type): a record no writer of ours can have written holds nothing."""
        return self._read_record()[0]

    def _stale(self, rec: dict) -> bool:
        if rec["expires"] < time.time():
            return True
        # a writer on this host that died without releasing (SIGKILL) does not hold its lease until expiry
        return rec["host"] == socket.gethostname() and not _pid_alive(rec["pid"])

    def _create_local(self, path: str) -> bool:
        """Create the lease file with its whole body in one step (False: it exists): the body goes to a private
        file that is hard-linked into place, so no reader ever sees a half-written lease."""
        # hidden name (listings skip dot files), unique to this taker
        tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{self.record['token']}")
        with open(tmp, "wb") as f:
            f.write(self._body())
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: exclusive create, then write
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(self._body())
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def _try_take(self) -> bool:
        if is_local(self.uri):
            path = local_path(self.uri)
            if not os.path.isdir(os.path.dirname(path)):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                self._made_dir = os.path.dirname(path)  # removed on release if the writer left it empty
            if self._create_local(path):
                return True
            rec, problem = self._read_record()
            if rec is None or self._stale(rec):
                # take over a stale or corrupt lease: rename it away atomically so two takers cannot both win
                grave = f"{path}.stale-{uuid.uuid4().hex[:8]}"
                try:
                    os.replace(path, grave)
                except FileNotFoundError:
                    return False
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(grave)
                log.warning("%s: taking over %s", self.prefix, _stale_description(rec, problem))
                return self._try_take()
            return False
        rec, problem = self._read_record()
        if problem is not None:
            log.warning("%s: taking over %s", self.prefix, _stale_description(rec, problem))
        if rec is not None and rec.get("token") != self.record["token"] and not self._stale(rec):
            return False
        write_bytes(self.uri, self._body())
        time.sleep(LEASE_S3_SETTLE_S)  # a concurrent taker's PUT lands in this window; the last PUT wins
        rec = self.holder()
        return rec is not None and rec.get("token") == self.record["token"]

    def acquire(self, wait_s: float = 0.0) -> "Lease":
        deadline = time.monotonic() + max(0.0, wait_s)
        while not self._try_take():
            if time.monotonic() >= deadline:
                raise StorageError(f"{self.prefix}: another writer holds it ({_describe(self.holder())}); "
                                   f"wait for it to finish or choose another output")
            time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))
        self._thread = threading.Thread(target=self._heartbeat, name="lgff-lease", daemon=True)
        self._thread.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                rec = self.holder()
                if rec is None or rec.get("token") != self.record["token"]:
                    self.lost = f"taken over by {_describe(rec)}"
                    return
                write_bytes(self.uri, self._body())
            except StorageError as exc:  # the next check() reports it if the lease really expired
                log.warning("%s: lease heartbeat failed: %s", self.prefix, exc)

    def check(self) -> None:
        """Raise `StorageError` unless this process still holds the lease (call before publishing)."""
        rec = self.holder()  # an unreachable store raises: nothing is published without a confirmed lease
        if self.lost or rec is None or rec.get("token") != self.record["token"]:
            raise StorageError(f"{self.prefix}: lost the writer lease ({self.lost or _describe(rec)}); "
                               "nothing published")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(StorageError):  # an expired lease is as good as released
            rec = self.holder()
            if rec is not None and rec.get("token") == self.record["token"]:
                delete(self.uri, retry=False)
        if self._made_dir is not None:
            with contextlib.suppress(OSError):
                os.rmdir(self._made_dir)  # only succeeds when empty: a failed run leaves no trace


# the fields every lease record has (`Lease._body`), and their JSON types
_LEASE_FIELDS = {"owner": (str,), "host": (str,), "pid": (int,), "token": (str,), "heartbeat": (int, float),
                 "expires": (int, float)}


def _lease_record_problem(data: Any) -> str | None:
    """What makes `data` not a lease record (None when it is one)."""
    if not isinstance(data, dict):
        return f"a JSON {type(data).__name__}, not an object"
    for name, types_ in _LEASE_FIELDS.items():
        value = data.get(name)
        if isinstance(value, bool) or not isinstance(value, types_):
            expected = "a number" if float in types_ else ("an integer" if int in types_ else "a string")
            return f"{name} is {value!r}, expected {expected}" if name in data else f"no {name}"
    return None


def _stale_description(rec: dict | None, problem: str | None) -> str:
    if problem is not None:
        return f"a corrupt lease ({problem}), as a stale one"
    return f"a stale lease of {_describe(rec)}"


def _describe(rec: dict | None) -> str:
    if not rec:
        return "holder unknown"
    age = time.time() - float(rec.get("heartbeat", 0))
    return (f"{rec.get('owner', '?')} on host {rec.get('host', '?')} pid {rec.get('pid', '?')}, "
            f"heartbeat {age:.0f} s ago")


@contextlib.contextmanager
def lease(prefix: str, owner: str, wait_s: float | None = None, ttl_s: float | None = None) -> Iterator[Lease]:
    """Hold the writer lease of `prefix` for the block; a second writer waits up to `wait_s` (default
    ``settings().lease_wait_s``), then fails naming the holder."""
    limits = _SETTINGS
    held = Lease(prefix, owner, limits.lease_ttl_s if ttl_s is None else ttl_s).acquire(
        limits.lease_wait_s if wait_s is None else wait_s)
    try:
        yield held
    finally:
        held.release()
