"""converters/: the safe torch.save reader, torch -> Flax -> torch, and the CLI."""

import collections
import io
import os
import pathlib
import pickle
import re
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest
import torch

import torch_reference as tr
from asd_jax import checkpointing
from asd_jax import model as model_lib
from asd_jax import predict
from asd_jax import scaler as scaler_lib
from converters import flax_to_torch, torch_checkpoint, torch_to_flax

SMALL = dict(conv_features=(8, 16), gru_hidden=8, gru_layers=2, fc1_features=4)


def _inputs(seed, batch, in_channels, frames=64, bins=16):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, frames, bins, in_channels)).astype(np.float32)
    cams = np.eye(11, dtype=np.float32)[rng.integers(0, 11, batch)]
    return x, cams


def _torch_forward(net, x, cams):
    net.eval()
    with torch.no_grad():
        return net(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))),
                   torch.from_numpy(cams[:, None])).numpy()


def _rewrite_zip(src, dst, transform):
    """Copies a torch zip, replacing records: transform(name, bytes) -> bytes."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, transform(info.filename, zin.read(info.filename)))


# ----------------------------------------------------------------------------- forward parity


@pytest.mark.parametrize("pooling,in_channels", [("avg", 16), ("max", 16), ("avg", 121)])
def test_small_config_parity(tmp_path, pooling, in_channels):
    cfg = dict(SMALL, pooling=pooling)
    net = tr.randomize_(tr.TorchCRNN(in_channels, **cfg), seed=in_channels)
    torch.save(net.state_dict(), tmp_path / "small.ckpt")
    variables = torch_to_flax.convert(torch_checkpoint.load_state_dict(tmp_path / "small.ckpt"), **cfg)
    x, cams = _inputs(0, 3, in_channels)
    expected = _torch_forward(net, x, cams)
    assert expected[..., 1].std() > 0.05  # outputs spread out: a wrong mapping cannot hide
    got = model_lib.CRNN(**cfg).apply(variables, x, cams, train=False)
    np.testing.assert_allclose(got, expected, atol=1e-4)


@pytest.fixture(scope="module")
def paper_checkpoint(tmp_path_factory):
    """A paper-size PyTorch model with random weights, saved with torch.save."""
    net = tr.randomize_(tr.TorchCRNN(16), seed=1)
    path = tmp_path_factory.mktemp("paper") / "model_050.ckpt"
    torch.save(net.state_dict(), path)
    return net, path


def _unit_scaler(path, channels):
    """Writes a scaler of mean 0 and std 1 for `channels` channels; returns its path."""
    scaler_lib.save_scaler(path, scaler_lib.Scaler(np.zeros((64, channels), np.float32),
                                                   np.ones((64, channels), np.float32)))
    return path


@pytest.mark.slow
def test_paper_size_cli_parity(paper_checkpoint, tmp_path, capsys):
    """CLI -> model directory -> load_model: same outputs as PyTorch; prints the git blob id."""
    net, path = paper_checkpoint
    scaler = scaler_lib.Scaler(np.full((64, 16), 0.5, np.float32), np.full((64, 16), 2.0, np.float32))
    scaler_lib.save_scaler(tmp_path / "feature_scaler.h5", scaler)
    out_dir = tmp_path / "converted"
    assert torch_to_flax.main(["--torch_ckpt", str(path), "--out_dir", str(out_dir),
                               "--features", "salsa_lite",
                               "--scaler", str(tmp_path / "feature_scaler.h5")]) == 0
    blob = subprocess.run(["git", "hash-object", str(path)], capture_output=True, text=True,
                          check=True).stdout.strip()
    printed = capsys.readouterr()
    assert f"git blob id {blob}" in printed.out and "not one of the released" in printed.out
    assert "holds no feature scaler" not in printed.err

    variables, config, loaded_scaler = checkpointing.load_model(out_dir)
    assert config["features"] == "salsa_lite" and config["in_channels"] == 16
    assert config["source"]["git_blob_id"] == blob
    np.testing.assert_array_equal(loaded_scaler.std, scaler.std)
    x, cams = _inputs(1, 2, 16, frames=960, bins=64)
    expected = _torch_forward(net, x, cams)
    assert expected[..., 1].std() > 0.05
    got = model_lib.CRNN.from_config(config["model"]).apply(variables, x, cams, train=False)
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_cli_names_released_checkpoint(paper_checkpoint, tmp_path, monkeypatch, capsys):
    _, path = paper_checkpoint
    blob = torch_checkpoint.git_blob_id(path)
    monkeypatch.setitem(torch_to_flax.RELEASED_CHECKPOINTS, blob,
                        ("ckpt/salsa-lite_GT_GT/0.000070/model_050.ckpt", "salsa_lite"))
    assert torch_to_flax.main(["--torch_ckpt", str(path), "--out_dir", str(tmp_path / "m")]) == 0
    assert "released checkpoint: ckpt/salsa-lite_GT_GT/0.000070/model_050.ckpt" in capsys.readouterr().out
    _, config, scaler = checkpointing.load_model(tmp_path / "m")
    assert config["features"] == "salsa_lite" and scaler is None
    # A contradicting --features is refused, in one line, before anything is written.
    assert torch_to_flax.main(["--torch_ckpt", str(path), "--out_dir", str(tmp_path / "n"),
                               "--features", "gcc_phat"]) == 1
    assert capsys.readouterr().err == ("error: --features gcc_phat contradicts the released checkpoint "
                                       "ckpt/salsa-lite_GT_GT/0.000070/model_050.ckpt (salsa_lite)\n")
    assert not (tmp_path / "n").exists()
    # the released checkpoints average-pool
    assert torch_to_flax.main(["--torch_ckpt", str(path), "--out_dir", str(tmp_path / "n"),
                               "--pooling", "max"]) == 1
    assert capsys.readouterr().err.startswith("error: --pooling max contradicts")
    assert not (tmp_path / "n").exists()


def test_cli_names_an_input_width_that_no_feature_type_gives(tmp_path, capsys):
    """17 input channels fit no feature type: no --features can help, and the error says so
    (it asked for --features, which then failed on the channel count)."""
    path = tmp_path / "c17.ckpt"
    torch.save(tr.randomize_(tr.TorchCRNN(17, **SMALL), seed=3).state_dict(), path)
    assert torch_to_flax.main(["--torch_ckpt", str(path), "--out_dir", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path} (git blob id ") and (
        "takes 17 input channels, which no feature type gives (gcc_phat: 16, gcc_phat_all: 121, "
        "salsa_lite: 16, logmel: 16): asd-jax cannot compute its input") in err, err
    assert not (tmp_path / "m").exists()


def test_cli_needs_features_and_takes_pooling_for_other_checkpoints(paper_checkpoint, tmp_path, capsys):
    """GCC-PHAT and SALSA-Lite both have 16 input channels: a checkpoint that is not a released
    one needs --features; --pooling max converts a max-pool variant."""
    net, path = paper_checkpoint
    assert torch_to_flax.main(["--torch_ckpt", str(path), "--out_dir", str(tmp_path / "m")]) == 1
    assert capsys.readouterr().err.startswith(
        f"error: --features is required: {path} (git blob id ")
    assert not (tmp_path / "m").exists()

    assert torch_to_flax.main(["--torch_ckpt", str(path), "--out_dir", str(tmp_path / "m"),
                               "--features", "gcc_phat", "--pooling", "max"]) == 0
    printed = capsys.readouterr()
    assert "features gcc_phat, max pooling" in printed.out
    assert printed.err == (f"note: {tmp_path / 'm'} holds no feature scaler, so forward and predict "
                           "will need --scaler; or convert again with --scaler feature_scaler.h5 "
                           "--overwrite\n")
    variables, config, _ = checkpointing.load_model(tmp_path / "m")
    assert config["model"]["pooling"] == "max"
    max_net = tr.TorchCRNN(16, pooling="max")
    max_net.load_state_dict(net.state_dict())
    x, cams = _inputs(2, 2, 16, frames=64, bins=64)  # 4 bins left to pool after the convs
    expected = _torch_forward(max_net, x, cams)
    assert np.abs(expected - _torch_forward(net, x, cams)).max() > 1e-3  # the pooling matters here
    got = model_lib.CRNN.from_config(config["model"]).apply(variables, x, cams, train=False)
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_cli_reads_features_from_a_channel_count_only_one_feature_has(tmp_path, capsys):
    """121 input channels can only be gcc_phat_all (16 fit gcc_phat, salsa_lite and logmel)."""
    net = tr.randomize_(tr.TorchCRNN(121, **SMALL), seed=4)
    torch.save(net.state_dict(), tmp_path / "all.ckpt")
    assert torch_to_flax.main(["--torch_ckpt", str(tmp_path / "all.ckpt"), "--out_dir",
                               str(tmp_path / "m")]) == 0
    assert "features gcc_phat_all" in capsys.readouterr().out
    assert checkpointing.load_model(tmp_path / "m")[1]["features"] == "gcc_phat_all"


def test_cli_errors_name_the_file_they_are_about(tmp_path, capsys):
    net = tr.randomize_(tr.TorchCRNN(16, **SMALL), seed=5)
    state = net.state_dict()
    torch.save({k: v for k, v in state.items() if k != "fc1.bias"}, tmp_path / "gap.ckpt")
    assert torch_to_flax.main(["--torch_ckpt", str(tmp_path / "gap.ckpt"), "--out_dir",
                               str(tmp_path / "m"), "--features", "gcc_phat"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'gap.ckpt'}: state_dict does not match the CRNN")
    assert "fc1.bias" in err and len(err.splitlines()) == 1
    torch.save(state, tmp_path / "ok.ckpt")
    scaler = _unit_scaler(tmp_path / "s121.h5", 121)
    assert torch_to_flax.main(["--torch_ckpt", str(tmp_path / "ok.ckpt"), "--out_dir",
                               str(tmp_path / "m"), "--features", "gcc_phat", "--scaler", str(scaler)]) == 1
    assert capsys.readouterr().err == (f"error: --scaler {scaler} has 121 channels, but "
                                       f"{tmp_path / 'ok.ckpt'} takes 16 (gcc_phat)\n")
    scaler_lib.save_scaler(tmp_path / "salsa.h5", scaler_lib.Scaler(
        np.zeros((64, 16), np.float32), np.ones((64, 16), np.float32)), "salsa_lite")
    assert torch_to_flax.main(["--torch_ckpt", str(tmp_path / "ok.ckpt"), "--out_dir", str(tmp_path / "m"),
                               "--features", "gcc_phat", "--scaler", str(tmp_path / "salsa.h5")]) == 1
    assert capsys.readouterr().err == (f"error: feature scaler {tmp_path / 'salsa.h5'} was computed from "
                                       "'salsa_lite' features, but 'gcc_phat' features are used here; use "
                                       "the scaler of a 'gcc_phat' store or training run\n")
    assert not (tmp_path / "m").exists()


def test_overwrite_without_a_scaler_keeps_the_old_one_only_for_the_same_features(tmp_path, capsys):
    """Converting a SALSA-Lite model over a GCC-PHAT one kept the GCC-PHAT feature scaler."""
    torch.save(tr.randomize_(tr.TorchCRNN(16, **SMALL), seed=5).state_dict(), tmp_path / "a.ckpt")
    out = tmp_path / "m"
    base = ["--torch_ckpt", str(tmp_path / "a.ckpt"), "--out_dir", str(out)]
    assert torch_to_flax.main(base + ["--features", "gcc_phat",
                                      "--scaler", str(_unit_scaler(tmp_path / "s.h5", 16))]) == 0
    assert torch_to_flax.main(base + ["--features", "gcc_phat", "--overwrite"]) == 0  # same features
    assert checkpointing.load_model(out)[2] is not None
    capsys.readouterr()
    config_before = (out / "config.json").read_text()
    assert torch_to_flax.main(base + ["--features", "salsa_lite", "--overwrite"]) == 1
    assert capsys.readouterr().err == (
        f"error: {out / 'feature_scaler.h5'} was stored for a model of gcc_phat features (16 channels) "
        "and would be kept for this one of salsa_lite (16): give this model's scaler (--scaler), or "
        "remove the old file\n")
    assert (out / "config.json").read_text() == config_before
    assert torch_to_flax.main(base + ["--features", "salsa_lite", "--overwrite",
                                      "--scaler", str(tmp_path / "s.h5")]) == 0
    assert checkpointing.load_model(out)[1]["features"] == "salsa_lite"


def test_released_blob_ids_are_the_spec_ones():
    assert {name: feats for name, feats in torch_to_flax.RELEASED_CHECKPOINTS.values()} == {
        "ckpt/gcc_GT_GT/0.000500/model_050.ckpt": "gcc_phat",
        "ckpt/salsa-lite_GT_GT/0.000070/model_050.ckpt": "salsa_lite"}
    assert set(torch_to_flax.RELEASED_CHECKPOINTS) == {
        "58cbadf46cff1b64cfb54e9cddd8fbcd80126dcf", "a2a640a569b09ff4704e6a199c89684837a5e4b7"}


def test_git_blob_id_matches_git(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"\x00\x01 some bytes\n" * 100)
    blob = subprocess.run(["git", "hash-object", str(path)], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert torch_checkpoint.git_blob_id(path) == blob


# ----------------------------------------------------------------------------- round trip


def test_round_trip_flax_torch_flax_is_exact(tmp_path):
    model = model_lib.CRNN(**SMALL)
    variables = jax.tree.map(np.asarray, torch_to_flax.convert(
        {k: v.numpy() for k, v in tr.randomize_(tr.TorchCRNN(5, **SMALL), seed=3).state_dict().items()},
        **SMALL))
    path = tmp_path / "exported.ckpt"
    flax_to_torch.save_torch_checkpoint(path, variables, num_batches_tracked=12)

    net = tr.TorchCRNN(5, **SMALL)
    result = net.load_state_dict(torch.load(path, weights_only=True), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert int(net.conv_block1.bn1.num_batches_tracked) == 12
    x, cams = _inputs(4, 2, 5)
    np.testing.assert_allclose(model.apply(variables, x, cams, train=False),
                               _torch_forward(net, x, cams), atol=1e-4)

    back = torch_to_flax.convert(torch_checkpoint.load_state_dict(path), **SMALL)
    assert jax.tree.structure(back) == jax.tree.structure(variables)
    jax.tree.map(np.testing.assert_array_equal, back, variables)


def test_to_state_dict_key_order_matches_torch():
    net = tr.TorchCRNN(16)
    variables = model_lib.abstract_variables(model_lib.CRNN(), 16)
    variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), variables)
    state = flax_to_torch.to_state_dict(variables)
    assert list(state) == list(net.state_dict())
    assert len(state) == 68
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        k: tuple(v.shape) for k, v in net.state_dict().items()}


# ----------------------------------------------------------------------------- the reader


def test_reader_dtypes_views_and_wrappers(tmp_path):
    base = torch.arange(30, dtype=torch.float32)
    tensors = collections.OrderedDict(
        f32=torch.randn(3, 4), f64=torch.randn(5, dtype=torch.float64),
        f16=torch.randn(2, 3).half(), i64=torch.arange(7), bf16=torch.randn(4).bfloat16(),
        flag=torch.tensor([True, False]), scalar=torch.tensor(3.5),
        offset=base[7:13], strided=base.view(5, 6).t(), every_third=base[::3],
        empty=torch.zeros(0, 3))
    expected = {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in tensors.items()}
    cases = {
        "bare": tensors,
        "state_dict": {"state_dict": tensors, "epoch": 50, "lr": 5e-4},
        "model": {"model": tensors, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}},
        "dataparallel": collections.OrderedDict((f"module.{k}", v) for k, v in tensors.items()),
        "parameters": {k: torch.nn.Parameter(v) if v.is_floating_point() else v
                       for k, v in tensors.items()},
    }
    for name, obj in cases.items():
        torch.save(obj, tmp_path / f"{name}.ckpt")
        got = torch_checkpoint.load_state_dict(tmp_path / f"{name}.ckpt")
        assert list(got) == list(expected), name
        for key, want in expected.items():
            value = got[key].astype(np.float32) if key == "bf16" else got[key]
            assert value.dtype == want.dtype and value.shape == want.shape, (name, key)
            np.testing.assert_array_equal(value, want, err_msg=f"{name}/{key}")


def test_reader_cuda_location_and_big_endian(tmp_path):
    tensors = {"w": torch.randn(4, 3), "d": torch.randn(3, dtype=torch.float64), "n": torch.arange(5)}
    torch.save(tensors, tmp_path / "cpu.ckpt")

    def to_cuda(name, data):  # the location string of the storages: 'cpu' -> 'cuda:1'
        if name.endswith("data.pkl"):
            assert b"X\x03\x00\x00\x00cpu" in data
            return data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:1")
        return data

    _rewrite_zip(tmp_path / "cpu.ckpt", tmp_path / "cuda.ckpt", to_cuda)
    got = torch_checkpoint.load_state_dict(tmp_path / "cuda.ckpt")
    for key, value in tensors.items():
        np.testing.assert_array_equal(got[key], value.numpy())

    dtypes = {v.numpy().nbytes: v.numpy().dtype for v in tensors.values()}  # sizes are distinct

    def to_big(name, data):
        if name.endswith("/byteorder"):
            return b"big"
        if "/data/" in name:
            return np.frombuffer(data, dtypes[len(data)]).byteswap().tobytes()
        return data

    _rewrite_zip(tmp_path / "cpu.ckpt", tmp_path / "big.ckpt", to_big)
    got = torch_checkpoint.load_state_dict(tmp_path / "big.ckpt")
    for key, value in tensors.items():
        np.testing.assert_array_equal(got[key], value.numpy())
        assert got[key].dtype.isnative

    _rewrite_zip(tmp_path / "cpu.ckpt", tmp_path / "odd.ckpt",
                 lambda name, data: b"middle" if name.endswith("/byteorder") else data)
    with pytest.raises(torch_checkpoint.CheckpointError,
                       match=r"odd.ckpt: byteorder record 'middle', expected 'little' or 'big'"):
        torch_checkpoint.load_state_dict(tmp_path / "odd.ckpt")


def test_a_persistent_id_that_is_not_a_storage_is_refused(tmp_path):
    """A pickle whose persistent id names its storage type by a plain string, not a torch class."""
    torch.save({"w": torch.ones(2)}, tmp_path / "a.ckpt")

    marker = object()

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", "FloatStorage", "0", "cpu", 2) if obj is marker else None

    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump({"w": marker})
    _rewrite_zip(tmp_path / "a.ckpt", tmp_path / "b.ckpt",
                 lambda name, data: buffer.getvalue() if name.endswith("data.pkl") else data)
    with pytest.raises(torch_checkpoint.CheckpointError,
                       match=r"b.ckpt: unexpected persistent id \('storage', 'FloatStorage', '0', 'cpu', 2\)"):
        torch_checkpoint.load_state_dict(tmp_path / "b.ckpt")


def test_extract_state_dict_edge_cases():
    """Only a "module." prefix on every key is removed; an empty dict is not a state_dict."""
    w = np.ones(2, np.float32)
    assert list(torch_checkpoint.extract_state_dict({"module.a": w, "b": w})) == ["module.a", "b"]
    assert list(torch_checkpoint.extract_state_dict({"module.a": w, "module.b": w})) == ["a", "b"]
    with pytest.raises(torch_checkpoint.CheckpointError, match=r"ckpt holds no state_dict.*found dict"):
        torch_checkpoint.extract_state_dict({}, source="ckpt")
    with pytest.raises(torch_checkpoint.CheckpointError, match=r"ckpt holds no state_dict"):
        torch_checkpoint.extract_state_dict({"state_dict": {}, "epoch": 3}, source="ckpt")


class _Evil:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "subprocess"])
def test_malicious_pickle_is_refused_without_side_effect(tmp_path, kind):
    marker = tmp_path / "marker"
    payload = {
        "os.system": _Evil(os.system, f"touch {marker}"),
        "builtins.eval": _Evil(eval, f"open({str(marker)!r}, 'w').close()"),
        "subprocess": _Evil(subprocess.call, ["touch", str(marker)]),
    }[kind]
    expected_global = {"os.system": r"(posix|os)\.system", "builtins.eval": r"builtins\.eval",
                       "subprocess": r"subprocess\.call"}[kind]
    # Tensors first, so the evil global comes after allowed ones.
    torch.save(collections.OrderedDict(w=torch.ones(2), evil=payload), tmp_path / "evil.ckpt")
    assert not marker.exists()
    with pytest.raises(torch_checkpoint.UnsafeCheckpointError,
                       match=rf"refers to {expected_global}( \(pickled as [\w.]+\))?, which is not allowed"):
        torch_checkpoint.load_state_dict(tmp_path / "evil.ckpt")
    assert not marker.exists()


@pytest.mark.parametrize("target", [collections.namedtuple, sys.getrecursionlimit,
                                    collections.Counter])
def test_other_names_of_allowed_modules_are_refused(tmp_path, target):
    """Only the exact allowed globals pass: collections.namedtuple or a module reached through
    collections (collections._sys.getrecursionlimit, pickled by hand below) are refused like any
    other global, although collections.OrderedDict is allowed."""
    torch.save({"w": torch.ones(2)}, tmp_path / "a.ckpt")
    if target is sys.getrecursionlimit:  # GLOBAL 'collections _sys.getrecursionlimit', call it
        evil = b"\x80\x02ccollections\n_sys.getrecursionlimit\n)R."
    else:
        evil = pickle.dumps(_Evil(target, "x"), protocol=2)
    _rewrite_zip(tmp_path / "a.ckpt", tmp_path / "b.ckpt",
                 lambda name, data: evil if name.endswith("data.pkl") else data)
    with pytest.raises(torch_checkpoint.UnsafeCheckpointError, match=r"refers to collections\."):
        torch_checkpoint.load_state_dict(tmp_path / "b.ckpt")


def test_a_zip_with_two_pickles_is_refused(tmp_path):
    """Two <archive>/data.pkl records: which one torch would read is not ours to guess."""
    torch.save({"w": torch.ones(2)}, tmp_path / "a.ckpt")
    with zipfile.ZipFile(tmp_path / "a.ckpt") as zin, \
            zipfile.ZipFile(tmp_path / "b.ckpt", "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
        first = next(n for n in zin.namelist() if n.endswith("data.pkl"))
        zout.writestr("other/data.pkl", zin.read(first))
    with pytest.raises(torch_checkpoint.CheckpointError, match=r"expected one <archive>/data.pkl record, "
                                                               r"found \[.*data.pkl', 'other/data.pkl'\]"):
        torch_checkpoint.load_state_dict(tmp_path / "b.ckpt")


def test_replaced_data_pkl_is_refused(tmp_path):
    """A torch zip whose data.pkl is a plain pickle calling a function."""
    torch.save({"w": torch.ones(2)}, tmp_path / "a.ckpt")
    evil = pickle.dumps({"w": _Evil(os.getcwd)}, protocol=2)

    _rewrite_zip(tmp_path / "a.ckpt", tmp_path / "b.ckpt",
                 lambda name, data: evil if name.endswith("data.pkl") else data)
    with pytest.raises(torch_checkpoint.UnsafeCheckpointError, match=r"posix\.getcwd|os\.getcwd"):
        torch_checkpoint.load_state_dict(tmp_path / "b.ckpt")


def test_reader_errors(tmp_path):
    state = {"w": torch.randn(20000)}
    torch.save(state, tmp_path / "good.ckpt")
    data = (tmp_path / "good.ckpt").read_bytes()

    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(torch_checkpoint.CheckpointError, match=r"empty.ckpt is empty \(0 bytes\)"):
        torch_checkpoint.load_state_dict(tmp_path / "empty.ckpt")

    torch.save(state, tmp_path / "legacy.ckpt", _use_new_zipfile_serialization=False)
    with pytest.raises(torch_checkpoint.CheckpointError, match=r"legacy \(non-zip\) format"):
        torch_checkpoint.load_state_dict(tmp_path / "legacy.ckpt")

    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(torch_checkpoint.CheckpointError,
                       match=r"truncated.ckpt .* no zip directory: it is truncated or corrupt"):
        torch_checkpoint.load_state_dict(tmp_path / "truncated.ckpt")

    corrupt = bytearray(data)
    corrupt[len(data) // 2] ^= 0xFF  # inside the 80 kB storage record: CRC mismatch
    (tmp_path / "corrupt.ckpt").write_bytes(bytes(corrupt))
    with pytest.raises(torch_checkpoint.CheckpointError,
                       match=r"corrupt.ckpt is truncated or corrupt: BadZipFile: Bad CRC-32"):
        torch_checkpoint.load_state_dict(tmp_path / "corrupt.ckpt")

    _rewrite_zip(tmp_path / "good.ckpt", tmp_path / "short.ckpt",
                 lambda name, d: d[:100] if "/data/" in name else d)
    with pytest.raises(torch_checkpoint.CheckpointError,
                       match=r"has 100 bytes, expected 20000 x 4 \(FloatStorage\): the file is corrupt"):
        torch_checkpoint.load_state_dict(tmp_path / "short.ckpt")

    torch.save({"e": torch.ones(3).expand(1000, 3)}, tmp_path / "expanded.ckpt")
    with pytest.raises(torch_checkpoint.CheckpointError,
                       match=r"expanded.ckpt: tensor of size \(1000, 3\) \(stride \(0, 1\)\) has more "
                             r"elements than its storage \(3\)"):
        torch_checkpoint.load_state_dict(tmp_path / "expanded.ckpt")

    (tmp_path / "text.ckpt").write_text("hello")
    with pytest.raises(torch_checkpoint.CheckpointError, match=r"not a PyTorch checkpoint"):
        torch_checkpoint.load_state_dict(tmp_path / "text.ckpt")

    torch.save([1, 2, 3], tmp_path / "list.ckpt")
    with pytest.raises(torch_checkpoint.CheckpointError, match=r"holds no state_dict.*found list"):
        torch_checkpoint.load_state_dict(tmp_path / "list.ckpt")

    torch.save({"epoch": 3, "optimizer": {}}, tmp_path / "nostate.ckpt")
    with pytest.raises(torch_checkpoint.CheckpointError,
                       match=r"holds no state_dict.*with keys \['epoch', 'optimizer'\]"):
        torch_checkpoint.load_state_dict(tmp_path / "nostate.ckpt")

    with pytest.raises(FileNotFoundError, match="missing.ckpt does not exist"):
        torch_checkpoint.load_state_dict(tmp_path / "missing.ckpt")
    with pytest.raises(FileNotFoundError, match=r"is a directory; expected a PyTorch checkpoint file"):
        torch_checkpoint.load_state_dict(tmp_path)


@pytest.mark.parametrize("offset, size, stride, error", [
    (4, (6,), (1,), None),  # the last element of the storage: allowed
    (5, (6,), (1,), r"reaches element 10 of a storage of 10 elements"),
    (0, (2, 5), (5, 2), r"reaches element 13 of a storage of 10 elements"),
    (-1, (3,), (1,), r"offset -1"),
    (0, (2, 3), (3,), r"size \(2, 3\) and stride \(3,\) is malformed"),
    (0, (-2,), (1,), r"malformed"),
    (2, (3,), (-1,), r"size \(3,\) and stride \(-1,\) is malformed"),  # torch never writes one
])
def test_tensor_views_stay_inside_their_storage(offset, size, stride, error):
    """A corrupt view (offset, size, stride past the end of its storage) is refused, not read out
    of bounds; a view ending on the storage's last element is the tensor PyTorch would build."""
    flat = np.arange(10, dtype=np.float32)
    storage = torch_checkpoint._Storage(flat)
    if error is None:
        expected = torch.as_strided(torch.from_numpy(flat), size, stride, offset).numpy()
        np.testing.assert_array_equal(torch_checkpoint._rebuild_tensor(storage, offset, size, stride),
                                      expected)
    else:
        with pytest.raises(torch_checkpoint.CheckpointError, match=error):
            torch_checkpoint._rebuild_tensor(storage, offset, size, stride)


