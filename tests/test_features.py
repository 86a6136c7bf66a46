"""Parity of asd_jax.features with a literal numpy + librosa transcription of SPEC section 3.

The reference below follows the SPEC step by step, the way the reference system computes its
features: librosa STFT per channel in complex64 (librosa multiplies by the float64 window and
transforms in float64 before storing complex64), GCC in complex128 with an inverse real FFT, the
librosa mel filterbank and `power_to_db`, and its own 961 -> 960 frame table.

Tolerances (SPEC section 3, float32 JAX vs this float64 reference):
  * GCC-PHAT: 1e-4 absolute everywhere.
  * dB values: 1e-4 absolute wherever the power is within 30 dB of the frame's largest value.
    Below that the float32 FFT's absolute error (~1e-7 of the frame's largest magnitude, the
    best float32 can do) dominates, so there the check is on magnitudes: |sqrt(P) - sqrt(P_ref)|
    <= 1e-6 * the frame's largest sqrt(P).
  * NIPD is a wrapped phase: it is multiplied back by delta*f and the difference wrapped into
    (-pi, pi]; 1e-4 rad where both spectra are within 30 dB of the frame's peak magnitude, and
    the float32 error bound 1e-6 * peak * (1/|X_0| + 1/|X_k|) elsewhere.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import librosa
import numpy as np
import pyroomacoustics as pra
import pytest
import scipy.signal

from asd_jax import features

FS = 48_000
N_SAMPLES = 96_000
N_FFT = 512
HOP = 100
N_MICS = 16
DELTA = 2.0 * np.pi * FS / (N_FFT * 343.0)
PEAK_RATIO_DB = 30.0
FLOAT32_STFT_ERROR = 1e-6  # relative to the frame's largest magnitude


# --------------------------------------------------------------------------------------------
# The reference, written from SPEC section 3.
# --------------------------------------------------------------------------------------------

def ref_frame_table() -> np.ndarray:
    return np.array([int(np.round(n / (960 / 961))) for n in range(960)])


def ref_stft(audio: np.ndarray, window: np.ndarray) -> np.ndarray:
    """(96000, M) -> (M, 257, 960) complex64, librosa per channel, cut to 960 frames."""
    spectra = [librosa.stft(audio[:, c], n_fft=N_FFT, hop_length=HOP, window=window, center=True,
                            pad_mode="reflect", dtype=np.complex64) for c in range(audio.shape[1])]
    return np.stack(spectra)[:, :, ref_frame_table()]


def ref_power_to_db(power: np.ndarray) -> np.ndarray:
    return librosa.power_to_db(power, ref=1.0, amin=1e-10, top_db=None)


def ref_logmel_power(spectrum: np.ndarray) -> np.ndarray:
    """(257, 960) complex -> (64, 960) mel power with librosa's default (Slaney) filterbank."""
    mel = librosa.filters.mel(sr=FS, n_fft=N_FFT, n_mels=64, fmin=40, fmax=24000)
    return mel @ (np.abs(spectrum) ** 2)


def ref_phat(cross: np.ndarray) -> np.ndarray:
    """exp(i*angle(R)) with the SPEC's value 1+0j where R == 0 (also for a signed zero)."""
    return np.where(cross == 0, 1.0 + 0.0j, np.exp(1j * np.angle(cross)))


def ref_gcc_phat(audio: np.ndarray, pairs: list[tuple[int, int]] | None = None) -> dict:
    """Returns {'gcc': (960, 64, P), 'mel_power': (960, 64), 'logmel': (960, 64)}."""
    spec = ref_stft(audio.astype(np.float32), np.hanning(N_FFT))
    if pairs is None:
        pairs = [(0, n) for n in range(1, audio.shape[1])]
    channels = []
    for i, j in pairs:
        cross = spec[j].astype(np.complex128) * np.conj(spec[i].astype(np.complex128))  # (257, T)
        weight = ref_phat(cross)
        lags = []
        for t in range(weight.shape[1]):  # frame by frame, as the reference does
            cc = np.fft.irfft(weight[:, t], n=N_FFT)
            lags.append(np.concatenate([cc[-32:], cc[:32]]))
        channels.append(np.stack(lags))
    mel_power = ref_logmel_power(spec[0]).T
    return {"gcc": np.stack(channels, axis=-1), "mel_power": mel_power,
            "logmel": ref_power_to_db(mel_power)}


