"""Speed of asd_jax.features against the reference's approach, measured in the same run.

The reference approach is written here with numpy + librosa the way the reference computes its
features: librosa STFTs; for GCC-PHAT, per other channel, the complex128 cross spectrum and one
inverse FFT per frame in a Python loop, then the log-mel of channel 0; for SALSA-Lite,
vectorised numpy over the spectra. It does a little less work than the reference's own code,
which computes channel 0's STFT again for every pair and copies rows in a Python loop, so the
speedups printed are if anything low. Both sides are timed after an untimed first call (ours:
compilation), and both report their best time: the reference's best 2-s chunk of 16-mic audio,
asd-jax's best call on a batch of chunks, divided by the batch size.

    .venv/bin/python -m benchmarks.bench_features            # batch 32, 3 reference chunks
    .venv/bin/python -m benchmarks.bench_features --quick    # batch 4, 1 reference chunk

Last line: `RESULT gcc_speedup=<x> salsa_speedup=<y>` (reference time / asd-jax time per chunk).
"""

from __future__ import annotations

import time

import jax
import librosa
import numpy as np
import scipy.signal
from absl import flags

from asd_jax import constants as C
from asd_jax import features
import experiments

_BATCH = flags.DEFINE_integer("batch", 32, "chunks per call of the jitted functions")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed calls of the jitted functions (best is kept)")
_REF_CHUNKS = flags.DEFINE_integer("ref_chunks", 3, "chunks timed with the reference approach")
_QUICK = flags.DEFINE_bool("quick", False, "batch 4, 1 repeat, 1 reference chunk")

_SELECTED = np.round(np.arange(C.N_FEATURE_FRAMES) / (C.N_FEATURE_FRAMES / C.N_STFT_FRAMES))
_SELECTED = _SELECTED.astype(int)
_MEL = librosa.filters.mel(sr=C.SAMPLE_RATE_HZ, n_fft=C.N_FFT, n_mels=C.N_MELS,
                           fmin=C.MEL_FMIN_HZ, fmax=C.MEL_FMAX_HZ)


def _librosa_stft(audio: np.ndarray, window: np.ndarray) -> list[np.ndarray]:
    return [librosa.stft(audio[:, c], n_fft=C.N_FFT, hop_length=C.HOP_SAMPLES, window=window,
                         center=True, pad_mode="reflect", dtype=np.complex64)
            for c in range(audio.shape[1])]


def reference_gcc_phat(audio: np.ndarray) -> np.ndarray:
    """(96000, 16) -> (960, 64, 16), frame by frame and channel by channel."""
    spectra = _librosa_stft(audio, np.hanning(C.N_FFT))
    channels = []
    for n in range(1, len(spectra)):
        cross = spectra[n].astype(np.complex128) * np.conj(spectra[0].astype(np.complex128))
        frames = []
        for t in range(cross.shape[1]):
            cc = np.fft.irfft(np.exp(1j * np.angle(cross[:, t])), n=C.N_FFT)
            frames.append(np.concatenate([cc[-C.GCC_MAX_LAG:], cc[:C.GCC_MAX_LAG]]))
        channels.append(np.stack(frames))
    mel_power = _MEL @ (np.abs(spectra[0]) ** 2)
    channels.append(librosa.power_to_db(mel_power, ref=1.0, amin=1e-10, top_db=None).T)
    return np.stack(channels, axis=-1)[_SELECTED]


def reference_salsa_lite(audio: np.ndarray) -> np.ndarray:
    """(96000, 16) -> (960, 64, 16), vectorised numpy as in the reference."""
    audio = audio.astype(np.float32)
    spec = np.stack(_librosa_stft(audio, scipy.signal.get_window("hann", C.N_FFT)))
    spec = spec[:, :features.SALSA_N_BINS, _SELECTED]  # (M, 64, 960)
    log_spec = librosa.power_to_db(np.abs(spec[0]) ** 2, ref=1.0, amin=1e-10, top_db=None)
    freq = np.arange(features.SALSA_N_BINS, dtype=np.float64)
    freq[0] = 1.0
    nipd = np.angle(np.conj(spec[0]) * spec[1:]) / (features.SALSA_DELTA * freq[:, None])
    return np.concatenate([log_spec[None], nipd]).transpose(2, 1, 0)


def _time_reference(fn, chunks: np.ndarray) -> tuple[float, np.ndarray]:
    """Best time of one chunk over `chunks` (ours is a best time too), and the first's output."""
    first = fn(chunks[0])  # warm-up (librosa's and numpy's first-call costs), as ours is timed after one
    best = np.inf
    for chunk in chunks:
        start = time.perf_counter()
        fn(chunk)
        best = min(best, time.perf_counter() - start)
    return best, first


def _time_ours(fn, batch: np.ndarray, repeats: int) -> tuple[float, np.ndarray]:
    out = jax.block_until_ready(fn(batch))  # compile and warm up
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn(batch))
        best = min(best, time.perf_counter() - start)
    return best / batch.shape[0], np.asarray(out[0])


def main(argv):
    del argv
    batch_size, repeats, ref_chunks = _BATCH.value, _REPEATS.value, _REF_CHUNKS.value
    if _QUICK.value:
        batch_size, repeats, ref_chunks = 4, 1, 1
    rng = np.random.default_rng(0)
    batch = (0.1 * rng.standard_normal((batch_size, C.CHUNK_SAMPLES, C.N_MICS))).astype(np.float32)
    print(f"backend {jax.default_backend()}, {jax.device_count()} device(s); batch {batch_size}, "
          f"16 mics, 2-s chunks; reference on {ref_chunks} chunk(s)")

    speedups = {}
    for name, ours_fn, ref_fn in (("gcc", features.gcc_phat, reference_gcc_phat),
                                  ("salsa", features.salsa_lite, reference_salsa_lite)):
        ref_s, ref_out = _time_reference(ref_fn, batch[:ref_chunks])
        ours_s, ours_out = _time_ours(ours_fn, batch, repeats)
        raw_s, _ = _time_ours(lambda x: ours_fn(x, validate=False), batch, repeats)
        diff = np.abs(ours_out.astype(np.float64) - ref_out)
        if name == "gcc":
            detail = f"max |diff| GCC {diff[..., :-1].max():.1e}, log-mel dB {diff[..., -1].max():.1e}"
        else:  # the phase differences are compared as wrapped phases
            scale = features.SALSA_DELTA * np.maximum(np.arange(64), 1)[:, None]
            phase = np.abs(np.angle(np.exp(1j * (ours_out - ref_out)[..., 1:] * scale)))
            detail = f"max |diff| log-spectrum dB {diff[..., 0].max():.1e}, NIPD phase {phase.max():.1e} rad"
        speedups[name] = ref_s / ours_s
        print(f"{name}: reference {ref_s * 1e3:8.2f} ms/chunk | asd-jax {ours_s * 1e3:7.2f} ms/chunk "
              f"(without the input check {raw_s * 1e3:7.2f}) | speedup {speedups[name]:5.1f}x "
              f"| {detail}")
    print(f"RESULT gcc_speedup={speedups['gcc']:.1f} salsa_speedup={speedups['salsa']:.1f}")


if __name__ == "__main__":
    experiments.run(main)
