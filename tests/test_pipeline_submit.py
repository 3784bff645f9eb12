"""`lgff pipeline submit|schedule` through the real ``kfp.Client`` against a recording v2beta1 API on 127.0.0.1
(`kfp_api_server.py`): what a KFP API server receives (the pipeline spec with each task's caching, the run's runtime
config, auth headers, namespace, service account), the minimum backend check, and the docs' submit examples."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from kfp_api_server import kfp_api  # noqa: F401  (fixture)
from lgff_core.cli import main

REPO = Path(__file__).resolve().parent.parent
ROOT = "s3://lgff-artifacts/pipeline-root"
REINDEX_ARGS = ["--arg", "model_uri=s3://b/m", "--arg", "data_uri=s3://b/d"]


@pytest.fixture(autouse=True)
def _no_ambient_credentials(monkeypatch, tmp_path):
    for var in ("KF_PIPELINES_TOKEN", "KF_PIPELINES_SA_TOKEN_PATH", "KF_PIPELINES_ENDPOINT",
                "KF_PIPELINES_DEFAULT_EXPERIMENT_NAME", "KF_PIPELINES_OVERRIDE_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)


def _submit(api, *extra: str, name: str = "reindex") -> int:
    return main(["pipeline", "submit", name, "--config", "lgffem_cpu", "--set", f"pipeline.pipeline_root={ROOT}",
                 "--host", api.url, *(REINDEX_ARGS if name == "reindex" else []), *extra])


def _schedule(api, *extra: str) -> int:
    return main(["pipeline", "schedule", "reindex", "--config", "lgffem_cpu", "--set",
                 f"pipeline.pipeline_root={ROOT}", "--host", api.url, "--cron", "0 3 * * *", *REINDEX_ARGS, *extra])


def _root_tasks(body: dict) -> dict[str, dict]:
    spec = body["pipeline_spec"]
    spec = spec.get("pipeline_spec", spec)  # {"pipeline_spec", "platform_spec"} when a platform spec exists
    return spec["root"]["dag"]["tasks"]


def test_submit_keeps_scan_uncached_and_sends_the_pipeline_root(kfp_api, capsys):
    assert _submit(kfp_api, "--experiment", "e1", "--run-name", "r1") == 0
    (run,) = kfp_api.bodies("POST", "/apis/v2beta1/runs")
    tasks = _root_tasks(run)
    spec = run["pipeline_spec"].get("pipeline_spec", run["pipeline_spec"])
    assert spec["pipelineInfo"]["name"] == "lgff-reindex"
    # scan fingerprints what was published at a URI: a cache hit would hide republished data
    assert not tasks["scan"].get("cachingOptions", {}).get("enableCache", False)
    assert tasks["plan"]["cachingOptions"]["enableCache"] is True  # the others keep the compiled choice
    # the backend takes the root from the run (else the namespace's kfp-launcher ConfigMap), never from the spec
    assert run["runtime_config"]["pipeline_root"] == ROOT
    assert run["runtime_config"]["parameters"] == {"model_uri": "s3://b/m", "data_uri": "s3://b/d"}
    assert run["display_name"] == "r1"
    (exp,) = kfp_api.experiments
    assert exp["display_name"] == "e1" and run["experiment_id"] == exp["experiment_id"]
    assert "submitted reindex" in capsys.readouterr().out


def test_schedule_keeps_scan_uncached_sends_the_root_and_never_catches_up(kfp_api):
    assert _schedule(kfp_api, "--service-account", "sa-1") == 0
    (job,) = kfp_api.bodies("POST", "/apis/v2beta1/recurringruns")
    assert not _root_tasks(job)["scan"].get("cachingOptions", {}).get("enableCache", False)
    assert job["runtime_config"]["pipeline_root"] == ROOT
    assert job["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * *"  # 5-field cron -> KFP's seconds-first form
    assert job["no_catchup"] is True and job["service_account"] == "sa-1" and int(job["max_concurrency"]) == 1
    assert job["experiment_id"] == kfp_api.experiments[0]["experiment_id"]
    assert _schedule(kfp_api, "--catchup") == 0
    assert kfp_api.bodies("POST", "/apis/v2beta1/recurringruns")[-1]["no_catchup"] is False
    assert len(kfp_api.experiments) == 1  # the second schedule found the experiment instead of creating another


def test_caching_off_in_the_config_stays_off_for_every_task(kfp_api):
    assert _submit(kfp_api, "--set", "pipeline.enable_caching=false") == 0
    (run,) = kfp_api.bodies("POST", "/apis/v2beta1/runs")
    assert not any(t.get("cachingOptions", {}).get("enableCache", False) for t in _root_tasks(run).values())


@pytest.mark.parametrize("tag", ["2.16.1", "2.4.0", "1.8.22"])
def test_a_backend_older_than_2_17_is_refused_with_one_line(kfp_api, capsys, tag):
    kfp_api.tag_name = tag
    assert _submit(kfp_api) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert tag in err and "2.17" in err and "OneOf" in err
    assert _schedule(kfp_api) == 2
    assert not kfp_api.bodies("POST", "/apis/v2beta1/runs") and not kfp_api.bodies("POST", "/apis/v2beta1/recurringruns")
    assert not kfp_api.experiments  # refused before anything was created


@pytest.mark.parametrize("tag", ["2.17.0", "v2.17.1", "2.18.0-rc.1", "3.0.0"])
def test_a_backend_of_2_17_or_later_is_accepted(kfp_api, tag):
    kfp_api.tag_name = tag
    assert _submit(kfp_api) == 0
    assert ("GET", "/apis/v2beta1/healthz") in kfp_api.calls()


def test_a_backend_without_a_release_tag_needs_the_explicit_skip(kfp_api, capsys):
    kfp_api.tag_name = ""
    assert _submit(kfp_api) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--skip-backend-check" in err
    assert _submit(kfp_api, "--skip-backend-check") == 0
    assert len(kfp_api.bodies("POST", "/apis/v2beta1/runs")) == 1


def test_a_local_pipeline_root_is_refused_before_any_request(kfp_api, capsys):
    code = main(["pipeline", "submit", "reindex", "--config", "lgffem_cpu", "--host", kfp_api.url, *REINDEX_ARGS])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pipeline.pipeline_root" in err and "runs/pipeline-root" in err
    assert kfp_api.requests == []


def test_submit_to_multi_user_kubeflow_sends_token_namespace_and_service_account(kfp_api, monkeypatch, capsys):
    kfp_api.multi_user = True
    monkeypatch.setenv("KF_PIPELINES_TOKEN", "tok-from-env")
    assert _submit(kfp_api, "--namespace", "team-a", "--service-account", "lgff-pipeline-runner") == 0
    assert {r.headers.get("authorization") for r in kfp_api.requests} == {"Bearer tok-from-env"}
    (exp,) = kfp_api.experiments
    assert exp["namespace"] == "team-a"
    lookups = [r for r in kfp_api.requests if r.method == "GET" and r.path.endswith("/experiments")]
    assert lookups and all(r.query["namespace"] == ["team-a"] for r in lookups)
    (run,) = kfp_api.bodies("POST", "/apis/v2beta1/runs")
    assert run["service_account"] == "lgff-pipeline-runner"
    assert "tok-from-env" not in capsys.readouterr().out
    # an explicit --token wins over the environment
    kfp_api.requests.clear()
    assert _submit(kfp_api, "--token", "tok-cli") == 0
    assert {r.headers.get("authorization") for r in kfp_api.requests} == {"Bearer tok-cli"}


def test_schedule_authenticates_with_the_projected_service_account_token(kfp_api, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("projected-sa-token")
    assert _schedule(kfp_api, "--namespace", "team-a", "--sa-token-file", str(token_file)) == 0
    assert {r.headers.get("authorization") for r in kfp_api.requests} == {"Bearer projected-sa-token"}
    kfp_api.requests.clear()
    assert _schedule(kfp_api, "--sa-token-file", str(tmp_path / "missing")) == 2
    assert kfp_api.requests == []


def test_bad_cron_is_refused_before_any_request(kfp_api, capsys):
    code = main(["pipeline", "schedule", "reindex", "--config", "lgffem_cpu", "--set", f"pipeline.pipeline_root={ROOT}",
                 "--host", kfp_api.url, "--cron", "every day", *REINDEX_ARGS])
    assert code == 2 and "cron" in capsys.readouterr().err
    assert kfp_api.requests == []


# ------------------------------------------------------------------------------------------------ the docs' commands
def _bash_blocks(path: Path) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", path.read_text(), re.S)


def _commands(block: str) -> list[list[str]]:
    """The block's shell commands (continuation lines joined, comments dropped), each split like the shell does."""
    joined = re.sub(r"\\\n", " ", block)
    return [shlex.split(line, comments=True) for line in joined.splitlines() if line.strip() and
            not line.lstrip().startswith("#")]


