"""Loss, learning-rate schedule, optimizer and steps of asd_jax.training."""

import functools
import pathlib
import types

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from asd_jax import constants
from asd_jax.training import asdl_loss, configs, schedule


def _looped_loss(outputs, target, pseudo, va):
    """SPEC section 7 transcribed literally: loops over batch items and frames, float64."""
    total = 0.0
    for b in range(outputs.shape[0]):
        for t in range(outputs.shape[1]):
            x, c = float(outputs[b, t, 0]), float(outputs[b, t, 1])
            total += (c - float(va[b, t])) ** 2
            if va[b, t] == 1 and pseudo[b, t] == 1:
                total += (x - float(target[b, t])) ** 2
    return total


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_equals_loops(seed):
    rng = np.random.default_rng(seed)
    batch = 5
    outputs = rng.uniform(size=(batch, 60, 2)).astype(np.float32)
    target = rng.uniform(size=(batch, 60)).astype(np.float32)
    pseudo = rng.integers(0, 2, (batch, 60)).astype(np.float32)
    va = rng.integers(0, 2, (batch, 60)).astype(np.float32)
    va[0] = 0  # an example with no speech: only the confidence term
    pseudo[1] = 1
    va[1] = 1  # an example where every frame has the position term
    got = asdl_loss(jnp.asarray(outputs), target, pseudo, va)
    assert got.dtype == jnp.float32 and got.shape == ()
    np.testing.assert_allclose(float(got), _looped_loss(outputs, target, pseudo, va), rtol=1e-5)


def test_loss_masks_position_term():
    outputs = np.zeros((1, 60, 2), np.float32)
    target = np.ones((1, 60), np.float32)  # position error 1 on every frame
    va = np.zeros((1, 60), np.float32)
    pseudo = np.ones((1, 60), np.float32)
    va[0, :10] = 1  # 10 frames speaking: confidence error 1 and position error 1 each
    pseudo[0, 5:] = 0  # ... of which 5 have a position pseudo-label
    assert float(asdl_loss(outputs, target, pseudo, va)) == pytest.approx(10 + 5)


def test_loss_mask_leaves_out_padded_examples():
    rng = np.random.default_rng(3)
    outputs = rng.uniform(size=(6, 60, 2)).astype(np.float32)
    target = rng.uniform(size=(6, 60)).astype(np.float32)
    pseudo, va = (rng.integers(0, 2, (6, 60)).astype(np.float32) for _ in range(2))
    mask = np.array([True, False, True, True, False, False])
    got = asdl_loss(outputs, target, pseudo, va, mask=mask)
    np.testing.assert_allclose(float(got), _looped_loss(outputs[mask], target[mask], pseudo[mask], va[mask]),
                               rtol=1e-5)


def test_loss_rejects_bad_shapes():
    with pytest.raises(AssertionError):
        asdl_loss(jnp.zeros((2, 60, 3)), jnp.zeros((2, 60)), jnp.zeros((2, 60)), jnp.zeros((2, 60)))


@pytest.mark.parametrize("epoch", [1, 30, 31, 35, 50])
def test_reference_lr_matches_spec_formula(epoch):
    lr0 = 5e-4
    expected = lr0 * 0.9 ** ((epoch - 30) * (epoch - 29) / 2) if epoch > 30 else lr0
    assert schedule.learning_rate_for_epoch(lr0, epoch) == pytest.approx(expected, rel=1e-12)


def test_reference_lr_is_the_compounding_product():
    """The reference: at the start of each epoch e > 30, lr *= 0.9 ** (e - 30)."""
    lr = 1e-4
    for epoch in range(1, 51):
        if epoch > 30:
            lr *= 0.9 ** (epoch - 30)
        assert schedule.learning_rate_for_epoch(1e-4, epoch) == pytest.approx(lr, rel=1e-12)
    assert lr / 1e-4 == pytest.approx(2.5e-10, rel=0.1)


@pytest.mark.parametrize("epoch", [1, 30, 31, 35, 50])
def test_exponential_and_constant_lr(epoch):
    expected = 1e-3 * 0.9 ** max(0, epoch - 30)
    assert schedule.learning_rate_for_epoch(1e-3, epoch, kind="exponential") == pytest.approx(expected)
    assert schedule.learning_rate_for_epoch(1e-3, epoch, kind="constant") == 1e-3


def test_lr_rejects_bad_values():
    with pytest.raises(ValueError, match="1-based"):
        schedule.learning_rate_for_epoch(1e-3, 0)
    with pytest.raises(ValueError, match="cosine"):
        schedule.learning_rate_for_epoch(1e-3, 1, kind="cosine")


def test_config_json_round_trip(tmp_path):
    # the boundary values are allowed: the last fold, no decay (factor 1)
    config = configs.tiny().replace(fold=4, learning_rate=1e-3, data_root="/data", lr_decay_factor=1.0)
    path = tmp_path / "config.json"
    path.write_text(__import__("json").dumps({**config.to_dict(), "in_channels": 16}))
    assert configs.TrainConfig.from_json(path) == config


@pytest.mark.parametrize("change,message", [
    (dict(model={**configs.TINY_MODEL, "poolng": "max"}),
     r"model .* does not build the CRNN: .*\['poolng'\]"),
    (dict(model={**configs.TINY_MODEL, "pooling": "median"}), r"pooling 'median'"),
    # Would fail inside the first step, after the workdir was written.
    (dict(model={**configs.TINY_MODEL, "num_cameras": 5}),
     r"model: the CRNN takes num_cameras=5, but .* give it the 11 cameras of a rig"),
    (dict(model={**configs.TINY_MODEL, "conv_features": ()}),
     r"conv_features must be a non-empty list of positive ints, got \(\)"),
    (dict(model={**configs.TINY_MODEL, "conv_features": (8, 0)}),
     r"conv_features must be a non-empty list of positive ints, got \(8, 0\)"),
    (dict(learning_rate=float("nan")), r"learning_rate must be a finite number > 0, got nan"),
    (dict(learning_rate=float("inf")), r"learning_rate must be a finite number > 0, got inf"),
    (dict(learning_rate=-1e-3), r"learning_rate must be a finite number > 0"),
    (dict(lr_decay_factor=-3), r"lr_decay_factor must be in \(0, 1\], got -3"),
    (dict(lr_decay_factor=1.5), r"lr_decay_factor must be in \(0, 1\], got 1.5"),
    (dict(lr_decay_start_epoch=-1), r"lr_decay_start_epoch must be an integer >= 0, got -1"),
    # Floats and bools in integer fields would pass a range check and fail mid-training.
    (dict(num_epochs=2.0), r"num_epochs must be an integer >= 1, got 2.0"),
    (dict(batch_size=True), r"batch_size must be an integer >= 1, got True"),
    (dict(checkpoint_every_steps=0.5), r"checkpoint_every_steps must be an integer >= 0, got 0.5"),
    (dict(num_folds=1), r"num_folds must be an integer >= 2, got 1"),
    (dict(seed=-1), r"seed must be an integer >= 0, got -1"),
    (dict(prefetch=-1), r"prefetch must be an integer >= 0, got -1"),
    (dict(fold=True), r"fold must be None or in 0..4 .*got True"),
    (dict(fold=1.0), r"fold must be None or in 0..4 .*got 1.0"),
    (dict(fold=5), r"fold must be None or in 0..4 \(--fold 0..4 or all\), got 5"),
    (dict(compute_dtype="float16"), r"compute_dtype must be one of \('float32', 'bfloat16'\), got 'float16'"),
    (dict(hdf5_dir=3), r"hdf5_dir must be a path string or null, got 3"),
    (dict(drop_last="no"), r"drop_last must be true or false, got 'no'"),
    (dict(data_root=3), r"data_root must be a path string or null, got 3"),
    (dict(features="gcc"), r"features must be one of \('gcc_phat'.*got 'gcc'"),
    (dict(condition="GT"), r"condition must be one of \('GT_GT'.*got 'GT'"),
])
def test_config_refuses_bad_values(change, message):
    with pytest.raises(ValueError, match=message):
        configs.tiny().replace(**change)


def test_training_without_data_names_the_flags():
    from asd_jax.training import loop
    with pytest.raises(ValueError, match=r"no training data: set data_root \(--data_root.*hdf5_dir "
                                         r"\(--hdf5_dir"):
        loop.open_data(configs.tiny())


