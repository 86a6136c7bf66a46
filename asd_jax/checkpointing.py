"""The model directory: what every binary loads a CRNN from (an edge module: files only here).

Layout:
  <directory>/config.json         {"features": name in asd_jax.features.FEATURES,
                                   "in_channels": int, "model": asd_jax.model.model_config(...),
                                   ...any other keys (training config, source), kept as they are}
  <directory>/model/              orbax checkpoint of {"params", "batch_stats"} (a plain pytree)
  <directory>/feature_scaler.h5   optional, `asd_jax.scaler` format

A training workdir is a model directory once training has exported its final model, so the
directory may hold other files; `save_model` only touches the three names above (and its own
`.staging-*` folders and `.commit` marker).

Atomic replacement: the three names live in the directory itself (a training workdir is a model
directory), so they cannot be swapped by one rename. `save_model` writes the complete new set
into `.staging-<id>/`, then commits it with one atomic write of `.commit` (naming the staging
folder), then moves the files into place and removes the marker. While `.commit` exists (a save
killed while moving files), `load_model` reads each name from the staging folder when it is
still there and from the directory otherwise, which is the new set; the next `save_model`
finishes that move first. A kill before the commit leaves the previous model untouched (its
stale staging folder is removed by the next save).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import pathlib
import shutil
import sys
import traceback
import uuid
from typing import Any, Callable, Mapping, TypeVar

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp

from asd_jax import atomic
from asd_jax import constants
from asd_jax import features as features_lib
from asd_jax import model as model_lib
from asd_jax import scaler as scaler_lib
from asd_jax import textfiles

T = TypeVar("T")

COMMIT_NAME = ".commit"
STAGING_PREFIX = ".staging-"
REQUIRED_KEYS = ("features", "in_channels", "model")

PyTree = Any


def build_model(config: Mapping[str, Any], source: str = "config") -> tuple[model_lib.CRNN, int]:
    """(CRNN, in_channels) from a model-directory config; ValueError naming `source` if not."""
    if not isinstance(config, Mapping):
        raise ValueError(f"{source}: expected a JSON object, got {type(config).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in config]
    if missing:
        raise ValueError(f"{source} lacks key(s) {missing}: a model directory's config needs "
                         f"{list(REQUIRED_KEYS)}")
    if config["features"] not in features_lib.FEATURES:
        raise ValueError(f"{source}: features {config['features']!r}, expected one of "
                         f"{list(features_lib.FEATURES)}")
    in_channels = config["in_channels"]
    if not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels < 1:
        raise ValueError(f"{source}: in_channels {in_channels!r}, expected a positive int")
    try:
        model = model_lib.CRNN.from_config(config["model"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: 'model' does not rebuild the CRNN: {e}") from e
    return model, in_channels


def check_num_cameras(model: model_lib.CRNN, source: str) -> None:
    """ValueError unless the CRNN takes the camera one-hot of a TragicTalkers rig (11 cameras),
    which is what the data pipeline, the forward pass and `predict` give it. (A model directory
    of another camera count loads, e.g. one converted from such a PyTorch model, for `apply`.)"""
    if model.num_cameras != constants.N_CAMERAS_PER_RIG:
        raise ValueError(f"{source}: the CRNN takes num_cameras={model.num_cameras}, but asd-jax's "
                         f"data, forward pass and predict give it the {constants.N_CAMERAS_PER_RIG} "
                         "cameras of a rig")


def check_in_channels(config: Mapping[str, Any], source: str) -> None:
    """ValueError naming `source` unless the config's `in_channels` is the channel count of its
    `features`, which is what the forward pass and `predict` give the CRNN. (`save_model` and
    `load_model` do not ask it: a model of another channel count loads, for `apply`.)"""
    features, found = config["features"], config["in_channels"]
    expected = features_lib.num_channels(features)
    if found != expected:
        raise ValueError(f"{source}: config.json says features {features!r} with in_channels "
                         f"{found}, but {features} features have {expected} channels (expected "
                         f"in_channels {expected}): the CRNN cannot take them")


def _shapes(tree: PyTree) -> dict[str, tuple[int, ...]]:
    """{"['params']['fc1']['kernel']": shape, ...} of every leaf (arrays or array metadata)."""
    return {jax.tree_util.keystr(path): tuple(getattr(leaf, "shape", np.shape(leaf)))
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _shape_problems(expected: Mapping[str, tuple], given: Mapping[str, tuple]) -> list[str]:
    problems = [f"missing {k}" for k in expected if k not in given]
    problems += [f"unexpected {k}" for k in given if k not in expected]
    problems += [f"{k} has shape {given[k]}, expected {expected[k]}"
                 for k in expected if k in given and given[k] != expected[k]]
    return problems


def _check_variables(variables: Mapping[str, Any], model: model_lib.CRNN, in_channels: int) -> None:
    """ValueError listing every leaf whose path or shape differs from the model's."""
    if not isinstance(variables, Mapping) or set(variables) != {"params", "batch_stats"}:
        keys = sorted(variables) if isinstance(variables, Mapping) else type(variables).__name__
        raise ValueError(f"variables must be {{'params', 'batch_stats'}}, got {keys}")
    problems = _shape_problems(_shapes(model_lib.abstract_variables(model, in_channels)),
                               _shapes(flax.core.unfreeze(variables)))
    if problems:
        raise ValueError(f"variables do not match the CRNN of the config (in_channels="
                         f"{in_channels}): " + "; ".join(problems))


