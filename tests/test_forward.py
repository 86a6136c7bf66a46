"""The test-set forward pass (SPEC section 8) on a small synthetic TragicTalkers tree."""

import csv
import json
import pathlib
import re
import shutil
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asd_jax import checkpointing, constants, evaluation, features, forward, scaler as scaler_lib
from asd_jax.data.tragictalkers import TragicTalkers
from asd_jax.training import checkpoints, configs, state as state_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
MICRO = {"conv_features": (4, 4, 8, 8), "gru_hidden": 4, "gru_layers": 1, "fc1_features": 4,
         "num_cameras": 11, "pooling": "avg"}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from asd_jax.data.synthetic.writer import synthesize
    # One test sequence of 2.5-3 s: two chunks per camera, the second cut by the length rule.
    return synthesize(tmp_path_factory.mktemp("synthetic") / "tt", num_dev=0, num_test=1,
                      seconds=3.0, seed=1, max_order=2)


@pytest.fixture(scope="module")
def torch_model_dir(tmp_path_factory):
    """A model directory made by the converter from a (micro) PyTorch reference model."""
    import torch_reference
    from converters import torch_to_flax

    torch_model = torch_reference.randomize_(torch_reference.TorchCRNN(16, **MICRO), seed=5).eval()
    sd = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    rng = np.random.default_rng(0)
    scaler = scaler_lib.Scaler(rng.normal(size=(64, 16)).astype(np.float32),
                               rng.uniform(1, 3, size=(64, 16)).astype(np.float32))
    directory = tmp_path_factory.mktemp("converted")
    checkpointing.save_model(directory, torch_to_flax.convert(sd, **MICRO),
                             {"features": "gcc_phat", "in_channels": 16, "model": MICRO}, scaler)
    return directory, torch_model, scaler


