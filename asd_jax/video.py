"""Video overlay: a vertical line where the model hears the talker (an edge module: runs ffmpeg).

Frame mapping and frame-rate assumption: the forward rows of one camera are 1/30 s frames
(SPEC section 8), and TragicTalkers videos are 30 fps, so video frame i is drawn from row i
(time i/30 s); `overlay_from_csv` refuses a CSV whose row i is not at that time (rows out of
time order, or not starting at 0 s), as the evaluation does. A video of another frame rate is
refused unless `allow_fps_mismatch=True`, which keeps the frame-index mapping (and so drifts in
time). Frames past the last row get no line; rows past the last frame are ignored.

On a frame whose confidence is at least `threshold` (0.5: the rule by which evaluation counts
a frame as speaking, SPEC section 9), the line is the column `round(x * width)` (clipped to
the image), `line_width_px` wide and centred there.

Rotated videos (display rotation metadata, as phones write): frames are drawn as displayed,
that is after ffmpeg's automatic rotation, so x is a fraction of the displayed width and the
line is vertical on screen; the output holds the upright frames and no rotation metadata, so
it displays as the input does. Rotations other than multiples of 90 degrees are refused.

ffmpeg: the `ffmpeg` found on PATH, else the binary shipped inside the PyPI wheel
`imageio-ffmpeg` (`pip install imageio-ffmpeg`); FileNotFoundError where there is neither.
Frames are decoded and encoded through pipes as rawvideo rgb24, at the decoder's exact frame
rate; the original audio stream is copied unchanged (`-map 1:a? -c:a copy`). An ffmpeg run that
fails (an unknown encoder, an option the encoder refuses, an output name without a container
ffmpeg knows, an undecodable input) raises `FfmpegError`, a ValueError. The output is written
through `atomic.partial_path` (fsync, then rename); an error or Ctrl-C at any point stops both
ffmpeg processes and leaves no file.
"""

from __future__ import annotations

import csv
import dataclasses
import fractions
import os
import pathlib
import re
import shutil
import subprocess
import tempfile

import numpy as np
from absl import logging

from asd_jax import atomic
from asd_jax import constants
from asd_jax import evaluation
from asd_jax import predict

_RGB_BYTES = 3


class FfmpegError(ValueError):
    """An ffmpeg run failed on what it was given (a ValueError: the input file, the codec or
    the output name is the cause). The message is one line: the files, the video codec, ffmpeg's
    exit status and its first and last error lines; `log` holds ffmpeg's whole stderr."""

    def __init__(self, message: str, log: str = ""):
        super().__init__(message)
        self.log = log


