"""A MONAI user's file through the ``attention-unet`` commands: a ``state_dict`` saved from
``monai.networks.nets.AttentionUnet`` (plain, or as ``{"model": ...}``) is named by ``inspect``, its
strides given by ``--config``, and ``parity`` gates it in every framework in train mode (float64 to
1e-10; float32 and mixed bfloat16 within the noise-relative bounds); a perturbed framework fails
and names the block; converted through Keras and Flax files and back, MONAI loads it strictly.
"""

import json

import numpy as np
import pytest
import torch

import impl_flax
from weights_convert.core.monai_spec import MonaiConfig
from weights_convert.harness import cli

monai = pytest.importorskip("monai")
from tests.monai_nets import monai_net  # noqa: E402  (after the skip: it imports monai)

ALL_TARGETS = {("torch", "torch"), ("flax", "flax"), ("keras", "tensorflow"), ("keras", "jax"), ("keras", "torch")}
# A stride of 1 (no tensor shows it: --config gives it) and a kernel of 5.
CONFIG = MonaiConfig(2, 2, (4, 8, 16), strides=(2, 1), kernel_size=5)
CONFIG_JSON = json.dumps(CONFIG.to_dict())
SIZE = ["--size", "8", "6", "--batch", "2"]


@pytest.fixture(scope="module")
def monai_file(tmp_path_factory):
    """MONAI's randomly initialised network saved as MONAI's CheckpointSaver saves it."""
    path = tmp_path_factory.mktemp("monai") / "monai_model.pt"
    torch.save({"model": monai_net(CONFIG).float().state_dict()}, path)
    return path


def run_json(capsys, *args):
    code = cli.main([*map(str, args), "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_inspect_names_monai_and_what_it_assumed(capsys, monai_file):
    code, info = run_json(capsys, "inspect", monai_file)
    assert code == 0 and info["network"] == "MONAI's AttentionUnet"
    assert info["config"] == {**CONFIG.to_dict(), "strides": [2, 2]}  # the shapes cannot show a stride
    assert "strides 2 at each level, dropout 0.0 assumed" in info["assumed"]
    code, info = run_json(capsys, "inspect", monai_file, "--config", CONFIG_JSON)
    assert code == 0 and info["config"] == CONFIG.to_dict() and "assumed" not in info


def test_train_float64_everywhere(capsys, monai_file):
    """The issue's bar: every framework and backend, gradients and both optimizers' steps, <= 1e-10."""
    code, report = run_json(
        capsys, "parity", monai_file, "--config", CONFIG_JSON, "--mode", "train", "--dtype", "float64", *SIZE
    )
    rows = report["results"]
    assert code == 0 and report["passed"], [r["quantity"] for r in rows if not r["passed"]][:10]
    assert {(r["framework"], r["backend"]) for r in rows} == ALL_TARGETS
    assert report["config"] == CONFIG.to_dict() and max(r["rel_diff"] for r in rows) <= 1e-10
    for prefix in ("d1.up", "d1.ag", "state/", "grad/", "step/sgd/", "step/adam/"):
        assert {(r["framework"], r["backend"]) for r in rows if r["quantity"].startswith(prefix)} == ALL_TARGETS


@pytest.mark.parametrize("dtype", ["float32", "mixed_bfloat16"])
def test_train_at_reduced_precision(capsys, monai_file, dtype):
    """torch and Flax (Keras' MONAI model under its mixed policy: tests/models/test_keras_monai.py)."""
    code, report = run_json(
        capsys, "parity", monai_file, "--config", CONFIG_JSON, "--mode", "train", "--dtype", dtype,
        "--frameworks", "torch,flax", *SIZE,
    )  # fmt: skip
    assert code == 0 and report["passed"], [r["quantity"] for r in report["results"] if not r["passed"]][:10]


def test_a_perturbed_framework_fails_and_names_the_block(capsys, monkeypatch, monai_file):
    real_forward = impl_flax.runner.forward
    name = "model.1.submodule.1.upconv.up.conv.weight"  # the deepest transposed convolution: d1.up

    def perturbed(checkpoint, x, **kwargs):
        tensors = dict(checkpoint.tensors)
        tensors[name] = tensors[name] * np.float32(1.001)
        return real_forward(type(checkpoint)(checkpoint.config, tensors), x, **kwargs)

    monkeypatch.setattr(impl_flax.runner, "forward", perturbed)
    code = cli.main(["parity", str(monai_file), "--config", CONFIG_JSON, "--frameworks", "torch,flax", *SIZE])
    out = capsys.readouterr().out
    assert code == 1 and "FAIL: flax cpu float32: first drift at d1.up" in out


def test_back_to_monai_through_keras_and_flax_files_bit_for_bit(tmp_path, monai_file):
    """MONAI -> .safetensors -> .keras -> .msgpack -> .pt, and MONAI loads the last strictly, every
    tensor the bits it saved."""
    chain = [monai_file, *(tmp_path / f"m{suffix}" for suffix in (".safetensors", ".keras", ".msgpack", ".pt"))]
    for src, dst in zip(chain, chain[1:], strict=False):
        assert cli.main(["convert", str(src), str(dst), "--config", CONFIG_JSON]) == 0
    original, back = torch.load(monai_file)["model"], torch.load(chain[-1])
    net = monai.networks.nets.AttentionUnet(2, 2, 2, (4, 8, 16), (2, 1), kernel_size=5)
    net.load_state_dict(back, strict=True)
    assert list(back) == list(original)
    assert all(back[k].dtype == original[k].dtype and torch.equal(back[k], original[k]) for k in original)
