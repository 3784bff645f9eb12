"""Checkpoint I/O, optimizer-state flattening and the LR schedule."""
from __future__ import annotations

import json
import math

import pytest
import torch

from lgff_core.errors import CheckpointError
from lgff_core.train import checkpoint as ckpt
from lgff_core.train.schedule import WarmupCosineSchedule, cosine_warmup_lr


def test_cosine_warmup_values():
    assert cosine_warmup_lr(0, 100, 1e-2, 1e-4, warmup_steps=10) == pytest.approx(1e-3)
    assert cosine_warmup_lr(9, 100, 1e-2, 1e-4, warmup_steps=10) == pytest.approx(1e-2)
    assert cosine_warmup_lr(10, 100, 1e-2, 1e-4, warmup_steps=10) == pytest.approx(1e-2)
    mid = cosine_warmup_lr(55, 100, 1e-2, 1e-4, warmup_steps=10)
    assert mid == pytest.approx(1e-4 + (1e-2 - 1e-4) * 0.5)
    assert cosine_warmup_lr(100, 100, 1e-2, 1e-4, warmup_steps=10) == pytest.approx(1e-4)
    assert cosine_warmup_lr(500, 100, 1e-2, 1e-4) == pytest.approx(1e-4)  # clamped past the end


def test_schedule_groups_and_state_roundtrip():
    p1, p2 = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [p1], "lr": 1e-2}, {"params": [p2], "lr": 1e-1}])
    sched = WarmupCosineSchedule(opt, total_steps=20, lr_min_ratio=0.01, warmup_steps=0)
    assert sched.get_last_lr() == pytest.approx([1e-2, 1e-1])
    for _ in range(20):
        sched.step()
    assert sched.get_last_lr() == pytest.approx([1e-4, 1e-3])  # floor scales with each group's base lr
    opt2 = torch.optim.AdamW([{"params": [p1], "lr": 5.0}, {"params": [p2], "lr": 5.0}])
    s2 = WarmupCosineSchedule(opt2, total_steps=1, lr_min_ratio=0.5)
    s2.load_state_dict(json.loads(json.dumps(sched.state_dict())))
    assert s2.get_last_lr() == sched.get_last_lr()


def _opt_with_state():
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, betas=(0.8, 0.95))
    for _ in range(3):
        opt.zero_grad()
        m(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
    return m, opt


def test_optimizer_state_flatten_roundtrip_continues_identically(tmp_path):
    m, opt = _opt_with_state()
    tensors, rest = ckpt.flatten_optimizer_state(opt.state_dict())
    ckpt.save_checkpoint(str(tmp_path / "c"), m.state_dict(), {"rest": rest}, optimizer_tensors=tensors)
    meta = ckpt.read_sidecar(str(tmp_path / "c"))
    m2 = torch.nn.Linear(4, 3)
    m2.load_state_dict(ckpt.load_tensors(str(tmp_path / "c"), meta=meta))
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1.0)
    opt2.load_state_dict(ckpt.unflatten_optimizer_state(
        ckpt.load_tensors(str(tmp_path / "c"), ckpt.OPTIMIZER_FILE, meta), meta["rest"]))
    assert opt2.param_groups[0]["betas"] == (0.8, 0.95) and opt2.param_groups[0]["lr"] == 1e-2
    x = torch.randn(5, 4)
    for model, o in ((m, opt), (m2, opt2)):
        o.zero_grad()
        model(x).pow(2).sum().backward()
        o.step()
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_checkpoint_roundtrip_and_sidecar_published_last(tmp_path):
    prefix = str(tmp_path / "ck")
    sd = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)}
    side = ckpt.save_checkpoint(prefix, sd, {"epoch": 3, "class_names": ["a", "b"]}, loss_state={"weight": torch.eye(2)})
    assert set(side["files"]) == {ckpt.MODEL_FILE, ckpt.LOSS_FILE}
    meta = ckpt.read_sidecar(prefix + "/model.json")  # the sidecar path itself is accepted too
    assert meta["epoch"] == 3 and meta["format"] == ckpt.CHECKPOINT_FORMAT
    got = ckpt.load_tensors(prefix)
    assert torch.equal(got["w"], sd["w"]) and torch.equal(got["b"], sd["b"])
    # overwriting removes the sidecar first: a crash mid-write leaves an incomplete (refused) prefix
    (tmp_path / "ck" / "model.json").unlink()
    assert not ckpt.is_complete(prefix)
    with pytest.raises(CheckpointError, match="no model.json"):
        ckpt.read_sidecar(prefix)


