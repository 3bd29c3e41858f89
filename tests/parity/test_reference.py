"""The NumPy reference's forward against the article's float64 output; its backward, optimizer
steps, multi-step fit and reduced precisions: against finite differences, against PyTorch float64
autograd and torch.optim, and for plausible rounding noise at float32 and mixed bfloat16. In 2D
and, where a test is about the ops or one pass of the network, in 3D (``spatial_dims=3``)."""

import math

import ml_dtypes
import numpy as np
import pytest

import weights_convert
from tests.conftest import rel_error
from weights_convert.core.optim import OPTIMIZERS
from weights_convert.core.random_init import random_checkpoint
from weights_convert.core.spec import ModelConfig, param_specs
from weights_convert.harness import reference
from weights_convert.harness.parity.tolerances import TOLERANCES

torch = pytest.importorskip("torch")
from impl_torch.io import from_checkpoint  # noqa: E402

TINY = ModelConfig(3, 1, (4, 8, 16))
DEEP = ModelConfig(2, 3, (8, 16, 32, 64, 128))
TINY_3D = ModelConfig(2, 1, (4, 8, 16), spatial_dims=3)
VOLUME = (9, 12, 11)  # odd sides: the pools floor, the decoder pads on every axis
CASES = [(TINY, (16, 16)), (TINY, (37, 53)), (DEEP, (45, 33)), (TINY_3D, VOLUME)]
CASE_IDS = ["tiny-16x16", "tiny-37x53", "deep-45x33", "tiny3d-9x12x11"]
# One case of each rank, for the tests that take one network pass of each.
RANKS = [(TINY, (37, 53)), (TINY_3D, VOLUME)]
RANK_IDS = ["2d", "3d"]
FLOAT64_BOUND = TOLERANCES["float64"]


def data(config, size, batch=2, seed=1, steps=None):
    rng = np.random.default_rng(seed)
    lead = (batch,) if steps is None else (steps, batch)
    x = rng.uniform(0.0, 1.0, (*lead, config.in_channels, *size))
    target = rng.normal(0.0, 1.0, (*lead, config.out_channels, *size))
    return x, target


def checkpoint(config):
    return random_checkpoint(config, seed=0, dtype="float64")


def trainable(config):
    return [p.name for p in param_specs(config) if not p.is_buffer]


def buffers(config):
    return [p.name for p in param_specs(config) if p.is_buffer]


def whole(results, prefix, names):
    """One vector of every tensor ``prefix + name``: gradients are compared as one vector."""
    return np.concatenate([np.asarray(results[prefix + n], np.float64).ravel() for n in names])


def channels_first(x):
    """NHWC -> NCHW, NDHWC -> NCDHW: an op's array as torch takes it."""
    return np.ascontiguousarray(np.moveaxis(x, -1, 1))


def channels_last(x):
    return np.ascontiguousarray(np.moveaxis(x, 1, -1))


