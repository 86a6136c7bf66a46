"""PyTorch state_dict of the reference CRNN -> Flax variables of `asd_jax.model.CRNN`.

Mapping (SPEC section 6):
  conv_block{i}.conv{j}.weight (O, I, 3, 3)   -> params conv_block{i}/conv{j}/kernel (3, 3, I, O)
  conv_block{i}.bn{j}.weight / .bias          -> params conv_block{i}/bn{j}/scale / bias
  conv_block{i}.bn{j}.running_mean / _var     -> batch_stats conv_block{i}/bn{j}/mean / var
  conv_block{i}.bn{j}.num_batches_tracked     -> (checked, not used: momentum is fixed)
  gru_block.weight_ih_l{k}[_reverse] (3H, D)  -> params gru_l{k}/input_kernel[d] (D, 3H)
  gru_block.weight_hh_l{k}[_reverse] (3H, H)  -> params gru_l{k}/hidden_kernel[d] (H, 3H)
  gru_block.bias_ih/bias_hh_l{k}[_reverse]    -> params gru_l{k}/bias[d] = [b_ir + b_hr,
                                                 b_iz + b_hz, b_in], hidden_bias_n[d] = b_hn
  fc{1,2}.weight (out, in) / .bias            -> params fc{1,2}/kernel (in, out) / bias
with d = 0 for the forward and 1 for the `_reverse` direction.

CLI:
  python -m converters.torch_to_flax --torch_ckpt PATH --out_dir DIR \
      [--features gcc_phat|salsa_lite] [--pooling avg|max] [--scaler feature_scaler.h5] [--overwrite]
writes a model directory (`asd_jax.checkpointing.save_model`) and prints the file's git blob id.
The network's size (conv widths, GRU size and layers, fc1 width, cameras) is read from the tensor
shapes (`infer_model_config`), so checkpoints of other sizes convert too. Neither the features
nor the pooling can be read from the weights (GCC-PHAT and SALSA-Lite both have 16 input
channels): a released checkpoint (known blob id) brings its own; for any other checkpoint the
features are those whose channel count matches its first convolution when only one does (121:
gcc_phat_all), and --features is required when several do (16: gcc_phat, salsa_lite, logmel);
--pooling defaults to the paper's "avg".
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys
from typing import Any, Mapping, Sequence

import numpy as np

from asd_jax import checkpointing
from asd_jax import constants
from asd_jax import features as features_lib
from asd_jax import model as model_lib
from asd_jax import scaler as scaler_lib
from converters import torch_checkpoint
import experiments

# git blob id -> (released checkpoint, features) of SPEC section 6; both use average pooling.
RELEASED_CHECKPOINTS = {
    "58cbadf46cff1b64cfb54e9cddd8fbcd80126dcf": ("ckpt/gcc_GT_GT/0.000500/model_050.ckpt", "gcc_phat"),
    "a2a640a569b09ff4704e6a199c89684837a5e4b7": ("ckpt/salsa-lite_GT_GT/0.000070/model_050.ckpt",
                                                 "salsa_lite"),
}

# CRNN fields that fix tensor shapes (named in error messages).
_SHAPE_FIELDS = ("conv_features", "gru_hidden", "gru_layers", "fc1_features", "num_cameras")
_FIRST_CONV = "conv_block1.conv1.weight"


def _full_config(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """CRNN config with defaults filled in; only the fields that fix tensor shapes matter here."""
    config = model_lib.model_config(model_lib.CRNN.from_config(_jsonable(model_config)))
    config["conv_features"] = tuple(config["conv_features"])
    return config


def _jsonable(model_config: Mapping[str, Any]) -> dict[str, Any]:
    config = dict(model_config)
    if "dtype" in config and not isinstance(config["dtype"], str):
        config["dtype"] = np.dtype(config["dtype"]).name
    return config


def torch_shapes(in_channels: int, **model_config) -> dict[str, tuple[int, ...]]:
    """Every key of the PyTorch state_dict and its shape, in PyTorch's order."""
    cfg = _full_config(model_config)
    shapes: dict[str, tuple[int, ...]] = {}
    widths = [in_channels, *cfg["conv_features"]]
    for i in range(len(cfg["conv_features"])):
        c_in, c_out = widths[i], widths[i + 1]
        for j, c_prev in ((1, c_in), (2, c_out)):
            shapes[f"conv_block{i + 1}.conv{j}.weight"] = (c_out, c_prev, 3, 3)
            for stat in ("weight", "bias", "running_mean", "running_var"):
                shapes[f"conv_block{i + 1}.bn{j}.{stat}"] = (c_out,)
            shapes[f"conv_block{i + 1}.bn{j}.num_batches_tracked"] = ()
    h = cfg["gru_hidden"]
    for k in range(cfg["gru_layers"]):
        d_in = cfg["conv_features"][-1] if k == 0 else 2 * h
        for suffix in ("", "_reverse"):
            shapes[f"gru_block.weight_ih_l{k}{suffix}"] = (3 * h, d_in)
            shapes[f"gru_block.weight_hh_l{k}{suffix}"] = (3 * h, h)
            shapes[f"gru_block.bias_ih_l{k}{suffix}"] = (3 * h,)
            shapes[f"gru_block.bias_hh_l{k}{suffix}"] = (3 * h,)
    shapes["fc1.weight"] = (cfg["fc1_features"], 2 * h)
    shapes["fc1.bias"] = (cfg["fc1_features"],)
    shapes["fc2.weight"] = (2, cfg["fc1_features"] + cfg["num_cameras"])
    shapes["fc2.bias"] = (2,)
    return shapes


