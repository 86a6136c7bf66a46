"""Write a synthetic dataset in the TragicTalkers layout (SPEC section 1), atomically.

<out_dir>/
  TragicTalkers/audio/{development,test}/<sequence>/<MM>_<sequence>.wav   16-bit PCM, 48 kHz
  csv/development_<COND>.csv   name,time,x,pseudo_label,va_label (all 8 conditions)
  csv/test_forward.csv         name,time (one row per frame and camera of the test sequences)
  csv/seq_lengths.json         {"<sequence>": "<seconds>"}
  GT/<test sequence>/<rig>/<sequence>-camNN_GT.csv   frame,x_px,y_px,speaker_id,label
  README.txt, scene.json       what was simulated, with which parameters; the geometry

The tree is built in a hidden sibling directory `.<name>.partial-<host>-<pid>-<hex>` and renamed
into place at the end, so an interrupted run never leaves a tree that looks complete; the next
run for the same `out_dir` removes such directories of killed runs. With overwrite, the old
tree is first renamed to a hidden sibling `.<name>.old-...` and deleted only once the new one
is in place, so an interrupt leaves either the old tree or the new one at `out_dir`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import json
import math
import multiprocessing
import numbers
import os
import pathlib
import re
import shutil
import socket
import uuid

import numpy as np
import scipy.io.wavfile
from absl import logging

from asd_jax import atomic
from asd_jax import constants
from asd_jax.data.synthetic import scene
from asd_jax.data.synthetic.config import SynthConfig
from asd_jax.data.synthetic.sequence import FS, SimulatedSequence, simulate_sequence

SPEAKING, NOT_SPEAKING = "SPEAKING", "NOT_SPEAKING"


def format_time(frame: int) -> str:
    """Frame index -> its time in seconds rounded to 2 decimals, shortest form: 0, 0.03, 1, 1.1."""
    return f"{round(frame / constants.VIDEO_FPS, 2):.2f}".rstrip("0").rstrip(".")


def format_length(n_frames: int) -> str:
    """Sequence length as in the real seq_lengths.json: seconds truncated to 3 decimals."""
    millis = n_frames * 1000 // constants.VIDEO_FPS
    return f"{millis // 1000}.{millis % 1000:03d}".rstrip("0").rstrip(".")


def _cameras(config: SynthConfig, sequence: str) -> list[str]:
    missing = {cam for seq, cam in config.missing_cameras if seq == sequence}
    return [c for rig in constants.RIGS for c in constants.RIG_CAMERAS[rig] if c not in missing]


def _label(flags: np.ndarray) -> list[str]:
    return [SPEAKING if f else NOT_SPEAKING for f in flags]


def _write_audio(root: pathlib.Path, split: str, seq: SimulatedSequence) -> None:
    folder = root / "TragicTalkers" / "audio" / split / seq.plan.name
    folder.mkdir(parents=True)
    for rig, pcm in seq.audio.items():
        for m, mic in enumerate(constants.RIG_MICS[rig]):
            path = folder / f"{mic}_{seq.plan.name}.wav"
            scipy.io.wavfile.write(path, FS, np.ascontiguousarray(pcm[:, m]))


def _development_rows(seq: SimulatedSequence, config: SynthConfig) -> dict[str, list[str]]:
    """Condition -> CSV lines (without header) of one development sequence."""
    all_cams = [c for rig in constants.RIGS for c in constants.RIG_CAMERAS[rig]]
    times = [format_time(f) for f in range(seq.plan.n_frames)]
    va = {"GT": np.broadcast_to(seq.active.any(axis=0), (len(all_cams), seq.plan.n_frames)),
          "VAD": np.stack([seq.vad[constants.camera_rig(c)] for c in all_cams])}
    out = {}
    for condition in constants.CONDITIONS:
        source, va_source = condition.rsplit("_", 1)
        x, pseudo = seq.positions[source]
        lines = []
        for cam in _cameras(config, seq.plan.name):
            c = all_cams.index(cam)
            name = f"{seq.plan.name}-{cam}"
            lines += [f"{name},{t},{float(xv)!r},{p},{a}" for t, xv, p, a in
                      zip(times, x[c], _label(pseudo[c]), _label(va[va_source][c]))]
        out[condition] = lines
    return out


def _write_gt(root: pathlib.Path, seq: SimulatedSequence, config: SynthConfig) -> None:
    """GT files: rows of speaker 1 (frames 0..F-1), then of speaker 2 for two-talker sequences."""
    all_cams = [c for rig in constants.RIGS for c in constants.RIG_CAMERAS[rig]]
    u, v = np.rint(seq.gt_u).astype(np.int64), np.rint(seq.gt_v).astype(np.int64)
    for cam in _cameras(config, seq.plan.name):
        c, rig = all_cams.index(cam), constants.camera_rig(cam)
        lines = []
        for k, talker in enumerate(seq.plan.talkers):
            lines += [f"{f},{u[c, k, f]},{v[c, k, f]},{talker.speaker_id},{lab}"
                      for f, lab in enumerate(_label(seq.active[k]))]
        folder = root / "GT" / seq.plan.name / rig
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{seq.plan.name}-{cam}_GT.csv").write_text("\n".join(lines) + "\n")


def _sequence_json(seq: SimulatedSequence, split: str) -> dict:
    plan = seq.plan
    return {
        "split": split, "kind": plan.kind, "n_frames": plan.n_frames,
        "seconds": format_length(plan.n_frames), "rt60_s": plan.rt60_s,
        "energy_absorption": seq.absorption, "max_order": seq.max_order, "snr_db": seq.snr_db,
        "pcm_gain": seq.gain,
        "talkers": [{
            "speaker_id": t.speaker_id, "sex": t.sex, **dataclasses.asdict(t.voice),
            "waypoint_times_s": t.times_s.tolist(), "mouth_m": t.mouth_m.tolist(),
            "facing_deg": t.facing_deg.tolist()} for t in plan.talkers],
        "utterances": [[u.speaker_id, u.start_s, u.end_s] for u in plan.utterances],
    }


def _scene_json(config: SynthConfig, rigs, sequences: dict, seed: int) -> dict:
    return {
        "description": "asd-jax synthetic TragicTalkers-like dataset: geometry and talker trajectories",
        "conventions": {
            "world": "metres; origin at a floor corner of the room; x along the stage, y from the "
                     "rigs towards the stage, z up",
            "camera": "p_cam = R @ (p_world - position_m), R rows = right, down, forward; "
                      "u = focal_px * p_cam[0] / p_cam[2] + cx, v = focal_px * p_cam[1] / p_cam[2] + cy",
            "trajectory": "mouth position and facing are linear between waypoints (seconds) and "
                          "constant outside them; frame f is at f / 30 s",
            "activity": "speaker_id speaks over [start_s, end_s) of each utterance; frame f is "
                        "SPEAKING when f / 30 lies in such an interval",
            "facing_deg": "azimuth in the world xy plane, 0 = +x, 90 = +y",
        },
        "seed": seed, "sample_rate_hz": FS, "video_fps": constants.VIDEO_FPS,
        "speed_of_sound_m_s": constants.SPEED_OF_SOUND_M_S,
        "room_dim_m": list(config.room_dim_m),
        "config": json.loads(json.dumps(dataclasses.asdict(config))),
        "rigs": {rig.name: {"centre_m": rig.centre_m.tolist(), "mic_ids": list(constants.RIG_MICS[rig.name]),
                            "mics_m": rig.mics_m.tolist(), "cameras": list(constants.RIG_CAMERAS[rig.name])}
                 for rig in rigs},
        "cameras": {cam.name: {"rig": cam.rig, "position_m": cam.position_m.tolist(),
                               "rotation_world_to_camera": cam.rotation.tolist(),
                               "focal_px": cam.focal_px, "principal_point_px": list(cam.principal_point_px),
                               "image_size_px": list(cam.image_size_px)}
                    for rig in rigs for cam in rig.cameras},
        "sequences": sequences,
    }


def _readme(config: SynthConfig, sequences: dict, args: dict) -> str:
    rows = "\n".join(f"  {name:24s} {s['split']:11s} {s['kind']:15s} {s['seconds']:>7s} s  "
                     f"RT60 {s['rt60_s']:.2f} s  ISM order {s['max_order']}  "
                     f"talkers {len(s['talkers'])}  utterances {len(s['utterances'])}"
                     for name, s in sequences.items())
    detectors = "\n".join(f"  {name}: {p}" for name, p in config.detectors)
    noise = ("No noise." if config.snr_db is None else
             f"Diffuse (spherically isotropic, pink) noise at SNR {config.snr_db} dB re the\n"
             "reverberant speech power over the active samples (mean over the rig's 16 mics).")
    return f"""Synthetic TragicTalkers-like dataset (asd-jax), same layout as the real audio part.
