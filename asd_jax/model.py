"""The audio CRNN of the reference (SPEC section 6), as a Flax linen module.

Layout is channels-last throughout: features (B, 960, 64, C) -> four conv blocks ->
(B, 60, 4, 512) -> reduction over frequency -> (B, 60, 512) -> 2-layer bidirectional GRU ->
fc1 (32) -> concat camera one-hot -> fc2 (2) -> sigmoid.

Two modules are written here rather than taken from Flax, because PyTorch parity needs them:

- `BatchNorm`: PyTorch updates the running variance with the *unbiased* batch variance
  (n / (n - 1)) while normalising with the biased one; `flax.linen.BatchNorm` uses the biased
  variance for both. Batch statistics are means over every axis but the last, so inside `jit`
  over a batch-sharded array they are global-batch statistics. In training mode it runs
  `batch_norm_train`: statistics of bfloat16 activations in one pass (sums about the running
  mean), and a gradient (with the following ReLU) hand-written to read the activation twice and
  keep nothing but it and the channel statistics.
- `BidirectionalGRU`: one `jax.lax.scan` over the frames runs both directions at once, with
  the input projections of all frames computed before the scan. Gates follow PyTorch's
  (reset, update, new) order. Like `flax.linen.GRUCell`, the reset and update gates have one
  bias each (PyTorch's b_ir + b_hr and b_iz + b_hz), and b_hn stays inside r * (W_hn h + b_hn),
  so the Flax model has 2,048 parameters fewer than the PyTorch one (7,074,680 vs 7,076,728)
  and computes the same function. Its recurrence (`gru_recurrence`) has a hand-written
  backpropagation through time that keeps the weight gradients out of the per-step loop.

Four gradients are hand-written (`jax.custom_vjp`), each tested against PyTorch's autograd
(tests/test_model.py): batch norm + ReLU and the GRU recurrence (above), the 2x2 average pooling
(`avg_pool_2x2`, a broadcast) and the 3x3 convolution (`conv3x3`, whose gradient differs from
autodiff's only on the CPU; below). The first three and a partly unrolled scan took the bfloat16
train step at batch 32 on one H200 from 13.1 ms to 9.6 ms (waited for each step); the one-pass
statistics took it from 8.72 to 8.52 ms in steady state.

On the CPU the train step is bound by memory traffic outside the convolutions, and three choices
here are made for XLA:CPU (batch norm and the weight gradient through `xla_cpu.on_cpu`, so
other platforms keep their previous formulas; the pooling form is the same everywhere). They
took the float32 step at batch 32 on 2 cores from 14.3 to 10.0-10.6 s (temporary memory 5.3 ->
2.5 GB, page faults per step 1.5 M -> 0.6 M):
- batch-norm statistics of float32 activations as plain sums of x and x^2, and the gradient's
  sum of g * x_hat as rstd * (sum of g * x - mean * sum of g) (see `batch_norm_train`);
- pooling as the sum of four strided views (`avg_pool_2x2`), not a reduction;
- the weight gradient of every convolution but the first with the output gradient as the image
  and the input as the window (`conv3x3`), so that XLA transposes arrays already in memory, and
  made after the output gradient, so that those copies do not live through the whole step.

Reference-parity quirk of training (not of the forward pass): PyTorch trains b_ir and b_hr as
two parameters that always receive the same gradient, so under Adam their sum moves twice as
far as one folded bias would. `gru_bias_update_scale` gives the per-parameter multipliers (2 on
the folded reset/update biases, 1 elsewhere) that make an optimizer step on the Flax parameters
equal to the reference's step; not applying it is the "fix" (one bias, one learning rate).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from asd_jax import constants
from asd_jax.xla_cpu import init_options, on_cpu

Array = jax.Array
PyTree = Any

POOLINGS = ("avg", "max")
# Frames per iteration of the GRU's scan (speed only). One layer's forward + backward at batch
# 32 in bfloat16 on an H100: 839, 803, 770, 786, 811 and 2250 us for 5, 10, 15, 20, 30 and 60
# (train step 8.96 -> 8.82 ms from 10 to 15); on the CPU it makes no measurable difference.
GRU_UNROLL = 15
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# --------------------------------------------------------------------------------------------
# Initialisers with PyTorch's default distributions (not its random stream).


def _torch_uniform(fan_in_axes: Sequence[int]) -> Callable:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = product of `fan_in_axes` of the shape.

    This is PyTorch's default for Conv2d/Linear weights (kaiming_uniform with a=sqrt(5)).
    """

    def init(key, shape, dtype=jnp.float32):
        fan_in = math.prod(shape[a] for a in fan_in_axes)
        bound = 1.0 / math.sqrt(fan_in)
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _uniform(bound: float, n_terms: int = 1) -> Callable:
    """Sum of `n_terms` independent U(-bound, bound) draws (a folded pair of PyTorch biases)."""

    def init(key, shape, dtype=jnp.float32):
        draws = jax.random.uniform(key, (n_terms, *shape), dtype, -bound, bound)
        return draws.sum(axis=0)

    return init


