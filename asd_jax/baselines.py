"""Two reference points for the demo's table, written as forward CSVs (SPEC section 8).

Both baselines produce `test_forward.csv` with exactly the rows the model's forward pass
writes (every test chunk of csv/test_forward.csv, 60 frames, time = round(start + t/30, 2),
kept while time < the sequence length), so they are scored by the same evaluation code.

- `centre_baseline`: every frame is "speaking" (confidence 1) at the image centre (x = 0.5).
- `srp_phat_baseline`: a classical localiser. Per rig, the steered response power with the
  phase transform (SRP-PHAT) of the 16-microphone array is evaluated on a grid of directions,
  one map per video frame; per camera, the map's peak inside that camera's field of view is
  projected into the image (pinhole model). Confidence comes from an energy voice activity
  detector. Steering vectors and the grid come from `pyroomacoustics.doa.algorithms["SRP"]`;
  the response is computed for all frames at once with numpy (`srp_phat_maps` equals
  pyroomacoustics' own per-frame SRP cost, see the tests).

Geometry (microphone positions, cameras) is read from the `scene.json` that the synthetic
dataset writes (`asd_jax.data.synthetic`). A DOA is a direction, not a point: the arrays and the
cameras sit at different places, so the direction is turned into a point by assuming the talker
is at a known horizontal distance from the array and at a known mouth height
(`SrpConfig.source_distance_m`, `SrpConfig.source_height_m`; by default the distance from the
array to the centre of the stage and the talkers' mean mouth height in scene.json).

Reading files happens in the `*_baseline` functions and `read_scene`; the numeric core
(`stft_frames`, `srp_phat_maps`, `energy_vad`, `project_x`) is pure numpy.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Mapping

import numpy as np
import pyroomacoustics as pra
import scipy.fft

from asd_jax import atomic
from asd_jax import constants
from asd_jax import forward as forward_lib
from asd_jax.data import tragictalkers
from asd_jax.data import wav

SAMPLES_PER_VIDEO_FRAME = constants.SAMPLE_RATE_HZ // constants.VIDEO_FPS  # 1600


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PinholeCamera:
    """A pinhole camera without lens distortion.

    rotation: (3, 3) float64, world -> camera (rows: camera x right, y down, z forward).
    position: (3,) float64, camera centre in world metres.
    fx: focal length in pixels; cx: principal point column in pixels; width: image width in px.
    """

    name: str
    rotation: np.ndarray
    position: np.ndarray
    fx: float
    cx: float
    width: int = constants.IMAGE_WIDTH_PX


@dataclasses.dataclass(frozen=True)
class RigGeometry:
    """One recording rig: its microphone array and its cameras.

    mic_positions: (16, 3) float64 world metres, in microphone order (01..16 or 23..38).
    cameras: the rig's cameras, by name ('cam01'..).
    source_distance_m: horizontal distance from the array centre assumed for the talker.
    source_height_m: talker mouth height (world z, metres) assumed for the talker.
    """

    rig: str
    mic_positions: np.ndarray
    cameras: Mapping[str, PinholeCamera]
    source_distance_m: float
    source_height_m: float


def project_x(points: np.ndarray, camera: PinholeCamera) -> tuple[np.ndarray, np.ndarray]:
    """Image column of world points.

    Args:
      points: (..., 3) float64 world metres.
      camera: the camera.

    Returns:
      (x_px, in_view): (...,) float64 columns (px, 0 = left edge) and (...,) bool, True where
      the point is in front of the camera and its column lies in [0, width).
    """
    cam = (points - camera.position) @ camera.rotation.T
    depth = cam[..., 2]
    safe = np.where(depth > 1e-9, depth, 1.0)
    x_px = camera.fx * cam[..., 0] / safe + camera.cx
    in_view = (depth > 1e-9) & (x_px >= 0) & (x_px < camera.width)
    return x_px, in_view


def read_scene(path: str | os.PathLike) -> dict[str, RigGeometry]:
    """Rig geometries from the synthetic dataset's `scene.json` ({rig: RigGeometry})."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"scene file {path} does not exist: the SRP-PHAT baseline needs the "
                                "microphone and camera geometry that asd_jax.data.synthetic writes")
    try:
        scene = json.loads(path.read_text())
        return _parse_scene(scene)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a scene description this baseline understands ({e!r})") from None