def _read(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def _expected_rows_per_camera(data_root):
    """Frames f (video frames from 0) with round(f / 30, 2) < round(length, 2), per camera name."""
    lengths = {k: float(v) for k, v in json.loads((data_root / "csv/seq_lengths.json").read_text()).items()}
    _, index_rows = _read(data_root / "csv/test_forward.csv")
    names = sorted({r[0] for r in index_rows})
    expected = {}
    for name in names:
        length = round(lengths[name.rpartition("-")[0]], 2)
        expected[name] = sum(1 for f in range(int(length * 30) + 60) if round(f / 30, 2) < length)
    return expected, lengths


def test_forward_csv_rows_times_and_values(data_root, torch_model_dir, tmp_path):
    import torch
    model_dir, torch_model, scaler = torch_model_dir
    out = tmp_path / "test_forward.csv"
    count = forward.forward(model_dir, data_root, out, batch_size=3)
    header, rows = _read(out)
    assert header == ["name", "time", "predicted x", "confidence"]
    assert count == len(rows)

    expected, lengths = _expected_rows_per_camera(data_root)
    got_counts = {}
    for name, *_ in rows:
        got_counts[name] = got_counts.get(name, 0) + 1
    assert got_counts == expected
    assert len(expected) == 22
    # Times: round(start + t/30, 2), spelt as the reference ("0", "0.03", "1", "2.1").
    for name in expected:
        times = [r[1] for r in rows if r[0] == name]
        frames = range(len(times))
        assert times == [f"{round(f / 30, 2):.2f}".rstrip("0").rstrip(".") for f in frames]
    # The rows follow the test index (name, time) order of csv/test_forward.csv.
    _, index_rows = _read(data_root / "csv/test_forward.csv")
    assert [r[:2] for r in rows] == [r[:2] for r in index_rows]

    # Values: the PyTorch model on our features of chunk 0 (0 s, 60 rows) and chunk 1 (starting
    # at 2 s, cut by the length) for a camera of each rig. batch_size 3 puts three of the four
    # audio chunks (2 rigs x 2 starts) in one call, the fourth in a call of its own. The micro
    # model's outputs vary little with the audio (~5e-5 between chunks), so the tolerance is the
    # float32 agreement of the two implementations (~1e-7 measured), not a looser one.
    dataset = TragicTalkers(data_root)
    sequence = next(iter(lengths))
    atol = 2e-6
    wants = {}
    for camera, rig in (("cam03", "01"), ("cam20", "02")):
        for start in (0.0, 2.0):
            audio = dataset.load_chunk_audio("test", sequence, rig, start)
            feats = np.asarray(scaler_lib.normalise(features.compute("gcc_phat", audio[None]), scaler))
            cam = np.zeros((1, 1, 11), np.float32)
            cam[0, 0, int(camera[3:]) - 1 - (11 if rig == "02" else 0)] = 1
            with torch.no_grad():
                want = torch_model(torch.tensor(feats).permute(0, 3, 1, 2), torch.tensor(cam))[0].numpy()
            got = np.array([[float(r[2]), float(r[3])] for r in rows
                            if r[0] == f"{sequence}-{camera}" and start <= float(r[1]) < start + 2])
            assert (len(got) == 60) if start == 0.0 else (0 < len(got) < 60)
            np.testing.assert_allclose(got, want[:len(got)], rtol=0, atol=atol)
            wants[rig, start] = want
    # the check tells the chunks apart: another chunk's rows would be well outside the tolerance
    assert np.abs(wants["01", 0.0] - wants["02", 0.0]).max() > 10 * atol
    assert np.abs(wants["01", 0.0] - wants["01", 2.0]).max() > 10 * atol


def _index(names, starts):
    """The fields of a test ChunkIndex that `forward_rows` reads, one example per (name, start)."""
    names = np.array(names)
    return types.SimpleNamespace(name=names, sequence=np.array([n.rpartition("-")[0] for n in names]),
                                 start_time=np.array(starts, np.float64))


def test_forward_rows_give_the_released_name_and_time_columns(reference_dir, tmp_path):
    """SPEC section 8's row rule, from the test chunks (every 2 s while start < length), spells the
    name and time columns of a released forward file exactly."""
    released = (reference_dir / "released" / "ASCs" / "test_forward.csv").read_text().splitlines()
    lengths = {k: float(v) for k, v in json.loads((reference_dir / "seq_lengths.json").read_text()).items()}
    cameras = list(dict.fromkeys(line.split(",")[0] for line in released[1:]))
    examples = [(name, start) for name in cameras
                for start in np.arange(0.0, round(lengths[name.rpartition("-")[0]], 2), 2.0)]
    index = _index(*zip(*examples))
    outputs = np.zeros((len(examples), 60, 2), np.float32)
    out = tmp_path / "test_forward.csv"
    forward.write_forward_csv(out, forward.forward_rows(index, outputs, lengths))
    ours = out.read_text().splitlines()
    assert ours[0] == released[0]
    assert b"\r" not in out.read_bytes()  # LF line ends, as the released file's
    assert [line.split(",")[:2] for line in ours[1:]] == [line.split(",")[:2] for line in released[1:]]


def test_camera_table_refuses_two_examples_of_one_chunk_and_camera():
    """Each (audio chunk, camera) slot holds one example; a second would leave the first without
    outputs (written as zeros), so the table refuses it."""
    from asd_jax.data.tragictalkers import AudioKey, ChunkIndex

    cameras = np.array(["cam01", "cam02", "cam01", "cam01"])
    starts = np.array([0.0, 0.0, 2.0, 0.0])
    index = ChunkIndex("test", np.char.add("s-", cameras), np.array(["s"] * 4), cameras, starts,
                       np.array([0, 0, 1, 0]), (AudioKey("s", "01", 0.0), AudioKey("s", "01", 2.0)))
    with pytest.raises(ValueError, match=r"test examples 0 and 3 are the same chunk \(s-cam01 at 0 s\)"):
        forward.camera_table(index)
    table = forward.camera_table(index.subset(np.arange(3)))
    assert table.shape == (2, 11)
    assert table[0, :3].tolist() == [0, 1, -1] and table[1, :2].tolist() == [2, -1]


def test_forward_file_reads_back_as_the_float32_outputs(tmp_path):
    """The written text is float(float32) (the reference's float(tensor)), so evaluating the file
    is evaluating the outputs: float64 of every float32 value, exactly."""
    outputs = np.random.default_rng(0).uniform(size=(2, 60, 2)).astype(np.float32)
    outputs[0, :3] = [[0.0, 1.0], [1.0, 0.0], [np.float32(0.1), np.float32(0.5)]]
    # float32's shortest text reads back as another float64: the old format would fail below
    assert any(float(str(v)) != float(v) for v in outputs.reshape(-1))
    out = tmp_path / "test_forward.csv"
    count = forward.write_forward_csv(out, forward.forward_rows(_index(["s_t1-cam01"] * 2, [0, 2]),
                                                                outputs, {"s_t1": 4.0}))
    back = evaluation.read_forward_csv(out)
    assert count == 120 == back.x.shape[0]
    np.testing.assert_array_equal(back.x, outputs[..., 0].reshape(-1).astype(np.float64))
    np.testing.assert_array_equal(back.confidence, outputs[..., 1].reshape(-1).astype(np.float64))


def test_sequence_lengths_are_checked_before_the_pass(data_root, tmp_path, monkeypatch):
    sequence = str(TragicTalkers(data_root).test_chunks().sequence[0])

    def no_pass(*args, **kwargs):
        raise AssertionError("the test-set pass started")

    monkeypatch.setattr(forward, "predict_test_set", no_pass)
    out = tmp_path / "out.csv"
    for lengths, match in (({sequence: float("nan")}, rf"lengths \{{'{sequence}': nan\}}"),
                           ({sequence: 0.004}, r"expected finite seconds >= 0.005"),
                           ({}, rf"seq_lengths.json has no length for \['{sequence}'\]")):
        monkeypatch.setattr(TragicTalkers, "seq_lengths", lambda self, lengths=lengths: lengths)
        with pytest.raises(ValueError, match=match):
            forward.forward(tmp_path / "missing_model", data_root, out)
        assert not out.exists()
    # forward_rows itself (also used by the baselines) refuses rather than writing no rows
    with pytest.raises(ValueError, match=r"lengths \{'s_t1': nan\}"):
        list(forward.forward_rows(_index(["s_t1-cam01"], [0]), np.zeros((1, 60, 2), np.float32),
                                  {"s_t1": float("nan")}))


def test_unfinished_training_workdir_is_refused(data_root, tmp_path):
    workdir = tmp_path / "run"
    (workdir / checkpoints.CHECKPOINT_SUBDIR).mkdir(parents=True)
    out = tmp_path / "out.csv"
    with pytest.raises(FileNotFoundError, match=r"training workdir .*run has no exported final model "
                       r".*run/model\): its run has not finished.*holds none yet"):
        forward.forward(workdir, data_root, out)
    (workdir / checkpoints.CHECKPOINT_SUBDIR / "250" / "state").mkdir(parents=True)
    (workdir / checkpoints.CHECKPOINT_SUBDIR / "1750" / "state").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"has not finished\. Finish it by running the same "
                       r"training command .* its latest is .*run/checkpoints/1750$"):
        forward.forward(workdir, data_root, out)
    assert not out.exists()


