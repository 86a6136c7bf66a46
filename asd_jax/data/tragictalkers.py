"""The TragicTalkers audio layout (SPEC section 1) and its chunk index (SPEC section 2).

```
<data_root>/
  TragicTalkers/audio/{development,test}/<sequence>/<MM>*.wav   one mono 48 kHz file per microphone
  csv/development_<COND>.csv     name,time,x,pseudo_label,va_label (one row per camera and video frame)
  csv/test_forward.csv           the test index (only the name and time columns are used)
  csv/seq_lengths.json           {"<sequence>": "<seconds>"}
  GT/<test_sequence>/<rig>/<sequence>-camNN_GT.csv
```

An *example* is one camera's 2-s chunk: it starts at a CSV row whose time is a multiple of the
hop (1 s for development, 2 s for test). The 11 cameras of a rig hear the same audio, so every
example points at an *audio chunk* keyed by (sequence, rig, start time): features depend on the
audio chunk only.

Everything here reads files; the numeric work (features, model) never does.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import io
import json
import os
import pathlib
from typing import NamedTuple, Sequence

import numpy as np
from absl import logging

from asd_jax import constants
from asd_jax import textfiles
from asd_jax.data import wav

SPLITS = ("development", "test")
DEVELOPMENT_HOP_S = 1
TEST_HOP_S = 2
LABELS = {"SPEAKING": 1.0, "NOT_SPEAKING": 0.0}
DEVELOPMENT_COLUMNS = ("name", "time", "x", "pseudo_label", "va_label")
TEST_COLUMNS = ("name", "time")
TEST_INDEX = "csv/test_forward.csv"  # relative to the data root
SEQ_LENGTHS = "csv/seq_lengths.json"
# Label values of a chunk row past the end of the CSV or of another name (SPEC section 2).
PAD_X, PAD_PSEUDO, PAD_VA = 1.0, 0.0, 0.0
FLOAT_FORMATS = ("FLOAT", "DOUBLE")  # WAV sample formats that can hold NaN / inf
SCAN_BLOCK_FRAMES = 1 << 20  # samples read at a time when scanning a float WAV (4 MiB as float32)
READ_THREADS = 8  # at most, reading the chunks of one `TragicTalkers.load_audio` call


class LayoutError(ValueError):
    """The data root, a CSV or an audio file does not match the TragicTalkers layout."""


class AudioKey(NamedTuple):
    """One audio chunk: the 16 microphones of `rig` for 2 s of `sequence` from `start_time` (s)."""

    sequence: str
    rig: str
    start_time: float


def chunk_start_sample(start_time: float) -> int:
    """First sample of a chunk, `int(round(time * 30) / 30 * 48000)` as in SPEC section 2."""
    fps, rate = constants.VIDEO_FPS, constants.SAMPLE_RATE_HZ
    return int(round(start_time * fps) / fps * rate)


def camera_one_hot(cameras: Sequence[str]) -> np.ndarray:
    """(N,) camera names -> (N, 11) float32 one-hot (cam01..cam11 and cam12..cam22 -> 0..10)."""
    index = np.array([constants.camera_index(c) for c in cameras], np.int64)
    return np.eye(constants.N_CAMERAS_PER_RIG, dtype=np.float32)[index].reshape(
        len(index), constants.N_CAMERAS_PER_RIG)


def split_name(name: str) -> tuple[str, str]:
    """'conversation1_t3-cam07' -> ('conversation1_t3', 'cam07'); ValueError when malformed."""
    sequence, sep, camera = name.rpartition("-")
    if not sep or not sequence:
        raise ValueError(f"name {name!r} is not '<sequence>-camNN'")
    constants.camera_rig(camera)  # raises for an unknown camera
    return sequence, camera


@dataclasses.dataclass(frozen=True)
class ChunkIndex:
    """N camera-chunk examples in CSV order, pointing at M distinct audio chunks.

    name, sequence, camera: (N,) str. start_time: (N,) float64 seconds (the start row's time).
    audio_id: (N,) int64 index into `audio_keys` (M,), the (sequence, rig, start_time) of each
    example's audio; cameras of one rig share it. target_coords (x in [0, 1] of the image width),
    pseudo_labels, speech_activity: (N, 60) float32 per video frame, None for the test split.
    """

    split: str
    name: np.ndarray
    sequence: np.ndarray
    camera: np.ndarray
    start_time: np.ndarray
    audio_id: np.ndarray
    audio_keys: tuple[AudioKey, ...]
    target_coords: np.ndarray | None = None
    pseudo_labels: np.ndarray | None = None
    speech_activity: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.name)

    @property
    def rig(self) -> np.ndarray:
        """(N,) rig id ('01' or '02') of each example."""
        return np.array([constants.camera_rig(c) for c in self.camera])

    @property
    def cams(self) -> np.ndarray:
        """(N, 11) float32 camera one-hot."""
        return camera_one_hot(self.camera)

    @property
    def has_labels(self) -> bool:
        return self.target_coords is not None

    def subset(self, rows: np.ndarray) -> "ChunkIndex":
        """The examples `rows` (in that order), with audio chunks renumbered by first use."""
        rows = np.asarray(rows, np.int64)
        used, first, inverse = np.unique(self.audio_id[rows], return_index=True, return_inverse=True)
        order = np.argsort(first)  # positions in `used`, by first use
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        labels = {k: None if v is None else v[rows] for k, v in (
            ("target_coords", self.target_coords), ("pseudo_labels", self.pseudo_labels),
            ("speech_activity", self.speech_activity))}
        return ChunkIndex(self.split, self.name[rows], self.sequence[rows], self.camera[rows],
                          self.start_time[rows], rank[inverse].astype(np.int64),
                          tuple(self.audio_keys[used[i]] for i in order), **labels)


def _build_index(split: str, names: np.ndarray, times: np.ndarray, starts: np.ndarray,
                 labels: dict[str, np.ndarray] | None) -> ChunkIndex:
    """Index of the examples starting at rows `starts` of a CSV with columns names/times (R,)."""
    frames = constants.CHUNK_VIDEO_FRAMES
    parts = [split_name(n) for n in names[starts]]
    sequence = np.array([p[0] for p in parts], dtype=str)
    camera = np.array([p[1] for p in parts], dtype=str)
    start_time = times[starts]
    keys: dict[AudioKey, int] = {}
    audio_id = np.array([keys.setdefault(AudioKey(s, constants.camera_rig(c), float(t)), len(keys))
                         for s, c, t in zip(sequence, camera, start_time)], np.int64)
    assembled = {}
    if labels is not None:
        # Rows start..start+59; a row past the end or of another name is padding (SPEC section 2).
        _, name_code = np.unique(names, return_inverse=True)
        rows = starts[:, None] + np.arange(frames)[None, :]
        clipped = np.minimum(rows, len(names) - 1)
        same = (rows < len(names)) & (name_code[clipped] == name_code[starts][:, None])
        pads = {"target_coords": PAD_X, "pseudo_labels": PAD_PSEUDO, "speech_activity": PAD_VA}
        for key, pad in pads.items():
            assembled[key] = np.where(same, labels[key][clipped], pad).astype(np.float32)
    return ChunkIndex(split, names[starts].astype(str), sequence, camera, start_time.astype(np.float64),
                      audio_id, tuple(keys), **assembled)


def _read_csv_columns(path: pathlib.Path,
                      columns: Sequence[str]) -> tuple[dict[str, list[str]], np.ndarray]:
    """The named columns of a CSV with a header row, as lists of strings (other columns ignored).

    Blank rows are skipped. Returns (columns, lines): lines (R,) int64 is the 1-based line of the
    file each kept row ends on, for error messages.
    """
    if not path.is_file():
        raise FileNotFoundError(f"CSV file {path} does not exist")
    text = textfiles.read_text(path, f"a CSV file with the columns {list(columns)}")
    with io.StringIO(text, newline="") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        missing = [c for c in columns if c not in header]
        if missing:
            raise LayoutError(f"{path}: missing column(s) {missing}; header is {header}, "
                              f"expected {list(columns)}")
        where = [header.index(c) for c in columns]
        out: dict[str, list[str]] = {c: [] for c in columns}
        lines = []
        for row in reader:
            if not row:
                continue
            if len(row) < len(header):
                raise LayoutError(f"{path}, line {reader.line_num}: {len(row)} fields, "
                                  f"expected {len(header)}")
            for c, i in zip(columns, where):
                out[c].append(row[i].strip())
            lines.append(reader.line_num)
    return out, np.array(lines, np.int64)


def _parse_floats(path: pathlib.Path, column: str, values: list[str], lines: np.ndarray,
                  low: float = -np.inf, high: float = np.inf) -> np.ndarray:
    """(R,) float64 values of a column; each must be a finite number in [low, high]."""
    try:
        out = np.array(values, dtype=np.float64)
    except ValueError:
        for line, v in zip(lines, values):
            try:
                float(v)
            except ValueError:
                raise LayoutError(f"{path}, line {line}: {column} {v!r} is not a number") from None
        raise
    bad = np.flatnonzero(~(np.isfinite(out) & (out >= low) & (out <= high)))
    if bad.size:
        expected = "a finite number" + (f" in [{low:g}, {high:g}]" if np.isfinite(high)
                                        else f" >= {low:g}" if np.isfinite(low) else "")
        raise LayoutError(f"{path}, line {lines[bad[0]]}: {column} {values[bad[0]]!r} is not {expected}")
    return out


def _parse_labels(path: pathlib.Path, column: str, values: list[str], lines: np.ndarray) -> np.ndarray:
    out = np.empty(len(values), np.float32)
    for row, (line, v) in enumerate(zip(lines, values)):
        if v not in LABELS:
            raise LayoutError(f"{path}, line {line}: unknown {column} {v!r}; expected one of {list(LABELS)}")
        out[row] = LABELS[v]
    return out


def _check_names(path: pathlib.Path, names: np.ndarray, lines: np.ndarray) -> None:
    """Every name is '<sequence>-camNN' with a camera of cam01..cam22."""
    unique_names, first_row = np.unique(names, return_index=True)
    for n, row in zip(unique_names, first_row):
        try:
            split_name(str(n))
        except ValueError as e:
            raise LayoutError(f"{path}, line {lines[row]}: {e}") from None


def _check_frame_rows(path: pathlib.Path, names: np.ndarray, times: np.ndarray,
                      lines: np.ndarray) -> None:
    """One row per video frame, in order: the rows of each name together, round(time * 30)
    rising by one from row to row. A chunk's labels are the 60 rows from its start row (SPEC
    section 2), so a row out of place shifts the labels of the chunks after it.

    A name whose rows start again after other names (a file given twice, or sorted by time),
    or a row whose frame does not come after the one before (a repeated or reordered row), is a
    LayoutError naming its line. Frames skipped (a first frame other than 0, a missing row) are
    logged as a warning and read as the reference reads them, by position: the development
    CSVs of the dataset are expected to hold every frame, but that cannot be checked here.
    """
    frames = np.rint(times * constants.VIDEO_FPS).astype(np.int64)
    opens = np.ones(len(names), bool)  # rows that start a run of one name
    opens[1:] = names[1:] != names[:-1]
    first_line: dict[str, int] = {}
    for row in np.flatnonzero(opens):
        seen = first_line.setdefault(str(names[row]), int(lines[row]))
        if seen != lines[row]:
            raise LayoutError(f"{path}, line {lines[row]}: rows of {names[row]} start again after "
                              f"other names (first on line {seen}); expected each name's rows "
                              "together, one per video frame")
    step = np.diff(frames, prepend=0)
    backward = np.flatnonzero(~opens & (step <= 0))
    if backward.size:
        row = backward[0]
        raise LayoutError(f"{path}, line {lines[row]}: {names[row]} at time {times[row]:g} s is "
                          f"frame {frames[row]}, not after frame {frames[row - 1]} on line "
                          f"{lines[row - 1]}; expected one row per video frame at "
                          f"{constants.VIDEO_FPS} fps in time order (a repeated or reordered row?)")
    skipped = np.flatnonzero(np.where(opens, frames != 0, step != 1))
    if skipped.size:
        row = skipped[0]
        expected = 0 if opens[row] else frames[row - 1] + 1
        logging.warning("%s, line %d: %s at time %g s is frame %d where frame %d was expected (%d "
                        "row(s) skip frames): the labels of a chunk are read by position, so after "
                        "a skipped frame they are those of later frames, as in the reference",
                        path, lines[row], names[row], times[row], frames[row], expected,
                        skipped.size)


def _check_chunks_listed_once(path: pathlib.Path, names: np.ndarray, times: np.ndarray,
                              lines: np.ndarray) -> None:
    """Each (name, start time) of a test index occurs once: the forward pass computes a chunk
    once per camera and writes its rows once, so a second listing has no rows of its own."""
    first_line: dict[tuple[str, int], int] = {}
    for name, centis, line in zip(names, np.rint(times * 100).astype(np.int64), lines):
        seen = first_line.setdefault((str(name), int(centis)), int(line))
        if seen != line:
            raise LayoutError(f"{path}, line {line}: the chunk of {name} at {centis / 100:g} s is "
                              f"listed again (first on line {seen}); list each chunk once")


def _check_finite(path: str, samples: np.ndarray, first: int) -> None:
    """samples (n,) read from sample `first` of `path`; a NaN / inf (float WAVs only) is an error."""
    if not np.isfinite(samples).all():
        bad = first + int(np.flatnonzero(~np.isfinite(samples))[0])
        raise ValueError(f"{path}: non-finite sample at index {bad}")


def _select_sequences(index: ChunkIndex, sequences: Sequence[str] | None, path: pathlib.Path) -> ChunkIndex:
    """The examples of `sequences` (all when None); a name absent from the CSV `path` is an error."""
    if sequences is None:
        return index
    unknown = sorted(str(s) for s in set(sequences) - set(index.sequence))
    if unknown:
        raise ValueError(f"sequence(s) {unknown} do not occur in {path}")
    return index.subset(np.flatnonzero(np.isin(index.sequence, list(sequences))))


def _start_rows(times: np.ndarray, hop_s: int) -> np.ndarray:
    """Rows whose time (2-decimal seconds) is a multiple of `hop_s`."""
    centis = np.rint(times * 100).astype(np.int64)
    return np.flatnonzero(centis % (100 * hop_s) == 0)


class TragicTalkers:
    """Reader of a TragicTalkers (or synthetic TragicTalkers-like) data root.

    The constructor checks the layout; audio files are checked (mono, 48 kHz, readable) the
    first time a (split, sequence, rig) is used, or all at once by `check_audio`, which also
    scans the samples of float WAVs for NaN / inf.
    """

    def __init__(self, data_root: str | os.PathLike):
        self.root = pathlib.Path(data_root)
        if not self.root.is_dir():
            problem = "is a file" if self.root.exists() else "does not exist"
            raise LayoutError(f"data root {self.root} {problem} (expected a directory holding "
                              "TragicTalkers/audio/ and csv/)")
        # Each split's folder is checked when it is used: the forward pass of the test set
        # needs no development audio.
        required = ["TragicTalkers/audio", "csv"]
        missing = [r for r in required if not (self.root / r).is_dir()]
        if missing:
            raise LayoutError(f"{self.root} is not a TragicTalkers layout: missing {', '.join(missing)}")
        self._infos: dict[tuple[str, str, str], tuple[wav.WavInfo, ...]] = {}
        self._scanned: set[str] = set()  # float WAVs whose samples are known to be finite

    # ---- files ----------------------------------------------------------------------------
    def audio_dir(self, split: str) -> pathlib.Path:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}: expected one of {SPLITS}")
        path = self.root / "TragicTalkers" / "audio" / split
        if not path.is_dir():
            raise LayoutError(f"{self.root} is not a TragicTalkers layout: missing "
                              f"TragicTalkers/audio/{split}")
        return path

    def sequences(self, split: str) -> list[str]:
        """Sorted sequence names (directories) under TragicTalkers/audio/<split>."""
        return sorted(p.name for p in self.audio_dir(split).iterdir() if p.is_dir())

    def development_csv(self, condition: str) -> pathlib.Path:
        """csv/development_<condition>.csv; ValueError for a condition outside the 8 of SPEC."""
        if condition not in constants.CONDITIONS:
            raise ValueError(f"unknown condition {condition!r}: expected one of {list(constants.CONDITIONS)}")
        return self.root / "csv" / f"development_{condition}.csv"

    def mic_files(self, split: str, sequence: str, rig: str) -> list[pathlib.Path]:
        """The 16 microphone files of a rig, in microphone order.

        Microphone MM is the first `.wav` file, in sorted order, whose name starts with MM
        (rig 01: 01..16, rig 02: 23..38). Each file is checked to be a mono 48 kHz WAV.
        """
        return [pathlib.Path(i.path) for i in self._mic_infos(split, sequence, rig)]

    def _mic_infos(self, split: str, sequence: str, rig: str) -> tuple[wav.WavInfo, ...]:
        key = (split, sequence, rig)
        if key in self._infos:
            return self._infos[key]
        if rig not in constants.RIG_MICS:
            raise ValueError(f"unknown rig {rig!r}: expected one of {list(constants.RIG_MICS)}")
        folder = self.audio_dir(split) / sequence
        if not folder.is_dir():
            raise LayoutError(f"missing sequence folder {folder}")
        names = sorted(p.name for p in folder.iterdir() if p.name.lower().endswith(".wav"))
        infos = []
        for mic in constants.RIG_MICS[rig]:
            found = next((n for n in names if n.startswith(mic)), None)
            if found is None:
                raise LayoutError(f"{folder}: no file for microphone {mic} of rig {rig} "
                                  f"(expected a file named {mic}*.wav)")
            info = wav.read_wav_info(folder / found)
            if info.channels != 1:
                raise LayoutError(f"{info.path}: {info.channels} channels, expected a mono file")
            if info.sample_rate != constants.SAMPLE_RATE_HZ:
                raise LayoutError(f"{info.path}: sample rate {info.sample_rate} Hz, expected "
                                  f"{constants.SAMPLE_RATE_HZ} Hz")
            infos.append(info)
        self._infos[key] = tuple(infos)
        return self._infos[key]

    def check_audio(self, index: ChunkIndex) -> None:
        """Checks every microphone file that `index` needs, before any of it is used.

        Headers of all files (mono, 48 kHz, not truncated); the samples of FLOAT / DOUBLE files
        too (PCM cannot hold NaN or inf), read `SCAN_BLOCK_FRAMES` at a time: a non-finite
        sample is a ValueError naming the file and the sample index.
        """
        for sequence, rig in sorted({(k.sequence, k.rig) for k in index.audio_keys}):
            for info in self._mic_infos(index.split, sequence, rig):
                if info.format in FLOAT_FORMATS and info.path not in self._scanned:
                    for first in range(0, info.frames, SCAN_BLOCK_FRAMES):
                        samples, _ = wav.read_wav(info.path, first, SCAN_BLOCK_FRAMES, info=info)
                        _check_finite(info.path, samples, first)
                    self._scanned.add(info.path)

    def seq_lengths(self) -> dict[str, float]:
        """csv/seq_lengths.json as {sequence: seconds}; every length a finite number > 0."""
        path = self.root / SEQ_LENGTHS
        if not path.is_file():
            raise FileNotFoundError(f"sequence lengths file {path} does not exist")
        try:
            raw = json.loads(path.read_text())
            items = raw.items()
        except (ValueError, AttributeError) as e:
            raise LayoutError(f"{path}: expected {{\"<sequence>\": \"<seconds>\", ...}} ({e})") from None
        out = {}
        for key, value in items:
            try:
                seconds = np.nan if isinstance(value, bool) else float(value)  # "42.966" or 42.966
            except (TypeError, ValueError):
                seconds = np.nan
            if not (np.isfinite(seconds) and seconds > 0):
                raise LayoutError(f"{path}: length of {key!r} is {json.dumps(value)}; expected seconds > 0, "
                                  "e.g. \"42.966\"")
            out[str(key)] = seconds
        return out

    # ---- chunk index ----------------------------------------------------------------------
    def development_chunks(self, condition: str, sequences: Sequence[str] | None = None) -> ChunkIndex:
        """Training examples (1-s hop) of `condition`, with labels assembled per SPEC section 2.

        sequences: restrict to these sequence names (each must occur in the CSV).
        The CSV must hold one row per video frame: the rows of each name together, their times
        0, 1/30, 2/30, ... s in order; a reordered or repeated row is a LayoutError naming its
        line (it would shift the labels of every chunk after it), a skipped frame a warning
        (see `_check_frame_rows`).
        """
        path = self.development_csv(condition)
        columns, lines = _read_csv_columns(path, DEVELOPMENT_COLUMNS)
        names = np.array(columns["name"], dtype=str)
        times = _parse_floats(path, "time", columns["time"], lines, low=0.0)
        labels = {"target_coords": _parse_floats(path, "x", columns["x"], lines, low=0.0, high=1.0),
                  "pseudo_labels": _parse_labels(path, "pseudo_label", columns["pseudo_label"], lines),
                  "speech_activity": _parse_labels(path, "va_label", columns["va_label"], lines)}
        _check_names(path, names, lines)
        starts = _start_rows(times, DEVELOPMENT_HOP_S)
        if len(starts) == 0:
            raise LayoutError(f"empty development set: {path} has no chunk start rows "
                              f"(rows whose time is a multiple of {DEVELOPMENT_HOP_S} s)")
        self._check_sequences("development", names, lines, path)
        _check_frame_rows(path, names, times, lines)
        index = _build_index("development", names, times, starts, labels)
        return _select_sequences(index, sequences, path)

    def test_chunks(self, sequences: Sequence[str] | None = None) -> ChunkIndex:
        """Test examples (2-s hop, no overlap) from csv/test_forward.csv; no labels.

        sequences: restrict to these sequence names (each must occur in the CSV).
        """
        path = self.root / TEST_INDEX
        columns, lines = _read_csv_columns(path, TEST_COLUMNS)
        names = np.array(columns["name"], dtype=str)
        times = _parse_floats(path, "time", columns["time"], lines, low=0.0)
        _check_names(path, names, lines)
        starts = _start_rows(times, TEST_HOP_S)
        if len(starts) == 0:
            raise LayoutError(f"empty test set: {path} has no chunk start rows")
        _check_chunks_listed_once(path, names[starts], times[starts], lines[starts])
        self._check_sequences("test", names, lines, path)
        index = _build_index("test", names, times, starts, None)
        return _select_sequences(index, sequences, path)

    def _check_sequences(self, split: str, names: np.ndarray, lines: np.ndarray,
                         csv_path: pathlib.Path) -> None:
        """Every row's sequence has an audio folder: a row of another name would otherwise be
        read as the end of its neighbours' sequence (padding labels), not as an error."""
        available = set(self.sequences(split))
        unique, first_row = np.unique(names, return_index=True)
        missing = sorted((int(lines[row]), split_name(str(n))[0]) for n, row in zip(unique, first_row)
                         if split_name(str(n))[0] not in available)
        if missing:
            sequences = sorted({s for _, s in missing})
            raise LayoutError(f"{csv_path} names sequence(s) {sequences} that have no folder in "
                              f"{self.audio_dir(split)} (first on line {missing[0][0]})")

    # ---- audio ----------------------------------------------------------------------------
    def load_chunk_audio(self, split: str, sequence: str, rig: str, start_time: float,
                         out: np.ndarray | None = None) -> np.ndarray:
        """(96000, 16) float32 audio of one chunk, microphones in rig order (channels-last).

        Starts at `chunk_start_sample(start_time)`; past the end of a file the chunk is zero.
        A NaN or infinite sample (possible in float WAVs) is an error naming the file.
        `out`: a (96000, 16) float32 array to fill and return instead (a row of a batch).
        """
        n = constants.CHUNK_SAMPLES
        first = chunk_start_sample(start_time)
        infos = self._mic_infos(split, sequence, rig)
        if out is None:
            out = np.empty((n, len(infos)), np.float32)
        elif out.shape != (n, len(infos)) or out.dtype != np.float32:
            raise ValueError(f"out must be a ({n}, {len(infos)}) float32 array, got {out.shape} {out.dtype}")
        # Each microphone goes into a row of its own, then one transposing copy into `out`:
        # writing the 16 strided columns of `out` directly takes ~2.5x as long.
        rows = np.empty((len(infos), n), np.float32)
        for m, info in enumerate(infos):
            samples, _ = wav.read_wav(info.path, first, n, info=info)
            _check_finite(info.path, samples, first)
            rows[m, :len(samples)] = samples
            rows[m, len(samples):] = 0.0
        out[...] = rows.T
        return out

    def load_audio(self, split: str, keys: Sequence[AudioKey], out: np.ndarray | None = None,
                   rows: Sequence[int] | None = None) -> np.ndarray:
        """(len(keys), 96000, 16) float32 audio of several chunks.

        `out`: a (R, 96000, 16) float32 array that receives the chunks (and is returned); R >=
        len(keys). Chunk i goes to row `rows[i]` (default: row i); rows not written are left as
        they are (padding to a static batch size).
        The chunks are read by up to `READ_THREADS` threads (file reads and copies release the
        GIL: 175 -> 111 ms for 31 chunks on 2 cores); an error is that of the first failing
        chunk in `keys` order, as when read one by one.
        """
        shape = (constants.CHUNK_SAMPLES, constants.N_MICS)
        if out is None:
            out = np.empty((len(keys), *shape), np.float32)
        elif out.ndim != 3 or out.shape[0] < len(keys) or out.shape[1:] != shape or out.dtype != np.float32:
            raise ValueError(f"out must be a (>= {len(keys)}, {shape[0]}, {shape[1]}) float32 array, "
                             f"got {out.shape} {out.dtype}")
        rows = np.arange(len(keys)) if rows is None else np.asarray(rows, np.int64)
        if rows.shape != (len(keys),) or (rows.size and (rows.min() < 0 or rows.max() >= len(out)
                                                         or len(np.unique(rows)) != rows.size)):
            raise ValueError(f"rows must be {len(keys)} distinct rows of out (< {len(out)}), got {rows.tolist()}")

        def read(i: int) -> None:
            k = keys[i]
            self.load_chunk_audio(split, k.sequence, k.rig, k.start_time, out=out[rows[i]])

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        workers = min(READ_THREADS, len(keys), cores)
        if workers <= 1:
            for i in range(len(keys)):
                read(i)
        else:
            with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="asd_jax-audio") as pool:
                for _ in pool.map(read, range(len(keys))):  # re-raises in keys order
                    pass
        return out

