"""5-fold cross-validation (SPEC section 7): one training run per fold, fold-averaged curves.

Layout: `<workdir>/config.json` is the run's config (fold None, plus `"cross_validation":
true` and `in_channels`), so the run resumes from it alone like a single run, and a single run
is refused in this workdir (and a cross-validation in a single run's); `<workdir>/fold_<k>/` is
fold k's training workdir (resumable like any other run); `<workdir>/cv_curves.json` holds
per-fold and fold-averaged train/validation losses per epoch and `<workdir>/cv_curves.png`
plots them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

import jax
import numpy as np
from absl import logging

from asd_jax import atomic
from asd_jax import constants
from asd_jax import features as features_lib
from asd_jax.training import folds, loop
from asd_jax.training.configs import TrainConfig

CURVES_JSON = "cv_curves.json"
CURVES_PNG = "cv_curves.png"


def fold_curves(metrics_rows: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """Per-epoch losses of every fold and their mean over folds.

    metrics_rows: per fold, the rows of its metrics.jsonl (each with "epoch", "train_loss",
    "validation_loss"). Only epochs that every fold completed are averaged.
    """
    epochs = sorted(set.intersection(*(set(r["epoch"] for r in rows) for rows in metrics_rows)))
    by_epoch = [{r["epoch"]: r for r in rows} for rows in metrics_rows]
    curves = {"epochs": epochs}
    for key in ("train_loss", "validation_loss"):
        per_fold = np.array([[fold[e][key] for e in epochs] for fold in by_epoch], np.float64)
        curves[key] = {"per_fold": per_fold.tolist(), "mean": per_fold.mean(axis=0).tolist()}
    return curves


def plot_curves(curves: dict[str, Any], path: str | os.PathLike) -> None:
    """Writes a PNG of the fold-averaged curves (per-fold curves faint)."""
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    for key, colour, label in (("train_loss", "tab:blue", "train"),
                               ("validation_loss", "tab:orange", "validation")):
        for fold in curves[key]["per_fold"]:
            ax.plot(curves["epochs"], fold, color=colour, alpha=0.25, linewidth=1, marker=".")
        ax.plot(curves["epochs"], curves[key]["mean"], color=colour, linewidth=2, marker="o",
                label=f"{label} (mean of {len(curves[key]['per_fold'])} folds)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss per example (sum over 60 frames)")
    ax.set_title("cross-validation")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic.partial_path(path) as partial:
        fig.savefig(partial, format="png")
    plt.close(fig)


def _check_batch_splits(config: TrainConfig, sequences) -> None:
    """`loop.check_batch_split` for every fold, before the first trains: each fold has its own
    number of training examples, so with several processes a later fold's last batch may not
    split over the devices when the first fold's does (found there, it would come after the
    earlier folds had trained). ValueError naming the fold."""
    process_count = jax.process_count()
    if process_count == 1:  # one process: any batch goes (replicated), nothing to refuse
        return
    num_devices = loop.make_mesh().size
    for k in range(config.num_folds):
        fold_config = config.replace(fold=k)
        train_indices, _ = loop.split_indices(sequences, fold_config)
        try:
            loop.check_batch_split(fold_config, len(train_indices), num_devices, process_count)
        except ValueError as err:
            raise ValueError(f"cross-validation fold {k}: {err}") from err


def cross_validate(config: TrainConfig, workdir: str | os.PathLike, source=None) -> dict[str, Any]:
    """Trains every fold of `config` in `<workdir>/fold_<k>` and writes the averaged curves.

    source: optional ChunkSource shared by the folds (default: `config`'s data, opened once and
    shared). Returns the curves written to cv_curves.json. The split (enough sequences for
    `num_folds` non-empty folds) and, with several processes, every fold's batches (see
    `loop.check_batch_split`) are checked before anything is written.
    """
    workdir = pathlib.Path(workdir)
    loop.refuse_store_folder(workdir)
    with loop.WorkdirLock(workdir) as lock:  # the whole run's; each fold also holds its own
        config = loop.keep_recorded_data_root(dataclasses.replace(config, fold=None), workdir)
        values = {**config.to_dict(), "in_channels": features_lib.num_channels(config.features),
                  "cross_validation": True}
        # The top-level config binds the run once a fold has started (written its own config.json):
        # until then a rerun with other settings (after a fold refused its data, say) replaces it.
        started = any(workdir.glob(f"fold_*/{constants.CONFIG_FILE}"))
        loop.check_same_run(workdir / constants.CONFIG_FILE, values, compare_fields=started)
        source = loop.open_data(config) if source is None else source
        folds.cross_validation_folds(source.sequences, config.num_folds, config.seed)
        _check_batch_splits(config, source.sequences)
        atomic.make_output_dir(workdir)
        lock.acquire()
        lock.record_holder()
        loop.write_config(workdir / constants.CONFIG_FILE, values)
        rows = []
        for k in range(config.num_folds):
            fold_dir = workdir / f"fold_{k}"
            logging.info("cross-validation: fold %d (folds 0..%d) in %s", k, config.num_folds - 1, fold_dir)
            loop.train_and_evaluate(config.replace(fold=k), fold_dir, source=source)
            metrics = fold_dir / constants.METRICS_FILE
            rows.append([json.loads(line) for line in metrics.read_text().splitlines() if line.strip()])
        curves = fold_curves(rows)
        if jax.process_index() == 0:
            atomic.write_text(workdir / CURVES_JSON, json.dumps(curves, indent=2) + "\n")
            plot_curves(curves, workdir / CURVES_PNG)
        return curves
