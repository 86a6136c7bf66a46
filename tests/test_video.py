"""The video overlay: the line lands on the expected columns of exactly the frames at or above
0.5 (evaluation's speaking rule, SPEC section 9), also on videos with a display rotation.

A test video is generated here with ffmpeg (lossless ffv1, a known per-frame pattern and a
16-bit PCM sine track); the overlay is written lossless too, so every pixel can be checked.
"""

import dataclasses
import fractions
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from asd_jax import atomic
from asd_jax import video
from test_atomic import _denied

WIDTH, HEIGHT, FPS, NUM_FRAMES = 64, 24, 30, 45  # 1.5 s
AUDIO_RATE = 16_000
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _pattern(num_frames: int) -> np.ndarray:
    """Known frames: a horizontal gradient in green, frame number in blue, no red."""
    frames = np.zeros((num_frames, HEIGHT, WIDTH, 3), np.uint8)
    frames[..., 1] = (np.arange(WIDTH) * 3)[None, None, :]
    frames[..., 2] = (np.arange(num_frames) * 5)[:, None, None]
    return frames


def _decode(path: pathlib.Path) -> np.ndarray:
    raw = subprocess.run([video.find_ffmpeg(), "-v", "error", "-i", str(path), "-map", "0:v:0",
                          "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                         capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, HEIGHT, WIDTH, 3)


def _decode_audio(path: pathlib.Path) -> np.ndarray:
    raw = subprocess.run([video.find_ffmpeg(), "-v", "error", "-i", str(path), "-map", "0:a:0",
                          "-f", "s16le", "-acodec", "pcm_s16le", "-"],
                         capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.int16)


@pytest.fixture(scope="module")
def test_video(tmp_path_factory) -> pathlib.Path:
    folder = tmp_path_factory.mktemp("video")
    audio = (8000 * np.sin(2 * np.pi * 440 * np.arange(int(AUDIO_RATE * NUM_FRAMES / FPS))
                           / AUDIO_RATE)).astype("<i2")
    (folder / "tone.raw").write_bytes(audio.tobytes())
    path = folder / "input.mkv"
    subprocess.run([video.find_ffmpeg(), "-v", "error", "-y",
                    "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{WIDTH}x{HEIGHT}", "-r", str(FPS),
                    "-i", "-", "-f", "s16le", "-ar", str(AUDIO_RATE), "-ac", "1",
                    "-i", str(folder / "tone.raw"), "-map", "0:v", "-map", "1:a",
                    "-c:v", "ffv1", "-pix_fmt", "bgr0", "-c:a", "pcm_s16le", str(path)],
                   input=_pattern(NUM_FRAMES).tobytes(), check=True, capture_output=True)
    return path


def test_probe(test_video):
    info = video.probe(test_video)
    assert (info.width, info.height, info.fps, info.has_audio) == (WIDTH, HEIGHT, FPS, True)
    assert info.approx_num_frames == NUM_FRAMES


def test_line_on_exactly_the_confident_frames(test_video, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, NUM_FRAMES)
    x[:3] = [0.0, 1.0, 0.5]  # edges clip into the image
    confidence = rng.uniform(0, 1, NUM_FRAMES)
    confidence[3:6] = [0.5, 0.5000001, 0.4999999]  # 0.5 and above draws (SPEC section 9)
    out = tmp_path / "out.mkv"
    written = video.overlay_line(test_video, out, x, confidence, video_codec="ffv1",
                                 line_width_px=1)
    assert written == NUM_FRAMES
    frames = _decode(out)
    original = _pattern(NUM_FRAMES)
    assert frames.shape == original.shape

    expected = original.copy()
    for i in range(NUM_FRAMES):  # literal transcription of the rule, frame by frame
        if confidence[i] >= 0.5:
            column = min(max(int(round(x[i] * WIDTH)), 0), WIDTH - 1)
            expected[i, :, column] = (255, 0, 0)
    np.testing.assert_array_equal(frames, expected)
    # The pattern has no red, so red pixels are exactly the lines.
    has_line = (frames[..., 0] == 255).any(axis=(1, 2))
    np.testing.assert_array_equal(has_line, confidence >= 0.5)
    assert list(np.nonzero(has_line[3:6])[0] + 3) == [3, 4]  # exactly 0.5 draws, 0.4999999 not

    # The audio stream survives unchanged (copied).
    assert video.probe(out).has_audio
    np.testing.assert_array_equal(_decode_audio(out), _decode_audio(test_video))


def test_wide_line_and_fewer_rows_than_frames(test_video, tmp_path):
    rows = 30  # the last 15 frames have no row and get no line
    x = np.full(rows, 0.25)
    confidence = np.ones(rows)
    out = tmp_path / "out.mkv"
    video.overlay_line(test_video, out, x, confidence, video_codec="ffv1", line_width_px=4,
                       color=(200, 10, 20))
    frames = _decode(out)
    red = frames[..., 0] == 200
    columns = np.nonzero(red[0, 0])[0]
    np.testing.assert_array_equal(columns, [15, 16, 17, 18])  # 16 = 0.25 * 64, width 4
    assert red[:rows].all(axis=1)[:, 15:19].all()
    assert not red[rows:].any()


def test_default_codec_writes_a_playable_mp4(test_video, tmp_path):
    out = tmp_path / "out.mp4"
    x, confidence = np.full(NUM_FRAMES, 0.5), np.ones(NUM_FRAMES)
    # pcm audio cannot go in mp4 with a plain copy, so copy from a video with aac audio.
    aac = tmp_path / "aac.mp4"
    subprocess.run([video.find_ffmpeg(), "-v", "error", "-i", str(test_video), "-c:v", "libx264",
                    "-pix_fmt", "yuv444p", "-qp", "0", "-c:a", "aac", str(aac)], check=True)
    video.overlay_line(aac, out, x, confidence)
    info = video.probe(out)
    assert (info.width, info.height, info.has_audio) == (WIDTH, HEIGHT, True)
    frames = _decode(out).astype(int)
    assert len(frames) == NUM_FRAMES
    # Lossy: the line column is clearly redder than columns away from it.
    assert (frames[..., 32, 0] - frames[..., 40, 0]).min() > 100


def test_errors(test_video, tmp_path):
    x, confidence = np.zeros(NUM_FRAMES), np.ones(NUM_FRAMES)
    with pytest.raises(FileNotFoundError, match="missing.mkv does not exist"):
        video.overlay_line(tmp_path / "missing.mkv", tmp_path / "o.mkv", x, confidence)
    with pytest.raises(ValueError, match="equal length"):
        video.overlay_line(test_video, tmp_path / "o.mkv", x[:3], confidence)
    with pytest.raises(ValueError, match="must be finite"):
        video.overlay_line(test_video, tmp_path / "o.mkv", np.full(NUM_FRAMES, np.nan), confidence)
    with pytest.raises(ValueError, match="no rows to draw"):
        video.overlay_line(test_video, tmp_path / "o.mkv", x[:0], confidence[:0])
    with pytest.raises(ValueError, match=r"must be 1-D of equal length, got \(3, 15\) and \(3, 15\)"):
        video.overlay_line(test_video, tmp_path / "o.mkv", x.reshape(3, 15), confidence.reshape(3, 15))
    with pytest.raises(FileNotFoundError, match="output directory"):
        video.overlay_line(test_video, tmp_path / "no" / "o.mkv", x, confidence)
    assert not list(tmp_path.iterdir())
    # Not a video: one line naming it, with ffmpeg's last word on why (not its whole report).
    notes = tmp_path / "notes.txt"  # ffmpeg's tty demuxer would make a video of the text
    notes.write_text(("Notes on the recording: rig 1, cameras 1-11, 48 kHz. " * 3 + "\n") * 200)
    with pytest.raises(ValueError, match=r"notes.txt: not a video file \(ffmpeg would render it as "
                                         r"text, with its 'tty' demuxer\)"):
        video.probe(notes)
    notes.unlink()
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    with pytest.raises(ValueError, match=r"notes.mp4: ffmpeg finds no video stream in it \(.+\)$") as error:
        video.overlay_line(text, tmp_path / "o.mkv", x, confidence)
    assert "\n" not in str(error.value)


def test_encoder_failure_is_a_user_error_and_leaves_no_file(test_video, tmp_path):
    """An encoder ffmpeg does not know is the user's error (a ValueError, one line naming the
    files, the codec and ffmpeg's own reason), and nothing is left at the output."""
    x, confidence = np.zeros(NUM_FRAMES), np.ones(NUM_FRAMES)
    with pytest.raises(video.FfmpegError, match=r"ffmpeg failed encoding .*input.mkv -> .*o.mkv with "
                       r"video_codec='nosuchcodec' \(--video_codec\), exit status \d+: "
                       r"Unknown encoder 'nosuchcodec'") as error:
        video.overlay_line(test_video, tmp_path / "o.mkv", x, confidence, video_codec="nosuchcodec")
    assert isinstance(error.value, ValueError) and "\n" not in str(error.value)
    assert "Unknown encoder" in error.value.log
    # An output name whose container ffmpeg cannot pick names the output, not its partial file.
    with pytest.raises(ValueError, match=r"ffmpeg failed encoding .*o.nosuchformat.*Unable to choose "
                       r"an output format for '[^']*/o.nosuchformat'"):
        video.overlay_line(test_video, tmp_path / "o.nosuchformat", x, confidence)
    assert not list(tmp_path.iterdir())


def test_the_output_may_not_be_an_input(test_video, tmp_path):
    """Writing onto the input video (or the CSV) would replace it: refused before anything is
    written, under any name of the file."""
    source = tmp_path / "in" / "input.mkv"
    source.parent.mkdir()
    source.write_bytes(test_video.read_bytes())
    (tmp_path / "link.mkv").symlink_to(source)
    os.link(source, tmp_path / "hard.mkv")
    forward = tmp_path / "forward.csv"
    _forward_file(forward, {"seqA-cam01": (np.zeros(NUM_FRAMES), np.ones(NUM_FRAMES))})
    before = sorted(tmp_path.rglob("*"))
    x, confidence = np.zeros(NUM_FRAMES), np.ones(NUM_FRAMES)
    for video_path, out in [(source, source), (source, tmp_path / "in" / ".." / "in" / "input.mkv"),
                            (source, tmp_path / "link.mkv"), (tmp_path / "link.mkv", source),
                            (source, tmp_path / "hard.mkv")]:
        with pytest.raises(ValueError, match=rf"output {re.escape(str(out))} is the input video "
                                             rf"{re.escape(str(video_path))}: writing it would replace"):
            video.overlay_line(video_path, out, x, confidence, video_codec="ffv1")
        with pytest.raises(ValueError, match="is the input video"):
            video.overlay_from_csv(video_path, forward, "seqA-cam01", out, video_codec="ffv1")
    with pytest.raises(ValueError, match=r"output .*forward.csv is the forward CSV .*forward.csv"):
        video.overlay_from_csv(source, forward, "seqA-cam01", forward)
    assert sorted(tmp_path.rglob("*")) == before
    assert source.read_bytes() == test_video.read_bytes()


@pytest.mark.parametrize("threshold", [float("nan"), float("inf"), 2.0, -0.1])
def test_a_threshold_outside_0_1_is_refused(test_video, tmp_path, threshold):
    x, confidence = np.zeros(NUM_FRAMES), np.ones(NUM_FRAMES)
    message = rf"threshold \(--threshold\) must be a confidence in \[0, 1\], got {threshold}"
    with pytest.raises(ValueError, match=message):
        video.overlay_line(test_video, tmp_path / "o.mkv", x, confidence, threshold=threshold)
    with pytest.raises(ValueError, match=message):
        video.line_columns(x, confidence, WIDTH, threshold)
    with pytest.raises(ValueError, match=message):  # before the CSV is read
        video.overlay_from_csv(test_video, tmp_path / "missing.csv", None, tmp_path / "o.mkv",
                               threshold=threshold)
    assert not list(tmp_path.iterdir())
    for threshold in (0, 1):  # both ends are confidences
        video.line_columns(x, confidence, WIDTH, threshold)


@pytest.mark.parametrize("line_width_px", [0, -2, 2.5])
def test_a_line_width_below_1_is_refused(test_video, tmp_path, line_width_px):
    x, confidence = np.zeros(NUM_FRAMES), np.ones(NUM_FRAMES)
    message = rf"line_width_px \(--line_width_px\) must be an integer >= 1 \(px\), got {line_width_px}"
    with pytest.raises(ValueError, match=message):
        video.overlay_line(test_video, tmp_path / "o.mkv", x, confidence, line_width_px=line_width_px)
    with pytest.raises(ValueError, match=message):
        video.draw_lines(_pattern(2), np.zeros(2, np.int64), line_width_px=line_width_px)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("flags, message", [
    (["--video_codec=nosuchcodec"], r"error: ffmpeg failed encoding .* with video_codec='nosuchcodec' "
                                    r"\(--video_codec\), exit status \d+: Unknown encoder 'nosuchcodec'"),
    (["--threshold=nan"], r"error: threshold \(--threshold\) must be a confidence in \[0, 1\], got nan"),
    (["--threshold=2"], r"error: threshold \(--threshold\) must be a confidence in \[0, 1\], got 2"),
    (["--line_width_px=0"], r"error: line_width_px \(--line_width_px\) must be an integer >= 1 \(px\)"),
    (["--out=SAME"], r"error: output .*input.mkv is the input video .*input.mkv: writing it would "),
])
def test_command_line_user_errors(test_video, tmp_path, flags, message):
    """One `error:` line, exit status 1, and no output file (nor the input replaced)."""
    source = tmp_path / "input.mkv"
    source.write_bytes(test_video.read_bytes())
    _forward_file(tmp_path / "forward.csv", {"seqA-cam01": (np.zeros(NUM_FRAMES), np.ones(NUM_FRAMES))})
    flags = [f"--out={tmp_path}/./input.mkv" if f == "--out=SAME" else f for f in flags]
    result = subprocess.run([sys.executable, "-m", "experiments.make_video", f"--video={source}",
                             f"--forward_csv={tmp_path / 'forward.csv'}", "--name=seqA-cam01",
                             f"--out={tmp_path / 'o.mkv'}", *flags], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert re.search(message, result.stderr.strip().splitlines()[-1]), result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["forward.csv", "input.mkv"]
    assert source.read_bytes() == test_video.read_bytes()


def test_an_error_while_drawing_stops_both_processes_and_leaves_no_file(test_video, tmp_path,
                                                                         monkeypatch):
    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(video, "draw_lines", broken)
    x, confidence = np.zeros(NUM_FRAMES), np.ones(NUM_FRAMES)
    with pytest.raises(KeyboardInterrupt):
        video.overlay_line(test_video, tmp_path / "o.mkv", x, confidence, video_codec="ffv1")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("when", ["waiting for the encoder", "renaming"])
def test_ctrl_c_after_the_frames_stops_ffmpeg_and_leaves_no_file(test_video, tmp_path, monkeypatch,
                                                                 when):
    waited, interrupted = [], []
    real_wait = subprocess.Popen.wait

    def wait(self, *args, **kwargs):
        waited.append(self)
        if when == "waiting for the encoder" and ".partial" in self.args[-1] and not interrupted:
            interrupted.append(self)
            raise KeyboardInterrupt  # while the encoder may still write its last frames
        return real_wait(self, *args, **kwargs)

    def replace(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(subprocess.Popen, "wait", wait)
    if when == "renaming":
        monkeypatch.setattr(os, "replace", replace)
    x, confidence = np.zeros(NUM_FRAMES), np.ones(NUM_FRAMES)
    with pytest.raises(KeyboardInterrupt):
        video.overlay_line(test_video, tmp_path / "o.mkv", x, confidence, video_codec="ffv1")
    assert not list(tmp_path.iterdir())
    assert all(process.poll() is not None for process in waited)  # none left running
    assert interrupted or when == "renaming"


def test_the_video_is_flushed_before_the_rename(test_video, tmp_path, monkeypatch):
    """As every output (atomic.partial_path): fsync, then rename from a temporary name that
    atomic.leftovers finds."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (
        events.append(("replace", pathlib.Path(a) in atomic.leftovers(b))), real_replace(a, b))[1])
    video.overlay_line(test_video, tmp_path / "o.mkv", np.zeros(NUM_FRAMES), np.ones(NUM_FRAMES),
                       video_codec="ffv1")
    assert events == ["fsync", ("replace", True)]
    assert [p.name for p in tmp_path.iterdir()] == ["o.mkv"]


@pytest.mark.skipif(not _denied("/sys"), reason="needs /sys, where no one can create a file")
def test_an_output_folder_that_is_not_writable_is_named_before_ffmpeg_starts(test_video, monkeypatch):
    """It was an encoder failure (`Permission denied` in ffmpeg's log) once both processes ran."""
    commands = []
    real_popen = subprocess.Popen
    monkeypatch.setattr(subprocess, "Popen", lambda command, *args, **kwargs: (
        commands.append(command), real_popen(command, *args, **kwargs))[1])
    with pytest.raises(PermissionError) as error:
        video.overlay_line(test_video, "/sys/o.mkv", np.zeros(NUM_FRAMES), np.ones(NUM_FRAMES))
    assert (error.value.filename, error.value.strerror) == (
        "/sys/o.mkv", "Permission denied (cannot create a file in /sys)")
    assert commands and not any("rawvideo" in command for command in commands)  # only probed


def _exact_rate(path: pathlib.Path) -> fractions.Fraction:
    """The frame rate ffmpeg decodes `path` at, exactly (the `fr:` it logs at verbose level)."""
    log = subprocess.run([video.find_ffmpeg(), "-v", "verbose", "-i", str(path), "-map", "0:v:0",
                          "-frames:v", "1", "-f", "null", "-"], capture_output=True, text=True,
                         check=True).stderr
    return fractions.Fraction(re.search(r"\bfr:(\d+/\d+)", log).group(1))


def _silent_video(path: pathlib.Path, num_frames: int, rate: str) -> pathlib.Path:
    """An FFV1 video of `num_frames` pattern frames at `rate` fps (an ffmpeg rate: "25",
    "30000/1001"), without audio."""
    subprocess.run([video.find_ffmpeg(), "-v", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
                    "-s", f"{WIDTH}x{HEIGHT}", "-r", rate, "-i", "-", "-c:v", "ffv1", str(path)],
                   input=_pattern(num_frames).tobytes(), check=True)
    return path


@pytest.mark.parametrize("rate, shown", [("25", "25"), ("30000/1001", "29.97"),  # PAL, NTSC
                                         ("24000/1001", "23.98")])  # film on NTSC
def test_wrong_frame_rate_is_refused(tmp_path, rate, shown):
    path = _silent_video(tmp_path / "other_fps.mkv", 10, rate)
    x, confidence = np.zeros(10), np.ones(10)
    with pytest.raises(ValueError, match=rf"other_fps.mkv runs at {shown} fps"):
        video.overlay_line(path, tmp_path / "o.mkv", x, confidence)
    video.overlay_line(path, tmp_path / "o.mkv", x, confidence, video_codec="ffv1",
                       allow_fps_mismatch=True)
    assert (_decode(tmp_path / "o.mkv")[:, :, 0, 0] == 255).all()
    # Encoded at the exact rate (23.98 instead of 24000/1001 drifted 16 ms per 100 s from the audio).
    assert _exact_rate(tmp_path / "o.mkv") == fractions.Fraction(rate)


def test_missing_ffmpeg_names_both_places(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_imageio(name, *args, **kwargs):
        if name == "imageio_ffmpeg":
            raise ImportError("no module named imageio_ffmpeg")
        return real_import(name, *args, **kwargs)

    monkeypatch.setenv("PATH", "")
    monkeypatch.setattr(builtins, "__import__", no_imageio)
    with pytest.raises(FileNotFoundError, match=r"no `ffmpeg` on PATH.*imageio-ffmpeg"):
        video.find_ffmpeg()


def test_missing_ffmpeg_on_the_command_line_is_one_error_line(test_video, tmp_path):
    """Neither an ffmpeg on PATH nor a usable imageio-ffmpeg (its get_ffmpeg_exe raises
    RuntimeError when it finds no binary): one `error:` line, not a traceback."""
    (tmp_path / "bin").mkdir()  # a PATH without ffmpeg
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "imageio_ffmpeg.py").write_text(
        "def get_ffmpeg_exe():\n    raise RuntimeError('No ffmpeg exe could be found.')\n")
    _forward_file(tmp_path / "forward.csv", {"seqA-cam01": (np.zeros(NUM_FRAMES), np.ones(NUM_FRAMES))})
    env = {**os.environ, "PATH": str(tmp_path / "bin"),
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "experiments.make_video", f"--video={test_video}",
                             f"--forward_csv={tmp_path / 'forward.csv'}", "--name=seqA-cam01",
                             f"--out={tmp_path / 'o.mkv'}"], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert re.fullmatch(r"error: ffmpeg not found: there is no `ffmpeg` on PATH .*No ffmpeg exe could "
                        r"be found.*", result.stderr.strip().splitlines()[-1]), result.stderr[-3000:]
    assert not (tmp_path / "o.mkv").exists()


def test_a_partial_frame_from_the_decoder_is_an_ffmpeg_error(test_video, tmp_path, monkeypatch):
    """Frames one column narrower than ffmpeg decodes: the last read ends mid-frame."""
    real_probe = video.probe
    monkeypatch.setattr(video, "probe", lambda *args: dataclasses.replace(real_probe(*args),
                                                                            width=WIDTH - 1))
    monkeypatch.setattr(video, "_decoded_format", lambda *args: (WIDTH - 1, HEIGHT, None))
    with pytest.raises(video.FfmpegError, match=r"ffmpeg decoding .*input.mkv returned a partial frame"):
        video.overlay_line(test_video, tmp_path / "o.mkv", np.zeros(NUM_FRAMES), np.ones(NUM_FRAMES),
                           video_codec="ffv1")
    assert not list(tmp_path.iterdir())


def _forward_file(path: pathlib.Path, cameras: dict) -> None:
    lines = ["name,time,predicted x,confidence"]
    for name, (x, confidence) in cameras.items():
        lines += [f"{name},{round(i / 30, 2)},{x[i]},{confidence[i]}" for i in range(len(x))]
    path.write_text("\n".join(lines) + "\n")


def test_overlay_from_a_forward_file_and_the_command_line(test_video, tmp_path):
    rng = np.random.default_rng(1)
    cameras = {f"seqA-cam0{k}": (rng.uniform(0, 1, NUM_FRAMES), rng.uniform(0, 1, NUM_FRAMES))
               for k in (1, 2)}
    x, confidence = cameras["seqA-cam02"]
    confidence[:2] = [0.5, 0.4999999]
    _forward_file(tmp_path / "forward.csv", cameras)
    expected_columns = np.where(confidence >= 0.5, np.clip(np.rint(x * WIDTH), 0, WIDTH - 1), -1)

    video.overlay_from_csv(test_video, tmp_path / "forward.csv", "seqA-cam02",
                           tmp_path / "lib.mkv", video_codec="ffv1", line_width_px=1)
    subprocess.run([sys.executable, "-m", "experiments.make_video", f"--video={test_video}",
                    f"--forward_csv={tmp_path / 'forward.csv'}", "--name=seqA-cam02",
                    f"--out={tmp_path / 'cli.mkv'}", "--video_codec=ffv1", "--line_width_px=1"],
                   check=True, cwd=REPO_ROOT, capture_output=True)
    for out in ("lib.mkv", "cli.mkv"):
        red = _decode(tmp_path / out)[:, 0, :, 0] == 255  # first row of every frame
        columns = np.where(red.any(axis=1), red.argmax(axis=1), -1)
        np.testing.assert_array_equal(columns, expected_columns)
        assert (red.sum(axis=1) <= 1).all()

    with pytest.raises(ValueError, match="no rows for 'seqA-cam05'; it holds seqA-cam01, seqA-cam02"):
        video.overlay_from_csv(test_video, tmp_path / "forward.csv", "seqA-cam05",
                               tmp_path / "o.mkv")
    assert not (tmp_path / "o.mkv").exists()


def test_rows_not_in_time_order_are_refused_before_ffmpeg_runs(test_video, tmp_path, monkeypatch):
    """Row i is drawn on frame i, so row i must be frame i's (|time * 30 - i| < 0.5), as the
    evaluation requires: rows out of order, or starting at 1.0 s, are an error naming the line."""
    def ffmpeg(*args, **kwargs):
        raise AssertionError("ffmpeg ran")

    times = np.round(np.arange(NUM_FRAMES) / 30, 2)
    swapped = times.copy()
    swapped[[1, 2]] = swapped[[2, 1]]
    monkeypatch.setattr(subprocess, "run", ffmpeg)
    monkeypatch.setattr(subprocess, "Popen", ffmpeg)
    for cam01_times, line, message in [
            (swapped, 5, "time 0.07 s read as frame 1 of seqA-cam01, whose time is 0.03 s"),
            (times + 1.0, 3, "time 1.0 s read as frame 0 of seqA-cam01, whose time is 0.00 s")]:
        # The two cameras' rows alternate: cam01's row i is on line 2 i + 3.
        lines = ["name,time,predicted x,confidence"]
        for t, t01 in zip(times, cam01_times):
            lines += [f"seqA-cam02,{t},0.5,1.0", f"seqA-cam01,{round(t01, 2)},0.5,1.0"]
        (tmp_path / "forward.csv").write_text("\n".join(lines) + "\n")
        with pytest.raises(ValueError, match=rf"forward.csv:{line}: {message}; a camera's rows must "
                                             r"be its frames in time order"):
            video.overlay_from_csv(test_video, tmp_path / "forward.csv", "seqA-cam01",
                                   tmp_path / "o.mkv", video_codec="ffv1")
    reversed_rows = [f"{t},0.5,1.0" for t in times[::-1]]  # a predict CSV
    (tmp_path / "predictions.csv").write_text("\n".join(["time,predicted x,confidence", *reversed_rows]))
    with pytest.raises(ValueError, match=r"predictions.csv:2: time 1.47 s read as frame 0 of "
                                         r"predictions.csv, whose time is 0.00 s"):
        video.overlay_from_csv(test_video, tmp_path / "predictions.csv", None, tmp_path / "o.mkv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["forward.csv", "predictions.csv"]


def _rotated_copy(source: pathlib.Path, out: pathlib.Path, degrees: int) -> None:
    """A stream copy of `source` tagged with a display rotation (as phones write)."""
    proc = subprocess.run([video.find_ffmpeg(), "-v", "error", "-y", "-display_rotation", str(degrees),
                           "-i", str(source), "-c", "copy", str(out)], capture_output=True)
    if proc.returncode != 0:  # an ffmpeg older than 6.1 (no -display_rotation)
        subprocess.run([video.find_ffmpeg(), "-v", "error", "-y", "-i", str(source), "-c", "copy",
                        "-metadata:s:v:0", f"rotate={-degrees % 360}", str(out)], check=True,
                       capture_output=True)


@pytest.mark.parametrize("degrees", [90, 180, 270])
def test_rotated_video_is_drawn_as_displayed(test_video, tmp_path, degrees):
    rotated = tmp_path / "rotated.mkv"
    _rotated_copy(test_video, rotated, degrees)
    info = video.probe(rotated)
    if info.rotation_deg == 0:
        pytest.skip("this ffmpeg cannot tag a display rotation")
    # Displayed frames: the stored ones turned counter-clockwise by the display rotation.
    displayed = np.rot90(_pattern(NUM_FRAMES), k=degrees // 90, axes=(1, 2))
    width, height = displayed.shape[2], displayed.shape[1]
    assert (info.rotation_deg, info.width, info.height) == (degrees, width, height)

    rng = np.random.default_rng(2)
    x, confidence = rng.uniform(0, 1, NUM_FRAMES), rng.uniform(0, 1, NUM_FRAMES)
    out = tmp_path / "out.mkv"
    assert video.overlay_line(rotated, out, x, confidence, video_codec="ffv1",
                              line_width_px=1) == NUM_FRAMES
    raw = subprocess.run([video.find_ffmpeg(), "-v", "error", "-i", str(out), "-map", "0:v:0",
                          "-f", "rawvideo", "-pix_fmt", "rgb24", "-"], capture_output=True,
                         check=True).stdout
    frames = np.frombuffer(raw, np.uint8).reshape(-1, height, width, 3)
    assert video.probe(out).rotation_deg == 0  # upright frames, shown as the input is
    expected = displayed.copy()
    for i in range(NUM_FRAMES):  # a vertical line on screen, x a fraction of the shown width
        if confidence[i] >= 0.5:
            expected[i, :, min(max(int(round(x[i] * width)), 0), width - 1)] = (255, 0, 0)
    np.testing.assert_array_equal(frames, expected)


def test_probe_reads_a_duration_of_minutes(tmp_path):
    """61 frames at 1 fps: ffmpeg reports Duration: 00:01:01.00."""
    info = video.probe(_silent_video(tmp_path / "long.mkv", 61, "1"))
    assert info.duration_s == pytest.approx(61.0, abs=0.05) and info.approx_num_frames == 61


def test_a_rotation_other_than_quarter_turns_is_refused(test_video, tmp_path):
    rotated = tmp_path / "tilted.mkv"
    _rotated_copy(test_video, rotated, 45)
    report = subprocess.run([video.find_ffmpeg(), "-hide_banner", "-i", str(rotated)], capture_output=True,
                            text=True).stderr
    if "rotation of" not in report and "rotate" not in report:
        pytest.skip("this ffmpeg cannot tag a display rotation")
    with pytest.raises(ValueError, match=r"tilted.mkv: its video is displayed rotated by (45|315) degrees; "
                                         r"only multiples of 90 degrees are supported"):
        video.probe(rotated)


def test_rotation_is_read_from_either_ffmpeg_report():
    new = ["    Side data:", "      Display Matrix: rotation of 90.00 degrees"]
    old = ["    Side data:", "      displaymatrix: rotation of -90.00 degrees"]
    tag = ["    Metadata:", "      rotate          : 90"]
    assert [video._rotation_deg(lines) for lines in (new, old, tag, [])] == [90.0, 270.0, 270.0, 0.0]


def test_probe_reads_a_duration_of_hours(tmp_path):
    """37 frames at one frame per 100 s: 3700 s, which ffmpeg reports as Duration: 01:01:40.00."""
    info = video.probe(_silent_video(tmp_path / "slow.mkv", 37, "1/100"))
    assert info.duration_s == pytest.approx(3700.0, abs=0.05)
    assert info.fps == pytest.approx(0.01) and info.approx_num_frames == 37


def test_a_row_half_a_frame_off_is_refused_as_the_evaluation_refuses_it(tmp_path):
    """Row i must lie *within* half a frame of i/30 s (SPEC section 9 matching, the evaluation's
    rule): 0.25 s is exactly 7.5 frames, so as row 7 it is as much frame 8's as frame 7's."""
    times = np.round(np.arange(12) / 30, 2)
    times[7] = 0.25
    path = tmp_path / "predictions.csv"
    path.write_text("\n".join(["time,predicted x,confidence", *(f"{t},0.5,1.0" for t in times)]) + "\n")
    with pytest.raises(ValueError, match=r"predictions.csv:9: time 0.25 s read as frame 7 of predictions.csv"):
        video.check_row_times(path, None, times)
    times[7] = 0.24  # 7.2 frames: within half a frame
    video.check_row_times(path, None, times)


def test_draw_lines_refuses_columns_of_another_length():
    """One column for five frames would be broadcast onto all of them."""
    frames = _pattern(5)
    with pytest.raises(ValueError, match=r"columns has shape \(1,\), expected \(5,\)"):
        video.draw_lines(frames, np.array([3]))
    np.testing.assert_array_equal(frames, _pattern(5))


def test_a_boolean_line_width_is_refused():
    with pytest.raises(ValueError, match=r"line_width_px \(--line_width_px\) must be an integer >= 1 \(px\), "
                                         r"got True"):
        video.draw_lines(_pattern(2), np.zeros(2, np.int64), line_width_px=True)
