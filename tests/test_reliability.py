"""Issue 13 (reliability): each test reproduces one failure found by a hostile run and fails on the code before
the fix. Failure 3 (checkpoint copies) is in test_reliability_train.py, failure 8 (silent object store) in
test_reliability_s3.py."""
from __future__ import annotations

import io
import logging
import os
import struct
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lgff_core.retrieval import embed as embed_mod
from lgff_core import storage
from lgff_core.cli import main
from lgff_core.config import load_config
from lgff_core.data.images import encode_png
from lgff_core.data.shards import Manifest, ShardWriter, read_manifest, write_manifest
from lgff_core.retrieval.embed import embed_dataset, load_embedder
from lgff_core.data.embeddings import read_embeddings
from lgff_core.errors import DataError, LGFFError

SIZE = 32


class Killed(BaseException):
    """Stands in for SIGKILL: no cleanup handler runs."""


def _png(seed: int, size: int = 24) -> bytes:
    rng = np.random.default_rng(seed)
    return encode_png(rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8))


def _dataset(uri: str, images: dict[str, bytes] | None = None, n: int = 12) -> str:
    images = images or {f"img{i:03d}": _png(i) for i in range(n)}
    w = ShardWriter(uri, shard_mb=0.004, row_group_rows=2)
    for i, (sid, data) in enumerate(sorted(images.items())):
        w.write({"sample_id": sid, "image": data, "label": i % 2, "label_name": f"c{i % 2}", "group": sid,
                 "split": "train" if i % 3 else "val", "width": 24, "height": 24, "source": sid})
    write_manifest(Manifest(uri=uri, shards=w.close(), label_names=["c0", "c1"], source_fingerprint="t"))
    return uri


def _cfg(**extra):
    overrides = {"embed.image_size": SIZE, "embed.batch_size": 4, "embed.channels_last": False, "embed.bf16": False}
    overrides.update(extra)
    return load_config(None, overrides)


def _one_line(err: str) -> str:
    """The CLI's error line (exactly one, no traceback); log lines around it are allowed."""
    lines = [l for l in err.splitlines() if l.startswith("lgff ")]
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------------------------------- failure 1


