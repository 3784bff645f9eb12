"""Model-level behaviour: frozen backbone, shapes for every neck, training step, weights, detection, CLI summary."""
import hashlib

import pytest
import timm
import torch
import torch.nn.functional as F

from lgff_core.config import ConfigError, load_config
from lgff_core.errors import CheckpointError
from lgff_core.models import (FrozenBackbone, GeMBaselineModel, LGFFDetectionModel, build_baseline,
                              build_loss, build_model, map_state_dict_in_order, package_weights_path,
                              select_out_indices)

TINY = ["model.backbone.weights=none", "model.channels=32", "model.num_layers=1"]


def tiny_cfg(*extra):
    return load_config(None, TINY + list(extra))


# ----------------------------------------------------------------------------------------------- backbone
def test_out_indices_from_feature_info_reductions(tmp_path):
    effnet = [{"reduction": r} for r in (2, 4, 8, 16, 32)]
    convnext = [{"reduction": r} for r in (4, 8, 16, 32)]
    assert select_out_indices(effnet) == [1, 2, 3, 4]
    assert select_out_indices(convnext) == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match="no feature level at stride 4"):
        select_out_indices([{"reduction": r} for r in (8, 16, 32)], "odd")
    with pytest.raises(ConfigError, match="not a timm model"):
        FrozenBackbone("no_such_net")
    b = FrozenBackbone("convnext_atto", weights="none")
    assert b.out_indices == [0, 1, 2, 3] and [d["reduction"] for d in b.feature_info] == [4, 8, 16, 32]
    assert b.weights_hash == "random"
    # a full-model checkpoint loads into the FeatureListNet (which renames stem.0 -> stem_0, stages.0 -> stages_0)
    full = timm.create_model("convnext_atto").eval()
    torch.save(full.state_dict(), tmp_path / "atto.pt")
    loaded = FrozenBackbone("convnext_atto", weights=str(tmp_path / "atto.pt"))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[-1], full.forward_features(x))


def test_backbone_stays_frozen_and_in_eval():
    model = build_model(tiny_cfg())
    model.train()
    assert model.training and model.neck.training and not model.backbone.training
    assert not any(m.training for m in model.backbone.modules())
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("backbone."))
    feats = model.forward_features(torch.randn(2, 3, 64, 64))
    assert [f.shape[1] for f in feats] == [24, 40, 112, 320] and not any(f.requires_grad for f in feats)


# ----------------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("neck", ["lgffn_e", "lgffn_d", "bifpn"])
def test_descriptor_shapes_for_every_neck(neck):
    model = build_model(tiny_cfg(f"model.neck={neck}")).eval()
    assert model.embedding_dim == 4 * 32
    for h, w in [(224, 224), (256, 256), (224, 288)]:
        with torch.no_grad():
            out = model(torch.randn(2, 3, h, w))
        assert out.shape == (2, 128) and out.dtype == torch.float32
        torch.testing.assert_close(out.norm(dim=1), torch.ones(2))


def test_forward_equals_feature_cache_path_and_baseline():
    model = build_model(tiny_cfg()).eval()
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        torch.testing.assert_close(model(x), model.forward_head(feats))
        half = model.forward_head([f.to(torch.bfloat16) for f in feats])  # a bf16 feature cache still works
        assert half.dtype == torch.float32 and F.cosine_similarity(half, model(x)).min() > 0.99
    base = build_baseline(tiny_cfg())
    assert isinstance(base, GeMBaselineModel) and base.embedding_dim == 320
    with torch.no_grad():
        feats = base.forward_features(x)
        pooled = feats[-1].clamp(min=1e-6).pow(3).mean(dim=(2, 3)).pow(1 / 3)
        torch.testing.assert_close(base(x), F.normalize(pooled, dim=1))
    assert base.trainable_parameters() == []


def test_channels_last_bf16_autocast_matches_fp32():
    model = build_model(tiny_cfg()).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model_cl(x.contiguous(memory_format=torch.channels_last))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert F.cosine_similarity(out, ref).min() > 0.98


