"""The compiled pipelines against what KFP v2's driver and launcher decide (tests/kfp_launcher: `driver` rules and
the launcher's object-store sessions), beyond the launcher contract of tests/test_pipeline_cluster.py.

- Every ParallelFor item reaches its tasks with the type they declare: the plan is ``List[dict]``, so the loop item
  is STRUCT like ``embed.block`` / ``index_add.block`` (with a bare ``list`` the driver turns it into JSON text and
  fails the task: ``input parameter "block" type mismatch: expect STRUCT, got string``).
- The pipeline root is the run's, not the compiled one: no task is compiled with ``LGFF_PIPELINE_ROOT`` for an
  object-store root, and bulk data lands under the root the run was given.
- A reindex where only block 0's shard changed (block 0 reruns, the other blocks are cache hits from the earlier
  run): the blocks reach collect as parameters and the run passes; the layout before (the blocks' artifacts
  collected as a list) fails in the launcher, whose extra bucket sessions follow the first artifact of a list only.
- ``mode=append`` under a backend older than 2.17, whose driver took the last branch of a ``dsl.OneOf``, fails.
"""

import json
from typing import List

import pytest
from kfp import dsl
from kfp.dsl import Dataset, Output
from kfp.pipeline_spec import pipeline_spec_pb2 as pb

import components as c
from kfp_launcher import DriverFailed, TaskFailed, parse_pipeline_spec, run_pipeline, type_flow_problems
from kfp_launcher.runner import deployment_config
from lgff_core import storage
from lgff_core.config import load_config
from lgff_core.data.shards import read_manifest, write_manifest
from lgff_core.data.testing import make_imagefolder_tree, make_tiny_dataset
from lgff_core.kfp.config import stage_config_yaml
from lgff_core.kfp.pipeline import compile_pipeline
from lgff_core.kfp.runtime import PIPELINE_ROOT_ENV
from pipelines._wiring import configure_task, pipeline_root_for
from pipelines.train_and_index import plan_task, scan_task
from s3_server import s3_env  # noqa: F401  (fixture)
from test_pipeline_cluster import SECRET
from test_pipeline_local import TINY
from components._image import LGFF_IMAGE

COMPILED_ROOT = "s3://lgff-test/compiled-root-never-used"
REINDEX = "lgff-reindex"


def _cfg(s3_env, extra=()):
    return load_config("lgffem_cpu", TINY + [f"pipeline.pipeline_root={COMPILED_ROOT}",
                                             f"pipeline.s3_endpoint={s3_env.endpoint}", *extra])


def test_compiled_loops_pass_the_driver_type_rules_and_no_root_is_compiled_in(tmp_path, s3_env):
    for name in ("train_and_index", "reindex"):  # sharded: the embed loops and the index-add loops
        package = compile_pipeline(name, _cfg(s3_env, ["pipeline.sharded_index=true"]), tmp_path / f"{name}.yaml")
        spec, _ = parse_pipeline_spec(package)
        assert type_flow_problems(spec) == []
        loops = [comp for n, comp in spec.components.items() if n.startswith("comp-for-loop")]
        assert len(loops) == {"train_and_index": 4, "reindex": 2}[name]
        for comp in loops:
            (item,) = [d for k, d in comp.input_definitions.parameters.items() if k.endswith("-loop-item")]
            assert pb.ParameterType.ParameterTypeEnum.Name(item.parameter_type) == "STRUCT"
        executors = deployment_config(spec).executors
        assert executors and not any(e.name == PIPELINE_ROOT_ENV for x in executors.values() for e in x.container.env)


@dsl.component(base_image=LGFF_IMAGE, install_kfp_package=False)
def collect_embedding_artifacts(parts: List[Dataset], embeddings: Output[Dataset]):
    """The collect of the layout before issue 18: the blocks' embeddings artifacts collected as a list."""
    from lgff_core.kfp.runtime import dataset_facts, input_path, read_pointer, run_cli

    run_cli(["embed", "collect", *[input_path(p) for p in parts], "--out", embeddings.path])
    embeddings.metadata.update(dataset_facts(read_pointer(embeddings, "_manifest.json")))


def _old_layout(cfg):
    """reindex's scan -> plan -> embed loop -> collect with the collect of the layout before issue 18. Named like
    reindex, so its scan / plan / embed tasks share reindex's cache entries (KFP's cache is per pipeline name)."""
    @dsl.pipeline(name=REINDEX, pipeline_root=pipeline_root_for(cfg))
    def old_layout(model_uri: str, data_uri: str, rows_per_task: int):
        scan = scan_task(cfg, data_uri, model_uri)
        plan = plan_task(cfg, data_uri, scan.outputs["data_fingerprint"], rows_per_task)
        with dsl.ParallelFor(items=plan.output, parallelism=cfg.pipeline.max_parallel, name="embed-model") as block:
            embed = configure_task(c.embed(config_yaml=stage_config_yaml(cfg, "embed"), block=block,
                                           model_uri=model_uri, model_fingerprint=scan.outputs["model_fingerprint"]),
                                   cfg, "embed", "embed-model")
        configure_task(collect_embedding_artifacts(parts=dsl.Collected(embed.outputs["embeddings"])), cfg, "report",
                       "collect-embeddings-model")
    return old_layout