def ref_salsa_lite(audio: np.ndarray) -> dict:
    """Returns {'spec': (M, 960, 64) complex, 'logspec': (960, 64), 'nipd': (960, 64, M-1)}."""
    audio = audio.astype(np.float32)
    spec = ref_stft(audio, scipy.signal.get_window("hann", N_FFT))
    lower, cutoff = int(np.floor(40 * N_FFT / FS)), int(np.floor(6000 * N_FFT / FS))
    spec = spec[:, lower:cutoff, :].transpose(0, 2, 1)  # (M, 960, 64)
    freq = np.arange(lower, cutoff, dtype=np.float64)
    freq[0] = 1.0
    cross = np.conj(spec[0]).astype(np.complex128) * spec[1:]
    phase = np.where(cross == 0, 0.0, np.angle(cross))
    nipd = phase / (DELTA * freq)
    return {"spec": spec, "logspec": ref_power_to_db(np.abs(spec[0]) ** 2),
            "nipd": nipd.transpose(1, 2, 0)}


# --------------------------------------------------------------------------------------------
# Test signals.
# --------------------------------------------------------------------------------------------

def grid_array(origin=(3.0, 1.0, 1.5), spacing=0.05) -> np.ndarray:
    """(3, 16) mic positions: a 4 x 4 grid in a vertical plane; the largest distance between
    two mics is 0.212 m, i.e. 29.7 samples at 48 kHz, so every TDOA is within +-31 lags."""
    ix, iz = np.meshgrid(np.arange(4), np.arange(4), indexing="ij")
    offsets = np.stack([ix.ravel() * spacing, np.zeros(16), iz.ravel() * spacing])
    return np.asarray(origin)[:, None] + offsets


def speech_like(n_samples: int, rng: np.random.Generator) -> np.ndarray:
    """A voiced-speech-like source: gliding harmonics to 4 kHz under a 4 Hz syllable envelope,
    with some breath noise."""
    t = np.arange(n_samples) / FS
    f0 = 150.0 + 50.0 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / FS
    voiced = sum(np.sin(h * phase) / h for h in range(1, int(4000 / 200)))
    envelope = 0.5 * (1 + np.sin(2 * np.pi * 4.0 * t)) ** 2
    return envelope * voiced + 0.05 * rng.standard_normal(n_samples)