def _parse_scene(scene: Mapping) -> dict[str, RigGeometry]:
    """scene.json (asd_jax.data.synthetic.writer) -> {rig: RigGeometry}.

    The assumed talker position is prior knowledge of the stage, not of the talkers: the
    horizontal distance from each array centre to `config.stage_centre_m` and the mean of the
    female and male mouth heights `config.mouth_height_m`.
    """
    stage = np.asarray(scene["config"]["stage_centre_m"], np.float64)
    height = float(np.mean(scene["config"]["mouth_height_m"]))
    rigs = {}
    for rig, desc in scene["rigs"].items():
        mics = np.asarray(desc["mics_m"], np.float64)
        if mics.shape != (constants.N_MICS, 3):
            raise ValueError(f"rig {rig}: mics_m has shape {mics.shape}, expected (16, 3)")
        cams = {}
        for name in desc["cameras"]:
            c = scene["cameras"][name]
            rotation = np.asarray(c["rotation_world_to_camera"], np.float64)
            position = np.asarray(c["position_m"], np.float64)
            if rotation.shape != (3, 3) or position.shape != (3,):
                raise ValueError(f"camera {name}: rotation {rotation.shape} / position {position.shape}, "
                                 "expected (3, 3) / (3,)")
            cams[name] = PinholeCamera(name=name, rotation=rotation, position=position,
                                       fx=float(c["focal_px"]), cx=float(c["principal_point_px"][0]),
                                       width=int(c["image_size_px"][0]))
        centre = mics.mean(axis=0)
        rigs[rig] = RigGeometry(rig=rig, mic_positions=mics, cameras=cams,
                                source_distance_m=float(np.linalg.norm((stage - centre)[:2])),
                                source_height_m=height)
    return rigs


# ---------------------------------------------------------------------------------------------
# Numeric core
# ---------------------------------------------------------------------------------------------
def stft_frames(audio: np.ndarray, n_fft: int, hop: int, num_frames: int) -> np.ndarray:
    """Short-time Fourier transform with a periodic Hann window, frames starting at j * hop.

    Args:
      audio: (samples, mics) float; zero-padded at the end as needed.
      n_fft: frame length and FFT size (samples). hop: frame step (samples).
      num_frames: number of frames T (frame j covers samples [j*hop, j*hop + n_fft)).

    Returns:
      (T, n_fft // 2 + 1, mics) complex64.
    """
    need = (num_frames - 1) * hop + n_fft
    audio = np.asarray(audio, np.float32)[:need]
    if audio.shape[0] < need:
        audio = np.pad(audio, ((0, need - audio.shape[0]), (0, 0)))
    window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)).astype(np.float32)
    frames = np.lib.stride_tricks.sliding_window_view(audio, n_fft, axis=0)[::hop]  # (T, mics, n_fft)
    spec = scipy.fft.rfft(frames * window, axis=-1)  # (T, mics, bins) complex64
    return np.transpose(spec, (0, 2, 1))


