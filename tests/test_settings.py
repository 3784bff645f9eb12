"""Every setting is checked once, with its range, whatever it came from (file, --set, a flag standing for it, a
strategy stage), and bad values are one line naming the key, exit 2; corrupt lease files and id files are input
errors too (issue 19, failure 15)."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import typing

import numpy as np
import pytest

from lgff_core import storage
from lgff_core.cli import main
from lgff_core.config import BOUNDS, ConfigError, LGFFConfig, load_config
from lgff_core.data.embeddings import EmbeddingTable, write_embeddings


def _one_line(err: str) -> str:
    """The CLI's error line (exactly one, no traceback); log lines around it are allowed."""
    lines = [line for line in err.splitlines() if line.startswith("lgff ")]
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("setting, message", [
    ("embed.batch_size=0", "config key embed.batch_size: must be >= 1 (got 0)"),
    ("embed.batch_size=-4", "config key embed.batch_size: must be >= 1 (got -4)"),
    ("embed.image_size=0", "config key embed.image_size: must be >= 1 (got 0)"),
    ("train.image_size=0", "config key train.image_size: must be >= 1 (got 0)"),
    ("train.image_size=-224", "config key train.image_size: must be >= 1 (got -224)"),
    ("evaluate.ks=[0,-1]", "config key evaluate.ks[0]: must be in [1, 10000] (got 0)"),
    ("evaluate.ks=[1,-1]", "config key evaluate.ks[1]: must be in [1, 10000] (got -1)"),
    ("evaluate.ks=[]", "config key evaluate.ks: must not be empty"),
    ("train.lr=0", "config key train.lr: must be > 0 (got 0)"),
    ("train.augment.hflip=1.5", "config key train.augment.hflip: must be in [0, 1] (got 1.5)"),
    ("index.nprobe=0", "config key index.nprobe: must be >= 1 (got 0)"),
    ("pipeline.rows_per_task=0", "config key pipeline.rows_per_task: must be >= 1 (got 0)"),
    ("pipeline.max_parallel=-1", "config key pipeline.max_parallel: must be >= 0 (got -1)"),
    ("explain.ratio_channels=0", "config key explain.ratio_channels: must be in (0, 1] (got 0)"),
    ("serve.model_name=", "config key serve.model_name: must not be empty"),
    ("embed.bf16=maybe", "config key embed.bf16: expected true, false or auto (got 'maybe')"),
])
def test_a_setting_out_of_range_is_one_line_naming_the_key(setting, message):
    with pytest.raises(ConfigError) as exc:
        load_config("lgffem_cpu", [setting])
    assert str(exc.value) == f"--set: {message}"


@pytest.mark.parametrize("command", [
    ["embed", "--data", "DATA", "--baseline", "gem-last", "--out", "OUT", "--set", "embed.batch_size=0"],
    ["embed", "--data", "DATA", "--baseline", "gem-last", "--out", "OUT", "--set", "embed.image_size=0"],
    ["train", "--data", "DATA", "--out", "OUT", "--set", "train.image_size=0"],
    ["evaluate", "retrieval", "--embeddings", "EMB", "--out", "OUT", "--set", "evaluate.ks=[0,-1]"],
])
def test_commands_refuse_a_bad_setting_before_any_work(tmp_path, capsys, command):
    """Before: tracebacks (batch / image sizes) and "k=0 but only 12 neighbours" (ks) after the data was read."""
    argv = [str(tmp_path / a) if a in ("DATA", "OUT", "EMB") else a for a in command]
    assert main(argv) == 2
    key = command[-1].split("=")[0]
    line = _one_line(capsys.readouterr().err)
    assert f"config key {key}" in line and "must be" in line, line
    assert not (tmp_path / "OUT").exists()


def test_values_are_checked_once_after_merging(tmp_path):
    """A file's value that --set replaces is not judged alone; a bad file value names the file."""
    path = tmp_path / "c.yaml"
    path.write_text("base: lgffem_cpu\nembed:\n  batch_size: 0\n")
    assert load_config(path, ["embed.batch_size=8"]).embed.batch_size == 8
    with pytest.raises(ConfigError, match=rf"^{path}: config key embed.batch_size: must be >= 1 \(got 0\)$"):
        load_config(path)
    # a strategy stage's override fails at load, not when training reaches the stage
    path.write_text("base: lgffem_cpu\nstrategy:\n  - {name: a}\n  - {name: b, overrides: {train.epochs: 0}}\n")
    with pytest.raises(ConfigError, match=r"strategy\[1\].overrides: config key train.epochs: must be >= 1"):
        load_config(path)


def _numeric(cls, prefix=""):
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        inner = args[0]
        if dataclasses.is_dataclass(inner):
            yield from _numeric(inner, f"{prefix}{f.name}.")
        elif typing.get_origin(inner) is list:
            if typing.get_args(inner)[0] in (int, float):
                yield f"{prefix}{f.name}"
        elif inner in (int, float):
            yield f"{prefix}{f.name}"


def test_every_numeric_setting_has_a_range():
    numeric = set(_numeric(LGFFConfig))
    assert len(numeric) > 60
    assert numeric - set(BOUNDS) == set(), "add a range for the new setting(s) to lgff_core.config.BOUNDS"
    assert set(BOUNDS) - numeric == set()
    for name in ("lgffem_cpu", "lgffem_paper", "lgffdm_cpu", "demo", "strategy_c"):
        load_config(name)  # the presets are in range


# ------------------------------------------------------------------------------------------- flags for settings


