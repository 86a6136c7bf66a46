"""asd_jax.model against PyTorch (the reference's layers) and the SPEC."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import torch_reference as tr
from asd_jax import model as model_lib
from converters import torch_to_flax

SMALL = dict(conv_features=(8, 16), gru_hidden=8, gru_layers=2, fc1_features=4)


def _to_torch_layout(features):
    """(B, T, F, C) -> (B, C, T, F)."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(features).transpose(0, 3, 1, 2)))


# The model writes some computations differently for XLA:CPU (`xla_cpu.on_cpu(cpu, other,
# *args)`, chosen when lowering). "platform" runs the form of the platform the tests run on;
# "non-CPU" replaces `on_cpu` so that every platform, the CPU included, runs the other form (the
# one GPUs and TPUs run), so that both forms are checked numerically on any machine.
FORMS = ["platform", "non-CPU"]


def _use_forms(forms, monkeypatch):
    """For "non-CPU": make `model_lib.on_cpu` pick its non-CPU form; returns the list of the
    forms it ran (to check that the replacement was reached, not bypassed by a cache)."""
    ran = []
    if forms == "non-CPU":
        def other_platform(cpu, other, *args):
            del cpu
            ran.append(other)
            return other(*args)
        monkeypatch.setattr(model_lib, "on_cpu", other_platform)
    return ran


def test_batchnorm_matches_torch_train_and_eval():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, 5, 4, 6)) * 2 + 1).astype(np.float32)  # (B, T, F, C)
    bn_t = torch.nn.BatchNorm2d(6)
    with torch.no_grad():
        bn_t.weight.copy_(torch.linspace(0.5, 1.5, 6))
        bn_t.bias.copy_(torch.linspace(-0.2, 0.3, 6))
    bn = model_lib.BatchNorm()
    variables = bn.init(jax.random.key(0), x, train=True)
    np.testing.assert_array_equal(variables["batch_stats"]["var"], np.ones(6))  # init: untouched
    variables = {"params": {"scale": bn_t.weight.detach().numpy(), "bias": bn_t.bias.detach().numpy()},
                 "batch_stats": variables["batch_stats"]}

    y, updates = bn.apply(variables, x, train=True, mutable=["batch_stats"])
    bn_t.train()
    y_t = bn_t(_to_torch_layout(x)).detach().numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(y, y_t, atol=1e-5)
    # PyTorch: unbiased variance in the running estimate, biased one to normalise.
    np.testing.assert_allclose(updates["batch_stats"]["mean"], bn_t.running_mean.numpy(), rtol=1e-6)
    np.testing.assert_allclose(updates["batch_stats"]["var"], bn_t.running_var.numpy(), rtol=1e-6)

    bn_t.eval()
    y_eval = bn.apply({**variables, **updates}, x, train=False)
    y_eval_t = bn_t(_to_torch_layout(x)).detach().numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(y_eval, y_eval_t, atol=1e-5)