def _gru_bias_init(hidden: int) -> Callable:
    """(2, 3H): r and z blocks are b_i + b_h (two PyTorch draws), the n block is b_in."""
    bound = 1.0 / math.sqrt(hidden)

    def init(key, shape, dtype=jnp.float32):
        k_rz, k_n = jax.random.split(key)
        rz = _uniform(bound, 2)(k_rz, (shape[0], 2 * hidden), dtype)
        n = _uniform(bound)(k_n, (shape[0], hidden), dtype)
        return jnp.concatenate([rz, n], axis=-1)

    return init


# --------------------------------------------------------------------------------------------
# Layers.


def batch_norm_train(x: Array, scale: Array, bias: Array, epsilon: float = 1e-5,
                     relu: bool = False, shift: Array | None = None) -> tuple[Array, Array, Array]:
    """Training-mode batch normalisation over the last axis, optionally followed by ReLU.

    Args:
      x: (..., C) any float dtype; statistics are computed in float32 over all other axes.
      scale, bias: (C,) float32.
      epsilon: added to the variance.
      relu: apply max(., 0) to the normalised output.
      shift: (C,) float32, a value near each channel's mean (`BatchNorm` passes its running
        mean); None takes x's first position. It only conditions the one-pass statistics of a
        sub-float32 x (see below): the result is the same up to float32 rounding, and no
        gradient flows to it.

    Returns:
      (y, mean, var): y (..., C) in x's dtype; the batch mean and *biased* variance (C,)
      float32 (the variance that normalises).

    Statistics of a bfloat16 x take one pass: the sums of d = x - shift and of d^2, which the
    compiler fuses into one reduction (a mean and then a variance about it reads x twice). With
    the shift near the mean, E[d^2] - E[d]^2 rounds at ~1e-7 relative, far below bfloat16's own
    resolution. A float32 x keeps the two passes (mean, then the variance about it), whose
    rounding does not depend on how far the mean is from the shift, except on the CPU: there
    XLA gives these reductions to YNNPACK, whose fused reductions take no per-channel operand,
    so x - mean (or x - shift) would be written out in full (503 MB per block-1 activation at
    batch 32) and read back. The CPU computes E[x^2] - E[x]^2 instead, reading x twice and
    writing nothing; its relative error is ~1e-7 * (1 + mean^2 / var), ~1e-6 for conv outputs
    whose mean lies within a few standard deviations of zero (tested at mean = 3 std).

    The gradient is hand-written (`_batch_norm_train_bwd`): it keeps only x (in its own dtype)
    and the (C,) statistics from the forward pass and recomputes the normalised values and the
    ReLU mask, so the backward pass reads the activation twice (one pass for the two channel
    sums, one for dx) instead of also writing and reading float32 intermediates. The sum of
    g * x_hat is taken as rstd * (sum of g * x - mean * sum of g) on the CPU, for the reason
    above (x_hat would be written out in full).
    """
    if x.ndim < 2:
        raise ValueError(f"batch_norm_train: x of shape {x.shape} needs at least one axis to "
                         "take statistics over and a channel axis, (..., C)")
    chex.assert_shape([scale, bias], (x.shape[-1],))
    if shift is None:
        shift = x[(0,) * (x.ndim - 1)].astype(jnp.float32)
    chex.assert_shape(shift, (x.shape[-1],))
    return _batch_norm_train(x, scale, bias, jax.lax.stop_gradient(shift), epsilon, relu)


def _channel_moments(x: Array, shift: Array) -> tuple[Array, Array]:
    """Mean and biased variance (float32) of x (..., C) over all but the last axis.

    One pass about `shift` for x narrower than float32; for float32 and wider, two passes, or on
    the CPU one pass without a shift (see `batch_norm_train`).
    """
    axes = tuple(range(x.ndim - 1))
    if jnp.finfo(x.dtype).bits >= 32:
        return on_cpu(functools.partial(_moments_of_sums, axes=axes),
                       functools.partial(_moments_two_pass, axes=axes), x.astype(jnp.float32))
    d = x.astype(jnp.float32) - shift
    mean_d = jnp.mean(d, axis=axes)
    var = jnp.maximum(jnp.mean(jnp.square(d), axis=axes) - jnp.square(mean_d), 0.0)
    return shift + mean_d, var


def _moments_two_pass(x: Array, axes: tuple[int, ...]) -> tuple[Array, Array]:
    mean = jnp.mean(x, axis=axes)
    return mean, jnp.mean(jnp.square(x - mean), axis=axes)


def _moments_of_sums(x: Array, axes: tuple[int, ...]) -> tuple[Array, Array]:
    mean = jnp.mean(x, axis=axes)
    return mean, jnp.maximum(jnp.mean(jnp.square(x), axis=axes) - jnp.square(mean), 0.0)


def _normalise(centred: Array, rstd: Array, scale: Array, bias: Array) -> Array:
    """The affine batch-norm output before any ReLU (float32); the one expression for the
    forward pass in both modes and for the ReLU mask of the gradient (so it is bit-identical)."""
    return centred * (scale * rstd) + bias


