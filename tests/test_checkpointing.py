"""asd_jax.checkpointing: the model directory (config.json + model/ + feature_scaler.h5)."""

import json
import logging
import pathlib
import sys

import h5py
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from asd_jax import checkpointing
from asd_jax import model as model_lib
from asd_jax import scaler as scaler_lib

SMALL = dict(conv_features=(4, 8), gru_hidden=3, gru_layers=1, fc1_features=2, pooling="max")
IN_CHANNELS = 3


def _variables(seed, in_channels=IN_CHANNELS):
    """Random float32 numpy variables with the small CRNN's shapes (no jax RNG compile)."""
    rng = np.random.default_rng(seed)
    abstract = model_lib.abstract_variables(model_lib.CRNN(**SMALL), in_channels)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), abstract)


def _config(**extra):
    return {"features": "gcc_phat", "in_channels": IN_CHANNELS,
            "model": model_lib.model_config(model_lib.CRNN(**SMALL)), **extra}


def _scaler(channels=IN_CHANNELS):
    rng = np.random.default_rng(0)
    return scaler_lib.Scaler(rng.standard_normal((64, channels)).astype(np.float32),
                             rng.uniform(0.5, 2, (64, channels)).astype(np.float32))


def test_round_trip_with_scaler_and_extra_keys(tmp_path):
    variables, scaler = _variables(0), _scaler()
    config = _config(learning_rate=5e-4, source={"git_blob_id": "abc"})
    (tmp_path / "checkpoints").mkdir()  # a training workdir holds other files too
    checkpointing.save_model(tmp_path, variables, config, scaler)

    loaded, loaded_config, loaded_scaler = checkpointing.load_model(tmp_path)
    assert loaded_config == json.loads(json.dumps(config))
    assert jax.tree.structure(loaded) == jax.tree.structure(variables)
    for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(variables)):
        assert isinstance(got, jax.Array) and got.dtype == np.float32
        assert got.devices() == {jax.devices()[0]}
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(loaded_scaler.mean, scaler.mean)
    np.testing.assert_array_equal(loaded_scaler.std, scaler.std)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoints", "config.json", "feature_scaler.h5", "model"]  # no staging left

    model = model_lib.CRNN.from_config(loaded_config["model"])
    x = np.zeros((1, 16, 16, IN_CHANNELS), np.float32)
    cams = np.eye(11, dtype=np.float32)[:1]
    np.testing.assert_allclose(model.apply(loaded, x, cams, train=False),
                               model.apply(variables, x, cams, train=False), atol=1e-6)


def test_overwrite(tmp_path):
    checkpointing.save_model(tmp_path, _variables(0), _config())
    assert checkpointing.load_model(tmp_path)[2] is None
    with pytest.raises(FileExistsError, match=r"model already exists; pass overwrite=True"):
        checkpointing.save_model(tmp_path, _variables(1), _config())
    np.testing.assert_array_equal(checkpointing.load_model(tmp_path)[0]["params"]["fc1"]["bias"],
                                  _variables(0)["params"]["fc1"]["bias"])
    checkpointing.save_model(tmp_path, _variables(1), _config(epoch=50), overwrite=True)
    loaded, config, _ = checkpointing.load_model(tmp_path)
    np.testing.assert_array_equal(loaded["params"]["fc1"]["bias"], _variables(1)["params"]["fc1"]["bias"])
    assert config["epoch"] == 50
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model"]


@pytest.mark.parametrize("change,message", [
    (lambda c, v: c.pop("features"), r"lacks key\(s\) \['features'\]"),
    (lambda c, v: c.update(features="mfcc"), r"features 'mfcc', expected one of"),
    (lambda c, v: c.update(in_channels="3"), r"in_channels '3', expected a positive int"),
    (lambda c, v: c.update(in_channels=True), r"in_channels True, expected a positive int"),
    (lambda c, v: c.update(in_channels=0), r"in_channels 0, expected a positive int"),
    (lambda c, v: c["model"].update(width=2), r"'model' does not rebuild the CRNN: .*unknown key"),
    (lambda c, v: c.update(in_channels=5),
     r"variables do not match .*in_channels=5.*\['conv_block1'\]\['conv1'\]\['kernel'\] has shape "
     r"\(3, 3, 3, 4\), expected \(3, 3, 5, 4\)"),
    (lambda c, v: v["params"].pop("fc2"), r"missing \['params'\]\['fc2'\]\['bias'\]"),
    (lambda c, v: c.update(bad=object()), r"not JSON-serialisable"),
])
def test_save_errors_come_before_any_write(tmp_path, change, message):
    config, variables = _config(), _variables(0)
    change(config, variables)
    with pytest.raises(ValueError, match=message):
        checkpointing.save_model(tmp_path / "out", variables, config)
    assert not (tmp_path / "out").exists()