@pytest.mark.parametrize("forms", FORMS)
@pytest.mark.parametrize("relu", [False, True])
def test_batch_norm_train_gradient_matches_torch_autograd(relu, forms, monkeypatch):
    """The hand-written VJP of batch_norm_train against PyTorch's BatchNorm2d (+ ReLU) autograd,
    with the platform's forms of the statistics and of sum(g * x_hat), and with the non-CPU ones."""
    ran = _use_forms(forms, monkeypatch)
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((3, 5, 4, 6)) * 2 + 1).astype(np.float32)  # (B, T, F, C)
    scale = np.linspace(-1.0, 1.5, 6).astype(np.float32)
    bias = np.linspace(-0.5, 0.4, 6).astype(np.float32)
    cotangent = rng.standard_normal(x.shape).astype(np.float32)

    def loss(x_, scale_, bias_):
        y, _, _ = model_lib.batch_norm_train(x_, scale_, bias_, 1e-5, relu)
        return jnp.sum(y * cotangent)

    grads = jax.grad(loss, argnums=(0, 1, 2))(x, scale, bias)
    if forms == "non-CPU":  # the statistics (forward) and d_scale (backward)
        assert len(ran) == 2 and ran[0].func is model_lib._moments_two_pass, ran

    x_t = _to_torch_layout(x).requires_grad_(True)
    bn_t = torch.nn.BatchNorm2d(6).train()
    with torch.no_grad():
        bn_t.weight.copy_(torch.from_numpy(scale))
        bn_t.bias.copy_(torch.from_numpy(bias))
    y_t = bn_t(x_t)
    if relu:
        y_t = torch.relu(y_t)
    (y_t * _to_torch_layout(cotangent)).sum().backward()
    np.testing.assert_allclose(grads[0], x_t.grad.numpy().transpose(0, 2, 3, 1), atol=2e-5)
    np.testing.assert_allclose(grads[1], bn_t.weight.grad.numpy(), atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(grads[2], bn_t.bias.grad.numpy(), atol=2e-5, rtol=1e-5)


def test_batch_norm_train_gradient_of_the_statistics():
    """Cotangents on the returned mean and variance flow back to x (d mean/dx, d var/dx)."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 3, 2)).astype(np.float64).astype(np.float32)
    w_mean, w_var = rng.standard_normal(2).astype(np.float32), rng.standard_normal(2).astype(np.float32)

    def loss(x_):
        _, mean, var = model_lib.batch_norm_train(x_, jnp.ones(2), jnp.zeros(2))
        return jnp.sum(mean * w_mean) + jnp.sum(var * w_var)

    n = 12
    expected = w_mean / n + w_var * 2 * (x - x.mean(axis=(0, 1))) / n  # closed form
    np.testing.assert_allclose(jax.grad(loss)(x), expected, atol=1e-6)


@pytest.mark.parametrize("shift", [None, 99.5, 101.0])
def test_batch_norm_statistics_of_bfloat16_are_exact_far_from_zero(shift):
    """One-pass statistics about a shift: no cancellation for a mean 100x the spread.

    Without the shift, E[x^2] - E[x]^2 in float32 would be off by ~1e-3 relative here
    (E[x^2] ~ 1e4, float32 resolution ~1e-3 there, variance ~1).
    """
    rng = np.random.default_rng(7)
    x = jnp.asarray(100.0 + rng.standard_normal((64, 50, 3)), jnp.bfloat16)
    shift_ = None if shift is None else jnp.full((3,), shift, jnp.float32)
    _, mean, var = model_lib.batch_norm_train(x, jnp.ones(3), jnp.zeros(3), shift=shift_)
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    np.testing.assert_allclose(mean, x64.mean(axis=(0, 1)), rtol=1e-7)
    np.testing.assert_allclose(var, x64.var(axis=(0, 1)), rtol=1e-5)


def test_batch_norm_statistics_of_float32():
    """float32 activations: two passes off the CPU (exact whatever the mean), sums of x and x^2
    on the CPU (exact to 1e-5 for a mean 3x the spread; the shift plays no part in either)."""
    rng = np.random.default_rng(8)
    axes = (0, 1, 2)
    far = jnp.asarray((1000.0 + rng.standard_normal((16, 50, 40, 3))).astype(np.float32))
    near = jnp.asarray((3.0 + rng.standard_normal((16, 50, 40, 3))).astype(np.float32))
    for x, moments in ((far, model_lib._moments_two_pass), (near, model_lib._moments_of_sums)):
        x64 = np.asarray(x, np.float64)
        mean, var = jax.jit(moments, static_argnums=1)(x, axes)
        np.testing.assert_allclose(mean, x64.mean(axis=axes), rtol=1e-6)
        np.testing.assert_allclose(var, x64.var(axis=axes), rtol=1e-5)
    # The sums lose what the two passes keep (this is why the CPU form is limited to float32
    # activations of conv outputs, and why bfloat16 shifts):
    _, var = model_lib._moments_of_sums(far, axes)
    assert np.max(np.abs(var / np.asarray(far, np.float64).var(axis=axes) - 1)) > 1e-3
    # The layer uses the platform's form, whatever the shift:
    x64 = np.asarray(near, np.float64)
    for shift in (jnp.zeros(3), jnp.full((3,), 50.0)):
        _, mean, var = model_lib.batch_norm_train(near, jnp.ones(3), jnp.zeros(3), shift=shift)
        np.testing.assert_allclose(mean, x64.mean(axis=axes), rtol=1e-6)
        np.testing.assert_allclose(var, x64.var(axis=axes), rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_batch_norm_of_a_constant_channel_has_zero_variance(dtype):
    """A channel holding one value (a dead feature map) has variance 0. One-pass statistics
    E[x^2] - E[x]^2 round below zero there (float32: -0.02 for 123.456), which must not reach
    rsqrt(var + eps) as a negative number (NaN). (The output is the bias only up to the mean's
    rounding times 1 / sqrt(eps): 0.35 at 1000.1, in any formulation.)"""
    values = np.array([0.1, 37.3, 123.456, 1000.1], np.float32)
    x = jnp.broadcast_to(jnp.asarray(values, dtype), (4, 5, 6, 4))
    bias = np.linspace(-0.5, 0.5, 4).astype(np.float32)
    for shift in (None, jnp.zeros(4)):
        y, mean, var = model_lib.batch_norm_train(x, jnp.ones(4), jnp.asarray(bias), shift=shift)
        assert np.all(np.asarray(var) >= 0.0), var
        np.testing.assert_allclose(mean, np.asarray(x[0, 0, 0], np.float64), rtol=1e-5)
        assert np.all(np.isfinite(np.asarray(y.astype(jnp.float32))))


def test_batchnorm_training_needs_two_values_per_channel():
    """Like PyTorch's BatchNorm2d in training mode: one value per channel has no unbiased
    variance (n / (n - 1) = inf), so it is refused, naming the input shape."""
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        torch.nn.BatchNorm2d(3).train()(torch.ones(1, 3, 1, 1))
    bn = model_lib.BatchNorm()
    x = jnp.ones((1, 1, 1, 3))
    variables = bn.init(jax.random.key(0), x, train=True)
    with pytest.raises(ValueError, match=r"more than 1 value per channel, got input shape "
                                         r"\(1, 1, 1, 3\)"):
        bn.apply(variables, x, train=True, mutable=["batch_stats"])
    bn.apply(variables, x, train=False)  # running statistics: fine


def test_avg_pool_and_its_gradient_match_torch():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 6, 4, 3)).astype(np.float32)
    cotangent = rng.standard_normal((2, 3, 2, 3)).astype(np.float32)
    x_t = _to_torch_layout(x).requires_grad_(True)
    y_t = torch.nn.functional.avg_pool2d(x_t, 2)
    (y_t * _to_torch_layout(cotangent)).sum().backward()
    y, vjp = jax.vjp(model_lib.avg_pool_2x2, jnp.asarray(x))
    np.testing.assert_allclose(y, y_t.detach().numpy().transpose(0, 2, 3, 1), atol=1e-6)
    np.testing.assert_allclose(vjp(jnp.asarray(cotangent))[0],
                               x_t.grad.numpy().transpose(0, 2, 3, 1), atol=1e-6)
    y16 = model_lib.avg_pool_2x2(jnp.asarray(x, jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(y16.astype(jnp.float32), y, atol=2e-2)


@pytest.mark.parametrize("forms", FORMS)
@pytest.mark.parametrize("input_needs_gradient", [True, False])
def test_conv3x3_and_its_gradients_match_torch_autograd(input_needs_gradient, forms, monkeypatch):
    """Forward and both gradients against PyTorch's Conv2d(padding=1, bias=False); the hint only
    changes how the CPU computes the kernel gradient. With the platform's kernel-gradient form
    and with the non-CPU one (autodiff's)."""
    ran = _use_forms(forms, monkeypatch)
    rng = np.random.default_rng(9)
    x = rng.standard_normal((3, 8, 6, 5)).astype(np.float32)  # (B, T, F, I)
    kernel = rng.standard_normal((3, 3, 5, 7)).astype(np.float32)  # (3, 3, I, O)
    cotangent = rng.standard_normal((3, 8, 6, 7)).astype(np.float32)

    def loss(x_, k_):
        return jnp.sum(model_lib.conv3x3(x_, k_, input_needs_gradient) * cotangent)

    y = model_lib.conv3x3(jnp.asarray(x), jnp.asarray(kernel), input_needs_gradient)
    d_x, d_kernel = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, kernel)
    if forms == "non-CPU":
        assert ran == [model_lib._kernel_gradient_autodiff]

    x_t = _to_torch_layout(x).requires_grad_(True)
    k_t = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))).requires_grad_(True)
    y_t = torch.nn.functional.conv2d(x_t, k_t, padding=1)
    (y_t * _to_torch_layout(cotangent)).sum().backward()
    np.testing.assert_allclose(y, y_t.detach().numpy().transpose(0, 2, 3, 1), atol=1e-4)
    np.testing.assert_allclose(d_x, x_t.grad.numpy().transpose(0, 2, 3, 1), atol=1e-4)
    np.testing.assert_allclose(d_kernel, k_t.grad.numpy().transpose(2, 3, 1, 0), atol=1e-4)
    # bfloat16 operands give a bfloat16 kernel gradient close to the float32 one.
    d_kernel16 = jax.grad(loss, argnums=1)(jnp.asarray(x, jnp.bfloat16),
                                           jnp.asarray(kernel, jnp.bfloat16))
    assert d_kernel16.dtype == jnp.bfloat16
    np.testing.assert_allclose(d_kernel16.astype(jnp.float32), d_kernel,
                               atol=0.02 * float(np.abs(d_kernel).max()))