def test_checkpoint_corruption_and_pickles_refused(tmp_path):
    prefix = tmp_path / "ck"
    ckpt.save_checkpoint(str(prefix), {"w": torch.zeros(3)}, {"epoch": 1})
    # same size, different bytes -> sha mismatch
    data = bytearray((prefix / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (prefix / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        ckpt.load_tensors(str(prefix))
    # a pickle passed directly, or a directory that only holds one
    torch.save({"w": torch.zeros(3)}, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="pickled"):
        ckpt.read_sidecar(str(tmp_path / "model.pt"))
    pdir = tmp_path / "pickles"
    pdir.mkdir()
    torch.save({"w": torch.zeros(3)}, pdir / "weights.pth")
    with pytest.raises(CheckpointError, match="pickled"):
        ckpt.read_sidecar(str(pdir))


def test_not_safetensors_bytes_refused_even_with_matching_sidecar(tmp_path):
    """A torch pickle renamed to model.safetensors (hash recorded) is still refused: nothing is unpickled."""
    import hashlib
    import io

    prefix = tmp_path / "ck"
    ckpt.save_checkpoint(str(prefix), {"w": torch.zeros(3)}, {"epoch": 1})
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(3)}, buf)
    (prefix / "model.safetensors").write_bytes(buf.getvalue())
    side = json.loads((prefix / "model.json").read_text())
    side["files"]["model.safetensors"] = {"sha256": hashlib.sha256(buf.getvalue()).hexdigest(),
                                          "bytes": len(buf.getvalue())}
    (prefix / "model.json").write_text(json.dumps(side))
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        ckpt.load_tensors(str(prefix))


def test_copy_checkpoint(tmp_path):
    ckpt.save_checkpoint(str(tmp_path / "a"), {"w": torch.ones(2)}, {"epoch": 2}, loss_state={"weight": torch.ones(1)})
    ckpt.save_checkpoint(str(tmp_path / "b"), {"w": torch.zeros(2)}, {"epoch": 1},
                         loss_state={"weight": torch.zeros(1)}, optimizer_tensors={"x": torch.zeros(1)})
    ckpt.copy_checkpoint(str(tmp_path / "a"), str(tmp_path / "b"))
    assert ckpt.read_sidecar(str(tmp_path / "b"))["epoch"] == 2
    assert not (tmp_path / "b" / "optimizer.safetensors").exists()  # stale file of the old checkpoint removed
    assert torch.equal(ckpt.load_tensors(str(tmp_path / "b"))["w"], torch.ones(2))
    assert math.isclose(float(ckpt.load_tensors(str(tmp_path / "b"), ckpt.LOSS_FILE)["weight"]), 1.0)


def test_training_output_directory_resolves_to_its_best_checkpoint(tmp_path, caplog):
    # `lgff embed --model RUN_DIR` (and every loader) used to fail with "no model.json" on a training output directory
    run = tmp_path / "run"
    sd = {"w": torch.arange(4.0)}
    ckpt.save_checkpoint(str(run / "best"), sd, {"epoch": 2})
    ckpt.save_checkpoint(str(run / "last"), {"w": torch.zeros(4)}, {"epoch": 5})
    with caplog.at_level("INFO", logger="lgff_core.train.checkpoint"):
        assert ckpt.checkpoint_prefix(str(run)) == str(run / "best")
        assert ckpt.read_sidecar(str(run))["epoch"] == 2
        assert torch.equal(ckpt.load_tensors(str(run))["w"], sd["w"])
    assert "training output directory" in caplog.text and str(run / "best") in caplog.text
    # a checkpoint prefix itself, and a directory that is neither, are unchanged
    assert ckpt.checkpoint_prefix(str(run / "last")) == str(run / "last")
    with pytest.raises(CheckpointError, match="no model.json"):
        ckpt.read_sidecar(str(tmp_path))
