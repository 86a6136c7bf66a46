"""asd_jax.evaluation: parity with the released results, a synthetic dataset against the
SPEC-section-9 loops of test_metrics, the output files, the pickle reader and every error."""

import json
import logging
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats

from asd_jax import evaluation, textfiles
from asd_jax import metrics
from test_metrics import loop_ap, loop_reference, spec_thresholds

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# SPEC section 10: AP and F1 of the released PR files at 2 degrees.
RELEASED_AP_F1 = {
    "gcc_GT_GT": (0.866865, 0.909183), "salsa-lite_GT_GT": (0.854318, 0.894559),
    "gcc_GT_VAD": (0.850452, 0.878411), "gcc_TalkNet_GT": (0.852668, 0.889859),
    "gcc_TalkNet_VAD": (0.817513, 0.853717), "ASCs": (0.620094, 0.703589),
    "16mics": (0.557449, 0.710241), "mono": (0.102216, 0.299843),
    "gcc_ASCs_GT": (0.830049, 0.880758), "gcc_ASCs_VAD": (0.805880, 0.843510),
    "gcc_ASC_GT": (0.386688, 0.606089), "gcc_ASC_VAD": (0.381233, 0.594139),
    "TalkNet": (0.821143, 0.849244), "ASC": (0.589508, 0.678733),
    "stereo": (0.313341, 0.534774),
}

# ----------------------------------------------------------------------------------------
# A small synthetic dataset with generic names (not TragicTalkers').
# ----------------------------------------------------------------------------------------

SEQUENCES = {"alpha_t1": (2, "1.0"), "beta_t2": (1, "0.7")}  # speakers, length in seconds
CAMERAS = {"01": ("cam01", "cam03"), "02": ("cam12",)}


def make_dataset(root, seed=0, sequences=SEQUENCES):
    """Writes GT/, seq_lengths.json and test_forward.csv; returns paths and loop input."""
    rng = np.random.default_rng(seed)
    thresholds = metrics.CONFIDENCE_THRESHOLDS_PCT
    lengths = {name: length for name, (_, length) in sequences.items()}
    lengths["unused_t9"] = "3.0"
    (root / "seq_lengths.json").write_text(json.dumps(lengths))
    forward = ["name,time,predicted x,confidence"]
    cells = sorted(f"{s}/{r}" for s in sequences for r in CAMERAS)
    files = []
    for seq, (speakers, length) in sequences.items():
        frames = int(round(float(length) * 30))
        for rig, cams in CAMERAS.items():
            folder = root / "GT" / seq / rig
            folder.mkdir(parents=True)
            for cam in cams:
                speaking = rng.uniform(size=(speakers, frames)) < 0.45
                x = rng.integers(100, 2300, size=(speakers, frames))
                gt_lines = [f"{f},{x[s, f]},{500 + s},{s + 1},{'SPEAKING' if speaking[s, f] else 'NOT_SPEAKING'}"
                            for s in range(speakers) for f in range(frames)]
                (folder / f"{seq}-{cam}_GT.csv").write_text("\n".join(gt_lines) + "\n")
                conf = rng.uniform(size=frames)
                ties = rng.uniform(size=frames) < 0.3
                conf[ties] = thresholds[rng.integers(0, 101, ties.sum())] / 100
                # confidence 0 on some frames (as in the released files), more often silent:
                # the 0.0 row then adds recall at a lower precision, a single-row last run
                # that AP's quirk leaves out
                every = np.where(speaking.any(axis=0), 10, 4)
                conf[np.arange(frames) % every == 0] = 0.0
                offset = rng.choice([0.0, 30.5, 88.0, 89.0, -89.0, 90.0, 222.0, 500.0], frames)
                frame_data = []
                for f in range(frames):
                    who = [s for s in range(speakers) if speaking[s, f]]
                    x_gt = float(x[who[0], f]) if who else 0.0
                    # the offset away from the nearer edge, so x_pred stays in [0, 1]
                    sign = 1 if x_gt + offset[f] <= 2448 else -1
                    x_pred = (x_gt + sign * offset[f]) / 2448 if who else rng.uniform()
                    forward.append(f"{seq}-{cam},{round(f / 30, 2)},{repr_float(x_pred)},{repr_float(conf[f])}")
                    frame_data.append((float(repr_float(conf[f])), float(repr_float(x_pred)),
                                       bool(who), x_gt))
                files.append((cells.index(f"{seq}/{rig}"), frame_data))
        # a camera without a GT file: ignored, as in the reference
        forward += [f"{seq}-cam05,{round(f / 30, 2)},0.5,0.9" for f in range(frames)]
    forward_csv = root / "test_forward.csv"
    forward_csv.write_text("\n".join(forward) + "\n")
    return (forward_csv, root / "GT", root / "seq_lengths.json"), files, cells


def repr_float(value):
    return repr(float(value))


@pytest.fixture
def dataset(tmp_path):
    return make_dataset(tmp_path)


# ----------------------------------------------------------------------------------------
# Parity with the released results.
# ----------------------------------------------------------------------------------------


def test_released_ascs_forward_file_is_an_exact_target(reference_dir):
    result = evaluation.evaluate(reference_dir / "released" / "ASCs" / "test_forward.csv",
                                 reference_dir / "GT", reference_dir / "seq_lengths.json")[89]
    released = evaluation.read_precision_recall_csv(
        reference_dir / "released" / "ASCs" / "precision_recall_89_sigmoid.csv")
    pr = result["precision_recall"]
    np.testing.assert_array_equal(pr["true_pos"], released[:, 1])
    np.testing.assert_array_equal(pr["gt_pos"], released[:, 2])
    np.testing.assert_array_equal(pr["pred_pos"], released[:, 3])
    np.testing.assert_allclose(pr["precision"], released[:, 4], atol=1e-11)
    np.testing.assert_allclose(pr["recall"], released[:, 5], atol=1e-11)
    spec = {"aD": 24.881055, "aD_se": 3.134700, "det_err": 43.350056, "det_err_se": 0.051920,
            "AP": 0.620094, "F1": 0.703589}
    for key, value in spec.items():
        assert abs(result[key] - value) <= 1e-6, (key, result[key], value)
    assert result["F1_row"] == 68
    released_f1 = evaluation.read_f1_scores(reference_dir / "released" / "ASCs" / "F1_scores_89.pckl")
    np.testing.assert_allclose(result["seq_F1"], released_f1, atol=1e-9)
    assert result["cells"][:3] == ["conversation1_t3/01", "conversation1_t3/02", "femalemonologue2_t3/01"]


def test_released_ascs_precision_recall_file_is_written_again(reference_dir, tmp_path):
    """The file itself, not only its values: every field as the released file writes it, but
    for recall values 1 ulp away (one row: 18 / 42771, where the reference's value is not
    Python's correctly rounded quotient)."""
    evaluation.evaluate(reference_dir / "released" / "ASCs" / "test_forward.csv",
                        reference_dir / "GT", reference_dir / "seq_lengths.json", out_dir=tmp_path)
    ours = (tmp_path / "precision_recall_89_sigmoid.csv").read_text().splitlines()
    released = (reference_dir / "released" / "ASCs" / "precision_recall_89_sigmoid.csv").read_text().splitlines()
    assert len(ours) == len(released) == 102
    differing = 0
    for a, b in zip(ours, released):
        if a == b:
            continue
        differing += 1
        *head_a, recall_a = a.split(",")
        *head_b, recall_b = b.split(",")
        assert head_a == head_b, (a, b)
        assert np.nextafter(float(recall_a), float(recall_b)) == float(recall_b), (a, b)
    assert differing <= 1