def test_config_json_refuses_unknown_keys_and_names_the_file(tmp_path):
    """A misspelt key must not train at the default value; the keys the code writes are fine."""
    import json

    values = {**configs.tiny().to_dict(), "in_channels": 16, "cross_validation": True}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(values))
    assert configs.TrainConfig.from_json(path) == configs.tiny()
    path.write_text(json.dumps({**values, "learning_rat": 0.5}))
    with pytest.raises(ValueError, match=rf"config file {path}: unknown config key\(s\) \['learning_rat'\]"):
        configs.TrainConfig.from_json(path)
    path.write_text(json.dumps({**values, "model": {**values["model"], "poolng": "max"}}))
    with pytest.raises(ValueError, match=rf"config file {path}: model .*\['poolng'\]"):
        configs.TrainConfig.from_json(path)
    path.write_text(json.dumps({**values, "batch_size": 8.0}))
    with pytest.raises(ValueError, match=rf"config file {path}: batch_size must be an integer >= 1, got 8.0"):
        configs.TrainConfig.from_json(path)
    path.write_text(json.dumps([values]))
    with pytest.raises(ValueError, match=rf"config file {path} must hold a JSON object"):
        configs.TrainConfig.from_json(path)
    path.write_text(json.dumps(values)[:-1])
    with pytest.raises(ValueError, match=rf"config file {path} is not valid JSON"):
        configs.TrainConfig.from_json(path)
    with pytest.raises(FileNotFoundError, match=rf"config file {tmp_path / 'none.json'} does not exist"):
        configs.TrainConfig.from_json(tmp_path / "none.json")