def rel(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


# --- PyTorch float64 autograd, written here with torch.optim directly -------------------------


def torch_model(ckpt):
    return from_checkpoint(ckpt, "float64").train()


def torch_loss(model, x, target):
    out = model(torch.from_numpy(np.asarray(x, np.float64)))
    return torch.mean((out - torch.from_numpy(np.asarray(target, np.float64))) ** 2)


def torch_optimizer(params, name):
    hyper = OPTIMIZERS[name]
    if name == "sgd":
        return torch.optim.SGD(params, lr=hyper["lr"])
    return torch.optim.Adam(params, lr=hyper["lr"], betas=(hyper["b1"], hyper["b2"]), eps=hyper["eps"])


def torch_fit(ckpt, xs, targets, optimizer):
    model = torch_model(ckpt)
    params = dict(model.named_parameters())
    opt = torch_optimizer(list(params.values()), optimizer)
    results = {}
    for k in range(len(xs)):
        opt.zero_grad()
        loss = torch_loss(model, xs[k], targets[k])
        loss.backward()
        results[f"loss/step{k + 1}"] = loss.item()
        opt.step()
    state = model.state_dict()
    results.update({f"param/{n}": p.detach().numpy() for n, p in params.items()})
    results.update({f"state/{n}": state[n].numpy() for n in state if n.rsplit(".", 1)[-1] in reference.BUFFERS})
    return results


# --- the ops' backward, one at a time ---------------------------------------------------------


def test_numpy_reference_matches_article(reference_dir, reference_input, article_safetensors):
    """The independent NumPy pass itself reproduces the article's float64 output."""
    tensors = weights_convert.read(article_safetensors).tensors
    expected = np.load(reference_dir / "output_eval_float64.npy")
    assert rel_error(reference.forward(tensors, reference_input)["output"], expected) <= TOLERANCES["reference_float64"]


# Spatial sides of the op tests' channels-last arrays, by spatial rank: odd sides.
OP_SIDES = {2: (5, 7), 3: (3, 5, 4)}
DIMS = [2, 3]


@pytest.mark.parametrize("dims", DIMS)
def test_op_backwards_are_adjoints(dims):
    """<op(x), g> == <x, op_backward(g)> for the linear ops."""
    rng = np.random.default_rng(0)
    sides = OP_SIDES[dims]
    x = rng.normal(size=(2, *sides, 3))
    g = rng.normal(size=(2, *(2 * side for side in sides), 3))
    assert np.isclose(np.sum(reference.upsample(x) * g), np.sum(x * reference.upsample_backward(g)), rtol=1e-12)
    g = rng.normal(size=(2, *(side + 3 for side in sides), 3))  # an odd difference: unequal halves
    assert np.isclose(
        np.sum(reference.pad_to(x, g.shape) * g), np.sum(x * reference.pad_to_backward(g, x.shape)), rtol=1e-12
    )
    for k, pad in ((3, 1), (1, 0)):
        kernel = rng.normal(size=(*[k] * dims, 3, 4))
        g = rng.normal(size=(2, *sides, 4))
        zero = np.zeros(4)
        gx, gkernel, gbias = reference.conv_backward(g, x, kernel, pad)
        assert np.isclose(np.sum(reference.conv(x, kernel, zero, pad) * g), np.sum(x * gx), rtol=1e-12)
        assert np.isclose(np.sum(reference.conv(x, kernel, zero, pad) * g), np.sum(kernel * gkernel), rtol=1e-12)
        np.testing.assert_allclose(gbias, g.sum(axis=tuple(range(dims + 1))), rtol=1e-12)


@pytest.mark.parametrize("dims", DIMS)
def test_conv_matches_torch(dims):
    """The im2col convolution (3x3 or 3x3x3 with padding 1, and 1x1(x1)) and its three gradients
    against torch's convolution and autograd."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, *OP_SIDES[dims], 3))
    torch_conv = {2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}[dims]
    for k, pad in ((3, 1), (1, 0)):
        weight = rng.normal(size=(4, 3, *[k] * dims))  # canonical OIHW / OIDHW
        kernel = np.moveaxis(weight, (0, 1), (-1, -2))  # HWIO / DHWIO
        bias = rng.normal(size=4)
        g = rng.normal(size=(2, *OP_SIDES[dims], 4))
        xt, wt, bt = (torch.from_numpy(channels_first(x)), torch.from_numpy(weight), torch.from_numpy(bias))
        for tensor in (xt, wt, bt):
            tensor.requires_grad_(True)
        yt = torch_conv(xt, wt, bt, padding=pad)
        yt.backward(torch.from_numpy(channels_first(g)))
        gx, gkernel, gbias = reference.conv_backward(g, x, kernel, pad)
        assert rel(reference.conv(x, kernel, bias, pad), channels_last(yt.detach().numpy())) <= FLOAT64_BOUND
        assert rel(gx, channels_last(xt.grad.numpy())) <= FLOAT64_BOUND
        assert rel(np.moveaxis(gkernel, (-1, -2), (0, 1)), wt.grad.numpy()) <= FLOAT64_BOUND
        assert rel(gbias, bt.grad.numpy()) <= FLOAT64_BOUND


@pytest.mark.parametrize("dims", DIMS)
def test_conv_in_row_bands_is_the_same(monkeypatch, dims):
    rng = np.random.default_rng(0)
    sides = {2: (9, 6), 3: (5, 4, 3)}[dims]
    x, kernel, bias = rng.normal(size=(2, *sides, 3)), rng.normal(size=(*[3] * dims, 3, 4)), rng.normal(size=4)
    g = rng.normal(size=(2, *sides, 4))
    whole_y, whole_g = reference.conv(x, kernel, bias, 1), reference.conv_backward(g, x, kernel, 1)
    monkeypatch.setattr(reference, "IM2COL_ELEMENTS", 100)
    patch_row = 2 * math.prod(sides[1:]) * 3**dims * 3  # batch * the other sides * taps * channels
    assert len(reference._row_bands(sides[0], patch_row)) == sides[0]  # one row per band
    np.testing.assert_allclose(reference.conv(x, kernel, bias, 1), whole_y, rtol=1e-13, atol=1e-13)
    for banded, single in zip(reference.conv_backward(g, x, kernel, 1), whole_g, strict=True):
        np.testing.assert_allclose(banded, single, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("dims", DIMS)
def test_max_pool_backward_matches_torch_with_ties_and_odd_sizes(dims):
    """Floor for odd sides, and on ties the gradient goes to the first maximum of the window in
    torch's scan order ((dy, dx), or (dz, dy, dx), lexicographic)."""
    rng = np.random.default_rng(0)
    sides = {2: (7, 9), 3: (5, 7, 9)}[dims]
    x = rng.integers(0, 3, size=(2, *sides, 3)).astype(np.float64)  # many ties
    g = rng.normal(size=(2, *(side // 2 for side in sides), 3))
    windows = reference._pool_windows(x)
    tied = np.count_nonzero(windows == windows.max(axis=-1, keepdims=True), axis=-1) > 1
    assert np.mean(tied) > 1 / 3, "the test needs windows whose maximum is not unique"
    torch_pool = {2: torch.nn.functional.max_pool2d, 3: torch.nn.functional.max_pool3d}[dims]
    xt = torch.from_numpy(channels_first(x)).requires_grad_(True)
    yt = torch_pool(xt, 2)
    yt.backward(torch.from_numpy(channels_first(g)))
    np.testing.assert_array_equal(reference.max_pool(x), channels_last(yt.detach().numpy()))
    np.testing.assert_array_equal(reference.max_pool_backward(g, x), channels_last(xt.grad.numpy()))


@pytest.mark.parametrize("dims", DIMS)
def test_upsample_and_pad_match_torch(dims):
    """Bilinear (trilinear) x2 with aligned corners, then the zero padding to a larger skip with
    d // 2 before, and their gradients, against torch's interpolate, pad and autograd."""
    rng = np.random.default_rng(0)
    sides = OP_SIDES[dims]
    skip = (2, *(2 * side + 1 + axis for axis, side in enumerate(sides)), 3)  # differences 1, 2, (3)
    x = rng.normal(size=(2, *sides, 3))
    g = rng.normal(size=skip)
    xt = torch.from_numpy(channels_first(x)).requires_grad_(True)
    mode = {2: "bilinear", 3: "trilinear"}[dims]
    upsampled = torch.nn.functional.interpolate(xt, scale_factor=2, mode=mode, align_corners=True)
    widths = []
    for axis in range(upsampled.dim() - 1, 1, -1):  # F.pad takes the last axis first
        d = skip[axis - 1] - upsampled.shape[axis]
        widths += [d // 2, d - d // 2]
    yt = torch.nn.functional.pad(upsampled, widths)
    yt.backward(torch.from_numpy(channels_first(g)))
    up = reference.upsample(x)
    assert rel(reference.pad_to(up, skip), channels_last(yt.detach().numpy())) <= FLOAT64_BOUND
    gx = reference.upsample_backward(reference.pad_to_backward(g, up.shape))
    assert rel(gx, channels_last(xt.grad.numpy())) <= FLOAT64_BOUND


def test_relu_gradient_is_zero_at_zero():
    y = reference.relu(np.array([-1.0, 0.0, 2.0]))
    np.testing.assert_array_equal(reference.relu_backward(np.ones(3), y), [0.0, 0.0, 1.0])


# --- the whole network -----------------------------------------------------------------------


@pytest.mark.parametrize("config,size", RANKS, ids=RANK_IDS)
def test_gradients_match_finite_differences(config, size):
    tensors = dict(checkpoint(config).tensors)
    x, target = data(config, size)
    grads = reference.gradients(tensors, x, target, config=config)

    def loss(t):
        out = reference.forward(t, x, train=True, config=config)["output"]
        return np.mean((out - target) ** 2)

    rng = np.random.default_rng(0)
    names = [
        "e1.conv.conv.0.weight",  # encoder conv, behind everything
        "e2.conv.conv.4.weight",  # BatchNorm scale
        "b1.conv.1.bias",  # BatchNorm shift in the bridge
        "d1.ag.Wg.0.weight",  # gate conv on the upsampled path
        "d2.ag.Ws.0.weight",  # gate conv on the skip
        "d1.ag.output.0.weight",  # the attention map's conv
        "d2.c1.conv.3.weight",  # decoder conv on the concatenation
        "output.weight",
        "output.bias",
    ]
    for name in names:
        g = grads[f"grad/{name}"]
        flat = np.abs(g).ravel()
        # The largest entry and a random one.
        picks = {int(np.argmax(flat)), int(rng.integers(0, flat.size))}
        for i in picks:
            index = np.unravel_index(i, g.shape)
            # Small enough not to cross a ReLU or max-pool kink (at 1e-5 one is crossed for an
            # e1 weight), large enough for float64 rounding (~1e-16 / h) to stay below 1e-9.
            h = 1e-6 * max(1.0, abs(float(tensors[name][index])))
            plus, minus = dict(tensors), dict(tensors)
            plus[name], minus[name] = tensors[name].copy(), tensors[name].copy()
            plus[name][index] += h
            minus[name][index] -= h
            numeric = (loss(plus) - loss(minus)) / (2 * h)
            bound = TOLERANCES["finite_differences"] * np.max(np.abs(g)) + 1e-12
            assert abs(numeric - g[index]) <= bound, (name, index, numeric, g[index])


@pytest.mark.parametrize("config,size", CASES, ids=CASE_IDS)
def test_gradients_match_torch_float64(config, size):
    ckpt = checkpoint(config)
    x, target = data(config, size)
    ours = reference.gradients(ckpt.tensors, x, target, config=config)
    model = torch_model(ckpt)
    loss = torch_loss(model, x, target)
    loss.backward()
    names = trainable(config)
    theirs = {f"grad/{n}": p.grad.numpy() for n, p in model.named_parameters()}
    assert list(theirs) == [f"grad/{n}" for n in names]
    assert list(ours) == ["loss"] + [f"grad/{n}" for n in names] + [f"state/{n}" for n in buffers(config)]
    assert abs(float(ours["loss"]) - loss.item()) <= FLOAT64_BOUND * loss.item()
    for n in names:
        assert ours[f"grad/{n}"].shape == ckpt.tensors[n].shape and ours[f"grad/{n}"].dtype == np.float64
    # Relative to the largest entry of the whole gradient: conv biases in front of a train-mode
    # BatchNorm have an exact gradient of zero.
    assert rel(whole(ours, "grad/", names), whole(theirs, "grad/", names)) <= FLOAT64_BOUND
    state = model.state_dict()
    for n in buffers(config):
        assert rel(ours[f"state/{n}"], state[n].numpy()) <= FLOAT64_BOUND, n


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("config,size", RANKS, ids=RANK_IDS)
def test_train_step_matches_torch_optim(config, size, optimizer):
    ckpt = checkpoint(config)
    x, target = data(config, size)
    ours = reference.train_step(ckpt.tensors, x, target, optimizer=optimizer, config=config)
    theirs = torch_fit(ckpt, x[None], target[None], optimizer)
    names = trainable(config)
    assert list(ours) == [f"grad/{n}" for n in names] + [f"step/{n}" for n in names]
    for n in names:
        step = ours[f"step/{n}"]
        assert step.shape == ckpt.tensors[n].shape
        assert np.max(np.abs(step - theirs[f"param/{n}"])) <= FLOAT64_BOUND * np.max(np.abs(theirs[f"param/{n}"]))
    # The step moved every parameter with a nonzero gradient.
    moved = whole(ours, "step/", names) - np.concatenate([ckpt.tensors[n].ravel() for n in names])
    assert np.count_nonzero(moved) > 0.5 * moved.size


@pytest.mark.parametrize("config,size", [(TINY, (16, 16)), (TINY_3D, VOLUME)], ids=RANK_IDS)
def test_train_step_matches_the_torch_runner(config, size):
    runner = pytest.importorskip("impl_torch.runner")
    ckpt = checkpoint(config)
    x, target = data(config, size)
    names = trainable(config)
    for optimizer in sorted(OPTIMIZERS):
        ours = reference.train_step(ckpt.tensors, x, target, optimizer=optimizer, config=config)
        theirs = runner.train_step(ckpt, x, target, dtype="float64", optimizer=optimizer)
        assert rel(whole(ours, "grad/", names), whole(theirs, "grad/", names)) <= FLOAT64_BOUND
        assert rel(whole(ours, "step/", names), whole(theirs, "step/", names)) <= FLOAT64_BOUND


def test_fit_matches_torch():
    config, size = DEEP, (45, 33)
    ckpt = checkpoint(config)
    xs, targets = data(config, size, steps=3)
    ours = reference.fit(ckpt.tensors, xs, targets, optimizer="adam", config=config)
    theirs = torch_fit(ckpt, xs, targets, "adam")
    names, state = trainable(config), buffers(config)
    expected_keys = [f"loss/step{k}" for k in (1, 2, 3)] + [f"param/{n}" for n in names] + [f"state/{n}" for n in state]
    assert list(ours) == expected_keys
    for k in (1, 2, 3):
        assert abs(float(ours[f"loss/step{k}"]) - theirs[f"loss/step{k}"]) <= FLOAT64_BOUND * theirs[f"loss/step{k}"]
    assert ours["loss/step1"] != ours["loss/step2"]
    for n in names:
        assert np.max(np.abs(ours[f"param/{n}"] - theirs[f"param/{n}"])) <= FLOAT64_BOUND * np.max(
            np.abs(theirs[f"param/{n}"])
        )
    for n in state:
        assert rel(ours[f"state/{n}"], theirs[f"state/{n}"]) <= FLOAT64_BOUND, n
    assert int(ours[f"state/{state[-1]}"]) == int(ckpt.tensors[state[-1]]) + 3


def test_fit_adam_state_persists_across_steps():
    """Two steps of one Adam differ from two fresh one-step Adams (whose first steps are all
    ~lr * sign(g))."""
    config, size = TINY, (16, 16)
    ckpt = checkpoint(config)
    xs, targets = data(config, size, steps=2)
    two = reference.fit(ckpt.tensors, xs, targets, optimizer="adam", config=config)
    tensors = dict(ckpt.tensors)
    for k in range(2):
        step = reference.train_step(tensors, xs[k], targets[k], optimizer="adam", config=config)
        stats = reference.forward(tensors, xs[k], train=True, config=config)
        tensors.update({n: step[f"step/{n}"] for n in trainable(config)})
        tensors.update({n: stats[f"state/{n}"] for n in buffers(config)})
    names = trainable(config)
    assert rel(whole(two, "param/", names), whole({f"param/{n}": tensors[n] for n in names}, "param/", names)) > 1e-6


@pytest.mark.parametrize("config,size", RANKS, ids=RANK_IDS)
def test_perturbing_one_weight_changes_the_gradient(config, size):
    """The comparison is sensitive: a 1e-4 change of one gate weight moves the whole gradient far
    beyond the float64 bound."""
    ckpt = checkpoint(config)
    x, target = data(config, size)
    names = trainable(config)
    base = reference.gradients(ckpt.tensors, x, target, config=config)
    tensors = dict(ckpt.tensors)
    weight = tensors["d2.ag.Ws.0.weight"] = tensors["d2.ag.Ws.0.weight"].copy()
    weight[(0,) * weight.ndim] += 1e-4
    perturbed = reference.gradients(tensors, x, target, config=config)
    assert rel(whole(perturbed, "grad/", names), whole(base, "grad/", names)) > 1e3 * FLOAT64_BOUND


# Plausible mistakes in an op, each in every rank: the larger half of the padding before (torch
# puts d // 2 before), the kernel's spatial axes reversed on the way to channels last (OIDHW ->
# WHDIO), and the upsampling's samples at half-pixel centres (align_corners=False).


def pad_widths_larger_half_first(shape, target):
    return [(d - d // 2, d // 2) for d in (t - s for s, t in zip(shape[1:-1], target[1:-1], strict=True))]


def kernel_spatial_axes_reversed(rank):
    return (*range(rank - 1, 1, -1), 1, 0)


def interpolation_half_pixel(n, dtype=np.float64):
    m = np.zeros((2 * n, n))
    for i in range(2 * n):
        src = min(max((i + 0.5) / 2 - 0.5, 0.0), n - 1)
        lo = int(np.floor(src))
        hi = min(lo + 1, n - 1)
        m[i, lo] += 1 - (src - lo)
        m[i, hi] += src - lo
    return m.astype(dtype)


WRONG_OPS = {
    "pad-larger-half-first": ("_pad_widths", pad_widths_larger_half_first),
    "kernel-spatial-axes-reversed": ("_channels_last_kernel", kernel_spatial_axes_reversed),
    "upsample-half-pixel": ("interpolation_matrix", interpolation_half_pixel),
}


@pytest.mark.parametrize("wrong", sorted(WRONG_OPS))
@pytest.mark.parametrize("config,size", RANKS, ids=RANK_IDS)
def test_a_wrong_op_is_caught_by_the_torch_comparison(config, size, wrong, monkeypatch):
    """The comparison with PyTorch float64 sees each op's convention: with one op of the
    reference made wrong, the output and the gradient are far beyond the float64 bound."""
    ckpt = checkpoint(config)
    x, target = data(config, size)
    names = trainable(config)
    model = torch_model(ckpt)
    loss = torch_loss(model, x, target)
    loss.backward()
    theirs = {f"grad/{n}": p.grad.numpy() for n, p in model.named_parameters()}
    with torch.no_grad():
        output = model(torch.from_numpy(x)).numpy()
    monkeypatch.setattr(reference, *WRONG_OPS[wrong])
    ours = reference.train_steps(ckpt.tensors, x, target, optimizers=(), config=config, forward=True)
    assert rel(ours["output"], output) > 1e3 * FLOAT64_BOUND
    assert rel(whole(ours, "grad/", names), whole(theirs, "grad/", names)) > 1e3 * FLOAT64_BOUND


@pytest.mark.parametrize("config,size", RANKS, ids=RANK_IDS)
def test_forward_matches_torch_in_every_block(config, size):
    """Every block output, eval and train mode, and the running statistics after the train-mode
    pass, against the PyTorch model of the same rank in float64."""
    ckpt = checkpoint(config)
    x, _ = data(config, size)
    blocks = ["e1", "e2", "b1", "d1.ag", "d1", "d2.ag", "d2", "output"]  # depth 2
    model = from_checkpoint(ckpt, "float64")
    assert model.config == config
    for train in (False, True):
        out = reference.forward(ckpt.tensors, x, train=train, config=config)
        with torch.no_grad():
            _, named = model.train(train)(torch.from_numpy(x), return_intermediates=True)
        assert list(named) == blocks
        assert [k for k in out if not k.startswith("state/")] == blocks
        assert out["output"].shape == (2, 1, *size) and out["d2.ag"].shape == (2, 4, *size)
        for name in blocks:
            assert rel(out[name], named[name].numpy()) <= FLOAT64_BOUND, (train, name)
    state = model.state_dict()
    assert sorted(k for k in out if k.startswith("state/")) == sorted(f"state/{n}" for n in buffers(config))
    for n in buffers(config):
        assert rel(out[f"state/{n}"], state[n].numpy()) <= FLOAT64_BOUND, n


def test_unknown_precision_and_optimizer_are_refused():
    ckpt = checkpoint(TINY)
    x, target = data(TINY, (16, 16))
    with pytest.raises(ValueError, match="precision"):
        reference.forward(ckpt.tensors, x, precision="float16")
    with pytest.raises(ValueError, match="optimizer"):
        reference.train_step(ckpt.tensors, x, target, optimizer="rmsprop")


def test_an_input_of_the_other_rank_is_refused():
    x, _ = data(TINY_3D, (16, 16))  # NCHW for a 3D model
    with pytest.raises(ValueError, match=r"3D model takes NCDHW inputs, got a 4-D array"):
        reference.forward(checkpoint(TINY_3D).tensors, x)


# --- reduced precision -----------------------------------------------------------------------

# Rounding noise against float64, relative to the largest |value|: (low, high) plausible ranges.
NOISE = {
    "float32": {"eval": (1e-8, 1e-5), "train": (1e-8, 1e-4), "grad": (1e-8, 1e-1)},
    "mixed_bfloat16": {"eval": (1e-4, 3e-2), "train": (1e-3, 0.5), "grad": (1e-3, 2.0)},
}


@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16"])
@pytest.mark.parametrize("config,size", CASES, ids=CASE_IDS)
def test_reduced_precision_noise_is_plausible(config, size, precision, record_property):
    ckpt = checkpoint(config)
    x, target = data(config, size)
    names = trainable(config)
    exact = reference.gradients(ckpt.tensors, x, target, config=config)
    rounded = reference.gradients(ckpt.tensors, x, target, config=config, precision=precision)
    assert list(rounded) == list(exact)
    for key, value in rounded.items():
        assert value.shape == exact[key].shape, key
        assert np.all(np.isfinite(value)), key
        if not key.endswith("num_batches_tracked"):
            assert value.dtype == np.float32, key
    eval64 = reference.forward(ckpt.tensors, x, config=config)
    eval_low = reference.forward(ckpt.tensors, x, config=config, precision=precision)
    train64 = reference.forward(ckpt.tensors, x, config=config, train=True)
    train_low = reference.forward(ckpt.tensors, x, config=config, train=True, precision=precision)
    noise = {
        "eval": rel(eval_low["output"], eval64["output"]),
        "train": rel(train_low["output"], train64["output"]),
        "grad": rel(whole(rounded, "grad/", names), whole(exact, "grad/", names)),
    }
    record_property("noise", noise)
    print(precision, config.channels, size, {k: f"{v:.2e}" for k, v in noise.items()})
    for what, (low, high) in NOISE[precision].items():
        assert low <= noise[what] <= high, (what, noise[what])
    assert abs(float(rounded["loss"]) - float(exact["loss"])) <= NOISE[precision]["train"][1] * float(exact["loss"])


@pytest.mark.parametrize("config,size", [(TINY, (16, 16)), (TINY_3D, VOLUME)], ids=RANK_IDS)
def test_mixed_bfloat16_rounds_activations_not_parameters(config, size):
    ckpt = checkpoint(config)
    x, target = data(config, size)
    out = reference.forward(ckpt.tensors, x, config=config, train=True, precision="mixed_bfloat16")
    for name in ("e1", "b1", "d1.ag", "d2", "output"):
        value = out[name]
        assert value.dtype == np.float32
        np.testing.assert_array_equal(value, value.astype(ml_dtypes.bfloat16).astype(np.float32))
    # Running statistics, gradients and optimizer steps stay float32 (not bfloat16 values).
    mean = out["state/e1.conv.conv.1.running_mean"]
    assert np.any(mean != mean.astype(ml_dtypes.bfloat16).astype(np.float32))
    step = reference.train_step(ckpt.tensors, x, target, optimizer="adam", config=config, precision="mixed_bfloat16")
    for key in ("grad/e1.conv.conv.0.weight", "step/e1.conv.conv.0.weight"):
        assert step[key].dtype == np.float32
        assert np.any(step[key] != step[key].astype(ml_dtypes.bfloat16).astype(np.float32))


@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16"])
def test_reduced_precision_fit(precision):
    config, size = TINY, (16, 16)
    ckpt = checkpoint(config)
    xs, targets = data(config, size, steps=2)
    exact = reference.fit(ckpt.tensors, xs, targets, optimizer="adam", config=config)
    rounded = reference.fit(ckpt.tensors, xs, targets, optimizer="adam", config=config, precision=precision)
    assert list(rounded) == list(exact)
    names = trainable(config)
    for key, value in rounded.items():
        assert value.shape == exact[key].shape and np.all(np.isfinite(value)), key
    difference = rel(whole(rounded, "param/", names), whole(exact, "param/", names))
    assert 0 < difference < 1e-2
