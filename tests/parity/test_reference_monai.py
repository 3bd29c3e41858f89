"""The NumPy reference of MONAI's AttentionUnet (docs/architecture.md section 1b) against MONAI itself.

float64: ``monai.networks.nets.AttentionUnet`` with random weights, BatchNorm statistics and PReLU
slopes gives the tensors (its ``state_dict`` as NumPy); the reference's eval and train-mode outputs,
running statistics, MSE gradients, optimizer steps and fits match MONAI's and torch autograd's to
the float64 bound, and every named block matches ``impl_torch.monai_model.MonaiAttentionUNet``
loaded with MONAI's ``state_dict`` (its intermediates carry ``config.block_names``). The new ops
(strided and per-axis convolutions, the transposed convolution, InstanceNorm, PReLU) are checked one
at a time against torch first, so that a failure names its op. Then: a perturbed parameter fails the
comparison, dropout is refused in train mode, and float32 and mixed bfloat16 stay close to float64.
"""

import copy

import ml_dtypes
import numpy as np
import pytest

from weights_convert.core.monai_spec import MonaiConfig
from weights_convert.core.optim import OPTIMIZERS
from weights_convert.harness import reference
from weights_convert.harness.parity.tolerances import TOLERANCES

torch = pytest.importorskip("torch")
monai_nets = pytest.importorskip("monai.networks.nets")
from impl_torch.monai_model import MonaiAttentionUNet  # noqa: E402
from tests.monai_nets import monai_net  # noqa: E402  (after the skip: it imports monai)

FLOAT64_BOUND = TOLERANCES["float64"]

TINY = MonaiConfig(in_channels=2, out_channels=3, channels=(4, 8, 16), strides=(2, 2))
# 3D, a stride of 1 between two of 2 (that level keeps its sides: its transposed conv is stride 1),
# 5x5x5 kernels (padding 2).
VOLUME = MonaiConfig(
    in_channels=1, out_channels=2, channels=(4, 8, 16, 32), strides=(2, 1, 2), kernel_size=5, spatial_dims=3
)
CASES = [
    (TINY, (8, 12)),
    (VOLUME, (4, 8, 12)),
    (MonaiConfig(channels=(4, 8, 16), strides=(2, 2), kernel_size=(3, 5)), (8, 12)),  # a kernel side per axis
    (MonaiConfig(channels=(4, 8, 16), strides=(2, 2), up_kernel_size=1), (8, 12)),  # 1x1 transposed conv, pad 0
    (MonaiConfig(channels=(4, 8, 16), strides=(3, 2), up_kernel_size=5), (6, 12)),  # stride 3: sides of 6
]
CASE_IDS = ["2d", "3d-k5-strides212", "2d-k3x5", "2d-up1", "2d-up5-stride3"]
RANKS = [CASES[0], CASES[1]]
RANK_IDS = ["2d", "3d"]


def tensors_of(model):
    """A torch model's state_dict as the reference takes it: NumPy arrays under MONAI's keys."""
    return {name: value.detach().numpy().copy() for name, value in model.state_dict().items()}


def project_model(monai, config):
    """``impl_torch``'s MONAI network, loaded strictly with MONAI's state_dict."""
    model = MonaiAttentionUNet(config).double()
    model.load_state_dict(monai.state_dict(), strict=True)
    return model


def data(config, sides, batch=2, seed=1, steps=None):
    rng = np.random.default_rng(seed)
    lead = (batch,) if steps is None else (steps, batch)
    x = rng.uniform(0.0, 1.0, (*lead, config.in_channels, *sides))
    target = rng.normal(0.0, 1.0, (*lead, config.out_channels, *sides))
    return x, target


