"""Tests of asd_jax/baselines.py: the centre and SRP-PHAT baselines.

References: pyroomacoustics' own SRP-PHAT cost (per frame, its Python loops), a
pyroomacoustics anechoic simulation (physics: the peak points at the source), the synthetic
dataset's own camera model, and counts made straight from the GT files.
"""

from __future__ import annotations

import csv
import json
import pathlib

import numpy as np
import pyroomacoustics as pra
import pytest

from asd_jax import baselines, constants, evaluation
from asd_jax.data import synthetic
from asd_jax.data.synthetic import scene as synth_scene

FS = constants.SAMPLE_RATE_HZ


# ---------------------------------------------------------------------------------------------
# Helpers written here, independently of the module under test.
# ---------------------------------------------------------------------------------------------
def _look_at(position, target):
    """World -> camera rotation (rows right, down, forward) for a level camera."""
    forward = np.asarray(target, float) - position
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    return np.stack([right, np.cross(forward, right), forward])


def _ring_array(centre, radius=0.15):
    """16 mics: one at the centre, 15 on a vertical ring facing +y."""
    angles = 2 * np.pi * np.arange(15) / 15
    ring = np.stack([radius * np.cos(angles), np.zeros(15), radius * np.sin(angles)], axis=-1)
    return np.concatenate([np.zeros((1, 3)), ring]) + centre


def _pixel(point, camera_position, rotation, focal, cx):
    p = rotation @ (np.asarray(point) - camera_position)
    return focal * p[0] / p[2] + cx


def _forward_csv(path):
    with open(path) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["name", "time", "predicted x", "confidence"]
    return rows[1:]