def test_save_refuses_a_scaler_of_other_channels(tmp_path):
    with pytest.raises(ValueError, match=r"scaler mean has shape \(64, 16\).*expected \(64, 3\)"):
        checkpointing.save_model(tmp_path / "out", _variables(0), _config(), _scaler(16))
    with pytest.raises(ValueError, match=r"scaler std has shape \(64, 16\).*expected \(64, 3\)"):
        checkpointing.save_model(tmp_path / "out", _variables(0), _config(),
                                 scaler_lib.Scaler(_scaler().mean, _scaler(16).std))
    assert not (tmp_path / "out").exists()


def test_the_scaler_records_its_features_and_one_of_other_features_is_refused(tmp_path):
    checkpointing.save_model(tmp_path / "a", _variables(0), _config(), _scaler())
    with h5py.File(tmp_path / "a" / "feature_scaler.h5", "r") as f:
        assert dict(f.attrs) == {"features": "gcc_phat"}
    scaler_lib.save_scaler(tmp_path / "a" / "feature_scaler.h5", _scaler(), "salsa_lite")
    with pytest.raises(ValueError, match=r"a/feature_scaler\.h5 was computed from 'salsa_lite' features, "
                                         r"but 'gcc_phat' features are used here"):
        checkpointing.load_model(tmp_path / "a")


def test_a_kept_scaler_must_fit_the_new_model(tmp_path):
    """scaler=None keeps feature_scaler.h5 only for a model of the same features and channels;
    with no readable config.json beside it, only a scaler of the new channel count is kept."""
    checkpointing.save_model(tmp_path / "a", _variables(0), _config(), _scaler())
    with pytest.raises(ValueError, match=r"feature_scaler.h5 was stored for a model of gcc_phat features "
                                         r"\(3 channels\) and would be kept for this one of gcc_phat \(5\)"):
        checkpointing.save_model(tmp_path / "a", _variables(0, in_channels=5), _config(in_channels=5),
                                 overwrite=True)
    assert checkpointing.load_model(tmp_path / "a")[1]["in_channels"] == 3

    (tmp_path / "b").mkdir()
    scaler_lib.save_scaler(tmp_path / "b" / "feature_scaler.h5", _scaler(16))
    with pytest.raises(ValueError, match=r"feature_scaler.h5 \(kept, as no scaler was given\): scaler mean "
                                         r"has shape \(64, 16\)"):
        checkpointing.save_model(tmp_path / "b", _variables(0), _config())
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["feature_scaler.h5"]


@pytest.mark.parametrize("num_cameras", [5, 11, 12])
def test_check_num_cameras(num_cameras):
    model = model_lib.CRNN(**SMALL, num_cameras=num_cameras)
    if num_cameras == 11:  # a TragicTalkers rig
        checkpointing.check_num_cameras(model, "m")
    else:
        with pytest.raises(ValueError, match=rf"m: the CRNN takes num_cameras={num_cameras}, but asd-jax's "
                                             r"data, forward pass and predict give it the 11 cameras"):
            checkpointing.check_num_cameras(model, "m")


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model directory .*nowhere does not exist"):
        checkpointing.load_model(tmp_path / "nowhere")
    (tmp_path / "model_050.ckpt").write_bytes(b"PK")
    with pytest.raises(FileNotFoundError, match=r"model_050.ckpt is a file, not a model directory .*"
                       r"converters.torch_to_flax"):
        checkpointing.load_model(tmp_path / "model_050.ckpt")
    (tmp_path / "model_050.ckpt").unlink()
    with pytest.raises(FileNotFoundError, match=r"config.json does not exist.*not a model directory"):
        checkpointing.load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(_config()))
    with pytest.raises(FileNotFoundError, match=r"model does not exist: .* holds no exported model"):
        checkpointing.load_model(tmp_path)
    # A cross-validation run's top-level folder (its config.json says so): the folds hold models.
    (tmp_path / "config.json").write_text(json.dumps({**_config(), "cross_validation": True}))
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path} is a cross-validation run, whose models "
                                                rf"are its folds': give {tmp_path / 'fold_0'}"):
        checkpointing.load_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json is not valid JSON"):
        checkpointing.load_model(tmp_path)

    checkpointing.save_model(tmp_path / "m", _variables(0), _config())
    config = _config()
    config["model"]["gru_hidden"] = 5
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model does not match the CRNN of .*config.json "
                                         r"\(in_channels=3\): .*\['params'\]\['fc1'\]\['kernel'\] has "
                                         r"shape \(6, 2\), expected \(10, 2\)"):
        checkpointing.load_model(tmp_path / "m")
    config.pop("model")
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json lacks key\(s\) \['model'\]"):
        checkpointing.load_model(tmp_path / "m")

    (tmp_path / "m" / "config.json").write_text(json.dumps(_config()))
    scaler_lib.save_scaler(tmp_path / "m" / "feature_scaler.h5", _scaler(16))
    with pytest.raises(ValueError, match=r"feature_scaler.h5: scaler mean has shape \(64, 16\)"):
        checkpointing.load_model(tmp_path / "m")

    (tmp_path / "m" / "model" / "_METADATA").write_text("garbage")
    with pytest.raises(ValueError, match=r"model is not a readable orbax checkpoint"):
        checkpointing.load_model(tmp_path / "m")


