"""Training inputs: sources of camera-chunk examples and a prefetching, restartable batch iterator.

A `ChunkSource` holds N examples (one camera's 2-s chunk each) and loads any subset of them:

    batch = source.load(indices)
    batch["features"]         (B, 960, 64, C) float32, channels-last, NOT normalised; a numpy
                              array, or a jax.Array for a source made with keep_on_device=True
    batch["cams"]             (B, 11) float32 camera one-hot
    batch["target_coords"]    (B, 60) float32 x in [0, 1] per video frame
    batch["pseudo_labels"]    (B, 60) float32 1 = the position label is valid
    batch["speech_activity"]  (B, 60) float32 1 = speaking

Two implementations give the same batches:
- `HDF5Source`: a `development_dataset.h5` store (asd-jax's reference or compact layout, or a
  float64 store written by the reference).
- `OnTheFlySource`: reads the microphone WAVs of the batch and computes its features with one
  jitted call (on the accelerator when there is one). The 11 cameras of a rig hear the same
  audio, so each distinct (sequence, rig, start) audio chunk of a batch is computed once.
With `keep_on_device=True` either source returns its features as a `jax.Array` made on the
devices (the training loop's choice when it does not cache them): each of the source's
`devices` makes the features of its contiguous slice of the batch, the slice the training loop
shards to it; on-the-fly features stay where they were computed, a store's rows are uploaded as
stored and laid out channels-last there.

Iteration order is a pure function of (seed, epoch): `epoch_permutation`. `iterate_batches`
loads batches in a background thread (`prefetch` batches ahead) so host reading overlaps device
compute, and restarts at any batch for exact resume.

Multi-host: each global batch of `batch_size` examples is split into `process_count` contiguous
slices; process p loads slice p (`batch_size / process_count` examples). `batch_size` must be
divisible by `process_count`; a last, shorter batch must split evenly too (a ValueError
otherwise) unless `drop_last` drops it.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import queue
import threading
from typing import Any, Iterable, Iterator, Protocol, Sequence

import chex
import h5py
import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from asd_jax import constants
from asd_jax import features as features_lib
from asd_jax import scaler as scaler_lib
from asd_jax.data import tragictalkers

STORE_NAME = "development_dataset.h5"
LABEL_KEYS = ("target_coords", "pseudo_labels", "speech_activity")
DEVICE_AXIS = "devices"  # the mesh axis a source splits a batch over (keep_on_device)


class ChunkSource(Protocol):
    """N camera-chunk examples; see the module docstring for what `load` returns.

    sequences: (N,) str sequence name of each example (for cross-validation folds).
    feature_groups: (N,) int64; examples with equal group have identical features (same audio).
    num_channels: C, the feature channel count.
    """

    sequences: np.ndarray
    feature_groups: np.ndarray
    num_channels: int

    def __len__(self) -> int: ...

    def load(self, indices: np.ndarray) -> dict[str, np.ndarray | jax.Array]: ...


def _check_indices(indices: Any, n: int, what: str) -> np.ndarray:
    indices = np.asarray(indices, np.int64).reshape(-1)
    if indices.size and (indices.min() < 0 or indices.max() >= n):
        raise IndexError(f"{what}: example indices must lie in [0, {n}), got "
                         f"[{indices.min()}, {indices.max()}]")
    return indices


def _check_batch(batch: dict[str, np.ndarray | jax.Array],
                 num_channels: int) -> dict[str, np.ndarray | jax.Array]:
    b = batch["features"].shape[0]
    chex.assert_shape(batch["features"], (b, constants.N_FEATURE_FRAMES, constants.N_FEATURE_BINS,
                                          num_channels))
    chex.assert_shape(batch["cams"], (b, constants.N_CAMERAS_PER_RIG))
    chex.assert_shape([batch[k] for k in LABEL_KEYS if k in batch], (b, constants.CHUNK_VIDEO_FRAMES))
    chex.assert_type(list(batch.values()), np.float32)
    return batch


# ---- on-the-fly features ------------------------------------------------------------------

def _bucket(n: int, cap: int) -> int:
    """Static batch size for n audio chunks: the next power of two, at most `cap` (>= n)."""
    return max(n, min(1 << max(n - 1, 0).bit_length(), cap))


def _source_mesh(devices: Sequence[jax.Device], num_examples: int) -> Mesh:
    """The devices a batch of `num_examples` is made on: all of `devices` when they split it
    evenly, else the first only."""
    devices = list(devices) if num_examples % len(devices) == 0 else list(devices)[:1]
    return Mesh(np.asarray(devices), (DEVICE_AXIS,))


def _split_over_devices(groups: np.ndarray, num_devices: int) -> tuple[list[np.ndarray], int, np.ndarray]:
    """How `num_devices` devices share the work of a batch whose examples have feature `groups`.

    Device d takes the d-th of `num_devices` contiguous equal slices of the examples (as the
    training loop shards a batch) and makes the features of its slice's distinct groups only.
    Returns (distinct, per_device, example_row): distinct[d], the sorted distinct groups of
    device d; per_device, the rows every device is given (>= each len(distinct[d]), a bucket
    size, so that few shapes are compiled; the rows past len(distinct[d]) are zeros, never
    gathered); example_row (B,) int32, each example's row among its device's rows.
    """
    slices = np.split(np.asarray(groups), num_devices)
    distinct, example_row = zip(*(np.unique(s, return_inverse=True) for s in slices))
    per_device = _bucket(max(len(d) for d in distinct), len(groups) // num_devices)
    return list(distinct), per_device, np.concatenate(example_row).astype(np.int32)


def _on_each_device(fn, mesh: Mesh, rows: np.ndarray, example_row: np.ndarray) -> jax.Array:
    """fn(device's rows, its examples' row numbers) on every device of `mesh`, from host arrays.

    rows: (D * U, ...), device d's U rows first-axis block d; example_row: (B,) int32, device
    d's B / D entries (block d) index its own rows. Each device is sent only its blocks (one
    host-to-device copy each, none through another device) and computes without communicating;
    the result is (B, ...) sharded over the mesh, device d holding examples block d.
    """
    sharding = NamedSharding(mesh, PartitionSpec(DEVICE_AXIS))
    return _per_device_call(fn, mesh, *jax.device_put((rows, example_row), sharding))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _per_device_call(fn, mesh: Mesh, rows: jax.Array, example_row: jax.Array) -> jax.Array:
    spec = PartitionSpec(DEVICE_AXIS)
    return jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=spec)(rows, example_row)


@functools.lru_cache(maxsize=None)
def _features_of_rows(name: str):
    """(U, 96000, 16) audio chunks, (B,) int32 row of each example -> (B, 960, 64, C) float32
    (one function per feature name, so that the jitted call above is compiled once per shape)."""
    return lambda audio, example_row: features_lib.compute(name, audio)[example_row]


class OnTheFlySource:
    """Examples of a TragicTalkers data root whose features are computed per batch.

    Args:
      data_root: a TragicTalkers layout (real or synthetic).
      condition: one of the 8 supervisory conditions (labels of the development split).
      features: a name in `asd_jax.features.FEATURES`.
      split: "development" (labelled, 1-s hop) or "test" (2-s hop, batches without labels).
      sequences: restrict to these sequences (each must occur in the split's CSV).
      keep_on_device: `load` returns the features as a `jax.Array` on the devices that
        computed them instead of copying them to the host, for a consumer that puts them on the
        devices anyway. On an accelerator that saves two transfers per batch: at batch 32,
        ~126 MB each way for 16-channel features, ~950 MB for `gcc_phat_all`.
      devices: with keep_on_device, the devices of this process that `load` splits a batch over
        (default: the first local device). Device d computes the features of the d-th
        contiguous slice of the examples, which is what the training loop's device d trains on (it
        passes its mesh's devices, in order); a batch that does not split evenly is made on
        the first device. Without keep_on_device, the features are made on the first local
        device and copied to the host.

    All microphone files are checked at construction (mono, 48 kHz; float WAVs for NaN / inf).
    """

    def __init__(self, data_root: str | os.PathLike, condition: str = "GT_GT",
                 features: str = "gcc_phat", split: str = "development",
                 sequences: Sequence[str] | None = None, *, keep_on_device: bool = False,
                 devices: Sequence[jax.Device] | None = None):
        dataset = tragictalkers.TragicTalkers(data_root)
        if split == "development":
            index = dataset.development_chunks(condition, sequences)
        elif split == "test":
            index = dataset.test_chunks(sequences)
        else:
            raise ValueError(f"unknown split {split!r}: expected 'development' or 'test'")
        self._init(dataset, index, features, keep_on_device, devices)

    @classmethod
    def from_index(cls, dataset: tragictalkers.TragicTalkers, index: tragictalkers.ChunkIndex,
                   features: str) -> "OnTheFlySource":
        """A source over an existing chunk index (used by the store builder), host features."""
        source = cls.__new__(cls)
        source._init(dataset, index, features, keep_on_device=False, devices=None)
        return source

    def _init(self, dataset: tragictalkers.TragicTalkers, index: tragictalkers.ChunkIndex,
              features: str, keep_on_device: bool, devices: Sequence[jax.Device] | None) -> None:
        if features not in features_lib.FEATURES:
            raise ValueError(f"unknown features {features!r}: expected one of {list(features_lib.FEATURES)}")
        dataset.check_audio(index)
        self.dataset, self.index, self.features = dataset, index, features
        self.keep_on_device = keep_on_device
        self.devices = _check_devices(devices, keep_on_device, "OnTheFlySource")
        self.num_channels = features_lib.num_channels(features, constants.N_MICS)
        self.sequences = index.sequence
        self.feature_groups = index.audio_id
        self._cams = index.cams

    def __len__(self) -> int:
        return len(self.index)

    def load(self, indices: np.ndarray) -> dict[str, np.ndarray | jax.Array]:
        """The examples `indices` (features a jax.Array with `keep_on_device`, see the class)."""
        indices = _check_indices(indices, len(self), "OnTheFlySource.load")
        if not indices.size:
            raise ValueError("OnTheFlySource.load: no example indices given")
        mesh = _source_mesh(self.devices, len(indices))
        chunks, per_device, example_row = _split_over_devices(self.index.audio_id[indices], mesh.size)
        audio = np.empty((mesh.size * per_device, constants.CHUNK_SAMPLES, constants.N_MICS), np.float32)
        for d, ids in enumerate(chunks):  # zero rows pad each device's chunks to a static count
            audio[d * per_device + len(ids):(d + 1) * per_device] = 0.0
        rows = [d * per_device + u for d, ids in enumerate(chunks) for u in range(len(ids))]
        keys = [self.index.audio_keys[c] for ids in chunks for c in ids]
        self.dataset.load_audio(self.index.split, keys, out=audio, rows=rows)
        features = _on_each_device(_features_of_rows(self.features), mesh, audio, example_row)
        batch = {"features": features if self.keep_on_device else np.asarray(features),
                 "cams": self._cams[indices]}
        if self.index.has_labels:
            batch.update({k: getattr(self.index, k)[indices] for k in LABEL_KEYS})
        return _check_batch(batch, self.num_channels)


def _check_devices(devices: Sequence[jax.Device] | None, keep_on_device: bool,
                   what: str) -> tuple[jax.Device, ...]:
    """The devices a source makes its batches on (see `OnTheFlySource`), checked."""
    if devices is not None and not keep_on_device:
        raise ValueError(f"{what}: devices are only used with keep_on_device=True")
    if devices is None:
        return (jax.local_devices()[0],)
    devices = tuple(devices)
    foreign = [d for d in devices if d.process_index != jax.process_index()]
    if not devices or foreign or len(set(devices)) != len(devices):
        raise ValueError(f"{what}: devices must be distinct local devices of this process, got "
                         f"{list(devices)}")
    return devices


# ---- HDF5 store -----------------------------------------------------------------------------

def _read_rows(dataset: h5py.Dataset, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """dataset[rows] as float32, for sorted unique `rows`, one contiguous run of rows per read.

    h5py's own `dataset[rows]` (a point selection) takes ~60x as long for these 4 MB rows:
    8 rows of a compact store in 0.63 s against 0.011 s here, which starved training.
    out: a float32 array of >= len(rows) rows to fill (and return); its rows after `rows`'
    are set to zero.
    """
    if out is None:
        out = np.empty((len(rows), *dataset.shape[1:]), np.float32)
    elif out.dtype != np.float32 or len(out) < len(rows) or out.shape[1:] != dataset.shape[1:]:
        raise ValueError(f"out must be a float32 array of >= {len(rows)} rows of shape "
                         f"{dataset.shape[1:]}, got {out.dtype} {out.shape}")
    out[len(rows):] = 0.0
    starts = np.flatnonzero(np.diff(rows, prepend=-2) != 1)  # where a run of consecutive rows begins
    for begin, end in zip(starts, [*starts[1:], len(rows)]):
        first = int(rows[begin])
        dataset.read_direct(out, np.s_[first:first + end - begin], np.s_[begin:end])
    return out


def _channels_last_examples(stored: jax.Array, example_row: jax.Array) -> jax.Array:
    """(U, C, 960, 64) stored rows, (B,) int32 row of each example -> (B, 960, 64, C)."""
    return jnp.transpose(stored, (0, 2, 3, 1))[example_row]


class HDF5Source:
    """Examples of a `development_dataset.h5` store (see `asd_jax.data.store` for the layouts).

    Features are read per batch (any float dtype, returned as float32 channels-last); labels,
    one-hots and sequence names are held in memory.

    keep_on_device: `load` puts the batch's distinct stored rows on the device as they are
    stored (channels-first) and returns the features as a `jax.Array` made there (transposed
    to channels-last and repeated per example), for a consumer that puts them on the device
    anyway: the host then only reads the file. On the 2-core host the transpose and the
    per-example copy took ~100 ms of the ~170 ms of a batch of 32 (compact store), ~0.5 ms on
    a GPU.
    devices: with keep_on_device, the devices of this process that `load` splits a batch
    over, as `OnTheFlySource`'s: device d is sent the stored rows of the d-th contiguous slice
    of the examples and lays out that slice.
    """

    def __init__(self, path: str | os.PathLike, *, keep_on_device: bool = False,
                 devices: Sequence[jax.Device] | None = None):
        self.path = pathlib.Path(path)
        self.keep_on_device = keep_on_device
        self.devices = _check_devices(devices, keep_on_device, f"HDF5Source({self.path})")
        if self.path.name.endswith(".partial"):
            raise ValueError(f"{self.path} is an unfinished store (a .partial file); finish it with "
                             "experiments.make_hdf5 first")
        if not self.path.is_file():
            raise FileNotFoundError(f"HDF5 store {self.path} does not exist")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as e:  # h5py's errors name no file: a truncated or foreign file
            raise ValueError(f"HDF5 store {self.path} cannot be read ({e}); expected the "
                             f"{STORE_NAME} of experiments.make_hdf5 (or of the reference)") from None
        f = self._file
        if not f.attrs.get("asd_jax_complete", True):
            raise ValueError(f"{self.path} is marked incomplete")
        self.compact = "feature_index" in f
        feature_key = "rig_features" if self.compact else "features"
        required = [feature_key, "cams", "sequence", *LABEL_KEYS]
        missing = [k for k in required if k not in f]
        if missing:
            raise ValueError(f"{self.path} is not a development store: missing dataset(s) {missing}")
        self._features = f[feature_key]
        shape = self._features.shape
        if len(shape) != 4 or shape[2:] != (constants.N_FEATURE_FRAMES, constants.N_FEATURE_BINS):
            raise ValueError(f"{self.path}: {feature_key!r} has shape {shape}, expected "
                             f"(N, C, {constants.N_FEATURE_FRAMES}, {constants.N_FEATURE_BINS})")
        self.num_channels = shape[1]
        n = len(f["sequence"])
        self._cams = np.asarray(f["cams"], np.float32).reshape(n, -1)
        self._labels = {k: np.asarray(f[k], np.float32) for k in LABEL_KEYS}
        self.sequences = np.array([s.decode() if isinstance(s, bytes) else str(s) for s in f["sequence"][()]])
        if self.compact:
            index = f["feature_index"]
            if index.shape != (n,) or index.dtype.kind not in "iu":
                raise ValueError(f"{self.path}: 'feature_index' is {index.dtype} of shape {index.shape}, "
                                 f"expected integers of shape ({n},) (one per 'sequence' entry)")
            self.feature_groups = np.asarray(index, np.int64)
            if n and (self.feature_groups.min() < 0 or self.feature_groups.max() >= shape[0]):
                raise ValueError(f"{self.path}: 'feature_index' holds rows [{self.feature_groups.min()}, "
                                 f"{self.feature_groups.max()}], but 'rig_features' has {shape[0]} rows")
        else:
            self.feature_groups = np.arange(n, dtype=np.int64)
            if shape[0] != n:
                raise ValueError(f"{self.path}: 'features' has {shape[0]} rows, 'sequence' {n}")
        for key, value in {"cams": self._cams, **self._labels}.items():
            expected = constants.N_CAMERAS_PER_RIG if key == "cams" else constants.CHUNK_VIDEO_FRAMES
            if value.shape != (n, expected):
                raise ValueError(f"{self.path}: {key!r} has shape {value.shape}, expected ({n}, {expected})")
        self.attrs = dict(json.loads(f.attrs["asd_jax_args"])) if "asd_jax_args" in f.attrs else {}

    def __len__(self) -> int:
        return len(self.sequences)

    def load(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        indices = _check_indices(indices, len(self), f"HDF5Source({self.path}).load")
        if self.keep_on_device:
            mesh = _source_mesh(self.devices, len(indices))
            rows, per_device, example_row = _split_over_devices(self.feature_groups[indices], mesh.size)
            stored = np.empty((mesh.size * per_device, *self._features.shape[1:]), np.float32)
            for d, device_rows in enumerate(rows):
                _read_rows(self._features, device_rows, stored[d * per_device:(d + 1) * per_device])
            features = _on_each_device(_channels_last_examples, mesh, stored, example_row)
        else:
            rows, inverse = np.unique(self.feature_groups[indices], return_inverse=True)
            stored = _read_rows(self._features, rows)  # (U, C, 960, 64), the store is channels-first
            features = np.ascontiguousarray(stored.transpose(0, 2, 3, 1)[inverse])
        batch = {"features": features, "cams": self._cams[indices],
                 **{k: v[indices] for k, v in self._labels.items()}}
        return _check_batch(batch, self.num_channels)

    def close(self) -> None:
        self._file.close()


def open_source(*, data_root: str | os.PathLike | None = None, hdf5_dir: str | os.PathLike | None = None,
                condition: str = "GT_GT", features: str = "gcc_phat",
                keep_on_device: bool = False, devices: Sequence[jax.Device] | None = None) -> ChunkSource:
    """The development examples of `condition`/`features`, from a store or computed on the fly.

    Exactly one of `data_root` (on-the-fly features) or `hdf5_dir` (a directory holding
    `development_dataset.h5`) is given. A store made by asd-jax must have been built with the
    same condition and features; a reference-made store is checked for its channel count only.
    keep_on_device, devices: features come as jax.Arrays made on `devices` (see either source).
    """
    if (data_root is None) == (hdf5_dir is None):
        raise ValueError("give exactly one of data_root (on-the-fly features) or hdf5_dir (a store)")
    if data_root is not None:
        return OnTheFlySource(data_root, condition, features, keep_on_device=keep_on_device,
                              devices=devices)
    source = HDF5Source(pathlib.Path(hdf5_dir) / STORE_NAME, keep_on_device=keep_on_device,
                        devices=devices)
    for key, wanted in (("condition", condition), ("features", features)):
        if source.attrs and source.attrs.get(key) != wanted:
            raise ValueError(f"{source.path} was built with {key}={source.attrs.get(key)!r}, "
                             f"but {key}={wanted!r} was asked for")
    expected = features_lib.num_channels(features, constants.N_MICS)
    if source.num_channels != expected:
        raise ValueError(f"{source.path} has {source.num_channels} feature channels; "
                         f"{features!r} has {expected}")
    return source


# ---- iteration ------------------------------------------------------------------------------

def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """(n,) int64 permutation of range(n), a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64)


