"""Room acoustics: image-source room impulse responses (pyroomacoustics) and diffuse noise.

Each utterance is emitted from one fixed mouth position (see scene.py), so a rig's signal is
the sum over utterances of the utterance convolved with the room impulse responses from its
position to the rig's 16 microphones. RIRs are computed once per distinct position.

Determinism: pyroomacoustics sums the image sources in float32 split over
`pra.constants.get("num_threads")` threads (os.cpu_count() unless PRA_NUM_THREADS is set), and
the split changes the summation order, hence the last bits of the RIRs and, after quantisation,
some PCM samples. `room_impulse_responses` runs it on one thread, so the output does not depend
on the machine (on the 2-core development machine the demo's synthesis took as long: 14 s).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import numpy as np
import pyroomacoustics as pra
import scipy.fft
import scipy.signal

from asd_jax import constants


def room_acoustics(room_dim_m, rt60_s: float, max_order_cap: int) -> tuple[float, int]:
    """(energy absorption, image-source order) from Sabine's formula, the order capped."""
    absorption, order = pra.inverse_sabine(rt60_s, list(room_dim_m))
    return float(absorption), int(min(order, max_order_cap))


_THREADS_LOCK = threading.Lock()


@contextlib.contextmanager
def _single_threaded_pyroomacoustics() -> Iterator[None]:
    """pyroomacoustics' `num_threads` set to 1 inside the block, restored after it."""
    with _THREADS_LOCK:  # the setting is process-wide
        saved = pra.constants.get("num_threads")
        pra.constants.set("num_threads", 1)
        try:
            yield
        finally:
            pra.constants.set("num_threads", saved)


def room_impulse_responses(room_dim_m, absorption: float, max_order: int, source_m: np.ndarray,
                           mics_m: np.ndarray, fs: int = constants.SAMPLE_RATE_HZ) -> np.ndarray:
    """RIRs (n_taps, n_mics) float64 from a point source to each microphone (shoebox, ISM).

    source_m: (3,) metres; mics_m: (n_mics, 3) metres. All RIRs share pyroomacoustics' fixed
    delay of half its fractional-delay filter, so relative delays are exact. Computed on one
    thread, so the result is the same on every machine (see the module docstring).
    """
    room = pra.ShoeBox(list(room_dim_m), fs=fs, materials=pra.Material(absorption),
                       max_order=max_order, air_absorption=False)
    room.add_source(np.asarray(source_m, np.float64))
    room.add_microphone_array(np.asarray(mics_m, np.float64).T)
    with _single_threaded_pyroomacoustics():
        room.compute_rir()
    rirs = [np.asarray(room.rir[m][0], np.float64) for m in range(len(mics_m))]
    out = np.zeros((max(len(r) for r in rirs), len(rirs)))
    for m, r in enumerate(rirs):
        out[:len(r), m] = r
    return out


def reverberant_image(signal: np.ndarray, rirs: np.ndarray) -> np.ndarray:
    """(n,) dry signal, (n_taps, n_mics) RIRs -> (n + n_taps - 1, n_mics) microphone signals."""
    n = len(signal) + len(rirs) - 1
    n_fft = scipy.fft.next_fast_len(n, real=True)
    spectrum = scipy.fft.rfft(signal, n_fft)[None, :] * scipy.fft.rfft(rirs.T, n_fft, axis=-1)
    return scipy.fft.irfft(spectrum, n_fft, axis=-1)[:, :n].T


def diffuse_noise(rng: np.random.Generator, mics_m: np.ndarray, n_samples: int,
                  fs: int = constants.SAMPLE_RATE_HZ, nperseg: int = 512,
                  block_frames: int = 1024) -> np.ndarray:
    """Spherically isotropic (diffuse) pink noise at the microphones: (n_samples, n_mics) float64.

    In every bin of a 50 %-overlap STFT the mic-to-mic coherence is sinc(2 f d / c) for mic
    distance d (numpy's normalised sinc: the diffuse-field coherence); white complex noise is
    mixed by a square root of that coherence matrix (symmetric eigendecomposition), shaped to a
    1/f power spectrum above 50 Hz, inverse transformed and overlap-added with a square-root
    Hann window (whose squares sum to one, so the power is constant over time). Unit average
    power per microphone.
    """
    n_mics, hop = len(mics_m), nperseg // 2
    f = np.fft.rfftfreq(nperseg, 1.0 / fs)
    dist = np.linalg.norm(mics_m[:, None, :] - mics_m[None, :, :], axis=-1)
    coherence = np.sinc(2.0 * f[:, None, None] * dist[None] / constants.SPEED_OF_SOUND_M_S)
    eigval, eigvec = np.linalg.eigh(coherence)
    mixing = eigvec * np.sqrt(np.clip(eigval, 0.0, None))[:, None, :]  # (F, M, M)
    mixing = (mixing / np.sqrt(np.maximum(f, 50.0) / 50.0)[:, None, None]).astype(np.float32)
    n_frames = -(-n_samples // hop) + 1
    window = np.sqrt(scipy.signal.get_window("hann", nperseg)).astype(np.float32)
    out = np.empty((n_mics, n_frames - 1, hop), np.float32)
    previous = None
    for t0 in range(0, n_frames, block_frames):  # blocks of frames bound the temporaries
        n = min(n_frames, t0 + block_frames) - t0
        # The coherence is real, so its square root mixes real and imaginary parts alike.
        mixed = mixing @ rng.standard_normal(size=(len(f), n_mics, 2 * n), dtype=np.float32)
        spectra = (mixed[..., :n] + 1j * mixed[..., n:]).transpose(1, 2, 0)  # (M, n, F)
        frames = np.fft.irfft(spectra, nperseg, axis=-1).astype(np.float32) * window
        if previous is not None:
            frames = np.concatenate([previous, frames], axis=1)
        first = t0 - (previous is not None)
        # 50 % overlap-add: second half of frame t plus first half of frame t + 1.
        out[:, first:first + frames.shape[1] - 1] = frames[:, 1:, :hop] + frames[:, :-1, hop:]
        previous = frames[:, -1:]
    noise = out.reshape(n_mics, -1)[:, :n_samples].T.astype(np.float64)
    return noise / np.sqrt(np.mean(noise ** 2))


def render_rig(plan, rig_mics_m: np.ndarray, room_dim_m, absorption: float, max_order: int,
               dry: dict, fs: int = constants.SAMPLE_RATE_HZ) -> np.ndarray:
    """Reverberant speech of one sequence at one rig: (n_samples, 16) float64.

    plan: a scene.SequencePlan; dry: utterance index -> dry signal (float64 (n,)). An utterance
    starts at sample round(start_s * fs); reverberation past the sequence end is cut.
    """
    n_samples = plan.n_frames * fs // constants.VIDEO_FPS
    out = np.zeros((n_samples, len(rig_mics_m)))
    cache: dict[tuple, np.ndarray] = {}
    for i, utt in enumerate(plan.utterances):
        talker = plan.talkers[utt.speaker_id - 1]
        source = talker.mouth_at(np.array([utt.start_s]))[0]
        key = tuple(np.round(source, 9))
        if key not in cache:
            cache[key] = room_impulse_responses(room_dim_m, absorption, max_order, source,
                                                rig_mics_m, fs)
        image = reverberant_image(dry[i], cache[key])
        start = int(round(utt.start_s * fs))
        stop = min(n_samples, start + len(image))
        out[start:stop] += image[:stop - start]
    return out
