"""The evaluation edge (SPEC sections 8-10): files in, `asd_jax.metrics` in the middle, files out.

Reads `test_forward.csv`, the GT directory and `seq_lengths.json`; writes, per tolerance,
`precision_recall_<tol>_sigmoid.csv` (the reference's format), `metrics_<tol>.json` and
optionally `precision_recall_<tol>.png`. Also reads released `F1_scores_*.pckl` files
without running pickle code, for `compare_sequence_f1`.

How files are matched, as the reference does it:
- Cells are the (sequence, rig) folders of the GT directory, sorted; for TragicTalkers'
  test set that is SPEC's order of the 10 sequence-wise F1 values. Nothing here knows the
  five sequence names.
- The reference iterates over GT files: a forward camera without a GT file (e.g.
  interactive1_t2-cam17), or a forward sequence without a GT folder, is ignored; here with a
  warning naming it. A GT file's camera must have at least F forward rows (F = frames of its
  sequence); its first F rows, in file order, are its frames 0..F-1 (extra rows are ignored,
  as in the reference), and each one's time must be its frame's, n/30 s to within half a frame.
- A GT file holds S speakers one after the other, F rows each; S = rows / F. The reference
  decides S from the sequence name (2 for conversation*/interactive*, else 1), which gives
  the same S on TragicTalkers. Each block is checked: its frame column runs 0..F-1 and its
  speaker_id is constant, so a wrong length in seq_lengths.json (which would split one
  speaker into two, or merge two) is an error naming the GT file and line.

Errors instead of the reference's silent behaviour (all raised before anything is written):
fewer forward rows than F for a GT camera (the reference reads unrelated rows), a GT camera's
rows out of time order (the reference scores them against other frames), a GT camera
absent from the forward file, a forward or GT name whose sequence is not in
seq_lengths.json or whose camera is not cam01..cam22 (or not of its rig folder), a value
`np.loadtxt` cannot read or a non-finite one, a forward x or confidence outside [0, 1]
(pixels or percent), a sequence length of 0 frames, a GT file that is not blocks of F rows
(frames 0..F-1, one speaker_id each), a GT label other than SPEAKING / NOT_SPEAKING, a GT
sequence folder without both rig folders `01` and `02`, a cell whose GT has no SPEAKING frame (the
reference divides by zero). Every text file read (forward and GT CSVs, seq_lengths.json, metrics
JSONs) must be UTF-8 text, or the error names the file and line. File content quoted in an error is
cut to a printable excerpt (`asd_jax.textfiles`).
"""

from __future__ import annotations

import io
import json
import math
import os
import pathlib
import pickle
import re
from typing import Any, NamedTuple, Sequence

import jax
import numpy as np
from absl import logging

from asd_jax import atomic
from asd_jax import constants
from asd_jax import metrics
from asd_jax.textfiles import check_text, excerpt, read_text

PathLike = str | os.PathLike
FORWARD_HEADER = ("name", "time", "predicted x", "confidence")
PR_HEADER = ("confidence", "true pos", "GT pos", "predict pos", "precision", "recall")
GT_FIELDS = ("frame", "x_px", "y_px", "speaker_id", "label")
GT_LABELS = ("NOT_SPEAKING", "SPEAKING")
_GT_NAME = re.compile(r"^(?P<sequence>.+)-(?P<camera>cam\d\d)_GT\.csv$")
_FORWARD_NAME = re.compile(r"^(?P<sequence>.+)-(?P<camera>cam\d\d)$")
# Units of the metrics that have one, recorded in metrics_<tol>.json: the detection error in
# percent beside its standard error as a fraction, as the reference prints them.
METRIC_UNITS = {"tolerance_px": "px", "aD": "px", "aD_se": "px", "aD_cells": "px",
                "det_err": "percent", "det_err_se": "fraction", "F1_threshold_pct": "percent"}
_PAD_FRAMES = 8192  # frames are padded to a multiple of this: few distinct jit shapes


# ----------------------------------------------------------------------------------------
# Readers.
# ----------------------------------------------------------------------------------------


def read_seq_lengths(path: PathLike) -> dict[str, float]:
    """`seq_lengths.json` -> {sequence: length in seconds} (values are strings in the file)."""
    expected = "a JSON object {sequence: seconds}"
    try:
        raw = json.loads(read_text(path, expected))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); expected {expected}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected {expected}, got {type(raw).__name__}")
    lengths = {}
    for name, value in raw.items():
        try:
            seconds = math.nan if isinstance(value, bool) else float(value)
        except (TypeError, ValueError):
            seconds = math.nan
        if not math.isfinite(seconds) or seconds <= 0:
            raise ValueError(f"{path}: length of {excerpt(name)} is {excerpt(value)}; expected "
                             "positive seconds")
        lengths[name] = seconds
    return lengths


def num_frames(length_s: float, fps: int = constants.VIDEO_FPS) -> int:
    """F, the frames of a sequence: int(round(length * 30)) of its unrounded length (SPEC
    section 9; the forward pass, section 8, compares times with the length rounded to 2
    decimals instead, so a length of 1.016 s has F = 30 frames and 31 forward rows)."""
    return int(round(length_s * fps))


class _Table(NamedTuple):
    """Comma-separated text tables of one or more files, located in their bytes.

    buf: (bytes,) uint8, the files one after the other; starts, stops: (rows, fields) int64
    byte offsets of every field; paths: the files; file_rows: (files,) rows per file;
    first_lines: (files,) line number of each file's first row (2 after a header).
    """

    buf: np.ndarray
    starts: np.ndarray
    stops: np.ndarray
    paths: tuple[PathLike, ...]
    file_rows: np.ndarray
    first_lines: np.ndarray

    def where(self, row: int) -> str:
        """'path:line' of a row, for error messages."""
        file = int(np.searchsorted(np.cumsum(self.file_rows), row, side="right"))
        first_row = int(np.sum(self.file_rows[:file]))
        return f"{self.paths[file]}:{row - first_row + self.first_lines[file]}"

    def field(self, row: int, column: int) -> str:
        """A field as an error message shows it: its `excerpt`."""
        return excerpt(self.buf[self.starts[row, column]:self.stops[row, column]])