@pytest.fixture
def emb_uri(tmp_path):
    rng = np.random.default_rng(0)
    n, n_test = 48, 16
    labels = np.arange(n) % 4
    x = rng.normal(size=(4, 8))[labels] + 0.5 * rng.normal(size=(n, 8))
    uri = str(tmp_path / "emb")
    write_embeddings(uri, EmbeddingTable(
        ids=np.array([f"s{i:03d}" for i in range(n)], dtype=object), labels=labels.astype(np.int64),
        groups=np.array(["g"] * n, dtype=object),
        splits=np.array(["train"] * (n - n_test) + ["test"] * n_test, dtype=object),
        xb=(x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32),
        label_names=[f"c{i}" for i in range(4)]), model="lgff-test")
    return uri


@pytest.mark.parametrize("flag, value, key", [
    ("--max-queries", "0", "evaluate.max_queries"),
    ("--max-queries", "-1", "evaluate.max_queries"),
    ("--query-batch", "0", "evaluate.query_batch"),
    ("--k", "0", "evaluate.k"),
    ("--ks", "0,-1", "evaluate.ks[0]"),
])
def test_evaluate_flags_are_checked_like_their_settings(emb_uri, tmp_path, capsys, flag, value, key):
    """Before: 0 fell back to the config's value (`args.x or cfg...`), and --max-queries -1 evaluated a 3-query
    sample; now every given value is used and checked, and a bad one names the flag and the setting."""
    out = tmp_path / "m.json"
    argv = ["-q", "evaluate", "retrieval", "--embeddings", emb_uri, "--protocol", "test-vs-train", "--out", str(out)]
    assert main([*argv, flag, value]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"lgff evaluate: error: {flag}: config key {key}: must be"), line
    assert not out.exists()


def test_a_given_flag_wins_over_the_config(emb_uri, tmp_path):
    out = tmp_path / "m.json"
    argv = ["-q", "evaluate", "retrieval", "--embeddings", emb_uri, "--protocol", "test-vs-train", "--out", str(out)]
    assert main([*argv, "--max-queries", "5", "--query-batch", "2", "--set", "evaluate.max_queries=12"]) == 0
    result = json.loads(out.read_text())
    assert result["n_queries"] == 5 and result["sample"]["n_queries_total"] == 16


def test_index_search_flags_are_checked(emb_uri, tmp_path, capsys):
    idx = str(tmp_path / "idx")
    assert main(["-q", "index", "build", "--embeddings", emb_uri, "--factory", "Flat", "--out", idx]) == 0
    capsys.readouterr()
    for flag, key in (("--query-batch", "evaluate.query_batch"), ("--nprobe", "index.nprobe"),
                      ("--ef-search", "index.ef_search")):
        assert main(["-q", "index", "search", "--index", idx, "--queries", emb_uri, "--out",
                     str(tmp_path / "nb.parquet"), flag, "0"]) == 2
        assert f"{flag}: config key {key}: must be >= 1 (got 0)" in _one_line(capsys.readouterr().err)


# ------------------------------------------------------------------------------------------- lease files


@pytest.mark.parametrize("change, problem", [
    ({"pid": "abc"}, "pid is 'abc', expected an integer"),
    ({"expires": None}, "expires is None, expected a number"),
    ({"host": 7}, "host is 7, expected a string"),
    ({"token": None}, "token is None, expected a string"),
])
def test_a_corrupt_lease_is_taken_over_as_stale(tmp_path, caplog, change, problem):
    """Before: TypeError / ValueError tracebacks from float(None) / int('abc') in every writer of the prefix."""
    out = tmp_path / "out"
    out.mkdir()
    record = {"owner": "x", "host": os.uname().nodename, "pid": os.getpid(), "token": "t", "heartbeat": 0,
              "expires": 4e9, **change}
    (out / storage.LEASE_NAME).write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING, logger="lgff_core.storage"):
        with storage.lease(str(out), owner="me") as held:
            held.check()
            assert json.loads((out / storage.LEASE_NAME).read_text())["owner"] == "me"
    assert f"taking over a corrupt lease ({problem}), as a stale one" in caplog.text
    assert os.listdir(out) == []  # neither the corrupt lease nor a temporary file is left


def test_a_lease_file_is_never_seen_half_written(tmp_path):
    """The lease body is in place the moment the lease file exists (hard link of a complete file)."""
    out = tmp_path / "out"
    with storage.lease(str(out), owner="me"):
        names = os.listdir(out)
        assert names == [storage.LEASE_NAME]
        assert json.loads((out / storage.LEASE_NAME).read_text())["owner"] == "me"


# ------------------------------------------------------------------------------------------- id files


def test_index_remove_ids_that_are_not_readable_is_one_line(emb_uri, tmp_path, capsys):
    idx = str(tmp_path / "idx")
    assert main(["-q", "index", "build", "--embeddings", emb_uri, "--factory", "Flat", "--out", idx]) == 0
    capsys.readouterr()
    not_parquet = tmp_path / "ids.parquet"
    not_parquet.write_text("s000\ns001\n")
    binary = tmp_path / "ids.bin"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    for ids, words in ((not_parquet, "not a readable Parquet file"), (binary, "not UTF-8 text")):
        out = tmp_path / "out"
        assert main(["-q", "index", "remove", "--index", idx, "--ids", str(ids), "--out", str(out)]) == 2
        line = _one_line(capsys.readouterr().err)
        assert str(ids) in line and words in line, line
        assert not out.exists()
