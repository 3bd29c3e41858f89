"""The README's test for users' CI, run as written (on a small checkpoint)."""

import weights_convert
from weights_convert.core.random_init import random_checkpoint
from weights_convert.core.spec import ModelConfig
from weights_convert.harness import parity


def test_users_ci_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    weights_convert.write(random_checkpoint(ModelConfig(3, 1, (4, 8, 16)), seed=7), "my_model.safetensors")
    parity.assert_parity("my_model.safetensors", frameworks=("torch", "flax", "keras"), dtype="float64", size=(64, 64))