def _read_table(paths: Sequence[PathLike], fields: tuple[str, ...],
                header: tuple[str, ...] | None = None) -> _Table:
    """Splits CSV files into rows of exactly len(fields) fields, vectorised over their bytes.

    With `header`, each file's first line must equal it. Trailing blank lines are ignored;
    any other line without exactly len(fields) fields, or a file that is not UTF-8 text, is an
    error naming the file and line.
    """
    chunks, first_lines = [], []
    expected = f"a CSV file of the fields {','.join(header or fields)!r}"
    for path in paths:
        data = pathlib.Path(path).read_bytes()
        check_text(data, path, expected)
        data = data.removeprefix(b"\xef\xbb\xbf")  # the UTF-8 BOM a spreadsheet may write
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        data = data.rstrip(b"\n")
        first_lines.append(1)
        if header is not None:
            head, _, data = data.partition(b"\n")
            got = tuple(f.strip() for f in head.decode("utf-8").split(","))
            if got != header:
                raise ValueError(f"{path}:1: expected the header {','.join(header)!r}, got "
                                 f"{excerpt(head)}")
            first_lines[-1] = 2
        chunks.append(data + b"\n" if data else b"")
    buf = np.frombuffer(b"".join(chunks), np.uint8)
    ends = np.flatnonzero(buf == ord("\n"))
    commas = np.flatnonzero(buf == ord(","))
    line_starts = np.concatenate([[0], ends + 1])[:-1]
    table = _Table(buf, np.zeros((0, len(fields)), np.int64), np.zeros((0, len(fields)), np.int64),
                   tuple(paths), np.array([c.count(b"\n") for c in chunks], np.int64),
                   np.array(first_lines, np.int64))
    per_row = len(fields) - 1
    if commas.shape[0] == per_row * ends.shape[0]:
        # With per_row commas per line on average, every line has exactly per_row commas iff
        # the i-th group of per_row commas starts after line i starts and ends before it ends.
        commas = commas.reshape(-1, per_row)
        if np.all(commas[:, 0] >= line_starts) & np.all(commas[:, -1] < ends):
            return table._replace(starts=np.concatenate([line_starts[:, None], commas + 1], axis=1),
                                  stops=np.concatenate([commas, ends[:, None]], axis=1))
        commas = commas.reshape(-1)
    per_line = np.diff(np.searchsorted(commas, ends), prepend=0)
    i = int(np.argmax(per_line != per_row))
    raise ValueError(f"{table.where(i)}: expected {len(fields)} comma-separated fields "
                     f"({','.join(fields)}), got {per_line[i] + 1}: "
                     f"{excerpt(buf[line_starts[i]:ends[i]])}")


def _field_bytes(table: _Table, column: int) -> np.ndarray:
    """(rows,) fixed-width bytes (numpy 'S') of one column, gathered in one vectorised step."""
    starts = table.starts[:, column].astype(np.int32)
    lengths = (table.stops[:, column] - table.starts[:, column]).astype(np.int32)
    width = max(int(lengths.max(initial=0)), 1)
    offsets = np.arange(width, dtype=np.int32)
    chars = np.take(table.buf, starts[:, None] + offsets, mode="clip")
    chars[offsets >= lengths[:, None]] = 0
    return chars.view(f"S{width}").reshape(-1)


def _loadtxt(table: _Table, first: int, stop: int, columns: tuple[int, ...]) -> np.ndarray | None:
    """(stop - first, len(columns)) float64 of rows [first, stop) by `np.loadtxt`, None if it
    cannot read them."""
    text = table.buf[table.starts[first, 0]:table.stops[stop - 1, -1] + 1].tobytes()
    try:
        return np.loadtxt(io.BytesIO(text), delimiter=",", usecols=columns, dtype=np.float64,
                          ndmin=2, comments=None)
    except ValueError:
        return None


def _first_unreadable(table: _Table, columns: tuple[int, ...]) -> tuple[int, int]:
    """(row, column) of the first field `np.loadtxt` cannot read, in a table it cannot read.

    Bisects the rows with `np.loadtxt` itself, so the field named is exactly one loadtxt
    rejects (Python's `float` accepts more: '1_0', non-ASCII digits); ~2 passes over the bytes.
    """
    first, stop = 0, table.starts.shape[0]
    while stop - first > 1:
        middle = (first + stop) // 2
        if _loadtxt(table, first, middle, columns) is None:
            stop = middle
        else:
            first = middle
    column = next((c for c in columns if _loadtxt(table, first, first + 1, (c,)) is None),
                  columns[0])
    return first, column


def _field_numbers(table: _Table, columns: tuple[int, ...], fields: tuple[str, ...]) -> np.ndarray:
    """(rows, len(columns)) float64 of numeric columns, read by `np.loadtxt`: finite, or an
    error naming the file, line and field."""
    if not table.starts.shape[0]:
        return np.zeros((0, len(columns)))
    values = _loadtxt(table, 0, table.starts.shape[0], columns)
    if values is None:
        row, column = _first_unreadable(table, columns)
    elif not np.all(np.isfinite(values)):
        row, index = (int(i) for i in np.argwhere(~np.isfinite(values))[0])
        column = columns[index]
    else:
        return values
    raise ValueError(f"{table.where(row)}: {fields[column]} is {table.field(row, column)}; "
                     "expected a finite number")


def _field_integers(table: _Table, column: int, fields: tuple[str, ...],
                    integral: bool = True) -> np.ndarray:
    """(rows,) int64 of a column of optionally signed decimal integers, vectorised over bytes.

    Falls back to `_field_numbers` if a field is not plain digits; then, with `integral`,
    `12.0` is accepted and `12.5` is an error naming the line, and without it the float64
    values are returned as they are.
    """
    starts = table.starts[:, column].astype(np.int32)
    negative = np.take(table.buf, starts, mode="clip") == ord("-")
    first = starts + negative
    lengths = table.stops[:, column].astype(np.int32) - first
    width = int(lengths.max(initial=1))
    offsets = np.arange(width, dtype=np.int32)
    inside = offsets < lengths[:, None]
    digits = np.take(table.buf, first[:, None] + offsets, mode="clip") - np.uint8(ord("0"))
    digits[~inside] = 0
    if width <= 9 and np.all(lengths > 0) and np.all(digits <= 9):  # uint8: '0'..'9' only
        scale = 10 ** np.maximum(lengths[:, None] - 1 - offsets, 0)
        values = np.sum(digits * scale, axis=1, dtype=np.int64)
        return np.where(negative, -values, values)
    values = _field_numbers(table, (column,), fields)[:, 0]
    if not integral:
        return values
    bad = np.flatnonzero(values != np.round(values))
    if bad.size:
        raise ValueError(f"{table.where(int(bad[0]))}: {fields[column]} "
                         f"{table.field(int(bad[0]), column)} is not an integer")
    return values.astype(np.int64)