def test_a_workdir_config_that_cannot_be_read_is_named(tmp_path):
    """`train --workdir W` resumes from W/config.json: a truncated or binary one is one error line
    naming it (it was json's bare 'Expecting value: line 2 column 1')."""
    import subprocess
    import sys

    path = tmp_path / "config.json"
    path.write_bytes(b'{"features": "gcc_phat",\n')
    with pytest.raises(ValueError, match=rf"config file {path} is not valid JSON: Expecting"):
        configs.read_config_json(path)
    result = subprocess.run([sys.executable, "-m", "experiments.train", f"--workdir={tmp_path}"],
                            cwd=pathlib.Path(__file__).resolve().parents[1], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: config file {path} is not valid JSON")
    path.write_bytes(b"\x83\x00\x01binary")
    with pytest.raises(ValueError, match=rf"{path}:1: not UTF-8 text \(byte 0x83 at offset 0\); expected a "
                                         r"training config"):
        configs.TrainConfig.from_json(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_presets():
    assert configs.paper_gcc().learning_rate == 5e-4 and configs.paper_gcc().features == "gcc_phat"
    assert configs.paper_salsa().learning_rate == 7e-5 and configs.paper_salsa().features == "salsa_lite"
    assert configs.paper_gcc().batch_size == 32 and configs.paper_gcc().num_epochs == 50
    assert configs.paper_gcc().seed == 42
    with pytest.raises(ValueError, match="unknown config"):
        configs.get_config("huge")
    with pytest.raises(ValueError, match="lr_schedule"):
        configs.TrainConfig(lr_schedule="cosine")


def test_paper_presets_take_the_released_learning_rate_of_each_pair(reference_dir):
    """Every released gcc / salsa-lite run's learning_rate.txt (ASCs = ASC(s)) is the lr0 of the
    paper preset given that pair, whichever paper preset it starts from; a pair without a
    released run gets the SPEC's default 1e-4; tiny keeps its own rate."""
    released = {}
    for path in sorted((reference_dir / "released").glob("*/learning_rate.txt")):
        prefix, _, condition = path.parent.name.partition("_")
        features = {"gcc": "gcc_phat", "salsa-lite": "salsa_lite"}.get(prefix)
        if features is not None:
            released[features, condition.replace("ASCs", "ASC(s)")] = float(path.read_text())
    assert len(released) == 9 and set(released) == set(configs.RELEASED_LEARNING_RATES)
    # The released gcc runs are one per supervisory condition: the 8 names of SPEC section 1.
    assert sorted(c for f, c in released if f == "gcc_phat") == sorted(constants.CONDITIONS)
    for (features, condition), lr0 in released.items():
        for preset in ("paper_gcc", "paper_salsa"):
            config = configs.get_config(preset, features=features, condition=condition)
            assert (config.features, config.condition, config.learning_rate) == (features, condition, lr0)
            assert config.batch_size == 32 and config.num_epochs == 50 and config.seed == 42
    assert configs.get_config("paper_gcc", condition="TalkNet_GT").learning_rate == 9e-5
    assert configs.get_config("paper_salsa", condition="TalkNet_GT").learning_rate == 1e-4
    assert configs.get_config("paper_gcc", features="gcc_phat_all").learning_rate == 1e-4
    tiny = configs.get_config("tiny", condition="ASC_VAD")
    assert (tiny.condition, tiny.learning_rate) == ("ASC_VAD", configs.tiny().learning_rate)


@pytest.mark.parametrize("preset, lr0", [(configs.paper_gcc, 5e-4), (configs.paper_salsa, 7e-5)])
def test_paper_presets_follow_the_spec_learning_rate_quirk(preset, lr0):
    """SPEC section 7, written out: lr0 (gcc 5e-4, salsa-lite 7e-5) up to epoch 30, then
    lr_e = lr0 * 0.9 ** ((e - 30) * (e - 29) / 2) (abs=0: the late rates are ~1e-13)."""
    config = preset()
    for epoch in range(1, 51):
        expected = lr0 * 0.9 ** ((epoch - 30) * (epoch - 29) / 2) if epoch > 30 else lr0
        assert config.learning_rate_for_epoch(epoch) == pytest.approx(expected, rel=1e-12, abs=0), epoch
    assert config.learning_rate_for_epoch(30) == lr0
    assert config.learning_rate_for_epoch(31) == pytest.approx(0.9 * lr0, rel=1e-12, abs=0)


def test_adam_matches_pytorch_with_lr_changes():
    """Our optimizer against torch.optim.Adam (defaults), lr changed between 'epochs'."""
    import torch
    from asd_jax.training import state as state_lib

    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(4, 3)).astype(np.float32)
    target = rng.normal(size=(4, 3)).astype(np.float32)
    lrs = [1e-2, 1e-2, 1e-3, 1e-4]

    w_t = torch.nn.Parameter(torch.tensor(w0))
    opt = torch.optim.Adam([w_t], lr=lrs[0])
    tx = state_lib.create_optimizer(lrs[0])
    ts = state_lib.create_train_state(jax.random.PRNGKey(0), {"params": {"w": jnp.asarray(w0)}}, tx)
    grad_fn = jax.grad(lambda p: jnp.sum((p["w"] - target) ** 3 + (p["w"] - target) ** 2))
    for lr in lrs:
        for group in opt.param_groups:
            group["lr"] = lr
        ts = state_lib.set_learning_rate(ts, lr)
        for _ in range(3):
            opt.zero_grad()
            loss = torch.sum((w_t - torch.tensor(target)) ** 3 + (w_t - torch.tensor(target)) ** 2)
            loss.backward()
            opt.step()
            updates, opt_state = tx.update(grad_fn(ts.params), ts.opt_state, ts.params)
            ts = ts.replace(params=jax.tree.map(lambda p, u: p + u, ts.params, updates), opt_state=opt_state)
    assert float(state_lib.learning_rate(ts)) == pytest.approx(lrs[-1])
    np.testing.assert_allclose(np.asarray(ts.params["w"]), w_t.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_adam_eps_matches_pytorch_for_gradients_near_eps():
    """Gradients of 1e-9..1e-7 (the loss scaled by 1e-8), where Adam's eps (1e-8, added to
    sqrt(v_hat)) sets the size of every step: our optimizer against torch.optim.Adam with
    betas 0.9/0.999 and eps 1e-8 (SPEC section 7)."""
    import torch
    from asd_jax.training import state as state_lib

    rng = np.random.default_rng(4)
    w0 = rng.normal(size=(5, 4)).astype(np.float32)
    target = rng.normal(size=(5, 4)).astype(np.float32)
    scale, lrs = 1e-8, [1e-2, 1e-2, 1e-2, 3e-3, 3e-3]

    w_t = torch.nn.Parameter(torch.tensor(w0))
    opt = torch.optim.Adam([w_t], lr=lrs[0], betas=(0.9, 0.999), eps=1e-8, weight_decay=0)
    tx = state_lib.create_optimizer(lrs[0])
    ts = state_lib.create_train_state(jax.random.PRNGKey(0), {"params": {"w": jnp.asarray(w0)}}, tx)
    grad_fn = jax.grad(lambda p: scale * jnp.sum((p["w"] - target) ** 3 + (p["w"] - target) ** 2))
    for lr in lrs:
        for group in opt.param_groups:
            group["lr"] = lr
        ts = state_lib.set_learning_rate(ts, lr)
        opt.zero_grad()
        loss = scale * torch.sum((w_t - torch.tensor(target)) ** 3 + (w_t - torch.tensor(target)) ** 2)
        loss.backward()
        grad = w_t.grad.numpy().copy()
        opt.step()
        updates, opt_state = tx.update(grad_fn(ts.params), ts.opt_state, ts.params)
        ts = ts.replace(params=jax.tree.map(lambda p, u: p + u, ts.params, updates), opt_state=opt_state)
    assert 1e-9 < np.median(np.abs(grad)) < 1e-7  # the size of eps: it matters
    np.testing.assert_allclose(np.asarray(ts.params["w"]), w_t.detach().numpy(), rtol=1e-5, atol=1e-7)


def test_train_state_keeps_a_raw_key_and_a_float32_learning_rate():
    """The state's rng is a raw uint32 (2,) key (checkpointable as is; a typed key is refused),
    and `set_learning_rate` keeps the stored rate a float32 scalar array: the state's pytree
    structure and dtypes do not change between epochs (no retracing of the jitted step, and
    checkpoints restore into the same abstract state)."""
    from asd_jax.training import state as state_lib

    tx = state_lib.create_optimizer(1e-2)
    variables = {"params": {"w": jnp.ones((2, 3))}}
    with pytest.raises(AssertionError):
        state_lib.create_train_state(jax.random.key(0), variables, tx)
    ts = state_lib.create_train_state(jax.random.PRNGKey(0), variables, tx)
    assert ts.rng.dtype == jnp.uint32 and ts.batch_stats == {}
    assert (int(ts.step), int(ts.epoch)) == (0, 0)
    before = jax.tree.map(lambda x: (np.shape(x), jnp.result_type(x)), ts)
    ts = state_lib.set_learning_rate(ts, 3e-4)
    lr = state_lib.learning_rate(ts)
    assert isinstance(lr, jax.Array) and lr.shape == () and lr.dtype == jnp.float32
    assert float(lr) == pytest.approx(3e-4)
    assert jax.tree.map(lambda x: (np.shape(x), jnp.result_type(x)), ts) == before


def _tiny_torch_and_flax(seed=0, in_channels=3):
    import torch
    import torch_reference
    from converters import torch_to_flax
    from asd_jax import model as model_lib

    cfg = dict(conv_features=(4, 8, 8, 8), gru_hidden=6, gru_layers=2, fc1_features=5,
               num_cameras=11, pooling="avg")
    torch.manual_seed(seed)
    torch_model = torch_reference.randomize_(torch_reference.TorchCRNN(in_channels, **cfg), seed)
    sd = {k: v.detach().numpy().copy() for k, v in torch_model.state_dict().items()}
    variables = torch_to_flax.convert(sd, **cfg)
    return torch, torch_model, model_lib.CRNN.from_config(cfg), variables, cfg


def _random_batch(rng, batch, frames, bins, channels):
    t_out = frames // 16
    cams = np.eye(11, dtype=np.float32)[rng.integers(0, 11, batch)]
    return {"features": rng.normal(size=(batch, frames, bins, channels)).astype(np.float32) * 2 + 0.5,
            "cams": cams,
            "target_coords": rng.uniform(size=(batch, t_out)).astype(np.float32),
            "pseudo_labels": rng.integers(0, 2, (batch, t_out)).astype(np.float32),
            "speech_activity": rng.integers(0, 2, (batch, t_out)).astype(np.float32)}


def test_train_step_matches_pytorch_training():
    """Three Adam steps of our jitted train_step against the PyTorch reference model trained as
    the reference trains (summed looped loss, backward, torch.optim.Adam), BN in train mode.
    Also checks the per-epoch lr handling and the doubled GRU bias updates."""
    from converters import torch_to_flax
    from asd_jax import scaler as scaler_lib
    from asd_jax.model import gru_bias_update_scale
    from asd_jax.training import state as state_lib, steps
    import torch_reference

    torch, torch_model, model, variables, cfg = _tiny_torch_and_flax()
    rng = np.random.default_rng(1)
    channels, lr = 3, 1e-2
    mean = rng.normal(size=(32, channels)).astype(np.float32)
    std = rng.uniform(0.5, 2.0, size=(32, channels)).astype(np.float32)
    scaler = scaler_lib.Scaler(mean, std)
    tx = state_lib.create_optimizer(lr, gru_bias_update_scale(variables["params"]))
    ts = state_lib.create_train_state(jax.random.PRNGKey(0), jax.tree.map(jnp.asarray, variables), tx)
    step_fn = jax.jit(functools.partial(steps.train_step, model=model, tx=tx), donate_argnums=0)

    torch_model.train()
    opt = torch.optim.Adam(torch_model.parameters(), lr=lr)
    for i in range(3):
        batch = _random_batch(rng, 4, 64, 32, channels)
        ts, metrics = step_fn(ts, batch, scaler)
        x = torch.tensor((batch["features"] - mean) / std).permute(0, 3, 1, 2)
        out = torch_model(x, torch.tensor(batch["cams"])[:, None, :])
        loss = torch_reference.asdl_loss_reference(
            out, *(torch.tensor(batch[k]) for k in ("target_coords", "pseudo_labels", "speech_activity")))
        opt.zero_grad()
        loss.backward()
        opt.step()
        np.testing.assert_allclose(float(metrics["loss"]), loss.item(), rtol=1e-4)
        assert int(metrics["num_examples"]) == 4
    assert int(ts.step) == 3
    sd = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    expected = torch_to_flax.convert(sd, **cfg)
    # Parameters within half an Adam step (lr). At this size block 4's batch norms see 32 values
    # per channel; at the third step the two sides' gradients of block 4's second batch-norm
    # bias differ by ~10% (the same before and after the CPU reformulations of model.py: an
    # activation within float32 rounding of zero on the other side of the ReLU), and Adam's
    # normalisation turns that into up to 0.3 lr on a few % of the conv weights. The gradients
    # themselves are checked tightly by the test below.
    jax.tree.map(lambda g, e: np.testing.assert_allclose(np.asarray(g), e, rtol=2e-3,
                                                         atol=0.5 * lr),
                 ts.params, expected["params"])
    jax.tree.map(lambda g, e: np.testing.assert_allclose(np.asarray(g), e, rtol=2e-3, atol=2e-5),
                 ts.batch_stats, expected["batch_stats"])


def _torch_gradients(torch, torch_model, variables, cfg, batch, features):
    """The reference's gradients of its summed loss (PyTorch autograd, batch norm in train
    mode) on `features` (B, T, F, C), as a Flax params tree: PyTorch's b_ir and b_hr (each
    with the folded bias's gradient) are added by the converter, so those are halved."""
    from converters import torch_to_flax
    from asd_jax.model import gru_bias_update_scale
    import torch_reference

    torch_model.train()
    out = torch_model(torch.tensor(features).permute(0, 3, 1, 2),
                      torch.tensor(batch["cams"])[:, None, :])
    torch_reference.asdl_loss_reference(
        out, *(torch.tensor(batch[k]) for k in ("target_coords", "pseudo_labels", "speech_activity"))
    ).backward()
    sd = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    sd.update({k: p.grad.numpy() for k, p in torch_model.named_parameters()})
    expected = torch_to_flax.convert(sd, **cfg)["params"]
    halve = gru_bias_update_scale(variables["params"])
    return jax.tree.map(lambda e, s: e / np.asarray(s), expected, halve)


def test_gradients_match_pytorch_autograd():
    """The summed loss's gradient w.r.t. every parameter (batch norm in train mode) against
    PyTorch's autograd of the reference model and loss: within 2e-5 of each leaf's largest."""
    from asd_jax.training.loss import asdl_loss

    torch, torch_model, model, variables, cfg = _tiny_torch_and_flax()
    batch = _random_batch(np.random.default_rng(2), 4, 64, 32, 3)

    def loss_fn(params):
        outputs, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                 batch["features"], batch["cams"], train=True,
                                 mutable=["batch_stats"])
        return asdl_loss(outputs, batch["target_coords"], batch["pseudo_labels"],
                         batch["speech_activity"])

    grads = jax.jit(jax.grad(loss_fn))(jax.tree.map(jnp.asarray, variables["params"]))
    expected = _torch_gradients(torch, torch_model, variables, cfg, batch, batch["features"])
    jax.tree.map(lambda g, e: np.testing.assert_allclose(
        np.asarray(g), e, atol=2e-5 * float(np.abs(e).max())), grads, expected)


def test_train_step_applies_the_gradient_of_the_summed_loss():
    """With plain SGD of rate 1, train_step's parameter change is minus the gradient it applies:
    that of the reference's loss summed over the batch (not its mean over the examples), from
    PyTorch's autograd on the reference model (batch norm in train mode, scaler applied)."""
    import optax
    from asd_jax import scaler as scaler_lib
    from asd_jax.training import state as state_lib, steps

    torch, torch_model, model, variables, cfg = _tiny_torch_and_flax(seed=4)
    rng = np.random.default_rng(5)
    batch = _random_batch(rng, 4, 64, 32, 3)
    mean = rng.normal(size=(32, 3)).astype(np.float32)
    std = rng.uniform(0.5, 2.0, size=(32, 3)).astype(np.float32)
    tx = optax.sgd(1.0)
    ts = state_lib.create_train_state(jax.random.PRNGKey(0), jax.tree.map(jnp.asarray, variables), tx)
    ts, _ = jax.jit(functools.partial(steps.train_step, model=model, tx=tx))(
        ts, batch, scaler_lib.Scaler(mean, std))
    minus_grads = jax.tree.map(lambda new, old: np.asarray(old, np.float64) - np.asarray(new, np.float64),
                               ts.params, variables["params"])
    expected = _torch_gradients(torch, torch_model, variables, cfg, batch,
                                (batch["features"] - mean) / std)
    jax.tree.map(lambda g, e: np.testing.assert_allclose(
        g, e, atol=1e-4 * float(np.abs(e).max()) + 1e-6), minus_grads, expected)


def test_gradients_are_materialised_before_adam_on_gpus_only():
    """The optimization barrier of train_step is staged out for CUDA/ROCm lowering, not for CPU."""
    from asd_jax import scaler as scaler_lib
    from asd_jax.model import gru_bias_update_scale
    from asd_jax.training import state as state_lib, steps

    _, _, model, variables, _ = _tiny_torch_and_flax()
    tx = state_lib.create_optimizer(1e-3, gru_bias_update_scale(variables["params"]))
    ts = state_lib.create_train_state(jax.random.PRNGKey(0), jax.tree.map(jnp.asarray, variables), tx)
    scaler = scaler_lib.Scaler(np.zeros((32, 3), np.float32), np.ones((32, 3), np.float32))
    batch = _random_batch(np.random.default_rng(0), 2, 64, 32, 3)
    traced = jax.jit(functools.partial(steps.train_step, model=model, tx=tx)).trace(ts, batch, scaler)
    for platform, expected in (("cpu", False), ("cuda", True), ("rocm", True)):
        text = traced.lower(lowering_platforms=(platform,)).as_text()
        assert ("optimization_barrier" in text) == expected, platform


def test_eval_step_and_predict_use_running_statistics():
    from asd_jax import scaler as scaler_lib
    from asd_jax.training import state as state_lib, steps

    torch, torch_model, model, variables, _ = _tiny_torch_and_flax(seed=3)
    rng = np.random.default_rng(2)
    batch = _random_batch(rng, 3, 64, 32, 3)
    # A scaler that is not the identity: both steps must normalise, (x - mean) / std, first.
    mean = rng.normal(size=(32, 3)).astype(np.float32)
    std = rng.uniform(0.5, 2.0, size=(32, 3)).astype(np.float32)
    scaler = scaler_lib.Scaler(mean, std)
    tx = state_lib.create_optimizer(1e-3)
    ts = state_lib.create_train_state(jax.random.PRNGKey(0), jax.tree.map(jnp.asarray, variables), tx)
    metrics = jax.jit(functools.partial(steps.eval_step, model=model))(ts, batch, scaler)
    torch_model.eval()
    with torch.no_grad():
        normalised = (torch.tensor(batch["features"]) - torch.tensor(mean)) / torch.tensor(std)
        out = torch_model(normalised.permute(0, 3, 1, 2), torch.tensor(batch["cams"])[:, None, :]).numpy()
    expected = _looped_loss(out, batch["target_coords"], batch["pseudo_labels"], batch["speech_activity"])
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-4)
    outputs = jax.jit(functools.partial(steps.predict, model=model))(
        ts.variables, batch["features"], batch["cams"], scaler)
    np.testing.assert_allclose(np.asarray(outputs), out, atol=1e-5)