def rel(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def names(config, buffers=False):
    return [p.name for p in config.param_specs() if p.is_buffer == buffers]


def whole(results, prefix, keys):
    """One vector of every tensor ``prefix + key``: gradients compare as one vector, relative to
    their largest entry (conv biases in front of a train-mode BatchNorm have a gradient of zero)."""
    return np.concatenate([np.asarray(results[prefix + k], np.float64).ravel() for k in keys])


def torch_loss(model, x, target):
    """The loss ``reference.gradients`` differentiates: mean((output - target)**2)."""
    output = model(torch.from_numpy(np.asarray(x, np.float64)))
    return torch.mean((output - torch.from_numpy(np.asarray(target, np.float64))) ** 2)


def torch_optimizer(params, name):
    """torch.optim with the parity preset's hyperparameters (``weights_convert.core.optim.OPTIMIZERS``)."""
    hyper = OPTIMIZERS[name]
    if name == "sgd":
        return torch.optim.SGD(params, lr=hyper["lr"])
    return torch.optim.Adam(params, lr=hyper["lr"], betas=(hyper["b1"], hyper["b2"]), eps=hyper["eps"])


def channels_last(x):
    return np.ascontiguousarray(np.moveaxis(x, 1, -1))


# --- the new ops, one at a time, against torch ------------------------------------------------

# (kernel sides, stride, input sides) of each rank: per-axis kernel sides, strides 1, 2 and 3,
# sides that the strides do not divide (the convolution floors).
OP_CASES = {
    2: [((3, 5), 1, (7, 9)), ((3, 5), 2, (7, 9)), ((1, 3), 3, (8, 7)), ((5, 1), 2, (6, 5))],
    3: [((3, 5, 1), 2, (5, 7, 6)), ((3, 3, 3), 3, (6, 7, 5))],
}
OP_IDS = {dims: [f"k{'x'.join(map(str, k))}-s{s}" for k, s, _ in OP_CASES[dims]] for dims in OP_CASES}


def torch_grads(function, arrays, g):
    """``function`` of torch tensors of ``arrays`` and the gradients of <function(...), g>."""
    tensors = [torch.from_numpy(a).requires_grad_(True) for a in arrays]
    y = function(*tensors)
    y.backward(torch.from_numpy(g))
    return y.detach().numpy(), [t.grad.numpy() for t in tensors]


@pytest.mark.parametrize(
    "dims,kernel_sides,stride,sides",
    [(dims, *case) for dims in OP_CASES for case in OP_CASES[dims]],
    ids=[f"{dims}d-{i}" for dims in OP_CASES for i in OP_IDS[dims]],
)
def test_strided_and_transposed_convs_match_torch(dims, kernel_sides, stride, sides):
    """conv (padding (k - 1) / 2 per axis, any stride) and the transposed conv (PyTorch's, output
    padding stride - 1), each forward and its three gradients, against torch and autograd."""
    rng = np.random.default_rng(0)
    pad = tuple((k - 1) // 2 for k in kernel_sides)
    c_in, c_out = 3, 4
    bias = rng.normal(size=c_out)
    convs = {2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}
    transposed = {2: torch.nn.functional.conv_transpose2d, 3: torch.nn.functional.conv_transpose3d}

    x = rng.normal(size=(2, c_in, *sides))
    weight = rng.normal(size=(c_out, c_in, *kernel_sides))  # OIHW / OIDHW
    output_sides = [(s + 2 * p - k) // stride + 1 for s, p, k in zip(sides, pad, kernel_sides, strict=True)]
    g = rng.normal(size=(2, c_out, *output_sides))
    y, (gx, gw, gb) = torch_grads(
        lambda x, w, b: convs[dims](x, w, b, stride=stride, padding=pad), (x, weight, bias), g
    )
    kernel = np.moveaxis(weight, (0, 1), (-1, -2))  # HWIO / DHWIO
    ours = reference.conv(channels_last(x), kernel, bias, pad, stride)
    assert rel(ours, channels_last(y)) <= FLOAT64_BOUND
    ogx, ogk, ogb = reference.conv_backward(channels_last(g), channels_last(x), kernel, pad, stride=stride)
    assert rel(ogx, channels_last(gx)) <= FLOAT64_BOUND
    assert rel(np.moveaxis(ogk, (-1, -2), (0, 1)), gw) <= FLOAT64_BOUND
    assert rel(ogb, gb) <= FLOAT64_BOUND

    x = rng.normal(size=(2, c_in, *sides))
    weight = rng.normal(size=(c_in, c_out, *kernel_sides))  # ConvTranspose: (in, out, *k)
    g = rng.normal(size=(2, c_out, *(s * stride for s in sides)))
    y, (gx, gw, gb) = torch_grads(
        lambda x, w, b: transposed[dims](x, w, b, stride=stride, padding=pad, output_padding=stride - 1),
        (x, weight, bias),
        g,
    )
    kernel = np.moveaxis(weight, (0, 1), (-1, -2))  # (*k, out, in)
    ours = reference.conv_transpose(channels_last(x), kernel, bias, pad, stride)
    assert rel(ours, channels_last(y)) <= FLOAT64_BOUND
    ogx, ogk, ogb = reference.conv_transpose_backward(channels_last(g), channels_last(x), kernel, pad, stride)
    assert rel(ogx, channels_last(gx)) <= FLOAT64_BOUND
    assert rel(np.moveaxis(ogk, (-1, -2), (0, 1)), gw) <= FLOAT64_BOUND
    assert rel(ogb, gb) <= FLOAT64_BOUND


@pytest.mark.parametrize(
    "kernel_sides,stride,sides", [((3, 5), 2, (9, 6)), ((3, 1, 5), 3, (7, 4, 5))], ids=["2d", "3d"]
)
def test_strided_and_transposed_convs_in_row_bands_are_the_same(monkeypatch, kernel_sides, stride, sides):
    """One output row per band (each band reading its rows ``stride`` apart) computes what one
    band does, forward and backward, for the strided conv and the transposed conv."""
    rng = np.random.default_rng(0)
    pad = tuple((k - 1) // 2 for k in kernel_sides)
    x, kernel, bias = rng.normal(size=(2, *sides, 3)), rng.normal(size=(*kernel_sides, 3, 4)), rng.normal(size=4)
    y = reference.conv(x, kernel, bias, pad, stride)
    g = rng.normal(size=y.shape)
    gt = rng.normal(size=(2, *(side * stride for side in y.shape[1:-1]), 3))
    single = [
        y,
        *reference.conv_backward(g, x, kernel, pad, stride=stride),
        reference.conv_transpose(g, kernel, np.zeros(3), pad, stride),
        *reference.conv_transpose_backward(gt, g, kernel, pad, stride),
    ]
    monkeypatch.setattr(reference, "IM2COL_ELEMENTS", 100)
    assert len(reference._row_bands(y.shape[1], 2 * np.prod(y.shape[2:-1]) * np.prod(kernel_sides) * 3)) == y.shape[1]
    banded = [
        reference.conv(x, kernel, bias, pad, stride),
        *reference.conv_backward(g, x, kernel, pad, stride=stride),
        reference.conv_transpose(g, kernel, np.zeros(3), pad, stride),
        *reference.conv_transpose_backward(gt, g, kernel, pad, stride),
    ]
    for one, many in zip(single, banded, strict=True):
        np.testing.assert_allclose(many, one, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("dims", [2, 3])
def test_instance_norm_and_prelu_match_torch(dims):
    """InstanceNorm (no affine, each sample's own statistics, in eval as in train) and PReLU (one
    slope), forward and backward through the tape, against torch."""
    rng = np.random.default_rng(0)
    sides = {2: (5, 7), 3: (3, 5, 4)}[dims]
    x = rng.normal(1.0, 2.0, size=(2, 3, *sides))
    g = rng.normal(size=x.shape)
    slope = np.array([0.3])
    functional = torch.nn.functional
    y, (gx, gslope) = torch_grads(
        lambda x, a: functional.prelu(functional.instance_norm(x, eps=reference.BN_EPS), a), (x, slope), g
    )
    graph = reference.Graph({"merge.weight": slope}, train=False, record=True)
    node = reference.Node(channels_last(x))
    out = graph.prelu(graph.instance_norm(node), "merge")
    graph.backward(out, channels_last(g))
    assert rel(out.value, channels_last(y)) <= FLOAT64_BOUND
    assert rel(node.grad, channels_last(gx)) <= FLOAT64_BOUND
    assert rel(graph.grads["merge.weight"], gslope) <= FLOAT64_BOUND


# --- the whole network ------------------------------------------------------------------------


@pytest.mark.parametrize("config,sides", CASES, ids=CASE_IDS)
def test_eval_forward_matches_monai_in_every_block(config, sides):
    monai = monai_net(config).eval()
    tensors = tensors_of(monai)
    x, _ = data(config, sides)
    ours = reference.forward(tensors, x, config=config)
    assert list(ours) == config.block_names
    with torch.no_grad():
        expected = monai(torch.from_numpy(x)).numpy()
        _, named = project_model(monai, config).eval()(torch.from_numpy(x), return_intermediates=True)
    assert rel(ours["output"], expected) <= FLOAT64_BOUND
    assert list(named) == config.block_names
    for name in config.block_names:
        assert rel(ours[name], named[name].numpy()) <= FLOAT64_BOUND, name
    assert ours["d1.ag"].shape[1] == 1  # psi: one channel


def test_the_config_is_inferred_from_a_monai_state_dict():
    """Without ``config=``, MONAI's keys give its network (strides assumed 2, as TINY's are)."""
    monai = monai_net(TINY).eval()
    x, _ = data(TINY, (8, 12))
    inferred = reference.forward(tensors_of(monai), x)
    np.testing.assert_array_equal(inferred["output"], reference.forward(tensors_of(monai), x, config=TINY)["output"])


@pytest.mark.parametrize("config,sides", CASES, ids=CASE_IDS)
def test_train_forward_and_running_statistics_match_monai(config, sides):
    monai = monai_net(config)
    tensors = tensors_of(monai)
    project = project_model(monai, config).train()
    x, _ = data(config, sides)
    ours = reference.forward(tensors, x, train=True, config=config)
    with torch.no_grad():
        expected = monai.train()(torch.from_numpy(x)).numpy()
        _, named = project(torch.from_numpy(x), return_intermediates=True)
    assert rel(ours["output"], expected) <= FLOAT64_BOUND
    for name in config.block_names:
        assert rel(ours[name], named[name].numpy()) <= FLOAT64_BOUND, name
    state = monai.state_dict()
    buffers = names(config, buffers=True)
    assert sorted(k for k in ours if k.startswith("state/")) == sorted(f"state/{n}" for n in buffers)
    for n in buffers:
        assert rel(ours[f"state/{n}"], state[n].numpy()) <= FLOAT64_BOUND, n


@pytest.mark.parametrize("config,sides", CASES, ids=CASE_IDS)
def test_gradients_match_monai_autograd(config, sides):
    monai = monai_net(config).train()
    tensors = tensors_of(monai)
    x, target = data(config, sides)
    ours = reference.gradients(tensors, x, target, config=config)
    loss = torch_loss(monai, x, target)
    loss.backward()
    trainable = names(config)
    theirs = {f"grad/{n}": p.grad.numpy() for n, p in monai.named_parameters()}
    assert list(theirs) == [f"grad/{n}" for n in trainable]
    assert list(ours) == ["loss"] + list(theirs) + [f"state/{n}" for n in names(config, buffers=True)]
    assert abs(float(ours["loss"]) - loss.item()) <= FLOAT64_BOUND * loss.item()
    for n in trainable:
        assert ours[f"grad/{n}"].shape == tensors[n].shape and ours[f"grad/{n}"].dtype == np.float64, n
    assert rel(whole(ours, "grad/", trainable), whole(theirs, "grad/", trainable)) <= FLOAT64_BOUND
    # Every gradient also by itself, relative to the whole gradient's largest entry.
    scale = np.max(np.abs(whole(theirs, "grad/", trainable)))
    for n in trainable:
        assert np.max(np.abs(ours[f"grad/{n}"] - theirs[f"grad/{n}"])) <= FLOAT64_BOUND * scale, n


@pytest.mark.parametrize("config,sides", RANKS, ids=RANK_IDS)
def test_sgd_train_step_matches_torch_optim(config, sides):
    monai = monai_net(config).train()
    tensors = tensors_of(monai)
    x, target = data(config, sides)
    ours = reference.train_step(tensors, x, target, optimizer="sgd", config=config)
    opt = torch_optimizer(list(monai.parameters()), "sgd")
    torch_loss(monai, x, target).backward()
    grads = {n: p.grad.numpy().copy() for n, p in monai.named_parameters()}
    opt.step()
    trainable = names(config)
    assert list(ours) == [f"grad/{n}" for n in trainable] + [f"step/{n}" for n in trainable]
    stepped = dict(monai.named_parameters())
    for n in trainable:
        expected = stepped[n].detach().numpy()
        assert np.max(np.abs(ours[f"step/{n}"] - expected)) <= FLOAT64_BOUND * np.max(np.abs(expected)), n
    # The step moved every parameter whose gradient is not zero (most of a 5x5x5 kernel's taps on
    # the 1x2x3 bottom of the volume read only padding: their gradient is exactly zero).
    moved = whole(ours, "step/", trainable) != np.concatenate([tensors[n].ravel() for n in trainable])
    gradient = np.abs(whole(grads, "", trainable))
    assert np.all(moved[gradient > 1e-12 * gradient.max()])


def test_fit_and_sharded_fit_match_torch():
    """Two Adam steps of ``fit`` against a torch loop; one SGD step on two shards (each with its own
    BatchNorm statistics, the gradients averaged, shard 0's running statistics) against two torch
    replicas doing the same by hand."""
    config, sides = TINY, (8, 12)
    monai = monai_net(config).train()
    tensors = tensors_of(monai)
    xs, targets = data(config, sides, steps=2)
    trainable, buffers = names(config), names(config, buffers=True)

    ours = reference.fit(tensors, xs, targets, optimizer="adam", config=config)
    model = copy.deepcopy(monai)
    opt = torch_optimizer(list(model.parameters()), "adam")
    for k in range(2):
        opt.zero_grad()
        loss = torch_loss(model, xs[k], targets[k])
        loss.backward()
        opt.step()
        assert abs(float(ours[f"loss/step{k + 1}"]) - loss.item()) <= FLOAT64_BOUND * loss.item()
    params, state = dict(model.named_parameters()), model.state_dict()
    for n in trainable:
        assert rel(ours[f"param/{n}"], params[n].detach().numpy()) <= FLOAT64_BOUND, n
    for n in buffers:
        assert rel(ours[f"state/{n}"], state[n].numpy()) <= FLOAT64_BOUND, n

    x, target = data(config, sides, batch=4)
    sharded = reference.fit(tensors, x[None], target[None], optimizer="sgd", config=config, shards=2)
    replicas = [copy.deepcopy(monai) for _ in range(2)]
    for r, replica in enumerate(replicas):
        torch_loss(replica, x[2 * r : 2 * r + 2], target[2 * r : 2 * r + 2]).backward()
    lr = OPTIMIZERS["sgd"]["lr"]
    grads = [dict(replica.named_parameters()) for replica in replicas]
    for n in trainable:
        mean_grad = (grads[0][n].grad + grads[1][n].grad).numpy() / 2
        expected = tensors[n] - lr * mean_grad
        assert rel(sharded[f"param/{n}"], expected) <= FLOAT64_BOUND, n
    state = replicas[0].state_dict()
    for n in buffers:
        assert rel(sharded[f"state/{n}"], state[n].numpy()) <= FLOAT64_BOUND, n


# Parameters of the layers new to this network: the transposed conv, psi's BatchNorm, the merge's
# PReLU slope, a strided conv of the bottom block.
PERTURBED = [
    "model.1.upconv.up.conv.weight",
    "model.1.attention.psi.1.weight",
    "model.1.submodule.1.merge.adn.A.weight",
    "model.1.submodule.1.submodule.conv.0.conv.weight",
]


@pytest.mark.parametrize("name", PERTURBED)
def test_a_perturbed_parameter_fails_the_comparison(name):
    """The comparison is sensitive: one entry of one parameter moved by 1e-4 puts the eval output
    and the gradient far beyond the float64 bound."""
    config, sides = TINY, (8, 12)
    monai = monai_net(config).train()
    tensors = tensors_of(monai)
    assert name in tensors
    x, target = data(config, sides)
    torch_loss(monai, x, target).backward()
    trainable = names(config)
    theirs = {f"grad/{n}": p.grad.numpy() for n, p in monai.named_parameters()}
    with torch.no_grad():
        output = monai.eval()(torch.from_numpy(x)).numpy()
    # The entry of largest gradient: one the loss surely depends on (a tap that reads only padding,
    # or an input channel that a ReLU zeroes everywhere, would change nothing).
    tensors[name].flat[np.argmax(np.abs(theirs[f"grad/{name}"]))] += 1e-4
    ours = reference.gradients(tensors, x, target, config=config)
    assert rel(reference.forward(tensors, x, config=config)["output"], output) > 1e3 * FLOAT64_BOUND
    assert rel(whole(ours, "grad/", trainable), whole(theirs, "grad/", trainable)) > 1e3 * FLOAT64_BOUND


def test_dropout_is_refused_in_train_mode_and_ignored_in_eval():
    config = MonaiConfig(in_channels=2, out_channels=3, channels=(4, 8, 16), strides=(2, 2), dropout=0.2)
    monai = monai_net(config)
    tensors = tensors_of(monai)
    x, target = data(config, (8, 12))
    refusal = r"^the reference compares train mode at dropout 0 .*pass a config with dropout 0\.0, got dropout 0\.2$"
    calls = {
        "forward": lambda: reference.forward(tensors, x, train=True, config=config),
        "gradients": lambda: reference.gradients(tensors, x, target, config=config),
        "train_step": lambda: reference.train_step(tensors, x, target, optimizer="sgd", config=config),
        "train_steps": lambda: reference.train_steps(tensors, x, target, optimizers=("adam",), config=config),
        "fit": lambda: reference.fit(tensors, x[None], target[None], optimizer="sgd", config=config, shards=2),
    }
    for call in calls.values():
        with pytest.raises(ValueError, match=refusal):
            call()
    with torch.no_grad():
        expected = monai.eval()(torch.from_numpy(x)).numpy()
    assert rel(reference.forward(tensors, x, config=config)["output"], expected) <= FLOAT64_BOUND


def test_an_input_the_strides_do_not_divide_is_refused():
    x, _ = data(TINY, (8, 10))  # 10 is not a multiple of 2 * 2
    with pytest.raises(ValueError, match=r"spatial sides multiples of 4, got an input of shape \(2, 2, 8, 10\)"):
        reference.forward(tensors_of(monai_net(TINY)), x, config=TINY)


# --- reduced precision ------------------------------------------------------------------------

# Largest relative difference from float64 (to the largest |value|) that each precision may show.
# Loose on purpose: the parity runs measure the rounding noise of each run (harness/parity/noise.py)
# and bound implementations by it, so these bounds only catch a precision path that is broken (an
# op left in float64, a missing rounding that is then no noisier than float32, an overflow), not
# tune the noise. float32 carries ~1e-7 per op; train-mode BatchNorm and InstanceNorm backward
# amplify it in the gradient. bfloat16 keeps 8 bits (~4e-3 per rounding) through ~30 rounded ops.
REDUCED = {
    "float32": {"eval": (1e-9, 1e-5), "train": (1e-9, 1e-4), "grad": (1e-9, 1e-3)},
    "mixed_bfloat16": {"eval": (1e-4, 5e-2), "train": (1e-4, 0.1), "grad": (1e-4, 1.0)},
}


@pytest.mark.parametrize("precision", sorted(REDUCED))
@pytest.mark.parametrize("config,sides", RANKS, ids=RANK_IDS)
def test_reduced_precision_is_finite_and_close_to_float64(config, sides, precision):
    tensors = tensors_of(monai_net(config))
    x, target = data(config, sides)
    trainable = names(config)
    # One train-mode pass each: its blocks, running statistics and gradients.
    exact = reference.train_steps(tensors, x, target, optimizers=(), config=config, forward=True)
    rounded = reference.train_steps(tensors, x, target, optimizers=(), config=config, precision=precision, forward=True)
    assert list(rounded) == list(exact)
    for key, value in rounded.items():
        assert value.shape == exact[key].shape and np.all(np.isfinite(value)), key
        if not key.endswith("num_batches_tracked"):
            assert value.dtype == np.float32, key
    eval_low = reference.forward(tensors, x, config=config, precision=precision)
    difference = {
        "eval": rel(eval_low["output"], reference.forward(tensors, x, config=config)["output"]),
        "train": rel(rounded["output"], exact["output"]),
        "grad": rel(whole(rounded, "grad/", trainable), whole(exact, "grad/", trainable)),
    }
    print(precision, config.spatial_dims, {k: f"{v:.2e}" for k, v in difference.items()})
    for what, (low, high) in REDUCED[precision].items():
        assert low <= difference[what] <= high, (what, difference[what])
    if precision == "mixed_bfloat16":  # activations are bfloat16 values, parameters' gradients not
        for name in ("e1", "b1", "d1.up", "d1.ag", "d1", "output"):
            value = rounded[name]
            np.testing.assert_array_equal(value, value.astype(ml_dtypes.bfloat16).astype(np.float32))
        slope = rounded["grad/model.1.merge.adn.A.weight"]
        assert np.any(slope != slope.astype(ml_dtypes.bfloat16).astype(np.float32))


@pytest.mark.parametrize("precision", sorted(REDUCED))
def test_reduced_precision_sharded_fit(precision):
    """Two Adam steps on two shards each: finite, and the parameters near float64's (Adam's first
    steps are ~lr * sign(g), so a gradient's rounding moves them by a fraction of lr = 1e-3)."""
    config, sides = TINY, (8, 12)
    tensors = tensors_of(monai_net(config))
    xs, targets = data(config, sides, steps=2)
    exact = reference.fit(tensors, xs, targets, optimizer="adam", config=config, shards=2)
    rounded = reference.fit(tensors, xs, targets, optimizer="adam", config=config, precision=precision, shards=2)
    assert list(rounded) == list(exact)
    for key, value in rounded.items():
        assert value.shape == exact[key].shape and np.all(np.isfinite(value)), key
    trainable = names(config)
    difference = rel(whole(rounded, "param/", trainable), whole(exact, "param/", trainable))
    assert 0 < difference < 1e-2
