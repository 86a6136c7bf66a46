"""asd_jax/training/schedule.py with settings other than the paper's (SPEC section 7).

tests/test_training.py checks the default recipe (start 30, factor 0.9). Here the decay start
and factor are changed, so a schedule that ignores either (uses 30 or 0.9 regardless) fails;
the expectations are the SPEC's rule written out as the reference applies it: at the start of
every epoch e > s, the current lr is multiplied by factor ** (e - s) (kind "reference"), or by
factor once (kind "exponential", the plain decay), or never (kind "constant").
"""

import pytest

from asd_jax.training import schedule

LR0 = 3e-4


def _walked(kind, start, factor, num_epochs):
    """[lr of epoch 1, ..., lr of epoch num_epochs], by applying the per-epoch rule in a loop."""
    lr, rates = LR0, []
    for epoch in range(1, num_epochs + 1):
        if epoch > start:
            if kind == "reference":
                lr *= factor ** (epoch - start)
            elif kind == "exponential":
                lr *= factor
        rates.append(lr)
    return rates


@pytest.mark.parametrize("kind", ["reference", "exponential", "constant"])
@pytest.mark.parametrize("start, factor", [(3, 0.5), (0, 0.8), (7, 0.95)])
def test_every_kind_follows_its_rule_for_any_start_and_factor(kind, start, factor):
    expected = _walked(kind, start, factor, 12)
    got = [schedule.learning_rate_for_epoch(LR0, epoch, kind=kind, decay_start_epoch=start,
                                            decay_factor=factor) for epoch in range(1, 13)]
    assert got == pytest.approx(expected, rel=1e-12, abs=0)


def test_the_decay_starts_after_decay_start_epoch():
    """Epoch s is the last at lr0, epoch s + 1 the first decayed (by factor ** 1 in both kinds)."""
    for kind in ("reference", "exponential"):
        rate = lambda epoch: schedule.learning_rate_for_epoch(LR0, epoch, kind=kind, decay_start_epoch=4,
                                                              decay_factor=0.5)
        assert [rate(e) for e in (1, 4, 5)] == [LR0, LR0, LR0 * 0.5]
    # Closed forms of SPEC section 7 at epoch s + 3: 0.5 ** (1 + 2 + 3) and 0.5 ** 3.
    assert schedule.learning_rate_for_epoch(LR0, 7, decay_start_epoch=4, decay_factor=0.5) == LR0 / 64
    assert schedule.learning_rate_for_epoch(LR0, 7, kind="exponential", decay_start_epoch=4,
                                            decay_factor=0.5) == LR0 / 8


def test_a_factor_of_one_never_decays():
    for kind in schedule.SCHEDULES:
        assert schedule.learning_rate_for_epoch(LR0, 50, kind=kind, decay_factor=1.0) == LR0
