"""Data-parallel training over 8 (forced host) devices equals one device; `asd_jax.distributed`.

The device count must be fixed before JAX initialises, and this pytest process has already
initialised it with one CPU device, so the multi-device runs happen in a subprocess started
with XLA_FLAGS=--xla_force_host_platform_device_count=8. (One train step on 8 devices against
one device is `tests/test_training.py::test_data_parallel_steps_equal_single_device`.)
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from asd_jax import distributed

ROOT = pathlib.Path(__file__).resolve().parents[1]

# An in-memory ChunkSource with small features (160 frames x 64 bins x 16 channels -> 10 output
# frames) and the tiny config; `run(workdir, devices)` trains 3 epochs on the first `devices`
# devices and returns the per-epoch losses. 32 examples, batch 8: 4 batches an epoch, each sharded
# over the 8 devices (one example per device).
WORKER_PRELUDE = r"""
import json, pathlib, sys
import jax, numpy as np
from asd_jax import scaler as scaler_lib
from asd_jax.training import configs, loop

def _gather(rows, example_row):
    return rows[example_row]

class MemorySource:
    # on_device: features as jax.Arrays made on this process's devices of the training mesh as
    # the sources make them with keep_on_device (device d: its slice of the batch when the
    # devices split it, else all on the first device); labels stay on the host.
    def __init__(self, n=32, seed=0, num_sequences=3, on_device=False):
        self.on_device = on_device
        rng = np.random.default_rng(seed)
        self.sequences = np.array([f"seq{i % num_sequences}" for i in range(n)])
        self.feature_groups = np.arange(n)
        self.num_channels = 16
        self._data = {
            "features": (rng.normal(size=(n, 160, 64, 16)) * 2 + 0.5).astype(np.float32),
            "cams": np.eye(11, dtype=np.float32)[rng.integers(0, 11, n)],
            "target_coords": rng.uniform(size=(n, 10)).astype(np.float32),
            "pseudo_labels": rng.integers(0, 2, (n, 10)).astype(np.float32),
            "speech_activity": rng.integers(0, 2, (n, 10)).astype(np.float32)}
    def __len__(self):
        return len(self.sequences)
    def load(self, indices):
        batch = {k: v[np.asarray(indices)] for k, v in self._data.items()}
        if self.on_device:
            from asd_jax.data import pipeline
            b = len(batch["features"])
            mesh = pipeline._source_mesh(loop._local_devices(loop.make_mesh()), b)
            rows = np.tile(np.arange(b // mesh.size, dtype=np.int32), mesh.size)
            batch["features"] = pipeline._on_each_device(_gather, mesh, batch["features"], rows)
        return batch

CONFIG = configs.tiny().replace(data_root="unused", num_epochs=3, cache_features=False,
                                learning_rate=1e-3)

def prepare(workdir):
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    scaler_lib.save_scaler(workdir / "feature_scaler.h5", scaler_lib.Scaler(
        np.full((64, 16), 0.5, np.float32), np.full((64, 16), 2.0, np.float32)))
    return workdir
"""

_LOSS_CURVE_SCRIPT = WORKER_PRELUDE + r"""
from jax.sharding import Mesh
assert jax.device_count() == 8, jax.devices()
# Device features reach both kinds of training batch without an upload: sharded (8 examples)
# and replicated (5, which does not split over 8 devices); host features are uploaded.
mesh = loop.make_mesh()
for n in (8, 5):
    host = MemorySource(n=n).load(np.arange(n))["features"]
    on_device = jax.numpy.asarray(host)
    with jax.transfer_guard_host_to_device("disallow_explicit"):
        sharded = loop._shard_batch({"features": on_device}, mesh, n)["features"]
        try:
            loop._shard_batch({"features": host}, mesh, n)
            raise AssertionError("the guard let a host batch through")
        except jax.errors.JaxRuntimeError as e:
            assert "host-to-device" in str(e), e
    assert len(sharded.sharding.device_set) == 8 and sharded.sharding.is_fully_replicated == (n == 5)
    np.testing.assert_array_equal(np.asarray(sharded), host)
curves = {}
make_mesh = loop.make_mesh
for n_devices in (1, 8):
    workdir = prepare(pathlib.Path(sys.argv[1]) / f"devices{n_devices}")
    loop.make_mesh = lambda devices=None, n=n_devices: make_mesh(jax.devices()[:n])
    # the 8-device run takes its features from the devices (made where they are trained on)
    state = loop.train_and_evaluate(CONFIG, workdir, source=MemorySource(on_device=n_devices == 8))
    rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    curves[n_devices] = {"loss": [r["train_loss"] for r in rows],
                         "keys": sorted(rows[0])}
print("CURVES " + json.dumps(curves))
"""


def _run(script, *args, devices=8, timeout=300):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


@pytest.mark.slow  # two 3-epoch runs in a fresh JAX process, ~30 s on 2 cores
def test_three_epochs_on_8_devices_give_the_single_device_loss_curve(tmp_path):
    out = _run(_LOSS_CURVE_SCRIPT, tmp_path)
    curves = json.loads(out.split("CURVES ", 1)[1])
    one, eight = curves["1"], curves["8"]
    assert len(one["loss"]) == 3 and all(np.isfinite(one["loss"]))
    assert one["loss"][2] < one["loss"][0]  # it trains: the curve is not flat
    # One step agrees to ~1e-6 (float32 sums in another order: per-device partial sums for the
    # batch-norm statistics and the gradient all-reduce). Adam amplifies such differences in
    # near-zero gradients: at the tiny config's own learning rate (3e-3) to ~1e-3 by epoch 3; at
    # 1e-3 (CONFIG above) to between 1e-7 and 1e-5, depending on how XLA happens to order the
    # sums (its CPU fusion options and the batch-norm formula have each moved it within that
    # range). A real difference (statistics of the local instead of the global batch, a missing
    # example) changes epoch 1 by > 1e-2, 100x this tolerance.
    np.testing.assert_allclose(eight["loss"], one["loss"], rtol=1e-4)
    # The per-epoch log shows step time and time waiting for data.
    assert {"step_time_s", "data_wait_s", "epoch_time_s"} <= set(one["keys"])


_SOURCE_SCRIPT = r"""
import sys
import jax, numpy as np
from asd_jax.data import pipeline
from asd_jax.training import configs, loop
root, store_dir = sys.argv[1:3]
devices = jax.devices()
assert len(devices) == 8, devices
host = pipeline.OnTheFlySource(root, "GT_GT", "logmel")  # host features, made on one device
groups = host.feature_groups
pairs = [np.flatnonzero(groups == g) for g in np.unique(groups)]
assert all(len(p) == 2 for p in pairs)  # the tiny tree: two cameras per rig
# 16 examples, 2 per device: device 0 gets one rig's two cameras (one chunk to compute),
# devices 1 and 2 one camera each of another rig (each computes that chunk).
rest = np.concatenate(pairs[2:])
take16 = np.concatenate([pairs[0], pairs[1][:1], rest[:1], pairs[1][1:], rest[1:12]])
assert len(take16) == 16 and len(set(take16.tolist())) == 16
mesh = loop.make_mesh()
pointers = lambda a: {s.device: s.data.unsafe_buffer_pointer() for s in a.addressable_shards}
on_device = [pipeline.OnTheFlySource(root, "GT_GT", "logmel", keep_on_device=True, devices=devices),
             pipeline.HDF5Source(f"{store_dir}/development_dataset.h5", keep_on_device=True,
                                 devices=devices)]
for source in on_device:
    for take in (take16, take16[:5]):  # 5 do not split over 8 devices: made on the first
        features = source.load(take)["features"]
        np.testing.assert_array_equal(np.asarray(features), host.load(take)["features"])
        if len(take) == 5:
            assert features.sharding.device_set == {devices[0]}
            continue
        # device d holds (and made) examples 2d and 2d + 1, the block it trains on
        assert {s.device: s.index[0] for s in features.addressable_shards} == {
            d: slice(2 * i, 2 * i + 2) for i, d in enumerate(devices)}
        batch = loop._shard_batch({"features": features}, mesh, 16)["features"]
        assert batch.sharding.spec == jax.sharding.PartitionSpec("data")
        assert pointers(batch) == pointers(features)  # not copied
# A source whose devices are in another order: copied device to device into the mesh's order.
reverse = pipeline.OnTheFlySource(root, "GT_GT", "logmel", keep_on_device=True, devices=devices[::-1])
features = reverse.load(take16)["features"]
batch = loop._shard_batch({"features": features}, mesh, 16)["features"]
assert {s.device: s.index[0] for s in batch.addressable_shards} == {
    d: slice(2 * i, 2 * i + 2) for i, d in enumerate(devices)}
np.testing.assert_array_equal(np.asarray(batch), host.load(take16)["features"])
# The training loop's sources are made on the mesh's devices, in its order.
config = configs.tiny().replace(data_root=root, features="logmel", cache_features=False)
assert loop.open_data(config).devices == tuple(devices)
assert loop.open_data(config.replace(hdf5_dir=store_dir)).devices == tuple(devices)
print("SOURCES OK")
"""


def test_sources_make_each_devices_features_on_that_device(tmp_path):
    """With 8 devices, either source (on the fly or a store) makes the features of device d's
    slice of a batch on device d, and the training batch is assembled from them without a copy."""
    import tiny_tree  # pylint: disable=import-outside-toplevel
    from asd_jax.data import store  # pylint: disable=import-outside-toplevel

    tree = tiny_tree.write(tmp_path / "data")
    store.build_store(tree.root, "GT_GT", "logmel", tmp_path / "store", layout="compact",
                      batch_size=4, progress=False)
    assert "SOURCES OK" in _run(_SOURCE_SCRIPT, tree.root, tmp_path / "store")


def test_initialize_single_process_and_argument_checks():
    info = distributed.initialize("off")
    assert (info.process_index, info.process_count) == (0, 1)
    assert info.global_device_count == info.local_device_count >= 1
    with pytest.raises(ValueError, match="distributed mode"):
        distributed.initialize("sometimes")
    with pytest.raises(ValueError, match="must be given together"):
        distributed.initialize("off", coordinator_address="localhost:1234")
    with pytest.raises(ValueError, match=r"process_id 2 must be in \[0, num_processes=2\)"):
        distributed.initialize("off", coordinator_address="localhost:1234", num_processes=2,
                               process_id=2)


def test_allgather_of_one_process_is_its_own_values_bit_for_bit():
    """(P, *shape) float64 with P = 1: the values themselves, bits included (no float32 trip)."""
    x = np.array([[1.0 + 2.0 ** -40, -0.0], [np.pi, 1e300]])
    gathered = distributed.allgather_float64(x)
    assert gathered.shape == (1, 2, 2) and gathered.dtype == np.float64
    np.testing.assert_array_equal(gathered.view(np.uint64), x[None].view(np.uint64))
    scalar = distributed.allgather_float64(np.float64(0.1))  # 0-d: (P,)
    assert scalar.shape == (1,) and scalar[0] == 0.1


_AUTO_SCRIPT = r"""
import os
import jax
from asd_jax import distributed

def refused():
    try:
        distributed.initialize("auto")
    except distributed.JoinError as e:  # an OSError: the binaries' one-line user error
        return str(e)
    raise AssertionError("initialize('auto') went on as a single process")

# A cluster that is found but cannot be joined (coordinator unreachable): an error, not one
# process training alone in the shared workdir.
real = jax.distributed.initialize
def unreachable(*args, **kwargs):
    raise RuntimeError("DEADLINE_EXCEEDED: Barrier timed out. Id: PjRT_Client_Connect")
jax.distributed.initialize = unreachable
message = refused()
assert "DEADLINE_EXCEEDED" in message and "not going on as a single process" in message, message
jax.distributed.initialize = real
# A half-described cluster (an address, no process count) likewise, with JAX's own check.
os.environ["JAX_COORDINATOR_ADDRESS"] = "localhost:1"
message = refused()
assert "Number of processes must be defined" in message, message
# Nothing describes a cluster: one process.
del os.environ["JAX_COORDINATOR_ADDRESS"]
info = distributed.initialize("auto")
assert (info.process_index, info.process_count) == (0, 1), info
print("OK")
"""


def test_auto_mode_falls_back_to_one_process_only_without_a_cluster():
    cluster_vars = ("SLURM_", "OMPI_", "PMI_", "TPU_", "MEGASCALE_", "JAX_COORDINATOR", "JOBSET_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(cluster_vars)}
    result = subprocess.run([sys.executable, "-c", _AUTO_SCRIPT], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, env={**env, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def test_train_binary_names_a_coordinator_it_cannot_start_in_one_error_line(tmp_path):
    """Process 0 runs the coordinator at --coordinator_address; with that port taken, JAX
    crashed (a segmentation fault, or a traceback of "Failed to start RPC server" naming
    neither address nor process). Now: one `error:` line naming both, and nothing written."""
    import socket

    with socket.socket() as taken:
        taken.bind(("localhost", 0))
        taken.listen()
        address = f"localhost:{taken.getsockname()[1]}"
        result = subprocess.run(
            [sys.executable, "-m", "experiments.train", f"--workdir={tmp_path / 'run'}",
             "--data_root=unused", f"--coordinator_address={address}", "--num_processes=2",
             "--process_id=0"],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    port = address.rsplit(":", 1)[1]
    assert (f"error: distributed: process 0 runs the coordinator at coordinator_address={address}, "
            f"but this host cannot listen on port {port} (Address already in use)"
            ) in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "run").exists()


def test_the_port_probe_leaves_a_jax_bind_address_to_jax(monkeypatch):
    """With JAX_COORDINATOR_BIND_ADDRESS JAX binds its coordinator there, not on every interface
    at coordinator_address's port: the probe of that port stays out (JAX's own error is
    wrapped); without it a taken port is refused."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(distributed.JoinError, match=rf"cannot listen on port {port} \(Address "
                                                        r"already in use\): another program"):
            distributed._check_port_free(port, f"host0:{port}")
        monkeypatch.setenv("JAX_COORDINATOR_BIND_ADDRESS", f"127.0.0.2:{port}")
        distributed._check_port_free(port, f"host0:{port}")


@pytest.mark.parametrize("address", ["host0", "host0:", "host0:http", ":1234", "host0:0",
                                     "host0:65536"])
def test_a_coordinator_address_without_a_port_is_refused_naming_it(address):
    with pytest.raises(ValueError, match=rf"coordinator_address '{address}' is not host:port"):
        distributed.initialize(coordinator_address=address, num_processes=2, process_id=1)


def test_coordinator_ports_are_read_from_host_and_v6_addresses():
    assert distributed._coordinator_port("host0:1234") == 1234
    assert distributed._coordinator_port("[fe80::1]:8476") == 8476


def test_train_binary_refuses_an_incomplete_process_description(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "experiments.train", f"--workdir={tmp_path / 'run'}",
         "--data_root=unused", "--coordinator_address=localhost:1234", "--num_processes=2"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode != 0
    assert "must be given together" in result.stderr and "process_id=None" in result.stderr
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_train_binary_refuses_a_wrong_flag_before_joining_the_cluster(tmp_path):
    """Process 1 with --epochs 0 used to connect to a coordinator that never comes and wait there
    (JAX's join has a long timeout) before its config was checked; now the config's error comes
    at once, as one line, and the join log line never appears."""
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    result = subprocess.run(
        [sys.executable, "-m", "experiments.train", f"--workdir={tmp_path / 'run'}", "--config=tiny",
         "--data_root=unused", "--epochs=0", f"--coordinator_address=localhost:{port}",
         "--num_processes=2", "--process_id=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == "error: num_epochs must be an integer >= 1, got 0"
    assert "process 1 of 2" not in result.stderr and "Connecting" not in result.stderr
    assert not (tmp_path / "run").exists()