def test_load_refuses_truncated_array_data_by_name(tmp_path):
    """A partly copied model directory: orbax's bare Exception becomes a ValueError."""
    checkpointing.save_model(tmp_path / "m", _variables(0), _config())
    # OCDBT: each process writes its arrays under ocdbt.process_<i>/d/; model/d/ holds the index.
    data = list((tmp_path / "m" / "model").glob("ocdbt.process_*/d/*"))
    assert data, "no array data files found under model/ocdbt.process_*/d/"
    for f in data:
        f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"m/model: the checkpoint's arrays cannot be read, it is "
                                         r"damaged or incomplete \(.+\)"):
        checkpointing.load_model(tmp_path / "m")


def test_only_the_reports_of_abandoned_reads_are_kept_quiet(tmp_path):
    """The unraisable hook installed for a failed restore drops "Event loop is closed" of
    asyncio's call_soon_threadsafe and the errors of orbax coroutines closed unfinished; anything
    else reaches the hook before it. (End to end: test_resume's damaged-checkpoint test.)"""
    import asyncio
    import types

    def raised(fn):
        try:
            fn()
        except Exception as e:  # pylint: disable=broad-except
            return e
        raise AssertionError("did not raise")

    loop = asyncio.new_event_loop()
    loop.close()
    closed_loop = raised(lambda: loop.call_soon_threadsafe(print))  # what TensorStore's thread hits
    elsewhere = raised(lambda: (_ for _ in ()).throw(RuntimeError("Event loop is closed")))
    checkpointer = ocp.StandardCheckpointer()
    orbax_error = raised(lambda: checkpointer.restore(tmp_path / "missing"))  # raised in orbax's code
    checkpointer.close()

    async def pending():
        return None

    reports = [types.SimpleNamespace(exc_value=e, object=o) for e, o in (
        (closed_loop, None), (elsewhere, None), (ValueError("other"), None),
        (orbax_error, pending()), (orbax_error, None), (ValueError("not orbax"), pending()))]
    passed = []
    hook = checkpointing._quiet_unraisable(passed.append)  # pylint: disable=protected-access
    for report in reports:
        hook(report)
    assert passed == [reports[1], reports[2], reports[4], reports[5]]
    for report in reports:
        if asyncio.iscoroutine(report.object):
            report.object.close()

    # asyncio's log: only "never retrieved" of an error raised in orbax is dropped.
    def record(message, error):
        return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, message, None,
                                 (type(error), error, error.__traceback__))
    quiet = checkpointing._ABANDONED_READS_FILTER  # pylint: disable=protected-access
    assert not quiet.filter(record("Task exception was never retrieved", orbax_error))
    assert quiet.filter(record("Task exception was never retrieved", closed_loop))
    assert quiet.filter(record("Unclosed event loop", orbax_error))

    # A chain that loops ends.
    a, b = ValueError("a"), ValueError("b")
    a.__cause__, b.__cause__ = b, a
    assert not checkpointing._raised_in_orbax(a)  # pylint: disable=protected-access


