"""Flax variables of `asd_jax.model.CRNN` -> the reference's PyTorch state_dict (the inverse of
`converters.torch_to_flax`).

The folded GRU biases are written back as b_ir = b_ir + b_hr (folded) and b_hr = 0 (likewise z);
PyTorch computes the same function, and converting back gives the Flax variables exactly.
`num_batches_tracked` is not kept by the Flax model (it only matters for momentum=None) and is
written as the given count. The state_dict carries the network's sizes in its shapes but nothing
else of the model config: a model whose function needs more (max pooling; the reference always
average-pools) is refused (`check_exportable`). The compute dtype is not refused: bfloat16 only
rounds the same function, which the reference computes in float32.

CLI: python -m converters.flax_to_torch --model_dir DIR --torch_ckpt OUT.ckpt [--num_batches_tracked N]
     [--overwrite]
"""

from __future__ import annotations

import argparse
import collections
import os
import pathlib
import sys
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from asd_jax import atomic
from asd_jax import checkpointing
from asd_jax import predict
from converters import torch_to_flax
import experiments


def model_config_of(variables: Mapping[str, Any]) -> dict[str, Any]:
    """The shape-fixing CRNN fields and in_channels, read from the variables' shapes."""
    params = variables["params"]
    blocks = sorted((k for k in params if k.startswith("conv_block")), key=lambda k: int(k[10:]))
    grus = sorted((k for k in params if k.startswith("gru_l")), key=lambda k: int(k[5:]))
    if not blocks or not grus or "fc1" not in params or "fc2" not in params:
        raise ValueError(f"variables do not look like a CRNN's: params keys {sorted(params)}")
    fc1 = np.shape(params["fc1"]["kernel"])
    return {
        "in_channels": int(np.shape(params["conv_block1"]["conv1"]["kernel"])[2]),
        "conv_features": tuple(int(np.shape(params[b]["conv2"]["kernel"])[3]) for b in blocks),
        "gru_hidden": int(np.shape(params[grus[0]]["hidden_bias_n"])[-1]),
        "gru_layers": len(grus),
        "fc1_features": int(fc1[1]),
        "num_cameras": int(np.shape(params["fc2"]["kernel"])[0]) - int(fc1[1]),
    }


_INT64_MAX = np.iinfo(np.int64).max


def check_num_batches_tracked(num_batches_tracked: int) -> None:
    """Raises ValueError unless `num_batches_tracked` is a batch count PyTorch stores: an
    integer in [0, 2**63 - 1] (int64)."""
    if (isinstance(num_batches_tracked, bool) or not isinstance(num_batches_tracked, (int, np.integer))
            or not 0 <= num_batches_tracked <= _INT64_MAX):
        raise ValueError(f"num_batches_tracked (--num_batches_tracked) must be an integer in "
                         f"[0, 2**63 - 1] (a count of training batches), got {num_batches_tracked!r}")


def to_state_dict(variables: Mapping[str, Any], num_batches_tracked: int = 0,
                  ) -> "collections.OrderedDict[str, np.ndarray]":
    """The PyTorch state_dict (numpy float32; num_batches_tracked int64), in PyTorch's key order.

    num_batches_tracked: an integer in [0, 2**63 - 1] (ValueError otherwise).
    Raises ValueError listing every key whose shape disagrees with the CRNN the variables imply.
    """
    check_num_batches_tracked(num_batches_tracked)
    cfg = model_config_of(variables)
    in_channels = cfg.pop("in_channels")
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), dict(variables["params"]))
    stats = jax.tree.map(lambda x: np.asarray(x, np.float32), dict(variables["batch_stats"]))
    h = cfg["gru_hidden"]
    out: dict[str, np.ndarray] = {}
    for i in range(1, len(cfg["conv_features"]) + 1):
        pre = f"conv_block{i}"
        for j in (1, 2):
            out[f"{pre}.conv{j}.weight"] = params[pre][f"conv{j}"]["kernel"].transpose(3, 2, 0, 1)
            out[f"{pre}.bn{j}.weight"] = params[pre][f"bn{j}"]["scale"]
            out[f"{pre}.bn{j}.bias"] = params[pre][f"bn{j}"]["bias"]
            out[f"{pre}.bn{j}.running_mean"] = stats[pre][f"bn{j}"]["mean"]
            out[f"{pre}.bn{j}.running_var"] = stats[pre][f"bn{j}"]["var"]
            out[f"{pre}.bn{j}.num_batches_tracked"] = np.asarray(num_batches_tracked, np.int64)
    for k in range(cfg["gru_layers"]):
        gru = params[f"gru_l{k}"]
        for d, suffix in enumerate(("", "_reverse")):
            bias = gru["bias"][d]
            out[f"gru_block.weight_ih_l{k}{suffix}"] = gru["input_kernel"][d].T
            out[f"gru_block.weight_hh_l{k}{suffix}"] = gru["hidden_kernel"][d].T
            out[f"gru_block.bias_ih_l{k}{suffix}"] = bias
            out[f"gru_block.bias_hh_l{k}{suffix}"] = np.concatenate(
                [np.zeros(2 * h, np.float32), gru["hidden_bias_n"][d]])
    for fc in ("fc1", "fc2"):
        out[f"{fc}.weight"] = params[fc]["kernel"].T
        out[f"{fc}.bias"] = params[fc]["bias"]
    torch_to_flax.check_state_dict(out, in_channels, **cfg)
    return collections.OrderedDict((k, np.array(v, order="C")) for k, v in out.items())