class ForwardFile(NamedTuple):
    """A `test_forward.csv`: N rows in file order.

    names: (N,) numpy bytes ('S') `<sequence>-camNN`; time_s: (N,) float64 seconds; x: (N,)
    float64 predicted position normalised to the image width; confidence: (N,) float64.
    """

    names: np.ndarray
    time_s: np.ndarray
    x: np.ndarray
    confidence: np.ndarray


def read_forward_csv(path: PathLike) -> ForwardFile:
    """Reads a forward file (header `name,time,predicted x,confidence`).

    x and confidence must lie in [0, 1] (x normalised to the image width, confidence a
    probability); a value outside, e.g. pixels or percent, is an error naming the line.
    """
    table = _read_table([path], FORWARD_HEADER, header=FORWARD_HEADER)
    values = _field_numbers(table, (1, 2, 3), FORWARD_HEADER)
    outside = (values[:, 1:] < 0) | (values[:, 1:] > 1)
    if np.any(outside):
        row, index = (int(i) for i in np.argwhere(outside)[0])
        column = 2 + index  # x or confidence
        raise ValueError(f"{table.where(row)}: {FORWARD_HEADER[column]} is "
                         f"{table.field(row, column)}; expected a value in [0, 1] (x as a "
                         "fraction of the image width, confidence as a probability)")
    return ForwardFile(names=_field_bytes(table, 0), time_s=values[:, 0], x=values[:, 1],
                       confidence=values[:, 2])


class GroundTruthRows(NamedTuple):
    """The R rows of a GT file (no header): `frame,x_px,y_px,speaker_id,label`, in file order
    (speaker blocks of F rows one after the other).

    frame, speaker: (R,) int64; x_px, y_px: (R,) float64 pixels (integers in TragicTalkers);
    speaking: (R,) bool, label SPEAKING (False for NOT_SPEAKING).
    """

    frame: np.ndarray
    x_px: np.ndarray
    y_px: np.ndarray
    speaker: np.ndarray
    speaking: np.ndarray


def read_gt_file(path: PathLike) -> GroundTruthRows:
    """Reads one `<sequence>-camNN_GT.csv` (see `read_gt_files`)."""
    return read_gt_files([path])[0]


def read_gt_files(paths: Sequence[PathLike]) -> list[GroundTruthRows]:
    """Reads GT files in one vectorised pass over their bytes; one GroundTruthRows per file.

    Every row must have five fields: integer frame and speaker_id, finite x_px and y_px (the
    reference requires integers there and stops otherwise) and the label SPEAKING or
    NOT_SPEAKING; every file must have a row. Errors name the file and line.
    """
    table = _read_table(paths, GT_FIELDS)
    counts = table.file_rows
    if np.any(counts == 0):
        raise ValueError(f"{paths[int(np.argmin(counts))]}: empty GT file")
    labels = _field_bytes(table, 4)
    speaking = labels == b"SPEAKING"
    known = speaking | (labels == b"NOT_SPEAKING")
    if not np.all(known):
        i = int(np.argmin(known))
        raise ValueError(f"{table.where(i)}: label {table.field(i, 4)}; expected one of "
                         f"{GT_LABELS}")
    frame, x_px, y_px, speaker = (_field_integers(table, c, GT_FIELDS, integral=c in (0, 3))
                                  for c in range(4))
    bounds = np.cumsum(counts)[:-1]
    columns = (frame, x_px.astype(np.float64), y_px.astype(np.float64), speaker, speaking)
    return [GroundTruthRows(*parts) for parts in zip(*(np.split(c, bounds) for c in columns))]


class GtFile(NamedTuple):
    """One GT file: its sequence, rig folder ('01'/'02'), camera ('camNN') and path."""

    sequence: str
    rig: str
    camera: str
    path: pathlib.Path


