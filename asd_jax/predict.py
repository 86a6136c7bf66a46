"""Predict on a recording of the training array: any length, streamed in 2-s chunks, one jit.

The recording is one 16-channel WAV or 16 mono WAVs in microphone order, at 48 kHz (another
rate is an error unless `resample=True`, which resamples with `scipy.signal.resample_poly`).

What the recording must match: the CRNN maps the delays between microphone 0 and microphones
1..15 to a position in one camera's image, and both halves of that mapping were learnt on the
training array. So the recording must come from an array of the same geometry, with its
channels in the same microphone order (for the released checkpoints, TragicTalkers' rig array:
microphones 01..16 of rig 1 or 23..38 of rig 2; for a model trained on synthetic data, the array
of that data's `scene.json`), and x is the position in the image of camera `camera` of that
rig, placed as in the training data. On a different array, or with the channels in another
order, the positions are meaningless; nothing in the audio can check this.
The recording is cut into consecutive 2-s chunks (96000 samples, no overlap, the last one
zero-padded, as the test chunks of SPEC section 2), and batches of chunks go through one jitted
function, features -> normalisation -> CRNN for every camera of the rig (`predict_batch`; the
camera enters only the CRNN's last layer, so the features, convolutions and GRU run once per
chunk, and any set of cameras costs what one does). Every batch has the same static shape (the
last one is padded with silent chunks whose outputs are dropped), so the function compiles once.

Rows follow SPEC section 8: chunk k, frame t (0..59) gives time round(2k + t/30, 2), and a row
is kept only while time < round(duration, 2), so a 7.3 s recording gives 219 rows.

Memory stays bounded whatever the duration: the files are read one batch of chunks at a time
(ranged reads; resampling works on overlapping blocks that give the same samples as resampling
the whole file), and rows are yielded batch by batch. Reading the next batch overlaps with the
device computing the current one.
"""

from __future__ import annotations

import csv
import dataclasses
import fractions
import functools
import io
import math
import os
import pathlib
from typing import Any, Iterator, NamedTuple, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
import scipy.signal

from asd_jax import atomic
from asd_jax import checkpointing
from asd_jax import constants
from asd_jax import evaluation
from asd_jax import features as features_lib
from asd_jax import scaler as scaler_lib
from asd_jax import textfiles
from asd_jax import xla_cpu
from asd_jax.data import wav
from asd_jax.model import CRNN

PyTree = Any

CSV_HEADER = ("time", "predicted x", "confidence")


# --------------------------------------------------------------------------------------------
# Reading a recording (edge I/O).


def _odd_ones_out(paths: Sequence[pathlib.Path], values: Sequence[int], unit: str) -> str:
    """"<file>: <value> <unit>, ..., while the other N files have <value> <unit>" for the files
    whose value differs from the most common one."""
    common = max(set(values), key=values.count)
    odd = [f"{p}: {v} {unit}" for p, v in zip(paths, values) if v != common]
    return f"{', '.join(odd)}, while the other {len(paths) - len(odd)} have {common} {unit}"


