"""Tests of asd_jax/baselines.py: the centre and SRP-PHAT baselines.

References: pyroomacoustics' own SRP-PHAT cost (per frame, its Python loops), a
pyroomacoustics anechoic simulation (physics: the peak points at the source), the synthetic
dataset's own camera model, and counts made straight from the GT files.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import pathlib
import shutil

import numpy as np
import pyroomacoustics as pra
import pytest
import soundfile

from asd_jax import baselines, constants, evaluation
from asd_jax.data import synthetic, tragictalkers
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


def test_project_x_puts_points_built_in_camera_coordinates_where_the_pinhole_model_says():
    """Points are built in each synthetic camera's own frame (x right, y down, z forward) with a
    chosen column u = cx + f * x / z, then carried to the world with the camera's pose, so the
    expected column is known before `project_x` runs; behind the camera (z < 0) or outside
    [0, width) is out of view."""
    rig = synth_scene.make_rigs(synthetic.SynthConfig())[1]
    rng = np.random.default_rng(1)
    for cam in rig.cameras:
        width, cx, focal = cam.image_size_px[0], cam.principal_point_px[0], cam.focal_px
        # the edges within 1e-3 px, far above the round trip's ~1e-12 px rounding
        edges = [1e-3, width - 1e-3, -1e-3, width + 1e-3, width + 300.0]
        columns = np.concatenate([rng.uniform(0, width, 40), edges])
        depth = np.concatenate([rng.uniform(1.0, 8.0, 40), [2.0] * 5])
        camera_frame = np.stack([(columns - cx) * depth / focal, rng.uniform(-1, 1, columns.size), depth], -1)
        behind = camera_frame * np.array([1.0, 1.0, -1.0])  # mirrored through the camera centre plane
        rotation = np.asarray(cam.rotation)
        world = lambda c: c @ rotation + np.asarray(cam.position_m)  # R^T c + C, R orthonormal
        np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-12)
        ours = baselines.PinholeCamera(cam.name, rotation, np.asarray(cam.position_m), focal, cx, width)
        x_px, in_view = baselines.project_x(world(camera_frame), ours)
        np.testing.assert_allclose(x_px, columns, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(in_view, (columns >= 0) & (columns < width))
        assert not baselines.project_x(world(behind), ours)[1].any()


_ARRAY_CENTRE = np.array([3.0, 0.5, 1.5])


def _three_camera_rig(width=constants.IMAGE_WIDTH_PX):
    """Mics of a ring array at _ARRAY_CENTRE and cam01..03 (2 degrees = 89 px) facing the stage
    around (3, 3.5); cam03's image is `width` px wide."""
    mics = _ring_array(_ARRAY_CENTRE)
    stage = np.array([3.0, 3.5, 1.6])
    focal = constants.TOLERANCE_2DEG_PX / np.tan(np.deg2rad(2.0))
    cams = {}
    for k, du in enumerate((-0.6, 0.0, 0.6)):
        position = _ARRAY_CENTRE + np.array([du, 0.0, 0.0])
        w = width if k == 2 else constants.IMAGE_WIDTH_PX
        cams[f"cam{k + 1:02d}"] = baselines.PinholeCamera(
            f"cam{k + 1:02d}", _look_at(position, stage + [0.4 * du, 0, 0]), position, focal, w / 2, w)
    return mics, cams


def _anechoic(mics, sources, seconds=1.0):
    """(samples, 16) float32 recording of {position: signal} in an anechoic room."""
    room = pra.AnechoicRoom(fs=FS)
    for position, signal in sources.items():
        room.add_source(np.asarray(position), signal=signal)
    room.add_microphone_array(mics.T)
    room.simulate()
    return room.mic_array.signals.T[:int(seconds * FS)].astype(np.float32)


