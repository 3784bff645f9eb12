"""The inference model (`lgff models export`, the train task's ``model`` output): model.safetensors + model.json of a
training run's best/, without the optimizer / schedule / RNG state, the ArcFace class weights or last/. What embed,
explain, evaluate and serve load; the training directory (the ``checkpoints`` output) stays for --init / resume.

A real (tiny) training run of the train component: random-init EfficientNet-Lite0, LGFFN-E C=16, 32 px, 1 epoch."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from kfp.dsl import Artifact, Metrics, Model

import components as c
from lgff_core.cli import main
from lgff_core.config import config_to_dict, load_config
from lgff_core.retrieval.embed import embed_dataset, load_embedder
from lgff_core.data.embeddings import read_embeddings
from lgff_core.train import checkpoint as ckpt
from test_embed import make_dataset

TINY = {"model.backbone.weights": "none", "model.channels": 16, "model.num_layers": 1, "train.image_size": 32,
        "train.epochs": 1, "train.batch_size": 4, "train.device": "cpu", "loss.num_subcenters": 2,
        "embed.image_size": 32, "embed.batch_size": 5, "embed.bf16": False, "embed.channels_last": False,
        "embed.device": "cpu"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(dataset, training directory, inference model): the train component run for real (train + export)."""
    root = tmp_path_factory.mktemp("train")
    data = make_dataset(str(root / "data"), n=12)
    cfg = load_config(None, TINY)
    model, checkpoints = Model(uri=str(root / "model")), Artifact(uri=str(root / "checkpoints"))
    c.train.python_func(config_yaml=yaml.safe_dump(config_to_dict(cfg)), stage_name="s", data_uri=data,
                        data_fingerprint="f" * 64, model=model, checkpoints=checkpoints,
                        metrics=Metrics(uri=str(root / "metrics")))
    return data, Path(checkpoints.path), Path(model.path)


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_train_model_output_is_the_inference_weights_only(trained):
    _, run, model = trained
    # the training directory keeps what a resume needs
    assert {"best/optimizer.safetensors", "last/optimizer.safetensors", "best/loss.safetensors"} <= set(_files(run))
    # the model output (what embed / explain / evaluate download whole): weights + description, nothing else
    assert _files(model) == ["model.json", "model.safetensors"]
    assert (model / "model.safetensors").read_bytes() == (run / "best" / "model.safetensors").read_bytes()
    sidecar = json.loads((model / "model.json").read_text())
    best = json.loads((run / "best" / "model.json").read_text())
    assert sidecar["format"] == ckpt.MODEL_FORMAT and set(sidecar["files"]) == {ckpt.MODEL_FILE}
    assert "optimizer" not in sidecar and "schedule" not in sidecar and "optimizer" in best
    for key in ("config", "class_names", "embedding_dim", "backbone", "epoch"):
        assert sidecar[key] == best[key], key
    assert sidecar["preprocess"]["image_size"] == 32 and len(sidecar["preprocess"]["mean"]) == 3
    assert sidecar["checkpoint"]["epoch"] == best["epoch"]
    weights = (run / "best" / "model.safetensors").stat().st_size
    assert sum((model / f).stat().st_size for f in _files(model)) < weights + 64 * 1024 < sum(
        (run / f).stat().st_size for f in _files(run)) / 2


def test_inference_model_embeds_bitwise_like_the_training_directory(trained, tmp_path):
    data, run, model = trained
    cfg = load_config(None, TINY)
    from_run, from_model = load_embedder(str(run), cfg), load_embedder(str(model), cfg)
    # same weights and architecture: same fingerprint (embed outputs / index checks agree on the model)
    assert from_model.fingerprint == from_run.fingerprint
    embed_dataset(None, data, str(tmp_path / "run"), cfg, embedder=from_run)
    embed_dataset(None, data, str(tmp_path / "model"), cfg, embedder=from_model)
    a, b = read_embeddings(str(tmp_path / "run")), read_embeddings(str(tmp_path / "model"))
    assert list(a.ids) == list(b.ids) and a.xb.dtype == b.xb.dtype == np.float32
    assert np.array_equal(a.xb.view(np.uint32), b.xb.view(np.uint32))  # bit for bit
    # and the trained weights were loaded (a fresh build under the seed embeds differently)
    fresh = load_embedder(str(model), cfg)
    fresh.model.load_trainable_state_dict({k: v * 0 for k, v in fresh.model.trainable_state_dict().items()})
    embed_dataset(None, data, str(tmp_path / "zeroed"), cfg, embedder=fresh)
    assert not np.array_equal(read_embeddings(str(tmp_path / "zeroed")).xb, a.xb)


def test_export_of_an_inference_model_and_over_stale_training_files(trained, tmp_path):
    _, run, model = trained
    out = tmp_path / "out"
    out.mkdir()
    (out / ckpt.OPTIMIZER_FILE).write_bytes(b"stale")  # an earlier checkpoint at that prefix
    assert main(["-q", "models", "export", str(model), "--out", str(out)]) == 0
    assert _files(out) == ["model.json", "model.safetensors"]
    again = json.loads((out / "model.json").read_text())
    assert again["checkpoint"] == json.loads((model / "model.json").read_text())["checkpoint"]  # still names best/


def test_export_bad_input_exits_2_and_writes_nothing(trained, tmp_path, capsys):
    _, run, _ = trained
    out = tmp_path / "out"
    assert main(["-q", "models", "export", str(tmp_path / "nope"), "--out", str(out)]) == 2
    broken = tmp_path / "broken"
    shutil.copytree(run / "best", broken / "best")
    (broken / "best" / "model.safetensors").write_bytes(b"x" * (run / "best" / "model.safetensors").stat().st_size)
    assert main(["-q", "models", "export", str(broken), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lgff models: error: ") and "sha256" in err[-1] and "Traceback" not in "".join(err)
    assert not out.exists()