def test_convert_lists_every_key_problem_in_one_error():
    state = {k: v.numpy() for k, v in tr.TorchCRNN(16, **SMALL).state_dict().items()}
    del state["fc1.bias"], state["gru_block.bias_hh_l1_reverse"]
    state["extra.weight"] = np.zeros(3, np.float32)
    state["fc2.weight"] = np.zeros((2, 40), np.float32)
    with pytest.raises(ValueError) as info:
        torch_to_flax.convert(state, **SMALL)
    message = str(info.value)
    assert "missing keys ['gru_block.bias_hh_l1_reverse', 'fc1.bias']" in message
    assert "unexpected keys ['extra.weight']" in message
    assert "mis-shaped keys [fc2.weight: (2, 40), expected (2, 15)]" in message
    assert "in_channels=16" in message

    # The paper config against a small state_dict: every shape is listed.
    state = {k: v.numpy() for k, v in tr.TorchCRNN(16, **SMALL).state_dict().items()}
    with pytest.raises(ValueError, match=r"missing keys .*conv_block3.*mis-shaped keys .*"
                                         r"conv_block1.conv1.weight: \(8, 16, 3, 3\), expected \(64, 16, 3, 3\)"):
        torch_to_flax.convert(state)
    with pytest.raises(ValueError, match="no 4-D 'conv_block1.conv1.weight'"):
        torch_to_flax.convert({"fc1.bias": np.zeros(3)})
    with pytest.raises(ValueError, match=r"no 4-D 'conv_block1.conv1.weight' .*\(found \(3,\)\)"):
        torch_to_flax.convert({"conv_block1.conv1.weight": np.zeros(3, np.float32)})
    state["fc1.bias"] = state["fc1.bias"].astype(np.int64)
    with pytest.raises(ValueError, match=r"non-float tensors \[fc1.bias: int64\]"):
        torch_to_flax.convert(state, **SMALL)