Nothing here is real: speech, rooms, cameras and labels are simulated. Made by
asd_jax.data.synthetic.synthesize({', '.join(f'{k}={v!r}' for k, v in args.items())}).
scene.json holds the geometry (mic positions, camera intrinsics/extrinsics) and trajectories.

Sequences:
{rows}

Speech: source-filter synthesiser (asd_jax/data/synthetic/speech.py): glottal pulse train with a
pitch contour (declination, accents, drift; female f0 180-240 Hz, male 95-135 Hz) and white noise
for unvoiced onsets; five formant resonators gliding between vowel targets; syllables of
0.14-0.32 s. Talkers take turns (utterances 1.0-3.5 s, pauses 0.25-1.2 s, no overlap); a talker
moves or turns only while silent, so each utterance is emitted from one fixed position; two
talkers' mouths stay at least {config.min_separation_m} m apart horizontally at all times.
Monologues have one talker, conversation*/interactive* two (speaker 1 and 2 in GT files).

Room: shoebox {config.room_dim_m} m, image-source method (pyroomacoustics), RT60 drawn
uniformly in {config.rt60_range_s} s per sequence, absorption and order from Sabine's formula
(pyroomacoustics.inverse_sabine), order capped at {config.max_order} (the tail beyond it is
truncated). {noise} 16-bit PCM, 48 kHz, one gain per sequence so that the peak over all
32 microphones is {config.peak_dbfs} dBFS.