def in_channels_of(state_dict: Mapping[str, np.ndarray]) -> int:
    """Input channel count from the first conv's weight (O, I, 3, 3)."""
    weight = state_dict.get(_FIRST_CONV)
    if weight is None or np.ndim(weight) != 4:
        raise ValueError(f"state_dict has no 4-D {_FIRST_CONV!r} to take the input channel "
                         f"count from (found {None if weight is None else np.shape(weight)})")
    return int(np.shape(weight)[1])


def infer_model_config(state_dict: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The CRNN size fields (`conv_features`, `gru_hidden`, `gru_layers`, `fc1_features`,
    `num_cameras`) that the state_dict's tensor shapes imply, so that a checkpoint of another
    size than the paper's converts too. Raises ValueError naming the key when a tensor that fixes
    one of them is missing, of another rank than the CRNN's or has an empty size; the full check
    of every key and shape is `check_state_dict`'s."""
    def shape(key: str, *expected: str) -> tuple[int, ...]:
        """The shape of `key`, checked to have one positive size per name in `expected`."""
        if key not in state_dict:
            raise ValueError(f"state_dict has no {key!r}: not a checkpoint of the reference CRNN")
        found = tuple(np.shape(state_dict[key]))
        if len(found) != len(expected) or min(found, default=0) < 1:
            raise ValueError(f"state_dict {key!r} has shape {found}, expected "
                             f"({', '.join(expected)}) with positive sizes: not a checkpoint of "
                             "the reference CRNN")
        return found

    # Counts from the highest index present, so that a gap (conv_block2 missing between 1 and
    # 3) is named by check_state_dict as a missing key rather than shifting everything after it.
    blocks = _highest_index(state_dict, r"conv_block(\d+)\.", start=1)
    conv = ("out_channels", "in_channels", "3", "3")
    conv_features = tuple(shape(f"conv_block{i}.conv1.weight", *conv)[0] for i in range(1, blocks + 1))
    if not conv_features:
        shape(_FIRST_CONV, *conv)  # raises, naming it
    gru_layers = _highest_index(state_dict, r"gru_block\.\w+_l(\d+)", start=0) + 1
    gru_hidden = shape("gru_block.weight_hh_l0", "3 * gru_hidden", "gru_hidden")[-1]
    fc1_features = shape("fc1.weight", "fc1_features", "2 * gru_hidden")[0]
    fc2 = shape("fc2.weight", "2", "fc1_features + num_cameras")
    if fc2[-1] <= fc1_features:
        raise ValueError(f"state_dict 'fc2.weight' has shape {fc2}, expected (2, fc1_features + "
                         f"num_cameras) = (2, {fc1_features} + num_cameras) with num_cameras >= 1 "
                         f"(fc1.weight gives fc1_features={fc1_features})")
    return {"conv_features": conv_features, "gru_hidden": gru_hidden,
            "gru_layers": gru_layers, "fc1_features": fc1_features,
            "num_cameras": fc2[-1] - fc1_features}


def _highest_index(state_dict: Mapping[str, Any], pattern: str, start: int) -> int:
    """The largest integer that `pattern`'s group captures at the start of a key; start - 1
    where no key matches."""
    found = [int(m[1]) for key in state_dict if (m := re.match(pattern, key))]
    return max(found, default=start - 1)


def check_state_dict(state_dict: Mapping[str, np.ndarray], in_channels: int, **model_config) -> None:
    """Raises one ValueError listing every missing, unexpected and mis-shaped key; then one
    naming the tensors whose values no trained CRNN has (`check_values`)."""
    expected = torch_shapes(in_channels, **model_config)
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshaped = [f"{k}: {tuple(np.shape(state_dict[k]))}, expected {expected[k]}"
                 for k in expected if k in state_dict and tuple(np.shape(state_dict[k])) != expected[k]]
    non_float = [f"{k}: {np.asarray(v).dtype}" for k, v in state_dict.items()
                 if k in expected and not k.endswith("num_batches_tracked")
                 and not np.issubdtype(np.asarray(v).dtype, np.floating)]
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if misshaped:
        problems.append(f"mis-shaped keys [{'; '.join(misshaped)}]")
    if non_float:
        problems.append(f"non-float tensors [{'; '.join(non_float)}]")
    if problems:
        cfg = _full_config(model_config)
        raise ValueError(
            f"state_dict does not match the CRNN (in_channels={in_channels}, "
            f"{', '.join(f'{k}={v}' for k, v in cfg.items() if k in _SHAPE_FIELDS)}): "
            + "; ".join(problems))
    check_values(state_dict)


# Keys named per problem in `check_values`'s error (the rest are counted).
_KEYS_LISTED = 4


def check_values(state_dict: Mapping[str, np.ndarray]) -> None:
    """Raises ValueError naming (up to `_KEYS_LISTED` of) the float tensors with a NaN or an
    infinity (as float32, the model's dtype: a float64 beyond its range counts) and the batch
    norms' `running_var` with a negative entry.

    A diverged or damaged training run leaves such weights; converted, they would surface only
    later, as non-finite outputs of the model."""
    def listed(keys: list[str]) -> str:
        more = f" and {len(keys) - _KEYS_LISTED} more" if len(keys) > _KEYS_LISTED else ""
        return f"[{', '.join(keys[:_KEYS_LISTED])}{more}]"

    floats = {k: v for k, v in state_dict.items() if np.issubdtype(np.asarray(v).dtype, np.floating)}
    with np.errstate(over="ignore"):  # float64 -> float32 overflow: counted as infinite
        non_finite = [k for k, v in floats.items() if not np.isfinite(np.asarray(v, np.float32)).all()]
    negative = [k for k, v in floats.items()
                if k.endswith("running_var") and (np.asarray(v, np.float32) < 0).any()]
    problems = []
    if non_finite:
        problems.append(f"NaN or infinite values (as float32) in {len(non_finite)} tensor(s) "
                        f"{listed(non_finite)}")
    if negative:
        problems.append(f"negative batch-norm variances in {listed(negative)} (a variance is >= 0)")
    if problems:
        raise ValueError("state_dict holds weights no trained CRNN has, as a diverged or damaged "
                         "training run leaves them: " + "; ".join(problems))


def convert(state_dict: Mapping[str, np.ndarray], **model_config) -> dict[str, dict]:
    """Flax variables {"params", "batch_stats"} (float32 numpy arrays) from a PyTorch state_dict.

    `model_config` holds `asd_jax.model.CRNN` fields (defaults = the paper's network); the input
    channel count is read from the state_dict. Strict: see `check_state_dict` (keys, shapes,
    dtypes and values).
    """
    in_channels = in_channels_of(state_dict)
    check_state_dict(state_dict, in_channels, **model_config)
    cfg = _full_config(model_config)
    sd = {k: np.asarray(v, np.float32) for k, v in state_dict.items()
          if not k.endswith("num_batches_tracked")}
    params: dict[str, Any] = {}
    stats: dict[str, Any] = {}
    for i in range(1, len(cfg["conv_features"]) + 1):
        block_p, block_s = params.setdefault(f"conv_block{i}", {}), stats.setdefault(f"conv_block{i}", {})
        for j in (1, 2):
            pre = f"conv_block{i}"
            block_p[f"conv{j}"] = {"kernel": sd[f"{pre}.conv{j}.weight"].transpose(2, 3, 1, 0)}
            block_p[f"bn{j}"] = {"scale": sd[f"{pre}.bn{j}.weight"], "bias": sd[f"{pre}.bn{j}.bias"]}
            block_s[f"bn{j}"] = {"mean": sd[f"{pre}.bn{j}.running_mean"],
                                 "var": sd[f"{pre}.bn{j}.running_var"]}
    h = cfg["gru_hidden"]
    for k in range(cfg["gru_layers"]):
        per_dir = []
        for suffix in ("", "_reverse"):
            b_ih = sd[f"gru_block.bias_ih_l{k}{suffix}"]
            b_hh = sd[f"gru_block.bias_hh_l{k}{suffix}"]
            per_dir.append({
                "input_kernel": sd[f"gru_block.weight_ih_l{k}{suffix}"].T,
                "hidden_kernel": sd[f"gru_block.weight_hh_l{k}{suffix}"].T,
                "bias": np.concatenate([b_ih[: 2 * h] + b_hh[: 2 * h], b_ih[2 * h:]]),
                "hidden_bias_n": b_hh[2 * h:],
            })
        params[f"gru_l{k}"] = {name: np.stack([d[name] for d in per_dir]) for name in per_dir[0]}
    for fc in ("fc1", "fc2"):
        params[fc] = {"kernel": sd[f"{fc}.weight"].T, "bias": sd[f"{fc}.bias"]}
    return {"params": _contiguous(params), "batch_stats": _contiguous(stats)}


def _contiguous(tree):
    if isinstance(tree, dict):
        return {k: _contiguous(v) for k, v in tree.items()}
    return np.array(tree, dtype=np.float32, order="C", copy=True)  # never a view of the input


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m converters.torch_to_flax",
        description="Convert a released PyTorch CRNN checkpoint into an asd-jax model directory.")
    parser.add_argument("--torch_ckpt", required=True, help="file written by torch.save")
    parser.add_argument("--out_dir", required=True, help="model directory to write")
    parser.add_argument("--features", default=None,
                        help="input features of the checkpoint: required unless it is one of the "
                             "released checkpoints (known by its git blob id) or its number of "
                             "input channels fits one feature type only (121: gcc_phat_all)")
    parser.add_argument("--pooling", default=None, choices=model_lib.POOLINGS,
                        help="frequency pooling of the CRNN before the GRU (default: avg, the "
                             "paper's; the released checkpoints are avg)")
    parser.add_argument("--scaler", default=None, help="feature_scaler.h5 to store alongside")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing model/")
    args = parser.parse_args(argv)
    try:
        return _convert_files(args)
    except (OSError, ValueError) as e:  # CheckpointError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 1