def _check_scaler(scaler: scaler_lib.Scaler, in_channels: int, source: str) -> None:
    expected = (constants.N_FEATURE_BINS, in_channels)
    for key in ("mean", "std"):
        if np.shape(getattr(scaler, key)) != expected:
            raise ValueError(f"{source}: scaler {key} has shape {np.shape(getattr(scaler, key))} "
                             f"(bins, channels), expected {expected}")


def _check_kept_scaler(directory: pathlib.Path, features: str, in_channels: int) -> None:
    """A save without a scaler keeps the directory's feature_scaler.h5: refused unless that
    scaler was stored for a model of the same features and channel count."""
    path = directory / constants.SCALER_FILE
    try:
        old = json.loads((directory / constants.CONFIG_FILE).read_text())
        old_features, old_channels = old["features"], old["in_channels"]
    except (OSError, ValueError, KeyError, TypeError):  # no readable config: check the shape only
        _check_scaler(scaler_lib.load_scaler(path, features=features), in_channels,
                      f"{path} (kept, as no scaler was given)")
        return
    if (old_features, old_channels) != (features, in_channels):
        raise ValueError(f"{path} was stored for a model of {old_features} features ({old_channels} "
                         f"channels) and would be kept for this one of {features} ({in_channels}): "
                         "give this model's scaler (--scaler), or remove the old file")


def local_checkpointer() -> ocp.StandardCheckpointer:
    """An orbax checkpointer that involves this process only.

    Model directories hold host (numpy) arrays, written and read by one process: in a
    multi-process job, process 0 exports the model while the others go on, so the checkpointer
    must not wait at the cross-process barriers a default one uses.
    """
    me = jax.process_index()
    return ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
        primary_host=me, active_processes={me}))


def _raised_in_orbax(error: BaseException | None) -> bool:
    """Whether `error` or an exception it was raised from was raised in orbax's checkpoint code."""
    seen = set()
    while error is not None and id(error) not in seen:  # (a chain can loop)
        seen.add(id(error))
        frames = traceback.extract_tb(error.__traceback__)
        if any(f"orbax{os.sep}checkpoint" in frame.filename for frame in frames):
            return True
        error = error.__cause__ or error.__context__
    return False


class _AbandonedReadsFilter(logging.Filter):
    """Drops asyncio's "exception was never retrieved" reports of orbax's own reads."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not ("was never retrieved" in record.getMessage() and _raised_in_orbax(error))


def _quiet_unraisable(previous: Callable[[Any], None]) -> Callable[[Any], None]:
    """sys.unraisablehook minus the reports of abandoned reads: "Event loop is closed" from
    asyncio's call_soon_threadsafe, and errors of orbax coroutines closed unfinished."""
    def hook(unraisable) -> None:
        error = unraisable.exc_value
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            if any(f.name == "call_soon_threadsafe" for f in traceback.extract_tb(error.__traceback__)):
                return
        if inspect.iscoroutine(unraisable.object) and _raised_in_orbax(error):
            return
        previous(unraisable)
    hook.quiets_abandoned_reads = True
    return hook


_ABANDONED_READS_FILTER = _AbandonedReadsFilter()


def _quiet_abandoned_reads() -> Callable[[], None]:
    """Keeps a failed restore's leftovers from printing dozens of tracebacks; returns `undo`.

    When one array of a checkpoint cannot be read, orbax's restore raises at once and closes its
    event loop while TensorStore still reads the others. Each of those reads then completes into
    the closed loop ("RuntimeError: Event loop is closed", an unraisable exception printed from
    TensorStore's thread) or fails unobserved: asyncio logs "exception was never retrieved", or
    its coroutine, closed unfinished, raises into sys.unraisablehook, with orbax's traceback;
    some time after our one error line, up to the exit. Only those reports are dropped; every
    other unraisable exception and asyncio record passes. `undo()` removes what this call put
    in place (nothing when a failed restore's filters are already there, which stay).
    """
    asyncio_logger = logging.getLogger("asyncio")
    added_filter = _ABANDONED_READS_FILTER not in asyncio_logger.filters
    if added_filter:
        asyncio_logger.addFilter(_ABANDONED_READS_FILTER)
    previous_hook = sys.unraisablehook
    added_hook = not getattr(previous_hook, "quiets_abandoned_reads", False)
    if added_hook:
        sys.unraisablehook = _quiet_unraisable(previous_hook)
    ours = sys.unraisablehook

    def undo() -> None:
        if added_filter:
            asyncio_logger.removeFilter(_ABANDONED_READS_FILTER)
        if added_hook and sys.unraisablehook is ours:  # (unless replaced since)
            sys.unraisablehook = previous_hook
    return undo


