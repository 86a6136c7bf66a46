"""The test-set forward pass: a model over every test chunk -> `test_forward.csv` (SPEC section 8).

Rows: header `name,time,predicted x,confidence`; for each test example (a camera of a 2-s chunk)
and each of its 60 frames t, time = round(chunk start + t / 30, 2), written only while
time < round(sequence length, 2). Rows come in the order of csv/test_forward.csv's chunk starts
(sequence, camera, time), as the reference writes them.

Compute: the cameras of one rig share the chunk's audio and the camera enters only the CRNN's
last layer, so features and the CRNN's audio path run once per audio chunk and only the last
layer runs for each of the 11 cameras (`asd_jax.predict.predict_batch`, the function that
`predict` runs on any recording). Each jitted call takes a fixed number of audio chunks (the
last batch is padded with silence and its rows dropped), so it compiles once; reading the next
batch's audio overlaps with the device computing this one.

The model comes from a finished training workdir (its exported `model/`), a model directory
made by the converter (anything `asd_jax.checkpointing.load_model` reads) or one per-step
training checkpoint named explicitly (`<workdir>/checkpoints/<step>`, whose config and scaler
are the workdir's). A workdir whose run has not exported `model/` yet is an error, not its
latest checkpoint in silence. `workdir_data_root` gives the data root a workdir's run trained on
(its config.json's), the default data root for a workdir.

Values are written as Python float text of the float32 outputs (`repr(float(x))`, as the
reference's `float(tensor)` rows), which reads back as exactly those float32 values.
"""

from __future__ import annotations

import concurrent.futures
import csv
import functools
import math
import os
import pathlib
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from asd_jax import atomic
from asd_jax import constants
from asd_jax import evaluation
from asd_jax.predict import (Predictor, format_time, load_predictor, predict_batch,
                             refuse_checkpoint_files)


def camera_table(index, num_cameras: int = constants.N_CAMERAS_PER_RIG) -> np.ndarray:
    """(M, num_cameras) int64: the example of each (audio chunk, camera one-hot index), -1 if none.

    index: a `asd_jax.data.tragictalkers.ChunkIndex` (examples N -> audio chunks M) in which no
    two examples share an audio chunk and a camera (ValueError otherwise).
    """
    table = np.full((len(index.audio_keys), num_cameras), -1, np.int64)
    cam_idx = np.array([constants.camera_index(c) for c in index.camera], np.int64)
    table[index.audio_id, cam_idx] = np.arange(len(index))
    if np.count_nonzero(table >= 0) != len(index):
        written = table[index.audio_id, cam_idx]
        lost = int(np.flatnonzero(written != np.arange(len(index)))[0])
        raise ValueError(f"test examples {lost} and {int(written[lost])} are the same chunk "
                         f"({index.name[lost]} at {index.start_time[lost]:g} s)")
    return table