# ----------------------------------------------------------------------------------------------- training step
@pytest.mark.parametrize("neck", ["lgffn_e", "lgffn_d", "bifpn"])
def test_one_step_changes_every_trainable_tensor_and_no_backbone_tensor(neck):
    model = build_model(tiny_cfg(f"model.neck={neck}"))
    loss_fn = build_loss(tiny_cfg(), num_classes=3, embedding_size=model.embedding_dim)
    model.train()
    before_backbone = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(list(model.trainable_parameters()) + list(loss_fn.parameters()), lr=1e-3)
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 0])
    loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()
    unchanged = [n for n, p in model.named_parameters() if p.requires_grad and torch.equal(p.detach(), before[n])]
    assert unchanged == []
    assert len(before) > 20 and not any(n.startswith("backbone.") for n in before)
    after_backbone = model.backbone.state_dict()
    assert any("running_mean" in k for k in after_backbone)
    assert all(torch.equal(before_backbone[k], after_backbone[k]) for k in before_backbone)


def test_trainable_state_dict_round_trip_and_mismatch():
    a, b = build_model(tiny_cfg()).eval(), build_model(tiny_cfg()).eval()
    sd = a.trainable_state_dict()
    assert sd and not any(k.startswith("backbone.") for k in sd)
    b.load_trainable_state_dict(sd)
    b.backbone.load_state_dict(a.backbone.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))
    with pytest.raises(CheckpointError, match="missing"):
        b.load_trainable_state_dict({k: v for k, v in sd.items() if "head" not in k})
    bigger = build_model(tiny_cfg("model.channels=48"))
    with pytest.raises(CheckpointError, match="shape"):
        bigger.load_trainable_state_dict(sd)


# ----------------------------------------------------------------------------------------------- weights
def test_efficientnet_lite0_package_weights_classify_coffee():
    from PIL import Image
    from skimage.data import coffee
    from timm.data import create_transform

    path = package_weights_path("package:efficientnet-lite0")
    source = torch.load(path, map_location="cpu", weights_only=True)
    classifier = timm.create_model("tf_efficientnet_lite0", num_classes=1000).eval()
    classifier.load_state_dict(map_state_dict_in_order(source, classifier.state_dict(), path))
    backbone = FrozenBackbone("tf_efficientnet_lite0", weights="package:efficientnet-lite0")
    dc = backbone.data_config
    assert dc["mean"] == (0.5, 0.5, 0.5) and dc["std"] == (0.5, 0.5, 0.5)
    assert dc["interpolation"] == "bicubic" and dc["input_size"] == (3, 224, 224)
    transform = create_transform(**dc)  # resize shorter side to 224 / crop_pct, centre crop 224
    x = transform(Image.fromarray(coffee())).unsqueeze(0)
    with torch.no_grad():
        probs = classifier(x).softmax(-1)
        assert int(probs.argmax()) == 967 and float(probs[0, 967]) > 0.5  # espresso
        # the frozen feature backbone carries the same weights: its last level equals the classifier's trunk
        trunk = classifier.blocks(classifier.bn1(classifier.conv_stem(x)))
        torch.testing.assert_close(backbone(x)[-1], trunk)
    with open(path, "rb") as fh:
        assert backbone.weights_hash == hashlib.sha256(fh.read()).hexdigest()


def test_in_order_mapping_checks_shapes():
    target = {"a.weight": torch.zeros(2, 3), "b.weight": torch.zeros(4)}
    out = map_state_dict_in_order({"x": torch.ones(2, 3), "y": torch.ones(4)}, target)
    assert list(out) == ["a.weight", "b.weight"]
    with pytest.raises(CheckpointError, match=r"tensor y has shape \(5,\).*b.weight"):
        map_state_dict_in_order({"x": torch.ones(2, 3), "y": torch.ones(5)}, target, "ckpt")
    with pytest.raises(CheckpointError, match="has 1 tensors"):
        map_state_dict_in_order({"x": torch.ones(2, 3)}, target)
    with pytest.raises(ConfigError, match="fits only"):
        FrozenBackbone("convnext_atto", weights="package:efficientnet-lite0")


