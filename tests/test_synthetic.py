"""Synthetic TragicTalkers-like dataset: layout, formats, geometry truth, physics, determinism.

Expected values are recomputed here from scene.json with plain numpy (pinhole projection,
distances over the speed of sound) or from the signals (soundfile, coherence estimates),
never taken from the generator's own intermediate arrays.
"""

import csv
import dataclasses
import json
import pathlib

import numpy as np
import pytest
import scipy.signal
import soundfile

from asd_jax import constants
from asd_jax.data.synthetic import labels, render, scene, speech, synthesize
from asd_jax.data.synthetic import config
from asd_jax.data.synthetic.config import DEFAULT_CAMERA_OFFSETS_M as DEFAULT_OFFSETS, SynthConfig

FS = 48_000
C = 343.0
TINY = dict(num_dev=2, num_test=3, seconds=4.0, seed=3, snr_db=30.0)
LABELS = {"SPEAKING", "NOT_SPEAKING"}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> pathlib.Path:
    return synthesize(tmp_path_factory.mktemp("syn") / "data", **TINY)


@pytest.fixture(scope="module")
def scene_json(root) -> dict:
    return json.loads((root / "scene.json").read_text())


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def _cameras(sequence):
    cams = [c for rig in constants.RIGS for c in constants.RIG_CAMERAS[rig]]
    return [c for c in cams if not (sequence == "interactive1_t2" and c == "cam17")]


def _mouth(talker, t):
    """Mouth positions (T, 3) at times t (s) by linear interpolation of the waypoints."""
    wp = np.asarray(talker["mouth_m"])
    return np.stack([np.interp(t, talker["waypoint_times_s"], wp[:, k]) for k in range(3)], -1)


def _pinhole(cam, points):
    """Independent pinhole projection: (T, 3) world points -> u, v in px."""
    p = (points - np.asarray(cam["position_m"])) @ np.asarray(cam["rotation_world_to_camera"]).T
    cx, cy = cam["principal_point_px"]
    return cam["focal_px"] * p[:, 0] / p[:, 2] + cx, cam["focal_px"] * p[:, 1] / p[:, 2] + cy


def _activity(seq, n_frames):
    """(K, F) bool from the utterance intervals; frame f at f / 30 s."""
    t = np.arange(n_frames) / 30
    act = np.zeros((len(seq["talkers"]), n_frames), bool)
    for spk, start, end in seq["utterances"]:
        act[spk - 1] |= (t >= start) & (t < end)
    return act


def test_layout(root, scene_json):
    lengths = json.loads((root / "csv" / "seq_lengths.json").read_text())
    dev = sorted(p.name for p in (root / "TragicTalkers/audio/development").iterdir())
    test = sorted(p.name for p in (root / "TragicTalkers/audio/test").iterdir())
    assert test == sorted(constants.TEST_SEQUENCES[:3])
    assert len(dev) == 2 and not set(dev) & set(test)
    assert sorted(lengths) == sorted(dev + test) == sorted(scene_json["sequences"])
    for split, names in (("development", dev), ("test", test)):
        for name in names:
            kind = scene.sequence_kind(name)  # real naming pattern
            assert kind in scene.KINDS
            folder = root / "TragicTalkers/audio" / split / name
            assert len(list(folder.glob("*.wav"))) == 32
            n_frames = int(round(float(lengths[name]) * 30))
            for rig in constants.RIGS:
                for mic in constants.RIG_MICS[rig]:
                    chosen = sorted(p for p in folder.iterdir() if p.name.startswith(mic))[0]
                    info = soundfile.info(chosen)
                    assert (info.samplerate, info.channels, info.subtype) == (FS, 1, "PCM_16")
                    assert info.frames == n_frames * FS // 30
    for condition in constants.CONDITIONS:
        rows = _read_csv(root / "csv" / f"development_{condition}.csv")
        assert rows[0] == ["name", "time", "x", "pseudo_label", "va_label"]
    assert _read_csv(root / "csv" / "test_forward.csv")[0] == ["name", "time"]
    gt_dirs = sorted(p.name for p in (root / "GT").iterdir())
    assert gt_dirs == test
    for name in test:
        for rig in constants.RIGS:
            files = sorted(p.name for p in (root / "GT" / name / rig).iterdir())
            expected = [f"{name}-{c}_GT.csv" for c in constants.RIG_CAMERAS[rig]
                        if not (name == "interactive1_t2" and c == "cam17")]
            assert files == expected
    assert (root / "README.txt").read_text().startswith("Synthetic TragicTalkers-like dataset")
    assert not list(root.parent.glob(".*partial*"))  # the temporary build directory is gone


def test_csv_rows_and_times(root, scene_json):
    lengths = json.loads((root / "csv" / "seq_lengths.json").read_text())
    seqs = scene_json["sequences"]
    for condition in constants.CONDITIONS:
        rows = _read_csv(root / "csv" / f"development_{condition}.csv")[1:]
        expected_names = [f"{s}-{c}" for s in sorted(n for n in seqs if seqs[n]["split"] == "development")
                          for c in _cameras(s) for _ in range(int(round(float(lengths[s]) * 30)))]
        assert [r[0] for r in rows] == expected_names
        for r in rows:
            assert 0.0 <= float(r[2]) <= 1.0 and r[3] in LABELS and r[4] in LABELS
        frames = np.array([int(round(float(r[1]) * 30)) for r in rows])
        times = np.array([float(r[1]) for r in rows])
        np.testing.assert_array_equal(times, np.round(frames / 30, 2))
        # Chunk starts: exactly the rows with frame % 30 == 0 have an integer time.
        np.testing.assert_array_equal(np.mod(times, 1) == 0, frames % 30 == 0)
        starts = np.flatnonzero(frames == 0)
        for a, b in zip(starts, list(starts[1:]) + [len(rows)]):
            np.testing.assert_array_equal(frames[a:b], np.arange(b - a))
    rows = _read_csv(root / "csv" / "test_forward.csv")[1:]
    expected = [(f"{s}-{c}", f) for s in sorted(n for n in seqs if seqs[n]["split"] == "test")
                for c in _cameras(s) for f in range(int(round(float(lengths[s]) * 30)))]
    assert [(r[0], int(round(float(r[1]) * 30))) for r in rows] == expected
    # SPEC section 8: the forward pass writes a row while round(t, 2) < round(length, 2).
    for name, length in lengths.items():
        n_frames = int(round(float(length) * 30))
        t = np.round(np.arange(n_frames + 30) / 30, 2)
        assert np.sum(t < round(float(length), 2)) == n_frames


