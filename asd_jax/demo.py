"""The end-to-end demo: synthesize -> train `tiny` -> forward -> evaluate, against two baselines.

Stages, each in its own folder of `workdir`. Synthesis, training and the forward files are
skipped when their output already exists (outputs are written atomically, so an existing one is
complete; an interrupted training run resumes exactly from its last checkpoint); the evaluation
(seconds) and the table are redone on every run:

  data/                      the synthetic TragicTalkers-like tree (`asd_jax.data.synthetic`)
  train/                     the `tiny` CRNN's training workdir (config.json, model/, metrics)
  forward/<system>/test_forward.csv   the trained CRNN and the two baselines (SPEC section 8)
  eval/<system>/             precision_recall_<tol>_sigmoid.csv, metrics_<tol>.json
  demo_results.json, demo_results.md  the table

The table has one row per system (trained CRNN, "always speaking at the image centre",
SRP-PHAT) and columns AP and F1 at 2 degrees (89 px) and 5 degrees (222 px), aD (px) and the
detection error (%), all from `asd_jax.evaluation.evaluate`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import numbers
import os
import pathlib
import time
from collections.abc import Callable
from typing import Any

from asd_jax import atomic
from asd_jax import constants

SYSTEMS = ("crnn", "centre", "srp_phat")
SYSTEM_LABELS = {"crnn": "trained CRNN (tiny)", "centre": "centre baseline",
                 "srp_phat": "SRP-PHAT + energy VAD"}
TOLERANCES = (constants.TOLERANCE_2DEG_PX, constants.TOLERANCE_5DEG_PX)
# Table columns: (key in the results, heading, higher is better).
COLUMNS = (
    ("AP_89", "AP 2°", True), ("F1_89", "F1 2°", True),
    ("AP_222", "AP 5°", True), ("F1_222", "F1 5°", True),
    ("aD", "aD (px)", False), ("det_err", "det. error (%)", False),
)
DEMO_CONFIG_FILE = "demo_config.json"


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo.

    Data: `num_dev` development and `num_test` test sequences of `seconds` seconds each,
    synthesized with `seed` and diffuse noise at `snr_db`.
    Training: the `tiny` preset with `num_epochs`, `learning_rate`, `batch_size` and
    `compute_dtype` replaced (None keeps the preset's value) and `seed`.

    The defaults are sized for `make demo` in 10 minutes on 2 CPU cores, install included:
    4 x 12 s of development data give 1,056 camera-chunk examples an epoch (12 chunk starts x
    22 cameras x 4 sequences); on the 2-core development machine (lightly loaded) synthesis
    took 14 s and 10 epochs of the tiny CRNN 363 s. With 6 epochs the CRNN beat the centre
    baseline on every metric for seeds 0 and 1 but not seed 2 (its localisation was still
    poor); with 10 epochs seed 2 beats it clearly.
    """

    num_dev: int = 4
    num_test: int = 2
    seconds: float = 12.0
    seed: int = 0
    snr_db: float | None = 30.0
    num_epochs: int | None = 10
    learning_rate: float | None = None
    batch_size: int | None = None
    compute_dtype: str | None = None

    def __post_init__(self):
        """Types and ranges of the demo's own fields (the synthesis and training checks run in
        `check_config`)."""
        for name, minimum in (("num_dev", 1), ("num_test", 1), ("seed", 0), ("num_epochs", 1),
                              ("batch_size", 1)):
            value = getattr(self, name)
            if value is None and name in ("num_epochs", "batch_size"):
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
                raise ValueError(f"{name}={value!r}: expected an integer >= {minimum}"
                                 + (" (the demo trains and tests the CRNN)" if name.startswith("num_")
                                    else ""))
        for name in ("seconds", "snr_db", "learning_rate"):
            value = getattr(self, name)
            if value is None and name != "seconds":
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"{name}={value!r}: expected a number")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def default_config(reduced: bool = False) -> DemoConfig:
    """The demo's sizes: the full demo (`make demo`), or a reduced one (seconds of training,
    for the test suite; too short for the CRNN to be reliably better than the baselines)."""
    if reduced:
        return DemoConfig(num_dev=1, num_test=1, seconds=4.0, num_epochs=2)
    return DemoConfig()


