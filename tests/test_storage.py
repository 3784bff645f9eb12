"""lgff_core.storage: URIs, atomic publishing, listing, retries (local disk + a moto S3 endpoint over HTTP)."""
import logging
import os

import pytest

from lgff_core import storage
from lgff_core.errors import StorageError

from s3_server import s3_env  # noqa: F401  (session fixture)


def test_join_and_local_uris(tmp_path):
    assert storage.join("s3://b/p/", "x", "/y.parquet") == "s3://b/p/x/y.parquet"
    assert storage.join(str(tmp_path), "a") == f"{tmp_path}/a"
    assert storage.is_local("file:///tmp/x") and storage.is_local("/tmp/x") and not storage.is_local("s3://b/k")
    assert storage.local_path(f"file://{tmp_path}/a") == f"{tmp_path}/a"
    with pytest.raises(StorageError, match="unsupported URI scheme"):
        storage.get_filesystem("gs://bucket/x")
    with pytest.raises(StorageError, match="not a local path"):
        storage.local_path("s3://b/k")


def test_local_write_read_list_delete(tmp_path):
    uri = f"file://{tmp_path}/d/sub/a.bin"
    storage.write_bytes(uri, b"abc")
    storage.write_text(str(tmp_path / "d" / "b.txt"), "hi")
    assert storage.read_bytes(uri) == b"abc" and storage.exists(uri)
    assert storage.file_size(uri) == 3
    assert storage.list_files(str(tmp_path / "d")) == [f"{tmp_path}/d/b.txt", f"{tmp_path}/d/sub/a.bin"]
    assert storage.list_files(str(tmp_path / "missing")) == []
    storage.delete(str(tmp_path / "d" / "sub"))
    assert not storage.exists(uri)
    storage.delete(uri)  # missing: no error
    with pytest.raises(StorageError, match="not found"):
        storage.read_bytes(uri)


def test_atomic_output_publishes_only_on_success(tmp_path):
    target = tmp_path / "out" / "x.bin"
    with pytest.raises(RuntimeError):
        with storage.atomic_output(str(target)) as f:
            f.write(b"partial")
            raise RuntimeError("killed")
    assert not target.exists()
    assert os.listdir(tmp_path / "out") == []  # temp file removed
    storage.write_bytes(str(target), b"old")
    with storage.atomic_output(str(target)) as f:
        f.write(b"new")
        assert target.read_bytes() == b"old"  # readers see the old version until the block ends
    assert target.read_bytes() == b"new"


def test_retry_wrapper_retries_transient_s3_errors(monkeypatch):
    monkeypatch.setattr(storage, "RETRY_BASE_DELAY_S", 0.0)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError("AWS Error NETWORK_CONNECTION during GetObject operation: connection reset")
        return "ok"

    assert storage._with_retry("s3://b/k", "read", flaky) == "ok" and len(calls) == 3
    calls.clear()

    def always():
        calls.append(1)
        raise OSError("AWS Error SLOW_DOWN")

    with pytest.raises(StorageError, match="cannot read"):
        storage._with_retry("s3://b/k", "read", always)
    assert len(calls) == storage.RETRY_ATTEMPTS  # bounded
    calls.clear()

    def denied():
        calls.append(1)
        raise OSError("AWS Error ACCESS_DENIED during PutObject")

    with pytest.raises(StorageError):
        storage._with_retry("s3://b/k", "write", denied)
    assert len(calls) == 1  # permanent errors are not retried


def test_s3_settings_from_env(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio.local:9000")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3only.local:9001")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDSECRETLOOKING")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "supersecretvalue")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    s = storage._s3_settings()
    assert s["endpoint_override"] == "s3only.local:9001" and s["scheme"] == "http"  # service-specific wins
    assert s["region"] == "eu-west-1" and s["access_key"] == "AKIDSECRETLOOKING"
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    assert storage._s3_settings()["endpoint_override"] == "minio.local:9000"


def test_s3_roundtrip_over_http(s3_env, caplog):
    caplog.set_level(logging.DEBUG)
    prefix = s3_env.new_prefix("store")
    storage.write_bytes(storage.join(prefix, "a.bin"), b"\x00\x01payload")
    with storage.atomic_output(storage.join(prefix, "deep", "b.bin")) as f:
        f.write(b"b" * 1000)
    with pytest.raises(RuntimeError):
        with storage.atomic_output(storage.join(prefix, "never.bin")) as f:
            f.write(b"x")
            raise RuntimeError("boom")
    assert storage.read_bytes(storage.join(prefix, "a.bin")) == b"\x00\x01payload"
    assert storage.list_files(prefix) == [storage.join(prefix, "a.bin"), storage.join(prefix, "deep/b.bin")]
    assert storage.exists(storage.join(prefix, "deep/b.bin")) and not storage.exists(storage.join(prefix, "never.bin"))
    with storage.open_input_file(storage.join(prefix, "deep/b.bin")) as f:
        f.seek(990)
        assert f.read() == b"b" * 10
    storage.delete(storage.join(prefix, "a.bin"))
    assert storage.list_files(prefix) == [storage.join(prefix, "deep/b.bin")]
    with pytest.raises(StorageError, match="not found"):
        storage.read_bytes(storage.join(prefix, "a.bin"))
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    assert secret not in caplog.text


def test_interrupted_s3_upload_never_leaves_a_truncated_object(s3_env, tmp_path, monkeypatch):
    # pyarrow's S3 output stream has no abort: closing it after a partial write (an error or Ctrl-C arriving
    # between two writes) publishes the truncated object. An upload must hand the whole file over in one write.
    payload = os.urandom((11 << 20) + 12345)  # more than one S3 upload part (10 MB)
    src = tmp_path / "spool.bin"
    src.write_bytes(payload)
    uri = storage.join(s3_env.new_prefix("upload"), "part-00000.parquet")
    real_get_filesystem = storage.get_filesystem

    class InterruptedBetweenWrites:
        def __init__(self, stream):
            self.stream, self.writes = stream, 0

        def write(self, data):
            if self.writes == 1:
                raise RuntimeError("interrupted between two writes")
            self.writes += 1
            return self.stream.write(data)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.stream.__exit__(*exc)

    class FS:
        def __init__(self, fs):
            self.fs = fs

        def open_output_stream(self, path):
            return InterruptedBetweenWrites(self.fs.open_output_stream(path))

    def flaky_get_filesystem(u):
        fs, path = real_get_filesystem(u)
        return FS(fs), path

    monkeypatch.setattr(storage, "get_filesystem", flaky_get_filesystem)
    try:
        storage.upload_file(src, uri)
    except RuntimeError:
        pass
    monkeypatch.setattr(storage, "get_filesystem", real_get_filesystem)
    assert not storage.exists(uri) or storage.read_bytes(uri) == payload
    # the real path still round-trips, including an empty file
    storage.upload_file(src, uri)
    assert storage.read_bytes(uri) == payload
    (tmp_path / "empty.bin").write_bytes(b"")
    storage.upload_file(tmp_path / "empty.bin", uri)
    assert storage.read_bytes(uri) == b""
