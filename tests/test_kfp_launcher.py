"""The launcher-contract runner (tests/kfp_launcher) on toy pipelines compiled with kfp: values flow through
parameters and artifacts that really travel through the moto S3 server, fan-out / Collected, importer, conditions,
env + secrets, KFP-style caching, and spec parsing that rejects unknown fields."""
import json
import os
import shutil
from typing import List

import pytest
import yaml
from google.protobuf import json_format
from kfp import compiler, dsl, kubernetes
from kfp.dsl import Artifact, Dataset, Input, Output
from kfp.pipeline_spec import pipeline_spec_pb2 as pb

from kfp_launcher import (DriverError, DriverFailed, TaskFailed, UnsupportedFeature, parse_pipeline_spec, run_pipeline,
                          type_flow_problems)
from kfp_launcher.driver import check_parameters
from s3_server import s3_env  # noqa: F401  (fixture)

boto3 = pytest.importorskip("boto3")
# never pulled by the subprocess executor; it enters the cache key like on a cluster
IMAGE = "python:3.11"


# ------------------------------------------------------------------------------------------------ toy components

@dsl.component(base_image=IMAGE, install_kfp_package=False)
def make(text: str, out: Output[Dataset]) -> int:
    import os

    with open(out.path, "w") as f:
        f.write(text)
    out.metadata["chars"] = len(text)
    # outside the output paths: must not reach any later task
    with open(os.path.join(os.path.dirname(out.path), "stray.txt"), "w") as f:
        f.write("stray")
    with open(os.path.expanduser("~/home-leak.txt"), "w") as f:
        f.write("leak")
    return len(text)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def tree(files: int, out: Output[Artifact]):
    import os

    os.makedirs(os.path.join(out.path, "sub"))
    for i in range(files):
        with open(os.path.join(out.path, "sub" if i % 2 else "", f"f{i}.bin"), "wb") as f:
            f.write(bytes(100 * (i + 1)))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def consume(n: int, data: Input[Dataset], folder: Input[Artifact], report: Output[Dataset]) -> str:
    import json
    import os

    files = sorted(os.path.relpath(os.path.join(d, f), folder.path) for d, _, fs in os.walk(folder.path) for f in fs)
    facts = {
        "text": open(data.path).read(), "n": n, "chars": data.metadata["chars"], "files": files,
        "stray": os.path.exists(os.path.join(os.path.dirname(data.path), "stray.txt")),
        "home_leak": os.path.exists(os.path.expanduser("~/home-leak.txt")),
        "launcher_env": sorted(k for k in os.environ if k.startswith("KFP_LAUNCHER_")),
        "endpoint": os.environ.get("AWS_ENDPOINT_URL", ""),
        "path_prefix": data.path.split("/s3/")[0] + "/s3/",
        "uid": os.getuid(), "root_fs_writable": os.access("/", os.W_OK),
    }
    with open(report.path, "w") as f:
        json.dump(facts, f)
    return facts["text"] * 2


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def constant() -> str:
    return "same"


@dsl.pipeline(name="chain")
def chain(text: str = "hello", files: int = 3):
    m = make(text=text)
    t = tree(files=files)
    consume(n=m.outputs["Output"], data=m.outputs["out"], folder=t.outputs["out"])
    constant()


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def plan(n: int) -> List[dict]:
    return [{"i": i, "name": f"block{i}"} for i in range(n)]


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def work(block: dict, src: Input[Dataset], part: Output[Artifact]) -> str:
    with open(src.path) as f, open(part.path, "w") as g:
        g.write(f"{f.read()}-{block['i']}")
    return block["name"]


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def gather(parts: List[Artifact], names: List[str], squares: List[int], out: Output[Dataset]) -> str:
    text = ",".join(open(p.path).read() for p in parts)
    with open(out.path, "w") as f:
        f.write(text)
    return f"{text}|{','.join(names)}|{sum(squares)}"


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def square(x: int) -> int:
    return x * x


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def flag(value: str) -> str:
    import os

    return f"{value}:{os.environ.get('FOO', '')}:{os.environ.get('SECRET_TOKEN', '')}"


