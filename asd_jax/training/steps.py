"""One optimisation step and one evaluation step: pure functions, jitted by the caller.

The caller binds `model` and `tx` (static) with functools.partial and jits with the state
donated and, on the CPU, the library's compiler options (about 2x faster there; ignored by other
backends), as the training loop does:
`jax.jit(functools.partial(train_step, model=model, tx=tx), donate_argnums=0,
compiler_options=xla_cpu.train_options())`; `eval_step` and `predict` take
`xla_cpu.inference_options()` (`asd_jax.xla_cpu`).
Under a data-parallel mesh the batch arrives sharded over the "data" axis and everything else
replicated; jit then computes the batch-norm statistics and the gradient over the global batch,
so N devices compute what one device computes.

A batch is a dict: "features" (B, 960, 64, C) float32 *unnormalised* (normalised here, on
device, with the scaler), "cams" (B, 11) one-hot float32, "target_coords" (B, 60) float32,
"pseudo_labels" and "speech_activity" (B, 60) {0, 1}; for evaluation, optionally MASK_KEY (B,)
bool, False on examples that only pad the batch to a multiple of the device count.
"""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from asd_jax import scaler as scaler_lib
from asd_jax.training.loss import asdl_loss
from asd_jax.training.state import TrainState

Batch = dict[str, jax.Array]
MASK_KEY = "mask"


def _check_batch(batch: Batch) -> None:
    chex.assert_rank(batch["features"], 4)
    batch_size, frames = batch["target_coords"].shape
    chex.assert_shape(batch["cams"], (batch_size, None))
    chex.assert_shape([batch["pseudo_labels"], batch["speech_activity"]], (batch_size, frames))
    chex.assert_axis_dimension(batch["features"], 0, batch_size)


def _materialise_on_gpu(grads: Any) -> Any:
    """The gradients, kept from fusing into the optimizer update on a GPU (identity elsewhere).

    XLA:GPU otherwise fuses the transpose of each convolution's weight gradient (cuDNN's filter
    layout to HWIO) into the Adam update, one slow multi-output transpose kernel per kernel:
    8.52 -> 8.35 ms per bfloat16 step at batch 32 on an H200 with the barrier. On the CPU the
    barrier costs ~5% instead, so it is staged out for GPUs only (resolved when lowering).
    """
    return jax.lax.platform_dependent(grads, cuda=jax.lax.optimization_barrier,
                                      rocm=jax.lax.optimization_barrier, default=lambda g: g)


def train_step(state: TrainState, batch: Batch, scaler: scaler_lib.Scaler, *, model: nn.Module,
               tx: optax.GradientTransformation) -> tuple[TrainState, dict[str, jax.Array]]:
    """One Adam step on the summed loss of SPEC section 7 (batch-norm in training mode).

    Returns the new state and metrics {"loss": float32 scalar, the batch's summed loss,
    "num_examples": int32 scalar}. Gradients are of the sum, as the reference's backward().
    """
    _check_batch(batch)
    features = scaler_lib.normalise(batch["features"], scaler)
    rng, step_rng = jax.random.split(state.rng)

    def loss_fn(params):
        outputs, updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats}, features, batch["cams"],
            train=True, mutable=["batch_stats"], rngs={"dropout": step_rng})
        loss = asdl_loss(outputs, batch["target_coords"], batch["pseudo_labels"],
                         batch["speech_activity"])
        return loss, updates["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = _materialise_on_gpu(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state, rng=rng)
    metrics = {"loss": loss, "num_examples": jnp.asarray(batch["target_coords"].shape[0], jnp.int32)}
    return new_state, metrics


def predict(variables: dict[str, Any], features: jax.Array, cams: jax.Array,
            scaler: scaler_lib.Scaler, *, model: nn.Module) -> jax.Array:
    """Inference (batch-norm running statistics): (B, 60, 2) float32 [x, confidence].

    features: (B, 960, 64, C) float32 unnormalised; cams: (B, 11) one-hot.
    """
    chex.assert_rank(features, 4)
    outputs = model.apply(variables, scaler_lib.normalise(features, scaler), cams, train=False)
    return outputs.astype(jnp.float32)


def eval_step(state: TrainState, batch: Batch, scaler: scaler_lib.Scaler, *,
              model: nn.Module) -> dict[str, jax.Array]:
    """The summed loss of a batch in inference mode: {"loss", "num_examples"} scalars.

    With `batch[MASK_KEY]`, only the examples where it is True count in both.
    """
    _check_batch(batch)
    outputs = predict(state.variables, batch["features"], batch["cams"], scaler, model=model)
    mask = batch.get(MASK_KEY)
    loss = asdl_loss(outputs, batch["target_coords"], batch["pseudo_labels"], batch["speech_activity"],
                     mask=mask)
    num_examples = (batch["target_coords"].shape[0] if mask is None
                    else jnp.sum(mask.astype(jnp.int32)))
    return {"loss": loss, "num_examples": jnp.asarray(num_examples, jnp.int32)}
