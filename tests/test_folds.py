"""The fold split against Python's own random.seed(42); random.shuffle (SPEC section 7)."""

import random

import pytest

from asd_jax.training import folds


def _reference_split(names, k, num_folds=5, seed=42):
    shuffled = sorted(names)
    random.seed(seed)
    random.shuffle(shuffled)
    size = len(shuffled) // num_folds
    validation = shuffled[k * size:(k + 1) * size]
    train = [n for n in shuffled if n not in validation]
    return train, validation


@pytest.mark.parametrize("num_names", [5, 17, 23])
def test_folds_match_python_random(num_names):
    names = [f"seq{i:02d}_t{i % 3}" for i in range(num_names)]
    unsorted = list(reversed(names))
    state = random.getstate()
    got = folds.cross_validation_folds(unsorted)
    assert random.getstate() == state, "the global generator must not be touched"
    assert len(got) == 5
    for k, fold in enumerate(got):
        train, validation = _reference_split(names, k)
        assert fold.index == k
        assert list(fold.validation) == validation
        assert sorted(fold.train) == sorted(train)
        assert not set(fold.train) & set(fold.validation)
        assert set(fold.train) | set(fold.validation) == set(names)


@pytest.mark.parametrize("num_folds, seed", [(3, 7), (4, 0), (2, 123)])
def test_folds_follow_the_given_number_of_folds_and_seed(num_folds, seed):
    """The fold count and seed are the caller's (crossval passes the config's), not 5 and 42."""
    names = [f"seq{i:02d}" for i in range(14)]
    got = folds.cross_validation_folds(names, num_folds, seed)
    assert [fold.index for fold in got] == list(range(num_folds))
    for k, fold in enumerate(got):
        train, validation = _reference_split(names, k, num_folds, seed)
        assert list(fold.validation) == validation
        assert sorted(fold.train) == sorted(train)


def test_validation_sets_are_disjoint_and_sized():
    names = [f"s{i}" for i in range(23)]
    got = folds.cross_validation_folds(names)
    validation = [n for f in got for n in f.validation]
    assert len(validation) == len(set(validation)) == 5 * (23 // 5)


def test_too_few_sequences():
    with pytest.raises(ValueError, match="3 sequences"):
        folds.cross_validation_folds(["a", "b", "c"])


def test_split_indices_follow_the_fold_of_each_chunk():
    import numpy as np
    from asd_jax.training import configs, loop

    sequences = np.array([f"seq{i % 7}" for i in range(40)])
    config = configs.tiny().replace(fold=3)
    train, validation = loop.split_indices(sequences, config)
    fold = folds.cross_validation_folds(sequences.tolist())[3]
    assert sorted(np.concatenate([train, validation]).tolist()) == list(range(40))
    assert set(sequences[validation]) == set(fold.validation)
    assert set(sequences[train]) == set(fold.train)
    everything, none = loop.split_indices(sequences, configs.tiny())
    assert len(everything) == 40 and len(none) == 0


def test_fold_curves_average_and_plot(tmp_path):
    import json

    import numpy as np
    from asd_jax.training import crossval

    rng = np.random.default_rng(0)
    losses = rng.uniform(1, 10, size=(5, 4, 2))  # fold, epoch, (train, validation)
    rows = [[{"epoch": e + 1, "train_loss": float(losses[k, e, 0]), "validation_loss": float(losses[k, e, 1])}
             for e in range(4 if k else 3)] for k in range(5)]  # fold 0 stopped after epoch 3
    curves = crossval.fold_curves(rows)
    assert curves["epochs"] == [1, 2, 3]
    np.testing.assert_allclose(curves["train_loss"]["mean"], losses[:, :3, 0].mean(axis=0))
    np.testing.assert_allclose(curves["validation_loss"]["mean"], losses[:, :3, 1].mean(axis=0))
    np.testing.assert_allclose(curves["validation_loss"]["per_fold"], losses[:, :3, 1])
    json.dumps(curves)
    crossval.plot_curves(curves, tmp_path / "cv.png")
    assert (tmp_path / "cv.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_one_epoch_curve_is_drawn(tmp_path, monkeypatch):
    """With one epoch each curve is a single point, which a line without markers does not draw
    (the PNG showed axes and a legend only): every curve carries a marker at its points."""
    import matplotlib.pyplot as plt
    from asd_jax.training import crossval

    rows = [[{"epoch": 1, "train_loss": 2.0 + k, "validation_loss": 3.0 + k}] for k in range(3)]
    closed = []
    monkeypatch.setattr(plt, "close", closed.append)
    crossval.plot_curves(crossval.fold_curves(rows), tmp_path / "cv.png")
    (ax,) = closed[0].axes
    assert len(ax.lines) == 2 * (3 + 1)  # per fold and the mean, train and validation
    for line in ax.lines:
        assert len(line.get_xdata()) == 1 and line.get_marker() not in (None, "", "None", " ")
    plt.close(closed[0])