@dsl.pipeline(name="fanout")
def fanout(n: int = 3, uri: str = "") -> str:
    src = dsl.importer(artifact_uri=uri, artifact_class=Dataset, reimport=False)
    p = plan(n=n)
    with dsl.ParallelFor(p.output, parallelism=2) as block:
        w = work(block=block, src=src.output)
    with dsl.ParallelFor([1, 2, 3]) as x:
        sq = square(x=x)
    g = gather(parts=dsl.Collected(w.outputs["part"]), names=dsl.Collected(w.outputs["Output"]),
               squares=dsl.Collected(sq.output))
    with dsl.If(n > 2):
        big = flag(value="big")
        big.set_env_variable("FOO", "bar")
        kubernetes.use_secret_as_env(big, secret_name="tokens", secret_key_to_env={"token": "SECRET_TOKEN"})
    with dsl.Else():
        flag(value="small")
    return g.outputs["Output"]


def _compile(func, tmp_path) -> str:
    path = str(tmp_path / f"{func.name}.yaml")
    compiler.Compiler().compile(func, path)
    return path


def _read(s3_env, uri: str) -> bytes:
    bucket, _, key = uri[len("s3://"):].partition("/")
    client = boto3.client("s3", endpoint_url=s3_env.endpoint)
    return client.get_object(Bucket=bucket, Key=key)["Body"].read()


def _put(s3_env, uri: str, data: bytes) -> None:
    bucket, _, key = uri[len("s3://"):].partition("/")
    boto3.client("s3", endpoint_url=s3_env.endpoint).put_object(Bucket=bucket, Key=key, Body=data)


# ------------------------------------------------------------------------------------------------ tests

def test_chain_moves_artifacts_through_s3_and_sandboxes_tasks(s3_env, tmp_path):
    root = s3_env.new_prefix("root")
    result = run_pipeline(_compile(chain, tmp_path), pipeline_root=root, arguments={"text": "héllo"},
                          executor="subprocess", cache_path=None, env={}, secrets={})
    by_name = {t.name: t for t in result.tasks}
    assert set(by_name) == {"make", "tree", "consume", "constant"}
    assert all(t.status == "executed" for t in result.tasks)

    made = by_name["make"]
    out_uri = made.outputs["out"][0]["uri"]
    assert out_uri.startswith(f"{root}/chain/{result.run_id}/make/") and out_uri.endswith("/out")
    assert _read(s3_env, out_uri) == "héllo".encode()  # the launcher uploaded the output path
    assert made.outputs["out"][0]["metadata"] == {"chars": 5}  # metadata from the executor output
    assert made.parameters == {"Output": 5} and made.bytes_uploaded == len("héllo".encode())
    assert by_name["tree"].bytes_uploaded == 100 + 200 + 300

    used = by_name["consume"]
    facts = json.loads(_read(s3_env, used.outputs["report"][0]["uri"]))
    assert facts["text"] == "héllo" and facts["n"] == 5 and facts["chars"] == 5
    assert facts["files"] == ["f0.bin", "f2.bin", "sub/f1.bin"]  # a directory artifact, recursively
    assert facts["stray"] is False and facts["home_leak"] is False  # nothing outside output paths leaks
    assert facts["launcher_env"] == [] and facts["endpoint"] == ""  # the task sees only its own env
    assert facts["path_prefix"] != "/s3/" and facts["path_prefix"].endswith("/s3/")  # a sandbox mount root
    assert used.bytes_downloaded == len("héllo".encode()) + 600  # exactly its inputs
    assert used.parameters == {"Output": "héllohéllo"}
    assert "consume" in result.summary_table() and "executed" in result.summary_table()


def test_second_run_hits_cache_and_a_changed_parameter_reruns_only_dependants(s3_env, tmp_path):
    package, cache = _compile(chain, tmp_path), str(tmp_path / "cache.json")
    root = s3_env.new_prefix("root")
    first = run_pipeline(package, pipeline_root=root, arguments={"text": "abc"}, cache_path=cache)
    assert first.count("executed") == 4

    second = run_pipeline(package, pipeline_root=root, arguments={"text": "abc"}, cache_path=cache)
    assert [t.status for t in second.tasks] == ["cached"] * 4
    assert sum(t.bytes_downloaded + t.bytes_uploaded for t in second.tasks) == 0
    assert ({t.name: t.outputs["report"][0]["uri"] for t in second.tasks if t.name == "consume"} ==
            {t.name: t.outputs["report"][0]["uri"] for t in first.tasks if t.name == "consume"})

    third = run_pipeline(package, pipeline_root=root, arguments={"text": "abcd"}, cache_path=cache)
    status = {t.name: t.status for t in third.tasks}
    assert status == {"make": "executed", "consume": "executed", "tree": "cached", "constant": "cached"}
    assert next(t for t in third.tasks if t.name == "consume").parameters == {"Output": "abcdabcd"}

    no_cache = run_pipeline(package, pipeline_root=root, arguments={"text": "abc"}, cache_path=None)
    assert no_cache.count("executed") == 4  # the cache lives in the file, not in the object store


