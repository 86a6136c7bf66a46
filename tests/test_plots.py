"""Timeline plot: a PNG of the requested size, read back from its IHDR header."""

import json
import pathlib
import re
import struct
import subprocess
import sys

import matplotlib.image
import numpy as np
import PIL.Image
import pytest

from asd_jax import plots

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _rows(n=219):
    times = np.round(np.arange(n) / 30, 2)
    x = 0.5 + 0.3 * np.sin(times)
    confidence = (np.sin(3 * times) + 1) / 2
    return times, x, confidence


@pytest.mark.parametrize("size_px", [(1600, 800), (640, 480)])
def test_png_has_the_requested_size(tmp_path, size_px):
    times, x, confidence = _rows()
    speaking = np.zeros(219, bool)
    speaking[30:120] = True
    gt_x = np.where(speaking, 1200.0, np.nan)
    out = plots.plot_timeline(tmp_path / "t.png", times, x, confidence, gt_speaking=speaking,
                              gt_x_px=gt_x, title="seq-cam01", size_px=size_px)
    assert out == tmp_path / "t.png"
    assert _png_size(out) == size_px
    pixels = matplotlib.image.imread(out)
    assert pixels.shape[:2] == size_px[::-1]
    assert pixels[..., :3].std() > 0.05  # something is drawn
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.png"]


def test_without_ground_truth(tmp_path):
    times, x, confidence = _rows(10)
    out = plots.plot_timeline(tmp_path / "t.png", times, x, confidence)
    assert _png_size(out) == (1600, 800)


def test_figures_are_closed(tmp_path):
    """pyplot keeps every open figure alive: a loop over cameras must not accumulate them."""
    import matplotlib.pyplot as plt
    times, x, confidence = _rows(10)
    before = len(plt.get_fignums())
    for i in range(3):
        plots.plot_timeline(tmp_path / f"t{i}.png", times, x, confidence)
    assert len(plt.get_fignums()) == before


def test_runs():
    mask = np.array([1, 1, 0, 0, 1, 0, 1], bool)
    assert plots._runs(mask) == [(0, 2), (4, 5), (6, 7)]  # pylint: disable=protected-access


def test_errors(tmp_path):
    times, x, confidence = _rows(10)
    with pytest.raises(ValueError, match="equal length"):
        plots.plot_timeline(tmp_path / "t.png", times, x[:5], confidence)
    with pytest.raises(ValueError, match=r"equal length, got \(10,\), \(10,\), \(9,\)"):
        plots.plot_timeline(tmp_path / "t.png", times, x, confidence[:9])
    with pytest.raises(ValueError, match="1-D"):
        plots.plot_timeline(tmp_path / "t.png", times[None], x[None], confidence[None])
    with pytest.raises(FileNotFoundError, match="output directory"):
        plots.plot_timeline(tmp_path / "no" / "t.png", times, x, confidence)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("kwargs, message", [
    ({"size_px": (0, 800)}, r"plot width \(--width_px\) must be an integer in \[1, 10000\] px, got 0"),
    ({"size_px": (1600, -5)}, r"plot height \(--height_px\) must be an integer in \[1, 10000\] px, got -5"),
    ({"size_px": (100_000, 100_000)}, r"plot width \(--width_px\) must be .* got 100000"),
    ({"size_px": (1600.5, 800)}, r"plot width .* got 1600.5"),
    ({"image_width": 0}, r"image_width \(--image_width\) must be a positive integer number of px.*got 0"),
    ({"image_width": -2448}, r"image_width \(--image_width\) must be a positive integer .*got -2448"),
])
def test_sizes_are_checked_before_plotting(tmp_path, kwargs, message):
    times, x, confidence = _rows(10)
    with pytest.raises(ValueError, match=message):
        plots.plot_timeline(tmp_path / "t.png", times, x, confidence, **kwargs)
    with pytest.raises(ValueError, match=message):  # before the CSV is read
        plots.timeline_from_files(tmp_path / "missing.csv", None, tmp_path / "t.png", **kwargs)
    assert not list(tmp_path.iterdir())


def test_the_extension_picks_the_format(tmp_path):
    times, x, confidence = _rows(10)
    for name in ("t.jpg", "t.JPEG"):
        out = plots.plot_timeline(tmp_path / name, times, x, confidence, size_px=(320, 200))
        with PIL.Image.open(out) as image:
            assert (image.format, image.size) == ("JPEG", (320, 200))
    svg = plots.plot_timeline(tmp_path / "t.svg", times, x, confidence, size_px=(320, 200))
    assert b"<svg" in svg.read_bytes()[:1000] and b'width="230.4pt"' in svg.read_bytes()[:1000]
    pdf = plots.plot_timeline(tmp_path / "t.pdf", times, x, confidence, size_px=(320, 200))
    assert pdf.read_bytes().startswith(b"%PDF") and b"/MediaBox [ 0 0 230.4 144 ]" in pdf.read_bytes()
    for name in ("t.gif", "t.png.bak", "timeline"):
        with pytest.raises(ValueError, match=rf"output .*{name}: extension '[^']*' is not one of "
                                             r"\.png, \.jpg, \.jpeg, \.svg, \.pdf"):
            plots.plot_timeline(tmp_path / name, times, x, confidence)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.JPEG", "t.jpg", "t.pdf", "t.svg"]