@pytest.mark.parametrize("source_xy", [(2.4, 3.3), (3.0, 3.6), (3.6, 3.2)])
def test_srp_phat_track_points_at_an_anechoic_source(source_xy):
    """Physics: white noise from a point source in an anechoic room; every camera's x lies
    within 2 degrees (89 px) of the projection of the source when the assumed distance is right
    (from the geometry, or from SrpConfig overriding a wrong one), and for a camera at the array
    centre whatever the assumed distance. x is a fraction of each camera's own image width. A
    camera looking away from the source reports the best point it can see, inside its image."""
    centre = _ARRAY_CENTRE
    source = np.array([*source_xy, 1.6])
    mics, cams = _three_camera_rig(width=1800)
    away = centre + [0.3, 0.0, 0.0]  # faces 45 degrees right: the source is 30+ degrees off its axis
    cams["cam04"] = baselines.PinholeCamera("cam04", _look_at(away, away + [3.0, 3.0, 0.1]), away,
                                            cams["cam01"].fx, 1224.0)
    audio = _anechoic(mics, {tuple(source): np.random.default_rng(2).standard_normal(FS)})
    distance, height = float(np.linalg.norm((source - centre)[:2])), float(source[2])
    override = baselines.SrpConfig(source_distance_m=distance, source_height_m=height)
    for geometry_distance, geometry_height, config, names in (
            (distance, height, baselines.SrpConfig(), ("cam01", "cam02", "cam03")),
            (distance + 1.0, height, baselines.SrpConfig(), ("cam02",)),
            (distance + 1.5, height + 3.0, override, ("cam01", "cam02", "cam03"))):
        geometry = baselines.RigGeometry("01", mics, cams, geometry_distance, geometry_height)
        positions, confidence = baselines.srp_phat_track(audio, geometry, 30, config)
        assert confidence.shape == (30,)
        for name in names:
            cam = cams[name]
            expected = _pixel(source, cam.position, cam.rotation, cam.fx, cam.cx)
            got = positions[name][3:27] * cam.width  # frames with full windows
            assert np.all(np.abs(got - expected) < constants.TOLERANCE_2DEG_PX), (name, geometry, expected, got)
        assert not 0 <= _pixel(source, away, cams["cam04"].rotation, cams["cam04"].fx, 1224.0) < 2448
        assert np.all((positions["cam04"] >= 0) & (positions["cam04"] < 1))


def test_srp_phat_track_analyses_only_its_frequency_band():
    """Two sources in separate bands (A: 300-1500 Hz, B: 1500-4000 Hz, louder): with
    freq_range_hz (300, 1500) the centre camera points at A, with (1500, 4000) at B."""
    mics, cams = _three_camera_rig()
    rng = np.random.default_rng(5)
    freqs = np.fft.rfftfreq(FS, 1 / FS)

    def band_noise(lo, hi, gain):
        spectrum = np.fft.rfft(rng.standard_normal(FS)) * ((freqs >= lo) & (freqs < hi))
        return gain * np.fft.irfft(spectrum, FS)

    a, b = np.array([2.4, 3.3, 1.6]), np.array([3.6, 3.3, 1.6])
    audio = _anechoic(mics, {tuple(a): band_noise(300, 1500, 1.0), tuple(b): band_noise(1500, 4000, 3.0)})
    cam = cams["cam02"]
    for band, source in (((300.0, 1500.0), a), ((1500.0, 4000.0), b)):
        geometry = baselines.RigGeometry("01", mics, cams, float(np.linalg.norm((source - _ARRAY_CENTRE)[:2])),
                                         1.6)
        positions, _ = baselines.srp_phat_track(audio, geometry, 30, baselines.SrpConfig(freq_range_hz=band))
        expected = _pixel(source, cam.position, cam.rotation, cam.fx, cam.cx)
        got = positions["cam02"][3:27] * cam.width
        assert np.all(np.abs(got - expected) < constants.TOLERANCE_2DEG_PX), (band, expected, got)


