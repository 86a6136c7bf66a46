"""Reading RIFF/WAVE and RF64 files into float32 samples, scaled exactly as libsndfile scales them.

Supported sample formats (plain `WAVE_FORMAT_PCM` / `WAVE_FORMAT_IEEE_FLOAT` and the same inside
`WAVE_FORMAT_EXTENSIBLE`):

| format   | stored as            | float value                       |
|----------|----------------------|-----------------------------------|
| PCM_U8   | unsigned 8-bit       | (v - 128) / 2**7                  |
| PCM_16   | signed 16-bit        | v / 2**15                         |
| PCM_24   | signed 24-bit packed | v / 2**23                         |
| PCM_32   | signed 32-bit        | v / 2**31 (v rounded to float32)  |
| FLOAT    | IEEE float 32        | as stored                         |
| DOUBLE   | IEEE float 64        | rounded to float32                |

Every division is by a power of two, so the float32 result is the correctly rounded value of
`v / 2**(bits-1)`, which is what libsndfile (and the `soundfile` package) returns.

RF64 (EBU Tech 3306; also spelled BW64, EBU Tech 3392) is the standard container of recordings
over 4 GiB (16 channels of 24-bit audio at 48 kHz pass 4 GiB after about 31 minutes): the
32-bit chunk sizes that do not fit hold 0xFFFFFFFF, and the `ds64` chunk that follows `WAVE`
holds the 64-bit sizes of the RIFF and data chunks (and of any other chunk, in its table).

A file whose data chunk promises more bytes than the file holds, or holds a partial frame, is
rejected with an error naming the file: a truncated recording is never silently shortened.
The one exception is a plain RIFF file written to a pipe (`ffmpeg ... -f wav -`, `sox ... -t wav -`),
whose writer cannot go back to fill in the sizes and leaves 0xFFFFFFFF ("unknown") in them: its
data chunk runs to the end of the file (whole frames), as libsndfile reads it.
"""

from __future__ import annotations

import errno
import os
import pathlib
import struct
from typing import NamedTuple

import numpy as np

_WAVE_FORMAT_PCM = 0x0001
_WAVE_FORMAT_IEEE_FLOAT = 0x0003
_WAVE_FORMAT_EXTENSIBLE = 0xFFFE

_RIFF_IDS = (b"RIFF", b"RF64", b"BW64")  # RF64 and BW64 carry their sizes in a ds64 chunk
_SIZE_IN_DS64 = 0xFFFFFFFF  # a 32-bit chunk size that means "see the ds64 chunk"
_SIZE_UNKNOWN = 0xFFFFFFFF  # in a plain RIFF file: "not recorded" (a WAV written to a pipe)

# (format tag, bits per sample) -> format name.
_FORMATS = {
    (_WAVE_FORMAT_PCM, 8): "PCM_U8",
    (_WAVE_FORMAT_PCM, 16): "PCM_16",
    (_WAVE_FORMAT_PCM, 24): "PCM_24",
    (_WAVE_FORMAT_PCM, 32): "PCM_32",
    (_WAVE_FORMAT_IEEE_FLOAT, 32): "FLOAT",
    (_WAVE_FORMAT_IEEE_FLOAT, 64): "DOUBLE",
}
# Stored dtype and the power-of-two scale to [-1, 1] (PCM_24 is unpacked separately).
_DTYPES = {
    "PCM_U8": (np.dtype("u1"), 2.0**-7),
    "PCM_16": (np.dtype("<i2"), 2.0**-15),
    "PCM_32": (np.dtype("<i4"), 2.0**-31),
    "FLOAT": (np.dtype("<f4"), None),
    "DOUBLE": (np.dtype("<f8"), None),
}


class WavError(ValueError):
    """A file that is not a readable WAV file (corrupt, truncated or of an unsupported format)."""