def test_convert_copies_its_input():
    """The variables never share memory with the state_dict (writing to one leaves the other)."""
    state = {k: v.numpy() for k, v in tr.randomize_(tr.TorchCRNN(16, **SMALL), seed=9).state_dict().items()}
    variables = torch_to_flax.convert(state, **SMALL)
    for leaf in jax.tree.leaves(variables):
        assert leaf.flags.c_contiguous and leaf.dtype == np.float32
        assert not any(np.shares_memory(leaf, v) for v in state.values())


def test_model_config_of_reads_the_shapes():
    """Blocks in numeric order (conv_block10 after conv_block9); a tree without fc2 is refused."""
    def conv(c_in, c_out):
        return {"kernel": np.zeros((3, 3, c_in, c_out))}

    widths = [5] + [10 + i for i in range(1, 11)]
    params = {f"conv_block{i}": {"conv1": conv(widths[i - 1], widths[i]), "conv2": conv(widths[i], widths[i])}
              for i in range(1, 11)}
    params.update({"gru_l0": {"hidden_bias_n": np.zeros((2, 7))}, "gru_l1": {"hidden_bias_n": np.zeros((2, 7))},
                   "fc1": {"kernel": np.zeros((14, 3))}, "fc2": {"kernel": np.zeros((3 + 11, 2))}})
    assert flax_to_torch.model_config_of({"params": params}) == {
        "in_channels": 5, "conv_features": tuple(range(11, 21)), "gru_hidden": 7, "gru_layers": 2,
        "fc1_features": 3, "num_cameras": 11}
    del params["fc2"]
    with pytest.raises(ValueError, match=r"variables do not look like a CRNN's: params keys \["):
        flax_to_torch.model_config_of({"params": params})