def _status(result):
    out = {}
    for t in result.tasks:
        out.setdefault(t.display_name, []).append(t.status)
    return out


@pytest.mark.slow
def test_reindex_after_block_0_changed_passes_and_the_artifact_list_layout_fails(tmp_path, s3_env):
    from kfp import compiler

    from search_support import make_checkpoint

    images = tmp_path / "images"
    make_imagefolder_tree(images, per_class=6, splits=("train", "val", "test"))
    data_uri = s3_env.new_prefix("archive")
    make_tiny_dataset(data_uri, src_dir=images, shard_mb=0.02)
    full = read_manifest(data_uri)
    assert [s.num_rows for s in full.shards][:5] == [6] * 5

    def publish(block_0_shard):  # 3 blocks of 6 rows: block 0's shard as given, then the same two train shards
        manifest = read_manifest(data_uri)
        manifest.shards = [full.shards[i] for i in (block_0_shard, 3, 4)]
        write_manifest(manifest)

    model_uri = make_checkpoint(s3_env.new_prefix("model"))
    env = s3_env.env()
    run_root = s3_env.new_prefix("run-root")  # the run's root; the compiled one is never used
    kwargs = dict(pipeline_root=run_root, env={"OMP_NUM_THREADS": "1"}, cache_path=str(tmp_path / "cache.json"),
                  secrets={SECRET: {k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}})
    args = {"model_uri": model_uri, "data_uri": data_uri, "rows_per_task": 6}
    package = compile_pipeline("reindex", _cfg(s3_env, ["pipeline.reindex_evaluate=false"]), tmp_path / "r.yaml")

    publish(0)
    first = run_pipeline(package, arguments=args, **kwargs)
    publish(1)  # block 0's shard replaced
    second = run_pipeline(package, arguments=args, **kwargs)
    print(second.summary_table())
    status = _status(second)
    assert status["embed-model"] == ["executed", "cached", "cached"]  # block 0 reran, the others are cache hits
    assert status["collect-embeddings-model"] == status["index-build-model"] == ["executed"]
    (collect,) = second.by_display_name("collect-embeddings-model")
    manifest = json.loads(storage.read_text(storage.join(_s3(collect.outputs["embeddings"][0]["uri"]),
                                                         "_manifest.json")))
    blocks = [second.by_display_name("embed-model")[0]] + first.by_display_name("embed-model")[1:]
    # this run's block 0, the earlier run's blocks 1 and 2, every bulk prefix under the run's root
    assert [s["name"].rsplit("/", 1)[0] for s in manifest["shards"]] == [t.parameters["Output"] for t in blocks]
    assert all(s["name"].startswith(f"{run_root}/.bulk/{REINDEX}/") for s in manifest["shards"])
    assert manifest["num_rows"] == 18 and not storage.list_files(COMPILED_ROOT)

    # the layout before: the blocks' artifacts collected as a list. Block 0 changes again (this run's), blocks 1
    # and 2 are the first run's cache hits, and the launcher opens no session for them
    old = str(tmp_path / "old.yaml")
    compiler.Compiler().compile(_old_layout(_cfg(s3_env)), old)
    publish(2)
    with pytest.raises(TaskFailed) as failed:
        run_pipeline(old, arguments=args, **kwargs)
    print(failed.value.result.summary_table())
    assert _status(failed.value.result)["embed-model"] == ["executed", "cached", "cached"]
    assert failed.value.result.tasks[-1].display_name == "collect-embeddings-model"
    assert (f"failed to get bucket when downloading input artifact parts with bucket key s3://{s3_env.bucket}"
            in str(failed.value))

    # mode=append (onto the second run's index) under a backend whose driver took the last branch of a dsl.OneOf,
    # the rebuild one: the evaluation's driver cannot resolve the index
    evaluated = compile_pipeline("reindex", _cfg(s3_env), tmp_path / "evaluated.yaml")
    index = json.loads(storage.read_text(storage.join(_s3(second.by_display_name("index-build-model")[0].outputs[
        "index"][0]["uri"]), "index.json")))
    append = {**args, "mode": "append", "base_index_uri": index["bulk"]["prefix"]}
    with pytest.raises(DriverFailed, match=r"driver.Container\(evaluate\) failed: failed to resolve inputs: failed to "
                                           r"resolve input artifact index: subTaskName, index-build, not in tasks"):
        run_pipeline(evaluated, arguments=append, backend_version="2.16.1", **kwargs)


def _s3(uri: str) -> str:
    return uri.replace("minio://", "s3://")