def test_srp_phat_track_timing_of_maps_and_energy():
    """Frame k's map comes from the snapshots centred on sample 1600 k (here 4 of 512 samples,
    hop 400: samples [1600 k - 856, 1600 k + 856)) and its energy from [1600 k - 800, 1600 k + 800).
    A noise burst that reaches the array in [1600 * 10 + 660, 1600 * 10 + 740) (+ at most 45
    samples across the mics) is in frame 10's map; one in [1600 * 20 - 755, 1600 * 20 + 755)
    (+ 45) makes frame 20 loud, and neither 19 nor 21 (frames 10 and 20 are the only loud ones)."""
    mics, cams = _three_camera_rig()
    source = np.array([3.3, 3.4, 1.6])
    signal = np.zeros(FS)
    noise = np.random.default_rng(6).standard_normal(FS)
    signal[16000 + 660:16000 + 740] = noise[:80]
    signal[32000 - 755:32000 + 755] = noise[:1510]
    audio = np.zeros((FS, 16), np.float32)
    delays = np.linalg.norm(mics - source, axis=1) / constants.SPEED_OF_SOUND_M_S
    shifts = np.rint((delays - delays.min()) * FS).astype(int)  # whole samples: the burst edges stay sharp
    assert shifts.max() <= 45
    for m, shift in enumerate(shifts):
        audio[shift:, m] = signal[:FS - shift]
    geometry = baselines.RigGeometry("01", mics, cams, float(np.linalg.norm((source - _ARRAY_CENTRE)[:2])),
                                     1.6)
    positions, confidence = baselines.srp_phat_track(
        audio, geometry, 30, baselines.SrpConfig(smooth_frames=0, vad_hangover_frames=0))
    cam = cams["cam02"]
    expected = _pixel(source, cam.position, cam.rotation, cam.fx, cam.cx)
    assert abs(positions["cam02"][10] * cam.width - expected) < constants.TOLERANCE_2DEG_PX
    np.testing.assert_array_equal(np.flatnonzero(confidence > 0.5), [10, 20])


def test_srp_phat_track_rejects_bad_input():
    mics, cams = _three_camera_rig()
    geometry = baselines.RigGeometry("01", mics, cams, 3.0, 1.6)
    with pytest.raises(ValueError, match=r"audio has shape \(4800, 15\), expected \(samples, 16\)"):
        baselines.srp_phat_track(np.zeros((4800, 15), np.float32), geometry, 3)


@pytest.mark.parametrize("settings,message", [
    ({"hop": 384}, r"hop is 384; expected a divisor of 1600 samples"),
    ({"hop": 0}, r"hop is 0; expected a divisor"),
    ({"n_fft": 0}, r"n_fft is 0; expected > 0"),
    ({"freq_range_hz": (4000.0, 300.0)}, r"freq_range_hz is \(4000.0, 300.0\); expected \(lo, hi\) "
                                         r"with 0 <= lo < hi <= 24000"),
    ({"freq_range_hz": (300.0, 30000.0)}, r"freq_range_hz is \(300.0, 30000.0\)"),
    ({"freq_range_hz": (300.0, 320.0)}, r"freq_range_hz \(300.0, 320.0\) holds no FFT bin of n_fft 512"),
    ({"grid_step_deg": 0.0}, r"grid_step_deg is 0.0; expected > 0"),
    ({"grid_margin_deg": -1.0}, r"grid_margin_deg is -1.0; expected >= 0"),
    ({"smooth_frames": -1}, r"smooth_frames is -1; expected >= 0"),
    ({"source_distance_m": 0.0}, r"source_distance_m is 0.0; expected None or > 0"),
    ({"vad_noise_percentile": 101.0}, r"vad_noise_percentile is 101.0; expected in \[0, 100\]"),
    ({"vad_slope_db": 0.0}, r"vad_slope_db is 0.0; expected > 0"),
    ({"vad_hangover_frames": -2}, r"vad_hangover_frames is -2; expected >= 0"),
])
def test_srp_config_refuses_bad_settings(settings, message):
    """Each of these gave an empty band, garbage maps or a bare numpy error deep in the track."""
    with pytest.raises(ValueError, match=rf"^SrpConfig {message}"):
        baselines.SrpConfig(**settings)


