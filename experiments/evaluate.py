r"""Evaluate a forward file as the paper does (README, Evaluation; asd_jax/evaluation.py).

    python -m experiments.evaluate --forward_csv test_forward.csv --gt_dir DATA/GT \
        --seq_lengths DATA/csv/seq_lengths.json [--tolerance 89,222 --out_dir DIR --plot --overwrite]

Prints the reference's summary lines per tolerance; with --out_dir writes
precision_recall_<tol>_sigmoid.csv, metrics_<tol>.json (and precision_recall_<tol>.png with
--plot); an --out_dir holding an earlier evaluation's files needs --overwrite, which removes
them first.
"""

from absl import app
from absl import flags

from asd_jax import evaluation
import experiments

_FORWARD_CSV = flags.DEFINE_string("forward_csv", None, "test_forward.csv to evaluate.",
                                   required=True)
_GT_DIR = flags.DEFINE_string("gt_dir", None, "GT/<sequence>/<rig>/*_GT.csv root.", required=True)
_SEQ_LENGTHS = flags.DEFINE_string("seq_lengths", None, "seq_lengths.json.", required=True)
_TOLERANCE = flags.DEFINE_list("tolerance", ["89"],
                               "Tolerances in pixels (89 = 2 deg, 222 = 5 deg).")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where to write the result files (none if unset).")
_PLOT = flags.DEFINE_bool("plot", False, "Also write the precision-recall curve as a PNG "
                          "(needs --out_dir).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace the result files an earlier evaluation "
                                "left in --out_dir (all of them, every tolerance).")
_INFO = flags.DEFINE_string("info", "asd-jax", "System name printed in the summary lines.")
_AP_QUIRK = flags.DEFINE_bool("drop_single_row_last_run", True, "Reproduce the reference's AP, which "
                              "leaves out a last run of a single row (--nodrop_single_row_last_run "
                              "counts it).")
flags.DEFINE_alias("ap_last_run_quirk", "drop_single_row_last_run")  # its name until 2026-11


def main(argv):
    del argv
    if _PLOT.value and _OUT_DIR.value is None:
        raise app.UsageError("--plot writes precision_recall_<tol>.png into --out_dir: "
                             "give --out_dir")
    try:
        tolerances = [int(t) for t in _TOLERANCE.value]
    except ValueError:
        raise app.UsageError(
            f"--tolerance must be integers in pixels, got {_TOLERANCE.value}") from None
    results = evaluation.evaluate(_FORWARD_CSV.value, _GT_DIR.value, _SEQ_LENGTHS.value,
                                  tolerances=tolerances, out_dir=_OUT_DIR.value, plot=_PLOT.value,
                                  drop_single_row_last_run=_AP_QUIRK.value,
                                  overwrite=_OVERWRITE.value)
    for tolerance, result in results.items():
        print(f"tolerance {tolerance} px")
        print("\n".join(evaluation.summary_lines(result, _INFO.value)))


if __name__ == "__main__":
    experiments.run(main)
