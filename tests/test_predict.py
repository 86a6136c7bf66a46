"""Predict on a recording: rows and times of SPEC section 8, the dataset path, WAV layouts,
resampling, streaming, and every bad input with its message (nothing written)."""

import json
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pyroomacoustics as pra
import pytest
from absl import app
import scipy.signal
import soundfile as sf

from asd_jax import atomic
from asd_jax import checkpointing
from asd_jax import constants
from asd_jax import evaluation
from asd_jax import features as features_lib
from asd_jax import forward
from asd_jax import predict
from asd_jax import scaler as scaler_lib
from asd_jax.data.tragictalkers import TragicTalkers
from asd_jax.model import CRNN, init_variables, model_config
import experiments

SECONDS = 7.3
RATE = constants.SAMPLE_RATE_HZ
TINY = dict(conv_features=(4, 4, 4, 4), gru_hidden=4, gru_layers=1, fc1_features=4)
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _simulate(seconds: float, rate: int, seed: int = 0) -> np.ndarray:
    """A talker-like source (noise bursts at a syllable rate) in a shoebox room, heard by a
    16-mic planar array: (n, 16) float32, n = round(seconds * rate)."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * rate))
    envelope = np.clip(np.sin(2 * np.pi * 4 * np.arange(n) / rate), 0, None) ** 2
    source = rng.standard_normal(n) * envelope
    room = pra.ShoeBox([6.0, 5.0, 3.0], fs=rate, max_order=1, materials=pra.Material(0.5))
    room.add_source([2.0, 3.5, 1.6], signal=source)
    grid = np.stack(np.meshgrid(np.arange(4), np.arange(4)), -1).reshape(-1, 2) * 0.05
    mics = np.stack([3.0 + grid[:, 0], np.full(16, 1.0), 1.2 + grid[:, 1]])
    room.add_microphone_array(mics)
    room.simulate()
    audio = room.mic_array.signals.T[:n]
    audio = np.pad(audio, ((0, n - len(audio)), (0, 0)))
    return (0.5 * audio / np.abs(audio).max()).astype(np.float32)


@pytest.fixture(scope="module")
def audio() -> np.ndarray:
    return _simulate(SECONDS, RATE)


@pytest.fixture(scope="module")
def files(tmp_path_factory, audio):
    """The same recording as one 16-channel float WAV and as 16 mono float WAVs."""
    folder = tmp_path_factory.mktemp("recording")
    multi = folder / "array.wav"
    sf.write(multi, audio, RATE, subtype="FLOAT")
    mono = []
    for m in range(16):
        path = folder / f"{m + 1:02d}_mic.wav"
        sf.write(path, audio[:, m], RATE, subtype="FLOAT")
        mono.append(path)
    return multi, mono


def _tiny_checkpoint(directory: pathlib.Path, features: str = "gcc_phat", seed: int = 0):
    model = CRNN(**TINY)
    channels = features_lib.num_channels(features)
    variables = init_variables(jax.random.key(seed), model, channels)
    rng = np.random.default_rng(seed)
    scaler = scaler_lib.Scaler(
        rng.normal(0, 1, (constants.N_FEATURE_BINS, channels)).astype(np.float32),
        rng.uniform(0.5, 2, (constants.N_FEATURE_BINS, channels)).astype(np.float32))
    config = {"features": features, "model": model_config(model), "in_channels": channels}
    checkpointing.save_model(directory, variables, config, scaler)
    return model, variables, scaler


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt") / "model"
    model, variables, scaler = _tiny_checkpoint(directory)
    return directory, model, variables, scaler


@pytest.fixture(scope="module")
def predictor(checkpoint):
    return predict.load_predictor(checkpoint[0])


@pytest.fixture(scope="module")
def rows(predictor, files):
    return predict.predict(predictor, predict.Recording([files[0]]), camera=3, batch_size=2)


def test_rows_and_times_follow_spec_section_8(rows):
    # SPEC section 8, literally: chunks every 2 s, frames t/30, rounded, kept while < length.
    expected = [round(start + t / 30, 2) for start in range(0, 8, 2) for t in range(60)
                if round(start + t / 30, 2) < round(SECONDS, 2)]
    assert len(expected) == 219 == len(rows.times)
    np.testing.assert_array_equal(rows.times, expected)
    assert rows.x.dtype == rows.confidence.dtype == np.float32
    assert ((rows.x > 0) & (rows.x < 1) & (rows.confidence > 0) & (rows.confidence < 1)).all()


def _reference_rows(audio, checkpoint, camera):
    """(219, 2) rows of `audio` for `camera` (1..11) by an independent path: numpy chunking and
    normalisation, and the PyTorch transcription of the CRNN (tests/torch_reference.py) loaded
    with the checkpoint's weights, chunk by chunk. The features are `features.compute`'s (tested
    against numpy and librosa in test_features)."""
    import torch_reference

    _, model, variables, scaler = checkpoint
    padded = np.zeros((4 * constants.CHUNK_SAMPLES, 16), np.float32)
    padded[:len(audio)] = audio
    cams = np.eye(11, dtype=np.float32)[camera - 1][None]
    outputs = []
    for k in range(4):
        chunk = padded[k * constants.CHUNK_SAMPLES:(k + 1) * constants.CHUNK_SAMPLES]
        feats = np.asarray(features_lib.compute("gcc_phat", chunk[None]))
        normalised = (feats.astype(np.float64) - scaler.mean) / scaler.std
        outputs.append(torch_reference.outputs_with_flax_weights(
            variables, normalised.astype(np.float32), cams, train=False, pooling=model.pooling)[0])
    return np.concatenate(outputs)[:219]


def test_equals_a_chunk_by_chunk_forward_of_the_model(rows, audio, checkpoint):
    expected = _reference_rows(audio, checkpoint, camera=3)
    np.testing.assert_allclose(rows.x, expected[:, 0], atol=2e-6)
    np.testing.assert_allclose(rows.confidence, expected[:, 1], atol=2e-6)


def test_equals_the_forward_pass_through_the_dataset_path(rows, files, checkpoint, tmp_path):
    """A tiny TragicTalkers tree holding the recording as test sequence `seqA`, rig 01; predict on
    that sequence's (symlinked) mono files names its rows after their folder, as the forward file
    names them."""
    root = tmp_path / "root"
    (root / "TragicTalkers" / "audio" / "development").mkdir(parents=True)
    seq_dir = root / "TragicTalkers" / "audio" / "test" / "seqA"
    seq_dir.mkdir(parents=True)
    for path in files[1]:
        (seq_dir / path.name).symlink_to(path)
    (root / "csv").mkdir()
    (root / "csv" / "seq_lengths.json").write_text(json.dumps({"seqA": str(SECONDS)}))
    frames = int(round(SECONDS * 30))
    index_rows = [f"seqA-{cam},{round(f / 30, 2)}" for cam in ("cam01", "cam03")
                  for f in range(frames)]
    (root / "csv" / "test_forward.csv").write_text("name,time\n" + "\n".join(index_rows) + "\n")

    dataset = TragicTalkers(root)
    index, outputs = forward.predict_test_set(predict.load_predictor(checkpoint[0]), dataset,
                                              batch_size=3)
    all_rows = list(forward.forward_rows(index, outputs, dataset.seq_lengths()))
    forward_rows = [r for r in all_rows if r[0] == "seqA-cam03"]
    assert len(forward_rows) == len(rows.times) == 219
    np.testing.assert_array_equal([r[1] for r in forward_rows], rows.times)
    np.testing.assert_allclose([r[2] for r in forward_rows], rows.x, atol=1e-6)
    np.testing.assert_allclose([r[3] for r in forward_rows], rows.confidence, atol=1e-6)

    out = tmp_path / "both.csv"
    predict.predict_to_csv(checkpoint[0], sorted(seq_dir.iterdir()), [1, 3], out, batch_size=4)
    predicted = evaluation.read_forward_csv(out)
    for name in ("seqA-cam01", "seqA-cam03"):
        expected = np.array([r[1:] for r in all_rows if r[0] == name])
        keep = predicted.names == name.encode()
        np.testing.assert_array_equal(predicted.time_s[keep], expected[:, 0])
        np.testing.assert_allclose(predicted.x[keep], expected[:, 1], atol=1e-6)
        np.testing.assert_allclose(predicted.confidence[keep], expected[:, 2], atol=1e-6)


def test_the_last_row_is_below_the_duration_rounded_to_10_ms(predictor, tmp_path):
    """48192 samples last 1.004 s: rows are kept while time < round(1.004, 2) = 1.0 (SPEC
    section 8), so frame 30 (time 1.0) of chunk 0 is not, though 1.0 < 1.004."""
    samples = 48192
    path = tmp_path / "rec.wav"
    sf.write(path, np.zeros((samples, 16), np.float32), RATE, subtype="FLOAT")
    expected = [round(t / 30, 2) for t in range(60) if round(t / 30, 2) < round(samples / RATE, 2)]
    got = predict.predict(predictor, predict.Recording([path]), camera=1)
    np.testing.assert_array_equal(got.times, expected)


def test_mono_files_equal_one_multichannel_file(predictor, files, rows):
    mono = predict.predict(predictor, predict.Recording(files[1]), camera=3, batch_size=2)
    for a, b in zip(mono, rows):
        np.testing.assert_array_equal(a, b)


def test_batch_size_does_not_change_the_rows(predictor, files, rows):
    for batch_size in (1, 8):  # 8 > 4 chunks: one batch of 4
        other = predict.predict(predictor, predict.Recording([files[0]]), 3, batch_size)
        np.testing.assert_array_equal(other.times, rows.times)
        np.testing.assert_allclose(other.x, rows.x, atol=1e-6)
        np.testing.assert_allclose(other.confidence, rows.confidence, atol=1e-6)


def test_short_recordings_share_a_few_batch_shapes(predictor, audio, rows, tmp_path, monkeypatch):
    # 1..8 chunks at batch_size 8 -> calls of 1, 2, 4, 4, 8, 8, 8, 8 chunks: four programs,
    # not eight, and never more chunks computed than twice the recording's.
    assert [predict.padded_batch_size(n, 8) for n in range(1, 10)] == [1, 2, 4, 4, 8, 8, 8, 8, 8]
    assert [predict.padded_batch_size(n, 6) for n in (1, 3, 5, 7)] == [1, 4, 6, 6]
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        predict.padded_batch_size(3, 0)
    # The recording of `rows` (4 chunks, 2 at a time there) cut to its first 3 chunks: one
    # call of 4 chunks, the padding chunk's rows dropped, the 3 chunks' rows those of the whole
    # recording.
    path = tmp_path / "three_chunks.wav"
    sf.write(path, audio[:6 * RATE], RATE, subtype="FLOAT")
    shapes = []
    real = predict.predict_batch
    monkeypatch.setattr(predict, "predict_batch",
                        lambda variables, scaler, audio, **kw: (shapes.append(audio.shape[0]),
                                                                real(variables, scaler, audio, **kw))[1])
    short = predict.predict(predictor, predict.Recording([path]), camera=3, batch_size=8)
    assert shapes == [4]
    kept = rows.times < 6.0
    np.testing.assert_array_equal(short.times, rows.times[kept])
    np.testing.assert_allclose(short.x, rows.x[kept], atol=1e-6)
    np.testing.assert_allclose(short.confidence, rows.confidence[kept], atol=1e-6)


def test_reads_stream_one_batch_at_a_time(predictor, files):
    recording = predict.Recording([files[0]])
    ranges = []
    read = recording.read
    recording.read = lambda start, stop: ranges.append((start, stop)) or read(start, stop)
    predict.predict(predictor, recording, camera=1, batch_size=3)
    chunk = constants.CHUNK_SAMPLES
    assert ranges == [(0, 3 * chunk), (3 * chunk, 4 * chunk)]


def test_44k_recording_needs_resample(predictor, tmp_path):
    audio44 = _simulate(SECONDS, 44_100, seed=1)
    path = tmp_path / "rec44.wav"
    sf.write(path, audio44, 44_100, subtype="FLOAT")
    with pytest.raises(ValueError, match=r"rec44.wav is sampled at 44100 Hz, expected 48000 Hz; "
                                         r"pass --resample"):
        predict.Recording([path])
    resampled = predict.predict(predictor, predict.Recording([path], resample=True), 3, 2)
    # Reference: scipy's polyphase resampling of the whole file, then a 48 kHz recording.
    whole = scipy.signal.resample_poly(audio44, 160, 147, axis=0).astype(np.float32)
    assert len(whole) == int(SECONDS * RATE)
    sf.write(tmp_path / "rec48.wav", whole, RATE, subtype="FLOAT")
    direct = predict.predict(predictor, predict.Recording([tmp_path / "rec48.wav"]), 3, 2)
    assert len(resampled.times) == 219
    for a, b in zip(resampled, direct):
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("rate", [44_100, 16_000, 96_000])
def test_block_resampling_equals_whole_file_resampling(tmp_path, rate):
    rng = np.random.default_rng(rate)
    audio = rng.uniform(-0.5, 0.5, (int(2.3 * rate), 16)).astype(np.float32)
    sf.write(tmp_path / "x.wav", audio, rate, subtype="FLOAT")
    recording = predict.Recording([tmp_path / "x.wav"], resample=True)
    g = np.gcd(RATE, rate)
    whole = scipy.signal.resample_poly(audio, RATE // g, rate // g, axis=0).astype(np.float32)
    assert recording.num_samples == len(whole)
    for start, stop in [(0, 96_000), (96_000, 192_000), (12_345, 54_321), (100_000, 130_000)]:
        expected = np.zeros((stop - start, 16), np.float32)
        inside = whole[start:stop]
        expected[:len(inside)] = inside
        np.testing.assert_allclose(recording.read(start, stop), expected, atol=1e-6)


def test_csv_file(predictor, files, rows, checkpoint, tmp_path):
    out = tmp_path / "rows.csv"
    count = predict.predict_to_csv(checkpoint[0], [files[0]], 3, out, batch_size=2,
                                   image_width=2448)
    lines = out.read_text().splitlines()
    assert count == 219 == len(lines) - 1
    assert lines[0] == "time,predicted x,confidence,x_px"
    values = np.array([[float(v) for v in line.split(",")] for line in lines[1:]])
    np.testing.assert_array_equal(values[:, 0], rows.times)
    np.testing.assert_allclose(values[:, 1], rows.x, rtol=1e-6)
    np.testing.assert_allclose(values[:, 2], rows.confidence, rtol=1e-6)
    np.testing.assert_allclose(values[:, 3], rows.x * 2448, atol=0.006)
    assert lines[1].split(",")[0] == "0" and lines[2].split(",")[0] == "0.03"
    back = predict.read_csv(out)
    np.testing.assert_array_equal(back.times, rows.times)
    np.testing.assert_allclose(back.x, rows.x, rtol=1e-6)
    assert [p.name for p in tmp_path.iterdir()] == ["rows.csv"]


def _wav(path, channels, seconds=0.5, rate=RATE):
    sf.write(path, np.zeros((int(seconds * rate), channels), np.float32), rate, subtype="FLOAT")
    return path


@pytest.mark.parametrize("channels", [8, 17])
def test_wrong_channel_count(checkpoint, tmp_path, channels):
    path = _wav(tmp_path / "rec.wav", channels)
    with pytest.raises(ValueError, match=rf"rec.wav has {channels} channel\(s\), expected 16"):
        predict.predict_to_csv(checkpoint[0], [path], 1, tmp_path / "out.csv")
    assert not (tmp_path / "out.csv").exists()


def test_wrong_number_of_files(checkpoint, tmp_path):
    paths = [_wav(tmp_path / f"{m:02d}.wav", 1) for m in range(15)]
    with pytest.raises(ValueError, match="expected one 16-channel WAV file or 16 mono WAV files "
                                         "in microphone order, got 15 files"):
        predict.predict_to_csv(checkpoint[0], paths, 1, tmp_path / "out.csv")
    mono = _wav(tmp_path / "mic01.wav", 1)
    with pytest.raises(ValueError, match=r"mic01.wav has 1 channel\(s\), expected 16 \(the audio "
                                         r"must be one 16-channel file, or 16 mono files"):
        predict.predict_to_csv(checkpoint[0], [mono], 1, tmp_path / "out.csv")
    paths.append(_wav(tmp_path / "stereo.wav", 2))
    with pytest.raises(ValueError, match=r"stereo.wav has 2 channel\(s\), expected 1"):
        predict.predict_to_csv(checkpoint[0], paths, 1, tmp_path / "out.csv")
    assert not (tmp_path / "out.csv").exists()


def test_mismatched_mono_lengths(checkpoint, tmp_path):
    paths = [_wav(tmp_path / f"{m:02d}.wav", 1) for m in range(15)]
    paths.append(_wav(tmp_path / "short.wav", 1, seconds=0.4))
    with pytest.raises(ValueError, match=r"different lengths: \S*short.wav: 19200 samples, while "
                                         r"the other 15 have 24000 samples$"):
        predict.predict_to_csv(checkpoint[0], paths, 1, tmp_path / "out.csv")
    assert not (tmp_path / "out.csv").exists()


def test_mismatched_mono_sample_rates(checkpoint, tmp_path):
    """One file at 44.1 kHz among 48 kHz ones, all of the same number of samples."""
    paths = [_wav(tmp_path / f"{m:02d}.wav", 1) for m in range(16)]
    sf.write(paths[6], np.zeros((24000, 1), np.float32), 44_100, subtype="FLOAT")
    with pytest.raises(ValueError, match=r"different sample rates: \S*06.wav: 44100 Hz, while the "
                                         r"other 15 have 48000 Hz$"):
        predict.predict_to_csv(checkpoint[0], paths, 1, tmp_path / "out.csv")
    assert not (tmp_path / "out.csv").exists()


def test_empty_recording(checkpoint, tmp_path):
    path = _wav(tmp_path / "empty.wav", 16, seconds=0)
    with pytest.raises(ValueError, match="empty.wav holds no samples"):
        predict.predict_to_csv(checkpoint[0], [path], 1, tmp_path / "out.csv")


@pytest.mark.parametrize("samples", [1, 239])
def test_recording_too_short_for_one_row(checkpoint, tmp_path, samples):
    """Under 5 ms the rounded duration is 0 s and no row is kept: an error, not an empty file."""
    path = _wav(tmp_path / "click.wav", 16, seconds=samples / RATE)
    with pytest.raises(ValueError, match=rf"click.wav lasts {samples} samples at {RATE} Hz, which "
                                         r"gives no row .*expected at least 5 ms"):
        predict.predict_to_csv(checkpoint[0], [path], 1, tmp_path / "out.csv")
    assert not (tmp_path / "out.csv").exists()


def test_recording_of_5_ms_gives_one_row(checkpoint, tmp_path):
    path = _wav(tmp_path / "click.wav", 16, seconds=240 / RATE)
    assert predict.predict_to_csv(checkpoint[0], [path], 1, tmp_path / "out.csv") == 1


@pytest.mark.parametrize("camera", [0, 12, -1])
def test_camera_outside_1_to_11(checkpoint, files, tmp_path, camera):
    with pytest.raises(ValueError, match=rf"camera {camera} is outside 1-11"):
        predict.predict_to_csv(checkpoint[0], [files[0]], camera, tmp_path / "out.csv")
    assert not (tmp_path / "out.csv").exists()


def test_a_finished_workdir_whose_export_was_cut_short_still_loads(checkpoint, tmp_path):
    """A training workdir (checkpoints/ beside the model) whose model/ is still in a committed
    staging folder, as a save killed after its commit leaves it: load_model reads it, so
    predict does too (not "the run has not finished")."""
    _, _, variables, _ = checkpoint
    workdir = tmp_path / "run"
    _tiny_checkpoint(workdir)
    (workdir / "checkpoints").mkdir()
    staging = workdir / f"{checkpointing.STAGING_PREFIX}cut"
    staging.mkdir()
    (workdir / constants.MODEL_DIR).rename(staging / constants.MODEL_DIR)
    (workdir / checkpointing.COMMIT_NAME).write_text(staging.name)
    assert checkpointing.has_model(workdir) and not (workdir / constants.MODEL_DIR).exists()
    predictor = predict.load_predictor(workdir)
    for a, b in zip(jax.tree.leaves(predictor.variables), jax.tree.leaves(variables), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("image_width", [0, -2448])
def test_image_width_below_one_pixel(checkpoint, files, tmp_path, image_width):
    with pytest.raises(ValueError, match=rf"image_width must be a positive number of pixels, got "
                                         rf"{image_width}"):
        predict.predict_to_csv(checkpoint[0], [files[0]], 1, tmp_path / "out.csv",
                               image_width=image_width)
    assert not (tmp_path / "out.csv").exists()


def test_checkpoint_of_another_feature_type(checkpoint, files, tmp_path):
    with pytest.raises(ValueError, match="trained on 'gcc_phat' features, but 'salsa_lite' were "
                                         "requested"):
        predict.predict_to_csv(checkpoint[0], [files[0]], 1, tmp_path / "out.csv",
                               features="salsa_lite")
    assert not (tmp_path / "out.csv").exists()


def test_model_directory_whose_channels_are_not_its_features_is_refused_at_loading(tmp_path):
    """A gcc_phat config with in_channels=4 loaded, and its first inference failed inside Flax
    (ScopeParamShapeError, naming no file)."""
    model = CRNN(**TINY)
    checkpointing.save_model(tmp_path / "m", init_variables(jax.random.key(0), model, 4),
                             {"features": "gcc_phat", "model": model_config(model), "in_channels": 4})
    scaler = tmp_path / "s.h5"
    scaler_lib.save_scaler(scaler, scaler_lib.Scaler(np.zeros((constants.N_FEATURE_BINS, 16), np.float32),
                                                     np.ones((constants.N_FEATURE_BINS, 16), np.float32)))
    with pytest.raises(ValueError, match=re.escape(
            f"model directory {tmp_path / 'm'}: config.json says features 'gcc_phat' with in_channels "
            "4, but gcc_phat features have 16 channels (expected in_channels 16): the CRNN cannot "
            "take them")):
        predict.load_predictor(tmp_path / "m", scaler_path=scaler)


def test_a_scaler_of_other_features_is_refused(checkpoint, tmp_path):
    """A salsa_lite scaler has the shape of a gcc_phat one: only the feature type it records
    tells them apart."""
    other = tmp_path / "feature_scaler.h5"
    scaler_lib.save_scaler(other, checkpoint[3], "salsa_lite")
    with pytest.raises(ValueError, match=rf"feature scaler {re.escape(str(other))} was computed from "
                                         r"'salsa_lite' features, but 'gcc_phat' features are used here"):
        predict.load_predictor(checkpoint[0], scaler_path=other)


def test_missing_output_directory(checkpoint, files, tmp_path):
    with pytest.raises(FileNotFoundError, match="output directory .*nowhere does not exist"):
        predict.predict_to_csv(checkpoint[0], [files[0]], 1, tmp_path / "nowhere" / "out.csv")


def test_output_path_that_is_a_directory_is_refused_before_reading(checkpoint, files, tmp_path,
                                                                  monkeypatch):
    """It failed after the whole run, naming the hidden temporary file."""
    monkeypatch.setattr(predict, "Recording", lambda *a, **k: pytest.fail("audio was read"))
    with pytest.raises(IsADirectoryError) as error:
        predict.predict_to_csv(checkpoint[0], [files[0]], 1, tmp_path)
    assert experiments.error_message(error.value) == (f"{tmp_path}: is a directory; expected the "
                                                      "path of a file to write")


def test_an_output_that_is_an_input_is_refused_before_reading(checkpoint, files, tmp_path, monkeypatch):
    """It replaced the recording (or the scaler) with the CSV; by any spelling of the path."""
    monkeypatch.setattr(predict, "Recording", lambda *a, **k: pytest.fail("audio was read"))
    audio = tmp_path / "take.wav"
    audio.write_bytes(pathlib.Path(files[0]).read_bytes())
    (tmp_path / "link.wav").symlink_to(audio)
    scaler = tmp_path / "scaler.h5"
    scaler.write_bytes(b"scaler")
    for out in (audio, tmp_path / "link.wav", tmp_path / "sub" / ".." / "take.wav"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        with pytest.raises(ValueError, match=rf"output {re.escape(str(out))} is an input audio file "
                                             rf".*take\.wav: writing it would replace its input"):
            predict.predict_to_csv(checkpoint[0], [audio], 1, out)
    with pytest.raises(ValueError, match=r"scaler\.h5 is the feature scaler .*scaler\.h5"):
        predict.predict_to_csv(checkpoint[0], [audio], 1, scaler, scaler_path=scaler)
    assert audio.read_bytes() == pathlib.Path(files[0]).read_bytes() and scaler.read_bytes() == b"scaler"


def test_an_output_over_the_checkpoints_own_files_is_refused_before_reading(checkpoint, files, tmp_path,
                                                                             monkeypatch):
    """The CSV replaced the model directory's feature_scaler.h5 (or config.json) after the model
    had been loaded from it: the run succeeded and the model directory was broken. A file beside
    the model is still allowed."""
    import shutil
    model_dir = tmp_path / "m"
    shutil.copytree(checkpoint[0], model_dir)
    kept = {p: p.read_bytes() for p in model_dir.rglob("*") if p.is_file()}
    (tmp_path / "link.h5").symlink_to(model_dir / "feature_scaler.h5")
    monkeypatch.setattr(predict, "Recording", lambda *a, **k: pytest.fail("audio was read"))
    for out, named in ((model_dir / "feature_scaler.h5", "the checkpoint's feature_scaler.h5"),
                       (tmp_path / "link.h5", "the checkpoint's feature_scaler.h5"),
                       (model_dir / "config.json", "the checkpoint's config.json")):
        with pytest.raises(ValueError, match=rf"output {re.escape(str(out))} is {named} "
                                             r".*: writing it would replace its input"):
            predict.predict_to_csv(model_dir, [files[0]], 1, out)
    inside = model_dir / "model" / "rows.csv"
    with pytest.raises(ValueError, match=rf"output {re.escape(str(inside))} is inside the "
                                         r"checkpoint's .*/m/model: writing there would change"):
        predict.predict_to_csv(model_dir, [files[0]], 1, inside)
    assert {p: p.read_bytes() for p in model_dir.rglob("*") if p.is_file()} == kept
    monkeypatch.undo()
    assert predict.predict_to_csv(model_dir, [files[0]], 1, model_dir / "rows.csv") > 0


def test_an_output_over_a_training_checkpoints_files_is_refused(tmp_path):
    """A step directory <workdir>/checkpoints/<step> is read with its workdir's config.json and
    scaler, and its run resumes with the workdir's metrics.jsonl: those, and anything inside the
    step directory, are refused; the workdir's other files are not."""
    workdir = tmp_path / "run"
    step = workdir / "checkpoints" / "7"
    (step / "state").mkdir(parents=True)
    for name in ("config.json", "feature_scaler.h5", "metrics.jsonl"):
        (workdir / name).write_text("kept")
    for out in (workdir / "config.json", workdir / "feature_scaler.h5", workdir / "metrics.jsonl"):
        with pytest.raises(ValueError, match=rf"is the checkpoint's {out.name} "):
            predict.refuse_checkpoint_files(out, step)
    with pytest.raises(ValueError, match=r"is inside the checkpoint's .*/checkpoints/7"):
        predict.refuse_checkpoint_files(step / "state" / "rows.csv", step)
    predict.refuse_checkpoint_files(workdir / "rows.csv", step)
    predict.refuse_checkpoint_files(workdir / "checkpoints" / "rows.csv", step)  # beside the steps


