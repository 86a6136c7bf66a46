"""The HDF5 feature store `development_dataset.h5` and its `feature_scaler.h5`.

Two layouts, both read by `asd_jax.data.pipeline.HDF5Source`; N examples (camera chunks, in the
order of the development CSV), M audio chunks (sequence, rig, start), M ~ N / 11:

reference (SPEC section 5, what the reference trains from; float32 where it stores float64):
    features         (N, C, 960, 64) float32   channels-first, one row per example
    cams             (N, 1, 11)      float32   camera one-hot
    target_coords    (N, 60)         float32
    pseudo_labels    (N, 60)         float32
    speech_activity  (N, 60)         float32
    sequence         (N,)            bytes     sequence name

compact (the 11 cameras of a rig share one audio chunk, so features are stored once per chunk):
    rig_features          (M, C, 960, 64) float32  channels-first
    feature_index         (N,)  int64    row of rig_features of each example
    rig_chunk_sequence    (M,)  bytes,  rig_chunk_rig (M,) bytes,  rig_chunk_start_time (M,) float64
    cams, target_coords, pseudo_labels, speech_activity, sequence  as in the reference layout

Both layouts also hold `name` (N,) bytes (`<sequence>-camNN`) and `start_time` (N,) float64 s,
the store's feature scaler `scaler_mean`, `scaler_std` (C, 1, 64) float32 (what
`feature_scaler.h5` holds), and the root attributes `asd_jax_args` (JSON of the build
arguments), `asd_jax_layout`, `asd_jax_format_version` and `asd_jax_complete`.

A build writes `development_dataset.h5.partial` (made whole under a temporary name, then linked
into place). After the features of every batch it records, in one write of the float64 dataset
`_progress` = [audio chunks done, count, mean (64*C), m2 (64*C)], how many audio chunks are
done together with the running scaler statistics of exactly those chunks, so an interrupt
anywhere leaves the two in agreement. When all chunks are done it writes the scaler into the
store, sets `asd_jax_complete`, deletes `_progress`, renames the file, and only then writes
`feature_scaler.h5` (recording the store's features, condition and index digest), having
removed the old one before the rename: an interrupted `overwrite` leaves the old store with its
old scaler or without one, or the new store, whose scaler the next run of the same build writes. Running the same build again resumes a partial
file (or only renames a complete one, or only writes the scaler of a finished store);
different arguments, or a partial file that cannot be read, are an error, and so is a partial
file locked by another build. Only `restart=True` deletes a partial file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pathlib
import uuid
from typing import Sequence

import h5py
import numpy as np
import tqdm
from absl import logging

from asd_jax import atomic
from asd_jax import constants
from asd_jax import features as features_lib
from asd_jax import scaler as scaler_lib
from asd_jax.data import pipeline
from asd_jax.data import tragictalkers

LAYOUTS = ("reference", "compact")
STORE_NAME = pipeline.STORE_NAME
_PROGRESS = "_progress"  # (2 + 2 * 64 * C,) float64 [chunks done, count, mean, m2] of a partial build
_SCALER_KEYS = ("scaler_mean", "scaler_std")  # (C, 1, 64) float32, the store's feature scaler
# Version 1 kept progress in separate attributes, version 2 no scaler in the store: such a
# partial file needs --restart.
_FORMAT_VERSION = 3


def _fingerprint(index: tragictalkers.ChunkIndex) -> str:
    """sha256 of the chunk index (names, start times, labels): detects a changed dataset on resume."""
    digest = hashlib.sha256()
    for array in (index.name.astype("S"), index.start_time, index.target_coords, index.pseudo_labels,
                  index.speech_activity):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _bytes(values: Sequence[str]) -> np.ndarray:
    return np.array([v.encode() for v in values], dtype="S")


class StoreBusyError(BlockingIOError):
    """A partial store that another build holds open (HDF5's file lock), or has just created."""


def _feature_key(layout: str) -> str:
    return "features" if layout == "reference" else "rig_features"


def _open(path: pathlib.Path, mode: str) -> h5py.File:
    """h5py.File(path, mode); a file that another process holds (HDF5's lock) is a clear error."""
    try:
        return h5py.File(path, mode)
    except OSError as e:
        if isinstance(e, (BlockingIOError, FileExistsError)) or "unable to lock file" in str(e).lower():
            raise StoreBusyError(f"another build seems to be using {path} ({e}); wait for it to "
                                 "finish, or stop it and run again") from e
        raise


def _write_progress(f: h5py.File, done: int, accumulator: scaler_lib.ScalerAccumulator) -> None:
    """Records `done` audio chunks and the statistics of exactly those in one write to `_progress`."""
    record = np.zeros(f[_PROGRESS].shape, np.float64)
    record[0] = done
    if accumulator.mean is not None:
        record[1] = accumulator.count
        record[2:] = np.concatenate([accumulator.mean.ravel(), accumulator.m2.ravel()])
    f[_PROGRESS][...] = record  # one assignment: an interrupt leaves the old record or the new one


def _read_progress(f: h5py.File) -> tuple[int, scaler_lib.ScalerAccumulator]:
    """(audio chunks done, accumulator of their scaler statistics) of a partial store."""
    _, channels, _, bins = f[_feature_key(f.attrs["asd_jax_layout"])].shape
    progress = f[_PROGRESS]
    if not isinstance(progress, h5py.Dataset) or progress.shape != (2 + 2 * bins * channels,):
        raise ValueError(f"{_PROGRESS!r} is not a ({2 + 2 * bins * channels},) progress record")
    record = progress[()]
    accumulator = scaler_lib.ScalerAccumulator()
    if record[1] > 0:
        accumulator.count = float(record[1])
        accumulator.mean, accumulator.m2 = record[2:].reshape(2, bins, channels)
    return int(record[0]), accumulator


def _kept_scaler(f: h5py.File) -> scaler_lib.Scaler:
    """The feature scaler kept in a finished store, (64, C) channels-last."""
    mean, std = (f[key][:, 0, :].T for key in _SCALER_KEYS)
    return scaler_lib.Scaler(mean, std)


def _scaler_attrs(args: dict) -> dict:
    """What `feature_scaler.h5` records of the store it belongs to."""
    return {"features": args["features"], "condition": args["condition"],
            "index_sha256": args["index_sha256"]}


def _save_scaler(path: pathlib.Path, scaler: scaler_lib.Scaler, args: dict) -> None:
    attrs = _scaler_attrs(args)
    scaler_lib.save_scaler(path, scaler, attrs.pop("features"), attrs)


def _is_scaler_of(path: pathlib.Path, scaler: scaler_lib.Scaler, args: dict) -> bool:
    """Whether `path` is the `feature_scaler.h5` that a build with `args` writes for `scaler`."""
    try:
        with h5py.File(path, "r") as f:
            return dict(f.attrs) == _scaler_attrs(args) and all(
                np.array_equal(f[key][()], np.asarray(value).T[:, None, :])
                for key, value in zip(("mean", "std"), scaler))
    except (OSError, KeyError, ValueError, TypeError):
        return False


def _finish_scaler(final: pathlib.Path, args: dict, scaler_path: pathlib.Path) -> bool:
    """Writes the scaler of the finished store `final` made with `args` when `scaler_path` is not
    that scaler (a build stopped between renaming the store and writing its scaler leaves none,
    or the scaler of the store it replaced). True when it did; False, writing nothing, when the
    scaler is there, or `final` was made with other arguments or by an older asd-jax."""
    try:
        with _open(final, "r") as f:
            if (not f.attrs.get("asd_jax_complete") or json.loads(f.attrs["asd_jax_args"]) != args
                    or any(key not in f for key in _SCALER_KEYS)):
                return False
            scaler = _kept_scaler(f)
    except StoreBusyError:
        raise
    except (OSError, KeyError, ValueError, TypeError):
        return False
    if _is_scaler_of(scaler_path, scaler, args):
        return False
    logging.warning("%s is finished but %s is not its scaler (a build stopped before writing it); "
                    "writing it", final, scaler_path)
    _save_scaler(scaler_path, scaler, args)
    return True


def _create(path: pathlib.Path, index: tragictalkers.ChunkIndex, num_channels: int, layout: str,
            args: dict) -> None:
    """Writes everything but the features to a new partial store `path`.

    The file is written under a unique temporary name and linked to `path` as the last step, so
    an interrupt leaves either no partial store or a whole one; a `path` that another build has
    just created is never replaced (`StoreBusyError`).
    """
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:16]}.tmp")
    try:
        _write_new(tmp, index, num_channels, layout, args)
        try:
            os.link(tmp, path)  # unlike a rename, never replaces a file
        except FileExistsError as e:
            raise StoreBusyError(f"another build has just created {path}; wait for it to finish, "
                                 "or stop it and run again") from e
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
            os.replace(tmp, path)  # a file system without hard links
    finally:
        tmp.unlink(missing_ok=True)


