"""asd_jax.scaler: the zero-std policy (SPEC section 4) when computing and when loading a scaler."""

import logging

import h5py
import numpy as np
import pytest

from asd_jax import scaler as scaler_lib


def _accumulated(zero_bin=None):
    x = np.random.default_rng(0).normal(size=(3, 960, 64, 2))
    if zero_bin is not None:
        x[..., zero_bin[0], zero_bin[1]] = 0.5
    accumulator = scaler_lib.ScalerAccumulator()
    accumulator.update(x)
    return accumulator, x


def test_result_refuses_an_unknown_policy_even_without_a_zero_std():
    accumulator, x = _accumulated()
    assert (x.std(axis=(0, 1)) > 0).all()
    with pytest.raises(ValueError, match=r"zero_std_policy must be one of \('one', 'keep'\), got 'bogus'"):
        accumulator.result("bogus")
    with pytest.raises(ValueError, match="zero_std_policy must be one of"):
        scaler_lib.ScalerAccumulator().result("bogus")


def test_keep_policy_keeps_a_zero_std():
    accumulator, x = _accumulated(zero_bin=(9, 1))
    assert accumulator.result("keep").std[9, 1] == 0.0
    assert accumulator.result().std[9, 1] == 1.0


def _write_reference_scaler(path, mean, std):
    """A scaler file as the reference writes it: float64 (C, 1, F)."""
    with h5py.File(path, "w") as f:
        f["mean"] = mean.T[:, None, :].astype(np.float64)
        f["std"] = std.T[:, None, :].astype(np.float64)


def test_load_replaces_a_zero_std_by_one_and_says_so(tmp_path, caplog):
    rng = np.random.default_rng(1)
    mean, std = rng.normal(size=(64, 16)), rng.uniform(0.5, 2.0, size=(64, 16))
    std[7, 2] = 0.0  # channel 2, bin 7: a constant bin in the training set
    path = tmp_path / "feature_scaler.h5"
    _write_reference_scaler(path, mean, std)
    with caplog.at_level(logging.WARNING):
        loaded = scaler_lib.load_scaler(path)
    assert f"{path}: zero standard deviation at (channel 2, bin 7)" in caplog.text
    expected = std.copy()
    expected[7, 2] = 1.0
    np.testing.assert_array_equal(loaded.std, expected.astype(np.float32))
    np.testing.assert_array_equal(loaded.mean, mean.astype(np.float32))
    features = np.full((1, 960, 64, 16), 3.0, np.float32)
    assert np.isfinite(np.asarray(scaler_lib.normalise(features, loaded))).all()

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        kept = scaler_lib.load_scaler(path, zero_std_policy="keep")
    assert kept.std[7, 2] == 0.0 and "zero standard deviation" not in caplog.text
    with pytest.raises(ValueError, match="zero_std_policy must be one of"):
        scaler_lib.load_scaler(path, zero_std_policy="bogus")


def test_load_refuses_mean_and_std_of_different_shapes(tmp_path):
    path = tmp_path / "feature_scaler.h5"
    with h5py.File(path, "w") as f:
        f["mean"] = np.zeros((16, 1, 64), np.float32)
        f["std"] = np.ones((15, 1, 64), np.float32)
    with pytest.raises(ValueError, match=rf"feature scaler {path}: 'mean' has shape \(16, 1, 64\) but 'std' "
                                         r"\(15, 1, 64\)"):
        scaler_lib.load_scaler(path)