@pytest.mark.parametrize("system", sorted(RELEASED_AP_F1))
def test_released_precision_recall_files_give_the_paper_table(reference_dir, system):
    table = evaluation.read_precision_recall_csv(
        reference_dir / "released" / system / "precision_recall_89_sigmoid.csv")
    assert table.shape == (101, 6)
    ap, f1 = RELEASED_AP_F1[system]
    assert abs(metrics.average_precision(table[:, 4], table[:, 5]) - ap) <= 1e-6
    assert abs(metrics.best_f1(table[:, 4], table[:, 5])[0] - f1) <= 1e-6


def test_released_ttest_gcc_gt_gt_vs_gt_vad(reference_dir):
    result = evaluation.compare_sequence_f1(
        reference_dir / "released" / "gcc_GT_GT" / "F1_scores_89.pckl",
        reference_dir / "released" / "gcc_GT_VAD" / "F1_scores_89.pckl")
    assert abs(result["t"] - 3.012574) <= 1e-6
    assert abs(result["p"] - 0.007327) <= 1e-6
    assert result["df"] == 9
    released = {}
    for key, system in (("mean_a", "gcc_GT_GT"), ("mean_b", "gcc_GT_VAD")):
        with open(reference_dir / "released" / system / "F1_scores_89.pckl", "rb") as f:
            released[key] = np.asarray(pickle.load(f), np.float64)  # the reference's own test data
        assert result[key] == pytest.approx(np.mean(released[key]), abs=1e-12), key
    difference = np.max(np.abs(released["mean_a"] - released["mean_b"]))
    assert result["max_abs_difference"] == pytest.approx(difference, abs=1e-15)
    assert difference > evaluation.F1_ROUNDING  # two systems: far above the rounding level


# ----------------------------------------------------------------------------------------
# Synthetic dataset against the loop transcription; output files.
# ----------------------------------------------------------------------------------------


def test_synthetic_dataset_matches_the_loops_and_writes_files(dataset, tmp_path):
    args, files, cells = dataset
    out = tmp_path / "out"
    results = evaluation.evaluate(*args, tolerances=(89, 222), out_dir=out, plot=True)
    for tolerance in (89, 222):
        result, ref = results[tolerance], loop_reference(files, tolerance, len(cells))
        assert result["cells"] == cells
        pr = result["precision_recall"]
        rows = np.array(ref["rows"])
        np.testing.assert_array_equal(pr["true_pos"], rows[:, 0])
        np.testing.assert_array_equal(pr["gt_pos"], rows[:, 1])
        np.testing.assert_array_equal(pr["pred_pos"], rows[:, 2])
        np.testing.assert_allclose(pr["precision"], rows[:, 3], atol=1e-15)
        np.testing.assert_allclose(pr["recall"], rows[:, 4], atol=1e-15)
        for key in ("AP", "F1", "aD", "aD_se", "det_err", "det_err_se"):
            assert result[key] == pytest.approx(ref[key], abs=1e-9), key
        assert result["F1_row"] == ref["F1_row"]
        assert result["F1_threshold_pct"] == pytest.approx(spec_thresholds()[ref["F1_row"]], abs=1e-12)
        np.testing.assert_allclose(result["seq_F1"], ref["seq_F1"], atol=1e-12)
        np.testing.assert_allclose(result["aD_cells"], ref["aD_cells"], atol=1e-9)

        lines = (out / f"precision_recall_{tolerance}_sigmoid.csv").read_text().splitlines()
        assert lines[0] == "confidence,true pos,GT pos,predict pos,precision,recall"
        assert len(lines) == 102
        written = np.array([[float(v) for v in line.split(",")] for line in lines[1:]])
        np.testing.assert_array_equal(written[:, 0], metrics.CONFIDENCE_THRESHOLDS_PCT)
        np.testing.assert_array_equal(written[:, 1:4], rows[:, :3])
        np.testing.assert_allclose(written[:, 4:], rows[:, 3:], atol=1e-15)
        assert all(line.split(",")[1].isdigit() for line in lines[1:])
        saved = json.loads((out / f"metrics_{tolerance}.json").read_text())
        for key in ("aD", "aD_se", "det_err", "det_err_se", "AP", "F1", "F1_row", "seq_F1"):
            assert saved[key] == result[key]
        assert saved["drop_single_row_last_run"] is True
        # SPEC section 9: detection error in percent, its standard error a fraction of 1.
        assert saved["units"] == {"tolerance_px": "px", "aD": "px", "aD_se": "px", "aD_cells": "px",
                                  "det_err": "percent", "det_err_se": "fraction",
                                  "F1_threshold_pct": "percent"}
        assert saved["inputs"] == {"forward_csv": str(args[0]), "gt_dir": str(args[1]),
                                   "seq_lengths": str(args[2]), "tolerance_px": tolerance}
        assert (out / f"precision_recall_{tolerance}.png").read_bytes()[:4] == b"\x89PNG"
    # sequence-wise F1 files: JSON and pickle read back the same values
    f1_pickle = tmp_path / "F1_scores_89.pckl"
    with open(f1_pickle, "wb") as f:
        pickle.dump([np.float64(v) for v in results[89]["seq_F1"]], f)
    np.testing.assert_array_equal(evaluation.read_sequence_f1(out / "metrics_89.json"),
                                  evaluation.read_sequence_f1(f1_pickle))


def test_a_file_with_fewer_speakers_than_another_reads_only_its_own_rows(tmp_path):
    """beta_t2 has one speaker, alpha_t1 two: beta's second speaker slot is empty. It must not
    read another file's row, here a SPEAKING first row of the first GT file."""
    for seed in range(50):
        root = tmp_path / f"seed{seed}"
        root.mkdir()
        args, files, cells = make_dataset(root, seed=seed)
        first_file = args[1] / "alpha_t1" / "01" / "alpha_t1-cam01_GT.csv"
        if first_file.read_text().split("\n", 1)[0].endswith(",SPEAKING"):
            break
    else:
        pytest.fail("no seed below 50 makes the first GT row SPEAKING")
    result, ref = evaluation.evaluate(*args)[89], loop_reference(files, 89, len(cells))
    rows = np.array(ref["rows"])
    np.testing.assert_array_equal(result["precision_recall"]["true_pos"], rows[:, 0])
    np.testing.assert_array_equal(result["precision_recall"]["gt_pos"], rows[:, 1])
    np.testing.assert_allclose(result["seq_F1"], ref["seq_F1"], atol=1e-12)