def predict_test_set(predictor: Predictor, dataset, batch_size: int = 4) -> tuple[Any, np.ndarray]:
    """(index, outputs (N, 60, 2) float32) for every test example of `dataset` (TragicTalkers).

    batch_size: audio chunks per jitted call (each gives the rows of 11 cameras).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    index = dataset.test_chunks()
    table = camera_table(index, predictor.model.num_cameras)
    keys = list(index.audio_keys)
    num_audio = len(keys)
    batch = min(batch_size, num_audio)
    outputs = np.zeros((len(index), constants.CHUNK_VIDEO_FRAMES, 2), np.float32)
    run = functools.partial(predict_batch, predictor.variables, predictor.scaler,
                            model=predictor.model, feature_name=predictor.feature_name)

    def read(first: int) -> np.ndarray:
        audio = np.empty((batch, constants.CHUNK_SAMPLES, constants.N_MICS), np.float32)
        part = keys[first:first + batch]
        audio[len(part):] = 0.0  # zero rows pad the last batch
        return dataset.load_audio("test", part, out=audio)

    def finish(first: int, result: jax.Array) -> None:
        result = np.asarray(result)  # (batch, K, 60, 2)
        rows = table[first:first + batch]
        valid = rows >= 0
        outputs[rows[valid]] = result[:len(rows)][valid]

    starts = list(range(0, num_audio, batch))
    pending = None
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(read, starts[0])
        for i, first in enumerate(starts):
            audio = future.result()
            if i + 1 < len(starts):
                future = pool.submit(read, starts[i + 1])
            result = run(jnp.asarray(audio))  # asynchronous dispatch
            if pending is not None:
                finish(*pending)
            pending = (first, result)
        finish(*pending)
    return index, outputs


def check_seq_lengths(sequences, seq_lengths: dict[str, float], source: str = "seq_lengths.json") -> None:
    """Every one of `sequences` has a finite length in `seq_lengths` (seconds) that is positive
    when rounded to 2 decimals (else it would get no rows); ValueError naming `source` if not."""
    needed = sorted({str(s) for s in sequences})
    missing = [s for s in needed if s not in seq_lengths]
    if missing:
        raise ValueError(f"{source} has no length for {missing}")
    bad = {s: seq_lengths[s] for s in needed
           if not (math.isfinite(seq_lengths[s]) and round(seq_lengths[s], 2) > 0)}
    if bad:
        raise ValueError(f"{source}: lengths {bad}; expected finite seconds >= 0.005 (positive "
                         "when rounded to 2 decimals)")


def forward_rows(index, outputs: np.ndarray, seq_lengths: dict[str, float]) -> Iterator[tuple]:
    """(name, time s, x, confidence) rows of SPEC section 8, in index order.

    outputs: (N, 60, 2) float32 for the N examples of `index`; seq_lengths in seconds (every
    sequence of `index` needs one, see `check_seq_lengths`).
    """
    check_seq_lengths(index.sequence, seq_lengths)
    offsets = np.arange(constants.CHUNK_VIDEO_FRAMES) / constants.VIDEO_FPS
    for n, (name, sequence, start) in enumerate(zip(index.name, index.sequence, index.start_time)):
        times = np.round(start + offsets, 2)
        keep = times < round(seq_lengths[sequence], 2)
        for t, (x, c) in zip(times[keep], outputs[n, keep]):
            yield name, t, x, c


def write_forward_csv(path: str | os.PathLike, rows: Iterator[tuple]) -> int:
    """Writes the rows with SPEC section 8's header atomically; returns the row count.

    x and confidence are written as the float64 text of their float32 value (the reference's
    `float(tensor)`): read back as float64 they are exactly the float32 outputs, whereas
    float32's shortest text is not, and could move a frame across a threshold.
    """
    count = 0
    with atomic.partial_path(path) as partial, open(partial, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")  # LF, as the released forward files
        writer.writerow(evaluation.FORWARD_HEADER)
        for name, t, x, c in rows:
            writer.writerow([name, format_time(t), repr(float(np.float32(x))),
                             repr(float(np.float32(c)))])
            count += 1
    return count


def check_out_csv(out_csv: str | os.PathLike, data_root: str | os.PathLike) -> pathlib.Path:
    """`out_csv` as a Path if a test set's forward file may be written there: its directory
    exists, and it is neither the data root's test index nor its sequence lengths (inputs of
    the rows it will hold)."""
    from asd_jax.data import tragictalkers  # pylint: disable=import-outside-toplevel
    out_csv = atomic.check_output_file(out_csv)
    for name, what in ((tragictalkers.TEST_INDEX, "the data root's test index"),
                       (tragictalkers.SEQ_LENGTHS, "the data root's sequence lengths")):
        atomic.refuse_same_file(out_csv, pathlib.Path(data_root) / name, what)
    return out_csv


def workdir_config(workdir: str | os.PathLike) -> pathlib.Path:
    """The `config.json` of the training workdir `workdir`.

    Raises:
      FileNotFoundError: `workdir` does not exist, or holds no config.json (not a training
        workdir: a model directory or a training checkpoint is passed as a checkpoint).
    """
    workdir = pathlib.Path(workdir)
    path = workdir / constants.CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"training workdir {workdir} does not exist" if not workdir.exists() else
            f"{workdir} is not a training workdir: it holds no {constants.CONFIG_FILE} (a model "
            "directory or a training checkpoint goes to --checkpoint)")
    return path


def workdir_data_root(workdir: str | os.PathLike) -> str:
    """The TragicTalkers data root that the training workdir `workdir` trained on, as its
    config.json records it: the data root `experiments.forward --workdir` defaults to.

    Raises:
      FileNotFoundError: `workdir` is missing or not a training workdir (`workdir_config`).
      ValueError: its config.json is not a training config, or records no data root (a run
        trained from an HDF5 store alone): the data root must then be given (--data_root).
    """
    from asd_jax.training import configs  # pylint: disable=import-outside-toplevel
    path = workdir_config(workdir)
    data_root = configs.TrainConfig.from_json(path).data_root
    if data_root is None:
        raise ValueError(f"{path} records no data root (the run trained from an HDF5 store "
                         "alone): give the TragicTalkers data root (--data_root)")
    return data_root


def forward(checkpoint: str | os.PathLike, data_root: str | os.PathLike, out_csv: str | os.PathLike,
            *, scaler_path: str | os.PathLike | None = None, batch_size: int = 4) -> int:
    """Model + TragicTalkers test set -> `out_csv` (SPEC section 8); returns the row count.

    checkpoint: a finished training workdir, a converter's model directory, or a training
    checkpoint `<workdir>/checkpoints/<step>` (see `asd_jax.predict.load_predictor`). scaler_path: a
    feature_scaler.h5 overriding the model's. The sequence lengths are checked before the pass.
    """
    from asd_jax.data import tragictalkers  # pylint: disable=import-outside-toplevel
    out_csv = check_out_csv(out_csv, data_root)
    if scaler_path is not None:
        atomic.refuse_same_file(out_csv, scaler_path, "the feature scaler")
    refuse_checkpoint_files(out_csv, checkpoint)
    dataset = tragictalkers.TragicTalkers(data_root)
    seq_lengths = dataset.seq_lengths()
    # Before the pass over the test set, which takes minutes at full size.
    check_seq_lengths(dataset.test_chunks().sequence, seq_lengths,
                      str(pathlib.Path(data_root) / tragictalkers.SEQ_LENGTHS))
    predictor = load_predictor(checkpoint, scaler_path=scaler_path)
    index, outputs = predict_test_set(predictor, dataset, batch_size)
    return write_forward_csv(out_csv, forward_rows(index, outputs, seq_lengths))
