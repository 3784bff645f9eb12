"""Embedding models: LGFFEM (frozen backbone + stem + LGFF neck + GeM head) and the no-neck GeM baseline.

Contract (docs/architecture.md, "models"):
- ``forward(images) -> (B, D)`` L2-normalised float32 descriptors (inner product = cosine);
- ``forward_features(images) -> list[Tensor]``: the frozen backbone levels P1..P4, computed without grad and with
  the backbone in eval mode;
- ``forward_head(features) -> (B, D)``: everything after the backbone (the feature-cache path);
- ``trainable_state_dict()`` / ``load_trainable_state_dict(sd)``: every tensor except the backbone's;
- ``embedding_dim``: D (4C for LGFFEM, the last level's channels for the baseline).
Inputs may be channels_last and the forward may run under ``torch.autocast(..., dtype=torch.bfloat16)``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import FrozenBackbone
from .gem import GeM
from .heads import GeMHead
from .pyramid import PyramidNeck
from .stem import build_stems
from .trainable import TrainableStateMixin

__all__ = ["FrozenBackboneEmbedder", "LGFFEmbeddingModel", "GeMBaselineModel"]


class FrozenBackboneEmbedder(TrainableStateMixin, nn.Module):
    """Shared part of the embedding models: frozen ``backbone`` + a trainable rest (``forward_head``)."""

    frozen_prefix = "backbone."
    backbone: FrozenBackbone
    embedding_dim: int

    def forward_head(self, features: Sequence[torch.Tensor]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def forward_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        self.backbone.eval()
        return self.backbone(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))


class LGFFEmbeddingModel(FrozenBackboneEmbedder):
    def __init__(
        self,
        backbone: FrozenBackbone,
        neck: PyramidNeck,
        head: GeMHead,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.stem = build_stems(backbone.channels, neck.channels)
        self.neck = neck
        self.head = head
        self.embedding_dim = head.out_dim

    def forward_neck(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Terminal nodes P1_2..P4_2 of the last neck layer (used by explain / CAM).

        Cached features may be stored in half precision; they are cast to the parameters' dtype (autocast, when on,
        still runs the convolutions in bf16).
        """
        dtype = self.stem[0].proj.weight.dtype
        return self.neck([stem(x.to(dtype)) for stem, x in zip(self.stem, features)])

    def forward_head(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return F.normalize(self.head(self.forward_neck(features)).float(), dim=1)


class GeMBaselineModel(FrozenBackboneEmbedder):
    """Frozen backbone + GeM (fixed p) on its last level, L2-normalised; no neck, nothing trained."""

    def __init__(
        self,
        backbone: FrozenBackbone,
        p: float = 3.0,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.pool = GeM(p=p, eps=eps, learn_p=False)
        self.embedding_dim = backbone.channels[-1]

    def forward_head(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return F.normalize(self.pool(features[-1]).float(), dim=1)
