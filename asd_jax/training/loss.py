"""The training loss of the reference (SPEC section 7)."""

from __future__ import annotations

import chex
import jax.numpy as jnp


def asdl_loss(outputs: chex.Array, target_coords: chex.Array, pseudo_labels: chex.Array,
              speech_activity: chex.Array, mask: chex.Array | None = None) -> chex.Array:
    """Squared-error loss of the active speaker detection and localisation CRNN, SUMMED.

    Per frame: the confidence term `(c - va)^2` on every frame, plus the position term
    `(x - target)^2` on frames where `va == 1` and `pseudo_label == 1`. The result is the sum
    over the batch and the frames, not a mean (the reference's convention); the logged
    per-example loss is this sum divided by the batch size.

    Args:
      outputs: (B, T, 2) float; [..., 0] the predicted x position in [0, 1] of the image
        width, [..., 1] the predicted speech confidence in [0, 1].
      target_coords: (B, T) float, target x in [0, 1].
      pseudo_labels: (B, T) {0, 1}, the position pseudo-label is "speaking".
      speech_activity: (B, T) {0, 1}, the voice-activity label.
      mask: optional (B,) bool; examples where it is False add nothing (batch padding).

    Returns:
      float32 scalar.
    """
    chex.assert_rank(outputs, 3)
    chex.assert_axis_dimension(outputs, -1, 2)
    chex.assert_equal_shape([outputs[..., 0], target_coords, pseudo_labels, speech_activity])
    outputs = outputs.astype(jnp.float32)
    x, confidence = outputs[..., 0], outputs[..., 1]
    va = speech_activity.astype(jnp.float32)
    position_mask = (speech_activity == 1) & (pseudo_labels == 1)
    confidence_term = jnp.square(confidence - va)
    position_term = jnp.where(position_mask, jnp.square(x - target_coords.astype(jnp.float32)), 0.0)
    if mask is not None:
        chex.assert_shape(mask, outputs.shape[:1])
        confidence_term = jnp.where(mask[:, None], confidence_term, 0.0)
        position_term = jnp.where(mask[:, None], position_term, 0.0)
    return jnp.sum(confidence_term) + jnp.sum(position_term)