def find_ffmpeg() -> str:
    """Path of an ffmpeg executable: `ffmpeg` on PATH first, then imageio-ffmpeg's binary.
    Raises FileNotFoundError (a user error, one line) when there is neither."""
    on_path = shutil.which("ffmpeg")
    if on_path:
        return on_path
    try:
        import imageio_ffmpeg  # pylint: disable=import-outside-toplevel
        return imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError) as err:
        raise FileNotFoundError(
            "ffmpeg not found: there is no `ffmpeg` on PATH and the PyPI package `imageio-ffmpeg` "
            f"(which ships one) is not usable ({err}); install it with `pip install imageio-ffmpeg` "
            "or put an ffmpeg executable on PATH") from err


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What ffmpeg reports of a file's first video stream.

    width, height: px, as displayed (a stream stored W x H with a display rotation of 90 or
    270 degrees shows as H x W; ffmpeg decodes it so); fps: frames per second; duration_s:
    container duration in seconds (None when unknown); has_audio: whether the file has an audio
    stream; rotation_deg: display rotation, counter-clockwise degrees in [0, 360) (0: none).
    """

    width: int
    height: int
    fps: float
    duration_s: float | None
    has_audio: bool
    rotation_deg: float = 0.0

    @property
    def approx_num_frames(self) -> int | None:
        """round(duration * fps), or None when the duration is unknown."""
        return None if self.duration_s is None else int(round(self.duration_s * self.fps))


def probe(path: str | os.PathLike, ffmpeg: str | None = None) -> VideoInfo:
    """Reads width, height, frame rate, duration and audio presence from `ffmpeg -i` output."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video {path} does not exist")
    ffmpeg = ffmpeg or find_ffmpeg()
    # `ffmpeg -i` without an output exits with status 1 and prints the stream summary on stderr.
    report = subprocess.run([ffmpeg, "-hide_banner", "-i", str(path)], capture_output=True,
                            text=True, errors="replace", check=False).stderr
    lines = report.splitlines()
    demuxers = re.search(r"^Input #0, (\S+), from", report, re.MULTILINE)
    if demuxers is not None and "tty" in demuxers.group(1).split(","):
        raise ValueError(f"{path}: not a video file (ffmpeg would render it as text, with its "
                         "'tty' demuxer)")
    index = next((i for i, line in enumerate(lines) if "Stream #" in line and "Video:" in line), None)
    if index is None:
        reason = lines[-1].strip() if lines else "ffmpeg printed nothing"
        raise ValueError(f"{path}: ffmpeg finds no video stream in it ({reason})")
    video_line = lines[index]
    block = []  # the stream's metadata and side data, up to the next stream
    for line in lines[index + 1:]:
        if "Stream #" in line or not line.startswith("    "):
            break
        block.append(line)
    rotation_deg = _rotation_deg(block)
    size = re.search(r"\b(\d{2,5})x(\d{2,5})\b", video_line)
    rate = re.search(r"([\d.]+) fps", video_line) or re.search(r"([\d.]+) tbr", video_line)
    if size is None or rate is None:
        raise ValueError(f"{path}: cannot read the frame size and rate from {video_line.strip()!r}")
    duration = re.search(r"Duration: (\d+):(\d{2}):(\d{2}(?:\.\d+)?)", report)
    duration_s = None
    if duration is not None:
        hours, minutes, seconds = duration.groups()
        duration_s = 3600 * int(hours) + 60 * int(minutes) + float(seconds)
    has_audio = any("Stream #" in line and "Audio:" in line for line in report.splitlines())
    if rotation_deg % 90:
        raise ValueError(f"{path}: its video is displayed rotated by {rotation_deg:g} degrees; "
                         "only multiples of 90 degrees are supported")
    width, height = int(size.group(1)), int(size.group(2))
    if rotation_deg % 180:
        width, height = height, width
    return VideoInfo(width, height, float(rate.group(1)), duration_s, has_audio, rotation_deg)


def _rotation_deg(stream_lines: list[str]) -> float:
    """Display rotation (counter-clockwise degrees in [0, 360)) from a stream's `ffmpeg -i` lines:
    the display matrix side data ("displaymatrix: rotation of -90.00 degrees"; newer builds say
    "Display Matrix:"), else the old `rotate` tag (clockwise degrees)."""
    for line in stream_lines:
        match = re.search(r"display ?matrix: rotation of (-?[\d.]+) degrees", line, re.IGNORECASE)
        if match:
            return float(match.group(1)) % 360.0
    for line in stream_lines:
        match = re.match(r"\s*rotate\s*:\s*(-?[\d.]+)\s*$", line)
        if match:
            return -float(match.group(1)) % 360.0
    return 0.0


def _decoded_format(path: pathlib.Path, ffmpeg: str) -> tuple[int, int, fractions.Fraction | None]:
    """(width, height, frame rate) of the frames ffmpeg decodes from `path` (after its automatic
    rotation): the size from the header of the first frame written as PPM, the rate (frames per
    second, exact: 24000/1001, not the 23.98 `ffmpeg -i` shows) from the `fr:` of the filter
    graph's input that ffmpeg logs at verbosity `verbose`; None where it logs none."""
    decoded = subprocess.run([ffmpeg, "-v", "verbose", "-i", str(path), "-map", "0:v:0",
                              "-frames:v", "1", "-f", "image2pipe", "-c:v", "ppm", "-"],
                             capture_output=True, check=False)
    match = re.match(rb"P6\s+(\d+)\s+(\d+)\s", decoded.stdout[:32])
    if match is None:
        raise ValueError(f"{path}: ffmpeg decodes no video frame from it")
    rate = re.search(rb"\bfr:(\d+)/(\d+)\b", decoded.stderr)
    exact = None
    if rate is not None and int(rate.group(1)) > 0 and int(rate.group(2)) > 0:
        exact = fractions.Fraction(int(rate.group(1)), int(rate.group(2)))
    return int(match.group(1)), int(match.group(2)), exact