def restore_or_explain(restore: Callable[[], T], path: pathlib.Path, advice: str = "") -> T:
    """`restore()` (an orbax restore of the checkpoint at `path`); a checkpoint whose arrays
    cannot be read (a truncated or missing data file) is a ValueError naming `path`, TensorStore's
    reason and `advice` (appended after "; ").

    Orbax raises a bare Exception there. It is not chained to the ValueError: its traceback
    holds orbax's pending read coroutines, which, kept alive until the interpreter exits, each
    print a traceback of their own then. The reads it abandons are kept quiet too, by filters
    set up before the restore (they may report before it returns) and left in place only when
    it fails (`_quiet_abandoned_reads`): a later failure of anything else, orbax's saves
    included, is reported as usual.
    """
    undo = _quiet_abandoned_reads()
    try:
        restored = restore()
    except MemoryError:
        raise
    except Exception as e:  # pylint: disable=broad-except  (orbax: Exception, ValueError, ...)
        reason = (str(e.__cause__ or e).splitlines() or [type(e).__name__])[0][:400]
    else:
        undo()
        return restored
    raise ValueError(f"{path}: the checkpoint's arrays cannot be read, it is damaged or incomplete "
                     f"({reason})" + (f"; {advice}" if advice else ""))


def save_model(directory: str | os.PathLike, variables: PyTree, config: Mapping[str, Any],
               scaler: scaler_lib.Scaler | None = None, overwrite: bool = False) -> None:
    """Writes a model directory.

    Everything is checked before anything is written (config rebuilds the CRNN, variables have
    its shapes, the scaler its channel count, the config is JSON). The files are first written
    into a staging folder inside `directory`, then committed as a whole (module docstring). An
    existing `model/` is an error unless `overwrite`; `config.json` is replaced; with
    `scaler=None` an existing `feature_scaler.h5` is kept, if the directory's config.json says it
    was stored for the same features and channel count (else a ValueError).

    Args:
      directory: the model directory (created if needed; may hold other files).
      variables: {"params", "batch_stats"} of the CRNN (jax or numpy arrays, any device).
      config: at least {"features", "in_channels", "model"}; any other JSON-able keys are kept.
      scaler: the feature scaler to store, channels-last (64, in_channels).
      overwrite: replace an existing model/.
    """
    directory = pathlib.Path(directory)
    model, in_channels = build_model(config, source=f"config for {directory}")
    _check_variables(variables, model, in_channels)
    if scaler is not None:
        _check_scaler(scaler, in_channels, f"scaler for {directory}")
    try:
        config_text = json.dumps(dict(config), indent=2, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config for {directory} is not JSON-serialisable: {e}") from e
    target = directory / constants.MODEL_DIR
    if directory.is_dir():
        _recover(directory)  # a save killed earlier: its committed model, no stale folders
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True (--overwrite) to "
                              "replace it")
    if scaler is None and (directory / constants.SCALER_FILE).is_file():
        _check_kept_scaler(directory, config["features"], in_channels)

    host = jax.tree.map(lambda x: np.asarray(x, np.float32),
                        jax.device_get(flax.core.unfreeze(dict(variables))))
    atomic.make_output_dir(directory)
    staging = directory / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
    staging.mkdir()
    committed = False
    try:
        checkpointer = local_checkpointer()
        checkpointer.save((staging / constants.MODEL_DIR).resolve(), host)
        checkpointer.wait_until_finished()
        checkpointer.close()
        (staging / constants.CONFIG_FILE).write_text(config_text + "\n")
        if scaler is not None:
            scaler_lib.save_scaler(staging / constants.SCALER_FILE, scaler, config["features"])
        # The commit point: from here on the staged set is the model (see the module docstring).
        atomic.write_text(directory / COMMIT_NAME, staging.name + "\n")
        committed = True
        _move_into_place(directory, staging)
    finally:
        if not committed:
            shutil.rmtree(staging, ignore_errors=True)


def has_model(directory: str | os.PathLike) -> bool:
    """True when `load_model(directory)` finds a model/: in place, or in a staging folder whose
    save was committed and cut short before the move (`load_model` reads it from there)."""
    directory = pathlib.Path(directory)
    staging = _committed_staging(directory)
    return (directory / constants.MODEL_DIR).is_dir() or (
        staging is not None and (staging / constants.MODEL_DIR).is_dir())


