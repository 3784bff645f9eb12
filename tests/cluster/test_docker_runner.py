"""kfp.local's DockerRunner runs the whole train_and_index pipeline on real sample data (histolytics nuclei), every
task in the image as uid 1000 with a read-only root filesystem, no capabilities and no network; the metrics equal
those of the same pipeline under the SubprocessRunner in this venv."""
from __future__ import annotations

import os
import time

import pytest

from lgff_core.config import load_config
from lgff_core.kfp.pipeline import run_local

from .conftest import CONTAINER_HARDENING, REPORT_LINES

# tiny demo: 1 epoch, C=16 x 1 layer; the real crops, the real packaged EfficientNet-Lite0 weights
TINY_DEMO = [
    "train.epochs=1", "model.channels=16", "model.num_layers=1", "train.device=cpu",
    "embed.bf16=false", "embed.channels_last=false", "pipeline.retries=0", "pipeline.rows_per_task=800",
]
SOURCE = "samples:histolytics-nuclei"


def _run(root, cfg, runner=None):
    os.makedirs(root, exist_ok=True)
    os.chmod(root, 0o777)  # the tasks run as uid 1000 and write under the bind-mounted root
    t0 = time.time()
    result = run_local("train_and_index", cfg, pipeline_root=str(root), arguments={"source": SOURCE}, runner=runner)
    return result, time.time() - t0


# two full pipeline runs on 2 shared cores: measured 15 min for the image run alone under heavy load
@pytest.mark.timeout(3600)
def test_train_and_index_in_the_image_matches_the_venv_run(image, tmp_path):
    from kfp import local

    cfg = load_config("demo", TINY_DEMO + [f"pipeline.image={image}"])
    runner = local.DockerRunner(network_mode="none", **CONTAINER_HARDENING)
    in_image, seconds = _run(tmp_path / "docker-root", cfg, runner)
    assert in_image.executed == len(in_image.tasks) and in_image.cache_hits == 0
    for rec in in_image.tasks:
        REPORT_LINES.append(f"docker-runner {rec.display_name:32s} {rec.status}")
    REPORT_LINES.append(f"docker-runner train_and_index: {len(in_image.tasks)} tasks in {seconds:.0f} s")
    assert set(in_image.metrics) == {"model", "baseline"}

    in_venv, _ = _run(tmp_path / "venv-root", cfg)
    for label in ("model", "baseline"):
        a, b = in_image.metrics[label], in_venv.metrics[label]
        for key in ("eta_tot", "map", "recall@1"):
            if key in b:
                assert a[key] == pytest.approx(b[key], abs=1e-6), (label, key)
