"""Simulate one sequence end to end: plan, speech, rooms, noise, quantisation, labels.

Everything is drawn from generators seeded by (seed, sequence name), so a sequence does not
change when other sequences are added or removed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import numbers

import numpy as np

from asd_jax import constants
from asd_jax.data.synthetic import labels, render, scene, speech
from asd_jax.data.synthetic.config import SynthConfig

FS = constants.SAMPLE_RATE_HZ
_PCM_SCALE = 32768.0  # int16 value v reads back as v / 32768 (libsndfile's scaling)


@dataclasses.dataclass
class SimulatedSequence:
    """A simulated sequence.

    audio: rig -> (n_samples, 16) int16 PCM in microphone order.
    gt_u, gt_v: (C=22, K, F) mouth projections in px (unrounded) for cameras cam01..cam22.
    active: (K, F) bool ground-truth activity. vad: rig -> (F,) bool.
    positions: source -> (x (C, F) normalised, speaking (C, F) bool) for GT and each detector.
    """

    plan: scene.SequencePlan
    absorption: float
    max_order: int
    snr_db: float | None
    gain: float
    audio: dict[str, np.ndarray]
    gt_u: np.ndarray
    gt_v: np.ndarray
    active: np.ndarray
    vad: dict[str, np.ndarray]
    positions: dict[str, tuple[np.ndarray, np.ndarray]]


def sequence_seed(seed: int, name: str) -> np.random.SeedSequence:
    """The seed sequence of one sequence: a function of the run seed (an integer >= 0) and the
    sequence name."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed={seed!r}: expected an integer >= 0")
    if seed < 0:
        raise ValueError(f"seed={seed}: expected an integer >= 0")
    digest = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    return np.random.SeedSequence(entropy=int(seed), spawn_key=(digest,))


def simulate_sequence(name: str, seconds: float, seed: int, config: SynthConfig,
                      rigs: tuple[scene.Rig, ...]) -> SimulatedSequence:
    plan_rng, speech_rng, noise_rng, detector_rng = (
        np.random.default_rng(s) for s in sequence_seed(seed, name).spawn(4))
    jitter = int(round(config.length_jitter_s * constants.VIDEO_FPS))
    n_frames = int(round(seconds * constants.VIDEO_FPS)) - int(plan_rng.integers(0, jitter + 1))
    plan = scene.plan_sequence(plan_rng, name, n_frames, config, rigs)
    n_samples = n_frames * FS // constants.VIDEO_FPS

    # Dry speech per utterance, then each rig's reverberant image.
    dry = {}
    for i, utt in enumerate(plan.utterances):
        n = int(round(utt.end_s * FS)) - int(round(utt.start_s * FS))
        dry[i] = speech.synthesize_utterance(speech_rng, plan.talkers[utt.speaker_id - 1].voice, n, FS)
    absorption, max_order = render.room_acoustics(config.room_dim_m, plan.rt60_s, config.max_order)
    images = {rig.name: render.render_rig(plan, rig.mics_m, config.room_dim_m, absorption,
                                          max_order, dry, FS) for rig in rigs}

    # Diffuse noise at the requested SNR re the speech power over the active samples.
    t_samples = np.arange(n_samples) / FS
    speaking = plan.activity(t_samples).any(axis=0)
    if config.snr_db is not None and np.isfinite(config.snr_db):
        for rig in rigs:
            image = images[rig.name]
            power = np.mean(image[speaking] ** 2) if speaking.any() else np.mean(image ** 2)
            noise = render.diffuse_noise(noise_rng, rig.mics_m, n_samples, FS)
            image += noise * np.sqrt(power / 10 ** (config.snr_db / 10))

    # One gain for the whole sequence (both rigs) keeps the level differences between mics.
    peak = max(np.abs(x).max() for x in images.values())
    gain = 10 ** (config.peak_dbfs / 20) / max(peak, 1e-12)
    audio = {r: np.clip(np.round(x * gain * _PCM_SCALE), -32768, 32767).astype(np.int16)
             for r, x in images.items()}
    vad = {r: labels.energy_vad(a[:, 0] / _PCM_SCALE, n_frames, FS, config.vad_band_hz,
                                config.vad_threshold_db, config.vad_range_db,
                                config.vad_hangover_frames) for r, a in audio.items()}

    # Ground truth and simulated visual detectors for all 22 cameras.
    cameras = [cam for rig in rigs for cam in rig.cameras]
    width = cameras[0].image_size_px[0]
    u, v, depth = labels.project_talkers(plan, cameras)
    active = plan.activity(scene.frame_times(n_frames))
    visible, yaw = labels.visibility(plan, cameras, u, v, depth, config.occlusion_px)
    u_px = np.rint(u)
    positions = {"GT": (labels.speaker_x(u_px, np.broadcast_to(active, u.shape), width),
                        np.broadcast_to(active.any(axis=0), (len(cameras), n_frames)))}
    noises = {}
    for detector, params in config.detectors:
        key = (params.score_noise_std, params.score_noise_frames, params.jitter_px)
        if key not in noises:  # detectors that differ only in smoothing share one noise draw
            noises[key] = labels.detector_noise(detector_rng, u.shape, params)
        x, spk = labels.simulate_detector(active, u, visible, yaw, noises[key], params, width)
        positions[detector] = (np.rint(x * width) / width, spk)
    return SimulatedSequence(plan, absorption, max_order, config.snr_db, gain, audio, u, v,
                             active, vad, positions)
