"""Input pipeline: store and on-the-fly sources agree, iteration order, prefetching, the scaler."""

import logging
import threading

import h5py
import jax
import numpy as np
import pytest
import soundfile

import tiny_tree
from asd_jax import features as features_lib
from asd_jax import scaler as scaler_lib
from asd_jax.data import pipeline
from asd_jax.data import store

FEATURES = "logmel"


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return tiny_tree.write(tmp_path_factory.mktemp("pipeline") / "data")


@pytest.fixture(scope="module")
def store_dir(tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline_store")
    store.build_store(tree.root, "GT_GT", FEATURES, out, layout="compact", batch_size=4, progress=False)
    return out


@pytest.fixture(scope="module")
def on_the_fly(tree):
    return pipeline.OnTheFlySource(tree.root, "GT_GT", FEATURES)


def test_store_and_on_the_fly_give_identical_batches(store_dir, on_the_fly):
    from_store = pipeline.open_source(hdf5_dir=store_dir, condition="GT_GT", features=FEATURES)
    assert isinstance(from_store, pipeline.HDF5Source) and len(from_store) == len(on_the_fly) == 24
    np.testing.assert_array_equal(from_store.sequences, on_the_fly.sequences)
    # so a run may resume from the store of the data it started on, or the other way round
    from asd_jax.training import loop
    assert loop.data_fingerprint(from_store.sequences) == loop.data_fingerprint(on_the_fly.sequences)
    # and with the features made on the device, from either
    on_device = [pipeline.open_source(**where, condition="GT_GT", features=FEATURES, keep_on_device=True)
                 for where in (dict(hdf5_dir=store_dir), dict(data_root=on_the_fly.dataset.root))]
    kwargs = dict(seed=3, epoch=1, prefetch=2)
    a = list(pipeline.iterate_batches(from_store, 8, **kwargs))
    others = [list(pipeline.iterate_batches(s, 8, **kwargs)) for s in (on_the_fly, *on_device)]
    assert len(a) == 3 and all(len(b) == 3 for b in others)
    for i, x in enumerate(a):
        assert set(x) == {"features", "cams", "target_coords", "pseudo_labels", "speech_activity"}
        assert x["features"].shape == (8, 960, 64, 16) and x["features"].dtype == np.float32
        assert isinstance(x["features"], np.ndarray) and isinstance(others[0][i]["features"], np.ndarray)
        assert all(isinstance(b[i]["features"], jax.Array) for b in others[1:])
        for b in others:
            assert set(b[i]) == set(x)
            for key in x:
                np.testing.assert_array_equal(x[key], np.asarray(b[i][key]), err_msg=key)


def test_training_keeps_on_the_fly_features_on_the_device(tree, store_dir):
    """Uncached on-the-fly features go from the source to the sharded training batch without a
    host copy. (The CPU backend does not guard device-to-host copies, so the test forbids what
    the old path did next: uploading a host array, with `jax.transfer_guard_host_to_device`.)"""
    from asd_jax.training import configs, loop

    config = configs.tiny().replace(data_root=str(tree.root), features=FEATURES, cache_features=False)
    source = loop.open_data(config)
    assert isinstance(source, pipeline.OnTheFlySource) and source.keep_on_device
    stored = loop.open_data(config.replace(hdf5_dir=str(store_dir)))  # the store is read, not the root
    assert isinstance(stored, pipeline.HDF5Source) and stored.keep_on_device
    for cached in (config, config.replace(hdf5_dir=str(store_dir))):
        cached = loop.open_data(cached.replace(cache_features=True))
        assert isinstance(cached, loop.CachedSource) and not cached._source.keep_on_device  # pylint: disable=protected-access
    mesh = loop.make_mesh()
    features = source.load(np.arange(4))["features"]
    with jax.transfer_guard_host_to_device("disallow_explicit"):
        sharded = loop._shard_batch({"features": features}, mesh, 4)  # pylint: disable=protected-access
        with pytest.raises(jax.errors.JaxRuntimeError, match="host-to-device transfer"):  # it catches uploads
            loop._shard_batch({"features": np.asarray(features)}, mesh, 4)  # pylint: disable=protected-access
    np.testing.assert_array_equal(np.asarray(sharded["features"]), np.asarray(features))


def test_on_the_fly_computes_each_audio_chunk_once(tree, on_the_fly, monkeypatch):
    index = on_the_fly.index
    same = np.flatnonzero((index.sequence == "conversation1_t1") & (index.start_time == 1.0))
    assert len(same) == 4  # cam01, cam11 (rig 01) and cam12, cam22 (rig 02)
    asked = []
    real = on_the_fly.dataset.load_audio

    def recording(split, keys, out=None, rows=None):
        asked.extend(keys)
        return real(split, keys, out=out, rows=rows)

    monkeypatch.setattr(on_the_fly.dataset, "load_audio", recording)
    batch = on_the_fly.load(same[[2, 0, 1, 3]])
    assert sorted(k.rig for k in asked) == ["01", "02"]
    # independent of the pipeline: soundfile audio of the two rigs, features computed directly by
    # features.compute (itself tested against numpy and librosa in test_features)
    audio = np.zeros((2, 96000, 16), np.float32)
    for r, first in enumerate((1, 23)):
        for m in range(16):
            x, _ = soundfile.read(tree.mic_path("development", "conversation1_t1", f"{first + m:02d}"),
                                  dtype="float32")
            audio[r, :, m] = x[48000:144000]
    expected = np.asarray(features_lib.compute(FEATURES, audio))
    rig_of = {c: r for c, r in zip(index.camera[same], (0, 0, 1, 1))}
    for i, camera in enumerate(index.camera[same[[2, 0, 1, 3]]]):
        np.testing.assert_allclose(batch["features"][i], expected[rig_of[camera]], atol=1e-4)


def test_epoch_permutation_is_a_pure_function():
    p = pipeline.epoch_permutation(42, 3, 100)
    np.testing.assert_array_equal(p, np.random.default_rng([42, 3]).permutation(100))
    np.testing.assert_array_equal(p, pipeline.epoch_permutation(42, 3, 100))
    assert not np.array_equal(p, pipeline.epoch_permutation(42, 4, 100))
    np.testing.assert_array_equal(np.sort(p), np.arange(100))


def test_batch_indices_and_processes():
    indices = np.arange(5, 28)  # 23 examples
    plan = pipeline.batch_indices(40, 4, seed=1, epoch=2, indices=indices)
    assert [len(b) for b in plan] == [4] * 5 + [3]
    np.testing.assert_array_equal(np.concatenate(plan), indices[pipeline.epoch_permutation(1, 2, 23)])
    assert len(plan) == pipeline.num_batches(40, 4, indices=indices)
    assert len(pipeline.batch_indices(40, 4, seed=1, epoch=2, indices=indices, drop_last=True)) == 5
    assert pipeline.num_batches(40, 4, indices=indices, drop_last=True) == 5
    # drop_last drops only a short last batch: 8 examples in batches of 4 are 2 whole batches
    assert [len(b) for b in pipeline.batch_indices(8, 4, drop_last=True)] == [4, 4]
    assert pipeline.num_batches(8, 4, drop_last=True) == 2
    # two processes: contiguous halves of each global batch
    per_process = [pipeline.batch_indices(24, 6, seed=0, epoch=0, process_index=p, process_count=2)
                   for p in range(2)]
    for p0, p1, whole in zip(*per_process, pipeline.batch_indices(24, 6, seed=0, epoch=0)):
        np.testing.assert_array_equal(np.concatenate([p0, p1]), whole)
    with pytest.raises(ValueError, match="not divisible by process_count 4"):
        pipeline.batch_indices(24, 6, process_count=4)
    with pytest.raises(ValueError, match="last batch of 3 examples cannot be split over 2"):
        pipeline.batch_indices(23, 4, process_count=2)
    with pytest.raises(IndexError, match=r"must lie in \[0, 10\)"):
        pipeline.batch_indices(10, 4, indices=[3, 10])
    with pytest.raises(IndexError, match=r"batch_indices: example indices must lie in \[0, 10\), got \[-1, 3\]"):
        pipeline.batch_indices(10, 4, indices=[3, -1])
    for batch_size, process_index, process_count in ((0, 0, 1), (4, 2, 2), (4, -1, 2)):
        with pytest.raises(ValueError, match=rf"need batch_size >= 1 and 0 <= process_index < process_count, "
                                             rf"got {batch_size}, {process_index}, {process_count}"):
            pipeline.batch_indices(24, batch_size, process_index=process_index, process_count=process_count)


class _IndexSource:
    """A cheap source whose batches are the indices themselves."""

    def __init__(self, n, fail_at=None):
        self.n, self.fail_at = n, fail_at
        self.sequences = np.array(["s"] * n)
        self.feature_groups = np.arange(n)

    def __len__(self):
        return self.n

    def load(self, indices):
        if self.fail_at is not None and self.fail_at in indices:
            raise RuntimeError(f"cannot read example {self.fail_at}")
        return {"index": np.asarray(indices)}


def test_iterate_batches_resumes_exactly():
    source = _IndexSource(50)
    full = [b["index"] for b in pipeline.iterate_batches(source, 8, seed=7, epoch=5)]
    tail = [b["index"] for b in pipeline.iterate_batches(source, 8, seed=7, epoch=5, start_batch=4)]
    sync = [b["index"] for b in pipeline.iterate_batches(source, 8, seed=7, epoch=5, prefetch=0)]
    assert len(full) == 7 and len(tail) == 3
    for a, b in zip(full[4:], tail):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(full, sync):
        np.testing.assert_array_equal(a, b)
    unshuffled = [b["index"] for b in pipeline.iterate_batches(source, 8, seed=7, epoch=5, shuffle=False)]
    np.testing.assert_array_equal(np.concatenate(unshuffled), np.arange(50))
    assert list(pipeline.iterate_batches(source, 8, seed=7, epoch=5, start_batch=7)) == []  # the epoch's end
    for start in (8, -1):
        with pytest.raises(ValueError, match=rf"start_batch {start} outside \[0, 7\]"):
            pipeline.iterate_batches(source, 8, seed=7, epoch=5, start_batch=start)


def test_prefetch_errors_and_early_stop():
    with pytest.raises(RuntimeError, match="cannot read example 13"):
        list(pipeline.iterate_batches(_IndexSource(50, fail_at=13), 4, seed=0, epoch=0, shuffle=False))
    before = {t.ident for t in threading.enumerate()}
    batches = pipeline.iterate_batches(_IndexSource(1000), 4, seed=0, epoch=0, prefetch=3)
    next(batches)
    batches.close()  # stops and joins the producer thread
    assert {t.ident for t in threading.enumerate() if t.name == "asd_jax-prefetch"} <= before


def test_scaler_equals_numpy_over_all_chunks_and_frames(on_the_fly, store_dir):
    from_store = pipeline.HDF5Source(store_dir / "development_dataset.h5")  # equals on_the_fly (tested above)
    everything = from_store.load(np.arange(len(from_store)))["features"].astype(np.float64)  # (N, T, F, C)
    scaler = pipeline.compute_scaler(on_the_fly, batch_size=4, progress=False)
    np.testing.assert_allclose(scaler.mean, everything.mean(axis=(0, 1)), rtol=1e-6)
    np.testing.assert_allclose(scaler.std, everything.std(axis=(0, 1)), rtol=1e-5)
    stored = scaler_lib.load_scaler(store_dir / "feature_scaler.h5")
    np.testing.assert_allclose(stored.mean, scaler.mean, rtol=1e-6)
    np.testing.assert_allclose(stored.std, scaler.std, rtol=1e-6)
    # a subset (one fold) weighs each audio chunk by its cameras in the subset
    subset = np.flatnonzero(on_the_fly.index.camera != "cam22")
    part = pipeline.compute_scaler(on_the_fly, subset, batch_size=4, progress=False)
    np.testing.assert_allclose(part.mean, everything[subset].mean(axis=(0, 1)), rtol=1e-6)
    np.testing.assert_allclose(part.std, everything[subset].std(axis=(0, 1)), rtol=1e-5)
    # three processes' shares of the same subset, merged: the same statistics, each feature
    # group loaded by exactly one process
    loads = []
    real_load = from_store.load
    from_store.load = lambda indices: (loads.append(np.asarray(indices)), real_load(indices))[1]
    shares = [pipeline.accumulate_scaler(from_store, subset, batch_size=2, progress=False,
                                         process_index=p, process_count=3) for p in range(3)]
    merged = scaler_lib.ScalerAccumulator()
    for share in shares:
        merged.merge(share)
    np.testing.assert_allclose(merged.result().mean, part.mean, rtol=1e-6)
    np.testing.assert_allclose(merged.result().std, part.std, rtol=1e-6)
    groups = from_store.feature_groups[np.concatenate(loads)]
    assert sorted(groups) == sorted(set(from_store.feature_groups[subset]))
    with pytest.raises(ValueError, match=r"process_index 3 must be in \[0, process_count=3\)"):
        pipeline.accumulate_scaler(from_store, subset, process_index=3, process_count=3)


class _ConstantBinSource(_IndexSource):
    def __init__(self, features):
        super().__init__(len(features))
        self.features = features

    def load(self, indices):
        return {"features": self.features[indices]}


def test_zero_variance_bin_is_reported_and_gets_std_one(caplog):
    x = np.random.default_rng(0).normal(size=(6, 960, 64, 2)).astype(np.float32)
    x[..., 5, 1] = -3.0  # channel 1, bin 5 is constant
    with caplog.at_level(logging.WARNING):
        scaler = pipeline.compute_scaler(_ConstantBinSource(x), batch_size=4, progress=False)
    assert "(channel 1, bin 5)" in caplog.text
    expected_std = x.astype(np.float64).std(axis=(0, 1))
    assert expected_std[5, 1] == 0.0 and scaler.std[5, 1] == 1.0
    expected_std[5, 1] = 1.0
    np.testing.assert_allclose(scaler.std, expected_std, rtol=1e-5)
    np.testing.assert_allclose(scaler.mean, x.astype(np.float64).mean(axis=(0, 1)), rtol=1e-5, atol=1e-7)


def test_reads_a_float64_store_made_by_the_reference(tmp_path):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(5, 16, 960, 64))  # float64, channels-first
    cams = np.eye(11)[[0, 3, 10, 0, 3]][:, None, :]
    with h5py.File(tmp_path / "development_dataset.h5", "w") as f:
        f["features"], f["cams"] = features, cams
        for key in ("target_coords", "pseudo_labels", "speech_activity"):
            f[key] = rng.uniform(size=(5, 60))
        f["sequence"] = np.array([b"a", b"a", b"b", b"b", b"b"])
    source = pipeline.open_source(hdf5_dir=tmp_path, features="gcc_phat")  # no attributes: channels only
    batch = source.load(np.array([4, 1, 1]))
    assert batch["features"].dtype == np.float32 and batch["features"].shape == (3, 960, 64, 16)
    expected = features[[4, 1, 1]].transpose(0, 2, 3, 1).astype(np.float32)
    np.testing.assert_array_equal(batch["features"], expected)
    np.testing.assert_array_equal(batch["cams"], cams[[4, 1, 1], 0])
    for indices in ([3, 0, 1, 4], [2, 0, 4], list(range(5))):  # rows read in runs: 0-1 and 3-4, ...
        np.testing.assert_array_equal(source.load(np.array(indices))["features"],
                                      features[indices].transpose(0, 2, 3, 1).astype(np.float32))
    assert list(source.sequences) == ["a", "a", "b", "b", "b"]
    with pytest.raises(ValueError, match="has 16 feature channels; 'gcc_phat_all' has 121"):
        pipeline.open_source(hdf5_dir=tmp_path, features="gcc_phat_all")


