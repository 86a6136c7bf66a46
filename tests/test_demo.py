"""The end-to-end demo (asd_jax/demo.py, experiments/demo.py) on a reduced setting.

The reduced setting trains for seconds, so whether the CRNN beats the centre baseline there is
luck; that claim is checked by `make demo` itself (it prints it) at the full setting. Here:
the binary runs end to end, every output exists, the table holds what `evaluate` wrote, the
centre baseline's detection error equals the share of silent GT frames (counted here from the
GT files), the classical SRP-PHAT localiser is far closer than the image centre, and a rerun
reuses the finished stages.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from asd_jax import constants, demo

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = demo.default_config(reduced=True)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> pathlib.Path:
    """A workdir where `python -m experiments.demo` ran to the end on TINY."""
    workdir = tmp_path_factory.mktemp("demo") / "run"
    cmd = [sys.executable, "-m", "experiments.demo", "--workdir", str(workdir), "--reduced"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "| trained CRNN (tiny) |" in proc.stdout and "| SRP-PHAT + energy VAD |" in proc.stdout
    return workdir


@pytest.mark.slow
def test_demo_writes_every_stage_and_the_table(finished):
    results = json.loads((finished / "demo_results.json").read_text())
    assert results["config"] == dataclasses.asdict(TINY)
    md = (finished / "demo_results.md").read_text()
    assert "| system | AP 2° | F1 2° | AP 5° | F1 5° | aD (px) | det. error (%) |" in md
    assert (finished / "train" / "model").is_dir() and (finished / "train" / "config.json").is_file()
    for system in demo.SYSTEMS:
        assert (finished / "forward" / system / "test_forward.csv").is_file()
        row = results["systems"][system]
        for tol in demo.TOLERANCES:
            written = json.loads((finished / "eval" / system / f"metrics_{tol}.json").read_text())
            assert row[f"AP_{tol}"] == written["AP"] and row[f"F1_{tol}"] == written["F1"]
            assert row["aD"] == written["aD"] and row["det_err"] == written["det_err"]
            assert (finished / "eval" / system / f"precision_recall_{tol}_sigmoid.csv").is_file()
    assert set(results["crnn_beats_centre"]) == {k for k, _, _ in demo.COLUMNS}


@pytest.mark.slow
def test_demo_baselines_are_sane(finished):
    systems = json.loads((finished / "demo_results.json").read_text())["systems"]
    # Centre baseline: always "speaking", so its detection error is the share of silent frames.
    data = finished / "data"
    lengths = {k: float(v) for k, v in json.loads((data / "csv" / "seq_lengths.json").read_text()).items()}
    per_cell = {}
    for path in sorted((data / "GT").glob("*/*/*_GT.csv")):
        frames = int(round(lengths[path.parts[-3]] * constants.VIDEO_FPS))
        with open(path, newline="") as f:
            labels = np.array([r[4] == "SPEAKING" for r in csv.reader(f)])
        speaking = labels.reshape(-1, frames).any(axis=0)
        per_cell.setdefault(path.parts[-3:-1], []).append(speaking)
    silent = 1 - np.mean([np.mean(np.concatenate(v)) for _, v in sorted(per_cell.items())])
    assert systems["centre"]["det_err"] == pytest.approx(100 * silent, abs=1e-9)
    assert systems["srp_phat"]["aD"] < systems["centre"]["aD"] / 2


@pytest.mark.slow
def test_demo_rerun_reuses_stages_and_refuses_other_settings(finished):
    model_files = {p: p.stat().st_mtime_ns for p in (finished / "train").rglob("*") if p.is_file()}
    lines = []
    results = demo.run_demo(finished, config=TINY, log=lines.append)
    assert {p: p.stat().st_mtime_ns for p in (finished / "train").rglob("*") if p.is_file()} == model_files
    assert results["timings_s"]["train"] < 5.0 and results["timings_s"]["synthesize"] < 5.0
    assert results["systems"] == json.loads((finished / "demo_results.json").read_text())["systems"]
    with pytest.raises(ValueError, match="holds a demo made with other settings .*num_epochs"):
        demo.run_demo(finished, config=dataclasses.replace(TINY, num_epochs=3), log=lines.append)


def test_beats_and_format_table():
    good = {"AP_89": 0.5, "F1_89": 0.6, "AP_222": 0.7, "F1_222": 0.8, "aD": 30.0, "det_err": 10.0}
    bad = {"AP_89": 0.1, "F1_89": 0.2, "AP_222": 0.3, "F1_222": 0.4, "aD": 300.0, "det_err": 20.0}
    assert all(demo.beats(good, bad).values()) and not any(demo.beats(bad, good).values())
    assert demo.beats({**good, "aD": None}, bad)["aD"] is False
    table = demo.format_table({"crnn": good, "centre": {**bad, "aD": None}})
    assert table.splitlines()[2] == "| trained CRNN (tiny) | 0.500 | 0.600 | 0.700 | 0.800 | 30.0 | 10.0 |"
    assert "| centre baseline | 0.100 | 0.200 | 0.300 | 0.400 | n/a | 20.0 |" in table
    # "Strictly better": a tie is not a win, either way round.
    assert not any(demo.beats(good, dict(good)).values())


def test_table_row_takes_each_column_from_its_tolerance():
    """AP/F1 at 2 degrees from the 89 px evaluation, at 5 degrees from the 222 px one (SPEC
    section 9); aD and the detection error (the same at every tolerance) from 89 px."""
    assert demo.TOLERANCES == (89, 222)
    metrics = {t: {"AP": t + 0.1, "F1": t + 0.2, "aD": t + 0.3, "aD_se": t + 0.4,
                   "det_err": t + 0.5, "det_err_se": t + 0.6} for t in (89, 222)}
    assert demo._row(metrics) == {"AP_89": 89.1, "F1_89": 89.2, "AP_222": 222.1, "F1_222": 222.2,
                                  "aD": 89.3, "aD_se": 89.4, "det_err": 89.5, "det_err_se": 89.6}


def test_train_config_carries_the_demo_overrides():
    config = dataclasses.replace(demo.default_config(), num_epochs=3, batch_size=4,
                                 compute_dtype="bfloat16", seed=7, learning_rate=2e-3)
    train = demo.train_config(config, "data")
    assert (train.num_epochs, train.batch_size, train.compute_dtype, train.seed,
            train.learning_rate) == (3, 4, "bfloat16", 7, 2e-3)
    assert train.data_root == "data" and train.model["conv_features"] == (8, 16, 16, 32)  # tiny
    # Unset overrides keep the tiny preset's values.
    plain = demo.train_config(demo.default_config(), "data")
    assert plain.compute_dtype == "float32" and plain.batch_size == 8


@pytest.mark.parametrize("changes, match", [
    ({"seconds": 1.0}, r"seconds=1.0: expected at least 1.5"),
    ({"num_epochs": 0}, r"num_epochs=0"),
    ({"num_dev": 0}, r"num_dev=0"),
    ({"num_test": 0}, r"num_test=0"),
    ({"seed": -1}, r"seed=-1"),
    ({"learning_rate": -1.0}, r"learning_rate"),
    ({"batch_size": 0}, r"batch_size=0"),
    ({"compute_dtype": "float16"}, r"compute_dtype"),
    ({"snr_db": float("nan")}, r"snr_db=nan"),
    ({"seconds": None}, r"seconds=None: expected a number"),
    ({"num_dev": True}, r"num_dev=True: expected an integer >= 1"),
])
def test_bad_settings_are_refused_before_anything_is_written(tmp_path, changes, match):
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match=match):
        demo.run_demo(workdir, config=dataclasses.replace(TINY, **changes), log=lambda _: None)
    assert not workdir.exists()


def test_a_workdir_without_stage_outputs_takes_corrected_settings(tmp_path):
    # A workdir that an older version locked with settings it then refused.
    workdir = tmp_path / "run"
    workdir.mkdir()
    bad = {**TINY.to_dict(), "seconds": 1.0}
    (workdir / demo.DEMO_CONFIG_FILE).write_text(json.dumps(bad))
    demo._check_workdir(workdir, TINY)
    assert json.loads((workdir / demo.DEMO_CONFIG_FILE).read_text()) == TINY.to_dict()
    # Once a stage has written its output, other settings are refused.
    (workdir / "data").mkdir()
    with pytest.raises(ValueError, match="holds a demo made with other settings .*seconds"):
        demo._check_workdir(workdir, dataclasses.replace(TINY, seconds=5.0))


@pytest.mark.parametrize("stage", ["data", "train", "forward", "eval"])
def test_stage_outputs_without_a_recorded_config_are_refused(tmp_path, stage):
    """A workdir holding stage folders (a foreign data/ tree, say) but no demo_config.json used to
    take the new settings and reuse those folders as if made with them."""
    workdir = tmp_path / "run"
    (workdir / stage / "csv").mkdir(parents=True)
    with pytest.raises(ValueError, match=rf"{workdir} holds demo stage output \({stage}/\) but no "
                                         rf"demo_config\.json: made with unknown settings"):
        demo.run_demo(workdir, config=TINY, log=lambda _: None)
    assert sorted(p.name for p in workdir.iterdir()) == [stage]


def test_command_line_refuses_bad_flags_in_one_line(tmp_path):
    workdir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "experiments.demo", "--workdir", str(workdir),
                           "--reduced", "--epochs", "0"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert proc.returncode == 1
    assert "num_epochs=0" in proc.stderr and "Traceback" not in proc.stderr
    assert not workdir.exists()
