"""Scene geometry (rigs, microphone arrays, pinhole cameras) and talker plans.

Conventions (also written to scene.json):
- World frame: metres, origin at a floor corner of the room, x along the stage width, y from
  the rigs towards the stage, z up.
- Camera: `p_cam = R @ (p_world - position)` with R's rows the camera's right, down and forward
  axes (OpenCV convention); pixel `u = f * x / z + cx`, `v = f * y / z + cy`. Image x is u.
- A talker's mouth moves piecewise linearly between waypoints (time in seconds), and only
  while that talker is silent: each utterance is emitted from one fixed position, so rendering
  an utterance with one room impulse response per position is exact.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from asd_jax import constants
from asd_jax.data.synthetic.config import SynthConfig
from asd_jax.data.synthetic.speech import Voice

KINDS = ("conversation", "femalemonologue", "interactive", "malemonologue")
_NAME = re.compile(r"^(conversation|femalemonologue|interactive|malemonologue)(\d+)_t(\d+)$")

# Per kind: how often a silent talker moves / turns in a gap of its own speech.
_MOVE_PROBABILITY = {"conversation": 0.15, "femalemonologue": 0.5, "interactive": 0.5,
                     "malemonologue": 0.5}


@dataclasses.dataclass(frozen=True)
class Camera:
    """A pinhole camera: `rotation` (3, 3) world -> camera, `position_m` (3,), px intrinsics."""

    name: str
    rig: str
    position_m: np.ndarray
    rotation: np.ndarray
    focal_px: float
    principal_point_px: tuple[float, float]
    image_size_px: tuple[int, int]

    def project(self, points_m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """points_m (..., 3) world metres -> (u_px, v_px, depth_m), each (...,) float64."""
        p = (np.asarray(points_m, np.float64) - self.position_m) @ self.rotation.T
        depth = p[..., 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            u = self.focal_px * p[..., 0] / depth + self.principal_point_px[0]
            v = self.focal_px * p[..., 1] / depth + self.principal_point_px[1]
        return u, v, depth


@dataclasses.dataclass(frozen=True)
class Rig:
    """A rig: 16 microphones `mics_m` (16, 3) in mic-id order and 11 cameras."""

    name: str
    centre_m: np.ndarray
    mics_m: np.ndarray
    cameras: tuple[Camera, ...]


def look_at(position_m: np.ndarray, target_m: np.ndarray) -> np.ndarray:
    """Rotation (3, 3) whose rows are right, down, forward for a camera at `position_m` looking
    at `target_m` with a level horizon (world z up). Raises if it would look straight up/down."""
    forward = np.asarray(target_m, np.float64) - position_m
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, (0.0, 0.0, 1.0))
    if np.linalg.norm(right) < 1e-6:
        raise ValueError(f"camera at {position_m} looks vertically at {target_m}: undefined horizon")
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    return np.stack([right, down, forward])


def make_rigs(config: SynthConfig) -> tuple[Rig, ...]:
    """The two rigs of the configuration (deterministic, no randomness)."""
    stage = np.asarray(config.stage_centre_m, np.float64)
    width, height = config.image_size_px
    rigs = []
    for name, (x, y) in zip(constants.RIGS, config.rig_centres_m):
        centre = np.array([x, y, config.rig_height_m])
        axes = look_at(centre, np.array([stage[0], stage[1], config.rig_height_m]))
        u_axis, w_axis, n_axis = axes[0], -axes[1], axes[2]  # right, up, towards the stage
        angles = 2 * np.pi * np.arange(constants.N_MICS - 1) / (constants.N_MICS - 1)
        ring = config.mic_radius_m * (np.cos(angles)[:, None] * u_axis
                                      + np.sin(angles)[:, None] * w_axis)
        mics = centre - config.mic_setback_m * n_axis + np.concatenate([np.zeros((1, 3)), ring])
        cameras = []
        for cam_name, (du, dw) in zip(constants.RIG_CAMERAS[name], config.camera_offsets_m):
            position = centre + du * u_axis + dw * w_axis
            target = stage + config.camera_aim_spread * du * u_axis
            cameras.append(Camera(cam_name, name, position, look_at(position, target),
                                  float(config.focal_px), (width / 2.0, height / 2.0),
                                  (int(width), int(height))))
        rigs.append(Rig(name, centre, mics, tuple(cameras)))
    return tuple(rigs)


def sequence_kind(sequence: str) -> str:
    """'interactive4_t3' -> 'interactive'. ValueError for a name outside the real pattern."""
    match = _NAME.match(sequence)
    if match is None:
        raise ValueError(f"sequence name {sequence!r}: expected <kind><k>_t<j> with kind one "
                         f"of {KINDS}")
    return match.group(1)


def sequence_names(num_dev: int, num_test: int) -> tuple[list[str], list[str]]:
    """Development and test names in the real naming pattern, kinds cycled.

    Test sequences take the real test names (constants.TEST_SEQUENCES) first, then
    `<kind><k>_t9`; development names run <kind>1_t1, <kind>1_t2, ..., skipping test names.
    """
    test = list(constants.TEST_SEQUENCES[:num_test])
    for i in range(len(test), num_test):
        test.append(f"{KINDS[i % 4]}{i // 4 + 1}_t9")
    dev, n = [], 0
    while len(dev) < num_dev:
        kind, take = KINDS[n % 4], n // 4
        name = f"{kind}{take // 4 + 1}_t{take % 4 + 1}"
        if name not in test:
            dev.append(name)
        n += 1
    return dev, test


@dataclasses.dataclass(frozen=True)
class Talker:
    """speaker_id 1 or 2; waypoints: times_s (W,), mouth_m (W, 3), facing_deg (W,) (azimuth in
    the world xy plane, 0 = +x, 90 = +y); positions between waypoints are linear."""

    speaker_id: int
    sex: str
    voice: Voice
    times_s: np.ndarray
    mouth_m: np.ndarray
    facing_deg: np.ndarray

    def mouth_at(self, t_s: np.ndarray) -> np.ndarray:
        """(T,) seconds -> (T, 3) mouth positions in metres (held constant outside the waypoints)."""
        return np.stack([np.interp(t_s, self.times_s, self.mouth_m[:, k]) for k in range(3)], axis=-1)

    def facing_at(self, t_s: np.ndarray) -> np.ndarray:
        """(T,) seconds -> (T,) facing azimuth in degrees."""
        return np.interp(t_s, self.times_s, self.facing_deg)


@dataclasses.dataclass(frozen=True)
class Utterance:
    """One talker speaking from one fixed mouth position over [start_s, end_s)."""

    speaker_id: int
    start_s: float
    end_s: float


@dataclasses.dataclass(frozen=True)
class SequencePlan:
    name: str
    kind: str
    n_frames: int
    rt60_s: float
    talkers: tuple[Talker, ...]
    utterances: tuple[Utterance, ...]

    @property
    def seconds(self) -> float:
        return self.n_frames / constants.VIDEO_FPS

    def activity(self, t_s: np.ndarray) -> np.ndarray:
        """(T,) seconds -> (n_talkers, T) bool: talker speaking at that time."""
        out = np.zeros((len(self.talkers), len(t_s)), bool)
        for u in self.utterances:
            out[u.speaker_id - 1] |= (t_s >= u.start_s) & (t_s < u.end_s)
        return out


def _voice(rng: np.random.Generator, sex: str) -> Voice:
    if sex == "female":
        return Voice(f0_hz=float(rng.uniform(180, 240)), formant_scale=float(rng.uniform(1.12, 1.2)),
                     level_db=float(rng.uniform(-3, 3)))
    return Voice(f0_hz=float(rng.uniform(95, 135)), formant_scale=float(rng.uniform(0.97, 1.03)),
                 level_db=float(rng.uniform(-3, 3)))


def _turn_taking(rng: np.random.Generator, n_talkers: int, seconds: float) -> list[Utterance]:
    """Alternating utterances (1.0-3.5 s) separated by pauses (0.25-1.2 s); nobody overlaps."""
    utterances, t, speaker = [], float(rng.uniform(0.2, 1.0)), int(rng.integers(n_talkers)) + 1
    while t < seconds - 0.6:
        end = min(t + float(rng.uniform(1.0, 3.5)), seconds - 0.1)
        utterances.append(Utterance(speaker, t, end))
        t = end + float(rng.uniform(0.25, 1.2))
        if n_talkers == 2 and rng.uniform() < 0.8:
            speaker = 3 - speaker
    return utterances


def _trajectory(rng: np.random.Generator, config: SynthConfig, kind: str, own: list[Utterance],
                start: np.ndarray, seconds: float, z: float, audience_deg: float,
                avoid: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Waypoints of one talker: moves (position and facing) only in its own silent gaps."""
    bounds_lo = np.array([config.stage_x_m[0], config.stage_y_m[0]])
    bounds_hi = np.array([config.stage_x_m[1], config.stage_y_m[1]])
    times, points, facing = [0.0], [start], [audience_deg + float(rng.normal(0, 30))]
    edges = [0.0] + [e for u in own for e in (u.start_s, u.end_s)] + [seconds]
    for gap_start, gap_end in zip(edges[0::2], edges[1::2]):
        gap = gap_end - gap_start
        if gap < 0.5 or rng.uniform() >= _MOVE_PROBABILITY[kind]:
            continue
        t0 = gap_start + float(rng.uniform(0.0, 0.3)) * gap
        duration = min(gap_end - 0.05 - t0, float(rng.uniform(0.6, 2.0)))
        if duration <= 0.1:
            continue
        here = points[-1][:2]
        step = rng.normal(0.0, 1.0, 2)
        step *= min(1.0, config.walk_speed_m_s * duration / max(np.linalg.norm(step), 1e-9))
        there = np.clip(here + step, bounds_lo, bounds_hi)
        if avoid is not None and np.linalg.norm(there - avoid) < config.min_separation_m:
            there = here  # stay (the other talker is there); only turn
        times += [t0, t0 + duration]
        points += [points[-1], np.array([there[0], there[1], z])]
        facing += [facing[-1], audience_deg + float(rng.normal(0, 40))]
    return np.array(times), np.array(points), np.array(facing)