def _write_new(tmp: pathlib.Path, index: tragictalkers.ChunkIndex, num_channels: int, layout: str,
               args: dict) -> None:
    """Everything but the features of a new partial store, written to the new file `tmp`."""
    n, m = len(index), len(index.audio_keys)
    rows = n if layout == "reference" else m
    frames, bins = constants.N_FEATURE_FRAMES, constants.N_FEATURE_BINS
    with h5py.File(tmp, "x") as f:
        f.attrs["asd_jax_args"] = json.dumps(args, sort_keys=True)
        f.attrs["asd_jax_layout"] = layout
        f.attrs["asd_jax_format_version"] = _FORMAT_VERSION
        f.attrs["asd_jax_complete"] = False
        f.create_dataset(_feature_key(layout),
                         shape=(rows, num_channels, frames, bins), dtype=np.float32,
                         chunks=(1, num_channels, frames, bins))
        f.create_dataset("cams", data=index.cams[:, None, :])
        for key in pipeline.LABEL_KEYS:
            f.create_dataset(key, data=getattr(index, key))
        f.create_dataset("sequence", data=_bytes(index.sequence))
        f.create_dataset("name", data=_bytes(index.name))
        f.create_dataset("start_time", data=index.start_time)
        if layout == "compact":
            f.create_dataset("feature_index", data=index.audio_id)
            f.create_dataset("rig_chunk_sequence", data=_bytes([k.sequence for k in index.audio_keys]))
            f.create_dataset("rig_chunk_rig", data=_bytes([k.rig for k in index.audio_keys]))
            f.create_dataset("rig_chunk_start_time", data=[k.start_time for k in index.audio_keys])
        for key in _SCALER_KEYS:  # written once every chunk is done
            f.create_dataset(key, shape=(num_channels, 1, bins), dtype=np.float32)
        f.create_dataset(_PROGRESS, shape=(2 + 2 * bins * num_channels,), dtype=np.float64)  # zeros


