"""Timeline plot of one camera's predictions against the ground truth (matplotlib, Agg backend).

Two panels sharing the time axis (seconds): the confidence with the 0.5 decision threshold,
and the horizontal position in pixels (the prediction a faint line over all frames, with a dot
on each frame whose confidence is at least the threshold: the evaluation's and the video's
rule for a speaking frame, SPEC section 9). Ground-truth speaking frames are shaded on both
panels and the ground-truth position is drawn on the second.
"""

from __future__ import annotations

import os
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from asd_jax import atomic  # pylint: disable=wrong-import-position
from asd_jax import constants  # pylint: disable=wrong-import-position
from asd_jax import evaluation  # pylint: disable=wrong-import-position
from asd_jax import metrics  # pylint: disable=wrong-import-position
from asd_jax import predict  # pylint: disable=wrong-import-position


# What `plot_timeline` writes, by the output's extension: raster images of exactly the size
# asked for, and vector documents of that size at `dpi` (100) px per inch.
FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".svg": "svg", ".pdf": "pdf"}
# Largest width or height, px: a 10000 x 10000 image is a 400 MB RGBA buffer to render.
MAX_SIZE_PX = 10_000


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_plot(out_path: str | os.PathLike, image_width: int, size_px: tuple[int, int]) -> str:
    """matplotlib's format for `out_path`, from its extension (case-insensitive) in FORMATS.
    Raises ValueError for another extension, an image_width that is not a positive integer
    (px), or a size_px that is not (width, height) integers in [1, MAX_SIZE_PX] (px)."""
    if not _is_int(image_width) or image_width < 1:
        raise ValueError(f"image_width (--image_width) must be a positive integer number of px "
                         f"(the camera image's width), got {image_width!r}")
    if len(size_px) != 2:
        raise ValueError(f"size_px must be (width, height) in px, got {size_px!r}")
    for value, what in zip(size_px, ("width", "height")):
        if not _is_int(value) or not 1 <= value <= MAX_SIZE_PX:
            raise ValueError(f"plot {what} (--{what}_px) must be an integer in [1, {MAX_SIZE_PX}] "
                             f"px, got {value!r}")
    suffix = pathlib.Path(out_path).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"output {out_path}: extension {suffix or '(none)'!r} is not one of "
                         f"{', '.join(FORMATS)}, the formats a timeline is written in")
    return FORMATS[suffix]


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) index pairs of the runs of True in a 1-D bool mask."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0]))


def plot_timeline(out_path: str | os.PathLike, times: np.ndarray, x: np.ndarray,
                  confidence: np.ndarray, *, gt_speaking: np.ndarray | None = None,
                  gt_x_px: np.ndarray | None = None, title: str = "",
                  image_width: int = constants.IMAGE_WIDTH_PX, threshold: float = 0.5,
                  fps: int = constants.VIDEO_FPS, size_px: tuple[int, int] = (1600, 800),
                  dpi: int = 100) -> pathlib.Path:
    """Writes the plot, `size_px` (width, height) pixels, and returns its path.

    The format is the extension's (FORMATS): PNG or JPEG of exactly `size_px`, or SVG or PDF
    of size_px / dpi inches; another extension raises ValueError.
    times: (N,) s; x: (N,) position in [0, 1] of the image width; confidence: (N,) in [0, 1].
    gt_speaking: (F,) bool per video frame (frame f at f / fps s); gt_x_px: (F,) float px, NaN
    where nobody speaks. Either may be None (no ground truth drawn). image_width: px, a positive
    integer; size_px: integers in [1, MAX_SIZE_PX].
    """
    times, x, confidence = (np.asarray(a, np.float64) for a in (times, x, confidence))
    if not times.ndim == 1 or not times.shape == x.shape == confidence.shape:
        raise ValueError(f"times, x and confidence must be 1-D of equal length, got {times.shape}, "
                         f"{x.shape}, {confidence.shape}")
    file_format = _check_plot(out_path, image_width, size_px)
    out_path = pathlib.Path(out_path)
    if not out_path.parent.is_dir():
        raise FileNotFoundError(f"output directory {out_path.parent} does not exist")

    fig, (ax_conf, ax_x) = plt.subplots(2, 1, sharex=True,
                                        figsize=(size_px[0] / dpi, size_px[1] / dpi), dpi=dpi)
    try:
        if gt_speaking is not None:
            for start, stop in _runs(np.asarray(gt_speaking, bool)):
                for ax in (ax_conf, ax_x):
                    ax.axvspan(start / fps, stop / fps, color="tab:green", alpha=0.15, lw=0)
            ax_conf.plot([], [], color="tab:green", alpha=0.3, lw=8, label="GT speaking")  # legend
        ax_conf.plot(times, confidence, color="tab:blue", lw=1, label="confidence")
        ax_conf.axhline(threshold, color="gray", ls="--", lw=1, label=f"threshold {threshold:g}")
        ax_conf.set_ylim(-0.02, 1.02)
        ax_conf.set_ylabel("confidence")
        ax_conf.legend(loc="upper right", fontsize="small")

        x_px = x * image_width
        speaking = confidence >= threshold  # dots: a lone speaking frame shows too
        ax_x.plot(times, x_px, color="tab:orange", alpha=0.3, lw=1, label="predicted x")
        ax_x.plot(times[speaking], x_px[speaking], color="tab:orange", ls="none", marker="o",
                  ms=2, label=f"predicted x, confidence >= {threshold:g}")
        if gt_x_px is not None:
            gt_x_px = np.asarray(gt_x_px, np.float64)
            ax_x.plot(np.arange(len(gt_x_px)) / fps, gt_x_px, color="k", lw=1.5, label="GT x")
        ax_x.set_ylim(0, image_width)
        ax_x.set_ylabel("x (px)")
        ax_x.set_xlabel("time (s)")
        ax_x.legend(loc="upper right", fontsize="small")
        if title:
            ax_conf.set_title(title)
        fig.tight_layout()
        with atomic.partial_path(out_path) as partial:
            fig.savefig(partial, format=file_format, dpi=dpi)
    finally:
        plt.close(fig)
    return out_path


