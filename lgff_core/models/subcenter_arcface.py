"""Sub-center ArcFace loss (Deng et al., ECCV 2020; ArcFace: Deng et al., CVPR 2019).

Class weights W: (num_classes * K, D). For L2-normalised embeddings x (B, D):

    cos_{b,c} = max_k  <x_b, W_{c,k}> / (|x_b| |W_{c,k}|)                         (get_cosine, (B, num_classes))
    theta_b   = arccos(cos_{b,y_b})
    phi_b     = cos(theta_b + m)             if theta_b <= pi - m
              = cos(theta_b) - m * sin(m)    otherwise                            (see below)
    logits    = s * cos, with the target entry replaced by s * phi_b;  loss = cross_entropy(logits, y)

Units: ``margin_deg`` is in DEGREES (28.6 deg = 0.5 rad; the paper's strategies used 28.6 / 17.2 / 5.73) and is
converted once in ``__init__``; ``scale`` is s. They are separate keyword arguments and never swapped (a public
training script passed the margin as the scale).

theta > pi - m: cos(theta + m) would start increasing again (theta + m passes pi), rewarding a worse angle. We use
the standard ArcFace "easy_margin=False" fallback phi = cos(theta) - m*sin(m) there: phi stays monotonically
decreasing in theta over [0, pi] (it jumps from -1 down to -cos(m) - m*sin(m) at theta = pi - m), so the target
logit always favours a smaller angle. K = 1 is plain ArcFace. Weights are cast to the embeddings' dtype; the
cross-entropy is computed in float32.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError

__all__ = ["SubCenterArcFace", "arcface_target_logit"]


def arcface_target_logit(cos_target: torch.Tensor, margin_rad: float) -> torch.Tensor:
    """phi(theta) from cos(theta) (the convention documented in the module docstring)."""
    cos_t = cos_target.clamp(-1.0, 1.0)
    sin_t = torch.sqrt((1.0 - cos_t * cos_t).clamp(min=0.0))
    phi = cos_t * math.cos(margin_rad) - sin_t * math.sin(margin_rad)  # cos(theta + m)
    fallback = cos_t - margin_rad * math.sin(margin_rad)
    return torch.where(cos_t > math.cos(math.pi - margin_rad), phi, fallback)


class SubCenterArcFace(nn.Module):
    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        margin_deg: float = 28.6,
        scale: float = 64.0,
        num_subcenters: int = 3,
    ) -> None:
        super().__init__()
        if embedding_size <= 0 or num_classes <= 0 or num_subcenters <= 0:
            raise ConfigError(
                f"SubCenterArcFace: embedding_size, num_classes and num_subcenters must be > 0, got "
                f"{embedding_size}, {num_classes}, {num_subcenters}"
            )
        if not 0.0 <= margin_deg < 90.0:
            raise ConfigError(f"SubCenterArcFace: margin_deg is in degrees and must be in [0, 90), got {margin_deg}")
        if scale <= 0:
            raise ConfigError(f"SubCenterArcFace: scale must be > 0, got {scale}")
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        self.num_subcenters = num_subcenters
        self.margin_deg = float(margin_deg)
        self.margin = math.radians(margin_deg)
        self.scale = float(scale)
        self.weight = nn.Parameter(torch.empty(num_classes * num_subcenters, embedding_size))
        nn.init.normal_(self.weight, std=0.01)

    def get_cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, num_classes): max over the K sub-centers of the cosine similarity."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"embeddings must be (B, {self.embedding_size}), got {tuple(embeddings.shape)}"
            )
        w = F.normalize(self.weight.to(embeddings.dtype), dim=1)
        cos = F.normalize(embeddings, dim=1) @ w.t()
        return cos.view(-1, self.num_classes, self.num_subcenters).amax(dim=2)

    def logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Scaled logits with the additive angular margin on each row's target class (B, num_classes), float32."""
        if labels.ndim != 1 or labels.shape[0] != embeddings.shape[0]:
            raise ValueError(f"labels must be (B,) with B={embeddings.shape[0]}, got {tuple(labels.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"labels must be in [0, {self.num_classes}), got range "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        cos = self.get_cosine(embeddings).float()
        target = F.one_hot(labels.long(), self.num_classes).bool()
        cos_target = cos.gather(1, labels.long().view(-1, 1))
        phi = arcface_target_logit(cos_target, self.margin)
        return self.scale * torch.where(target, phi, cos)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(embeddings, labels), labels.long())

    def extra_repr(self) -> str:
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
                f"margin_deg={self.margin_deg}, scale={self.scale}, num_subcenters={self.num_subcenters}")