def plan_sequence(rng: np.random.Generator, name: str, n_frames: int, config: SynthConfig,
                  rigs: tuple[Rig, ...]) -> SequencePlan:
    """Draw talkers, voices, turns, trajectories and the RT60 of one sequence."""
    kind = sequence_kind(name)
    seconds = n_frames / constants.VIDEO_FPS
    sexes = {"femalemonologue": ["female"], "malemonologue": ["male"]}.get(
        kind, list(rng.permutation(["female", "male"])))
    utterances = _turn_taking(rng, len(sexes), seconds)
    audience = np.mean([r.centre_m[:2] for r in rigs], axis=0)
    lo = np.array([config.stage_x_m[0], config.stage_y_m[0]])
    hi = np.array([config.stage_x_m[1], config.stage_y_m[1]])
    # Two talkers start on either side of the stage centre line, min_separation_m apart or more.
    mid = (lo + hi) / 2
    talkers, other = [], None
    for i, sex in enumerate(sexes):
        if len(sexes) == 1:
            start = rng.uniform(lo, hi)
        else:
            half = config.min_separation_m / 2
            x_lo, x_hi = (lo[0], mid[0] - half) if i == 0 else (mid[0] + half, hi[0])
            start = np.array([rng.uniform(x_lo, x_hi), rng.uniform(lo[1], hi[1])])
        z = config.mouth_height_m[0 if sex == "female" else 1] + float(rng.uniform(-0.05, 0.05))
        audience_deg = float(np.degrees(np.arctan2(*(audience - start)[::-1])))
        own = [u for u in utterances if u.speaker_id == i + 1]
        times, points, facing = _trajectory(rng, config, kind, own, np.array([*start, z]), seconds,
                                            z, audience_deg, other)
        other = points[-1][:2]
        talkers.append(Talker(i + 1, str(sex), _voice(rng, str(sex)), times, points, facing))
    rt60 = float(rng.uniform(*config.rt60_range_s))
    return SequencePlan(name, kind, n_frames, rt60, tuple(talkers), tuple(utterances))


def frame_times(n_frames: int) -> np.ndarray:
    """Times (s) of video frames 0..n_frames-1 at 30 fps, float64."""
    return np.arange(n_frames) / constants.VIDEO_FPS