def test_a_cell_without_detected_speech_has_no_aD_and_the_json_stays_json(dataset, tmp_path):
    """Every confidence of rig 02 of beta_t2 below 0.5: that cell's aD is undefined (the
    reference's nan), written as null; NaN is not JSON."""
    args, files, cells = dataset
    lines = args[0].read_text().splitlines()
    args[0].write_text("\n".join([lines[0]] + [
        ",".join([*line.split(",")[:3], "0.1"]) if line.startswith("beta_t2-cam12,") else line
        for line in lines[1:]]) + "\n")
    out = tmp_path / "out"
    result = evaluation.evaluate(*args, out_dir=out)[89]
    cell = cells.index("beta_t2/02")
    assert result["aD_cells"][cell] is None
    assert all(isinstance(v, float) for i, v in enumerate(result["aD_cells"]) if i != cell)

    def not_json(constant):
        raise AssertionError(f"metrics_89.json holds {constant}")
    saved = json.loads((out / "metrics_89.json").read_text(), parse_constant=not_json)
    assert saved["aD_cells"] == result["aD_cells"]


def test_ap_without_the_last_run_quirk_is_reproducible_from_its_json(dataset, tmp_path):
    args, files, cells = dataset
    out = tmp_path / "out"
    result = evaluation.evaluate(*args, out_dir=out, drop_single_row_last_run=False)[89]
    rows = np.array(loop_reference(files, 89, len(cells))["rows"])
    with_quirk, without_quirk = (loop_ap(rows[:, 3], rows[:, 4], drop) for drop in (True, False))
    assert abs(without_quirk - with_quirk) > 1e-6  # the quirk matters on this dataset
    assert result["AP"] == pytest.approx(without_quirk, abs=1e-12)
    saved = json.loads((out / "metrics_89.json").read_text())
    assert saved["drop_single_row_last_run"] is False and saved["AP"] == result["AP"]
    # The JSON alone names everything the result came from.
    inputs = saved["inputs"]
    again = evaluation.evaluate(inputs["forward_csv"], inputs["gt_dir"], inputs["seq_lengths"],
                                tolerances=(inputs["tolerance_px"],),
                                drop_single_row_last_run=saved["drop_single_row_last_run"])[89]
    assert {k: again[k] for k in saved if k != "inputs"} == {k: v for k, v in saved.items()
                                                             if k != "inputs"}


def test_frames_of_a_length_with_three_decimals(tmp_path):
    """SPEC section 9: F = int(round(length * 30)) of the length as seq_lengths.json gives it.
    1.016 s is 30 frames (30.48), not the 31 of its 2-decimal rounding 1.02; 0.684 s is 21
    (20.52), not 20. GT files of those F rows per speaker evaluate as the loops do."""
    args, files, cells = make_dataset(tmp_path, sequences={"alpha_t1": (2, "1.016"),
                                                            "beta_t2": (1, "0.684")})
    assert [len(frames) for _, frames in files] == [30, 30, 30, 21, 21, 21]
    result = evaluation.evaluate(*args, tolerances=(89,))[89]
    ref = loop_reference(files, 89, len(cells))
    np.testing.assert_array_equal(result["precision_recall"]["true_pos"], np.array(ref["rows"])[:, 0])
    for key in ("AP", "F1", "aD", "det_err"):
        assert result[key] == pytest.approx(ref[key], abs=1e-9), key


def test_forward_rows_beyond_a_cameras_frames_are_ignored(dataset):
    """SPEC section 9: a camera's first F forward rows, in file order, are its frames; further
    rows (here F more for alpha_t1-cam01, with other values, at the end of the file) change
    nothing: the result is still the loops' on the original frames."""
    args, files, cells = dataset
    before = evaluation.evaluate(*args, tolerances=(89, 222))
    frames = int(round(float(SEQUENCES["alpha_t1"][1]) * 30))
    extra = [f"alpha_t1-cam01,{round((frames + f) / 30, 2)},{repr_float(1 - f / frames)},0.99"
             for f in range(frames)]
    with open(args[0], "a") as f:
        f.write("\n".join(extra) + "\n")
    after = evaluation.evaluate(*args, tolerances=(89, 222))
    for tolerance in (89, 222):
        result, ref = after[tolerance], loop_reference(files, tolerance, len(cells))
        rows = np.array(ref["rows"])
        pr = result["precision_recall"]
        np.testing.assert_array_equal(pr["true_pos"], rows[:, 0])
        np.testing.assert_array_equal(pr["pred_pos"], rows[:, 2])
        np.testing.assert_allclose(pr["precision"], rows[:, 3], atol=1e-15)
        for key in ("AP", "F1", "aD", "det_err"):
            assert result[key] == pytest.approx(ref[key], abs=1e-9), key
        np.testing.assert_allclose(result["seq_F1"], ref["seq_F1"], atol=1e-12)
        assert {k: v for k, v in result.items() if k != "precision_recall"} == {
            k: v for k, v in before[tolerance].items() if k != "precision_recall"}


@pytest.mark.parametrize("swap", [(9, 10), (0, 29)])
def test_forward_rows_out_of_time_order_are_refused(dataset, swap):
    """Rows are frames by position (SPEC section 9), so a camera's rows out of time order
    (two rows swapped, e.g. by sorting the file as text) would score other frames' GT: an
    error naming the line, its time and the frame expected there. The time written is
    round(n/30, 2) (SPEC section 8), and the check allows half a frame."""
    args, _, _ = dataset
    lines = args[0].read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("alpha_t1-cam03,"))
    a, b = first + swap[0], first + swap[1]
    lines[a], lines[b] = lines[b], lines[a]
    args[0].write_text("\n".join(lines) + "\n")
    time = round(swap[1] / 30, 2)
    with pytest.raises(ValueError, match=rf"test_forward.csv:{a + 1}: time {time} s read as "
                                         rf"frame {swap[0]} of alpha_t1-cam03, whose time is "
                                         rf"{swap[0] / 30:.2f} s; a camera's rows must be"):
        evaluation.evaluate(*args, tolerances=(89,))


def test_outputs_appear_only_by_rename(dataset, tmp_path, monkeypatch):
    """Every output file is written aside and renamed into place: with the rename failing
    (a crash just before it), no output file exists, complete or truncated."""
    def no_rename(src, dst):
        raise OSError(f"simulated crash before renaming {src} onto {dst}")

    monkeypatch.setattr(os, "replace", no_rename)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="simulated crash"):
        evaluation.evaluate(*dataset[0], tolerances=(89, 222), out_dir=out, plot=True)
    assert list(out.iterdir()) == []  # neither outputs nor temporary files
    monkeypatch.undo()
    evaluation.evaluate(*dataset[0], tolerances=(89,), out_dir=out, plot=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "metrics_89.json", "precision_recall_89.png", "precision_recall_89_sigmoid.csv"]


def test_an_out_dir_holds_one_evaluation_never_a_mix(dataset, tmp_path):
    """An out_dir holding another evaluation's files was overwritten file by file: a run
    stopped midway, or one at other tolerances, left files of two inputs side by side. Now it is
    refused before anything is computed or written; with overwrite every old result file goes
    first."""
    args, files, cells = dataset
    out = tmp_path / "out"
    evaluation.evaluate(*args, tolerances=(89, 222), out_dir=out, plot=True)
    (out / "notes.txt").write_text("the user's own file")
    other_csv = tmp_path / "other_forward.csv"
    other_csv.write_text(args[0].read_text())
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir())
    with pytest.raises(FileExistsError) as error:
        evaluation.evaluate(other_csv, *args[1:], tolerances=(89,), out_dir=out)
    assert str(error.value) == (
        f"{out} holds the results of an evaluation already (metrics_222.json, metrics_89.json, "
        "precision_recall_222.png, precision_recall_222_sigmoid.csv, precision_recall_89.png, "
        "precision_recall_89_sigmoid.csv); pass overwrite=True (--overwrite) to replace them, "
        "or choose another out_dir")
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir()) == before
    evaluation.evaluate(other_csv, *args[1:], tolerances=(89,), out_dir=out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "metrics_89.json", "notes.txt", "precision_recall_89_sigmoid.csv"]
    saved = json.loads((out / "metrics_89.json").read_text())
    assert saved["inputs"]["forward_csv"] == str(other_csv.absolute())
    assert (out / "notes.txt").read_text() == "the user's own file"


