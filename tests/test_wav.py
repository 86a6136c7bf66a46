"""asd_jax.data.wav against libsndfile (the `soundfile` package, test-only)."""

import struct

import numpy as np
import pytest
import soundfile

from asd_jax.data import wav

SUBTYPES = ("PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE")


def _signal(rng, n, channels, subtype):
    """Full-scale test data: extreme integer codes for PCM, values beyond [-1, 1] for floats."""
    if subtype == "PCM_32":
        x = rng.integers(-2**31, 2**31, size=(n, channels), dtype=np.int64).astype(np.int32)
        x[:2] = [[-2**31], [2**31 - 1]]
        return x
    x = rng.uniform(-1.0, 1.0, size=(n, channels))
    x[:2] = [[-1.0], [1.0 - 2**-23]]
    if subtype in ("FLOAT", "DOUBLE"):
        x[2] = 1.5  # float files keep values outside [-1, 1]
    return x


@pytest.mark.parametrize("container", ["WAV", "WAVEX"])
@pytest.mark.parametrize("subtype", SUBTYPES)
@pytest.mark.parametrize("channels", [1, 3])
def test_read_matches_libsndfile(tmp_path, container, subtype, channels):
    path = tmp_path / "x.wav"
    rng = np.random.default_rng([SUBTYPES.index(subtype), channels, container == "WAVEX"])
    soundfile.write(path, _signal(rng, 1001, channels, subtype), 48000, subtype=subtype, format=container)
    expected, rate = soundfile.read(path, dtype="float32", always_2d=channels > 1)
    got, got_rate = wav.read_wav(path)
    assert got_rate == rate == 48000
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)

    info, sf_info = wav.read_wav_info(path), soundfile.info(path)
    assert (info.sample_rate, info.channels, info.frames, info.format) == (
        sf_info.samplerate, sf_info.channels, sf_info.frames, sf_info.subtype)


def test_ranged_read(tmp_path):
    path = tmp_path / "x.wav"
    soundfile.write(path, np.random.default_rng(1).uniform(-1, 1, (500, 2)), 48000, subtype="PCM_24")
    full, _ = soundfile.read(path, dtype="float32")
    part, _ = wav.read_wav(path, offset=123, count=77)
    np.testing.assert_array_equal(part, full[123:200])
    tail, _ = wav.read_wav(path, offset=450, count=100)  # past the end: what exists
    np.testing.assert_array_equal(tail, full[450:])
    beyond, _ = wav.read_wav(path, offset=900, count=10)
    assert beyond.shape == (0, 2)


@pytest.mark.parametrize("subtype", ["PCM_16", "PCM_24", "FLOAT"])
def test_rf64_matches_libsndfile(tmp_path, subtype):
    """RF64 (recordings over 4 GiB): the data chunk's 32-bit size is 0xFFFFFFFF, the real one
    is in the ds64 chunk."""
    path = tmp_path / "long.wav"
    rng = np.random.default_rng(SUBTYPES.index(subtype))
    soundfile.write(path, _signal(rng, 1001, 16, subtype), 48000, subtype=subtype, format="RF64")
    raw = path.read_bytes()
    assert raw[:4] == b"RF64" and raw[12:16] == b"ds64"
    assert raw[raw.index(b"data") + 4:raw.index(b"data") + 8] == b"\xff\xff\xff\xff"
    expected, _ = soundfile.read(path, dtype="float32")
    got, rate = wav.read_wav(path)
    assert rate == 48000 and got.shape == expected.shape == (1001, 16)
    np.testing.assert_array_equal(got, expected)
    info = wav.read_wav_info(path)
    assert (info.channels, info.frames, info.format) == (16, 1001, subtype)
    part, _ = wav.read_wav(path, offset=500, count=123, info=info)  # ranged reads stream too
    np.testing.assert_array_equal(part, expected[500:623])


