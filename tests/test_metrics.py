"""asd_jax.metrics against a plain-Python transcription of SPEC section 9 and hand-made cases."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from asd_jax import metrics

# ----------------------------------------------------------------------------------------
# Independent reference: straightforward loops transcribing SPEC section 9.
# ----------------------------------------------------------------------------------------


def spec_thresholds():
    """The reference's evaluation order: (1 / (1 + e^(-c/4))) * 100 (SPEC writes 100 / (...))."""
    return [(1 / (1 + math.exp(-c / 4))) * 100 for c in range(50, -50, -1)] + [0.0]


def loop_precision_recall_rows(frames, tolerance, thresholds):
    """frames: list of (conf, x_pred, speaking, x_gt). Returns rows [tp, gt, pp, p, r]."""
    rows = []
    for thr in thresholds:
        tp = gt = pp = 0
        for conf, x, speaking, x_gt in frames:
            if speaking:
                gt += 1
                if conf * 100 >= thr and abs(x * 2448 - x_gt) <= tolerance:
                    tp += 1
            if conf * 100 >= thr:
                pp += 1
        p = 0.0 if pp == 0 else round(tp / pp, 12)
        r = 0.0 if gt == 0 else tp / gt
        rows.append([tp, gt, pp, p, r])
    return rows


def loop_ap(precision, recall, drop_last_single=True):
    p = list(precision)
    for i in range(len(p)):
        p[i] = max(p[i:])
    # runs of equal precision
    runs = []
    start = 0
    for i in range(1, len(p) + 1):
        if i == len(p) or p[i] != p[start]:
            runs.append((start, i - 1))
            start = i
    area = 0.0
    for k, (a, b) in enumerate(runs):
        if drop_last_single and k == len(runs) - 1 and a == b:
            continue
        before = 0.0 if a == 0 else recall[a - 1]
        area += p[a] * (recall[b] - before)
    return area


def loop_best_f1(precision, recall):
    p = list(precision)
    for i in range(len(p)):
        p[i] = max(p[i:])
    best, row = 0.0, 0
    for i in range(len(p)):
        if p[i] + recall[i] > 0:
            f1 = 2 * p[i] * recall[i] / (p[i] + recall[i])
            if f1 > best:
                best, row = f1, i
    return best, row


def loop_reference(files, tolerance, num_cells, thresholds=None):
    """files: list of (cell, frames). Overall AP/F1/row, seq F1, aD, det err (SPEC 9 loops)."""
    thresholds = thresholds or spec_thresholds()
    all_frames = [f for _, frames in files for f in frames]
    overall = loop_precision_recall_rows(all_frames, tolerance, thresholds)
    precision = [r[3] for r in overall]
    recall = [r[4] for r in overall]
    ap = loop_ap(precision, recall)
    f1, row = loop_best_f1(precision, recall)
    seq_f1, ad, acc = [], [], []
    for c in range(num_cells):
        frames = [f for cell, fr in files if cell == c for f in fr]
        rows = loop_precision_recall_rows(frames, tolerance, thresholds)
        p, r = rows[row][3], rows[row][4]
        seq_f1.append(0.0 if p + r == 0 else 2 * p * r / (p + r))
        correct = wrong = n = 0
        dist = 0.0
        for conf, x, speaking, x_gt in frames:
            if (conf >= 0.5 and speaking) or (conf < 0.5 and not speaking):
                correct += 1
                if conf >= 0.5 and speaking:
                    n += 1
                    dist += abs(x_gt - x * 2448)
            else:
                wrong += 1
        ad.append(dist / n if n else float("nan"))
        acc.append(correct / (correct + wrong))
    return {"rows": overall, "AP": ap, "F1": f1, "F1_row": row, "seq_F1": seq_f1,
            "aD_cells": ad, "aD": float(np.mean(ad)), "aD_se": float(np.std(ad, ddof=1) / np.sqrt(len(ad))),
            "det_err": 100 * (1 - float(np.mean(acc))),
            "det_err_se": float(np.std(acc, ddof=1) / np.sqrt(len(acc)))}


