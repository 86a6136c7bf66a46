"""asd_jax.scaler: merging accumulators, and the zero-std policy (SPEC section 4) when computing
and when loading a scaler."""

import copy
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


def test_merged_accumulators_give_numpys_statistics_of_everything():
    # Three "processes" with unequal shares (one of them empty), weighted examples, and a mean
    # far from zero (the merge's delta terms matter): numpy's mean and std (ddof 0) over every
    # frame of every example, each counted `weight` times.
    rng = np.random.default_rng(1)
    x = rng.normal(5.0, 2.0, size=(7, 40, 64, 3))  # a scaler has 64 bins
    weights = np.array([1, 11, 3, 1, 2, 11, 5])
    shares = [[0, 1, 2], [], [3, 4, 5, 6]]
    merged, parts = scaler_lib.ScalerAccumulator(), []
    for share in shares:
        part = scaler_lib.ScalerAccumulator()
        for i in range(0, len(share), 2):  # two examples per update
            part.update(x[share[i:i + 2]], weights[share[i:i + 2]])
        parts.append((part, copy.deepcopy(part)))
        merged.merge(part)
    # the merged-in accumulators are left as they were, also after later merges
    for part, before in parts:
        assert part.count == before.count
        for name in ("mean", "m2"):
            np.testing.assert_array_equal(getattr(part, name), getattr(before, name))
    everything = np.repeat(x, weights, axis=0)
    result = merged.result()
    np.testing.assert_allclose(result.mean, everything.mean(axis=(0, 1)), rtol=1e-6)
    np.testing.assert_allclose(result.std, everything.std(axis=(0, 1)), rtol=1e-6)
    assert merged.count == everything.shape[0] * everything.shape[1]


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


def test_load_refuses_a_scaler_not_of_shape_channels_1_bins(tmp_path):
    path = tmp_path / "feature_scaler.h5"
    for shape in ((16, 2, 64), (16, 64)):
        with h5py.File(path, "w") as f:
            f["mean"] = np.zeros(shape, np.float32)
            f["std"] = np.ones(shape, np.float32)
        with pytest.raises(ValueError, match=r"'mean' has shape .*expected \(channels, 1, bins\)"):
            scaler_lib.load_scaler(path)


def test_normalise_subtracts_the_mean_and_divides_by_the_std():
    rng = np.random.default_rng(2)
    mean, std = rng.normal(3.0, 1.0, size=(64, 2)), rng.uniform(0.5, 4.0, size=(64, 2))
    scaler = scaler_lib.Scaler(mean.astype(np.float32), std.astype(np.float32))
    features = rng.normal(size=(2, 5, 64, 2)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(scaler_lib.normalise(features, scaler)),
                               (features - scaler.mean) / scaler.std, rtol=1e-6, atol=1e-6)


