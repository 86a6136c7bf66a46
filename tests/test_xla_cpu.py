"""The CPU compiler options reach XLA, keep results and can be switched off."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asd_jax import xla_cpu


def _conv_weight_grad(x, w):
    def loss(w):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(jnp.mean(jnp.square(y), axis=(0, 1, 2)))
    return jax.grad(loss)(w)


def _conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _convolutions(compiled_text: str) -> tuple[int, int]:
    """(all convolutions, those run by XLA itself: in the entry computation, not in a fusion)."""
    entry = compiled_text[compiled_text.index("\nENTRY"):]
    return compiled_text.count(" convolution("), entry.count(" convolution(")


def test_options_reach_the_compiler_and_keep_the_numbers(monkeypatch):
    monkeypatch.delenv("ASD_JAX_XLA_CPU_DEFAULTS", raising=False)
    if jax.default_backend() == "cpu":
        # By default XLA:CPU hands a convolution of this size to YNNPACK (inside a fusion); the
        # options keep it in XLA's own convolution, about twice as fast for these layers.
        x = jax.ShapeDtypeStruct((1, 64, 32, 32), jnp.float32)
        w = jax.ShapeDtypeStruct((3, 3, 32, 32), jnp.float32)
        assert _convolutions(jax.jit(_conv).lower(x, w).compile().as_text()) == (1, 0)
        for options in (xla_cpu.train_options(), xla_cpu.inference_options()):
            text = jax.jit(_conv, compiler_options=options).lower(x, w).compile().as_text()
            assert _convolutions(text) == (1, 1)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 32, 16, 8)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 8, 8)), jnp.float32)
    default = jax.jit(_conv_weight_grad)
    tuned = jax.jit(_conv_weight_grad, compiler_options=xla_cpu.train_options())
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


def test_train_options_leave_backward_convolutions_to_xla(monkeypatch):
    """No convolution of a conv -> pool -> conv -> batch norm gradient runs inside a YNNPACK fusion.

    With YNNPACK's element-wise fusion type as well, the input gradient of the second
    convolution was fused with the pooling gradient into a YNNPACK fusion, at half the speed.
    """
    monkeypatch.delenv("ASD_JAX_XLA_CPU_DEFAULTS", raising=False)
    if jax.default_backend() != "cpu":
        pytest.skip("a property of XLA:CPU's compiled code (the default backend is not the CPU)")
    from asd_jax.model import avg_pool_2x2, batch_norm_train

    def loss(ws, x):
        y = _conv(avg_pool_2x2(jnp.maximum(_conv(x, ws[0]), 0.0)), ws[1])
        y, _, _ = batch_norm_train(y, jnp.ones(y.shape[-1]), jnp.zeros(y.shape[-1]), relu=True)
        return jnp.sum(jnp.square(y))

    ws = [jax.ShapeDtypeStruct((3, 3, 16, 32), jnp.float32),
          jax.ShapeDtypeStruct((3, 3, 32, 32), jnp.float32)]
    x = jax.ShapeDtypeStruct((4, 128, 64, 16), jnp.float32)
    text = jax.jit(jax.grad(loss), compiler_options=xla_cpu.train_options()).lower(
        ws, x).compile().as_text()
    total, by_xla = _convolutions(text)
    assert total == by_xla >= 4


def test_reductions_go_to_ynnpack_in_training_only(monkeypatch):
    """The documented split: matrix products go to YNNPACK with both option sets, reductions (batch
    norm's channel sums) only with the training ones; inference leaves them to XLA's loops."""
    monkeypatch.delenv("ASD_JAX_XLA_CPU_DEFAULTS", raising=False)
    if jax.default_backend() != "cpu":
        pytest.skip("a property of XLA:CPU's compiled code (the default backend is not the CPU)")
    x = jax.ShapeDtypeStruct((8, 128, 64, 16), jnp.float32)
    w = jax.ShapeDtypeStruct((256, 256), jnp.float32)

    def in_ynnpack(fn, arg, options):
        return "__ynn_fusion" in jax.jit(fn, compiler_options=options).lower(arg).compile().as_text()

    channel_sums = lambda a: jnp.sum(a, axis=(0, 1, 2))  # noqa: E731
    product = lambda a: a @ a  # noqa: E731
    assert in_ynnpack(channel_sums, x, xla_cpu.train_options())
    assert not in_ynnpack(channel_sums, x, xla_cpu.inference_options())
    assert in_ynnpack(product, w, xla_cpu.train_options())
    assert in_ynnpack(product, w, xla_cpu.inference_options())


def test_model_initialisation_compiles_at_level_1_with_the_default_compile_values(monkeypatch):
    """`init_variables` (LLVM level 1 on the CPU) gives bit-for-bit the variables that the same
    program compiled with XLA's default options gives: the demo's and the tests' starting weights
    do not depend on the faster compile."""
    monkeypatch.delenv("ASD_JAX_XLA_CPU_DEFAULTS", raising=False)
    assert xla_cpu.init_options("cpu") == {"xla_backend_optimization_level": 1}
    assert xla_cpu.init_options("gpu") is None and xla_cpu.init_options("tpu") is None
    monkeypatch.setenv("ASD_JAX_XLA_CPU_DEFAULTS", "1")
    assert xla_cpu.init_options("cpu") is None
    monkeypatch.delenv("ASD_JAX_XLA_CPU_DEFAULTS")
    from asd_jax.model import CRNN, init_variables, input_shapes
    from asd_jax.training.configs import TINY_MODEL

    model = CRNN(**TINY_MODEL)
    features, cams = (jnp.zeros(shape, jnp.float32) for shape in input_shapes(16, 1))
    fast = init_variables(jax.random.key(42), model, 16)
    default = jax.jit(lambda rng: model.init(rng, features, cams, train=False))(jax.random.key(42))
    assert jax.tree.structure(fast) == jax.tree.structure(default)
    for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(default)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