def test_conv3x3_kernel_gradient_copies_are_made_in_the_backward_pass(monkeypatch):
    """On the CPU the weight gradients' copies of their inputs wait for the output gradient, so
    they do not live through the forward pass: less temporary memory than without the order."""
    if jax.default_backend() != "cpu":
        pytest.skip("an XLA:CPU scheduling property")
    from asd_jax import xla_cpu

    def loss(kernels, x):
        for i, kernel in enumerate(kernels):
            x = model_lib.conv3x3(x, kernel, input_needs_gradient=i > 0)
            x, _, _ = model_lib.batch_norm_train(x, jnp.ones(16), jnp.zeros(16), relu=True)
        return jnp.sum(jnp.square(x))

    kernels = [jax.ShapeDtypeStruct((3, 3, 8, 16), jnp.float32),
               jax.ShapeDtypeStruct((3, 3, 16, 16), jnp.float32),
               jax.ShapeDtypeStruct((3, 3, 16, 16), jnp.float32)]
    x = jax.ShapeDtypeStruct((8, 128, 64, 8), jnp.float32)

    def temp_bytes():
        compiled = jax.jit(jax.grad(loss), compiler_options=xla_cpu.train_options()).lower(
            kernels, x).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    ordered = temp_bytes()
    monkeypatch.setattr(model_lib, "_after_output_gradient", lambda gradient: gradient)
    unordered = temp_bytes()
    assert ordered < 0.9 * unordered


def test_conv3x3_kernel_gradient_is_reformulated_only_for_the_cpu():
    """The CPU lowering's kernel gradient takes the output gradient as the image (batch axis:
    its channels; contracted: the batch); GPU lowerings keep autodiff's convolution."""
    image_form = "[f, 0, 1, b]x[i, 0, 1, o]->[0, 1, f, b]"
    x = jax.ShapeDtypeStruct((2, 8, 6, 5), jnp.float32)
    kernel = jax.ShapeDtypeStruct((3, 3, 5, 7), jnp.float32)
    for hint in (True, False):
        grad = jax.jit(jax.grad(lambda x_, k_: jnp.sum(model_lib.conv3x3(x_, k_, hint)),
                                argnums=1))
        traced = grad.trace(x, kernel)
        for platform in ("cpu", "cuda"):
            text = traced.lower(lowering_platforms=(platform,)).as_text()
            assert (image_form in text) == (hint and platform == "cpu"), (hint, platform)


