"""The train state and the optimizer (Adam with PyTorch's defaults, lr held in the state)."""

from __future__ import annotations

from typing import Any

import chex
import flax
import jax
import jax.numpy as jnp
import optax

# PyTorch's torch.optim.Adam defaults; eps is added to sqrt(v_hat) in both libraries.
ADAM_B1 = 0.9
ADAM_B2 = 0.999
ADAM_EPS = 1e-8


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training, as one pytree (checkpointed whole).

    step: int32 scalar, optimizer steps taken so far. epoch: int32 scalar, epochs completed.
    params / batch_stats: the CRNN's variable collections (float32).
    opt_state: the optax state of `create_optimizer`, including the current learning rate.
    rng: a PRNG key (uint32 (2,)), split per step; the CRNN has no dropout, so it only keeps
    runs reproducible if a stochastic layer is ever added.
    """

    step: jax.Array
    epoch: jax.Array
    params: Any
    batch_stats: Any
    opt_state: optax.OptState
    rng: jax.Array

    @property
    def variables(self) -> dict[str, Any]:
        """{"params", "batch_stats"}, what `CRNN.apply` takes."""
        return {"params": self.params, "batch_stats": self.batch_stats}


def create_optimizer(learning_rate: float, update_scale: Any = None) -> optax.GradientTransformation:
    """Adam (b1 0.9, b2 0.999, eps 1e-8, no weight decay) whose learning rate is state.

    The rate lives in `opt_state.hyperparams["learning_rate"]` (set per epoch with
    `set_learning_rate`), so a restored checkpoint carries it and resumes exactly.
    `update_scale`: optional pytree like the params multiplying every update (e.g.
    `asd_jax.model.gru_bias_update_scale`, which reproduces PyTorch's two GRU biases).
    """
    def adam(learning_rate):
        tx = optax.adam(learning_rate, b1=ADAM_B1, b2=ADAM_B2, eps=ADAM_EPS)
        if update_scale is None:
            return tx
        scale = optax.stateless(lambda updates, params: jax.tree.map(jnp.multiply, updates, update_scale))
        return optax.chain(tx, scale)

    return optax.inject_hyperparams(adam)(learning_rate=learning_rate)


def create_train_state(rng: jax.Array, variables: dict[str, Any],
                       tx: optax.GradientTransformation) -> TrainState:
    """A fresh state from initialised CRNN variables {"params", "batch_stats"}."""
    chex.assert_shape(rng, (2,))  # a raw uint32 key (jax.random.PRNGKey), checkpointable as is
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), epoch=jnp.zeros((), jnp.int32),
                      params=params, batch_stats=variables.get("batch_stats", {}),
                      opt_state=tx.init(params), rng=rng)


def learning_rate(state: TrainState) -> jax.Array:
    """The learning rate stored in the optimizer state (float32 scalar)."""
    return state.opt_state.hyperparams["learning_rate"]


def set_learning_rate(state: TrainState, lr: float) -> TrainState:
    """The state with its optimizer's learning rate replaced by `lr` (float32)."""
    hyperparams = dict(state.opt_state.hyperparams)
    old = hyperparams["learning_rate"]
    hyperparams["learning_rate"] = jnp.asarray(lr, old.dtype)
    return state.replace(opt_state=state.opt_state._replace(hyperparams=hyperparams))
