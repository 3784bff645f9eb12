"""Issue 13 failure 8: an S3 endpoint that accepts connections and never answers (or refuses them) must make every
stage fail within its configured deadline, with one line on stderr and nothing published.

The endpoint is a socket on 127.0.0.1 that listens and never reads: the kernel completes the TCP handshake from the
backlog, so each request is sent and no byte ever comes back.
"""
from __future__ import annotations

import logging
import os
import socket
import time

import pytest
import yaml

import lgff_core.models as models_pkg
from lgff_core import storage
from lgff_core.cli import main
from lgff_core.config import LGFFConfig, apply_overrides, config_to_dict
from test_reliability import _dataset, _one_line, _tree
from test_train import OVERRIDES
from test_train_support import make_dataset, tiny_build_model

DEADLINE_S = 3.0
LIMITS = ["--set", f"storage.deadline_s={DEADLINE_S}", "--set", "storage.request_timeout_s=1",
          "--set", "storage.connect_timeout_s=1"]
# model loading and data reading happen before the first object-store call
SETUP_SLACK_S = 12.0
TIMINGS: dict[str, float] = {}


@pytest.fixture(autouse=True)
def _restore_storage_limits():
    saved = storage.settings()
    yield
    storage.configure(**{f: getattr(saved, f) for f in saved.__dataclass_fields__})
    # the CLI's log handler writes to this test's captured stderr, which closes with the test
    for handler in list(logging.root.handlers):
        logging.root.removeHandler(handler)


@pytest.fixture(params=["silent", "refusing"])
def endpoint(request, monkeypatch):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    if request.param == "silent":
        sock.listen(128)  # accepts (backlog) and never answers
    else:
        sock.close()  # nothing listens: connections are refused
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    yield request.param
    if request.param == "silent":
        sock.close()


def _run(name, argv, capsys):
    t0 = time.monotonic()
    code = main(argv)
    elapsed = time.monotonic() - t0
    TIMINGS[name] = elapsed
    line = _one_line(capsys.readouterr().err)
    print(f"{name}: exit {code} after {elapsed:.1f} s: {line}")
    return code, elapsed, line


@pytest.fixture
def local_data(tmp_path):
    return _dataset(str(tmp_path / "data"))


def test_prep_to_a_dead_endpoint_fails_within_its_deadline(endpoint, tmp_path, capsys):
    src = _tree(tmp_path / "src", n=2)
    code, elapsed, line = _run(f"prep/{endpoint}", ["prep", "imagefolder", "--src", str(src), "--out",
                                                   "s3://bucket/run/data", "--no-progress"] + LIMITS, capsys)
    assert code == 2 and "s3://bucket/run/data" in line
    assert elapsed < DEADLINE_S * 2 + 2  # lease read + its cleanup, each bounded


def test_embed_to_a_dead_endpoint_fails_within_its_deadline(endpoint, local_data, capsys):
    code, elapsed, line = _run(f"embed/{endpoint}", ["embed", "--baseline", "--data", local_data, "--out",
                                                    "s3://bucket/run/emb", "--set", "embed.image_size=32"] + LIMITS,
                               capsys)
    assert code == 2 and "s3://bucket/run/emb" in line
    assert elapsed < DEADLINE_S + SETUP_SLACK_S


def test_index_build_from_a_dead_endpoint_fails_within_its_deadline(endpoint, tmp_path, capsys):
    code, elapsed, line = _run(f"index build/{endpoint}", ["index", "build", "--embeddings", "s3://bucket/run/emb",
                                                          "--out", str(tmp_path / "idx")] + LIMITS, capsys)
    assert code == 2 and "s3://bucket/run/emb" in line
    assert elapsed < DEADLINE_S + 2
    assert not (tmp_path / "idx").exists() or not os.listdir(tmp_path / "idx")


def test_train_to_a_dead_endpoint_fails_within_its_deadline(endpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(models_pkg, "build_model", tiny_build_model, raising=False)
    data = make_dataset(tmp_path / "data")
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(config_to_dict(apply_overrides(LGFFConfig(), dict(OVERRIDES, **{
        "train.epochs": 1})))))
    code, elapsed, line = _run(f"train/{endpoint}", ["train", "--config", str(cfg), "--data", data, "--out",
                                                    "s3://bucket/run/train", "--resume"] + LIMITS, capsys)
    assert code == 2 and "s3://bucket/run/train" in line
    assert elapsed < DEADLINE_S + SETUP_SLACK_S


def test_cleanup_deletes_are_tried_once(endpoint, monkeypatch):
    storage.configure(deadline_s=DEADLINE_S, request_timeout_s=1, connect_timeout_s=1)
    t0 = time.monotonic()
    with pytest.raises(storage.StorageError):
        storage.delete("s3://bucket/run/part-00000.parquet", retry=False)
    assert time.monotonic() - t0 < 1.5 + 0.5