def _sets(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]


@pytest.mark.parametrize("doc", ["README.md", "docs/cluster.md"])
def test_docs_submit_and_schedule_carry_the_compile_time_settings(doc):
    """submit / schedule compile the pipeline themselves: an example that drops the `--set` of the compile example
    next to it submits another pipeline (the preset's local root, no endpoint)."""
    checked = 0
    for block in _bash_blocks(REPO / doc):
        cmds = [c for c in _commands(block) if c[:2] == ["lgff", "pipeline"]]
        compiles = [c for c in cmds if c[2] == "compile"]
        remote = [c for c in cmds if c[2] in ("submit", "schedule")]
        if not compiles or not remote:
            continue
        wanted = set(_sets(compiles[0]))
        assert any(s.startswith("pipeline.pipeline_root=s3://") for s in wanted), compiles[0]
        for cmd in remote:
            assert wanted <= set(_sets(cmd)), f"{doc}: {' '.join(cmd)} drops {wanted - set(_sets(cmd))}"
            checked += 1
    assert checked >= 2, f"{doc}: no submit / schedule example next to a compile example"


@pytest.mark.parametrize("doc", ["README.md", "docs/cluster.md"])
def test_docs_state_the_minimum_backend_and_why(doc):
    text = (REPO / doc).read_text()
    assert re.search(r"(?i)minimum (KFP )?backend[^.]*2\.17", text), doc
    for ref in ("#13436", "#11725", "2.14", "2.4"):
        assert ref in text, f"{doc} does not say why: {ref}"


