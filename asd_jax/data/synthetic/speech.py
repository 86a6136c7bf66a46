"""A seeded source-filter synthesiser of speech-like utterances (48 kHz, float64).

Source: a glottal pulse train whose pitch follows a contour (declination over the utterance,
a rise on accented syllables, slow random drift) with a little shimmer, plus white noise for
unvoiced sounds. Filter: a cascade of five formant resonators whose frequencies glide between
random vowel targets, one per syllable, scaled by the talker's vocal-tract factor; unvoiced
onsets (fricatives, bursts) get one broad high-frequency resonance. Syllables of 0.14-0.32 s
(about 4-5 per second) give the syllable-rate envelope. The time-varying filtering is done in
the short-time Fourier domain (all frames at once), then overlap-added back.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.signal

# Vowel formant targets F1, F2, F3 (Hz) of an adult male voice: /a e i o u/ and schwa.
_VOWELS_HZ = np.array([
    [730.0, 1090.0, 2440.0], [530.0, 1840.0, 2480.0], [270.0, 2290.0, 3010.0],
    [570.0, 840.0, 2410.0], [300.0, 870.0, 2240.0], [500.0, 1500.0, 2500.0],
])
_HIGHER_FORMANTS_HZ = (3500.0, 4500.0)
_BANDWIDTHS_HZ = np.array([70.0, 100.0, 130.0, 180.0, 250.0])
_NPERSEG = 1024
_HOP = 256


@dataclasses.dataclass(frozen=True)
class Voice:
    """f0_hz: mean pitch; formant_scale: vocal-tract factor (1 = adult male, ~1.15 female);
    level_db: utterance RMS re 0.1 (full scale 1)."""

    f0_hz: float
    formant_scale: float
    level_db: float


def _resonators(freq_hz: np.ndarray, bandwidth_hz: np.ndarray, f_hz: np.ndarray,
                fs: float) -> np.ndarray:
    """Frequency response of a cascade of unit-DC-gain two-pole resonators.

    freq_hz, bandwidth_hz: (T, K) per frame and resonator; f_hz: (F,) -> (T, F) complex128.
    """
    r = np.exp(-np.pi * bandwidth_hz / fs)[:, None, :]
    theta = (2 * np.pi * freq_hz / fs)[:, None, :]
    z1 = np.exp(-2j * np.pi * f_hz / fs)[None, :, None]
    a1, a2 = -2 * r * np.cos(theta), r ** 2
    return np.prod((1 + a1 + a2) / (1 + a1 * z1 + a2 * z1 ** 2), axis=-1)


def synthesize_utterance(rng: np.random.Generator, voice: Voice, n_samples: int,
                         fs: int = 48_000) -> np.ndarray:
    """One utterance of `n_samples` samples at `fs` Hz: (n_samples,) float64, RMS set by the voice.

    Deterministic given the generator's state.
    """
    if n_samples < fs // 10:
        raise ValueError(f"utterance of {n_samples} samples: expected at least 0.1 s ({fs // 10})")
    duration = n_samples / fs

    # Syllables: boundaries, vowels, onsets, accents.
    lengths = rng.uniform(0.14, 0.32, size=int(duration / 0.14) + 2)
    ends = np.cumsum(lengths)
    n_syl = max(1, int(np.searchsorted(ends, duration)))
    bounds = np.concatenate([[0.0], ends[:n_syl]]) * duration / ends[n_syl - 1]
    vowels = _VOWELS_HZ[rng.integers(len(_VOWELS_HZ), size=n_syl)] * rng.uniform(0.93, 1.07, (n_syl, 3))
    onset_kind = rng.choice(3, size=n_syl, p=[0.3, 0.45, 0.25])  # none, fricative, burst
    onset_s = np.where(onset_kind == 1, rng.uniform(0.04, 0.09, n_syl),
                       np.where(onset_kind == 2, 0.015, 0.0))
    stress = rng.uniform(0.5, 1.0, n_syl)
    fricative_hz = rng.uniform(2500.0, 7000.0, n_syl)
    accent = rng.uniform(0.0, 3.0, n_syl) * (rng.uniform(size=n_syl) < 0.4)

    # STFT frame times; every control track is evaluated on them.
    n_frames = n_samples // _HOP + 1
    t = np.arange(n_frames) * _HOP / fs
    syl = np.clip(np.searchsorted(bounds, t, side="right") - 1, 0, n_syl - 1)
    t_in = t - bounds[syl]
    nucleus_start = bounds[syl] + onset_s[syl]
    nucleus_len = np.maximum(bounds[syl + 1] - nucleus_start, 1e-3)
    phase = np.clip((t - nucleus_start) / nucleus_len, 0.0, 1.0)
    voiced = stress[syl] * np.sin(np.pi * phase) ** 0.7
    unvoiced = np.where(t_in < onset_s[syl], 0.4 * stress[syl], 0.0)
    fade = np.minimum(1.0, np.minimum(t, duration - t) / 0.01).clip(0.0)
    voiced, unvoiced = voiced * fade, unvoiced * fade

    # Formants glide between the vowel targets placed at the syllable centres.
    centres = (bounds[:-1] + onset_s + bounds[1:]) / 2
    low = np.stack([np.interp(t, centres, vowels[:, k]) for k in range(3)], axis=-1)
    high = np.broadcast_to(np.array(_HIGHER_FORMANTS_HZ), (n_frames, 2))
    formants = np.concatenate([low, high], axis=-1) * voice.formant_scale
    bandwidths = np.broadcast_to(_BANDWIDTHS_HZ, formants.shape)

    # Pitch contour (semitones re the voice's mean), then the glottal pulse train.
    drift = scipy.signal.lfilter([0.05], [1.0, -0.95], rng.normal(0.0, 1.0, n_frames))
    semitones = 1.0 - 2.0 * t / duration + np.interp(t, centres, accent) + 4.0 * drift
    f0 = voice.f0_hz * 2.0 ** (np.interp(np.arange(n_samples) / fs, t, semitones) / 12.0)
    cycles = np.floor(np.cumsum(f0) / fs)
    pulses = np.diff(cycles, prepend=0.0) * (1.0 + 0.05 * rng.normal(size=n_samples))
    noise = rng.normal(0.0, 1.0, n_samples)

    # Spectral envelopes per frame; glottal roll-off and lip radiation give -6 dB/oct above 300 Hz.
    _, _, pulses_tf = scipy.signal.stft(pulses, fs, nperseg=_NPERSEG, noverlap=_NPERSEG - _HOP)
    f, _, noise_tf = scipy.signal.stft(noise, fs, nperseg=_NPERSEG, noverlap=_NPERSEG - _HOP)
    pulses_tf, noise_tf = pulses_tf[:, :n_frames].T, noise_tf[:, :n_frames].T  # (T, F)
    # A -40 dB floor stands in for the formants above F5 (an all-pole cascade alone falls off
    # far too steeply above 5 kHz).
    tract = _resonators(formants, bandwidths, f, fs) + 0.01
    tilt = 1.0 / np.sqrt(1.0 + (f / 300.0) ** 2)
    frication = _resonators(fricative_hz[syl][:, None], np.full((n_frames, 1), 2500.0), f, fs)
    frication = frication / np.abs(frication).max(axis=-1, keepdims=True)
    spectrum = (pulses_tf * (tract * tilt) * voiced[:, None]
                + noise_tf * (0.015 * voiced[:, None] * tract * tilt
                              + 0.005 * unvoiced[:, None] * frication))
    _, x = scipy.signal.istft(spectrum.T, fs, nperseg=_NPERSEG, noverlap=_NPERSEG - _HOP)
    x = np.pad(x, (0, max(0, n_samples - len(x))))[:n_samples]
    rms = np.sqrt(np.mean(x ** 2))
    return x * (0.1 * 10 ** (voice.level_db / 20) / max(rms, 1e-12))