class _PoisonedSource:
    """In-memory ChunkSource whose labels turn `poison` (NaN, or inf: an infinite loss) after
    `good_loads` calls of `load`.

    (NaN labels, not NaN features: XLA's CPU ReLU may map NaN to 0, hiding NaN inputs.)"""

    def __init__(self, n=16, good_loads=2, seed=0, poison=np.nan):
        self._poison = poison
        rng = np.random.default_rng(seed)
        # One sequence per example: the names in the error then say which 8 examples it was.
        self.sequences = np.array([f"seq{i:02d}" for i in range(n)])
        self.feature_groups = np.arange(n)
        self.num_channels = 16
        self._features = rng.normal(size=(n, 960, 64, 16)).astype(np.float32)
        self._batch = _random_batch(rng, n, 960, 1, 1)
        self._good_loads, self.loads = good_loads, 0

    def __len__(self):
        return len(self.sequences)

    def load(self, indices):
        self.loads += 1
        batch = {k: v[indices] for k, v in self._batch.items() if k != "features"}
        batch["features"] = self._features[indices].copy()
        if self.loads > self._good_loads:
            batch["speech_activity"] = batch["speech_activity"].copy()
            batch["speech_activity"][0, 5] = self._poison
        return batch


@pytest.mark.slow
@pytest.mark.parametrize("poison", [np.nan, np.inf])
def test_non_finite_loss_stops_training_and_names_the_culprit(tmp_path, poison):
    from asd_jax import scaler as scaler_lib
    from asd_jax.training import loop

    source = _PoisonedSource(poison=poison)
    config = configs.tiny().replace(
        data_root="unused", batch_size=8, num_epochs=3, prefetch=0, cache_features=False,
        model={"conv_features": (4, 4, 4, 4), "gru_hidden": 4, "gru_layers": 1, "fc1_features": 4,
               "num_cameras": 11, "pooling": "avg"})
    # A scaler file in the workdir is used as is (no scaler pass, so the load count is the batches').
    tmp_path.mkdir(exist_ok=True)
    scaler_lib.save_scaler(tmp_path / "feature_scaler.h5", scaler_lib.Scaler(
        np.zeros((64, 16), np.float32), np.ones((64, 16), np.float32)))
    with pytest.raises(loop.NonFiniteLossError) as info:
        loop.train_and_evaluate(config, tmp_path, source=source)
    message = str(info.value)
    # Epoch 1 = steps 1-2 (good), its checkpoint is step 2; step 3 is the first bad batch.
    assert f"loss is {poison} at step 3 (epoch 2, batch 0)" in message
    order = __import__("asd_jax.data.pipeline", fromlist=["x"]).epoch_permutation(config.seed, 2, 16)
    names = sorted(set(source.sequences[order[:8]]))
    assert len(names) == 8 and f"the batch holds chunks of {', '.join(names)};" in message
    assert str(tmp_path / "checkpoints" / "2") in message
    assert not (tmp_path / "model").exists()


_DATA_PARALLEL_SCRIPT = r"""
import functools, sys
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, "tests")
from test_training import _random_batch
from asd_jax import model as model_lib, scaler as scaler_lib
from asd_jax.training import configs, loop, state as state_lib, steps
from jax.sharding import NamedSharding, PartitionSpec

assert jax.device_count() == 8, jax.devices()
model = model_lib.CRNN.from_config({"conv_features": (4, 4, 8, 8), "gru_hidden": 4, "gru_layers": 1,
                                    "fc1_features": 4, "num_cameras": 11, "pooling": "avg"})
variables = jax.device_get(model_lib.init_variables(jax.random.PRNGKey(0), model, 3))
tx = state_lib.create_optimizer(1e-2, model_lib.gru_bias_update_scale(variables["params"]))
scaler = scaler_lib.Scaler(np.zeros((32, 3), np.float32), np.ones((32, 3), np.float32))
batches = [_random_batch(np.random.default_rng(i), 16, 64, 32, 3) for i in range(3)]

def run(mesh):
    replicated = NamedSharding(mesh, PartitionSpec())
    state = jax.device_put(state_lib.create_train_state(jax.random.PRNGKey(1), variables, tx), replicated)
    fn = jax.jit(functools.partial(steps.train_step, model=model, tx=tx), donate_argnums=0,
                 out_shardings=replicated)
    losses = []
    for batch in batches:
        sharded = loop._shard_batch(batch, mesh, 16)
        if mesh.size > 1:
            assert len(sharded["features"].sharding.device_set) == 8
        state, metrics = fn(state, sharded, jax.device_put(scaler, replicated))
        losses.append(float(metrics["loss"]))
    return jax.device_get(state), losses

single, single_losses = run(loop.make_mesh(jax.devices()[:1]))
multi, multi_losses = run(loop.make_mesh())
np.testing.assert_allclose(multi_losses, single_losses, rtol=1e-5)
for a, b in zip(jax.tree.leaves((multi.params, multi.batch_stats)),
                jax.tree.leaves((single.params, single.batch_stats))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

# Validation of 13 examples in batches of 6: on 8 devices the batches become 8 + 8, the second
# padded with 3 masked copies; the mean loss equals one device's (6 + 6 + 1) and the plain sum.
class Memory:
    data = _random_batch(np.random.default_rng(7), 13, 64, 32, 3)
    def __len__(self):
        return 13
    def load(self, indices):
        return {k: v[np.asarray(indices)] for k, v in self.data.items()}

def evaluate(mesh):
    replicated = NamedSharding(mesh, PartitionSpec())
    fn = jax.jit(functools.partial(steps.eval_step, model=model), out_shardings=replicated)
    return loop._evaluate(Memory(), np.arange(13), configs.tiny().replace(batch_size=6, prefetch=0), fn,
                          jax.device_put(single, replicated), jax.device_put(scaler, replicated), mesh)

plain = steps.eval_step(single, Memory.data, scaler, model=model)
assert int(plain["num_examples"]) == 13
np.testing.assert_allclose(evaluate(loop.make_mesh(jax.devices()[:1])), float(plain["loss"]) / 13, rtol=1e-6)
np.testing.assert_allclose(evaluate(loop.make_mesh()), float(plain["loss"]) / 13, rtol=1e-6)
print("OK")
"""