# ------------------------------------------------------------------------------- the environment in the cache key
def _executor_tasks(spec: dict) -> dict[tuple[str, str], dict]:
    dags = {"root": spec["root"]["dag"]["tasks"]}
    dags.update({name: comp["dag"]["tasks"] for name, comp in spec["components"].items() if "dag" in comp})
    return {(dag, name): task for dag, tasks in dags.items() for name, task in tasks.items()
            if "dag" not in spec["components"][task["componentRef"]["name"]]}


@pytest.mark.parametrize("name", ["train_and_index", "reindex"])
def test_a_new_root_or_endpoint_changes_the_cache_key_of_every_task_that_writes_data(tmp_path, name):
    """KFP's cache key (driver/cache.go getFingerPrint) holds a task's parameters, input artifacts, command and image,
    not its environment: a task that writes artifacts must see the store in a parameter, or read an artifact of a
    task that does, or a run against a new root / endpoint is handed pointers into the old store."""
    import yaml

    from lgff_core.config import load_config
    from lgff_core.kfp.pipeline import compile_pipeline

    specs = {}
    for env, sets in {"a": [f"pipeline.pipeline_root={ROOT}"],
                      "b": ["pipeline.pipeline_root=s3://other/root", "pipeline.s3_endpoint=http://minio:9000"]}.items():
        cfg = load_config("lgffem_cpu", sets + ["pipeline.sharded_index=true"])
        text = Path(compile_pipeline(name, cfg, tmp_path / f"{env}.yaml")).read_text()
        specs[env] = next(yaml.load_all(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)))
    a, b = _executor_tasks(specs["a"]), _executor_tasks(specs["b"])
    checked = []
    for key, task in a.items():
        component = specs["a"]["components"][task["componentRef"]["name"]]
        writes_artifacts = bool(component.get("outputDefinitions", {}).get("artifacts"))
        if not writes_artifacts or not task.get("cachingOptions", {}).get("enableCache"):
            continue  # plan emits parameters only; scan is never cached
        if task.get("inputs", {}).get("artifacts"):
            continue  # its key holds its input artifacts' identities: it follows the task that wrote them
        if any("taskOutputParameter" in p for p in task.get("inputs", {}).get("parameters", {}).values()):
            continue  # it reads pointers an upstream task wrote under the root (collected bulk prefixes): it follows them

        def constants(t):
            return {n: p["runtimeValue"]["constant"] for n, p in t.get("inputs", {}).get("parameters", {}).items()
                    if "runtimeValue" in p}

        changed = [n for n, v in constants(task).items() if constants(b[key]).get(n) != v]
        assert changed, f"{name}: task {key[1]} would be a cache hit under another root / endpoint"
        checked.append(key[1])
    assert checked  # e.g. prep / train / embed-baseline in train_and_index, the embed loop in reindex