def test_cli_errors_are_reported(tmp_path, capsys):
    (tmp_path / "empty.ckpt").write_bytes(b"")
    assert torch_to_flax.main(["--torch_ckpt", str(tmp_path / "empty.ckpt"),
                               "--out_dir", str(tmp_path / "out")]) == 1
    assert "is empty" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert torch_to_flax.main(["--torch_ckpt", str(tmp_path / "empty.ckpt"),
                               "--out_dir", str(tmp_path / "out"), "--features", "mfcc"]) == 1
    assert capsys.readouterr().err.startswith("error: --features 'mfcc': expected one of")

    torch.save(tr.TorchCRNN(16).state_dict(), tmp_path / "gcc.ckpt")
    assert torch_to_flax.main(["--torch_ckpt", str(tmp_path / "gcc.ckpt"), "--out_dir",
                               str(tmp_path / "out"), "--features", "gcc_phat_all"]) == 1
    assert "takes 16 input channels, but gcc_phat_all features have 121" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_flax_to_torch_cli(tmp_path, capsys):
    net = tr.randomize_(tr.TorchCRNN(16, **SMALL), seed=6)
    variables = torch_to_flax.convert({k: v.numpy() for k, v in net.state_dict().items()}, **SMALL)
    config = {"features": "gcc_phat", "in_channels": 16,
              "model": model_lib.model_config(model_lib.CRNN(**SMALL))}
    checkpointing.save_model(tmp_path / "m", variables, config)
    out = tmp_path / "exported.ckpt"
    assert flax_to_torch.main(["--model_dir", str(tmp_path / "m"), "--torch_ckpt", str(out)]) == 0
    again = tmp_path / "again.pt"  # the same model: the same bytes, whatever the name
    assert flax_to_torch.main(["--model_dir", str(tmp_path / "m"), "--torch_ckpt", str(again)]) == 0
    assert again.read_bytes() == out.read_bytes()
    loaded = tr.TorchCRNN(16, **SMALL)
    loaded.load_state_dict(torch.load(out, weights_only=True), strict=True)
    x, cams = _inputs(7, 2, 16)
    np.testing.assert_allclose(_torch_forward(loaded, x, cams), _torch_forward(net, x, cams), atol=1e-6)
    assert flax_to_torch.main(["--model_dir", str(tmp_path / "none"), "--torch_ckpt",
                               str(tmp_path / "other.ckpt")]) == 1
    assert "does not exist" in capsys.readouterr().err
    # ... and back through the other CLI: the size is read from the tensor shapes, not assumed
    # to be the paper's (a 3-layer GRU and 5 cameras make every size field differ from it).
    assert torch_to_flax.infer_model_config(net.state_dict()) == {**SMALL, "num_cameras": 11}
    with pytest.raises(ValueError, match=r"state_dict has no 'conv_block1.conv1.weight'"):
        torch_to_flax.infer_model_config({k: v for k, v in net.state_dict().items()
                                          if not k.startswith("conv_block1.")})  # a gap is named
    other = dict(conv_features=(4, 8, 8), gru_hidden=6, gru_layers=3, fc1_features=5, num_cameras=5)
    odd = tr.randomize_(tr.TorchCRNN(16, **other), seed=2)
    torch.save(odd.state_dict(), tmp_path / "odd.ckpt")
    capsys.readouterr()
    assert torch_to_flax.main(["--torch_ckpt", str(tmp_path / "odd.ckpt"), "--out_dir",
                               str(tmp_path / "back"), "--features", "gcc_phat"]) == 0
    assert "conv_features=[4, 8, 8], gru_hidden=6, gru_layers=3, fc1_features=5, num_cameras=5" in (
        capsys.readouterr().out)
    back, config, _ = checkpointing.load_model(tmp_path / "back")
    model = model_lib.CRNN.from_config(config["model"])
    x = _inputs(8, 2, 16)[0]
    cams5 = np.eye(5, dtype=np.float32)[[1, 4]]
    np.testing.assert_allclose(np.asarray(model.apply(back, x, cams5, train=False)),
                               _torch_forward(odd, x, cams5), atol=1e-6)
    # ... but forward and predict feed the 11 cameras of a rig: refused before any work.
    with pytest.raises(ValueError, match=r"back: the CRNN takes num_cameras=5, but asd-jax's data, "
                                         r"forward pass and predict give it the 11 cameras of a rig"):
        predict.load_predictor(tmp_path / "back", scaler_path=_unit_scaler(tmp_path / "s.h5", 16))