@pytest.mark.slow
def test_data_parallel_steps_equal_single_device():
    """Three train steps with the batch sharded over 8 (host) devices equal one device's
    (batch-norm statistics and gradients over the global batch); so does a validation pass
    whose batches are padded to a multiple of the 8 devices."""
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", _DATA_PARALLEL_SCRIPT], cwd=root, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


MICRO_MODEL = {"conv_features": (4, 4, 8, 8), "gru_hidden": 4, "gru_layers": 1,
               "fc1_features": 4, "num_cameras": 11, "pooling": "avg"}


class _MemorySource:
    """In-memory ChunkSource: `n` examples of (frames, 64, 16) features over `num_sequences`
    sequences (labels for frames // 16 output frames)."""

    def __init__(self, n=24, frames=160, num_sequences=4, seed=0):
        self.sequences = np.array([f"seq{i % num_sequences}" for i in range(n)])
        self.feature_groups = np.arange(n)
        self.num_channels = 16
        self.data = _random_batch(np.random.default_rng(seed), n, frames, 64, 16)

    def __len__(self):
        return len(self.sequences)

    def load(self, indices):
        return {k: v[np.asarray(indices)] for k, v in self.data.items()}


def test_batch_split_over_devices_is_checked_up_front(caplog):
    from asd_jax.training import loop

    config = configs.tiny().replace(batch_size=12)
    loop.check_batch_split(config, 48, 4, 2)  # 12 = 3 x 4 devices, no remainder
    loop.check_batch_split(config, 52, 4, 2)  # a last batch of 4
    with pytest.raises(ValueError, match=r"batch_size 12 does not split over the 8 devices of 2 processes"):
        loop.check_batch_split(config, 48, 8, 2)
    with pytest.raises(ValueError, match=r"last batch of every epoch holds 6 of the 54 training examples "
                                         r"\(batch_size 12\), which do not split over the 4 devices.*"
                                         r"drop_last=True \(in a new workdir"):
        loop.check_batch_split(config, 54, 4, 2)
    loop.check_batch_split(config.replace(drop_last=True), 54, 4, 2)
    # One process: a batch size that does not divide is replicated on every device (correct but
    # not data parallel), which is worth a warning; a partial last batch alone is not.
    with caplog.at_level("WARNING"):
        loop.check_batch_split(config, 54, 4, 1)
        assert not caplog.records
        loop.check_batch_split(config, 48, 8, 1)
    assert "batch_size 12 is not a multiple of the 8 devices: every batch is replicated" in caplog.text


def test_the_workdir_scaler_records_its_features_and_one_of_other_features_is_refused(tmp_path):
    import h5py
    from asd_jax import scaler as scaler_lib
    from asd_jax.training import loop

    path = tmp_path / "feature_scaler.h5"
    computed = loop._compute_scaler(path, _MemorySource(n=4), np.arange(4), "salsa_lite")
    with h5py.File(path, "r") as f:
        assert dict(f.attrs) == {"features": "salsa_lite"}
    np.testing.assert_array_equal(loop._load_scaler(path, 16, "salsa_lite").std, computed.std)
    with pytest.raises(ValueError, match=rf"feature scaler {path} was computed from 'salsa_lite' features, "
                                         r"but 'gcc_phat' features are used here"):
        loop._load_scaler(path, 16, "gcc_phat")
    scaler_lib.save_scaler(path, computed)  # a file that records no features (an older asd-jax's)
    assert loop._load_scaler(path, 16, "gcc_phat") is not None


def test_bad_inputs_are_refused_before_anything_is_written(tmp_path):
    from asd_jax import scaler as scaler_lib
    from asd_jax.training import loop

    config = configs.tiny().replace(data_root="unused", model=dict(MICRO_MODEL), num_epochs=1,
                                    cache_features=False)
    workdir = tmp_path / "run"
    workdir.mkdir()
    scaler_path = workdir / "feature_scaler.h5"  # left by a run of 3-channel features
    scaler_lib.save_scaler(scaler_path, scaler_lib.Scaler(np.zeros((64, 3), np.float32),
                                                          np.ones((64, 3), np.float32)))
    with pytest.raises(ValueError, match=rf"{scaler_path} holds a scaler of 3 feature channels, but the "
                                         r"config's features have 16"):
        loop.train_and_evaluate(config, workdir, source=_MemorySource())
    assert sorted(p.name for p in workdir.iterdir()) == ["feature_scaler.h5"]

    source = _MemorySource()
    source.num_channels = 121
    with pytest.raises(ValueError, match=r"the training data has 121 feature channels"):
        loop.train_and_evaluate(config, tmp_path / "new", source=source)
    assert not (tmp_path / "new").exists()


def test_a_workdir_resumes_on_its_own_data_only(tmp_path):
    """The data may move (data_root and hdf5_dir may change on resume) but not change: other
    examples would silently continue the run on other batches."""
    import hashlib
    import json

    from asd_jax.training import loop

    config = configs.tiny().replace(data_root="unused", model=dict(MICRO_MODEL), num_epochs=1,
                                    batch_size=12, cache_features=False, checkpoint_every_steps=0)
    workdir = tmp_path / "run"
    loop.train_and_evaluate(config, workdir, source=_MemorySource())
    recorded = json.loads((workdir / constants.CONFIG_FILE).read_text())["training_data"]
    names = "\n".join(f"seq{i % 4}" for i in range(24))
    assert recorded == {"examples": 24, "sequences": 4,
                        "sha256": hashlib.sha256(names.encode()).hexdigest()}
    before = sorted((p, p.stat().st_mtime_ns) for p in workdir.rglob("*"))
    for other in (_MemorySource(n=36, num_sequences=6), _MemorySource(n=24, num_sequences=3)):
        with pytest.raises(ValueError, match=r"describes a run on other training data: 24 examples of 4 "
                                             r"sequences \(sha256 [0-9a-f]{12}\) there, \d+ examples of \d "
                                             r"sequences .* now .*; use the same data or a new workdir"):
            loop.train_and_evaluate(config.replace(num_epochs=2, data_root="moved"), workdir, source=other)
    assert sorted((p, p.stat().st_mtime_ns) for p in workdir.rglob("*")) == before
    state = loop.train_and_evaluate(config.replace(num_epochs=2, data_root="moved"), workdir,
                                    source=_MemorySource(seed=1))  # the same examples, moved
    assert int(state.epoch) == 2


def test_a_workdir_with_a_damaged_log_or_lost_config_is_refused_before_writing(tmp_path):
    """A metrics.jsonl line that is not a row was a bare JSON error after config.json had been
    rewritten; checkpoints whose config.json is gone resumed under whatever recipe was given; a
    file named `checkpoints` failed at the first save, an epoch in."""
    import json
    import re

    from asd_jax.training import loop

    config = configs.tiny().replace(data_root="unused", model=dict(MICRO_MODEL), num_epochs=1,
                                    batch_size=12, cache_features=False, checkpoint_every_steps=0)
    workdir = tmp_path / "run"
    loop.train_and_evaluate(config, workdir, source=_MemorySource())
    metrics = workdir / constants.METRICS_FILE
    good = metrics.read_text()
    resumed = config.replace(num_epochs=2)

    def refused(error, match, directory=workdir):
        before = sorted((p, p.stat().st_mtime_ns) for p in directory.rglob("*"))
        with pytest.raises(error, match=match):
            loop.train_and_evaluate(resumed, directory, source=_MemorySource())
        assert sorted((p, p.stat().st_mtime_ns) for p in directory.rglob("*")) == before

    for damaged, shown in ((good[:30] + "\n", re.escape(good[:30])), ('{"train_loss": 1.0}\n', "train_loss"),
                           ('\n{"epoch": "1"}\n', '"1"')):
        metrics.write_text(damaged)
        line = 2 if damaged.startswith("\n") else 1
        refused(ValueError, rf"{metrics}:{line}: .*{shown}.* is not one JSON object per line, each "
                            r'with an integer "epoch" \(the training log; move it away')
    metrics.write_text(good)
    config_json = workdir / constants.CONFIG_FILE
    kept = config_json.read_text()
    config_json.unlink()
    refused(ValueError, rf"{workdir / 'checkpoints'} holds checkpoints but {workdir} has no "
                        r"config.json: the run they belong to .* is unknown")
    config_json.write_text(kept)
    assert int(loop.train_and_evaluate(resumed, workdir, source=_MemorySource()).epoch) == 2
    assert [json.loads(row)["epoch"] for row in metrics.read_text().splitlines()] == [1, 2]

    other = tmp_path / "other"
    other.mkdir()
    (other / "checkpoints").write_text("")
    refused(NotADirectoryError, r"is not a directory; the run keeps its checkpoints there", other)


