"""Building blocks of the model zoo checked against hand-computed references (formulas from DESIGN.md section 2)."""
import math

import pytest
import torch
import torch.nn.functional as F

from lgff_core.config import ConfigError
from lgff_core.models import (BiFPN, FastNormalizedFusion, GeM, GlobalAggregator, GlobalResponseNorm, LGFFND, LGFFNE,
                              LocalAggregator, SubCenterArcFace)
from lgff_core.models.resample import DepthwiseDownsample2x, LearnedUpsample2x
from lgff_core.models.subcenter_arcface import arcface_target_logit


# ----------------------------------------------------------------------------------------------- GRN
def test_grn_normalises_over_spatial_dims_and_varies_across_channels():
    grn = GlobalResponseNorm(6)
    x = torch.randn(2, 6, 5, 7)
    n = grn.normalizer(x)
    assert n.shape == (2, 6, 1, 1)
    # reference: L2 over (H, W) per channel, divided by the channel mean
    g = x.pow(2).sum(dim=(2, 3)).sqrt()
    ref = g / (g.mean(dim=1, keepdim=True) + 1e-6)
    torch.testing.assert_close(n.flatten(1), ref)
    # not the no-op of normalising over a size-1 axis: n differs between channels
    assert n.flatten(1).std(dim=1).min() > 1e-3
    assert not torch.allclose(n, torch.ones_like(n))
    # gamma = beta = 0 at init -> identity; gamma = 1 -> x * n + x
    torch.testing.assert_close(grn(x), x)
    with torch.no_grad():
        grn.gamma.fill_(1.0)
    torch.testing.assert_close(grn(x), x * ref[..., None, None] + x)


# ----------------------------------------------------------------------------------------------- fusion
def test_fast_normalized_fusion_weights_non_negative_and_normalised():
    fuse = FastNormalizedFusion(3)
    torch.testing.assert_close(fuse.weight.detach(), torch.ones(3))
    xs = [torch.randn(2, 4, 3, 3) for _ in range(3)]
    torch.testing.assert_close(fuse(xs), sum(xs) / (3 + 1e-4))
    with torch.no_grad():
        fuse.weight.copy_(torch.tensor([-2.0, 1.0, 3.0]))
    w = fuse.weights()
    assert (w >= 0).all() and w[0] == 0
    torch.testing.assert_close(w.sum(), torch.tensor(4.0 / (4.0 + 1e-4)))
    torch.testing.assert_close(fuse(xs), (xs[1] * 1.0 + xs[2] * 3.0) / (4 + 1e-4))
    # optimisation pushing weights negative keeps the effective weights in [0, 1]
    opt = torch.optim.SGD(fuse.parameters(), lr=10.0)
    for _ in range(5):
        opt.zero_grad()
        fuse([x.abs() for x in xs]).sum().backward()
        opt.step()
        w = fuse.weights()
        assert (w >= 0).all() and w.sum() <= 1.0


# ----------------------------------------------------------------------------------------------- aggregators
@pytest.mark.parametrize("cls", [LocalAggregator, GlobalAggregator])
def test_aggregator_gate_is_a_learnable_scalar(cls):
    agg = cls(8)
    assert isinstance(agg.a, torch.nn.Parameter) and agg.a.shape == () and float(agg.a.detach()) == 0.0
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(agg(x), x * torch.sigmoid(agg.attn(x)))  # a = 0: fully gated
    with torch.no_grad():
        agg.a.fill_(1.0)
    torch.testing.assert_close(agg(x), x)  # a = 1: identity
    with torch.no_grad():
        agg.a.fill_(0.25)
    torch.testing.assert_close(agg(x), 0.25 * x + 0.75 * x * torch.sigmoid(agg.attn(x)))
    agg(x).sum().backward()
    assert agg.a.grad is not None and agg.a.grad.abs() > 0


