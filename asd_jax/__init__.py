"""asd-jax: array-based active speaker detection and localization in JAX/Flax.

Start at README.md. The numeric core is pure functions of arrays:
`asd_jax.features` (GCC-PHAT, SALSA-Lite, log-mel), `asd_jax.model` (the CRNN),
`asd_jax.training` (loss, train step), `asd_jax.metrics` (the paper's evaluation).
The numeric core never touches files; reading and writing happen at the edge: `asd_jax.data`,
`asd_jax.evaluation`, `asd_jax.checkpointing`, `asd_jax.scaler` (its h5 file), the runners
(`asd_jax.forward`, `asd_jax.predict`, `asd_jax.demo`, `asd_jax.baselines`, the training loop,
its checkpoints and cross-validation) and the outputs (`asd_jax.plots`, `asd_jax.video`).
"""

__version__ = "0.1.0"