Rigs: centres {config.rig_centres_m} m (x, y) at height {config.rig_height_m} m, facing the stage
centre {config.stage_centre_m} m. Microphones (01..16 on rig 01, 23..38 on rig 02): mic 0 at the
rig centre, 15 on a circle of radius {config.mic_radius_m} m in the rig plane, {config.mic_setback_m}
m behind the cameras; every TDOA re mic 0 is within +-{config.max_tdoa_samples} samples at 48 kHz.
Cameras: 11 per rig, pinhole, {config.image_size_px[0]}x{config.image_size_px[1]} px, focal
{config.focal_px:.2f} px (2 degrees at the image centre = 89 px), principal point at the centre,
offsets (u, w) in the rig plane {config.camera_offsets_m} m, each aimed at the stage centre moved
sideways by {config.camera_aim_spread} x its offset. Image x of a talker = projection of the mouth.
Mouths stay in x {config.stage_x_m} m, y {config.stage_y_m} m, heights {config.mouth_height_m} m.

Labels (one row per video frame at 30 fps; frame f at time f/30 s):
- GT files: frame,x_px,y_px,speaker_id,label with x_px, y_px the rounded projection (may fall
  outside the image), label SPEAKING while the talker speaks.
- development_<P>_<V>.csv: x and pseudo_label from source P (GT, or a simulated visual detector),
  va_label from V (GT activity, or an energy VAD on mic 0 of the camera's rig: band
  {config.vad_band_hz} Hz, threshold {config.vad_threshold_db} dB over the 10th-percentile frame
  energy but at most {config.vad_range_db} dB under the 95th percentile, hangover
  {config.vad_hangover_frames} frames). x = image x / width of the (detected) speaking talker,
  clipped to [0, 1]; 1.0 when nobody is (detected as) speaking, the reference's "no speaker" value.