@pytest.mark.slow
def test_forward_from_training_checkpoint_and_binary(data_root, torch_model_dir, tmp_path):
    """A per-step training checkpoint gives the same file as the model directory holding the same
    variables (its workdir, not finished, is refused); the binary writes it too."""
    model_dir, _, scaler = torch_model_dir
    variables, _, _ = checkpointing.load_model(model_dir)
    workdir = tmp_path / "run"
    workdir.mkdir()
    config = configs.tiny().replace(model=dict(MICRO))
    (workdir / constants.CONFIG_FILE).write_text(json.dumps({**config.to_dict(), "in_channels": 16}))
    scaler_lib.save_scaler(workdir / constants.SCALER_FILE, scaler)
    tx = state_lib.create_optimizer(1e-3)
    state = state_lib.create_train_state(jax.random.PRNGKey(0), variables, tx)
    state = state.replace(step=jnp.asarray(7, jnp.int32))
    manager = checkpoints.open_manager(workdir / checkpoints.CHECKPOINT_SUBDIR, 2)
    step_dir = checkpoints.save(manager, state, {"epoch": 2, "batch": 3, "loss_sum": 0.0, "num_examples": 0})
    manager.close()

    reference = tmp_path / "from_model_dir.csv"
    forward.forward(model_dir, data_root, reference)
    from_step = tmp_path / "from_step.csv"
    forward.forward(step_dir, data_root, from_step)
    assert from_step.read_text() == reference.read_text()
    # predict loads checkpoints the same way (one loader for both)
    from asd_jax import predict
    predictor = predict.load_predictor(step_dir, features="gcc_phat")
    for a, b in zip(jax.tree.leaves(predictor.variables), jax.tree.leaves(variables), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(FileNotFoundError, match=rf"has not finished.*its latest is {step_dir}$"):
        forward.forward(workdir, data_root, tmp_path / "from_workdir.csv")
    # The step directory's scaler is checked as load_predictor checks a model directory's.
    wrong = tmp_path / "wrong_scaler.h5"
    scaler_lib.save_scaler(wrong, scaler_lib.Scaler(np.zeros((64, 7), np.float32),
                                                    np.ones((64, 7), np.float32)))
    with pytest.raises(ValueError, match=r"wrong_scaler.h5 of training checkpoint .* has shape "
                       r"\(64, 7\) \(bins, channels\), expected \(64, 16\) for 'gcc_phat'"):
        forward.forward(step_dir, data_root, tmp_path / "wrong.csv", scaler_path=wrong)

    # The binary on a finished workdir (its model/ exported) takes the data root of its config.json.
    (workdir / constants.CONFIG_FILE).write_text(json.dumps(
        {**config.replace(data_root=str(data_root)).to_dict(), "in_channels": 16}))
    shutil.copytree(model_dir / constants.MODEL_DIR, workdir / constants.MODEL_DIR)
    from_binary = tmp_path / "from_binary.csv"
    result = subprocess.run([sys.executable, "-m", "experiments.forward", f"--workdir={workdir}",
                             f"--out_csv={from_binary}"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"data root {data_root} (from {workdir / constants.CONFIG_FILE})" in result.stderr
    assert from_binary.read_text() == reference.read_text()
    # A model directory records no data root: --data_root is asked for, in one line.
    result = subprocess.run([sys.executable, "-m", "experiments.forward", f"--checkpoint={model_dir}",
                             f"--out_csv={tmp_path / 'none.csv'}"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and not (tmp_path / "none.csv").exists()
    assert result.stderr.splitlines()[-1].startswith("error: give --data_root (with --workdir it ")


def test_batch_size_below_one_is_refused(data_root, torch_model_dir, tmp_path):
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        forward.forward(torch_model_dir[0], data_root, tmp_path / "out.csv", batch_size=0)
    assert not (tmp_path / "out.csv").exists()


def test_forward_errors(data_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint .*missing does not exist"):
        forward.forward(tmp_path / "missing", data_root, tmp_path / "out.csv")
    # a file, e.g. the reference's PyTorch checkpoint: says to convert it
    (tmp_path / "model_050.ckpt").write_bytes(b"PK")
    with pytest.raises(FileNotFoundError, match=r"model_050.ckpt is a file; expected a model directory.*"
                       r"must be converted first: python -m converters.torch_to_flax --torch_ckpt "):
        forward.forward(tmp_path / "model_050.ckpt", data_root, tmp_path / "out.csv")
    with pytest.raises(FileNotFoundError, match="output directory"):
        forward.forward(tmp_path, data_root, tmp_path / "no" / "out.csv")
    with pytest.raises(IsADirectoryError, match="expected the path of a file to write"):
        forward.forward(tmp_path, data_root, tmp_path)
    assert not (tmp_path / "out.csv").exists()
    # the default --out_csv, test_forward.csv, run from the data root's csv folder: its test index
    index = pathlib.Path(data_root) / "csv" / "test_forward.csv"
    before = index.read_bytes()
    with pytest.raises(ValueError, match=r"test_forward\.csv is the data root's test index"):
        forward.forward(tmp_path, data_root, index)
    with pytest.raises(ValueError, match=r"seq_lengths\.json is the data root's sequence lengths"):
        forward.forward(tmp_path, data_root, index.parent / "seq_lengths.json")
    assert index.read_bytes() == before


def test_workdir_data_root_is_the_one_its_config_records(tmp_path):
    """A training workdir's config.json gives the data root (a relative one as written)."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps(
        {**configs.tiny().replace(data_root="/data/tt").to_dict(), "in_channels": 16}))
    assert forward.workdir_data_root(workdir) == "/data/tt"
    assert forward.workdir_data_root(str(workdir)) == "/data/tt"
    (workdir / "config.json").write_text(json.dumps(
        {**configs.tiny().replace(data_root="data/tt").to_dict(), "in_channels": 16}))
    assert forward.workdir_data_root(workdir) == "data/tt"
    assert forward.workdir_config(workdir) == workdir / "config.json"


def test_workdir_data_root_names_a_missing_or_foreign_workdir_or_a_store_only_run(tmp_path):
    """No folder, a folder without config.json (a data root, a store) and a run trained from an
    HDF5 store alone (no data root recorded): each error names the path and what to give."""
    missing = tmp_path / "none"
    with pytest.raises(FileNotFoundError, match=rf"^training workdir {missing} does not exist$"):
        forward.workdir_data_root(missing)
    foreign = tmp_path / "data"
    foreign.mkdir()
    (foreign / "feature_scaler.h5").write_bytes(b"a store's scaler")
    with pytest.raises(FileNotFoundError, match=rf"^{foreign} is not a training workdir: it holds no "
                       r"config\.json \(a model directory or a training checkpoint goes to "
                       r"--checkpoint\)$"):
        forward.workdir_data_root(foreign)
    store_only = tmp_path / "store_run"
    store_only.mkdir()
    (store_only / "config.json").write_text(json.dumps(
        {**configs.tiny().replace(hdf5_dir="/data/store").to_dict(), "in_channels": 16}))
    with pytest.raises(ValueError, match=rf"^{store_only / 'config.json'} records no data root \(the "
                       r"run trained from an HDF5 store alone\): give the TragicTalkers data root "
                       r"\(--data_root\)$"):
        forward.workdir_data_root(store_only)
    # A config.json that is not a training config is named as such.
    (foreign / "config.json").write_text("[]")
    with pytest.raises(ValueError, match=rf"config file {foreign / 'config.json'} must hold a JSON "
                       "object"):
        forward.workdir_data_root(foreign)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "store_run"]  # nothing written


def test_binary_names_a_workdir_that_is_missing_or_not_a_workdir(data_root, tmp_path):
    """`--workdir` of no folder, or of a folder without config.json (e.g. a data root), says so;
    it used to ask for --data_root, or report the data root instead. A run trained from a store
    alone, given no --data_root, names its config.json."""
    for workdir, message in ((tmp_path / "none", f"training workdir {tmp_path / 'none'} does not exist"),
                             (data_root, f"{data_root} is not a training workdir: it holds no "
                                         "config.json")):
        result = subprocess.run([sys.executable, "-m", "experiments.forward", f"--workdir={workdir}",
                                 f"--data_root={data_root}", f"--out_csv={tmp_path / 'out.csv'}"],
                                cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode == 1
        assert result.stderr.strip().splitlines()[-1].startswith(f"error: {message}"), result.stderr[-2000:]
    # A run trained from an HDF5 store alone records no data root: --data_root is asked for.
    store_only = tmp_path / "store_run"
    store_only.mkdir()
    (store_only / "config.json").write_text(json.dumps(
        {**configs.tiny().replace(hdf5_dir=str(tmp_path)).to_dict(), "in_channels": 16}))
    result = subprocess.run([sys.executable, "-m", "experiments.forward", f"--workdir={store_only}",
                             f"--out_csv={tmp_path / 'out.csv'}"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {store_only / 'config.json'} records no data root (the run trained from an HDF5 "
        "store alone): give the TragicTalkers data root (--data_root)"), result.stderr[-2000:]
    assert not (tmp_path / "out.csv").exists()


def test_forward_refuses_to_write_over_the_scaler_it_reads(data_root, torch_model_dir, tmp_path,
                                                           monkeypatch):
    """--out_csv naming the --scaler file (by any spelling) is refused before the pass, and the
    scaler is left as it was."""
    model_dir, _, scaler = torch_model_dir
    path = tmp_path / "feature_scaler.h5"
    scaler_lib.save_scaler(path, scaler, "gcc_phat")
    (tmp_path / "link.h5").symlink_to(path)
    before = path.read_bytes()

    def no_pass(*args, **kwargs):
        raise AssertionError("the test-set pass started")

    monkeypatch.setattr(forward, "predict_test_set", no_pass)
    for out in (path, tmp_path / "link.h5"):
        with pytest.raises(ValueError, match=rf"output {re.escape(str(out))} is the feature scaler "
                                             rf".*feature_scaler\.h5: writing it would replace its input"):
            forward.forward(model_dir, data_root, out, scaler_path=path)
    assert path.read_bytes() == before


def test_forward_refuses_to_write_over_its_models_own_scaler(data_root, torch_model_dir, tmp_path,
                                                              monkeypatch):
    """--out_csv naming the model directory's own feature_scaler.h5 was loaded, then overwritten
    by the CSV: refused before the pass now, the model directory left as it was."""
    import shutil
    model_dir = tmp_path / "m"
    shutil.copytree(torch_model_dir[0], model_dir)
    before = (model_dir / "feature_scaler.h5").read_bytes()
    monkeypatch.setattr(forward, "predict_test_set",
                        lambda *a, **k: pytest.fail("the test-set pass started"))
    out = model_dir / "feature_scaler.h5"
    with pytest.raises(ValueError, match=rf"output {re.escape(str(out))} is the checkpoint's "
                                         r"feature_scaler\.h5 .*: writing it would replace its input"):
        forward.forward(model_dir, data_root, out)
    assert (model_dir / "feature_scaler.h5").read_bytes() == before
