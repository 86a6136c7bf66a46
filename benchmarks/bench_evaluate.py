r"""Speed of `asd_jax.evaluation` against the reference's approach (not a test).

  python -m benchmarks.bench_evaluate [--reference_dir ../shared/reference --tolerance 89]

Both sides evaluate the full released ASC(s) forward file (`released/ASCs/test_forward.csv`,
109 cameras, 78,715 rows) against `GT/` at one tolerance, from the files on disk: CSV
parsing is included in both timings. The loop side is a faithful re-implementation of the
reference's approach written here from SPEC section 9: rows kept as strings and converted
with `float()` where used, a Python loop over the 101 thresholds and, inside it, over the
frames, once for the overall matrix and once for the cell's matrix, then AP/F1 by loops;
each GT file finds its forward rows as the reference does (the whole row list converted to
a numpy array and compared, per file). The same loops with a dict lookup are timed too.
asd-jax is compiled on a first call and timed as the median of 5 warm calls. Both results
are checked to agree before timing is reported. Process CPU times are printed too: on a
shared machine they are steadier than wall time.

Last line: `RESULT evaluate_speedup=<loop seconds / asd-jax seconds>`. Target >= 50.
"""

from __future__ import annotations

import csv
import json
import math
import os
import pathlib
import statistics
import time

import numpy as np

from absl import flags

from asd_jax import evaluation
import experiments

_REFERENCE_DIR = flags.DEFINE_string(
    "reference_dir", None,
    "Reference data (GT/, seq_lengths.json, released/). Default: $ASD_REFERENCE_DIR or "
    "../shared/reference beside the repository.")
_TOLERANCE = flags.DEFINE_integer("tolerance", 89, "Tolerance in pixels.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Warm asd-jax calls; the median is reported.")


def _reference_dir() -> pathlib.Path:
    if _REFERENCE_DIR.value:
        return pathlib.Path(_REFERENCE_DIR.value)
    if os.environ.get("ASD_REFERENCE_DIR"):
        return pathlib.Path(os.environ["ASD_REFERENCE_DIR"])
    return pathlib.Path(__file__).resolve().parents[2] / "shared" / "reference"


# ----------------------------------------------------------------------------------------
# The loop implementation (the reference's approach).
# ----------------------------------------------------------------------------------------