def test_flax_to_torch_cli_output_errors(tmp_path, capsys, monkeypatch):
    net = tr.randomize_(tr.TorchCRNN(16, **SMALL), seed=6)
    variables = torch_to_flax.convert({k: v.numpy() for k, v in net.state_dict().items()}, **SMALL)
    checkpointing.save_model(tmp_path / "m", variables, {
        "features": "gcc_phat", "in_channels": 16, "model": model_lib.model_config(model_lib.CRNN(**SMALL))})
    # A missing output directory: a clear error naming it, before the model is read.
    monkeypatch.setattr(checkpointing, "load_model", lambda d: pytest.fail("read the model first"))
    missing = tmp_path / "no_such_dir"
    assert flax_to_torch.main(["--model_dir", str(tmp_path / "m"),
                               "--torch_ckpt", str(missing / "x.ckpt")]) == 1
    assert f"output directory {missing} does not exist" in capsys.readouterr().err
    monkeypatch.undo()

    # A failed write (disk full, say) leaves neither the output nor its .partial file.
    def failing_save(obj, f):
        f.write(b"half a file")
        f.flush()
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", failing_save)
    out = tmp_path / "out.ckpt"
    assert flax_to_torch.main(["--model_dir", str(tmp_path / "m"), "--torch_ckpt", str(out)]) == 1
    assert "file write failed" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    monkeypatch.undo()

    # An existing file (a released checkpoint given as --torch_ckpt by mistake) is kept unless
    # --overwrite: refused before the model is read.
    out.write_bytes(b"a released checkpoint")
    with monkeypatch.context() as m:
        m.setattr(checkpointing, "load_model", lambda d: pytest.fail("read the model first"))
        assert flax_to_torch.main(["--model_dir", str(tmp_path / "m"), "--torch_ckpt", str(out)]) == 1
    assert (f"error: {out} exists; pass --overwrite to replace it" in capsys.readouterr().err)
    assert out.read_bytes() == b"a released checkpoint"
    assert flax_to_torch.main(["--model_dir", str(tmp_path / "m"), "--torch_ckpt", str(out),
                               "--overwrite"]) == 0
    loaded = tr.TorchCRNN(16, **SMALL)
    loaded.load_state_dict(torch.load(out, weights_only=True), strict=True)

    # Even with --overwrite, the output may not replace a file of the model directory it reads.
    model_dir = tmp_path / "m"
    inside = sorted(p for p in (model_dir / "model").rglob("*") if p.is_file())[0]
    for target in (model_dir / "config.json", inside):
        before = target.read_bytes()
        assert flax_to_torch.main(["--model_dir", str(model_dir), "--torch_ckpt", str(target),
                                   "--overwrite"]) == 1
        err = capsys.readouterr().err
        assert f"error: output {target} is" in err and "choose another output path" in err, err
        assert target.read_bytes() == before


