"""Input features of the reference (SPEC section 3): log-mel, GCC-PHAT and SALSA-Lite.

All three share one STFT front end (`stft`): 48 kHz audio, centred frames with reflect padding
of 256 samples on each side, hop 100 samples, n_fft 512, giving 961 frames that a static index
table cuts to 960 (frame 481 is dropped, see `FRAME_TABLE`). The table is applied to the frames
before their FFT, so frame 481 is never transformed.

Shapes are channels-last: audio (..., 96000, n_mics) -> features (..., 960, 64, C) float32,
batched over any leading axes. Every public function checks its input at the edge (rank, mic
count, sample count, dtype and, for concrete arrays, that every sample is finite and within
`MAX_ABS_AUDIO`) and then calls one jitted core, compiled once per input shape. The public
functions can also be called inside other jitted code; the sample check is skipped for traced
inputs.

Numerics. Everything runs in float32 / complex64 and matches the reference's float64 GCC to
~1e-4 (SPEC section 3):
  * the PHAT weight `exp(i*angle(X_j * conj(X_i)))` is computed as `u_j * conj(u_i)` with the
    unit phasors `u = X * rsqrt(|X|^2)`, so no product of two spectra's magnitudes is formed;
  * the inverse FFT is evaluated only at the 64 kept lags, as two real matrix products with
    (257, 33) cosine and sine tables, using the even/odd symmetry of the lags;
  * SALSA-Lite's phase uses a vectorised float32 arctan2 (`_atan2`, error ~3e-7 rad).
A bin where `X_j * conj(X_i) == 0` (either spectrum exactly zero) gets the weight 1+0j, the value
of `exp(i*angle(0))` with `angle(0) == 0`: digital silence gives a lag-0 impulse, never NaN.
(Numpy's `angle` of a *signed* zero such as -0+0j is pi, so a literal numpy transcription gives
-1 at some such bins, e.g. for a dead channel; asd-jax uses the SPEC's value 1 everywhere.)
SALSA-Lite's phase difference of such a bin is 0 for the same reason.
The float32 FFT's absolute error is ~1e-7 of a frame's largest magnitude, so dB values agree
with the float64 reference to ~1e-4 where the power is within ~30 dB of the frame's peak and
drift further in bins far below it. Largest errors in tests/test_features.py's signals: log-mel
2e-4 dB (white noise); SALSA-Lite's channel 0, whose 64 bins are not averaged by mel bands,
4e-3 dB (clipped audio) and 2e-3 dB (reverberant speech), on fewer than 0.4% of its values.
The same floor limits GCC-PHAT, which gives every bin unit weight: bins more than ~70 dB below
the frame's peak carry the float32 FFT's rounding as their phase. Recorded speech, whose noise
floor fills those bins, stays within ~1e-5 of the float64 reference; a frame of a pure,
noise-free tone (synthetic, or a tone quantised to 16 bits) can differ by up to ~0.1.
Amplitude: the features are the same for audio scaled by any factor (the dB channels shift by
20 log10 of it) within float32's range: samples beyond `MAX_ABS_AUDIO` are refused, and a chunk
whose peak is below ~1e-15 loses its quieter bins to underflow and tends to the lag-0 impulse of
digital silence (16-bit audio's smallest step is 3e-5, 24-bit's 1.2e-7).
"""

from __future__ import annotations

import functools
from typing import Literal

import chex
import jax
import jax.numpy as jnp
import numpy as np

from asd_jax import constants as C
from asd_jax.xla_cpu import on_cpu

FEATURES = ("gcc_phat", "gcc_phat_all", "salsa_lite", "logmel")
WINDOWS = ("symmetric", "periodic")