def random_frames(rng, n, tie_fraction=0.2):
    """Frames with ties: confidences exactly on thresholds, distances exactly on tolerances."""
    conf = rng.uniform(0, 1, n)
    thresholds = np.array(metrics.CONFIDENCE_THRESHOLDS_PCT)
    on_threshold = rng.uniform(size=n) < tie_fraction
    conf[on_threshold] = thresholds[rng.integers(0, 101, on_threshold.sum())] / 100
    conf[: 3] = [0.5, 0.0, 1.0]
    x_gt = rng.integers(0, 2448, n).astype(float)
    offset = rng.choice([0.0, 44.5, 89.0, -89.0, 88.5, 89.5, 222.0, 300.0], n)
    x_pred = (x_gt + offset) / 2448
    speaking = rng.uniform(size=n) < 0.6
    return conf, x_pred, speaking, x_gt


def run_counts(conf, x_pred, speaking, x_gt, cell, num_cells, tolerances):
    decisions = metrics.decide_frames(conf, x_pred, x_gt, np.array(tolerances, float))
    counts = metrics.count_frames(
        jnp.asarray(decisions.first_row), jnp.asarray(decisions.localised),
        jnp.asarray(decisions.detected), jnp.asarray(speaking), jnp.asarray(cell, jnp.int32),
        num_cells=num_cells)
    return decisions, counts


# ----------------------------------------------------------------------------------------
# Tests.
# ----------------------------------------------------------------------------------------


def test_thresholds_follow_the_sigmoid_rule():
    expected = np.array([100 / (1 + math.exp(-c / 4)) for c in range(50, -50, -1)] + [0.0])
    np.testing.assert_allclose(metrics.CONFIDENCE_THRESHOLDS_PCT, expected, rtol=1e-15, atol=0)
    assert metrics.CONFIDENCE_THRESHOLDS_PCT.shape == (101,)
    assert metrics.CONFIDENCE_THRESHOLDS_PCT[50] == 50.0 and metrics.CONFIDENCE_THRESHOLDS_PCT[-1] == 0.0
    assert np.all(np.diff(metrics.CONFIDENCE_THRESHOLDS_PCT) < 0)


def test_thresholds_equal_the_released_first_column(reference_dir):
    lines = (reference_dir / "released" / "ASCs" / "precision_recall_89_sigmoid.csv").read_text().splitlines()
    released = np.array([float(line.split(",")[0]) for line in lines[1:]])
    np.testing.assert_array_equal(metrics.CONFIDENCE_THRESHOLDS_PCT, released)


def test_counts_match_the_loop_transcription_for_all_cells_and_tolerances():
    rng = np.random.default_rng(0)
    n, num_cells, tolerances = 600, 3, (89, 222)
    conf, x_pred, speaking, x_gt = random_frames(rng, n)
    cell = rng.integers(0, num_cells, n)
    cell[-20:] = num_cells  # padding frames must be dropped
    _, counts = run_counts(conf, x_pred, speaking, x_gt, cell, num_cells, tolerances)
    thresholds = spec_thresholds()
    for t, tol in enumerate(tolerances):
        for c in range(num_cells):
            frames = [(conf[i], x_pred[i], speaking[i], x_gt[i]) for i in range(n) if cell[i] == c]
            rows = np.array(loop_precision_recall_rows(frames, tol, thresholds))
            np.testing.assert_array_equal(np.asarray(counts.true_pos[t, c]), rows[:, 0])
            np.testing.assert_array_equal(np.asarray(counts.pred_pos[c]), rows[:, 2])
            assert int(counts.gt_pos[c]) == rows[0, 1]
    for name in ("true_pos", "pred_pos", "gt_pos", "correct", "wrong", "detected_speaking"):
        assert getattr(counts, name).dtype == jnp.int32