def test_nothing_is_written_without_out_dir(dataset, tmp_path):
    before = sorted(tmp_path.rglob("*"))
    evaluation.evaluate(*dataset[0])
    assert sorted(tmp_path.rglob("*")) == before


def test_summary_lines_follow_the_reference():
    result = {"aD": 24.8810548, "aD_se": 3.1347, "det_err": 43.35005, "det_err_se": 0.05192,
              "AP": 0.6200938, "F1": 0.7035893, "cells": ["a/01"], "aD_cells": [24.88]}
    assert evaluation.summary_lines(result, "ASCs") == [
        "ASCs - aD mean: 24.881055 pixels", "ASCs - aD standard error: 3.134700 pixels",
        "ASCs - Detection error mean: 43.350050 %", "ASCs - Detection standard error: 0.051920",
        "ASCs - AP = 0.620094", "ASCs - F1 score: 0.703589"]
    result.update(aD=None, aD_se=None, aD_cells=[None])
    assert "aD undefined" in evaluation.summary_lines(result)[0]


# ----------------------------------------------------------------------------------------
# The pickle reader.
# ----------------------------------------------------------------------------------------


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_f1_pickle_reader_refuses_code(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "F1_scores_89.pckl"
    path.write_bytes(pickle.dumps([_Exploit(marker)]))
    with pytest.raises(ValueError, match="refusing to load .*system"):
        evaluation.read_f1_scores(path)
    assert not marker.exists()
    path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ValueError, match="list of numbers"):
        evaluation.read_f1_scores(path)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_f1_pickle_reader_reads_every_protocol(tmp_path, protocol):
    """Protocols 0-2 store a numpy scalar's bytes through `_codecs.encode` of latin-1 text."""
    scores = [np.float64(0.5), np.float32(0.25), np.float64(1 / 3)]
    path = tmp_path / "F1_scores_89.pckl"
    path.write_bytes(pickle.dumps(scores, protocol=protocol))
    np.testing.assert_array_equal(evaluation.read_f1_scores(path), np.array(scores, np.float64))


def test_f1_pickle_reader_allows_codecs_encode_of_latin1_text_only(tmp_path):
    path = tmp_path / "F1_scores_89.pckl"
    # [_codecs.encode("x", "rot13")], written by hand as protocol 2 opcodes.
    path.write_bytes(b"\x80\x02]q\x00c_codecs\nencode\nq\x01X\x01\x00\x00\x00xX\x05\x00\x00\x00"
                     b"rot13\x86R\x85.")
    with pytest.raises(ValueError, match=r"F1_scores_89.pckl: .*encoding 'rot13'; only latin1"):
        evaluation.read_f1_scores(path)


class _PickledDtype:
    """Pickles as numpy.dtype(name, False, True) with the given state."""

    def __init__(self, name, state):
        self.name, self.state = name, state

    def __reduce__(self):
        return (np.dtype, (self.name, False, True), self.state)


class _PickledScalar:
    """Pickles as numpy's scalar(dtype, data), as numpy writes a float64."""

    def __init__(self, dtype, data):
        self.dtype, self.data = dtype, data

    def __reduce__(self):
        return (np.float64(0).__reduce__()[0], (self.dtype, self.data))


_F8_STATE = (3, "<", None, None, None, -1, -1, 0)  # numpy's own state of a little-endian f8


@pytest.mark.parametrize("name,state,data", [
    ("f8", (3, "<", None, -1, -1, 0), b"\0" * 8),  # numpy's own dtype restore crashes on it
    ("f8", (3, "<", (1, 2), None, None, -1, -1, 0), b"\0" * 8),
    ("O", _F8_STATE, b"\0" * 8),
    ("i8", _F8_STATE, b"\0" * 8),
    ("f8", _F8_STATE, b"\0" * 7),
])
def test_f1_pickle_reader_refuses_malformed_numpy_scalars(tmp_path, name, state, data):
    """A scalar's dtype must be float16/32/64 with the state numpy writes, and its bytes one
    value; anything else is refused before numpy sees it (a crafted dtype state crashes numpy's
    own `__setstate__`, taking the interpreter with it)."""
    path = tmp_path / "F1_scores_89.pckl"
    path.write_bytes(pickle.dumps([_PickledScalar(_PickledDtype(name, state), data)] * 2, protocol=4))
    with pytest.raises(ValueError, match=r"F1_scores_89.pckl: not a pickled list of numbers "
                                         r"\(refusing numpy"):
        evaluation.read_f1_scores(path)


def test_f1_pickle_reader_reads_big_endian_floats(tmp_path):
    """A dtype state may name either byte order; the bytes are read in the one it names."""
    path = tmp_path / "F1_scores_89.pckl"
    big = _PickledScalar(_PickledDtype("f8", (3, ">") + _F8_STATE[2:]), struct.pack(">d", 0.75))
    little = _PickledScalar(_PickledDtype("f4", _F8_STATE), struct.pack("<f", 0.5))
    path.write_bytes(pickle.dumps([big, little], protocol=2))
    np.testing.assert_array_equal(evaluation.read_f1_scores(path), [0.75, 0.5])


def test_f1_pickle_reader_reads_released_files(reference_dir):
    path = reference_dir / "released" / "gcc_GT_GT" / "F1_scores_89.pckl"
    with open(path, "rb") as f:
        expected = pickle.load(f)  # trusted here: the reference data
    np.testing.assert_array_equal(evaluation.read_f1_scores(path), np.array(expected, float))


# ----------------------------------------------------------------------------------------
# Errors, all raised before anything is written.
# ----------------------------------------------------------------------------------------


def _edit(path, old, new, count=1):
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, count))


def _expect_error(args, tmp_path, match):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        evaluation.evaluate(*args, out_dir=out)
    assert not out.exists()


def test_error_fewer_forward_rows_than_frames(dataset, tmp_path):
    args = dataset[0]
    lines = args[0].read_text().splitlines()
    args[0].write_text("\n".join(l for l in lines if not l.startswith("beta_t2-cam12,0.5,")) + "\n")
    _expect_error(args, tmp_path, r"20 rows for beta_t2-cam12.*needs 21")


def test_error_gt_camera_missing_from_forward_file(dataset, tmp_path):
    args = dataset[0]
    lines = args[0].read_text().splitlines()
    args[0].write_text("\n".join(l for l in lines if not l.startswith("alpha_t1-cam03,")) + "\n")
    _expect_error(args, tmp_path, r"0 rows for alpha_t1-cam03")


def test_error_forward_file_without_rows(dataset, tmp_path):
    args = dataset[0]
    args[0].write_text("name,time,predicted x,confidence\n")
    _expect_error(args, tmp_path, r"0 rows for alpha_t1-cam01")


