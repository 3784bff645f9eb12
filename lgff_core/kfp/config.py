"""Per-stage slices of a run config, passed to kfp components as YAML strings.

Each pipeline task receives only the config keys its stage reads (its *projection*), never the whole config.
The task's cache key (kfp.local, and the KFP backend's cache) is computed from its inputs, so a change to, say,
``index.factory`` changes only the index tasks' inputs: training and embedding stay cache hits and only the
index, evaluate and report tasks rerun. The projection is a YAML mapping that `load_config` turns back into a
full `LGFFConfig` (keys left out keep their defaults, which is right because the stage does not read them).
"""
from __future__ import annotations

import copy
from typing import Any

import yaml

from ..config import LGFFConfig, StageConfig, config_to_dict

__all__ = ["STAGE_KEYS", "STORE_KEYS", "project_config", "stage_config_yaml", "train_stage_config_yaml"]

# dotted keys each stage reads (a section name takes the whole section)
STAGE_KEYS: dict[str, tuple[str, ...]] = {
    "prep": ("seed", "data"),
    "train": ("name", "seed", "model", "loss", "train", "strategy", "data", "embed"),
    "embed": ("seed", "model", "embed", "train.image_size", "train.device"),
    "index": ("seed", "index"),
    "evaluate": ("seed", "index", "evaluate"),
    "evaluate_detection": ("seed", "evaluate", "train.device", "train.batch_size"),
    "report": ("name", "evaluate"),
    "explain": ("seed", "model", "embed", "index", "evaluate.query_split", "explain", "train.image_size",
                "train.device"),
}


# Where the run's data lives. KFP's cache key holds a task's parameters, input artifacts, command and image, never
# its environment (LGFF_PIPELINE_ROOT, AWS_ENDPOINT_URL): so every slice carries these keys, and a run against
# another root or object store misses the cache instead of being handed pointers into the old store. The
# credentials' Secret is left out on purpose: rotating it must not rerun the pipeline over the same data.
STORE_KEYS: tuple[str, ...] = ("pipeline.pipeline_root", "pipeline.s3_endpoint")


def project_config(cfg: LGFFConfig, keys: tuple[str, ...]) -> dict[str, Any]:
    """The nested mapping holding only `keys` (dotted) of `cfg`."""
    full = config_to_dict(cfg)
    out: dict[str, Any] = {}
    for key in keys:
        src, dst = full, out
        parts = key.split(".")
        for part in parts[:-1]:
            src = src[part]
            dst = dst.setdefault(part, {})
        dst[parts[-1]] = copy.deepcopy(src[parts[-1]])
    return out


def _dump(data: dict[str, Any]) -> str:
    # sort_keys: identical configs give byte-identical YAML, so identical cache keys
    return yaml.safe_dump(data, sort_keys=True, default_flow_style=False)


def stage_config_yaml(cfg: LGFFConfig, stage: str) -> str:
    """YAML text of the keys `stage` reads (see `STAGE_KEYS`) and of where the data lives (`STORE_KEYS`)."""
    if stage not in STAGE_KEYS:
        raise KeyError(f"unknown pipeline stage {stage!r}; stages: {', '.join(STAGE_KEYS)}")
    return _dump(project_config(cfg, STAGE_KEYS[stage] + STORE_KEYS))


def train_stage_config_yaml(cfg: LGFFConfig, index: int) -> str:
    """Config of strategy stage `index` as a single-stage config: that stage's overrides already applied, so the
    train task runs exactly one stage and later stages chain on it with ``--init``."""
    stage_cfg = copy.deepcopy(cfg.stage(index))  # stage() returns `cfg` itself when there are no overrides
    stage = cfg.strategy[index]
    stage_cfg.strategy = [StageConfig(name=stage.name, data=None, overrides={})]
    return _dump(project_config(stage_cfg, STAGE_KEYS["train"] + STORE_KEYS))