- Simulated detectors: a face is detected when in view, not occluded (another talker nearer the
  camera within {config.occlusion_px} px) and turned less than max_yaw_deg from the camera; its
  speaking score (1/0 from GT plus AR(1) noise, optionally smoothed) must exceed 0.5; detected x
  has AR(1) jitter. ASC(s) is ASC's own noisy scores smoothed over time.
{detectors}
- Missing cameras (as in the real data): {config.missing_cameras}.
"""


def _check_out_dir(out_dir: pathlib.Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"out_dir {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"out_dir {out_dir} is not empty: pass overwrite=True (--overwrite) "
                              "to replace it")


def _replaceable_out_dir(out_dir: str | os.PathLike) -> pathlib.Path:
    """`out_dir` made absolute (its parent resolved, its own name kept as given), or ValueError
    when the finished tree could not be renamed into its place: the file system root, a mount
    point, or the current directory or one above it (renaming it fails with EBUSY, or moves the
    folder the caller is working in)."""
    given = str(out_dir) or "''"
    absolute = pathlib.Path(os.path.abspath(out_dir))
    if not absolute.name:
        raise ValueError(f"out_dir {given} is the file system root: expected a folder that the "
                         "finished tree can be renamed into, e.g. /data/synth")
    path = absolute.parent.resolve() / absolute.name
    cwd = pathlib.Path.cwd().resolve()
    if path == cwd or path in cwd.parents:
        raise ValueError(f"out_dir {given} is the current directory or one above it ({path}): the "
                         "tree is built beside out_dir and renamed into its place, which cannot "
                         f"replace the folder you are in; expected a folder inside it, e.g. "
                         f"{os.path.join(given, 'synth')}")
    if os.path.ismount(path):
        raise ValueError(f"out_dir {given} is a mount point ({path}): the tree is built beside "
                         "out_dir and renamed into its place, which cannot replace a mount point; "
                         f"expected a folder inside it, e.g. {path / 'synth'}")
    return path


def _check_integer(name: str, value, minimum: int) -> None:
    """TypeError unless `value` is an integer (bool excluded), ValueError if below `minimum`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}={value!r}: expected an integer >= {minimum}")
    if value < minimum:
        raise ValueError(f"{name}={value}: expected an integer >= {minimum}")


def _sibling(out_dir: pathlib.Path, kind: str) -> pathlib.Path:
    """A fresh hidden sibling `.<name>.<kind>-<host>-<pid>-<hex>` of `out_dir` (same file system,
    so renames between them are atomic); host and pid tell `_remove_stale_siblings` whether the
    run that made it is still alive."""
    host = socket.gethostname().replace("/", "_")
    return out_dir.parent / f".{out_dir.name}.{kind}-{host}-{os.getpid()}-{uuid.uuid4().hex}"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _remove_stale_siblings(out_dir: pathlib.Path) -> None:
    """Deletes the hidden build and old-tree siblings of `out_dir` (`.<name>.partial-*`,
    `.<name>.old-*`, only those of this name) left by killed runs: those made on this host by a
    process that no longer exists, and those of the older `-<hex>` naming (no pid)."""
    host = socket.gethostname().replace("/", "_")
    for kind in ("partial", "old"):
        prefix = f".{out_dir.name}.{kind}-"
        for stale in sorted(out_dir.parent.glob(glob.escape(prefix) + "*")):
            parts = stale.name[len(prefix):].rsplit("-", 2)
            if len(parts) == 3:
                if parts[0] != host or not parts[1].isdigit() or _process_alive(int(parts[1])):
                    continue  # maybe a run in progress (here or on another host): keep it
            elif not (len(parts) == 1 and re.fullmatch(r"[0-9a-f]{32}", parts[0])):
                continue  # not one of ours
            if stale.is_dir() and not stale.is_symlink():
                logging.warning("removing %s, left by an interrupted synthesis run", stale)
                shutil.rmtree(stale, ignore_errors=True)