def test_fanout_collected_importer_condition_env_and_secrets(s3_env, tmp_path):
    source = s3_env.new_prefix("source.txt")
    _put(s3_env, source, b"src")
    package, cache = _compile(fanout, tmp_path), str(tmp_path / "cache.json")
    root = s3_env.new_prefix("root")
    kwargs = dict(pipeline_root=root, cache_path=cache, secrets={"tokens": {"token": "t0k"}})
    result = run_pipeline(package, arguments={"n": 3, "uri": source}, **kwargs)

    works = [t for t in result.tasks if t.name == "work"]
    assert [t.iteration for t in works] == [0, 1, 2]
    assert [t.parameters["Output"] for t in works] == ["block0", "block1", "block2"]
    assert all(t.bytes_downloaded == 3 for t in works)  # each iteration downloads the imported source
    assert [t.parameters["Output"] for t in result.tasks if t.name == "square"] == [1, 4, 9]
    gathered = next(t for t in result.tasks if t.name == "gather")
    assert gathered.parameters["Output"] == "src-0,src-1,src-2|block0,block1,block2|14"
    assert gathered.bytes_downloaded == 3 * len("src-0")
    assert result.outputs["parameters"]["Output"] == gathered.parameters["Output"]  # pipeline output
    imported = next(t for t in result.tasks if t.name == "importer")
    assert imported.status == "imported" and imported.outputs["artifact"][0]["uri"] == source
    assert [(t.name, t.parameters["Output"]) for t in result.tasks if t.name.startswith("flag")] == [
        ("flag", "big:bar:t0k")]  # set_env_variable + secretAsEnv; the Else branch never ran
    assert [(t.name, t.status) for t in result.tasks if t.name.startswith("condition-")] == [
        ("condition-6", "skipped")]

    # reimport=False: the same URI is the same artifact, so new bytes at that URI are still cache hits (KFP's
    # cache key follows artifact identity, not content)
    _put(s3_env, source, b"NEW")
    again = run_pipeline(package, arguments={"n": 3, "uri": source}, **kwargs)
    assert {t.status for t in again.tasks if t.name not in ("importer", "condition-6")} == {"cached"}
    assert next(t for t in again.tasks if t.name == "gather").parameters == gathered.parameters

    with pytest.raises(ValueError, match="secret 'tokens' is not among"):
        run_pipeline(package, arguments={"n": 3, "uri": source}, pipeline_root=root, secrets={})


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def boom(message: str):
    raise ValueError(message)


@dsl.pipeline(name="failing")
def failing(message: str = "kaputt"):
    boom(message=message).set_retry(num_retries=1)


def test_failing_task_is_retried_then_reports_its_output(s3_env, tmp_path):
    package = _compile(failing, tmp_path)
    with pytest.raises(TaskFailed, match=r"task boom \(boom\) failed with exit code 1 after 2 attempt(.|\n)*kaputt"):
        run_pipeline(package, pipeline_root=s3_env.new_prefix("root"))
    with pytest.raises(ValueError, match="pipeline argument 'n': expected NUMBER_INTEGER, got 'three'"):
        run_pipeline(_compile(fanout, tmp_path), pipeline_root="s3://lgff-test/x", arguments={"n": "three"})
    with pytest.raises(ValueError, match="unknown pipeline argument"):
        run_pipeline(package, pipeline_root="s3://lgff-test/x", arguments={"mesage": "typo"})


def test_parse_pipeline_spec_rejects_unknown_fields(tmp_path):
    package = _compile(fanout, tmp_path)
    spec, platform = parse_pipeline_spec(package)
    assert spec.pipeline_info.name == "fanout"
    assert "exec-flag" in platform.platforms["kubernetes"].deployment_spec.executors

    docs = list(yaml.safe_load_all(open(package)))
    docs[0]["root"]["dag"]["tasks"]["plan"]["retryPolicyTypo"] = {"maxRetryCount": 1}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump_all(docs))
    with pytest.raises(json_format.ParseError, match="retryPolicyTypo"):
        parse_pipeline_spec(bad)

    docs = list(yaml.safe_load_all(open(package)))
    docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-flag"]["secretAsEnvv"] = []
    bad.write_text(yaml.safe_dump_all(docs))
    with pytest.raises(json_format.ParseError, match="secretAsEnvv"):
        parse_pipeline_spec(bad)


