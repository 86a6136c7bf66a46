"""The feature scaler (SPEC section 4): per channel and per bin mean and standard deviation.

In memory a `Scaler` is channels-last, `mean`/`std` of shape (64, C) float32, broadcasting
against features (..., 960, 64, C). On disk (`feature_scaler.h5`) it keeps the reference's
channels-first layout: datasets `mean` and `std` of shape (C, 1, 64) float32, and root
attributes saying where it comes from: `features` (the feature type) and, for the scaler of a
store, its `condition` and `index_sha256`. Files of the reference (and of older asd-jax) have
no attributes; `load_scaler(..., features=...)` refuses a file that records another feature type.
Every scaler is (64 bins, C) with a finite mean and a finite std >= 0, checked where one is
computed, saved or loaded.

Statistics are accumulated in float64 with Chan et al.'s pairwise update, so one pass over
the training chunks in any batch order gives numpy's `mean`/`std` (ddof 0) over all chunks
and frames. A zero std becomes 1, with a warning, both when a scaler is computed and when one
is loaded (SPEC section 4; the reference divides by it): `zero_std_policy="keep"` keeps it.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Mapping, NamedTuple

import chex
import h5py
import jax.numpy as jnp
import numpy as np
from absl import logging

from asd_jax import atomic
from asd_jax import constants


class Scaler(NamedTuple):
    """mean, std: (n_bins, n_channels) float32, channels-last."""

    mean: np.ndarray
    std: np.ndarray


def normalise(features: chex.Array, scaler: Scaler) -> chex.Array:
    """(features - mean) / std. features: (..., frames, n_bins, C); mean and std both
    (n_bins, C); jit-able."""
    if np.ndim(scaler.mean) != 2 or np.shape(scaler.mean) != np.shape(scaler.std):
        raise ValueError(f"scaler mean {np.shape(scaler.mean)} and std {np.shape(scaler.std)} must "
                         "both be (bins, channels)")
    chex.assert_equal_shape_suffix([features, scaler.mean], 2)
    return (features - scaler.mean) / scaler.std


ZERO_STD_POLICIES = ("one", "keep")


def check_values(mean: np.ndarray, std: np.ndarray, what: str) -> None:
    """ValueError naming `what` unless mean and std are both (64, C) (bins, channels), mean is
    finite and std finite and >= 0; the first bad entry is named by (channel, bin)."""
    mean_shape, std_shape = np.shape(mean), np.shape(std)
    if len(mean_shape) != 2 or mean_shape != std_shape or mean_shape[0] != constants.N_FEATURE_BINS:
        raise ValueError(f"{what}: mean {mean_shape} and std {std_shape} must both be "
                         f"({constants.N_FEATURE_BINS} bins, channels)")
    for name, value, good in (("mean", mean, np.isfinite(mean)),
                              ("std", std, np.isfinite(std) & (np.asarray(std) >= 0))):
        if not good.all():
            bins, chans = np.nonzero(~good)
            raise ValueError(f"{what}: {name} is {value[bins[0], chans[0]]} at (channel {chans[0]}, "
                             f"bin {bins[0]}) ({len(bins)} such entries); expected a finite mean and "
                             "a finite std >= 0")


def _check_policy(zero_std_policy: str) -> None:
    if zero_std_policy not in ZERO_STD_POLICIES:
        raise ValueError(f"zero_std_policy must be one of {ZERO_STD_POLICIES}, got {zero_std_policy!r}")


def apply_zero_std_policy(std: np.ndarray, zero_std_policy: str, what: str) -> np.ndarray:
    """std (F, C) with its zero entries handled by `zero_std_policy`.

    The reference divides by a zero standard deviation (a constant bin becomes inf/nan).
    "one" (default) replaces a zero std by 1 and logs which (channel, bin) entries it changed,
    naming `what` (the scaler or its file); "keep" keeps the zero (reference behaviour).
    """
    _check_policy(zero_std_policy)
    zero = std == 0.0
    if zero.any() and zero_std_policy == "one":
        bins, chans = np.nonzero(zero)
        where = ", ".join(f"(channel {c}, bin {b})" for b, c in zip(bins[:10], chans[:10]))
        more = "" if zero.sum() <= 10 else f" and {zero.sum() - 10} more"
        logging.warning("%s: zero standard deviation at %s%s; using std 1 there (the reference "
                        "would divide by zero)", what, where, more)
        std = np.where(zero, np.ones_like(std), std)
    return std


@dataclasses.dataclass
class ScalerAccumulator:
    """Streaming float64 mean/variance over every (chunk, frame) of features (N, T, F, C).

    count: frames accumulated so far (weighted); mean, m2: (F, C) float64 running mean and sum
    of squared deviations (None before the first batch). `result(zero_std_policy)` gives the
    `Scaler`.
    """

    count: int = 0
    mean: np.ndarray | None = None
    m2: np.ndarray | None = None

    def update(self, features: np.ndarray, weights: np.ndarray | None = None) -> None:
        """Adds a batch of features (N, T, F, C) or (T, F, C).

        weights: optional (N,) counts: example n stands for `weights[n]` identical examples
        (the 11 cameras of a rig share one audio chunk, so its features are computed once and
        counted once per camera that uses it).
        """
        x = np.asarray(features, dtype=np.float64)
        if x.ndim == 3:
            x = x[None]
        chex.assert_rank(x, 4)
        w = np.ones(x.shape[0]) if weights is None else np.asarray(weights, np.float64)
        chex.assert_shape(w, (x.shape[0],))
        if not (np.isfinite(w) & (w >= 0)).all():
            raise ValueError(f"weights must be finite counts >= 0, got {w}")
        if x.shape[0] == 0 or w.sum() == 0:
            return
        frames = x.shape[1]
        example_means = x.mean(axis=1)  # (N, F, C)
        example_m2 = ((x - example_means[:, None]) ** 2).sum(axis=1)
        n = frames * w.sum()
        batch_mean = np.einsum("n,nfc->fc", w, example_means) * (frames / n)
        batch_m2 = np.einsum("n,nfc->fc", w, example_m2 + frames * (example_means - batch_mean) ** 2)
        self._combine(n, batch_mean, batch_m2)

    def merge(self, other: "ScalerAccumulator") -> None:
        """Adds the statistics of `other` (features accumulated elsewhere, e.g. by another
        process): the result is that of one accumulator fed both sets of batches, up to float64
        rounding. `other` is left unchanged."""
        if other.mean is not None:  # copies: no array is shared with `other`
            self._combine(other.count, other.mean.copy(), other.m2.copy())

    def _combine(self, n, batch_mean: np.ndarray, batch_m2: np.ndarray) -> None:
        """Chan et al.'s update with a set of `n` frames of mean `batch_mean` and sum of
        squared deviations `batch_m2`, both (F, C) float64."""
        if self.mean is None:
            self.count, self.mean, self.m2 = n, batch_mean, batch_m2
            return
        if batch_mean.shape != self.mean.shape:
            raise ValueError(
                f"feature shape (..., {batch_mean.shape[0]}, {batch_mean.shape[1]}) does not match "
                f"earlier batches (..., {self.mean.shape[0]}, {self.mean.shape[1]})")
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + batch_m2 + delta**2 * (self.count * n / total)
        self.count = total

    def result(self, zero_std_policy: str = "one") -> Scaler:
        """The scaler (float32); see `apply_zero_std_policy` for zero_std_policy ("one" or "keep")."""
        _check_policy(zero_std_policy)
        if self.mean is None:
            raise ValueError("no features were accumulated: the training set is empty")
        std = np.sqrt(self.m2 / self.count)
        check_values(self.mean, std, "feature scaler of the accumulated features")
        std = apply_zero_std_policy(std, zero_std_policy, "feature scaler")
        return Scaler(self.mean.astype(np.float32), std.astype(np.float32))


def save_scaler(path: str | os.PathLike, scaler: Scaler, features: str | None = None,
                origin: Mapping[str, str] | None = None) -> None:
    """Writes `feature_scaler.h5` (mean/std as (C, 1, 64) float32) atomically.

    scaler: mean/std (64, C), channels-last. features: the feature type it was computed from,
    recorded as the attribute `features`; origin: further string attributes (a store's
    `condition` and `index_sha256`).
    """
    check_values(scaler.mean, scaler.std, f"feature scaler for {path}")
    attrs = dict(origin or {})
    if features is not None:
        attrs["features"] = features
    with atomic.partial_path(path) as tmp, h5py.File(tmp, "w") as f:
        for key, value in attrs.items():
            f.attrs[key] = str(value)
        for key in ("mean", "std"):
            value = np.asarray(getattr(scaler, key), np.float32)  # (F, C)
            f.create_dataset(key, data=value.T[:, None, :])


def load_scaler(path: str | os.PathLike, zero_std_policy: str = "one",
                features: str | None = None) -> Scaler:
    """Reads a `feature_scaler.h5` written by asd-jax or by the reference (any float dtype).

    mean and std must both be (C, 1, 64), mean finite and std finite and >= 0. A zero std
    (possible in a reference-made file) is handled as in `ScalerAccumulator.result`: by default
    it becomes 1 and is logged. features: the feature type the caller uses; a file that records
    another one is a ValueError (a file that records none, as the reference's, is accepted).
    """
    _check_policy(zero_std_policy)
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"feature scaler {path} does not exist")
    try:
        f = h5py.File(path, "r")
    except OSError as error:  # not an HDF5 file, or an unreadable one
        raise ValueError(f"feature scaler {path} is not a readable HDF5 file ({error}); expected "
                         "the feature_scaler.h5 of experiments.make_hdf5 or of a training "
                         "workdir") from error
    with f:
        missing = [k for k in ("mean", "std") if k not in f]
        if missing:
            raise ValueError(f"feature scaler {path} lacks dataset(s) {missing}: expected 'mean' and 'std'")
        stored = f.attrs.get("features")
        stored = stored.decode() if isinstance(stored, bytes) else stored
        if features is not None and stored is not None and stored != features:
            raise ValueError(f"feature scaler {path} was computed from {stored!r} features, but "
                             f"{features!r} features are used here; use the scaler of a "
                             f"{features!r} store or training run")
        arrays = {}
        for key in ("mean", "std"):
            if not isinstance(f[key], h5py.Dataset) or f[key].dtype.kind not in "fiu":
                raise ValueError(f"feature scaler {path}: {key!r} is not a numeric dataset")
            value = np.asarray(f[key], dtype=np.float32)
            if value.ndim != 3 or value.shape[1] != 1:
                raise ValueError(f"feature scaler {path}: {key!r} has shape {value.shape}, "
                                 "expected (channels, 1, bins)")
            arrays[key] = value
    if arrays["mean"].shape != arrays["std"].shape:
        raise ValueError(f"feature scaler {path}: 'mean' has shape {arrays['mean'].shape} but 'std' "
                         f"{arrays['std'].shape}; expected the same (channels, 1, bins) for both")
    mean, std = (arrays[key][:, 0, :].T for key in ("mean", "std"))  # (F, C)
    check_values(mean, std, f"feature scaler {path}")
    return Scaler(mean, apply_zero_std_policy(std, zero_std_policy, f"feature scaler {path}"))


def to_device(scaler: Scaler) -> Scaler:
    """The scaler as jax arrays (for use inside jitted steps)."""
    return Scaler(jnp.asarray(scaler.mean), jnp.asarray(scaler.std))