def _simulate_and_write(job) -> SimulatedSequence:
    """Simulate one sequence and write its WAV files; the returned record drops the audio."""
    tmp, split, name, seconds, seed, config, rigs = job
    logging.info("simulating %s sequence %s", split, name)
    seq = simulate_sequence(name, seconds, seed, config, rigs)
    _write_audio(tmp, split, seq)
    seq.audio = {}
    return seq


def check_arguments(num_dev: int, num_test: int, seconds: float, seed: int,
                    snr_db: float | None, workers: int = 1, **options) -> SynthConfig:
    """Checks `synthesize`'s arguments (without touching any file); returns the SynthConfig.

    Raises TypeError for an unknown option or a non-integer count or seed (bools refused),
    ValueError for a bad value (each message names the argument and what was expected).
    """
    _check_integer("seed", seed, 0)
    _check_integer("num_dev", num_dev, 0)
    _check_integer("num_test", num_test, 0)
    _check_integer("workers", workers, 1)
    unknown = set(options) - {f.name for f in dataclasses.fields(SynthConfig)}
    if unknown:
        raise TypeError(f"unknown synthesize option(s) {sorted(unknown)}: expected SynthConfig fields "
                        f"{[f.name for f in dataclasses.fields(SynthConfig)]}")
    if snr_db is not None and not math.isfinite(snr_db):
        if snr_db < 0 or math.isnan(snr_db):
            raise ValueError(f"snr_db={snr_db}: expected a finite level in dB, +inf or None (no noise)")
        snr_db = None
    config = SynthConfig(**{**options, "snr_db": snr_db})
    if num_dev + num_test == 0:
        raise ValueError(f"num_dev={num_dev}, num_test={num_test}: expected >= 0 and at least one sequence")
    if isinstance(seconds, bool) or not isinstance(seconds, numbers.Real):
        raise TypeError(f"seconds={seconds!r}: expected a number of seconds")
    if not math.isfinite(seconds) or seconds - config.length_jitter_s < 1.0:
        raise ValueError(f"seconds={seconds}: expected at least {1.0 + config.length_jitter_s} "
                         f"(1 s plus length_jitter_s)")
    return config


