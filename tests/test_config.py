import pytest

from lgff_core.config import ConfigError, LGFFConfig, StageConfig, apply_overrides, config_from_dict, load_config, parse_set_args


def test_defaults_validate():
    cfg = config_from_dict({})
    assert cfg.model.channels == 512 and cfg.loss.scale == 64.0 and cfg.loss.margin_deg == 28.6


def test_unknown_key_names_dotted_path(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  chanels: 256\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    assert "model.chanels" in str(exc.value) and str(p) in str(exc.value)


def test_wrong_type_is_an_error():
    with pytest.raises(ConfigError, match="train.epochs: expected an integer"):
        config_from_dict({"train": {"epochs": "ten"}})
    with pytest.raises(ConfigError, match="model.neck"):
        config_from_dict({"model": {"neck": "fpn"}})


def test_set_overrides_parse_yaml_values():
    over = parse_set_args(["train.epochs=2", "loss.margin_deg=17.2", "model.backbone.out_indices=[1,2,3,4]"])
    cfg = apply_overrides(LGFFConfig(), over)
    assert cfg.train.epochs == 2 and isinstance(cfg.train.epochs, int)
    assert cfg.loss.margin_deg == 17.2
    assert cfg.model.backbone.out_indices == [1, 2, 3, 4]
    with pytest.raises(ConfigError, match="unknown key 'train.epoch'"):
        apply_overrides(LGFFConfig(), {"train.epoch": 3})
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_set_args(["train.epochs"])


def test_strategy_stage_overrides():
    cfg = config_from_dict({"strategy": [{"name": "B.1"}, {"name": "B.2", "overrides": {"loss.margin_deg": 17.2}}]})
    assert isinstance(cfg.strategy[1], StageConfig)
    assert cfg.stage(0).loss.margin_deg == 28.6
    assert cfg.stage(1).loss.margin_deg == 17.2
    with pytest.raises(ConfigError, match="no stage 5"):
        cfg.stage(5)