@pytest.mark.parametrize("count", [-3, 2**63, True, 1.5])
def test_num_batches_tracked_must_be_a_count(count):
    variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                             model_lib.abstract_variables(model_lib.CRNN(**SMALL), 16))
    with pytest.raises(ValueError, match=r"num_batches_tracked \(--num_batches_tracked\) must be an "
                                         rf"integer in \[0, 2\*\*63 - 1\] .*got {count!r}"):
        flax_to_torch.to_state_dict(variables, num_batches_tracked=count)
    for ok in (0, 2**63 - 1):  # both ends fit PyTorch's int64
        assert int(flax_to_torch.to_state_dict(variables, ok)["conv_block1.bn1.num_batches_tracked"]) == ok


@pytest.mark.parametrize("count", ["-3", str(2**63)])
def test_flax_to_torch_cli_refuses_a_negative_count_before_reading_the_model(tmp_path, capsys,
                                                                            monkeypatch, count):
    monkeypatch.setattr(checkpointing, "load_model", lambda d: pytest.fail("read the model first"))
    assert flax_to_torch.main(["--model_dir", str(tmp_path / "m"), "--torch_ckpt",
                               str(tmp_path / "x.ckpt"), "--num_batches_tracked", count]) == 1
    assert capsys.readouterr().err == (
        "error: num_batches_tracked (--num_batches_tracked) must be an integer in [0, 2**63 - 1] "
        f"(a count of training batches), got {count}\n")
    assert not list(tmp_path.iterdir())


