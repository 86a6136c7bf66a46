"""asd_jax.data.wav against libsndfile (the `soundfile` package, test-only)."""

import errno
import os
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


@pytest.mark.parametrize("riff_id", [b"RF64", b"BW64"])  # EBU Tech 3306 and its BW64 spelling (3392)
def test_rf64_sizes_come_from_ds64(tmp_path, riff_id):
    """A hand-made RF64 file: chunk sizes of 0xFFFFFFFF are read from ds64 (data, and a table
    entry for another chunk), other sizes from the chunk itself; an RF64 file without ds64 is
    refused by name."""
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
    path.write_bytes(riff_id + struct.pack("<I", 0xFFFFFFFF) + body + b"trailing")
    got, _ = wav.read_wav(path)
    np.testing.assert_array_equal(got, samples.reshape(-1, 2) / 32768.0)

    # A data chunk whose 32-bit size fits keeps it, whatever ds64 holds (here a 0 placeholder).
    placeholder = struct.pack("<QQQI", 0, 0, 0, 1) + ds64[28:]
    fitting = body.replace(ds64, placeholder).replace(
        b"data" + struct.pack("<I", 0xFFFFFFFF), b"data" + struct.pack("<I", samples.nbytes))
    path.write_bytes(riff_id + struct.pack("<I", 0xFFFFFFFF) + fitting)
    got, _ = wav.read_wav(path)
    np.testing.assert_array_equal(got, samples.reshape(-1, 2) / 32768.0)

    path.write_bytes(riff_id + struct.pack("<I", 0xFFFFFFFF) + b"WAVE" + b"fmt " + struct.pack("<I", 16)
                     + fmt + b"data" + struct.pack("<I", 0xFFFFFFFF) + samples.tobytes())
    with pytest.raises(wav.WavError, match=r"hand\.wav: an RF64 file must start with a ds64 chunk"):
        wav.read_wav_info(path)

    # A table of 2 entries in a ds64 chunk with room for 1 (a corrupt header).
    short_table = ds64[:24] + struct.pack("<I", 2) + ds64[28:]
    path.write_bytes(riff_id + struct.pack("<I", 0xFFFFFFFF) + body.replace(ds64, short_table))
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


@pytest.mark.parametrize("trailing", [0, 3])
def test_a_wav_written_to_a_pipe_runs_to_the_end_of_the_file(tmp_path, trailing):
    """Sizes left at 0xFFFFFFFF by a writer that could not seek back: the data chunk runs to the
    end of the file, whole frames only (a trailing partial frame is dropped), as libsndfile
    reads it."""
    rng = np.random.default_rng(3)
    path = tmp_path / "piped.wav"
    soundfile.write(path, rng.uniform(-1, 1, (1000, 2)), 48000, subtype="PCM_16")
    data = bytearray(path.read_bytes()) + bytes(trailing)
    at = data.index(b"data")
    data[4:8] = data[at + 4:at + 8] = struct.pack("<I", 0xFFFFFFFF)
    path.write_bytes(bytes(data))
    assert wav.read_wav_info(path).frames == soundfile.info(str(path)).frames == 1000
    np.testing.assert_array_equal(wav.read_wav(path)[0], soundfile.read(path, dtype="float32")[0])
    # any other size past the end is still a truncated file
    data[at + 4:at + 8] = struct.pack("<I", 0xFFFFFFFE)
    path.write_bytes(bytes(data))
    with pytest.raises(wav.WavError, match=r"piped\.wav is truncated: its data chunk declares 4294967294"):
        wav.read_wav_info(path)


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


def test_a_directory_or_a_pipe_is_not_said_to_be_missing(tmp_path):
    """A directory given as the WAV file was reported as `WAV file <dir> does not exist`."""
    folder = tmp_path / "uw"
    folder.mkdir()
    with pytest.raises(IsADirectoryError, match="is a directory, expected a WAV file") as error:
        wav.read_wav_info(folder)
    assert (error.value.errno, error.value.filename) == (errno.EISDIR, str(folder))
    with pytest.raises(IsADirectoryError, match="is a directory, expected a WAV file"):
        wav.read_wav(folder)
    pipe = tmp_path / "pipe.wav"
    os.mkfifo(pipe)
    with pytest.raises(wav.WavError, match=r"pipe\.wav is not a regular file \(a device or a pipe\)"):
        wav.read_wav_info(pipe)


def _wave_file(path, chunks, riff_id=b"RIFF", form=b"WAVE"):
    """Writes a RIFF file of (chunk id, body) chunks, each padded to an even size; a body may be
    (declared size, bytes) to declare a size other than its length."""
    body = form
    for chunk_id, chunk in chunks:
        size, chunk = chunk if isinstance(chunk, tuple) else (len(chunk), chunk)
        body += chunk_id + struct.pack("<I", size) + chunk + b"\0" * (len(chunk) & 1)
    path.write_bytes(riff_id + struct.pack("<I", 0xFFFFFFFF if riff_id != b"RIFF" else len(body)) + body)