def test_shape_checks_at_layer_boundaries():
    """Wrong ranks and (C,) / (H,) mismatches fail at the boundary (chex), not deep inside or by
    broadcasting silently."""
    x = jnp.ones((4, 5, 3))
    with pytest.raises(AssertionError):
        model_lib.batch_norm_train(x, jnp.ones(2), jnp.zeros(3))
    with pytest.raises(AssertionError):
        model_lib.batch_norm_train(x, jnp.ones(3), jnp.zeros(3), shift=jnp.zeros(1))
    with pytest.raises(ValueError, match="channel axis"):
        model_lib.batch_norm_train(jnp.ones(3), jnp.ones(3), jnp.zeros(3))
    bn = model_lib.BatchNorm()
    params = {"scale": jnp.ones(3), "bias": jnp.zeros(3)}
    with pytest.raises(AssertionError):  # a (1,) running mean would broadcast
        bn.apply({"params": params, "batch_stats": {"mean": jnp.zeros(1), "var": jnp.ones(3)}},
                 x, train=False)
    h = 4
    x_proj, w_h, b_hn = jnp.zeros((6, 2, 3, 3 * h)), jnp.zeros((2, h, 3 * h)), jnp.zeros((2, h))
    assert model_lib.gru_recurrence(x_proj, w_h, b_hn).shape == (6, 2, 3, h)
    for bad in ((x_proj[..., :-1], w_h, b_hn), (x_proj[0], w_h, b_hn),
                (x_proj, w_h[:, :, :-1], b_hn), (x_proj, w_h, b_hn[:1])):
        with pytest.raises(AssertionError):
            model_lib.gru_recurrence(*bad)
    with pytest.raises(AssertionError):  # (T, D) without the batch axis
        model_lib.BidirectionalGRU(h).init(jax.random.key(0), jnp.zeros((6, 5)))
    image = jnp.zeros((2, 8, 6, 5))
    assert model_lib.conv3x3(image, jnp.zeros((3, 3, 5, 7))).shape == (2, 8, 6, 7)
    for kernel_shape in ((5, 5, 5, 7), (3, 1, 5, 7)):  # would convolve to (2, 6, 4, 7), (2, 8, 8, 7)
        with pytest.raises(AssertionError, match=r"\(3, 3, 5, None\)"):
            model_lib.conv3x3(image, jnp.zeros(kernel_shape))


def _gru_params_from_torch(gru: torch.nn.GRU, layer: int, hidden: int):
    sd = {k: v.detach().numpy() for k, v in gru.state_dict().items()}
    out = {"input_kernel": [], "hidden_kernel": [], "bias": [], "hidden_bias_n": []}
    for suffix in ("", "_reverse"):
        b_ih, b_hh = sd[f"bias_ih_l{layer}{suffix}"], sd[f"bias_hh_l{layer}{suffix}"]
        out["input_kernel"].append(sd[f"weight_ih_l{layer}{suffix}"].T)
        out["hidden_kernel"].append(sd[f"weight_hh_l{layer}{suffix}"].T)
        out["bias"].append(np.concatenate([b_ih[:2 * hidden] + b_hh[:2 * hidden], b_ih[2 * hidden:]]))
        out["hidden_bias_n"].append(b_hh[2 * hidden:])
    return {k: np.stack(v) for k, v in out.items()}


def test_bidirectional_gru_matches_torch():
    torch.manual_seed(0)
    gru_t = torch.nn.GRU(5, 7, num_layers=1, batch_first=True, bidirectional=True)
    with torch.no_grad():
        for p in gru_t.parameters():
            p.uniform_(-0.6, 0.6)
    x = np.random.default_rng(1).standard_normal((3, 11, 5)).astype(np.float32)
    expected, _ = gru_t(torch.from_numpy(x))
    params = _gru_params_from_torch(gru_t, 0, 7)
    got = model_lib.BidirectionalGRU(7).apply({"params": params}, x)
    assert got.shape == (3, 11, 14)
    np.testing.assert_allclose(got, expected.detach().numpy(), atol=1e-5)


