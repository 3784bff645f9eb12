"""LGFFDM: Mask R-CNN (torchvision) on a frozen timm backbone + LGFFN-D (or BiFPN) neck (DESIGN.md section 2).

`NeckBackbone` is the module torchvision's `MaskRCNN` calls its backbone: frozen `FrozenBackbone` (no grad, eval)
-> per-level stem (`stem.DetectionStem` for LGFFN-D / BiFPN) -> neck, returning ``OrderedDict('0'..'3')`` of (B, C, H/s, W/s) for s = 4, 8, 16, 32, with
``out_channels = C`` (256 in the paper). Anchors: one size per level (32, 64, 128, 256), aspect ratios
(0.5, 1.0, 1.5, 2.0) on every level; RoIAlign over all four levels ('0'..'3'; 7x7 boxes, 14x14 masks). Images are
normalised with the backbone's own mean / std and padded to a multiple of 32 by torchvision's transform.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign

from .backbone import FrozenBackbone
from .pyramid import PyramidNeck
from .stem import build_detection_stems
from .trainable import TrainableStateMixin

__all__ = ["NeckBackbone", "LGFFDetectionModel", "ANCHOR_SIZES", "ASPECT_RATIOS", "FEATURE_NAMES"]

ANCHOR_SIZES = ((32,), (64,), (128,), (256,))
ASPECT_RATIOS = ((0.5, 1.0, 1.5, 2.0),) * 4
FEATURE_NAMES = ["0", "1", "2", "3"]


class NeckBackbone(nn.Module):
    def __init__(
        self,
        body: FrozenBackbone,
        neck: PyramidNeck,
        neck_name: str = "lgffn_d",
    ) -> None:
        super().__init__()
        self.body = body
        self.stem = build_detection_stems(body.channels, neck.channels, neck_name)
        self.neck = neck
        self.out_channels = neck.channels

    def forward(self, images: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        with torch.no_grad():
            features = self.body(images)
        outs = self.neck([stem(x) for stem, x in zip(self.stem, features)])
        return OrderedDict(zip(FEATURE_NAMES, outs))


class LGFFDetectionModel(TrainableStateMixin, MaskRCNN):
    frozen_prefix = "backbone.body."  # MaskRCNN.backbone is the NeckBackbone; its .body is the frozen timm model

    def __init__(
        self,
        backbone: FrozenBackbone,
        neck: PyramidNeck,
        num_classes: int = 2,
        min_size: int = 800,
        max_size: int = 1333,
        neck_name: str = "lgffn_d",
        detections_per_img: int = 100,
    ) -> None:
        data_config = backbone.data_config
        super().__init__(
            NeckBackbone(backbone, neck, neck_name),
            num_classes=num_classes,
            min_size=min_size,
            max_size=max_size,
            image_mean=list(data_config["mean"]),
            image_std=list(data_config["std"]),
            rpn_anchor_generator=AnchorGenerator(sizes=ANCHOR_SIZES, aspect_ratios=ASPECT_RATIOS),
            box_roi_pool=MultiScaleRoIAlign(featmap_names=FEATURE_NAMES, output_size=7, sampling_ratio=2),
            mask_roi_pool=MultiScaleRoIAlign(featmap_names=FEATURE_NAMES, output_size=14, sampling_ratio=2),
            box_detections_per_img=detections_per_img,
        )

    @property
    def frozen_backbone(self) -> FrozenBackbone:
        return self.backbone.body