def _csv_rows(path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def _new_matrix() -> list[list[float]]:
    rows = [[(1 / (1 + math.exp(-c / 4))) * 100, 0, 0, 0, 0, 0] for c in range(50, -50, -1)]
    return rows + [[0.0, 0, 0, 0, 0, 0]]


def _add_frames(matrix, union, forward_rows, tolerance) -> None:
    for row in matrix:
        threshold = row[0]
        for frame in range(len(union)):
            label, x_gt = union[frame]
            confidence = float(forward_rows[frame][3]) * 100
            if label == "SPEAKING":
                row[2] += 1
                if confidence >= threshold and abs(float(forward_rows[frame][2]) * 2448 - x_gt) <= tolerance:
                    row[1] += 1
            if confidence >= threshold:
                row[3] += 1


def _finish_matrix(matrix) -> None:
    for row in matrix:
        row[4] = 0 if row[3] == 0 else round(row[1] / row[3], 12)
        row[5] = round(row[1] / row[2], 12)


def _ap_f1(matrix) -> tuple[float, float, int]:
    precision = [row[4] for row in matrix]
    recall = [row[5] for row in matrix]
    for i in range(len(precision)):
        precision[i] = max(precision[i:])
    area, current, start_recall, end_recall = 0.0, precision[0], 0.0, recall[0]
    for i in range(1, len(recall)):
        if precision[i] == current:
            end_recall = recall[i]
            if i == len(recall) - 1:
                area += current * (end_recall - start_recall)
        else:
            area += current * (end_recall - start_recall)
            start_recall, end_recall, current = recall[i - 1], recall[i], precision[i]
    best, best_row = 0.0, 0
    for i in range(len(precision)):
        s = precision[i] + recall[i]
        f1 = 2 * precision[i] * recall[i] / s if s else 0.0
        if f1 > best:
            best, best_row = f1, i
    return area, best, best_row


def loop_evaluate(forward_csv, gt_dir, seq_lengths_path, tolerance: int,
                  fast_lookup: bool = False) -> dict:
    """The reference's approach: Python loops over thresholds and frames, strings parsed on use.

    With `fast_lookup=False` (faithful), each GT file finds its camera's rows as the
    reference does, by turning the whole forward row list into a numpy array and comparing;
    `fast_lookup=True` uses a dict instead, to show what the loops alone cost.
    """
    lengths = json.loads(pathlib.Path(seq_lengths_path).read_text())
    forward = _csv_rows(forward_csv)[1:]
    if fast_lookup:
        by_name: dict[str, list] = {}
        for row in forward:
            by_name.setdefault(row[0], []).append(row)
    overall = _new_matrix()
    cells, correct, detected, distance = [], [], [], []
    for seq_dir in sorted(pathlib.Path(gt_dir).iterdir()):
        frames = int(round(float(lengths[seq_dir.name]) * 30))
        for rig_dir in sorted(seq_dir.iterdir()):
            matrix = _new_matrix()
            n_correct = n_total = n_detected = 0
            dist = 0.0
            for gt_path in sorted(rig_dir.glob("*.csv")):
                gt = _csv_rows(gt_path)
                speakers = len(gt) // frames
                union = []
                for f in range(frames):
                    label, x = "NOT_SPEAKING", 0
                    for s in range(speakers):
                        if gt[s * frames + f][4] == "SPEAKING":
                            label, x = "SPEAKING", int(gt[s * frames + f][1])
                            break
                    union.append((label, x))
                if fast_lookup:
                    rows = by_name[gt_path.name[:-7]]
                else:  # the reference's lookup: the whole row list as an array, per GT file
                    hits = np.where(np.asarray(forward) == gt_path.name[:-7])[0]
                    rows = list(np.array(forward)[hits])
                _add_frames(overall, union, rows, tolerance)
                _add_frames(matrix, union, rows, tolerance)
                for f in range(frames):
                    active = float(rows[f][3]) >= 0.5
                    speaking = union[f][0] == "SPEAKING"
                    n_total += 1
                    if active == speaking:
                        n_correct += 1
                    if active and speaking:
                        n_detected += 1
                        dist += abs(union[f][1] - float(rows[f][2]) * 2448)
            _finish_matrix(matrix)
            cells.append(matrix)
            correct.append(n_correct / n_total)
            detected.append(n_detected)
            distance.append(dist / n_detected)
    _finish_matrix(overall)
    ap, f1, row = _ap_f1(overall)
    seq_f1 = []
    for m in cells:
        p, r = m[row][4], m[row][5]
        seq_f1.append(2 * p * r / (p + r) if p + r else 0.0)
    return {"AP": ap, "F1": f1, "F1_row": row, "seq_F1": seq_f1,
            "aD": statistics.mean(distance), "det_err": (1 - statistics.mean(correct)) * 100,
            "true_pos": [m[1] for m in overall], "pred_pos": [m[3] for m in overall]}


def main(argv):
    del argv
    ref = _reference_dir()
    args = (ref / "released" / "ASCs" / "test_forward.csv", ref / "GT", ref / "seq_lengths.json")
    missing = [str(path) for path in args if not path.exists()]
    if missing:
        raise SystemExit(f"error: the reference data is not in {ref} (missing {', '.join(missing)}): "
                         "pass --reference_dir DIR or set ASD_REFERENCE_DIR to a directory holding "
                         "GT/, seq_lengths.json and released/ASCs/")
    tolerance = _TOLERANCE.value

    def ours():
        return evaluation.compute_metrics(evaluation.load_frames(*args), (tolerance,))[tolerance]

    start = time.perf_counter()
    result = ours()
    print(f"asd-jax first call (includes jit compilation): {time.perf_counter() - start:.3f} s")
    times, cpu_times = [], []
    for _ in range(_REPEATS.value):
        start, cpu = time.perf_counter(), time.process_time()
        ours()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu)
    ours_s, ours_cpu = statistics.median(times), statistics.median(cpu_times)
    print(f"asd-jax warm calls: median {ours_s:.4f} s, min {min(times):.4f} s "
          f"(CPU time of the process: median {ours_cpu:.4f} s)")

    start, cpu = time.perf_counter(), time.process_time()
    loop = loop_evaluate(*args, tolerance)
    loop_s, loop_cpu = time.perf_counter() - start, time.process_time() - cpu
    print(f"loop implementation (reference's approach): {loop_s:.2f} s (CPU {loop_cpu:.2f} s; "
          f"CPU-time ratio {loop_cpu / ours_cpu:.1f}x)")
    start, cpu = time.perf_counter(), time.process_time()
    fast = loop_evaluate(*args, tolerance, fast_lookup=True)
    fast_s, fast_cpu = time.perf_counter() - start, time.process_time() - cpu
    print(f"loop implementation with a dict lookup instead of the reference's per-file array "
          f"conversion: {fast_s:.2f} s (speedup {fast_s / ours_s:.1f}x; CPU {fast_cpu:.2f} s, "
          f"CPU-time ratio {fast_cpu / ours_cpu:.1f}x)")
    if fast != loop:
        raise SystemExit("the two loop implementations disagree")

    pr = result["precision_recall"]
    agree = (pr["true_pos"] == loop["true_pos"] and pr["pred_pos"] == loop["pred_pos"]
             and result["F1_row"] == loop["F1_row"]
             and all(abs(result[k] - loop[k]) < 1e-9 for k in ("AP", "F1", "aD", "det_err"))
             and max(abs(a - b) for a, b in zip(result["seq_F1"], loop["seq_F1"])) < 1e-9)
    if not agree:
        raise SystemExit("asd-jax and the loop implementation disagree; timing not reported")
    print(f"results agree: AP {result['AP']:.6f}, F1 {result['F1']:.6f}, aD {result['aD']:.6f} px")
    print(f"RESULT evaluate_speedup={loop_s / ours_s:.1f}")


if __name__ == "__main__":
    experiments.run(main)