@functools.lru_cache(maxsize=None)
def simulate(source_xyz: tuple[float, float, float], rt60_s: float | None, kind: str = "noise",
             seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A point source in a 6 x 5 x 3 m shoebox. Returns (audio (96000, 16) float32, mics (3, 16)).

    rt60_s None is anechoic. A small white noise floor (-60 dB) is added at the mics.
    """
    rng = np.random.default_rng(seed)
    room_dim = [6.0, 5.0, 3.0]
    mics = grid_array()
    if rt60_s is None:
        room = pra.ShoeBox(room_dim, fs=FS, max_order=0)
    else:
        absorption, max_order = pra.inverse_sabine(rt60_s, room_dim)
        room = pra.ShoeBox(room_dim, fs=FS, materials=pra.Material(absorption),
                           max_order=min(max_order, 12))
    n_source = N_SAMPLES + FS // 2
    signal = rng.standard_normal(n_source) if kind == "noise" else speech_like(n_source, rng)
    room.add_source(list(source_xyz), signal=signal)
    room.add_microphone_array(mics)
    room.simulate()
    audio = room.mic_array.signals[:, FS // 4: FS // 4 + N_SAMPLES].T
    audio = 0.5 * audio / np.abs(audio).max()
    audio = audio + 1e-3 * 0.5 * rng.standard_normal(audio.shape)
    return audio.astype(np.float32), mics


def white_noise(seed=0, n_mics=N_MICS) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal((N_SAMPLES, n_mics))).astype(np.float32)


def signal_cases() -> dict[str, np.ndarray]:
    noise = white_noise(1)
    dead = noise.copy()
    dead[:, 5] = 0.0
    clipped = np.clip(10.0 * noise, -1.0, 1.0)
    speech, _ = simulate((1.5, 3.0, 1.6), 0.3, "speech")
    return {"white_noise": noise, "reverberant_speech": speech, "silence": np.zeros_like(noise),
            "dead_channel": dead, "clipped": clipped}


CASES = ("white_noise", "reverberant_speech", "silence", "dead_channel", "clipped")


@functools.lru_cache(maxsize=None)
def case(name: str) -> np.ndarray:
    return signal_cases()[name]


# --------------------------------------------------------------------------------------------
# Comparison helpers.
# --------------------------------------------------------------------------------------------

def assert_db_close(ours_db: np.ndarray, ref_power: np.ndarray):
    """ours_db, ref_power: (960, bands). See the module docstring for the tolerance."""
    ref_db = ref_power_to_db(ref_power)
    frame_peak = ref_power.max(axis=-1, keepdims=True)
    strong = ref_power >= frame_peak * 10 ** (-PEAK_RATIO_DB / 10)
    error = np.abs(ours_db.astype(np.float64) - ref_db)
    assert np.isfinite(ours_db).all()
    assert error[strong].max(initial=0.0) <= 1e-4, f"dB error {error[strong].max()} in strong bins"
    ours_magnitude = np.sqrt(10 ** (ours_db.astype(np.float64) / 10))
    ref_magnitude = np.sqrt(np.maximum(ref_power, 1e-10))
    bound = FLOAT32_STFT_ERROR * np.sqrt(frame_peak) + 1e-9
    assert (np.abs(ours_magnitude - ref_magnitude) <= bound).all()


def wrapped(phase: np.ndarray) -> np.ndarray:
    """Wraps into (-pi, pi]."""
    return np.pi - np.mod(np.pi - phase, 2 * np.pi)


# --------------------------------------------------------------------------------------------
# Static tables.
# --------------------------------------------------------------------------------------------

def test_frame_table_drops_only_frame_481():
    np.testing.assert_array_equal(features.FRAME_TABLE, ref_frame_table())
    assert sorted(set(range(961)) - set(features.FRAME_TABLE.tolist())) == [481]


def test_windows_match_numpy_and_scipy():
    np.testing.assert_allclose(features.hann("symmetric"), np.hanning(512), atol=1e-15)
    np.testing.assert_allclose(features.hann("periodic"), scipy.signal.get_window("hann", 512),
                               atol=1e-15)


@pytest.mark.parametrize("kwargs", [
    {},
    {"sample_rate_hz": 16000, "n_fft": 1024, "n_mels": 40, "fmin_hz": 0.0, "fmax_hz": 8000.0},
    {"sample_rate_hz": 22050, "n_fft": 2048, "n_mels": 128, "fmin_hz": 300.0, "fmax_hz": 5000.0},
])
def test_mel_filterbank_equals_librosa(kwargs):
    ours = features.mel_filterbank(**kwargs)
    sr = kwargs.get("sample_rate_hz", FS)
    theirs = librosa.filters.mel(sr=sr, n_fft=kwargs.get("n_fft", N_FFT),
                                 n_mels=kwargs.get("n_mels", 64), fmin=kwargs.get("fmin_hz", 40.0),
                                 fmax=kwargs.get("fmax_hz", 24000.0))
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs.T, rtol=1e-6, atol=1e-9)


def test_all_pairs_order():
    pairs = features.all_pairs(16)
    assert pairs.shape == (120, 2)
    assert [tuple(p) for p in pairs] == [(i, j) for i in range(16) for j in range(i + 1, 16)]


@pytest.mark.parametrize("name, n_mics, expected", [
    ("gcc_phat", 16, 16), ("gcc_phat_all", 16, 121), ("salsa_lite", 16, 16), ("logmel", 16, 16),
    ("gcc_phat", 4, 4), ("gcc_phat_all", 4, 7), ("salsa_lite", 3, 3), ("logmel", 2, 2),
])
def test_num_channels(name, n_mics, expected):
    assert features.num_channels(name, n_mics) == expected


# --------------------------------------------------------------------------------------------
# Parity with the reference.
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("window, scipy_window", [("symmetric", None), ("periodic", "hann")])
def test_stft_matches_librosa(window, scipy_window):
    audio = case("reverberant_speech")[:, :3]
    ref_window = np.hanning(N_FFT) if scipy_window is None else scipy.signal.get_window("hann", N_FFT)
    ref = ref_stft(audio, ref_window)  # (M, 257, 960)
    ours = np.asarray(features.stft(audio, window))  # (960, 257, M)
    assert ours.dtype == np.complex64 and ours.shape == (960, 257, 3)
    ref = ref.transpose(2, 1, 0)
    peak = np.abs(ref).max(axis=1, keepdims=True)
    assert (np.abs(ours - ref) <= FLOAT32_STFT_ERROR * peak).all()


@pytest.mark.parametrize("name", CASES)
def test_gcc_phat_matches_reference(name):
    audio = case(name)
    ours = np.asarray(features.gcc_phat(audio))
    assert ours.shape == (960, 64, 16) and ours.dtype == np.float32
    ref = ref_gcc_phat(audio)
    np.testing.assert_allclose(ours[..., :15], ref["gcc"], rtol=0, atol=1e-4)
    assert_db_close(ours[..., 15], ref["mel_power"])


@pytest.mark.parametrize("name", CASES)
def test_salsa_lite_matches_reference(name):
    audio = case(name)
    ours = np.asarray(features.salsa_lite(audio))
    assert ours.shape == (960, 64, 16) and ours.dtype == np.float32
    ref = ref_salsa_lite(audio)
    assert_db_close(ours[..., 0], np.abs(ref["spec"][0]) ** 2)
    freq = np.maximum(np.arange(64), 1)[None, :, None]
    error = np.abs(wrapped(DELTA * freq * (ours[..., 1:].astype(np.float64) - ref["nipd"])))
    magnitude = np.abs(ref["spec"]).transpose(1, 2, 0)  # (960, 64, M)
    peak = magnitude.max(axis=1, keepdims=True)
    strong = magnitude >= peak * 10 ** (-PEAK_RATIO_DB / 20)
    pair_strong = strong[..., :1] & strong[..., 1:]
    assert error[pair_strong].max(initial=0.0) <= 1e-4
    inverse = 1.0 / np.maximum(magnitude, 1e-30)
    bound = FLOAT32_STFT_ERROR * peak[..., :1] * (inverse[..., :1] + inverse[..., 1:])
    assert (error <= np.maximum(bound, 1e-4)).all()


@pytest.mark.parametrize("name", ["white_noise", "reverberant_speech"])
def test_salsa_lite_bin0_keeps_the_sign_of_pi(name):
    """Bin 0's cross-spectrum is real with a signed-zero imaginary part, so its phase is 0 or
    +-pi, and numpy's angle takes the sign of pi from the sign of that zero. The wrapped
    comparison above cannot tell pi from -pi, so bin 0 is compared here as it is."""
    audio = case(name)[:, :4]
    ours = DELTA * np.asarray(features.salsa_lite(audio))[:, 0, 1:].astype(np.float64)
    ref = DELTA * ref_salsa_lite(audio)["nipd"][:, 0, :]
    np.testing.assert_allclose(np.abs(ref[np.abs(ref) > 1]), np.pi, rtol=1e-12)
    assert (ref < -3).any() and (ref > 3).any()  # both signs of pi occur
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["white_noise", "reverberant_speech", "clipped"])
def test_logmel_matches_reference(name):
    audio = case(name)[:, :4]
    ours = np.asarray(features.logmel(audio))
    assert ours.shape == (960, 64, 4) and ours.dtype == np.float32
    spec = ref_stft(audio, np.hanning(N_FFT))
    for c in range(4):
        assert_db_close(ours[..., c], ref_logmel_power(spec[c]).T)


def test_gcc_phat_all_pairs_matches_reference():
    audio = case("reverberant_speech")[:, :5]
    pairs = [tuple(p) for p in features.all_pairs(5)]
    ours = np.asarray(features.gcc_phat(audio, pairs="all"))
    assert ours.shape == (960, 64, 11)
    ref = ref_gcc_phat(audio, pairs)
    np.testing.assert_allclose(ours[..., :10], ref["gcc"], rtol=0, atol=1e-4)
    np.testing.assert_array_equal(ours[..., :4], np.asarray(features.gcc_phat(audio))[..., :4])


def test_silence_gives_lag0_impulse_and_floor():
    audio = np.zeros((N_SAMPLES, 4), np.float32)
    gcc = np.asarray(features.gcc_phat(audio))
    impulse = np.zeros(64)
    impulse[32] = 1.0  # lag 0
    np.testing.assert_allclose(gcc[..., :3], np.broadcast_to(impulse[None, :, None], (960, 64, 3)),
                               atol=1e-6)
    np.testing.assert_array_equal(gcc[..., 3], -100.0)
    salsa = np.asarray(features.salsa_lite(audio))
    np.testing.assert_array_equal(salsa[..., 0], -100.0)
    np.testing.assert_array_equal(salsa[..., 1:], 0.0)


# --------------------------------------------------------------------------------------------
# Physics.
# --------------------------------------------------------------------------------------------

SOURCES = ((1.0, 3.5, 1.6), (1.2, 1.0, 1.2), (1.5, 2.2, 1.8))


def geometric_tdoa_samples(source, mics) -> np.ndarray:
    """(16,) arrival time of each mic minus that of mic 0, in samples."""
    distance = np.linalg.norm(mics - np.asarray(source)[:, None], axis=0)
    return (distance - distance[0]) / pra.constants.get("c") * FS


def peak_lags(gcc: np.ndarray) -> np.ndarray:
    """(960, 64, P) -> (P,) lag of the frame-averaged GCC peak."""
    return np.argmax(gcc.mean(axis=0), axis=0) - 32


@pytest.mark.parametrize("source", SOURCES)
def test_gcc_peak_is_geometric_tdoa_anechoic(source):
    audio, mics = simulate(source, None)
    tdoa = geometric_tdoa_samples(source, mics)
    assert np.abs(tdoa).max() < 31
    lags = peak_lags(np.asarray(features.gcc_phat(audio, pairs="all"))[..., :-1])
    pairs = features.all_pairs(16)
    expected = tdoa[pairs[:, 1]] - tdoa[pairs[:, 0]]
    assert (np.abs(lags - expected) <= 1).all(), (lags, np.round(expected, 1))


@pytest.mark.slow
@pytest.mark.parametrize("source", SOURCES)
def test_gcc_peak_is_geometric_tdoa_reverberant(source):
    audio, mics = simulate(source, 0.3)
    tdoa = geometric_tdoa_samples(source, mics)[1:]
    lags = peak_lags(np.asarray(features.gcc_phat(audio))[..., :15])
    assert (np.abs(lags - tdoa) <= 1).sum() >= 13, (lags, np.round(tdoa, 1))


def test_salsa_nipd_is_path_difference_anechoic():
    """At low bins (no phase wrapping) the NIPD is the path-length difference d_0 - d_k in m."""
    source = SOURCES[0]
    audio, mics = simulate(source, None)
    nipd = np.asarray(features.salsa_lite(audio))[..., 1:]  # (960, 64, 15)
    distance = np.linalg.norm(mics - np.asarray(source)[:, None], axis=0)
    expected = distance[0] - distance[1:]
    measured = np.median(nipd[:, 2:9, :], axis=(0, 1))
    np.testing.assert_allclose(measured, expected, atol=0.01)


# --------------------------------------------------------------------------------------------
# Batching, dtypes, tracing.
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", features.FEATURES)
def test_batch_equals_one_by_one(name):
    batch = np.stack([white_noise(seed, n_mics=4) for seed in range(4)]).reshape(2, 2, N_SAMPLES, 4)
    ours = np.asarray(features.compute(name, batch))
    assert ours.shape == (2, 2, 960, 64, features.num_channels(name, 4))
    for i in range(2):
        for j in range(2):
            np.testing.assert_allclose(ours[i, j], np.asarray(features.compute(name, batch[i, j])),
                                       rtol=0, atol=2e-5)


_CORES = {"gcc_phat": (features._gcc_phat_core, ("reference",)),
          "gcc_phat_all": (features._gcc_phat_core, ("all",)),
          "salsa_lite": (features._salsa_lite_core, ()),
          "logmel": (features._logmel_core, ())}


@pytest.mark.parametrize("name", features.FEATURES)
def test_cpu_chunk_by_chunk_path_equals_the_batched_path(name):
    """On the CPU a batch goes through lax.map; accelerators run the batched computation."""
    core, args = _CORES[name]
    batch = np.stack([white_noise(seed, n_mics=4) for seed in range(3)])
    batched = jax.jit(core.__wrapped__.__wrapped__, static_argnums=tuple(range(1, 1 + len(args))))
    np.testing.assert_allclose(np.asarray(features.compute(name, batch)),
                               np.asarray(batched(jnp.asarray(batch), *args)), rtol=0, atol=2e-5)
    traced = core.trace(jnp.asarray(batch), *args)
    assert "while" in traced.lower(lowering_platforms=("cpu",)).as_text()
    assert "while" not in traced.lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("name", features.FEATURES)
def test_float64_input_equals_float32_input(name):
    audio64 = 0.1 * np.random.default_rng(7).standard_normal((N_SAMPLES, 3))
    ours64 = np.asarray(features.compute(name, audio64))
    ours32 = np.asarray(features.compute(name, audio64.astype(np.float32)))
    assert ours64.dtype == np.float32
    np.testing.assert_array_equal(ours64, ours32)


def test_callable_inside_jit():
    audio = white_noise(3, n_mics=3)

    @jax.jit
    def both(x):
        return features.gcc_phat(x), features.salsa_lite(x)

    gcc, salsa = both(jnp.asarray(audio))
    np.testing.assert_allclose(np.asarray(gcc), np.asarray(features.gcc_phat(audio)), atol=2e-5)
    np.testing.assert_allclose(np.asarray(salsa), np.asarray(features.salsa_lite(audio)), atol=2e-5)


# --------------------------------------------------------------------------------------------
# Errors.
# --------------------------------------------------------------------------------------------

PUBLIC = {
    "gcc_phat": features.gcc_phat,
    "salsa_lite": features.salsa_lite,
    "logmel": features.logmel,
    "stft": lambda x, **kw: features.stft(x, "periodic", **kw),
}


@pytest.mark.parametrize("fn", PUBLIC)
@pytest.mark.parametrize("shape, message", [
    ((N_SAMPLES,), r"has shape \(96000,\) \(rank 1\); expected \(\.\.\., 96000, n_mics\)"),
    ((48000, 4), r"has 48000 samples .*expected \(\.\.\., 96000, n_mics\)"),
    ((N_SAMPLES, 1), r"has 1 microphone\(s\) .*n_mics >= 2"),
    ((4, N_SAMPLES), r"has 4 samples"),
])
def test_bad_shapes_are_rejected(fn, shape, message):
    with pytest.raises(ValueError, match=f"{fn}: audio {message}"):
        PUBLIC[fn](np.zeros(shape, np.float32))


def test_integer_audio_is_rejected():
    with pytest.raises(ValueError, match="dtype int16; expected .* floating point"):
        features.logmel(np.zeros((N_SAMPLES, 2), np.int16))


@pytest.mark.parametrize("on_device", [False, True])
@pytest.mark.parametrize("fn", PUBLIC)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_sample_is_located(fn, bad, on_device):
    audio = np.zeros((2, N_SAMPLES, 3), np.float32)
    audio[1, 1234, 2] = bad
    audio[1, 5000, 0] = bad
    if on_device:  # checked on the device first, then located on the host
        audio = jax.device_put(audio)
    with pytest.raises(ValueError, match=r"non-finite sample .* at chunk \(1,\), channel 2, "
                                         r"sample 1234 \(2 non-finite in all\)"):
        PUBLIC[fn](audio)


def test_non_finite_single_chunk_message_and_opt_out():
    audio = white_noise(5, n_mics=2).astype(np.float64)
    audio[77, 1] = np.nan
    with pytest.raises(ValueError, match=r"gcc_phat: audio has a non-finite sample \(nan\) at "
                                         r"channel 1, sample 77"):
        features.gcc_phat(audio)
    assert np.isnan(np.asarray(features.gcc_phat(audio, validate=False))).any()


def test_float64_sample_beyond_float32_range_is_refused():
    audio = np.zeros((N_SAMPLES, 2), np.float64)
    audio[300, 0] = 1e39  # finite in float64, inf once converted to the float32 the core uses
    with pytest.raises(ValueError, match=r"salsa_lite: audio has a non-finite sample \(a value "
                                         r"beyond float32's range\) \(1e\+39\) at channel 0, "
                                         r"sample 300 \(1 non-finite in all\)"):
        features.salsa_lite(audio)


@pytest.mark.parametrize("fn", PUBLIC)
def test_sample_too_loud_for_float32_spectra_is_refused(fn):
    """Finite samples beyond MAX_ABS_AUDIO are refused, located: at ~1e19 SALSA-Lite's float32
    cross products overflow (NaN features) and GCC-PHAT loses accuracy."""
    audio = np.zeros((2, N_SAMPLES, 3), np.float32)
    audio[0, 4321, 1] = -1e19
    audio[1, 10, 0] = 2e15
    with pytest.raises(ValueError, match=r"audio has a sample beyond \+-MAX_ABS_AUDIO "
                                         r"\(-1e\+19\) at chunk \(0,\), channel 1, sample 4321 "
                                         r"\(2 that far out in all\); expected \|audio\| <= 1e\+15"):
        PUBLIC[fn](audio)


def test_loudest_accepted_audio_gives_the_features_of_the_same_audio_scaled_down():
    """At the bound, GCC-PHAT and SALSA-Lite's phases are those of audio at unit scale and the
    dB channels are shifted by 20 log10(scale): nothing overflowed."""
    noise = white_noise(3, n_mics=4)
    quiet = (noise / (1.01 * np.abs(noise).max())).astype(np.float32)  # peak just below 1
    scale = 2.0 ** np.floor(np.log2(features.MAX_ABS_AUDIO))  # exact: rounding as at scale 1
    loud = quiet * np.float32(scale)
    assert features.MAX_ABS_AUDIO / 2 <= np.abs(loud).max() <= features.MAX_ABS_AUDIO
    shift_db = 20.0 * np.log10(scale)
    for fn in (features.gcc_phat, features.salsa_lite):
        low, high = np.asarray(fn(quiet)), np.asarray(fn(loud))
        assert np.isfinite(high).all()
        db = -1 if fn is features.gcc_phat else 0
        np.testing.assert_allclose(high[..., db], low[..., db] + shift_db, atol=2e-2)
        phases = np.delete(high, db, axis=-1), np.delete(low, db, axis=-1)
        if fn is features.salsa_lite:  # bin 0's phase is +-pi by the sign of a zero: skip it
            phases = tuple(p[..., 1:, :] for p in phases)
        np.testing.assert_allclose(*phases, atol=1e-4)


def test_atan2_matches_numpy_to_its_stated_error():
    """`_atan2` against float64 numpy over magnitudes of 40 decades, every quadrant and axis, and
    numpy's signed-zero conventions, to the ~3e-7 rad its docstring states."""
    rng = np.random.default_rng(11)
    mags = 10.0 ** rng.uniform(-20, 20, (2, 200_000))
    y, x = (mags * rng.choice([-1.0, 1.0], mags.shape)).astype(np.float32)
    ours = np.asarray(features._atan2(jnp.asarray(y), jnp.asarray(x)), np.float64)
    assert np.abs(ours - np.arctan2(y.astype(np.float64), x.astype(np.float64))).max() <= 3.5e-7
    # Axes: numpy's values, signed zeros included (bin 0 of a cross-spectrum is real, y = +-0).
    y_axes = np.array([0.0, -0.0, 0.0, -0.0, 1.0, -1.0, 2.0], np.float32)
    x_axes = np.array([-1.0, -1.0, 3.0, 3.0, 0.0, 0.0, -0.0], np.float32)
    ours = np.asarray(features._atan2(jnp.asarray(y_axes), jnp.asarray(x_axes)))
    np.testing.assert_array_equal(ours, np.arctan2(y_axes, x_axes))
    np.testing.assert_array_equal(np.signbit(ours), np.signbit(np.arctan2(y_axes, x_axes)))
    # The origin, either zero's sign: 0, the angle of a zero cross-spectrum (SPEC's angle(0) = 0;
    # numpy gives +-pi for x = -0).
    zeros = np.array([0.0, -0.0], np.float32)
    y0, x0 = np.meshgrid(zeros, zeros)
    np.testing.assert_array_equal(
        np.asarray(features._atan2(jnp.asarray(y0.ravel()), jnp.asarray(x0.ravel()))), 0.0)


def test_bad_options_are_rejected():
    audio = np.zeros((N_SAMPLES, 2), np.float32)
    with pytest.raises(ValueError, match="pairs must be 'reference' or 'all', got 'some'"):
        features.gcc_phat(audio, pairs="some")
    with pytest.raises(ValueError, match="window must be one of .*got 'hamming'"):
        features.stft(audio, "hamming")
    with pytest.raises(ValueError, match="unknown feature 'mfcc'"):
        features.compute("mfcc", audio)
    with pytest.raises(ValueError, match="unknown feature 'mfcc'"):
        features.num_channels("mfcc")
    with pytest.raises(ValueError, match="n_mics must be >= 2, got 1"):
        features.num_channels("logmel", 1)


@pytest.mark.parametrize("name", ["gcc_phat", "logmel"])
def test_matrix_products_are_lowered_at_full_float32_precision(name):
    """The mel filterbank and the GCC lag transform are matrix products: with the global default
    precision (TF32 on NVIDIA GPUs) they would be ~1e-3 off the reference; they ask for HIGHEST."""
    audio = np.zeros((1, FS * 2, 4), np.float32)
    with jax.default_matmul_precision("default"):
        text = jax.jit(lambda a: features.compute(name, a, validate=False)).lower(audio).as_text()
    products = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
    assert products  # the test looks at something
    assert all("HIGHEST" in line for line in products), products