def _partial_state(path: pathlib.Path, args: dict, restart: bool) -> str:
    """What to do with `path`: "new" (absent or discarded), "resume" or "complete" (only to rename).

    Only `restart` deletes `path`, and never while another build holds it. A partial store that
    cannot be read, or that was made with other arguments, is an error.
    """
    if not path.exists():
        return "new"
    if restart:
        try:
            _open(path, "r").close()
        except StoreBusyError:
            raise  # never delete the file of a running build
        except OSError:
            pass  # unreadable: discarded all the same
        logging.info("removing %s (restart requested)", path)
        path.unlink()
        return "new"
    try:
        with _open(path, "r") as f:
            version = f.attrs.get("asd_jax_format_version")
            if version != _FORMAT_VERSION:
                raise ValueError(f"format version {version}, this asd-jax resumes version {_FORMAT_VERSION}")
            stored = json.loads(f.attrs["asd_jax_args"])
            complete = bool(f.attrs["asd_jax_complete"])
            if complete:
                _kept_scaler(f)
            else:
                _read_progress(f)
    except StoreBusyError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise ValueError(f"partial store {path} cannot be resumed ({e}); rerun with restart=True "
                         "(--restart) to discard it and start over") from None
    if stored != args:
        differ = sorted(k for k in set(stored) | set(args) if stored.get(k) != args.get(k))
        raise ValueError(
            f"{path} is a partial build with different arguments ({', '.join(differ)}: "
            f"{ {k: stored.get(k) for k in differ} } there, { {k: args.get(k) for k in differ} } now); "
            "rerun with the same arguments to resume, or restart=True (--restart) to start over")
    return "complete" if complete else "resume"


