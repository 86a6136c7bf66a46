r"""Samples per second of the CRNN's train step and inference: asd-jax vs the PyTorch reference.

  python -m benchmarks.bench_model                      # batch 32, paper size (slow on 2 cores)
  python -m benchmarks.bench_model --quick              # smoke test: batch 4, 1 timed iteration
  python -m benchmarks.bench_model --compute_dtype bfloat16

Both sides run the paper's CRNN (random weights and inputs; speed does not depend on them) on
the same CPU in one run, in the same compute dtype (`--compute_dtype`; parameters are float32 on
both sides):

- asd-jax: `asd_jax.training.steps.train_step` jitted with the state donated (forward, summed
  loss, gradients, Adam update, batch-norm statistics), and `steps.predict` jitted (inference,
  running statistics), both with the compiler options the library uses (`asd_jax.xla_cpu`;
  `--xla_defaults` also times them with XLA's defaults). Inputs are put on the device once,
  outside the timed region.
- PyTorch: `tests/torch_reference.TorchCRNN` (same architecture and state_dict layout), its loss
  as the reference writes it (`asdl_loss_reference`: Python loops over batch items and frames,
  summed), `backward()` and a `torch.optim.Adam` step; inference in `eval()` mode under
  `torch.no_grad()`. `torch.set_num_threads(os.cpu_count())`. With `--compute_dtype bfloat16`
  the forward pass and loss run under `torch.autocast("cpu", dtype=torch.bfloat16)`, PyTorch's
  own mixed precision (convolutions, batch norm, GRU and linear layers in bfloat16 on the CPU),
  as ours runs `CRNN(dtype=bfloat16)`.

Each measurement is the best of `--iters` timed iterations after `--warmup` untimed ones
(compilation is in the warm-up); on the CPU each iteration is one step, waited for, and the two
sides take turns: each round times one train step of ours, then one of PyTorch's (and likewise
for inference), so that a change in the host's load during the run (on a shared virtual machine
PyTorch's train speed moved by 30% within an hour, ours by 15%) falls on both. The ratio is
of the two best times; the range of the rounds' own ratios is printed beside it. Where JAX
sees a GPU, our train step and inference are also timed there, in steady state: 20 steps are
dispatched back to back and waited for once, as the training loop runs them (it reads each
step's loss one step late), so the host's dispatch overlaps the device's work; the time of one
step waited for alone is printed beside it (on an H200 it is ~1.3 ms longer at batch 32). Model
FLOPs utilisation = the model's FLOPs / steady-state time / the device's dense peak for the
compute dtype (table `PEAK_TFLOPS` below, from the vendors' data sheets; "unknown peak" for
a device without a figure there). The model's FLOPs are counted from its layers, 2 per
multiply-add of the convolutions and matrix products, zero padding included
(`crnn_forward_flops`: 26.3 GFLOP per chunk at paper size; `crnn_train_flops`: 77.9, the usual
forward + 2x backward convention less the first convolution's input gradient, 1.13 GFLOP, which
the train step never computes since the features take no gradient); XLA's cost analysis is
printed beside them but cannot serve, since on GPUs it does not count the convolutions that
run as cuDNN calls.

On the CPU each side's train step is also given in GFLOP/s (the same model FLOP count) and as a
share of this CPU's matrix-product rate, measured in the same run: the faster of a jitted JAX and
a PyTorch `CPU_MATMUL_SIZE`-square matrix product in the compute dtype, on all cores. The
convolutions, ~80% of the step, are matrix products in effect, so that rate bounds both sides
and says how much room a speed ratio has on the machine at hand.

The line before the last says which compute dtype each side ran. Last line: `RESULT
train_ratio=<ours/PyTorch train samples/s> infer_ratio=<same, inference>`, both on the CPU.
Targets: train >= 1.5, inference >= 1.2; MFU >= 35% in bfloat16 on a GPU.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from asd_jax import constants
from asd_jax import scaler as scaler_lib
from asd_jax import xla_cpu
from asd_jax.model import CRNN, gru_bias_update_scale, init_variables
from asd_jax.training import state as state_lib
from asd_jax.training import steps
import experiments

_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Examples per step.")
_ITERS = flags.DEFINE_integer("iters", 4, "Timed iterations per measurement (the best counts); on "
                              "the CPU, rounds in which each side takes one turn.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed iterations before timing (JAX compiles here).")
_CHANNELS = flags.DEFINE_integer("channels", 16, "Input feature channels (16: GCC-PHAT/SALSA-Lite).")
_COMPUTE_DTYPE = flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"],
                                   "Activation dtype of both sides: CRNN(dtype=...) for ours, "
                                   "torch.autocast(\"cpu\", bfloat16) for PyTorch's bfloat16.")
_QUICK = flags.DEFINE_bool("quick", False, "Smoke test: batch 4, 1 warm-up and 1 timed iteration.")
_SKIP_TORCH = flags.DEFINE_bool("skip_torch", False, "Time only asd-jax (no ratios).")
_GPU_BATCH_SIZE = flags.DEFINE_integer("gpu_batch_size", 32, "Batch size of the GPU measurement.")
_XLA_DEFAULTS = flags.DEFINE_bool("xla_defaults", False, "Also time our steps compiled with XLA's "
                                  "default CPU options (without asd_jax.xla_cpu's).")

# Dense (no sparsity) peak TFLOP/s by compute dtype, per substring of `jax.Device.device_kind`
# ("NVIDIA H100 80GB HBM3" is the SXM card), the first match counting: the PCIe and NVL cards
# have lower peaks than the SXM ones, so their names come before the plain "H100" / "H200".
# Sources: NVIDIA's H100 SXM and PCIe, H200 and A100 data sheets, whose tensor-core figures are
# with sparsity (halved here); H100 NVL bfloat16 (835 per GPU, 1,671 with sparsity) from
# secondary tables that agree, not NVIDIA's sheet. TF32 peaks for float32, since XLA uses TF32
# for float32 matmuls and convolutions on these GPUs by default. None: no verified figure; the
# report says "unknown peak" (H100 NVL float32; H200 NVL and GH200 entirely) rather than guess.
PEAK_TFLOPS = (
    ("H100 PCIe", {"bfloat16": 756.0, "float32": 378.0}),
    ("H100 NVL", {"bfloat16": 835.0, "float32": None}),
    ("H200 NVL", {"bfloat16": None, "float32": None}),
    ("GH200", {"bfloat16": None, "float32": None}),
    ("H200", {"bfloat16": 989.0, "float32": 494.0}),
    ("H100", {"bfloat16": 989.0, "float32": 494.0}),
    ("A100", {"bfloat16": 312.0, "float32": 156.0}),
)


GPU_STEADY_STEPS = 20  # steps queued back to back per steady-state timing on a GPU
CPU_MATMUL_SIZE = 1024  # side of the square matrices whose product measures the CPU's rate


def _steady_time(dispatch: Callable[[], None], block: Callable[[], None], warmup: int, iters: int,
                 steps: int) -> float:
    """Seconds per step of `steps` calls of `dispatch()` queued back to back, then `block()`.

    The best of `iters` such runs after `warmup` (untimed) calls of dispatch.
    """
    for _ in range(warmup):
        dispatch()
    block()
    best = float("inf")
    for _ in range(iters):
        start = time.perf_counter()
        for _ in range(steps):
            dispatch()
        block()
        best = min(best, (time.perf_counter() - start) / steps)
    return best


def _best_time(fn: Callable[[], None], warmup: int, iters: int) -> float:
    """Minimum wall time of `fn()` (which must block until its work is done) over `iters` calls."""
    return _steady_time(fn, lambda: None, warmup, iters, steps=1)


def _turn_times(fns: Sequence[Callable[[], None]], warmup: int, iters: int) -> np.ndarray:
    """Wall times (iters, len(fns)) of `iters` rounds in which each `fn()` (which must block until
    its work is done) runs once, in order, after `warmup` untimed calls of each."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = np.empty((iters, len(fns)))
    for i in range(iters):
        for j, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            times[i, j] = time.perf_counter() - start
    return times