def test_energy_vad_hangover_and_range():
    energy = np.concatenate([np.full(30, -60.0), np.full(30, -20.0), np.full(40, -60.0)])
    energy += np.random.default_rng(3).normal(0, 0.5, energy.shape)
    conf = baselines.energy_vad(energy, threshold_db=10.0, slope_db=2.0, hangover_frames=8)
    assert conf.shape == energy.shape and np.all((conf >= 0) & (conf <= 1))
    speaking = conf >= 0.5
    np.testing.assert_array_equal(np.flatnonzero(speaking), np.arange(30, 60 + 8))
    assert np.all(conf[:30] < 0.05) and np.all(conf[30:68] > 0.95) and np.all(conf[68:] < 0.05)
    # The floor is the noise_percentile percentile: of 0..100 dB, 30 dB for 30; 0.5 at 10 dB above it.
    conf = baselines.energy_vad(np.arange(101.0), noise_percentile=30.0, threshold_db=10.0, slope_db=2.0,
                                hangover_frames=0)
    assert conf[40] == pytest.approx(0.5) and conf[42] == pytest.approx(1 / (1 + np.exp(-1)))


def test_stft_frames_matches_numpy():
    """Frames start at j * hop, periodic Hann window (scipy's get_window), zero padding at the end."""
    import scipy.signal
    audio = np.random.default_rng(7).standard_normal((1000, 3)).astype(np.float32)
    got = baselines.stft_frames(audio, 256, 100, 9)  # the last frames run past the end
    assert got.shape == (9, 129, 3)
    padded = np.concatenate([audio, np.zeros((2000, 3), np.float32)])
    window = scipy.signal.get_window("hann", 256)
    for j in range(9):
        expected = np.fft.rfft(padded[j * 100:j * 100 + 256] * window[:, None], axis=0)
        np.testing.assert_allclose(got[j], expected, rtol=1e-4, atol=1e-4)


def test_frame_energy_db():
    """Mean square over each 1600-sample video frame and all mics, in dB; missing samples are 0."""
    rng = np.random.default_rng(8)
    audio = rng.standard_normal((3 * 1600 + 500, 4)) * np.array([1.0, 0.5, 0.1, 0.0])
    got = baselines.frame_energy_db(audio, 5)
    expected = [10 * np.log10(np.mean(audio[1600 * k:1600 * (k + 1)] ** 2)) for k in range(3)]
    expected.append(10 * np.log10(np.sum(audio[4800:] ** 2) / (1600 * 4)))
    np.testing.assert_allclose(got, expected + [-120.0], rtol=1e-12)
    np.testing.assert_allclose(baselines.frame_energy_db(np.full((1600, 16), 0.1), 1), [-20.0])


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
        with open(path, newline="") as f:
            labels = [r[4] for r in csv.reader(f)]
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


def _rig_mic_files(root):
    data = tragictalkers.TragicTalkers(root)
    index = data.test_chunks()
    return data.mic_files("test", index.sequence[0], index.rig[0])


def test_srp_phat_baseline_pads_a_shorter_mic_file_with_zeros(tree, tmp_path):
    """Files of one rig may differ in length; the shorter is read as if zero-padded to the
    longest (the forward pass pads chunks past a file's end the same way): the same CSV as
    from the file padded on disk. Before, np.stack failed naming no file."""
    short, padded = tmp_path / "short", tmp_path / "padded"
    for root in (short, padded):
        shutil.copytree(tree, root)
    samples, rate = soundfile.read(_rig_mic_files(tree)[3], dtype="int16")
    cut = samples.shape[0] - 4800
    soundfile.write(_rig_mic_files(short)[3], samples[:cut], rate, subtype="PCM_16")
    soundfile.write(_rig_mic_files(padded)[3], np.concatenate([samples[:cut], np.zeros(4800, np.int16)]),
                    rate, subtype="PCM_16")
    out_short = baselines.srp_phat_baseline(short, tmp_path / "short.csv")
    out_padded = baselines.srp_phat_baseline(padded, tmp_path / "padded.csv")
    assert out_short.read_bytes() == out_padded.read_bytes()


def test_srp_phat_baseline_checks_the_audio_before_writing(tree, tmp_path):
    """A non-finite sample in a float WAV is an error naming the file and sample (it gave rows
    of nan confidence that the evaluation then blamed on the CSV)."""
    root = tmp_path / "data"
    shutil.copytree(tree, root)
    mic = _rig_mic_files(root)[5]
    samples, rate = soundfile.read(mic, dtype="float32")
    samples[1000] = np.nan
    soundfile.write(mic, samples, rate, subtype="FLOAT")
    out = tmp_path / "srp" / "test_forward.csv"
    with pytest.raises(ValueError, match=rf"{mic}: non-finite sample at index 1000"):
        baselines.srp_phat_baseline(root, out)
    assert not out.parent.exists()