class WavInfo(NamedTuple):
    """What the header of a WAV file says.

    sample_rate: Hz. channels: interleaved channels. frames: samples per channel.
    format: one of PCM_U8, PCM_16, PCM_24, PCM_32, FLOAT, DOUBLE.
    data_offset: byte offset of the first sample in the file. block_align: bytes per frame.
    """

    path: str
    sample_rate: int
    channels: int
    frames: int
    format: str
    bits_per_sample: int
    data_offset: int
    block_align: int

    @property
    def duration_s(self) -> float:
        return self.frames / self.sample_rate


def read_wav_info(path: str | os.PathLike) -> WavInfo:
    """Parses the header of a WAV (RIFF/WAVE or RF64) file without reading its samples.

    Raises:
      FileNotFoundError: the file does not exist.
      IsADirectoryError: `path` is a directory.
      WavError: not a regular file (a device, a pipe), not a RIFF/WAVE or RF64 file, an RF64 file
        without its ds64 chunk, no fmt/data chunk, unsupported format, truncated data.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "is a directory, expected a WAV file", str(path))
        if path.exists():
            raise WavError(f"{path} is not a regular file (a device or a pipe); expected a WAV file")
        raise FileNotFoundError(f"WAV file {path} does not exist")
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        header = f.read(12)
        if len(header) < 12 or header[:4] not in _RIFF_IDS or header[8:12] != b"WAVE":
            raise WavError(f"{path} is not a RIFF/WAVE or RF64 file (header {header[:12]!r})")
        position = 12
        sizes64 = None  # RF64: chunk id -> 64-bit size, from the ds64 chunk
        if header[:4] != b"RIFF":
            sizes64, position = _read_ds64(f, path, file_size)
        fmt = None
        data = None  # (offset, size)
        streamed = False  # the data size was not recorded
        while position + 8 <= file_size and (fmt is None or data is None):
            f.seek(position)
            chunk_id, chunk_size = struct.unpack("<4sI", f.read(8))
            if sizes64 is not None and chunk_size == _SIZE_IN_DS64 and chunk_id in sizes64:
                chunk_size = sizes64[chunk_id]
            body = position + 8
            if chunk_id == b"fmt ":
                if chunk_size < 16 or body + chunk_size > file_size:
                    raise WavError(f"{path}: fmt chunk of {chunk_size} bytes is truncated or too short")
                fmt = f.read(chunk_size)
            elif chunk_id == b"data":
                if sizes64 is None and chunk_size == _SIZE_UNKNOWN and body + chunk_size > file_size:
                    chunk_size = file_size - body  # streamed: to the end (whole frames, below)
                    streamed = True
                data = (body, chunk_size)
                if body + chunk_size > file_size:
                    raise WavError(
                        f"{path} is truncated: its data chunk declares {chunk_size} bytes but only "
                        f"{file_size - body} follow the header")
            position = body + chunk_size + (chunk_size & 1)  # chunks are padded to even sizes
    if fmt is None:
        raise WavError(f"{path}: no fmt chunk before the end of the file")
    if data is None:
        raise WavError(f"{path}: no data chunk (the file is truncated or not a WAV file)")

    tag, channels, sample_rate, _, block_align, bits = struct.unpack("<HHIIHH", fmt[:16])
    if tag == _WAVE_FORMAT_EXTENSIBLE:
        if len(fmt) < 40:
            raise WavError(f"{path}: WAVE_FORMAT_EXTENSIBLE fmt chunk has {len(fmt)} bytes, expected 40")
        tag = struct.unpack("<H", fmt[24:26])[0]  # first two bytes of the sub-format GUID
    if (tag, bits) not in _FORMATS:
        raise WavError(f"{path}: unsupported sample format (format tag 0x{tag:04x}, {bits} bits); "
                       "expected 8/16/24/32-bit PCM or 32/64-bit IEEE float")
    if channels < 1 or sample_rate < 1 or block_align != channels * bits // 8:
        raise WavError(f"{path}: inconsistent fmt chunk ({channels} channels, {sample_rate} Hz, "
                       f"block align {block_align} for {bits}-bit samples)")
    offset, size = data
    if streamed:
        size -= size % block_align
    if size % block_align:
        raise WavError(f"{path} is truncated: its data chunk of {size} bytes is not a whole number of "
                       f"{block_align}-byte frames")
    return WavInfo(str(path), sample_rate, channels, size // block_align, _FORMATS[(tag, bits)], bits,
                   offset, block_align)


def _read_ds64(f, path: pathlib.Path, file_size: int) -> tuple[dict[bytes, int], int]:
    """Parses the ds64 chunk at byte 12 of an RF64 file (EBU Tech 3306).

    Returns ({chunk id: 64-bit size} for `data` and the chunks of its table, the position of
    the next chunk).
    """
    f.seek(12)
    head = f.read(8)
    chunk_id, chunk_size = struct.unpack("<4sI", head) if len(head) == 8 else (head[:4], 0)
    if chunk_id != b"ds64" or chunk_size < 24 or 20 + chunk_size > file_size:
        raise WavError(f"{path}: an RF64 file must start with a ds64 chunk of at least 24 bytes, "
                       f"found {chunk_id!r} of {chunk_size} bytes")
    body = f.read(chunk_size)
    _, data_size, _ = struct.unpack("<QQQ", body[:24])  # RIFF size, data size, sample count
    sizes = {b"data": data_size}
    if chunk_size >= 28:
        (table_length,) = struct.unpack("<I", body[24:28])
        if 28 + 12 * table_length > chunk_size:
            raise WavError(f"{path}: ds64 chunk of {chunk_size} bytes is too short for its "
                           f"{table_length}-entry table")
        for k in range(table_length):
            table_id, table_size = struct.unpack("<4sQ", body[28 + 12 * k:40 + 12 * k])
            sizes.setdefault(table_id, table_size)
    return sizes, 20 + chunk_size + (chunk_size & 1)


def _decode(raw: bytes, info: WavInfo) -> np.ndarray:
    """Interleaved stored samples -> float32 (frames * channels,)."""
    if info.format == "PCM_24":
        packed = np.frombuffer(raw, np.uint8).reshape(-1, 3)
        widened = np.zeros((packed.shape[0], 4), np.uint8)
        widened[:, 1:] = packed  # little-endian: the 24-bit value lands in the top bytes, v * 2**8
        return widened.view("<i4").reshape(-1).astype(np.float32) * np.float32(2.0**-31)
    dtype, scale = _DTYPES[info.format]
    values = np.frombuffer(raw, dtype).astype(np.float32)
    if info.format == "PCM_U8":
        values -= np.float32(128)
    return values if scale is None else values * np.float32(scale)


def read_wav(path: str | os.PathLike, offset: int = 0, count: int | None = None, *,
             info: WavInfo | None = None) -> tuple[np.ndarray, int]:
    """Reads frames [offset, offset + count) of a WAV file as float32 in [-1, 1].

    Only the requested byte range is read, so long files can be streamed.

    Args:
      path: the WAV file.
      offset: first frame to read (>= 0).
      count: number of frames; None reads to the end. A range running past the end of the
        file returns the frames that exist (fewer than `count`; the caller pads).
      info: the file's `read_wav_info` if the caller already has it (skips parsing the header).

    Returns:
      (samples, sample_rate): samples (n,) float32 for a mono file, (n, channels) otherwise.
    """
    if info is None:
        info = read_wav_info(path)
    if offset < 0 or (count is not None and count < 0):
        raise ValueError(f"{path}: offset ({offset}) and count ({count}) must be >= 0")
    first = min(offset, info.frames)
    last = info.frames if count is None else min(offset + count, info.frames)
    n_bytes = (last - first) * info.block_align
    with open(path, "rb") as f:
        f.seek(info.data_offset + first * info.block_align)
        raw = f.read(n_bytes)
    if len(raw) != n_bytes:
        raise WavError(f"{path} is truncated: expected {n_bytes} bytes at offset "
                       f"{info.data_offset + first * info.block_align}, read {len(raw)}")
    samples = _decode(raw, info)
    if info.channels > 1:
        samples = samples.reshape(-1, info.channels)
    return samples, info.sample_rate