@pytest.mark.parametrize("unroll", [1, 4, 11])
def test_bidirectional_gru_gradient_matches_torch_autograd(unroll):
    """The hand-written backpropagation through time against torch.nn.GRU's autograd."""
    torch.manual_seed(1)
    gru_t = torch.nn.GRU(5, 7, num_layers=1, batch_first=True, bidirectional=True)
    with torch.no_grad():
        for p in gru_t.parameters():
            p.uniform_(-0.6, 0.6)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 11, 5)).astype(np.float32)
    cotangent = rng.standard_normal((3, 11, 14)).astype(np.float32)
    x_t = torch.from_numpy(x).requires_grad_(True)
    (gru_t(x_t)[0] * torch.from_numpy(cotangent)).sum().backward()

    params = _gru_params_from_torch(gru_t, 0, 7)
    gru = model_lib.BidirectionalGRU(7, unroll=unroll)
    grads_params, grads_x = jax.grad(
        lambda p, x_: jnp.sum(gru.apply({"params": p}, x_) * cotangent), argnums=(0, 1))(params, x)
    np.testing.assert_allclose(grads_x, x_t.grad.numpy(), atol=1e-5)
    torch_grads = {k: v.grad.numpy() for k, v in gru_t.named_parameters()}
    for d, suffix in enumerate(("", "_reverse")):
        np.testing.assert_allclose(grads_params["input_kernel"][d],
                                   torch_grads[f"weight_ih_l0{suffix}"].T, atol=1e-5)
        np.testing.assert_allclose(grads_params["hidden_kernel"][d],
                                   torch_grads[f"weight_hh_l0{suffix}"].T, atol=1e-5)
        # Folded r/z biases: b_ih and b_hh get the same gradient, which is the folded one's.
        g_ih, g_hh = torch_grads[f"bias_ih_l0{suffix}"], torch_grads[f"bias_hh_l0{suffix}"]
        np.testing.assert_allclose(g_ih[:14], g_hh[:14], atol=1e-6)
        np.testing.assert_allclose(grads_params["bias"][d], g_ih, atol=1e-5)
        np.testing.assert_allclose(grads_params["hidden_bias_n"][d], g_hh[14:], atol=1e-5)


def test_paper_parameter_count_is_torch_minus_folded_biases():
    torch_count = sum(p.numel() for p in tr.TorchCRNN(16).parameters())
    assert torch_count == 7_076_728  # SPEC section 6
    variables = model_lib.abstract_variables(model_lib.CRNN(), 16)
    assert model_lib.count_params(variables["params"]) == torch_count - 2 * 2 * 2 * 256


@pytest.fixture(scope="module")
def small_variables():
    """init_variables of CRNN(**SMALL) for 4 input channels (compiled once per module)."""
    return model_lib.init_variables(jax.random.key(3), model_lib.CRNN(**SMALL), 4)


def test_init_follows_torch_default_bounds(small_variables):
    params = small_variables["params"]
    kernel = np.asarray(params["conv_block2"]["conv1"]["kernel"])  # fan_in 3*3*8
    bound = 1 / math.sqrt(72)
    assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.9 * bound
    bias = np.asarray(params["gru_l0"]["bias"])  # r, z: sum of two U(+-1/sqrt(H)), n: one
    assert np.abs(bias[:, 16:]).max() <= 1 / math.sqrt(8)
    assert np.abs(bias[:, :16]).max() > 1 / math.sqrt(8)
    assert np.abs(np.asarray(params["conv_block1"]["conv1"]["kernel"])).max() <= 1 / math.sqrt(36)
    # PyTorch's Linear: U(+-1/sqrt(in_features)) for weight and bias; GRU: U(+-1/sqrt(hidden))
    # for every weight, whatever the input width (here 16 inputs, hidden 8). Each bound is
    # never exceeded and, with 16 or more draws (fixed seed), approached to within 10%.
    net = tr.TorchCRNN(in_channels=4, **SMALL)
    bounds = {("fc1", "kernel"): 1 / math.sqrt(net.fc1.in_features),
              ("fc1", "bias"): 1 / math.sqrt(net.fc1.in_features),
              ("fc2", "kernel"): 1 / math.sqrt(net.fc2.in_features),
              ("gru_l0", "input_kernel"): 1 / math.sqrt(net.gru_block.hidden_size),
              ("gru_l1", "input_kernel"): 1 / math.sqrt(net.gru_block.hidden_size),
              ("gru_l0", "hidden_kernel"): 1 / math.sqrt(net.gru_block.hidden_size),
              ("gru_l0", "hidden_bias_n"): 1 / math.sqrt(net.gru_block.hidden_size)}
    assert net.fc1.in_features != net.fc1.out_features and net.gru_block.input_size != 8
    for (layer, name), bound in bounds.items():
        value = np.abs(np.asarray(params[layer][name])).max()
        assert 0.9 * bound < value <= bound or (name == "bias" and value <= bound), (layer, name)
    again = model_lib.init_variables(jax.random.key(3), model_lib.CRNN(**SMALL), 4)["params"]
    jax.tree.map(np.testing.assert_array_equal, params, again)


def test_output_shape_range_and_train_mode_updates_stats(small_variables):
    model, variables = model_lib.CRNN(**SMALL), small_variables
    x = jax.random.normal(jax.random.key(1), (2, 64, 16, 4))
    cams = jax.nn.one_hot(jnp.array([0, 10]), 11)
    out = jax.jit(model.apply, static_argnames="train")(variables, x, cams, train=False)
    assert out.shape == (2, 16, 2) and out.dtype == jnp.float32
    assert np.all((np.asarray(out) >= 0) & (np.asarray(out) <= 1))
    _, updates = model.apply(variables, x, cams, train=True, mutable=["batch_stats"])
    before = variables["batch_stats"]["conv_block1"]["bn1"]["mean"]
    assert not np.allclose(updates["batch_stats"]["conv_block1"]["bn1"]["mean"], before)
    with pytest.raises(ValueError, match="divisible by 4"):
        model.apply(variables, x[:, :62], cams, train=False)



