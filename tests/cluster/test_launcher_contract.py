"""Both compiled pipelines under the KFP v2 launcher's contract (tests/kfp_launcher), every task in its own
container of the image, sharing nothing but a moto S3 server on 127.0.0.1 and an ``s3://`` pipeline root.
Prints per task the bytes the "launcher" downloaded and the time it took."""
from __future__ import annotations

import pytest

from lgff_core.config import load_config
from lgff_core.pipeline import compile_pipeline
from s3_server import FAKE_ENV, s3_env  # noqa: F401  (session fixture)

from .conftest import REPORT_LINES
from .test_docker_runner import SOURCE, TINY_DEMO

launcher = pytest.importorskip("kfp_launcher.runner", reason="the launcher-contract runner (tests/kfp_launcher)")


def _launch(name, cfg, tmp_path, s3_env, image, arguments):
    package = compile_pipeline(name, cfg, tmp_path / f"{name}.yaml")
    result = launcher.run_pipeline(
        package, pipeline_root=cfg.pipeline.pipeline_root, arguments=arguments, executor="docker", image=image,
        cache_path=str(tmp_path / "launcher-cache.json"), s3_endpoint=s3_env.endpoint,
        env={"AWS_ENDPOINT_URL": s3_env.endpoint, "AWS_REGION": FAKE_ENV["AWS_REGION"]},
        secrets={cfg.pipeline.s3_secret: {k: FAKE_ENV[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}})
    REPORT_LINES.append(f"launcher-contract {name} ({image}):")
    REPORT_LINES.extend(result.summary_table().splitlines())
    return result


def test_train_and_index_under_the_launcher_contract(image, tmp_path, s3_env):
    root = s3_env.new_prefix("pipeline-root")
    cfg = load_config("demo", TINY_DEMO + [f"pipeline.image={image}", f"pipeline.pipeline_root={root}"])
    trained = _launch("train_and_index", cfg, tmp_path, s3_env, image, {"source": SOURCE})
    assert trained.count("executed") > 0 and not [t for t in trained.tasks if t.status == "failed"]
    evaluated = [t for t in trained.tasks if t.display_name.startswith("evaluate")]
    assert evaluated and all(t.status == "executed" for t in evaluated)