def train_config(config: DemoConfig, data_root: str | os.PathLike):
    """The `tiny` training preset with the demo's overrides, reading `data_root`."""
    from asd_jax.training import configs  # pylint: disable=import-outside-toplevel
    return configs.tiny().replace(data_root=str(data_root), num_epochs=config.num_epochs,
                                  learning_rate=config.learning_rate, batch_size=config.batch_size,
                                  seed=config.seed, compute_dtype=config.compute_dtype)


def check_config(config: DemoConfig, data_dir: str | os.PathLike = "data") -> None:
    """Every check of the demo's settings, run before anything is written: the synthesis
    arguments (`synthetic.check_arguments`) and the training config built from them.
    ValueError / TypeError naming the setting."""
    from asd_jax.data import synthetic  # pylint: disable=import-outside-toplevel
    synthetic.check_arguments(num_dev=config.num_dev, num_test=config.num_test,
                              seconds=config.seconds, seed=config.seed, snr_db=config.snr_db)
    train_config(config, data_dir)


# Stage outputs of a workdir: while none exists, its recorded settings may be replaced.
_STAGES = ("data", "train", "forward", "eval")


def _check_workdir(workdir: pathlib.Path, config: DemoConfig) -> None:
    """Records the demo config in `workdir`, or checks it equals the one recorded there (a
    workdir where no stage has written anything yet takes the new settings). Stage outputs
    without a recorded config (made with unknown settings, e.g. a data/ tree of another run)
    are refused: they would be reused as if made with `config`."""
    path = workdir / DEMO_CONFIG_FILE
    wanted = config.to_dict()
    present = [stage for stage in _STAGES if (workdir / stage).exists()]
    if present and not path.is_file():
        raise ValueError(f"{workdir} holds demo stage output ({', '.join(f'{s}/' for s in present)}) "
                         f"but no {DEMO_CONFIG_FILE}: made with unknown settings, it cannot be reused "
                         "with these; use another --workdir or delete it")
    if path.is_file():
        found = json.loads(path.read_text())
        if found != wanted and present:
            changed = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
            raise ValueError(f"{workdir} holds a demo made with other settings ({', '.join(changed)} "
                             f"differ: {path} has {found}); use another --workdir or delete it")
        if found == wanted:
            return
    atomic.make_output_dir(workdir)
    atomic.write_text(path, json.dumps(wanted, indent=2) + "\n")


@contextlib.contextmanager
def _stage(name: str, timings: dict[str, float], log: Callable[[str], None]):
    """Logs a stage and records its wall time (s) in `timings[name]`."""
    log(f"[demo] {name} ...")
    start = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - start, 2)
    log(f"[demo] {name}: {timings[name]:.1f} s")