def test_an_output_inside_model_is_refused_by_any_spelling(checkpoint, tmp_path, monkeypatch):
    """Through a symlinked folder, an absolute or relative checkpoint path, a symlinked model
    directory: the output's real folder is inside the real model/."""
    import shutil
    model_dir = tmp_path / "m"
    shutil.copytree(checkpoint[0], model_dir)
    (tmp_path / "alias").symlink_to(model_dir / "model")
    (tmp_path / "link").symlink_to(model_dir)
    monkeypatch.chdir(tmp_path)
    for out, given in ((tmp_path / "alias" / "r.csv", model_dir),
                       (pathlib.Path("m/model/r.csv"), model_dir.absolute()),
                       (model_dir / "model" / "r.csv", pathlib.Path("m")),
                       (model_dir / "model" / "r.csv", tmp_path / "link"),
                       (pathlib.Path("link/model/../model/r.csv"), pathlib.Path("m"))):
        with pytest.raises(ValueError, match=r"is inside the checkpoint's .*model: writing there"):
            predict.refuse_checkpoint_files(out, given)
    predict.refuse_checkpoint_files(pathlib.Path("link/r.csv"), model_dir)
    predict.refuse_checkpoint_files(pathlib.Path("m/model/../r.csv"), pathlib.Path("link"))