def test_gt_is_the_pinhole_projection_of_the_mouth(root, scene_json):
    for name, seq in scene_json["sequences"].items():
        if seq["split"] != "test":
            continue
        n_frames, n_talkers = seq["n_frames"], len(seq["talkers"])
        assert n_talkers == (2 if scene.sequence_kind(name) in ("conversation", "interactive") else 1)
        act = _activity(seq, n_frames)
        for cam_name in _cameras(name):
            cam = scene_json["cameras"][cam_name]
            rows = _read_csv(root / "GT" / name / cam["rig"] / f"{name}-{cam_name}_GT.csv")
            assert len(rows) == n_talkers * n_frames and all(len(r) == 5 for r in rows)
            for k, talker in enumerate(seq["talkers"]):
                block = rows[k * n_frames:(k + 1) * n_frames]
                u, v = _pinhole(cam, _mouth(talker, np.arange(n_frames) / 30))
                assert [int(r[0]) for r in block] == list(range(n_frames))
                assert {int(r[3]) for r in block} == {k + 1}
                np.testing.assert_allclose([int(r[1]) for r in block], u, atol=0.5 + 1e-6)
                np.testing.assert_allclose([int(r[2]) for r in block], v, atol=0.5 + 1e-6)
                assert [r[4] for r in block] == ["SPEAKING" if a else "NOT_SPEAKING" for a in act[k]]


def test_gt_condition_csv_matches_the_scene(root, scene_json):
    rows = _read_csv(root / "csv" / "development_GT_GT.csv")[1:]
    by_name = {}
    for r in rows:
        by_name.setdefault(r[0], []).append(r)
    for name, seq in scene_json["sequences"].items():
        if seq["split"] != "development":
            continue
        act = _activity(seq, seq["n_frames"])
        t = np.arange(seq["n_frames"]) / 30
        for cam_name in _cameras(name):
            cam = scene_json["cameras"][cam_name]
            u = np.stack([_pinhole(cam, _mouth(tk, t))[0] for tk in seq["talkers"]])
            first = np.argmax(act, axis=0)
            x = np.where(act.any(0), np.clip(np.rint(u[first, np.arange(len(t))]) / 2448, 0, 1), 1.0)
            block = by_name[f"{name}-{cam_name}"]
            np.testing.assert_allclose([float(r[2]) for r in block], x, atol=1e-12)
            speaking = ["SPEAKING" if a else "NOT_SPEAKING" for a in act.any(0)]
            assert [r[3] for r in block] == speaking and [r[4] for r in block] == speaking


def test_geometry(scene_json):
    # Every TDOA re mic 0 is within +-31 samples: |d_k - d_0| <= |m_k - m_0| for any source.
    for rig in scene_json["rigs"].values():
        mics = np.asarray(rig["mics_m"])
        assert mics.shape == (16, 3)
        assert np.linalg.norm(mics - mics[0], axis=1).max() / C * FS <= 31
    # 2 degrees off the optical axis, horizontally, lands 89 px from the image centre.
    for cam in scene_json["cameras"].values():
        rot = np.asarray(cam["rotation_world_to_camera"])
        right, forward = rot[0], rot[2]
        point = np.asarray(cam["position_m"]) + 3.0 * (np.cos(np.radians(2)) * forward
                                                       + np.sin(np.radians(2)) * right)
        u, _ = _pinhole(cam, point[None])
        assert u[0] - cam["image_size_px"][0] / 2 == pytest.approx(89.0, abs=1e-6)
        assert cam["image_size_px"][0] == 2448
    # Two rigs at different places; each mouth is in view of most cameras.
    centres = [np.asarray(r["centre_m"]) for r in scene_json["rigs"].values()]
    assert np.linalg.norm(centres[0] - centres[1]) > 1.0


def test_gcc_phat_peak_is_the_talker_tdoa(root, scene_json):
    """The frame-averaged GCC-PHAT feature of a chunk peaks at the talker's TDOAs re mic 0."""
    features = pytest.importorskip("asd_jax.features")
    chunks, active_frames, expected = [], [], []
    for name, seq in scene_json["sequences"].items():
        folder = root / "TragicTalkers/audio" / seq["split"] / name
        for rig in scene_json["rigs"].values():
            audio = np.stack([soundfile.read(sorted(folder.glob(f"{m}*.wav"))[0])[0]
                              for m in rig["mic_ids"]], axis=-1)
            for spk, start, end in seq["utterances"]:
                if end - start < 0.5:
                    continue
                s0 = int(round(start * FS))
                chunk = np.zeros((96000, 16), np.float32)
                piece = audio[s0:s0 + 96000]
                chunk[:len(piece)] = piece
                chunks.append(chunk)
                active_frames.append(np.arange(960) * 100 / FS < min(end - start, 2.0) - 0.01)
                mouth = _mouth(seq["talkers"][spk - 1], np.array([start]))[0]
                dist = np.linalg.norm(np.asarray(rig["mics_m"]) - mouth, axis=1)
                expected.append((dist[1:] - dist[0]) / C * FS)
    assert len(chunks) >= 5
    gcc = np.asarray(features.gcc_phat(np.stack(chunks)))[..., :15]  # (N, 960, 64, 15)
    for g, frames, tdoa in zip(gcc, active_frames, expected):
        peak = np.argmax(g[frames].mean(axis=0), axis=0) - 32  # bin l holds lag l - 32
        assert np.sum(np.abs(peak - tdoa) <= 1.5) >= 13, (peak, tdoa)


def test_detectors_are_ordered_by_quality(root):
    def load(condition):
        rows = _read_csv(root / "csv" / f"development_{condition}.csv")[1:]
        return (np.array([float(r[2]) for r in rows]), np.array([r[3] == "SPEAKING" for r in rows]),
                np.array([r[4] == "SPEAKING" for r in rows]))

    gt_x, gt_p, gt_va = load("GT_GT")
    errors = {}
    for source in ("ASC", "ASC(s)", "TalkNet"):
        x, p, va = load(f"{source}_GT")
        np.testing.assert_array_equal(va, gt_va)  # the _GT activity labels are the ground truth
        both = p & gt_p
        errors[source] = (np.mean(p != gt_p), np.mean(np.abs(x - gt_x)[both]))
        assert np.all(x[~p] == 1.0)  # nobody detected: the reference's "no speaker" x
        x_vad, p_vad, va_vad = load(f"{source}_VAD")
        np.testing.assert_array_equal(x_vad, x)
        np.testing.assert_array_equal(p_vad, p)
    assert errors["TalkNet"][0] < errors["ASC(s)"][0] < errors["ASC"][0]
    assert errors["TalkNet"][1] < errors["ASC"][1]
    assert all(e[0] > 0 for e in errors.values())
    _, _, vad = load("GT_VAD")
    assert 0.6 < np.mean(vad == gt_va) < 1.0  # an imperfect but informative VAD