def srp_phat_maps(stft: np.ndarray, steering: np.ndarray, snapshots_per_map: int) -> np.ndarray:
    """SRP-PHAT response maps, one per group of `snapshots_per_map` consecutive snapshots.

    The value equals pyroomacoustics' `SRP` cost for those snapshots: with p the
    PHAT-weighted spectra (X / max(|X|, 1e-14)) and a the steering vector of a grid point,
    (sum over bins k and snapshots s of [ |a^H p|^2 - |p|^2 ] + S*M*K) / (S * K * M(M-1)/2),
    i.e. the mean over microphone pairs of the real part of the PHAT cross-spectrum steered to
    that point, plus pyroomacoustics' constant offset (its formula sums the pairs explicitly;
    the beamformer form here is the same number, computed with one GEMM per frequency bin).

    Args:
      stft: (T, K, M) complex, the K analysed bins of T snapshots of M microphones.
      steering: (K, M, N) complex, the far-field steering vectors exp(i omega_k tau_m(n)) of N
        grid points (pyroomacoustics' `mode_vec[freq_bins]`).
      snapshots_per_map: S; T must be a multiple of S.

    Returns:
      (T // S, N) float64. Computed in complex64 (relative error ~1e-6).
    """
    num_snap, num_bins, num_mics = stft.shape
    if steering.shape[:2] != (num_bins, num_mics):
        raise ValueError(f"steering has shape {steering.shape}, expected ({num_bins}, {num_mics}, N)")
    if num_snap % snapshots_per_map:
        raise ValueError(f"{num_snap} snapshots are not a multiple of {snapshots_per_map}")
    stft = np.asarray(stft, np.complex64)
    phat = stft / np.maximum(np.abs(stft), np.float32(1e-14))
    phat_kmt = np.ascontiguousarray(np.transpose(phat, (1, 2, 0)))  # (K, M, T)
    steer_h = np.conj(np.transpose(steering, (0, 2, 1))).astype(np.complex64)  # (K, N, M)
    per_snap = np.zeros((steering.shape[2], num_snap), np.float64)
    for k in range(num_bins):  # one (N, M) @ (M, T) GEMM per frequency bin
        beams = steer_h[k] @ phat_kmt[k]
        per_snap += beams.real ** 2 + beams.imag ** 2
    per_snap -= np.sum(np.abs(phat) ** 2, axis=(1, 2), dtype=np.float64)[None, :]
    num_maps = num_snap // snapshots_per_map
    summed = per_snap.T.reshape(num_maps, snapshots_per_map, -1).sum(axis=1)
    pairs = num_mics * (num_mics - 1) / 2
    dc = snapshots_per_map * num_mics * num_bins
    return (summed + dc) / (snapshots_per_map * num_bins * pairs)


def smooth_frames(values: np.ndarray, radius: int) -> np.ndarray:
    """Moving average over the first axis, window 2*radius + 1 (shrunk at the ends).

    values: (F, ...) float. Returns the same shape, float64.
    """
    if radius == 0:
        return np.asarray(values, np.float64)
    csum = np.cumsum(np.pad(np.asarray(values, np.float64), [(1, 0)] + [(0, 0)] * (values.ndim - 1)),
                     axis=0)
    n = values.shape[0]
    lo = np.clip(np.arange(n) - radius, 0, n)
    hi = np.clip(np.arange(n) + radius + 1, 0, n)
    counts = (hi - lo).reshape((-1,) + (1,) * (values.ndim - 1))
    return (csum[hi] - csum[lo]) / counts


def frame_energy_db(audio: np.ndarray, num_frames: int) -> np.ndarray:
    """Energy per video frame: mean square over the frame's 1600 samples and the mics, in dB.

    audio: (samples, mics) float. Returns (num_frames,) float64 (10*log10(max(1e-12, energy))).
    """
    need = num_frames * SAMPLES_PER_VIDEO_FRAME
    audio = np.asarray(audio[:need], np.float64)
    if audio.shape[0] < need:
        audio = np.pad(audio, ((0, need - audio.shape[0]), (0, 0)))
    energy = np.mean(audio.reshape(num_frames, SAMPLES_PER_VIDEO_FRAME, -1) ** 2, axis=(1, 2))
    return 10 * np.log10(np.maximum(energy, 1e-12))


def energy_vad(energy_db: np.ndarray, *, noise_percentile: float = 10.0, threshold_db: float = 10.0,
               slope_db: float = 2.0, hangover_frames: int = 8) -> np.ndarray:
    """Speech confidence in [0, 1] per frame from frame energies.

    The noise floor is the `noise_percentile` percentile of `energy_db`; a frame's raw
    confidence is sigmoid((energy - floor - threshold_db) / slope_db), so 0.5 at
    `threshold_db` above the floor. Hangover: a frame's confidence is the maximum of the raw
    confidences of itself and the `hangover_frames` frames before it, which bridges the short
    pauses inside speech.

    energy_db: (F,) float dB. Returns (F,) float64.
    """
    energy_db = np.asarray(energy_db, np.float64)
    floor = np.percentile(energy_db, noise_percentile)
    raw = 1.0 / (1.0 + np.exp(-(energy_db - floor - threshold_db) / slope_db))
    if hangover_frames == 0:
        return raw
    padded = np.pad(raw, (hangover_frames, 0))
    windows = np.lib.stride_tricks.sliding_window_view(padded, hangover_frames + 1)
    return windows.max(axis=1)


