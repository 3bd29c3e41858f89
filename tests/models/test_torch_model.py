"""What only the PyTorch model has: the article's state_dict loaded strictly, its float64 forward
against the NumPy reference at several configs and odd sizes, ``compute_dtype`` and autocast's mixed
bfloat16. What the three models keep alike is in ``test_model_contract.py``."""

import numpy as np
import pytest
import torch

import impl_torch
import weights_convert
from tests.conftest import rel_error
from weights_convert.core.random_init import random_checkpoint
from weights_convert.core.spec import ModelConfig
from weights_convert.harness import reference
from weights_convert.harness.parity.tolerances import TOLERANCES


def run(model, x, dtype=torch.float64):
    with torch.no_grad():
        return model(torch.as_tensor(x, dtype=dtype)).numpy()


def test_loads_article_checkpoint_strictly(reference_dir):
    state = torch.load(reference_dir / "article_state_dict.pt", weights_only=True)
    model = impl_torch.AttentionUNet()
    model.load_state_dict(state, strict=True)
    assert list(model.state_dict()) == list(state)


def test_default_model_parameter_count():
    model = impl_torch.AttentionUNet()
    assert sum(p.numel() for p in model.parameters()) == 8_135_745


@pytest.mark.parametrize(
    "config, size",
    [
        (ModelConfig(3, 1, (4, 8, 16)), (16, 16)),
        (ModelConfig(3, 1, (4, 8, 16)), (37, 53)),
        (ModelConfig(2, 3, (4, 8, 16, 32)), (19, 8)),
        (ModelConfig(1, 2, (4, 8)), (3, 2)),
        (ModelConfig(3, 1, (8, 16, 32, 64, 128)), (45, 33)),
    ],
)
def test_float64_matches_independent_numpy(config, size):
    checkpoint = random_checkpoint(config, seed=1, dtype="float64")
    model = impl_torch.from_checkpoint(checkpoint, "float64")
    x = np.random.default_rng(2).uniform(size=(2, config.in_channels, *size))
    actual = run(model, x)
    assert actual.shape == (2, config.out_channels, *size)
    assert rel_error(actual, reference.forward(checkpoint.tensors, x)["output"]) <= TOLERANCES["float64"]


def test_rejects_unknown_compute_dtype():
    with pytest.raises(ValueError, match="compute_dtype must be None .* got torch.float16"):
        impl_torch.AttentionUNet(channels=(4, 8, 16), compute_dtype=torch.float16)


def test_mixed_bfloat16_keeps_float32_parameters_and_computes_in_bfloat16(tmp_path):
    config = ModelConfig(3, 1, (4, 8, 16))
    checkpoint = random_checkpoint(config, seed=1, dtype="float64")
    x = np.random.default_rng(2).uniform(size=(2, 3, 16, 12))
    mixed = impl_torch.from_checkpoint(checkpoint, "mixed_bfloat16")
    assert mixed.compute_dtype == torch.bfloat16
    assert {t.dtype for t in mixed.state_dict().values()} == {torch.float32, torch.int64}
    with torch.no_grad():
        logits, named = mixed(torch.as_tensor(x, dtype=torch.float32), return_intermediates=True)
    assert logits.dtype == torch.bfloat16 and named["e1"].dtype == torch.bfloat16
    exact = reference.forward(checkpoint.tensors, x)["output"]
    float32 = run(impl_torch.from_checkpoint(checkpoint, "float32"), x, torch.float32)
    error = rel_error(logits.float().numpy(), exact, floor=1.0)
    print(f"mixed_bfloat16 eval output vs float64: {error:.2e} (float32: {rel_error(float32, exact, floor=1.0):.2e})")
    # Orders of magnitude only: bfloat16 keeps 8 mantissa bits (2**-8 = 4e-3 per rounding), so a few
    # layers of it land between 1e-4 and 1e-1; float32 would be ~1e-7, a broken layer ~1.
    assert 1e-4 < error < 1e-1
    assert not np.array_equal(logits.float().numpy(), float32)
    # Saving writes the float32 parameters; loading by name gives the same mixed model back.
    impl_torch.save(mixed, tmp_path / "mixed.safetensors")
    assert {str(v.dtype) for v in weights_convert.read(tmp_path / "mixed.safetensors").tensors.values()} == {
        "float32",
        "int64",
    }
    loaded = impl_torch.load(tmp_path / "mixed.safetensors", dtype="mixed_bfloat16")
    assert loaded.compute_dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(loaded(torch.as_tensor(x, dtype=torch.float32)), logits)