def _committed_staging(directory: pathlib.Path) -> pathlib.Path | None:
    """The staging folder named by a `.commit` marker whose move was cut short, or None."""
    marker = directory / COMMIT_NAME
    if not marker.is_file():
        return None
    staging = directory / marker.read_text().strip()
    if not staging.name.startswith(STAGING_PREFIX) or not staging.is_dir():
        return None
    return staging


def _move_into_place(directory: pathlib.Path, staging: pathlib.Path) -> None:
    """Moves a committed staging folder's files into `directory`, then drops the marker and
    the folder. Each step can be repeated, so a move cut short is finished by calling it again."""
    target = directory / constants.MODEL_DIR
    if (staging / constants.MODEL_DIR).exists():
        if target.exists():  # the old model/, moved aside and deleted with the folder
            os.rename(target, staging / "previous_model")
        os.rename(staging / constants.MODEL_DIR, target)
    for name in (constants.CONFIG_FILE, constants.SCALER_FILE):
        if (staging / name).exists():
            os.replace(staging / name, directory / name)
    (directory / COMMIT_NAME).unlink(missing_ok=True)
    shutil.rmtree(staging, ignore_errors=True)


def _recover(directory: pathlib.Path) -> None:
    """Finishes a commit cut short and removes stale staging folders of killed saves."""
    staging = _committed_staging(directory)
    if staging is not None:
        _move_into_place(directory, staging)
    for leftover in (directory / COMMIT_NAME, *atomic.leftovers(directory / COMMIT_NAME)):
        leftover.unlink(missing_ok=True)
    for stale in directory.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)


def load_model(directory: str | os.PathLike,
               ) -> tuple[PyTree, dict[str, Any], scaler_lib.Scaler | None]:
    """Reads a model directory: (variables, config, scaler or None).

    `variables` is {"params", "batch_stats"} of float32 jax arrays on the default device;
    rebuild the module with `asd_jax.model.CRNN.from_config(config["model"])`.

    Raises:
      FileNotFoundError: the directory, its config.json or its model/ does not exist.
      ValueError: config.json is not JSON, lacks a required key or does not rebuild the CRNN;
        the checkpoint or the scaler does not match it; the checkpoint's arrays cannot be read.
    """
    directory = pathlib.Path(directory)
    if directory.is_file():
        raise FileNotFoundError(f"{directory} is a file, not a model directory (config.json + model/); "
                                "a PyTorch checkpoint of the reference is converted into one with "
                                "python -m converters.torch_to_flax")
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory {directory} does not exist")
    staging = _committed_staging(directory)  # a save killed after its commit: the new set

    def where(name: str) -> pathlib.Path:
        if staging is not None and (staging / name).exists():
            return staging / name
        return directory / name

    config_path = where(constants.CONFIG_FILE)
    model_path = where(constants.MODEL_DIR)
    scaler_path = where(constants.SCALER_FILE)
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} does not exist: {directory} is not a model "
                                "directory (expected config.json and model/)")
    try:
        config = json.loads(textfiles.read_text(config_path, "a model directory's config (a JSON object)"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path} is not valid JSON: {e}") from None
    if isinstance(config, dict) and config.get("cross_validation") is True and not model_path.is_dir():
        raise FileNotFoundError(f"{directory} is a cross-validation run, whose models are its folds': "
                                f"give {directory / 'fold_0'} (or another fold_<k>)")
    model, in_channels = build_model(config, source=str(config_path))
    if not model_path.is_dir():
        raise FileNotFoundError(f"{model_path} does not exist: {directory} holds no exported model "
                                "(expected config.json and model/)")

    # This process's first device: in a multi-process job global device 0 is process 0's only.
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                          model_lib.abstract_variables(model, in_channels))
    checkpointer = local_checkpointer()
    try:
        try:
            stored = _shapes(checkpointer.metadata(model_path.resolve()).item_metadata)
        except (ValueError, KeyError, TypeError, FileNotFoundError, AttributeError) as e:
            raise ValueError(f"{model_path} is not a readable orbax checkpoint: {e}") from e
        if not stored:
            raise ValueError(f"{model_path} is not a readable orbax checkpoint: it lists no arrays")
        problems = _shape_problems(_shapes(target), stored)
        if problems:
            raise ValueError(f"{model_path} does not match the CRNN of {config_path} "
                             f"(in_channels={in_channels}): " + "; ".join(problems))
        variables = restore_or_explain(lambda: checkpointer.restore(model_path.resolve(), target),
                                       model_path)
    finally:
        checkpointer.close()

    scaler = None
    if scaler_path.is_file():
        scaler = scaler_lib.load_scaler(scaler_path, features=config["features"])
        _check_scaler(scaler, in_channels, str(scaler_path))
    return variables, config, scaler
