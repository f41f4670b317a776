"""The typed config: unknown keys, bad types and out-of-range values are refused with the field."""

from __future__ import annotations

import pytest

from cbdtune.config import (
    PRESETS,
    ConfigError,
    ExperimentConfig,
    ModelConfig,
    parse_overrides,
    preset,
    valid_keys,
)


def test_config_defaults_are_the_paper() -> None:
    cfg = ExperimentConfig()
    assert (cfg.model.d_model, cfg.model.encoder_layers, cfg.model.mask_ratio) == (128, 8, 0.75)
    assert cfg.model.bernstein_order == 12 and cfg.loss.gamma == 0.5
    assert (cfg.train.pretrain_lr, cfg.train.weight_decay, cfg.train.batch_size) == (1e-4, 3e-4, 128)


def test_config_rejects_unknown_key() -> None:
    with pytest.raises(ConfigError, match=r"x.yaml: model.mask_ratoi: unknown key; did you mean "
                                          r"model.mask_ratio"):
        ExperimentConfig.from_dict({"model": {"mask_ratoi": 0.5}}, where="x.yaml")


def test_config_rejects_unknown_section() -> None:
    with pytest.raises(ConfigError, match="unknown section 'modle'"):
        ExperimentConfig.from_dict({"modle": {"mask_ratio": 0.5}})


@pytest.mark.parametrize(("key", "value", "message"), [
    ("model.mask_ratio", 1.5, "expected a float in \\(0, 1\\), but got 1.5"),
    ("model.mask_ratio", 0.0, "expected a float in \\(0, 1\\)"),
    ("model.bernstein_order", 0, "must be >= 1, but got 0"),
    ("model.d_model", 30, "30 is not divisible by model.n_heads=4"),
    ("loss.gamma", -0.1, "must be a finite number >= 0"),
    ("model.tokenizer", "lstm", "expected one of \\['conv', 'patch'\\]"),
    ("model.encoder_layers", 2.5, "expected an integer"),
    ("model.use_cbd", "yes", "expected true or false"),
    ("train.classifier", "svm", "expected one of"),
    ("model.ser_norm", "max",
     "expected one of \\['softmax', 'fraction', 'tempered'\\], but got 'max'"),
    ("model.pos_encoding", "rope", "expected one of \\['none', 'learned', 'sinusoidal'\\]"),
    ("model.head", "cls", "expected one of \\['flatten', 'mean', 'attention'\\]"),
    ("model.head_dropout", 1.0, "expected a float in \\[0, 1\\), but got 1.0"),
    ("model.head_dropout", -0.1, "expected a float in \\[0, 1\\)"),
    ("model.level_features", "yes", "expected true or false"),
    ("model.min_tokens", 0, "must be >= 1, but got 0"),
    ("model.min_tokens", 8.5, "expected an integer"),
])
def test_config_rejects_bad_value_naming_the_field(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=f"{key}: {message}"):
        ExperimentConfig.from_dict({key: value}, where="f.yaml")


def test_config_dotted_and_nested_round_trip() -> None:
    cfg = ExperimentConfig.from_dict({"model.mask_ratio": 0.5, "loss": {"gamma": 0.1}})
    again = ExperimentConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.model.mask_ratio == 0.5 and again.loss.gamma == 0.1
    assert sorted(cfg.to_dict()) == valid_keys()


def test_config_int_is_accepted_for_float() -> None:
    assert ExperimentConfig.from_dict({"loss.gamma": 1}).loss.gamma == 1.0


def test_config_overrides_parse_yaml_values() -> None:
    assert parse_overrides(["model.mask_ratio=0.5", "model.use_cbd=false", "train.classifier=both"]) \
        == {"model.mask_ratio": 0.5, "model.use_cbd": False, "train.classifier": "both"}
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["model.mask_ratio"])


@pytest.mark.parametrize("item", ["model.mask_ratio=[0.1", "model.head={a: 1", "x=@y", "k=: :"])
def test_config_override_that_is_not_yaml_is_one_line(item: str) -> None:
    """It raised yaml's multi-line ScannerError/ParserError (a traceback from the CLIs)."""
    with pytest.raises(ConfigError) as err:
        parse_overrides([item])
    message = str(err.value)
    assert message.startswith(f"--set {item}: the value of ") and "not valid YAML" in message
    assert "\n" not in message


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_presets_validate(name: str) -> None:
    assert isinstance(preset(name), ExperimentConfig)


def test_config_yaml_round_trip(tmp_path) -> None:
    cfg = preset("smoke")
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert ExperimentConfig.from_yaml(path) == cfg


def test_config_model_switches_default_to_the_paper() -> None:
    """The paper preset is ``{}``: the switches' defaults are [P] / [C], so nothing changes."""
    m = ModelConfig()
    assert (m.ser_norm, m.pos_encoding, m.head, m.head_dropout, m.level_features) == (
        "softmax", "none", "flatten", 0.0, False)
    assert PRESETS["paper"] == {} and preset("paper").model == m


def test_config_default_preset_sets_the_model_switches() -> None:
    m = preset("default").model
    assert (m.ser_norm, m.pos_encoding, m.head, m.head_dropout, m.level_features) == (
        "tempered", "learned", "flatten", 0.1, True)
    t = preset("default").train
    assert (t.classifier, t.probe) == ("ridge", "ridge")
    assert all(k.startswith("train.") for k in PRESETS["default"]
               if k not in ("model.ser_norm", "model.pos_encoding", "model.head",
                            "model.head_dropout", "model.level_features"))


@pytest.mark.parametrize(("kw", "message"), [
    ({"ser_norm": "max"}, "model.ser_norm: expected one of ['softmax', 'fraction', 'tempered'], "
                          "but got 'max'"),
    ({"pos_encoding": "rope"}, "model.pos_encoding: expected one of"),
    ({"head": "cls"}, "model.head: expected one of"),
    ({"head_dropout": 1.5}, "model.head_dropout: expected a float in [0, 1), but got 1.5"),
])
def test_config_model_switches_checked_when_built_in_code(kw: dict[str, object],
                                                          message: str) -> None:
    """A ModelConfig built directly (not through from_dict) is checked too, in one line."""
    with pytest.raises(ConfigError) as info:
        ModelConfig(**kw)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_config_bad_switch_from_yaml_is_one_line(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  head: cls\n")
    with pytest.raises(ConfigError) as info:
        ExperimentConfig.from_yaml(path)
    assert str(info.value) == (f"{path}: model.head: expected one of ['flatten', 'mean', "
                               "'attention'], but got 'cls'")


def test_config_min_tokens_error_is_one_line_from_code_and_from_an_override() -> None:
    with pytest.raises(ConfigError) as err:
        ModelConfig(min_tokens=-3)
    assert str(err.value) == "model.min_tokens: must be >= 1, but got -3"
    with pytest.raises(ConfigError) as err:
        ExperimentConfig().replace(parse_overrides(["model.min_tokens=many"]))
    assert "model.min_tokens" in str(err.value) and "\n" not in str(err.value)