@pytest.mark.parametrize("baseline", ["centre_baseline", "srp_phat_baseline"])
@pytest.mark.parametrize("input_name", ["csv/test_forward.csv", "csv/seq_lengths.json"])
def test_baselines_refuse_to_write_over_their_inputs(tree, tmp_path, baseline, input_name):
    root = tmp_path / "data"
    shutil.copytree(tree, root)
    before = (root / input_name).read_bytes()
    with pytest.raises(ValueError, match=rf"output .* is the data root's .*{input_name}"):
        getattr(baselines, baseline)(root, root / input_name)
    assert (root / input_name).read_bytes() == before


def test_read_scene_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="scene file .*missing.json does not exist"):
        baselines.read_scene(tmp_path / "missing.json")
    bad = tmp_path / "scene.json"
    bad.write_text(json.dumps({"rigs": {}}))
    with pytest.raises(ValueError, match="scene.json: not a scene description"):
        baselines.read_scene(bad)


def test_read_scene_rejects_a_rig_without_16_mics(tree, tmp_path):
    scene = json.loads((tree / "scene.json").read_text())
    rig = sorted(scene["rigs"])[0]
    scene["rigs"][rig]["mics_m"] = scene["rigs"][rig]["mics_m"][:15]
    (tmp_path / "scene.json").write_text(json.dumps(scene))
    with pytest.raises(ValueError, match=rf"scene.json: not a scene description .*rig {rig}: mics_m has "
                                         r"shape \(15, 3\), expected \(16, 3\)"):
        baselines.read_scene(tmp_path / "scene.json")


def test_read_scene_reads_the_synthetic_geometry(tree):
    rigs = baselines.read_scene(tree / "scene.json")
    config = synthetic.SynthConfig()
    for rig in synth_scene.make_rigs(config):
        geometry = rigs[rig.name]
        np.testing.assert_allclose(geometry.mic_positions, rig.mics_m)
        assert sorted(geometry.cameras) == [c.name for c in rig.cameras]
        expected = np.linalg.norm(np.array(config.stage_centre_m[:2]) - rig.mics_m.mean(axis=0)[:2])
        assert geometry.source_distance_m == pytest.approx(expected)
        assert geometry.source_height_m == pytest.approx(np.mean(config.mouth_height_m))
        for cam in rig.cameras:
            ours = geometry.cameras[cam.name]
            np.testing.assert_allclose(ours.rotation, cam.rotation)
            np.testing.assert_allclose(ours.position, cam.position_m)
            assert (ours.fx, ours.cx, ours.width) == pytest.approx(
                (cam.focal_px, cam.principal_point_px[0], cam.image_size_px[0]))


# ---------------------------------------------------------------------------------------------
# Added by the mutation audit: boundaries, pass-through of settings, the documented fallbacks
# and the errors that name what is missing.
# ---------------------------------------------------------------------------------------------
def test_project_x_the_column_width_is_outside_the_image():
    """Columns are [0, width): a point landing exactly on column `width` is out of view, one on
    column 0 in view. Camera at the origin looking along +z: column = 100 * x / z + 50."""
    camera = baselines.PinholeCamera("cam", np.eye(3), np.zeros(3), 100.0, 50.0, 100)
    points = np.array([[-0.5, 0.0, 1.0], [0.25, 0.3, 1.0], [0.5, -0.2, 1.0], [1.0, 0.0, 2.0]])
    x_px, in_view = baselines.project_x(points, camera)
    np.testing.assert_array_equal(x_px, [0.0, 75.0, 100.0, 100.0])
    np.testing.assert_array_equal(in_view, [True, True, False, False])


