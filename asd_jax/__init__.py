"""asd-jax: array-based active speaker detection and localization in JAX/Flax.

Start at README.md. The numeric core is pure functions of arrays:
`asd_jax.features` (GCC-PHAT, SALSA-Lite, log-mel), `asd_jax.model` (the CRNN),
`asd_jax.training` (loss, train step), `asd_jax.metrics` (the paper's evaluation).
Files are read and written only at the edge: `asd_jax.data`, `asd_jax.evaluation`,
`asd_jax.checkpointing`.
"""

__version__ = "0.1.0"
