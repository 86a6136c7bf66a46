"""The paper's evaluation metrics (SPEC section 9), as pure functions of arrays.

The evaluation has three stages; only the middle one is where the work is:

1. `decide_frames` (numpy float64, vectorised): every per-frame comparison the reference
   makes in float64 -- `100 * confidence >= threshold` for the 101 thresholds, `|2448 * x -
   x_gt| <= tolerance`, `confidence >= 0.5` -- turned into integers and booleans. It runs in
   float64 on purpose: released forward files hold half-pixel positions, so distances land
   exactly on an integer tolerance where float32 and float64 disagree (89.00000000000011 > 89
   in float64, == 89 in float32). With the decisions fixed in float64, everything that
   follows is exact integer counting.
2. `count_frames` (JAX, jitted, int32): precision/recall counts for all thresholds, all
   tolerances and all cells at once, and the detection counts at 0.5. Frames of all GT files
   are one flat, padded array with a cell index; counts are segment sums.
3. The finishing statistics in numpy float64 (`precision_recall`, `average_precision`,
   `best_f1`, `sequence_f1`, `detection_summary`, `paired_ttest_greater`). They act on a few
   hundred numbers, and float32 cannot give them to 1e-6: precision is rounded to 12
   digits, AP's runs are defined by exact equality of those rounded values, and aD is a mean
   of ~80k distances of ~25 px (float32 resolution at 25 is 2e-6).

Names: a "cell" is one (sequence, rig) pair; a "row" is one of the 101 confidence
thresholds, in the reference's descending order.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import scipy.special

from asd_jax import constants

# Percent thresholds: (1 / (1 + e^(-c/4))) * 100 for c = 50, 49, ..., -49, then 0.0.
# Evaluated exactly as the reference does (scalar libm exp, divide first, then * 100): this
# reproduces the released files' first column bit for bit, while `100 / (1 + e^(-c/4))`
# differs in the last bit on 32 rows and numpy's vectorised exp on one.
CONFIDENCE_THRESHOLDS_PCT = np.array(
    [(1.0 / (1.0 + math.exp(-c / 4))) * 100.0 for c in range(50, -50, -1)] + [0.0],
    dtype=np.float64,
)
CONFIDENCE_THRESHOLDS_PCT.setflags(write=False)
N_THRESHOLDS = CONFIDENCE_THRESHOLDS_PCT.shape[0]  # 101
DETECTION_THRESHOLD = 0.5  # confidence (not percent) for aD and detection error
PRECISION_DIGITS = 12  # the reference rounds precision (not recall) to 12 decimals


class FrameDecisions(NamedTuple):
    """Per-frame outcomes of the reference's float64 comparisons, N frames, T tolerances.

    first_row: (N,) int32 in [0, R]: the first threshold row at which the frame counts as a
      predicted positive (`100 * conf >= threshold`); R (number of rows) if none. Thresholds
      descend, so the frame is positive at every row >= first_row.
    localised: (N, T) bool, `|2448 * x_pred - x_gt_px| <= tolerance_px[t]`.
    detected: (N,) bool, `conf >= 0.5`.
    distance_px: (N,) float64, `|x_gt_px - 2448 * x_pred|` in pixels.
    """

    first_row: np.ndarray
    localised: np.ndarray
    detected: np.ndarray
    distance_px: np.ndarray


def decide_frames(
    confidence: np.ndarray,
    x_pred: np.ndarray,
    x_gt_px: np.ndarray,
    tolerances_px: np.ndarray,
    thresholds_pct: np.ndarray = CONFIDENCE_THRESHOLDS_PCT,
    image_width_px: int = constants.IMAGE_WIDTH_PX,
) -> FrameDecisions:
    """Makes the reference's float64 per-frame comparisons (vectorised numpy, no loops).

    Args:
      confidence: (N,) predicted speech confidence in [0, 1].
      x_pred: (N,) predicted horizontal position, normalised to [0, 1] of the image width.
      x_gt_px: (N,) ground-truth position in pixels (any value on NOT_SPEAKING frames).
      tolerances_px: (T,) localisation tolerances in pixels.
      thresholds_pct: (R,) strictly descending confidence thresholds in percent.
      image_width_px: pixels per unit of `x_pred`.

    Returns:
      FrameDecisions (see there); all comparisons in float64 exactly as the reference.
    """
    confidence = np.asarray(confidence, np.float64)
    x_pred = np.asarray(x_pred, np.float64)
    x_gt_px = np.asarray(x_gt_px, np.float64)
    tolerances_px = np.asarray(tolerances_px, np.float64)
    thresholds_pct = np.asarray(thresholds_pct, np.float64)
    chex.assert_rank([confidence, x_pred, x_gt_px, tolerances_px, thresholds_pct], 1)
    chex.assert_equal_shape([confidence, x_pred, x_gt_px])
    for name, values in (("confidence", confidence), ("x_pred", x_pred), ("x_gt_px", x_gt_px),
                         ("tolerances_px", tolerances_px), ("thresholds_pct", thresholds_pct)):
        if not np.isfinite(values).all():  # a NaN compares False both ways: a silent miscount
            index = int(np.argmin(np.isfinite(values)))
            raise ValueError(f"decide_frames: {name}[{index}] is {values[index]}; expected finite "
                             "values")
    if np.any(np.diff(thresholds_pct) >= 0):
        raise ValueError("thresholds_pct must be strictly descending")
    # Number of thresholds strictly above 100 * conf == first row where 100 * conf >= thr.
    first_row = np.searchsorted(-thresholds_pct, -(confidence * 100), side="left")
    distance_px = np.abs(x_pred * image_width_px - x_gt_px)
    return FrameDecisions(
        first_row=first_row.astype(np.int32),
        localised=distance_px[:, None] <= tolerances_px[None, :],
        detected=confidence >= DETECTION_THRESHOLD,
        distance_px=distance_px,
    )


class FrameCounts(NamedTuple):
    """Integer counts per cell (C cells, R threshold rows, T tolerances), int32.

    true_pos: (T, C, R) SPEAKING frames positive at the row and within the tolerance.
    pred_pos: (C, R) frames positive at the row.
    gt_pos: (C,) SPEAKING frames.
    correct: (C,) frames with (conf >= 0.5 and SPEAKING) or (conf < 0.5 and NOT_SPEAKING).
    wrong: (C,) the other frames.
    detected_speaking: (C,) frames with conf >= 0.5 and SPEAKING (aD's denominator).
    """

    true_pos: jax.Array
    pred_pos: jax.Array
    gt_pos: jax.Array
    correct: jax.Array
    wrong: jax.Array
    detected_speaking: jax.Array


@functools.partial(jax.jit, static_argnames=("num_cells", "num_rows"))
def count_frames(
    first_row: jax.Array,
    localised: jax.Array,
    detected: jax.Array,
    speaking: jax.Array,
    cell: jax.Array,
    *,
    num_cells: int,
    num_rows: int = N_THRESHOLDS,
) -> FrameCounts:
    """Counts of SPEC section 9 for all rows, tolerances and cells at once.

    Frames of every GT file are concatenated; `cell` says which cell each frame adds to.
    Padding frames carry `cell == num_cells` and are dropped. A frame positive at row k is
    positive at every later row, so per-row counts are a cumulative sum over a (cell, first
    row) histogram: O(frames + cells * rows), and the tolerance axis is a vmap.

    Args:
      first_row: (N,) int32 >= 0 (see `FrameDecisions`); num_rows or more: never positive.
      localised: (N, T) bool.
      detected: (N,) bool, conf >= 0.5.
      speaking: (N,) bool, ground truth SPEAKING.
      cell: (N,) int32 in [0, num_cells]; num_cells marks padding.
      num_cells: number of cells C (static).
      num_rows: number of threshold rows R (static).

    Returns:
      FrameCounts of int32 arrays.
    """
    chex.assert_rank([first_row, localised, detected, speaking, cell], [1, 2, 1, 1, 1])
    chex.assert_equal_shape_prefix([first_row, localised, detected, speaking, cell], 1)
    chex.assert_type([first_row, cell], jnp.int32)
    chex.assert_type([localised, detected, speaking], bool)
    n_bins = num_rows + 1  # last bin: never positive
    # A frame positive at none of the kept rows (first_row > num_rows: more thresholds than
    # rows) joins the never-positive bin instead of spilling into the next cell's.
    first_row = jnp.minimum(first_row, num_rows)

    def per_row(weights: jax.Array) -> jax.Array:
        """(N,) int32 weights -> (C, R) sums over frames positive at each row."""
        hist = jax.ops.segment_sum(
            weights, cell * n_bins + first_row, num_segments=(num_cells + 1) * n_bins)
        return jnp.cumsum(hist.reshape(num_cells + 1, n_bins), axis=1)[:num_cells, :num_rows]

    def per_cell(mask: jax.Array) -> jax.Array:
        return jax.ops.segment_sum(mask.astype(jnp.int32), cell, num_segments=num_cells + 1)[
            :num_cells]

    speaking_i = speaking.astype(jnp.int32)
    true_pos = jax.vmap(lambda loc: per_row(speaking_i * loc), in_axes=1)(
        localised.astype(jnp.int32))
    correct = (detected & speaking) | (~detected & ~speaking)
    return FrameCounts(
        true_pos=true_pos,
        pred_pos=per_row(jnp.ones_like(first_row)),
        gt_pos=per_cell(speaking),
        correct=per_cell(correct),
        wrong=per_cell(~correct),
        detected_speaking=per_cell(detected & speaking),
    )


# ----------------------------------------------------------------------------------------
# Finishing statistics: numpy float64 (see the module docstring for why not float32).
# ----------------------------------------------------------------------------------------


def precision_recall(
    true_pos: np.ndarray, gt_pos: np.ndarray, pred_pos: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall as the reference computes AP and F1 from them, float64, broadcasting
    shapes (its precision_recall CSV holds the unrounded ratios: `evaluation.write_precision_recall_csv`).

    precision = tp / pred_pos rounded to 12 decimals, 0 where pred_pos == 0; recall = tp /
    gt_pos, unrounded (SPEC section 9). Where gt_pos == 0 the reference divides by zero and
    stops; here recall is 0 there. numpy's rounding may differ from Python's `round` in the
    last bit; distinct precisions (denominators < 1e6 differ by > 1e-12) stay distinct and in
    order, so AP's runs and F1's row are unaffected.
    """
    tp = np.asarray(true_pos, np.float64)
    gt = np.asarray(gt_pos, np.float64)
    pp = np.asarray(pred_pos, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(pp > 0, np.round(tp / pp, PRECISION_DIGITS), 0.0)
        recall = np.where(gt > 0, tp / gt, 0.0)
    return precision, recall


def monotone_precision(precision: np.ndarray) -> np.ndarray:
    """(..., R) -> (..., R): each row's precision replaced by the max over it and later rows."""
    precision = np.asarray(precision, np.float64)
    return np.maximum.accumulate(precision[..., ::-1], axis=-1)[..., ::-1]


def average_precision(
    precision: np.ndarray, recall: np.ndarray, *, drop_single_row_last_run: bool = True
) -> float:
    """AP of one precision-recall curve with the reference's run rule.

    The precision is first made monotone (`monotone_precision`). Rows with equal monotone
    precision in a row form a run; AP = sum over runs of precision * (recall of the run's
    last row - recall of the row before the run), the first run starting at recall 0.

    Quirk kept for reference parity (`drop_single_row_last_run=True`): when the last run is
    a single row (usually the 0.0 threshold row), the reference's loop ends before adding
    it. Pass False to count it.

    Args:
      precision: (R,) float64 precision per row (as stored, not yet monotone).
      recall: (R,) float64 recall per row.
    Returns:
      AP as a Python float.
    """
    recall = np.asarray(recall, np.float64)
    p = monotone_precision(precision)
    chex.assert_rank([p, recall], 1)
    chex.assert_equal_shape([p, recall])
    n = p.shape[0]
    starts = np.r_[True, p[1:] != p[:-1]]
    ends = np.r_[p[1:] != p[:-1], True]
    recall_before = np.r_[0.0, recall[:-1]]
    run_start = np.maximum.accumulate(np.where(starts, np.arange(n), 0))
    area = p * (recall - recall_before[run_start])
    counted = ends.copy()
    if drop_single_row_last_run:
        counted[-1] = not starts[-1]
    return float(np.sum(area[counted]))


def f1_scores(precision: np.ndarray, recall: np.ndarray) -> np.ndarray:
    """2pr / (p + r) elementwise, float64; 0 where p + r == 0 (the reference gives nan)."""
    p = np.asarray(precision, np.float64)
    r = np.asarray(recall, np.float64)
    s = p + r
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(s > 0, 2 * (p * r) / s, 0.0)


def best_f1(precision: np.ndarray, recall: np.ndarray) -> tuple[float, int]:
    """Best F1 over rows on the monotone precision, and its row.

    The first row reaching the maximum wins; a row with p + r == 0 never wins; when no row
    has a positive F1 the reference reports F1 0 at row 0, and so does this.

    Args:
      precision: (R,) float64 precision per row (as stored, not yet monotone).
      recall: (R,) float64 recall per row.
    Returns:
      (F1, row index).
    """
    f1 = f1_scores(monotone_precision(precision), recall)
    chex.assert_rank(f1, 1)
    row = int(np.argmax(f1))
    return float(f1[row]), row


def sequence_f1(precision: np.ndarray, recall: np.ndarray, row: int) -> np.ndarray:
    """Per-cell F1 at the overall best row: (C, R) stored precision/recall -> (C,) float64.

    Uses each cell's stored (not monotone) precision, as the reference; 0 for a cell with
    p + r == 0 at that row (the reference gives nan, e.g. a cell without true positives).
    """
    precision = np.asarray(precision, np.float64)
    recall = np.asarray(recall, np.float64)
    chex.assert_rank([precision, recall], 2)
    return f1_scores(precision[:, row], recall[:, row])


class DetectionSummary(NamedTuple):
    """aD and detection error over C cells (float64; None where undefined).

    aD_cells: (C,) mean |x_gt - 2448 x_pred| px over each cell's (conf >= 0.5, SPEAKING)
      frames; nan for a cell without such frames.
    aD, aD_se: mean of aD_cells and its standard error (std ddof 1 / sqrt(C)), pixels; None
      when a cell's aD is undefined (the reference prints nan) or, for aD_se, when C < 2.
    det_err: 100 * (1 - mean over cells of correct / (correct + wrong)), percent.
    det_err_se: standard error of correct / (correct + wrong) over cells, a fraction (as the
      reference prints it); None when C < 2.
    undefined_cells: indices of cells whose aD is undefined.
    """

    aD_cells: np.ndarray
    aD: float | None
    aD_se: float | None
    det_err: float
    det_err_se: float | None
    undefined_cells: tuple[int, ...]


def _mean_and_standard_error(values: np.ndarray) -> tuple[float, float | None]:
    mean = float(np.mean(values))
    if values.shape[0] < 2:
        return mean, None
    return mean, float(np.std(values, ddof=1) / np.sqrt(values.shape[0]))


def detection_summary(
    distance_sum_px: np.ndarray,
    detected_speaking: np.ndarray,
    correct: np.ndarray,
    wrong: np.ndarray,
) -> DetectionSummary:
    """aD and detection error from per-cell sums, all (C,).

    Args:
      distance_sum_px: (C,) float64 sum of |x_gt - 2448 x_pred| over (conf >= 0.5,
        SPEAKING) frames, pixels.
      detected_speaking: (C,) count of those frames.
      correct, wrong: (C,) detection counts at confidence 0.5 (see `FrameCounts`).
    """
    distance_sum_px = np.asarray(distance_sum_px, np.float64)
    detected_speaking = np.asarray(detected_speaking, np.int64)
    correct = np.asarray(correct, np.int64)
    wrong = np.asarray(wrong, np.int64)
    chex.assert_rank([distance_sum_px, detected_speaking, correct, wrong], 1)
    chex.assert_equal_shape([distance_sum_px, detected_speaking, correct, wrong])
    if np.any(correct + wrong == 0):
        raise ValueError("detection_summary: a cell has no frames")
    undefined = detected_speaking == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        aD_cells = np.where(undefined, np.nan, distance_sum_px / detected_speaking)
    if np.any(undefined):
        aD = aD_se = None
    else:
        aD, aD_se = _mean_and_standard_error(aD_cells)
    accuracy, accuracy_se = _mean_and_standard_error(correct / (correct + wrong))
    return DetectionSummary(
        aD_cells=aD_cells,
        aD=aD,
        aD_se=aD_se,
        det_err=(1.0 - accuracy) * 100.0,
        det_err_se=accuracy_se,
        undefined_cells=tuple(int(i) for i in np.flatnonzero(undefined)),
    )


class TTestResult(NamedTuple):
    """t statistic, one-sided p-value P(T >= t) and degrees of freedom."""

    t: float
    p: float
    df: int


def paired_ttest_greater(a: np.ndarray, b: np.ndarray) -> TTestResult:
    """One-sided paired t-test that mean(a - b) > 0 (scipy `ttest_rel(a, b, 'greater')`).

    Args:
      a, b: (n,) paired scores, e.g. two systems' sequence-wise F1 in the same cell order;
        n >= 2. float64.
    Returns:
      TTestResult with t = mean(d) / (std(d, ddof 1) / sqrt(n)), d = a - b, df = n - 1 and
      p from Student's t distribution. Identical pairs (std 0) give t = +-inf or nan, as scipy.
    """
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    chex.assert_rank([a, b], 1)
    chex.assert_equal_shape([a, b])
    n = a.shape[0]
    if n < 2:
        raise ValueError(f"paired t-test needs at least 2 pairs, got {n}")
    d = a - b
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.mean(d) / (np.std(d, ddof=1) / np.sqrt(n))
    df = n - 1
    return TTestResult(t=float(t), p=float(scipy.special.stdtr(df, -t)), df=df)


def speaker_union(speaking: np.ndarray, x_px: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth per frame from S speakers: SPEAKING if any is; the first speaking one's x.

    Args:
      speaking: (S, F) bool per speaker (in GT file order) and frame; False for a speaker
        that is not there.
      x_px: (S, F) positions in pixels.
    Returns:
      (speaking (F,) bool, x_px (F,) float64; 0.0 on NOT_SPEAKING frames, as the reference).
    """
    speaking = np.asarray(speaking, bool)
    x_px = np.asarray(x_px, np.float64)
    chex.assert_rank([speaking, x_px], 2)
    chex.assert_equal_shape([speaking, x_px])
    first = np.argmax(speaking, axis=0)
    any_speaking = np.any(speaking, axis=0)
    x = np.take_along_axis(x_px, first[None], axis=0)[0]
    return any_speaking, np.where(any_speaking, x, 0.0)
