"""XLA:CPU compiler options for the CRNN's jitted train step and inference.

By default XLA:CPU picks, per op, between its own code generators and YNNPACK (XLA's CPU kernel
library) for convolutions, matrix products and the many reductions of batch norm. Naming the
YNNPACK fusion types explicitly (the `xla_cpu_experimental_ynn_fusion_type` option) is much
faster for this network: matrix products and reductions go to YNNPACK, while convolutions stay
with XLA's own convolution, about twice as fast here as YNNPACK's, which the default picks.
Measured on a 2-core Sapphire Rapids VM, paper-size CRNN, batch 8, float32, seconds per batch
(PyTorch 2.13 with oneDNN: 3.2 s train, 1.04 s inference):

    option                          train step     inference
    XLA default                     7.7 (8.7)      1.26
    individual_dot                  4.5 (4.9)      0.83
    individual_dot,reduce           2.9-3.2 (3.2)  1.09
    individual_dot,eltwise,reduce   3.3-3.5 (3.0)  1.02

(train step with the hand-written batch-norm and GRU gradients of `asd_jax.model`; in
parentheses, with autodiff's.) The train step uses dot + reduce; inference, the forward pass and
the training loop's validation step use dot only. With eltwise,
YNNPACK's element-wise fusions swallow three convolutions of the backward pass (the input
gradient of each block's first convolution, through the pooling gradient), which then run in
YNNPACK at ~half the speed of XLA's own convolution. The options are fields that only the
CPU compiler reads; other backends ignore them. The model itself also picks, for the CPU only
(through `on_cpu`), forms of the batch-norm statistics and gradient and of the convolution
weight gradient that XLA:CPU fuses without writing full-size intermediates; its pooling, written
for XLA:CPU too, is the same on every platform (`asd_jax.model`, 14.3 -> ~10.3 s per train step
at batch 32, all three together).
The one-off program that initialises a model's variables (`init_options`) is compiled at LLVM
optimisation level 1 on the CPU: it is mostly random-number code, run once, whose compile took
12-20 s at XLA's default level against 4.4-6 s at level 1 (paper and tiny CRNNs, 2 cores), with
bit-identical values (neither level reassociates or contracts floating-point arithmetic).
Set the environment variable `ASD_JAX_XLA_CPU_DEFAULTS=1` (before importing asd_jax) to compile
with XLA's defaults instead, e.g. to compare (`benchmarks/bench_model.py --xla_defaults`).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax

_FUSION_OPTION = "xla_cpu_experimental_ynn_fusion_type"


def _fusion(*kinds: str) -> dict[str, Any]:
    return {_FUSION_OPTION: ",".join(f"LIBRARY_FUSION_TYPE_{k.upper()}" for k in kinds)}


def train_options() -> dict[str, Any] | None:
    """`compiler_options` for the jitted train step (None: XLA's defaults)."""
    return None if _defaults_requested() else _fusion("individual_dot", "reduce")


def inference_options() -> dict[str, Any] | None:
    """`compiler_options` for jitted inference (features + CRNN) and the validation step (None:
    XLA's defaults)."""
    return None if _defaults_requested() else _fusion("individual_dot")


def init_options(platform: str) -> dict[str, Any] | None:
    """`compiler_options` for the program that initialises a model on `platform` ("cpu",
    "gpu", ...): LLVM optimisation level 1 on the CPU, None (XLA's defaults) elsewhere.

    Unlike the fusion options, the optimisation level is read by every backend, hence the
    platform argument.
    """
    if platform != "cpu" or _defaults_requested():
        return None
    return {"xla_backend_optimization_level": 1}


def on_cpu(cpu: Callable, other: Callable, *args: Any) -> Any:
    """`cpu(*args)` when lowered for the CPU, `other(*args)` for any other platform.

    For computations written differently for XLA:CPU (`asd_jax.model`, `asd_jax.features`). The
    choice is made when lowering (`jax.lax.platform_dependent`), so code using it stays usable
    inside any jitted function; both must compute the same values (up to rounding).
    """
    return jax.lax.platform_dependent(*args, cpu=cpu, default=other)


def _defaults_requested() -> bool:
    return os.environ.get("ASD_JAX_XLA_CPU_DEFAULTS", "0") not in ("", "0")