def test_embed_rerun_with_other_settings_never_publishes_a_mixture(tmp_path, monkeypatch):
    data = _dataset(str(tmp_path / "data"))
    n = read_manifest(data).num_shards
    assert n >= 4
    out = str(tmp_path / "emb")
    old_cfg = _cfg()
    embed_dataset(None, data, out, old_cfg, "gem-last")
    old = read_embeddings(out)

    new_cfg = _cfg(**{"embed.image_size": 48})
    original = embed_mod._embed_shard
    calls = {"n": 0}

    def die_after_two(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:
            raise Killed
        return original(*args, **kwargs)

    monkeypatch.setattr(embed_mod, "_embed_shard", die_after_two)
    with pytest.raises(Killed):
        embed_dataset(None, data, out, new_cfg, "gem-last")
    # the published set is still entirely the old one (same vectors, every shard matching its sha256)
    mid = read_embeddings(out)
    np.testing.assert_array_equal(mid.xb, old.xb)
    monkeypatch.setattr(embed_mod, "_embed_shard", original)

    summary = embed_dataset(None, data, out, new_cfg, "gem-last")
    assert summary["published"] and len(summary["skipped"]) == 2  # the killed run's shards are reused
    fresh = str(tmp_path / "fresh")
    embed_dataset(None, data, fresh, new_cfg, "gem-last")
    np.testing.assert_array_equal(read_embeddings(out).xb, read_embeddings(fresh).xb)
    # the replaced version's files are gone once the new one is published
    top_parts = [f for f in os.listdir(out) if f.startswith("part-")]
    assert top_parts == []


def test_embeddings_reader_refuses_a_replaced_shard(tmp_path):
    data = _dataset(str(tmp_path / "data"))
    out = str(tmp_path / "emb")
    embed_dataset(None, data, out, _cfg(), "gem-last")
    other = str(tmp_path / "other")
    embed_dataset(None, data, other, _cfg(**{"embed.image_size": 48}), "gem-last")
    name = read_manifest(data).shards[1].name
    os.replace(os.path.join(other, name), os.path.join(out, name))  # what an in-place overwrite left behind
    with pytest.raises(DataError, match=name):
        read_embeddings(out)


# ------------------------------------------------------------------------------------------- failure 4


def _tree(root, n=6):
    for c in ("a", "b"):
        os.makedirs(root / c, exist_ok=True)
        for i in range(n):
            (root / c / f"{i}.png").write_bytes(_png(i + (100 if c == "b" else 0)))
    return root


def test_second_prep_writer_fails_naming_the_holder_and_deletes_nothing(tmp_path, capsys):
    src = _tree(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    part = out / "part-00000.parquet"
    part.write_bytes(b"the first writer's shard in progress")
    with storage.lease(str(out), owner="lgff prep imagefolder (first)"):
        code = main(["prep", "imagefolder", "--src", str(src), "--out", str(out), "--no-progress"])
        line = _one_line(capsys.readouterr().err)
        assert code == 2
        assert "another writer" in line and "lgff prep imagefolder (first)" in line and f"pid {os.getpid()}" in line
        assert part.exists() and not (out / "_manifest.json").exists()
    # once the holder is gone the prefix can be written
    assert main(["prep", "imagefolder", "--src", str(src), "--out", str(out), "--no-progress"]) == 0
    assert read_manifest(str(out)).num_rows == 12 and not (out / storage.LEASE_NAME).exists()


def test_lease_of_a_dead_writer_is_taken_over(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / storage.LEASE_NAME).write_text(
        '{"owner": "killed", "host": "%s", "pid": 999999999, "token": "x", "heartbeat": 0, "expires": 4e9}'
        % os.uname().nodename)
    with storage.lease(str(out), owner="me") as held:
        held.check()
    with storage.lease(str(out), owner="me again"):
        with pytest.raises(LGFFError, match="me again"):
            with storage.lease(str(out), owner="second", wait_s=0.3):
                pass


# ------------------------------------------------------------------------------------------- failure 5


def _rewrite_shard(data: str, index: int) -> str:
    m = read_manifest(data)
    path = os.path.join(data, m.shards[index].name)
    table = pq.read_table(path)
    schema = table.schema
    labels = table.column("label").to_pylist()
    table = table.set_column(schema.get_field_index("label"), "label", pa.array([1 - v for v in labels], "int32"))
    # valid Parquet, same schema and row groups, other bytes than the manifest's sha256
    pq.write_table(table.cast(schema), path, row_group_size=m.shards[index].row_groups[0])
    return m.shards[index].name


@pytest.mark.parametrize("damage", ["rewritten", "flipped"])
def test_embed_refuses_a_shard_that_changed_after_publication(tmp_path, capsys, damage):
    data = _dataset(str(tmp_path / "data"))
    if damage == "rewritten":
        name = _rewrite_shard(data, 1)
    else:
        name = read_manifest(data).shards[1].name
        path = os.path.join(data, name)
        raw = bytearray(open(path, "rb").read())
        for i in range(40, len(raw) - 40, 97):
            raw[i] ^= 0xFF
        open(path, "wb").write(bytes(raw))
    code = main(["embed", "--baseline", "--data", data, "--out", str(tmp_path / "emb"), "--set",
                 f"embed.image_size={SIZE}", "--set", "embed.bf16=false", "--set", "embed.channels_last=false"])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and name in line and "manifest" in line
    assert not os.path.exists(tmp_path / "emb" / "_manifest.json")


def test_train_refuses_a_rewritten_shard(tmp_path, monkeypatch):
    import lgff_core.models as models_pkg
    from lgff_core.config import LGFFConfig, apply_overrides
    from lgff_core.train import train_stage
    from test_train import OVERRIDES
    from test_train_support import make_dataset, tiny_build_model

    monkeypatch.setattr(models_pkg, "build_model", tiny_build_model, raising=False)
    data = make_dataset(tmp_path / "data")
    name = _rewrite_shard(data, 0)
    with pytest.raises(DataError, match=name):
        train_stage(apply_overrides(LGFFConfig(), dict(OVERRIDES, **{"train.epochs": 1})), data, str(tmp_path / "r"))


# ------------------------------------------------------------------------------------------- failure 6


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png(width: int, height: int) -> bytes:
    """A valid grey PNG of `width` x `height` zeros: a few hundred KB that decode to width*height bytes."""
    comp = zlib.compressobj(9)
    row = b"\x00" * (width + 1)
    body = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b""))


def corrupt_png() -> bytes:
    """Right structure (signature, IHDR, IDAT, IEND with valid CRCs), undecodable compressed data."""
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 24, 24, 8, 2, 0, 0, 0))
            + _png_chunk(b"IDAT", b"\x78\x9c" + bytes(range(7, 250))) + _png_chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def bomb():
    return bomb_png(8000, 8000)  # 64 Mpx: above the 50 Mpx default, below PIL's own 89 Mpx warning


def test_prep_refuses_a_decompression_bomb_or_skips_and_counts_it(tmp_path, capsys, bomb):
    assert len(bomb) < 200_000
    src = _tree(tmp_path / "src", n=3)
    (src / "a" / "zbomb.png").write_bytes(bomb)
    code = main(["prep", "imagefolder", "--src", str(src), "--out", str(tmp_path / "o1"), "--no-progress"])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and "zbomb.png" in line and "pixel limit" in line
    assert main(["prep", "imagefolder", "--src", str(src), "--out", str(tmp_path / "o2"), "--no-progress",
                 "--on-error", "skip"]) == 0
    m = read_manifest(str(tmp_path / "o2"))
    assert m.num_rows == 6 and len(m.skipped) == 1 and "pixel limit" in m.skipped[0]["reason"]