def synthesize(out_dir: str | os.PathLike, num_dev: int = 6, num_test: int = 2, seconds: float = 20.0,
               seed: int = 0, snr_db: float | None = 30.0, overwrite: bool = False,
               workers: int = 1, **options) -> pathlib.Path:
    """Write a synthetic TragicTalkers-like dataset under `out_dir` and return its path.

    num_dev / num_test: number of development / test sequences (kinds cycled, real naming);
    seconds: sequence length (each one is shorter by a random 0..length_jitter_s); seed: the
    whole tree is a deterministic function of the arguments: byte-identical files whatever the
    machine's core count, BLAS kernel or `workers`, given the same versions of numpy, scipy and
    pyroomacoustics (render.py runs pyroomacoustics single-threaded, and mixes the noise and
    filters the RIRs without BLAS or LAPACK, for this); snr_db: diffuse noise level, None or
    inf for none. `options` override SynthConfig fields (geometry,
    room, labels), e.g. mic_radius_m=0.15, max_order=10. workers: sequences simulated in
    parallel processes (same output for any count; each takes up to ~1 GB for 20-s sequences).

    Raises before writing anything: FileExistsError for a non-empty out_dir without overwrite,
    ValueError / TypeError for bad sizes, seed or options, ValueError for an out_dir that the
    finished tree cannot be renamed into (the current directory or one above it, a mount point,
    the root). Build directories that killed runs for the same out_dir left behind
    (`.<name>.partial-*` siblings) are deleted. Returns out_dir as an absolute path.
    """
    config = check_arguments(num_dev, num_test, seconds, seed, snr_db, workers, **options)
    out_dir = _replaceable_out_dir(out_dir)
    snr_db = config.snr_db
    _check_out_dir(out_dir, overwrite)
    args = dict(num_dev=num_dev, num_test=num_test, seconds=seconds, seed=seed, snr_db=snr_db, **options)

    rigs = scene.make_rigs(config)
    dev_names, test_names = scene.sequence_names(num_dev, num_test)
    atomic.make_output_dir(out_dir.parent)
    _remove_stale_siblings(out_dir)
    # A hidden sibling (same file system, so the final rename is atomic); a run killed outright
    # leaves only this hidden `.<name>.partial-*` directory behind, never a complete-looking tree.
    tmp = _sibling(out_dir, "partial")
    try:
        tmp.mkdir()
    except OSError as e:
        raise OSError(e.errno, f"cannot write the tree beside it in {out_dir.parent}: {e.strerror}",
                      str(out_dir)) from e
    old = None
    try:
        (tmp / "csv").mkdir()
        for split in ("development", "test"):
            (tmp / "TragicTalkers" / "audio" / split).mkdir(parents=True)
        dev_rows = {c: [] for c in constants.CONDITIONS}
        test_rows, lengths, sequences = [], {}, {}
        jobs = [(tmp, split, name, seconds, seed, config, rigs)
                for split, names in (("development", dev_names), ("test", test_names))
                for name in sorted(names)]
        if workers > 1:
            # Sequences are seeded by name, so the result does not depend on the worker count.
            # "spawn": the caller may have started JAX, which does not survive a fork.
            context = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
                results = list(pool.map(_simulate_and_write, jobs))
        else:
            results = [_simulate_and_write(job) for job in jobs]
        for (_, split, name, *_), seq in zip(jobs, results):
            lengths[name] = format_length(seq.plan.n_frames)
            sequences[name] = _sequence_json(seq, split)
            if split == "development":
                for condition, rows in _development_rows(seq, config).items():
                    dev_rows[condition] += rows
            else:
                _write_gt(tmp, seq, config)
                times = [format_time(f) for f in range(seq.plan.n_frames)]
                test_rows += [f"{name}-{cam},{t}" for cam in _cameras(config, name) for t in times]
        for condition, rows in dev_rows.items():
            (tmp / "csv" / f"development_{condition}.csv").write_text(
                "\n".join(["name,time,x,pseudo_label,va_label", *rows]) + "\n")
        (tmp / "csv" / "test_forward.csv").write_text("\n".join(["name,time", *test_rows]) + "\n")
        lengths_json = json.dumps(dict(sorted(lengths.items())), indent=4)
        (tmp / "csv" / "seq_lengths.json").write_text(lengths_json + "\n")
        scene_json = json.dumps(_scene_json(config, rigs, sequences, seed), indent=1)
        (tmp / "scene.json").write_text(scene_json + "\n")
        (tmp / "README.txt").write_text(_readme(config, sequences, args))
        if out_dir.exists():
            _check_out_dir(out_dir, overwrite)  # still allowed (nothing raced in meanwhile)
            # Out of the way first (a rename: atomic), so that an interrupt never leaves a
            # half-deleted old tree at out_dir; deleted once the new tree is in place.
            old = _sibling(out_dir, "old")
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    except BaseException:
        if old is not None and not out_dir.exists():
            os.replace(old, out_dir)  # interrupted between the two renames: the old tree back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out_dir