def test_error_unknown_camera_name(dataset, tmp_path):
    args = dataset[0]
    _edit(args[0], "beta_t2-cam05,", "beta_t2-cam99,")
    lines = args[0].read_text().splitlines()
    line = 1 + next(i for i, text in enumerate(lines) if text.startswith("beta_t2-cam99,"))
    _expect_error(args, tmp_path, rf"test_forward.csv:{line}: unknown camera name 'beta_t2-cam99'")


def test_error_unknown_sequence_in_forward_file(dataset, tmp_path):
    args = dataset[0]
    _edit(args[0], "beta_t2-cam05,", "gamma_t1-cam05,")
    _expect_error(args, tmp_path, r"unknown sequence 'gamma_t1'")


def test_error_unknown_sequence_in_gt(dataset, tmp_path):
    args = dataset[0]
    _edit(args[2], '"beta_t2"', '"other_t2"')
    _expect_error(args, tmp_path, r"unknown sequence")


def _set_field(path, line, column, value):
    """Sets field `column` of 1-based `line` (negative: from the end) of a CSV file."""
    text = path.read_text().splitlines()
    index = line - 1 if line > 0 else len(text) + line
    fields = text[index].split(",")
    fields[column] = value
    text[index] = ",".join(fields)
    path.write_text("\n".join(text) + "\n")
    return index + 1


# "1_0" and full-width digits: Python's float reads them, np.loadtxt does not.
@pytest.mark.parametrize("bad", ["abc", "nan", "inf", "", "1_0", "\uff11\uff12"])
def test_error_non_numeric_or_non_finite_value(dataset, tmp_path, bad):
    args = dataset[0]
    original = args[0].read_text()
    for line in (6, -1):  # early and last: the bad line is found wherever it is
        args[0].write_text(original)
        line = _set_field(args[0], line, 3, bad)
        _expect_error(args, tmp_path,
                      rf"test_forward.csv:{line}: confidence is '{bad}'; expected a finite number")


@pytest.mark.parametrize("column, bad", [(2, "1224.0"), (2, "-0.01"), (3, "45.5")])
def test_error_forward_value_outside_the_unit_interval(dataset, tmp_path, column, bad):
    args = dataset[0]
    _set_field(args[0], 6, column, bad)
    name = evaluation.FORWARD_HEADER[column]
    _expect_error(args, tmp_path, rf"test_forward.csv:6: {name} is '{bad}'; expected a value in \[0, 1\]")


def test_released_forward_files_lie_in_the_unit_interval(reference_dir):
    for system in ("ASC", "ASCs"):
        forward = evaluation.read_forward_csv(reference_dir / "released" / system / "test_forward.csv")
        assert forward.x.min() >= 0 and forward.x.max() <= 1
        assert forward.confidence.min() >= 0 and forward.confidence.max() <= 1


def test_error_wrong_field_count_and_header(dataset, tmp_path):
    args = dataset[0]
    original = args[0].read_text()
    text = original.splitlines()
    text[3] += ",extra"
    args[0].write_text("\n".join(text) + "\n")
    _expect_error(args, tmp_path, r"test_forward.csv:4: expected 4 comma-separated fields")
    args[0].write_text(original.replace("predicted x", "x", 1))
    _expect_error(args, tmp_path, r"expected the header")


@pytest.mark.parametrize("saved_as", ["utf8_bom", "crlf"])
def test_files_saved_by_other_tools_read_as_plain_ones(dataset, saved_as):
    """A spreadsheet may begin a CSV with the UTF-8 byte order mark (forward and GT files);
    GT files written on Windows end their lines with CRLF."""
    args = dataset[0]
    plain = evaluation.evaluate(*args)[89]
    gt_files = sorted(args[1].rglob("*_GT.csv"))
    if saved_as == "utf8_bom":
        for path in [args[0], *gt_files]:
            path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    else:
        for path in gt_files:
            path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    again = evaluation.evaluate(*args)[89]
    assert again["AP"] == plain["AP"] and again["seq_F1"] == plain["seq_F1"]
    assert again["precision_recall"] == plain["precision_recall"]


def test_error_output_or_gt_directory_that_is_a_file(dataset, tmp_path):
    args = dataset[0]
    taken = tmp_path / "taken"
    taken.write_text("a file")
    with pytest.raises(NotADirectoryError) as error:
        evaluation.evaluate(*args, out_dir=taken)
    assert error.value.filename == str(taken)
    assert "exists and is not a directory; expected a directory to write into" in error.value.strerror
    assert taken.read_text() == "a file"
    with pytest.raises(ValueError, match=rf"GT directory {taken} is a file; expected the directory"):
        evaluation.evaluate(args[0], taken, args[2])
    # The data root given for its GT folder (args[1] is <tmp_path>/GT): named, not its sequences.
    with pytest.raises(ValueError, match=rf"GT directory {tmp_path} holds a GT folder: give {args[1]} "):
        evaluation.evaluate(args[0], tmp_path, args[2])


def test_error_gt_directory_without_rig_folders(dataset, tmp_path):
    args = dataset[0]
    (args[1] / "beta_t2" / "02").rename(args[1] / "beta_t2" / "03")
    _expect_error(args, tmp_path, r"expected rig folders \('01', '02'\), found \['01', '03'\]")
    (args[1] / "beta_t2" / "03").rename(tmp_path / "beta_t2_rig02")
    # one rig missing (a partial download): refused, not evaluated on the other rig alone
    _expect_error(args, tmp_path, r"beta_t2: expected rig folders \('01', '02'\), found \['01'\]")
    (tmp_path / "beta_t2_rig02").rename(args[1] / "beta_t2" / "02")
    seq = args[1] / "gamma_t1"
    seq.mkdir()
    (seq / "gamma_t1-cam01_GT.csv").write_text("0,1,2,1,SPEAKING\n")
    _expect_error(args, tmp_path, r"gamma_t1: expected rig folders")


def test_error_gt_camera_in_the_wrong_rig(dataset, tmp_path):
    args = dataset[0]
    gt = args[1] / "alpha_t1" / "01" / "alpha_t1-cam03_GT.csv"
    gt.rename(args[1] / "alpha_t1" / "02" / "alpha_t1-cam03_GT.csv")
    _expect_error(args, tmp_path, r"camera cam03 is not a camera of rig 02")


def test_error_gt_file_named_after_another_sequence(dataset, tmp_path):
    args = dataset[0]
    folder = args[1] / "alpha_t1" / "01"
    (folder / "alpha_t1-cam01_GT.csv").rename(folder / "beta_t2-cam01_GT.csv")
    _expect_error(args, tmp_path, r"beta_t2-cam01_GT.csv: expected the name alpha_t1-camNN_GT.csv")


def test_hidden_folders_in_the_gt_directory_are_ignored(dataset):
    """A file manager's or a sync tool's hidden folders are not sequences or rigs."""
    args = dataset[0]
    plain = evaluation.evaluate(*args)[89]
    for hidden in (args[1] / ".cache", args[1] / "alpha_t1" / ".thumbnails"):
        hidden.mkdir()
        (hidden / "notes.csv").write_text("not a GT file\n")
    again = evaluation.evaluate(*args)[89]
    assert again["cells"] == plain["cells"] and again["AP"] == plain["AP"]