@pytest.mark.parametrize("kind", ["bomb", "corrupt"])
def test_embed_names_the_sample_of_a_bomb_or_corrupt_image(tmp_path, capsys, bomb, kind):
    images = {f"img{i:03d}": _png(i) for i in range(5)}
    images["img002"] = bomb if kind == "bomb" else corrupt_png()
    data = _dataset(str(tmp_path / "data"), images)
    code = main(["embed", "--baseline", "--data", data, "--out", str(tmp_path / "emb"), "--set",
                 f"embed.image_size={SIZE}", "--set", "embed.bf16=false", "--set", "embed.channels_last=false"])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and "'img002'" in line
    assert ("pixel limit" in line) if kind == "bomb" else ("not a decodable image" in line)


def test_pixel_limit_is_a_config_value(tmp_path, capsys):
    src = _tree(tmp_path / "src", n=2)
    assert main(["prep", "imagefolder", "--src", str(src), "--out", str(tmp_path / "o"), "--no-progress",
                 "--set", "data.max_pixels=500"]) == 2
    assert "pixel limit" in capsys.readouterr().err
    assert load_config("lgffem_cpu").data.max_pixels == 50_000_000 > 1500 * 1500


# ------------------------------------------------------------------------------------------- failure 7


@pytest.mark.parametrize("target", ["..", "."])
def test_symlink_loop_in_imagefolder_tree_is_a_one_line_error(tmp_path, capsys, target):
    src = _tree(tmp_path / "src", n=2)
    os.symlink(target, src / "a" / "loop")
    code = main(["prep", "imagefolder", "--src", str(src), "--out", str(tmp_path / "out"), "--no-progress"])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and "symlink loop" in line and "loop" in line
    assert not (tmp_path / "out" / "_manifest.json").exists()


# ------------------------------------------------------------------------------------------- failure 9


def test_partial_config_is_completed_from_its_base_preset(tmp_path):
    cpu = load_config("lgffem_cpu")
    path = tmp_path / "mine.yaml"
    path.write_text("base: lgffem_cpu\nname: mine\ntrain:\n  epochs: 3\n")
    cfg = load_config(str(path))
    assert cfg.name == "mine" and cfg.train.epochs == 3
    assert (cfg.model.channels, cfg.model.num_layers, cfg.train.batch_size) == (cpu.model.channels,
                                                                               cpu.model.num_layers, 64)
    loop = tmp_path / "loop.yaml"
    loop.write_text(f"base: {loop}\nname: x\n")
    with pytest.raises(LGFFError, match="loops"):
        load_config(str(loop))


def test_partial_config_without_base_says_which_defaults_it_used(tmp_path, caplog):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\ntrain:\n  epochs: 3\n")
    with caplog.at_level(logging.WARNING, logger="lgff_core.config"):
        cfg = load_config(str(path))
    assert cfg.model.channels == 512
    text = caplog.text
    assert "no `base:`" in text and "model" in text and "C=512" in text and "base: lgffem_cpu" in text


def test_train_and_embed_refuse_a_run_that_does_not_fit_in_memory(tmp_path, capsys, monkeypatch):
    from lgff_core import memory

    paper = load_config("lgffem_paper")
    est = memory.estimate_peak_bytes("train", paper.model, 224, 64)
    assert est.peak > 16 * 2**30  # the partial-config run that the kernel killed at 17.5 GB
    cpu = load_config("lgffem_cpu")
    assert memory.estimate_peak_bytes("train", cpu.model, 224, 64).peak < est.peak / 4
    monkeypatch.setattr(memory, "available_bytes", lambda: 4 * 2**30)
    path = tmp_path / "partial.yaml"
    path.write_text("name: mine\ntrain:\n  epochs: 1\n")
    data = _dataset(str(tmp_path / "data"))
    code = main(["train", "--config", str(path), "--data", data, "--out", str(tmp_path / "run")])
    line = _one_line(capsys.readouterr().err)
    fits = est.batch_that_fits(4 * 2**30)
    assert code == 2 and "GiB" in line and f"--set train.batch_size={fits}" in line and "--no-memory-check" in line
    assert not (tmp_path / "run").exists()
    code = main(["embed", "--baseline", "--data", data, "--out", str(tmp_path / "emb"), "--set",
                 "embed.image_size=4096", "--set", "embed.batch_size=64"])
    assert code == 2 and "embed.batch_size=" in _one_line(capsys.readouterr().err)


# ------------------------------------------------------------------------------------------- failure 10


def test_skip_reasons_are_deterministic(tmp_path):
    src = _tree(tmp_path / "src", n=2)
    (src / "a" / "notes.png").write_bytes(b"this is a text file with an image extension\n")
    manifests = []
    for run in ("r1", "r2"):
        assert main(["prep", "imagefolder", "--src", str(src), "--out", str(tmp_path / run), "--no-progress",
                     "--on-error", "skip", "--check", "decode"]) == 0
        manifests.append((tmp_path / run / "_manifest.json").read_bytes())
    assert manifests[0] == manifests[1]
    reason = read_manifest(str(tmp_path / "r1")).skipped[0]["reason"]
    assert "0x" not in reason and "cannot identify image file" in reason
