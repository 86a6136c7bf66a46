"""The FLOP counts behind bench_model's GPU utilisation figures, and how it times and compares.

Two independent counts: the convolutions and matrix products that the traced forward pass and
gradient actually contain (exact, same dense convention), and XLA's cost analysis on CPU (on
GPUs it does not count the convolutions: they are cuDNN calls), which counts only the
multiply-adds that touch real (unpadded) input, plus the element-wise work (batch norm, ReLU,
pooling, GRU gates); `crnn_forward_flops` counts the matrix work only, by the usual dense
convention (zero padding included). At paper size the padding wins (ours ~4% above XLA's); for a
small model the element-wise work is a larger share.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import extend
from jax._src.interpreters import partial_eval as pe  # dce_jaxpr: no public equivalent

from asd_jax.model import CRNN, abstract_variables, init_variables
from benchmarks import bench_model

SMALL = {"conv_features": (8, 16), "gru_hidden": 8, "gru_layers": 2, "fc1_features": 8}
_CALLS = {"jit", "pjit", "closed_call", "custom_vjp_call", "custom_jvp_call", "remat", "checkpoint"}


def _matrix_flops(jaxpr) -> float:
    """2 x multiply-adds of every convolution and matrix product in `jaxpr` (dense: padding
    included), loops counted once per iteration, of a `cond` the costlier branch."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name, params = eqn.primitive.name, eqn.params
        out = eqn.outvars[0].aval
        if name == "conv_general_dilated":  # each output: a sum over the window's other axes
            rhs = eqn.invars[1].aval
            assert params["feature_group_count"] == params["batch_group_count"] == 1
            window = math.prod(rhs.shape) / rhs.shape[params["dimension_numbers"].rhs_spec[0]]
            total += 2.0 * math.prod(out.shape) * window
        elif name == "dot_general":
            (contracting, _), _ = params["dimension_numbers"]
            lhs = eqn.invars[0].aval
            total += 2.0 * math.prod(out.shape) * math.prod(lhs.shape[a] for a in contracting)
        elif name == "scan":
            total += params["length"] * _matrix_flops(params["jaxpr"].jaxpr)
        elif name == "cond":  # on_cpu: two forms of the same computation, one runs
            total += max(_matrix_flops(b.jaxpr) for b in params["branches"])
        else:
            inner = [v.jaxpr if isinstance(v, extend.core.ClosedJaxpr) else v
                     for v in params.values()
                     if isinstance(v, (extend.core.ClosedJaxpr, extend.core.Jaxpr))]
            assert not inner or name in _CALLS, f"unhandled primitive with a body: {name}"
            total += sum(_matrix_flops(j) for j in inner)
    return total


def _traced_flops(fn, *args) -> float:
    """`_matrix_flops` of fn's jaxpr without the values nothing uses (as XLA drops them)."""
    closed = jax.make_jaxpr(fn)(*args)
    jaxpr, _ = pe.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars))
    return _matrix_flops(jaxpr)


@pytest.mark.parametrize("config", [{}, SMALL], ids=["paper", "small"])
def test_flop_counts_are_those_of_the_traced_forward_pass_and_gradient(config):
    """The dense counts are exactly the convolutions and matrix products that the forward pass
    and the gradient of every parameter contain, the unused input gradient of the first
    convolution dropped (3x the forward pass would count it: 1.4% more at paper size)."""
    model = CRNN(**config)
    variables = abstract_variables(model, 16)
    batch = 2
    features = jax.ShapeDtypeStruct((batch, 960, 64, 16), jnp.float32)
    cams = jax.ShapeDtypeStruct((batch, 11), jnp.float32)

    def forward(params, stats, x, c):
        return model.apply({"params": params, "batch_stats": stats}, x, c, train=False)

    def loss(params, stats, x, c):
        out, _ = model.apply({"params": params, "batch_stats": stats}, x, c, train=True,
                             mutable=["batch_stats"])
        return jnp.sum(out)

    args = (variables["params"], variables["batch_stats"], features, cams)
    forward_flops = bench_model.crnn_forward_flops(model, 16)
    assert _traced_flops(forward, *args) / batch == pytest.approx(forward_flops, rel=1e-9)
    assert _traced_flops(jax.grad(loss), *args) / batch == pytest.approx(
        bench_model.crnn_train_flops(model, 16), rel=1e-9)
    assert bench_model.crnn_train_flops(model, 16) < 3 * forward_flops


def test_peak_table_takes_pcie_and_nvl_cards_before_sxm():
    """A device kind gets its own variant's peak, not that of a shorter name inside it."""
    table = dict(bench_model.PEAK_TFLOPS)
    for dtype in ("bfloat16", "float32"):
        assert bench_model._peak_tflops("NVIDIA H100 80GB HBM3", dtype) == table["H100"][dtype]
        assert bench_model._peak_tflops("NVIDIA H100 PCIe", dtype) == table["H100 PCIe"][dtype]
        assert bench_model._peak_tflops("NVIDIA H100 NVL", dtype) == table["H100 NVL"][dtype]
        assert bench_model._peak_tflops("NVIDIA H200 NVL", dtype) is None
        assert bench_model._peak_tflops("NVIDIA GH200 480GB", dtype) is None
        assert bench_model._peak_tflops("NVIDIA H200", dtype) == table["H200"][dtype]
        assert bench_model._peak_tflops("Tesla T4", dtype) is None
    assert table["H100 PCIe"]["bfloat16"] < table["H100 NVL"]["bfloat16"] < table["H100"]["bfloat16"]


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_torch_side_runs_in_the_compute_dtype(compute_dtype):
    """The PyTorch reference computes in the same dtype as ours, so the ratios compare like for
    like (bfloat16: under torch.autocast; parameters float32 on both sides)."""
    import torch

    batch = bench_model._random_batch(np.random.default_rng(0), 1, 16)
    ref = bench_model.TorchBench(batch, compute_dtype)
    # A narrower network of the same layers in its place: the dtypes are the point, not the time.
    ref.model = type(ref.model)(16, conv_features=(4, 8, 8, 8), gru_hidden=4)
    ref.optimizer = torch.optim.Adam(ref.model.parameters(), lr=1e-4)
    seen = []
    for layer in (ref.model.conv_block1.conv1, ref.model.conv_block4.bn2, ref.model.gru_block):
        layer.register_forward_hook(
            lambda _, __, out: seen.append((out[0] if isinstance(out, tuple) else out).dtype))
    ref.infer()
    ref.train()
    want = {"float32": torch.float32, "bfloat16": torch.bfloat16}[compute_dtype]
    assert seen == [want] * 6
    assert {p.dtype for p in ref.model.parameters()} == {torch.float32}