def _convert_files(args: argparse.Namespace) -> int:
    """The command: a ValueError or OSError is the user's error, printed as one line by `main`."""
    ckpt = pathlib.Path(args.torch_ckpt)
    blob = torch_checkpoint.git_blob_id(ckpt) if ckpt.is_file() else None
    released, released_features = RELEASED_CHECKPOINTS.get(blob, (None, None))
    features = args.features or released_features
    if features is not None and features not in features_lib.FEATURES:
        raise ValueError(f"--features {features!r}: expected one of {list(features_lib.FEATURES)}")
    if released_features and features != released_features:
        raise ValueError(f"--features {features} contradicts the released checkpoint {released} "
                         f"({released_features})")
    pooling = args.pooling or "avg"
    if released and pooling != "avg":
        raise ValueError(f"--pooling {pooling} contradicts the released checkpoint {released} (avg)")

    state_dict = torch_checkpoint.load_state_dict(ckpt)
    try:
        model_config = {**infer_model_config(state_dict), "pooling": pooling}
        variables = convert(state_dict, **model_config)
    except ValueError as e:
        raise ValueError(f"{ckpt}: {e}") from e
    in_channels = in_channels_of(state_dict)
    if features is None:  # checked after reading, so that a broken file is reported as such
        fitting = [f for f in features_lib.FEATURES if features_lib.num_channels(f) == in_channels]
        if not fitting:  # no --features could help
            counts = ", ".join(f"{f}: {features_lib.num_channels(f)}" for f in features_lib.FEATURES)
            raise ValueError(f"{ckpt} (git blob id {blob}) takes {in_channels} input channels, which "
                             f"no feature type gives ({counts}): asd-jax cannot compute its input")
        if len(fitting) != 1:
            raise ValueError(f"--features is required: {ckpt} (git blob id {blob}) is not one of the "
                             f"released checkpoints, and its {in_channels} input channels fit "
                             f"{fitting} of {list(features_lib.FEATURES)}")
        features = fitting[0]
    if in_channels != features_lib.num_channels(features):
        raise ValueError(f"{ckpt} takes {in_channels} input channels, but {features} features have "
                         f"{features_lib.num_channels(features)}; pass the right --features")
    scaler = None
    if args.scaler:
        scaler = scaler_lib.load_scaler(args.scaler, features=features)
        if scaler.mean.shape[-1] != in_channels:
            raise ValueError(f"--scaler {args.scaler} has {scaler.mean.shape[-1]} channels, but "
                             f"{ckpt} takes {in_channels} ({features})")
    config = {
        "features": features,
        "in_channels": in_channels,
        "model": model_lib.model_config(model_lib.CRNN(**model_config)),
        "source": {"torch_ckpt": str(ckpt.resolve()), "git_blob_id": blob,
                   "released_checkpoint": released},
    }
    checkpointing.save_model(args.out_dir, variables, config, scaler=scaler, overwrite=args.overwrite)
    print(f"git blob id {blob}")
    print(f"released checkpoint: {released}" if released else
          "not one of the released checkpoints of the paper")
    paper = model_lib.model_config(model_lib.CRNN(pooling=pooling))
    size = ("the paper's CRNN" if config["model"] == paper else
            ", ".join(f"{k}={config['model'][k]}" for k in _SHAPE_FIELDS))
    print(f"wrote {args.out_dir} (features {features}, {pooling} pooling, {in_channels} input "
          f"channels, {size})")
    if not (pathlib.Path(args.out_dir) / constants.SCALER_FILE).is_file():
        print(f"note: {args.out_dir} holds no feature scaler, so forward and predict will need "
              "--scaler; or convert again with --scaler feature_scaler.h5 --overwrite",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    experiments.run_argparse(main)
