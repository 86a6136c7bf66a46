"""Labels of a synthetic sequence: ground truth, simulated visual detectors, an energy VAD.

Shapes: C cameras, K talkers, F video frames (30 fps; frame f is at time f / 30 s).
Pixel positions are image x (u) in px, float64 unless said otherwise.

Position labels ("pseudo labels") in the development CSVs, for every source (GT or a
detector): a frame is SPEAKING when some talker is (or is detected as) speaking; `x` is that
talker's image x / width (the first talker wins when two are, as in the evaluation), clipped
to [0, 1]. When nobody is, `x` is 1.0: the value the reference uses for "no active speaker"
(its label padding past a sequence end, and its visual baselines' forward files for frames
without a face). The loss never reads x on those frames.
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage
import scipy.signal

from asd_jax.data.synthetic.config import DetectorParams

NO_SPEAKER_X = 1.0


def project_talkers(plan, cameras) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(u_px, v_px, depth_m), each (C, K, F): every talker's mouth in every camera per frame."""
    t = np.arange(plan.n_frames) / 30.0
    mouths = np.stack([talker.mouth_at(t) for talker in plan.talkers])  # (K, F, 3)
    projections = [cam.project(mouths) for cam in cameras]
    return tuple(np.stack([p[i] for p in projections]) for i in range(3))


def visibility(plan, cameras, u_px, v_px, depth_m,
               occlusion_px: float) -> tuple[np.ndarray, np.ndarray]:
    """(in_view_unoccluded (C, K, F) bool, yaw_deg (C, K, F)): face inside the image, in front
    of the camera and not hidden by a nearer talker within `occlusion_px`; yaw_deg is the angle
    between where the talker faces and the direction from the talker to the camera."""
    width, height = cameras[0].image_size_px
    in_view = (depth_m > 0) & (u_px >= 0) & (u_px < width) & (v_px >= 0) & (v_px < height)
    near = np.abs(u_px[:, :, None] - u_px[:, None, :]) < occlusion_px  # (C, K, K, F)
    nearer = depth_m[:, None, :, :] < depth_m[:, :, None, :]  # [c, k, j]: j is nearer than k
    occluded = np.any(near & nearer & in_view[:, None, :, :], axis=2)
    t = np.arange(plan.n_frames) / 30.0
    mouths = np.stack([talker.mouth_at(t) for talker in plan.talkers])  # (K, F, 3)
    facing = np.radians(np.stack([talker.facing_at(t) for talker in plan.talkers]))  # (K, F)
    cam_xy = np.stack([cam.position_m[:2] for cam in cameras])  # (C, 2)
    to_cam = cam_xy[:, None, None, :] - mouths[None, :, :, :2]
    to_cam_deg = np.arctan2(to_cam[..., 1], to_cam[..., 0])
    yaw = np.degrees(np.abs(np.angle(np.exp(1j * (to_cam_deg - facing[None])))))
    return in_view & ~occluded, yaw


def speaker_x(u_px: np.ndarray, speaking: np.ndarray, width: int) -> np.ndarray:
    """Normalised x (..., F) of the first speaking talker (K axis -2), NO_SPEAKER_X if none.

    u_px: (..., K, F) px; speaking: (..., K, F) bool.
    """
    first = np.argmax(speaking, axis=-2)
    u = np.take_along_axis(u_px, first[..., None, :], axis=-2)[..., 0, :]
    return np.where(speaking.any(axis=-2), np.clip(u / width, 0.0, 1.0), NO_SPEAKER_X)


def _ar1(rng: np.random.Generator, shape, frames: float) -> np.ndarray:
    """Unit-variance AR(1) noise along the last axis with correlation time `frames`."""
    rho = np.exp(-1.0 / frames)
    white = rng.normal(size=shape)
    white[..., 0] /= np.sqrt(1 - rho ** 2)  # start in the stationary distribution
    return scipy.signal.lfilter([np.sqrt(1 - rho ** 2)], [1.0, -rho], white, axis=-1)


def detector_noise(rng: np.random.Generator, shape,
                   params: DetectorParams) -> tuple[np.ndarray, np.ndarray]:
    """(score noise, position jitter in px), each `shape` (C, K, F), for one detector run."""
    return (params.score_noise_std * _ar1(rng, shape, params.score_noise_frames),
            params.jitter_px * _ar1(rng, shape, params.score_noise_frames))


def simulate_detector(active: np.ndarray, u_px: np.ndarray, visible: np.ndarray, yaw_deg: np.ndarray,
                      noise: tuple[np.ndarray, np.ndarray], params: DetectorParams,
                      width: int) -> tuple[np.ndarray, np.ndarray]:
    """A visual active speaker detector's output per camera: (x (C, F) normalised, speaking (C, F)).

    active: (K, F) ground-truth activity; u_px, visible, yaw_deg: (C, K, F) (see `visibility`).
    A face is detected when visible and turned less than `max_yaw_deg` from the camera; its
    speaking score (1 speaking, 0 silent, plus correlated noise, then a moving average of
    `smooth_frames`) must exceed 0.5; the most confident detected talker gives x, with jitter.
    """
    score_noise, jitter = noise
    score = active[None].astype(np.float64) + score_noise
    if params.smooth_frames > 1:
        score = scipy.ndimage.uniform_filter1d(score, params.smooth_frames, axis=-1, mode="nearest")
    detected = visible & (yaw_deg <= params.max_yaw_deg)
    speaking = detected & (score > 0.5)
    score = np.where(speaking, score, -np.inf)
    best = np.argmax(score, axis=1)[:, None, :]  # (C, 1, F)
    u = np.take_along_axis(u_px + jitter, best, axis=1)[:, 0, :]
    any_speaking = speaking.any(axis=1)
    return np.where(any_speaking, np.clip(u / width, 0.0, 1.0), NO_SPEAKER_X), any_speaking


def energy_vad(audio: np.ndarray, n_frames: int, fs: int, band_hz: tuple[float, float],
               threshold_db: float, range_db: float, hangover_frames: int) -> np.ndarray:
    """Energy voice activity per video frame: (n_frames,) bool from mono `audio` (n,) float.

    The band-passed signal's energy per 1/30 s frame (dB) is compared with a threshold
    `threshold_db` above the 10th-percentile frame energy (the noise floor), but never below
    `range_db` under the 95th percentile (so digital silence does not make every reverberant
    tail active). Hangover: a frame stays active for `hangover_frames` frames after the last
    frame above threshold.
    """
    sos = scipy.signal.butter(4, band_hz, btype="bandpass", fs=fs, output="sos")
    band = scipy.signal.sosfiltfilt(sos, audio)
    per_frame = fs // 30
    frames = np.pad(band, (0, max(0, n_frames * per_frame - len(band))))[:n_frames * per_frame]
    energy_db = 10 * np.log10(np.mean(frames.reshape(n_frames, per_frame) ** 2, axis=1) + 1e-20)
    floor, loud = np.percentile(energy_db, [10, 95])
    raw = energy_db > max(floor + threshold_db, loud - range_db)
    # Active at f if raw anywhere in [f - hangover, f]: a windowed count from a cumulative sum.
    count = np.concatenate([[0], np.cumsum(raw)])
    lagged = count[np.maximum(np.arange(1, n_frames + 1) - hangover_frames - 1, 0)]
    return count[1:] - lagged > 0