# ---------------------------------------------------------------------------------------------
# Baselines
# ---------------------------------------------------------------------------------------------
def _output_path(data: tragictalkers.TragicTalkers, out_csv: str | os.PathLike) -> pathlib.Path:
    """Makes `out_csv`'s folder and checks the path as the forward pass does (not a folder, not
    one of the data root's inputs). Called once the inputs are read, before the work."""
    atomic.make_output_dir(pathlib.Path(out_csv).parent)
    return forward_lib.check_out_csv(out_csv, data.root)


def _write_test_forward(data: tragictalkers.TragicTalkers, index: tragictalkers.ChunkIndex,
                        outputs: np.ndarray, out_csv: pathlib.Path) -> pathlib.Path:
    """Writes `outputs` (N, 60, 2) for the N test examples of `index` with the forward pass's
    own row rule and writer (so the files differ from the model's only in the values)."""
    forward_lib.write_forward_csv(out_csv, forward_lib.forward_rows(index, outputs, data.seq_lengths()))
    return out_csv


def centre_baseline(data_root: str | os.PathLike, out_csv: str | os.PathLike) -> pathlib.Path:
    """"Always speaking at the image centre": x = 0.5 and confidence 1 on every test row."""
    data = tragictalkers.TragicTalkers(data_root)
    index = data.test_chunks()
    out_csv = _output_path(data, out_csv)
    outputs = np.zeros((len(index), constants.CHUNK_VIDEO_FRAMES, 2), np.float32)
    outputs[..., 0], outputs[..., 1] = 0.5, 1.0
    return _write_test_forward(data, index, outputs, out_csv)


@dataclasses.dataclass(frozen=True)
class SrpConfig:
    """Settings of the SRP-PHAT baseline.

    n_fft / hop: STFT frame and step in samples (48 kHz); hop must divide 1600 (one video
    frame), each video frame's map sums its 1600 / hop snapshots.
    freq_range_hz: analysed band [lo, hi) in Hz.
    grid_step_deg: azimuth step of the search grid (degrees); the grid spans the union of the
    rig cameras' fields of view at the assumed talker distance, plus `grid_margin_deg`.
    smooth_frames: maps are averaged over +-smooth_frames video frames before the peak search.
    source_distance_m / source_height_m: override the assumed talker distance (horizontal,
    from the array centre) and mouth height; None uses the values from scene.json.
    vad_*: `energy_vad` settings.
    """

    n_fft: int = 512
    hop: int = 400
    freq_range_hz: tuple[float, float] = (300.0, 4000.0)
    grid_step_deg: float = 0.25
    grid_margin_deg: float = 2.0
    smooth_frames: int = 2
    source_distance_m: float | None = None
    source_height_m: float | None = None
    vad_noise_percentile: float = 10.0
    vad_threshold_db: float = 10.0
    vad_slope_db: float = 2.0
    vad_hangover_frames: int = 8

    def __post_init__(self):
        nyquist = constants.SAMPLE_RATE_HZ / 2
        lo, hi = self.freq_range_hz
        checks = (
            (self.n_fft > 0, "n_fft", "> 0"),
            (self.hop > 0 and SAMPLES_PER_VIDEO_FRAME % self.hop == 0, "hop",
             f"a divisor of {SAMPLES_PER_VIDEO_FRAME} samples (one video frame)"),
            (0 <= lo < hi <= nyquist, "freq_range_hz", f"(lo, hi) with 0 <= lo < hi <= {nyquist:g}"),
            (self.grid_step_deg > 0, "grid_step_deg", "> 0"),
            (self.grid_margin_deg >= 0, "grid_margin_deg", ">= 0"),
            (self.smooth_frames >= 0, "smooth_frames", ">= 0"),
            (self.source_distance_m is None or self.source_distance_m > 0, "source_distance_m",
             "None or > 0"),
            (0 <= self.vad_noise_percentile <= 100, "vad_noise_percentile", "in [0, 100]"),
            (self.vad_slope_db > 0, "vad_slope_db", "> 0"),
            (self.vad_hangover_frames >= 0, "vad_hangover_frames", ">= 0"),
        )
        for ok, name, expected in checks:
            if not ok:
                raise ValueError(f"SrpConfig {name} is {getattr(self, name)!r}; expected {expected}")
        if self.band_bins().size == 0:
            raise ValueError(f"SrpConfig freq_range_hz {self.freq_range_hz} holds no FFT bin of "
                             f"n_fft {self.n_fft}")

    def band_bins(self) -> np.ndarray:
        """The FFT bins of `freq_range_hz`: round(lo / fs * n_fft) .. round(hi / fs * n_fft) - 1."""
        lo, hi = (int(round(f / constants.SAMPLE_RATE_HZ * self.n_fft)) for f in self.freq_range_hz)
        return np.arange(lo, hi)


