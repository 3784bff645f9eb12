"""The one device / precision policy (`lgff_core.device`): what each stage computes at, per device."""
import pytest
import torch

from lgff_core.config import load_config
from lgff_core.device import cpu_supports_bf16, frozen_backbone_precision, precision_for
from lgff_core.errors import LGFFError
from lgff_core.retrieval.embed import resolve_speed_options

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_auto_rules_per_stage_and_device():
    fast = cpu_supports_bf16()
    assert precision_for("frozen_backbone", CPU).as_dict() == {"device": "cpu", "bf16": fast, "channels_last": fast}
    # bf16 on CUDA missed the fp32 cosine check: the frozen backbone stays fp32 there (channels-last is exact)
    assert (precision_for("frozen_backbone", CUDA).bf16, precision_for("frozen_backbone", CUDA).channels_last) == (
        False, True)
    assert precision_for("train_step", CUDA).bf16 and not precision_for("train_step", CPU).bf16
    assert precision_for("detection", CUDA).bf16 and not precision_for("detection", CPU).bf16
    assert precision_for("explain", CUDA, bf16=True, channels_last=True).name == "fp32"


def test_explicit_settings_win_and_bad_ones_are_named():
    assert precision_for("frozen_backbone", CUDA, bf16=True).bf16
    assert not precision_for("frozen_backbone", CPU, bf16=False, channels_last=False).channels_last
    with pytest.raises(LGFFError, match="embed.bf16='yes'"):
        precision_for("frozen_backbone", CPU, bf16="yes")
    with pytest.raises(ValueError, match="unknown stage"):
        precision_for("warp", CPU)


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_training_features_and_embedding_resolve_the_same_precision(device):
    """The trainer's feature cache and `lgff embed` ask the same function with the same `embed` settings: before
    the policy module, `embed.bf16: auto` meant bf16 features in training but fp32 embedding on CUDA."""
    cfg = load_config("demo")
    features = frozen_backbone_precision(cfg, device)
    assert resolve_speed_options(cfg, device) == {"bf16": features.bf16, "channels_last": features.channels_last}

