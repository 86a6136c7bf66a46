"""The training loop: `train_and_evaluate(config, workdir)`.

Data parallel from the start: a 1-D `jax.sharding.Mesh` over every device (axis "data"); each
batch is sharded over "data", the train state and the scaler are replicated. The jitted step
sees the global batch, so batch-norm statistics and gradients are over the global batch and N
devices compute what one computes. With several processes (`jax.distributed.initialize` done by
the caller) each process reads only its slice of every batch and computes its share of the
feature scaler (merged exactly, so all hold the same), and `train_and_evaluate` returns on every
process once process 0 has exported the model.

The workdir holds everything a run did: `config.json` (the full config plus `in_channels`; the
run can be recreated from it alone), `feature_scaler.h5`, `checkpoints/<step>/` (orbax: train
state + data position, at every epoch end and every `checkpoint_every_steps` steps),
`metrics.jsonl` (one row per epoch) and, at the end, the exported model (`model/`, loadable with
`asd_jax.checkpointing.load_model(workdir)`).

Exact resume: started again on the same workdir, the loop restores the latest checkpoint and
continues at the batch after it; epoch order comes from `epoch_permutation(seed, epoch, n)`, the
learning rate is in the state, so the resumed run computes the same steps on the same data as an
uninterrupted one. On CPU its final parameters are bit-identical. On GPU they are the same up to
floating-point nondeterminism: XLA's autotuning may pick other cuDNN/cuBLAS algorithms in the
restarted process (and some GPU kernels sum in a varying order), unless the runs set
XLA_FLAGS=--xla_gpu_deterministic_ops=true (slower: deterministic kernels, no autotuning).

Every check (config, model, data, batch split over the devices, an existing scaler or
checkpoint against the config) comes before anything is written to the workdir.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import math
import os
import pathlib
import socket
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from asd_jax import atomic
from asd_jax import constants
from asd_jax import distributed
from asd_jax import scaler as scaler_lib
from asd_jax import xla_cpu
from asd_jax.textfiles import excerpt, read_text
from asd_jax.data import tragictalkers
from asd_jax.training import checkpoints, folds, state as state_lib, steps
from asd_jax.training.configs import TrainConfig, read_config_json

DATA_AXIS = "data"
LOCK_FILE = ".lock"  # who holds the workdir's lock (`WorkdirLock.record_holder`)
BATCH_KEYS = ("features", "cams", "target_coords", "pseudo_labels", "speech_activity")
# Config fields that may differ between the run that wrote a workdir and the one resuming it.
_RESUMABLE_CHANGES = ("num_epochs", "checkpoint_every_steps", "checkpoints_to_keep", "prefetch",
                      "data_root", "hdf5_dir", "cache_features")


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss."""


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over `devices` (default: every device of every process), axis "data"."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def build_model(config: TrainConfig):
    """The CRNN of `config.model` computing in `config.compute_dtype` (params stay float32)."""
    from asd_jax import model as model_lib  # pylint: disable=import-outside-toplevel
    return model_lib.CRNN.from_config({**config.model, "dtype": config.compute_dtype})


def _replicate(tree: Any, sharding: NamedSharding) -> Any:
    """Host arrays -> global arrays with `sharding`, valid with one or several processes."""
    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
    return jax.tree.map(put, tree)


def _shard_batch(batch: dict[str, Any], mesh: Mesh, global_size: int) -> dict[str, jax.Array]:
    """This process's slice of a batch -> global arrays sharded over "data".

    Values are host arrays or, for features made on the devices (a source made with
    keep_on_device), jax.Arrays on this process's devices: those never pass through the host.
    Made by the source on the devices that train on them (`open_data` gives it the mesh's
    devices), they become the global batch as they are (`_from_local_devices`); made
    elsewhere, they are copied device to device. A batch whose global size is not a multiple
    of the device count (with one process: the last, partial batch of an epoch, or every batch
    of a batch size that does not divide) is replicated instead: it still computes the same
    (global) batch statistics.
    """
    batch = {k: v if isinstance(v, jax.Array) else np.asarray(v)
             for k, v in batch.items() if k in (*BATCH_KEYS, steps.MASK_KEY)}
    if global_size % mesh.size == 0:
        sharding = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
        return {k: _from_local_devices(v, sharding, (global_size, *v.shape[1:])) if isinstance(v, jax.Array)
                else jax.make_array_from_process_local_data(sharding, v, (global_size, *v.shape[1:]))
                for k, v in batch.items()}
    if jax.process_count() > 1:
        raise ValueError(f"a batch of {global_size} examples cannot be split over the {mesh.size} "
                         f"devices of {jax.process_count()} processes")
    return jax.device_put(batch, NamedSharding(mesh, PartitionSpec()))  # one process: all local


