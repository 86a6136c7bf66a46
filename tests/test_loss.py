"""asd_jax/training/loss.py: its input contract (shapes, mask, dtype) against SPEC section 7.

The value of the loss on float32 inputs is checked against loops in tests/test_training.py;
here: bfloat16 outputs are summed as float32 (a bfloat16 sum of 32 x 60 terms is off by
percents), and inputs whose shapes do not match are refused instead of being broadcast into a
different number.
"""

import numpy as np
import pytest

import jax.numpy as jnp

from asd_jax.training import asdl_loss


def _batch(seed, batch=32, frames=60):
    rng = np.random.default_rng(seed)
    outputs = rng.uniform(size=(batch, frames, 2)).astype(np.float32)
    target = rng.uniform(size=(batch, frames)).astype(np.float32)
    pseudo = rng.integers(0, 2, (batch, frames)).astype(np.float32)
    va = rng.integers(0, 2, (batch, frames)).astype(np.float32)
    return outputs, target, pseudo, va


def _numpy_loss(outputs, target, pseudo, va):
    """SPEC section 7 in float64 numpy: sum of (c - va)^2 + [va == 1 and pseudo == 1] (x - target)^2."""
    outputs, target = np.asarray(outputs, np.float64), np.asarray(target, np.float64)
    position = (va == 1) & (pseudo == 1)
    return float(np.sum((outputs[..., 1] - va) ** 2) + np.sum(np.where(position, (outputs[..., 0] - target) ** 2, 0)))


def test_bfloat16_outputs_give_a_float32_sum():
    """The docstring's float32 scalar: the bfloat16 values, exactly as given, summed in float32
    (within 1e-5 of float64), not in bfloat16 (8 mantissa bits: ~1e-2 off for this batch)."""
    outputs, target, pseudo, va = _batch(0)
    as_bf16 = jnp.asarray(outputs, jnp.bfloat16)
    got = asdl_loss(as_bf16, target, pseudo, va)
    assert got.dtype == jnp.float32
    expected = _numpy_loss(np.asarray(as_bf16.astype(jnp.float32)), target, pseudo, va)
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


@pytest.mark.parametrize("which", ["target", "pseudo", "va"])
def test_labels_of_another_shape_are_refused_not_broadcast(which):
    """(B, 1) labels would broadcast over the 60 frames and give some other sum."""
    outputs, target, pseudo, va = _batch(1, batch=4)
    labels = {"target": target, "pseudo": pseudo, "va": va}
    labels[which] = labels[which][:, :1]
    with pytest.raises(AssertionError):
        asdl_loss(outputs, labels["target"], labels["pseudo"], labels["va"])


def test_a_mask_of_another_length_is_refused():
    """A (1,) mask would broadcast over the batch: every example in or out, not the ones meant."""
    outputs, target, pseudo, va = _batch(2, batch=4)
    for mask in (np.array([True]), np.array([True, False, True])):
        with pytest.raises(AssertionError):
            asdl_loss(outputs, target, pseudo, va, mask=mask)


def test_outputs_without_a_batch_axis_are_refused():
    """outputs must be (B, T, 2): a (T, 2) array is refused, as is a (B, T, K, 2) one."""
    outputs, target, pseudo, va = _batch(3, batch=4)
    with pytest.raises(AssertionError):
        asdl_loss(outputs[0], target[0], pseudo[0], va[0])
    with pytest.raises(AssertionError):
        asdl_loss(outputs[:, :, None], target[:, :, None], pseudo[:, :, None], va[:, :, None])
