"""Issue 13 failure 3: a kill while `last/` or `best/` is being copied, then `--resume`, must leave both complete
and matching what the summary claims."""
from __future__ import annotations

import pytest

import lgff_core.models as models_pkg
import lgff_core.train.embedding as trainer
import lgff_core.train.loop as loop
from lgff_core.config import LGFFConfig, apply_overrides
from lgff_core.train import checkpoint as ckpt
from lgff_core.train import train_stage
from test_train import OVERRIDES
from test_train_support import make_dataset, tiny_build_model


class Killed(BaseException):
    """Stands in for SIGKILL: nothing after it runs, no cleanup handler catches it."""


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(models_pkg, "build_model", tiny_build_model, raising=False)
    return apply_overrides(LGFFConfig(), dict(OVERRIDES, **{"train.epochs": 2}))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("ds") / "data")


@pytest.mark.parametrize("where", ["best-after-sidecar-removed", "best-before-anything", "last-after-sidecar-removed"])
def test_kill_during_checkpoint_copy_then_resume(tiny, data, tmp_path, monkeypatch, where):
    calls = {"n": 0}

    def improving(*args, **kwargs):  # every epoch improves: epoch 2 is best, so epoch 2 copies into best/
        calls["n"] += 1
        return 0.1 * calls["n"], 0.5, "val-vs-train"  # (Recall@1, mAP@100, protocol)

    monkeypatch.setattr(trainer, "_validate", improving)
    original = ckpt.copy_checkpoint
    target = "best" if where.startswith("best") else "last"

    def copy_then_die(src, dst):
        if dst.endswith("/" + target) and ckpt.read_sidecar(src)["epoch"] == 2:
            if where.endswith("sidecar-removed"):
                (tmp_path / "run" / target / ckpt.SIDECAR_FILE).unlink()
                (tmp_path / "run" / target / ckpt.MODEL_FILE).write_bytes(b"half")
            raise Killed
        return original(src, dst)

    monkeypatch.setattr(ckpt, "copy_checkpoint", copy_then_die)
    out = str(tmp_path / "run")
    with pytest.raises(Killed):
        train_stage(tiny, data, out)
    monkeypatch.setattr(ckpt, "copy_checkpoint", original)
    summary = train_stage(tiny, data, out, resume=True)
    assert summary["best_epoch"] == 2
    assert ckpt.read_sidecar(f"{out}/best")["epoch"] == 2
    assert ckpt.read_sidecar(f"{out}/last")["epoch"] == 2
    model, meta = ckpt.load_model_from_checkpoint(f"{out}/best")  # what `lgff embed --model C/best` does
    assert meta["epoch"] == 2


def test_kill_before_metrics_are_written_keeps_the_epoch_row(tiny, data, tmp_path, monkeypatch):
    """Found by bench/faults.py (train-ckpt): a kill after epoch 1's checkpoint but before metrics.jsonl lost the
    epoch-1 row for good, so the resumed run's metrics differed from a clean run's."""
    import json

    clean = train_stage(tiny, data, str(tmp_path / "clean"))
    original = loop.write_metrics

    def die(out_uri, rows):
        raise Killed

    monkeypatch.setattr(loop, "write_metrics", die)
    with pytest.raises(Killed):
        train_stage(tiny, data, str(tmp_path / "run"))
    monkeypatch.setattr(loop, "write_metrics", original)
    resumed = train_stage(tiny, data, str(tmp_path / "run"), resume=True)
    rows = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    ref = [json.loads(l) for l in open(tmp_path / "clean" / "metrics.jsonl")]
    assert [(r["epoch"], r["train_loss"], r["val_recall@1"]) for r in rows] == [
        (r["epoch"], r["train_loss"], r["val_recall@1"]) for r in ref]
    assert resumed["best_epoch"] == clean["best_epoch"]