N_BINS = C.N_FFT // 2 + 1  # 257 one-sided STFT bins
PAD_SAMPLES = C.N_FFT // 2  # 256 reflected samples on each side
LOG_AMIN = 1e-10  # power floor of the dB conversion
# Largest |sample| accepted. Spectral powers and SALSA-Lite's cross products are float32 and
# overflow (NaN and inf features) from ~8e16 (a constant signal) to ~1e19 (white noise); below
# the bound every feature is the scaled audio's up to float32 rounding. Audio is normally in [-1, 1]; integer samples
# passed unscaled (int32: up to ~2.1e9) still fit.
MAX_ABS_AUDIO = 1e15
SALSA_N_BINS = int(np.floor(C.SALSA_CUTOFF_HZ * C.N_FFT / C.SAMPLE_RATE_HZ))  # 64: bins 0..63
# Phase-to-path-length factor of SALSA-Lite's normalised phase difference: 2*pi*fs/(n_fft*c).
SALSA_DELTA = 2.0 * np.pi * C.SAMPLE_RATE_HZ / (C.N_FFT * C.SPEED_OF_SOUND_M_S)


# --------------------------------------------------------------------------------------------
# Static tables (numpy, built once at import).
# --------------------------------------------------------------------------------------------

def _frame_table() -> np.ndarray:
    """(960,) int: STFT frame kept for output frame n, round_half_even(n / (960/961)) in float64."""
    ratio = np.float64(C.N_FEATURE_FRAMES) / np.float64(C.N_STFT_FRAMES)
    return np.round(np.arange(C.N_FEATURE_FRAMES, dtype=np.float64) / ratio).astype(np.int64)


FRAME_TABLE = _frame_table()  # frames 0..480 and 482..960


def hann(window: str) -> np.ndarray:
    """(512,) float64 Hann window: "symmetric" (numpy.hanning) or "periodic" (scipy 'hann')."""
    n = np.arange(C.N_FFT, dtype=np.float64)
    if window == "symmetric":
        return 0.5 - 0.5 * np.cos(2.0 * np.pi * n / (C.N_FFT - 1))
    if window == "periodic":
        return 0.5 - 0.5 * np.cos(2.0 * np.pi * n / C.N_FFT)
    raise ValueError(f"window must be one of {WINDOWS}, got {window!r}")


