import ast

import pytest

from weights_convert.core.spec import ModelConfig, infer_config, param_table, parameter_count


def test_default_table_equals_article_keys(reference_dir):
    rows = [line.split("\t") for line in (reference_dir / "state_dict_keys.tsv").read_text().splitlines()[1:]]
    expected = [(key, ast.literal_eval(shape)) for key, shape, _ in rows]
    assert list(param_table(ModelConfig()).items()) == expected


def test_default_parameter_count():
    assert parameter_count(ModelConfig()) == 8_135_745


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"in_channels": 0}, "in_channels must be a positive integer, got 0"),
        ({"out_channels": -1}, "out_channels must be a positive integer, got -1"),
        ({"in_channels": 2.5}, "got 2.5"),
        ({"in_channels": True}, "got True"),
        ({"channels": (64,)}, "at least two entries"),
        ({"channels": ()}, "at least two entries"),
        ({"channels": (64, 0, 128)}, "(bad: [0])"),
        ({"channels": (64, "128")}, "(bad: ['128'])"),
        ({"channels": 64}, "got 64"),
        ({"channels": "64"}, "got '64'"),
    ],
)
def test_config_validation_echoes_bad_value(kwargs, fragment):
    with pytest.raises(ValueError) as info:
        ModelConfig(**kwargs)
    assert fragment in str(info.value)


def test_config_is_frozen_and_normalises_channels():
    config = ModelConfig(channels=[4, 8, 16])
    assert config.channels == (4, 8, 16) and config.depth == 2 and config.min_size == 4
    with pytest.raises(AttributeError):
        config.in_channels = 5


def test_config_dict_round_trip_and_unknown_fields():
    config = ModelConfig(2, 5, (4, 8))
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown fields \\['depth'\\]"):
        ModelConfig.from_dict({"depth": 3})


@pytest.mark.parametrize("config", [ModelConfig(), ModelConfig(1, 4, (4, 8)), ModelConfig(2, 3, (8, 16, 32, 64, 128))])
def test_infer_config_from_shapes(config):
    assert infer_config(param_table(config)) == config


@pytest.mark.parametrize(
    "changed",
    [
        ModelConfig(in_channels=4),
        ModelConfig(out_channels=2),
        ModelConfig(channels=(64, 128, 256, 256)),
        ModelConfig(channels=(32, 128, 256, 512)),
        ModelConfig(channels=(64, 128, 512)),
    ],
)
def test_every_field_changes_the_parameter_count(changed):
    assert parameter_count(changed) != parameter_count(ModelConfig())
