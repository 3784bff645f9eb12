"""Ablation CAM on the neck nodes: on a synthetic image whose only content lies in one quadrant, the map of every
terminal node of every neck layer, and their collapse, puts its mass in that quadrant."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lgff_core.retrieval.explain import COLLAPSE, NODE_LABELS, explain_image, neck_nodes, quadrant_mass
from lgff_core.models.embedding import LGFFEmbeddingModel
from lgff_core.models.heads import GeMHead
from lgff_core.models.lgffn_embedding import LGFFNE


class QuadrantBackbone(nn.Module):
    """Stand-in backbone: 4 levels (strides 4..32) of bias-free conv + ReLU, so empty (zero) pixels give zero
    features; frozen and always in eval mode like the real one."""

    def __init__(self, channels=(6, 8, 10, 12)):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        convs, cin = [], 3
        for i, c in enumerate(channels):
            stride = 4 if i == 0 else 2
            conv = nn.Conv2d(cin, c, kernel_size=stride + 1, stride=stride, padding=stride // 2, bias=False)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.5)
            convs.append(conv)
            cin = c
        self.convs = nn.ModuleList(convs)
        self.channels = list(channels)
        self.feature_info = [{"num_chs": c, "reduction": 4 * 2 ** i} for i, c in enumerate(channels)]
        self.data_config = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0), "interpolation": "bilinear",
                            "crop_pct": 1.0, "input_size": (3, 64, 64)}
        self.requires_grad_(False)

    def train(self, mode=True):
        return super().train(False)

    def forward(self, x):
        out = []
        for conv in self.convs:
            x = F.relu(conv(x))
            out.append(x)
        return out


def quadrant_model(num_layers=2, channels=8) -> LGFFEmbeddingModel:
    torch.manual_seed(0)
    model = LGFFEmbeddingModel(QuadrantBackbone(), LGFFNE(channels, num_layers=num_layers),
                               GeMHead(channels, num_levels=4)).eval()
    # no constant offsets: a node's activation is zero wherever its input features are zero
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d) and module.bias is not None and module.groups == module.in_channels:
                module.bias.zero_()  # depthwise down-sampling
        for stem in model.stem:
            stem.proj.bias.zero_()
    return model


def test_cam_mass_lies_in_the_quadrant_that_holds_the_evidence():
    model = quadrant_model()
    g = torch.Generator().manual_seed(1)
    image = torch.zeros(3, 256, 256)
    image[:, 16:112, 144:240] = torch.rand(3, 96, 96, generator=g)  # top-right quadrant only (catches flips/transposes)
    with torch.no_grad():
        query = model(image[None])[0]
    maps, score = explain_image(model, image, query, batch_size=8)
    assert abs(score - 1.0) < 1e-5  # the query against itself
    names = [n for n, _ in neck_nodes(model)]
    assert names == [f"layer{l}/{p}" for l in (1, 2) for p in NODE_LABELS]
    assert set(maps) == set(names) | {"layer1/" + COLLAPSE, "layer2/" + COLLAPSE}
    for name, cam in maps.items():
        assert cam.shape == (256, 256) and cam.min() >= 0 and cam.max() <= 1 + 1e-6
        assert cam.sum() > 0, name
        mass = quadrant_mass(cam)
        # coarse nodes (P3_2 / P4_2: 16x16 / 8x8 maps) spill a little across the quadrant border (3x3 receptive
        # fields, bilinear resizing); the evidence quadrant must still hold most of the mass
        others = np.delete(mass, 1)
        assert mass[1] > 0.7 and mass[1] > 3 * others.max(), (name, mass.round(3))


def test_baseline_has_no_neck_to_explain():
    import pytest

    from lgff_core.errors import LGFFError
    from lgff_core.models.embedding import GeMBaselineModel

    with pytest.raises(LGFFError, match="no neck"):
        neck_nodes(GeMBaselineModel(QuadrantBackbone()))