def test_starting_config_of_the_train_binary(tmp_path):
    """--config_json, else the workdir's config.json unless a preset is named, else the preset;
    a 5-fold run's config means --fold all (it started a single run from --config_json)."""
    import json

    single, folds = tmp_path / "single", tmp_path / "cv"
    for workdir, extra in ((single, {}), (folds, {"cross_validation": True})):
        workdir.mkdir()
        (workdir / "config.json").write_text(json.dumps(
            {**configs.tiny().replace(learning_rate=0.25).to_dict(), **extra}))
    fresh = tmp_path / "fresh"
    assert configs.starting_config(fresh, None, None) == (configs.paper_gcc(), None)
    assert configs.starting_config(fresh, None, "tiny", fold="2") == (configs.tiny(), "2")
    assert configs.starting_config(single, None, "tiny") == (configs.tiny(), None)  # a named preset wins
    resumed = configs.tiny().replace(learning_rate=0.25)
    assert configs.starting_config(single, None, None) == (resumed, None)
    assert configs.starting_config(folds, None, None) == (resumed, "all")
    assert configs.starting_config(fresh, folds / "config.json", None) == (resumed, "all")
    assert configs.starting_config(fresh, folds / "config.json", None, fold="3") == (resumed, "3")
    assert configs.starting_config(folds, single / "config.json", None) == (resumed, None)
    # A preset beside a config file was silently dropped (the file won): refused now.
    with pytest.raises(ValueError, match=r"both a preset \('tiny'\) and a config file \(.*single/"
                                         r"config.json\) were given; .*give one of them"):
        configs.starting_config(fresh, single / "config.json", "tiny")


@pytest.mark.parametrize("store_file", ["development_dataset.h5", "development_dataset.h5.partial"])
def test_a_feature_store_given_as_workdir_is_refused_untouched(tmp_path, store_file):
    """--workdir and --hdf5_dir swapped: the run took the store's folder over and replaced its
    feature_scaler.h5 (the store's record of its features, condition and index went with it)."""
    from asd_jax.training import crossval, loop

    config = configs.tiny().replace(data_root="unused", model=dict(MICRO_MODEL), num_epochs=1,
                                    batch_size=12, cache_features=False, checkpoint_every_steps=0)
    folder = tmp_path / "store"
    folder.mkdir()
    (folder / store_file).write_bytes(b"a store")
    (folder / "feature_scaler.h5").write_bytes(b"the store's scaler")
    for run in (lambda: loop.train_and_evaluate(config, folder, source=_MemorySource()),
                lambda: crossval.cross_validate(config.replace(num_folds=2), folder,
                                                source=_MemorySource())):
        with pytest.raises(ValueError, match=rf"{folder} holds a feature store \({store_file}\), "
                                             r"not a training run: give it as --hdf5_dir"):
            run()
    assert sorted(p.name for p in folder.iterdir()) == sorted([store_file, "feature_scaler.h5"])
    assert (folder / "feature_scaler.h5").read_bytes() == b"the store's scaler"


def test_a_run_resumed_from_a_store_alone_keeps_its_recorded_data_root(tmp_path):
    """Trained on the fly from a data root, resumed with only a store: config.json kept the data
    root (forward and predict default to it; it was rewritten as null)."""
    import dataclasses
    import json

    from asd_jax.training import loop

    config = configs.tiny().replace(data_root="/data/synth", model=dict(MICRO_MODEL), num_epochs=1,
                                    batch_size=12, cache_features=False, checkpoint_every_steps=0)
    workdir = tmp_path / "run"
    loop.train_and_evaluate(config, workdir, source=_MemorySource())
    resumed = dataclasses.replace(config, data_root=None, hdf5_dir="/data/store", num_epochs=2)
    state = loop.train_and_evaluate(resumed, workdir, source=_MemorySource())
    assert int(state.epoch) == 2
    written = json.loads((workdir / constants.CONFIG_FILE).read_text())
    assert (written["data_root"], written["hdf5_dir"]) == ("/data/synth", "/data/store")


def test_a_cross_validation_resumed_from_a_store_alone_keeps_its_recorded_data_root(tmp_path,
                                                                                   monkeypatch):
    """The top-level config.json of a cross-validation run too (its folds are runs of their own)."""
    import dataclasses
    import json

    from asd_jax.training import crossval, loop

    def fake_train(config, workdir, source=None):  # what a fold's train_and_evaluate leaves
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / constants.CONFIG_FILE).write_text(json.dumps({**config.to_dict(), "in_channels": 16}))
        (workdir / constants.METRICS_FILE).write_text(
            json.dumps({"epoch": 1, "train_loss": 1.0, "validation_loss": 2.0}) + "\n")

    monkeypatch.setattr(loop, "train_and_evaluate", fake_train)
    source = types.SimpleNamespace(sequences=np.array(["s1_t1", "s2_t1", "s3_t1", "s4_t1"]))
    config = configs.tiny().replace(data_root="/data/synth", num_epochs=1, num_folds=2)
    workdir = tmp_path / "cv"
    crossval.cross_validate(config, workdir, source=source)
    resumed = dataclasses.replace(config, data_root=None, hdf5_dir="/data/store")
    crossval.cross_validate(resumed, workdir, source=source)
    written = json.loads((workdir / constants.CONFIG_FILE).read_text())
    assert (written["data_root"], written["hdf5_dir"]) == ("/data/synth", "/data/store")


def test_a_workdir_in_use_by_another_run_is_refused_before_writing(tmp_path):
    """Two runs started on one workdir used to both train in it; the second one now stops before
    reading or writing it, naming the first, and the lock goes when its holder lets it go. The
    same for a cross-validation workdir, whose folds are workdirs of their own."""
    import os

    from asd_jax.training import crossval, loop

    config = configs.tiny().replace(data_root="unused", model=dict(MICRO_MODEL), num_epochs=1,
                                    batch_size=12, cache_features=False, checkpoint_every_steps=0)
    workdir = tmp_path / "run"
    workdir.mkdir()
    # As a run in another process holds it: flock is per open file, so a second open conflicts.
    with loop.WorkdirLock(workdir) as held:
        held.record_holder()
        assert (workdir / loop.LOCK_FILE).read_text().startswith(f"pid {os.getpid()} on ")
        with pytest.raises(loop.WorkdirBusyError, match=rf"{workdir} is in use by another training run "
                                                        rf"\(pid {os.getpid()} on .+, since .+\): wait"):
            loop.train_and_evaluate(config, workdir, source=_MemorySource())
        with pytest.raises(loop.WorkdirBusyError, match=rf"{workdir} is in use by another training run"):
            crossval.cross_validate(config.replace(num_folds=2), workdir, source=_MemorySource())
        assert [p.name for p in workdir.iterdir()] == [loop.LOCK_FILE]
    state = loop.train_and_evaluate(config, workdir, source=_MemorySource())
    assert int(state.epoch) == 1 and (workdir / "model").is_dir()
    with loop.WorkdirLock(workdir):  # released by the run: free again
        pass


@pytest.mark.slow
def test_fold_run_end_to_end(tmp_path, caplog):
    """train_and_evaluate with `fold` set, on tiny data: the validation loss logged for the epoch
    is the mean loss of the exported model over the held-out sequences; run again from its
    config.json, the finished run is exported again, not trained further.

    The logged train loss (SPEC section 7) is the batch's summed loss (all examples, all frames)
    divided by its examples: at lr 1e-30 Adam leaves the parameters as they were, so the exported
    model in training mode (batch statistics) on the epoch's one batch gives that loss. Both
    expected losses come from the PyTorch reference model loaded with the exported weights and the
    looped loss, on features normalised in numpy."""
    import json

    import torch_reference
    from asd_jax import checkpointing
    from asd_jax.training import loop

    source = _MemorySource()  # 24 examples of 4 sequences: 12 train + 12 validation for 2 folds
    config = configs.tiny().replace(data_root="unused", model=dict(MICRO_MODEL), num_epochs=1,
                                    batch_size=12, fold=1, num_folds=2, cache_features=False,
                                    checkpoint_every_steps=0, learning_rate=1e-30)
    workdir = tmp_path / "fold_1"
    loop.train_and_evaluate(config, workdir, source=source)
    rows = [json.loads(line) for line in (workdir / constants.METRICS_FILE).read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1] and np.isfinite(rows[0]["train_loss"])

    train_idx, val_idx = loop.split_indices(source.sequences, config)
    assert len(val_idx) == len(train_idx) == 12
    assert not set(source.sequences[val_idx]) & set(source.sequences[train_idx])
    variables, model_config, scaler = checkpointing.load_model(workdir)
    mean, std = np.asarray(scaler.mean), np.asarray(scaler.std)
    for indices, train, key in ((train_idx, True, "train_loss"), (val_idx, False, "validation_loss")):
        batch = source.load(indices)
        outputs = torch_reference.outputs_with_flax_weights(variables, (batch["features"] - mean) / std,
                                                            batch["cams"], train, model_config["model"]["pooling"])
        expected = _looped_loss(outputs, batch["target_coords"], batch["pseudo_labels"],
                                batch["speech_activity"]) / len(indices)
        assert rows[0][key] == pytest.approx(expected, rel=1e-5), key

    loaded = []  # a finished run reads no data again: no feature cache is filled, no scaler pass
    load = source.load
    source.load = lambda indices: loaded.append(indices) or load(indices)
    with caplog.at_level("INFO"):
        again = loop.train_and_evaluate(configs.TrainConfig.from_json(workdir / constants.CONFIG_FILE),
                                        workdir, source=loop.CachedSource(source))
    assert "checkpoints/1: the run has finished its 1 epochs; exporting its model to" in caplog.text
    assert loaded == []
    assert int(again.step) == 1 and int(again.epoch) == 1  # epochs completed
    assert [json.loads(line) for line in (workdir / constants.METRICS_FILE).read_text().splitlines()] == rows


