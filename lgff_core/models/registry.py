"""Model factories: neck registry, `build_model`, `build_baseline`, `build_loss` (config in, module out).

Necks are config entries (``model.neck``) resolved through `NECKS`; a new neck is one `register_neck` call with a
builder taking the `ModelConfig`. Factories only read config; every module sizes itself from the backbone's
``feature_info``.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

from ..config import ConfigError, LGFFConfig, ModelConfig
from .backbone import FrozenBackbone
from .bifpn import BiFPN
from .detection import LGFFDetectionModel
from .embedding import GeMBaselineModel, LGFFEmbeddingModel
from .heads import GeMHead
from .lgffn_detection import LGFFND
from .lgffn_embedding import LGFFNE
from .pyramid import PyramidNeck
from .subcenter_arcface import SubCenterArcFace

__all__ = ["NECKS", "register_neck", "build_neck", "build_backbone", "build_model", "build_baseline", "build_loss"]

NECKS: dict[str, Callable[[ModelConfig], PyramidNeck]] = {}


def register_neck(name: str, builder: Callable[[ModelConfig], PyramidNeck]) -> None:
    if name in NECKS:
        raise ValueError(f"neck {name!r} is already registered")
    NECKS[name] = builder


register_neck("lgffn_e", lambda m: LGFFNE(m.channels, num_layers=m.num_layers, upsample=m.upsample))
register_neck("lgffn_d", lambda m: LGFFND(m.channels, num_layers=m.num_layers))
register_neck("bifpn", lambda m: BiFPN(m.channels, num_layers=m.num_layers))


def build_neck(model_cfg: ModelConfig) -> PyramidNeck:
    try:
        builder = NECKS[model_cfg.neck]
    except KeyError:
        raise ConfigError(f"model.neck={model_cfg.neck!r} is not one of {', '.join(NECKS)}") from None
    return builder(model_cfg)


def build_backbone(cfg: LGFFConfig, weights: Optional[str] = None) -> FrozenBackbone:
    """The frozen backbone of ``cfg``; ``weights`` overrides ``model.backbone.weights`` (e.g. "none" offline)."""
    b = cfg.model.backbone
    return FrozenBackbone(b.name, weights=b.weights if weights is None else weights, out_indices=b.out_indices)


def build_model(cfg: LGFFConfig, weights: Optional[str] = None) -> Union[LGFFEmbeddingModel, LGFFDetectionModel]:
    m = cfg.model
    backbone = build_backbone(cfg, weights)
    neck = build_neck(m)
    if m.kind == "detection":
        return LGFFDetectionModel(backbone, neck, num_classes=m.num_classes, min_size=m.det_min_size,
                                  max_size=m.det_max_size, neck_name=m.neck,
                                  detections_per_img=m.det_detections_per_img)
    head = GeMHead(m.channels, num_levels=len(backbone.feature_info), p=m.gem_p, eps=m.gem_eps,
                   learn_p=m.gem_learn_p, dropout=m.dropout, level_norm=m.head_level_norm)
    return LGFFEmbeddingModel(backbone, neck, head)


def build_baseline(cfg: LGFFConfig, weights: Optional[str] = None) -> GeMBaselineModel:
    return GeMBaselineModel(build_backbone(cfg, weights), p=cfg.model.baseline_gem_p, eps=cfg.model.gem_eps)


def build_loss(cfg: LGFFConfig, num_classes: int, embedding_size: int) -> SubCenterArcFace:
    loss = cfg.loss
    return SubCenterArcFace(embedding_size, num_classes, margin_deg=loss.margin_deg, scale=loss.scale,
                            num_subcenters=loss.num_subcenters)