def batch_indices(n: int, batch_size: int, *, seed: int = 0, epoch: int = 0,
                  indices: np.ndarray | None = None, shuffle: bool = True, drop_last: bool = False,
                  process_index: int = 0, process_count: int = 1) -> list[np.ndarray]:
    """The example indices of every batch of one epoch, as loaded by process `process_index`.

    `indices` (default range(n)) are shuffled by `epoch_permutation(seed, epoch, len(indices))`
    when `shuffle`, cut into global batches of `batch_size` (the last one shorter unless
    `drop_last`), and each global batch into `process_count` contiguous equal slices.
    """
    if batch_size < 1 or process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"need batch_size >= 1 and 0 <= process_index < process_count, got "
                         f"{batch_size}, {process_index}, {process_count}")
    if batch_size % process_count:
        raise ValueError(f"batch_size {batch_size} is not divisible by process_count {process_count}")
    order = np.arange(n, dtype=np.int64) if indices is None else _check_indices(indices, n, "batch_indices")
    if shuffle:
        order = order[epoch_permutation(seed, epoch, len(order))]
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if batches and len(batches[-1]) < batch_size:
        if drop_last:
            batches.pop()
        elif len(batches[-1]) % process_count:
            raise ValueError(f"the last batch of {len(batches[-1])} examples cannot be split over "
                             f"{process_count} processes: use drop_last=True")
    slices = []
    for batch in batches:
        size = len(batch) // process_count
        slices.append(batch[process_index * size:(process_index + 1) * size])
    return slices