def test_an_epoch_ends_with_its_partial_batch_unless_drop_last():
    """PyTorch's DataLoader default (drop_last=False), which the reference's loader keeps:
    consecutive slices of batch_size examples, the last one shorter; with drop_last the short
    one is left out."""
    from asd_jax.training import loop

    for n, size in ((10, 4), (12, 4), (3, 8), (33, 16)):
        slices = [len(range(n)[i:i + size]) for i in range(0, n, size)]
        full = [s for s in slices if s == size]
        assert loop._batch_sizes(n, size, drop_last=False) == slices, (n, size)
        assert loop._num_batches(n, size, drop_last=False) == len(slices), (n, size)
        assert loop._batch_sizes(n, size, drop_last=True) == full, (n, size)
        assert loop._num_batches(n, size, drop_last=True) == len(full), (n, size)


def test_split_indices_validate_on_the_fold_sequences():
    """Fold k validates on the k-th group of len // num_folds names of the sorted names shuffled
    by Python's `random.Random(seed).shuffle` (the reference's split, SPEC section 7) and trains
    on every other chunk; fold None trains on everything."""
    import random

    from asd_jax.training import loop

    sequences = np.array([f"seq{i % 7}" for i in range(35)])
    names = sorted(set(sequences.tolist()))
    config = configs.tiny().replace(num_folds=3)
    random.Random(config.seed).shuffle(names)
    for k in range(3):
        train, val = loop.split_indices(sequences, config.replace(fold=k))
        assert set(sequences[val].tolist()) == set(names[2 * k:2 * k + 2]), k
        assert not set(sequences[train].tolist()) & set(names[2 * k:2 * k + 2])
        np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(35))
    train, val = loop.split_indices(sequences, config)
    np.testing.assert_array_equal(train, np.arange(35))
    assert val.size == 0


def test_a_run_stopped_between_its_metrics_row_and_checkpoint_logs_each_epoch_once(tmp_path,
                                                                                  monkeypatch):
    """Epoch 1's metrics row is written, then the run stops before its checkpoint: the resumed
    run redoes epoch 1 and replaces that row, so metrics.jsonl lists epochs 1 and 2 once each."""
    import json

    from asd_jax.training import checkpoints, loop

    class Stop(Exception):
        pass

    def stop_at_first_save(*args, **kwargs):
        raise Stop()

    config = configs.tiny().replace(data_root="unused", model=dict(MICRO_MODEL), num_epochs=2,
                                    batch_size=12, cache_features=False, checkpoint_every_steps=0)
    with monkeypatch.context() as m:
        m.setattr(checkpoints, "save", stop_at_first_save)
        with pytest.raises(Stop):
            loop.train_and_evaluate(config, tmp_path, source=_MemorySource())
    rows = [json.loads(line) for line in (tmp_path / constants.METRICS_FILE).read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1]  # written before the checkpoint that never came
    loop.train_and_evaluate(config, tmp_path, source=_MemorySource())
    rows = [json.loads(line) for line in (tmp_path / constants.METRICS_FILE).read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]


def test_mid_epoch_checkpoints_leave_the_epoch_end_to_its_own_checkpoint(tmp_path, monkeypatch):
    """Checkpoints every `checkpoint_every_steps` steps inside an epoch and one at its end: a
    step that ends an epoch is saved once, with the next epoch's position (epoch + 1, batch 0)."""
    from asd_jax.training import checkpoints, loop

    saved, real_save = [], checkpoints.save

    def recording_save(manager, state, position):
        saved.append((int(state.step), position["epoch"], position["batch"]))
        return real_save(manager, state, position)

    monkeypatch.setattr(checkpoints, "save", recording_save)
    config = configs.tiny().replace(data_root="unused", model=dict(MICRO_MODEL), num_epochs=1,
                                    batch_size=12, cache_features=False, checkpoint_every_steps=1)
    loop.train_and_evaluate(config, tmp_path, source=_MemorySource())  # 24 examples: 2 steps
    assert saved == [(1, 1, 1), (2, 2, 0)]


def test_cross_validation_checks_every_folds_batches_before_the_first_trains(tmp_path, monkeypatch):
    """With several processes, a fold whose last training batch does not split over the devices
    is refused up front, named, before anything is written; found at that fold's start, it came
    after the earlier folds had trained."""
    import jax

    from asd_jax.training import crossval, folds, loop

    trained = []
    monkeypatch.setattr(loop, "train_and_evaluate", lambda config, *a, **k: trained.append(config.fold))
    # As process 0 of 2 sees it (the workdir lock, not patched, still runs as one process).
    monkeypatch.setattr(crossval, "jax", types.SimpleNamespace(process_count=lambda: 2,
                                                               process_index=jax.process_index))
    monkeypatch.setattr(loop, "make_mesh", lambda: types.SimpleNamespace(size=4))  # 2 x 2 devices
    # 10 chunks of seqA, 8 of each other: a fold training on seqA has 18 (a last batch of 2 at
    # batch_size 8, not a multiple of 4 devices); the fold validating on seqA trains on 16.
    sequences = np.array(["seqA"] * 10 + ["seqB"] * 8 + ["seqC"] * 8 + ["seqD"] * 8)
    config = configs.tiny().replace(data_root="/data", num_folds=2, batch_size=8, seed=3)
    split = folds.cross_validation_folds(sequences.tolist(), 2, 3)
    bad = next(k for k, fold in enumerate(split) if "seqA" not in fold.validation)
    workdir = tmp_path / "cv"
    with pytest.raises(ValueError, match=rf"cross-validation fold {bad}: the last batch of every "
                                         r"epoch holds 2 of the 18 training examples"):
        crossval.cross_validate(config, workdir, source=types.SimpleNamespace(sequences=sequences))
    assert not workdir.exists() and trained == []
    crossval._check_batch_splits(config.replace(drop_last=True), sequences)  # the way out it names


def test_cross_validation_writes_its_config_and_curves_and_resumes(tmp_path, monkeypatch):
    """cross_validate's own files (the folds' training is train_and_evaluate's, stubbed here):
    fold-averaged curves written atomically, and a top-level config.json that resumes the run
    and keeps single runs out."""
    import json

    from asd_jax.training import crossval, loop

    trained = []

    def fake_train(config, workdir, source=None):  # what train_and_evaluate leaves behind
        loop.check_same_run(workdir / constants.CONFIG_FILE, {**config.to_dict(), "in_channels": 16})
        trained.append(config.fold)
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / constants.CONFIG_FILE).write_text(json.dumps({**config.to_dict(), "in_channels": 16}))
        rows = [{"epoch": e, "train_loss": 10.0 * config.fold + e, "validation_loss": 20.0 * config.fold - e}
                for e in (1, 2)]
        (workdir / constants.METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))

    monkeypatch.setattr(loop, "train_and_evaluate", fake_train)
    config = configs.tiny().replace(data_root="/data", num_epochs=2, num_folds=3)
    workdir = tmp_path / "cv"
    source = types.SimpleNamespace(sequences=np.array(["s1_t1", "s2_t1", "s3_t1", "s4_t1"]))
    # Too few sequences for the folds: refused before the workdir is written.
    with pytest.raises(ValueError, match="2 sequences cannot make 3 non-empty folds"):
        crossval.cross_validate(config, workdir, source=types.SimpleNamespace(sequences=["a", "b"]))
    assert not workdir.exists()
    # any fold given: all are run
    curves = crossval.cross_validate(config.replace(fold=1), workdir, source=source)
    assert trained == [0, 1, 2] and curves["epochs"] == [1, 2]
    assert curves["train_loss"]["mean"] == [11.0, 12.0] and curves["validation_loss"]["mean"] == [19.0, 18.0]
    assert json.loads((workdir / crossval.CURVES_JSON).read_text()) == curves
    assert (workdir / crossval.CURVES_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(workdir.rglob("*.partial"))

    # The top-level config.json recreates the run: resuming needs no flag repeated.
    stored = json.loads((workdir / constants.CONFIG_FILE).read_text())
    assert stored["cross_validation"] is True and stored["fold"] is None and stored["in_channels"] == 16
    assert configs.TrainConfig.from_json(workdir / constants.CONFIG_FILE) == config
    resumed = configs.TrainConfig.from_json(workdir / constants.CONFIG_FILE)
    assert crossval.cross_validate(resumed, workdir, source=source) == curves
    # Another setting is refused once the folds have started; a single run is refused here (the
    # real train_and_evaluate), and a cross-validation in a single run's workdir.
    with pytest.raises(ValueError, match=r"describes another run: learning_rate=0.003 there, but "
                                         r"learning_rate=0.001 now"):
        crossval.cross_validate(config.replace(learning_rate=1e-3), workdir, source=source)
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"describes a cross-validation workdir .*, not a single "
                                         r"training run"):
        loop.train_and_evaluate(config.replace(model=dict(MICRO_MODEL)), workdir, source=_MemorySource())
    single = tmp_path / "single"
    single.mkdir()
    (single / constants.CONFIG_FILE).write_text(json.dumps({**config.to_dict(), "in_channels": 16}))
    with pytest.raises(ValueError, match=r"describes a single training run, not a cross-validation"):
        crossval.cross_validate(config, single, source=source)
    assert sorted(p.name for p in single.iterdir()) == [constants.CONFIG_FILE]
    # Before any fold has started (a fold refused its data, say), other settings replace it.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / constants.CONFIG_FILE).write_text(json.dumps({**stored, "batch_size": 5}))
    monkeypatch.setattr(loop, "train_and_evaluate", fake_train)
    crossval.cross_validate(config, fresh, source=source)
    assert configs.TrainConfig.from_json(fresh / constants.CONFIG_FILE) == config


