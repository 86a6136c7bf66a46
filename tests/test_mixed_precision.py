"""bfloat16 compute (`CRNN(dtype=jnp.bfloat16)`, float32 parameters) against float32, paper model.

Tolerance, reasoned. bfloat16 keeps 8 significant bits, so each rounding of an activation or of
a weight is off by at most 2**-9 ~ 0.2% (relative). The paper CRNN rounds at the inputs of 8
convolutions (each summing 9*C_in ~ 144..4608 products, where independent rounding errors
partly cancel), the operands of the GRU input and hidden projections (60 recurrent steps, sums
and carry kept in float32) and of fc1 (fc2, the logits, is float32); batch normalisation re-centres and re-scales every conv output in float32, so
relative errors do not compound multiplicatively through depth. A relative error of a few
tenths of a percent per layer adding up (as a random walk) over ~12 rounding stages gives ~1%
of a pre-sigmoid logit's scale; the sigmoid's slope is at most 1/4 and the logits here are O(1),
so the outputs (x position and confidence, both in [0, 1]) should move by well under 0.01 on
average and rarely by more than ~0.02. We assert: mean |difference| <= 0.005 and
max |difference| <= 0.02 over 2 examples x 60 frames x 2 outputs, in both batch-norm modes,
with weights chosen so that the outputs spread over (0, 1) (otherwise sigmoid(~0) = 0.5
everywhere would hide any error). For scale: 0.005 of the image width is 12 px, a seventh of the
2-degree (89 px) evaluation tolerance. Measured on 2 CPU cores: mean 0.0010 and max 0.0032
(inference), 0.0008 and 0.0040 (training); with bfloat16 GRU sums and fc2, 0.0012 and 0.0048.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch_reference as tr
from asd_jax.model import CRNN
from converters import torch_to_flax

MEAN_ABS_TOL = 0.005
MAX_ABS_TOL = 0.02


def _outputs(variables, features, cams, dtype):
    """(inference outputs, training-mode outputs), each (B, 60, 2) float32."""
    model = CRNN(dtype=dtype)

    @jax.jit
    def both(variables, features, cams):
        infer = model.apply(variables, features, cams, train=False)
        train, _ = model.apply(variables, features, cams, train=True, mutable=["batch_stats"])
        return infer, train

    return jax.device_get(both(variables, features, cams))


@pytest.mark.slow  # two full-size compilations, ~30 s on 2 busy cores
def test_bfloat16_outputs_within_tolerance_of_float32():
    net = tr.randomize_(tr.TorchCRNN(16), seed=3)  # outputs spread over (0, 1)
    variables = torch_to_flax.convert({k: v.numpy() for k, v in net.state_dict().items()})
    rng = np.random.default_rng(0)
    features = rng.standard_normal((2, 960, 64, 16)).astype(np.float32)  # normalised features
    cams = np.eye(11, dtype=np.float32)[[2, 9]]

    reference = _outputs(variables, features, cams, jnp.float32)
    mixed = _outputs(variables, features, cams, jnp.bfloat16)
    for mode, ref, out in zip(("inference", "train"), reference, mixed):
        assert out.dtype == np.float32 and out.shape == (2, 60, 2)
        assert ref.std() > 0.05, f"{mode}: outputs do not spread, the test would be vacuous"
        diff = np.abs(out.astype(np.float64) - ref.astype(np.float64))
        assert diff.mean() <= MEAN_ABS_TOL, f"{mode}: mean |bf16 - f32| = {diff.mean():.4g}"
        assert diff.max() <= MAX_ABS_TOL, f"{mode}: max |bf16 - f32| = {diff.max():.4g}"
        # And bfloat16 really ran: the outputs are not bit-identical to float32.
        assert diff.max() > 0