def _small_state(seed=10):
    return {k: v.numpy() for k, v in tr.randomize_(tr.TorchCRNN(16, **SMALL), seed=seed).state_dict().items()}


@pytest.mark.parametrize("key, value, expected", [
    ("gru_block.weight_hh_l0", np.float32(1), r"\(\), expected \(3 \* gru_hidden, gru_hidden\)"),
    ("gru_block.weight_hh_l0", np.zeros(24, np.float32), r"\(24,\), expected \(3 \* gru_hidden, gru_hidden\)"),
    ("fc1.weight", np.zeros((4, 16, 1), np.float32), r"\(4, 16, 1\), expected \(fc1_features, 2 \* gru_hidden\)"),
    ("fc1.weight", np.zeros((0, 16), np.float32), r"\(0, 16\), expected \(fc1_features, 2 \* gru_hidden\)"),
    ("fc2.weight", np.float32(1), r"\(\), expected \(2, fc1_features \+ num_cameras\)"),
    ("conv_block2.conv1.weight", np.zeros((16, 8), np.float32),
     r"\(16, 8\), expected \(out_channels, in_channels, 3, 3\)"),
])
def test_infer_model_config_names_a_tensor_of_the_wrong_rank(key, value, expected):
    state = _small_state()
    state[key] = value
    with pytest.raises(ValueError, match=rf"state_dict '{key}' has shape {expected} with positive sizes"):
        torch_to_flax.infer_model_config(state)


def test_infer_model_config_needs_a_camera_column_in_fc2():
    state = _small_state()
    state["fc2.weight"] = np.zeros((2, 4), np.float32)  # fc1 has 4 outputs: no camera left
    with pytest.raises(ValueError, match=re.escape(
            "state_dict 'fc2.weight' has shape (2, 4), expected (2, fc1_features + num_cameras) = "
            "(2, 4 + num_cameras) with num_cameras >= 1 (fc1.weight gives fc1_features=4)")):
        torch_to_flax.infer_model_config(state)