def test_tie_at_a_threshold_counts_as_positive():
    # 100 * 0.5 == 50.0 is exactly row 50's threshold: positive there, not at row 49.
    conf = np.array([0.5])
    _, counts = run_counts(conf, np.array([0.5]), np.array([True]), np.array([1224.0]),
                           np.array([0]), 1, (89,))
    pred = np.asarray(counts.pred_pos[0])
    assert pred[49] == 0 and pred[50] == 1 and pred[100] == 1
    np.testing.assert_array_equal(np.asarray(counts.true_pos[0, 0]), pred)


def test_distance_on_the_tolerance_uses_float64():
    # 2448 * (671 / 2448) lands just above 671, so the distance to 582 px is 89.00000000000011:
    # outside 89 px in float64 (the reference), inside in float32.
    x_pred = np.array([671 / 2448])
    assert x_pred[0] * 2448 - 582 > 89
    assert np.float32(x_pred[0]) * np.float32(2448) - np.float32(582) <= 89
    decisions = metrics.decide_frames(np.array([1.0]), x_pred, np.array([582.0]), np.array([89.0]))
    assert not decisions.localised[0, 0]
    inside = metrics.decide_frames(np.array([1.0]), np.array([670 / 2448]), np.array([582.0]),
                                   np.array([89.0]))
    assert inside.localised[0, 0]


def test_precision_rounding_and_zero_predictions():
    p, r = metrics.precision_recall(np.array([1, 0, 2]), np.array(3), np.array([3, 0, 7]))
    np.testing.assert_array_equal(p, [round(1 / 3, 12), 0.0, round(2 / 7, 12)])
    np.testing.assert_array_equal(r, [1 / 3, 0.0, 2 / 3])  # SPEC section 9: recall unrounded
    # No GT positives (the reference divides by zero there): recall 0, as documented, not nan.
    p, r = metrics.precision_recall(np.array([0, 0]), np.array(0), np.array([2, 0]))
    np.testing.assert_array_equal(p, [0.0, 0.0])
    np.testing.assert_array_equal(r, [0.0, 0.0])


def test_monotone_precision():
    np.testing.assert_array_equal(metrics.monotone_precision([0.5, 0.9, 0.7, 0.8, 0.1]),
                                  [0.9, 0.9, 0.8, 0.8, 0.1])


def test_average_precision_drops_a_single_row_last_run():
    p, r = [1.0, 1.0, 0.5], [0.2, 0.4, 0.9]
    assert metrics.average_precision(p, r) == pytest.approx(0.4, abs=1e-15)
    assert metrics.average_precision(p, r, drop_single_row_last_run=False) == pytest.approx(0.65)
    # a last run of two rows is counted
    assert metrics.average_precision([1.0, 0.5, 0.5], [0.2, 0.6, 0.9]) == pytest.approx(0.55)
    # runs start from the recall of the row before the run; monotone precision first
    p, r = [0.9, 0.8, 0.95, 0.6, 0.6], [0.1, 0.3, 0.4, 0.7, 0.8]
    expected = 0.95 * 0.4 + 0.6 * (0.8 - 0.4)
    assert metrics.average_precision(p, r) == pytest.approx(expected, abs=1e-15)
    assert metrics.average_precision([0.7], [0.3]) == 0.0


def test_average_precision_and_f1_match_the_loops_on_random_curves():
    rng = np.random.default_rng(1)
    for _ in range(30):
        n = int(rng.integers(2, 40))
        p = np.round(rng.choice([0.2, 0.5, 0.5, 0.7, 0.9, 1.0], n), 12)
        r = np.sort(rng.choice([0.0, 0.1, 0.3, 0.6, 0.8], n))
        assert metrics.average_precision(p, r) == pytest.approx(loop_ap(p, r), abs=1e-12)
        assert metrics.average_precision(p, r, drop_single_row_last_run=False) == pytest.approx(
            loop_ap(p, r, drop_last_single=False), abs=1e-12)
        f1, row = metrics.best_f1(p, r)
        ref_f1, ref_row = loop_best_f1(p, r)
        assert row == ref_row and f1 == pytest.approx(ref_f1, abs=1e-15)