def test_local_weight_files_safetensors_and_torch(tmp_path):
    from safetensors.torch import save_file

    src = FrozenBackbone("tf_efficientnet_lite0", weights="none")
    sd = {k: v.contiguous() for k, v in src.model.state_dict().items()}
    st = tmp_path / "bb.safetensors"
    save_file(sd, str(st))
    full = timm.create_model("tf_efficientnet_lite0")  # full-model naming incl. the classifier, torch format
    full.load_state_dict({**full.state_dict(), **sd})
    pt = tmp_path / "bb.pt"
    torch.save({"state_dict": full.state_dict()}, pt)
    for path in (st, f"file://{pt}"):
        loaded = FrozenBackbone("tf_efficientnet_lite0", weights=str(path))
        for k, v in loaded.model.state_dict().items():
            assert torch.equal(v, sd[k]), k
    assert loaded.weights_hash == hashlib.sha256(pt.read_bytes()).hexdigest()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="bad.pt"):
        FrozenBackbone("tf_efficientnet_lite0", weights=str(bad))
    with pytest.raises(CheckpointError, match="cannot read"):
        FrozenBackbone("tf_efficientnet_lite0", weights=str(tmp_path / "missing.safetensors"))
    wrong = tmp_path / "wrong.safetensors"
    save_file({"x": torch.zeros(3)}, str(wrong))
    with pytest.raises(CheckpointError, match="wrong.safetensors"):
        FrozenBackbone("tf_efficientnet_lite0", weights=str(wrong))


# ----------------------------------------------------------------------------------------------- detection
def test_detection_model_train_forward_gives_finite_losses():
    cfg = tiny_cfg("model.kind=detection", "model.neck=lgffn_d", "model.det_min_size=128", "model.det_max_size=128")
    model = build_model(cfg)
    assert isinstance(model, LGFFDetectionModel)
    assert model.rpn.anchor_generator.num_anchors_per_location() == [4, 4, 4, 4]
    assert model.roi_heads.box_roi_pool.featmap_names == ["0", "1", "2", "3"]
    feats = model.backbone(torch.randn(1, 3, 128, 96))
    assert list(feats) == ["0", "1", "2", "3"] and feats["3"].shape == (1, 32, 4, 3)
    model.train()
    assert not model.frozen_backbone.training
    mask = torch.zeros(1, 128, 128, dtype=torch.uint8)
    mask[0, 30:70, 40:90] = 1
    target = {"boxes": torch.tensor([[40.0, 30.0, 90.0, 70.0]]), "labels": torch.tensor([1]), "masks": mask}
    losses = model([torch.rand(3, 128, 128)], [target])
    assert set(losses) >= {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is None for p in model.frozen_backbone.parameters())
    assert model.backbone.neck.layers[0].nodes["p3_1"].edges[0][1].pw.weight.grad is not None
    model.eval()
    with torch.no_grad():
        (pred,) = model([torch.rand(3, 128, 128)])
    assert set(pred) == {"boxes", "labels", "scores", "masks"} and pred["masks"].shape[1:] == (1, 128, 128)


