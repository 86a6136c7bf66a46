"""Every parameter of the synthetic TragicTalkers-like dataset, in one frozen dataclass.

Units are in the names (m, s, Hz, dB, px, deg, frames). World frame: metres, origin at a floor
corner of the shoebox room, x along the stage width, y from the rigs towards the stage, z up.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

from asd_jax import constants

# Horizontal focal length such that 2 degrees off the optical axis lands 89 px from the image
# centre (SPEC section 9: the 89 px tolerance is 2 degrees at the image centre).
FOCAL_PX = constants.TOLERANCE_2DEG_PX / math.tan(math.radians(2.0))  # ~2548.6 px
IMAGE_HEIGHT_PX = 2048

# Camera layout on a rig, in the rig plane (u to the rig's right, w up), metres from the rig
# centre: three rows of 3 / 5 / 3 cameras, numbered left to right, top row first (cam01..cam11
# on rig 01, cam12..cam22 on rig 02).
DEFAULT_CAMERA_OFFSETS_M = (
    (-0.50, 0.45), (0.00, 0.45), (0.50, 0.45),
    (-1.00, 0.00), (-0.50, 0.00), (0.00, 0.00), (0.50, 0.00), (1.00, 0.00),
    (-0.50, -0.45), (0.00, -0.45), (0.50, -0.45),
)


@dataclasses.dataclass(frozen=True)
class DetectorParams:
    """A simulated visual active speaker detector (see `labels.simulate_detector`).

    score_noise_std: std of the additive noise on the per-talker speaking score (score of a
      speaking talker is 1, of a silent one 0; SPEAKING when the score exceeds 0.5).
    score_noise_frames: correlation time of that noise (AR(1)), video frames.
    smooth_frames: moving-average length applied to the noisy score (1 = none), frames.
    jitter_px: std of the horizontal position error of the detected face, px.
    max_yaw_deg: a face turned further than this away from the camera is not detected.
    """

    score_noise_std: float
    score_noise_frames: float
    smooth_frames: int
    jitter_px: float
    max_yaw_deg: float

    def __post_init__(self):
        for name, ok, expected in (
                ("score_noise_std", self.score_noise_std >= 0, ">= 0"),
                ("score_noise_frames", self.score_noise_frames > 0, "> 0 frames"),
                ("smooth_frames", isinstance(self.smooth_frames, numbers.Integral)
                 and not isinstance(self.smooth_frames, bool) and self.smooth_frames >= 1,
                 "an integer >= 1 (frames; 1 = no smoothing)"),
                ("jitter_px", self.jitter_px >= 0, ">= 0 px"),
                ("max_yaw_deg", 0 < self.max_yaw_deg <= 180, "in (0, 180] degrees")):
            if not ok:  # also catches NaN
                raise ValueError(f"DetectorParams {name}={getattr(self, name)!r}: expected {expected}")


# ASC and ASC(s) share one noise realisation: ASC(s) is ASC with its scores smoothed over time
# (our reading of the "(s)"), so it sits between ASC and TalkNet by construction.
DEFAULT_DETECTORS = {
    "ASC": DetectorParams(score_noise_std=0.35, score_noise_frames=2.0, smooth_frames=1,
                          jitter_px=25.0, max_yaw_deg=60.0),
    "ASC(s)": DetectorParams(score_noise_std=0.35, score_noise_frames=2.0, smooth_frames=15,
                             jitter_px=25.0, max_yaw_deg=60.0),
    "TalkNet": DetectorParams(score_noise_std=0.2, score_noise_frames=2.0, smooth_frames=1,
                              jitter_px=8.0, max_yaw_deg=75.0),
}


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    """Geometry, acoustics and label-simulation parameters (defaults documented in README.txt).

    Acoustics: a shoebox `room_dim_m` whose RT60 is drawn per sequence uniformly in
    `rt60_range_s`; absorption and image-source order from Sabine's formula
    (`pyroomacoustics.inverse_sabine`), the order capped at `max_order` (higher orders make
    the tail longer but the simulation slower). `snr_db`: diffuse (spherically isotropic,
    pink) noise level re the reverberant speech power over the active samples; None = none.

    Rigs: centres `rig_centres_m` (x, y) at height `rig_height_m`, each facing `stage_centre_m`.
    Microphones: mic 0 of a rig at the rig centre, 15 more on a circle of radius `mic_radius_m`
    in the rig plane, `mic_setback_m` behind the camera plane. Every TDOA relative to mic 0 must
    stay within +-`max_tdoa_samples` (GCC-PHAT keeps lags -32..31), checked at construction.

    Cameras: pinhole, `image_size_px` (width, height), focal `focal_px`, principal point at the
    image centre, no distortion; positions `camera_offsets_m` (u, w) in the rig plane; camera j
    looks at the stage centre moved sideways by `camera_aim_spread` * u_j (spreads the views).

    Talkers: mouths stay in the box `stage_x_m` x `stage_y_m`, heights `mouth_height_m`
    (female, male); they walk at most `walk_speed_m_s`, and two talkers' mouths stay at least
    `min_separation_m` apart horizontally at all times (a move that would break it is not
    made). Sequences last `seconds` minus a random 0..`length_jitter_s` (so that sequence ends
    are not whole chunks, as in the real data).

    Every field is checked at construction, before anything is simulated: a ValueError names
    the field, its value and what was expected.
    """

    room_dim_m: tuple[float, float, float] = (10.0, 8.0, 4.0)
    rt60_range_s: tuple[float, float] = (0.2, 0.6)
    max_order: int = 24
    snr_db: float | None = 30.0
    rig_centres_m: tuple[tuple[float, float], tuple[float, float]] = ((3.6, 1.8), (6.4, 1.8))
    rig_height_m: float = 1.6
    stage_centre_m: tuple[float, float, float] = (5.0, 5.1, 1.6)
    mic_radius_m: float = 0.20
    mic_setback_m: float = 0.05
    max_tdoa_samples: int = 31
    image_size_px: tuple[int, int] = (constants.IMAGE_WIDTH_PX, IMAGE_HEIGHT_PX)
    focal_px: float = FOCAL_PX
    camera_offsets_m: tuple[tuple[float, float], ...] = DEFAULT_CAMERA_OFFSETS_M
    camera_aim_spread: float = 0.3
    stage_x_m: tuple[float, float] = (3.9, 6.1)
    stage_y_m: tuple[float, float] = (4.4, 5.8)
    mouth_height_m: tuple[float, float] = (1.55, 1.70)
    walk_speed_m_s: float = 0.8
    min_separation_m: float = 0.7
    length_jitter_s: float = 0.5
    peak_dbfs: float = -3.0
    vad_band_hz: tuple[float, float] = (100.0, 4000.0)
    vad_threshold_db: float = 12.0
    vad_range_db: float = 35.0
    vad_hangover_frames: int = 8
    occlusion_px: float = 120.0
    detectors: tuple[tuple[str, DetectorParams], ...] = tuple(DEFAULT_DETECTORS.items())
    missing_cameras: tuple[tuple[str, str], ...] = (("interactive1_t2", "cam17"),)

    def __post_init__(self):
        room = self.room_dim_m
        if len(room) != 3 or not all(d > 0 for d in room):
            raise ValueError(f"room_dim_m={room}: expected 3 lengths > 0 m (x, y, z)")
        if len(self.camera_offsets_m) != constants.N_CAMERAS_PER_RIG:
            raise ValueError(f"camera_offsets_m has {len(self.camera_offsets_m)} entries: expected "
                             f"{constants.N_CAMERAS_PER_RIG} (cameras per rig)")
        lo, hi = self.rt60_range_s
        if not 0.0 < lo <= hi:
            raise ValueError(f"rt60_range_s={self.rt60_range_s}: expected 0 < low <= high seconds")
        # Sabine's formula (as pyroomacoustics.inverse_sabine): the shortest RT60 needs the
        # largest energy absorption, which cannot exceed 1.
        volume = room[0] * room[1] * room[2]
        surface = 2 * (room[0] * room[1] + room[0] * room[2] + room[1] * room[2])
        absorption = 24 * math.log(10) * volume / (constants.SPEED_OF_SOUND_M_S * surface * lo)
        if absorption > 1.0:
            shortest = 24 * math.log(10) * volume / (constants.SPEED_OF_SOUND_M_S * surface)
            raise ValueError(f"room_dim_m={room} with rt60_range_s={self.rt60_range_s}: Sabine's "
                             f"formula needs an energy absorption of {absorption:.2f} for RT60 "
                             f"{lo} s; expected <= 1 (RT60 >= {shortest:.3f} s in this room, or "
                             "a smaller room)")
        if self.max_order < 0:
            raise ValueError(f"max_order={self.max_order}: expected >= 0")
        if not self.mic_radius_m > 0:  # 0: sixteen microphones at one point, no spatial cue
            raise ValueError(f"mic_radius_m={self.mic_radius_m}: expected > 0 m")
        # The largest TDOA re mic 0 is the largest mic-0 distance over the speed of sound.
        max_tdoa = self.mic_radius_m / constants.SPEED_OF_SOUND_M_S * constants.SAMPLE_RATE_HZ
        if max_tdoa > self.max_tdoa_samples:
            limit = self.max_tdoa_samples * constants.SPEED_OF_SOUND_M_S / constants.SAMPLE_RATE_HZ
            raise ValueError(f"mic_radius_m={self.mic_radius_m} gives TDOAs up to {max_tdoa:.1f} "
                             f"samples re mic 0: expected <= {self.max_tdoa_samples} "
                             f"(radius <= {limit:.4f} m)")
        room = self.room_dim_m
        for name, (x, y) in zip(constants.RIGS, self.rig_centres_m):
            if not (0 < x < room[0] and 0 < y < room[1] and 0 < self.rig_height_m < room[2]):
                raise ValueError(f"rig {name} centre {(x, y, self.rig_height_m)} m is outside "
                                 f"the room {room} m")
        if not (0 < self.stage_x_m[0] < self.stage_x_m[1] < room[0]
                and 0 < self.stage_y_m[0] < self.stage_y_m[1] < room[1]):
            raise ValueError(f"stage {self.stage_x_m} x {self.stage_y_m} m is outside the room "
                             f"{room} m")
        if not 0.0 <= self.min_separation_m < self.stage_x_m[1] - self.stage_x_m[0]:
            raise ValueError(f"min_separation_m={self.min_separation_m}: expected >= 0 and less "
                             f"than the stage width {self.stage_x_m[1] - self.stage_x_m[0]:g} m "
                             "(two talkers start on either side of the stage centre line)")
        for name, ok, expected in (
                ("focal_px", self.focal_px > 0, "> 0 px (a negative focal length mirrors the image)"),
                ("walk_speed_m_s", self.walk_speed_m_s >= 0, ">= 0 m/s"),
                ("length_jitter_s", self.length_jitter_s >= 0, ">= 0 s"),
                ("peak_dbfs", self.peak_dbfs <= 0, "<= 0 dBFS (a higher peak clips the 16-bit PCM)")):
            if not ok:  # also catches NaN
                raise ValueError(f"{name}={getattr(self, name)!r}: expected {expected}")
        names = [name for name, _ in self.detectors]
        needed = sorted({c.rsplit("_", 1)[0] for c in constants.CONDITIONS} - {"GT"})
        if sorted(set(names)) != sorted(names) or "GT" in names or not set(needed) <= set(names):
            raise ValueError(f"detectors named {names}: expected each of {needed} (the "
                             "pseudo-label sources of the 8 conditions) once, and not 'GT'")
        for name, params in self.detectors:
            if not isinstance(params, DetectorParams):
                raise ValueError(f"detectors[{name!r}]={params!r}: expected a DetectorParams")
        # Imported here: scene.py imports this module.
        from asd_jax.data.synthetic import scene  # pylint: disable=import-outside-toplevel
        for entry in self.missing_cameras:
            try:
                sequence, camera = entry
                scene.sequence_kind(sequence)
                constants.camera_rig(camera)
            except (TypeError, ValueError) as e:
                raise ValueError(f"missing_cameras entry {entry!r}: expected (sequence, camera) "
                                 f"such as ('interactive1_t2', 'cam17') ({e})") from None

    @property
    def detector_params(self) -> dict[str, DetectorParams]:
        return dict(self.detectors)