def _batch_norm_forward(x, scale, bias, shift, epsilon, relu):
    mean, var = _channel_moments(x, shift)
    y = _normalise(x.astype(jnp.float32) - mean, jax.lax.rsqrt(var + epsilon), scale, bias)
    if relu:
        y = jnp.maximum(y, 0.0)
    return y.astype(x.dtype), mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _batch_norm_train(x, scale, bias, shift, epsilon, relu):
    return _batch_norm_forward(x, scale, bias, shift, epsilon, relu)


def _batch_norm_train_fwd(x, scale, bias, shift, epsilon, relu):
    y, mean, var = _batch_norm_forward(x, scale, bias, shift, epsilon, relu)
    return (y, mean, var), (x, mean, var, scale, bias)


def _batch_norm_train_bwd(epsilon, relu, residuals, cotangents):
    x, mean, var, scale, bias = residuals
    d_y, d_mean, d_var = cotangents
    axes = tuple(range(x.ndim - 1))
    n = math.prod(x.shape[a] for a in axes)
    rstd = jax.lax.rsqrt(var + epsilon)
    centred = x.astype(jnp.float32) - mean
    x_hat = centred * rstd
    g = d_y.astype(jnp.float32)
    if relu:  # the forward's own expression, so the mask is bit-identical
        g = jnp.where(_normalise(centred, rstd, scale, bias) > 0.0, g, 0.0)
    d_bias = jnp.sum(g, axis=axes)
    d_scale = on_cpu(lambda g, x: (jnp.sum(g * x, axis=axes) - mean * d_bias) * rstd,
                      lambda g, x: jnp.sum(g * x_hat, axis=axes), g, x.astype(jnp.float32))
    d_x = ((scale * rstd) * (g - d_bias / n - x_hat * (d_scale / n))
           + d_mean / n + centred * (2.0 * d_var / n))
    # mean and var do not depend on the shift ((C,), like mean; it only conditions rounding).
    return d_x.astype(x.dtype), d_scale, d_bias, jnp.zeros_like(mean)


_batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