@pytest.mark.slow
def test_deterministic_and_refuses_to_overwrite(tmp_path):
    """Same arguments, any worker count: byte-identical trees; bad input: nothing written."""
    small = dict(num_dev=1, num_test=1, seconds=2.6, seed=5, snr_db=20.0)
    a, b = synthesize(tmp_path / "a", **small), synthesize(tmp_path / "b", workers=2, **small)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    c = synthesize(tmp_path / "c", **{**small, "seed": 6})
    wav = next(p for p in files if p.suffix == ".wav")
    assert (a / wav).read_bytes() != (c / wav).read_bytes()

    with pytest.raises(FileExistsError, match="not empty"):
        synthesize(a, **small)
    assert (a / files[0]).exists()
    with pytest.raises(ValueError, match="mic_radius_m=0.3"):
        synthesize(tmp_path / "d", mic_radius_m=0.3, **small)
    with pytest.raises(TypeError, match="unknown synthesize option"):
        synthesize(tmp_path / "d", mic_radiuss=0.1, **small)
    with pytest.raises(ValueError, match="seconds=1.2"):
        synthesize(tmp_path / "d", **{**small, "seconds": 1.2})
    assert not (tmp_path / "d").exists()
    assert synthesize(a, overwrite=True, **{**small, "seed": 6}) == a
    assert (a / wav).read_bytes() == (c / wav).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]