def test_error_gt_label_and_row_count(dataset, tmp_path):
    args = dataset[0]
    gt = args[1] / "beta_t2" / "01" / "beta_t2-cam01_GT.csv"
    original = gt.read_text()
    gt.write_text(original.replace(",SPEAKING\n", ",speaking\n", 1))
    _expect_error(args, tmp_path, r"beta_t2-cam01_GT.csv:\d+: label 'speaking'")
    gt.write_text(original + "21,5,5,1,SPEAKING\n")
    _expect_error(args, tmp_path, r"22 rows; expected a multiple of the sequence's 21 frames")
    gt.write_text(original.replace("\n", ",x\n", 1))
    _expect_error(args, tmp_path, r"beta_t2-cam01_GT.csv:1: expected 5 comma-separated fields")
    gt.write_text("")
    _expect_error(args, tmp_path, r"beta_t2-cam01_GT.csv: empty GT file")
    gt.write_text("0.5,12,1,1,SPEAKING\n" + original.split("\n", 1)[1])
    _expect_error(args, tmp_path, r"beta_t2-cam01_GT.csv:1: frame '0.5' is not an integer")
    gt.write_text("0,12,1,1,SPEAKING\n" + original.split("\n", 1)[1].replace(",", ",x", 1))
    _expect_error(args, tmp_path, r"beta_t2-cam01_GT.csv:2: x_px is 'x\d+'; expected a finite number")
    # Empty fields, first and in the middle of a line.
    gt.write_text(",12,1,1,SPEAKING\n" + original.split("\n", 1)[1])
    _expect_error(args, tmp_path, r"beta_t2-cam01_GT.csv:1: frame is ''; expected a finite number")
    gt.write_text("0,12,1,,SPEAKING\n" + original.split("\n", 1)[1])
    _expect_error(args, tmp_path, r"beta_t2-cam01_GT.csv:1: speaker_id is ''; expected a finite number")


def test_gt_reader_parses_every_column(tmp_path):
    path = tmp_path / "s_t1-cam01_GT.csv"
    path.write_text("0,-90,12,1,NOT_SPEAKING\n1,2212,0,2,SPEAKING\n2,10.5,7.25,1,SPEAKING\n")
    rows = evaluation.read_gt_file(path)
    np.testing.assert_array_equal(rows.frame, [0, 1, 2])
    np.testing.assert_array_equal(rows.x_px, [-90.0, 2212.0, 10.5])
    np.testing.assert_array_equal(rows.y_px, [12.0, 0.0, 7.25])
    np.testing.assert_array_equal(rows.speaker, [1, 2, 1])
    np.testing.assert_array_equal(rows.speaking, [False, True, True])
    assert rows.frame.dtype == np.int64 and rows.x_px.dtype == np.float64
    # Whole numbers only (the fast integer path), negative ones included, as np.loadtxt reads them.
    path.write_text("0,-90,12,1,NOT_SPEAKING\n1,2212,-3,2,SPEAKING\n2,-1,7,1,SPEAKING\n")
    rows = evaluation.read_gt_file(path)
    expected = np.loadtxt(path, delimiter=",", usecols=(0, 1, 2, 3))
    np.testing.assert_array_equal(rows.x_px, expected[:, 1])
    np.testing.assert_array_equal(rows.y_px, expected[:, 2])
    np.testing.assert_array_equal(rows.speaker, expected[:, 3])


def test_error_seq_length_that_would_split_a_monologue(reference_dir, tmp_path):
    """Half femalemonologue2_t3's length: its GT rows would read as two speakers, silently."""
    lengths = json.loads((reference_dir / "seq_lengths.json").read_text())
    lengths["femalemonologue2_t3"] = str(float(lengths["femalemonologue2_t3"]) / 2)
    half = int(round(float(lengths["femalemonologue2_t3"]) * 30))  # SPEC section 9
    gt = reference_dir / "GT" / "femalemonologue2_t3" / "01" / "femalemonologue2_t3-cam01_GT.csv"
    gt_lines = gt.read_text().splitlines()
    assert len(gt_lines) == 2 * half  # a whole number of "speakers": rows / F alone cannot tell
    frame = gt_lines[half].split(",")[0]
    (tmp_path / "seq_lengths.json").write_text(json.dumps(lengths))
    (tmp_path / "test_forward.csv").write_text("name,time,predicted x,confidence\n")
    args = (tmp_path / "test_forward.csv", reference_dir / "GT", tmp_path / "seq_lengths.json")
    _expect_error(args, tmp_path, rf"femalemonologue2_t3-cam01_GT.csv:{half + 1}: frame is "
                  rf"{frame}, expected 0; .*F = {half} frames of 'femalemonologue2_t3'")


def test_error_seq_length_that_would_merge_two_speakers(dataset, tmp_path):
    args = dataset[0]
    _edit(args[2], '"1.0"', '"2.0"')  # alpha_t1: 2 speakers of 30 frames read as 1 of 60
    _expect_error(args, tmp_path, r"alpha_t1-cam01_GT.csv:31: frame is 0, expected 30; .*F = 60 "
                  r"frames of 'alpha_t1', length 2.0 s")


def test_error_gt_speaker_id_changing_within_a_block(dataset, tmp_path):
    args = dataset[0]
    _set_field(args[1] / "alpha_t1" / "02" / "alpha_t1-cam12_GT.csv", 40, 3, "1")
    _expect_error(args, tmp_path, r"alpha_t1-cam12_GT.csv:40: speaker_id is 1, expected 2 as on "
                  r"line 31, the first of its block")


def test_error_gt_frame_column_out_of_order(dataset, tmp_path):
    args = dataset[0]
    gt = args[1] / "beta_t2" / "02" / "beta_t2-cam12_GT.csv"
    _edit(gt, "\n5,", "\n6,")
    _expect_error(args, tmp_path, r"beta_t2-cam12_GT.csv:6: frame is 6, expected 5")


def test_error_seq_length_of_zero_frames(dataset, tmp_path):
    args = dataset[0]
    _edit(args[2], '"0.7"', '"0.01"')
    _expect_error(args, tmp_path, r"beta_t2-cam01_GT.csv: F = 0 frames of 'beta_t2', length "
                  r"0.01 s in .*seq_lengths.json, under 1/60 s")


def test_error_cell_without_speech(dataset, tmp_path):
    args = dataset[0]
    for gt in (args[1] / "beta_t2" / "02").glob("*.csv"):
        gt.write_text(gt.read_text().replace(",SPEAKING", ",NOT_SPEAKING"))
    _expect_error(args, tmp_path, r"cells \['beta_t2/02'\] have no SPEAKING frame")


@pytest.mark.parametrize("bad, shown", [('"soon"', "'soon'"), ("true", "True"), ('"-1"', "'-1'"),
                                        ('"0"', "'0'")])
def test_error_seq_lengths_value(dataset, tmp_path, bad, shown):
    args = dataset[0]
    _edit(args[2], '"0.7"', bad)
    _expect_error(args, tmp_path, rf"length of 'beta_t2' is {shown}; expected positive seconds")


@pytest.mark.parametrize("tolerances", [(88.9,), (89, -1), (), (True,)])
def test_error_tolerance_that_is_not_whole_pixels(dataset, tmp_path, tolerances):
    """A fractional tolerance was evaluated at its integer part and filed under it."""
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"tolerances must be non-negative whole pixels"):
        evaluation.evaluate(*dataset[0], tolerances=tolerances, out_dir=out)
    assert not out.exists()