def _row(metrics: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """One table row from `evaluate`'s results at TOLERANCES."""
    low, high = (metrics[t] for t in TOLERANCES)
    return {"AP_89": low["AP"], "F1_89": low["F1"], "AP_222": high["AP"], "F1_222": high["F1"],
            "aD": low["aD"], "aD_se": low["aD_se"], "det_err": low["det_err"],
            "det_err_se": low["det_err_se"]}


def beats(row: dict[str, Any], other: dict[str, Any]) -> dict[str, bool]:
    """Per table column, whether `row` is strictly better than `other` (an undefined aD loses)."""
    out = {}
    for key, _, higher in COLUMNS:
        a, b = row[key], other[key]
        if a is None:
            out[key] = False
        elif b is None:
            out[key] = True
        else:
            out[key] = a > b if higher else a < b
    return out


def format_table(systems: dict[str, dict[str, Any]]) -> str:
    """The results as a Markdown table (one row per system)."""
    head = "| system | " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    rule = "|---|" + "---:|" * len(COLUMNS)
    lines = [head, rule]
    for name, row in systems.items():
        cells = []
        for key, _, _ in COLUMNS:
            value = row[key]
            if value is None:
                cells.append("n/a")
            elif key in ("aD", "det_err"):
                cells.append(f"{value:.1f}")
            else:
                cells.append(f"{value:.3f}")
        lines.append(f"| {SYSTEM_LABELS.get(name, name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_demo(workdir: str | os.PathLike, *, reduced: bool = False, config: DemoConfig | None = None,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs (or resumes) the demo in `workdir` and returns its results.

    Every setting is checked (`check_config`) before anything is written.

    Args:
      workdir: folder of all stages (created); a rerun reuses the finished stages.
      reduced: use `default_config(reduced=True)` (a small setting for tests) when `config` is
        None.
      config: explicit sizes (overrides `reduced`).
      log: where progress lines and the table go.

    Returns:
      {"systems": {system: {"AP_89", "F1_89", "AP_222", "F1_222", "aD", "aD_se", "det_err",
      "det_err_se"}}, "crnn_beats_centre": {column: bool}, "config": ..., "timings_s": ...,
      "table": markdown}. aD is in pixels (None where undefined), det_err in percent.
    """
    # Heavy imports here, so that importing the module (and --help) stays light.
    from asd_jax import baselines, evaluation  # pylint: disable=import-outside-toplevel
    from asd_jax import forward as forward_lib  # pylint: disable=import-outside-toplevel
    from asd_jax.data import synthetic  # pylint: disable=import-outside-toplevel
    from asd_jax.training import loop  # pylint: disable=import-outside-toplevel

    config = config or default_config(reduced)
    workdir = pathlib.Path(workdir)
    data_dir, train_dir = workdir / "data", workdir / "train"
    check_config(config, data_dir)  # every setting, before anything is written
    _check_workdir(workdir, config)
    timings: dict[str, float] = {}

    with _stage("synthesize", timings, log):
        if not (data_dir / "csv" / "seq_lengths.json").is_file():
            synthetic.synthesize(data_dir, num_dev=config.num_dev, num_test=config.num_test,
                                 seconds=config.seconds, seed=config.seed, snr_db=config.snr_db)
    with _stage("train", timings, log):
        if not (train_dir / constants.MODEL_DIR).is_dir():  # the final model is exported last, atomically
            loop.train_and_evaluate(train_config(config, data_dir), train_dir)

    csvs = {s: workdir / "forward" / s / "test_forward.csv" for s in SYSTEMS}
    makers = {
        "crnn": lambda out: forward_lib.forward(train_dir, data_dir, out),
        "centre": lambda out: baselines.centre_baseline(data_dir, out),
        "srp_phat": lambda out: baselines.srp_phat_baseline(data_dir, out),
    }
    for system in SYSTEMS:
        with _stage(f"forward {system}", timings, log):
            if not csvs[system].is_file():
                csvs[system].parent.mkdir(parents=True, exist_ok=True)
                makers[system](csvs[system])

    systems = {}
    with _stage("evaluate", timings, log):
        for system in SYSTEMS:
            metrics = evaluation.evaluate(csvs[system], data_dir / "GT", data_dir / "csv" / "seq_lengths.json",
                                          tolerances=TOLERANCES, out_dir=workdir / "eval" / system,
                                          overwrite=True)  # the demo's own folder, rewritten each run
            systems[system] = _row(metrics)

    table = format_table(systems)
    comparison = beats(systems["crnn"], systems["centre"])
    results = {"systems": systems, "crnn_beats_centre": comparison, "config": config.to_dict(),
               "timings_s": timings, "table": table}
    _write_results(workdir, results)
    log(table)
    log("trained CRNN beats the centre baseline on " +
        ("every metric" if all(comparison.values()) else
         f"{sum(comparison.values())} of {len(comparison)} metrics (not on "
         f"{', '.join(k for k, v in comparison.items() if not v)})"))
    return results


def _write_results(workdir: pathlib.Path, results: dict[str, Any]) -> None:
    """demo_results.json (everything) and demo_results.md (the table and the settings)."""
    text = json.dumps(results, indent=2) + "\n"
    md = ["# asd-jax demo results", "",
          "Synthetic test set; AP and F1 at 2 degrees (89 px) and 5 degrees (222 px); aD and the "
          "detection error at confidence 0.5.", "", results["table"], "",
          "Settings: " + ", ".join(f"{k}={v}" for k, v in results["config"].items()), "",
          "Stage times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in results["timings_s"].items()), ""]
    for name, content in (("demo_results.json", text), ("demo_results.md", "\n".join(md))):
        atomic.write_text(workdir / name, content)
