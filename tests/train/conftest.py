"""What the train tests share: a tiny 2D checkpoint to train from."""

import pytest

import weights_convert
from weights_convert.core.random_init import random_checkpoint
from weights_convert.core.spec import ModelConfig

# Three input channels, one output channel, depth 1: what the image folders of the tests fit.
TINY = ModelConfig(channels=(4, 8))


@pytest.fixture()
def start(tmp_path):
    """``random_checkpoint(TINY, seed=2)`` as a safetensors file."""
    path = tmp_path / "start.safetensors"
    weights_convert.write(random_checkpoint(TINY, seed=2), path)
    return path