def _rig_search_grid(geometry: RigGeometry, config: SrpConfig):
    """The SRP grid of a rig and where its points land in each camera.

    Returns (srp, points, projections): the pyroomacoustics SRP object (mic positions
    relative to the array centre; N azimuths, sorted, on one colatitude: the elevation of the
    assumed mouth height at the assumed distance), points (N, 3) world metres where the grid
    directions meet the assumed distance, and {camera: (x_px (N,), in_view (N,) bool)}.
    """
    centre = geometry.mic_positions.mean(axis=0)
    distance = geometry.source_distance_m if config.source_distance_m is None else config.source_distance_m
    height = geometry.source_height_m if config.source_height_m is None else config.source_height_m
    dz = height - centre[2]
    colatitude = float(np.arctan2(distance, dz))  # angle from +z
    # Azimuths the cameras can see at the assumed distance, on a fine circle.
    probe_az = np.deg2rad(np.arange(0.0, 360.0, 0.1))
    probe = centre + np.stack([distance * np.cos(probe_az), distance * np.sin(probe_az),
                               np.full_like(probe_az, dz)], axis=-1)
    seen = np.zeros(probe_az.shape, bool)
    for camera in geometry.cameras.values():
        seen |= project_x(probe, camera)[1]
    if not seen.any():
        raise ValueError(f"rig {geometry.rig}: no camera sees a point {distance:.2f} m from the array")
    # The seen azimuths form one arc (the cameras face the stage); unwrap it around its middle.
    seen_deg = np.rad2deg(probe_az[seen])
    ref = np.rad2deg(np.angle(np.mean(np.exp(1j * probe_az[seen]))))
    rel = (seen_deg - ref + 180.0) % 360.0 - 180.0
    lo, hi = rel.min() - config.grid_margin_deg, rel.max() + config.grid_margin_deg
    azimuth = np.deg2rad(ref + np.arange(lo, hi + 1e-9, config.grid_step_deg))
    srp = pra.doa.algorithms["SRP"](
        L=(geometry.mic_positions - centre).T, fs=constants.SAMPLE_RATE_HZ, nfft=config.n_fft,
        c=constants.SPEED_OF_SOUND_M_S, num_src=1, mode="far", azimuth=azimuth,
        colatitude=np.array([colatitude]), dim=3)
    grid_az = srp.grid.azimuth  # pyroomacoustics sorts the azimuths
    points = centre + np.stack([distance * np.cos(grid_az), distance * np.sin(grid_az),
                                np.full_like(grid_az, dz)], axis=-1)
    projections = {name: project_x(points, cam) for name, cam in geometry.cameras.items()}
    return srp, points, projections