def read_camera_gt(gt_dir: str | os.PathLike, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth per frame of camera `name` (`<sequence>-camNN`) from a GT directory.

    Reads `<gt_dir>/<sequence>/<rig>/<name>_GT.csv` (rig from the camera number). Its F frames
    are those of the `frame` column (max + 1); S speakers are stacked, F rows each (SPEC 1):
    each block's frames are 0..F-1 in order and its speaker_id one, as the evaluation requires
    (ValueError naming the line otherwise).
    Returns (speaking (F,) bool, x_px (F,) float64 with NaN where nobody speaks); the first
    speaking speaker's position wins, as in the evaluation.
    """
    sequence, _, camera = name.rpartition("-")
    if not sequence:
        raise ValueError(f"camera name {name!r}: expected <sequence>-camNN")
    path = pathlib.Path(gt_dir) / sequence / constants.camera_rig(camera) / f"{name}_GT.csv"
    if not path.is_file():
        raise FileNotFoundError(f"GT file {path} does not exist")
    rows = evaluation.read_gt_file(path)
    frames = int(rows.frame.max()) + 1
    if rows.frame.shape[0] % frames:
        raise ValueError(f"GT file {path}: {rows.frame.shape[0]} rows is not a whole number of "
                         f"{frames}-frame speaker blocks")
    frame_in_block = np.arange(rows.frame.shape[0]) % frames
    first_of_block = np.arange(rows.frame.shape[0]) - frame_in_block
    wrong_frame = rows.frame != frame_in_block
    bad = wrong_frame | (rows.speaker != rows.speaker[first_of_block])
    if np.any(bad):
        i = int(np.argmax(bad))
        problem = (f"frame is {rows.frame[i]}, expected {frame_in_block[i]}" if wrong_frame[i] else
                   f"speaker_id is {rows.speaker[i]}, expected {rows.speaker[first_of_block[i]]} as "
                   f"on line {first_of_block[i] + 1}, the first of its block")
        raise ValueError(f"{path}:{i + 1}: {problem}; a GT file holds one block of F = {frames} "
                         "rows per speaker, frames 0..F-1 in order and one speaker_id each")
    speaking, x_px = metrics.speaker_union(rows.speaking.reshape(-1, frames),
                                           rows.x_px.reshape(-1, frames))
    return speaking, np.where(speaking, x_px, np.nan)


def timeline_from_files(forward_csv: str | os.PathLike, name: str | None,
                        out_path: str | os.PathLike, gt_dir: str | os.PathLike | None = None,
                        image_width: int = constants.IMAGE_WIDTH_PX,
                        size_px: tuple[int, int] = (1600, 800)) -> pathlib.Path:
    """The timeline plot of one camera from a forward or predict CSV, with its GT if given
    (`plot_timeline`: the format from out_path's extension; image_width and size_px in px).

    `name` (`<sequence>-camNN`) picks the camera of a forward file and titles the plot; with
    `gt_dir` it is required also for a predict CSV, since it names the GT file to read.
    """
    _check_plot(out_path, image_width, size_px)  # before reading the files
    if gt_dir is not None and name is None:
        raise ValueError(f"a GT directory ({gt_dir}) needs the camera's name <sequence>-camNN "
                         "to find its GT file")
    rows = predict.read_camera_rows(forward_csv, name)
    speaking, gt_x_px = read_camera_gt(gt_dir, name) if gt_dir is not None else (None, None)
    return plot_timeline(out_path, rows.times, rows.x, rows.confidence, gt_speaking=speaking,
                         gt_x_px=gt_x_px, title=name or pathlib.Path(forward_csv).name,
                         image_width=image_width, size_px=size_px)