class Recording:
    """A 16-microphone recording read in sample ranges, at 48 kHz.

    Args:
      paths: one 16-channel WAV file, or 16 mono WAV files in microphone order.
      resample: allow a file rate other than 48 kHz, resampled with
        `scipy.signal.resample_poly` (up/down = 48000/rate as a reduced fraction).

    Attributes:
      paths: the files. file_rate_hz: their sample rate. num_samples: samples per channel at
      48 kHz (ceil(frames * 48000 / rate) when resampling, as `resample_poly` gives).
    """

    def __init__(self, paths: Sequence[str | os.PathLike], resample: bool = False):
        self.paths = [pathlib.Path(p) for p in paths]
        if len(self.paths) not in (1, constants.N_MICS):
            raise ValueError(f"expected one {constants.N_MICS}-channel WAV file or "
                             f"{constants.N_MICS} mono WAV files in microphone order, got "
                             f"{len(self.paths)} files: {[str(p) for p in self.paths]}")
        self._infos = [wav.read_wav_info(p) for p in self.paths]
        expected_channels = constants.N_MICS if len(self.paths) == 1 else 1
        for info in self._infos:
            if info.channels != expected_channels:
                what = (f"one {constants.N_MICS}-channel file, or {constants.N_MICS} mono files "
                        "(one per microphone, in microphone order)" if expected_channels > 1 else
                        f"{constants.N_MICS} mono files")
                raise ValueError(f"{info.path} has {info.channels} channel(s), expected "
                                 f"{expected_channels} (the audio must be {what})")
        rates = [info.sample_rate for info in self._infos]
        if len(set(rates)) > 1:
            raise ValueError("the microphone files have different sample rates: "
                             + _odd_ones_out(self.paths, rates, "Hz"))
        lengths = [info.frames for info in self._infos]
        if len(set(lengths)) > 1:
            raise ValueError("the microphone files have different lengths: "
                             + _odd_ones_out(self.paths, lengths, "samples"))
        self.file_rate_hz, self._file_frames = rates[0], lengths[0]
        if self._file_frames == 0:
            raise ValueError(f"{self.paths[0]} holds no samples")
        if self.file_rate_hz != constants.SAMPLE_RATE_HZ and not resample:
            raise ValueError(
                f"{self.paths[0]} is sampled at {self.file_rate_hz} Hz, expected "
                f"{constants.SAMPLE_RATE_HZ} Hz; pass --resample (resample=True) to resample it "
                "with scipy.signal.resample_poly")
        ratio = fractions.Fraction(constants.SAMPLE_RATE_HZ, self.file_rate_hz)
        self._up, self._down = ratio.numerator, ratio.denominator
        # resample_poly's filter reaches 10 * max(up, down) upsampled samples each side; the
        # margin (input samples, a multiple of `down`) keeps block edges out of the kept output.
        reach = math.ceil(10 * max(self._up, self._down) / self._up) + 2
        self._margin = math.ceil(reach / self._down) * self._down
        self.num_samples = math.ceil(self._file_frames * self._up / self._down)
        if round(self.duration_s, 2) <= 0:  # rows are kept while time < round(duration, 2)
            raise ValueError(f"{self.paths[0]} lasts {self._file_frames} samples at "
                             f"{self.file_rate_hz} Hz, which gives no row (rows are kept while their "
                             "time is below the duration rounded to 0.01 s): expected at least 5 ms")

    @property
    def duration_s(self) -> float:
        """Duration in seconds (num_samples / 48000)."""
        return self.num_samples / constants.SAMPLE_RATE_HZ

    def _read_file_rate(self, start: int, stop: int) -> np.ndarray:
        """Frames [start, stop) at the file's rate, 0 <= start <= stop <= frames: (n, 16) float32,
        for mono files a transposed view of (16, n) rows: the caller's one copy transposes it
        (stacking along the last axis writes 16 strided columns, ~3x as slow)."""
        if len(self.paths) == 1:
            samples, _ = wav.read_wav(self.paths[0], start, stop - start, info=self._infos[0])
        else:
            samples = np.stack([wav.read_wav(p, start, stop - start, info=info)[0]
                                for p, info in zip(self.paths, self._infos)]).T
        if not np.isfinite(samples).all():  # named at the file's rate, before any resampling
            row, mic = np.argwhere(~np.isfinite(samples))[0]
            path = self.paths[mic if len(self.paths) > 1 else 0]
            raise ValueError(f"{path}: non-finite sample at sample {start + row} "
                             f"({(start + row) / self.file_rate_hz:.4f} s at {self.file_rate_hz} Hz) "
                             f"of microphone {mic + 1}; expected finite audio")
        return samples

    def read(self, start: int, stop: int) -> np.ndarray:
        """Samples [start, stop) at 48 kHz as (stop - start, 16) float32, zeros past the end."""
        if not 0 <= start <= stop:
            raise ValueError(f"sample range [{start}, {stop}) is invalid")
        out = np.zeros((stop - start, constants.N_MICS), np.float32)
        stop_inside = min(stop, self.num_samples)
        if start >= stop_inside:
            return out
        if self._up == self._down == 1:
            out[:stop_inside - start] = self._read_file_rate(start, stop_inside)
            return out
        # Resampled: input block [m0, m1) with m0 a multiple of `down`, so its output sample 0
        # is output sample m0 * up / down of the whole file; the margins keep the block's own
        # zero-padded edges away from the samples kept (the file's true edges stay exact).
        up, down = self._up, self._down
        m0 = max(0, (start * down // up) // down * down - self._margin)
        m1 = min(self._file_frames, math.ceil(stop_inside * down / up) + self._margin)
        block = scipy.signal.resample_poly(np.ascontiguousarray(self._read_file_rate(m0, m1)), up, down,
                                           axis=0)
        first = m0 * up // down
        out[:stop_inside - start] = block[start - first:stop_inside - first]
        return out


# --------------------------------------------------------------------------------------------
# The jitted core.


# Inference computes the CRNN's convolutions and matrix products at full float32 precision on
# every backend, so that a converted checkpoint reproduces the reference's outputs (~1e-6) also
# on NVIDIA GPUs, where JAX's default for float32 is TF32 (~1e-3). Inference is cheap next to
# training (which keeps the backend's default).
INFERENCE_PRECISION = "highest"


@functools.partial(jax.jit, static_argnames=("model", "feature_name"),
                   compiler_options=xla_cpu.inference_options())
def predict_batch(variables: PyTree, scaler: scaler_lib.Scaler, audio: jax.Array, *, model: CRNN,
                  feature_name: str) -> jax.Array:
    """Features -> normalisation -> CRNN (eval mode, `INFERENCE_PRECISION`) for a batch of chunks,
    every camera.

    The CRNN's audio path runs once per chunk and only its last layer once per camera, so all
    cameras cost what one does, and one compiled program serves any choice of cameras (picked
    on the host). Used by `iter_camera_predictions` and the test-set forward pass.

    Args:
      variables: the CRNN's {"params", "batch_stats"}.
      scaler: mean/std (64, C) float32.
      audio: (B, 96000, 16) float32 at 48 kHz, mics in file (rig) order.
      model, feature_name: static; the CRNN and a name in `asd_jax.features.FEATURES`.

    Returns:
      (B, num_cameras, 60, 2) float32 for camera one-hot k = 0..num_cameras-1 (camera k + 1 of
      the rig): [..., 0] position x in [0, 1] of the image width, [..., 1] confidence.
    """
    chex.assert_shape(audio, (None, constants.CHUNK_SAMPLES, constants.N_MICS))
    num_audio, cams = audio.shape[0], model.num_cameras
    one_hot = jnp.broadcast_to(jnp.eye(cams, dtype=jnp.float32), (num_audio, cams, cams))
    features = scaler_lib.normalise(features_lib.compute(feature_name, audio), scaler)
    with jax.default_matmul_precision(INFERENCE_PRECISION):
        return model.apply(variables, features, one_hot, train=False).astype(jnp.float32)


def camera_one_hot(camera: int, num_cameras: int = constants.N_CAMERAS_PER_RIG) -> np.ndarray:
    """Camera 1..11 of a rig -> (11,) float32 one-hot at index camera - 1."""
    if isinstance(camera, bool) or not isinstance(camera, (int, np.integer)) or not (
            1 <= camera <= num_cameras):
        raise ValueError(f"camera {camera!r} is outside 1-{num_cameras} (cameras are numbered "
                         f"within a rig: cam12..cam22 of rig 2 are cameras 1..11)")
    return np.eye(num_cameras, dtype=np.float32)[camera - 1]


def check_cameras(cameras: Sequence[int], num_cameras: int = constants.N_CAMERAS_PER_RIG
                  ) -> tuple[int, ...]:
    """Cameras 1..num_cameras of a rig, at least one, none twice (ValueError otherwise)."""
    if isinstance(cameras, (str, bytes)):
        raise ValueError(f"cameras {cameras!r}: expected a sequence of camera numbers (parse "
                         "text with `parse_cameras`)")
    cameras = tuple(cameras)
    if not cameras:
        raise ValueError(f"no camera to predict for: give at least one of 1-{num_cameras}")
    for camera in cameras:
        camera_one_hot(camera, num_cameras)
    twice = sorted({c for c in cameras if cameras.count(c) > 1})
    if twice:
        raise ValueError(f"cameras {list(cameras)} name {twice} more than once")
    return cameras


def parse_cameras(text: str, num_cameras: int = constants.N_CAMERAS_PER_RIG) -> int | list[int]:
    """'6' -> 6 (one camera); '1,6,11' -> [1, 6, 11] (in that order); 'all' -> [1, ..., 11].

    Only the form is checked here; `check_cameras` checks the numbers.
    """
    if text.strip().lower() == "all":
        return list(range(1, num_cameras + 1))
    try:
        cameras = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"cameras {text!r}: expected a camera 1..{num_cameras}, several "
                         "comma-separated, or 'all'") from None
    return cameras[0] if len(cameras) == 1 else cameras


def camera_name(camera: int, rig: int = 1) -> str:
    """Camera 1..11 of rig 1 or 2 -> its TragicTalkers name, cam01..cam11 or cam12..cam22."""
    camera_one_hot(camera)
    if isinstance(rig, bool) or not isinstance(rig, (int, np.integer)) or rig not in (1, 2):
        raise ValueError(f"rig {rig!r} is not 1 or 2")
    return constants.RIG_CAMERAS[f"{rig:02d}"][camera - 1]


def chunk_times(first_chunk: int, num_chunks: int) -> np.ndarray:
    """Row times of chunks first_chunk .. first_chunk + num_chunks - 1 (SPEC section 8).

    Returns (num_chunks, 60) float64 seconds: chunk k, frame t -> round(2k + t/30, 2). Rows
    are kept while their time is below round(duration, 2) (see `iter_predictions`).
    """
    starts = (first_chunk + np.arange(num_chunks)) * constants.CHUNK_SECONDS
    offsets = np.arange(constants.CHUNK_VIDEO_FRAMES) / constants.VIDEO_FPS
    return np.round(starts[:, None] + offsets[None, :], 2)


# --------------------------------------------------------------------------------------------
# Loading a model and running it over a recording.


@dataclasses.dataclass(frozen=True)
class Predictor:
    """Everything `predict_batch` needs: the model, its variables, the scaler, the feature."""

    model: CRNN
    variables: PyTree
    scaler: scaler_lib.Scaler
    feature_name: str


def check_scaler_shape(scaler: scaler_lib.Scaler, feature_name: str, what: str) -> None:
    """ValueError naming `what` unless the scaler's mean and std are (64 bins, C) for the
    channel count C of `feature_name`."""
    expected = (constants.N_FEATURE_BINS, features_lib.num_channels(feature_name))
    if np.shape(scaler.mean) != expected or np.shape(scaler.std) != expected:
        raise ValueError(f"{what} has shape {np.shape(scaler.mean)} (bins, channels), expected "
                         f"{expected} for {feature_name!r}")


def load_predictor(checkpoint: str | os.PathLike, features: str | None = None,
                   scaler_path: str | os.PathLike | None = None) -> Predictor:
    """A Predictor from any checkpoint asd-jax writes; `predict` and `forward` both load this way.

    Args:
      checkpoint: a model directory (a finished training workdir, or a converter output:
        config.json + model/, read by `asd_jax.checkpointing.load_model`), or one training
        checkpoint `<workdir>/checkpoints/<step>` (its workdir's config.json and scaler).
      features: the feature type the caller expects; a checkpoint of another type is an error.
        None accepts the checkpoint's.
      scaler_path: a `feature_scaler.h5` to use instead of (or when the checkpoint has none)
        the checkpoint's own scaler.

    Errors name what was passed and what to pass instead: a file (a PyTorch checkpoint must be
    converted first), a training workdir whose run has not finished (its latest checkpoint can
    be passed), a directory that is neither.
    """
    from asd_jax.training import checkpoints, configs  # pylint: disable=import-outside-toplevel
    path = pathlib.Path(checkpoint)
    _check_checkpoint_path(path)
    if checkpoints.is_checkpoint_dir(path):
        workdir = path.parent.parent
        config_path = workdir / constants.CONFIG_FILE
        if not config_path.is_file():
            raise FileNotFoundError(f"training checkpoint {path}: its workdir {workdir} has no config.json")
        train_config = configs.TrainConfig.from_json(config_path)
        config = {"features": train_config.features, "model": dict(train_config.model)}
        scaler_file = pathlib.Path(scaler_path or workdir / constants.SCALER_FILE)
        scaler = scaler_lib.load_scaler(scaler_file, features=config["features"])
        what = f"feature scaler {scaler_file} of training checkpoint {path}"
        variables = checkpoints.load_variables(path)
    else:
        variables, config, scaler = checkpointing.load_model(path)
        checkpointing.check_in_channels(config, f"model directory {path}")  # before its scaler's
        what = f"feature scaler of {path}"
        if scaler_path is not None:
            scaler = scaler_lib.load_scaler(scaler_path, features=config["features"])
            what = f"feature scaler {scaler_path}"
    feature_name = config["features"]
    if features is not None and features != feature_name:
        raise ValueError(f"checkpoint {path} was trained on {feature_name!r} features, "
                         f"but {features!r} were requested")
    if scaler is None:
        raise ValueError(f"checkpoint {path} holds no feature scaler; pass the "
                         "training set's feature_scaler.h5 (--scaler)")
    check_scaler_shape(scaler, feature_name, what)
    model = CRNN.from_config(config["model"])
    checkpointing.check_num_cameras(model, f"checkpoint {path}")
    return Predictor(model, jax.device_put(variables), scaler_lib.to_device(scaler), feature_name)


def refuse_checkpoint_files(out_path: str | os.PathLike, checkpoint: str | os.PathLike) -> None:
    """ValueError when `out_path` would replace a file of the checkpoint: its config.json or
    feature_scaler.h5, or anything inside its `model/`; for a training checkpoint
    `<workdir>/checkpoints/<step>`, its workdir's config.json, feature_scaler.h5 and
    metrics.jsonl (which resuming the run needs) or anything inside the step directory. Any other
    file in a model directory or workdir (a forward file beside the model) is allowed."""
    from asd_jax.training import checkpoints  # pylint: disable=import-outside-toplevel
    checkpoint = pathlib.Path(checkpoint)
    names = [constants.CONFIG_FILE, constants.SCALER_FILE]
    if checkpoints.is_checkpoint_dir(checkpoint):
        kept_files, store = checkpoint.parent.parent, checkpoint
        names.append(constants.METRICS_FILE)
    else:
        kept_files, store = checkpoint, checkpoint / constants.MODEL_DIR
    for name in names:
        atomic.refuse_same_file(out_path, kept_files / name, f"the checkpoint's {name}")
    out_dir = pathlib.Path(out_path).absolute().parent.resolve()
    if store.is_dir() and out_dir.is_relative_to(store.resolve()):
        raise ValueError(f"output {out_path} is inside the checkpoint's {store}: writing there "
                         "would change the model; choose another output path")


def _check_checkpoint_path(path: pathlib.Path) -> None:
    """FileNotFoundError unless `path` is a directory `load_predictor` can read, saying what
    to pass instead."""
    from asd_jax.training import checkpoints  # pylint: disable=import-outside-toplevel
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        raise FileNotFoundError(
            f"checkpoint {path} is a file; expected a model directory (config.json + model/), a "
            "finished training workdir or a training checkpoint <workdir>/checkpoints/<step>. A "
            "PyTorch checkpoint of the reference must be converted first: python -m "
            f"converters.torch_to_flax --torch_ckpt {path} --out_dir DIR --scaler feature_scaler.h5")
    if checkpoints.is_checkpoint_dir(path) or checkpointing.has_model(path):
        return
    steps_dir = path / checkpoints.CHECKPOINT_SUBDIR
    if steps_dir.is_dir():
        steps = [int(p.name) for p in steps_dir.iterdir()
                 if p.name.isdigit() and checkpoints.is_checkpoint_dir(p)]
        latest = (f"; its latest is {steps_dir / str(max(steps))}" if steps else
                  "; it holds none yet")
        raise FileNotFoundError(
            f"training workdir {path} has no exported final model ({path / constants.MODEL_DIR}): "
            "its run has not finished. Finish it by running the same training command on this "
            "workdir again (it resumes from its latest checkpoint and exports model/ at the end), "
            f"or pass one training checkpoint {steps_dir}/<step> as the checkpoint{latest}")


class Prediction(NamedTuple):
    """Rows of one camera: times (N,) float64 s, x (N,) float32 in [0, 1], confidence (N,)."""

    times: np.ndarray
    x: np.ndarray
    confidence: np.ndarray


def padded_batch_size(num_chunks: int, batch_size: int) -> int:
    """Chunks per jitted call for a recording of `num_chunks` chunks: `batch_size`, or for a
    shorter recording the smallest power of two that holds it.

    The shape of the call is then `batch_size` or a power of two below it (1, 2, 4, 8 for 8; 1,
    2, 4, 6 for 6) whatever the recordings' lengths, so a program predicting many short
    recordings compiles a few times (not once per length), and a 2-s recording still computes
    one chunk, not `batch_size`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_chunks < 1:
        raise ValueError(f"a recording of {num_chunks} chunks has nothing to predict")
    return min(batch_size, 1 << (num_chunks - 1).bit_length())


def iter_camera_predictions(predictor: Predictor, recording: Recording, cameras: Sequence[int],
                            batch_size: int = 8) -> Iterator[dict[int, Prediction]]:
    """Yields the rows of `recording` for each of `cameras` (1..11), one batch of chunks at a
    time: {camera: Prediction of the batch's rows}, in the order of `cameras`.

    All cameras share one pass (`predict_batch` computes every camera of the rig). Batches hold
    `padded_batch_size(number of chunks, batch_size)` chunks; the last is padded with silent chunks
    whose rows are dropped. While the device runs batch i, batch i + 1 is read.
    """
    cameras = check_cameras(cameras, predictor.model.num_cameras)
    num_chunks = math.ceil(recording.num_samples / constants.CHUNK_SAMPLES)
    batch = padded_batch_size(num_chunks, batch_size)
    run = functools.partial(predict_batch, predictor.variables, predictor.scaler,
                            model=predictor.model, feature_name=predictor.feature_name)

    end_time = round(recording.duration_s, 2)

    def finish(first_chunk: int, count: int, outputs: jax.Array) -> dict[int, Prediction]:
        times = chunk_times(first_chunk, count)  # (count, 60)
        keep = times < end_time
        outputs = np.asarray(outputs)[:count]  # (count, num_cameras, 60, 2)
        if not np.isfinite(outputs).all():  # the audio is finite (checked when read)
            chunk = first_chunk + int(np.argwhere(~np.isfinite(outputs))[0, 0])
            source = recording.paths[0] if len(recording.paths) == 1 else recording.paths[0].parent
            raise ValueError(
                f"{source}: the model's outputs are not finite for the chunk at "
                f"{chunk * constants.CHUNK_SECONDS:g} s; expected audio whose samples lie within "
                "about [-1, 1] (far larger ones overflow the features), and a model with finite "
                "parameters")
        parts = {}
        for camera in cameras:
            rows = outputs[:, camera - 1][keep]  # (kept, 2)
            parts[camera] = Prediction(times[keep], rows[:, 0], rows[:, 1])
        return parts

    pending = None
    for first in range(0, num_chunks, batch):
        count = min(batch, num_chunks - first)
        audio = np.zeros((batch, constants.CHUNK_SAMPLES, constants.N_MICS), np.float32)
        audio[:count] = recording.read(
            first * constants.CHUNK_SAMPLES, (first + count) * constants.CHUNK_SAMPLES
        ).reshape(count, constants.CHUNK_SAMPLES, constants.N_MICS)
        outputs = run(jnp.asarray(audio))  # dispatched asynchronously
        if pending is not None:
            yield finish(*pending)
        pending = (first, count, outputs)
    yield finish(*pending)


def iter_predictions(predictor: Predictor, recording: Recording, camera: int,
                     batch_size: int = 8) -> Iterator[Prediction]:
    """Yields the rows of `recording` for `camera` (1..11), one batch of chunks at a time (see
    `iter_camera_predictions`)."""
    for parts in iter_camera_predictions(predictor, recording, [camera], batch_size):
        yield parts[camera]


def _joined(parts: Sequence[Prediction]) -> Prediction:
    return Prediction(*(np.concatenate(column) for column in zip(*parts)))


def predict(predictor: Predictor, recording: Recording, camera: int,
            batch_size: int = 8) -> Prediction:
    """All rows of `recording` for `camera` (1..11) as one `Prediction`."""
    return _joined(list(iter_predictions(predictor, recording, camera, batch_size)))


def predict_cameras(predictor: Predictor, recording: Recording, cameras: Sequence[int],
                    batch_size: int = 8) -> dict[int, Prediction]:
    """All rows of `recording` for each of `cameras` (1..11), in one pass: {camera: rows}."""
    batches = list(iter_camera_predictions(predictor, recording, cameras, batch_size))
    return {camera: _joined([parts[camera] for parts in batches]) for camera in batches[0]}


# --------------------------------------------------------------------------------------------
# CSV output (edge I/O) and the one call of `experiments.predict`.


def format_time(t: float) -> str:
    """Seconds as the reference spells them: 0.0 -> '0', 1.10 -> '1.1', 0.03 -> '0.03'."""
    return f"{t:.2f}".rstrip("0").rstrip(".")


def write_csv(path: str | os.PathLike, rows: Iterator[Prediction],
              image_width: int | None = None) -> int:
    """Writes `time,predicted x,confidence[,x_px]` rows as they come; returns the row count.

    x_px = x * image_width (pixels, 2 decimals) when `image_width` is given. The file appears
    only when complete (written to a hidden temporary file beside it, `atomic.partial_path`, then
    renamed).
    """
    count = 0
    with atomic.partial_path(path) as partial, open(partial, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")  # LF, as the forward file
        writer.writerow(CSV_HEADER + (("x_px",) if image_width else ()))
        for part in rows:
            for t, x, c in zip(part.times, part.x, part.confidence):
                row = [format_time(t), str(np.float32(x)), str(np.float32(c))]
                if image_width:
                    row.append(f"{float(x) * image_width:.2f}")
                writer.writerow(row)
            count += len(part.times)
    return count


def read_csv(path: str | os.PathLike) -> Prediction:
    """Reads a CSV written by `write_csv` (the `x_px` column, if any, is ignored)."""
    path = pathlib.Path(path)
    text = textfiles.read_text(path, f"a predict CSV ({','.join(CSV_HEADER)}[,x_px])")
    reader = csv.reader(io.StringIO(text, newline=""))
    header = tuple(next(reader, ()))
    if header[:3] != CSV_HEADER:
        raise ValueError(f"{path}: header {textfiles.excerpt(','.join(header))}, expected "
                         f"{CSV_HEADER} first")
    values = []
    for line, row in enumerate(reader, start=2):
        try:
            values.append([float(row[0]), float(row[1]), float(row[2])])
        except (ValueError, IndexError):
            raise ValueError(f"{path}:{line}: {textfiles.excerpt(','.join(row[:3]))} are not three "
                             "numbers") from None
    values = np.array(values, np.float64).reshape(-1, 3)
    return Prediction(values[:, 0], values[:, 1].astype(np.float32),
                      values[:, 2].astype(np.float32))


def read_camera_rows(path: str | os.PathLike, name: str | None = None) -> Prediction:
    """One camera's rows from either kind of CSV, in file order.

    A forward file (`name,time,predicted x,confidence`, SPEC section 8) needs `name`
    (`<sequence>-camNN`) and gives that camera's rows; a CSV of `write_csv` (no name column)
    is one camera already, and `name` is ignored.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"forward or predict CSV {path} does not exist")
    with open(path, "rb") as f:  # the whole file's text is checked by the reader it goes to
        first = f.readline(1 << 16).decode("utf-8-sig", "replace").rstrip("\r\n")
    header = tuple(next(csv.reader([first]), ()))
    if header[:3] == CSV_HEADER:
        return read_csv(path)
    if header != evaluation.FORWARD_HEADER:
        raise ValueError(f"{path}: header {textfiles.excerpt(first)}, expected "
                         f"{evaluation.FORWARD_HEADER} (a forward file) or {CSV_HEADER} (a predict file)")
    if name is None:
        raise ValueError(f"{path} is a forward file of several cameras: give the camera's name "
                         "<sequence>-camNN")
    rows = evaluation.read_forward_csv(path)
    keep = rows.names == name.encode()
    if not keep.any():
        names = sorted({n.decode() for n in np.unique(rows.names)})
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise ValueError(f"{path} has no rows for {name!r}; it holds {shown}")
    return Prediction(rows.time_s[keep], rows.x[keep].astype(np.float32),
                      rows.confidence[keep].astype(np.float32))


def _row_names(recording: Recording, cameras: Sequence[int], name: str | None,
               rig: int) -> dict[int, str]:
    """{camera: "<name>-camNN"} for a forward file of several cameras (see `predict_to_csv`)."""
    if name is None:  # TragicTalkers keeps a sequence's mono files in a folder of its name
        first = recording.paths[0]
        name = first.stem if len(recording.paths) == 1 else pathlib.Path(
            os.path.abspath(first)).parent.name
    bad = [c for c in ',"\r\n' if c in name] if isinstance(name, str) else []
    if not isinstance(name, str) or not name.strip() or bad:
        raise ValueError(f"name {name!r} cannot name the rows <name>-camNN: expected a non-empty "
                         "name without commas, double quotes or line breaks"
                         + (f" (it has {''.join(bad)!r})" if bad else ""))
    return {c: f"{name}-{camera_name(c, rig)}" for c in cameras}


def predict_to_csv(checkpoint: str | os.PathLike, audio_paths: Sequence[str | os.PathLike],
                   camera: int | Sequence[int], out_csv: str | os.PathLike, *,
                   name: str | None = None, rig: int = 1, features: str | None = None,
                   scaler_path: str | os.PathLike | None = None, resample: bool = False,
                   batch_size: int = 8, image_width: int | None = None) -> int:
    """Checkpoint + recording -> CSV of rows for `camera` (1..11); returns the row count.

    One camera (an int) gives `time,predicted x,confidence[,x_px]` (`write_csv`). Several (a sequence)
    are predicted in one pass into a forward file (`name,time,predicted x,confidence`, SPEC section
    8's format, which `read_camera_rows`, the plots and the video overlay read), named
    `<name>-camNN`: `name` defaults to the audio file's name without its suffix (for 16 mono files,
    the name of the first one's folder; a name cannot hold a comma, a double quote or a line break,
    which the forward file's readers do not take), NN is the camera's TragicTalkers number in `rig`
    (rig 2's cameras 1..11 are cam12..cam22); `name` with one camera is an error. Each camera's
    rows are in time order; the cameras alternate batch by batch, so the file is written as the
    recording is read. Every input is checked (files, channels, lengths, rate, cameras, name,
    feature type, scaler) before anything is written.
    """
    several = not isinstance(camera, (int, np.integer))
    cameras = check_cameras(camera if several else [camera])
    camera_name(cameras[0], rig)  # checks the rig
    if not several and name is not None:
        raise ValueError(f"name {name!r} names the rows of several cameras; one camera's CSV has "
                         "no name column")
    if several and image_width is not None:
        raise ValueError("image_width adds an x_px column to a one-camera CSV; the CSV of "
                         f"{len(cameras)} cameras is a forward file (name,time,predicted x,"
                         "confidence): multiply x by the image width")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if image_width is not None and image_width < 1:
        raise ValueError(f"image_width must be a positive number of pixels, got {image_width}")
    atomic.check_output_file(out_csv)
    for path in audio_paths:
        atomic.refuse_same_file(out_csv, path, "an input audio file")
    if scaler_path is not None:
        atomic.refuse_same_file(out_csv, scaler_path, "the feature scaler")
    refuse_checkpoint_files(out_csv, checkpoint)
    recording = Recording(audio_paths, resample=resample)
    names = _row_names(recording, cameras, name, rig) if several else None
    predictor = load_predictor(checkpoint, features, scaler_path)
    if not several:
        return write_csv(out_csv, iter_predictions(predictor, recording, camera, batch_size),
                         image_width)
    from asd_jax import forward  # pylint: disable=import-outside-toplevel (forward imports predict)
    rows = ((names[c], t, x, conf)
            for parts in iter_camera_predictions(predictor, recording, cameras, batch_size)
            for c, part in parts.items()
            for t, x, conf in zip(part.times, part.x, part.confidence))
    return forward.write_forward_csv(out_csv, rows)
