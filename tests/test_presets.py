"""Strategy presets (issue 14): every preset compiles; a preset whose data is absent fails before any task with
the missing URI; the CPU twin of a strategy chain runs through kfp.local and its second stage starts from the
first stage's neck and head."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from lgff_core.config import CONFIG_DIR, load_config
from lgff_core.kfp.pipeline import PipelineError, compile_pipeline, run_local

PRESETS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
STRATEGIES = {"strategy_a": [None], "strategy_b1": [None, 28.6], "strategy_b2": [None, 17.2],
              "strategy_b3": [None, 5.73], "strategy_c": [None, 17.2, 17.2]}


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_strategy_presets_follow_the_thesis(name):
    cfg = load_config(name)
    margins = STRATEGIES[name]
    assert [s.overrides.get("loss.margin_deg") for s in cfg.strategy] == margins
    assert all(s.data and s.data.startswith("s3://") for s in cfg.strategy)
    assert cfg.strategy[0].name == "imagenet-1k" and cfg.train.epochs == 60
    t = cfg.train
    assert (t.lr, t.lr_min, t.batch_size, t.image_size, cfg.model.dropout) == (5e-3, 8e-5, 64, 224, 0.6)
    assert cfg.pipeline.source == cfg.strategy[-1].data


@pytest.mark.parametrize("name", [p for p in PRESETS if not p.startswith("lgffdm")])
def test_every_embedding_preset_compiles(name, tmp_path):
    cfg = load_config(name)
    spec = yaml.safe_load_all(Path(compile_pipeline("train_and_index", cfg, tmp_path / "p.yaml")).read_text())
    tasks = next(spec)["root"]["dag"]["tasks"]
    assert sum(t.startswith("train") for t in tasks) == len(cfg.strategy)


def test_running_a_preset_without_its_data_fails_at_once(tmp_path):
    with pytest.raises(PipelineError, match=r"dataset s3://lgff-datasets/imagenet-1k \(strategy\[0\]\.data "
                                            r"\(imagenet-1k\)\) (is missing|cannot be read)"):
        run_local("train_and_index", load_config("strategy_b2"), pipeline_root=str(tmp_path / "root"))
    assert not (tmp_path / "root").exists()  # nothing ran, nothing written
    missing = tmp_path / "no-such-dataset"
    cfg = load_config("strategy_cpu", [f"strategy=[{{name: a, data: '{missing}'}}]"])
    with pytest.raises(PipelineError, match=f"dataset {missing} .*is missing"):
        run_local("train_and_index", cfg, pipeline_root=str(tmp_path / "root"))


@pytest.mark.slow
def test_cpu_twin_chain_runs_and_stage_two_starts_from_stage_one(tmp_path):
    from lgff_core.train.checkpoint import load_tensors, read_sidecar

    cfg = load_config("strategy_cpu", ["pipeline.retries=0", "embed.bf16=false", "embed.channels_last=false"])
    result = run_local("train_and_index", cfg, pipeline_root=str(tmp_path / "root"))
    by_name = {t.display_name: t for t in result.tasks}
    assert {"prep", "prep-histolytics-tissue", "train-0-histolytics-tissue", "train-1-histolytics-nuclei",
            "report"} <= set(by_name)
    assert all(t.status == "executed" for t in result.tasks)
    stage1 = Path(by_name["train-0-histolytics-tissue"].outputs["checkpoints"]) / "best"
    stage2 = Path(by_name["train-1-histolytics-nuclei"].outputs["checkpoints"]) / "best"
    meta1, meta2 = read_sidecar(str(stage1)), read_sidecar(str(stage2))
    assert meta1["class_names"] == ["stroma", "tumor-nest"]
    assert meta2["class_names"] == ["connective", "inflammatory", "neoplastic"]
    assert Path(meta2["init"]) == stage1
    # on the weights: the stage-2 command of the chain (`lgff train --stage 1 --init <stage-1 run directory>`), run
    # with a vanishing learning rate, must hold exactly stage 1's stem / neck / head (BatchNorm running statistics
    # still move in train mode, so they are left out)
    from lgff_core.cli import main

    nuclei = by_name["prep"].outputs["dataset"]
    out = tmp_path / "stage2-lr0"
    assert main(["-q", "train", "--config", "strategy_cpu", "--stage", "1", "--data", nuclei, "--out", str(out),
                 "--init", str(stage1.parent), "--set", "train.epochs=1", "--set", "train.lr=1.0e-12",
                 "--set", "train.lr_min=0.0", "--set", "train.weight_decay=0.0", "--set", "train.warmup_epochs=0.0",
                 "--set", "embed.bf16=false", "--set", "embed.channels_last=false"]) == 0
    w1, w2 = load_tensors(str(stage1)), load_tensors(str(out / "best"))
    learned = [k for k in w1 if "running_" not in k and "num_batches" not in k]
    assert len(learned) > 20 and {"neck", "head", "stem"} <= {k.split(".")[0] for k in learned}
    for k in learned:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-6, msg=k)
    # and a chain's stage 2 trained normally moved away from it
    assert any(not torch.equal(load_tensors(str(stage2))[k], w1[k]) for k in learned)
    assert meta2["config"]["loss"]["margin_deg"] == 17.2 and meta1["config"]["loss"]["margin_deg"] == 28.6
    assert set(result.metrics) == {"model", "baseline"}