def _gt_by_hand(path, frames):
    """SPEC section 9 literally: SPEAKING if any speaker is; the first speaking one's x."""
    lines = [line.split(",") for line in path.read_text().split()]
    speaking, x = [], []
    for f in range(frames):
        rows = [lines[s * frames + f] for s in range(len(lines) // frames)]
        talking = [r for r in rows if r[4] == "SPEAKING"]
        speaking.append(bool(talking))
        x.append(float(talking[0][1]) if talking else np.nan)
    return np.array(speaking), np.array(x)


@pytest.mark.parametrize("name", ["conversation1_t3-cam01", "malemonologue2_t3-cam15"])
def test_camera_ground_truth(reference_dir, name):
    sequence = name.rsplit("-", 1)[0]
    lengths = json.loads((reference_dir / "seq_lengths.json").read_text())
    frames = int(round(float(lengths[sequence]) * 30))
    rig = "01" if name.endswith(("cam01", "cam02")) else "02"
    speaking, x_px = plots.read_camera_gt(reference_dir / "GT", name)
    expected_speaking, expected_x = _gt_by_hand(
        reference_dir / "GT" / sequence / rig / f"{name}_GT.csv", frames)
    np.testing.assert_array_equal(speaking, expected_speaking)
    np.testing.assert_array_equal(x_px, expected_x)
    assert speaking.any() and not speaking.all()


def test_timeline_of_a_released_forward_file(reference_dir, tmp_path):
    out = plots.timeline_from_files(reference_dir / "released" / "ASCs" / "test_forward.csv",
                                    "interactive4_t3-cam03", tmp_path / "t.png",
                                    gt_dir=reference_dir / "GT", size_px=(800, 400))
    assert _png_size(out) == (800, 400)


def test_ground_truth_errors(reference_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="GT file .*nosuch_t1-cam01_GT.csv does not exist"):
        plots.read_camera_gt(reference_dir / "GT", "nosuch_t1-cam01")
    with pytest.raises(ValueError, match="unknown camera 'cam40'"):
        plots.read_camera_gt(reference_dir / "GT", "conversation1_t3-cam40")
    with pytest.raises(ValueError, match="expected <sequence>-camNN"):
        plots.read_camera_gt(reference_dir / "GT", "cam01")
    # A GT file whose rows are not whole speaker blocks (a speaker's block cut short).
    source = reference_dir / "GT" / "conversation1_t3" / "01" / "conversation1_t3-cam01_GT.csv"
    lines = source.read_text().splitlines()
    broken = tmp_path / "GT" / "conversation1_t3" / "01" / "conversation1_t3-cam01_GT.csv"
    broken.parent.mkdir(parents=True)
    broken.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ValueError, match=rf"GT file .*conversation1_t3-cam01_GT.csv: {len(lines) - 1} "
                                         rf"rows is not a whole number of \d+-frame speaker blocks"):
        plots.read_camera_gt(tmp_path / "GT", "conversation1_t3-cam01")


def test_command_line(reference_dir, tmp_path):
    out = tmp_path / "cli.png"
    subprocess.run([sys.executable, "-m", "experiments.plot_timeline",
                    f"--forward_csv={reference_dir / 'released' / 'ASC' / 'test_forward.csv'}",
                    "--name=femalemonologue2_t3-cam12", f"--gt_dir={reference_dir / 'GT'}",
                    f"--out={out}", "--width_px=1000", "--height_px=500"],
                   check=True, cwd=REPO_ROOT, capture_output=True)
    assert _png_size(out) == (1000, 500)


def _predictions(tmp_path) -> pathlib.Path:
    path = tmp_path / "predictions.csv"
    path.write_text("time,predicted x,confidence\n0,0.5,0.9\n0.03,0.5,0.8\n")
    return path


@pytest.mark.parametrize("flags, message", [
    (["--width_px=0"], r"plot width \(--width_px\) must be an integer in \[1, 10000\] px, got 0"),
    (["--height_px=-5"], r"plot height \(--height_px\) must be an integer in \[1, 10000\] px, got -5"),
    (["--width_px=100000", "--height_px=100000"], r"plot width \(--width_px\) must be .*got 100000"),
    (["--image_width=0"], r"image_width \(--image_width\) must be a positive integer number of px"),
    (["--out=OUT/t.gif"], r"output .*t.gif: extension '.gif' is not one of .png, .jpg"),
])
def test_command_line_user_errors(tmp_path, flags, message):
    """One `error:` line naming the flag, exit status 1, no file written."""
    predictions = _predictions(tmp_path)
    flags = [f.replace("OUT", str(tmp_path)) for f in flags]
    result = subprocess.run([sys.executable, "-m", "experiments.plot_timeline",
                             f"--forward_csv={predictions}", f"--out={tmp_path / 't.png'}", *flags],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert re.search("error: " + message, result.stderr.strip().splitlines()[-1]), result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.csv"]


def test_command_line_writes_the_format_of_the_extension(tmp_path):
    out = tmp_path / "t.jpg"
    subprocess.run([sys.executable, "-m", "experiments.plot_timeline",
                    f"--forward_csv={_predictions(tmp_path)}", f"--out={out}", "--width_px=400",
                    "--height_px=300"], check=True, cwd=REPO_ROOT, capture_output=True, timeout=300)
    with PIL.Image.open(out) as image:
        assert (image.format, image.size) == ("JPEG", (400, 300))


def test_ground_truth_needs_the_camera_name(reference_dir, tmp_path):
    """A predict CSV holds no camera name: with a GT directory, the name must be given."""
    predictions = tmp_path / "predictions.csv"
    predictions.write_text("time,predicted x,confidence\n0,0.5,0.9\n0.03,0.5,0.8\n")
    with pytest.raises(ValueError, match="needs the camera's name <sequence>-camNN"):
        plots.timeline_from_files(predictions, None, tmp_path / "t.png", gt_dir=reference_dir / "GT")
    assert not (tmp_path / "t.png").exists()
    result = subprocess.run([sys.executable, "-m", "experiments.plot_timeline",
                             f"--forward_csv={predictions}", f"--gt_dir={reference_dir / 'GT'}",
                             f"--out={tmp_path / 't.png'}"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "--gt_dir needs --name <sequence>-camNN" in result.stderr
    assert not (tmp_path / "t.png").exists()


def test_every_frame_at_or_above_the_threshold_is_drawn(tmp_path, monkeypatch):
    """The position panel: a faint line through all frames and a dot on each frame whose
    confidence is at least the threshold. A lone such frame between others below it was drawn
    by nothing (a line between NaNs), and exactly 0.5 counted as not speaking."""
    figures = []
    close = plots.plt.close
    monkeypatch.setattr(plots.plt, "close", figures.append)
    times = np.arange(6) / 30
    x = np.linspace(0.1, 0.6, 6)
    confidence = np.array([0.6, 0.4, 0.5, 0.4999, 0.6, 0.4])
    plots.plot_timeline(tmp_path / "t.png", times, x, confidence, image_width=1000,
                        size_px=(320, 200))
    (figure,) = figures
    try:
        lines = figure.axes[1].lines  # no GT: only the prediction
        dots = [line for line in lines if line.get_marker() not in (None, "None", "", " ")]
        faint = [line for line in lines if line not in dots]
        assert len(dots) == len(faint) == 1 and dots[0].get_linestyle() == "None"
        np.testing.assert_array_equal(faint[0].get_xdata(), times)
        np.testing.assert_allclose(faint[0].get_ydata(), x * 1000)
        speaking = [0, 2, 4]
        np.testing.assert_array_equal(dots[0].get_xdata(), times[speaking])
        np.testing.assert_allclose(dots[0].get_ydata(), x[speaking] * 1000)
    finally:
        close(figure)


@pytest.mark.parametrize("speakers, frames, message", [
    ([0, 0, 0, 1, 1, 1], [2, 1, 0, 0, 1, 2], r":1: frame is 2, expected 0"),
    ([0, 0, 0, 1, 1, 1], [0, 1, 2, 0, 2, 1], r":5: frame is 2, expected 1"),
    ([0, 0, 1, 1, 1, 1], [0, 1, 2, 0, 1, 2], r":3: speaker_id is 1, expected 0 as on line 1, the "
                                             r"first of its block"),
])
def test_ground_truth_blocks_must_be_frames_in_order(tmp_path, speakers, frames, message):
    """Whole blocks of rows, but frames out of order (or two speakers in one block) were read as
    other frames' ground truth, silently."""
    path = tmp_path / "GT" / "seqA" / "01" / "seqA-cam01_GT.csv"
    path.parent.mkdir(parents=True)
    rows = [f"{f},{100 * (i + 1)},50,{s},SPEAKING" for i, (f, s) in enumerate(zip(frames, speakers))]
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError, match=rf"seqA-cam01_GT.csv{message}; a GT file holds one block of "
                                         r"F = 3 rows per speaker, frames 0..F-1 in order"):
        plots.read_camera_gt(tmp_path / "GT", "seqA-cam01")
    path.write_text("\n".join(f"{i % 3},{100 * (i + 1)},50,{i // 3},{'NOT_' * (i < 3)}SPEAKING"
                              for i in range(6)) + "\n")
    speaking, x_px = plots.read_camera_gt(tmp_path / "GT", "seqA-cam01")
    np.testing.assert_array_equal(speaking, [True, True, True])
    np.testing.assert_array_equal(x_px, [400, 500, 600])