def test_read_scene_assumes_the_horizontal_distance_to_the_stage(tree, tmp_path):
    """The assumed talker distance is horizontal (the height comes from the mouth heights): a
    stage centre 1 m above the arrays leaves it unchanged."""
    scene = json.loads((tree / "scene.json").read_text())
    scene["config"]["stage_centre_m"][2] += 1.0
    (tmp_path / "scene.json").write_text(json.dumps(scene))
    rigs = baselines.read_scene(tmp_path / "scene.json")
    stage = np.array(scene["config"]["stage_centre_m"])
    for rig, desc in scene["rigs"].items():
        centre = np.mean(desc["mics_m"], axis=0)
        assert rigs[rig].source_distance_m == pytest.approx(np.hypot(*(stage[:2] - centre[:2])), rel=1e-12)
        assert rigs[rig].source_height_m == pytest.approx(np.mean(scene["config"]["mouth_height_m"]))


def test_srp_config_accepts_the_ends_of_each_range():
    """The ranges the errors state include their ends (0 and 100 percent, no smoothing, no
    margin, no hangover, the whole band up to Nyquist)."""
    for settings in ({"vad_noise_percentile": 0.0}, {"vad_noise_percentile": 100.0}, {"smooth_frames": 0},
                     {"grid_margin_deg": 0.0}, {"vad_hangover_frames": 0}, {"freq_range_hz": (0.0, 24000.0)},
                     {"hop": 1600}, {"hop": 1}):
        baselines.SrpConfig(**settings)


def test_band_bins_are_the_rounded_band_edges():
    """round(f / 48000 * n_fft), upper edge excluded: 300 Hz -> bin 3.2 -> 3, 4000 Hz -> 42.67 -> 43."""
    np.testing.assert_array_equal(baselines.SrpConfig().band_bins(), np.arange(3, 43))
    np.testing.assert_array_equal(baselines.SrpConfig(n_fft=1024, freq_range_hz=(1000.0, 2000.0)).band_bins(),
                                  np.arange(21, 43))  # 21.33 -> 21, 42.67 -> 43


def test_a_camera_that_sees_no_grid_point_reports_the_image_centre():
    """A camera above the talkers looking at the ceiling sees none of the grid (all of it is
    behind it): x = 0.5 on every frame, as documented, while the others localise."""
    mics, cams = _three_camera_rig()
    up = _ARRAY_CENTRE + [0.0, 0.0, 2.0]
    cams["cam04"] = baselines.PinholeCamera("cam04", np.eye(3), up, cams["cam01"].fx, 1224.0)
    source = np.array([2.6, 3.3, 1.6])
    audio = _anechoic(mics, {tuple(source): np.random.default_rng(9).standard_normal(FS)})
    geometry = baselines.RigGeometry("01", mics, cams, float(np.linalg.norm((source - _ARRAY_CENTRE)[:2])),
                                     1.6)
    positions, _ = baselines.srp_phat_track(audio, geometry, 30)
    np.testing.assert_array_equal(positions["cam04"], np.full(30, 0.5))
    cam = cams["cam02"]
    expected = _pixel(source, cam.position, cam.rotation, cam.fx, cam.cx)
    assert np.all(np.abs(positions["cam02"][3:27] * cam.width - expected) < constants.TOLERANCE_2DEG_PX)