def _local_devices(mesh: Mesh) -> list[jax.Device]:
    """This process's devices of a 1-D mesh, in mesh order: the order in which they hold the
    process's slice of a batch sharded over the mesh (and in which a source splits it)."""
    return [d for d in mesh.devices.flat if d.process_index == jax.process_index()]


def _from_local_devices(local: jax.Array, sharding: NamedSharding, global_shape: tuple[int, ...]) -> jax.Array:
    """This process's slice of a batch (a jax.Array on its devices) -> the global array.

    The slice is first laid out as the global array holds it on this process's devices (each
    device its contiguous block, in mesh order): nothing moves when the slice is already so
    sharded, a device-to-device copy otherwise. Those blocks then make up the global array
    without a copy.
    """
    devices = _local_devices(sharding.mesh)
    local = jax.device_put(local, NamedSharding(Mesh(np.asarray(devices), (DATA_AXIS,)),
                                                PartitionSpec(DATA_AXIS)))
    blocks = {shard.device: shard.data for shard in local.addressable_shards}
    return jax.make_array_from_single_device_arrays(global_shape, sharding, [blocks[d] for d in devices])


def check_batch_split(config: TrainConfig, num_train: int, num_devices: int,
                      process_count: int) -> None:
    """Checks that every training batch splits over `num_devices` devices (before any write).

    With several processes every global batch must split evenly over the devices: batch_size
    and, unless drop_last, the last batch of an epoch (`num_train % batch_size` examples);
    else ValueError. With one process such a batch is replicated on every device instead,
    which is correct but not data parallel: a warning when that is every batch. (Validation
    batches are padded instead, see `_evaluate`.)
    """
    batch, rest = config.batch_size, num_train % config.batch_size
    if process_count > 1:
        if batch % num_devices:
            raise ValueError(f"batch_size {batch} does not split over the {num_devices} devices of "
                             f"{process_count} processes: use a multiple of {num_devices}")
        if rest and not config.drop_last and rest % num_devices:
            raise ValueError(
                f"the last batch of every epoch holds {rest} of the {num_train} training examples "
                f"(batch_size {batch}), which do not split over the {num_devices} devices of "
                f"{process_count} processes: use a batch_size that leaves a multiple of "
                f"{num_devices} (or none), or drop_last=True (in a new workdir: drop_last cannot "
                "change when a run resumes)")
    elif batch % num_devices:
        logging.warning("batch_size %d is not a multiple of the %d devices: every batch is "
                        "replicated on all of them (no data parallelism); use a multiple of %d",
                        batch, num_devices, num_devices)


def _device_prefetch(batches: Iterator[Any], put, size: int = 2) -> Iterator[Any]:
    """Yields put(batch) while the next `size` batches are already being transferred
    (device_put is asynchronous, so the copies overlap with the running step; 0: none ahead)."""
    queue = collections.deque()
    for batch in batches:
        queue.append(put(batch))
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


