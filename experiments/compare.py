r"""One-sided paired t-test: is system A's sequence-wise F1 greater than system B's?

    python -m experiments.compare A B

A and B are metrics_<tol>.json files (from experiments.evaluate) or released
F1_scores_<tol>.pckl files (read without running pickle code). Prints the mean F1 of each,
t, the one-sided p-value and the degrees of freedom; when every pair of values agrees to within
floating-point rounding (`evaluation.F1_ROUNDING`), it says so instead of testing the rounding.
"""

from absl import app

from asd_jax import evaluation
import experiments


def main(argv):
    if len(argv) != 3:
        raise app.UsageError("usage: python -m experiments.compare A B")
    result = evaluation.compare_sequence_f1(argv[1], argv[2])
    print(f"A: {argv[1]}  mean sequence-wise F1 {result['mean_a']:.6f}")
    print(f"B: {argv[2]}  mean sequence-wise F1 {result['mean_b']:.6f}")
    if result["max_abs_difference"] == 0:
        print("paired t-test undefined: every pair of sequence-wise F1 values is equal "
              "(the differences have no variance)")
        return
    if result["max_abs_difference"] <= evaluation.F1_ROUNDING:
        print("paired t-test not run: A and B agree to within floating-point rounding (largest "
              f"difference {result['max_abs_difference']:.1e}); a t-test would only measure the "
              "rounding")
        return
    print(f"paired t-test, A > B: t = {result['t']:.6f}, one-sided p = {result['p']:.6f} "
          f"({result['df']} degrees of freedom)")


if __name__ == "__main__":
    experiments.run(main, takes_arguments=True)