def check_threshold(threshold: float) -> None:
    """Raises ValueError unless `threshold` is a confidence: finite, in [0, 1]."""
    if not 0.0 <= float(threshold) <= 1.0:  # NaN fails too
        raise ValueError(f"threshold (--threshold) must be a confidence in [0, 1], got {threshold}")


def check_line_width(line_width_px: int) -> None:
    """Raises ValueError unless `line_width_px` is an integer >= 1 (px)."""
    if isinstance(line_width_px, bool) or not isinstance(line_width_px, (int, np.integer)) or (
            line_width_px < 1):
        raise ValueError(f"line_width_px (--line_width_px) must be an integer >= 1 (px), got "
                         f"{line_width_px!r}")


def line_columns(x: np.ndarray, confidence: np.ndarray, width: int,
                 threshold: float = 0.5) -> np.ndarray:
    """Column of the line per frame, -1 where there is none.

    x, confidence: (N,) float, x normalised to [0, 1] of the image width; width: px.
    Returns (N,) int64: round(x * width) clipped to [0, width - 1] where confidence >= threshold
    (evaluation's rule for a speaking frame, SPEC section 9); threshold: finite, in [0, 1].
    """
    check_threshold(threshold)
    x = np.asarray(x, np.float64)
    confidence = np.asarray(confidence, np.float64)
    if x.shape != confidence.shape or x.ndim != 1:
        raise ValueError(f"x and confidence must be 1-D of equal length, got {x.shape} and "
                         f"{confidence.shape}")
    if x.size == 0:
        raise ValueError("x and confidence are empty: there are no rows to draw")
    if not (np.isfinite(x).all() and np.isfinite(confidence).all()):
        raise ValueError("x and confidence must be finite")
    columns = np.clip(np.rint(x * width), 0, width - 1).astype(np.int64)
    return np.where(confidence >= threshold, columns, -1)