def test_open_source_arguments(tree, store_dir):
    assert isinstance(pipeline.open_source(data_root=tree.root, features=FEATURES), pipeline.OnTheFlySource)
    with pytest.raises(ValueError, match="exactly one of data_root"):
        pipeline.open_source(data_root=tree.root, hdf5_dir=store_dir)
    with pytest.raises(ValueError, match="built with features='logmel', but features='salsa_lite'"):
        pipeline.open_source(hdf5_dir=store_dir, features="salsa_lite")
    device = jax.local_devices()[0]
    for where in (dict(data_root=tree.root), dict(hdf5_dir=store_dir)):
        source = pipeline.open_source(**where, features=FEATURES, keep_on_device=True)
        assert source.devices == (device,)  # default: the first local device
        with pytest.raises(ValueError, match=r"devices are only used with keep_on_device=True"):
            pipeline.open_source(**where, features=FEATURES, devices=[device])
        for devices in ([], [device, device]):
            with pytest.raises(ValueError, match=r"devices must be distinct local devices of this "
                                                 r"process, got \["):
                pipeline.open_source(**where, features=FEATURES, keep_on_device=True, devices=devices)


def test_on_the_fly_refuses_an_unknown_split_and_an_empty_load(tree, on_the_fly):
    with pytest.raises(ValueError, match=r"unknown split 'train': expected 'development' or 'test'"):
        pipeline.OnTheFlySource(tree.root, features=FEATURES, split="train")
    with pytest.raises(ValueError, match=r"OnTheFlySource.load: no example indices given"):
        on_the_fly.load(np.array([], np.int64))
    with pytest.raises(IndexError, match=r"OnTheFlySource.load: example indices must lie in \[0, 24\), "
                                         r"got \[-1, 0\]"):
        on_the_fly.load(np.array([0, -1]))