def test_scaler_that_is_not_hdf5_is_named(checkpoint, files, tmp_path):
    bad = tmp_path / "scaler.h5"
    bad.write_text("not HDF5")
    with pytest.raises(ValueError, match=r"feature scaler .*scaler\.h5 is not a readable HDF5 file"):
        predict.predict_to_csv(checkpoint[0], [files[0]], 1, tmp_path / "out.csv", scaler_path=bad)
    with pytest.raises(FileNotFoundError, match=r"feature scaler .*none\.h5 does not exist"):
        predict.predict_to_csv(checkpoint[0], [files[0]], 1, tmp_path / "out.csv",
                               scaler_path=tmp_path / "none.h5")
    assert not (tmp_path / "out.csv").exists()


def test_cli_wrapper_turns_user_errors_into_one_line(capsys):
    def fails(error):
        def main(argv):
            del argv
            raise error
        return experiments.cli(main)

    with pytest.raises(SystemExit) as exit_info:
        fails(FileNotFoundError(2, "No such file or directory", "x/forward.csv"))(["prog"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == "error: x/forward.csv: No such file or directory\n"
    with pytest.raises(SystemExit):
        fails(ValueError("camera 12 is outside 1-11"))(["prog"])
    assert capsys.readouterr().err == "error: camera 12 is outside 1-11\n"
    with pytest.raises(KeyError):  # a bug, not a user error: the traceback stays
        fails(KeyError("x"))(["prog"])
    # Ctrl-C ends the process it runs in: tests/test_interrupt.py runs it in subprocesses.
    with pytest.raises(SystemExit):  # flags that do not go together: one line, not the help
        fails(app.UsageError("give exactly one of --workdir and --checkpoint"))(["prog"])
    assert capsys.readouterr().err == ("error: give exactly one of --workdir and --checkpoint "
                                       "(--help lists the flags)\n")


def test_cli_wrapper_refuses_positional_arguments_unless_taken(capsys):
    """`predict ... rows.csv` ran and wrote predictions.csv, ignoring the stray path."""
    calls = []
    with pytest.raises(SystemExit) as exit_info:
        experiments.cli(calls.append)(["prog", "rows.csv"])
    assert exit_info.value.code == 1 and not calls
    assert capsys.readouterr().err == ("error: unexpected arguments ['rows.csv']: every input is a "
                                       "flag (--name=value) (--help lists the flags)\n")
    experiments.cli(calls.append, takes_arguments=True)(["prog", "a.json", "b.json"])
    assert calls == [["prog", "a.json", "b.json"]]


def test_flag_errors_are_one_line(tmp_path):
    """A missing required flag or an unparsable value: one `error:` line, exit status 1."""
    for args, message in ((["--audio=a.wav"], "flag --checkpoint=None: Flag --checkpoint must have "
                           "a value other than None.; flag --camera=None: Flag --camera must have a "
                           "value other than None. (--help lists the flags)"),
                          (["--checkpoint=x", "--audio=a.wav", "--camera=three"],
                           "--camera: cameras 'three': expected a camera 1..11, several comma-separated, "
                           "or 'all' (--help lists the flags)"),
                          (["--checkpoint=x", "--audio=a.wav", "--camera=3", "--name=take1"],
                           "name 'take1' names the rows of several cameras; one camera's CSV has no name "
                           "column")):
        result = subprocess.run([sys.executable, "-m", "experiments.predict", *args], cwd=REPO_ROOT,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 1
        assert result.stderr.strip().splitlines()[-1:] == [f"error: {message}"]


def test_command_line_error_is_one_line_naming_the_file(checkpoint, files, tmp_path):
    bad = tmp_path / "scaler.h5"
    bad.write_text("not HDF5")
    out = tmp_path / "cli.csv"
    result = subprocess.run([sys.executable, "-m", "experiments.predict",
                             f"--checkpoint={checkpoint[0]}", f"--audio={files[0]}", "--camera=3",
                             f"--scaler={bad}", f"--out_csv={out}"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "orbax" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"feature scaler {bad} is not a readable HDF5 file" in errors[0]
    assert not out.exists()


def test_audio_path_that_is_a_directory_is_named_as_one(tmp_path):
    """`--audio <a directory>` said `WAV file <dir> does not exist`."""
    folder = tmp_path / "uw"
    folder.mkdir()
    with pytest.raises(IsADirectoryError, match="is a directory, expected a WAV file"):
        predict.Recording([folder])
    out = tmp_path / "cli.csv"
    result = subprocess.run([sys.executable, "-m", "experiments.predict", f"--checkpoint={tmp_path}",
                             f"--audio={folder}", "--camera=1", f"--out_csv={out}"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1:] == [
        f"error: {folder}: is a directory, expected a WAV file"]
    assert not out.exists()

def test_command_line_features_flag_is_one_of_the_library_features(tmp_path):
    result = subprocess.run([sys.executable, "-m", "experiments.predict", f"--checkpoint={tmp_path}",
                             f"--audio={tmp_path / 'a.wav'}", "--camera=1", "--features=gcc"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "--features=gcc: value should be one of <" + "|".join(features_lib.FEATURES) + ">" in (
        result.stderr)


@pytest.mark.slow
def test_command_line(checkpoint, files, rows, tmp_path):
    out = tmp_path / "cli.csv"
    mono = ",".join(str(p) for p in files[1])
    subprocess.run([sys.executable, "-m", "experiments.predict", f"--checkpoint={checkpoint[0]}",
                    f"--audio={mono}", "--camera=3", "--rig=2", f"--out_csv={out}",
                    "--batch_size=4"], check=True, cwd=REPO_ROOT, capture_output=True)
    back = predict.read_csv(out)
    np.testing.assert_array_equal(back.times, rows.times)
    np.testing.assert_allclose(back.confidence, rows.confidence, rtol=1e-6)

    # Every camera of the rig in one pass: a forward file of 11 x 219 rows named <name>-camNN.
    out = tmp_path / "all.csv"
    subprocess.run([sys.executable, "-m", "experiments.predict", f"--checkpoint={checkpoint[0]}",
                    f"--audio={files[0]}", "--camera=all", "--name=take1", f"--out_csv={out}"],
                   check=True, cwd=REPO_ROOT, capture_output=True)
    forward_rows = evaluation.read_forward_csv(out)
    assert len(forward_rows.names) == 11 * 219
    assert sorted({n.decode() for n in forward_rows.names}) == [f"take1-cam{c:02d}" for c in range(1, 12)]
    back = predict.read_camera_rows(out, "take1-cam03")
    np.testing.assert_array_equal(back.times, rows.times)
    np.testing.assert_allclose(back.confidence, rows.confidence, atol=1e-6)


def test_several_cameras_in_one_pass_equal_the_reference_model_per_camera(predictor, files, rows, audio,
                                                                         checkpoint):
    together = predict.predict_cameras(predictor, predict.Recording([files[0]]), [3, 11, 1], batch_size=2)
    assert list(together) == [3, 11, 1]
    for camera, part in together.items():
        expected = _reference_rows(audio, checkpoint, camera)
        np.testing.assert_array_equal(part.times, rows.times)
        np.testing.assert_allclose(part.x, expected[:, 0], atol=2e-6)
        np.testing.assert_allclose(part.confidence, expected[:, 1], atol=2e-6)
    # The camera reaches the output: the three are not one prediction repeated.
    assert np.abs(together[1].x - together[3].x).max() > 1e-3
    assert np.abs(together[11].x - together[3].x).max() > 1e-3


def test_csv_of_several_cameras_is_a_forward_file(predictor, checkpoint, files, tmp_path):
    out = tmp_path / "rows.csv"
    count = predict.predict_to_csv(checkpoint[0], [files[0]], [3, 5], out, rig=2, batch_size=2)
    together = predict.predict_cameras(predictor, predict.Recording([files[0]]), [3, 5], batch_size=2)
    lines = out.read_text().splitlines()
    assert count == 2 * 219 == len(lines) - 1
    assert tuple(lines[0].split(",")) == evaluation.FORWARD_HEADER
    # Batch by batch (2 chunks = 120 rows), camera by camera; the name is the file's, rig 2's numbers.
    assert [line.split(",")[0] for line in lines[1:]][:241:120] == ["array-cam14", "array-cam16", "array-cam14"]
    # Written as the forward pass writes (float64 text of float32): read back exactly.
    for camera, name in ((3, "array-cam14"), (5, "array-cam16")):
        for a, b in zip(predict.read_camera_rows(out, name), together[camera]):
            np.testing.assert_array_equal(a, b)
    # 16 mono files: named after their folder (TragicTalkers keeps a sequence's files in one).
    predict.predict_to_csv(checkpoint[0], files[1], [1, 2], tmp_path / "mono.csv", batch_size=4)
    names = {n.decode() for n in evaluation.read_forward_csv(tmp_path / "mono.csv").names}
    assert names == {f"{files[1][0].parent.name}-cam01", f"{files[1][0].parent.name}-cam02"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mono.csv", "rows.csv"]


def test_parse_cameras():
    assert predict.parse_cameras("6") == 6
    assert predict.parse_cameras("11,1,6") == [11, 1, 6]
    assert predict.parse_cameras(" ALL ") == list(range(1, 12))
    for text in ("", "1,,2", "three", "1;2"):
        with pytest.raises(ValueError, match=rf"cameras {text!r}: expected a camera 1..11, several "
                                             r"comma-separated, or 'all'"):
            predict.parse_cameras(text)


@pytest.mark.parametrize("cameras, kwargs, message", [
    ([], {}, r"no camera to predict for: give at least one of 1-11"),
    ([3, 12], {}, r"camera 12 is outside 1-11"),
    ([3, 5, 3], {}, r"cameras \[3, 5, 3\] name \[3\] more than once"),
    ([3, 5], {"image_width": 2448}, r"image_width adds an x_px column to a one-camera CSV; the CSV of 2 cameras"),
    ([3, 5], {"name": " "}, r"name ' ' cannot name the rows"),
    ([3, 5], {"name": "a\nb"}, r"name 'a\\nb' cannot name the rows .* \(it has '\\n'\)"),
    ([3, 5], {"name": 'take 1, "b"'}, r"name 'take 1, \"b\"' cannot name the rows .* \(it has ',\"'\)"),
    (3, {"name": "take1"}, r"name 'take1' names the rows of several cameras"),
    ("1,6", {}, r"cameras '1,6': expected a sequence of camera numbers"),
    ([3, 5], {"rig": 3}, r"rig 3 is not 1 or 2"),
    (3, {"rig": 0}, r"rig 0 is not 1 or 2"),
])
def test_bad_cameras_name_or_rig_are_refused_before_writing(checkpoint, files, tmp_path, cameras, kwargs,
                                                           message):
    with pytest.raises(ValueError, match=message):
        predict.predict_to_csv(checkpoint[0], [files[0]], cameras, tmp_path / "out.csv", **kwargs)
    assert not list(tmp_path.iterdir())


def test_read_camera_rows(tmp_path, rows, checkpoint, files):
    predict.write_csv(tmp_path / "p.csv", iter([rows]), image_width=100)
    assert b"\r" not in (tmp_path / "p.csv").read_bytes()  # LF line ends, as forward files
    back = predict.read_camera_rows(tmp_path / "p.csv", "ignored-cam01")
    np.testing.assert_array_equal(back.times, rows.times)
    np.testing.assert_allclose(back.confidence, rows.confidence, rtol=1e-6)

    forward_csv = tmp_path / "forward.csv"
    forward_csv.write_text("name,time,predicted x,confidence\n"
                           "s-cam01,0,0.1,0.9\ns-cam02,0,0.2,0.8\ns-cam01,0.03,0.3,0.7\n")
    picked = predict.read_camera_rows(forward_csv, "s-cam01")
    np.testing.assert_array_equal(picked.times, [0, 0.03])
    np.testing.assert_allclose(picked.x, [0.1, 0.3])
    np.testing.assert_allclose(picked.confidence, [0.9, 0.7])
    # Saved by a spreadsheet, with a UTF-8 byte order mark: the same rows, either kind of file.
    for path in (forward_csv, tmp_path / "p.csv"):
        bom = path.with_name("bom_" + path.name)
        bom.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
        for a, b in zip(predict.read_camera_rows(bom, "s-cam01"), predict.read_camera_rows(path, "s-cam01")):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="forward file of several cameras: give the camera"):
        predict.read_camera_rows(forward_csv)
    with pytest.raises(ValueError, match="no rows for 's-cam03'; it holds s-cam01, s-cam02"):
        predict.read_camera_rows(forward_csv, "s-cam03")
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match=r"bad.csv: header 'a,b', expected"):
        predict.read_camera_rows(tmp_path / "bad.csv")
    (tmp_path / "short.csv").write_text("time,predicted x,confidence\n0,0.5,0.5\n0.03,0.5\n")
    with pytest.raises(ValueError, match=r"short.csv:3: '0.03,0.5' are not three numbers"):
        predict.read_camera_rows(tmp_path / "short.csv")
    # Binary files: the header is quoted in a bounded excerpt, a later undecodable byte is named
    (tmp_path / "binary.csv").write_bytes(b"RIFF\x83\xff" + b"A" * 100_000 + b"\n")
    with pytest.raises(ValueError, match="binary.csv: header 'RIFF\ufffd\ufffdA{74}'[.][.][.], expected"):
        predict.read_camera_rows(tmp_path / "binary.csv")
    for good, expected in ((tmp_path / "p.csv", "a predict CSV"), (forward_csv, "a CSV file of the fields")):
        latin = good.with_name("latin_" + good.name)
        latin.write_bytes(good.read_bytes() + b"s-cam01,0.07,0.5,0.5 \xe9t\xe9\n")
        with pytest.raises(ValueError, match=rf"latin_{good.name}:\d+: not UTF-8 text \(byte 0xe9 at offset "
                                             rf"\d+\); expected {expected}"):
            predict.read_camera_rows(latin, "s-cam01")
    with pytest.raises(FileNotFoundError, match="forward or predict CSV .*none.csv does not exist"):
        predict.read_camera_rows(tmp_path / "none.csv")


def test_read_csv_refuses_another_header(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("time,x,confidence\n0,0.5,0.5\n")
    with pytest.raises(ValueError, match=r"other.csv: header 'time,x,confidence', expected "
                                         r"\('time', 'predicted x', 'confidence'\) first"):
        predict.read_csv(path)


def test_non_finite_sample(checkpoint, tmp_path):
    audio = np.zeros((100_000, 16), np.float32)
    audio[97_000, 4] = np.nan
    paths = []
    for m in range(16):
        paths.append(tmp_path / f"{m + 1:02d}.wav")
        sf.write(paths[-1], audio[:, m], RATE, subtype="FLOAT")
    with pytest.raises(ValueError, match=r"05.wav: non-finite sample at sample 97000 \(2\.0208 s at "
                                         r"48000 Hz\) of microphone 5"):
        predict.predict_to_csv(checkpoint[0], paths, 1, tmp_path / "out.csv")
    assert not (tmp_path / "out.csv").exists() and not atomic.leftovers(tmp_path / "out.csv")
    # Resampled, the file's own sample is named (resampling would smear it to earlier samples).
    multichannel = tmp_path / "44k.wav"
    audio_44k = np.zeros((100_000, 16), np.float32)
    audio_44k[44_100, 7] = np.inf
    sf.write(multichannel, audio_44k, 44_100, subtype="FLOAT")
    with pytest.raises(ValueError, match=r"44k.wav: non-finite sample at sample 44100 \(1\.0000 s at "
                                         r"44100 Hz\) of microphone 8"):
        predict.predict_to_csv(checkpoint[0], [multichannel], 1, tmp_path / "out.csv", resample=True)
    # Finite audio far beyond [-1, 1] overflows the features: an error, not rows of NaN.
    loud = np.random.default_rng(0).uniform(-1, 1, (100_000, 16)).astype(np.float32) * 1e20
    sf.write(multichannel, loud, RATE, subtype="FLOAT")
    with pytest.raises(ValueError, match=r"44k.wav: the model's outputs are not finite for the chunk "
                                         r"at 0 s; expected audio whose samples lie within about"):
        predict.predict_to_csv(checkpoint[0], [multichannel], [1, 2], tmp_path / "out.csv")
    assert not (tmp_path / "out.csv").exists() and not atomic.leftovers(tmp_path / "out.csv")


def test_inference_runs_the_crnn_at_full_float32_precision():
    """Convolutions and matrix products are lowered with HIGHEST precision whatever the global
    default, so GPUs (TF32 by default) reproduce the reference's outputs like the CPU does."""
    model = CRNN(conv_features=(4, 4), gru_hidden=4, gru_layers=1, fc1_features=4)
    variables = init_variables(jax.random.key(0), model, 16)
    scaler = scaler_lib.Scaler(np.zeros((64, 16), np.float32), np.ones((64, 16), np.float32))
    audio = np.zeros((1, constants.CHUNK_SAMPLES, constants.N_MICS), np.float32)
    with jax.default_matmul_precision("default"):
        # the one jitted function of predict and of the test-set forward pass
        text = predict.predict_batch.lower(variables, scaler, audio, model=model,
                                           feature_name="gcc_phat").as_text()
    convolutions = [line for line in text.splitlines() if "stablehlo.convolution" in line]
    assert len(convolutions) == 4  # two blocks of two 3x3 convolutions
    assert all("HIGHEST" in line for line in convolutions), convolutions[0]


# ------------------------------------------------------------------ added by the mutation audit


def test_camera_one_hot_and_name_follow_spec_section_1():
    """SPEC section 1: camera k of rig 1 (cam<k>) and camera k of rig 2 (cam<k + 11>) both take
    one-hot index k - 1 of 11."""
    for k in range(1, 12):
        expected = np.zeros(11, np.float32)
        expected[k - 1] = 1.0
        np.testing.assert_array_equal(predict.camera_one_hot(k), expected)
        assert predict.camera_name(k, 1) == f"cam{k:02d}"
        assert predict.camera_name(k, 2) == f"cam{k + 11:02d}"


def test_a_non_finite_sample_is_named_by_its_sample_in_the_file(tmp_path):
    """The sample named is the file's, also in a read that does not start at sample 0 (the
    second chunk) and at another rate, where the block read starts before the chunk."""
    audio = np.zeros((200_000, 16), np.float32)
    audio[150_000, 2] = np.nan
    sf.write(tmp_path / "rec.wav", audio, RATE, subtype="FLOAT")
    recording = predict.Recording([tmp_path / "rec.wav"])
    recording.read(0, 96_000)  # the first chunk is finite
    with pytest.raises(ValueError, match=r"rec.wav: non-finite sample at sample 150000 \(3\.1250 s at "
                                         r"48000 Hz\) of microphone 3"):
        recording.read(96_000, 192_000)
    audio_44k = np.zeros((200_000, 16), np.float32)
    audio_44k[100_000, 7] = np.inf  # 100000 / 44100 s = 2.2676 s: in the 48-kHz chunk [2 s, 4 s)
    sf.write(tmp_path / "rec44.wav", audio_44k, 44_100, subtype="FLOAT")
    recording = predict.Recording([tmp_path / "rec44.wav"], resample=True)
    with pytest.raises(ValueError, match=r"rec44.wav: non-finite sample at sample 100000 \(2\.2676 s at "
                                         r"44100 Hz\) of microphone 8"):
        recording.read(96_000, 192_000)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_non_finite_outputs_name_the_chunk_they_come_from(predictor, tmp_path, batch_size):
    """Silence, then audio far beyond [-1, 1] from 2 s on: the chunk named starts at 2 s (SPEC
    section 2's 2-s chunks), whether it is the first of its batch or not."""
    audio = np.zeros((150_000, 16), np.float32)
    audio[constants.CHUNK_SAMPLES:] = np.random.default_rng(0).uniform(
        -1, 1, (150_000 - constants.CHUNK_SAMPLES, 16)).astype(np.float32) * 1e20
    sf.write(tmp_path / "loud.wav", audio, RATE, subtype="FLOAT")
    with pytest.raises(ValueError, match=r"loud.wav: the model's outputs are not finite for the chunk "
                                         r"at 2 s;"):
        predict.predict(predictor, predict.Recording([tmp_path / "loud.wav"]), 1, batch_size)


def test_a_scaler_given_with_a_model_directory_replaces_its_own(checkpoint, tmp_path):
    """scaler_path overrides the model directory's feature_scaler.h5 (its values are the ones
    used), and one of another channel count is refused, naming it."""
    own = checkpoint[3]
    other = scaler_lib.Scaler(own.mean + np.float32(10), own.std * np.float32(3))
    scaler_lib.save_scaler(tmp_path / "other.h5", other, "gcc_phat")
    loaded = predict.load_predictor(checkpoint[0], scaler_path=tmp_path / "other.h5")
    np.testing.assert_array_equal(np.asarray(loaded.scaler.mean), other.mean)
    np.testing.assert_array_equal(np.asarray(loaded.scaler.std), other.std)
    narrow = tmp_path / "narrow.h5"
    scaler_lib.save_scaler(narrow, scaler_lib.Scaler(np.zeros((64, 7), np.float32),
                                                     np.ones((64, 7), np.float32)), "gcc_phat")
    with pytest.raises(ValueError, match=re.escape(f"feature scaler {narrow} has shape (64, 7) (bins, "
                                                   "channels), expected (64, 16) for 'gcc_phat'")):
        predict.load_predictor(checkpoint[0], scaler_path=narrow)


def test_batch_size_below_one_is_refused_before_the_model_is_loaded(checkpoint, files, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setattr(predict, "load_predictor", lambda *a, **k: pytest.fail("the model was loaded"))
    for camera in (3, [3, 5]):
        with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
            predict.predict_to_csv(checkpoint[0], [files[0]], camera, tmp_path / "out.csv", batch_size=0)
    assert not list(tmp_path.iterdir())


def test_a_name_with_a_carriage_return_is_refused(checkpoint, files, tmp_path):
    """A CR is a line break to CSV readers, as LF is."""
    with pytest.raises(ValueError, match=r"name 'take\\r1' cannot name the rows .* \(it has '\\r'\)"):
        predict.predict_to_csv(checkpoint[0], [files[0]], [3, 5], tmp_path / "out.csv", name="take\r1")
    assert not list(tmp_path.iterdir())