def _flat(tree):
    return np.concatenate([np.ravel(x).astype(np.float64) for x in jax.tree.leaves(tree)])


def _folded_gru_rz_bias_mask(params):
    """True on the folded reset/update GRU biases [b_ir + b_hr, b_iz + b_hz] of the folded bias
    [.., .., b_in] (SPEC section 6), in `_flat` order."""
    mask = jax.tree.map(lambda x: np.zeros(np.shape(x), bool), params)
    hidden = np.shape(params["gru_l0"]["hidden_bias_n"])[-1]
    mask["gru_l0"]["bias"][:, :2 * hidden] = True
    return _flat(mask).astype(bool)


@pytest.fixture(scope="module")
def decaying_run(tmp_path_factory):
    """A default-config run (tiny() with MICRO_MODEL) of one Adam step per epoch on
    `_MemorySource(n=8, frames=64)`, with SPEC section 7's compounding decay from epoch 1 (factor
    0.5, so that 3 epochs show it), resumed epoch by epoch to keep the state after each.

    Returns (config, [state after epoch 1, 2, 3], metrics.jsonl rows, [SPEC Adam direction
    m_hat / (sqrt(v_hat) + 1e-8) of the step of epoch 1, 2, 3 from the state's moments
    (None for epoch 1)], [flat parameter change of each epoch's step (None for epoch 1)]).
    """
    import json

    import optax
    from asd_jax.training import loop

    workdir = tmp_path_factory.mktemp("decaying_run")
    source = _MemorySource(n=8, frames=64)
    config = configs.tiny().replace(
        data_root="unused", model=dict(MICRO_MODEL), batch_size=8, cache_features=False,
        checkpoint_every_steps=0, prefetch=0, lr_schedule="reference", learning_rate=1e-2,
        lr_decay_start_epoch=1, lr_decay_factor=0.5)
    states = [jax.device_get(loop.train_and_evaluate(config.replace(num_epochs=n), workdir, source=source))
              for n in (1, 2, 3)]
    rows = [json.loads(line) for line in (workdir / constants.METRICS_FILE).read_text().splitlines()]
    directions, changes = [None], [None]
    for step in (2, 3):
        state = states[step - 1]
        assert int(state.step) == step
        mu_hat = _flat(optax.tree_utils.tree_get(state.opt_state, "mu")) / (1 - 0.9 ** step)
        nu_hat = _flat(optax.tree_utils.tree_get(state.opt_state, "nu")) / (1 - 0.999 ** step)
        directions.append(mu_hat / (np.sqrt(nu_hat) + 1e-8))
        changes.append(_flat(state.params) - _flat(states[step - 2].params))
    return config, states, rows, directions, changes


def test_default_training_doubles_the_gru_reset_and_update_bias_steps(decaying_run):
    """The reference-parity quirk is on by default and in the presets, and train_and_evaluate
    applies it: in a run of the default settings, every parameter moves by -lr times SPEC's Adam
    direction, but the folded reset/update GRU biases by twice that, as the sum of PyTorch's
    b_i* and b_h* (each moved by one Adam step) does."""
    for config in (configs.TrainConfig(), configs.paper_gcc(), configs.paper_salsa(), configs.tiny()):
        assert config.double_gru_bias_updates is True
    _, states, _, directions, changes = decaying_run
    rz = _folded_gru_rz_bias_mask(states[0].params)
    for direction, change in zip(directions[1:], changes[1:]):
        large = np.abs(direction) > 0.2  # well away from 0/0
        assert (large & rz).sum() >= 8 and (large & ~rz).sum() > 100
        rate = -change[large] / direction[large]  # the step size each parameter was given
        plain = np.median(rate[~rz[large]])
        np.testing.assert_allclose(rate[~rz[large]], plain, rtol=2e-3)
        np.testing.assert_allclose(rate[rz[large]], 2 * plain, rtol=2e-3)


def test_each_epoch_trains_with_its_own_learning_rate(decaying_run):
    """SPEC section 7's compounding decay inside train_and_evaluate: the reference's loop (lr *=
    factor ** (e - start) at the start of every epoch e > start) gives lr_e, and metrics.jsonl's
    learning_rate of epoch e, the rate in the optimizer state after it and the rate epoch e's
    Adam step applied (its parameter change over SPEC's Adam direction from the state's moments;
    the doubled GRU biases left out) all equal it."""
    config, states, rows, directions, changes = decaying_run
    lr0, factor, start = config.learning_rate, config.lr_decay_factor, config.lr_decay_start_epoch
    expected, lr = [], lr0
    for epoch in range(1, 4):
        if epoch > start:
            lr *= factor ** (epoch - start)
        expected.append(lr)
    assert expected == [lr0, lr0 / 2, lr0 / 8]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    plain = ~_folded_gru_rz_bias_mask(states[0].params)
    for epoch, lr in enumerate(expected, start=1):
        assert rows[epoch - 1]["learning_rate"] == pytest.approx(lr, rel=1e-12, abs=0)
        assert float(states[epoch - 1].opt_state.hyperparams["learning_rate"]) == pytest.approx(
            lr, rel=1e-6, abs=0)
        if epoch == 1:
            continue  # no state before the first step to compare with
        large = plain & (np.abs(directions[epoch - 1]) > 0.2)
        assert large.sum() > 100
        np.testing.assert_allclose(-changes[epoch - 1][large] / directions[epoch - 1][large], lr,
                                   rtol=2e-3)


def test_training_checkpoints_keep_the_latest_and_restore_them(tmp_path):
    """asd_jax.training.checkpoints on a micro TrainState: nothing to restore before the first
    save; max_to_keep keeps the newest step directories; the latest restores whole (state and
    position) and `load_variables` reads one step directory's params and batch_stats."""
    from asd_jax import model as model_lib
    from asd_jax.training import checkpoints
    from asd_jax.training import state as state_lib

    rng = np.random.default_rng(0)
    abstract = model_lib.abstract_variables(model_lib.CRNN(**MICRO_MODEL), 16)
    variables = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), abstract)
    state = state_lib.create_train_state(jax.random.PRNGKey(0), variables, state_lib.create_optimizer(1e-3))
    abstract_state = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(
            jax.devices()[0])), state)
    manager = checkpoints.open_manager(tmp_path / "ckpt", max_to_keep=2)
    try:
        assert checkpoints.restore_latest(manager, abstract_state) is None
        for step in (1, 2, 3):
            position = {"epoch": step, "batch": 0, "loss_sum": 0.5 * step, "num_examples": 4 * step}
            last = checkpoints.save(manager, state.replace(step=jnp.asarray(step, jnp.int32)), position)
        manager.wait_until_finished()
        assert last == tmp_path / "ckpt" / "3"
        assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["2", "3"]
        restored, restored_position, step = checkpoints.restore_latest(manager, abstract_state)
    finally:
        manager.close()
    assert step == 3 and int(restored.step) == 3 and restored_position == position
    jax.tree.map(np.testing.assert_array_equal, restored.params, variables["params"])
    assert checkpoints.is_checkpoint_dir(last) and not checkpoints.is_checkpoint_dir(tmp_path / "ckpt")
    loaded = checkpoints.load_variables(last)
    jax.tree.map(np.testing.assert_array_equal, loaded, variables)
    with pytest.raises(FileNotFoundError, match=r"ckpt is not a training checkpoint: expected a state/ "
                                                r"subdirectory"):
        checkpoints.load_variables(tmp_path / "ckpt")