def test_detection_anchors_one_size_per_level_and_feature_keys():
    from torchvision.models.detection.image_list import ImageList

    cfg = tiny_cfg("model.kind=detection", "model.neck=lgffn_d", "model.det_min_size=128", "model.det_max_size=128")
    model = build_model(cfg).eval()
    generator = model.rpn.anchor_generator
    assert generator.sizes == ((32,), (64,), (128,), (256,))
    assert generator.aspect_ratios == ((0.5, 1.0, 1.5, 2.0),) * 4
    assert model.roi_heads.box_roi_pool.featmap_names == ["0", "1", "2", "3"]
    assert model.roi_heads.mask_roi_pool.featmap_names == ["0", "1", "2", "3"]
    images = torch.randn(1, 3, 128, 96)
    with torch.no_grad():
        feats = model.backbone(images)
    assert list(feats) == ["0", "1", "2", "3"] and model.backbone.out_channels == 32
    assert [tuple(f.shape[-2:]) for f in feats.values()] == [(128 // s, 96 // s) for s in (4, 8, 16, 32)]
    (anchors,) = generator(ImageList(images, [(128, 96)]), list(feats.values()))
    start = 0
    for level, (size, stride) in enumerate(zip((32, 64, 128, 256), (4, 8, 16, 32))):
        h, w = 128 // stride, 96 // stride
        boxes = anchors[start:start + h * w * 4].view(h, w, 4, 4)  # (row, column, ratio, xyxy)
        start += h * w * 4
        # independent reference: area size^2, height / width = ratio, centred on (0, 0); torchvision rounds the
        # corners to whole pixels, hence atol 0.5
        ratios = torch.tensor([0.5, 1.0, 1.5, 2.0])
        half_w, half_h = size / ratios.sqrt() / 2, size * ratios.sqrt() / 2
        torch.testing.assert_close(boxes[0, 0], torch.stack([-half_w, -half_h, half_w, half_h], dim=1),
                                   atol=0.5, rtol=0)
        # anchors are centred on the level's grid: one stride apart in x and y
        torch.testing.assert_close(boxes[0, 1] - boxes[0, 0], torch.tensor([stride, 0.0, stride, 0.0]).expand(4, 4))
        torch.testing.assert_close(boxes[1, 0] - boxes[0, 0], torch.tensor([0.0, stride, 0.0, stride]).expand(4, 4))
    assert start == anchors.shape[0]


def test_detection_trainable_state_dict_excludes_only_the_frozen_body():
    cfg = tiny_cfg("model.kind=detection", "model.neck=lgffn_d", "model.det_min_size=128", "model.det_max_size=128")
    a, b = build_model(cfg), build_model(cfg)
    sd = a.trainable_state_dict()
    assert not any(k.startswith("backbone.body.") for k in sd)
    assert {k.split(".")[0] for k in sd} == {"backbone", "rpn", "roi_heads"} and any(".stem." in k for k in sd)
    frozen = {k for k in a.state_dict() if k.startswith("backbone.body.")}
    assert frozen and set(sd) | frozen == set(a.state_dict())
    assert {id(p) for p in a.trainable_parameters()} == {id(p) for k, p in a.named_parameters() if k in sd}
    b.load_trainable_state_dict(sd)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in sd.items())
    with pytest.raises(CheckpointError, match=r"ckpt does not match LGFFDetectionModel: 1 missing"):
        b.load_trainable_state_dict({k: v for k, v in sd.items() if k != "rpn.head.conv.0.0.weight"}, "ckpt")


# ----------------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("preset,neck_params", [("lgffdm_lgffn_d", "9,461,760"), ("lgffdm_bifpn", "2,050,630")])
def test_models_summary_prints_neck_params(preset, neck_params, capsys):
    from lgff_core.cli import main

    code = main(["models", "summary", "--config", preset, "--set", "model.backbone.name=tf_efficientnet_lite0",
                 "--set", "model.backbone.weights=none"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"neck: {neck_params}" in out
    assert "neck '0'" in out and "1x256x56x56" in out


def test_models_summary_falls_back_when_weights_are_offline(capsys, tmp_path):
    from lgff_core.cli import main

    code = main(["models", "summary", "--config", "lgffem_cpu", "--set", f"model.backbone.weights={tmp_path}/no.pt",
                 "--set", "model.channels=32", "--set", "model.num_layers=1"])
    out = " ".join(capsys.readouterr().out.split())  # wrapping (any terminal width) only moves whitespace
    assert code == 0 and "unavailable offline" in out and "built with weights" in out
    assert "descriptor" in out and "1x128" in out
    assert main(["models", "summary", "--config", "lgffem_cpu", "--image-size", "100"]) == 2


def test_presets_load():
    for name in ("lgffem_paper", "lgffem_cpu", "lgffdm_lgffn_d", "lgffdm_bifpn", "lgffdm_cpu"):
        cfg = load_config(name)
        assert cfg.name == name
    paper = load_config("lgffem_paper")
    m, loss = paper.model, paper.loss
    assert (m.channels, m.num_layers, loss.scale, loss.margin_deg, loss.num_subcenters) == (512, 3, 64.0, 28.6, 3)
    assert paper.model.backbone.name.startswith("convnextv2_base") and paper.train.lr == 5e-3
    det = load_config("lgffdm_lgffn_d")
    assert (det.model.kind, det.model.channels, det.model.num_layers, det.train.epochs) == ("detection", 256, 5, 12)


def test_models_bench_reports_every_mode(capsys):
    from lgff_core.cli import main
    from lgff_core.models.benchmark import benchmark_forward

    rows = benchmark_forward(build_model(tiny_cfg()), batch_size=2, image_size=64, iters=1)
    assert [r["mode"] for r in rows] == ["fp32", "channels_last", "channels_last+bf16"]
    assert rows[0]["min_cosine_vs_fp32"] == pytest.approx(1.0, abs=1e-6)
    assert rows[1]["min_cosine_vs_fp32"] > 0.9999 and rows[2]["min_cosine_vs_fp32"] > 0.98
    assert all(r["best_img_per_s"] >= r["median_img_per_s"] > 0 for r in rows)
    code = main(["models", "bench", "--config", "lgffem_cpu", "--set", "model.channels=32", "--set",
                 "model.num_layers=1", "--batch-size", "2", "--image-size", "64", "--iters", "1"])
    assert code == 0 and "channels_last+bf16" in capsys.readouterr().out
    assert main(["models", "bench", "--config", "lgffdm_cpu"]) == 2


# ----------------------------------------------------------------------------------- weights baked into the image
@pytest.fixture
def no_hub(monkeypatch):
    """timm.create_model that fails the test if asked for pretrained (hub) weights; HF_HUB_OFFLINE set as in the image."""
    import timm

    real_create = timm.create_model

    def create_model(name, pretrained=False, **kwargs):
        assert not pretrained, f"tried to download {name} from a hub"
        return real_create(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", create_model)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_timm_weights_come_from_the_image_weights_dir_without_a_hub(tmp_path, monkeypatch, no_hub):
    import timm
    from safetensors.torch import save_file

    # the file `lgff models fetch-weights` writes: timm's full-model state dict under the model's name
    source = timm.create_model("convnext_atto.d2_in1k", pretrained=False)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()},
              str(tmp_path / "convnext_atto.d2_in1k.safetensors"))
    monkeypatch.setenv("LGFF_WEIGHTS_DIR", str(tmp_path))
    backbone = FrozenBackbone("convnext_atto.d2_in1k", weights="timm")
    loaded = backbone.model.state_dict()
    assert torch.equal(loaded["stem_0.weight"], source.state_dict()["stem.0.weight"])
    assert torch.equal(loaded["stages_3.blocks.1.conv_dw.weight"], source.state_dict()["stages.3.blocks.1.conv_dw.weight"])
    # same identity as hub-loaded weights, so checkpoints trained either way are interchangeable
    assert backbone.weights_hash == "timm:timm/convnext_atto.d2_in1k"


def test_timm_weights_missing_offline_fail_clearly_without_a_hub(tmp_path, monkeypatch, no_hub):
    monkeypatch.setenv("LGFF_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(CheckpointError, match=r"convnext_atto.*convnext_atto\.safetensors does not exist.*BAKE_WEIGHTS"):
        FrozenBackbone("convnext_atto", weights="timm")


def test_fetch_weights_writes_the_file_the_loader_reads(tmp_path, monkeypatch, capsys):
    import timm

    from lgff_core.cli import main

    real_create = timm.create_model
    # stands in for the hub download on the image build host: a deterministic "pretrained" model
    def create_model(name, pretrained=False, **kwargs):
        torch.manual_seed(123)
        return real_create(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", create_model)
    assert main(["models", "fetch-weights", "--config", "lgffem_paper", "--set", "model.backbone.name=convnext_atto",
                 "--out", str(tmp_path)]) == 0
    assert "convnext_atto.safetensors" in capsys.readouterr().out
    monkeypatch.setenv("LGFF_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    backbone = FrozenBackbone("convnext_atto", weights="timm")
    torch.manual_seed(123)
    expected = real_create("convnext_atto", pretrained=False).state_dict()["stem.0.weight"]
    assert torch.equal(backbone.model.state_dict()["stem_0.weight"], expected)
    assert main(["models", "fetch-weights", "--config", "lgffem_cpu", "--out", str(tmp_path)]) == 0
    assert "nothing to fetch" in capsys.readouterr().out