def test_error_compare_inputs(tmp_path):
    bad = tmp_path / "scores.txt"
    bad.write_text("1,2")
    with pytest.raises(ValueError, match="metrics_<tol>.json or an F1_scores"):
        evaluation.read_sequence_f1(bad)
    single = tmp_path / "F1_scores_89.pckl"
    single.write_bytes(pickle.dumps([np.float64(0.5)]))  # a t-test needs two sequences at least
    with pytest.raises(ValueError, match=r"F1_scores_89.pckl: expected at least 2 finite scores"):
        evaluation.read_f1_scores(single)
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"seq_F1": [0.5, 0.6, 0.7], "cells": ["s/01", "s/02", "t/01"]}))
    b.write_text(json.dumps({"seq_F1": [0.5, 0.6], "cells": ["s/01", "s/02"]}))
    with pytest.raises(ValueError, match="3 sequence-wise F1 values"):
        evaluation.compare_sequence_f1(a, b)
    b.write_text(json.dumps({"seq_F1": [0.4, 0.5, 0.6], "cells": ["s/01", "t/01", "s/02"]}))
    with pytest.raises(ValueError, match=r"a.json and .*b.json describe different cells"):
        evaluation.compare_sequence_f1(a, b)
    b.write_text(json.dumps({"seq_F1": [0.4, 0.5, 0.6]}))
    with pytest.raises(ValueError, match=r"b.json: expected a 'cells' list of 3 names"):
        evaluation.compare_sequence_f1(a, b)
    # F1 at two tolerances does not pair (the tolerance from a JSON's inputs or a .pckl's name)
    b.write_text(json.dumps({"seq_F1": [0.4, 0.5, 0.6], "cells": ["s/01", "s/02", "t/01"],
                             "tolerance_px": 222}))
    released = tmp_path / "F1_scores_89.pckl"
    released.write_bytes(pickle.dumps([np.float64(v) for v in (0.5, 0.6, 0.7)]))
    with pytest.raises(ValueError, match=r"tolerance of 89 px and .*b.json at 222 px"):
        evaluation.compare_sequence_f1(released, b)


def _binary(text):
    """`text` with bytes that are not UTF-8 (0x83: a continuation byte with no lead) on its
    third line."""
    lines = text.encode().split(b"\n")
    lines[2] = lines[2][:6] + b"\x83\x84" + lines[2][6:]
    return b"\n".join(lines)


@pytest.mark.parametrize("which", ["forward", "gt", "seq_lengths", "metrics"])
def test_error_file_that_is_not_utf8_text_is_named_with_its_line(dataset, tmp_path, which):
    """UnicodeDecodeError said only "'utf-8' codec can't decode byte 0x83 in position 6"."""
    args = list(dataset[0])
    if which == "metrics":
        other = tmp_path / "metrics_89.json"
        other.write_text(json.dumps({"seq_F1": [0.5, 0.6], "cells": ["a/01", "a/02"]}, indent=2))
        bad = tmp_path / "binary_89.json"
        bad.write_bytes(_binary(other.read_text()))
        call = lambda: evaluation.compare_sequence_f1(other, bad)
    else:
        bad = {"forward": args[0], "gt": sorted(args[1].rglob("*_GT.csv"))[1],
               "seq_lengths": args[2]}[which]
        if which == "seq_lengths":
            bad.write_text(json.dumps(json.loads(bad.read_text()), indent=2))
        bad.write_bytes(_binary(bad.read_text()))
        call = lambda: evaluation.evaluate(*args, out_dir=tmp_path / "out")
    expected = {"forward": "a CSV file of the fields 'name,time,predicted x,confidence'",
                "gt": "a CSV file of the fields 'frame,x_px,y_px,speaker_id,label'",
                "seq_lengths": "a JSON object {sequence: seconds}",
                "metrics": "a metrics JSON with a 'seq_F1' list"}[which]
    with pytest.raises(ValueError, match=rf"^{re.escape(str(bad))}:3: not UTF-8 text \(byte 0x83 at offset \d+\); "
                                         rf"expected {re.escape(expected)}"):
        call()
    assert not (tmp_path / "out").exists()


def test_error_binary_file_with_nul_bytes_is_not_text(dataset, tmp_path):
    """A WAV given as the forward file: its header is valid UTF-8, NUL bytes and all."""
    args = dataset[0]
    args[0].write_bytes(b"RIFF\x24\x08\x00\x00WAVEfmt \x10\x00\x00\x00" + bytes(range(256)) * 10)
    _expect_error(args, tmp_path, rf"^{re.escape(str(args[0]))}:1: not a text file \(a NUL byte at offset 6\); "
                                  "expected a CSV file")


def test_error_messages_quote_a_bounded_excerpt(dataset, tmp_path):
    """A 3 MB file without a line break gave a 6.5 MB error; every quote of file content is now
    the repr of its first EXCERPT_CHARS characters, "..." where cut, and printable."""
    args = dataset[0]
    original = args[0].read_text()
    limit = textfiles.EXCERPT_CHARS
    shown = re.escape(repr("a" * limit) + "...")
    cases = [
        ("a" * 3_000_000, rf"expected the header .*, got {shown}$"),
        (original.replace("\n", "\n" + "b" * 100_000 + "\n", 1),
         rf"test_forward.csv:2: expected 4 comma-separated fields .*, got 1: {repr('b' * limit)}\.\.\.$"),
        (original.replace("\n", "\n" + "alpha_t1-cam01,0.0,0.5," + "9" * 300 + "\n", 1),
         rf"test_forward.csv:2: confidence is {repr('9' * limit)}\.\.\.; expected a value in \[0, 1\]"),
        (original.replace("beta_t2-cam05,", "x" * 100_000 + "-cam99,", 1),
         rf"unknown camera name {repr('x' * limit)}\.\.\.; expected <sequence>-camNN"),
    ]
    for text, match in cases:
        args[0].write_text(text)
        with pytest.raises(ValueError, match=match) as error:
            evaluation.evaluate(*args)
        message = str(error.value)
        assert len(message) < 2 * limit + 300 and message.isprintable(), message[:1000]
    args[0].write_text(original)
    # a JSON value
    lengths = json.loads(args[2].read_text())
    args[2].write_text(json.dumps({**lengths, "beta_t2": "\x07" + "s" * 100_000}))
    _expect_error(args, tmp_path, "length of 'beta_t2' is " + re.escape(repr("\x07" + "s" * (limit - 1)))
                  + r"\.\.\.; expected positive seconds$")
    # short content is quoted whole
    assert textfiles.excerpt(b"abc") == "'abc'" and textfiles.excerpt([1, 2]) == "[1, 2]"
    assert textfiles.excerpt(b"\x83\x00z") == "'\ufffd\\x00z'"  # printable


# ----------------------------------------------------------------------------------------
# The binaries.
# ----------------------------------------------------------------------------------------


def _run(*argv):
    return subprocess.run([sys.executable, "-m", *argv], cwd=REPO_ROOT, capture_output=True,
                          text=True, check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}).stdout