@pytest.mark.parametrize("config, low, high", [
    ({}, 1.0, 1.06),  # the paper's CRNN: 26.3 GFLOP per chunk
    ({"conv_features": (8, 16), "gru_hidden": 8, "gru_layers": 1, "fc1_features": 8}, 0.9, 1.1),
])
def test_forward_flops_match_xla_cost_analysis_on_cpu(config, low, high):
    model = CRNN(**config)
    # Compiled for the CPU whatever the default backend (on a GPU the count would miss cuDNN's).
    cpu = jax.devices("cpu")[0]
    variables = jax.device_put(init_variables(jax.random.key(0), model, 16), cpu)
    features, cams = jax.device_put((jnp.zeros((1, 960, 64, 16)), jnp.zeros((1, 11))), cpu)
    compiled = jax.jit(lambda v, x, c: model.apply(v, x, c, train=False)).lower(
        variables, features, cams).compile()
    xla = bench_model._cost_flops(compiled)
    ours = bench_model.crnn_forward_flops(model, 16)
    assert low <= ours / xla <= high, (ours, xla)


def test_steady_time_queues_the_steps_and_waits_once_per_run(monkeypatch):
    """Steady-state timing: `steps` dispatches per run, one wait after them, time per step."""
    clock = {"t": 0.0}
    calls = []
    monkeypatch.setattr(bench_model.time, "perf_counter", lambda: clock["t"])

    def dispatch():
        calls.append("d")
        clock["t"] += 0.5  # each queued step costs 0.5 s of host time in this fake

    def block():
        calls.append("b")
        clock["t"] += 3.0  # the device finishes 3 s after the last dispatch

    per_step = bench_model._steady_time(dispatch, block, warmup=2, iters=2, steps=4)
    assert per_step == pytest.approx((4 * 0.5 + 3.0) / 4)
    assert "".join(calls) == "ddb" + "ddddb" * 2


def test_sides_take_turns_so_a_slowdown_falls_on_both(monkeypatch):
    """CPU timing: warm-ups first, then rounds of one call per side; a host that slows down
    halfway through (a second side run after the first would see only the slow half) leaves the
    ratio of best times at the sides' true ratio of 2."""
    clock = {"t": 0.0, "calls": 0}
    order = []
    monkeypatch.setattr(bench_model.time, "perf_counter", lambda: clock["t"])

    def side(name, cost):
        def fn():
            order.append(name)
            clock["calls"] += 1
            clock["t"] += cost * (1.0 if clock["calls"] <= 6 else 1.5)  # the host slows down
        return fn

    times = bench_model._turn_times([side("ours", 1.0), side("ref", 2.0)], warmup=1, iters=3)
    assert order == ["ours", "ref"] + ["ours", "ref"] * 3
    np.testing.assert_allclose(times, [[1.0, 2.0], [1.0, 2.0], [1.5, 3.0]])
    ratio, line = bench_model._ratio_line("train", 1.5, times[:, 0], times[:, 1])
    assert ratio == pytest.approx(2.0)
    assert line == "train 2.00 (target >= 1.5; rounds 2.00-2.00)"


def test_cpu_matmul_rate_is_the_faster_side_and_its_product_is_right(monkeypatch):
    """The CPU's matrix-product rate: 2 n^3 FLOPs over the faster side's best time; each side's
    product is of the measured size and dtype and gives the right values."""
    products = []
    times = iter([0.004, 0.002])  # JAX's best, then PyTorch's

    def fake_best_time(fn, warmup, iters):
        products.append(np.asarray(fn(), np.float64))
        return next(times)

    monkeypatch.setattr(bench_model, "_best_time", fake_best_time)
    rate = bench_model.cpu_matmul_gflops("float32", 64, iters=3, with_torch=True)
    assert rate == pytest.approx(2 * 64**3 / 0.002 / 1e9)
    assert [p.shape for p in products] == [(64, 64), (64, 64)]
    for p in products:  # ones @ ones: every entry is the inner dimension
        np.testing.assert_array_equal(p, np.full((64, 64), 64.0))
    times = iter([0.004])
    assert bench_model.cpu_matmul_gflops("float32", 64, 3, with_torch=False) == pytest.approx(
        2 * 64**3 / 0.004 / 1e9)


def test_share_line_is_the_rate_and_its_share_of_the_matrix_product_rate():
    assert (bench_model._share(2490.0, 14.5, 200.0)
            == "172 GFLOP/s, 86% of the matrix-product rate")
