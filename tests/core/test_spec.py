import ast

import pytest

from weights_convert.core.architectures import config_from_dict, config_from_json, infer_config
from weights_convert.core.spec import (
    ModelConfig,
    check_input_shape,
    check_sides,
    param_table,
    parameter_count,
)


def test_default_table_equals_article_keys(reference_dir):
    rows = [line.split("\t") for line in (reference_dir / "state_dict_keys.tsv").read_text().splitlines()[1:]]
    expected = [(key, ast.literal_eval(shape)) for key, shape, _ in rows]
    assert list(param_table(ModelConfig()).items()) == expected


def test_default_parameter_count():
    assert parameter_count(ModelConfig()) == 8_135_745


def test_3d_table_has_the_2d_names_and_a_depth_axis_on_every_kernel():
    flat, volume = param_table(ModelConfig()), param_table(ModelConfig(spatial_dims=3))
    assert list(volume) == list(flat)
    for name, shape in flat.items():
        is_kernel = len(shape) == 4
        assert volume[name] == ((*shape, shape[-1]) if is_kernel else shape), name
    assert volume["e1.conv.conv.0.weight"] == (64, 3, 3, 3, 3) and volume["output.weight"] == (1, 64, 1, 1, 1)
    assert parameter_count(ModelConfig(spatial_dims=3)) == 23_695_809


def test_a_config_without_spatial_dims_is_2d():
    assert config_from_dict({"in_channels": 3, "out_channels": 1, "channels": [4, 8]}).spatial_dims == 2
    assert config_from_json('{"spatial_dims": 3, "channels": [4, 8]}').spatial_dims == 3


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
        ({"spatial_dims": 1}, "spatial_dims must be one of [2, 3], got 1"),
        ({"spatial_dims": 4}, "spatial_dims must be one of [2, 3], got 4"),
        ({"spatial_dims": True}, "got True"),
        ({"spatial_dims": "3"}, "got '3'"),
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
    assert config.to_dict()["architecture"] == "article"
    assert ModelConfig.from_dict(config.to_dict()) == config == config_from_dict(config.to_dict())
    with pytest.raises(ValueError, match="unknown fields \\['depth'\\]"):
        config_from_dict({"depth": 3})
    with pytest.raises(ValueError, match="architecture must be one of \\['article', 'monai'\\], got 'unet'"):
        config_from_dict({"architecture": "unet"})


@pytest.mark.parametrize(
    "config",
    [
        ModelConfig(),
        ModelConfig(1, 4, (4, 8)),
        ModelConfig(2, 3, (8, 16, 32, 64, 128)),
        ModelConfig(2, 2, (4, 8, 16), spatial_dims=3),
    ],
)
def test_infer_config_from_shapes(config):
    assert infer_config(param_table(config)) == config


def test_infer_config_refuses_kernels_of_both_ranks():
    table = dict(param_table(ModelConfig(2, 2, (4, 8, 16))))
    table["output.weight"] = (*table["output.weight"], 1)
    with pytest.raises(ValueError, match="the kernels mix 2D and 3D shapes"):
        infer_config(table)


@pytest.mark.parametrize(
    "shape, fragment",
    [
        ((1, 2, 9, 12), "expected input of shape (N, 2, D, H, W) with D, H, W >= 4, got a 4-D tensor"),
        ((1, 2, 9, 3, 12), "got (1, 2, 9, 3, 12)"),
        ((1, 3, 9, 12, 11), "got (1, 3, 9, 12, 11)"),
    ],
)
def test_3d_input_check(shape, fragment):
    config = ModelConfig(2, 1, (4, 8, 16), spatial_dims=3)
    check_input_shape(config, (2, 2, 4, 5, 6), "channels_first")
    check_input_shape(config, (2, 4, 5, 6, 2), "channels_last")
    with pytest.raises(ValueError) as info:
        check_input_shape(config, shape, "channels_first")
    assert fragment in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "spatial_dims, sides, message",
    [
        (2, (9, 12, 11), "--size takes 2 positive sides (H W) for this 2D model, got 9 12 11"),
        (3, (9, 12), "--size takes 3 positive sides (D H W) for this 3D model, got 9 12"),
        (3, (9, 0, 11), "--size takes 3 positive sides (D H W) for this 3D model, got 9 0 11"),
        (3, (9, 3, 11), "--size 9 3 11 is too small for depth 2: every side needs at least 4"),
    ],
)
def test_sides_are_checked_against_the_model(spatial_dims, sides, message):
    config = ModelConfig(2, 1, (4, 8, 16), spatial_dims=spatial_dims)
    with pytest.raises(ValueError) as info:
        check_sides(config, sides)
    assert str(info.value) == message
    assert check_sides(config, (4,) * spatial_dims) == (4,) * spatial_dims


@pytest.mark.parametrize(
    "changed",
    [
        ModelConfig(in_channels=4),
        ModelConfig(out_channels=2),
        ModelConfig(channels=(64, 128, 256, 256)),
        ModelConfig(channels=(32, 128, 256, 512)),
        ModelConfig(channels=(64, 128, 512)),
        ModelConfig(spatial_dims=3),
    ],
)
def test_every_field_changes_the_parameter_count(changed):
    assert parameter_count(changed) != parameter_count(ModelConfig())