def test_evaluate_and_compare_binaries(dataset, tmp_path):
    (forward_csv, gt_dir, lengths), files, cells = dataset
    out = tmp_path / "out"
    stdout = _run("experiments.evaluate", f"--forward_csv={forward_csv}", f"--gt_dir={gt_dir}",
                  f"--seq_lengths={lengths}", "--tolerance=89,222", f"--out_dir={out}", "--info=syn")
    ref = loop_reference(files, 89, len(cells))
    assert f"syn - AP = {ref['AP']:f}" in stdout and f"syn - F1 score: {ref['F1']:f}" in stdout
    assert f"syn - aD mean: {ref['aD']:f} pixels" in stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "metrics_222.json", "metrics_89.json", "precision_recall_222_sigmoid.csv",
        "precision_recall_89_sigmoid.csv"]
    # A second system: the same rows with the confidence of every other row halved.
    lines = forward_csv.read_text().splitlines()
    other_csv = tmp_path / "other_forward.csv"
    other_csv.write_text("\n".join([lines[0]] + [
        ",".join([*line.split(",")[:3], repr(float(line.split(",")[3]) / (2 if i % 2 else 1))])
        for i, line in enumerate(lines[1:])]) + "\n")
    other = tmp_path / "other"
    _run("experiments.evaluate", f"--forward_csv={other_csv}", f"--gt_dir={gt_dir}",
         f"--seq_lengths={lengths}", "--tolerance=89", f"--out_dir={other}")
    # Into the first system's out_dir: refused, then replaced whole with --overwrite.
    again = [sys.executable, "-m", "experiments.evaluate", f"--forward_csv={other_csv}",
             f"--gt_dir={gt_dir}", f"--seq_lengths={lengths}", "--tolerance=89", f"--out_dir={out}"]
    result = subprocess.run(again, cwd=REPO_ROOT, capture_output=True, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"error: {out} holds the results of an evaluation already (metrics_222.json, ")
    replaced = tmp_path / "replaced"
    shutil.copytree(out, replaced)
    _run(*again[2:-1], f"--out_dir={replaced}", "--overwrite")
    assert sorted(p.name for p in replaced.iterdir()) == ["metrics_89.json", "precision_recall_89_sigmoid.csv"]
    assert (replaced / "metrics_89.json").read_text() == (other / "metrics_89.json").read_text()
    stdout = _run("experiments.compare", str(out / "metrics_89.json"), str(other / "metrics_89.json"))
    a = json.loads((out / "metrics_89.json").read_text())["seq_F1"]
    b = json.loads((other / "metrics_89.json").read_text())["seq_F1"]
    assert a != b
    expected = scipy.stats.ttest_rel(a, b, alternative="greater")
    assert f"t = {expected.statistic:.6f}, one-sided p = {expected.pvalue:.6f}" in stdout
    # F1 of one system at two tolerances (the files evaluate wrote): not a paired comparison.
    result = subprocess.run([sys.executable, "-m", "experiments.compare", str(out / "metrics_222.json"),
                             str(out / "metrics_89.json")], cwd=REPO_ROOT, capture_output=True, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 1
    assert result.stderr.strip().endswith("metrics_222.json holds F1 at a tolerance of 222 px and "
                                          f"{out / 'metrics_89.json'} at 89 px: a paired test "
                                          "compares two systems at one tolerance")
    # A system against itself: no variance, said in words rather than printed as t = nan.
    stdout = _run("experiments.compare", str(out / "metrics_89.json"), str(out / "metrics_89.json"))
    assert "paired t-test undefined: every pair of sequence-wise F1 values is equal" in stdout
    # The same F1 computed another way (rounding noise of 1e-13): said, not tested.
    noisy = json.loads((out / "metrics_89.json").read_text())
    noisy["seq_F1"] = [v + (1e-13 if i % 2 else -2e-13) for i, v in enumerate(noisy["seq_F1"])]
    (tmp_path / "noisy_89.json").write_text(json.dumps(noisy))
    stdout = _run("experiments.compare", str(out / "metrics_89.json"), str(tmp_path / "noisy_89.json"))
    assert ("paired t-test not run: A and B agree to within floating-point rounding (largest "
            "difference 2.0e-13)") in stdout and "t = " not in stdout
    # The AP quirk's switch, by its name and by its earlier name (an absl alias).
    rows = np.array(loop_reference(files, 89, len(cells))["rows"])
    for switch in ("--nodrop_single_row_last_run", "--noap_last_run_quirk"):
        counted = tmp_path / switch.strip("-")
        _run("experiments.evaluate", f"--forward_csv={forward_csv}", f"--gt_dir={gt_dir}",
             f"--seq_lengths={lengths}", "--tolerance=89", f"--out_dir={counted}", switch)
        saved = json.loads((counted / "metrics_89.json").read_text())
        assert saved["drop_single_row_last_run"] is False
        assert saved["AP"] == pytest.approx(loop_ap(rows[:, 3], rows[:, 4], False), abs=1e-12)


def test_forward_cameras_without_a_gt_file_are_left_out_with_a_warning(dataset, caplog):
    args, files, _ = dataset
    with caplog.at_level(logging.WARNING, logger="absl"):
        frames = evaluation.load_frames(*args)
    assert frames.cell.shape[0] == sum(len(frame_data) for _, frame_data in files)
    warnings = [r.getMessage() for r in caplog.records if "no GT file" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].endswith(": " + ", ".join(sorted(f"{seq}-cam05" for seq in SEQUENCES)))
    assert not [r for r in caplog.records if "no GT folder" in r.getMessage()]


def test_forward_sequence_without_a_gt_folder_is_left_out_with_a_warning(dataset, caplog):
    """A partial GT download that lacks a whole sequence changes every metric: it is named."""
    args, files, cells = dataset
    dropped = sorted(SEQUENCES)[0]
    shutil.rmtree(args[1] / dropped)
    with caplog.at_level(logging.WARNING, logger="absl"):
        frames = evaluation.load_frames(*args)
    assert list(frames.cells) == [c for c in cells if not c.startswith(dropped + "/")]
    warnings = [r.getMessage() for r in caplog.records if "no GT folder" in r.getMessage()]
    assert warnings == [f"{args[0]}: 1 sequence(s) with forward rows but no GT folder in {args[1]}, "
                        f"left out of the metrics as the reference does: {dropped}"]


def test_evaluate_error_on_a_bad_input_file_is_one_bounded_line_naming_it(dataset, tmp_path):
    """The binary said "error: 'utf-8' codec can't decode byte 0x83 in position 6" (no file) for
    a binary seq_lengths.json, and echoed a 3 MB first line whole for a forward file."""
    forward_csv, gt_dir, lengths = dataset[0]
    binary = tmp_path / "binary.json"
    binary.write_bytes(b'{"a": "\x83"}')
    huge = tmp_path / "huge.csv"
    huge.write_text("a" * 3_000_000)
    for flags, bad in (([f"--forward_csv={forward_csv}", f"--seq_lengths={binary}"], binary),
                       ([f"--forward_csv={huge}", f"--seq_lengths={lengths}"], huge)):
        result = subprocess.run([sys.executable, "-m", "experiments.evaluate", *flags,
                                 f"--gt_dir={gt_dir}"], cwd=REPO_ROOT, capture_output=True,
                                text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
        assert result.returncode == 1
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith(f"error: {bad}:1: "), result.stderr[:1000]
        assert len(errors[0]) < 400, errors[0][:1000]