class BatchNorm(nn.Module):
    """Batch normalisation over the last axis with PyTorch's semantics.

    Attributes:
      momentum: PyTorch convention: running = (1 - momentum) * running + momentum * batch
        (Flax's decay 0.9 = PyTorch momentum 0.1).
      epsilon: added to the variance.
      dtype: dtype of the output; statistics are always computed in float32.
      relu: follow the normalisation with ReLU (fused into the same pass and gradient).

    Variables: params `scale`, `bias` (C,) float32; batch_stats `mean`, `var` (C,) float32.
    With `train=True`, the running variance is updated with the unbiased batch variance
    (PyTorch), normalisation uses the biased one, and the running stats are left untouched
    during `init`.
    """

    momentum: float = 0.1
    epsilon: float = 1e-5
    dtype: Any = jnp.float32
    relu: bool = False

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        """x: (..., C) -> (..., C) in `dtype`."""
        n_features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (n_features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (n_features,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (n_features,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (n_features,), jnp.float32)
        # Flax checks the params' shapes against x, not those of other collections: a (1,)
        # running mean would broadcast silently.
        chex.assert_shape([ra_mean.value, ra_var.value], (n_features,))
        x = x.astype(self.dtype)

        if train:
            y, mean, var = batch_norm_train(x, scale, bias, self.epsilon, self.relu,
                                            shift=ra_mean.value)
            if not self.is_initializing():
                n = x.size // n_features
                if n < 2:
                    raise ValueError(f"BatchNorm in training mode needs more than 1 value per "
                                     f"channel, got input shape {x.shape}")
                unbiased = var * (n / (n - 1))
                ra_mean.value = (1.0 - self.momentum) * ra_mean.value + self.momentum * mean
                ra_var.value = (1.0 - self.momentum) * ra_var.value + self.momentum * unbiased
            return y

        y = _normalise(x.astype(jnp.float32) - ra_mean.value,
                       jax.lax.rsqrt(ra_var.value + self.epsilon), scale, bias)
        if self.relu:
            y = jnp.maximum(y, 0.0)
        return y.astype(self.dtype)


def conv3x3(x: Array, kernel: Array, input_needs_gradient: bool = True) -> Array:
    """3x3 convolution, stride 1, zero padding 1, channels-last: (B, T, F, I) -> (B, T, F, O).

    Args:
      x: (B, T, F, I); kernel: (3, 3, I, O) (HWIO), same dtype as x.
      input_needs_gradient: False for a layer whose input is the data (the network's first):
        only a hint for the CPU's weight gradient (below); gradients are correct either way.

    Returns (B, T, F, O) in x's dtype: `jax.lax.conv_general_dilated` itself. Only the gradient
    differs from autodiff's, and only on the CPU. XLA:CPU computes a weight gradient as a
    convolution of x laid out (I, T, F, B) with the output gradient laid out (T, F, B, O); when
    x is the fused output of batch norm or pooling, that (I, T, F, B) copy recomputes them
    element by element in an order that rereads each cache line ~16 times (1.0 s for one
    503 MB block-1 activation at batch 32). Written the other way round (the output gradient,
    padded, as the image and x as the window: kernel[kh, kw] = sum over b, t, f of
    dy_pad[b, t + 2 - kh, f + 2 - kw] x[b, t, f]), the (O, T, F, B) copy is made of the output
    gradient, which is in memory anyway when it also feeds the input gradient, and XLA's own
    transpose of an array in memory is fast (0.26 s), while x's (T, F, B, I) copy keeps its
    channels contiguous. The first layer has no input gradient, so it keeps autodiff's form.
    """
    chex.assert_rank([x, kernel], 4)
    chex.assert_shape(kernel, (3, 3, x.shape[-1], None))
    return _conv3x3(x, kernel, input_needs_gradient)


def _conv_same(x: Array, kernel: Array) -> Array:
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _kernel_gradient_autodiff(x: Array, d_y: Array, kernel: Array) -> Array:
    return jax.vjp(lambda k: _conv_same(x, k), kernel)[1](d_y)[0]


def _kernel_gradient_from_output_side(x: Array, d_y: Array, kernel: Array) -> Array:
    # Image d_y (batch axis: its channels O, contracted feature axis: B), window x (input
    # feature axis: B, output feature axis: its channels I); out[kh', kw', I, O] for kh' = 2 - kh.
    dims = jax.lax.ConvDimensionNumbers(lhs_spec=(3, 0, 1, 2), rhs_spec=(3, 0, 1, 2),
                                        out_spec=(3, 2, 0, 1))
    flipped = jax.lax.conv_general_dilated(d_y, x, (1, 1), ((1, 1), (1, 1)),
                                           dimension_numbers=dims)
    return jnp.flip(flipped, axis=(0, 1)).astype(kernel.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv3x3(x, kernel, input_needs_gradient):
    return _conv_same(x, kernel)


def _conv3x3_fwd(x, kernel, input_needs_gradient):
    return _conv_same(x, kernel), (x, kernel)


def _after_output_gradient(kernel_gradient: Callable) -> Callable:
    """`kernel_gradient(x, d_y, kernel)` with x's transposed copy made in the backward pass.

    XLA:CPU otherwise schedules the copy of x that the weight-gradient convolution reads right
    after x is computed in the forward pass, and keeps it (next to x's producer, which batch
    norm's gradient keeps anyway) until the backward pass: 0.84 GB of the 3.36 GB of temporary
    memory at batch 32. Adding 0 * d_y[0] (d_y's first element, d_y[0, 0, 0, 0]) to x makes the
    copy depend on the output gradient, so it is made when needed and its memory reused
    (temporary memory 2.52 GB, ~0.2 M fewer page faults, ~0.5 s less per step).
    `jax.lax.optimization_barrier` does not order it on the CPU. The sum is x itself for finite
    d_y[0]. A non-finite d_y[0] makes 0 * d_y[0], hence all of x, NaN, so every entry of the
    kernel gradient is NaN; plain autodiff's is non-finite only in the entries of d_y[0]'s
    output channel (kernel[..., 0]).
    """
    def ordered(x, d_y, kernel):
        x = x + 0.0 * d_y[(0,) * d_y.ndim].astype(x.dtype)
        return kernel_gradient(x, d_y, kernel)
    return ordered


def _conv3x3_bwd(input_needs_gradient, residuals, d_y):
    x, kernel = residuals
    d_x = jax.vjp(lambda x_: _conv_same(x_, kernel), x)[1](d_y)[0]
    cpu_form = (_kernel_gradient_from_output_side if input_needs_gradient
                else _kernel_gradient_autodiff)
    d_kernel = on_cpu(_after_output_gradient(cpu_form), _kernel_gradient_autodiff,
                       x, d_y, kernel)
    return d_x, d_kernel


_conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)


class Conv3x3(nn.Module):
    """`conv3x3` with a float32 parameter `kernel` (3, 3, C_in, features), no bias.

    Same parameter name, layout and initial values as `flax.linen.Conv(features, (3, 3),
    padding=1, use_bias=False)` with PyTorch's default initialiser, so checkpoints are the same.
    x: (B, T, F, C_in) -> (B, T, F, features) in `dtype`.
    """

    features: int
    dtype: Any = jnp.float32
    input_needs_gradient: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", _torch_uniform((0, 1, 2)),
                            (3, 3, x.shape[-1], self.features), jnp.float32)
        return conv3x3(x.astype(self.dtype), kernel.astype(self.dtype),
                       self.input_needs_gradient)


class ConvBlock(nn.Module):
    """(conv 3x3 no bias -> BatchNorm -> ReLU) x 2 -> 2x2 average pooling.

    x: (B, T, F, C_in) -> (B, T/2, F/2, features). `first`: the block's input is the data (no
    gradient flows to it; see `conv3x3`).
    """

    features: int
    dtype: Any = jnp.float32
    first: bool = False

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        for i in (1, 2):
            x = Conv3x3(self.features, dtype=self.dtype,
                        input_needs_gradient=not (self.first and i == 1), name=f"conv{i}")(x)
            x = BatchNorm(dtype=self.dtype, relu=True, name=f"bn{i}")(x, train)
        return avg_pool_2x2(x)


def avg_pool_2x2(x: Array) -> Array:
    """Non-overlapping 2x2 average pooling over axes 1 and 2: (B, T, F, C) -> (B, T/2, F/2, C).

    The forward pass is the sum of four strided views (element-wise, so the compiler fuses it
    with the batch norm that produces x; as a reduction, XLA:CPU gave it to YNNPACK, which
    wrote x and constant arrays of x's size out first: 0.9 s per step at batch 32). The
    gradient is a broadcast, which fuses into the batch-norm gradient that consumes it (the
    transpose of strided slices would be padded arrays; of `nn.avg_pool`'s reduce_window, a
    padded reduce_window materialised on its own). Sums in float32.
    """
    b, t, f, c = x.shape
    chex.assert_is_divisible(t, 2)
    chex.assert_is_divisible(f, 2)
    return _avg_pool_2x2(x)


@jax.custom_vjp
def _avg_pool_2x2(x):
    b, t, f, c = x.shape
    q = x.astype(jnp.float32).reshape(b, t // 2, 2, f // 2, 2, c)
    total = q[:, :, 0, :, 0] + q[:, :, 0, :, 1] + q[:, :, 1, :, 0] + q[:, :, 1, :, 1]
    return (total * 0.25).astype(x.dtype)


def _avg_pool_2x2_fwd(x):
    return _avg_pool_2x2(x), None


def _avg_pool_2x2_bwd(_, d_y):
    b, t, f, c = d_y.shape
    d_x = jnp.broadcast_to((d_y.astype(jnp.float32) * 0.25)[:, :, None, :, None, :],
                           (b, t, 2, f, 2, c))
    return (d_x.reshape(b, 2 * t, 2 * f, c).astype(d_y.dtype),)


_avg_pool_2x2.defvjp(_avg_pool_2x2_fwd, _avg_pool_2x2_bwd)


def einsum_f32(spec: str, a: Array, b: Array) -> Array:
    """`jnp.einsum(spec, a, b)` of operands in their own dtype, summed and returned in float32.

    On accelerators: bfloat16 operands with float32 accumulation and output
    (`preferred_element_type`). XLA:CPU has no bfloat16 x bfloat16 -> float32 product for some
    layouts (it fails at run time), so there the operands are widened first, which computes the
    same: bfloat16 values and their pairwise products are exact in float32.
    """
    if a.dtype == jnp.float32 and b.dtype == jnp.float32:
        return jnp.einsum(spec, a, b)
    return on_cpu(lambda a, b: jnp.einsum(spec, a.astype(jnp.float32), b.astype(jnp.float32)),
                  lambda a, b: jnp.einsum(spec, a, b, preferred_element_type=jnp.float32), a, b)


def gru_recurrence(x_proj: Array, w_h: Array, b_hn: Array, dtype: Any = jnp.float32,
                   unroll: int = GRU_UNROLL) -> Array:
    """The GRU recurrence over precomputed input projections, both directions at once.

    Args:
      x_proj: (T, 2, B, 3H) float32, W_i x + [b_ir + b_hr, b_iz + b_hz, b_in] per frame and
        direction (the reverse direction already time-flipped).
      w_h: (2, H, 3H) float32 hidden kernels; b_hn: (2, H) float32.
      dtype: dtype of the hidden-state matmul's operands (float32 or bfloat16); it sums in
        float32, and the gates are float32.
      unroll: steps per iteration of the scan (a performance knob; the result is the same).

    Returns:
      (T, 2, B, H) float32 hidden states, zero initial state.

    The gradient is hand-written (`_gru_recurrence_bwd`): the reverse scan does one matmul and
    one elementwise pass per step, and the hidden kernel's and b_hn's gradients are one matmul
    and one sum over all frames after it, instead of a small accumulation inside every step.
    """
    chex.assert_rank([x_proj, w_h, b_hn], [4, 3, 2])
    h = w_h.shape[1]
    chex.assert_shape(w_h, (2, h, 3 * h))
    chex.assert_shape(b_hn, (2, h))
    chex.assert_shape(x_proj, (None, 2, None, 3 * h))
    return _gru_recurrence(x_proj, w_h, b_hn, dtype, unroll)


def _gru_forward(x_proj, w_h, b_hn, dtype, unroll, keep_gates):
    """Scan of the GRU cell: hidden states (and with `keep_gates` the gates the gradient needs)."""
    h = w_h.shape[1]
    w_h_c = w_h.astype(dtype)

    def step(carry, xp):
        # carry: (2, B, H) float32; xp: (2, B, 3H) float32.
        hp = einsum_f32("ebh,ehk->ebk", carry.astype(dtype), w_h_c)
        hn = hp[..., 2 * h:] + b_hn[:, None, :]
        r = jax.nn.sigmoid(xp[..., :h] + hp[..., :h])
        z = jax.nn.sigmoid(xp[..., h:2 * h] + hp[..., h:2 * h])
        n = jnp.tanh(xp[..., 2 * h:] + r * hn)
        new = (1.0 - z) * n + z * carry
        return new, ((new, r, z, n, hn) if keep_gates else new)

    carry0 = jnp.zeros(x_proj.shape[1:3] + (h,), jnp.float32)
    _, stacked = jax.lax.scan(step, carry0, x_proj, unroll=unroll)
    return stacked


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gru_recurrence(x_proj, w_h, b_hn, dtype, unroll):
    return _gru_forward(x_proj, w_h, b_hn, dtype, unroll, keep_gates=False)


def _gru_recurrence_fwd(x_proj, w_h, b_hn, dtype, unroll):
    hs, *gates = _gru_forward(x_proj, w_h, b_hn, dtype, unroll, keep_gates=True)
    return hs, (hs, gates, w_h)


def _gru_recurrence_bwd(dtype, unroll, residuals, d_hs):
    """Backpropagation through time: h' = (1 - z) n + z h, n = tanh(x_n + r (W_hn h + b_hn))."""
    hs, (r, z, n, hn), w_h = residuals
    w_h_c = w_h.astype(dtype)
    h_prev = jnp.concatenate([jnp.zeros_like(hs[:1]), hs[:-1]], axis=0)

    def step(d_carry, inputs):
        d_out, h_p, r_t, z_t, n_t, hn_t = inputs
        d_h = d_out + d_carry
        d_n = d_h * (1.0 - z_t) * (1.0 - n_t * n_t)  # through tanh
        d_z = d_h * (h_p - n_t) * z_t * (1.0 - z_t)  # through sigmoid
        d_r = d_n * hn_t * r_t * (1.0 - r_t)
        d_hp = jnp.concatenate([d_r, d_z, d_n * r_t], axis=-1)  # wrt W_h h (+ b_hn)
        d_xp = jnp.concatenate([d_r, d_z, d_n], axis=-1)  # wrt the input projections
        d_prev = d_h * z_t + einsum_f32("ebk,ehk->ebh", d_hp.astype(dtype), w_h_c)
        return d_prev, (d_xp, d_hp)

    d_carry0 = jnp.zeros_like(hs[0])
    _, (d_xp, d_hp) = jax.lax.scan(step, d_carry0, (d_hs, h_prev, r, z, n, hn), reverse=True,
                                   unroll=unroll)
    d_w_h = einsum_f32("tebh,tebk->ehk", h_prev.astype(dtype), d_hp.astype(dtype))
    h = w_h.shape[1]
    d_b_hn = jnp.sum(d_hp[..., 2 * h:], axis=(0, 2))
    return d_xp, d_w_h, d_b_hn


_gru_recurrence.defvjp(_gru_recurrence_fwd, _gru_recurrence_bwd)


class BidirectionalGRU(nn.Module):
    """One bidirectional GRU layer in PyTorch's gate layout, both directions in one scan.

    Params (direction axis first: 0 forward, 1 reverse; gate blocks ordered reset, update,
    new along the 3H axis):
      input_kernel (2, D, 3H)   = PyTorch weight_ih.T
      hidden_kernel (2, H, 3H)  = PyTorch weight_hh.T
      bias (2, 3H)              = [b_ir + b_hr, b_iz + b_hz, b_in]
      hidden_bias_n (2, H)      = b_hn (inside r * (W_hn h + b_hn))

    x: (B, T, D) -> (B, T, 2H): [forward outputs, reverse outputs], the initial state is zero.

    `unroll` is the number of frames per iteration of the scan (the result does not depend on
    it): on a GPU each iteration is a few kernel launches (`GRU_UNROLL` has the timings). Each
    frame costs two ~2 us kernels (the hidden-state product and the gates). One Pallas (Triton)
    kernel per pass, its hidden state in registers and W_h re-read from the L2 cache at every
    frame, was slower on an H100: 0.82 ms forward and 1.84 ms backward per layer, against
    0.77 ms for both with the scan (at `GRU_UNROLL` = 15; batch 32, bfloat16).
    """

    hidden: int
    dtype: Any = jnp.float32
    unroll: int = GRU_UNROLL

    @nn.compact
    def __call__(self, x: Array) -> Array:
        chex.assert_rank(x, 3)  # (B, T, D)
        d_in = x.shape[-1]
        h = self.hidden
        bound = 1.0 / math.sqrt(h)
        w_i = self.param("input_kernel", _uniform(bound), (2, d_in, 3 * h), jnp.float32)
        w_h = self.param("hidden_kernel", _uniform(bound), (2, h, 3 * h), jnp.float32)
        bias = self.param("bias", _gru_bias_init(h), (2, 3 * h), jnp.float32)
        b_hn = self.param("hidden_bias_n", _uniform(bound), (2, h), jnp.float32)

        # Input projections of every frame, reverse direction time-flipped: (T, 2, B, 3H).
        x_dirs = jnp.stack([x, jnp.flip(x, axis=1)], axis=0).astype(self.dtype)  # (2, B, T, D)
        x_proj = einsum_f32("ebtd,edk->tebk", x_dirs, w_i.astype(self.dtype)) + bias[None, :, None, :]
        hs = gru_recurrence(x_proj, w_h, b_hn, self.dtype, self.unroll)  # (T, 2, B, H)
        forward = hs[:, 0]
        backward = jnp.flip(hs[:, 1], axis=0)
        out = jnp.concatenate([forward, backward], axis=-1)  # (T, B, 2H)
        return jnp.swapaxes(out, 0, 1).astype(self.dtype)


# --------------------------------------------------------------------------------------------
# The network.


class CRNN(nn.Module):
    """The reference's audio CRNN; defaults are the paper's network.

    Attributes:
      conv_features: output channels of the conv blocks (each halves time and frequency).
      gru_hidden: hidden size of each GRU direction.
      gru_layers: number of stacked bidirectional GRU layers.
      fc1_features: width of fc1 (no activation).
      num_cameras: length of the camera one-hot.
      pooling: reduction over the remaining frequency bins after the conv blocks, "avg"
        (reference) or "max".
      dtype: compute dtype (float32 or bfloat16); parameters and batch statistics are float32
        and the output is float32. With bfloat16, batch-norm statistics, the GRU's matmul sums
        and gates, and fc2 (the logits) stay float32.
      gru_unroll: frames per scan iteration in the GRU (speed only; not part of `model_config`).

    Variables: {"params", "batch_stats"}. The input channel count is taken from the input.
    """

    conv_features: Sequence[int] = (64, 128, 256, 512)
    gru_hidden: int = 256
    gru_layers: int = 2
    fc1_features: int = 32
    num_cameras: int = constants.N_CAMERAS_PER_RIG
    pooling: str = "avg"
    dtype: Any = jnp.float32
    gru_unroll: int = GRU_UNROLL

    def __post_init__(self):
        # A list would make the module unhashable, and every jit that takes the model as a
        # static argument (`init_variables`, `predict`, `forward`) would refuse it.
        object.__setattr__(self, "conv_features", tuple(int(c) for c in self.conv_features))
        super().__post_init__()

    @nn.compact
    def __call__(self, features: Array, cams: Array, train: bool) -> Array:
        """Forward pass.

        Args:
          features: (B, T, F, C) float32 normalised features, channels-last; T and F must be
            divisible by 2**len(conv_features) (paper: (B, 960, 64, 16)).
          cams: (B, num_cameras) camera one-hot (any float/int dtype), or (B, K, num_cameras)
            for K cameras per example: the camera only enters the last layer, so the audio
            path (convolutions, GRU, fc1) runs once per example and only fc2 runs K times.
          train: batch statistics (and updated `batch_stats`, pass mutable=["batch_stats"])
            if True, running statistics if False.

        Returns:
          (B, T / 2**len(conv_features), 2) float32 in [0, 1] ((B, K, T', 2) for K cameras):
          [..., 0] horizontal position (fraction of the image width), [..., 1] speech-activity
          confidence.
        """
        if self.pooling not in POOLINGS:
            raise ValueError(f"CRNN.pooling must be one of {POOLINGS}, got {self.pooling!r}")
        chex.assert_rank(features, 4)
        chex.assert_rank(cams, {2, 3})
        chex.assert_axis_dimension(cams, 0, features.shape[0])
        chex.assert_axis_dimension(cams, -1, self.num_cameras)
        factor = 2 ** len(self.conv_features)
        if features.shape[1] % factor or features.shape[2] % factor:
            raise ValueError(f"features {features.shape}: frames and bins must be divisible by "
                             f"{factor} (= 2**{len(self.conv_features)} conv blocks)")

        x = features.astype(self.dtype)
        for i, width in enumerate(self.conv_features, start=1):
            x = ConvBlock(width, dtype=self.dtype, first=i == 1, name=f"conv_block{i}")(x, train)
        # (B, T', F', C') -> (B, T', C')
        x = jnp.mean(x, axis=2) if self.pooling == "avg" else jnp.max(x, axis=2)
        for layer in range(self.gru_layers):
            x = BidirectionalGRU(self.gru_hidden, dtype=self.dtype, unroll=self.gru_unroll,
                                 name=f"gru_l{layer}")(x)
        x = _dense(self.fc1_features, x.shape[-1], self.dtype, "fc1")(x)  # (B, T', fc1)
        if cams.ndim == 3:  # (B, T', fc1) -> (B, K, T', fc1)
            x = jnp.broadcast_to(x[:, None], (x.shape[0], cams.shape[1], *x.shape[1:]))
        cams_t = jnp.broadcast_to(cams.astype(x.dtype)[..., None, :],
                                  (*x.shape[:-1], self.num_cameras))
        x = jnp.concatenate([x, cams_t], axis=-1)
        # fc2 (43 -> 2) in float32 in every compute dtype: its outputs are the logits, which
        # bfloat16 would resolve only to ~1/16 at |logit| ~ 4, quantising confidence and x.
        x = _dense(2, x.shape[-1], jnp.float32, "fc2")(x)
        return jax.nn.sigmoid(x)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "CRNN":
        """The inverse of `model_config`: a CRNN from a JSON-able dict (dtype as a string)."""
        if not isinstance(config, Mapping):
            raise ValueError(f"model config must be a dict, got {type(config).__name__}")
        fields = {f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name")}
        unknown = sorted(set(config) - fields)
        if unknown:
            raise ValueError(f"model config has unknown key(s) {unknown}; expected a subset of "
                             f"{sorted(fields)}")
        kwargs = dict(config)
        if "dtype" in kwargs:
            if kwargs["dtype"] not in _DTYPES:
                raise ValueError(f"model config dtype {kwargs['dtype']!r}: expected one of "
                                 f"{sorted(_DTYPES)}")
            kwargs["dtype"] = _DTYPES[kwargs["dtype"]]
        if "conv_features" in kwargs:
            widths = kwargs["conv_features"]
            if (not isinstance(widths, (list, tuple)) or not widths
                    or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in widths)):
                raise ValueError(f"model config conv_features must be a non-empty list of positive "
                                 f"ints, got {widths!r}")
            kwargs["conv_features"] = tuple(widths)
        if kwargs.get("pooling", "avg") not in POOLINGS:
            raise ValueError(f"model config pooling {kwargs['pooling']!r}: expected one of {POOLINGS}")
        for key in ("gru_hidden", "gru_layers", "fc1_features", "num_cameras"):
            if key in kwargs and (not isinstance(kwargs[key], int) or kwargs[key] < 1):
                raise ValueError(f"model config {key} must be a positive int, got {kwargs[key]!r}")
        return cls(**kwargs)


def _dense(features: int, fan_in: int, dtype: Any, name: str) -> nn.Dense:
    """nn.Dense with PyTorch Linear's default initialisation."""
    bound = 1.0 / math.sqrt(fan_in)
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name,
                    kernel_init=_torch_uniform((0,)), bias_init=_uniform(bound))


def model_config(model: CRNN) -> dict[str, Any]:
    """The CRNN's fields as a JSON-able dict (dtype as "float32"/"bfloat16")."""
    dtype_name = jnp.dtype(model.dtype).name
    if dtype_name not in _DTYPES:
        raise ValueError(f"CRNN dtype {dtype_name!r} has no config name; expected {sorted(_DTYPES)}")
    return {
        "conv_features": [int(c) for c in model.conv_features],
        "gru_hidden": int(model.gru_hidden),
        "gru_layers": int(model.gru_layers),
        "fc1_features": int(model.fc1_features),
        "num_cameras": int(model.num_cameras),
        "pooling": str(model.pooling),
        "dtype": dtype_name,
    }


def input_shapes(in_channels: int, batch: int = 1, num_cameras: int = constants.N_CAMERAS_PER_RIG,
                 ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of (features, cams) for a batch: ((B, 960, 64, C), (B, num_cameras))."""
    return ((batch, constants.N_FEATURE_FRAMES, constants.N_FEATURE_BINS, in_channels),
            (batch, num_cameras))


def init_variables(rng: Array, model: CRNN, in_channels: int, batch: int = 1) -> PyTree:
    """Fresh {"params", "batch_stats"} for inputs (batch, 960, 64, in_channels).

    Weights follow PyTorch's default initialisation distributions; BatchNorm starts at scale
    1, bias 0, running mean 0, running variance 1. Deterministic given `rng`. Compiled once
    per (model, in_channels, batch) with `asd_jax.xla_cpu.init_options` (a faster compile, the
    same values); inside another jitted function it is traced into that one.
    """
    if isinstance(rng, jax.core.Tracer):  # compiler options belong to the outermost jit only
        return _init(rng, model, in_channels, batch)
    return _init_program(jax.default_backend())(rng, model, in_channels, batch)


def _init(rng: Array, model: CRNN, in_channels: int, batch: int) -> PyTree:
    feat_shape, cam_shape = input_shapes(in_channels, batch, model.num_cameras)
    return model.init(rng, jnp.zeros(feat_shape, jnp.float32), jnp.zeros(cam_shape, jnp.float32),
                      train=False)


@functools.cache
def _init_program(platform: str) -> Callable[..., PyTree]:
    return jax.jit(_init, static_argnums=(1, 2, 3), compiler_options=init_options(platform))


def abstract_variables(model: CRNN, in_channels: int) -> PyTree:
    """The shapes/dtypes of `init_variables` (jax.ShapeDtypeStruct leaves), without computing."""
    feat_shape, cam_shape = input_shapes(in_channels, 1, model.num_cameras)
    return jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros(feat_shape, jnp.float32),
                           jnp.zeros(cam_shape, jnp.float32), train=False))


def gru_bias_update_scale(params: PyTree) -> PyTree:
    """Per-parameter update multipliers that make an optimizer step match the reference's (the
    training quirk of the module docstring).

    A pytree like `params` (float32): 2 on the reset and update blocks of every GRU `bias`, 1
    elsewhere. Multiply the optimizer's updates by it, as
    `asd_jax.training.state.create_optimizer(lr, update_scale=...)` does.
    """

    def scale(path, leaf):
        names = [getattr(k, "key", None) for k in path]
        shape = tuple(leaf.shape)  # arrays or jax.ShapeDtypeStruct
        if names[-1] == "bias" and any(str(n).startswith("gru_l") for n in names):
            hidden = shape[-1] // 3
            block = np.ones(shape, np.float32)
            block[..., : 2 * hidden] = 2.0
            return jnp.asarray(block)
        return jnp.ones(shape, jnp.float32)

    return jax.tree_util.tree_map_with_path(scale, params)


def count_params(params: PyTree) -> int:
    """Number of scalar parameters (the paper model: 7,074,680)."""
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(params)))