def list_gt_files(gt_dir: PathLike) -> list[GtFile]:
    """`<gt_dir>/<sequence>/<rig>/<sequence>-camNN_GT.csv`, sorted by sequence, rig, camera."""
    gt_dir = pathlib.Path(gt_dir)
    if not gt_dir.is_dir():
        raise ValueError(f"GT directory {gt_dir} " + ("is a file; expected the directory of "
                         "<sequence>/<rig>/ folders" if gt_dir.exists() else "does not exist"))
    if (gt_dir / "GT").is_dir():  # the data root given instead of its GT folder
        raise ValueError(f"GT directory {gt_dir} holds a GT folder: give {gt_dir / 'GT'} (the "
                         "directory of <sequence>/<rig>/ folders)")
    sequences = sorted(p for p in gt_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not sequences:
        raise ValueError(f"GT directory {gt_dir} has no sequence folders")
    files = []
    for seq_dir in sequences:
        rigs = sorted(p for p in seq_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        if tuple(p.name for p in rigs) != constants.RIGS:
            raise ValueError(f"GT folder {seq_dir}: expected rig folders {constants.RIGS}, "
                             f"found {[p.name for p in rigs]} (a partial GT would leave the "
                             "missing rig's frames out of every metric)")
        for rig_dir in rigs:
            csvs = sorted(rig_dir.glob("*.csv"))
            if not csvs:
                raise ValueError(f"GT folder {rig_dir} has no GT files")
            for path in csvs:
                match = _GT_NAME.match(path.name)
                if not match or match["sequence"] != seq_dir.name:
                    raise ValueError(f"GT file {path}: expected the name "
                                     f"{seq_dir.name}-camNN_GT.csv")
                camera = match["camera"]
                if camera not in constants.RIG_CAMERAS[rig_dir.name]:
                    raise ValueError(f"GT file {path}: camera {camera} is not a camera of rig "
                                     f"{rig_dir.name} {constants.RIG_CAMERAS[rig_dir.name]}")
                files.append(GtFile(seq_dir.name, rig_dir.name, camera, path))
    return files


# ----------------------------------------------------------------------------------------
# Frames of all GT files, concatenated.
# ----------------------------------------------------------------------------------------


class EvalFrames(NamedTuple):
    """Every evaluated frame of every GT file, N frames in GT-file order.

    cells: C names `<sequence>/<rig>`, sorted; cell: (N,) int32 index into `cells`.
    confidence, x_pred: (N,) float64 forward values; x_gt_px: (N,) float64 pixels (0 where
    NOT_SPEAKING); speaking: (N,) bool.
    """

    cells: tuple[str, ...]
    cell: np.ndarray
    confidence: np.ndarray
    x_pred: np.ndarray
    x_gt_px: np.ndarray
    speaking: np.ndarray


def _rows_by_name(forward: ForwardFile, path: PathLike,
                  lengths: dict[str, float]) -> dict[str, np.ndarray]:
    """{camera name: its row indices in file order}; every name must be a known camera.

    Rows of one camera are usually contiguous, so rows are grouped by runs of equal names
    (one vectorised comparison, then one step per run).
    """
    names = forward.names
    if names.shape[0] == 0:
        return {}
    cameras = set(sum(constants.RIG_CAMERAS.values(), ()))
    bounds = np.concatenate([[0], np.flatnonzero(names[1:] != names[:-1]) + 1, [names.shape[0]]])
    runs: dict[str, list[np.ndarray]] = {}
    for start, stop in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        runs.setdefault(names[start].decode("utf-8", "replace"), []).append(np.arange(start, stop))
    for name, parts in runs.items():
        match = _FORWARD_NAME.match(name)
        if not match or match["camera"] not in cameras:
            problem = (f"unknown camera name {excerpt(name)}; expected <sequence>-camNN with NN "
                       "in 01..22")
        elif match["sequence"] not in lengths:
            problem = f"unknown sequence {excerpt(match['sequence'])}: not in seq_lengths.json"
        else:
            continue
        raise ValueError(f"{path}:{int(parts[0][0]) + 2}: {problem}")
    return {name: np.concatenate(parts) for name, parts in runs.items()}


def _check_speaker_blocks(gt_files: Sequence[GtFile], gt_rows: Sequence[GroundTruthRows],
                          frames: np.ndarray, lengths: dict[str, float],
                          seq_lengths_path: PathLike) -> None:
    """Every GT file is S blocks of F rows (F = `frames` of its sequence, S >= 1): in each
    block the frame column runs 0..F-1 and speaker_id is constant. Raises naming the file and
    the line of the first mismatch (one vectorised pass over all rows).

    S = rows / F is only right if F is: a length half the true one in seq_lengths.json would
    make a monologue's second half a second speaker, silently, without this check.
    """
    def length_of(j: int) -> str:
        sequence = gt_files[j].sequence
        return (f"F = {frames[j]} frames of {sequence!r}, length {lengths[sequence]!r} s in "
                f"{seq_lengths_path}")

    if np.any(frames == 0):
        j = int(np.argmin(frames))
        raise ValueError(f"GT file {gt_files[j].path}: {length_of(j)}, under 1/60 s; expected a "
                         "sequence of at least one frame at 30 fps")
    n_rows = np.array([rows.frame.shape[0] for rows in gt_rows], np.int64)
    bad_files = np.flatnonzero(n_rows % frames)
    if bad_files.size:
        j = int(bad_files[0])
        raise ValueError(f"GT file {gt_files[j].path}: {n_rows[j]} rows; expected a multiple of "
                         f"the sequence's {frames[j]} frames (one block per speaker; "
                         f"{length_of(j)})")
    file_of_row = np.repeat(np.arange(len(gt_files)), n_rows)
    file_start = (np.cumsum(n_rows) - n_rows)[file_of_row]
    row_in_file = np.arange(file_of_row.shape[0]) - file_start
    frame_in_block = row_in_file % frames[file_of_row]
    block_start = file_start + row_in_file - frame_in_block
    frame = np.concatenate([rows.frame for rows in gt_rows])
    speaker = np.concatenate([rows.speaker for rows in gt_rows])
    wrong_frame = frame != frame_in_block
    bad = wrong_frame | (speaker != speaker[block_start])
    if np.any(bad):
        i = int(np.argmax(bad))
        j = int(file_of_row[i])
        if wrong_frame[i]:
            problem = f"frame is {frame[i]}, expected {frame_in_block[i]}"
        else:
            problem = (f"speaker_id is {speaker[i]}, expected {speaker[block_start[i]]} as on line "
                       f"{block_start[i] - file_start[i] + 1}, the first of its block")
        raise ValueError(f"{gt_files[j].path}:{row_in_file[i] + 1}: {problem}; a GT file holds one "
                         f"block of F rows per speaker, frames 0..F-1 and one speaker_id each "
                         f"({length_of(j)}: is that length right?)")


def _warn_forward_cameras_without_gt(rows_of: dict[str, np.ndarray], gt_files: Sequence[GtFile],
                                     forward_csv: PathLike, gt_dir: PathLike) -> list[str]:
    """Logs (and returns) the forward cameras that have no GT file.

    The reference ignores them, and so does the evaluation (TragicTalkers has no GT for
    interactive1_t2-cam17), but a camera or a whole sequence missing from a partial GT download
    is ignored the same way, so they are named rather than dropped silently: cameras of GT
    sequences in one warning, sequences without a GT folder in another.
    """
    sequences = {gt.sequence for gt in gt_files}
    with_gt = {f"{gt.sequence}-{gt.camera}" for gt in gt_files}
    ignored = sorted(name for name in rows_of if name not in with_gt)
    cameras = [name for name in ignored if name.rsplit("-", 1)[0] in sequences]
    if cameras:
        logging.warning("%s: %d camera(s) with forward rows but no GT file, left out of the metrics "
                        "as the reference does: %s", forward_csv, len(cameras), ", ".join(cameras))
    missing = sorted({name.rsplit("-", 1)[0] for name in ignored} - sequences)
    if missing:
        logging.warning("%s: %d sequence(s) with forward rows but no GT folder in %s, left out of "
                        "the metrics as the reference does: %s", forward_csv, len(missing), gt_dir,
                        ", ".join(missing))
    return ignored


def check_forward_times(names: np.ndarray, time_s: np.ndarray, rows: np.ndarray,
                        frame: np.ndarray, path: PathLike) -> None:
    """The forward row read as frame n must be that frame's: its time within half a frame of
    n/30 s. names, time_s: (N,) of the file's rows (as in `ForwardFile`); rows: the rows read
    as the frames `frame` (row r is on line r + 2). Rows are matched to frames by position (SPEC section 9), so rows out of time
    order, e.g. a file sorted as text ("10.0" before "2.0"), would be scored against other
    frames' ground truth. The forward pass writes round(n/30, 2), at most 1/300 s off.
    """
    off = np.abs(time_s[rows] * constants.VIDEO_FPS - frame) >= 0.5
    if np.any(off):
        i = int(np.argmax(off))
        row = int(rows[i])
        name = names[row].decode("utf-8", "replace")
        raise ValueError(f"{path}:{row + 2}: time {float(time_s[row])!r} s read as frame "
                         f"{frame[i]} of {name}, whose time is {frame[i] / constants.VIDEO_FPS:.2f}"
                         " s; a camera's rows must be its frames in time order, one per 1/30 s "
                         "from 0")


def load_frames(forward_csv: PathLike, gt_dir: PathLike, seq_lengths_path: PathLike) -> EvalFrames:
    """Reads and matches everything the evaluation needs; raises on any mismatch (see module).

    Per GT file only index bookkeeping happens in Python; the speaker union and the gathers
    of forward values run once over all frames.
    """
    lengths = read_seq_lengths(seq_lengths_path)
    gt_files = list_gt_files(gt_dir)
    unknown = sorted({gt.sequence for gt in gt_files} - set(lengths))
    if unknown:
        raise ValueError(f"GT directory {gt_dir}: unknown sequences {unknown}: not in "
                         f"{seq_lengths_path}")
    forward = read_forward_csv(forward_csv)
    rows_of = _rows_by_name(forward, forward_csv, lengths)
    gt_rows = read_gt_files([gt.path for gt in gt_files])
    cells = tuple(sorted({f"{f.sequence}/{f.rig}" for f in gt_files}))
    cell_of = {name: i for i, name in enumerate(cells)}
    frames = np.array([num_frames(lengths[gt.sequence]) for gt in gt_files], np.int64)
    n_rows = np.array([rows.x_px.shape[0] for rows in gt_rows], np.int64)
    _check_speaker_blocks(gt_files, gt_rows, frames, lengths, seq_lengths_path)
    _warn_forward_cameras_without_gt(rows_of, gt_files, forward_csv, gt_dir)
    forward_rows = []
    for gt, n_frames in zip(gt_files, frames):
        name = f"{gt.sequence}-{gt.camera}"
        found = rows_of.get(name, np.empty(0, np.int64))
        if found.shape[0] < n_frames:
            raise ValueError(f"{forward_csv}: {found.shape[0]} rows for {name}; its GT file "
                             f"{gt.path} needs {n_frames} (one per frame)")
        forward_rows.append(found[:n_frames])
    # Frame n of file j reads GT rows offset_j + s * F_j + n for speakers s < S_j.
    file_of_frame = np.repeat(np.arange(len(gt_files)), frames)
    first_frame = np.repeat(np.cumsum(frames) - frames, frames)
    frame_in_file = np.arange(file_of_frame.shape[0]) - first_frame
    speakers = n_rows // frames
    speaker = np.arange(int(speakers.max()))
    gt_index = ((np.cumsum(n_rows) - n_rows)[file_of_frame] + frame_in_file)[:, None] + (
        speaker * frames[file_of_frame][:, None])
    present = speaker < speakers[file_of_frame][:, None]
    gt_index = np.where(present, gt_index, 0)
    gt_speaking = np.concatenate([rows.speaking for rows in gt_rows])
    gt_x = np.concatenate([rows.x_px for rows in gt_rows])
    speaking, x_gt_px = metrics.speaker_union((gt_speaking[gt_index] & present).T, gt_x[gt_index].T)
    file_cell = np.array([cell_of[f"{gt.sequence}/{gt.rig}"] for gt in gt_files], np.int32)
    cell = file_cell[file_of_frame]
    fwd = np.concatenate(forward_rows)
    check_forward_times(forward.names, forward.time_s, fwd, frame_in_file, forward_csv)
    has_speech = np.bincount(cell, weights=speaking, minlength=len(cells)) > 0
    if not np.all(has_speech):
        silent = [c for c, ok in zip(cells, has_speech) if not ok]
        raise ValueError(f"GT directory {gt_dir}: cells {silent} have no SPEAKING frame, so their "
                         "recall is undefined")
    return EvalFrames(cells, cell, forward.confidence[fwd], forward.x[fwd], x_gt_px, speaking)


# ----------------------------------------------------------------------------------------
# Metrics.
# ----------------------------------------------------------------------------------------


def _pad(values: np.ndarray, size: int, fill: Any) -> np.ndarray:
    pad = [(0, size - values.shape[0])] + [(0, 0)] * (values.ndim - 1)
    return np.pad(values, pad, constant_values=fill)


def _is_whole_pixels(value: Any) -> bool:
    return (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
            and math.isfinite(value) and value >= 0 and float(value).is_integer())


def compute_metrics(frames: EvalFrames, tolerances: Sequence[int] = (constants.TOLERANCE_2DEG_PX,),
                    drop_single_row_last_run: bool = True) -> dict[int, dict[str, Any]]:
    """All metrics of SPEC section 9 for each tolerance (pixels); no files touched.

    Per-frame float64 decisions (`metrics.decide_frames`), one jitted integer count over all
    frames, thresholds, tolerances and cells (`metrics.count_frames`), then the float64
    finishing statistics. `drop_single_row_last_run` is AP's reference quirk (see
    `metrics.average_precision`); False counts the last run.

    Returns:
      {tolerance: metrics}, each a JSON-ready dict with keys
        AP, F1, F1_row, F1_threshold_pct: overall AP and best F1 (row in 0..100 and its
          threshold in percent);
        aD, aD_se: pixels, None if a cell has no (conf >= 0.5, SPEAKING) frame;
        det_err: percent; det_err_se: a fraction (as the reference prints it);
        seq_F1: C per-cell F1 at the overall best row, in `cells` order;
        cells, aD_cells (None where undefined), tolerance_px;
        drop_single_row_last_run: the argument, whether AP left out a single-row last run;
        units: the unit of each value that has one ("px", "percent", "fraction");
        precision_recall: the overall matrix as columns confidence, true_pos, gt_pos,
          pred_pos, precision, recall (101 values each).
    """
    tolerances = tuple(tolerances)
    if not tolerances or not all(_is_whole_pixels(t) for t in tolerances):
        raise ValueError(f"tolerances must be non-negative whole pixels, got {tolerances}")
    tolerances = tuple(int(t) for t in tolerances)
    num_cells = len(frames.cells)
    decisions = metrics.decide_frames(frames.confidence, frames.x_pred, frames.x_gt_px,
                                      np.array(tolerances, np.float64))
    size = -(-frames.cell.shape[0] // _PAD_FRAMES) * _PAD_FRAMES
    counts = jax.device_get(metrics.count_frames(
        _pad(decisions.first_row, size, metrics.N_THRESHOLDS),
        _pad(decisions.localised, size, False),
        _pad(decisions.detected, size, False),
        _pad(frames.speaking, size, False),
        _pad(frames.cell, size, num_cells),
        num_cells=num_cells,
    ))
    detected_speaking = decisions.detected & frames.speaking
    distance_sum = np.bincount(
        frames.cell, weights=np.where(detected_speaking, decisions.distance_px, 0.0),
        minlength=num_cells)
    detection = metrics.detection_summary(distance_sum, counts.detected_speaking, counts.correct,
                                          counts.wrong)
    gt_pos = int(np.sum(counts.gt_pos, dtype=np.int64))
    pred_pos = np.sum(counts.pred_pos, axis=0, dtype=np.int64)
    cell_pred_pos = np.asarray(counts.pred_pos, np.int64)
    cell_gt_pos = np.asarray(counts.gt_pos, np.int64)[:, None]
    results = {}
    for t, tolerance in enumerate(tolerances):  # a handful of tolerances, not a hot loop
        cell_tp = np.asarray(counts.true_pos[t], np.int64)
        true_pos = cell_tp.sum(axis=0)
        precision, recall = metrics.precision_recall(true_pos, gt_pos, pred_pos)
        f1, row = metrics.best_f1(precision, recall)
        cell_precision, cell_recall = metrics.precision_recall(cell_tp, cell_gt_pos, cell_pred_pos)
        results[tolerance] = {
            "tolerance_px": tolerance,
            "units": dict(METRIC_UNITS),
            "aD": detection.aD,
            "aD_se": detection.aD_se,
            "det_err": detection.det_err,
            "det_err_se": detection.det_err_se,
            "AP": metrics.average_precision(precision, recall,
                                            drop_single_row_last_run=drop_single_row_last_run),
            "drop_single_row_last_run": bool(drop_single_row_last_run),
            "F1": f1,
            "F1_row": row,
            "F1_threshold_pct": float(metrics.CONFIDENCE_THRESHOLDS_PCT[row]),
            "seq_F1": metrics.sequence_f1(cell_precision, cell_recall, row).tolist(),
            "cells": list(frames.cells),
            "aD_cells": [None if math.isnan(v) else float(v) for v in detection.aD_cells],
            "precision_recall": {
                "confidence": metrics.CONFIDENCE_THRESHOLDS_PCT.tolist(),
                "true_pos": true_pos.tolist(),
                "gt_pos": [gt_pos] * metrics.N_THRESHOLDS,
                "pred_pos": pred_pos.tolist(),
                "precision": precision.tolist(),
                "recall": recall.tolist(),
            },
        }
    return results


# ----------------------------------------------------------------------------------------
# Writers.
# ----------------------------------------------------------------------------------------


def write_precision_recall_csv(path: PathLike, pr: dict[str, list]) -> None:
    """The reference's `precision_recall_<tol>_sigmoid.csv`: header and one row per threshold.

    Confidence, precision and recall as Python float reprs; counts as integers; precision
    `0` where nothing is predicted (the reference stores an integer 0 there). Precision is the
    exact ratio tp / predict pos, as in every released file, not the value rounded to 12
    decimals that AP and F1 are computed from (SPEC section 9; `pr["precision"]` is the
    rounded one); recall is tp / GT pos. On the released ASC(s) forward file this writes the
    released file byte for byte but for one recall 1 ulp away.
    """
    lines = [",".join(PR_HEADER)]
    for conf, tp, gt, pp in zip(pr["confidence"], pr["true_pos"], pr["gt_pos"], pr["pred_pos"]):
        tp, gt, pp = int(tp), int(gt), int(pp)
        precision = repr(tp / pp) if pp else "0"
        recall = repr(tp / gt) if gt else "0.0"
        lines.append(f"{float(conf)!r},{tp},{gt},{pp},{precision},{recall}")
    atomic.write_text(path, "\n".join(lines) + "\n")


def read_precision_recall_csv(path: PathLike) -> np.ndarray:
    """A `precision_recall_*.csv` -> (rows, 6) float64 in PR_HEADER's column order."""
    table = _read_table([path], PR_HEADER, header=PR_HEADER)
    return _field_numbers(table, tuple(range(len(PR_HEADER))), PR_HEADER)


def plot_precision_recall(path: PathLike, result: dict[str, Any], label: str = "asd-jax") -> None:
    """PNG of the monotone precision against recall, the best-F1 row marked (Agg, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pr = result["precision_recall"]
    precision = metrics.monotone_precision(np.array(pr["precision"]))
    recall = np.array(pr["recall"])
    row = result["F1_row"]
    fig = Figure(figsize=(6, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(recall, precision, "b", label=f"{label} (AP {result['AP']:.3f})")
    ax.plot(recall[row], precision[row], "o", markerfacecolor="none", markeredgecolor="r",
            markersize=8, label=f"best F1 {result['F1']:.3f}")
    ax.set(xlabel="Recall", ylabel="Precision", xlim=(0, 1), ylim=(0, 1.01),
           title=f"Precision-recall at {result['tolerance_px']} px")
    ax.grid(True)
    ax.legend(loc="lower left")
    with atomic.partial_path(path) as partial:
        fig.savefig(partial, format="png", dpi=100)


def summary_lines(result: dict[str, Any], info: str = "asd-jax") -> list[str]:
    """The reference's printed summary (aD, its SE, detection error, its SE, AP, F1)."""
    if result["aD"] is None:
        undefined = [c for c, v in zip(result["cells"], result["aD_cells"]) if v is None]
        ad_lines = [f"{info} - aD undefined: no frame with confidence >= 0.5 and SPEAKING in "
                    f"{undefined}"]
    else:
        se = "undefined" if result["aD_se"] is None else f"{result['aD_se']:f} pixels"
        ad_lines = [f"{info} - aD mean: {result['aD']:f} pixels",
                    f"{info} - aD standard error: {se}"]
    det_se = "undefined" if result["det_err_se"] is None else f"{result['det_err_se']:f}"
    return ad_lines + [
        f"{info} - Detection error mean: {result['det_err']:f} %",
        f"{info} - Detection standard error: {det_se}",
        f"{info} - AP = {result['AP']:f}",
        f"{info} - F1 score: {result['F1']:f}",
    ]


# The files `evaluate` writes into its out_dir, <tol> an integer tolerance in pixels.
RESULT_FILE = re.compile(
    r"^(precision_recall_\d+_sigmoid\.csv|metrics_\d+\.json|precision_recall_\d+\.png)$")


def result_files(out_dir: PathLike) -> list[pathlib.Path]:
    """The result files of an evaluation (`RESULT_FILE`, any tolerance) in `out_dir`, sorted."""
    out_dir = pathlib.Path(out_dir)
    if not out_dir.is_dir():
        return []
    return sorted(p for p in out_dir.iterdir() if RESULT_FILE.match(p.name))


def evaluate(forward_csv: PathLike, gt_dir: PathLike, seq_lengths_path: PathLike,
             tolerances: Sequence[int] = (constants.TOLERANCE_2DEG_PX,),
             out_dir: PathLike | None = None, plot: bool = False,
             drop_single_row_last_run: bool = True, overwrite: bool = False,
             ) -> dict[int, dict[str, Any]]:
    """Evaluates a forward file against the GT at each tolerance (pixels).

    Returns `compute_metrics`'s dict (`drop_single_row_last_run`: AP's reference quirk).
    With `out_dir`, writes per tolerance `precision_recall_<tol>_sigmoid.csv`,
    `metrics_<tol>.json` (everything but the PR matrix, plus `inputs`: the absolute paths
    `forward_csv`, `gt_dir`, `seq_lengths` and `tolerance_px`, so that the result can be
    recomputed) and, with `plot`, `precision_recall_<tol>.png`. An `out_dir` that holds result
    files already (of any tolerance) is refused (FileExistsError) unless `overwrite`, which
    removes them all before the new ones are written: the folder holds one evaluation's files,
    never a mix of two, even when a run is killed midway. All inputs are read and checked before
    anything is written or removed.
    """
    old = result_files(out_dir) if out_dir is not None else []
    if old and not overwrite:
        raise FileExistsError(f"{out_dir} holds the results of an evaluation already "
                              f"({', '.join(p.name for p in old)}); pass overwrite=True "
                              "(--overwrite) to replace them, or choose another out_dir")
    results = compute_metrics(load_frames(forward_csv, gt_dir, seq_lengths_path), tolerances,
                              drop_single_row_last_run)
    if out_dir is not None:
        out_dir = pathlib.Path(out_dir)
        atomic.make_output_dir(out_dir)
        for path in old:  # nothing else wrote there since they were listed
            path.unlink(missing_ok=True)
        paths = {"forward_csv": forward_csv, "gt_dir": gt_dir, "seq_lengths": seq_lengths_path}
        paths = {k: str(pathlib.Path(v).absolute()) for k, v in paths.items()}
        for tolerance, result in results.items():
            write_precision_recall_csv(out_dir / f"precision_recall_{tolerance}_sigmoid.csv",
                                       result["precision_recall"])
            summary = {k: v for k, v in result.items() if k != "precision_recall"}
            summary["inputs"] = {**paths, "tolerance_px": tolerance}
            atomic.write_text(out_dir / f"metrics_{tolerance}.json", json.dumps(summary, indent=2) + "\n")
            if plot:
                plot_precision_recall(out_dir / f"precision_recall_{tolerance}.png", result)
    return results


# ----------------------------------------------------------------------------------------
# Sequence-wise F1 files and system comparison.
# ----------------------------------------------------------------------------------------


def _latin1_bytes(text: Any, encoding: Any) -> bytes:
    """`_codecs.encode` as pickle protocols 0-2 use it for a numpy scalar's bytes, latin-1 only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode of {type(text).__name__} "
                                     f"with encoding {excerpt(encoding)}; only latin1 text is "
                                     "allowed")
    return text.encode("latin1")


class _FloatDtype:
    """Stands in for `numpy.dtype` in a pickle: only f2/f4/f8 and the state numpy writes for them.

    numpy's own `dtype.__setstate__` trusts its argument (a crafted state crashes the
    interpreter), so a pickled dtype is rebuilt here from checked values instead.
    """

    _NAMES = ("f2", "f4", "f8")

    def __init__(self, name: Any, align: Any = False, copy: Any = True):
        if name not in self._NAMES:
            raise pickle.UnpicklingError(f"refusing numpy dtype {excerpt(name)}; only {self._NAMES}")
        self.dtype = np.dtype(name)

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 8 and state[0] == 3
                and state[1] in ("<", ">", "=") and state[2:] == (None, None, None, -1, -1, 0)):
            raise pickle.UnpicklingError(f"refusing numpy dtype state {excerpt(state)}")
        self.dtype = self.dtype.newbyteorder(state[1])


def _float_scalar(dtype: Any, data: Any = None) -> np.floating:
    """`numpy.core.multiarray.scalar` for a `_FloatDtype` and exactly its itemsize of bytes."""
    if not (isinstance(dtype, _FloatDtype) and isinstance(data, bytes)
            and len(data) == dtype.dtype.itemsize):
        raise pickle.UnpicklingError(f"refusing numpy scalar of {excerpt(data)}; expected the "
                                     "bytes of one float16/32/64")
    return np.frombuffer(data, dtype.dtype)[0]


class _NumpyScalarUnpickler(pickle.Unpickler):
    """Unpickles only containers, numbers and numpy float scalars; any other global is refused."""

    _ALLOWED = {
        ("numpy.core.multiarray", "scalar"): _float_scalar,
        ("numpy._core.multiarray", "scalar"): _float_scalar,
        ("numpy", "dtype"): _FloatDtype,
        ("_codecs", "encode"): _latin1_bytes,  # protocols 0-2: a scalar's bytes as latin-1 text
    }

    def __init__(self, file, path: PathLike):
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"{self._path}: refusing to load {excerpt(module + '.' + name)}; only numpy "
                "scalars (numpy.core.multiarray.scalar, numpy.dtype) are allowed") from None


def read_f1_scores(path: PathLike) -> np.ndarray:
    """A released `F1_scores_*.pckl` (a pickled list of numpy floats) -> (n,) float64.

    The pickle is read without running its code: only numpy scalar reconstruction is allowed.
    """
    with open(path, "rb") as f:
        try:
            values = _NumpyScalarUnpickler(f, path).load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
            raise ValueError(f"{path}: not a pickled list of numbers ({e})") from None
    return _as_scores(values, path)


def _as_scores(values: Any, path: PathLike) -> np.ndarray:
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"{path}: expected a list of numbers, got {type(values).__name__}")
    try:
        scores = np.array([float(v) for v in values], np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: expected a list of numbers") from None
    if scores.size < 2 or not np.all(np.isfinite(scores)):
        raise ValueError(f"{path}: expected at least 2 finite scores, got {excerpt(values)}")
    return scores


class _SequenceF1(NamedTuple):
    """A system's sequence-wise F1 as `compare_sequence_f1` reads it from one file."""

    scores: np.ndarray  # (cells,) float64
    cells: list[str] | None  # the cell names of a metrics JSON; None for a `.pckl`
    tolerance_px: int | None  # recorded in a metrics JSON or named by `F1_scores_<tol>.pckl`


def _read_sequence_f1(path: PathLike) -> _SequenceF1:
    """Reads a `metrics_<tol>.json` or a released `F1_scores_<tol>.pckl` once."""
    path = pathlib.Path(path)
    if path.suffix == ".json":
        expected = "a metrics JSON with a 'seq_F1' list (experiments.evaluate's metrics_<tol>.json)"
        try:
            data = json.loads(read_text(path, expected))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e}); expected {expected}") from None
        if not isinstance(data, dict) or "seq_F1" not in data:
            raise ValueError(f"{path}: expected {expected}")
        scores = _as_scores(data["seq_F1"], path)
        cells = data.get("cells")
        if not (isinstance(cells, list) and len(cells) == scores.size
                and all(isinstance(c, str) for c in cells)):
            raise ValueError(f"{path}: expected a 'cells' list of {scores.size} names (one per "
                             f"seq_F1 value), got {excerpt(cells)}")
        inputs = data.get("inputs") if isinstance(data.get("inputs"), dict) else {}
        tolerance = inputs.get("tolerance_px", data.get("tolerance_px"))
        return _SequenceF1(scores, cells,
                           int(tolerance) if isinstance(tolerance, (int, float)) else None)
    if path.suffix in (".pckl", ".pkl", ".pickle"):
        match = re.search(r"_(\d+)\.(pckl|pkl|pickle)$", path.name)
        return _SequenceF1(read_f1_scores(path), None, int(match[1]) if match else None)
    raise ValueError(f"{path}: expected a metrics_<tol>.json or an F1_scores_*.pckl file")


