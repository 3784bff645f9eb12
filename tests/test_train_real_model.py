"""Training stage with the real LGFFEM (tf_efficientnet_lite0, random weights, 64 px, C=16): integration checks."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lgff_core.config import apply_overrides, load_config
from lgff_core.data.transforms import eval_transform
from lgff_core.errors import CheckpointError
from lgff_core.train import checkpoint as ckpt
from lgff_core.train import train_stage
from lgff_core.train.embedding import _iter_split_batches, recall_at_1
from lgff_core.train.loop import StopTraining
from test_train_support import make_dataset

SMALL = ["model.backbone.weights=none", "model.channels=16", "model.num_layers=1", "train.epochs=2",
         "train.batch_size=12", "train.image_size=64", "loss.scale=16.0", "loss.num_subcenters=2",
         "embed.bf16=false", "embed.channels_last=false"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    data = make_dataset(root / "data", n_per_class=(8, 3, 2), size=48)
    cfg = load_config("lgffem_cpu", SMALL)
    summary = train_stage(cfg, data, str(root / "run"), feature_cache=str(root / "cache"))
    return root, data, cfg, summary


def _embed(model, data, split, size):
    tf = eval_transform(model.backbone.data_config, size)
    xs, ys = [], []
    with torch.no_grad():
        for b in _iter_split_batches(data, split, tf, 16):
            xs.append(model(b["image"]))
            ys.append(b["label"].numpy())
    return torch.cat(xs), np.concatenate(ys)


def test_reloaded_checkpoint_reproduces_validation(setup):
    """load_model_from_checkpoint + an image-path embedding gives the val Recall@1 logged from the feature cache."""
    root, data, cfg, summary = setup
    model, meta = ckpt.load_model_from_checkpoint(str(root / "run/last"))
    assert meta["backbone"]["weights_hash"] == "random:seed=0" and meta["epoch"] == 2
    xb, yb = _embed(model, data, "train", 64)
    xq, yq = _embed(model, data, "val", 64)
    assert xb.shape[1] == 4 * 16 and torch.allclose(xb.norm(dim=1), torch.ones(len(xb)), atol=1e-5)
    rows = [json.loads(l) for l in open(root / "run/metrics.jsonl")]
    assert recall_at_1(xq, yq, xb, yb) == pytest.approx(rows[-1]["val_recall@1"])


def test_cached_features_match_image_path(setup):
    root, data, cfg, _ = setup
    from lgff_core.train.feature_cache import _load

    model, _ = ckpt.load_model_from_checkpoint(str(root / "run/last"))
    manifests = [json.loads(p.read_text()) for p in (root / "cache").glob("*/_cache.json")]
    train_manifest = next(m for m in manifests if m["key"]["split"] == "train")
    digest = next(p.parent.name for p in (root / "cache").glob("*/_cache.json")
                  if json.loads(p.read_text())["key"]["split"] == "train")
    cache = _load(str(root / "cache" / digest), train_manifest)
    x_img, y_img = _embed(model, data, "train", 64)
    with torch.no_grad():
        x_cache = model.forward_head(cache.batch(np.arange(len(cache))))
    assert np.array_equal(cache.labels, y_img)
    cos = (x_img * x_cache).sum(dim=1)
    assert float(cos.min()) > 0.999  # float16 storage of the features


def test_init_from_other_backbone_refused(setup, tmp_path):
    root, data, cfg, _ = setup
    other = apply_overrides(cfg, {"seed": 1})  # a different random backbone
    with pytest.raises(CheckpointError, match="same frozen backbone"):
        train_stage(other, data, str(tmp_path / "x"), init=str(root / "run/best"))
    assert not (tmp_path / "x").exists()


def test_resume_real_model_image_path_bitwise(setup, tmp_path):
    """Augmented image path with the real neck: stop after epoch 1, resume -> same weights as one run."""
    _, data, cfg, _ = setup
    full = str(tmp_path / "full")
    train_stage(cfg, data, full)

    def stop(row):
        raise StopTraining

    part = str(tmp_path / "part")
    train_stage(cfg, data, part, on_epoch_end=stop)
    train_stage(cfg, data, part, resume=True)
    a, b = ckpt.load_tensors(full + "/last"), ckpt.load_tensors(part + "/last")
    for k in a:
        assert torch.equal(a[k], b[k]), k