def srp_phat_track(audio: np.ndarray, geometry: RigGeometry, num_frames: int,
                   config: SrpConfig = SrpConfig()) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """SRP-PHAT positions and energy-VAD confidences of one rig recording.

    Args:
      audio: (samples, 16) float32 at 48 kHz, the rig's microphones in order.
      geometry: the rig.
      num_frames: F, number of video frames (30 fps) to produce.
      config: settings.

    Returns:
      ({camera: (F,) float64 x in [0, 1] of the image width}, (F,) float64 confidence).
      Video frame k's map sums the 1600 / hop snapshots centred on sample 1600 k (about
      k/30 +- 1/56 s), then maps are averaged over +-smooth_frames frames; its energy is that
      of samples [1600 k - 800, 1600 k + 800). A camera that sees no grid point gets x = 0.5.
    """
    if audio.ndim != 2 or audio.shape[1] != geometry.mic_positions.shape[0]:
        raise ValueError(f"audio has shape {audio.shape}, expected (samples, "
                         f"{geometry.mic_positions.shape[0]})")
    srp, _, projections = _rig_search_grid(geometry, config)
    bins = config.band_bins()
    steering = srp.mode_vec[bins, :, :]  # (K, M, N)
    per_frame = SAMPLES_PER_VIDEO_FRAME // config.hop
    # Centre the snapshots of frame k on k * 1600: shift the signal by half a frame and by
    # half an FFT window.
    shift = SAMPLES_PER_VIDEO_FRAME // 2 + config.n_fft // 2 - config.hop // 2
    padded = np.pad(np.asarray(audio, np.float32), ((shift, 0), (0, 0)))
    spec = stft_frames(padded, config.n_fft, config.hop, num_frames * per_frame)[:, bins, :]
    maps = smooth_frames(srp_phat_maps(spec, steering, per_frame), config.smooth_frames)  # (F, N)
    positions = {}
    for name, (x_px, in_view) in projections.items():  # one masked argmax per camera
        if not in_view.any():
            positions[name] = np.full(num_frames, 0.5)
            continue
        best = np.argmax(np.where(in_view[None, :], maps, -np.inf), axis=1)
        positions[name] = x_px[best] / geometry.cameras[name].width
    centred = padded[shift - SAMPLES_PER_VIDEO_FRAME // 2:]  # frame k's energy: [1600k - 800, 1600k + 800)
    confidence = energy_vad(frame_energy_db(centred, num_frames),
                            noise_percentile=config.vad_noise_percentile,
                            threshold_db=config.vad_threshold_db, slope_db=config.vad_slope_db,
                            hangover_frames=config.vad_hangover_frames)
    return positions, confidence


def _rig_audio(mic_files: list[pathlib.Path]) -> np.ndarray:
    """(samples, 16) float32: the rig's microphone files side by side, a shorter one padded with
    zeros at its end (as the forward pass pads a chunk that runs past a file's end)."""
    columns = [wav.read_wav(path)[0] for path in mic_files]
    audio = np.zeros((max(column.shape[0] for column in columns), len(columns)), np.float32)
    for mic, column in enumerate(columns):
        audio[:column.shape[0], mic] = column
    return audio


def srp_phat_baseline(data_root: str | os.PathLike, out_csv: str | os.PathLike,
                      config: SrpConfig = SrpConfig(),
                      scene_path: str | os.PathLike | None = None) -> pathlib.Path:
    """Writes the SRP-PHAT baseline's forward CSV for the test set of `data_root`.

    scene_path: the geometry file (default `<data_root>/scene.json`).
    """
    data = tragictalkers.TragicTalkers(data_root)
    rigs = read_scene(scene_path or pathlib.Path(data_root) / "scene.json")
    index = data.test_chunks()
    lengths = data.seq_lengths()
    data.check_audio(index)
    out_csv = _output_path(data, out_csv)
    rig_of = index.rig
    # Video frame of every (example, t): the chunk's first frame + t.
    frames = (np.rint(index.start_time * constants.VIDEO_FPS).astype(np.int64)[:, None]
              + np.arange(constants.CHUNK_VIDEO_FRAMES)[None, :])
    outputs = np.zeros((len(index), constants.CHUNK_VIDEO_FRAMES, 2), np.float32)
    for sequence in sorted({str(s) for s in index.sequence}):  # str, not np.str_, in messages
        if sequence not in lengths:
            raise ValueError(f"{data.root / 'csv' / 'seq_lengths.json'} has no length for {sequence!r}")
        num_frames = int(round(lengths[sequence] * constants.VIDEO_FPS)) + 1
        for rig in sorted({str(r) for r in rig_of[index.sequence == sequence]}):
            if rig not in rigs:
                raise ValueError(f"scene has no rig {rig!r} (it has {sorted(rigs)})")
            mic_files = data.mic_files("test", sequence, rig)
            positions, confidence = srp_phat_track(_rig_audio(mic_files), rigs[rig], num_frames, config)
            if not all(np.all(np.isfinite(v)) for v in (confidence, *positions.values())):
                raise ValueError(f"{mic_files[0].parent}: SRP-PHAT gave non-finite positions or "
                                 "confidences (finite audio of an extreme amplitude?)")
            for n in np.flatnonzero((index.sequence == sequence) & (rig_of == rig)):
                camera = str(index.camera[n])
                if camera not in positions:
                    raise ValueError(f"scene has no camera {camera!r} in rig {rig}")
                f = np.minimum(frames[n], num_frames - 1)  # frames past the end are not written
                outputs[n, :, 0] = np.clip(positions[camera][f], 0.0, 1.0)
                outputs[n, :, 1] = confidence[f]
    return _write_test_forward(data, index, outputs, out_csv)