def test_best_f1_rules():
    # p + r == 0 never wins; all-zero gives F1 0 at row 0
    assert metrics.best_f1([0.0, 0.0, 0.0], [0.0, 0.0, 0.0]) == (0.0, 0)
    f1, row = metrics.best_f1([0.0, 0.5, 0.5], [0.0, 0.5, 0.5])
    assert row == 1 and f1 == pytest.approx(0.5)  # first row reaching the max wins
    # uses the monotone precision: row 0's precision is lifted to 1.0 by row 1
    f1, row = metrics.best_f1([0.2, 1.0, 0.1], [0.5, 0.5, 0.9])
    assert row == 0 and f1 == pytest.approx(2 * 0.5 / 1.5)


def test_sequence_f1_cell_without_true_positives_is_zero():
    precision = np.array([[0.5, 0.8], [0.0, 0.0]])
    recall = np.array([[0.5, 0.2], [0.0, 0.0]])
    np.testing.assert_allclose(metrics.sequence_f1(precision, recall, 1), [2 * 0.16 / 1.0, 0.0])


def test_sequence_f1_reads_the_stored_precision_not_the_monotone_one():
    """SPEC section 9 takes each cell's F1 at the overall best row from its PR rows as saved;
    unlike the overall F1, the precision there is not made monotone first. At row 1 the cell's
    stored precision 0.3 gives 2*0.3*0.2/0.5 = 0.24 (the monotone 0.6 would give 0.3)."""
    precision = np.array([[0.9, 0.3, 0.6], [0.5, 0.5, 0.5]])
    recall = np.array([[0.1, 0.2, 0.3], [0.5, 0.5, 0.5]])
    np.testing.assert_allclose(metrics.sequence_f1(precision, recall, 1), [0.24, 0.5], rtol=1e-15)


def test_speaker_union_first_speaking_speaker_wins():
    speaking = np.array([[False, False], [True, False], [False, True], [True, True]]).T  # (S, F)
    x = np.array([[10.0, 20.0], [11.0, 21.0], [12.0, 22.0], [13.0, 23.0]]).T
    union, x_gt = metrics.speaker_union(speaking, x)
    np.testing.assert_array_equal(union, [False, True, True, True])
    np.testing.assert_array_equal(x_gt, [0.0, 11.0, 22.0, 13.0])