def check_exportable(model_config: Mapping[str, Any], source: str) -> None:
    """ValueError naming `source` unless the CRNN of `model_config` (`asd_jax.model.model_config`)
    computes what the reference computes with the same state_dict: the reference average-pools
    over frequency, and the state_dict cannot say otherwise (converting it back gives "avg")."""
    pooling = model_config.get("pooling", "avg")
    if pooling != "avg":
        raise ValueError(f"{source}: the CRNN pools frequency by {pooling!r} (model.pooling in its "
                         "config.json), but the reference network always average-pools and its "
                         "state_dict cannot carry the pooling: the exported checkpoint would compute "
                         "another function; only 'avg' models can be exported")


def save_torch_checkpoint(path: str | os.PathLike, variables: Mapping[str, Any],
                          num_batches_tracked: int = 0) -> None:
    """Writes `torch.save(state_dict)` (zip format) that the reference loads with strict=True.

    Written to a hidden temporary file beside it (`atomic.partial_path`) and renamed: a failed
    write leaves no file behind. The parent
    directory must exist (FileNotFoundError naming it).
    """
    _save_state_dict(path, to_state_dict(variables, num_batches_tracked))


def _save_state_dict(path: str | os.PathLike, state_dict: Mapping[str, np.ndarray]) -> None:
    import torch  # only this direction needs torch

    tensors = collections.OrderedDict((k, torch.from_numpy(v.copy())) for k, v in state_dict.items())
    with atomic.partial_path(path) as partial, open(partial, "wb") as f:
        # A file object, not a path: torch names the zip's entries after a path's stem (here the
        # temporary name, random), after a file object "archive": the same model, the same bytes.
        torch.save(tensors, f)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m converters.flax_to_torch",
        description="Write an asd-jax model directory as a PyTorch checkpoint of the reference CRNN.")
    parser.add_argument("--model_dir", required=True,
                        help="asd-jax model directory (config.json + model/): a finished training "
                             "workdir or a converter output")
    parser.add_argument("--torch_ckpt", required=True, help="output file")
    parser.add_argument("--num_batches_tracked", type=int, default=0,
                        help="value of every batch norm's num_batches_tracked in the output, an "
                             "integer >= 0 (PyTorch counts training batches there; the model does "
                             "not use it); default 0")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --torch_ckpt (without it an existing file, such "
                             "as a released checkpoint given here by mistake, is refused)")
    args = parser.parse_args(argv)

    out_dir = pathlib.Path(args.torch_ckpt).parent
    if not out_dir.is_dir():
        print(f"error: output directory {out_dir} does not exist (--torch_ckpt {args.torch_ckpt})",
              file=sys.stderr)
        return 1
    if os.path.lexists(args.torch_ckpt) and not args.overwrite:
        print(f"error: {args.torch_ckpt} exists; pass --overwrite to replace it (--torch_ckpt is "
              "this converter's output: to read a PyTorch checkpoint use converters.torch_to_flax)",
              file=sys.stderr)
        return 1
    try:
        check_num_batches_tracked(args.num_batches_tracked)  # before reading the model
        predict.refuse_checkpoint_files(args.torch_ckpt, args.model_dir)  # its config, scaler, model/
        variables, config, _ = checkpointing.load_model(args.model_dir)
        check_exportable(config["model"], f"model directory {args.model_dir}")
        try:
            state_dict = to_state_dict(variables, args.num_batches_tracked)
        except ValueError as e:
            raise ValueError(f"model directory {args.model_dir}: {e}") from e
        _save_state_dict(args.torch_ckpt, state_dict)
    except (OSError, ValueError, RuntimeError) as e:  # torch.save reports write errors as RuntimeError
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.torch_ckpt}")
    return 0


if __name__ == "__main__":
    experiments.run_argparse(main)
