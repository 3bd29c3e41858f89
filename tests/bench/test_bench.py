"""``attention-unet bench``: the command runs and reports well-formed rows, each naming its precision
and compared with its own precision's matmul ceiling; FLOPs match an independent count.

Nothing here asserts a time: timings depend on the machine and its load.
"""

import dataclasses
import importlib.util
import json
import math
import subprocess
import sys

import pytest

from weights_convert.core.monai_spec import MonaiConfig
from weights_convert.core.spec import ModelConfig
from weights_convert.harness import bench, cli

TINY = '{"channels": [4, 8, 16]}'
TINY_3D = '{"spatial_dims": 3, "in_channels": 2, "channels": [4, 8, 16]}'
ROW_KEYS = {"framework", "backend", "variant", "mode", "precision", "device", "dtype", "batch", "size", "median_ms"}
ROW_KEYS |= {"gflops", "ratio_to_ceiling", "matmul_precision"}
# The matmul setting each backend reports for a row of each precision: on JAX it is the one seen
# while the function was traced, so strict float32 rows show "highest" only if they ran at it.
MATMUL_SETTING = {
    "torch": {"float32": "ieee", "mixed_bfloat16": "ieee"},
    "jax": {"float32": "highest", "mixed_bfloat16": "default"},
    "tensorflow": {"float32": "ieee", "mixed_bfloat16": "ieee"},
}


def run_bench(capsys, *args: str) -> dict:
    argv = ["bench", "--json", "--config", TINY, "--size", "16", "24", "--batch", "2"]
    argv += ["--repeats", "2", "--warmup", "1", "--sgemm-n", "128", *args]
    assert cli.main(argv) == 0
    return json.loads(capsys.readouterr().out)