def test_detection_summary_matches_the_loops():
    rng = np.random.default_rng(2)
    n, num_cells = 400, 4
    conf, x_pred, speaking, x_gt = random_frames(rng, n)
    cell = np.repeat(np.arange(num_cells), n // num_cells)
    decisions, counts = run_counts(conf, x_pred, speaking, x_gt, cell, num_cells, (89,))
    sums = np.bincount(cell, weights=np.where(decisions.detected & speaking, decisions.distance_px, 0),
                       minlength=num_cells)
    summary = metrics.detection_summary(sums, counts.detected_speaking, counts.correct, counts.wrong)
    files = [(c, [(conf[i], x_pred[i], speaking[i], x_gt[i]) for i in np.flatnonzero(cell == c)])
             for c in range(num_cells)]
    ref = loop_reference(files, 89, num_cells)
    assert summary.aD == pytest.approx(ref["aD"], abs=1e-9)
    assert summary.aD_se == pytest.approx(ref["aD_se"], abs=1e-9)
    assert summary.det_err == pytest.approx(ref["det_err"], abs=1e-9)
    assert summary.det_err_se == pytest.approx(ref["det_err_se"], abs=1e-12)
    assert summary.undefined_cells == ()


def test_detection_summary_undefined_ad():
    summary = metrics.detection_summary(np.array([10.0, 0.0]), np.array([2, 0]), np.array([5, 3]),
                                        np.array([1, 1]))
    assert summary.aD is None and summary.aD_se is None
    assert summary.undefined_cells == (1,)
    assert summary.aD_cells[0] == 5.0 and math.isnan(summary.aD_cells[1])
    assert summary.det_err == pytest.approx(100 * (1 - (5 / 6 + 3 / 4) / 2))


def test_detection_summary_of_one_cell_has_no_standard_error_and_refuses_empty_cells():
    one = metrics.detection_summary(np.array([12.0]), np.array([3]), np.array([4]), np.array([1]))
    assert one.aD == 4.0 and one.det_err == pytest.approx(100 * (1 - 4 / 5))
    assert one.aD_se is None and one.det_err_se is None  # std with ddof 1 needs two cells
    with pytest.raises(ValueError, match="a cell has no frames"):
        metrics.detection_summary(np.array([1.0, 0.0]), np.array([1, 0]), np.array([2, 0]),
                                  np.array([1, 0]))


def test_paired_ttest_matches_scipy():
    rng = np.random.default_rng(3)
    a, b = rng.uniform(size=10), rng.uniform(size=10)
    ours = metrics.paired_ttest_greater(a, b)
    ref = scipy.stats.ttest_rel(a, b, alternative="greater")
    assert ours.t == pytest.approx(ref.statistic, rel=1e-12)
    assert ours.p == pytest.approx(ref.pvalue, rel=1e-10)
    assert ours.df == 9
    with pytest.raises(ValueError, match="at least 2"):
        metrics.paired_ttest_greater([1.0], [0.0])


def test_decide_frames_rejects_unsorted_thresholds():
    with pytest.raises(ValueError, match="descending"):
        metrics.decide_frames(np.ones(2), np.ones(2), np.ones(2), np.array([89.0]),
                              thresholds_pct=np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="strictly descending"):  # a repeated threshold too
        metrics.decide_frames(np.ones(2), np.ones(2), np.ones(2), np.array([89.0]),
                              thresholds_pct=np.array([2.0, 2.0, 1.0]))


@pytest.mark.parametrize("argument", ["confidence", "x_pred", "x_gt_px", "tolerances_px",
                                      "thresholds_pct"])
def test_decide_frames_rejects_non_finite_values(argument):
    """A NaN confidence on a NOT_SPEAKING frame would count as correct twice over (both of the
    reference's comparisons are False); every input must be finite, the bad one named."""
    values = {"confidence": np.array([0.2, 0.9, 0.4]), "x_pred": np.full(3, 0.5),
              "x_gt_px": np.zeros(3), "tolerances_px": np.array([89.0, 222.0]),
              "thresholds_pct": np.array([90.0, 50.0, 10.0])}
    values[argument] = values[argument].copy()
    values[argument][1] = np.nan
    with pytest.raises(ValueError, match=rf"decide_frames: {argument}\[1\] is nan; expected finite"):
        metrics.decide_frames(**values)


def test_frames_beyond_the_kept_rows_count_in_no_row_of_any_cell():
    """With more thresholds than counted rows, a frame positive only past the last kept row
    counts nowhere: not in the next cell's first rows."""
    thresholds = np.linspace(100.0, 0.0, 201)  # 201 rows, the default count keeps 101
    decisions = metrics.decide_frames(np.array([0.1, 0.1, 0.95]), np.full(3, 0.5),
                                      np.full(3, 1224.0), np.array([89.0]), thresholds)
    assert decisions.first_row.tolist() == [180, 180, 10]
    counts = metrics.count_frames(
        jnp.asarray(decisions.first_row), jnp.asarray(decisions.localised),
        jnp.asarray(decisions.detected), jnp.ones(3, bool), jnp.array([0, 0, 1], jnp.int32),
        num_cells=2)
    expected_cell_1 = (np.arange(metrics.N_THRESHOLDS) >= 10).astype(int)  # the 0.95 frame only
    np.testing.assert_array_equal(np.asarray(counts.pred_pos[0]), 0)
    np.testing.assert_array_equal(np.asarray(counts.pred_pos[1]), expected_cell_1)
    np.testing.assert_array_equal(np.asarray(counts.true_pos[0, 1]), expected_cell_1)
