"""Scene geometry (rigs, microphone arrays, pinhole cameras) and talker plans.

Conventions (also written to scene.json):
- World frame: metres, origin at a floor corner of the room, x along the stage width, y from
  the rigs towards the stage, z up.
- Camera: `p_cam = R @ (p_world - position)` with R's rows the camera's right, down and forward
  axes (OpenCV convention); pixel `u = f * x / z + cx`, `v = f * y / z + cy`. Image x is u.
- A talker's mouth moves piecewise linearly between waypoints (time in seconds), and only
  while that talker is silent: each utterance is emitted from one fixed position, so rendering
  an utterance with one room impulse response per position is exact. Two talkers' mouths stay
  at least `min_separation_m` apart horizontally at all times.
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


@dataclasses.dataclass(frozen=True)
class _Move:
    """A planned move of one talker: walk `step_m` (x, y) metres over [start_s, end_s) (clipped
    to the stage), then face `facing_deg`."""

    start_s: float
    end_s: float
    step_m: np.ndarray
    facing_deg: float


def _moves(rng: np.random.Generator, config: SynthConfig, kind: str, own: list[Utterance],
           seconds: float, audience_deg: float) -> list[_Move]:
    """The moves one talker would make, only in its own silent gaps (where they end up and
    whether the other talker lets them is decided by `_place`)."""
    moves = []
    edges = [0.0] + [e for u in own for e in (u.start_s, u.end_s)] + [seconds]
    for gap_start, gap_end in zip(edges[0::2], edges[1::2]):
        gap = gap_end - gap_start
        if gap < 0.5 or rng.uniform() >= _MOVE_PROBABILITY[kind]:
            continue
        t0 = gap_start + float(rng.uniform(0.0, 0.3)) * gap
        duration = min(gap_end - 0.05 - t0, float(rng.uniform(0.6, 2.0)))
        if duration <= 0.1:
            continue
        step = rng.normal(0.0, 1.0, 2)
        step *= min(1.0, config.walk_speed_m_s * duration / max(np.linalg.norm(step), 1e-9))
        moves.append(_Move(t0, t0 + duration, step, audience_deg + float(rng.normal(0, 40))))
    return moves


def closest_approach(times_a: np.ndarray, points_a: np.ndarray, times_b: np.ndarray,
                     points_b: np.ndarray, from_s: float = 0.0) -> float:
    """Smallest horizontal (x, y) distance in metres between two piecewise-linear paths at any
    time >= `from_s` (each path held at its first / last waypoint outside its times).

    times_*: (W,) seconds, increasing; points_*: (W, 2 or 3) metres. Exact: between the merged
    waypoint times both paths are linear, so is their difference.
    """
    times = np.unique(np.concatenate([[from_s], times_a, times_b]))
    times = times[times >= from_s]

    def at(t, ts, ps):
        return np.stack([np.interp(t, ts, ps[:, k]) for k in range(2)], axis=-1)

    rel = at(times, times_a, points_a) - at(times, times_b, points_b)  # (T, 2)
    r0, dr = rel[:-1], np.diff(rel, axis=0)
    length2 = np.sum(dr ** 2, axis=-1)
    s = np.clip(-np.sum(r0 * dr, axis=-1) / np.maximum(length2, 1e-300), 0.0, 1.0)
    closest = np.linalg.norm(r0 + s[:, None] * dr, axis=-1)
    return float(min(np.linalg.norm(rel[-1]), closest.min(initial=np.inf)))


def _place(config: SynthConfig, starts: list[np.ndarray], facings: list[float],
           moves: list[list[_Move]]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Waypoints (times, mouth points, facing) of each talker from its start and its moves.

    Moves are taken in order of their start time, the talkers' interleaved. With two talkers a
    move is made only if, with both talkers holding their positions after their moves so far,
    their horizontal distance stays >= min_separation_m at every time from the move's start on;
    otherwise the talker stays and only turns. Since the starts are that far apart (plan_sequence),
    the two mouths are >= min_separation_m apart (horizontally) at all times.
    """
    lo = np.array([config.stage_x_m[0], config.stage_y_m[0]])
    hi = np.array([config.stage_x_m[1], config.stage_y_m[1]])
    paths = [([0.0], [start], [facing]) for start, facing in zip(starts, facings)]
    order = sorted((m.start_s, k, i) for k, own in enumerate(moves) for i, m in enumerate(own))
    for _, k, i in order:
        move = moves[k][i]
        times, points, facing = paths[k]
        here = points[-1]
        there = np.array([*np.clip(here[:2] + move.step_m, lo, hi), here[2]])
        if len(paths) == 2:
            other_times, other_points, _ = paths[1 - k]
            gap = closest_approach(np.array(times + [move.start_s, move.end_s]),
                                   np.array(points + [here, there]), np.array(other_times),
                                   np.array(other_points), from_s=move.start_s)
            if gap < config.min_separation_m:
                there = here  # stay (the other talker is or will be in the way); only turn
        times += [move.start_s, move.end_s]
        points += [here, there]
        facing += [facing[-1], move.facing_deg]
    return [(np.array(t), np.array(p), np.array(f)) for t, p, f in paths]


def plan_sequence(rng: np.random.Generator, name: str, n_frames: int, config: SynthConfig,
                  rigs: tuple[Rig, ...]) -> SequencePlan:
    """Draw talkers, voices, turns, trajectories and the RT60 of one sequence.

    Two talkers stay >= min_separation_m apart horizontally at all times (see `_place`).
    """
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
    starts, facings, moves, voices = [], [], [], []
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
        starts.append(np.array([*start, z]))
        facings.append(audience_deg + float(rng.normal(0, 30)))
        moves.append(_moves(rng, config, kind, own, seconds, audience_deg))
        voices.append(_voice(rng, str(sex)))
    talkers = tuple(Talker(i + 1, str(sex), voice, *path) for i, (sex, voice, path) in
                    enumerate(zip(sexes, voices, _place(config, starts, facings, moves))))
    rt60 = float(rng.uniform(*config.rt60_range_s))
    return SequencePlan(name, kind, n_frames, rt60, talkers, tuple(utterances))


def frame_times(n_frames: int) -> np.ndarray:
    """Times (s) of video frames 0..n_frames-1 at 30 fps, float64."""
    return np.arange(n_frames) / constants.VIDEO_FPS