def test_srp_phat_track_smooths_maps_over_the_configured_frames():
    """Source A talks in the first half second, B in the second. Without smoothing the frames
    point at A, then at B; with smooth_frames >= F - 1 every frame's map is the mean of all F
    maps, so every frame gives the same position."""
    mics, cams = _three_camera_rig()
    rng = np.random.default_rng(10)
    a, b = np.array([2.4, 3.3, 1.6]), np.array([3.6, 3.3, 1.6])
    first, second = np.zeros(FS), np.zeros(FS)
    first[:FS // 2] = rng.standard_normal(FS // 2)
    second[FS // 2:] = rng.standard_normal(FS // 2)
    audio = _anechoic(mics, {tuple(a): first, tuple(b): second})
    distance = float(np.linalg.norm((a - _ARRAY_CENTRE)[:2]))  # the same for b
    geometry = baselines.RigGeometry("01", mics, cams, distance, 1.6)
    cam = cams["cam02"]
    pixel = {name: _pixel(p, cam.position, cam.rotation, cam.fx, cam.cx) for name, p in (("a", a), ("b", b))}
    sharp, _ = baselines.srp_phat_track(audio, geometry, 30, baselines.SrpConfig(smooth_frames=0))
    got = sharp["cam02"] * cam.width
    assert np.all(np.abs(got[3:12] - pixel["a"]) < constants.TOLERANCE_2DEG_PX), got
    assert np.all(np.abs(got[18:27] - pixel["b"]) < constants.TOLERANCE_2DEG_PX), got
    blurred, _ = baselines.srp_phat_track(audio, geometry, 30, baselines.SrpConfig(smooth_frames=29))
    for name in cams:
        assert np.all(blurred[name] == blurred[name][0]), name


def test_srp_phat_track_confidence_follows_the_vad_settings():
    """All 16 mics carry a constant level a_k over frame k's energy window
    [1600 k - 800, 1600 k + 800), so its energy is 20 log10(a_k) dB (frame 0: half the window
    precedes the recording and is silent). Expected confidence, from energy_vad's definition:
    sigmoid((E - percentile(E, p) - threshold) / slope), no hangover."""
    mics, cams = _three_camera_rig()
    geometry = baselines.RigGeometry("01", mics, cams, 3.0, 1.6)
    level_db = -40.0 + 1.5 * np.arange(30)
    level_db[[7, 19]] += 20.0  # two loud frames
    audio = np.zeros((FS, 16), np.float32)
    for k, db in enumerate(level_db):
        audio[max(0, 1600 * k - 800):1600 * k + 800] = 10 ** (db / 20)
    energy = level_db.copy()
    energy[0] -= 10 * np.log10(2)
    config = baselines.SrpConfig(vad_noise_percentile=70.0, vad_threshold_db=4.0, vad_slope_db=1.5,
                                 vad_hangover_frames=0)
    _, confidence = baselines.srp_phat_track(audio, geometry, 30, config)
    floor = np.percentile(energy, 70.0)
    expected = 1 / (1 + np.exp(-(energy - floor - 4.0) / 1.5))
    np.testing.assert_allclose(confidence, expected, rtol=0, atol=1e-5)
    # and with 3 frames of hangover: the max over each frame and the 3 before it
    _, held = baselines.srp_phat_track(audio, geometry, 30, dataclasses.replace(config, vad_hangover_frames=3))
    np.testing.assert_allclose(held, [expected[max(0, k - 3):k + 1].max() for k in range(30)], rtol=0, atol=1e-5)


def _tree_copy(tree, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tree, root)
    return root, json.loads((root / "scene.json").read_text())


def test_srp_phat_baseline_names_a_sequence_without_a_length(tree, tmp_path):
    """A ValueError naming seq_lengths.json and the sequence (not a bare KeyError), as a plain
    quoted name (it printed as np.str_('...'))."""
    root, _ = _tree_copy(tree, tmp_path)
    lengths_path = root / "csv" / "seq_lengths.json"
    lengths = json.loads(lengths_path.read_text())
    sequence = sorted(lengths)[0]
    lengths_path.write_text(json.dumps({"other_t1": lengths.pop(sequence), **lengths}))
    out = tmp_path / "srp" / "test_forward.csv"
    with pytest.raises(ValueError, match=rf"seq_lengths.json has no length for '{sequence}'$"):
        baselines.srp_phat_baseline(root, out)
    assert not out.exists()


def test_srp_phat_baseline_names_a_rig_or_camera_missing_from_the_scene(tree, tmp_path):
    """ValueErrors naming the missing rig or camera (not bare KeyErrors), as plain quoted names."""
    root, scene = _tree_copy(tree, tmp_path)
    out = tmp_path / "srp" / "test_forward.csv"
    without_rig = json.loads(json.dumps(scene))
    del without_rig["rigs"]["02"]
    (root / "scene.json").write_text(json.dumps(without_rig))
    with pytest.raises(ValueError, match=r"^scene has no rig '02' \(it has \['01'\]\)$"):
        baselines.srp_phat_baseline(root, out)
    without_camera = json.loads(json.dumps(scene))
    without_camera["rigs"]["01"]["cameras"].remove("cam05")
    (root / "scene.json").write_text(json.dumps(without_camera))
    with pytest.raises(ValueError, match=r"^scene has no camera 'cam05' in rig 01$"):
        baselines.srp_phat_baseline(root, out)
    assert not out.exists()
