"""Exact resume: a training run killed with SIGKILL mid-epoch and started again with the same
command ends with the parameters of an uninterrupted run (tiny model, synthetic data, CPU: on
GPU only up to floating-point nondeterminism, see asd_jax.training.loop). A workdir whose
checkpoint lies past a new, smaller num_epochs is refused."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from asd_jax import checkpointing
from asd_jax import constants
from asd_jax.training import configs, loop

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
MICRO_MODEL = {"conv_features": (4, 4, 8, 8), "gru_hidden": 4, "gru_layers": 1,
               "fc1_features": 4, "num_cameras": 11, "pooling": "avg"}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from asd_jax.data.synthetic.writer import synthesize
    return synthesize(tmp_path_factory.mktemp("synthetic") / "tt", num_dev=1, num_test=1,
                      seconds=2.0, seed=0, max_order=2)


def _config(data_root):
    # 44 examples (2 chunk starts x 22 cameras), batch 4: 11 steps an epoch.
    return configs.tiny().replace(data_root=str(data_root), model=dict(MICRO_MODEL), num_epochs=2,
                                  batch_size=4, checkpoint_every_steps=4, prefetch=1)


@pytest.fixture(scope="module")
def uninterrupted(data_root, tmp_path_factory):
    """The run directory of `_config`'s run, trained without interruption."""
    reference_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    loop.train_and_evaluate(_config(data_root), reference_dir)
    return reference_dir


def _assert_same_run(workdir, reference_dir):
    """The same model, config and per-epoch loss and learning rate."""
    expected, expected_config, _ = checkpointing.load_model(reference_dir)
    got, got_config, _ = checkpointing.load_model(workdir)
    assert got_config == expected_config
    jax.tree.map(np.testing.assert_array_equal, got, expected)
    assert _rows(workdir) == _rows(reference_dir)
    assert [r["epoch"] for r in _rows(workdir)] == [1, 2]


def _rows(workdir):
    return [{k: r[k] for k in ("epoch", "train_loss", "learning_rate")}
            for r in map(json.loads, (workdir / constants.METRICS_FILE).read_text().splitlines())]