def test_speech_pitch_syllable_rate_and_level():
    rng = np.random.default_rng(0)
    voice = speech.Voice(f0_hz=120.0, formant_scale=1.0, level_db=0.0)
    x = speech.synthesize_utterance(rng, voice, 3 * FS)
    again = speech.synthesize_utterance(np.random.default_rng(0), voice, 3 * FS)
    np.testing.assert_array_equal(x, again)
    assert np.sqrt(np.mean(x ** 2)) == pytest.approx(0.1)
    # Pitch: autocorrelation peak of the loudest 40 ms frames, 60-400 Hz search.
    frames = x[:len(x) // 1920 * 1920].reshape(-1, 1920)
    loud = frames[np.argsort((frames ** 2).sum(1))[-20:]]
    f0s = []
    for fr in loud:
        ac = np.correlate(fr, fr, "full")[1919:]
        lag = 120 + np.argmax(ac[120:800])
        f0s.append(FS / lag)
    assert 85 < np.median(f0s) < 170
    # Syllable-rate envelope: modulation spectrum of the 100 Hz envelope peaks at 2-8 Hz.
    env = np.sqrt(np.mean(x[:len(x) // 480 * 480].reshape(-1, 480) ** 2, axis=1))
    f, p = scipy.signal.periodogram(env - env.mean(), fs=100)
    assert 2 <= f[np.argmax(p)] <= 8
    # Most energy below 4 kHz, but not nothing above (fricatives).
    f, p = scipy.signal.welch(x, FS, nperseg=2048)
    assert 0.8 < p[f < 4000].sum() / p.sum() < 0.9999


def test_diffuse_noise_coherence():
    rigs = scene.make_rigs(SynthConfig())
    mics = rigs[0].mics_m
    noise = render.diffuse_noise(np.random.default_rng(0), mics, 8 * FS)
    assert noise.shape == (8 * FS, 16)
    np.testing.assert_allclose(np.mean(noise ** 2), 1.0, rtol=1e-6)
    for j in (1, 5, 9):
        d = np.linalg.norm(mics[0] - mics[j])
        f, cross = scipy.signal.csd(noise[:, 0], noise[:, j], fs=FS, nperseg=1024)
        _, p0 = scipy.signal.welch(noise[:, 0], fs=FS, nperseg=1024)
        _, pj = scipy.signal.welch(noise[:, j], fs=FS, nperseg=1024)
        band = (f > 100) & (f < 3000)
        np.testing.assert_allclose((cross.real / np.sqrt(p0 * pj))[band],
                                   np.sinc(2 * f[band] * d / C), atol=0.12)


def test_energy_vad_hangover():
    n_frames, per = 60, FS // 30
    x = np.zeros(n_frames * per)
    rng = np.random.default_rng(0)
    x += 1e-4 * rng.normal(size=x.shape)
    x[10 * per:20 * per] += 0.3 * np.sin(2 * np.pi * 500 * np.arange(10 * per) / FS)
    x[40 * per:41 * per] += 0.3 * np.sin(2 * np.pi * 500 * np.arange(per) / FS)
    vad = labels.energy_vad(x, n_frames, FS, (100, 4000), 12.0, 35.0, hangover_frames=5)
    expected = np.zeros(n_frames, bool)
    expected[10:25] = True
    expected[40:46] = True
    # Band-pass filter edges may smear one frame either side of each burst.
    core = np.ones(n_frames, bool)
    core[[9, 10, 19, 20, 24, 25, 39, 40, 41, 45, 46]] = False
    np.testing.assert_array_equal(vad[core], expected[core])


# ----------------------------------------------------------------------------------------
# Determinism across machines, argument checks, replacing and cleaning up trees.
# ----------------------------------------------------------------------------------------

_SEQUENCE_HASH = """
import hashlib
from asd_jax.data.synthetic import config, scene, sequence
cfg = config.SynthConfig()
seq = sequence.simulate_sequence("conversation1_t1", 2.0, 0, cfg, scene.make_rigs(cfg))
print(hashlib.sha256(b"".join(seq.audio[r].tobytes() for r in sorted(seq.audio))).hexdigest())
"""


def test_audio_does_not_depend_on_the_thread_count():
    """pyroomacoustics splits its float32 RIR sums over PRA_NUM_THREADS threads (default: the
    core count); the PCM must be the same bytes for any count."""
    import os
    import subprocess
    import sys
    digests = []
    for threads in ("1", "3"):
        env = {**os.environ, "PRA_NUM_THREADS": threads}
        proc = subprocess.run([sys.executable, "-c", _SEQUENCE_HASH], env=env, capture_output=True,
                              text=True, cwd=pathlib.Path(__file__).resolve().parents[1], timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        digests.append(proc.stdout.strip())
    assert len(digests[0]) == 64 and digests[0] == digests[1]


_TREE_HASHES = """
import hashlib, sys
import numpy as np
from asd_jax.data.synthetic import config, render, scene, synthesize
root = synthesize(sys.argv[1], num_dev=1, num_test=1, seconds=2.0, seed=1, snr_db=20.0, max_order=1)
for p in sorted(root.rglob("*")):
    if p.is_file():
        print(p.relative_to(root), hashlib.sha256(p.read_bytes()).hexdigest())
# The float64 signals before quantisation, whose last bits rarely reach a tiny tree's PCM.
mics = scene.make_rigs(config.SynthConfig())[0].mics_m
rirs = render.room_impulse_responses((10.0, 8.0, 4.0), 0.4, 2, np.array([5.0, 5.0, 1.6]), mics)
noise = render.diffuse_noise(np.random.default_rng(0), mics, 4800)
print("rirs", hashlib.sha256(rirs.tobytes()).hexdigest(), "noise", hashlib.sha256(noise.tobytes()).hexdigest())
"""


def test_tree_does_not_depend_on_the_blas_kernel(tmp_path):
    """The CPU's OpenBLAS kernel (OPENBLAS_CORETYPE) changes eigh's eigenvectors (their signs, and
    rotations within the repeated eigenvalues of the symmetric mic ring: the diffuse noise) and
    the last bits of linear solves (scipy's initial state of the RIRs' high-pass filter); every
    file of the tree and the float64 RIRs and noise must be the same bytes under any kernel (an
    unknown name falls back to the default one)."""
    import os
    import subprocess
    import sys
    listings = []
    for coretype in (None, "Haswell", "Prescott"):
        env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
        if coretype is not None:
            env["OPENBLAS_CORETYPE"] = coretype
        out = tmp_path / (coretype or "default")
        proc = subprocess.run([sys.executable, "-c", _TREE_HASHES, str(out)], env=env,
                              capture_output=True, text=True,
                              cwd=pathlib.Path(__file__).resolve().parents[1], timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        listings.append(proc.stdout.splitlines())
    assert any(line.startswith("scene.json ") for line in listings[0])
    assert listings[0][-1].startswith("rirs ")
    assert len(listings[0]) > 60 and listings[0] == listings[1] == listings[2]


def test_rir_threads_setting_is_restored():
    import pyroomacoustics as pra
    saved = pra.constants.get("num_threads")
    pra.constants.set("num_threads", 5)
    try:
        cfg = SynthConfig()
        rigs = scene.make_rigs(cfg)
        render.room_impulse_responses(cfg.room_dim_m, 0.5, 2, np.array([5.0, 5.0, 1.6]),
                                      rigs[0].mics_m)
        assert pra.constants.get("num_threads") == 5
    finally:
        pra.constants.set("num_threads", saved)


FAST = dict(num_dev=1, num_test=0, seconds=1.6, snr_db=None, max_order=1)


@pytest.mark.parametrize("seed, error, match", [
    (-1, ValueError, r"seed=-1: expected an integer >= 0"),
    (1.5, TypeError, r"seed=1.5: expected an integer >= 0"),
    (True, TypeError, r"seed=True: expected an integer >= 0"),
    ("3", TypeError, r"seed='3': expected an integer >= 0"),
])
def test_bad_seed_is_refused_before_anything_is_written(tmp_path, seed, error, match):
    with pytest.raises(error, match=match):
        synthesize(tmp_path / "parent" / "data", seed=seed, **FAST)
    assert not (tmp_path / "parent").exists()


def test_seed_of_a_sequence_is_checked_too():
    from asd_jax.data.synthetic import sequence
    with pytest.raises(TypeError, match="seed=1.5"):
        sequence.sequence_seed(1.5, "conversation1_t1")
    assert sequence.sequence_seed(np.int64(2), "x").entropy == 2  # numpy integers are integers


def _tree(root: pathlib.Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_overwrite_interrupted_while_deleting_leaves_a_complete_tree(tmp_path, monkeypatch):
    """The old tree is moved aside before the new one goes in: an interrupt while it is being
    deleted leaves the complete new tree at out_dir, never a half-deleted old one."""
    import shutil
    from asd_jax.data.synthetic import writer
    out = synthesize(tmp_path / "data", seed=1, **FAST)
    old = _tree(out)
    fresh = _tree(synthesize(tmp_path / "fresh", seed=2, **FAST))
    real_rmtree = shutil.rmtree

    def interrupted_rmtree(path, *args, **kwargs):
        path = pathlib.Path(path)
        if ".partial-" in path.name:  # cleaning up a build: let it
            return real_rmtree(path, *args, **kwargs)
        for wav in path.rglob("*.wav"):  # half of the deletion, then Ctrl-C
            wav.unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(writer.shutil, "rmtree", interrupted_rmtree)
    with pytest.raises(KeyboardInterrupt):
        synthesize(out, seed=2, overwrite=True, **FAST)
    monkeypatch.undo()
    assert _tree(out) == fresh != old


def test_an_interrupt_before_the_new_tree_is_in_place_keeps_the_old_one(tmp_path, monkeypatch):
    import os
    from asd_jax.data.synthetic import writer
    out = synthesize(tmp_path / "data", seed=1, **FAST)
    old = _tree(out)
    real_replace = os.replace

    def replace(src, dst):
        if pathlib.Path(src).name.startswith(".data.partial-"):
            raise KeyboardInterrupt  # between moving the old tree aside and the new one in
        return real_replace(src, dst)

    monkeypatch.setattr(writer.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        synthesize(out, seed=2, overwrite=True, **FAST)
    monkeypatch.undo()
    assert _tree(out) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def _no_simulation(job):
    raise AssertionError(f"simulated {job[2]} before the out_dir was checked")


@pytest.mark.parametrize("out", [".", "", "..", "sub/..", "CWD"])
def test_the_current_directory_is_refused_before_simulating(tmp_path, monkeypatch, out):
    """The tree is renamed into the place of out_dir at the end; the directory the caller is in
    (or one above it) cannot be replaced that way, and used to fail only after the simulation."""
    from asd_jax.data.synthetic import writer
    monkeypatch.setattr(writer, "_simulate_and_write", _no_simulation)
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    monkeypatch.chdir(work)
    with pytest.raises(ValueError, match=r"is the current directory or one above it"):
        synthesize(str(work) if out == "CWD" else out, overwrite=True, **FAST)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]
    assert sorted(p.name for p in work.iterdir()) == ["sub"]


def test_a_mount_point_or_the_root_is_refused_before_simulating(monkeypatch):
    import os
    from asd_jax.data.synthetic import writer
    monkeypatch.setattr(writer, "_simulate_and_write", _no_simulation)
    with pytest.raises(ValueError, match=r"out_dir / is the file system root"):
        synthesize("/", overwrite=True, **FAST)
    mount = next((m for m in ("/proc", "/dev", "/sys") if os.path.ismount(m)), None)
    if mount is None:
        pytest.skip("no mount point to try")
    with pytest.raises(ValueError, match=rf"out_dir {mount} is a mount point"):
        synthesize(mount, overwrite=True, **FAST)


def test_build_directories_of_killed_runs_are_removed(tmp_path):
    import os
    import socket
    import subprocess
    import sys
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    stale = [f".data.partial-{host}-{dead.pid}-{'a' * 32}", f".data.partial-{'b' * 32}",
             f".data.old-{host}-{dead.pid}-{'c' * 32}"]
    kept = [f".data.partial-{host}-{os.getpid()}-{'d' * 32}",  # a run still in progress
            f".data.partial-otherhost-{dead.pid}-{'e' * 32}",  # another machine's: unknown
            f".data2.partial-{host}-{dead.pid}-{'f' * 32}"]  # another dataset
    for name in stale + kept:
        (tmp_path / name / "csv").mkdir(parents=True)
        (tmp_path / name / "csv" / "seq_lengths.json").write_text("{}")
    synthesize(tmp_path / "data", seed=1, **FAST)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["data"] + kept)


# ----------------------------------------------------------------------------------------
# Two talkers keep their distance.
# ----------------------------------------------------------------------------------------


def test_two_talkers_stay_min_separation_apart_at_all_times():
    """Sampled every 2 ms over 20-s plans: never closer than min_separation_m (horizontally);
    the talkers still move (most plans have a made move)."""
    cfg = SynthConfig()
    rigs = scene.make_rigs(cfg)
    closest, moved, plans = np.inf, 0, 0
    for seed in range(60):
        for kind in ("conversation", "interactive"):
            plan = scene.plan_sequence(np.random.default_rng(seed), f"{kind}1_t1", 600, cfg, rigs)
            t = np.arange(0.0, plan.seconds + 0.002, 0.002)
            paths = []
            for talker in plan.talkers:  # waypoints interpolated here, not by the generator
                paths.append(np.stack([np.interp(t, talker.times_s, talker.mouth_m[:, k])
                                       for k in range(2)], -1))
                moved += np.ptp(talker.mouth_m[:, :2], axis=0).max() > 0.05
            closest = min(closest, np.linalg.norm(paths[0] - paths[1], axis=-1).min())
            plans += 1
    assert closest >= cfg.min_separation_m
    assert moved > plans


def test_closest_approach_is_exact():
    rng = np.random.default_rng(0)
    for _ in range(50):
        times_a, times_b = np.sort(rng.uniform(0, 5, 4)), np.sort(rng.uniform(0, 5, 3))
        points_a, points_b = rng.uniform(0, 2, (4, 2)), rng.uniform(0, 2, (3, 2))
        start = float(rng.uniform(0, 4))
        t = np.linspace(start, 6.0, 200_001)
        sampled = np.linalg.norm(
            np.stack([np.interp(t, times_a, points_a[:, k]) - np.interp(t, times_b, points_b[:, k])
                      for k in range(2)], -1), axis=-1).min()
        exact = scene.closest_approach(times_a, points_a, times_b, points_b, from_s=start)
        assert exact <= sampled + 1e-12 and sampled - exact < 1e-4


@pytest.mark.parametrize("radius", [0.0, -0.1, float("nan")])
def test_mic_ring_radius_must_be_positive(radius):
    """Radius 0 put all 16 microphones at one point: a data set without spatial cues."""
    with pytest.raises(ValueError, match=rf"mic_radius_m={radius}: expected > 0 m"):
        SynthConfig(mic_radius_m=radius)


def test_min_separation_must_fit_the_stage():
    with pytest.raises(ValueError, match="min_separation_m=3"):
        SynthConfig(min_separation_m=3.0)


# ----------------------------------------------------------------------------------------
# Pieces of the simulation against independent references (numpy, the SPEC, the reference
# data's own files).
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, match", [
    (dict(rt60_range_s=(0.0, 0.3)), r"rt60_range_s=\(0.0, 0.3\): expected 0 < low <= high"),
    (dict(rt60_range_s=(0.5, 0.3)), r"rt60_range_s=\(0.5, 0.3\)"),
    (dict(max_order=-1), r"max_order=-1: expected >= 0"),
    (dict(mic_radius_m=0.2, max_tdoa_samples=20), r"mic_radius_m=0.2 gives TDOAs up to 28.0 samples"),
    (dict(rig_height_m=4.5), r"rig 01 centre \(3.6, 1.8, 4.5\) m is outside the room"),
    (dict(rig_centres_m=((3.6, 1.8), (10.5, 1.8))), r"rig 02 centre \(10.5, 1.8, 1.6\) m is outside"),
    (dict(stage_y_m=(4.4, 8.5)), r"stage .* is outside the room"),
    (dict(camera_offsets_m=DEFAULT_OFFSETS[:10]), r"camera_offsets_m has 10 entries: expected 11"),
    (dict(camera_offsets_m=DEFAULT_OFFSETS + ((0.0, 0.9),)), r"camera_offsets_m has 12 entries"),
])
def test_config_refuses_bad_geometry(change, match):
    with pytest.raises(ValueError, match=match):
        SynthConfig(**change)


_NO_ASCS = tuple((k, v) for k, v in config.DEFAULT_DETECTORS.items() if k != "ASC(s)")


@pytest.mark.parametrize("change, match", [
    # Sabine: 24 ln(10) V / (c S RT60) = 2.42 at RT60 0.2 s; pyroomacoustics failed mid-run.
    (dict(room_dim_m=(30.0, 30.0, 10.0)), r"room_dim_m=\(30.0, 30.0, 10.0\) with rt60_range_s=\(0.2, 0.6\): "
                                          r"Sabine's formula needs an energy absorption of 2.42 for RT60 "
                                          r"0.2 s; expected <= 1 \(RT60 >= 0.483 s"),
    (dict(room_dim_m=(10.0, 8.0)), r"room_dim_m=\(10.0, 8.0\): expected 3 lengths > 0 m"),
    (dict(room_dim_m=(10.0, 0.0, 4.0)), r"room_dim_m=\(10.0, 0.0, 4.0\): expected 3 lengths > 0 m"),
    # A condition without its detector was a KeyError after all the simulation.
    (dict(detectors=_NO_ASCS), r"detectors named \['ASC', 'TalkNet'\]: expected each of "
                               r"\['ASC', 'ASC\(s\)', 'TalkNet'\]"),
    (dict(detectors=_NO_ASCS + _NO_ASCS[:1] + (("ASC(s)", _NO_ASCS[0][1]),)), r"detectors named .*once"),
    (dict(detectors=tuple(config.DEFAULT_DETECTORS.items()) + (("GT", _NO_ASCS[0][1]),)),
     r"detectors named .*'GT'\]: .*and not 'GT'"),
    (dict(detectors=(("ASC", 1.0), *_NO_ASCS[1:], ("ASC(s)", _NO_ASCS[0][1]))),
     r"detectors\['ASC'\]=1.0: expected a DetectorParams"),
    (dict(length_jitter_s=-0.1), r"length_jitter_s=-0.1: expected >= 0 s"),
    (dict(peak_dbfs=0.5), r"peak_dbfs=0.5: expected <= 0 dBFS \(a higher peak clips"),
    (dict(focal_px=0.0), r"focal_px=0.0: expected > 0 px"),
    (dict(focal_px=-2548.6), r"focal_px=-2548.6: expected > 0 px \(a negative focal length mirrors"),
    (dict(walk_speed_m_s=-0.5), r"walk_speed_m_s=-0.5: expected >= 0 m/s"),
    (dict(walk_speed_m_s=float("nan")), r"walk_speed_m_s=nan: expected >= 0 m/s"),
    (dict(missing_cameras=(("interactive1_t2", "cam23"),)),
     r"missing_cameras entry \('interactive1_t2', 'cam23'\): expected \(sequence, camera\) .*unknown camera"),
    (dict(missing_cameras=(("interactive1-t2", "cam17"),)),
     r"missing_cameras entry \('interactive1-t2', 'cam17'\): .*sequence name 'interactive1-t2'"),
    (dict(missing_cameras=("interactive1_t2",)), r"missing_cameras entry 'interactive1_t2': expected"),
])
def test_config_refuses_bad_options(change, match):
    """Options that used to fail only mid-run (or after all the simulation), or to give a silently
    wrong tree (clipped PCM, mirrored images, a missing camera that is not one)."""
    with pytest.raises(ValueError, match=match):
        SynthConfig(**change)


@pytest.mark.parametrize("change, match", [
    (dict(smooth_frames=0), r"DetectorParams smooth_frames=0: expected an integer >= 1"),
    (dict(smooth_frames=2.5), r"DetectorParams smooth_frames=2.5: expected an integer >= 1"),
    (dict(score_noise_frames=-1.0), r"DetectorParams score_noise_frames=-1.0: expected > 0 frames"),
    (dict(jitter_px=-3.0), r"DetectorParams jitter_px=-3.0: expected >= 0 px"),
    (dict(max_yaw_deg=0.0), r"DetectorParams max_yaw_deg=0.0: expected in \(0, 180\] degrees"),
])
def test_detector_params_refuse_bad_values(change, match):
    base = dataclasses.asdict(config.DEFAULT_DETECTORS["TalkNet"])
    with pytest.raises(ValueError, match=match):
        config.DetectorParams(**{**base, **change})


def test_config_limits_are_accepted():
    SynthConfig(room_dim_m=(30.0, 30.0, 10.0), rt60_range_s=(0.49, 0.8), peak_dbfs=0.0,
                length_jitter_s=0.0, walk_speed_m_s=0.0, missing_cameras=())
    SynthConfig(detectors=tuple(config.DEFAULT_DETECTORS.items()) + (("Other", _NO_ASCS[0][1]),))


def test_config_takes_a_fixed_rt60():
    assert SynthConfig(rt60_range_s=(0.3, 0.3)).rt60_range_s == (0.3, 0.3)


def test_look_at_is_a_proper_rotation_with_a_level_horizon():
    """Rows right, down, forward: orthonormal, determinant +1 (no mirror image), right
    horizontal, down pointing below the horizon; the target projects onto the optical axis,
    a point above it to a smaller image row v."""
    position, target = np.array([3.6, 1.8, 1.6]), np.array([5.0, 5.1, 1.2])
    rot = scene.look_at(position, target)
    np.testing.assert_allclose(rot @ rot.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(rot) == pytest.approx(1.0)
    right, down, forward = rot
    np.testing.assert_allclose(forward, (target - position) / np.linalg.norm(target - position))
    assert abs(right[2]) < 1e-12 and down[2] < 0
    cam = scene.Camera("cam01", "01", position, rot, 1000.0, (100.0, 50.0), (200, 100))
    u, v, depth = cam.project(np.stack([target, target + [0, 0, 0.2], target + 0.2 * right]))
    np.testing.assert_allclose([u[0], v[0]], [100.0, 50.0], atol=1e-9)
    assert v[1] < 50.0 and u[2] > 100.0 and np.all(depth > 0)
    with pytest.raises(ValueError, match="looks vertically"):
        scene.look_at(position, position + [0, 0, 1.0])


def test_rig_geometry_follows_the_config():
    """Mic 0 `mic_setback_m` behind the rig centre (away from the stage), the 15 others on a
    circle of `mic_radius_m` around it in the plane parallel to the camera plane; camera j
    aims at the stage centre moved sideways by camera_aim_spread * u_j."""
    cfg = SynthConfig()
    for rig in scene.make_rigs(cfg):
        stage_dir = np.asarray(cfg.stage_centre_m[:2]) - rig.centre_m[:2]
        stage_dir = np.array([*stage_dir / np.linalg.norm(stage_dir), 0.0])
        offset = rig.mics_m[0] - rig.centre_m
        np.testing.assert_allclose(offset, -cfg.mic_setback_m * stage_dir, atol=1e-12)
        ring = rig.mics_m[1:] - rig.mics_m[0]
        np.testing.assert_allclose(np.linalg.norm(ring, axis=1), cfg.mic_radius_m, atol=1e-12)
        np.testing.assert_allclose(ring @ stage_dir, 0.0, atol=1e-12)
        side = np.array([stage_dir[1], -stage_dir[0], 0.0])  # the rig's right, horizontal
        for cam, (du, dw) in zip(rig.cameras, cfg.camera_offsets_m):
            np.testing.assert_allclose(cam.position_m, rig.centre_m + du * side + [0, 0, dw],
                                       atol=1e-12)
            aim = np.asarray(cfg.stage_centre_m) + cfg.camera_aim_spread * du * side - cam.position_m
            np.testing.assert_allclose(cam.rotation[2], aim / np.linalg.norm(aim), atol=1e-12)


def test_sequence_names_are_unique_and_keep_test_names_out_of_development():
    dev, test = scene.sequence_names(40, 10)
    assert test[:len(constants.TEST_SEQUENCES)] == list(constants.TEST_SEQUENCES)[:10]
    assert len(set(dev)) == 40 and len(set(test)) == 10 and not set(dev) & set(test)
    assert all(scene.sequence_kind(n) in scene.KINDS for n in dev + test)


def _plan_of(mouths, facings, n_frames=3):
    """A SequencePlan of talkers standing still at `mouths` (K, 3), facing `facings` (deg)."""
    voice = speech.Voice(120.0, 1.0, 0.0)
    talkers = tuple(scene.Talker(k + 1, "male", voice, np.array([0.0]), np.asarray(m)[None],
                                 np.array([f])) for k, (m, f) in enumerate(zip(mouths, facings)))
    return scene.SequencePlan("conversation1_t1", "conversation", n_frames, 0.3, talkers, ())


def test_visibility_occlusion_and_yaw():
    """A talker right behind another (same image x, farther away) is occluded, the nearer one
    is not; a talker 3 m to the side is visible. Yaw: 0 deg facing the camera, 180 facing away,
    90 side on (angles from the geometry, not the generator)."""
    cam = scene.Camera("cam01", "01", np.array([5.0, 1.0, 1.6]),
                       scene.look_at(np.array([5.0, 1.0, 1.6]), np.array([5.0, 5.0, 1.6])),
                       1000.0, (1224.0, 1024.0), (2448, 2048))
    mouths = np.array([[5.0, 4.0, 1.6], [5.05, 6.0, 1.6], [7.0, 4.0, 1.6]])
    plan = _plan_of(mouths, [-90.0, 90.0, 0.0])  # towards the camera, away, side on
    u, v, depth = labels.project_talkers(plan, [cam])
    visible, yaw = labels.visibility(plan, [cam], u, v, depth, occlusion_px=120.0)
    assert visible.shape == yaw.shape == (1, 3, 3)
    np.testing.assert_array_equal(visible[0, :, 0], [True, False, True])
    facing = np.array([[0.0, -1.0], [0.0, 1.0], [1.0, 0.0]])
    to_cam = cam.position_m[:2] - mouths[:, :2]
    cosine = np.sum(facing * to_cam, axis=1) / np.linalg.norm(to_cam, axis=1)
    np.testing.assert_allclose(yaw[0, :, 0], np.degrees(np.arccos(cosine)), atol=1e-9)
    assert yaw[0, 0, 0] < 1e-9 and yaw[0, 1, 0] > 179 and 90 < yaw[0, 2, 0] < 180


def test_simulated_detector_picks_the_most_confident_detected_talker():
    width = 1000
    u_px = np.array([[[100.0], [500.0], [900.0]]])  # (C=1, K=3, F=1)
    visible = np.ones((1, 3, 1), bool)
    yaw = np.array([[[10.0], [10.0], [80.0]]])  # talker 3 turned away
    params = config.DetectorParams(score_noise_std=0.0, score_noise_frames=2.0, smooth_frames=1,
                                   jitter_px=0.0, max_yaw_deg=60.0)
    no_jitter = np.zeros((1, 3, 1))

    def detect(active, score_noise):
        return labels.simulate_detector(np.array(active, float)[:, None], u_px, visible, yaw,
                                        (np.array(score_noise, float)[None, :, None], no_jitter),
                                        params, width)

    x, speaking = detect([1, 1, 1], [-0.3, 0.1, 0.5])  # scores 0.7, 1.1 and (undetected) 1.5
    assert speaking[0, 0] and x[0, 0] == pytest.approx(0.5)
    x, speaking = detect([1, 1, 0], [-0.3, -0.45, 0.0])  # 0.7 and 0.55: the first wins
    assert speaking[0, 0] and x[0, 0] == pytest.approx(0.1)
    x, speaking = detect([1, 0, 1], [-0.55, 0.45, 0.0])  # 0.45 and 0.45: nobody above 0.5
    assert not speaking[0, 0] and x[0, 0] == labels.NO_SPEAKER_X


def test_speaker_x_is_clipped_to_the_image():
    u = np.array([[-50.0, 1200.0, 3000.0], [10.0, 20.0, 30.0]])  # (K=2, F=3) px
    speaking = np.array([[True, True, True], [True, False, False]])
    np.testing.assert_allclose(labels.speaker_x(u, speaking, 2448), [0.0, 1200 / 2448, 1.0])
    np.testing.assert_allclose(labels.speaker_x(u, ~speaking, 2448), [1.0, 20 / 2448, 30 / 2448])


def test_detector_noise_is_stationary_ar1():
    """Unit variance from the first frame on (started in the stationary distribution), lag-1
    correlation exp(-1 / frames), scaled by the detector's std and jitter."""
    params = config.DetectorParams(score_noise_std=0.5, score_noise_frames=2.0, smooth_frames=1,
                                   jitter_px=10.0, max_yaw_deg=60.0)
    score, jitter = labels.detector_noise(np.random.default_rng(0), (20000, 1, 6), params)
    np.testing.assert_allclose(score.std(axis=0)[0], 0.5, rtol=0.03)
    np.testing.assert_allclose(jitter.std(axis=0)[0], 10.0, rtol=0.03)
    lag1 = np.mean(score[..., 1:] * score[..., :-1], axis=0) / 0.25
    np.testing.assert_allclose(lag1[0], np.exp(-1 / 2.0), atol=0.03)


def test_energy_vad_is_the_thresholded_band_energy_with_hangover():
    """Every frame against the documented rule, computed here with a plain loop: band-passed
    energy per 1/30 s frame above max(10th percentile + threshold, 95th percentile - range),
    active while such a frame lies within the last `hangover` frames. Two signals: bursts over
    a noise floor (the floor sets the threshold), and digital silence with loud speech and a
    quiet tail 50 dB down (the range sets it: the tail is not speech)."""
    n_frames, per = 90, FS // 30
    rng = np.random.default_rng(1)
    t = np.arange(n_frames * per) / FS
    tone = np.sin(2 * np.pi * 700 * t)
    noisy = 1e-3 * rng.normal(size=n_frames * per)
    for start, length in ((10, 12), (40, 1), (60, 5), (70, 3)):
        noisy[start * per:(start + length) * per] += rng.uniform(0.05, 0.3) * tone[:length * per]
    silent = np.zeros(n_frames * per)
    silent[20 * per:35 * per] = 0.5 * tone[:15 * per]
    silent[35 * per:45 * per] = 0.5 * 10 ** (-50 / 20) * tone[:10 * per]
    sos = scipy.signal.butter(4, (100.0, 4000.0), btype="bandpass", fs=FS, output="sos")
    for x in (noisy, silent):
        band = scipy.signal.sosfiltfilt(sos, x)
        energy = np.array([10 * np.log10(np.mean(band[f * per:(f + 1) * per] ** 2) + 1e-20)
                           for f in range(n_frames)])
        threshold = max(np.percentile(energy, 10) + 12.0, np.percentile(energy, 95) - 35.0)
        raw = energy > threshold
        for hangover in (0, 3, 8):
            vad = labels.energy_vad(x, n_frames, FS, (100.0, 4000.0), 12.0, 35.0, hangover)
            expected = [raw[max(0, f - hangover):f + 1].any() for f in range(n_frames)]
            np.testing.assert_array_equal(vad, expected, err_msg=f"hangover {hangover}")
    assert not raw[37:45].any()  # the tail, 50 dB down


def test_highpass_is_scipys_sosfiltfilt():
    """`render.highpass` is sosfiltfilt with the sections' steady states in closed form (scipy
    solves for them with LAPACK, whose last bits depend on the BLAS kernel). pyroomacoustics'
    10 Hz filter at 48 kHz has poles next to 1: an ill-conditioned steady state, so the two
    agree to ~1e-11 relative there, to rounding elsewhere."""
    import pyroomacoustics as pra
    rng = np.random.default_rng(5)
    x = rng.normal(size=4000)
    x[:300] = 0.0  # an RIR starts with silence
    for sos in (scipy.signal.butter(6, 0.2, btype="high", output="sos"),
                scipy.signal.cheby1(5, 1.0, 0.3, output="sos")):
        np.testing.assert_allclose(render.highpass(x, sos), scipy.signal.sosfiltfilt(sos, x), atol=1e-12)
    sos = pra.utilities.design_highpass_filter_sos(FS, pra.constants.get("rir_hpf_fc"),
                                                   **pra.constants.get("rir_hpf_kwargs"))
    np.testing.assert_allclose(render.highpass(x, sos), scipy.signal.sosfiltfilt(sos, x), atol=1e-9)
    with pytest.raises(ValueError, match=r"rir of 9 samples: expected more than 9"):
        render.highpass(x[:9], sos)


def test_reverberant_image_is_the_linear_convolution():
    rng = np.random.default_rng(2)
    signal, rirs = rng.normal(size=1000), rng.normal(size=(301, 3))
    image = render.reverberant_image(signal, rirs)
    assert image.shape == (1300, 3)
    for m in range(3):
        np.testing.assert_allclose(image[:, m], np.convolve(signal, rirs[:, m]), atol=1e-9)


def test_diffuse_noise_is_pink_and_stationary():
    """Power spectral density ~ 1/f above 50 Hz (-10 dB per decade), and the same power in
    every part of the signal (the square-root Hann frames overlap-add to a constant)."""
    mics = scene.make_rigs(SynthConfig())[0].mics_m[:2]
    noise = render.diffuse_noise(np.random.default_rng(3), mics, 8 * FS)
    f, p = scipy.signal.welch(noise[:, 0], fs=FS, nperseg=4096)
    for lo, hi in ((200, 2000), (1000, 10000)):
        ratio = p[(f > 0.9 * lo) & (f < 1.1 * lo)].mean() / p[(f > 0.9 * hi) & (f < 1.1 * hi)].mean()
        assert ratio == pytest.approx(10.0, rel=0.2), (lo, hi)
    power = np.mean(noise.reshape(-1, 128, 2) ** 2, axis=(0, 2))  # by position within 128 samples
    np.testing.assert_allclose(power, 1.0, rtol=0.05)


@pytest.mark.parametrize("level_db", [0.0, -6.0, 4.0])
def test_speech_level_follows_the_voice(level_db):
    voice = speech.Voice(f0_hz=200.0, formant_scale=1.15, level_db=level_db)
    x = speech.synthesize_utterance(np.random.default_rng(1), voice, FS // 2)
    assert np.sqrt(np.mean(x ** 2)) == pytest.approx(0.1 * 10 ** (level_db / 20), rel=1e-9)


def test_sequences_are_seeded_by_name_and_normalised_to_the_peak_level():
    """Different names draw different streams; the PCM of both rigs peaks at peak_dbfs over
    all 32 microphones (one gain); the noise added at snr_db has that power ratio to the
    reverberant speech over the speaking samples (noise = same sequence minus its noiseless
    version, both taken back to the simulation's scale with their own recorded gains)."""
    from asd_jax.data.synthetic import sequence
    a = np.random.default_rng(sequence.sequence_seed(0, "conversation1_t1")).integers(1 << 62)
    b = np.random.default_rng(sequence.sequence_seed(0, "conversation1_t2")).integers(1 << 62)
    assert a != b
    noisy_cfg, clean_cfg = SynthConfig(max_order=1, snr_db=20.0), SynthConfig(max_order=1, snr_db=None)
    rigs = scene.make_rigs(noisy_cfg)
    noisy = sequence.simulate_sequence("femalemonologue1_t1", 2.0, 4, noisy_cfg, rigs)
    clean = sequence.simulate_sequence("femalemonologue1_t1", 2.0, 4, clean_cfg, rigs)
    for seq, cfg in ((noisy, noisy_cfg), (clean, clean_cfg)):
        peak = max(np.abs(pcm.astype(np.int64)).max() for pcm in seq.audio.values())
        assert abs(peak - 10 ** (cfg.peak_dbfs / 20) * 32768) <= 1
    t = np.arange(len(clean.audio["01"])) / FS
    speaking = clean.plan.activity(t).any(axis=0)
    assert 0.2 < speaking.mean() < 1.0
    for rig in ("01", "02"):
        speech_part = clean.audio[rig] / (32768 * clean.gain)
        noise_part = noisy.audio[rig] / (32768 * noisy.gain) - speech_part
        snr = 10 * np.log10(np.mean(speech_part[speaking] ** 2) / np.mean(noise_part ** 2))
        assert snr == pytest.approx(20.0, abs=0.3), rig


def test_times_and_lengths_are_written_as_the_reference_writes_them(reference_dir):
    """Row times as in the released forward files ("0", "0.03", "1", "1.1": 2 decimals, shortest
    form); sequence lengths as in the real seq_lengths.json (seconds truncated to 3 decimals;
    two of its entries are rounded to 2 instead, which we do not reproduce)."""
    from asd_jax.data.synthetic import writer
    with open(reference_dir / "released" / "ASC" / "test_forward.csv", newline="") as f:
        rows = list(csv.reader(f))[1:]
    first = [r[1] for r in rows if r[0] == rows[0][0]]
    assert [writer.format_time(i) for i in range(len(first))] == first
    lengths = json.loads((reference_dir / "seq_lengths.json").read_text())
    odd = {"femalemonologue1_t4", "interactive3_t1"}
    for name, length in lengths.items():
        if name not in odd:
            assert writer.format_length(int(round(float(length) * 30))) == length, name


def test_minus_infinite_snr_is_refused():
    from asd_jax.data.synthetic import writer
    with pytest.raises(ValueError, match="snr_db=-inf: expected a finite level in dB"):
        writer.check_arguments(1, 0, 4.0, 0, float("-inf"))
    assert writer.check_arguments(1, 0, 4.0, 0, float("inf")).snr_db is None


def test_room_acoustics_follow_sabine_with_the_order_capped():
    """Energy absorption from Sabine's formula, RT60 = 24 ln(10) V / (c S a); the image-source
    order reaching c * RT60 (distance over the smallest room diagonal radius), capped."""
    room, rt60, c = (10.0, 8.0, 4.0), 0.4, 343.0
    volume, surface = 320.0, 2 * (80.0 + 40.0 + 32.0)
    absorption, order = render.room_acoustics(room, rt60, 1000)
    assert absorption == pytest.approx(24 * np.log(10) * volume / (c * surface * rt60), rel=2e-3)
    radius = min(a * b / np.hypot(a, b) for a, b in ((10, 8), (10, 4), (8, 4)))
    assert order == int(np.ceil(c * rt60 / radius - 1)) > 3
    assert render.room_acoustics(room, rt60, 3) == (absorption, 3)
