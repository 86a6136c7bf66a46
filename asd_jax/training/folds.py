"""The reference's 5-fold split of development sequences (SPEC section 7)."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterable


@dataclasses.dataclass(frozen=True)
class Fold:
    """One cross-validation fold: sequence names to train on and to validate on."""

    index: int
    train: tuple[str, ...]
    validation: tuple[str, ...]


def cross_validation_folds(sequences: Iterable[str], num_folds: int = 5, seed: int = 42) -> list[Fold]:
    """Splits sequence names as the reference does.

    The sorted, de-duplicated names are shuffled by Python's Mersenne twister seeded with
    `seed` (identical to `random.seed(seed); random.shuffle(names)`, without touching the
    global generator); fold size = len // num_folds; fold k validates on shuffled items
    [k * size, (k + 1) * size) and trains on all the others (the len % num_folds left over at
    the end are always trained on).
    """
    names = sorted(set(sequences))
    size = len(names) // num_folds
    if size == 0:
        raise ValueError(f"{len(names)} sequences cannot make {num_folds} non-empty folds")
    random.Random(seed).shuffle(names)
    folds = []
    for k in range(num_folds):
        validation = names[k * size:(k + 1) * size]
        train = names[:k * size] + names[(k + 1) * size:]
        folds.append(Fold(k, tuple(train), tuple(validation)))
    return folds
