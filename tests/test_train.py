"""Training stage with a tiny stand-in model (contract-compatible): loop, resume, init, cache, bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import lgff_core.models as models_pkg
from lgff_core.cli import main as cli_main
from lgff_core.config import LGFFConfig, apply_overrides
from lgff_core.train import checkpoint as ckpt
from lgff_core.train import feature_cache as fc
from lgff_core.train import train_stage
from lgff_core.train import embedding as trainer_mod
from lgff_core.train.embedding import recall_at_1, validation_scores
from lgff_core.train.loop import StopTraining
from s3_server import s3_env  # noqa: F401  (session fixture)
from test_train_support import make_dataset, tiny_build_model

OVERRIDES = {"model.channels": 16, "model.backbone.weights": "none", "train.epochs": 4, "train.batch_size": 8,
             "train.lr": 1e-2, "train.lr_min": 1e-4, "train.image_size": 32, "train.warmup_epochs": 0.5,
             "loss.scale": 16.0, "loss.num_subcenters": 2, "embed.bf16": False, "embed.channels_last": False}


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(models_pkg, "build_model", tiny_build_model, raising=False)
    if not hasattr(models_pkg, "SubCenterArcFace"):
        from lgff_core.models.subcenter_arcface import SubCenterArcFace

        monkeypatch.setattr(models_pkg, "SubCenterArcFace", SubCenterArcFace, raising=False)
    return apply_overrides(LGFFConfig(), OVERRIDES)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("ds") / "data")


def _weights(prefix):
    return ckpt.load_tensors(prefix)


def test_recall_at_1_hand_computed():
    xb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    yb = np.array([0, 1, 1])
    xq = torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.95, 0.3]])
    assert recall_at_1(xq, np.array([0, 1, 1]), xb, yb) == pytest.approx(2 / 3)  # third query's NN is item 0
    assert recall_at_1(xb, yb, xb, yb, leave_one_out=True) == pytest.approx(2 / 3)  # item 0's NN is item 2


def test_validation_scores_hand_computed():
    xb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    yb = np.array([0, 1, 1])
    xq = torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.95, 0.3]])
    # rankings: q0 [0, 2, 1] AP 1; q1 [1, 2, 0] AP 1; q2 [0, 2, 1] relevant at ranks 2, 3: (1/2 + 2/3) / 2
    r1, m = validation_scores(xq, np.array([0, 1, 1]), xb, yb)
    assert r1 == pytest.approx(2 / 3) and m == pytest.approx((1 + 1 + 7 / 12) / 3)
    # AP@1 divides by min(1, R): q2 scores 0
    assert validation_scores(xq, np.array([0, 1, 1]), xb, yb, k=1)[1] == pytest.approx(2 / 3)
    # leave-one-out: item 0 has no other class-0 item (left out); items 1 and 2 find each other first
    assert validation_scores(xb, yb, xb, yb, leave_one_out=True) == (pytest.approx(2 / 3), pytest.approx(1.0))


def test_best_checkpoint_breaks_recall_ties_by_val_map(tiny, data, tmp_path, monkeypatch):
    # Recall@1 saturates at 1.0 from epoch 1 while mAP keeps rising: `best/` must be the epoch with the highest mAP
    # among the best-Recall@1 epochs (the old rule, earliest epoch on a tie, kept epoch 1), and a higher Recall@1
    # still wins over any mAP
    scripted = iter([(1.0, 0.70), (1.0, 0.90), (0.95, 0.99), (1.0, 0.85)])
    monkeypatch.setattr(trainer_mod, "_validate", lambda *a, **k: (*next(scripted), "val-vs-train"))
    s = train_stage(tiny, data, str(tmp_path / "run"))
    assert s["best_epoch"] == 2 and s["best_val_map_at_100"] == pytest.approx(0.90)
    assert ckpt.read_sidecar(str(tmp_path / "run/best"))["epoch"] == 2
    rows = [json.loads(l) for l in open(tmp_path / "run/metrics.jsonl")]
    assert [r["val_map@100"] for r in rows] == [0.70, 0.90, 0.99, 0.85]


def test_train_stage_learns_and_publishes(tiny, data, tmp_path):
    out = str(tmp_path / "run")
    s = train_stage(tiny, data, out)
    rows = [json.loads(l) for l in open(f"{out}/metrics.jsonl")]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert rows[-1]["lr"] == pytest.approx(1e-4, rel=1e-6)  # cosine ends at lr_min after the last step
    assert all(r["val_protocol"] == "val-vs-train" and 0 <= r["val_recall@1"] <= 1 for r in rows)
    best = max(rows, key=lambda r: (r["val_recall@1"], r["val_map@100"], -r["epoch"]))
    assert s["best_epoch"] == best["epoch"]
    from lgff_core.device import frozen_backbone_precision

    assert s["precision"] == {"features": frozen_backbone_precision(tiny, torch.device("cpu")).name,
                              "train_step": "fp32"}
    last, bestm = ckpt.read_sidecar(f"{out}/last"), ckpt.read_sidecar(f"{out}/best")
    assert last["epoch"] == 4 and bestm["epoch"] == best["epoch"]
    assert last["class_names"] == ["class0", "class1", "class2"]
    assert not any(k.startswith("backbone.") for k in _weights(f"{out}/last"))  # frozen part not stored
    # load_model_from_checkpoint rebuilds from the sidecar config and reproduces the embeddings
    model, meta = ckpt.load_model_from_checkpoint(f"{out}/last")
    assert not model.training and meta["epoch"] == 4
    x = torch.randn(3, 3, 32, 32)
    ref = tiny_build_model(tiny)
    ref.load_trainable_state_dict(_weights(f"{out}/last"))
    ref.eval()
    assert torch.allclose(model(x), ref(x))


@pytest.mark.parametrize("cached", [False, True])
def test_resume_matches_uninterrupted(tiny, data, tmp_path, cached):
    cache = str(tmp_path / "cache") if cached else None
    full = train_stage(tiny, data, str(tmp_path / "full"), feature_cache=cache)

    def stop_after_2(row):
        if row["epoch"] == 2:
            raise StopTraining

    part = train_stage(tiny, data, str(tmp_path / "part"), feature_cache=cache, on_epoch_end=stop_after_2)
    assert part["stopped_early"] and ckpt.read_sidecar(str(tmp_path / "part/last"))["epoch"] == 2
    torch.manual_seed(999)  # the resumed run must not depend on the caller's RNG state
    resumed = train_stage(tiny, data, str(tmp_path / "part"), resume=True, feature_cache=cache)
    assert resumed["start_epoch"] == 2
    a, b = _weights(str(tmp_path / "full/last")), _weights(str(tmp_path / "part/last"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = ckpt.load_tensors(str(tmp_path / "full/last"), ckpt.LOSS_FILE)["weight"]
    lb = ckpt.load_tensors(str(tmp_path / "part/last"), ckpt.LOSS_FILE)["weight"]
    assert torch.equal(la, lb)
    ra = [json.loads(l) for l in open(tmp_path / "full/metrics.jsonl")]
    rb = [json.loads(l) for l in open(tmp_path / "part/metrics.jsonl")]
    assert [r["train_loss"] for r in ra] == [r["train_loss"] for r in rb]
    assert full["best_epoch"] == resumed["best_epoch"]


def test_resume_uses_staging_when_last_is_incomplete(tiny, data, tmp_path):
    out = tmp_path / "run"
    cfg = apply_overrides(tiny, {"train.epochs": 2})
    train_stage(cfg, data, str(out))
    (out / "last" / "model.json").unlink()  # as if killed while copying staging -> last
    from lgff_core.train.loop import find_resume_point

    assert find_resume_point(str(out)).endswith("_staging")
    s = train_stage(apply_overrides(tiny, {"train.epochs": 3}), data, str(out), resume=True)
    assert s["start_epoch"] == 2 and ckpt.read_sidecar(str(out / "last"))["epoch"] == 3


def test_feature_cache_reused_and_resumable(tiny, data, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cfg = apply_overrides(tiny, {"train.epochs": 1})
    train_stage(cfg, data, str(tmp_path / "r1"), feature_cache=str(cache))
    manifests = sorted(cache.glob("*/_cache.json"))
    assert len(manifests) == 2  # train and val splits
    m = json.loads(manifests[0].read_text())
    assert m["key"]["image_size"] == 32 and m["key"]["backbone"] == tiny.model.backbone.name
    with np.load(sorted(cache.glob("*/train-chunk-*.npz"))[0]) as z:
        assert z["level_0"].dtype == np.float16 and z["level_0"].shape[1:] == (8, 16, 16)
    # a second run must not run the backbone for cached rows
    calls = []
    real = fc.build_feature_cache

    def spy(extract, *a, **k):
        return real(lambda x: calls.append(len(x)) or extract(x), *a, **k)

    monkeypatch.setattr("lgff_core.train.embedding.build_feature_cache", spy)
    train_stage(cfg, data, str(tmp_path / "r2"), feature_cache=str(cache))
    assert calls == []
    # interrupted build: drop the manifest and one chunk -> only that chunk's rows are recomputed
    train_dir = [p.parent for p in manifests if json.loads(p.read_text())["key"]["split"] == "train"][0]
    (train_dir / "_cache.json").unlink()
    (train_dir / "train-chunk-00000.npz").unlink()
    train_stage(cfg, data, str(tmp_path / "r3"), feature_cache=str(cache))
    assert sum(calls) == 36  # 3 classes x 12 train rows, all in chunk 0 (chunk size 512)
    assert (train_dir / "_cache.json").exists()


def test_feature_cache_auto_from_config(tiny, data, tmp_path):
    cfg = apply_overrides(tiny, {"train.epochs": 1, "train.feature_cache": "auto"})
    s = train_stage(cfg, data, str(tmp_path / "run"))
    assert s["feature_cache"] and len(list((tmp_path / "run" / "_feature_cache").glob("*/_cache.json"))) == 2


def test_dihedral_augment_applies_one_transform_to_all_levels():
    a = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    b = torch.arange(2 * 1 * 2 * 2, dtype=torch.float32).reshape(2, 1, 2, 2)
    out = fc.dihedral_augment([a, b], hflip=1.0, vflip=0.0, rotate90=False)
    assert torch.equal(out[0], torch.flip(a, dims=(-1,))) and torch.equal(out[1], torch.flip(b, dims=(-1,)))
    g = torch.Generator().manual_seed(0)
    out = fc.dihedral_augment([a, b], generator=g)
    for i in range(2):  # per sample, the same transform on both levels
        views = [torch.rot90(x, k, dims=(-2, -1)) for x0 in (a[i], torch.flip(a[i], dims=(-1,)))
                 for k in range(4) for x in (x0,)]
        va = [j for j, v in enumerate(views) if torch.equal(v, out[0][i])]
        viewsb = [torch.rot90(x, k, dims=(-2, -1)) for x0 in (b[i], torch.flip(b[i], dims=(-1,)))
                  for k in range(4) for x in (x0,)]
        vb = [j for j, v in enumerate(viewsb) if torch.equal(v, out[1][i])]
        assert va and vb and set(va) & set(vb)


def test_init_carries_weights_and_recreates_classes(tiny, data, tmp_path):
    cfg = apply_overrides(tiny, {"train.epochs": 1})
    train_stage(cfg, data, str(tmp_path / "a"))
    # same classes, 0 training steps would keep weights: use lr 0 to check exact carry-over
    frozen = apply_overrides(cfg, {"train.lr": 1e-12, "train.lr_min": 1e-12, "train.loss_lr": 1e-12,
                                   "train.grad_clip": None, "train.weight_decay": 0.0})
    train_stage(frozen, data, str(tmp_path / "b"), init=str(tmp_path / "a/last"))
    a, b = _weights(str(tmp_path / "a/last")), _weights(str(tmp_path / "b/last"))
    for k in a:
        if "running" in k or "num_batches" in k:
            continue  # BatchNorm statistics keep updating in train mode
        assert torch.allclose(a[k], b[k], atol=1e-8), k
    la = ckpt.load_tensors(str(tmp_path / "a/last"), ckpt.LOSS_FILE)["weight"]
    lb = ckpt.load_tensors(str(tmp_path / "b/last"), ckpt.LOSS_FILE)["weight"]
    assert torch.allclose(la, lb, atol=1e-8)
    # a different label set (4 classes) re-creates the class weights with the new shape
    data4 = make_dataset(tmp_path / "d4", num_classes=4)
    train_stage(frozen, data4, str(tmp_path / "c"), init=str(tmp_path / "a/last"))
    meta = ckpt.read_sidecar(str(tmp_path / "c/last"))
    assert meta["class_names"] == [f"class{i}" for i in range(4)]
    assert ckpt.load_tensors(str(tmp_path / "c/last"), ckpt.LOSS_FILE)["weight"].shape[0] == 4 * 2


# ----------------------------------------------------------------------------------------------- bad input (CLI)


def _cli(tiny_cfg_file, data, out, *extra):
    return cli_main(["train", "--config", str(tiny_cfg_file), "--data", str(data), "--out", str(out), *extra])


@pytest.fixture
def cfg_file(tiny, tmp_path):
    import yaml

    from lgff_core.config import config_to_dict

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(apply_overrides(tiny, {"train.epochs": 1}))))
    return path


def test_cli_bad_inputs_exit_2_and_publish_nothing(cfg_file, data, tmp_path, capsys):
    one = make_dataset(tmp_path / "one", num_classes=1)
    assert _cli(cfg_file, one, tmp_path / "o1") == 2
    assert "one class only" in capsys.readouterr().err
    missing = make_dataset(tmp_path / "missing", labels_override={3: -1})
    assert _cli(cfg_file, missing, tmp_path / "o2") == 2
    assert "no valid label" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text(cfg_file.read_text() + "\ntrain_typo: 1\n")
    assert _cli(bad, data, tmp_path / "o3") == 2
    assert "unknown key" in capsys.readouterr().err
    torch.save({"x": torch.zeros(1)}, tmp_path / "prev.pt")
    assert _cli(cfg_file, data, tmp_path / "o4", "--init", str(tmp_path / "prev.pt")) == 2
    assert "pickled" in capsys.readouterr().err
    for o in ("o1", "o2", "o3", "o4"):
        assert not (tmp_path / o).exists()


def test_cli_refuses_init_from_other_backbone(cfg_file, data, tmp_path, capsys):
    import yaml

    assert _cli(cfg_file, data, tmp_path / "a") == 0
    other = yaml.safe_load(cfg_file.read_text())
    other["model"]["backbone"]["weights"] = "/some/other/weights.safetensors"  # stand-in: another backbone
    other_file = tmp_path / "other.yaml"
    other_file.write_text(yaml.safe_dump(other))
    assert _cli(other_file, data, tmp_path / "b", "--init", str(tmp_path / "a/best")) == 2
    err = capsys.readouterr().err
    assert "same frozen backbone" in err
    assert not (tmp_path / "b").exists()


def test_cli_stop_and_resume(cfg_file, data, tmp_path, capsys):
    out = tmp_path / "r"
    assert _cli(cfg_file, data, out, "--set", "train.epochs=2", "--stop-after-epoch", "1") == 0
    assert ckpt.read_sidecar(str(out / "last"))["epoch"] == 1
    assert _cli(cfg_file, data, out, "--set", "train.epochs=2", "--resume") == 0
    assert '"start_epoch": 1' in capsys.readouterr().out
    assert ckpt.read_sidecar(str(out / "last"))["epoch"] == 2
    assert len(open(out / "metrics.jsonl").readlines()) == 2


def test_cli_stage_overrides_and_stage_data(cfg_file, data, tmp_path):
    """--stage N applies that stage's overrides; the stage's `data` replaces a missing --data (strategy = data)."""
    import yaml

    conf = yaml.safe_load(cfg_file.read_text())
    conf["strategy"] = [{"name": "A", "overrides": {}},
                        {"name": "B.2", "data": str(data), "overrides": {"loss.margin_deg": 17.2}}]
    path = tmp_path / "strategy.yaml"
    path.write_text(yaml.safe_dump(conf))
    assert cli_main(["train", "--config", str(path), "--out", str(tmp_path / "a"), "--stage", "0"]) == 2  # no data
    assert cli_main(["train", "--config", str(path), "--out", str(tmp_path / "b"), "--stage", "1",
                     "--init", str(tmp_path / "nope")]) == 2  # missing init checkpoint
    assert cli_main(["train", "--config", str(path), "--out", str(tmp_path / "b"), "--stage", "1"]) == 0
    meta = ckpt.read_sidecar(str(tmp_path / "b/last"))
    assert meta["config"]["loss"]["margin_deg"] == 17.2


def test_train_on_s3_out_and_cache_with_resume(tiny, data, s3_env, tmp_path):
    """--out and --feature-cache on an object store (moto S3): publish, resume, load the model back."""
    out = s3_env.new_prefix("run")
    cache = s3_env.new_prefix("cache")
    cfg = apply_overrides(tiny, {"train.epochs": 2})

    def stop(row):
        raise StopTraining

    s = train_stage(cfg, data, out, feature_cache=cache, on_epoch_end=stop)
    assert s["stopped_early"] and ckpt.read_sidecar(out + "/last")["epoch"] == 1
    s = train_stage(cfg, data, out, feature_cache=cache, resume=True)
    assert s["start_epoch"] == 1 and ckpt.read_sidecar(out + "/last")["epoch"] == 2
    model, meta = ckpt.load_model_from_checkpoint(out + "/best")
    assert meta["class_names"] == ["class0", "class1", "class2"]
    from lgff_core import storage

    assert len(storage.read_text(out + "/metrics.jsonl").splitlines()) == 2