def _hz_to_mel_slaney(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear (3 mel / 200 Hz) below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz * 3.0 / 200.0
    log_step = np.log(6.4) / 27.0
    logarithmic = 15.0 + np.log(np.maximum(hz, 1e-12) / 1000.0) / log_step
    return np.where(hz >= 1000.0, logarithmic, linear)


def _mel_to_hz_slaney(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    log_step = np.log(6.4) / 27.0
    return np.where(mel >= 15.0, 1000.0 * np.exp(log_step * (mel - 15.0)), mel * 200.0 / 3.0)


def mel_filterbank(sample_rate_hz: float = C.SAMPLE_RATE_HZ, n_fft: int = C.N_FFT,
                   n_mels: int = C.N_MELS, fmin_hz: float = C.MEL_FMIN_HZ,
                   fmax_hz: float = C.MEL_FMAX_HZ) -> np.ndarray:
    """(n_fft//2 + 1, n_mels) float32 triangular mel filters, Slaney scale and area norm.

    Band m rises linearly from edge m to its centre m+1 and falls to edge m+2, the n_mels+2
    edges being equally spaced on the Slaney mel scale between fmin_hz and fmax_hz; each band
    is scaled by 2 / (its width in Hz) so that it has unit area. Built in float64, stored as
    float32 (the dtype of the reference's filters). Bins are rows: `power @ filters`.
    """
    bin_hz = np.linspace(0.0, sample_rate_hz / 2.0, n_fft // 2 + 1)
    edges_mel = np.linspace(_hz_to_mel_slaney(fmin_hz), _hz_to_mel_slaney(fmax_hz), n_mels + 2)
    edges_hz = _mel_to_hz_slaney(edges_mel)
    lower, centre, upper = edges_hz[:-2, None], edges_hz[1:-1, None], edges_hz[2:, None]
    rising = (bin_hz[None, :] - lower) / (centre - lower)
    falling = (upper - bin_hz[None, :]) / (upper - centre)
    weights = np.maximum(0.0, np.minimum(rising, falling)) * (2.0 / (upper - lower))
    return weights.T.astype(np.float32)


def _lag_table() -> tuple[np.ndarray, np.ndarray]:
    """The inverse real FFT of length 512 at lags 0..32, split into its even and odd parts.

    Returns (cos_table, sin_table), each (257, 33) float32, with
    `cos_table[k, l] = c_k cos(2 pi k l / 512) / 512` and `sin_table[k, l] = c_k sin(...) / 512`,
    c_k = 1 for bins 0 and 256 and 2 otherwise. For a one-sided spectrum W,
    `irfft(W)[l] = even[l] - odd[l]` and `irfft(W)[-l] = even[l] + odd[l]` with
    `even = Re(W) @ cos_table`, `odd = Im(W) @ sin_table` (irfft ignores Im(W) at bins 0 and
    256, and so does sin_table, which vanishes there). Using the symmetry halves the work of
    evaluating the 64 kept lags directly.
    """
    k = np.arange(N_BINS)[:, None]
    lags = np.arange(C.GCC_MAX_LAG + 1)[None, :]  # 0..32
    fold = np.where((k == 0) | (k == C.N_FFT // 2), 1.0, 2.0) / C.N_FFT
    phase = 2.0 * np.pi * k * lags / C.N_FFT
    return (fold * np.cos(phase)).astype(np.float32), (fold * np.sin(phase)).astype(np.float32)


def _gcc_lags(real: jax.Array, imag: jax.Array) -> jax.Array:
    """(..., 257) PHAT spectrum (real, imag parts) -> (..., 64) GCC at lags -32..31.

    Equals `concat(cc[-32:], cc[:32])` with `cc = irfft(real + 1j*imag, n=512)`.
    """
    hi = jax.lax.Precision.HIGHEST
    even = jnp.matmul(real, _LAG_COS, precision=hi)  # (..., 33) lags 0..32
    odd = jnp.matmul(imag, _LAG_SIN, precision=hi)
    negative = (even + odd)[..., C.GCC_MAX_LAG:0:-1]  # lags -32..-1
    positive = (even - odd)[..., : C.GCC_MAX_LAG]  # lags 0..31
    return jnp.concatenate([negative, positive], axis=-1)


_MEL_FILTERS = mel_filterbank()  # (257, 64)
_LAG_COS, _LAG_SIN = _lag_table()
_WINDOWS = {name: hann(name).astype(np.float32) for name in WINDOWS}
# SALSA-Lite bin frequencies in bin units; bin 0 uses 1 (the reference's choice, avoids 0/0).
_SALSA_BIN_INDEX = np.maximum(np.arange(SALSA_N_BINS), 1).astype(np.float32)


def all_pairs(n_mics: int) -> np.ndarray:
    """(n_mics*(n_mics-1)/2, 2) int: pairs (i, j), i < j, in lexicographic order.

    For 16 mics: (0,1), (0,2), ..., (0,15), (1,2), ..., (14,15). The first 15 are the
    reference's channels.
    """
    i, j = np.triu_indices(n_mics, k=1)
    return np.stack([i, j], axis=-1)


# --------------------------------------------------------------------------------------------
# Input checks (host side, before any work).
# --------------------------------------------------------------------------------------------

@jax.jit
def _all_in_range(audio: jax.Array) -> jax.Array:
    """True when every sample is finite with |sample| <= MAX_ABS_AUDIO (NaN compares False)."""
    return jnp.all(jnp.abs(audio) <= MAX_ABS_AUDIO)


def _check_audio(audio, name: str, validate: bool) -> jax.Array:
    """Static checks always; for concrete arrays when `validate`, that every sample is finite and
    within MAX_ABS_AUDIO."""
    shape = getattr(audio, "shape", None)
    dtype = getattr(audio, "dtype", None)
    if shape is None or dtype is None:
        audio = np.asarray(audio)
        shape, dtype = audio.shape, audio.dtype
    expected = f"expected (..., {C.CHUNK_SAMPLES}, n_mics) floating point with n_mics >= 2"
    if len(shape) < 2:
        raise ValueError(f"{name}: audio has shape {tuple(shape)} (rank {len(shape)}); {expected}")
    if shape[-2] != C.CHUNK_SAMPLES:
        raise ValueError(f"{name}: audio has {shape[-2]} samples (shape {tuple(shape)}); {expected} "
                         f"(a 2-s chunk at {C.SAMPLE_RATE_HZ} Hz)")
    if shape[-1] < 2:
        raise ValueError(f"{name}: audio has {shape[-1]} microphone(s) (shape {tuple(shape)}); "
                         f"{expected}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{name}: audio has dtype {np.dtype(dtype).name}; {expected}")
    if isinstance(audio, np.ndarray):
        with np.errstate(over="ignore"):  # a value beyond float32's range is reported below
            converted = jnp.asarray(audio.astype(np.float32, copy=False))
    else:
        converted = jnp.asarray(audio).astype(jnp.float32)
    # Checked on the device, host audio too (after the transfer the call makes anyway): only a
    # bool comes back, and the host search that names the sample runs only when it is False.
    if validate and not isinstance(audio, jax.core.Tracer) and not bool(_all_in_range(converted)):
        _raise_bad_sample(audio, converted, name)
    return converted


def _raise_bad_sample(audio, converted: jax.Array, name: str) -> None:
    """Raise ValueError naming the first non-finite sample (chunk, channel, sample index), or
    where there is none, the first beyond MAX_ABS_AUDIO."""
    given = np.asarray(audio)
    with np.errstate(over="ignore"):
        finite, why = np.isfinite(given), ""
        if finite.all():  # finite as given, but too large for float32
            finite, why = np.isfinite(np.asarray(converted)), " (a value beyond float32's range)"
        what, expected, counted = "a non-finite sample" + why, "finite audio", "non-finite"
        if finite.all():  # finite, but too loud for float32 spectra
            finite = np.abs(np.asarray(converted)) <= MAX_ABS_AUDIO
            what, counted = "a sample beyond +-MAX_ABS_AUDIO", "that far out"
            expected = (f"|audio| <= {MAX_ABS_AUDIO:g}, where float32 spectra cannot overflow "
                        "(samples are usually in [-1, 1])")
    where = np.unravel_index(np.argmin(finite), given.shape)
    lead = f" chunk {tuple(int(i) for i in where[:-2])}," if given.ndim > 2 else ""
    raise ValueError(
        f"{name}: audio has {what} ({float(given[where]):g}) at{lead} channel {int(where[-1])}, "
        f"sample {int(where[-2])} ({int((~finite).sum())} {counted} in all); expected {expected}")


# --------------------------------------------------------------------------------------------
# The jitted core: channels-first internally (..., mics, frames, bins).
# --------------------------------------------------------------------------------------------

def _frames(audio: jax.Array) -> jax.Array:
    """(..., 96000, M) float32 -> (..., M, 960, 512): the kept frames, reflect padded.

    Each frame is one contiguous 512-sample block of the padded signal, so the frames are taken
    with a block gather (a batched `dynamic_slice`), much faster on CPU than an element-wise
    (960, 512) index table.
    """
    x = jnp.moveaxis(audio, -1, -2)  # (..., M, 96000)
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(PAD_SAMPLES, PAD_SAMPLES)], mode="reflect")
    starts = jnp.asarray(FRAME_TABLE * C.HOP_SAMPLES, dtype=jnp.int32)  # (960,)
    take = lambda start: jax.lax.dynamic_slice_in_dim(x, start, C.N_FFT, axis=-1)
    return jax.vmap(take, out_axes=-2)(starts)


def _stft_cf(audio: jax.Array, window: str) -> jax.Array:
    """(..., 96000, M) float32 -> (..., M, 960, 257) complex64."""
    chex.assert_type(audio, jnp.float32)
    chex.assert_axis_dimension(audio, -2, C.CHUNK_SAMPLES)
    frames = _frames(audio) * _WINDOWS[window]
    return jnp.fft.rfft(frames, n=C.N_FFT, axis=-1)


def _db(power: jax.Array) -> jax.Array:
    return 10.0 * jnp.log10(jnp.maximum(power, LOG_AMIN))


def _power(spec: jax.Array) -> jax.Array:
    return jnp.square(spec.real) + jnp.square(spec.imag)


def _logmel_cf(spec: jax.Array) -> jax.Array:
    """(..., 960, 257) complex64 -> (..., 960, 64) float32 log-mel in dB."""
    mel = jnp.matmul(_power(spec), _MEL_FILTERS, precision=jax.lax.Precision.HIGHEST)
    return _db(mel)


def _unit_phasors(spec: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """X / |X| as (real, imag) float32, and the mask X == 0 (where the phasor is set to 0).

    Uses rsqrt(|X|^2), which is much cheaper on CPU than a complex abs and a division. |X|^2
    underflows for |X| below ~1e-19 (float32's smallest normal is 1.2e-38); such a bin, ~170 dB
    below a full-scale spectrum and far below the float32 STFT's own noise, counts as zero.
    """
    real, imag = spec.real, spec.imag
    power = jnp.square(real) + jnp.square(imag)
    zero = power == 0.0
    inverse_norm = jnp.where(zero, 0.0, jax.lax.rsqrt(jnp.where(zero, 1.0, power)))
    return real * inverse_norm, imag * inverse_norm, zero


def _pair_phase(phasors, pairs: np.ndarray):
    """Unit phasor of X_j * conj(X_i) for pairs (i, j): (..., P, 960, bins) real, imag.

    Where either spectrum is exactly zero the product is 0 and its angle is 0: 1 + 0j.
    """
    if (pairs[:, 0] == 0).all() and (pairs[:, 1] == np.arange(1, len(pairs) + 1)).all():
        first = lambda x: x[..., :1, :, :]  # (0, n), n = 1..P: plain slices, no gather
        second = lambda x: x[..., 1:len(pairs) + 1, :, :]
    else:
        first = lambda x: jnp.take(x, pairs[:, 0], axis=-3)
        second = lambda x: jnp.take(x, pairs[:, 1], axis=-3)
    re, im, zero = phasors
    ar, ai, br, bi = first(re), first(im), second(re), second(im)
    either_zero = first(zero) | second(zero)
    real = jnp.where(either_zero, 1.0, br * ar + bi * ai)
    imag = jnp.where(either_zero, 0.0, bi * ar - br * ai)
    return real, imag


def _atan2(y: jax.Array, x: jax.Array) -> jax.Array:
    """Elementwise arctan2(y, x) in [-pi, pi], float32, max error ~3e-7 rad; 0 at (0, 0).

    XLA's CPU atan2 is not vectorised (about 10x slower than this). The angle is reduced to
    t = min/max in [0, 1], then to |u| <= tan(pi/8) with atan(t) = pi/4 + atan((t-1)/(t+1)),
    where an odd degree-9 polynomial (Cephes' atanf coefficients) is accurate to float32.
    """
    ax, ay = jnp.abs(x), jnp.abs(y)
    hi, lo = jnp.maximum(ax, ay), jnp.minimum(ax, ay)
    t = lo / jnp.where(hi == 0.0, 1.0, hi)
    reduced = t > np.float32(np.tan(np.pi / 8))
    u = jnp.where(reduced, (t - 1.0) / (t + 1.0), t)
    z = u * u
    poly = ((((8.05374449538e-2 * z - 1.38776856032e-1) * z + 1.99777106478e-1) * z
             - 3.33329491539e-1) * z * u + u)
    angle = jnp.where(reduced, poly + np.float32(np.pi / 4), poly)  # atan(lo / hi)
    angle = jnp.where(ay > ax, np.float32(np.pi / 2) - angle, angle)
    angle = jnp.where(x < 0.0, np.float32(np.pi) - angle, angle)
    # The sign of y, zero included: a real cross-spectrum (bin 0) has y = +-0, and numpy's
    # angle gives -pi for (x < 0, -0) and pi for (x < 0, +0).
    return jnp.where(jnp.signbit(y), -angle, angle)


def _chunk_by_chunk_on_cpu(core):
    """`core` (audio (..., 96000, M) -> (..., ...)) run one chunk at a time on the CPU.

    On the CPU a batch of chunks goes through `jax.lax.map`, so that one chunk's intermediates
    (frames, spectra, phasors: ~30 MB each) stay in cache between the steps that write and read
    them: in `benchmarks/bench_features` (batch 32, 2 cores) GCC-PHAT took 33 instead of 44 ms
    per chunk, SALSA-Lite 29 instead of 39. Accelerators get the whole batch at once. The choice
    is made when lowering (`xla_cpu.on_cpu`), so the function stays usable inside
    any jitted code.
    """
    @functools.wraps(core)
    def wrapped(audio: jax.Array, *args):
        lead = audio.shape[:-2]
        if len(lead) == 0 or int(np.prod(lead)) == 1:
            return core(audio, *args)
        flat = audio.reshape((-1,) + audio.shape[-2:])
        one_by_one = lambda a: jax.lax.map(lambda chunk: core(chunk, *args), a)
        out = on_cpu(one_by_one, lambda a: core(a, *args), flat)
        return out.reshape(lead + out.shape[1:])
    return wrapped


@functools.partial(jax.jit, static_argnames=("window",))
def _stft_core(audio: jax.Array, window: str) -> jax.Array:
    return jnp.moveaxis(_stft_cf(audio, window), -3, -1)


@jax.jit
@_chunk_by_chunk_on_cpu
def _logmel_core(audio: jax.Array) -> jax.Array:
    spec = _stft_cf(audio, "symmetric")  # (..., M, 960, 257)
    return jnp.moveaxis(_logmel_cf(spec), -3, -1)


@functools.partial(jax.jit, static_argnames=("pairs",))
@_chunk_by_chunk_on_cpu
def _gcc_phat_core(audio: jax.Array, pairs: str) -> jax.Array:
    n_mics = audio.shape[-1]
    table = all_pairs(n_mics)
    if pairs == "reference":
        table = table[: n_mics - 1]
    spec = _stft_cf(audio, "symmetric")  # (..., M, 960, 257)
    real, imag = _pair_phase(_unit_phasors(spec), table)
    cc = jnp.moveaxis(_gcc_lags(real, imag), -3, -1)  # (..., 960, 64, P)
    logmel = _logmel_cf(spec[..., 0, :, :])[..., None]  # (..., 960, 64, 1)
    return jnp.concatenate([cc, logmel], axis=-1)


@jax.jit
@_chunk_by_chunk_on_cpu
def _salsa_lite_core(audio: jax.Array) -> jax.Array:
    spec = _stft_cf(audio, "periodic")[..., :SALSA_N_BINS]  # (..., M, 960, 64)
    log_spectrum = _db(_power(spec[..., 0, :, :]))[..., None]  # (..., 960, 64, 1)
    # angle(conj(X_0) * X_k) needs no normalisation; a zero product (a zero spectrum, or one
    # below ~1e-19 whose product underflows) has angle 0, as in `_pair_phase`.
    ref_real, ref_imag = spec.real[..., :1, :, :], spec.imag[..., :1, :, :]
    real, imag = spec.real[..., 1:, :, :], spec.imag[..., 1:, :, :]
    cross_real = ref_real * real + ref_imag * imag
    cross_imag = ref_real * imag - ref_imag * real
    nipd = _atan2(cross_imag, cross_real) / (SALSA_DELTA * _SALSA_BIN_INDEX)  # (..., M-1, 960, 64)
    return jnp.concatenate([log_spectrum, jnp.moveaxis(nipd, -3, -1)], axis=-1)


# --------------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------------

def stft(audio, window: str, *, validate: bool = True) -> jax.Array:
    """The shared STFT front end.

    Args:
      audio: (..., 96000, n_mics) of any float dtype (cast to float32) at 48 kHz,
        |audio| <= MAX_ABS_AUDIO.
      window: "symmetric" (numpy.hanning, used by log-mel and GCC-PHAT) or "periodic"
        (scipy.signal.get_window('hann'), used by SALSA-Lite), length 512.
      validate: check that a concrete input is finite and within MAX_ABS_AUDIO, on the device;
        a bad sample is then located and named in the ValueError.

    Returns:
      (..., 960, 257, n_mics) complex64: reflect padding of 256 samples, hop 100 samples, n_fft
      512, frames cut from 961 to 960 by `FRAME_TABLE`; bin k is k * 93.75 Hz.
    """
    if window not in WINDOWS:
        raise ValueError(f"stft: window must be one of {WINDOWS}, got {window!r}")
    return _stft_core(_check_audio(audio, "stft", validate), window)


def logmel(audio, *, validate: bool = True) -> jax.Array:
    """Log-mel spectrogram of every channel.

    Args:
      audio: (..., 96000, n_mics) of any float dtype (cast to float32) at 48 kHz,
        |audio| <= MAX_ABS_AUDIO.

    Returns:
      (..., 960, 64, n_mics) float32 in dB: `10*log10(max(1e-10, mel power))`, symmetric Hann,
      64 Slaney mel bands from 40 Hz to 24 kHz (`mel_filterbank`).
    """
    return _logmel_core(_check_audio(audio, "logmel", validate))


def gcc_phat(audio, pairs: Literal["reference", "all"] = "reference", *,
             validate: bool = True) -> jax.Array:
    """GCC-PHAT at lags -32..31 samples, plus the log-mel of mic 0 as the last channel.

    Channel p of the GCC part, for the pair (i, j) = pair p, is the inverse real FFT (length
    512) of the PHAT-weighted cross-spectrum `exp(i*angle(X_j * conj(X_i)))`, at lags
    -32..31 along the bin axis (bin l holds lag l - 32). With this sign a peak at a positive
    lag means the sound reaches mic j that many samples *after* mic i.

    Args:
      audio: (..., 96000, n_mics) of any float dtype (cast to float32) at 48 kHz,
        |audio| <= MAX_ABS_AUDIO.
      pairs: "reference": the pairs (0, n), n = 1..n_mics-1 (the reference's features);
        "all": every pair i < j in lexicographic order (`all_pairs`), which starts with the
        reference's pairs.

    Returns:
      (..., 960, 64, n_mics) for "reference" or (..., 960, 64, n_mics*(n_mics-1)/2 + 1) for
      "all", float32: the GCC channels, then the log-mel (dB) of mic 0.
    """
    if pairs not in ("reference", "all"):
        raise ValueError(f"gcc_phat: pairs must be 'reference' or 'all', got {pairs!r}")
    return _gcc_phat_core(_check_audio(audio, "gcc_phat", validate), pairs)


def salsa_lite(audio, *, validate: bool = True) -> jax.Array:
    """SALSA-Lite: log linear spectrogram of mic 0 and normalised phase differences.

    Periodic Hann window, bins 0..63 (0 to 5906.25 Hz).

    Args:
      audio: (..., 96000, n_mics) of any float dtype at 48 kHz (cast to float32 first, as the
        reference does), |audio| <= MAX_ABS_AUDIO.

    Returns:
      (..., 960, 64, n_mics) float32. Channel 0: `10*log10(max(1e-10, |X_0|^2))` in dB.
      Channel k >= 1: `angle(conj(X_0) * X_k) / (SALSA_DELTA * f)` with f the bin index
      (bin 0 uses f = 1); for bin f > 0 this is the path-length difference in metres,
      wrapped to [-pi, pi] in phase before the division (-pi where the cross-spectrum is a
      negative real with a -0 imaginary part, as numpy's `angle` gives; see `_atan2`).
    """
    return _salsa_lite_core(_check_audio(audio, "salsa_lite", validate))


def compute(name: str, audio, *, validate: bool = True) -> jax.Array:
    """The feature named `name` (one of FEATURES) of audio (..., 96000, n_mics)."""
    if name == "gcc_phat":
        return gcc_phat(audio, "reference", validate=validate)
    if name == "gcc_phat_all":
        return gcc_phat(audio, "all", validate=validate)
    if name == "salsa_lite":
        return salsa_lite(audio, validate=validate)
    if name == "logmel":
        return logmel(audio, validate=validate)
    raise ValueError(f"unknown feature {name!r}: expected one of {FEATURES}")


def num_channels(name: str, n_mics: int = C.N_MICS) -> int:
    """Output channel count C of feature `name` for `n_mics` microphones."""
    if name not in FEATURES:
        raise ValueError(f"unknown feature {name!r}: expected one of {FEATURES}")
    if n_mics < 2:
        raise ValueError(f"n_mics must be >= 2, got {n_mics}")
    if name == "gcc_phat_all":
        return n_mics * (n_mics - 1) // 2 + 1
    return n_mics