def _fill(f: h5py.File, source: pipeline.OnTheFlySource, layout: str, batch_size: int, prefetch: int,
          progress: bool) -> scaler_lib.Scaler:
    """Computes and writes the features still missing from the partial store `f`; the scaler.

    One representative example per audio chunk is computed; its features go to the rows of all
    the cameras that share the chunk and count that many times in the scaler statistics.
    """
    index = source.index
    n_chunks = len(index.audio_keys)
    rows_of_chunk = np.split(np.argsort(index.audio_id, kind="stable"),
                             np.cumsum(np.bincount(index.audio_id, minlength=n_chunks))[:-1])
    done, accumulator = _read_progress(f)
    if done:
        logging.info("resuming %s at audio chunk %d of %d", f.filename, done, n_chunks)
    remaining = np.arange(done, n_chunks)
    plan = [remaining[i:i + batch_size] for i in range(0, len(remaining), batch_size)]
    loaded = pipeline.prefetch_iterator(
        ((c, source.load(np.array([rows_of_chunk[k][0] for k in c]))["features"]) for c in plan), prefetch)
    target = f[_feature_key(layout)]
    with tqdm.tqdm(loaded, total=len(plan), desc=f"{STORE_NAME} ({layout})", disable=not progress) as bar:
        for chunks, feats in bar:  # the bar is closed on an error or Ctrl-C too
            channels_first = feats.transpose(0, 3, 1, 2)  # (B, C, 960, 64), the store's layout
            if layout == "compact":
                target[chunks[0]:chunks[-1] + 1] = channels_first
            else:
                for k, value in zip(chunks, channels_first):
                    for row in rows_of_chunk[k]:
                        target[row] = value
            f.flush()  # the features are in the file before the record that counts them
            accumulator.update(feats, np.array([len(rows_of_chunk[k]) for k in chunks]))
            _write_progress(f, int(chunks[-1]) + 1, accumulator)
            f.flush()
    return accumulator.result()