@dsl.pipeline(name="with-exit-handler")
def with_exit_handler():
    with dsl.ExitHandler(constant()):
        square(x=2)


def test_unimplemented_features_fail_before_anything_runs(tmp_path):
    with pytest.raises(UnsupportedFeature, match="exit handler"):
        run_pipeline(_compile(with_exit_handler, tmp_path), pipeline_root="s3://lgff-test/unused")


@dsl.pipeline(name="single")
def single():
    constant()


def test_cli_prints_the_task_table_and_exit_codes(s3_env, tmp_path, capsys):
    from kfp_launcher.__main__ import main

    assert main([_compile(single, tmp_path), "--pipeline-root", s3_env.new_prefix("root")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["task", "display", "name", "status", "downloaded", "uploaded", "seconds"]
    assert out.splitlines()[1].split()[:3] == ["constant", "constant", "executed"]
    assert main([_compile(with_exit_handler, tmp_path), "--pipeline-root", "s3://lgff-test/x"]) == 2
    assert "not implemented by the launcher-contract runner" in capsys.readouterr().err


@pytest.mark.cluster
def test_docker_executor_runs_each_task_in_its_own_container(s3_env, tmp_path):
    image = os.environ.get("KFP_RUNNER_IMAGE")
    if not image or not shutil.which("docker"):
        pytest.skip("set KFP_RUNNER_IMAGE to an image with python3, kfp and pyarrow, and run a docker engine")
    result = run_pipeline(_compile(chain, tmp_path), pipeline_root=s3_env.new_prefix("root"),
                          arguments={"text": "in-a-box"}, executor="docker", image=image)
    facts = json.loads(_read(s3_env, next(t for t in result.tasks if t.name == "consume").outputs["report"][0]["uri"]))
    assert facts["text"] == "in-a-box" and facts["files"] == ["f0.bin", "f2.bin", "sub/f1.bin"]
    assert facts["path_prefix"] == "/s3/" and not facts["stray"] and not facts["home_leak"]
    assert facts["uid"] == 1000 and facts["root_fs_writable"] is False and facts["launcher_env"] == []
    assert next(t for t in result.tasks if t.name == "consume").bytes_downloaded == len("in-a-box") + 600


# ------------------------------------------------------------------------------------------------ the driver's rules

@dsl.component(base_image=IMAGE, install_kfp_package=False)
def plan_untyped(n: int) -> list:
    return [{"i": i, "name": f"block{i}"} for i in range(n)]


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def echo(text: str) -> str:
    return text


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def work_struct(block: dict) -> str:
    return block["name"]


@dsl.pipeline(name="untyped-loop")
def untyped_loop(n: int = 2):
    p = plan_untyped(n=n)
    with dsl.ParallelFor(p.output) as block:  # the SDK types the item STRING after the bare `list`
        echo(text=block)
        work_struct(block=block)


def test_driver_turns_a_string_typed_loop_item_into_text_and_refuses_it_for_a_struct_input(s3_env, tmp_path):
    """resolve.go handleParamTypeValidationAndConversion: the iteration's STRING item becomes JSON text, which a
    STRING input takes and a STRUCT input refuses; the pod of that task never starts, the run fails."""
    package = _compile(untyped_loop, tmp_path)
    spec, _ = parse_pipeline_spec(package)
    (problem,) = type_flow_problems(spec)
    assert "work-struct: input 'block' (STRUCT)" in problem
    assert type_flow_problems(parse_pipeline_spec(_compile(fanout, tmp_path))[0]) == []  # List[dict]: STRUCT items
    with pytest.raises(DriverFailed) as failed:
        run_pipeline(package, pipeline_root=s3_env.new_prefix("root"))
    assert str(failed.value) == ('driver.Container(for-loop-1[0]/work-struct) failed: failed to resolve inputs: '
                                 'input parameter "block" type mismatch: expect STRUCT, got string')
    tasks = failed.value.result.tasks
    assert [(t.path, t.status) for t in tasks] == [("plan-untyped", "executed"), ("for-loop-1[0]/echo", "executed"),
                                                   ("for-loop-1[0]/work-struct", "driver failed")]
    assert tasks[1].parameters == {"Output": '{"i":0,"name":"block0"}'}  # the dict as JSON text


def _parameter(ptype: str, **kw) -> pb.ComponentInputsSpec.ParameterSpec:
    return pb.ComponentInputsSpec.ParameterSpec(parameter_type=pb.ParameterType.ParameterTypeEnum.Value(ptype), **kw)


def test_driver_parameter_conversions_and_messages():
    comp = pb.ComponentSpec()
    for name, ptype in (("s", "STRING"), ("n", "NUMBER_INTEGER"), ("d", "NUMBER_DOUBLE"), ("b", "BOOLEAN"),
                        ("l", "LIST"), ("m", "STRUCT")):
        comp.input_definitions.parameters[name].CopyFrom(_parameter(ptype))
    task = pb.PipelineTaskSpec()
    ok = {"n": 2, "d": 2, "b": True, "l": [1], "m": {}}
    for value, text in ((3, "3"), (0.5, "0.5"), (1e21, "1000000000000000000000"), (True, "true"), ([1, "a"], '[1,"a"]'),
                        ({"k": [1]}, '{"k":[1]}'), ("x", "x")):
        assert check_parameters("Container", "t", comp, task, dict(ok, s=value))["s"] == text  # PbValueToText
    for name, value, got in (("n", "2", "string"), ("m", [1], "list"), ("l", {}, "struct"), ("b", 1, "number"),
                             ("d", False, "bool")):
        with pytest.raises(DriverError, match=f'^driver.Container\\(t\\) failed: failed to resolve inputs: input '
                                              f'parameter "{name}" type mismatch: expect '
                                              f'{pb.ParameterType.ParameterTypeEnum.Name(comp.input_definitions.parameters[name].parameter_type)}'
                                              f', got {got}$'):
            check_parameters("Container", "t", comp, task, dict(ok, s="x", **{name: value}))
    with pytest.raises(DriverError, match='neither value nor default value provided for non-optional parameter "s"'):
        check_parameters("Container", "t", comp, task, ok)
    comp.input_definitions.parameters["s"].is_optional = True
    assert "s" not in check_parameters("Container", "t", comp, task, ok)  # the launcher adds the default


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def blocks(first: str, n: int = 2) -> List[dict]:
    return [{"i": i, "tag": first if i == 0 else "same"} for i in range(n)]


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def part(block: dict, out: Output[Artifact]) -> str:
    with open(out.path, "w") as f:
        f.write(f"{block['i']}:{block['tag']}")
    return out.uri


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def gather_pointers(pointers: List[str]) -> str:
    return ",".join(p.rsplit("/", 3)[-3] for p in pointers)  # the producing task's uuid


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def merge_parts(parts: List[Artifact]) -> str:
    return ",".join(open(p.path).read() for p in parts)


@dsl.pipeline(name="mixed-runs")
def mixed_runs(first: str = "a"):
    b = blocks(first=first)
    with dsl.ParallelFor(b.output) as block:
        p = part(block=block)
    gather_pointers(pointers=dsl.Collected(p.outputs["Output"]))  # runs before merge-parts (task order by name)
    merge_parts(parts=dsl.Collected(p.outputs["out"]))


def test_launcher_opens_extra_buckets_from_the_first_artifact_of_a_list_only(s3_env, tmp_path):
    """launcher_v2.go fetchNonDefaultBuckets / downloadArtifacts: block 0 reruns, block 1 is a cache hit from the
    first run. A collected artifact list [this run's, an earlier run's] fails before the command starts; the same
    outputs passed as parameters arrive."""
    package, cache = _compile(mixed_runs, tmp_path), str(tmp_path / "cache.json")
    root = s3_env.new_prefix("root")
    first = run_pipeline(package, pipeline_root=root, arguments={"first": "a"}, cache_path=cache)
    assert next(t for t in first.tasks if t.name == "merge-parts").parameters["Output"] == "0:a,1:same"
    with pytest.raises(TaskFailed) as failed:
        run_pipeline(package, pipeline_root=root, arguments={"first": "b"}, cache_path=cache)
    status = {t.path: t.status for t in failed.value.result.tasks}
    assert (status["for-loop-1[0]/part"], status["for-loop-1[1]/part"]) == ("executed", "cached")
    assert status["gather-pointers"] == "executed" and status["merge-parts"] == "executed"  # ran, failed
    assert (f"failed to execute component: failed to get bucket when downloading input artifact parts with bucket key "
            f"s3://{s3_env.bucket}: %!w(<nil>)") in str(failed.value)
    assert "Traceback" not in failed.value.log  # the launcher failed; the command never started
    assert failed.value.result.tasks[-1].bytes_downloaded == len("0:b")  # the first artifact only, then the error


def test_bucket_sessions_follow_the_first_artifact_of_each_list():
    from kfp_launcher.shim import LauncherError, bucket_sessions, check_bucket, prefixed_bucket

    run = prefixed_bucket("s3://b/root/pipe/run2")
    assert run == "s3://b/root/pipe/run2" and prefixed_bucket("minio://b/x/") == "minio://b/x"
    assert prefixed_bucket("s3://b/root/pipe/run2/t/u/o", with_prefix=False) == "s3://b"
    new, old = "s3://b/root/pipe/run2/t/u/o", "s3://b/root/pipe/run1/t/u/o"
    for order, fails in (([new, old], True), ([old, new], False), ([old, old], False), ([new, new], False)):
        downloads = [{"name": "parts", "uri": u} for u in order]
        sessions = bucket_sessions(downloads, run)
        if fails:
            with pytest.raises(LauncherError, match="bucket key s3://b"):
                for d in downloads:
                    check_bucket(d["name"], d["uri"], run, sessions)
        else:
            for d in downloads:
                check_bucket(d["name"], d["uri"], run, sessions)
    # another input whose first artifact lies outside the run opens the bucket for every list
    downloads = [{"name": "parts", "uri": new}, {"name": "parts", "uri": old}, {"name": "model", "uri": "s3://b/m"}]
    assert bucket_sessions(downloads, run) == {"s3://b"}


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def stamp(tag: str, out: Output[Artifact]):
    with open(out.path, "w") as f:
        f.write(tag)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def read_stamp(src: Input[Artifact]) -> str:
    return open(src.path).read()


@dsl.pipeline(name="branches")
def branches(mode: str = "first"):
    with dsl.If(mode == "first"):
        a = stamp(tag="from-first")
    with dsl.Else():
        b = stamp(tag="from-second")
    read_stamp(src=dsl.OneOf(a.outputs["out"], b.outputs["out"]))


def test_oneof_of_artifacts_follows_the_backend_version(s3_env, tmp_path):
    """resolve.go GetProducerTask: 2.17 takes the branch that ran; 2.16 and older always took the last selector,
    so a run whose first branch ran fails in the consumer's driver."""
    package, root = _compile(branches, tmp_path), s3_env.new_prefix("root")
    result = run_pipeline(package, pipeline_root=root, arguments={"mode": "first"})
    assert next(t for t in result.tasks if t.name == "read-stamp").parameters["Output"] == "from-first"
    result = run_pipeline(package, pipeline_root=root, arguments={"mode": "second"}, backend_version="2.16.1")
    assert next(t for t in result.tasks if t.name == "read-stamp").parameters["Output"] == "from-second"  # last
    with pytest.raises(DriverFailed, match=r"driver.Container\(read-stamp\) failed: failed to resolve inputs: failed "
                                           r"to resolve input artifact src: subTaskName, stamp-2, not in tasks"):
        run_pipeline(package, pipeline_root=root, arguments={"mode": "first"}, backend_version="2.16.1")


@dsl.pipeline(name="rooted", pipeline_root="s3://lgff-test/compiled-root-never-used")
def rooted():
    make(text="x")


def test_pipeline_root_comes_from_the_run_then_the_launcher_configmap_then_kfp_default(s3_env, tmp_path):
    """root_dag.go RootDAG + config/env.go DefaultPipelineRoot: never the spec's defaultPipelineRoot."""
    package = _compile(rooted, tmp_path)
    assert parse_pipeline_spec(package)[0].default_pipeline_root.endswith("compiled-root-never-used")
    run_root, cm_root = s3_env.new_prefix("run-root"), s3_env.new_prefix("configmap-root")
    boto3.client("s3", endpoint_url=s3_env.endpoint).create_bucket(Bucket="mlpipeline")
    for kwargs, root, source in (
            ({"pipeline_root": run_root, "launcher_config": {"defaultPipelineRoot": cm_root}}, run_root,
             "runtime config"),
            ({"launcher_config": {"defaultPipelineRoot": cm_root}}, cm_root, "kfp-launcher ConfigMap"),
            ({"launcher_config": {}}, "minio://mlpipeline/v2/artifacts", "KFP default")):
        result = run_pipeline(package, **kwargs)
        assert (result.pipeline_root, result.pipeline_root_source) == (root, source)
        assert result.tasks[0].outputs["out"][0]["uri"].startswith(f"{root}/rooted/{result.run_id}/make/")