def test_mixed_bfloat16_batch_statistics_are_float32():
    """BatchNorm under autocast gets a bfloat16 input; its batch mean and variance are float32
    (not bfloat16, which would be off by ~1e-3 relative), and so are the running statistics."""
    mixed = impl_torch.AttentionUNet(3, 1, (4, 8, 16), compute_dtype=torch.bfloat16).train()
    bn = mixed.e1.conv.conv[1]
    seen = []
    bn.register_forward_hook(lambda module, args, output: seen.append((args[0], output)))
    x = torch.as_tensor(np.random.default_rng(3).normal(3.0, 2.0, size=(2, 3, 32, 32)), dtype=torch.float32)
    with torch.no_grad():
        mixed(x)
    (bn_input, bn_output) = seen[0]
    assert bn_input.dtype == torch.bfloat16 and bn_output.dtype == torch.bfloat16
    assert bn.running_mean.dtype == torch.float32 and bn.running_var.dtype == torch.float32
    exact = bn_input.double()  # the bfloat16 values, exactly
    mean = exact.mean(dim=(0, 2, 3))
    var = exact.var(dim=(0, 2, 3), unbiased=True)
    # The initial running statistics are 0 and 1; torch's rule new = 0.9 * old + 0.1 * batch.
    expected = {"running_mean": 0.1 * mean, "running_var": 0.9 + 0.1 * var}
    for name, value in expected.items():
        error = float((getattr(bn, name).double() - value).abs().max() / value.abs().max())
        print(f"{name}: relative error {error:.1e}")
        # float32 accumulation: ~1e-7; a bfloat16 one would be ~1e-3 (2**-8 per rounding).
        assert error < 2.0**-8 / 100, name


@pytest.mark.parametrize("kernel, depth", [(3, 2), (5, 2), (5, 3), (3, 9)])
@pytest.mark.parametrize("autocast", [False, True], ids=["bfloat16", "autocast"])
def test_3d_bfloat16_weight_gradient_at_a_depth_below_the_kernel(kernel, depth, autocast):
    """``impl_torch.layers.Conv3d``: on the CPU in bfloat16, at batch 2 and an input depth below the
    kernel's, the weight gradient is the float64 one of the same bfloat16 values within two
    bfloat16 roundings of its scale (torch's own padding gives NaN there on AVX512-BF16 CPUs)."""
    from impl_torch.layers import conv

    generator = torch.Generator().manual_seed(depth * kernel)
    layer = conv(8, 16, kernel, dims=3)
    x = torch.randn(2, 8, depth, 6, 5, generator=generator).bfloat16()
    with torch.no_grad():
        layer.weight.copy_(layer.weight.bfloat16().float())
        layer.bias.copy_(layer.bias.bfloat16().float())
    if autocast:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x.float())
    else:
        layer = layer.bfloat16()
        y = layer(x)
    upstream = torch.randn(y.shape, generator=generator).bfloat16()
    y.backward(upstream.to(y.dtype))
    exact = torch.nn.grad.conv3d_weight(x.double(), layer.weight.shape, upstream.double(), padding=kernel // 2)
    error = (layer.weight.grad.double() - exact).abs().max() / exact.abs().max()
    assert float(error) <= TOLERANCES["mixed_bfloat16"].floor
