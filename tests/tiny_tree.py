"""A tiny TragicTalkers tree for tests: seconds of seeded noise, a few cameras, random labels.

Usage from any test module:

    import tiny_tree   # pytest puts tests/ on sys.path (no __init__.py there)
    tree = tiny_tree.write(tmp_path / "data")          # a TinyTree
    tree.root, tree.label_rows("GT_GT"), tree.mic_path("development", "conversation1_t1", "05")

Every microphone file holds different noise, so a test can tell which file was read. Microphones
01 and 23 also get a decoy `<MM>_zz_decoy.wav` that sorts after the real file and must never be
chosen. The CSVs hold one row per camera and video frame, F = round(seconds * 30) rows per
camera, times `round(f / 30, 2)`; the audio holds `round(seconds * 48000)` samples.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import pathlib

import numpy as np
import soundfile

from asd_jax import constants

DEV_SECONDS = {"conversation1_t1": 3.0, "femalemonologue1_t1": 2.5}
TEST_SECONDS = {"interactive1_t2": 4.0}
CAMERAS = ("cam01", "cam11", "cam12", "cam22")
LABEL_NAMES = ("NOT_SPEAKING", "SPEAKING")


@dataclasses.dataclass
class TinyTree:
    root: pathlib.Path
    dev_seconds: dict[str, float]
    test_seconds: dict[str, float]
    cameras: tuple[str, ...]
    conditions: tuple[str, ...]

    def mic_path(self, split: str, sequence: str, mic: str) -> pathlib.Path:
        """The file that must be chosen for microphone `mic` ('01'..'16', '23'..'38')."""
        return self.root / "TragicTalkers" / "audio" / split / sequence / f"{mic}_{sequence}.wav"

    def csv_path(self, condition: str) -> pathlib.Path:
        return self.root / "csv" / f"development_{condition}.csv"

    def label_rows(self, condition: str) -> list[list[str]]:
        """The data rows (without header) of a development CSV."""
        with open(self.csv_path(condition), newline="") as f:
            return list(csv.reader(f))[1:]


def _write_audio(folder: pathlib.Path, sequence: str, seconds: float, rng: np.random.Generator,
                 subtype: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    n = int(round(seconds * constants.SAMPLE_RATE_HZ))
    for rig in constants.RIGS:
        for mic in constants.RIG_MICS[rig]:
            signal = np.clip(0.1 * rng.standard_normal(n), -1, 1)
            soundfile.write(folder / f"{mic}_{sequence}.wav", signal, constants.SAMPLE_RATE_HZ,
                            subtype=subtype)
        decoy = np.full(n, 0.5)
        soundfile.write(folder / f"{constants.RIG_MICS[rig][0]}_zz_decoy.wav", decoy,
                        constants.SAMPLE_RATE_HZ, subtype=subtype)
    (folder / "notes.txt").write_text("not audio\n")


def _frames(seconds: float) -> int:
    return int(round(seconds * constants.VIDEO_FPS))


def write(root: str | pathlib.Path, *, dev_seconds: dict[str, float] | None = None,
          test_seconds: dict[str, float] | None = None, cameras: tuple[str, ...] = CAMERAS,
          conditions: tuple[str, ...] = ("GT_GT",), seed: int = 0, subtype: str = "PCM_16") -> TinyTree:
    """Writes the tree under `root` and returns its description."""
    root = pathlib.Path(root)
    dev_seconds = DEV_SECONDS if dev_seconds is None else dev_seconds
    test_seconds = TEST_SECONDS if test_seconds is None else test_seconds
    rng = np.random.default_rng(seed)
    audio = root / "TragicTalkers" / "audio"
    for split, seconds in (("development", dev_seconds), ("test", test_seconds)):
        (audio / split).mkdir(parents=True, exist_ok=True)
        for sequence, length in seconds.items():
            _write_audio(audio / split / sequence, sequence, length, rng, subtype)
    csv_dir = root / "csv"
    csv_dir.mkdir(parents=True, exist_ok=True)
    for condition in conditions:
        with open(csv_dir / f"development_{condition}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["name", "time", "x", "pseudo_label", "va_label"])
            for sequence, length in dev_seconds.items():
                for camera in cameras:
                    for frame in range(_frames(length)):
                        writer.writerow([f"{sequence}-{camera}", round(frame / 30, 2),
                                         round(float(rng.uniform()), 4), LABEL_NAMES[rng.integers(2)],
                                         LABEL_NAMES[rng.integers(2)]])
    with open(csv_dir / "test_forward.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["name", "time", "predicted x", "confidence"])
        for sequence, length in test_seconds.items():
            for camera in cameras:
                for frame in range(_frames(length)):
                    writer.writerow([f"{sequence}-{camera}", round(frame / 30, 2), 0.5, 0.5])
    lengths = {s: str(v) for s, v in {**dev_seconds, **test_seconds}.items()}
    (csv_dir / "seq_lengths.json").write_text(json.dumps(lengths, indent=1))
    for sequence, length in test_seconds.items():
        for camera in cameras:
            folder = root / "GT" / sequence / constants.camera_rig(camera)
            folder.mkdir(parents=True, exist_ok=True)
            rows = [f"{k},1224,500,1,SPEAKING" for k in range(_frames(length))]
            (folder / f"{sequence}-{camera}_GT.csv").write_text("\n".join(rows) + "\n")
    return TinyTree(root, dict(dev_seconds), dict(test_seconds), tuple(cameras), tuple(conditions))