_PCM16 = struct.pack("<HHIIHH", 1, 2, 48000, 192000, 4, 16)  # 2 channels, 48 kHz, 16-bit
_EXTENSIBLE = struct.pack("<HHIIHHHHI", 0xFFFE, 2, 48000, 192000, 4, 16, 22, 16, 3) + struct.pack(
    "<H", 1) + b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"  # KSDATAFORMAT_SUBTYPE_PCM
_FRAMES = np.arange(-6, 6, dtype="<i2").tobytes()


@pytest.mark.parametrize("chunks, riff_id, form, message", [
    ([(b"fmt ", _PCM16), (b"data", _FRAMES)], b"RIFF", b"AVI ", r" is not a RIFF/WAVE or RF64 file"),
    ([(b"fmt ", _PCM16[:14]), (b"data", _FRAMES)], b"RIFF", b"WAVE",
     r": fmt chunk of 14 bytes is truncated or too short"),
    ([(b"fmt ", (16, _PCM16[:10]))], b"RIFF", b"WAVE", r": fmt chunk of 16 bytes is truncated or too short"),
    ([(b"fmt ", _EXTENSIBLE[:28]), (b"data", _FRAMES)], b"RIFF", b"WAVE",
     r": WAVE_FORMAT_EXTENSIBLE fmt chunk has 28 bytes, expected 40"),
    ([(b"fmt ", struct.pack("<HHIIHH", 1, 2, 48000, 144000, 3, 16)), (b"data", _FRAMES)], b"RIFF", b"WAVE",
     r": inconsistent fmt chunk \(2 channels, 48000 Hz, block align 3 for 16-bit samples\)"),
    ([(b"fmt ", struct.pack("<HHIIHH", 1, 0, 48000, 0, 0, 16)), (b"data", _FRAMES)], b"RIFF", b"WAVE",
     r": inconsistent fmt chunk \(0 channels"),
    ([(b"fmt ", struct.pack("<HHIIHH", 1, 2, 0, 0, 4, 16)), (b"data", _FRAMES)], b"RIFF", b"WAVE",
     r": inconsistent fmt chunk \(2 channels, 0 Hz"),
    ([(b"ds64", bytes(16)), (b"fmt ", _PCM16), (b"data", _FRAMES)], b"RF64", b"WAVE",
     r": an RF64 file must start with a ds64 chunk of at least 24 bytes, found b'ds64' of 16 bytes"),
    ([(b"ds64", (28, bytes(24)))], b"RF64", b"WAVE",  # the file ends inside its ds64 chunk
     r": an RF64 file must start with a ds64 chunk of at least 24 bytes, found b'ds64' of 28 bytes"),
], ids=["not-wave", "short-fmt", "truncated-fmt", "short-extensible", "block-align", "no-channels",
        "no-rate", "short-ds64", "truncated-ds64"])
def test_corrupt_header_names_the_file(tmp_path, chunks, riff_id, form, message):
    _wave_file(tmp_path / "bad.wav", chunks, riff_id, form)
    with pytest.raises(wav.WavError, match=r"bad\.wav" + message):
        wav.read_wav_info(tmp_path / "bad.wav")


def test_extensible_header_by_hand(tmp_path):
    """The 40-byte WAVE_FORMAT_EXTENSIBLE fmt chunk that the corrupt cases above cut short."""
    _wave_file(tmp_path / "x.wav", [(b"fmt ", _EXTENSIBLE), (b"data", _FRAMES)])
    got, _ = wav.read_wav(tmp_path / "x.wav")
    np.testing.assert_array_equal(got, soundfile.read(tmp_path / "x.wav", dtype="float32")[0])


def test_bad_ranges_and_stale_info(tmp_path):
    path = tmp_path / "r.wav"
    soundfile.write(path, np.zeros((100, 2)), 48000, subtype="PCM_16")
    for offset, count in [(-1, 10), (0, -1)]:
        with pytest.raises(ValueError, match=rf"r\.wav: offset \({offset}\) and count \({count}\) must be >= 0"):
            wav.read_wav(path, offset, count)
    info = wav.read_wav_info(path)
    path.write_bytes(path.read_bytes()[:-40])  # cut after its header was read: 10 frames gone
    with pytest.raises(wav.WavError, match=rf"r\.wav is truncated: expected 400 bytes at offset "
                                           rf"{info.data_offset}, read 360"):
        wav.read_wav(path, info=info)


@pytest.mark.parametrize("frames", [0, 72_000])
def test_frame_count_and_duration_are_libsndfiles(tmp_path, frames):
    """An empty WAV (44 bytes: a data chunk of 0 bytes) has 0 frames, as libsndfile reads it,
    and a 1.5-s file lasts 1.5 s (not a whole number of seconds)."""
    path = tmp_path / "x.wav"
    soundfile.write(path, np.zeros(frames, np.float32), 48000, subtype="PCM_16")
    expected = soundfile.info(str(path))
    info = wav.read_wav_info(path)
    assert info.frames == expected.frames == frames
    assert info.duration_s == expected.duration
    samples = wav.read_wav(path)[0]
    assert samples.shape[0] == frames