def _ratio_line(name: str, target: float, ours: np.ndarray, ref: np.ndarray) -> tuple[float, str]:
    """Ours/reference speed from the two best times, and a report with the rounds' range."""
    ratio = float(ref.min() / ours.min())
    rounds = ref / ours
    return ratio, (f"{name} {ratio:.2f} (target >= {target:g}; rounds {rounds.min():.2f}-"
                   f"{rounds.max():.2f})")


def _random_batch(rng: np.random.Generator, batch: int, channels: int) -> dict[str, np.ndarray]:
    """A batch in the layout of `steps.train_step` (channels-last features, one-hot cams)."""
    frames = constants.N_FEATURE_FRAMES // 16
    cams = np.zeros((batch, constants.N_CAMERAS_PER_RIG), np.float32)
    cams[np.arange(batch), rng.integers(0, constants.N_CAMERAS_PER_RIG, batch)] = 1.0
    return {
        "features": rng.standard_normal(
            (batch, constants.N_FEATURE_FRAMES, constants.N_FEATURE_BINS, channels)).astype(np.float32),
        "cams": cams,
        "target_coords": rng.uniform(0, 1, (batch, frames)).astype(np.float32),
        "pseudo_labels": rng.integers(0, 2, (batch, frames)).astype(np.float32),
        "speech_activity": rng.integers(0, 2, (batch, frames)).astype(np.float32),
    }