def _wait_for(proc, condition, what, timeout=240.0):
    """Polls `condition()` while `proc` (stderr piped, text) runs; fails the test if it ends or
    `timeout` seconds pass first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"training ended before {what}: {proc.stderr.read()[-3000:]}")
        if time.monotonic() >= deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


def _train_command(config_json, workdir):
    return [sys.executable, "-m", "experiments.train", f"--config_json={config_json}",
            f"--workdir={workdir}"]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(data_root, uninterrupted, tmp_path):
    config = _config(data_root)
    config_json = tmp_path / "config.json"
    config_json.write_text(json.dumps(config.to_dict()))
    reference_dir = uninterrupted

    workdir = tmp_path / "killed"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    # Step 16 is batch 5 of epoch 2 (11 steps an epoch); kill as soon as it is on disk.
    marker = workdir / "checkpoints" / "16"
    proc = subprocess.Popen(_train_command(config_json, workdir), cwd=REPO_ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with proc:  # closes the stderr pipe, and waits for the process, at the end
        _wait_for(proc, marker.is_dir, "the step-16 checkpoint")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (workdir / constants.MODEL_DIR).exists(), "the run finished before the kill"
    done = [json.loads(line) for line in (workdir / constants.METRICS_FILE).read_text().splitlines()]
    assert [row["epoch"] for row in done] == [1], "the kill must land in epoch 2"

    # Fewer epochs than the killed run reached: refused before anything is written (the
    # checkpoint is some batches into epoch 2, past the end of a 1-epoch run).
    written = {p: p.stat().st_mtime_ns for p in workdir.iterdir() if p.is_file()}
    with pytest.raises(ValueError, match=r"checkpoints/\d+ \(step \d+\) is at \d+ batches into epoch 2, "
                                         r"past the end of a run of num_epochs=1: set num_epochs >= 2"):
        loop.train_and_evaluate(config.replace(num_epochs=1), workdir)
    assert {p: p.stat().st_mtime_ns for p in workdir.iterdir() if p.is_file()} == written
    assert json.loads((workdir / constants.CONFIG_FILE).read_text())["num_epochs"] == 2

    result = subprocess.run(_train_command(config_json, workdir), cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stderr

    _assert_same_run(workdir, reference_dir)

    # The finished run again with num_epochs=2 re-exports it; with num_epochs=1 it is refused.
    with pytest.raises(ValueError, match=r"checkpoints/22 \(step 22\) is at the end of epoch 2, past "
                                         r"the end of a run of num_epochs=1"):
        loop.train_and_evaluate(config.replace(num_epochs=1), workdir)
    shutil.rmtree(workdir / constants.MODEL_DIR)
    loop.train_and_evaluate(config, workdir)  # restores the last checkpoint, trains nothing
    _assert_same_run(workdir, reference_dir)


@pytest.mark.slow
def test_ctrl_c_while_the_first_checkpoint_is_written(data_root, uninterrupted, tmp_path):
    """Ctrl-C as orbax writes the first checkpoint: one `error: interrupted (Ctrl-C)` line, exit
    status 130, promptly (it printed an orbax traceback, "cannot schedule new futures after
    interpreter shutdown", and could hang at the interpreter's shutdown until SIGKILL); the same
    command then resumes to the uninterrupted run's model."""
    config_json = tmp_path / "config.json"
    config_json.write_text(json.dumps(_config(data_root).to_dict()))
    workdir = tmp_path / "run"
    checkpoint_dir = workdir / "checkpoints"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(_train_command(config_json, workdir), cwd=REPO_ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with proc:
        _wait_for(proc, lambda: checkpoint_dir.is_dir() and any(checkpoint_dir.iterdir()),
                  "the first checkpoint")
        proc.send_signal(signal.SIGINT)
        try:
            stderr = proc.communicate(timeout=60)[1]
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("still running 60 s after Ctrl-C")
    assert proc.returncode == 130, stderr[-3000:]
    assert stderr.splitlines()[-1] == "error: interrupted (Ctrl-C)", stderr[-3000:]
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr[-3000:]
    assert not (workdir / constants.MODEL_DIR).exists()

    result = subprocess.run(_train_command(config_json, workdir), cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_same_run(workdir, uninterrupted)


def test_a_damaged_latest_checkpoint_is_named_with_the_one_before(data_root, tmp_path):
    """A truncated array file in the latest checkpoint: one `error:` line naming it and the step
    the checkpoint before it resumes from (no traceback, nothing written); moved away, the run
    resumes from that step."""
    config = _config(data_root).replace(num_epochs=1)
    workdir = tmp_path / "run"
    loop.train_and_evaluate(config, workdir)  # 11 steps: checkpoints 4, 8 and 11
    latest = workdir / "checkpoints" / "11"
    data = sorted(latest.glob("state/ocdbt.process_*/d/*"), key=lambda f: f.stat().st_size)
    assert data, "no array data files found under checkpoints/11/state/ocdbt.process_*/d/"
    data[-1].write_bytes(data[-1].read_bytes()[:1000])
    config_json = tmp_path / "config.json"
    config_json.write_text(json.dumps(config.replace(num_epochs=2).to_dict()))
    before = sorted((p, p.stat().st_mtime_ns) for p in workdir.rglob("*"))
    result = subprocess.run(_train_command(config_json, workdir), cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 1
    # No traceback at all: neither ours nor those of the reads orbax abandoned when the first one
    # failed (they complete into its closed event loop, or fail unobserved, up to the exit).
    assert "Traceback" not in result.stderr and "exception was never retrieved" not in result.stderr, \
        result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert errors[0].startswith(f"error: {latest}: the checkpoint's arrays cannot be read, it is damaged "
                                "or incomplete (")
    assert errors[0].endswith(f"; if it is damaged (a partial copy, a full disk), move it out of "
                              f"{workdir / 'checkpoints'} to resume from step 8, the checkpoint before it")
    assert sorted((p, p.stat().st_mtime_ns) for p in workdir.rglob("*")) == before

    latest.rename(tmp_path / "damaged_11")
    loop.train_and_evaluate(config.replace(num_epochs=2), workdir)
    epochs = [json.loads(line)["epoch"] for line in (workdir / constants.METRICS_FILE).read_text().splitlines()]
    assert epochs == [1, 2] and (workdir / constants.MODEL_DIR).is_dir()


def test_binary_makes_data_paths_absolute(tmp_path):
    """config.json holds the paths the run read, so the workdir resumes from any directory;
    a missing data root or store is named by that absolute path and nothing is written."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    for flag, named in (("--data_root=rel/tt", f"data root {tmp_path / 'rel' / 'tt'} does not exist"),
                        ("--hdf5_dir=rel/h5", f"HDF5 store {tmp_path / 'rel' / 'h5'}/")):
        result = subprocess.run([sys.executable, "-m", "experiments.train", "--workdir=run",
                                 "--config=tiny", flag],
                                cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
        assert result.returncode == 1
        last = result.stderr.splitlines()[-1]
        assert last.startswith("error: ") and named in last, last
        assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("position,accepted", [
    ((3, 5), True), ((4, 0), True),  # inside the last epoch; the end of a finished run
    ((4, 1), False), ((5, 0), False), ((6, 7), False)])
def test_checkpoint_past_num_epochs(tmp_path, position, accepted):
    epoch, batch = position
    check = lambda: loop._check_position({"epoch": epoch, "batch": batch}, 40, tmp_path / "40", num_epochs=3)
    if accepted:
        check()
    else:
        with pytest.raises(ValueError, match=r"\(step 40\) .* past the end of a run of num_epochs=3"):
            check()


def test_workdir_of_another_run_is_refused(data_root, tmp_path):
    config = _config(data_root)
    (tmp_path / constants.CONFIG_FILE).write_text(json.dumps(
        {**config.replace(learning_rate=0.5).to_dict(), "in_channels": 16}))
    with pytest.raises(ValueError, match="learning_rate=0.5"):
        loop.train_and_evaluate(config, tmp_path)
    assert not (tmp_path / "checkpoints").exists()