def build_store(data_root: str | os.PathLike, condition: str, features: str, out_dir: str | os.PathLike,
                *, layout: str = "reference", batch_size: int = 8, sequences: Sequence[str] | None = None,
                overwrite: bool = False, restart: bool = False, progress: bool = True,
                prefetch: int = 2) -> pathlib.Path:
    """Writes `out_dir/development_dataset.h5` and `out_dir/feature_scaler.h5`.

    Args:
      data_root: a TragicTalkers layout (real or synthetic).
      condition: supervisory condition, e.g. "GT_GT" (selects csv/development_<condition>.csv).
      features: a name in `asd_jax.features.FEATURES`.
      out_dir: created if needed; not a model directory or training workdir (ValueError).
      layout: "reference" (SPEC section 5) or "compact" (features once per audio chunk).
      batch_size: audio chunks per jitted feature batch.
      sequences: restrict to these development sequences (a list of names, not one string).
      overwrite: replace an existing complete store (otherwise FileExistsError). Either way a
        finished store of the same arguments whose scaler file is missing or another's (a build
        stopped before writing it) only gets its scaler written.
      restart: discard a partial build instead of resuming it (the only way one is deleted).

    Every input is checked (CSV, labels, all microphone file headers, the samples of float WAVs)
    before anything is written. An unreadable partial store is a ValueError (use restart); one
    that another build holds is a `StoreBusyError`. Returns the path of the store.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: expected one of {LAYOUTS}")
    if features not in features_lib.FEATURES:
        raise ValueError(f"unknown features {features!r}: expected one of {list(features_lib.FEATURES)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(sequences, (str, bytes)):
        raise ValueError(f"sequences must be a list of sequence names, got the string {sequences!r}; "
                         f"for that one sequence pass [{sequences!r}]")
    dataset = tragictalkers.TragicTalkers(data_root)
    index = dataset.development_chunks(condition, sequences)
    source = pipeline.OnTheFlySource.from_index(dataset, index, features)  # checks every mic file
    out_dir = pathlib.Path(out_dir)
    _refuse_model_directory(out_dir)
    final, partial = out_dir / STORE_NAME, out_dir / (STORE_NAME + ".partial")
    scaler_path = out_dir / constants.SCALER_FILE
    args = {"data_root": str(pathlib.Path(data_root).resolve()), "condition": condition,
            "features": features, "layout": layout,
            "sequences": None if sequences is None else list(sequences),
            "n_examples": len(index), "n_audio_chunks": len(index.audio_keys),
            "index_sha256": _fingerprint(index)}
    if final.exists():
        if _finish_scaler(final, args, scaler_path):
            return final
        if not overwrite:
            raise FileExistsError(f"{final} exists; pass overwrite=True (--overwrite) to rebuild it")

    atomic.make_output_dir(out_dir)
    state = _partial_state(partial, args, restart)
    if state == "new":
        _create(partial, index, source.num_channels, layout, args)
    with _open(partial, "r+") as f:
        if state != "complete":
            scaler = _fill(f, source, layout, batch_size, prefetch, progress)
            for key, value in zip(_SCALER_KEYS, scaler):
                f[key][...] = value.T[:, None, :]
            f.flush()  # the scaler is in the file before the flag that says it is finished
            f.attrs["asd_jax_complete"] = True  # from here on an interrupt leaves the rename and scaler file
            f.flush()
        scaler = _kept_scaler(f)
        if _PROGRESS in f:
            del f[_PROGRESS]
    # Never a store beside another store's scaler: the old scaler goes first, the new one
    # follows the rename (interrupted in between, the next run of this build writes it, see
    # _finish_scaler).
    scaler_path.unlink(missing_ok=True)
    os.replace(partial, final)
    _save_scaler(scaler_path, scaler, args)
    logging.info("wrote %s (%d examples, %d audio chunks, layout %s) and %s", final, len(index),
                 len(index.audio_keys), layout, scaler_path)
    return final


def _refuse_model_directory(out_dir: pathlib.Path) -> None:
    """ValueError if `out_dir` is a model directory or a training workdir (it holds a
    config.json or a model/): its feature_scaler.h5 is the model's own, which a store written
    there would replace, silently changing every output of the model from then on."""
    found = [name for name in (constants.CONFIG_FILE, constants.MODEL_DIR)
             if (out_dir / name).exists()]
    if found:
        raise ValueError(f"{out_dir} holds {' and '.join(found)}: a model directory or training "
                         f"workdir, whose {constants.SCALER_FILE} is the model's own and would be "
                         "replaced by the store's; write the store to a folder of its own")


def store_bytes(n_examples: int, n_audio_chunks: int, num_channels: int = 16, layout: str = "reference",
                itemsize: int = 4) -> int:
    """Bytes of the feature dataset of a store (labels and one-hots add ~0.8 kB per example)."""
    per_row = num_channels * constants.N_FEATURE_FRAMES * constants.N_FEATURE_BINS * itemsize
    return per_row * (n_examples if layout == "reference" else n_audio_chunks)