# ---------------------------------------------------------------------------------------------
# Numeric core
# ---------------------------------------------------------------------------------------------
def test_srp_phat_maps_equals_pyroomacoustics_cost():
    rng = np.random.default_rng(0)
    mics = _ring_array(np.zeros(3), 0.1)
    n_fft, snapshots, bins = 512, 4, np.arange(4, 40)
    azimuth = np.deg2rad(np.arange(0, 360, 7.5))
    srp = pra.doa.algorithms["SRP"](L=mics.T, fs=FS, nfft=n_fft, c=343.0, num_src=1, azimuth=azimuth,
                                    dim=2)
    # Two groups of snapshots (two maps); one bin of one microphone is exactly zero.
    spectra = rng.standard_normal((2 * snapshots, n_fft // 2 + 1, 16)) + 1j * rng.standard_normal(
        (2 * snapshots, n_fft // 2 + 1, 16))
    spectra[1, 10, 3] = 0.0
    ours = baselines.srp_phat_maps(spectra[:, bins, :], srp.mode_vec[bins, :, :], snapshots)
    assert ours.shape == (2, len(azimuth))
    for g in range(2):
        x = np.transpose(spectra[g * snapshots:(g + 1) * snapshots], (2, 1, 0))  # (M, F, S)
        srp.locate_sources(x, freq_bins=bins)
        np.testing.assert_allclose(ours[g], srp.grid.values, rtol=1e-5)


def test_srp_phat_maps_rejects_bad_shapes():
    with pytest.raises(ValueError, match="steering has shape"):
        baselines.srp_phat_maps(np.zeros((4, 10, 16), complex), np.zeros((10, 8, 5), complex), 4)
    with pytest.raises(ValueError, match="not a multiple of 4"):
        baselines.srp_phat_maps(np.zeros((6, 10, 16), complex), np.zeros((10, 16, 5), complex), 4)


def test_project_x_matches_the_synthetic_camera_model():
    rig = synth_scene.make_rigs(synthetic.SynthConfig())[1]
    rng = np.random.default_rng(1)
    points = np.stack([rng.uniform(2, 6, 50), rng.uniform(3, 5, 50), rng.uniform(1.4, 1.8, 50)], -1)
    for cam in rig.cameras:
        ours = baselines.PinholeCamera(cam.name, cam.rotation, cam.position_m, cam.focal_px,
                                       cam.principal_point_px[0], cam.image_size_px[0])
        x_px, in_view = baselines.project_x(points, ours)
        u, _, depth = cam.project(points)
        np.testing.assert_allclose(x_px, u, rtol=1e-12)
        np.testing.assert_array_equal(in_view, (depth > 0) & (u >= 0) & (u < cam.image_size_px[0]))


@pytest.mark.parametrize("source_xy", [(2.4, 3.3), (3.0, 3.6), (3.6, 3.2)])
def test_srp_phat_track_points_at_an_anechoic_source(source_xy):
    """Physics: white noise from a point source in an anechoic room; every camera's x lies
    within 2 degrees (89 px) of the projection of the source when the assumed distance is right,
    and for a camera at the array centre whatever the assumed distance."""
    centre = np.array([3.0, 0.5, 1.5])
    source = np.array([*source_xy, 1.6])
    mics = _ring_array(centre)
    stage = np.array([3.0, 3.5, 1.6])
    focal = constants.TOLERANCE_2DEG_PX / np.tan(np.deg2rad(2.0))
    cams = {}
    for k, du in enumerate((-0.6, 0.0, 0.6)):
        position = centre + np.array([du, 0.0, 0.0])
        cams[f"cam{k + 1:02d}"] = baselines.PinholeCamera(
            f"cam{k + 1:02d}", _look_at(position, stage + [0.4 * du, 0, 0]), position, focal, 1224.0)
    room = pra.AnechoicRoom(fs=FS)
    signal = np.random.default_rng(2).standard_normal(FS)
    room.add_source(source, signal=signal)
    room.add_microphone_array(mics.T)
    room.simulate()
    audio = room.mic_array.signals.T[:FS].astype(np.float32)
    distance = float(np.linalg.norm((source - centre)[:2]))
    for assumed, names in ((distance, ("cam01", "cam02", "cam03")), (distance + 1.0, ("cam02",))):
        geometry = baselines.RigGeometry("01", mics, cams, assumed, float(source[2]))
        positions, confidence = baselines.srp_phat_track(audio, geometry, 30)
        assert confidence.shape == (30,)
        for name in names:
            cam = cams[name]
            expected = _pixel(source, cam.position, cam.rotation, cam.fx, cam.cx)
            got = positions[name][3:27] * constants.IMAGE_WIDTH_PX  # frames with full windows
            assert np.all(np.abs(got - expected) < constants.TOLERANCE_2DEG_PX), (name, assumed, expected, got)


def test_energy_vad_hangover_and_range():
    energy = np.concatenate([np.full(30, -60.0), np.full(30, -20.0), np.full(40, -60.0)])
    energy += np.random.default_rng(3).normal(0, 0.5, energy.shape)
    conf = baselines.energy_vad(energy, threshold_db=10.0, slope_db=2.0, hangover_frames=8)
    assert conf.shape == energy.shape and np.all((conf >= 0) & (conf <= 1))
    speaking = conf >= 0.5
    np.testing.assert_array_equal(np.flatnonzero(speaking), np.arange(30, 60 + 8))
    assert np.all(conf[:30] < 0.05) and np.all(conf[30:68] > 0.95) and np.all(conf[68:] < 0.05)


def test_smooth_frames_is_a_centred_moving_average():
    values = np.random.default_rng(4).standard_normal((20, 3))
    expected = np.stack([values[max(0, i - 2):i + 3].mean(axis=0) for i in range(20)])
    np.testing.assert_allclose(baselines.smooth_frames(values, 2), expected, rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# On a synthetic tree
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> pathlib.Path:
    return synthetic.synthesize(tmp_path_factory.mktemp("baselines") / "data", num_dev=0, num_test=1,
                                seconds=4.0, seed=3)


def _gt_frames(tree):
    """{name: (F, speaking (F,) bool)} straight from the GT files (two speakers stacked)."""
    lengths = {k: float(v) for k, v in json.loads((tree / "csv" / "seq_lengths.json").read_text()).items()}
    out = {}
    for path in sorted((tree / "GT").glob("*/*/*_GT.csv")):
        sequence = path.parts[-3]
        frames = int(round(lengths[sequence] * constants.VIDEO_FPS))
        labels = [r[4] for r in csv.reader(open(path))]
        speaking = np.zeros(frames, bool)
        for start in range(0, len(labels), frames):
            speaking |= np.array([lab == "SPEAKING" for lab in labels[start:start + frames]])
        out[path.name[:-len("_GT.csv")]] = (frames, speaking, lengths[sequence])
    return out


def test_centre_baseline_rows_and_detection_error(tree, tmp_path):
    out = baselines.centre_baseline(tree, tmp_path / "centre" / "test_forward.csv")
    rows = _forward_csv(out)
    gt = _gt_frames(tree)
    names = sorted({r[0] for r in rows})
    assert set(gt) <= set(names)
    for name in names:
        times = [float(r[1]) for r in rows if r[0] == name]
        length = gt[name][2] if name in gt else next(v[2] for v in gt.values())
        expected = [round(k / 30, 2) for k in range(int(length * 30) + 2) if round(k / 30, 2) < round(length, 2)]
        assert times == expected
    assert {r[2] for r in rows} == {"0.5"} and {r[3] for r in rows} == {"1.0"}
    # Everything is "speaking": the detection error is the share of silent GT frames, per cell.
    metrics = evaluation.evaluate(out, tree / "GT", tree / "csv" / "seq_lengths.json", tolerances=(89,))[89]
    cells = {}
    for name, (frames, speaking, _) in gt.items():
        rig = constants.camera_rig(name.rpartition("-")[2])
        cells.setdefault(rig, []).append(speaking)
    correct = [np.mean(np.concatenate(v)) for _, v in sorted(cells.items())]
    assert metrics["det_err"] == pytest.approx(100 * (1 - np.mean(correct)), abs=1e-9)


def test_srp_phat_baseline_beats_the_centre_baseline(tree, tmp_path):
    centre = baselines.centre_baseline(tree, tmp_path / "centre.csv")
    srp = baselines.srp_phat_baseline(tree, tmp_path / "srp.csv")
    rows_c, rows_s = _forward_csv(centre), _forward_csv(srp)
    assert [r[:2] for r in rows_s] == [r[:2] for r in rows_c]
    values = np.array([[float(r[2]), float(r[3])] for r in rows_s])
    assert np.all((values >= 0) & (values <= 1))
    args = (tree / "GT", tree / "csv" / "seq_lengths.json")
    m_c = evaluation.evaluate(centre, *args, tolerances=(222,))[222]
    m_s = evaluation.evaluate(srp, *args, tolerances=(222,))[222]
    assert m_s["aD"] < m_c["aD"] / 2
    assert m_s["AP"] > m_c["AP"] + 0.2


def test_read_scene_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="scene file .*missing.json does not exist"):
        baselines.read_scene(tmp_path / "missing.json")
    bad = tmp_path / "scene.json"
    bad.write_text(json.dumps({"rigs": {}}))
    with pytest.raises(ValueError, match="scene.json: not a scene description"):
        baselines.read_scene(bad)


def test_read_scene_reads_the_synthetic_geometry(tree):
    rigs = baselines.read_scene(tree / "scene.json")
    config = synthetic.SynthConfig()
    for rig in synth_scene.make_rigs(config):
        geometry = rigs[rig.name]
        np.testing.assert_allclose(geometry.mic_positions, rig.mics_m)
        assert sorted(geometry.cameras) == [c.name for c in rig.cameras]
        expected = np.linalg.norm(np.array(config.stage_centre_m[:2]) - rig.mics_m.mean(axis=0)[:2])
        assert geometry.source_distance_m == pytest.approx(expected)
