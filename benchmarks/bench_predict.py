r"""Real-time factor of `asd_jax.predict` at the paper's size (not a test).

  python -m benchmarks.bench_predict [--seconds 64 --batch_size 8 --features gcc_phat --cameras 1]

The paper's CRNN (random weights: speed does not depend on them) runs over a 16-channel
16-bit WAV of noise written to a temporary directory, so reading, features, normalisation and
the model are all timed. The function is compiled first on a short recording with the same
batch shape; the timed run is the long one. Real-time factor = seconds of audio per second of
wall time. Runs on the CPU and, where JAX sees one, on a GPU. Target: >= 10x on 2 CPU cores.
`--cameras K` predicts cameras 1..K in the one pass (`predict.predict_cameras`; the jitted
function computes every camera whatever K, so K only changes the host's work; the reference's
approach below stays one camera).

For comparison, the reference's approach runs in the same process on the first
`--reference_chunks` chunks of the same recording (default: `--batch_size`, one batch as ours
runs them): features chunk by chunk with numpy + librosa as the reference computes them
(`benchmarks.bench_features.reference_gcc_phat` / `reference_salsa_lite`), normalisation in
numpy, and the PyTorch CRNN (`tests/torch_reference.TorchCRNN`, eval mode, `torch.no_grad`,
batches of `--batch_size`). Like ours, it is timed after an untimed run: one chunk's features
and the CRNN on a batch of the timed shape. This part needs the test extra (librosa, torch);
`--reference_chunks 0` skips it.

Last line: `RESULT predict_rtf=<CPU real-time factor>` (followed by ` cameras=K` for K > 1, and
by ` vs_reference=<ours / the reference approach's real-time factor>` when that ran). The
target is the absolute real-time factor; the ratio says how far ahead of the reference it is.
"""

import os
import pathlib
import sys
import tempfile
import time

import jax
import numpy as np
import scipy.io.wavfile
from absl import flags

from asd_jax import constants
from asd_jax import features as features_lib
from asd_jax import predict
from asd_jax import scaler as scaler_lib
from asd_jax.model import CRNN, init_variables
import experiments

_SECONDS = flags.DEFINE_float("seconds", 64.0, "Duration of the timed recording.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Chunks per jitted call.")
_FEATURES = flags.DEFINE_enum("features", "gcc_phat", ["gcc_phat", "salsa_lite"], "Features.")
_RUNS = flags.DEFINE_integer("runs", 2, "Timed runs of ours; the best is reported.")
_CAMERAS = flags.DEFINE_integer("cameras", 1, "Cameras 1..K predicted in one pass.", lower_bound=1,
                                upper_bound=constants.N_CAMERAS_PER_RIG)
_REFERENCE_CHUNKS = flags.DEFINE_integer("reference_chunks", None, "Chunks timed with the "
                                         "reference's approach (default: --batch_size; 0: skip "
                                         "it).")


def _write_noise_wav(path: pathlib.Path, seconds: float, seed: int = 0) -> None:
    """A 16-channel 16-bit WAV of white noise at 48 kHz."""
    rng = np.random.default_rng(seed)
    n = int(seconds * constants.SAMPLE_RATE_HZ)
    audio = (rng.standard_normal((n, constants.N_MICS), np.float32) * 3000).astype(np.int16)
    scipy.io.wavfile.write(path, constants.SAMPLE_RATE_HZ, audio)


def _time_device(device: jax.Device, folder: pathlib.Path, features: str, batch_size: int,
                 repeats: int, num_cameras: int) -> tuple[float, float]:
    """(best real-time factor, CPU seconds per second of audio in that run) of
    `predict.predict_cameras` for cameras 1..num_cameras on `device` over the long recording.

    The process CPU time (all threads) does not count time lost to other processes, so on a
    shared machine 2 / cpu_per_audio_s bounds what an idle 2-core machine reaches.
    """
    with jax.default_device(device):
        model = CRNN()
        channels = features_lib.num_channels(features)
        variables = jax.device_put(init_variables(jax.random.key(0), model, channels))
        scaler = scaler_lib.to_device(scaler_lib.Scaler(
            np.zeros((constants.N_FEATURE_BINS, channels), np.float32),
            np.ones((constants.N_FEATURE_BINS, channels), np.float32)))
        predictor = predict.Predictor(model, variables, scaler, features)
        warm = predict.Recording([folder / "warmup.wav"])
        long = predict.Recording([folder / "long.wav"])
        cameras = range(1, num_cameras + 1)
        predict.predict_cameras(predictor, warm, cameras, batch_size=batch_size)  # compiles
        best, best_cpu = float("inf"), float("inf")
        for _ in range(repeats):
            start, start_cpu = time.perf_counter(), time.process_time()
            rows = predict.predict_cameras(predictor, long, cameras, batch_size=batch_size)
            wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
            if wall < best:
                best, best_cpu = wall, cpu
        assert len(rows) == num_cameras
        assert len(rows[1].times) == int(round(long.duration_s * constants.VIDEO_FPS))
        return long.duration_s / best, best_cpu / long.duration_s


