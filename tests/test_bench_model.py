"""The FLOP count behind bench_model's GPU utilisation figures, against XLA's own count on CPU.

On CPU XLA's cost analysis counts the convolutions (on GPUs it does not: they are cuDNN calls),
counting only the multiply-adds that touch real (unpadded) input, plus the element-wise work
(batch norm, ReLU, pooling, GRU gates); `crnn_forward_flops` counts the matrix work only, by the
usual dense convention (zero padding included). At paper size the padding wins (ours ~4% above);
for a small model the element-wise work is a larger share.
"""

import jax
import jax.numpy as jnp
import pytest

from asd_jax.model import CRNN, init_variables
from benchmarks import bench_model


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
