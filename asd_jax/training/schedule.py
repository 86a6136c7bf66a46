"""Per-epoch learning rates (SPEC section 7).

The reference multiplies the *current* learning rate by `decay_factor ** (e - decay_start)` at
the start of every epoch e > decay_start. Because the multiplication compounds, the rate of
epoch e is

    lr_e = lr0 * decay_factor ** ((e - s) * (e - s + 1) / 2)     for e > s, else lr0,

about 2.5e-10 * lr0 at e = 50 with the defaults (s = 30, factor 0.9). This is the quirk
"compounding lr decay", the default `kind="reference"`. `kind="exponential"` is the plain
per-epoch exponential decay the reference probably meant, lr_e = lr0 * factor ** (e - s) for
e > s; `kind="constant"` keeps lr0. Epochs are 1-based as in the reference.
"""

from __future__ import annotations

SCHEDULES = ("reference", "exponential", "constant")


def learning_rate_for_epoch(base_lr: float, epoch: int, *, kind: str = "reference",
                            decay_start_epoch: int = 30, decay_factor: float = 0.9) -> float:
    """The learning rate used throughout 1-based `epoch` (Python float).

    Args:
      base_lr: lr0, the rate of epochs 1..decay_start_epoch.
      epoch: 1-based epoch number (>= 1).
      kind: "reference" (compounding, the reference's quirk), "exponential" or "constant".
      decay_start_epoch: the last epoch at the base rate.
      decay_factor: the per-epoch multiplier.
    """
    if epoch < 1:
        raise ValueError(f"epoch is 1-based, got {epoch}")
    if kind not in SCHEDULES:
        raise ValueError(f"lr schedule must be one of {SCHEDULES}, got {kind!r}")
    past = max(0, epoch - decay_start_epoch)
    if kind == "constant" or past == 0:
        return float(base_lr)
    if kind == "exponential":
        return float(base_lr * decay_factor ** past)
    return float(base_lr * decay_factor ** (past * (past + 1) // 2))
