"""The CPU compiler options reach XLA, keep results and can be switched off."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from asd_jax import xla_cpu


def _conv_weight_grad(x, w):
    def loss(w):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(jnp.mean(jnp.square(y), axis=(0, 1, 2)))
    return jax.grad(loss)(w)


def test_options_reach_the_compiler_and_keep_the_numbers(monkeypatch):
    monkeypatch.delenv("ASD_JAX_XLA_CPU_DEFAULTS", raising=False)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 32, 16, 8)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 8, 8)), jnp.float32)
    default = jax.jit(_conv_weight_grad)
    tuned = jax.jit(_conv_weight_grad, compiler_options=xla_cpu.train_options())
    if jax.default_backend() == "cpu":
        # The batch-norm-like reduction becomes a YNNPACK fusion only with the options.
        assert "__ynn_fusion" not in default.lower(x, w).compile().as_text()
        assert "__ynn_fusion" in tuned.lower(x, w).compile().as_text()
    np.testing.assert_allclose(tuned(x, w), default(x, w), rtol=1e-4, atol=1e-5)
    inference = jax.jit(_conv_weight_grad, compiler_options=xla_cpu.inference_options())
    np.testing.assert_allclose(inference(x, w), default(x, w), rtol=1e-4, atol=1e-5)


def test_environment_variable_restores_xla_defaults(monkeypatch):
    code = ("from asd_jax import xla_cpu; "
            "print(xla_cpu.train_options(), xla_cpu.inference_options())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "ASD_JAX_XLA_CPU_DEFAULTS": "1"}).stdout
    assert out.split() == ["None", "None"]
    monkeypatch.delenv("ASD_JAX_XLA_CPU_DEFAULTS", raising=False)
    assert "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT" in xla_cpu.inference_options()[
        "xla_cpu_experimental_ynn_fusion_type"]
