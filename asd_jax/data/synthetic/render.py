"""Room acoustics: image-source room impulse responses (pyroomacoustics) and diffuse noise.

Each utterance is emitted from one fixed mouth position (see scene.py), so a rig's signal is
the sum over utterances of the utterance convolved with the room impulse responses from its
position to the rig's 16 microphones. RIRs are computed once per distinct position.

Determinism: pyroomacoustics sums the image sources in float32 split over
`pra.constants.get("num_threads")` threads (os.cpu_count() unless PRA_NUM_THREADS is set), and
the split changes the summation order, hence the last bits of the RIRs and, after quantisation,
some PCM samples. `room_impulse_responses` runs it on one thread, so the output does not depend
on the machine (on the 2-core development machine the demo's synthesis took as long: 14 s).
The CPU's BLAS kernel (OPENBLAS_CORETYPE) is the other machine dependence: LAPACK's results
differ between kernels in their last bits, and eigenvectors in sign. So the diffuse noise is
mixed without BLAS (`diffuse_noise`; its old eigenvector mixing changed 8.26 M of 8.29 M PCM
samples between two kernels), and pyroomacoustics' RIR high-pass filter is applied here with
its initial state in closed form (`highpass`; scipy's LAPACK solve still changed 1 of 54 M).
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


_CONSTANTS_LOCK = threading.Lock()


@contextlib.contextmanager
def _pyroomacoustics_constants(**values) -> Iterator[dict]:
    """pyroomacoustics' constants set to `values` inside the block, restored after it; yields
    their previous values."""
    with _CONSTANTS_LOCK:  # the constants are process-wide
        saved = {name: pra.constants.get(name) for name in values}
        for name, value in values.items():
            pra.constants.set(name, value)
        try:
            yield saved
        finally:
            for name, value in saved.items():
                pra.constants.set(name, value)


def highpass(rir: np.ndarray, sos: np.ndarray) -> np.ndarray:
    """(n,) -> (n,) float64: `rir` filtered forward and backward by the second-order sections
    `sos` (n_sections, 6), as scipy.signal.sosfiltfilt does it (odd extension of 3 x the taps
    at both ends, each pass started in the steady state of its first sample), but with the
    steady state of each section in closed form: scipy's sosfilt_zi solves a 2 x 2 system with
    LAPACK, whose last bits depend on the CPU's BLAS kernel.
    """
    sos = np.asarray(sos, np.float64)
    sos = sos / sos[:, 3:4]  # a0 = 1
    b, a = sos[:, :3], sos[:, 3:]
    # Steady state for a unit step (scipy.signal.lfilter_zi: (I - A^T) z = b[1:] - a[1:] b0
    # with A the companion matrix of a), times the DC gain of the sections before (sosfilt_zi).
    c1, c2 = b[:, 1] - a[:, 1] * b[:, 0], b[:, 2] - a[:, 2] * b[:, 0]
    z0 = (c1 + c2) / a.sum(axis=1)
    gain_before = np.cumprod(np.concatenate([[1.0], b.sum(axis=1) / a.sum(axis=1)]))[:-1]
    zi = np.stack([z0, c2 - a[:, 2] * z0], axis=1) * gain_before[:, None]  # (n_sections, 2)
    edge = 3 * (2 * len(sos) + 1 - min(np.sum(sos[:, 2] == 0), np.sum(sos[:, 5] == 0)))
    x = np.asarray(rir, np.float64)
    if len(x) <= edge:
        raise ValueError(f"rir of {len(x)} samples: expected more than {edge} (the filter's padding)")
    ext = np.concatenate([2 * x[0] - x[edge:0:-1], x, 2 * x[-1] - x[-2:-edge - 2:-1]])
    y, _ = scipy.signal.sosfilt(sos, ext, zi=zi * ext[0])
    y, _ = scipy.signal.sosfilt(sos, y[::-1], zi=zi * y[-1])
    return y[::-1][edge:-edge]


def room_impulse_responses(room_dim_m, absorption: float, max_order: int, source_m: np.ndarray,
                           mics_m: np.ndarray, fs: int = constants.SAMPLE_RATE_HZ) -> np.ndarray:
    """RIRs (n_taps, n_mics) float64 from a point source to each microphone (shoebox, ISM).

    source_m: (3,) metres; mics_m: (n_mics, 3) metres. All RIRs share pyroomacoustics' fixed
    delay of half its fractional-delay filter, so relative delays are exact. Computed on one
    thread, and pyroomacoustics' high-pass filter (its `rir_hpf_*` constants: 10 Hz by default)
    applied by `highpass`, so the result is the same on every machine (see the module
    docstring).
    """
    room = pra.ShoeBox(list(room_dim_m), fs=fs, materials=pra.Material(absorption),
                       max_order=max_order, air_absorption=False)
    room.add_source(np.asarray(source_m, np.float64))
    room.add_microphone_array(np.asarray(mics_m, np.float64).T)
    with _pyroomacoustics_constants(num_threads=1, rir_hpf_enable=False) as saved:
        room.compute_rir()
    rirs = [np.asarray(room.rir[m][0], np.float64) for m in range(len(mics_m))]
    if saved["rir_hpf_enable"]:
        sos = pra.utilities.design_highpass_filter_sos(fs, pra.constants.get("rir_hpf_fc"),
                                                       **pra.constants.get("rir_hpf_kwargs"))
        rirs = [highpass(r, sos) for r in rirs]
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
    mixed by the symmetric square root of that coherence matrix, shaped to a 1/f power spectrum
    above 50 Hz, inverse transformed and overlap-added with a square-root Hann window (whose
    squares sum to one, so the power is constant over time). Unit average power per microphone.

    Determinism: `eigh`'s eigenvectors are defined only up to sign (and up to a rotation within
    a repeated eigenvalue, which the symmetric mic ring has), and which ones LAPACK returns,
    like its last bits, depends on the CPU's BLAS kernel (OPENBLAS_CORETYPE). So the mixing
    matrix is the unique symmetric root V sqrt(L) V^T, with eigenvalues under 1e-10 of the
    largest (zero up to rounding, e.g. 15 of the 16 at 0 Hz) set to 0 and the result rounded to
    float32, and the mixing is done by einsum in float64 (exact products, a fixed summation
    order, no BLAS), the rest in float32: the same noise on every machine.
    """
    n_mics, hop = len(mics_m), nperseg // 2
    f = np.fft.rfftfreq(nperseg, 1.0 / fs)
    dist = np.linalg.norm(mics_m[:, None, :] - mics_m[None, :, :], axis=-1)
    coherence = np.sinc(2.0 * f[:, None, None] * dist[None] / constants.SPEED_OF_SOUND_M_S)
    eigval, eigvec = np.linalg.eigh(coherence)  # ascending eigenvalues
    root = np.sqrt(np.where(eigval > 1e-10 * eigval[:, -1:], eigval, 0.0))
    mixing = np.einsum("fik,fk,fjk->fij", eigvec, root, eigvec)  # (F, M, M) symmetric
    mixing /= np.sqrt(np.maximum(f, 50.0) / 50.0)[:, None, None]
    mixing = mixing.astype(np.float32).astype(np.float64)
    n_frames = -(-n_samples // hop) + 1
    window = np.sqrt(scipy.signal.get_window("hann", nperseg)).astype(np.float32)
    out = np.empty((n_mics, n_frames - 1, hop), np.float32)
    previous = None
    for t0 in range(0, n_frames, block_frames):  # blocks of frames bound the temporaries
        n = min(n_frames, t0 + block_frames) - t0
        # The coherence is real, so its square root mixes real and imaginary parts alike.
        white = rng.standard_normal(size=(len(f), n_mics, 2 * n), dtype=np.float32)
        mixed = np.einsum("fij,fjn->fin", mixing, white.astype(np.float64)).astype(np.float32)
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