def test_sequence_filter_of_either_split_refuses_unknown_names(tree):
    test = pipeline.OnTheFlySource(tree.root, features=FEATURES, split="test", sequences=["interactive1_t2"])
    assert len(test) == 8 and set(test.sequences) == {"interactive1_t2"}
    for split in ("development", "test"):
        with pytest.raises(ValueError, match=r"sequence\(s\) \['nope'\] do not occur in .*\.csv"):
            pipeline.OnTheFlySource(tree.root, features=FEATURES, split=split,
                                    sequences=["interactive1_t2", "nope"] if split == "test" else ["nope"])


def _write_examples(f, cameras, sequences):
    """The per-example datasets of a store of len(cameras) examples: one-hot cams, all-zero
    labels, sequence names (the features are the caller's)."""
    f["cams"] = np.eye(11, dtype=np.float32)[cameras][:, None, :]
    for key in pipeline.LABEL_KEYS:
        f[key] = np.zeros((len(cameras), 60), np.float32)
    f["sequence"] = np.array(sequences)


@pytest.mark.parametrize("feature_index, message", [
    ([0, 1, 2], r"'feature_index' holds rows \[0, 2\], but 'rig_features' has 2 rows"),
    ([0, -1, 1], r"'feature_index' holds rows \[-1, 1\], but 'rig_features' has 2 rows"),
    ([0, 1], r"'feature_index' is int64 of shape \(2,\), expected integers of shape \(3,\)"),
    ([0.0, 1.0, 1.0], r"'feature_index' is float64 of shape \(3,\), expected integers"),
])
def test_compact_store_with_a_bad_feature_index_is_refused(tmp_path, feature_index, message):
    path = tmp_path / "development_dataset.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("rig_features", shape=(2, 16, 960, 64), dtype=np.float32)  # 2 audio chunks
        _write_examples(f, cameras=[0, 0, 1], sequences=[b"a", b"a", b"a"])
        f["feature_index"] = np.array(feature_index)
    with pytest.raises(ValueError, match=rf"{path}: " + message):
        pipeline.HDF5Source(path)
    with h5py.File(path, "r+") as f:
        _replace("feature_index", np.array([0, 1, 1]))(f)
    source = pipeline.HDF5Source(path)
    assert source.compact and list(source.feature_groups) == [0, 1, 1]
    assert source.load(np.array([2, 0]))["features"].shape == (2, 960, 64, 16)