def test_restore_quiets_abandoned_reads_only_after_it_failed(tmp_path, monkeypatch):
    """The filters are set up around every restore, and stay only after a failed one."""
    asyncio_logger = logging.getLogger("asyncio")
    quiet = checkpointing._ABANDONED_READS_FILTER  # pylint: disable=protected-access
    outer_hook = sys.unraisablehook  # pytest's, or a failed restore's earlier in this process

    def plain_hook(unraisable):
        outer_hook(unraisable)

    monkeypatch.setattr(sys, "unraisablehook", plain_hook)  # both put back after the test
    monkeypatch.setattr(asyncio_logger, "filters", [f for f in asyncio_logger.filters if f is not quiet])

    def quieted():
        return (quiet in asyncio_logger.filters,
                getattr(sys.unraisablehook, "quiets_abandoned_reads", False))

    # Restores that need no files: a real failure's abandoned reads would report after the
    # test, to pytest's own hook, once monkeypatch has put it back.
    def failing():  # orbax's kind of error: a bare Exception
        raise Exception("Encountered error while reading array index")  # pylint: disable=broad-except

    path = tmp_path / "checkpoint"
    assert checkpointing.restore_or_explain(lambda: 42, path) == 42
    assert quieted() == (False, False) and sys.unraisablehook is plain_hook
    for _ in range(2):  # a second failure keeps them, once
        with pytest.raises(ValueError, match=r"checkpoint: the checkpoint's arrays cannot be read, .*"
                                             r"\(Encountered error while reading array index\)"):
            checkpointing.restore_or_explain(failing, path)
        assert quieted() == (True, True)
        assert asyncio_logger.filters.count(quiet) == 1
    hook = sys.unraisablehook
    assert checkpointing.restore_or_explain(lambda: 43, path) == 43  # leaves a failure's filters
    assert quieted() == (True, True) and sys.unraisablehook is hook