def num_batches(n: int | ChunkSource, batch_size: int, *, indices: np.ndarray | None = None,
                drop_last: bool = False, process_count: int = 1) -> int:
    """Batches per epoch (the same for every process and epoch)."""
    total = n if isinstance(n, int) else len(n)
    count = total if indices is None else len(indices)
    full, rest = divmod(count, batch_size)
    return full + int(bool(rest) and not drop_last)


def prefetch_iterator(items: Iterable[Any], prefetch: int) -> Iterator[Any]:
    """Iterates `items` in a background thread, up to `prefetch` items ahead.

    Exceptions of the producer are re-raised in the consumer; closing the generator stops the
    thread. prefetch <= 0 iterates synchronously.
    """
    if prefetch <= 0:
        yield from items
        return
    slots: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()
    done = object()

    def produce():
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        slots.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            slots.put((done, None))
        except BaseException as e:  # handed to the consumer
            slots.put((done, e))

    thread = threading.Thread(target=produce, name="asd_jax-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = slots.get()
            if item is done:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                slots.get(timeout=0.1)
            except queue.Empty:
                pass
        thread.join()


def iterate_batches(source: ChunkSource, batch_size: int, *, seed: int, epoch: int,
                    indices: np.ndarray | None = None, shuffle: bool = True, start_batch: int = 0,
                    drop_last: bool = False, prefetch: int = 2, process_index: int = 0,
                    process_count: int = 1) -> Iterator[dict[str, np.ndarray | jax.Array]]:
    """Batches of one epoch (see `batch_indices`), from batch `start_batch` on, loaded ahead."""
    plan = batch_indices(len(source), batch_size, seed=seed, epoch=epoch, indices=indices,
                         shuffle=shuffle, drop_last=drop_last, process_index=process_index,
                         process_count=process_count)
    if not 0 <= start_batch <= len(plan):
        raise ValueError(f"start_batch {start_batch} outside [0, {len(plan)}]")
    return prefetch_iterator((source.load(b) for b in plan[start_batch:]), prefetch)


# ---- feature scaler -------------------------------------------------------------------------

def feature_groups_plan(source: ChunkSource, indices: np.ndarray | None,
                        batch_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(representative examples, weights) batches covering each feature group of `indices` once."""
    indices = (np.arange(len(source), dtype=np.int64) if indices is None
               else _check_indices(indices, len(source), "feature_groups_plan"))
    _, first, counts = np.unique(source.feature_groups[indices], return_index=True, return_counts=True)
    reps = indices[first]
    return [(reps[i:i + batch_size], counts[i:i + batch_size]) for i in range(0, len(reps), batch_size)]


def compute_scaler(source: ChunkSource, indices: np.ndarray | None = None, batch_size: int = 16,
                   *, prefetch: int = 2, progress: bool = True,
                   zero_std_policy: str = "one") -> scaler_lib.Scaler:
    """Mean and std of the features of examples `indices` (default all) in one float64 pass.

    Features shared by several examples (the cameras of a rig) are loaded once and weighted by
    their number of examples. A zero std becomes 1 (logged) unless zero_std_policy="keep".
    """
    accumulator = accumulate_scaler(source, indices, batch_size, prefetch=prefetch, progress=progress)
    return accumulator.result(zero_std_policy)


def accumulate_scaler(source: ChunkSource, indices: np.ndarray | None = None, batch_size: int = 16,
                      *, prefetch: int = 2, progress: bool = True, process_index: int = 0,
                      process_count: int = 1) -> scaler_lib.ScalerAccumulator:
    """The float64 statistics behind `compute_scaler`, of this process's share of the work.

    The feature groups of `indices` are loaded `batch_size` at a time; with `process_count` > 1
    this process takes every `process_count`-th of those loads, starting at `process_index`, so
    the processes' accumulators merged (`ScalerAccumulator.merge`) cover every group once.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} must be in [0, process_count={process_count})")
    plan = feature_groups_plan(source, indices, batch_size)[process_index::process_count]
    accumulator = scaler_lib.ScalerAccumulator()
    loaded = prefetch_iterator(((source.load(reps)["features"], w) for reps, w in plan), prefetch)
    with tqdm.tqdm(loaded, total=len(plan), desc="feature scaler", disable=not progress) as bar:
        for feats, weights in bar:  # the bar is closed on an error or Ctrl-C too
            accumulator.update(feats, weights)
    return accumulator