def _drop(key):
    def edit(f):
        del f[key]
    return edit


def _replace(key, value):
    def edit(f):
        del f[key]
        f[key] = value
    return edit


def _incomplete(f):
    f.attrs["asd_jax_complete"] = False


@pytest.mark.parametrize("edit, message", [
    (_incomplete, r" is marked incomplete"),
    (_drop("speech_activity"), r" is not a development store: missing dataset\(s\) \['speech_activity'\]"),
    (_replace("features", np.zeros((3, 1, 960, 32), np.float32)),
     r": 'features' has shape \(3, 1, 960, 32\), expected \(N, C, 960, 64\)"),
    (_replace("features", np.zeros((2, 1, 960, 64), np.float32)), r": 'features' has 2 rows, 'sequence' 3"),
    (_replace("cams", np.zeros((3, 1, 10), np.float32)), r": 'cams' has shape \(3, 10\), expected \(3, 11\)"),
    (_replace("target_coords", np.zeros((3, 59), np.float32)),
     r": 'target_coords' has shape \(3, 59\), expected \(3, 60\)"),
], ids=["incomplete", "missing-labels", "feature-bins", "feature-rows", "cams", "labels"])
def test_a_malformed_store_is_refused_by_name(tmp_path, edit, message):
    """A reference-layout store of 3 examples (1 channel), then one defect."""
    path = tmp_path / "development_dataset.h5"
    with h5py.File(path, "w") as f:
        f["features"] = np.zeros((3, 1, 960, 64), np.float32)
        _write_examples(f, cameras=[0, 1, 2], sequences=[b"a", b"a", b"b"])
    assert len(pipeline.HDF5Source(path)) == 3  # valid before the edit
    with h5py.File(path, "r+") as f:
        edit(f)
    with pytest.raises(ValueError, match=rf"{path}" + message):
        pipeline.HDF5Source(path)


def test_a_store_that_is_not_hdf5_is_refused_by_name(tmp_path):
    """h5py's own error ("truncated file: eof = ...", "file signature not found") names no file."""
    path = tmp_path / "development_dataset.h5"
    with h5py.File(path, "w") as f:
        f["features"] = np.zeros((3, 1, 960, 64), np.float32)
        _write_examples(f, cameras=[0, 1, 2], sequences=[b"a", b"a", b"b"])
    path.write_bytes(path.read_bytes()[:2000])  # a partly copied store
    with pytest.raises(ValueError, match=rf"HDF5 store {path} cannot be read \(.*truncated file.*\); "
                                         r"expected the development_dataset.h5 of experiments.make_hdf5"):
        pipeline.HDF5Source(path)
    path.write_text("name,time\n")
    with pytest.raises(ValueError, match=rf"HDF5 store {path} cannot be read \(.*signature"):
        pipeline.HDF5Source(path)