class _Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so no `except Exception` cleans up after it."""


@pytest.mark.parametrize("kill_at", ["model", "config.json", "feature_scaler.h5"])
def test_a_save_killed_while_committing_gives_the_new_model_whole(tmp_path, monkeypatch, kill_at):
    """Killed between the moves of a commit, the directory still loads as the new model (weights,
    config and scaler together); the next save finishes the move and leaves no staging behind."""
    checkpointing.save_model(tmp_path, _variables(0), _config(epoch=1), _scaler())
    new_scaler = scaler_lib.Scaler(_scaler().mean + 1, _scaler().std)
    rename, replace = checkpointing.os.rename, checkpointing.os.replace

    def killing(move):
        def moved(src, dst):
            if pathlib.Path(dst).name == kill_at and pathlib.Path(dst).parent == tmp_path:
                raise _Killed()
            return move(src, dst)
        return moved

    monkeypatch.setattr(checkpointing.os, "rename", killing(rename))
    monkeypatch.setattr(checkpointing.os, "replace", killing(replace))
    with pytest.raises(_Killed):
        checkpointing.save_model(tmp_path, _variables(1), _config(epoch=2), new_scaler, overwrite=True)
    monkeypatch.undo()
    assert (tmp_path / checkpointing.COMMIT_NAME).exists()
    assert checkpointing.has_model(tmp_path)

    loaded, config, scaler = checkpointing.load_model(tmp_path)
    assert config["epoch"] == 2
    np.testing.assert_array_equal(loaded["params"]["fc1"]["bias"], _variables(1)["params"]["fc1"]["bias"])
    np.testing.assert_array_equal(scaler.mean, new_scaler.mean)

    checkpointing.save_model(tmp_path, _variables(2), _config(epoch=3), overwrite=True)
    loaded, config, scaler = checkpointing.load_model(tmp_path)
    assert config["epoch"] == 3
    np.testing.assert_array_equal(loaded["params"]["fc1"]["bias"], _variables(2)["params"]["fc1"]["bias"])
    np.testing.assert_array_equal(scaler.mean, new_scaler.mean)  # scaler=None keeps the one there
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "feature_scaler.h5", "model"]


@pytest.mark.parametrize("named", [".", "model", "..", ".staging-missing"])
def test_a_commit_marker_naming_no_staging_folder_is_ignored(tmp_path, named):
    """A stray `.commit` (hand-edited, or from another tool) naming anything but an existing
    staging folder is not a save to finish: the model loads, and the next save replaces it
    without moving the directory itself, or model/, anywhere."""
    checkpointing.save_model(tmp_path, _variables(0), _config(epoch=1))
    (tmp_path / checkpointing.COMMIT_NAME).write_text(named)
    assert checkpointing.load_model(tmp_path)[1]["epoch"] == 1
    checkpointing.save_model(tmp_path, _variables(1), _config(epoch=2), overwrite=True)
    loaded, config, _ = checkpointing.load_model(tmp_path)
    assert config["epoch"] == 2
    np.testing.assert_array_equal(loaded["params"]["fc1"]["bias"], _variables(1)["params"]["fc1"]["bias"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model"]


def test_a_save_killed_before_its_commit_leaves_the_old_model(tmp_path, monkeypatch):
    checkpointing.save_model(tmp_path, _variables(0), _config(epoch=1))
    original = checkpointing.atomic.write_text

    def killed(path, text):
        if pathlib.Path(path).name == checkpointing.COMMIT_NAME:
            raise _Killed()
        return original(path, text)

    monkeypatch.setattr(checkpointing.atomic, "write_text", killed)
    with pytest.raises(_Killed):
        checkpointing.save_model(tmp_path, _variables(1), _config(epoch=2), _scaler(), overwrite=True)
    monkeypatch.undo()
    (tmp_path / ".staging-0123").mkdir()  # as a killed save leaves it (no finally ran)
    loaded, config, scaler = checkpointing.load_model(tmp_path)
    assert config["epoch"] == 1 and scaler is None
    np.testing.assert_array_equal(loaded["params"]["fc1"]["bias"], _variables(0)["params"]["fc1"]["bias"])
    checkpointing.save_model(tmp_path, _variables(1), _config(epoch=2), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model"]  # stale staging removed


# ------------------------------------------------------------------ added by the mutation audit


def _variables_of(model, seed=0, in_channels=IN_CHANNELS):
    rng = np.random.default_rng(seed)
    abstract = model_lib.abstract_variables(model, in_channels)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), abstract)


def test_variables_with_layers_the_config_lacks_are_refused(tmp_path):
    """A 2-layer GRU's variables under a 1-layer config: every leaf of the config's CRNN has its
    shape, but the second layer would be dropped silently (another function). Refused when
    saving (nothing written) and when loading a directory whose config says 1 layer."""
    deeper = model_lib.CRNN(**dict(SMALL, gru_layers=2))
    variables = _variables_of(deeper)
    with pytest.raises(ValueError, match=r"variables do not match the CRNN of the config .*unexpected "
                                         r"\['params'\]\['gru_l1'\]"):
        checkpointing.save_model(tmp_path / "out", variables, _config())
    assert not (tmp_path / "out").exists()
    checkpointing.save_model(tmp_path / "m", variables, {**_config(), "model": model_lib.model_config(deeper)})
    (tmp_path / "m" / "config.json").write_text(json.dumps(_config()))
    with pytest.raises(ValueError, match=r"m/model does not match the CRNN of .*config.json "
                                         r"\(in_channels=3\): .*unexpected \['params'\]\['gru_l1'\]"):
        checkpointing.load_model(tmp_path / "m")


def test_a_kept_scaler_of_other_features_and_the_same_channel_count_is_refused(tmp_path):
    """The channel count alone does not tell a GCC-PHAT scaler from a SALSA-Lite one."""
    checkpointing.save_model(tmp_path, _variables(0), _config(epoch=1), _scaler())
    with pytest.raises(ValueError, match=r"feature_scaler.h5 was stored for a model of gcc_phat features "
                                         r"\(3 channels\) and would be kept for this one of salsa_lite \(3\)"):
        checkpointing.save_model(tmp_path, _variables(1), _config(features="salsa_lite", epoch=2),
                                 overwrite=True)
    loaded, config, _ = checkpointing.load_model(tmp_path)
    assert config["features"] == "gcc_phat" and config["epoch"] == 1
    np.testing.assert_array_equal(loaded["params"]["fc1"]["bias"], _variables(0)["params"]["fc1"]["bias"])


def test_a_save_that_fails_before_its_commit_leaves_the_directory_as_it_was(tmp_path, monkeypatch):
    """A write error (a full disk) while staging: the error propagates, the old model loads, and
    no staging folder holding a half-written model is left behind."""
    checkpointing.save_model(tmp_path, _variables(0), _config(epoch=1), _scaler())

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpointing.scaler_lib, "save_scaler", full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        checkpointing.save_model(tmp_path, _variables(1), _config(epoch=2), _scaler(), overwrite=True)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "feature_scaler.h5", "model"]
    loaded, config, _ = checkpointing.load_model(tmp_path)
    assert config["epoch"] == 1
    np.testing.assert_array_equal(loaded["params"]["fc1"]["bias"], _variables(0)["params"]["fc1"]["bias"])