def test_global_aggregator_contains_grn_and_local_a_layernorm():
    assert any(isinstance(m, GlobalResponseNorm) for m in GlobalAggregator(8).modules())
    assert not any(isinstance(m, GlobalResponseNorm) for m in LocalAggregator(8).modules())


# ----------------------------------------------------------------------------------------------- resampling / necks
@pytest.mark.parametrize("mode", ["convtranspose", "bilinear"])
def test_learned_up_and_down_sizes(mode):
    up, down = LearnedUpsample2x(4, mode), DepthwiseDownsample2x(4)
    x = torch.randn(1, 4, 7, 9)
    assert up(x).shape == (1, 4, 14, 18) and down(up(x)).shape == (1, 4, 7, 9)
    if mode == "convtranspose":  # initialised to nearest-neighbour upsampling
        torch.testing.assert_close(up(x), F.interpolate(x, scale_factor=2.0, mode="nearest"))
        # the pixel-shuffle implementation is the depthwise transposed convolution, for any weights
        with torch.no_grad():
            up.conv.weight.normal_()
            up.conv.bias.normal_()
        torch.testing.assert_close(up(x), up.conv(x))
        torch.testing.assert_close(up(x.contiguous(memory_format=torch.channels_last)), up.conv(x))


@pytest.mark.parametrize("neck", [LGFFNE(16, 2), LGFFNE(16, 1, upsample="bilinear"), LGFFND(16, 2), BiFPN(16, 2)])
def test_neck_shapes_and_size_check(neck):
    for h, w in [(224, 224), (256, 256), (224, 288)]:
        feats = [torch.randn(1, 16, h // s, w // s) for s in (4, 8, 16, 32)]
        assert [o.shape for o in neck(feats)] == [f.shape for f in feats]
    with pytest.raises(ValueError, match="divisible by 32"):
        neck([torch.randn(1, 16, 25, 25), torch.randn(1, 16, 13, 13), torch.randn(1, 16, 7, 7),
              torch.randn(1, 16, 4, 4)])


def test_neck_parameter_counts_from_the_formulas():
    c = 256
    # FMBConvCA: DW3x3 (+bias) + CA (C->C/2->C, biases) + PW (+bias); 14 blocks per layer (2+2+2+3+3+2 edges)
    block = (9 * c + c) + (c * c // 2 + c // 2 + c // 2 * c + c) + (c * c + c)
    assert sum(p.numel() for p in LGFFND(c, 5).parameters()) == 5 * 14 * block == 9_399_040
    # BiFPN node: DW3x3 + PW (no biases) + BN (2C); 6 nodes and 14 fusion weights per layer
    node = 9 * c + c * c + 2 * c
    assert sum(p.numel() for p in BiFPN(c, 5).parameters()) == 5 * (6 * node + 14) == 2_050_630


# ----------------------------------------------------------------------------------------------- GeM
def test_gem_p1_is_average_and_large_p_approaches_max():
    x = torch.rand(3, 5, 6, 4) + 0.05
    torch.testing.assert_close(GeM(p=1.0)(x), x.mean(dim=(2, 3)))
    big = GeM(p=200.0)(x)
    mx = x.amax(dim=(2, 3))
    assert (big <= mx + 1e-5).all() and ((mx - big) / mx).max() < 0.02
    mid = GeM(p=4.6)(x)
    assert (mid > x.mean(dim=(2, 3))).all() and (mid < mx).all()
    assert isinstance(GeM(learn_p=True).p, torch.nn.Parameter)
    fixed = GeM(learn_p=False)
    assert not isinstance(fixed.p, torch.nn.Parameter) and "p" in dict(fixed.named_buffers())


# ----------------------------------------------------------------------------------------------- Sub-center ArcFace
def _reference_arcface(emb, weight, labels, m, s, k):
    """Independent re-computation with plain math (per-row loops)."""
    losses = []
    for e, y in zip(emb.tolist(), labels.tolist()):
        en = math.sqrt(sum(v * v for v in e))
        cos = []
        for c in range(weight.shape[0] // k):
            best = -2.0
            for j in range(k):
                w = weight[c * k + j].tolist()
                wn = math.sqrt(sum(v * v for v in w))
                best = max(best, sum(a * b for a, b in zip(e, w)) / (en * wn))
            cos.append(best)
        theta = math.acos(max(-1.0, min(1.0, cos[y])))
        phi = math.cos(theta + m) if theta <= math.pi - m else math.cos(theta) - m * math.sin(m)
        logits = [s * (phi if c == y else v) for c, v in enumerate(cos)]
        mx = max(logits)
        losses.append(-(logits[y] - mx - math.log(sum(math.exp(v - mx) for v in logits))))
    return sum(losses) / len(losses)


def test_arcface_hand_computed_example_including_theta_beyond_pi_minus_m():
    loss = SubCenterArcFace(2, 2, margin_deg=28.6, scale=64.0, num_subcenters=1)
    with torch.no_grad():
        loss.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    m = math.radians(28.6)
    # row 0: 30 deg from class 0 (its label); row 1: 170 deg from class 1 (> pi - m = 151.4 deg)
    a0, a1 = math.radians(30.0), math.radians(90.0 + 170.0)
    emb = torch.tensor([[math.cos(a0), math.sin(a0)], [math.cos(a1), math.sin(a1)]], dtype=torch.float64)
    labels = torch.tensor([0, 1])
    logits = loss.logits(emb, labels)
    expected_row0 = [64 * math.cos(math.radians(30) + m), 64 * math.cos(math.radians(60))]
    theta1 = math.radians(170.0)
    expected_row1 = [64 * math.cos(math.radians(260.0)), 64 * (math.cos(theta1) - m * math.sin(m))]
    torch.testing.assert_close(logits, torch.tensor([expected_row0, expected_row1], dtype=torch.float32),
                               atol=1e-4, rtol=1e-5)
    expected = _reference_arcface(emb, loss.weight.detach().double(), labels, m, 64.0, 1)
    assert abs(float(loss(emb, labels).detach()) - expected) < 1e-3


def test_target_logit_is_monotonic_in_theta():
    for margin in (math.radians(28.6), math.radians(5.73)):
        theta = torch.linspace(0, math.pi, 2001, dtype=torch.float64)
        phi = arcface_target_logit(torch.cos(theta), margin)
        assert (phi[1:] <= phi[:-1] + 1e-12).all()
        below = theta <= math.pi - margin - 1e-6
        torch.testing.assert_close(phi[below], torch.cos(theta[below] + margin))


def test_subcenters_take_the_max_and_k1_equals_arcface():
    torch.manual_seed(1)
    emb, labels = torch.randn(6, 8), torch.tensor([0, 1, 2, 3, 4, 0])
    sub = SubCenterArcFace(8, 5, margin_deg=17.2, scale=30.0, num_subcenters=3)
    cos_all = F.normalize(emb, dim=1) @ F.normalize(sub.weight.detach(), dim=1).t()
    torch.testing.assert_close(sub.get_cosine(emb), cos_all.view(6, 5, 3).amax(dim=2))
    ref = _reference_arcface(emb.double(), sub.weight.detach().double(), labels, math.radians(17.2), 30.0, 3)
    assert abs(float(sub(emb, labels).detach()) - ref) < 1e-4
    # K = 1 equals plain ArcFace: same loss as an ArcFace built from the first sub-center of every class
    plain = SubCenterArcFace(8, 5, margin_deg=17.2, scale=30.0, num_subcenters=1)
    with torch.no_grad():
        plain.weight.copy_(sub.weight.view(5, 3, 8)[:, 0])
    ref1 = _reference_arcface(emb.double(), plain.weight.detach().double(), labels, math.radians(17.2), 30.0, 1)
    assert abs(float(plain(emb, labels).detach()) - ref1) < 1e-4
    # sub-centers do change the answer
    assert abs(float(plain(emb, labels).detach()) - float(sub(emb, labels).detach())) > 1e-4


def test_scale_and_margin_are_independent_and_margin_is_degrees():
    loss = SubCenterArcFace(4, 3, margin_deg=10.0, scale=30.0)
    assert loss.scale == 30.0 and loss.margin == pytest.approx(math.radians(10.0)) and loss.margin_deg == 10.0
    emb, labels = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    other_scale = SubCenterArcFace(4, 3, margin_deg=10.0, scale=60.0)
    other_margin = SubCenterArcFace(4, 3, margin_deg=20.0, scale=30.0)
    for other in (other_scale, other_margin):
        with torch.no_grad():
            other.weight.copy_(loss.weight)
    base = loss.logits(emb, labels)
    torch.testing.assert_close(other_scale.logits(emb, labels), 2 * base)  # scale multiplies, margin untouched
    target = F.one_hot(labels, 3).bool()
    changed = other_margin.logits(emb, labels)
    torch.testing.assert_close(changed[~target], base[~target])  # margin only moves target logits
    assert (changed[target] < base[target]).all()
    with pytest.raises(ConfigError, match="degrees"):
        SubCenterArcFace(4, 3, margin_deg=90.0)
    with pytest.raises(ValueError, match=r"\(B, 4\)"):
        loss(torch.randn(2, 5), torch.tensor([0, 1]))


def test_arcface_weights_cast_to_embedding_dtype():
    loss = SubCenterArcFace(4, 3)
    emb = torch.randn(2, 4, dtype=torch.bfloat16)
    assert loss.get_cosine(emb).dtype == torch.bfloat16
    out = loss(emb, torch.tensor([0, 2]))
    assert out.dtype == torch.float32 and torch.isfinite(out)


def test_lgffn_e_node_graph_matches_the_design():
    from torch import nn

    from lgff_core.models.resample import _ConvTransposeUp

    # DESIGN.md: P3_1 = fuse(GA(P3_0), LA(up(P4_0))) ... P4_2 = fuse(LA(P4_0), GA(down(P3_2)))
    expected = {
        "p3_1": [(nn.Identity, GlobalAggregator), (_ConvTransposeUp, LocalAggregator)],
        "p2_1": [(nn.Identity, GlobalAggregator), (_ConvTransposeUp, LocalAggregator)],
        "p1_2": [(nn.Identity, GlobalAggregator), (_ConvTransposeUp, LocalAggregator)],
        "p2_2": [(nn.Identity, LocalAggregator), (nn.Identity, LocalAggregator),
                 (DepthwiseDownsample2x, GlobalAggregator)],
        "p3_2": [(nn.Identity, LocalAggregator), (nn.Identity, LocalAggregator),
                 (DepthwiseDownsample2x, GlobalAggregator)],
        "p4_2": [(nn.Identity, LocalAggregator), (DepthwiseDownsample2x, GlobalAggregator)],
    }
    from lgff_core.models import NODE_GRAPH

    sources = {name: [src for src, _, _ in edges] for name, edges in NODE_GRAPH}
    assert sources == {"p3_1": ["p3_0", "p4_0"], "p2_1": ["p2_0", "p3_1"], "p1_2": ["p1_0", "p2_1"],
                       "p2_2": ["p2_0", "p2_1", "p1_2"], "p3_2": ["p3_0", "p3_1", "p2_2"], "p4_2": ["p4_0", "p3_2"]}
    layer = LGFFNE(8, 1).layers[0]
    assert list(layer.nodes) == list(expected)
    for name, edges in expected.items():
        node = layer.nodes[name]
        assert [(type(e[0]), type(e[1])) for e in node.edges] == edges, name
        assert isinstance(node.combine, FastNormalizedFusion) and node.combine.num_inputs == len(edges)
    # every aggregator has its own parameters (14 per layer)
    assert sum(isinstance(m, (LocalAggregator, GlobalAggregator)) for m in layer.modules()) == 14
