"""Both compiled pipelines under the KFP v2 launcher's contract (tests/kfp_launcher), every task in its own
container of the image (uid 1000, read-only root), sharing nothing but a moto S3 server on 127.0.0.1 and an
``s3://`` pipeline root: the scenario of tests/test_pipeline_cluster.py (train_and_index with metrics equal to
kfp.local's, then a scheduled reindex: new data, unchanged -> cache hits, another rows_per_task, one shard added)
with the docker executor. Prints per task the bytes the "launcher" downloaded and the time it took."""
from __future__ import annotations

from lgff_core.data.testing import make_tiny_dataset
from s3_server import s3_env  # noqa: F401  (session fixture)
from test_pipeline_cluster import images, run_train_and_index_then_reindex  # noqa: F401  (fixture)

from .conftest import REPORT_LINES


def test_both_pipelines_under_the_launcher_contract_in_the_image(image, tmp_path, s3_env, images):  # noqa: F811
    # containers see no host paths: the source dataset lives in the object store like an archive would
    source = s3_env.new_prefix("source-dataset")
    make_tiny_dataset(source, src_dir=images)
    runs = run_train_and_index_then_reindex(tmp_path, s3_env, images, source, executor="docker", image=image)
    for name, result in runs.items():
        REPORT_LINES.append(f"launcher-contract, docker executor, {image}: {name}")
        REPORT_LINES.extend(result.summary_table().splitlines())
