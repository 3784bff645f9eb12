"""Task settings shared by the pipelines: resources, retries, caching, GPU scheduling and object-store secrets.

Kubernetes-specific settings (node selector, toleration, secret env) live in the compiled YAML's platform spec;
kfp.local does not read the platform spec, and only warns that resource / accelerator settings have no local
effect, so one pipeline definition serves both the local and the cluster path.
"""
from __future__ import annotations

from kfp import dsl, kubernetes

from lgff_core.config import LGFFConfig
from lgff_core.kfp.runtime import PIPELINE_ROOT_ENV

GPU_STAGES = ("train", "embed")
# secret key -> environment variable the stage reads (lgff_core.storage uses the standard AWS names)
S3_SECRET_KEYS = {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"}


def configure_task(task: dsl.PipelineTask, cfg: LGFFConfig, stage: str, display_name: str) -> dsl.PipelineTask:
    """Image, display name, caching, retries, resources; for GPU stages with ``pipeline.gpu_count`` > 0 the GPU
    image, GPU request, node selector and toleration (CPU presets set gpu_count 0 and request none); the object
    store's endpoint / region from the config and its credentials from the Kubernetes Secret named
    ``pipeline.s3_secret`` (referenced by name, never a value); a local pipeline root (kfp.local: where the bulk
    data goes; a cluster run's tasks read their root off their output URIs, `lgff_core.kfp.runtime`)."""
    p = cfg.pipeline
    gpu = stage in GPU_STAGES and p.gpu_count > 0
    task.set_container_image(p.gpu_image if gpu else p.image)
    task.set_display_name(display_name)
    task.set_caching_options(enable_caching=p.enable_caching)
    if p.retries > 0:
        task.set_retry(num_retries=p.retries, backoff_duration=f"{p.retry_backoff_s}s", backoff_factor=2.0)
    res = p.resources.get(stage, {})
    if "cpu_request" in res:
        task.set_cpu_request(res["cpu_request"])
    if "cpu_limit" in res:
        task.set_cpu_limit(res["cpu_limit"])
    if "memory_request" in res:
        task.set_memory_request(res["memory_request"])
    if "memory_limit" in res:
        task.set_memory_limit(res["memory_limit"])
    if gpu:
        task.set_accelerator_type(p.gpu_resource)
        task.set_accelerator_limit(p.gpu_count)
        for label, value in sorted(p.gpu_node_selector.items()):
            kubernetes.add_node_selector(task, label_key=label, label_value=value)
        if p.gpu_toleration_key:
            kubernetes.add_toleration(task, key=p.gpu_toleration_key, operator="Exists", effect="NoSchedule")
    if pipeline_root_for(cfg) is None:  # a cluster run's root is chosen at run time, never compiled in
        task.set_env_variable(PIPELINE_ROOT_ENV, p.pipeline_root)
    if p.s3_endpoint:
        task.set_env_variable("AWS_ENDPOINT_URL", p.s3_endpoint)
    if p.s3_region:
        task.set_env_variable("AWS_REGION", p.s3_region)
    if p.s3_secret:
        kubernetes.use_secret_as_env(task, secret_name=p.s3_secret, secret_key_to_env=dict(S3_SECRET_KEYS))
    return task


def pipeline_root_for(cfg: LGFFConfig) -> "str | None":
    """The pipeline root baked into the compiled YAML: only a remote one (the local root is chosen at run time)."""
    root = cfg.pipeline.pipeline_root
    return root if root.startswith(("s3://", "gs://", "minio://")) else None