def test_rf64_sizes_come_from_ds64(tmp_path):
    """A hand-made RF64 file: chunk sizes of 0xFFFFFFFF are read from ds64 (data, and a table
    entry for another chunk); an RF64 file without ds64 is refused by name."""
    samples = np.arange(-6, 6, dtype="<i2")
    fmt = struct.pack("<HHIIHH", 1, 2, 48000, 192000, 4, 16)
    junk = b"x" * 6
    ds64 = struct.pack("<QQQI", 0, samples.nbytes, samples.size // 2, 1) + struct.pack(
        "<4sQ", b"junk", len(junk))
    body = (b"WAVE" + b"ds64" + struct.pack("<I", len(ds64)) + ds64
            + b"fmt " + struct.pack("<I", 16) + fmt
            + b"junk" + struct.pack("<I", 0xFFFFFFFF) + junk
            + b"data" + struct.pack("<I", 0xFFFFFFFF) + samples.tobytes())
    path = tmp_path / "hand.wav"
    path.write_bytes(b"RF64" + struct.pack("<I", 0xFFFFFFFF) + body + b"trailing")
    got, _ = wav.read_wav(path)
    np.testing.assert_array_equal(got, samples.reshape(-1, 2) / 32768.0)

    path.write_bytes(b"RF64" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE" + b"fmt " + struct.pack("<I", 16)
                     + fmt + b"data" + struct.pack("<I", 0xFFFFFFFF) + samples.tobytes())
    with pytest.raises(wav.WavError, match=r"hand\.wav: an RF64 file must start with a ds64 chunk"):
        wav.read_wav_info(path)

    # A table of 2 entries in a ds64 chunk with room for 1 (a corrupt header).
    short_table = ds64[:24] + struct.pack("<I", 2) + ds64[28:]
    path.write_bytes(b"RF64" + struct.pack("<I", 0xFFFFFFFF) + body.replace(ds64, short_table))
    with pytest.raises(wav.WavError, match=r"hand\.wav: ds64 chunk of 40 bytes is too short for its "
                                           r"2-entry table"):
        wav.read_wav_info(path)


def test_odd_sized_chunk_before_data(tmp_path):
    """A chunk of odd size is followed by a pad byte (RIFF rule)."""
    samples = np.array([0, 1, -1, 32767, -32768], "<i2")
    fmt = struct.pack("<HHIIHH", 1, 1, 48000, 96000, 2, 16)
    body = (b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"junk" + struct.pack("<I", 3) + b"abc\0"
            + b"data" + struct.pack("<I", samples.nbytes) + samples.tobytes())
    path = tmp_path / "odd.wav"
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    got, _ = wav.read_wav(path)
    np.testing.assert_array_equal(got, soundfile.read(path, dtype="float32")[0])
    np.testing.assert_array_equal(got, samples / 32768.0)


def test_truncated_file_names_the_file(tmp_path):
    path = tmp_path / "cut.wav"
    soundfile.write(path, np.zeros(1000), 48000, subtype="PCM_16")
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(wav.WavError, match=r"cut\.wav is truncated: its data chunk declares 2000 bytes"):
        wav.read_wav_info(path)
    path.write_bytes(data[:30])
    with pytest.raises(wav.WavError, match=r"cut\.wav"):
        wav.read_wav(path)


def test_partial_frame_is_an_error(tmp_path):
    path = tmp_path / "partial.wav"
    soundfile.write(path, np.zeros((10, 2)), 48000, subtype="PCM_16")
    data = bytearray(path.read_bytes())
    at = data.index(b"data")
    data[at + 4:at + 8] = struct.pack("<I", 39)  # 39 bytes: not whole 4-byte frames
    path.write_bytes(bytes(data[:at + 8 + 39]))
    with pytest.raises(wav.WavError, match="not a whole number of 4-byte frames"):
        wav.read_wav_info(path)


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.wav does not exist"):
        wav.read_wav(tmp_path / "nothere.wav")
    text = tmp_path / "text.wav"
    text.write_text("hello, this is not audio at all")
    with pytest.raises(wav.WavError, match=r"text\.wav is not a RIFF/WAVE or RF64 file"):
        wav.read_wav(text)
    ulaw = tmp_path / "ulaw.wav"
    soundfile.write(ulaw, np.zeros(10), 8000, subtype="ULAW")
    with pytest.raises(wav.WavError, match=r"ulaw\.wav: unsupported sample format \(format tag 0x0007"):
        wav.read_wav_info(ulaw)