def test_camera_axis_equals_one_call_per_camera(small_variables):
    """cams (B, K, 11) runs the audio path once and gives what K separate calls give."""
    model, variables = model_lib.CRNN(**SMALL), small_variables
    x = jax.random.normal(jax.random.key(2), (2, 64, 16, 4))
    cams = jnp.stack([jax.nn.one_hot(jnp.array([c, 10 - c]), 11) for c in (0, 4, 10)], axis=1)
    together = model.apply(variables, x, cams, train=False)
    assert together.shape == (2, 3, 16, 2)
    for k in range(3):
        alone = model.apply(variables, x, cams[:, k], train=False)
        np.testing.assert_allclose(together[:, k], alone, rtol=1e-6, atol=1e-7)
    with pytest.raises(AssertionError):
        model.apply(variables, x, cams[:1], train=False)  # batch of 1 for 2 examples


def test_bfloat16_compute_keeps_float32_params_and_stays_close():
    """bfloat16 compute with float32 parameters, against float32, both batch-norm modes.

    Tolerance (the reasoning of tests/test_mixed_precision.py, for this smaller network): each
    bfloat16 rounding is off by <= 2**-9 ~ 0.2% relative; this network rounds at ~8 stages (4
    convolutions, 2 GRU layers, fc1, fc2) and batch norm re-scales in float32, so the errors add
    up as a random walk to ~0.6% of a logit's O(1) scale; through the sigmoid (slope <= 1/4) the
    outputs should move by ~0.002 on average and rarely by more than 3x that. We assert mean
    |difference| <= 0.003 and max <= 0.01, with random weights that spread the outputs (std
    >= 0.1 asserted, 10x the max bound: a wrong layer moves them by about that spread). Measured
    on 2 CPU cores: mean 0.0008, max 0.0024 (inference), 0.0005 and 0.0013 (training); with fc2
    also in bfloat16 (before it was made float32) 0.0013 and 0.0035, 0.0005 and 0.0018.
    """
    model = model_lib.CRNN(**SMALL, gru_unroll=1)
    model_bf16 = model_lib.CRNN(**SMALL, dtype=jnp.bfloat16, gru_unroll=1)
    abstract = model_lib.abstract_variables(model_bf16, 4)
    assert {x.dtype for x in jax.tree.leaves(abstract)} == {jnp.dtype(jnp.float32)}
    net = tr.randomize_(tr.TorchCRNN(in_channels=4, **SMALL), seed=3)
    variables = torch_to_flax.convert({k: v.numpy() for k, v in net.state_dict().items()}, **SMALL)
    x = jax.random.normal(jax.random.key(1), (2, 64, 16, 4))
    cams = jax.nn.one_hot(jnp.array([2, 3]), 11)

    def outputs(model):
        @jax.jit
        def both(variables):
            infer = model.apply(variables, x, cams, train=False)
            train, _ = model.apply(variables, x, cams, train=True, mutable=["batch_stats"])
            return infer, train
        return jax.device_get(both(variables))

    for mode, out32, out16 in zip(("inference", "train"), outputs(model), outputs(model_bf16)):
        assert out16.dtype == np.float32
        assert out32.std() >= 0.1, f"{mode}: outputs do not spread, the test would be vacuous"
        diff = np.abs(out16.astype(np.float64) - out32)
        assert 0 < diff.max() <= 0.01, f"{mode}: max |bf16 - f32| = {diff.max():.3g}"
        assert diff.mean() <= 0.003, f"{mode}: mean |bf16 - f32| = {diff.mean():.3g}"


def test_bfloat16_logits_are_computed_in_float32(small_variables):
    """fc2 runs in float32 whatever the compute dtype: the logits (recovered from the float32
    sigmoid outputs) are not bfloat16 values, which are 2**-8 apart relative (~4e-3 at |logit|
    ~ 1, far above the ~1e-6 at which float32 outputs give them back)."""
    model = model_lib.CRNN(**SMALL, dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(3), (4, 64, 16, 4))
    cams = jax.nn.one_hot(jnp.arange(4), 11)
    p = np.asarray(model.apply(small_variables, x, cams, train=False), np.float64)
    logits = np.log(p / (1.0 - p)).ravel()
    logits = logits[np.abs(logits) > 0.05]  # the bfloat16 grid is denser near 0
    assert logits.size >= 64
    on_grid = np.abs(np.asarray(jnp.asarray(logits, jnp.bfloat16), np.float64) - logits) < 1e-5
    assert on_grid.mean() < 0.1, f"{on_grid.mean():.0%} of the logits are bfloat16 values"