class JaxBench:
    """Our jitted train step (state donated) and inference on one device, ready to time."""

    def __init__(self, device: jax.Device, batch: dict[str, np.ndarray], compute_dtype: str,
                 library_options: bool = True):
        self.model = CRNN(dtype=jnp.dtype(compute_dtype))
        channels = batch["features"].shape[-1]
        with jax.default_device(device):
            variables = init_variables(jax.random.key(0), self.model, channels)
            tx = state_lib.create_optimizer(1e-4, gru_bias_update_scale(variables["params"]))
            self.state = jax.device_put(
                state_lib.create_train_state(jax.random.PRNGKey(0), variables, tx), device)
            self.batch = jax.device_put(batch, device)
            self.scaler = jax.device_put(scaler_lib.Scaler(
                np.zeros((constants.N_FEATURE_BINS, channels), np.float32),
                np.ones((constants.N_FEATURE_BINS, channels), np.float32)), device)
        self.train_fn = jax.jit(functools.partial(steps.train_step, model=self.model, tx=tx),
                                donate_argnums=0,
                                compiler_options=xla_cpu.train_options() if library_options else None)
        self.infer_fn = jax.jit(functools.partial(steps.predict, model=self.model),
                                compiler_options=xla_cpu.inference_options() if library_options else None)

    def train(self) -> None:
        """One train step, waited for."""
        self.dispatch_train()
        self.block()

    def infer(self) -> None:
        """One inference batch, waited for."""
        self.dispatch_infer()
        self.block()

    def dispatch_train(self) -> None:
        """Queue one train step (JAX dispatches asynchronously; the state is donated)."""
        self.state, self._last = self.train_fn(self.state, self.batch, self.scaler)

    def dispatch_infer(self) -> None:
        """Queue one inference batch."""
        self._last = self.infer_fn(self.state.variables, self.batch["features"],
                                   self.batch["cams"], self.scaler)

    def block(self) -> None:
        """Wait for everything queued so far (steps run in order on the device)."""
        jax.block_until_ready((self.state, getattr(self, "_last", None)))

    def flops(self) -> tuple[float, float]:
        """XLA's FLOP counts of the compiled (train step, inference) for this batch."""
        train = self.train_fn.lower(self.state, self.batch, self.scaler).compile()
        infer = self.infer_fn.lower(self.state.variables, self.batch["features"], self.batch["cams"],
                                    self.scaler).compile()
        return _cost_flops(train), _cost_flops(infer)


