"""Issue 9 defects at component / compile level, under the launcher's artifact contract (an artifact's ``.uri`` is
``s3://...`` while its ``.path`` is the pod-local copy). The end-to-end proofs are in test_pipeline_cluster.py."""
from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from kfp.dsl import Artifact, Dataset, Metrics

import components as c
from lgff_core.kfp import runtime as pipeline_runtime
from lgff_core import storage
from lgff_core.config import load_config
from lgff_core.kfp.pipeline import compile_pipeline
from s3_server import s3_env  # noqa: F401  (fixture)


def _pod_artifact(cls, uri: str, pod: Path):
    """An artifact as the launcher hands it to a pod: s3:// URI, local path /s3/<bucket>/<key> under the pod."""
    art = cls(uri=uri)
    art.custom_path = str(pod / "s3" / uri[len("s3://"):])
    return art


def test_defect1_evaluate_runs_against_an_s3_pipeline_root(s3_env, tmp_path, monkeypatch):
    root = s3_env.new_prefix("root")
    monkeypatch.setenv("LGFF_PIPELINE_ROOT", root)  # set on every task by the pipelines
    monkeypatch.setenv("LGFF_DIRECT_ARTIFACT_IO", "1")  # what the pipelines used to compile in (now ignored)
    pod = tmp_path / "pod"
    index = _pod_artifact(Artifact, f"{root}/p/run/index/index", pod)
    Path(index.path).mkdir(parents=True)
    (Path(index.path) / "index.json").write_text(json.dumps({"bulk": {"prefix": f"{root}/.bulk/p/run/index/index"}}))

    def fake_cli(argv):
        out = argv[argv.index("--out") + 1]
        storage.write_text(storage.join(out, "neighbors.parquet"), "n")
        storage.write_text(storage.join(out, "metrics.json"), json.dumps({"metrics": {"recall@1": 0.5}}))

    monkeypatch.setattr(pipeline_runtime, "run_cli", fake_cli)
    results = _pod_artifact(Dataset, f"{root}/p/run/evaluate/results", pod)
    metrics = _pod_artifact(Metrics, f"{root}/p/run/evaluate/metrics", pod)
    c.evaluate.python_func(config_yaml="{}", label="model", embeddings=_pod_artifact(Dataset, f"{root}/e", pod),
                           index=index, results=results, metrics=metrics)
    assert metrics.metadata == {"recall@1": 0.5}
    # the report task (another pod) gets the local copy of `results`: metrics.json is there, neighbours by URI
    local = json.loads((Path(results.path) / "metrics.json").read_text())
    assert local["metrics"]["recall@1"] == 0.5
    assert storage.exists(local["bulk"]["files"][0]["uri"]) and local["bulk"]["files"][0]["uri"].startswith("s3://")
    assert not storage.list_files(results.uri)  # nothing under the artifact's own prefix: the launcher uploads it


def _compiled(tmp_path, overrides):
    path = compile_pipeline("train_and_index", load_config("lgffem_cpu", overrides), tmp_path / "t.yaml")
    return next(yaml.safe_load_all(Path(path).read_text()))


def _envs(spec):
    return {label: {e["name"]: e["value"] for e in ex["container"].get("env", [])}
            for label, ex in spec["deploymentSpec"]["executors"].items() if "container" in ex}


def test_defect5_cpu_presets_request_no_gpu_and_gpu_stages_use_the_gpu_image(tmp_path):
    for preset in ("lgffem_cpu", "demo", "lgffdm_cpu"):
        assert load_config(preset).pipeline.gpu_count == 0, preset
    cpu = _compiled(tmp_path, [])
    for label, ex in cpu["deploymentSpec"]["executors"].items():
        assert "accelerator" not in ex["container"].get("resources", {}), label
        assert ex["container"]["image"] == "ghcr.io/lgff/lgff:0.1.0", label
    gpu = _compiled(tmp_path, ["pipeline.gpu_count=2", "pipeline.gpu_image=registry/lgff:cuda"])
    execs = gpu["deploymentSpec"]["executors"]
    for label, ex in execs.items():
        is_gpu = label.startswith(("exec-train", "exec-embed"))
        assert (ex["container"]["image"] == "registry/lgff:cuda") == is_gpu, label
        assert ("accelerator" in ex["container"].get("resources", {})) == is_gpu, label
    train = [t for t in gpu["root"]["dag"]["tasks"].values() if t["componentRef"]["name"].startswith("comp-train")]
    assert train[0]["inputs"]["parameters"]["nproc"]["runtimeValue"]["constant"] == 2


def test_defect6_every_task_gets_endpoint_and_region_and_the_readme_sets_the_endpoint(tmp_path):
    envs = _envs(_compiled(tmp_path, ["pipeline.s3_endpoint=http://lgff-minio.lgff-dev:9000"]))
    for label, env in envs.items():
        assert env["AWS_ENDPOINT_URL"] == "http://lgff-minio.lgff-dev:9000", label
        assert env["AWS_REGION"] == "us-east-1", label
        assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(env), label  # from the Secret only
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    compile_cmd = re.search(r"lgff pipeline compile .*?--out", readme, re.S).group(0)
    assert "pipeline.s3_endpoint=http://lgff-minio" in compile_cmd