def test_bfloat16_gru_rounds_operands_only():
    """In bfloat16 the GRU rounds the operands of its products (inputs, hidden state, kernels)
    and nothing else: its products sum in float32 and the gates are float32. A float64 numpy
    GRU fed the same bfloat16-rounded operands agrees to float32 rounding (~1e-6), where
    bfloat16 products (2**-9 relative) would be off by ~1e-3."""
    rng = np.random.default_rng(5)
    t, b, h = 4, 3, 8
    bf16 = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64)  # noqa: E731
    x_proj = rng.normal(0, 1, (t, 2, b, 3 * h)).astype(np.float32)
    w_h = rng.normal(0, 0.5, (2, h, 3 * h)).astype(np.float32)
    b_hn = rng.normal(0, 0.5, (2, h)).astype(np.float32)
    hs = np.asarray(model_lib.gru_recurrence(jnp.asarray(x_proj), jnp.asarray(w_h),
                                             jnp.asarray(b_hn), jnp.bfloat16))
    sig = lambda v: 1.0 / (1.0 + np.exp(-v))  # noqa: E731
    carry = np.zeros((2, b, h))
    for step in range(t):
        hp = np.einsum("ebh,ehk->ebk", bf16(carry), bf16(w_h))
        xp = x_proj[step].astype(np.float64)
        r = sig(xp[..., :h] + hp[..., :h])
        z = sig(xp[..., h:2 * h] + hp[..., h:2 * h])
        n = np.tanh(xp[..., 2 * h:] + r * (hp[..., 2 * h:] + b_hn[:, None, :]))
        carry = (1.0 - z) * n + z * carry
        np.testing.assert_allclose(hs[step], carry, atol=2e-6, err_msg=f"step {step}")
        carry = hs[step].astype(np.float64)  # round the next operand from our own state


def _without_custom_gradients(monkeypatch):
    """Replace the model's four custom-VJP functions by their plain forward computations, so that
    jax.grad differentiates the same forward pass itself; returns the list of those called."""
    called = []

    def plain(name, fn):
        def wrapped(*args):
            called.append(name)
            return fn(*args)
        monkeypatch.setattr(model_lib, name, wrapped)

    plain("_batch_norm_train", model_lib._batch_norm_forward)
    plain("_conv3x3", lambda x, kernel, input_needs_gradient: model_lib._conv_same(x, kernel))
    plain("_avg_pool_2x2", model_lib._avg_pool_2x2.fun)
    plain("_gru_recurrence", lambda x_proj, w_h, b_hn, dtype, unroll: model_lib._gru_forward(
        x_proj, w_h, b_hn, dtype, unroll, keep_gates=False))
    return called


def test_bfloat16_gradients_are_as_close_to_float32_as_autodiffs(monkeypatch):
    """The hand-written gradients (batch norm + ReLU, convolutions, pooling, GRU) in a bfloat16
    train step, against jax.grad of the same bfloat16 forward pass without them.

    Both round the same bfloat16 activations; they differ only in the order of float32 sums and
    in where intermediate cotangents are rounded. So, per parameter, the distance of our gradient
    from autodiff's float32 one should be about that of autodiff's bfloat16 gradient: we allow
    1.25x (measured <= 1.04x; 0.84x on the GRU hidden kernels, whose weight gradient we take from
    bfloat16 operands with a float32 sum). A wrong term or scale in a bfloat16 path gives an
    error of the order of the gradient itself (a 2% error in one cotangent already fails),
    against autodiff's 0.1-30%.
    """
    from asd_jax.training import asdl_loss

    net = tr.randomize_(tr.TorchCRNN(in_channels=3, **SMALL), seed=5)
    variables = torch_to_flax.convert({k: v.numpy() for k, v in net.state_dict().items()}, **SMALL)
    x, cams, target, pseudo, va = _batch(np.random.default_rng(0), 4, 3, 64, 16)

    def gradients(dtype):
        model = model_lib.CRNN(**SMALL, dtype=dtype, gru_unroll=1)  # unroll: compile time only

        def loss_fn(params):
            out, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                 x, cams, train=True, mutable=["batch_stats"])
            return asdl_loss(out, target, pseudo, va)

        return jax.device_get(jax.jit(jax.grad(loss_fn))(variables["params"]))

    ours = gradients(jnp.bfloat16)
    called = _without_custom_gradients(monkeypatch)
    autodiff = gradients(jnp.bfloat16)
    reference = gradients(jnp.float32)  # autodiff's float32 gradient
    assert set(called) == {"_batch_norm_train", "_conv3x3", "_avg_pool_2x2", "_gru_recurrence"}

    def norm(a):
        return np.linalg.norm(np.ravel(a).astype(np.float64))

    for path, want in jax.tree_util.tree_leaves_with_path(reference):
        name = jax.tree_util.keystr(path)
        got, auto = _leaf(ours, path), _leaf(autodiff, path)
        ours_error, autodiff_error = norm(got - want), norm(auto - want)
        assert autodiff_error > 1e-4 * norm(want), f"{name}: bfloat16 did not run"
        assert ours_error <= 1.25 * autodiff_error, (
            f"{name}: |ours - f32| / |f32| = {ours_error / norm(want):.3g}, autodiff's "
            f"{autodiff_error / norm(want):.3g}")