def crnn_forward_flops(model: CRNN, in_channels: int, frames: int = constants.N_FEATURE_FRAMES,
                       bins: int = constants.N_FEATURE_BINS) -> float:
    """FLOPs (2 per multiply-add) of one example's forward pass: convolutions, GRU, linears."""
    flops, c_in, t, f = 0.0, in_channels, frames, bins
    for width in model.conv_features:  # two 3x3 convolutions per block, then 2x2 pooling
        flops += 2.0 * t * f * 9 * (c_in * width + width * width)
        c_in, t, f = width, t // 2, f // 2
    d_in, h = c_in, model.gru_hidden
    for _ in range(model.gru_layers):  # two directions, input and hidden projections
        flops += 2 * 2.0 * t * (d_in * 3 * h + h * 3 * h)
        d_in = 2 * h
    flops += 2.0 * t * d_in * model.fc1_features
    flops += 2.0 * t * (model.fc1_features + model.num_cameras) * 2
    return flops


def crnn_train_flops(model: CRNN, in_channels: int, frames: int = constants.N_FEATURE_FRAMES,
                     bins: int = constants.N_FEATURE_BINS) -> float:
    """FLOPs of one example's train step, by the same count: the forward pass and, for each layer,
    twice its FLOPs backward (the gradients of its input and of its weights), except the input
    gradient of the first convolution, which is never computed (the features take no gradient).
    """
    first_conv = 2.0 * frames * bins * 9 * in_channels * model.conv_features[0]
    return 3 * crnn_forward_flops(model, in_channels, frames, bins) - first_conv


def _cost_flops(compiled) -> float:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per computation
        analysis = analysis[0]
    return float(analysis.get("flops", float("nan")))


class TorchBench:
    """The reference in PyTorch: TorchCRNN, the reference's looped loss, Adam, on the CPU; float32
    parameters, activations in `compute_dtype` (bfloat16: under `torch.autocast`)."""

    def __init__(self, batch: dict[str, np.ndarray], compute_dtype: str = "float32"):
        import torch  # pylint: disable=import-outside-toplevel
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                        "tests"))
        import torch_reference  # pylint: disable=import-outside-toplevel

        self.torch = torch
        self.autocast = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16,
                                          enabled=compute_dtype == "bfloat16")
        self.loss_fn = torch_reference.asdl_loss_reference
        torch.manual_seed(0)
        self.model = torch_reference.TorchCRNN(in_channels=batch["features"].shape[-1])
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4)
        # PyTorch layouts: features (B, C, T, F), cams (B, 1, 11).
        self.features = torch.from_numpy(np.ascontiguousarray(batch["features"].transpose(0, 3, 1, 2)))
        self.cams = torch.from_numpy(batch["cams"][:, None, :])
        self.labels = [torch.from_numpy(batch[k])
                       for k in ("target_coords", "pseudo_labels", "speech_activity")]

    def train(self) -> None:
        self.model.train()
        self.optimizer.zero_grad()
        with self.autocast():
            outputs = self.model(self.features, self.cams)
            loss = self.loss_fn(outputs, *self.labels)
        loss.backward()
        self.optimizer.step()

    def infer(self) -> None:
        self.model.eval()
        with self.torch.no_grad(), self.autocast():
            self.model(self.features, self.cams)