class CachedSource:
    """A ChunkSource that keeps what it loads in host memory (for small data sets).

    Features are kept once per feature group (the cameras of a rig share one audio chunk, so
    11 examples share one (960, 64, C) array), labels and cams once per example. `prefill`
    computes every group's features up front in a fixed plan, so a cached value never depends
    on which batch first asked for it (a resumed run gets bit-identical features).
    """

    def __init__(self, source):
        self._source = source
        self.sequences = source.sequences
        self.feature_groups = source.feature_groups
        self.num_channels = source.num_channels
        self._features: dict[int, np.ndarray] = {}
        self._rest: dict[int, dict[str, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self._source)

    def prefill(self, indices: np.ndarray, batch_size: int = 16, progress: bool = True) -> None:
        """Loads the features of every feature group of `indices`, `batch_size` groups a call."""
        from asd_jax.data import pipeline  # pylint: disable=import-outside-toplevel
        plan = pipeline.feature_groups_plan(self._source, np.asarray(indices, np.int64), batch_size)
        with tqdm.tqdm(plan, desc="caching features", disable=not progress, leave=False) as bar:
            for reps, _ in bar:  # the bar is closed (its line cleared) on an error or Ctrl-C too
                self.load(reps)

    def _labels_from_index(self, indices: list[int]) -> bool:
        """Fills labels and cams of `indices` from the source's chunk index, if it has one."""
        index = getattr(self._source, "index", None)
        if index is None or not getattr(index, "has_labels", False):
            return False
        cams = tragictalkers.camera_one_hot(index.camera[indices])  # only these rows: N can be large
        for row, i in enumerate(indices):
            self._rest[i] = {"cams": cams[row], **{k: getattr(index, k)[i] for k in
                                                   ("target_coords", "pseudo_labels", "speech_activity")}}
        return True

    def load(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        indices = [int(i) for i in indices]
        missing = sorted({i for i in indices if i not in self._rest})
        if missing and all(int(self.feature_groups[i]) in self._features for i in missing):
            # Features already held (e.g. loaded by the scaler pass): only labels are needed.
            if self._labels_from_index(missing):
                missing = []
        if missing:
            loaded = self._source.load(np.asarray(missing, np.int64))
            features = np.asarray(loaded["features"])  # one copy to the host, for any source
            for row, i in enumerate(missing):
                self._features.setdefault(int(self.feature_groups[i]), features[row])
                self._rest[i] = {k: np.asarray(v[row]) for k, v in loaded.items() if k != "features"}
        batch = {k: np.stack([self._rest[i][k] for i in indices]) for k in self._rest[indices[0]]}
        batch["features"] = np.stack([self._features[int(self.feature_groups[i])] for i in indices])
        return batch


def split_indices(sequences: Sequence[str], config: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) chunk indices for `config.fold` (validation empty when fold is None)."""
    sequences = np.asarray(sequences)
    everything = np.arange(len(sequences))
    if config.fold is None:
        return everything, everything[:0]
    fold = folds.cross_validation_folds(sequences.tolist(), config.num_folds, config.seed)[config.fold]
    in_validation = np.isin(sequences, fold.validation)
    return everything[~in_validation], everything[in_validation]


def _num_batches(num_examples: int, batch_size: int, drop_last: bool) -> int:
    return num_examples // batch_size if drop_last else math.ceil(num_examples / batch_size)


def _batch_sizes(num_examples: int, batch_size: int, drop_last: bool) -> list[int]:
    full, rest = divmod(num_examples, batch_size)
    return [batch_size] * full + ([rest] if rest and not drop_last else [])


def check_same_run(path: pathlib.Path, values: dict[str, Any], compare_fields: bool = True) -> None:
    """ValueError unless the config.json at `path`, if there is one, describes the run of
    `values` (a config dict plus extra keys): the same kind (cross-validation or not) and, when
    `compare_fields`, the same fields except those of _RESUMABLE_CHANGES and the same
    `training_data` (`data_fingerprint`), where both record one."""
    if not path.exists():
        return
    stored = TrainConfig.from_json(path)
    raw = read_config_json(path)
    kinds = {True: "a cross-validation workdir (run with --fold all)", False: "a single training run"}
    was, now = bool(raw.get("cross_validation")), bool(values.get("cross_validation"))
    if was != now:
        raise ValueError(f"{path} describes {kinds[was]}, not {kinds[now]}: use another workdir")
    if not compare_fields:
        return
    was, now = raw.get("training_data"), values.get("training_data")
    if was is not None and now is not None and was != now:
        raise ValueError(f"{path} describes a run on other training data: {_describe_data(was)} there, "
                         f"{_describe_data(now)} now (the data may move, with --data_root or "
                         "--hdf5_dir, but not change); use the same data or a new workdir")
    old = stored.to_dict()
    changed = sorted(k for k in values if k in old and old[k] != values[k] and k not in _RESUMABLE_CHANGES)
    if changed:
        raise ValueError(f"{path} describes another run: {', '.join(f'{k}={old[k]!r}' for k in changed)} "
                         f"there, but {', '.join(f'{k}={values[k]!r}' for k in changed)} now; "
                         "use a new workdir or the same settings")


def data_fingerprint(sequences: Sequence[str]) -> dict[str, Any]:
    """What a resumed run checks its data against: the count of examples and of sequences and a
    SHA-256 of the sequence name of every example, in order (the order the example indices,
    and so the batches, refer to). The same data read on the fly or from its store agrees."""
    names = [str(s) for s in sequences]
    digest = hashlib.sha256("\n".join(names).encode()).hexdigest()
    return {"examples": len(names), "sequences": len(set(names)), "sha256": digest}


def _describe_data(data: Any) -> str:
    if not isinstance(data, dict):
        return repr(data)
    return (f"{data.get('examples')} examples of {data.get('sequences')} sequences "
            f"(sha256 {str(data.get('sha256'))[:12]})")


class WorkdirBusyError(BlockingIOError):
    """Another run trains in the workdir (it holds the workdir's `WorkdirLock`)."""


class WorkdirLock:
    """One training run per workdir: an exclusive `flock` on the workdir directory itself, taken
    by process 0 of a job and held until `release` (or the end of a `with` block).

    `acquire` takes it once the directory exists (a no-op before, and once held); when another
    run holds it, every process of the job raises WorkdirBusyError (process 0's finding is
    broadcast, so no process goes on alone into the job's collectives). The lock goes with its
    process however that ends, so a killed run leaves nothing to clean up; `record_holder`
    writes who holds it to `<workdir>/.lock`, which a refused run quotes. Where `flock` is
    missing or fails (Windows, some network file systems) the run goes on unlocked with a
    warning; on a network mount that accepts flock only locally (NFS with `nolock`), runs on
    different hosts are not kept apart.
    """

    def __init__(self, workdir: pathlib.Path):
        self.workdir = pathlib.Path(workdir)
        self._fd: int | None = None

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def acquire(self) -> None:
        busy = None
        if jax.process_index() == 0 and self._fd is None and self.workdir.is_dir():
            busy = self._try_lock()
        if jax.process_count() > 1:  # every process calls acquire at the same points
            if int(multihost_utils.broadcast_one_to_all(np.int32(busy is not None))) and busy is None:
                busy = "as process 0 of this job found"
        if busy is not None:
            raise WorkdirBusyError(f"{self.workdir} is in use by another training run ({busy}): wait "
                                   "for it to finish, or stop it and run again")

    def _try_lock(self) -> str | None:
        """Takes the lock (None), or returns who holds it."""
        try:
            import fcntl  # pylint: disable=import-outside-toplevel  (POSIX only)
        except ImportError:
            logging.warning("%s: no flock on this platform; the workdir is not locked", self.workdir)
            return None
        fd = os.open(self.workdir, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            try:
                return (self.workdir / LOCK_FILE).read_text().strip() or "a process"
            except OSError:
                return "a process"
        except OSError as e:
            os.close(fd)
            logging.warning("%s: cannot lock the workdir (%s); nothing keeps a second run from "
                            "writing it meanwhile", self.workdir, e)
            return None
        self._fd = fd
        return None

    def record_holder(self) -> None:
        """Writes this process's id, host and the time to `<workdir>/.lock` (when it holds the lock)."""
        if self._fd is not None:
            atomic.write_text(self.workdir / LOCK_FILE, f"pid {os.getpid()} on {socket.gethostname()}, "
                                                        f"since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the flock
            self._fd = None


def write_config(path: pathlib.Path, values: dict[str, Any]) -> None:
    """Writes config.json (process 0 only); `check_same_run` has accepted it before."""
    if jax.process_index() == 0:
        atomic.write_text(path, json.dumps(values, indent=2) + "\n")


def _read_metrics(path: pathlib.Path, before_epoch: int) -> list[dict[str, Any]]:
    """The rows of the epochs before `before_epoch` in metrics.jsonl (the rows of later epochs
    are dropped: the resumed run writes them again). ValueError naming the line of a row that
    is not a JSON object with an integer "epoch"."""
    if not path.exists():
        return []
    expected = 'one JSON object per line, each with an integer "epoch"'
    rows = []
    for number, line in enumerate(read_text(path, expected).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            row = e
        if not (isinstance(row, dict) and type(row.get("epoch")) is int):
            raise ValueError(f"{path}:{number}: {excerpt(line)} is not {expected} (the training "
                             "log; move it away to resume without the earlier epochs' rows)")
        rows.append(row)
    return [r for r in rows if r["epoch"] < before_epoch]


def _write_metrics(path: pathlib.Path, rows: list[dict[str, Any]]) -> None:
    if jax.process_index() != 0:
        return
    atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def open_data(config: TrainConfig):
    """The development ChunkSource of `config`: the HDF5 store in `hdf5_dir` when set, else
    features computed on the fly from `data_root`; held in host memory when `cache_features`,
    else made on this process's devices of `make_mesh()`, each device the examples it trains
    on (`keep_on_device` and `devices` of the sources)."""
    from asd_jax.data import pipeline  # pylint: disable=import-outside-toplevel
    if config.data_root is None and config.hdf5_dir is None:
        raise ValueError("no training data: set data_root (--data_root, a TragicTalkers layout) or "
                         "hdf5_dir (--hdf5_dir, a feature store) in the config")
    where = dict(hdf5_dir=config.hdf5_dir) if config.hdf5_dir is not None else dict(data_root=config.data_root)
    source = pipeline.open_source(**where, condition=config.condition, features=config.features,
                                  keep_on_device=not config.cache_features,
                                  devices=None if config.cache_features else _local_devices(make_mesh()))
    return CachedSource(source) if config.cache_features else source


def _load_scaler(path: pathlib.Path, in_channels: int,
                 features: str | None = None) -> scaler_lib.Scaler | None:
    """The scaler file of a workdir, checked against the features; None when there is none."""
    if not path.exists():
        return None
    scaler = scaler_lib.load_scaler(path, features=features)
    if np.shape(scaler.mean)[-1] != in_channels:
        raise ValueError(f"{path} holds a scaler of {np.shape(scaler.mean)[-1]} feature channels, "
                         f"but the config's features have {in_channels}: delete it (it is "
                         "computed again) or use another workdir")
    return scaler


def _compute_scaler(path: pathlib.Path, source, indices: np.ndarray,
                    features: str | None = None) -> scaler_lib.Scaler:
    """The scaler of the training chunks `indices` (of `features`), written to `path` by process 0.

    With several processes each accumulates its share of the chunks and the float64 statistics
    of all are merged in process order on every process, so every process holds the same
    scaler (and the work is split, not repeated).
    """
    from asd_jax.data import pipeline  # pylint: disable=import-outside-toplevel
    logging.info("computing the feature scaler over %d training chunks", len(indices))
    process_index, process_count = jax.process_index(), jax.process_count()
    accumulator = pipeline.accumulate_scaler(source, indices=indices, progress=process_index == 0,
                                             process_index=process_index, process_count=process_count)
    if process_count > 1:
        accumulator = _merge_across_processes(accumulator)
    scaler = accumulator.result()
    if process_index == 0:
        scaler_lib.save_scaler(path, scaler, features)
    return scaler


def _merge_across_processes(accumulator: scaler_lib.ScalerAccumulator) -> scaler_lib.ScalerAccumulator:
    """Every process's accumulator merged in process order, on every process.

    The (bins, channels) shape is agreed first (a process with no share has none): every
    process takes the same decision, so a mismatch is an error on all of them, not one raising
    while the others wait in the next collective.
    """
    own = np.zeros(2) if accumulator.mean is None else np.asarray(accumulator.mean.shape, np.float64)
    shapes = {tuple(int(v) for v in row) for row in distributed.allgather_float64(own)} - {(0, 0)}
    if len(shapes) != 1:
        raise ValueError(f"the processes' training features have different (bins, channels) "
                         f"shapes {sorted(shapes)}" if shapes else "no process has training features")
    shape = shapes.pop()
    size = math.prod(shape)
    packed = np.zeros(1 + 2 * size)
    if accumulator.mean is not None:
        packed[0] = accumulator.count
        packed[1:] = np.concatenate([accumulator.mean.reshape(-1), accumulator.m2.reshape(-1)])
    merged = scaler_lib.ScalerAccumulator()
    for row in distributed.allgather_float64(packed):
        if row[0] > 0:
            merged.merge(scaler_lib.ScalerAccumulator(
                count=row[0], mean=row[1:1 + size].reshape(shape), m2=row[1 + size:].reshape(shape)))
    return merged


def _evaluate(source, indices, config, eval_fn, state, scaler, mesh) -> float:
    """Mean per-example loss (summed over frames) over `indices` in inference mode.

    Every batch is sharded over all devices, with one process or several: batches hold
    `config.batch_size` examples rounded up to a multiple of the device count, and the last
    one is padded to such a multiple by repeating its last example. Padded examples are masked
    out of the sums (`steps.MASK_KEY`); in inference mode each example's output is its own, so
    the result is that of the unpadded examples.
    """
    from asd_jax.data import pipeline  # pylint: disable=import-outside-toplevel
    indices = np.asarray(indices, np.int64)
    n, devices = len(indices), mesh.size
    batch_size = -(-config.batch_size // devices) * devices
    padded = np.concatenate([indices, np.full(-(-n // devices) * devices - n, indices[-1])])
    real = np.arange(len(padded)) < n
    process_index, process_count = jax.process_index(), jax.process_count()
    batches = pipeline.iterate_batches(
        source, batch_size, seed=config.seed, epoch=0, indices=padded, shuffle=False,
        drop_last=False, prefetch=config.prefetch, process_index=process_index,
        process_count=process_count)

    def put(item):
        start, batch = item
        size = min(batch_size, len(padded) - start)
        local = size // process_count  # this process's contiguous slice, as iterate_batches cuts it
        mask = real[start + process_index * local:start + (process_index + 1) * local]
        return _shard_batch({**batch, steps.MASK_KEY: mask}, mesh, size)

    # Batches are transferred ahead (`_device_prefetch`) and a batch's loss is read back only
    # once two later batches are queued: the device never waits for the host, and no more than
    # a few batches are held in device memory (queuing them all would hold the whole set).
    losses, counts = [], []
    pending = collections.deque()

    def read_back(metrics):
        losses.append(float(metrics["loss"]))
        counts.append(int(metrics["num_examples"]))

    for batch in _device_prefetch(zip(range(0, len(padded), batch_size), batches), put):
        pending.append(eval_fn(state, batch, scaler))
        if len(pending) > 2:
            read_back(pending.popleft())
    for metrics in pending:
        read_back(metrics)
    return sum(losses) / max(sum(counts), 1)


def _check_position(position: dict[str, Any], step: int, step_dir: pathlib.Path,
                    num_epochs: int) -> None:
    """ValueError when a checkpoint lies past the end of a run of `num_epochs` epochs.

    A position is (epoch of the next batch, index of that batch): (num_epochs + 1, 0) is a
    finished run (accepted: its model is exported again), anything later is past it.
    """
    epoch, batch = int(position["epoch"]), int(position["batch"])
    if (epoch, batch) <= (num_epochs + 1, 0):
        return
    where, needed = ((f"the end of epoch {epoch - 1}", epoch - 1) if batch == 0 else
                     (f"{batch} batches into epoch {epoch}", epoch))
    raise ValueError(f"the latest checkpoint {step_dir} (step {step}) is at {where}, past the end of "
                     f"a run of num_epochs={num_epochs}: set num_epochs >= {needed} to continue this "
                     "run, or use a new workdir")


def _set_epoch_and_learning_rate(state: state_lib.TrainState, epoch, lr) -> state_lib.TrainState:
    """The state with `epoch` (epochs completed) and the optimizer's learning rate set."""
    state = state_lib.set_learning_rate(state, lr)
    return state.replace(epoch=jnp.asarray(epoch, jnp.int32))


def train_and_evaluate(config: TrainConfig, workdir: str | os.PathLike,
                       source=None) -> state_lib.TrainState:
    """Trains (or resumes training) per `config` in `workdir`; returns the final TrainState.

    source: a ChunkSource to use instead of `open_data(config)` (tests, or a caller that has
    one already; the run is then reproducible from config.json only if it equals open_data's).

    Raises ValueError before anything is written when the model does not take the features,
    the data or an existing scaler has other channels, training batches do not split over the
    devices of several processes, the workdir holds a feature store, another run's config.json
    or training data, or a checkpoint past `config.num_epochs`; WorkdirBusyError when another run trains in the
    workdir (`WorkdirLock`). Raises NonFiniteLossError naming the step, the batch's sequences
    and the last good checkpoint when a loss is NaN or infinite.
    """
    workdir = pathlib.Path(workdir)
    refuse_store_folder(workdir)
    with WorkdirLock(workdir) as lock:  # an existing workdir: held before it is read
        return _train_and_evaluate(config, workdir, source, lock)


def keep_recorded_data_root(config: TrainConfig, workdir: pathlib.Path) -> TrainConfig:
    """`config` with the data root that the workdir's config.json records, where the run is
    resumed from a store alone (hdf5_dir set, data_root None): the store gives the features,
    and forward and predict still default to the run's data root. A config.json that cannot be
    read is left to `check_same_run` to report."""
    path = workdir / constants.CONFIG_FILE
    if config.data_root is not None or config.hdf5_dir is None or not path.is_file():
        return config
    try:
        recorded = read_config_json(path).get("data_root")
    except ValueError:
        return config
    return config.replace(data_root=recorded) if isinstance(recorded, str) else config


def refuse_store_folder(workdir: pathlib.Path) -> None:
    """ValueError if `workdir` holds a feature store (finished or partial): a run there would
    replace the store's feature_scaler.h5 with its own (--workdir and --hdf5_dir swapped)."""
    from asd_jax.data import store  # pylint: disable=import-outside-toplevel
    found = [name for name in (store.STORE_NAME, store.STORE_NAME + ".partial")
             if (workdir / name).exists()]
    if found:
        raise ValueError(f"{workdir} holds a feature store ({found[0]}), not a training run: give "
                         "it as --hdf5_dir (hdf5_dir) and a folder of the run's own as --workdir")


def _train_and_evaluate(config: TrainConfig, workdir: pathlib.Path, source,
                        lock: WorkdirLock) -> state_lib.TrainState:
    from asd_jax import checkpointing, features as features_lib  # pylint: disable=import-outside-toplevel
    from asd_jax import model as model_lib  # pylint: disable=import-outside-toplevel
    from asd_jax.data import pipeline  # pylint: disable=import-outside-toplevel

    config = keep_recorded_data_root(config, workdir)
    in_channels = features_lib.num_channels(config.features)
    model = build_model(config)
    try:
        abstract_params = model_lib.abstract_variables(model, in_channels)["params"]
    except (TypeError, ValueError) as e:
        raise ValueError(f"model {config.model} does not take {config.features} features "
                         f"({in_channels} channels): {e}") from e
    source = open_data(config) if source is None else source
    if source.num_channels != in_channels:
        raise ValueError(f"the training data has {source.num_channels} feature channels, but "
                         f"features={config.features!r} has {in_channels}")
    train_idx, val_idx = split_indices(source.sequences, config)
    if len(train_idx) == 0:
        raise ValueError(f"no training chunks for fold {config.fold} in {config.hdf5_dir or config.data_root}")
    mesh = make_mesh()
    check_batch_split(config, len(train_idx), mesh.size, jax.process_count())
    config_values = {**config.to_dict(), "in_channels": in_channels,
                     "training_data": data_fingerprint(source.sequences)}
    check_same_run(workdir / constants.CONFIG_FILE, config_values)
    scaler = _load_scaler(workdir / constants.SCALER_FILE, in_channels, config.features)
    logging.info("run in %s: %s", workdir, config)  # once the inputs are known to be good

    replicated = NamedSharding(mesh, PartitionSpec())
    update_scale = None
    if config.double_gru_bias_updates:
        update_scale = model_lib.gru_bias_update_scale(abstract_params)
    tx = state_lib.create_optimizer(config.learning_rate, update_scale)

    def init(rng):
        init_rng, state_rng = jax.random.split(rng)
        variables = model_lib.init_variables(init_rng, model, in_channels)
        return state_lib.create_train_state(state_rng, variables, tx)

    init_fn = jax.jit(init, out_shardings=replicated,
                      compiler_options=xla_cpu.init_options(mesh.devices.flat[0].platform))
    abstract_state = jax.eval_shape(init, jax.random.PRNGKey(config.seed))
    abstract_state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                                  abstract_state)
    checkpoint_dir = workdir / checkpoints.CHECKPOINT_SUBDIR
    if checkpoint_dir.exists() and not checkpoint_dir.is_dir():
        raise NotADirectoryError(20, "is not a directory; the run keeps its checkpoints there",
                                 str(checkpoint_dir))
    manager = restored = None
    if checkpoint_dir.is_dir():
        manager = checkpoints.open_manager(checkpoint_dir, config.checkpoints_to_keep)
        try:
            if manager.all_steps() and not (workdir / constants.CONFIG_FILE).is_file():
                raise ValueError(f"{checkpoint_dir} holds checkpoints but {workdir} has no "
                                 f"{constants.CONFIG_FILE}: the run they belong to (its batch size, "
                                 f"learning rate, data) is unknown; put its {constants.CONFIG_FILE} "
                                 "back or use a new workdir")
            restored = checkpoints.restore_latest(manager, abstract_state)
            if restored is not None:
                _check_position(restored[1], restored[2], checkpoints.step_directory(manager, restored[2]),
                                config.num_epochs)
        except ValueError:
            manager.close()
            raise
    metrics_path = workdir / constants.METRICS_FILE
    history = _read_metrics(metrics_path, restored[1]["epoch"] if restored is not None else 1)

    # Everything is checked: from here on the workdir is written, by this run alone.
    atomic.make_output_dir(workdir)
    lock.acquire()  # a new workdir: now that it exists
    lock.record_holder()
    write_config(workdir / constants.CONFIG_FILE, config_values)
    finished = restored is not None and restored[1]["epoch"] > config.num_epochs  # exported again
    if isinstance(source, CachedSource) and not finished:
        source.prefill(np.concatenate([train_idx, val_idx]), progress=jax.process_index() == 0)
    if scaler is None:
        scaler = _compute_scaler(workdir / constants.SCALER_FILE, source, train_idx, config.features)
    if manager is None:
        manager = checkpoints.open_manager(checkpoint_dir, config.checkpoints_to_keep)
    if restored is None:
        state = init_fn(jax.random.PRNGKey(config.seed))
        position = {"epoch": 1, "batch": 0, "loss_sum": 0.0, "num_examples": 0}
        last_good = None
    else:
        state, position, step = restored
        last_good = checkpoints.step_directory(manager, step)
        if finished:
            logging.info("%s: the run has finished its %d epochs; exporting its model to %s again",
                         last_good, config.num_epochs, workdir / constants.MODEL_DIR)
        else:
            logging.info("resuming from %s: epoch %d, batch %d", last_good, position["epoch"],
                         position["batch"])
    _write_metrics(metrics_path, history)

    scaler_dev = _replicate(scaler, replicated)
    train_fn = jax.jit(functools.partial(steps.train_step, model=model, tx=tx), donate_argnums=0,
                       out_shardings=replicated, compiler_options=xla_cpu.train_options())
    eval_fn = jax.jit(functools.partial(steps.eval_step, model=model), out_shardings=replicated,
                      compiler_options=xla_cpu.inference_options())
    set_fields_fn = jax.jit(_set_epoch_and_learning_rate, donate_argnums=0, out_shardings=replicated)
    step = int(jax.device_get(state.step))
    sequences = np.asarray(source.sequences)
    num_batches = _num_batches(len(train_idx), config.batch_size, config.drop_last)
    sizes = _batch_sizes(len(train_idx), config.batch_size, config.drop_last)
    every = config.checkpoint_every_steps
    is_main = jax.process_index() == 0
    # Features made on the devices need no transfer ahead of their step: looking ahead would
    # only hold more batches in device memory.
    on_device = getattr(source, "keep_on_device", False)

    try:  # a checkpoint still being written when the loop stops (or fails) is finished
        for epoch in range(position["epoch"], config.num_epochs + 1):
            start_batch = position["batch"] if epoch == position["epoch"] else 0
            loss_sum = position["loss_sum"] if start_batch else 0.0
            num_examples = position["num_examples"] if start_batch else 0
            lr = config.learning_rate_for_epoch(epoch)
            state = set_fields_fn(state, epoch - 1, lr)
            order = pipeline.epoch_permutation(config.seed, epoch, len(train_idx))
            batches = pipeline.iterate_batches(
                source, config.batch_size, seed=config.seed, epoch=epoch, indices=train_idx,
                shuffle=True, start_batch=start_batch, drop_last=config.drop_last,
                prefetch=config.prefetch, process_index=jax.process_index(),
                process_count=jax.process_count())
            device_batches = _device_prefetch(
                zip(range(start_batch, num_batches), batches),
                put=lambda item: (item[0], _shard_batch(item[1], mesh, sizes[item[0]])),
                size=0 if on_device else 2)
            pending = None  # (metrics, batch index, step): checked one step late, to keep dispatch async
            data_wait = 0.0
            epoch_start = time.perf_counter()

            def check(pending):
                nonlocal loss_sum, num_examples
                metrics, b, step = pending
                loss = float(metrics["loss"])
                if not math.isfinite(loss):
                    chunk = train_idx[order[b * config.batch_size:(b + 1) * config.batch_size]]
                    names = sorted(set(sequences[chunk].tolist()))
                    raise NonFiniteLossError(
                        f"loss is {loss} at step {step} (epoch {epoch}, batch {b}); the batch holds "
                        f"chunks of {', '.join(names)}; last good checkpoint: "
                        f"{last_good or 'none (no checkpoint yet)'}")
                loss_sum += loss
                num_examples += int(metrics["num_examples"])

            with tqdm.tqdm(total=num_batches, initial=start_batch, desc=f"epoch {epoch}/{config.num_epochs}",
                           disable=not is_main, leave=False, dynamic_ncols=True) as progress:
                b = start_batch
                while True:
                    wait_start = time.perf_counter()
                    item = next(device_batches, None)
                    data_wait += time.perf_counter() - wait_start
                    if item is None:
                        break
                    b, batch = item
                    state, metrics = train_fn(state, batch, scaler_dev)
                    if pending is not None:
                        check(pending)
                    step += 1
                    pending = (metrics, b, step)
                    progress.update(1)
                    if every and step % every == 0 and b + 1 < num_batches:
                        check(pending)
                        pending = None
                        last_good = checkpoints.save(manager, state, {
                            "epoch": epoch, "batch": b + 1, "loss_sum": loss_sum,
                            "num_examples": num_examples})
                if pending is not None:
                    check(pending)
            epoch_time = time.perf_counter() - epoch_start
            state = set_fields_fn(state, epoch, lr)
            row = {"epoch": epoch, "train_loss": loss_sum / max(num_examples, 1), "learning_rate": lr,
                   "num_steps": num_batches - start_batch, "epoch_time_s": epoch_time,
                   "step_time_s": (epoch_time - data_wait) / max(num_batches - start_batch, 1),
                   "data_wait_s": data_wait}
            if len(val_idx):
                row["validation_loss"] = _evaluate(source, val_idx, config, eval_fn, state, scaler_dev, mesh)
            logging.info("epoch %d: %s", epoch,
                         ", ".join(f"{k} {v:.6g}" for k, v in row.items() if k != "epoch"))
            history.append(row)
            _write_metrics(metrics_path, history)
            last_good = checkpoints.save(manager, state, {"epoch": epoch + 1, "batch": 0, "loss_sum": 0.0,
                                                         "num_examples": 0})
            position = {"epoch": epoch + 1, "batch": 0}
    finally:
        manager.close()
    variables = jax.device_get(state.variables)
    if is_main:
        checkpointing.save_model(workdir, variables, config_values, scaler, overwrite=True)
    if jax.process_count() > 1:  # no process returns before the exported model is there
        multihost_utils.sync_global_devices("asd_jax.training.loop: model exported")
    return state