def draw_lines(frames: np.ndarray, columns: np.ndarray, color=(255, 0, 0),
               line_width_px: int = 3) -> np.ndarray:
    """Paints a vertical line per frame, in place and returned.

    frames: (N, H, W, 3) uint8 RGB; columns: (N,) int, -1 for no line. The line covers
    columns c - (line_width_px - 1) // 2 .. c + line_width_px // 2 (clipped), all rows;
    line_width_px: an integer >= 1.
    """
    check_line_width(line_width_px)
    n, _, width, _ = frames.shape
    if columns.shape != (n,):
        raise ValueError(f"columns has shape {columns.shape}, expected ({n},)")
    offset = np.arange(width)[None, :] - columns[:, None]  # (N, W)
    on = (columns[:, None] >= 0) & (offset >= -((line_width_px - 1) // 2)) & (
        offset <= line_width_px // 2)
    frames[np.broadcast_to(on[:, None, :], frames.shape[:3])] = np.asarray(color, np.uint8)
    return frames


def _error_lines(log: str) -> str:
    """ffmpeg's first and last stderr lines (the cause, then its summary), joined on one line,
    without the `[component @ 0x...]` prefixes."""
    lines = [re.sub(r"^\[[^\]]*@ 0x[0-9a-f]+\]\s*", "", line.strip())
             for line in log.splitlines() if line.strip()]
    if not lines:
        return "ffmpeg printed nothing"
    return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"


def _close(pipe) -> None:
    """Closes a pipe to or from ffmpeg; flushing into a dead encoder is no error here (its exit
    status and log say why it died)."""
    try:
        pipe.close()
    except OSError:
        pass


def overlay_line(video_path: str | os.PathLike, out_path: str | os.PathLike, x: np.ndarray,
                 confidence: np.ndarray, *, threshold: float = 0.5, color=(255, 0, 0),
                 line_width_px: int = 3, video_codec: str = "libx264", crf: int = 18,
                 allow_fps_mismatch: bool = False, frames_per_batch: int = 16,
                 ffmpeg: str | None = None) -> int:
    """Writes `out_path`: the video with the line drawn from rows (x, confidence).

    x, confidence: (N,) per 1/30 s frame of one camera (row i <-> video frame i); x is a
    fraction of the displayed width (see the module docstring for rotated videos); a line is
    drawn where confidence >= threshold.
    threshold: finite, in [0, 1]; line_width_px: an integer >= 1.
    video_codec: an ffmpeg encoder (libx264 with -crf `crf` and yuv420p by default; "ffv1"
    and "libx264rgb" are written lossless in rgb). The audio stream is copied unchanged.
    Returns the number of video frames written. The output appears only when complete; it may
    not be the input video (ValueError, also for another name of the same file). An ffmpeg
    failure raises FfmpegError (a ValueError) and leaves no file.
    """
    video_path, out_path = pathlib.Path(video_path), pathlib.Path(out_path)
    check_threshold(threshold)
    check_line_width(line_width_px)
    ffmpeg = ffmpeg or find_ffmpeg()
    info = probe(video_path, ffmpeg)
    atomic.refuse_same_file(out_path, video_path, "the input video")
    if abs(info.fps - constants.VIDEO_FPS) > 0.01 and not allow_fps_mismatch:
        raise ValueError(
            f"{video_path} runs at {info.fps:g} fps but the forward rows are 1/{constants.VIDEO_FPS} s "
            "frames; pass allow_fps_mismatch=True (--allow_fps_mismatch) to map frame i to row i anyway")
    width, height, rate = _decoded_format(video_path, ffmpeg)
    if (width, height) != (info.width, info.height):  # never draw on misread frames
        raise ValueError(f"{video_path}: ffmpeg decodes {width}x{height} frames but reports "
                         f"{info.width}x{info.height} (display rotation {info.rotation_deg:g} "
                         "degrees); this video layout is not supported")
    columns = line_columns(x, confidence, info.width, threshold)
    if info.approx_num_frames is not None and info.approx_num_frames != len(columns):
        logging.warning("%s has about %d frames and there are %d rows: frames past the rows get no "
                        "line, rows past the frames are ignored", video_path,
                        info.approx_num_frames, len(columns))
    atomic.check_output_file(out_path)
    if video_codec in ("ffv1", "libx264rgb"):
        codec_args = ["-c:v", video_codec] + (["-qp", "0"] if video_codec == "libx264rgb" else [])
        codec_args += ["-pix_fmt", "rgb24" if video_codec == "libx264rgb" else "bgr0"]
    else:
        codec_args = ["-c:v", video_codec, "-crf", str(crf), "-pix_fmt", "yuv420p"]
    # The frames are encoded at the exact rate they are decoded at (24000/1001, not the 23.98
    # `ffmpeg -i` shows, which drifts from the copied audio by 16 ms per 100 s).
    rate_arg = f"{rate.numerator}/{rate.denominator}" if rate else f"{info.fps:g}"

    frame_bytes = info.width * info.height * _RGB_BYTES
    decode_cmd = [ffmpeg, "-v", "error", "-i", str(video_path), "-map", "0:v:0",
                  "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    written = 0
    with atomic.partial_path(out_path, keep_suffix=True) as partial, \
            tempfile.TemporaryFile() as decode_log, tempfile.TemporaryFile() as encode_log:
        # Made before ffmpeg starts: a folder where no file can be made is an error naming the
        # output and the reason (atomic.partial_path), not an encoder failure. ffmpeg overwrites it.
        partial.open("xb").close()
        encode_cmd = [ffmpeg, "-v", "error", "-y",
                      "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{info.width}x{info.height}",
                      "-r", rate_arg, "-i", "-", "-i", str(video_path),
                      "-map", "0:v:0", "-map", "1:a?", *codec_args, "-c:a", "copy", str(partial)]
        decoder = encoder = None
        try:
            decoder = subprocess.Popen(decode_cmd, stdout=subprocess.PIPE, stderr=decode_log)
            encoder = subprocess.Popen(encode_cmd, stdin=subprocess.PIPE, stderr=encode_log)
            try:
                while True:
                    data = decoder.stdout.read(frame_bytes * frames_per_batch)
                    if not data:
                        break
                    if len(data) % frame_bytes:
                        raise FfmpegError(f"ffmpeg decoding {video_path} returned a partial frame "
                                          f"({len(data) % frame_bytes} of {frame_bytes} bytes)")
                    frames = np.frombuffer(data, np.uint8).reshape(
                        -1, info.height, info.width, _RGB_BYTES).copy()
                    index = np.arange(written, written + len(frames))
                    frame_columns = np.where(index < len(columns),
                                             columns[np.minimum(index, len(columns) - 1)], -1)
                    encoder.stdin.write(
                        draw_lines(frames, frame_columns, color, line_width_px).tobytes())
                    written += len(frames)
            except BrokenPipeError:
                pass  # the encoder died; its exit status and log are reported below
            _close(encoder.stdin)
            _close(decoder.stdout)
            decode_rc, encode_rc = decoder.wait(), encoder.wait()
        except BaseException:  # Ctrl-C too, also while waiting: nothing is left running or writing
            for process in (encoder, decoder):
                if process is not None:
                    process.kill()
                    _close(process.stdin or process.stdout)
                    process.wait()
            raise  # atomic.partial_path removes the partial file
        # The encoder first: when it dies, the decoder fails too, on a broken pipe.
        for rc, log, what in ((encode_rc, encode_log, "encoding"), (decode_rc, decode_log, "decoding")):
            if rc != 0:
                log.seek(0)
                text = log.read().decode(errors="replace").replace(str(partial), str(out_path))
                codec = f" with video_codec={video_codec!r} (--video_codec)" if what == "encoding" else ""
                raise FfmpegError(f"ffmpeg failed {what} {video_path} -> {out_path}{codec}, exit status "
                                  f"{rc}: {_error_lines(text)}", text)
        if written == 0:
            raise ValueError(f"{video_path}: ffmpeg decoded no frames")
        if written != len(columns):
            logging.warning("%s: %d frames, %d rows", video_path, written, len(columns))
    return written


def check_row_times(forward_csv: str | os.PathLike, name: str | None,
                    times: np.ndarray) -> None:
    """Raises ValueError, naming the file and line, unless row i of the camera is video frame i:
    its time within half a frame of i/30 s (`evaluation.check_forward_times`, the evaluation's
    rule). Rows out of time order (a file sorted as text) or not starting at 0 s would draw
    other frames' positions.

    forward_csv, name: as for `predict.read_camera_rows`; times: (N,) s, its rows in file order.
    """
    times = np.asarray(times, np.float64)
    frame = np.arange(times.shape[0])
    if np.all(np.abs(times * constants.VIDEO_FPS - frame) < 0.5):
        return
    # Only for the message: which line of the file each row is.
    with open(forward_csv, "rb") as f:
        first = f.readline(1 << 16).decode("utf-8-sig", "replace").rstrip("\r\n")
    if name is not None and tuple(next(csv.reader([first]), ())) == evaluation.FORWARD_HEADER:
        forward = evaluation.read_forward_csv(forward_csv)
        names, times, rows = forward.names, forward.time_s, np.flatnonzero(forward.names == name.encode())
    else:  # a predict CSV: one camera, row i on line i + 2
        names, rows = np.full(frame.shape, (name or pathlib.Path(forward_csv).name).encode()), frame
    evaluation.check_forward_times(names, times, rows, frame, forward_csv)


def overlay_from_csv(video_path: str | os.PathLike, forward_csv: str | os.PathLike,
                     name: str | None, out_path: str | os.PathLike, **kwargs) -> int:
    """`overlay_line` with the rows of camera `name` from a forward or predict CSV.

    kwargs go to `overlay_line` (threshold, line_width_px, video_codec, ...). The output may
    be neither the video nor the CSV (ValueError). The camera's rows must be its 1/30 s frames
    in time order from 0 s, as the evaluation requires (`check_row_times`: ValueError naming
    the line, before ffmpeg runs).
    """
    check_threshold(kwargs.get("threshold", 0.5))  # before reading the CSV
    check_line_width(kwargs.get("line_width_px", 3))
    atomic.refuse_same_file(pathlib.Path(out_path), pathlib.Path(forward_csv), "the forward CSV")
    rows = predict.read_camera_rows(forward_csv, name)
    check_row_times(forward_csv, name, rows.times)
    return overlay_line(video_path, out_path, rows.x, rows.confidence, **kwargs)