def hand_count(config: ModelConfig, *sides: int) -> int:
    """Convolution FLOPs of one image (H W) or volume (D H W) written out level by level,
    independently of the spec's table: a 3x3 conv has 9 taps, a 3x3x3 one 27."""
    c = config.channels
    taps = 3 ** len(sides)
    positions = [math.prod(side // 2**level for side in sides) for level in range(config.depth + 1)]
    total, c_in = 0, config.in_channels
    for i in range(config.depth):
        total += 2 * taps * positions[i] * (c_in * c[i] + c[i] * c[i])
        c_in = c[i]
    total += 2 * taps * positions[-1] * (c[-2] * c[-1] + c[-1] * c[-1])
    for j in range(config.depth):
        c_g, c_s = c[-1 - j], c[-2 - j]
        at = positions[config.depth - 1 - j]
        total += 2 * at * (c_g * c_s + c_s * c_s + c_s * c_s)  # the gate's three 1x1 convolutions
        total += 2 * taps * at * ((c_g + c_s) * c_s + c_s * c_s)
    return total + 2 * positions[0] * c[0] * config.out_channels


def test_default_model_is_91_2_gflop():
    flops = bench.forward_flops(ModelConfig(), (256, 256))
    assert flops == hand_count(ModelConfig(), 256, 256)
    assert round(flops / 1e9, 1) == 91.2


@pytest.mark.parametrize(
    "config, size",
    [
        (ModelConfig(), (256, 256)),
        (ModelConfig(3, 1, (4, 8, 16)), (37, 53)),
        (ModelConfig(2, 3, (4, 8, 16, 32)), (19, 8)),
        (ModelConfig(1, 2, (4, 8)), (3, 2)),
        (ModelConfig(2, 2, (4, 8, 16), spatial_dims=3), (9, 12, 11)),
        (ModelConfig(1, 1, (4, 8), spatial_dims=3), (2, 5, 3)),
    ],
)
def test_flops_match_hand_count(config, size):
    assert bench.forward_flops(config, size, batch=3) == 3 * hand_count(config, *size)


@pytest.mark.parametrize(
    "config, size",
    [
        (ModelConfig(3, 1, (4, 8, 16)), (37, 53)),
        (ModelConfig(2, 3, (4, 8, 16, 32)), (19, 8)),
        (ModelConfig(2, 2, (4, 8, 16), spatial_dims=3), (9, 12, 11)),
        (MonaiConfig(2, 2, (4, 8, 16, 32), strides=(2, 1, 3), kernel_size=5, up_kernel_size=(3, 1)), (12, 18)),
        (MonaiConfig(1, 1, (4, 8, 16), spatial_dims=3, up_kernel_size=1), (4, 8, 12)),
    ],
)
def test_flops_match_torch_flop_counter(config, size):
    """torch's FlopCounterMode counts the executed convolutions (and their backward) per module."""
    torch = pytest.importorskip("torch")
    from torch.utils.flop_counter import FlopCounterMode

    from impl_torch.io import build

    model = build(config)
    model.train()
    x = torch.randn(2, config.in_channels, *size)
    with FlopCounterMode(display=False) as counter:
        output = model(x)
    counted = counter.get_flop_counts()
    assert counter.get_total_flops() == bench.forward_flops(config, size, batch=2)
    for module, flops in bench.conv_flops(config, size).items():
        assert sum(counted[f"{type(model).__name__}.{module}"].values()) == 2 * flops, module
    with FlopCounterMode(display=False) as counter:
        torch.mean(model(x) ** 2).backward()
    assert counter.get_total_flops() == bench.train_step_flops(config, size, batch=2)
    assert output.shape[2:] == size


def check_ceilings(report: dict) -> None:
    """float32 and bfloat16 matmuls measured on this CPU; no tf32 (a CPU has none)."""
    ceilings = report["matmul_gflops"]
    assert set(ceilings) == {"float32", "tf32", "bfloat16"}
    assert ceilings["tf32"] is None and report["matmul"]["tf32"] is None
    for name in ("float32", "bfloat16"):
        assert isinstance(ceilings[name], float) and ceilings[name] > 0
        assert ceilings[name] == max(r["gflops"] for r in report["matmul"][name]["runs"])
    assert report["sgemm_gflops"] == ceilings["float32"]


def check_rows(
    report: dict, framework: str, backend: str, variants: set[str], dtype="float32", modes=None, size=(16, 24)
) -> None:
    check_ceilings(report)
    rows = [r for r in report["results"] if r["framework"] == framework and r["backend"] == backend]
    modes = modes or bench.MODES
    assert {(r["variant"], r["mode"]) for r in rows} == {(v, m) for v in variants for m in modes}
    flops = report["flops"]
    for row in rows:
        assert ROW_KEYS <= set(row), row
        assert "error" not in row, row
        assert (row["device"], row["dtype"], row["batch"], row["size"]) == ("cpu", dtype, 2, list(size))
        assert row["precision"] == dtype  # on CPU, one precision per dtype: no tf32 rows
        assert row["matmul_precision"] == MATMUL_SETTING[backend][dtype], row
        assert row["median_ms"] > 0
        # The reported rate is the counted FLOPs over the median time; the ratios are to the ceiling of
        # the row's own precision and to the float32 one.
        assert row["gflops"] == pytest.approx(flops[row["mode"]] / (row["median_ms"] / 1e3) / 1e9, rel=1e-3)
        ceiling = report["matmul_gflops"][bench.CEILING[row["precision"]]]
        assert row["ratio_to_ceiling"] == pytest.approx(row["gflops"] / ceiling, rel=1e-3)
        assert row["ratio_to_sgemm"] == pytest.approx(row["gflops"] / report["sgemm_gflops"], abs=1e-3)
        if row["mode"] == "forward":  # the logits: bfloat16 under mixed precision
            assert row["result_dtype"] == ("bfloat16" if dtype == "mixed_bfloat16" else dtype), row


def test_torch_rows(capsys):
    pytest.importorskip("torch")
    report = run_bench(capsys, "--frameworks", "torch", "--variants", "eager,channels_last")
    assert report["flops"]["forward"] == 2 * hand_count(ModelConfig(3, 1, (4, 8, 16)), 16, 24)
    # numpy's and torch's matmul, each before and after the frameworks; the ceiling is the highest.
    assert sorted(r["library"].split()[0] for r in report["sgemm"]["runs"]) == ["numpy", "numpy", "torch", "torch"]
    assert {r["n"] for r in report["sgemm"]["runs"]} == {128}
    assert report["sgemm_gflops"] == max(r["gflops"] for r in report["sgemm"]["runs"])
    check_rows(report, "torch", "torch", {"eager", "channels_last"})
    assert report["settings"]["config"] == {
        "architecture": "article",
        "in_channels": 3,
        "out_channels": 1,
        "channels": [4, 8, 16],
        "spatial_dims": 2,
    }
    assert len(report["load_avg_start"]) == 3


def test_torch_rows_of_a_3d_model(capsys):
    """A volume: FLOPs of 3x3x3 convolutions, channels_last is torch's channels_last_3d."""
    pytest.importorskip("torch")
    report = run_bench(
        capsys,
        "--frameworks",
        "torch",
        "--variants",
        "eager,channels_last",
        "--config",
        TINY_3D,
        "--size",
        "8",
        "12",
        "10",
    )
    assert report["flops"]["forward"] == 2 * hand_count(ModelConfig(2, 1, (4, 8, 16), spatial_dims=3), 8, 12, 10)
    check_rows(report, "torch", "torch", {"eager", "channels_last"}, size=(8, 12, 10))


def test_flax_rows(capsys):
    pytest.importorskip("flax")
    # Eager JAX retraces every operation of the gradient on each call: slow even on a tiny model.
    report = run_bench(capsys, "--frameworks", "flax", "--variants", "nnx.jit")
    check_rows(report, "flax", "jax", {"nnx.jit"})


@pytest.mark.parametrize(
    "args, size", [([], (16, 24)), (["--config", TINY_3D, "--size", "8", "12", "10"], (8, 12, 10))], ids=["2d", "3d"]
)
def test_keras_rows_come_from_a_backend_subprocess(capsys, args, size):
    pytest.importorskip("keras")
    pytest.importorskip("jax")
    report = run_bench(capsys, "--frameworks", "keras", "--keras-backends", "jax", "--variants", "jit_compile", *args)
    check_rows(report, "keras", "jax", {"jit_compile"}, size=size)


def test_mixed_bfloat16_rows_in_every_framework(capsys):
    """bfloat16 compute with float32 parameters in each installed framework (Keras on JAX), every row
    compared with the bfloat16 matmul ceiling; JAX traces them at its default precision."""
    wanted = {"torch": ("torch", "channels_last"), "flax": ("jax", "nnx.jit"), "keras": ("jax", "jit_compile")}
    frameworks = [f for f in wanted if importlib.util.find_spec(f) and importlib.util.find_spec(wanted[f][0])]
    if not frameworks:
        pytest.skip("no framework installed")
    variants = ",".join(wanted[f][1] for f in frameworks)
    args = ["--dtype", "mixed_bfloat16", "--frameworks", ",".join(frameworks), "--keras-backends", "jax"]
    report = run_bench(capsys, *args, "--variants", variants, "--repeats", "1", "--modes", "forward")
    assert report["settings"]["precisions"] == ["mixed_bfloat16"]
    for framework in frameworks:
        backend, variant = wanted[framework]
        check_rows(report, framework, backend, {variant}, dtype="mixed_bfloat16", modes=("forward",))


def test_frameworks_in_their_own_processes(capsys, monkeypatch):
    """The GPU layout, on the CPU: torch runs in a worker subprocess, not in this process (where it
    would fail here), and workers never preallocate GPU memory."""
    pytest.importorskip("torch")
    from weights_convert.harness.bench import torch_rows

    def not_here(settings):
        raise AssertionError("torch ran in the parent process")

    monkeypatch.setattr(torch_rows, "rows", not_here)
    settings = bench.Settings(ModelConfig(channels=(4, 8, 16)), 2, (16, 24), repeats=1, warmup=1, modes=("forward",))
    settings = dataclasses.replace(settings, variants=("eager",))
    report = bench.run(settings, ("torch",), sgemm_n=128, isolate=True)
    assert report["settings"]["isolated"] is True
    check_rows(report, "torch", "torch", {"eager"}, modes=("forward",))
    env = bench.worker_env(dataclasses.replace(settings, device="gpu"), "jax")
    assert (env["XLA_PYTHON_CLIENT_PREALLOCATE"], env["KERAS_BACKEND"]) == ("false", "jax")


def test_precisions_per_dtype_and_device():
    """float32 is strict float32, plus TF32 on a GPU only; each precision has its own ceiling."""
    precisions = {
        (d, dev): bench.Settings(dtype=d, device=dev).precisions for d in bench.DTYPES for dev in bench.DEVICES
    }
    assert precisions == {
        ("float32", "cpu"): ("float32",),
        ("float32", "gpu"): ("float32", "tf32"),
        ("float64", "cpu"): ("float64",),
        ("float64", "gpu"): ("float64",),
        ("mixed_bfloat16", "cpu"): ("mixed_bfloat16",),
        ("mixed_bfloat16", "gpu"): ("mixed_bfloat16",),
    }
    assert set(bench.CEILING) == set(bench.PRECISIONS)
    assert {bench.CEILING[p] for p in ("float32", "tf32", "mixed_bfloat16")} == set(bench.CEILINGS)


@pytest.mark.gpu
def test_gpu_bench_every_precision(capsys):
    """On a GPU: strict float32 and tf32 rows (JAX traced at "highest", then at its default), and
    bfloat16 rows, each framework in its own process, every ceiling measured."""
    if not bench.ceilings.matmul_candidates("float32", "gpu"):
        pytest.skip("no GPU visible to torch or jax")
    args = ["--device", "gpu", "--frameworks", "torch,flax,keras", "--keras-backends", "jax,torch"]
    args += ["--variants", "eager,nnx.jit,jit_compile", "--modes", "forward"]
    report = run_bench(capsys, *args)
    assert report["matmul_gflops"]["tf32"] > 0 and report["settings"]["isolated"] is True
    rows = report["results"]
    assert all("error" not in r for r in rows), [r for r in rows if "error" in r]
    for framework, backend in [("torch", "torch"), ("flax", "jax"), ("keras", "jax"), ("keras", "torch")]:
        got = {
            (r["precision"], r["matmul_precision"])
            for r in rows
            if (r["framework"], r["backend"]) == (framework, backend)
        }
        assert got == (
            {("float32", "highest"), ("tf32", "default")}
            if backend == "jax"
            else {("float32", "ieee"), ("tf32", "tf32")}
        )
    mixed = run_bench(capsys, *args, "--dtype", "mixed_bfloat16")
    assert {r["precision"] for r in mixed["results"]} == {"mixed_bfloat16"}
    assert all("error" not in r and r["result_dtype"] == "bfloat16" for r in mixed["results"])


def test_missing_framework_is_a_row_not_a_crash(capsys, monkeypatch):
    monkeypatch.setattr(bench.workers, "missing", lambda module: module in ("flax", "keras"))
    report = run_bench(capsys, "--frameworks", "flax,keras", "--modes", "forward")
    assert [(r["framework"], r["median_ms"]) for r in report["results"]] == [("flax", None), ("keras", None)]
    assert all("not installed" in r["error"] for r in report["results"])


def test_table_output(capsys):
    pytest.importorskip("torch")
    argv = ["bench", "--config", TINY, "--size", "16", "16", "--repeats", "1", "--warmup", "1", "--sgemm-n", "128"]
    assert cli.main([*argv, "--frameworks", "torch", "--variants", "eager", "--modes", "forward"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("sgemm (float32, 128^2")
    assert lines[1] == "tf32 matmul: not measured (no GPU)"
    assert lines[2].startswith("bfloat16 matmul (128^2, ")
    assert lines[-1].startswith("| torch | torch | eager | forward | float32 |")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--frameworks", "mxnet"], "unknown frameworks ['mxnet']"),
        (["--modes", "backward"], "modes must be"),
        (["--size", "2", "64"], "--size 2 64 is too small for depth 2: every side needs at least 4"),
        (["--size", "8", "8", "8"], "--size takes 2 positive sides (H W) for this 2D model, got 8 8 8"),
        (["--config", TINY_3D, "--size", "8", "8"], "--size takes 3 positive sides (D H W) for this 3D model"),
        (["--batch", "0"], "batch must be a positive integer"),
    ],
)
def test_bad_usage_is_one_line_and_exit_2(capsys, args, message):
    assert cli.main(["bench", "--config", TINY, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_no_gpu_is_one_line_and_exit_2(capsys, monkeypatch):
    monkeypatch.setattr(bench.ceilings, "matmul_candidates", lambda ceiling, device: [])
    assert cli.main(["bench", "--device", "gpu", "--config", TINY, "--size", "8", "8"]) == 2
    error = "attention-unet bench: error: --device gpu: neither torch nor jax sees a GPU here"
    assert capsys.readouterr().err.strip() == error


def test_importing_the_command_imports_no_framework():
    code = (
        "import sys, weights_convert, weights_convert.harness.bench, weights_convert.harness.cli as cli; "
        "cli.build_parser(); "
        "print([m for m in ('torch', 'jax', 'flax', 'tensorflow', 'keras') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