def read_sequence_f1(path: PathLike) -> np.ndarray:
    """Sequence-wise F1 of a system: `seq_F1` of a `metrics_<tol>.json`, or a `.pckl` file."""
    return _read_sequence_f1(path).scores


# Sequence-wise F1 values that differ by no more than this are the same F1 computed twice (e.g.
# ours against a released pickle): F1 = 2TP / (2TP + FP + FN) is a ratio of frame counts, and two
# different ratios with denominators below 3e5 differ by at least 1 / (3e5)^2 ~ 1.1e-11, while
# float64 rounding of one ratio is ~1e-16 (the ways of computing it: ~1e-13 at most).
F1_ROUNDING = 1e-11


def compare_sequence_f1(path_a: PathLike, path_b: PathLike) -> dict[str, float]:
    """One-sided paired t-test that system A's sequence-wise F1 is greater than B's.

    Values are paired by position: two metrics JSONs must list the same `cells` in the same
    order (a released `.pckl` holds no cell names; its order is SPEC section 9's).
    Returns {"mean_a", "mean_b", "t", "p", "df", "max_abs_difference"}; the last is the
    largest |a - b| over the pairs (see `F1_ROUNDING`).
    """
    (a, cells_a, tol_a), (b, cells_b, tol_b) = (_read_sequence_f1(p) for p in (path_a, path_b))
    if tol_a is not None and tol_b is not None and tol_a != tol_b:
        raise ValueError(f"{path_a} holds F1 at a tolerance of {tol_a} px and {path_b} at {tol_b} px: "
                         "a paired test compares two systems at one tolerance")
    if a.shape != b.shape:
        raise ValueError(f"{path_a} has {a.size} sequence-wise F1 values, {path_b} has {b.size}")
    if cells_a is not None and cells_b is not None and cells_a != cells_b:
        raise ValueError(f"{path_a} and {path_b} describe different cells, so their sequence-wise "
                         f"F1 values do not pair: {excerpt(cells_a)} vs {excerpt(cells_b)}")
    test = metrics.paired_ttest_greater(a, b)
    return {"mean_a": float(a.mean()), "mean_b": float(b.mean()), "t": test.t, "p": test.p,
            "df": test.df, "max_abs_difference": float(np.max(np.abs(a - b)))}
