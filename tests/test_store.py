"""The HDF5 store: SPEC section 5 layout, the compact layout, the scaler, resume, and bad input."""

import csv
import dataclasses
import os
import pathlib
import json
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
import soundfile

import tiny_tree
from asd_jax import features as features_lib
from asd_jax import scaler as scaler_lib
from asd_jax.data import pipeline
from asd_jax.data import store
from asd_jax.data import tragictalkers as tt

FEATURES = "logmel"  # the fastest feature on CPU; the store does not depend on which one


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return tiny_tree.write(tmp_path_factory.mktemp("store") / "data")


@pytest.fixture(scope="module")
def reference_dir(tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference_store")
    store.build_store(tree.root, "GT_GT", FEATURES, out, batch_size=4, progress=False)
    return out


def _audio(tree, key):
    """(96000, 16) audio of an audio chunk, read with soundfile (SPEC section 2 start and padding)."""
    first = 1 if key.rig == "01" else 23
    start = int(round(key.start_time * 30) / 30 * 48000)
    out = np.zeros((96000, 16), np.float32)
    for m in range(16):
        x, _ = soundfile.read(tree.mic_path("development", key.sequence, f"{first + m:02d}"), dtype="float32")
        part = x[start:start + 96000]
        out[:len(part), m] = part
    return out


def test_reference_layout(tree, reference_dir):
    index = tt.TragicTalkers(tree.root).development_chunks("GT_GT")
    n = len(index)
    assert not (reference_dir / "development_dataset.h5.partial").exists()
    with h5py.File(reference_dir / "development_dataset.h5", "r") as f:
        assert {k: (f[k].shape, f[k].dtype.kind) for k in
                ("features", "cams", "target_coords", "pseudo_labels", "speech_activity", "sequence")} == {
            "features": ((n, 16, 960, 64), "f"), "cams": ((n, 1, 11), "f"), "target_coords": ((n, 60), "f"),
            "pseudo_labels": ((n, 60), "f"), "speech_activity": ((n, 60), "f"), "sequence": ((n,), "S")}
        assert f["features"].dtype == np.float32
        assert [s.decode() for s in f["sequence"][()]] == list(index.sequence)
        np.testing.assert_array_equal(f["cams"][:, 0], index.cams)
        for key in ("target_coords", "pseudo_labels", "speech_activity"):
            np.testing.assert_array_equal(f[key][()], getattr(index, key))
        # Two audio chunks (rig 01 and rig 02 of the last chunk of the first sequence), every camera row.
        keys = [tt.AudioKey("conversation1_t1", "01", 2.0), tt.AudioKey("conversation1_t1", "02", 2.0)]
        expected = np.asarray(features_lib.compute(FEATURES, np.stack([_audio(tree, k) for k in keys])))
        for key, feats in zip(keys, expected):
            rows = np.flatnonzero((index.sequence == key.sequence) & (index.rig == key.rig)
                                  & (index.start_time == key.start_time))
            assert len(rows) == 2
            for row in rows:
                np.testing.assert_allclose(f["features"][row], feats.transpose(2, 0, 1), atol=1e-4)


def test_scaler_is_numpy_mean_std_over_all_chunks_and_frames(reference_dir):
    with h5py.File(reference_dir / "development_dataset.h5", "r") as f:
        x = f["features"][()].astype(np.float64)  # (N, C, 960, 64)
    with h5py.File(reference_dir / "feature_scaler.h5", "r") as f:
        assert f["mean"].shape == f["std"].shape == (16, 1, 64) and f["mean"].dtype == np.float32
    scaler = scaler_lib.load_scaler(reference_dir / "feature_scaler.h5")
    np.testing.assert_allclose(scaler.mean, x.mean(axis=(0, 2)).T, rtol=1e-6)
    np.testing.assert_allclose(scaler.std, x.std(axis=(0, 2)).T, rtol=1e-5)


def test_compact_layout(tree, reference_dir, tmp_path):
    store.build_store(tree.root, "GT_GT", FEATURES, tmp_path, layout="compact", batch_size=4, progress=False)
    with h5py.File(tmp_path / "development_dataset.h5", "r") as f:
        n, m = len(f["sequence"]), len(f["rig_features"])
        assert m == n // 2  # two cameras per rig in the tiny tree
        assert f["feature_index"].shape == (n,) and "features" not in f
        assert store.store_bytes(n, m, 16, "compact") == f["rig_features"].nbytes == m * 16 * 960 * 64 * 4
    compact = pipeline.HDF5Source(tmp_path / "development_dataset.h5")
    reference = pipeline.HDF5Source(reference_dir / "development_dataset.h5")
    assert compact.compact and not reference.compact
    everything = np.arange(len(reference))
    got, expected = compact.load(everything), reference.load(everything)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    # A padded read: the rows asked for, then zero rows.
    stored = compact._features  # pylint: disable=protected-access
    padded = np.full((6, *stored.shape[1:]), np.nan, np.float32)
    assert pipeline._read_rows(stored, np.array([1, 2, 5]), padded) is padded  # pylint: disable=protected-access
    np.testing.assert_array_equal(padded[:3], stored[1:6][[0, 1, 4]])
    assert not padded[3:].any()
    # Either layout laid out on the device: the same features (a shuffled subset, rows repeated).
    subset = np.random.default_rng(0).permutation(len(reference))[:7]
    for path in (tmp_path, reference_dir):
        on_device = pipeline.HDF5Source(path / "development_dataset.h5", keep_on_device=True).load(subset)
        np.testing.assert_array_equal(np.asarray(on_device["features"]), expected["features"][subset])
    a = scaler_lib.load_scaler(tmp_path / "feature_scaler.h5")
    b = scaler_lib.load_scaler(reference_dir / "feature_scaler.h5")
    np.testing.assert_allclose(a.mean, b.mean, rtol=1e-6)
    np.testing.assert_allclose(a.std, b.std, rtol=1e-6)
    assert store.store_bytes(n, m, 16, "compact") * 2 == store.store_bytes(n, m, 16, "reference")


def test_existing_store_needs_overwrite(tree, reference_dir):
    with pytest.raises(FileExistsError, match="development_dataset.h5 exists; pass overwrite=True"):
        store.build_store(tree.root, "GT_GT", FEATURES, reference_dir, progress=False)


def _interrupted_at_second_batch(monkeypatch, *build_args, **build_kwargs):
    """build_store(*build_args, **build_kwargs) stopped by a KeyboardInterrupt as it adds its
    second batch to the scaler statistics (after the first batch's writes)."""
    real, calls = scaler_lib.ScalerAccumulator.update, []

    def failing(self, *args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated interruption")
        real(self, *args)

    with monkeypatch.context() as m:
        m.setattr(scaler_lib.ScalerAccumulator, "update", failing)
        with pytest.raises(KeyboardInterrupt):
            store.build_store(*build_args, **build_kwargs)


def test_interrupted_build_resumes(tree, reference_dir, tmp_path, monkeypatch):
    _interrupted_at_second_batch(monkeypatch, tree.root, "GT_GT", FEATURES, tmp_path, batch_size=4,
                                 progress=False)
    partial = tmp_path / "development_dataset.h5.partial"
    assert partial.exists() and not (tmp_path / "development_dataset.h5").exists()
    assert not (tmp_path / "feature_scaler.h5").exists()
    with h5py.File(partial, "r") as f:
        assert f["_progress"][0] == 4 and not f.attrs["asd_jax_complete"]  # audio chunks done
    with pytest.raises(ValueError, match="unfinished store"):
        pipeline.HDF5Source(partial)

    with pytest.raises(ValueError, match=r"partial build with different arguments \(layout"):
        store.build_store(tree.root, "GT_GT", FEATURES, tmp_path, layout="compact", progress=False)

    with monkeypatch.context() as m:
        _, batches = _write_calls(m)
        store.build_store(tree.root, "GT_GT", FEATURES, tmp_path, batch_size=4, progress=False)
    assert len(batches) == 2  # audio chunks 4..11 only: two batches of 4
    assert not partial.exists()
    with h5py.File(tmp_path / "development_dataset.h5", "r") as f, \
            h5py.File(reference_dir / "development_dataset.h5", "r") as g:
        assert "_progress" not in f and f.attrs["asd_jax_complete"]
        np.testing.assert_array_equal(f["features"][()], g["features"][()])
    for key in ("mean", "std"):
        np.testing.assert_allclose(getattr(scaler_lib.load_scaler(tmp_path / "feature_scaler.h5"), key),
                                   getattr(scaler_lib.load_scaler(reference_dir / "feature_scaler.h5"), key),
                                   rtol=1e-6)


def test_unreadable_partial_store_is_kept_until_restart(tree, tmp_path):
    partial = tmp_path / "development_dataset.h5.partial"
    partial.write_bytes(b"garbage from a crashed run")
    kwargs = dict(sequences=["femalemonologue1_t1"], batch_size=8, progress=False)
    with pytest.raises(ValueError, match=rf"partial store {partial} cannot be resumed .*; rerun with "
                                         r"restart=True \(--restart\)"):
        store.build_store(tree.root, "GT_GT", FEATURES, tmp_path, **kwargs)
    assert partial.read_bytes() == b"garbage from a crashed run"
    store.build_store(tree.root, "GT_GT", FEATURES, tmp_path, restart=True, **kwargs)
    assert not partial.exists()
    assert len(pipeline.HDF5Source(tmp_path / "development_dataset.h5")) == 12


_HOLD = """
import sys, time, h5py
f = h5py.File(sys.argv[1], "r+")  # takes HDF5's exclusive lock, as a running build does
print("holding", flush=True)
time.sleep(60)
"""


def test_partial_store_of_a_running_build_is_never_touched(tree, tmp_path):
    partial = tmp_path / "development_dataset.h5.partial"
    with h5py.File(partial, "w") as f:
        f.attrs["written by"] = "the other build"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(partial)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        before = partial.read_bytes()  # as the other build has it (opening for writing marks the file)
        for restart in (False, True):
            with pytest.raises(store.StoreBusyError, match=rf"another build seems to be using {partial}"):
                store.build_store(tree.root, "GT_GT", FEATURES, tmp_path, sequences=["femalemonologue1_t1"],
                                  restart=restart, progress=False)
            assert partial.read_bytes() == before
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert not (tmp_path / "development_dataset.h5").exists()


class _Interrupt(KeyboardInterrupt):
    pass


def _write_calls(monkeypatch, stop_after=None, created=None):
    """Counts every HDF5 write (dataset creation and assignment, attribute assignment, deletion)
    made to the store during a build once it creates its partial store (or resumes one); raises
    _Interrupt right after write `stop_after`. The numbers of the writes made while creating the
    partial store are appended to the list `created`, when given. The writes of
    `feature_scaler.h5` (atomic, see test_atomic.py) are not counted: an interrupt just before it
    is tested by test_an_overwrite_interrupted_around_the_rename_never_leaves_a_mixed_pair."""
    log = []  # ScalerAccumulator.update calls made before each write
    updates = []
    active, creating = [], []
    real_create, real_fill, real_update = store._create, store._fill, scaler_lib.ScalerAccumulator.update
    real_save = scaler_lib.save_scaler

    def save(*args, **kwargs):
        active.clear()
        return real_save(*args, **kwargs)

    def create(*args, **kwargs):
        active.append(True)
        creating.append(True)
        try:
            return real_create(*args, **kwargs)
        finally:
            creating.clear()

    def fill(*args, **kwargs):
        active.append(True)
        return real_fill(*args, **kwargs)

    def update(self, *args, **kwargs):
        updates.append(1)
        return real_update(self, *args, **kwargs)

    def counted(real):
        def write(self, *args, **kwargs):
            out = real(self, *args, **kwargs)
            if active:
                log.append(len(updates))
                if creating and created is not None:
                    created.append(len(log))
                if len(log) == stop_after:
                    raise _Interrupt(f"interrupted after write {stop_after}")
            return out
        return write

    monkeypatch.setattr(store, "_create", create)
    monkeypatch.setattr(scaler_lib, "save_scaler", save)
    monkeypatch.setattr(store, "_fill", fill)
    monkeypatch.setattr(scaler_lib.ScalerAccumulator, "update", update)
    for cls, name in ((h5py.Dataset, "__setitem__"), (h5py.AttributeManager, "__setitem__"),
                      (h5py.Group, "__delitem__"), (h5py.Group, "create_dataset")):
        monkeypatch.setattr(cls, name, counted(getattr(cls, name)))
    return log, updates


def _four_chunk_tree(tmp_path):
    """A data tree of 4 development audio chunks, one camera each (2 batches of 2)."""
    return tiny_tree.write(tmp_path / "data", dev_seconds={"conversation1_t1": 2.0}, test_seconds={},
                           cameras=("cam01", "cam12"))


def _read_build(out):
    """(features, scaler) of the finished store in `out`."""
    with h5py.File(out / "development_dataset.h5", "r") as f:
        features = f["features"][()]
    return features, scaler_lib.load_scaler(out / "feature_scaler.h5")


def _assert_is_the_clean_build(out, clean, clean_scaler, case):
    """The finished store in `out` has the clean build's features and scaler (the scaler file
    recording the store's features, condition and index digest), and no progress."""
    assert not (out / "development_dataset.h5.partial").exists(), case
    with h5py.File(out / "development_dataset.h5", "r") as f:
        assert f.attrs["asd_jax_complete"] and "_progress" not in f, case
        np.testing.assert_array_equal(f["features"][()], clean, err_msg=case)
        args = json.loads(f.attrs["asd_jax_args"])
    with h5py.File(out / "feature_scaler.h5", "r") as f:
        assert dict(f.attrs) == {"features": FEATURES, "condition": "GT_GT",
                                 "index_sha256": args["index_sha256"]}, case
    resumed = scaler_lib.load_scaler(out / "feature_scaler.h5", features=FEATURES)
    np.testing.assert_array_equal(resumed.mean, clean_scaler.mean, err_msg=case)
    np.testing.assert_array_equal(resumed.std, clean_scaler.std, err_msg=case)


@pytest.fixture(scope="module")
def four_chunks(tmp_path_factory):
    """(tree, features, scaler) of the four-chunk tree and its clean build in `tree.root.parent / "clean"`."""
    tmp_path = tmp_path_factory.mktemp("four_chunks")
    tree = _four_chunk_tree(tmp_path)
    store.build_store(tree.root, "GT_GT", FEATURES, tmp_path / "clean", batch_size=2, progress=False)
    return (tree, *_read_build(tmp_path / "clean"))


def test_an_interrupt_after_any_write_resumes_to_the_clean_build(tmp_path, monkeypatch):
    """Findings of audits: statistics counted twice, or a finished build redone, after a resume;
    a Ctrl-C while the partial store was being created left one that the same command refused."""
    tree = _four_chunk_tree(tmp_path)
    kwargs = dict(batch_size=2, progress=False, prefetch=0)  # 2 batches
    created = []
    with monkeypatch.context() as m:
        log, updates = _write_calls(m, created=created)
        store.build_store(tree.root, "GT_GT", FEATURES, tmp_path / "clean", **kwargs)
    n_batches = len(updates)
    assert n_batches == 2 and len(log) >= len(created) + 2 * n_batches  # features + progress per batch
    assert created == list(range(1, len(created) + 1)) and len(created) >= 10
    clean, clean_scaler = _read_build(tmp_path / "clean")

    for k in range(1, len(log) + 1):
        out = tmp_path / f"interrupted_{k}"
        with monkeypatch.context() as m:
            _write_calls(m, stop_after=k)
            with pytest.raises(_Interrupt):
                store.build_store(tree.root, "GT_GT", FEATURES, out, **kwargs)
        if k in created:  # nothing is left: the rerun is a new build (done once, for the last)
            assert not list(out.iterdir()), f"interrupt after write {k}"
            if k != created[-1]:
                continue
        finished = False
        if (out / "development_dataset.h5.partial").exists():
            with h5py.File(out / "development_dataset.h5.partial", "r") as f:
                finished = bool(f.attrs["asd_jax_complete"])
        with monkeypatch.context() as m:
            _, redone = _write_calls(m)
            store.build_store(tree.root, "GT_GT", FEATURES, out, **kwargs)
        # at most the batch in flight is computed again; nothing once the build is finished
        assert len(redone) <= n_batches - log[k - 1] + 1, f"interrupt after write {k}"
        assert not (finished and redone), f"interrupt after write {k}: a finished build was redone"
        _assert_is_the_clean_build(out, clean, clean_scaler, f"interrupt after write {k}")


_KILLED_AFTER_WRITE = """
import os, sys
import h5py
from asd_jax.data import store
root, features, out, stop_after = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
filling, writes = [], []
real_fill, real_setitem = store._fill, h5py.Dataset.__setitem__
def fill(*args, **kwargs):  # writes are counted from the first feature row on
    filling.append(True)
    return real_fill(*args, **kwargs)
def setitem(self, *args):
    real_setitem(self, *args)
    if filling:
        writes.append(1)
        if len(writes) == stop_after:
            os._exit(3)  # no exception, no close, no flush: as a killed process or a power cut
store._fill, h5py.Dataset.__setitem__ = fill, setitem
store.build_store(root, "GT_GT", features, out, batch_size=2, progress=False, prefetch=0)
"""


def test_a_killed_build_resumes_to_the_clean_build(four_chunks, tmp_path, monkeypatch):
    """A build killed outright (no exception handlers, no HDF5 close) after any dataset write of
    its feature loop leaves a partial store that resumes to the clean build and computes again
    only the batches whose progress record had not been flushed: what the last flush recorded is
    on disk, and the progress record never counts features that are not."""
    tree, clean, clean_scaler = four_chunks
    for k in range(1, 7):  # after each of 4 feature rows and 2 progress records: 1, 2, P, 3, 4, P
        out = tmp_path / f"killed_{k}"
        killed = subprocess.run([sys.executable, "-c", _KILLED_AFTER_WRITE, str(tree.root), FEATURES,
                                 str(out), str(k)], capture_output=True, text=True)
        assert killed.returncode == 3, killed.stderr
        assert (out / "development_dataset.h5.partial").exists()
        with monkeypatch.context() as m:
            _, redone = _write_calls(m)
            store.build_store(tree.root, "GT_GT", FEATURES, out, batch_size=2, progress=False)
        # the first batch's record is flushed once write 4 starts the second batch
        assert len(redone) <= (2 if k <= 3 else 1), f"killed after write {k}"
        _assert_is_the_clean_build(out, clean, clean_scaler, f"killed after write {k}")


# ---- bad input: a clear message and nothing written -------------------------------------------

def _rewrite_csv(path, edit):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(edit(rows))


def _mic(tree, mic):
    return tree.mic_path("development", "conversation1_t1", mic)


def _missing_mic(tree):
    _mic(tree, "05").unlink()


def _wrong_rate(tree):
    soundfile.write(_mic(tree, "27"), np.zeros(1000), 44100, subtype="PCM_16")


def _stereo(tree):
    soundfile.write(_mic(tree, "08"), np.zeros((1000, 2)), 48000, subtype="PCM_16")


def _truncated(tree):
    data = _mic(tree, "09").read_bytes()
    _mic(tree, "09").write_bytes(data[:len(data) // 2])


def _nan_in_float_wav(tree):
    x, _ = soundfile.read(_mic(tree, "04"), dtype="float32")
    x[-1] = np.nan
    soundfile.write(_mic(tree, "04"), x, 48000, subtype="FLOAT")


def _x_out_of_range(tree):
    def edit(rows):
        rows[7][2] = "1.25"
        return rows
    _rewrite_csv(tree.csv_path("GT_GT"), edit)


def _missing_column(tree):
    _rewrite_csv(tree.csv_path("GT_GT"), lambda rows: [r[:4] for r in rows])


def _unknown_label(tree):
    def edit(rows):
        rows[5][3] = "MAYBE"
        return rows
    _rewrite_csv(tree.csv_path("GT_GT"), edit)


def _empty(tree):
    _rewrite_csv(tree.csv_path("GT_GT"), lambda rows: rows[:1])


def _missing_sequence_folder(tree):
    folder = _mic(tree, "01").parent
    folder.rename(folder.with_name("renamed"))


BAD_INPUTS = {
    "missing mic file": (_missing_mic, "GT_GT", r"no file for microphone 05 of rig 01"),
    "wrong sample rate": (_wrong_rate, "GT_GT",
                          r"27_conversation1_t1\.wav: sample rate 44100 Hz, expected 48000"),
    "stereo file": (_stereo, "GT_GT", r"08_conversation1_t1\.wav: 2 channels, expected a mono file"),
    "truncated wav": (_truncated, "GT_GT", r"09_conversation1_t1\.wav is truncated"),
    "nan in a float wav": (_nan_in_float_wav, "GT_GT", r"04_conversation1_t1\.wav: non-finite sample at "
                                                       r"index 95999"),
    "x outside [0, 1]": (_x_out_of_range, "GT_GT",
                         r"development_GT_GT\.csv, line 8: x '1.25' is not a finite number in \[0, 1\]"),
    "csv missing column": (_missing_column, "GT_GT",
                           r"development_GT_GT\.csv: missing column\(s\) \['va_label'\]"),
    "csv unknown label": (_unknown_label, "GT_GT",
                          r"development_GT_GT\.csv, line 6: unknown pseudo_label 'MAYBE'"),
    "unknown condition": (lambda tree: None, "GT_XX", r"unknown condition 'GT_XX'"),
    "empty development set": (_empty, "GT_GT", r"empty development set: .*development_GT_GT\.csv"),
    "sequence without audio": (_missing_sequence_folder, "GT_GT",
                               r"names sequence\(s\) \['conversation1_t1'\] that"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_reported_before_anything_is_written(tmp_path, case):
    tree = _four_chunk_tree(tmp_path)
    corrupt, condition, message = BAD_INPUTS[case]
    corrupt(tree)
    out = tmp_path / "out"
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        store.build_store(tree.root, condition, FEATURES, out, progress=False)
    assert not out.exists()


def test_not_a_layout(tmp_path):
    (tmp_path / "csv").mkdir()
    with pytest.raises(ValueError, match=rf"{tmp_path} is not a TragicTalkers layout: missing "
                                         r"TragicTalkers/audio$"):
        store.build_store(tmp_path, "GT_GT", FEATURES, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_scaler_weighs_each_audio_chunk_by_its_cameras(tmp_path):
    """Rigs with 3 and 1 cameras: the scaler is the statistics of every example (camera row), so
    a rig-1 chunk counts three times a rig-2 chunk (counted once per audio chunk, it differs)."""
    tree = tiny_tree.write(tmp_path / "data", dev_seconds={"conversation1_t1": 3.0}, test_seconds={},
                           cameras=("cam01", "cam02", "cam03", "cam12"))
    store.build_store(tree.root, "GT_GT", FEATURES, tmp_path / "store", batch_size=4, progress=False)
    with h5py.File(tmp_path / "store" / "development_dataset.h5", "r") as f:
        x = f["features"][()].astype(np.float64)  # (N, C, 960, 64), one row per camera
        assert len(x) == 12  # 3 chunks (hop 1 s) x 4 cameras
    scaler = scaler_lib.load_scaler(tmp_path / "store" / "feature_scaler.h5")
    np.testing.assert_allclose(scaler.mean, x.mean(axis=(0, 2)).T, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(scaler.std, x.std(axis=(0, 2)).T, rtol=1e-5)


def _flip(label):
    return "NOT_SPEAKING" if label == "SPEAKING" else "SPEAKING"


@pytest.mark.parametrize("column", ["x", "pseudo_label", "va_label"])
def test_a_partial_build_is_not_resumed_after_a_label_changed(tmp_path, monkeypatch, column):
    """The labels are part of what a partial build was made from: after one x, pseudo_label or
    va_label of the development CSV changes, resuming would mix rows of two datasets, so it is
    refused."""
    tree = _four_chunk_tree(tmp_path)
    _interrupted_at_second_batch(monkeypatch, tree.root, "GT_GT", FEATURES, tmp_path / "s",
                                 batch_size=2, progress=False)
    csv_path = tree.root / "csv" / "development_GT_GT.csv"
    lines = csv_path.read_text().splitlines()
    row = dict(zip(lines[0].split(","), lines[1].split(",")))
    row[column] = f"{1 - float(row['x']):.4f}" if column == "x" else _flip(row[column])
    lines[1] = ",".join(row.values())
    csv_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"partial build with different arguments \(index_sha256"):
        store.build_store(tree.root, "GT_GT", FEATURES, tmp_path / "s", batch_size=2, progress=False)


@pytest.mark.parametrize("kwargs, message", [
    (dict(layout="rows"), r"unknown layout 'rows': expected one of \('reference', 'compact'\)"),
    (dict(features="mfcc"), r"unknown features 'mfcc': expected one of \["),
    (dict(batch_size=0), r"batch_size must be >= 1, got 0"),
    (dict(sequences="conversation1_t1"), r"sequences must be a list of sequence names, got the string "
                                         r"'conversation1_t1'; for that one sequence pass \['conversation1_t1'\]"),
], ids=["layout", "features", "batch_size", "sequences-string"])
def test_bad_arguments_are_reported_before_anything_is_written(tmp_path, kwargs, message):
    tree = _four_chunk_tree(tmp_path)
    kwargs = dict(dict(features=FEATURES), **kwargs)
    with pytest.raises(ValueError, match=message):
        store.build_store(tree.root, "GT_GT", out_dir=tmp_path / "out", progress=False, **kwargs)
    assert not (tmp_path / "out").exists()


def test_overwrite_replaces_a_finished_store(four_chunks, tmp_path):
    tree, clean, clean_scaler = four_chunks
    out = tmp_path / "out"
    out.mkdir()
    (out / "development_dataset.h5").write_bytes(b"an old store")
    (out / "feature_scaler.h5").write_bytes(b"an old scaler")
    store.build_store(tree.root, "GT_GT", FEATURES, out, batch_size=2, overwrite=True, progress=False)
    _assert_is_the_clean_build(out, clean, clean_scaler, "overwrite")


@pytest.mark.parametrize("holds", [("config.json",), ("model",), ("config.json", "model")])
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_model_directory_or_workdir_is_refused_and_its_scaler_kept(four_chunks, tmp_path, holds,
                                                                      overwrite):
    """A run's workdir or a model directory given as the store's folder: its feature_scaler.h5
    is the model's, which the store's replaced (every later output of the model changed)."""
    tree, _, _ = four_chunks
    out = tmp_path / "run"
    out.mkdir()
    for name in holds:
        (out / name).mkdir() if name == "model" else (out / name).write_text("{}")
    (out / "feature_scaler.h5").write_bytes(b"the model's scaler")
    with pytest.raises(ValueError, match=rf"{out} holds {' and '.join(holds)}: a model directory or "
                                         r"training workdir, whose feature_scaler.h5 is the model's"):
        store.build_store(tree.root, "GT_GT", FEATURES, out, batch_size=2, overwrite=overwrite,
                          progress=False)
    assert (out / "feature_scaler.h5").read_bytes() == b"the model's scaler"
    assert sorted(p.name for p in out.iterdir()) == sorted([*holds, "feature_scaler.h5"])


def test_a_finished_partial_store_is_only_renamed_and_its_scaler_written(four_chunks, tmp_path,
                                                                         monkeypatch):
    """A build interrupted between setting `asd_jax_complete` and the rename: the next run only
    renames it and writes its scaler (kept in the store), whatever scaler file is there; a
    finished partial store without its kept scaler is an error (not a silent rebuild)."""
    tree, clean, clean_scaler = four_chunks
    clean_dir = tree.root.parent / "clean"
    for scaler_file in ("none", "its own", "another"):
        out = tmp_path / scaler_file.replace(" ", "_")
        out.mkdir()
        shutil.copy(clean_dir / "development_dataset.h5", out / "development_dataset.h5.partial")
        if scaler_file == "its own":
            shutil.copy(clean_dir / "feature_scaler.h5", out / "feature_scaler.h5")
        elif scaler_file == "another":
            scaler_lib.save_scaler(out / "feature_scaler.h5", scaler_lib.Scaler(
                np.zeros((64, 16), np.float32), np.ones((64, 16), np.float32)), "salsa_lite")
        with monkeypatch.context() as m:
            _, redone = _write_calls(m)
            store.build_store(tree.root, "GT_GT", FEATURES, out, batch_size=2, progress=False)
        assert not redone, scaler_file
        _assert_is_the_clean_build(out, clean, clean_scaler, f"finished partial store, scaler {scaler_file}")

    out = tmp_path / "without_kept_scaler"
    out.mkdir()
    partial = out / "development_dataset.h5.partial"
    shutil.copy(clean_dir / "development_dataset.h5", partial)
    with h5py.File(partial, "r+") as f:
        del f["scaler_std"]
    with pytest.raises(ValueError, match=rf"partial store {partial} cannot be resumed .*scaler_std.*; "
                                         r"rerun with restart=True"):
        store.build_store(tree.root, "GT_GT", FEATURES, out, batch_size=2, progress=False)
    assert not (out / "development_dataset.h5").exists()


def _interrupt_at(monkeypatch, target, name, when=lambda *args, **kwargs: True):
    """`target.name` raises _Interrupt when called with arguments for which `when` is true."""
    real = getattr(target, name)

    def stop(*args, **kwargs):
        if when(*args, **kwargs):
            raise _Interrupt(f"interrupted at {name}")
        return real(*args, **kwargs)
    monkeypatch.setattr(target, name, stop)


def test_an_overwrite_interrupted_around_the_rename_never_leaves_a_mixed_pair(four_chunks, tmp_path,
                                                                              monkeypatch):
    """Overwriting a finished store with one of other data: interrupted before the rename, the
    old store and its old scaler stay; interrupted between the rename and the scaler file, the
    new store has no scaler file (the old one is removed before the rename), and the same
    command only writes the scaler."""
    tree, clean, clean_scaler = four_chunks
    other = tiny_tree.write(tmp_path / "other", dev_seconds={"conversation1_t1": 2.0}, test_seconds={},
                            cameras=("cam01", "cam12"), seed=1)  # other audio and labels
    kwargs = dict(batch_size=2, progress=False, overwrite=True)
    out = tmp_path / "out"
    shutil.copytree(tree.root.parent / "clean", out)
    old_pair = {name: (out / name).read_bytes() for name in ("development_dataset.h5", "feature_scaler.h5")}

    with monkeypatch.context() as m:  # before the rename: nothing visible changes
        _interrupt_at(m, h5py.AttributeManager, "__setitem__",
                      lambda self, key, value: key == "asd_jax_complete" and value)
        with pytest.raises(_Interrupt):
            store.build_store(other.root, "GT_GT", FEATURES, out, **kwargs)
    assert {name: (out / name).read_bytes() for name in old_pair} == old_pair
    assert (out / "development_dataset.h5.partial").exists()

    with monkeypatch.context() as m:  # resumed, then interrupted after the rename
        _interrupt_at(m, scaler_lib, "save_scaler")
        with pytest.raises(_Interrupt):
            store.build_store(other.root, "GT_GT", FEATURES, out, **kwargs)
    with h5py.File(out / "development_dataset.h5", "r") as f:
        assert json.loads(f.attrs["asd_jax_args"])["data_root"] == str(other.root.resolve())
        new_features = f["features"][()]
        new_index = json.loads(f.attrs["asd_jax_args"])["index_sha256"]
    assert not (out / "feature_scaler.h5").exists()  # the old store's went before the rename

    with monkeypatch.context() as m:
        _, redone = _write_calls(m)
        store.build_store(other.root, "GT_GT", FEATURES, out, **kwargs)
    assert not redone
    with h5py.File(out / "feature_scaler.h5", "r") as f:
        assert f.attrs["index_sha256"] == new_index
    new_scaler = scaler_lib.load_scaler(out / "feature_scaler.h5", features=FEATURES)
    assert not np.array_equal(new_scaler.mean, clean_scaler.mean)
    np.testing.assert_allclose(new_scaler.mean, new_features.astype(np.float64).mean(axis=(0, 2)).T,
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(FileExistsError, match="exists; pass overwrite=True"):  # now a finished pair
        store.build_store(other.root, "GT_GT", FEATURES, out, batch_size=2, progress=False)


def _old_format(f):
    f.attrs["asd_jax_format_version"] = 2  # no scaler in the store


def _short_progress(f):
    del f["_progress"]
    f.create_dataset("_progress", shape=(5,), dtype=np.float64)


@pytest.mark.parametrize("corrupt, message", [
    (_old_format, r"format version 2, this asd-jax resumes version 3"),
    (_short_progress, r"'_progress' is not a \(2050,\) progress record"),  # 2 + 2 * 64 bins * 16 mics
], ids=["format-version", "progress-shape"])
def test_a_partial_store_of_another_format_is_kept_until_restart(four_chunks, tmp_path, monkeypatch,
                                                                  corrupt, message):
    tree = four_chunks[0]
    _interrupted_at_second_batch(monkeypatch, tree.root, "GT_GT", FEATURES, tmp_path, batch_size=2,
                                 progress=False)
    partial = tmp_path / "development_dataset.h5.partial"
    with h5py.File(partial, "r+") as f:
        corrupt(f)
    before = partial.read_bytes()
    with pytest.raises(ValueError, match=rf"partial store {partial} cannot be resumed \({message}\); rerun "
                                         r"with restart=True"):
        store.build_store(tree.root, "GT_GT", FEATURES, tmp_path, batch_size=2, progress=False)
    assert partial.read_bytes() == before


def test_make_hdf5_builds_a_store_and_reports_a_bad_flag_in_one_line(four_chunks, tmp_path):
    """`python -m experiments.make_hdf5` as a user runs it (a subprocess: its flags would clash
    with those of other binaries imported into the test process)."""
    tree, clean, clean_scaler = four_chunks
    repo_root = pathlib.Path(__file__).resolve().parents[1]

    def run(out, *extra):
        return subprocess.run(
            [sys.executable, "-m", "experiments.make_hdf5", f"--data_root={tree.root}",
             f"--features={FEATURES}", f"--out_dir={out}", *extra], cwd=repo_root,
            capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})

    bad = run(tmp_path / "bad", "--batch_size=0")
    assert (bad.returncode, bad.stderr) == (1, "error: batch_size must be >= 1, got 0\n")
    assert not (tmp_path / "bad").exists()

    built = run(tmp_path / "out", "--batch_size=2")
    assert built.returncode == 0, built.stderr
    _assert_is_the_clean_build(tmp_path / "out", clean, clean_scaler, "make_hdf5")
    assert len(pipeline.open_source(hdf5_dir=tmp_path / "out", features=FEATURES)) == 4


def test_store_names_and_start_times_are_those_of_the_index(tree, reference_dir):
    """`name` holds each example's `<sequence>-camNN` (not its sequence) and `start_time` its
    start in float64 seconds (the module's layout), as in the index the store was built from."""
    index = tt.TragicTalkers(tree.root).development_chunks("GT_GT")
    with h5py.File(reference_dir / "development_dataset.h5", "r") as f:
        assert [s.decode() for s in f["name"][()]] == list(index.name)
        assert f["start_time"].dtype == np.float64
        np.testing.assert_array_equal(f["start_time"][()], index.start_time)
    assert all(name.rpartition("-")[2].startswith("cam") for name in index.name)  # not bare sequences


def test_compact_store_records_the_audio_chunks_of_the_index(four_chunks, tmp_path):
    """The compact layout's `rig_chunk_*` are the (sequence, rig, start_time) of each audio chunk
    of the index, and `feature_index` each example's audio chunk."""
    tree = four_chunks[0]
    store.build_store(tree.root, "GT_GT", FEATURES, tmp_path, layout="compact", batch_size=2, progress=False)
    index = tt.TragicTalkers(tree.root).development_chunks("GT_GT")
    assert {k.rig for k in index.audio_keys} == {"01", "02"}  # both rigs: a rig is not a sequence
    with h5py.File(tmp_path / "development_dataset.h5", "r") as f:
        assert [s.decode() for s in f["rig_chunk_sequence"][()]] == [k.sequence for k in index.audio_keys]
        assert [s.decode() for s in f["rig_chunk_rig"][()]] == [k.rig for k in index.audio_keys]
        assert f["rig_chunk_start_time"].dtype == np.float64
        np.testing.assert_array_equal(f["rig_chunk_start_time"][()], [k.start_time for k in index.audio_keys])
        assert f["feature_index"].dtype == np.int64
        np.testing.assert_array_equal(f["feature_index"][()], index.audio_id)
        assert [s.decode() for s in f["name"][()]] == list(index.name)
        assert f["start_time"].dtype == np.float64
        np.testing.assert_array_equal(f["start_time"][()], index.start_time)


def test_a_scaler_file_with_the_right_attributes_but_other_values_is_rewritten(four_chunks, tmp_path):
    """A finished store beside a `feature_scaler.h5` that records the store's features, condition
    and index digest but holds other values (e.g. the other layout's scaler, or an edited one):
    it is not the store's scaler, so the same build rewrites it from the store's kept scaler."""
    tree, _, clean_scaler = four_chunks
    out = tmp_path / "out"
    shutil.copytree(tree.root.parent / "clean", out)
    with h5py.File(out / "feature_scaler.h5", "r+") as f:
        f["mean"][0, 0, 0] += 1.0
    store.build_store(tree.root, "GT_GT", FEATURES, out, batch_size=2, progress=False)  # no FileExistsError
    with h5py.File(out / "development_dataset.h5", "r") as f:
        kept_mean, kept_std = f["scaler_mean"][()], f["scaler_std"][()]
    with h5py.File(out / "feature_scaler.h5", "r") as f:
        np.testing.assert_array_equal(f["mean"][()], kept_mean)
        np.testing.assert_array_equal(f["std"][()], kept_std)
    rewritten = scaler_lib.load_scaler(out / "feature_scaler.h5", features=FEATURES)
    np.testing.assert_array_equal(rewritten.mean, clean_scaler.mean)  # the clean build's scaler again
    np.testing.assert_array_equal(rewritten.std, clean_scaler.std)


def test_the_index_fingerprint_covers_the_example_names(tree):
    """`_fingerprint` covers names, start times and labels: renaming one example's camera alone
    changes it (a partial build of other examples is not resumed)."""
    index = tt.TragicTalkers(tree.root).development_chunks("GT_GT")
    name = np.array(index.name, dtype=object)
    sequence, _, camera = name[0].rpartition("-")
    name[0] = f"{sequence}-{'cam02' if camera != 'cam02' else 'cam03'}"
    renamed = dataclasses.replace(index, name=name.astype(index.name.dtype))
    assert list(renamed.name) != list(index.name)
    assert store._fingerprint(renamed) != store._fingerprint(index)  # pylint: disable=protected-access
    assert store._fingerprint(dataclasses.replace(index)) == store._fingerprint(index)  # pylint: disable=protected-access


def test_a_partial_store_created_meanwhile_by_another_build_is_never_replaced(four_chunks, tmp_path,
                                                                              monkeypatch):
    """Another build creates the partial store while this one writes its temporary file: linking
    it into place fails (StoreBusyError), the other build's file is kept, no temporary is left."""
    tree = four_chunks[0]
    partial = tmp_path / "development_dataset.h5.partial"
    real = store._write_new  # pylint: disable=protected-access

    def write_new(tmp, *args, **kwargs):
        real(tmp, *args, **kwargs)
        partial.write_bytes(b"the other build's partial store")

    monkeypatch.setattr(store, "_write_new", write_new)
    with pytest.raises(store.StoreBusyError, match=rf"another build has just created {partial}"):
        store.build_store(tree.root, "GT_GT", FEATURES, tmp_path, batch_size=2, progress=False)
    assert partial.read_bytes() == b"the other build's partial store"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["development_dataset.h5.partial"]