def _reference_rtf(path: pathlib.Path, features: str, batch_size: int, num_chunks: int) -> float:
    """Real-time factor of the reference's approach (numpy/librosa features, PyTorch CRNN)."""
    import torch  # pylint: disable=import-outside-toplevel
    from benchmarks import bench_features  # pylint: disable=import-outside-toplevel
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
    import torch_reference  # pylint: disable=import-outside-toplevel

    torch.set_num_threads(os.cpu_count())
    feature_fn = {"gcc_phat": bench_features.reference_gcc_phat,
                  "salsa_lite": bench_features.reference_salsa_lite}[features]
    channels = features_lib.num_channels(features)
    model = torch_reference.TorchCRNN(in_channels=channels).eval()
    mean = np.zeros((constants.N_FEATURE_BINS, channels))
    std = np.ones((constants.N_FEATURE_BINS, channels))
    rate, audio = scipy.io.wavfile.read(path, mmap=True)
    assert rate == constants.SAMPLE_RATE_HZ
    # Warm-up, as ours is timed after compiling: the features of one chunk, and the CRNN on a
    # batch of the first timed batch's shape (oneDNN picks its kernels per shape).
    feature_fn(audio[:constants.CHUNK_SAMPLES].astype(np.float32) / 32768.0)
    first_batch = min(batch_size, num_chunks)
    with torch.no_grad():
        model(torch.zeros(first_batch, channels, constants.N_FEATURE_FRAMES,
                          constants.N_FEATURE_BINS),
              torch.zeros(first_batch, 1, constants.N_CAMERAS_PER_RIG))
    start = time.perf_counter()
    for first in range(0, num_chunks, batch_size):
        batch = []
        for k in range(first, min(first + batch_size, num_chunks)):
            chunk = audio[k * constants.CHUNK_SAMPLES:(k + 1) * constants.CHUNK_SAMPLES]
            feats = feature_fn(chunk.astype(np.float32) / 32768.0)  # (960, 64, C)
            batch.append(np.transpose((feats - mean) / std, (2, 0, 1)))  # (C, 960, 64)
        cams = torch.zeros(len(batch), 1, constants.N_CAMERAS_PER_RIG)
        cams[:, 0, 0] = 1.0
        with torch.no_grad():
            model(torch.from_numpy(np.stack(batch).astype(np.float32)), cams)
    return num_chunks * constants.CHUNK_SECONDS / (time.perf_counter() - start)


def main(argv):
    del argv
    batch = _BATCH_SIZE.value
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        # The warm-up recording has at least `batch` chunks, so it compiles the timed shape.
        _write_noise_wav(folder / "warmup.wav", constants.CHUNK_SECONDS * batch, seed=1)
        _write_noise_wav(folder / "long.wav", _SECONDS.value)
        print(f"paper CRNN, {_FEATURES.value}, {_SECONDS.value:g} s of 16-channel audio, "
              f"batch {batch} chunks, {_CAMERAS.value} camera(s) per pass, {os.cpu_count()} CPU "
              f"cores, jax {jax.__version__}")
        cpu_rtf, cpu_per_s = _time_device(jax.devices("cpu")[0], folder, _FEATURES.value, batch,
                                          _RUNS.value, _CAMERAS.value)
        print(f"cpu: {cpu_rtf:.2f}x real time (target >= 10x on 2 cores); process CPU time "
              f"{cpu_per_s:.3f} s per s of audio (os.getloadavg: {os.getloadavg()[0]:.1f})")
        ref_chunks = batch if _REFERENCE_CHUNKS.value is None else _REFERENCE_CHUNKS.value
        ratio = ""
        if ref_chunks > 0:
            ref_rtf = _reference_rtf(folder / "long.wav", _FEATURES.value, batch, ref_chunks)
            print(f"reference approach (numpy/librosa features, PyTorch CRNN, 1 camera), "
                  f"{ref_chunks} chunks: {ref_rtf:.2f}x real time; "
                  f"ours ({_CAMERAS.value} camera(s)) / reference = {cpu_rtf / ref_rtf:.1f}")
            ratio = f" vs_reference={cpu_rtf / ref_rtf:.2f}"
        try:
            gpus = jax.devices("gpu")
        except RuntimeError:
            gpus = []
        if gpus:
            gpu_rtf, _ = _time_device(gpus[0], folder, _FEATURES.value, batch, _RUNS.value,
                                      _CAMERAS.value)
            print(f"gpu ({gpus[0].device_kind}): {gpu_rtf:.2f}x real time")
        else:
            print("gpu: none visible to JAX")
    cameras = f" cameras={_CAMERAS.value}" if _CAMERAS.value > 1 else ""
    print(f"RESULT predict_rtf={cpu_rtf:.2f}{cameras}{ratio}")


if __name__ == "__main__":
    experiments.run(main)