def test_cli_names_the_file_of_a_tensor_of_the_wrong_rank(tmp_path, capsys):
    state = {k: torch.from_numpy(v) for k, v in _small_state().items()}
    state["gru_block.weight_hh_l0"] = torch.tensor(1.0)
    torch.save(state, tmp_path / "rank.ckpt")
    assert torch_to_flax.main(["--torch_ckpt", str(tmp_path / "rank.ckpt"), "--out_dir",
                               str(tmp_path / "m"), "--features", "gcc_phat"]) == 1
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'rank.ckpt'}: state_dict 'gru_block.weight_hh_l0' has shape (), expected "
        "(3 * gru_hidden, gru_hidden) with positive sizes: not a checkpoint of the reference CRNN\n")
    assert not (tmp_path / "m").exists()


def test_convert_refuses_non_finite_weights_and_negative_variances():
    state = _small_state()
    torch_to_flax.convert(state, **SMALL)  # the untouched state converts
    state["fc1.weight"] = np.where(np.eye(*state["fc1.weight"].shape, dtype=bool), np.nan,
                                   state["fc1.weight"])
    with pytest.raises(ValueError, match=re.escape(
            "state_dict holds weights no trained CRNN has, as a diverged or damaged training run "
            "leaves them: NaN or infinite values (as float32) in 1 tensor(s) [fc1.weight]")):
        torch_to_flax.convert(state, **SMALL)
    state = _small_state()
    for i, key in enumerate(["conv_block1.conv1.weight", "conv_block2.conv1.weight",
                             "gru_block.bias_ih_l0", "gru_block.bias_ih_l0_reverse"]):
        state[key].flat[i] = (np.inf, -np.inf, np.nan, np.inf)[i]
    state["fc2.bias"] = state["fc2.bias"].astype(np.float64) * 1e300  # beyond float32's range
    state["conv_block2.bn1.running_var"][3] = -0.5
    with pytest.raises(ValueError) as info:
        torch_to_flax.convert(state, **SMALL)
    message = str(info.value)
    assert ("in 5 tensor(s) [conv_block1.conv1.weight, conv_block2.conv1.weight, "
            "gru_block.bias_ih_l0, gru_block.bias_ih_l0_reverse and 1 more]") in message
    assert "negative batch-norm variances in [conv_block2.bn1.running_var]" in message
    # a variance of 0 is one (a channel that was constant): kept
    state = _small_state()
    state["conv_block1.bn1.running_var"][:] = 0.0
    torch_to_flax.convert(state, **SMALL)


def test_cli_names_the_file_with_non_finite_weights(tmp_path, capsys):
    state = {k: torch.from_numpy(v) for k, v in _small_state().items()}
    state["conv_block1.bn2.running_var"][0] = -1.0
    torch.save(state, tmp_path / "bad.ckpt")
    assert torch_to_flax.main(["--torch_ckpt", str(tmp_path / "bad.ckpt"), "--out_dir",
                               str(tmp_path / "m"), "--features", "gcc_phat"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'bad.ckpt'}: state_dict holds weights no trained CRNN has")
    assert "[conv_block1.bn2.running_var]" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "m").exists()


def _small_model_dir(directory, pooling="avg", poison=None):
    variables = torch_to_flax.convert(_small_state(), **SMALL)
    if poison is not None:
        poison(variables)
    checkpointing.save_model(directory, variables, {
        "features": "gcc_phat", "in_channels": 16,
        "model": model_lib.model_config(model_lib.CRNN(**SMALL, pooling=pooling))})


def test_flax_to_torch_cli_refuses_max_pooling_before_writing(tmp_path, capsys):
    _small_model_dir(tmp_path / "m", pooling="max")
    out = tmp_path / "exported.ckpt"
    assert flax_to_torch.main(["--model_dir", str(tmp_path / "m"), "--torch_ckpt", str(out)]) == 1
    assert capsys.readouterr().err == (
        f"error: model directory {tmp_path / 'm'}: the CRNN pools frequency by 'max' (model.pooling "
        "in its config.json), but the reference network always average-pools and its state_dict "
        "cannot carry the pooling: the exported checkpoint would compute another function; only "
        "'avg' models can be exported\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    flax_to_torch.check_exportable({"conv_features": [8, 16]}, "x")  # no pooling key: avg
    flax_to_torch.check_exportable({"pooling": "avg", "dtype": "bfloat16"}, "x")  # rounding only


def test_flax_to_torch_cli_refuses_non_finite_weights(tmp_path, capsys):
    def poison(variables):
        variables["params"]["fc2"]["bias"][1] = np.nan

    _small_model_dir(tmp_path / "m", poison=poison)
    out = tmp_path / "exported.ckpt"
    assert flax_to_torch.main(["--model_dir", str(tmp_path / "m"), "--torch_ckpt", str(out)]) == 1
    assert capsys.readouterr().err == (
        f"error: model directory {tmp_path / 'm'}: state_dict holds weights no trained CRNN has, as "
        "a diverged or damaged training run leaves them: NaN or infinite values (as float32) in 1 "
        "tensor(s) [fc2.bias]\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_cli_reports_file_errors_in_one_line(tmp_path, capsys):
    """A missing checkpoint file and an existing model/ without --overwrite (OSErrors, not
    ValueErrors) are one `error:` line and exit status 1, not a traceback."""
    missing = tmp_path / "none.ckpt"
    assert torch_to_flax.main(["--torch_ckpt", str(missing), "--out_dir", str(tmp_path / "m"),
                               "--features", "gcc_phat"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert f"{missing} does not exist" in err
    assert not (tmp_path / "m").exists()

    torch.save({k: torch.from_numpy(v) for k, v in _small_state().items()}, tmp_path / "a.ckpt")
    args = ["--torch_ckpt", str(tmp_path / "a.ckpt"), "--out_dir", str(tmp_path / "m"), "--features",
            "gcc_phat"]
    assert torch_to_flax.main(args) == 0
    capsys.readouterr()
    assert torch_to_flax.main(args) == 1
    assert capsys.readouterr().err == (f"error: {tmp_path / 'm' / 'model'} already exists; pass "
                                       "overwrite=True (--overwrite) to replace it\n")
