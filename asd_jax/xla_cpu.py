"""XLA:CPU compiler options for the CRNN's jitted train step and inference.

By default XLA:CPU runs convolutions, matrix products and the many reductions of batch norm
with its own code generators. Handing them to YNNPACK (XLA's CPU kernel library, the
`xla_cpu_experimental_ynn_fusion_type` option) is much faster for this network. Measured on a
2-core Sapphire Rapids VM, paper-size CRNN, batch 8, float32, seconds per batch (PyTorch 2.13
with oneDNN: 3.2 s train, 1.04 s inference):

    option                          train (grad)   inference
    XLA default                     8.7            1.26
    individual_dot                  4.9            0.83
    individual_dot,reduce           3.2            1.09
    individual_dot,eltwise,reduce   3.0            1.02

so training uses dot + eltwise + reduce and inference dot only. The options are fields that
only the CPU compiler reads; other backends ignore them. Set the environment variable
`ASD_JAX_XLA_CPU_DEFAULTS=1` (before importing asd_jax) to compile with XLA's defaults
instead, e.g. to compare (`benchmarks/bench_model.py --xla_defaults`).
"""

from __future__ import annotations

import os
from typing import Any

_FUSION_OPTION = "xla_cpu_experimental_ynn_fusion_type"


def _fusion(*kinds: str) -> dict[str, Any]:
    return {_FUSION_OPTION: ",".join(f"LIBRARY_FUSION_TYPE_{k.upper()}" for k in kinds)}


def train_options() -> dict[str, Any] | None:
    """`compiler_options` for jitted train and evaluation steps (None: XLA's defaults)."""
    return None if _defaults_requested() else _fusion("individual_dot", "eltwise", "reduce")


def inference_options() -> dict[str, Any] | None:
    """`compiler_options` for jitted inference (features + CRNN) (None: XLA's defaults)."""
    return None if _defaults_requested() else _fusion("individual_dot")


def _defaults_requested() -> bool:
    return os.environ.get("ASD_JAX_XLA_CPU_DEFAULTS", "0") not in ("", "0")