def cpu_matmul_gflops(dtype: str, size: int, iters: int, with_torch: bool) -> float:
    """GFLOP/s of the faster of JAX's (jitted, on the CPU) and PyTorch's `size`-square matrix
    product in `dtype` (2 * size**3 FLOPs), each the best of `iters` calls after one warm-up.
    (On a 2-core Zen 4 host 1024 gave the highest rate of 1024-4096: its operands stay in cache.)"""
    cpu = jax.devices("cpu")[0]
    a = jax.device_put(jnp.ones((size, size), jnp.dtype(dtype)), cpu)
    matmul = jax.jit(jnp.matmul)
    best = _best_time(lambda: matmul(a, a).block_until_ready(), 1, iters)
    if with_torch:
        import torch  # pylint: disable=import-outside-toplevel
        t = torch.ones((size, size), dtype=getattr(torch, dtype))
        best = min(best, _best_time(lambda: torch.matmul(t, t), 1, iters))
    return 2.0 * size**3 / best / 1e9


def _peak_tflops(device_kind: str, dtype: str) -> float | None:
    """Dense peak TFLOP/s of `PEAK_TFLOPS`'s first entry found in `device_kind` (None: unknown)."""
    for kind, peaks in PEAK_TFLOPS:
        if kind in device_kind:
            return peaks[dtype]
    return None


def _gpu_report(dtype: str, batch_size: int, warmup: int, iters: int) -> None:
    try:
        gpu = jax.devices("gpu")[0]
    except RuntimeError:
        print("gpu: none visible to JAX")
        return
    batch = _random_batch(np.random.default_rng(1), batch_size, _CHANNELS.value)
    for name in sorted({dtype, "bfloat16"}):
        bench = JaxBench(gpu, batch, name)
        xla_train_flops, xla_infer_flops = bench.flops()
        infer_flops = batch_size * crnn_forward_flops(bench.model, _CHANNELS.value)
        train_flops = batch_size * crnn_train_flops(bench.model, _CHANNELS.value)
        t_train = _steady_time(bench.dispatch_train, bench.block, max(warmup, 2), max(iters, 3),
                               GPU_STEADY_STEPS)
        t_infer = _steady_time(bench.dispatch_infer, bench.block, max(warmup, 2), max(iters, 3),
                               GPU_STEADY_STEPS)
        t_train_alone = _best_time(bench.train, 1, max(iters, 10))
        t_infer_alone = _best_time(bench.infer, 1, max(iters, 10))
        peak = _peak_tflops(gpu.device_kind, name)
        line = (f"gpu {gpu.device_kind} {name} batch {batch_size}, steady state: train "
                f"{batch_size / t_train:.1f} samples/s ({train_flops / t_train / 1e12:.1f} TFLOP/s; "
                f"XLA counts {xla_train_flops / t_train / 1e12:.1f}), inference "
                f"{batch_size / t_infer:.1f} samples/s ({infer_flops / t_infer / 1e12:.1f} TFLOP/s; "
                f"XLA counts {xla_infer_flops / t_infer / 1e12:.1f}); one step waited for alone: "
                f"train {1e3 * t_train_alone:.2f} ms ({batch_size / t_train_alone:.1f} samples/s), "
                f"inference {1e3 * t_infer_alone:.2f} ms")
        if peak:
            line += (f"; MFU train {100 * train_flops / t_train / (peak * 1e12):.1f}% inference "
                     f"{100 * infer_flops / t_infer / (peak * 1e12):.1f}% of {peak:g} TFLOP/s")
        else:
            line += f"; MFU: unknown peak for {gpu.device_kind} in {name}"
        print(line, flush=True)