def test_an_update_whose_weights_are_all_zero_adds_nothing():
    accumulator, x = _accumulated()
    accumulator.update(np.full((2, 960, 64, 2), 7.0), weights=np.zeros(2))
    assert accumulator.count == x.shape[0] * x.shape[1]
    result = accumulator.result()
    np.testing.assert_allclose(result.mean, x.mean(axis=(0, 1)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.std, x.std(axis=(0, 1)), rtol=1e-5)
    # also as the first update: the accumulator stays empty
    empty = scaler_lib.ScalerAccumulator()
    empty.update(np.ones((1, 960, 64, 2)), weights=np.zeros(1))
    with pytest.raises(ValueError, match="no features were accumulated"):
        empty.result()


def test_result_of_an_empty_accumulator_is_refused():
    with pytest.raises(ValueError, match="no features were accumulated: the training set is empty"):
        scaler_lib.ScalerAccumulator().result()


def test_update_refuses_features_of_another_shape_than_earlier_batches():
    accumulator = scaler_lib.ScalerAccumulator()
    accumulator.update(np.zeros((1, 4, 64, 16)))
    with pytest.raises(ValueError, match=r"feature shape \(\.\.\., 64, 1\) does not match earlier batches "
                                         r"\(\.\.\., 64, 16\)"):
        accumulator.update(np.zeros((1, 4, 64, 1)))


def test_the_file_records_its_features_and_a_mismatch_is_refused(tmp_path):
    """A gcc_phat and a salsa_lite scaler have the same shape: only the recorded feature type
    tells them apart. Files without it (the reference's, older asd-jax) load for any type."""
    path = tmp_path / "feature_scaler.h5"
    scaler_lib.save_scaler(path, _full_scaler(), "gcc_phat", {"condition": "GT_GT"})
    with h5py.File(path, "r") as f:
        assert dict(f.attrs) == {"features": "gcc_phat", "condition": "GT_GT"}
    scaler_lib.load_scaler(path, features="gcc_phat")
    scaler_lib.load_scaler(path)  # a caller that does not know
    with pytest.raises(ValueError, match=rf"feature scaler {path} was computed from 'gcc_phat' features, "
                                         r"but 'salsa_lite' features are used here"):
        scaler_lib.load_scaler(path, features="salsa_lite")
    reference = tmp_path / "reference.h5"
    _write_reference_scaler(reference, *_full_scaler())
    np.testing.assert_array_equal(scaler_lib.load_scaler(reference, features="salsa_lite").std,
                                  _full_scaler().std)


def _full_scaler(channels=16):
    rng = np.random.default_rng(3)
    return scaler_lib.Scaler(rng.normal(size=(64, channels)).astype(np.float32),
                             rng.uniform(0.5, 2.0, size=(64, channels)).astype(np.float32))


@pytest.mark.parametrize("key, value, message", [
    ("std", np.nan, r"std is nan at \(channel 3, bin 5\)"),
    ("std", np.inf, r"std is inf at \(channel 3, bin 5\)"),
    ("std", -1.0, r"std is -1\.0 at \(channel 3, bin 5\)"),
    ("mean", -np.inf, r"mean is -inf at \(channel 3, bin 5\)"),
], ids=["std-nan", "std-inf", "std-negative", "mean-inf"])
def test_load_refuses_non_finite_values_and_negative_std(tmp_path, key, value, message):
    mean, std = _full_scaler()
    getattr(scaler_lib.Scaler(mean, std), key)[5, 3] = value
    path = tmp_path / "feature_scaler.h5"
    _write_reference_scaler(path, mean, std)
    with pytest.raises(ValueError, match=rf"feature scaler {path}: {message} \(1 such entries\)"):
        scaler_lib.load_scaler(path)


def test_load_refuses_a_scaler_of_other_than_64_bins(tmp_path):
    path = tmp_path / "feature_scaler.h5"
    _write_reference_scaler(path, np.zeros((32, 16)), np.ones((32, 16)))
    with pytest.raises(ValueError, match=rf"feature scaler {path}: mean \(32, 16\) and std \(32, 16\) "
                                         r"must both be \(64 bins, channels\)"):
        scaler_lib.load_scaler(path)


def test_result_refuses_non_finite_features_and_update_negative_weights():
    x = np.random.default_rng(0).normal(size=(2, 960, 64, 2))
    x[0, 3, 4, 1] = np.nan
    accumulator = scaler_lib.ScalerAccumulator()
    accumulator.update(x)
    with pytest.raises(ValueError, match=r"mean is nan at \(channel 1, bin 4\)"):
        accumulator.result()
    with pytest.raises(ValueError, match=r"weights must be finite counts >= 0, got \[ 1\. -1\.\]"):
        scaler_lib.ScalerAccumulator().update(np.ones((2, 5, 64, 2)), np.array([1, -1]))


def test_save_and_normalise_refuse_a_scaler_of_the_wrong_layout(tmp_path):
    path = tmp_path / "feature_scaler.h5"
    channels_first = scaler_lib.Scaler(np.zeros((16, 64), np.float32), np.ones((16, 64), np.float32))
    with pytest.raises(ValueError, match=r"mean \(16, 64\) and std \(16, 64\) must both be \(64 bins"):
        scaler_lib.save_scaler(path, channels_first)
    nan_std = _full_scaler()
    nan_std.std[0, 0] = np.nan
    with pytest.raises(ValueError, match=r"std is nan at \(channel 0, bin 0\)"):
        scaler_lib.save_scaler(path, nan_std)
    assert not path.exists()
    one_channel_std = scaler_lib.Scaler(np.zeros((64, 16), np.float32), np.ones((64, 1), np.float32))
    with pytest.raises(ValueError, match=r"scaler mean \(64, 16\) and std \(64, 1\) must both be"):
        scaler_lib.normalise(np.zeros((1, 4, 64, 16), np.float32), one_channel_std)


def test_the_file_is_channels_first_as_the_reference_stores_it_and_round_trips(tmp_path):
    """SPEC section 4: mean/std on disk are (C, 1, 64) float32, value [c, 0, b] the statistic of
    bin b of channel c; loading gives the (64, C) scaler back exactly."""
    rng = np.random.default_rng(5)
    scaler = scaler_lib.Scaler(rng.normal(size=(64, 3)).astype(np.float32),
                               rng.uniform(0.5, 2, (64, 3)).astype(np.float32))
    path = tmp_path / "feature_scaler.h5"
    scaler_lib.save_scaler(path, scaler)
    with h5py.File(path, "r") as f:
        for key in ("mean", "std"):
            stored = f[key][()]
            assert stored.shape == (3, 1, 64) and stored.dtype == np.float32
            for c, b in ((0, 0), (2, 5), (1, 63)):
                assert stored[c, 0, b] == getattr(scaler, key)[b, c]
    loaded = scaler_lib.load_scaler(path)
    np.testing.assert_array_equal(loaded.mean, scaler.mean)
    np.testing.assert_array_equal(loaded.std, scaler.std)


def test_normalise_refuses_features_of_other_bins_or_channels():
    scaler = scaler_lib.Scaler(np.zeros((64, 16), np.float32), np.ones((64, 16), np.float32))
    for shape in ((1, 4, 64, 1), (1, 4, 32, 16)):  # would broadcast, or not fit
        with pytest.raises(AssertionError):
            scaler_lib.normalise(np.zeros(shape, np.float32), scaler)


def test_one_example_without_a_batch_axis_counts_as_a_batch_of_one():
    x = np.random.default_rng(6).normal(size=(5, 64, 2))
    single, batched = scaler_lib.ScalerAccumulator(), scaler_lib.ScalerAccumulator()
    single.update(x)
    batched.update(x[None])
    assert single.count == batched.count == 5
    np.testing.assert_array_equal(single.mean, batched.mean)
    np.testing.assert_array_equal(single.m2, batched.m2)


def test_result_is_float32_and_only_an_exactly_zero_std_becomes_one(caplog):
    """SPEC section 4 replaces a zero std; a tiny, genuine one (a near-constant bin) is kept."""
    x = np.ones((2, 10, 64, 1))
    x[0, 0, 3, 0] += 1e-6  # bin 3 varies a little; every other bin is constant
    accumulator = scaler_lib.ScalerAccumulator()
    accumulator.update(x)
    with caplog.at_level(logging.WARNING):
        result = accumulator.result()
    assert result.mean.dtype == result.std.dtype == np.float32
    np.testing.assert_allclose(result.std[3, 0], x[:, :, 3, 0].std(), rtol=1e-6)
    assert 0 < result.std[3, 0] < 1e-6
    assert (np.delete(result.std[:, 0], 3) == 1.0).all()


def test_load_names_a_dataset_that_is_not_numeric(tmp_path):
    path = tmp_path / "feature_scaler.h5"
    with h5py.File(path, "w") as f:
        f["mean"] = np.array([[[b"text"] * 64]] * 2)
        f["std"] = np.ones((2, 1, 64), np.float32)
    with pytest.raises(ValueError, match=rf"feature scaler {path}: 'mean' is not a numeric dataset"):
        scaler_lib.load_scaler(path)
