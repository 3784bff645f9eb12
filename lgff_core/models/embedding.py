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

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from .backbone import FrozenBackbone
from .gem import GeM
from .heads import GeMHead
from .pyramid import PyramidNeck
from .stem import build_stems

__all__ = ["FrozenBackboneEmbedder", "LGFFEmbeddingModel", "GeMBaselineModel"]

BACKBONE_PREFIX = "backbone."


class FrozenBackboneEmbedder(nn.Module):
    """Shared part of the embedding models: frozen ``backbone`` + a trainable rest (``forward_head``)."""

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

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith(BACKBONE_PREFIX)}

    def load_trainable_state_dict(self, state_dict: Mapping[str, torch.Tensor], origin: str = "state dict") -> None:
        """Load everything but the backbone; key or shape mismatches raise `CheckpointError` naming them."""
        expected = self.trainable_state_dict()
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        if missing or unexpected:
            raise CheckpointError(
                f"{origin} does not match {type(self).__name__}: {len(missing)} missing {missing[:5]}, "
                f"{len(unexpected)} unexpected {unexpected[:5]}"
            )
        for key, ref in expected.items():
            if tuple(state_dict[key].shape) != tuple(ref.shape):
                raise CheckpointError(f"{origin}: {key} has shape {tuple(state_dict[key].shape)}, the model "
                                      f"expects {tuple(ref.shape)}")
        result = self.load_state_dict(dict(state_dict), strict=False)
        assert not result.unexpected_keys and all(k.startswith(BACKBONE_PREFIX) for k in result.missing_keys)


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
