"""Hostile optimizer state, in every format that holds one: hyperparameters out of torch.optim's
range, malformed metadata, values another type than they must be, and step counts no format holds
exactly. Each is refused on reading with one CheckpointError naming the file; nothing else is raised."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import weights_convert
from weights_convert.core.checkpoint import Checkpoint, CheckpointError
from weights_convert.core.optim import hyperparameters
from weights_convert.core.optimizer_state import MAX_STEP, OptimizerState
from weights_convert.core.random_init import random_checkpoint
from weights_convert.core.spec import ModelConfig, param_specs

CONFIG = ModelConfig(3, 1, (4, 8))


def training_checkpoint(name: str = "adam", step: int = 3):
    weights = random_checkpoint(CONFIG, seed=1)
    hyper = hyperparameters(name, **({"momentum": 0.9} if name == "sgd" else {}))
    slots = {
        slot: {p.name: np.full(p.shape, 0.01, np.float32) for p in param_specs(CONFIG) if not p.is_buffer}
        for slot in (("momentum_buffer",) if name == "sgd" else ("exp_avg", "exp_avg_sq"))
    }
    return Checkpoint.from_tensors(weights.tensors, CONFIG, optimizer=OptimizerState(name, hyper, step, slots))


def rewrite_safetensors_header(path, change) -> None:
    """The file's ``optimizer`` metadata replaced by ``change(header)`` (JSON text or any value)."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(path), "np") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iteration
    header = change(json.loads(metadata["optimizer"]))
    metadata["optimizer"] = header if isinstance(header, str) else json.dumps(header)
    save_file(tensors, str(path), metadata)


def refused(path, *fragments) -> str:
    with pytest.raises(CheckpointError) as caught:
        weights_convert.read(path)
    message = str(caught.value)
    assert str(path) in message and "\n" not in message, message
    assert all(f in message for f in fragments), message
    return message


OUT_OF_RANGE = [
    ("adam", "b1", 1.0),
    ("adam", "b2", 5.0),
    ("adam", "lr", -1.0),
    ("adam", "eps", -1e-3),
    ("adamw", "weight_decay", -1.0),
    ("sgd", "momentum", -1.0),
    ("sgd", "lr", -0.1),
]


@pytest.mark.parametrize(("name", "key", "value"), OUT_OF_RANGE)
def test_hyperparameters_torch_refuses_are_refused_in_safetensors(tmp_path, name, key, value):
    path = tmp_path / "m.safetensors"
    weights_convert.write(training_checkpoint(name), path)
    rewrite_safetensors_header(path, lambda h: {**h, "hyper": {**h["hyper"], key: value}})
    refused(path, f"hyperparameter {key} must be in", repr(value))


@pytest.mark.parametrize(("name", "key", "value"), OUT_OF_RANGE[:3])
def test_hyperparameters_torch_refuses_are_refused_in_pt(tmp_path, name, key, value):
    import torch

    path = tmp_path / "m.pt"
    weights_convert.write(training_checkpoint(name), path)
    saved = torch.load(path, weights_only=True)
    group = saved["optimizer"]["param_groups"][0]
    if key in ("b1", "b2"):
        betas = list(group["betas"])
        betas[key == "b2"] = value
        group["betas"] = tuple(betas)
    else:
        group[key] = value
    torch.save(saved, path)
    refused(path, f"hyperparameter {key} must be in")