def main(argv):
    del argv
    quick = _QUICK.value
    batch_size = 4 if quick else _BATCH_SIZE.value
    warmup, iters = (1, 1) if quick else (_WARMUP.value, _ITERS.value)
    cores = os.cpu_count()
    print(f"paper CRNN, batch {batch_size}, {_CHANNELS.value} channels, {cores} CPU cores, "
          f"jax {jax.__version__}, compute dtype {_COMPUTE_DTYPE.value}", flush=True)
    batch = _random_batch(np.random.default_rng(0), batch_size, _CHANNELS.value)

    cpu = jax.devices("cpu")[0]
    if _XLA_DEFAULTS.value:
        plain = JaxBench(cpu, batch, _COMPUTE_DTYPE.value, library_options=False)
        plain_train = batch_size / _best_time(plain.train, warmup, iters)
        plain_infer = batch_size / _best_time(plain.infer, warmup, iters)
        del plain
        print(f"cpu asd-jax, XLA default options: train {plain_train:.3f} samples/s, inference "
              f"{plain_infer:.3f} samples/s", flush=True)
    ours = JaxBench(cpu, batch, _COMPUTE_DTYPE.value)
    if _SKIP_TORCH.value:
        ours_train = _turn_times([ours.train], warmup, iters)[:, 0]
        ours_infer = _turn_times([ours.infer], warmup, iters)[:, 0]
        ref_train = ref_infer = None
    else:
        import torch  # pylint: disable=import-outside-toplevel
        torch.set_num_threads(cores)
        ref = TorchBench(batch, _COMPUTE_DTYPE.value)
        ours_train, ref_train = _turn_times([ours.train, ref.train], warmup, iters).T
        ours_infer, ref_infer = _turn_times([ours.infer, ref.infer], warmup, iters).T
        del ref
    model = ours.model
    del ours
    matmul_rate = cpu_matmul_gflops(_COMPUTE_DTYPE.value, CPU_MATMUL_SIZE, 10,
                                    with_torch=not _SKIP_TORCH.value)
    step_gflop = batch_size * crnn_train_flops(model, _CHANNELS.value) / 1e9
    sides = "JAX" if _SKIP_TORCH.value else "best of JAX and PyTorch"
    print(f"cpu matrix-product rate ({_COMPUTE_DTYPE.value}, {sides}): {matmul_rate:.0f} GFLOP/s",
          flush=True)
    print(f"cpu asd-jax:  train {batch_size / ours_train.min():.3f} samples/s "
          f"({_share(step_gflop, ours_train.min(), matmul_rate)}), inference "
          f"{batch_size / ours_infer.min():.3f} samples/s", flush=True)
    if ref_train is None:
        train_ratio = infer_ratio = float("nan")
    else:
        print(f"cpu PyTorch {torch.__version__} ({torch.get_num_threads()} threads, "
              f"{_torch_dtype_name(_COMPUTE_DTYPE.value)}): train "
              f"{batch_size / ref_train.min():.3f} samples/s "
              f"({_share(step_gflop, ref_train.min(), matmul_rate)}), inference "
              f"{batch_size / ref_infer.min():.3f} samples/s", flush=True)
        train_ratio, train_line = _ratio_line("train", 1.5, ours_train, ref_train)
        infer_ratio, infer_line = _ratio_line("inference", 1.2, ours_infer, ref_infer)
        print(f"ratios: {train_line}, {infer_line}")

    _gpu_report(_COMPUTE_DTYPE.value, _GPU_BATCH_SIZE.value, warmup, iters)
    torch_side = "not run" if _SKIP_TORCH.value else _torch_dtype_name(_COMPUTE_DTYPE.value)
    print(f"compute dtype of the ratios: asd-jax {_COMPUTE_DTYPE.value}, PyTorch {torch_side}")
    print(f"RESULT train_ratio={train_ratio:.2f} infer_ratio={infer_ratio:.2f}")


def _share(gflop: float, seconds: float, matmul_rate: float) -> str:
    """"<x> GFLOP/s, <y>% of the matrix-product rate" for `gflop` of work done in `seconds`."""
    rate = gflop / seconds
    return f"{rate:.0f} GFLOP/s, {100 * rate / matmul_rate:.0f}% of the matrix-product rate"


def _torch_dtype_name(compute_dtype: str) -> str:
    return "bfloat16 (autocast)" if compute_dtype == "bfloat16" else "float32"


if __name__ == "__main__":
    experiments.run(main)