def _leaf(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def test_config_round_trip_and_errors():
    model = model_lib.CRNN(conv_features=(4, 8), gru_hidden=3, pooling="max", dtype=jnp.bfloat16)
    config = model_lib.model_config(model)
    assert config["dtype"] == "bfloat16" and config["conv_features"] == [4, 8]
    assert model_lib.CRNN.from_config(config) == model
    assert model_lib.CRNN.from_config({}) == model_lib.CRNN()
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['width'\]"):
        model_lib.CRNN.from_config({"width": 3})
    with pytest.raises(ValueError, match="dtype 'float16'"):
        model_lib.CRNN.from_config({"dtype": "float16"})
    with pytest.raises(ValueError, match="pooling 'median'"):
        model_lib.CRNN.from_config({"pooling": "median"})
    with pytest.raises(ValueError, match="gru_hidden must be a positive int"):
        model_lib.CRNN.from_config({"gru_hidden": 0})
    with pytest.raises(ValueError, match=r"num_cameras must be a positive int, got 2.5"):
        model_lib.CRNN.from_config({"num_cameras": 2.5})
    for widths in ([4, 0], [True, 8], [], "48", [4.0, 8]):
        with pytest.raises(ValueError, match=rf"conv_features must be a non-empty list of positive "
                                             rf"ints, got {re.escape(repr(widths))}"):
            model_lib.CRNN.from_config({"conv_features": widths})
    with pytest.raises(ValueError, match="CRNN dtype 'float16' has no config name"):
        model_lib.model_config(model_lib.CRNN(dtype=jnp.float16))


def test_conv_features_given_as_a_list_can_be_a_static_argument():
    """The jitted entry points take the model as a static (hashed) argument."""
    listed = model_lib.CRNN(conv_features=[4, 8], gru_hidden=3, fc1_features=4)
    assert listed == model_lib.CRNN(conv_features=(4, 8), gru_hidden=3, fc1_features=4)
    variables = model_lib.init_variables(jax.random.key(0), listed, 3)
    assert variables["params"]["conv_block2"]["conv1"]["kernel"].shape == (3, 3, 4, 8)


def _batch(rng, batch, in_channels, frames_in, frames_out):
    x = rng.standard_normal((batch, frames_in, 16, in_channels)).astype(np.float32)
    cams = np.eye(11, dtype=np.float32)[rng.integers(0, 11, batch)]
    target = rng.uniform(0, 1, (batch, frames_out)).astype(np.float32)
    pseudo = rng.integers(0, 2, (batch, frames_out)).astype(np.float32)
    va = rng.integers(0, 2, (batch, frames_out)).astype(np.float32)
    return x, cams, target, pseudo, va


@pytest.mark.parametrize("double_gru_bias_updates", [True, False])
def test_one_adam_step_matches_torch(double_gru_bias_updates):
    """Same loss, updated parameters and BN running stats as PyTorch after one Adam step.

    PyTorch's separate b_ir/b_hr (b_iz/b_hz) both take an Adam step: with
    `gru_bias_update_scale` the folded Flax bias matches; without it, it must not.
    """
    from asd_jax.training import asdl_loss

    lr = 1e-3
    torch.manual_seed(0)
    net = tr.randomize_(tr.TorchCRNN(in_channels=3, **SMALL), seed=5)
    variables = torch_to_flax.convert({k: v.numpy() for k, v in net.state_dict().items()}, **SMALL)
    x, cams, target, pseudo, va = _batch(np.random.default_rng(0), 4, 3, 64, 16)

    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    opt.zero_grad()
    outputs_t = net(_to_torch_layout(x), torch.from_numpy(cams[:, None]))
    loss_t = tr.asdl_loss_reference(outputs_t, torch.from_numpy(target), torch.from_numpy(pseudo),
                                    torch.from_numpy(va))
    loss_t.backward()
    opt.step()
    expected = torch_to_flax.convert({k: v.numpy() for k, v in net.state_dict().items()}, **SMALL)

    model = model_lib.CRNN(**SMALL)
    tx = optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8)
    if double_gru_bias_updates:
        scale = model_lib.gru_bias_update_scale(variables["params"])
        tx = optax.chain(tx, optax.stateless(lambda u, _: jax.tree.map(jnp.multiply, u, scale)))

    @jax.jit
    def step(variables):
        def loss_fn(params):
            out, updates = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                       x, cams, train=True, mutable=["batch_stats"])
            return asdl_loss(out, target, pseudo, va), updates["batch_stats"]

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        updates, _ = tx.update(grads, tx.init(variables["params"]), variables["params"])
        return loss, {"params": optax.apply_updates(variables["params"], updates), "batch_stats": stats}

    loss, new = step(variables)
    np.testing.assert_allclose(loss, loss_t.item(), rtol=1e-5)
    for path, want in jax.tree_util.tree_leaves_with_path(expected["batch_stats"]):
        got = new["batch_stats"]
        for key in path:
            got = got[key.key]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7, err_msg=jax.tree_util.keystr(path))

    mismatched = []
    flat_old = dict(jax.tree_util.tree_leaves_with_path(variables["params"]))
    flat_new = dict(jax.tree_util.tree_leaves_with_path(new["params"]))
    for path, want in jax.tree_util.tree_leaves_with_path(expected["params"]):
        got, old = np.asarray(flat_new[path]), flat_old[path]
        try:
            # Relative 1e-4 of the tensor's scale, and the step itself within 1% of lr.
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
            np.testing.assert_allclose(got - old, want - old, atol=1e-2 * lr)
        except AssertionError:
            mismatched.append(jax.tree_util.keystr(path))
    # Every parameter moved (a step happened), except fc2's rows of unused cameras.
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), new["params"], variables["params"])
    assert min(jax.tree.leaves(moved)) > 0.5 * lr
    if double_gru_bias_updates:
        assert mismatched == []
    else:
        assert mismatched == ["['gru_l0']['bias']", "['gru_l1']['bias']"]