def test_a_new_optimizer_refuses_what_torch_refuses():
    for name, key, value in OUT_OF_RANGE:
        with pytest.raises(CheckpointError, match=f"{key} must be in"):
            hyperparameters(name, **{key: value})


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda h: {**h, "name": ["adam"]}, "unknown optimizer"),
        (lambda h: {**h, "hyper": {**h["hyper"], "lr": int("9" * 400)}}, "must be a finite number"),
        (lambda h: {**h, "step": 2**31}, f"from 0 to {MAX_STEP}"),
        (lambda h: {**h, "step": 3.7}, "step must be"),
        (lambda h: {**h, "hyper": {**h["hyper"], "nesterov": "false"}}, "must be true or false"),
        (lambda h: "[" * 100000 + "]" * 100000, "nested too deep"),
    ],
)
def test_malformed_safetensors_optimizer_metadata(tmp_path, change, fragment):
    path = tmp_path / "m.safetensors"
    weights_convert.write(training_checkpoint("sgd"), path)
    rewrite_safetensors_header(path, change)
    refused(path, fragment)


@pytest.mark.parametrize("step", [np.array([3.0, 3.0], np.float32), np.array(np.inf, np.float32)])
def test_a_pt_step_that_is_not_one_integer(tmp_path, step):
    import torch

    path = tmp_path / "m.pt"
    weights_convert.write(training_checkpoint("adam"), path)
    saved = torch.load(path, weights_only=True)
    for entry in saved["optimizer"]["state"].values():
        entry["step"] = torch.from_numpy(step)
    torch.save(saved, path)
    refused(path, "the optimizer step must be")


def msgpack_rewritten(path, change) -> None:
    from flax import serialization

    tree = serialization.msgpack_restore(path.read_bytes())
    change(tree)
    path.write_bytes(serialization.msgpack_serialize(tree))


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda t: t["hyperparameters"]["sgd"].update(nesterov="false"), "nesterov must be true or false"),
        (lambda t: t["hyperparameters"]["sgd"].update(momentum="0.5"), "momentum must be a number"),
        (lambda t: t["optimizer"].update(step=np.float32(3.7)), "the optimizer step must be one integer"),
        (lambda t: t["optimizer"].update(step=np.float32(np.nan)), "the optimizer step must be one integer"),
        (lambda t: t["optimizer"].update(step=np.int64(-1)), f"from 0 to {MAX_STEP}"),
    ],
)
def test_msgpack_coerces_nothing(tmp_path, change, fragment):
    path = tmp_path / "m.msgpack"
    weights_convert.write(training_checkpoint("sgd"), path)
    msgpack_rewritten(path, change)
    refused(path, fragment)


def test_every_step_read_is_one_every_format_writes_back_exactly(tmp_path):
    """The largest step read converts to every optimizer format and back unchanged (torch keeps it
    in a float32 tensor, msgpack and Orbax in int32); one more is refused when read."""
    path = tmp_path / "m.safetensors"
    weights_convert.write(training_checkpoint("adam", step=MAX_STEP), path)
    for suffix in (".pt", ".msgpack", ".orbax", ".keras"):
        out = tmp_path / f"m{suffix}"
        weights_convert.convert(path, out)
        assert weights_convert.read(out).optimizer.step == MAX_STEP, suffix
    rewrite_safetensors_header(path, lambda h: {**h, "step": MAX_STEP + 1})
    refused(path, f"from 0 to {MAX_STEP}")


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=12,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(["name", "step", "hyper", "lr", "momentum", "nesterov"]), value=JSON)
def test_any_json_in_the_optimizer_metadata_is_read_or_refused_in_one_line(tmp_path, field, value):
    path = tmp_path / "p.safetensors"
    weights_convert.write(training_checkpoint("sgd"), path, force=True)  # hypothesis reuses tmp_path

    def change(header):
        if field in ("name", "step", "hyper"):
            return {**header, field: value}
        return {**header, "hyper": {**header["hyper"], field: value}}

    rewrite_safetensors_header(path, change)
    try:
        state = weights_convert.read(path).optimizer
    except CheckpointError as error:
        assert "\n" not in str(error) and str(path) in str(error)
    else:  # what was read is a state every format can write
        assert state.name == "sgd" and 0 <= (state.step or 0) <= MAX_STEP
        assert 0 <= state.hyper["lr"] and 0 <= state.hyper["momentum"]
