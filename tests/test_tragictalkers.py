"""The TragicTalkers reader on a tiny tree, against loop transcriptions of SPEC sections 1-2."""

import json
import re
import shutil

import numpy as np
import pytest
import soundfile

import tiny_tree
from asd_jax.data import tragictalkers as tt


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return tiny_tree.write(tmp_path_factory.mktemp("tt") / "data", conditions=("GT_GT", "ASC(s)_VAD"))


def _expected_examples(rows, hop):
    """(name, time, x[60], pseudo[60], va[60]) per chunk, by walking the CSV rows (SPEC section 2)."""
    out = []
    for r, row in enumerate(rows):
        if round(float(row[1]) * 100) % (100 * hop):
            continue
        xs, ps, vs = [], [], []
        for k in range(r, r + 60):
            if k < len(rows) and rows[k][0] == row[0]:
                xs.append(float(rows[k][2]))
                ps.append(rows[k][3] == "SPEAKING")
                vs.append(rows[k][4] == "SPEAKING")
            else:
                xs.append(1.0)
                ps.append(0.0)
                vs.append(0.0)
        out.append((row[0], float(row[1]), xs, ps, vs))
    return out


def test_layout_error_names_what_is_missing(tmp_path):
    with pytest.raises(tt.LayoutError, match=rf"{tmp_path} is not a TragicTalkers layout: missing "
                                             r"TragicTalkers/audio, csv"):
        tt.TragicTalkers(tmp_path)
    with pytest.raises(tt.LayoutError, match=r"data root .*nowhere does not exist"):
        tt.TragicTalkers(tmp_path / "nowhere")


def test_a_root_without_development_audio_serves_the_test_split(tree, tmp_path):
    """A root holding only the test audio (and csv/) gives the test chunks and their audio; the
    development split is refused when asked for, naming its folder."""
    root = tmp_path / "test_only"
    shutil.copytree(tree.root, root)
    shutil.rmtree(root / "TragicTalkers" / "audio" / "development")
    data, full = tt.TragicTalkers(root), tt.TragicTalkers(tree.root)
    index = data.test_chunks()
    np.testing.assert_array_equal(index.start_time, full.test_chunks().start_time)
    key = index.audio_keys[0]
    np.testing.assert_array_equal(data.load_chunk_audio("test", *key),
                                  full.load_chunk_audio("test", *key))
    with pytest.raises(tt.LayoutError, match=rf"{root} is not a TragicTalkers layout: missing "
                                             r"TragicTalkers/audio/development$"):
        data.development_chunks("GT_GT")


def test_sequences_and_mic_files(tree):
    data = tt.TragicTalkers(tree.root)
    assert data.sequences("development") == sorted(tree.dev_seconds)
    assert data.sequences("test") == sorted(tree.test_seconds)
    for rig, first in (("01", 1), ("02", 23)):
        files = data.mic_files("development", "conversation1_t1", rig)
        expected = [tree.mic_path("development", "conversation1_t1", f"{first + k:02d}") for k in range(16)]
        assert files == expected  # the decoy <MM>_zz_decoy.wav sorts later and is never chosen


@pytest.mark.parametrize("condition", ["GT_GT", "ASC(s)_VAD"])
def test_development_chunks_match_transcription(tree, condition):
    index = tt.TragicTalkers(tree.root).development_chunks(condition)
    expected = _expected_examples(tree.label_rows(condition), hop=1)
    # ceil(frames / 30) chunks per camera and sequence
    per_camera = sum(int(np.ceil(round(s * 30) / 30)) for s in tree.dev_seconds.values())
    assert len(index) == len(expected) == per_camera * len(tree.cameras)
    assert list(index.name) == [e[0] for e in expected]
    np.testing.assert_array_equal(index.start_time, [e[1] for e in expected])
    np.testing.assert_array_equal(index.target_coords, np.array([e[2] for e in expected], np.float32))
    np.testing.assert_array_equal(index.pseudo_labels, [e[3] for e in expected])
    np.testing.assert_array_equal(index.speech_activity, [e[4] for e in expected])
    for arr in (index.target_coords, index.pseudo_labels, index.speech_activity):
        assert arr.dtype == np.float32 and arr.shape == (len(index), 60)


def test_label_csv_saved_with_a_utf8_bom_reads_as_without(tree, tmp_path):
    """A spreadsheet may begin a CSV with the UTF-8 byte order mark; the header still matches."""
    import shutil
    root = tmp_path / "data"
    shutil.copytree(tree.root, root)
    for path in (root / "csv").glob("*.csv"):
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    for condition in ("GT_GT", "ASC(s)_VAD"):
        got = tt.TragicTalkers(root).development_chunks(condition)
        want = tt.TragicTalkers(tree.root).development_chunks(condition)
        assert list(got.name) == list(want.name)
        np.testing.assert_array_equal(got.target_coords, want.target_coords)
    assert list(tt.TragicTalkers(root).test_chunks().name) == list(tt.TragicTalkers(tree.root).test_chunks().name)


def test_label_padding_at_sequence_and_file_ends(tree):
    index = tt.TragicTalkers(tree.root).development_chunks("GT_GT")
    # conversation1_t1 lasts 3.0 s = 90 frames: its chunk at 2 s has 30 real rows, then the next camera.
    first = np.flatnonzero((index.name == "conversation1_t1-cam01") & (index.start_time == 2.0))[0]
    assert np.all(index.target_coords[first, 30:] == 1.0)
    assert np.all(index.speech_activity[first, 30:] == 0.0) and np.all(index.pseudo_labels[first, 30:] == 0.0)
    assert not np.all(index.target_coords[first, :30] == 1.0)
    # the last example of the CSV (femalemonologue1_t1-cam22 at 2 s, 75 frames): 15 rows then the file end
    assert index.name[-1] == "femalemonologue1_t1-cam22" and index.start_time[-1] == 2.0
    assert np.all(index.target_coords[-1, 15:] == 1.0) and np.all(index.speech_activity[-1, 15:] == 0.0)


def test_rig_and_camera_mapping(tree):
    index = tt.TragicTalkers(tree.root).development_chunks("GT_GT")
    expected_slot = {"cam01": 0, "cam11": 10, "cam12": 0, "cam22": 10}
    cams = index.cams
    assert cams.shape == (len(index), 11) and cams.dtype == np.float32
    for i, camera in enumerate(index.camera):
        np.testing.assert_array_equal(cams[i], np.eye(11)[expected_slot[camera]])
        assert index.rig[i] == ("01" if camera in ("cam01", "cam11") else "02")
        key = index.audio_keys[index.audio_id[i]]
        assert key == (index.sequence[i], index.rig[i], index.start_time[i])
    # cameras of one rig share an audio chunk, the two rigs do not
    groups = {(s, r, t) for s, r, t in zip(index.sequence, index.rig, index.start_time)}
    assert len(index.audio_keys) == len(groups) == len(index) // 2


def test_load_chunk_audio(tree):
    data = tt.TragicTalkers(tree.root)
    for rig, first_mic in (("01", 1), ("02", 23)):
        for start_time in (0.0, 2.0, 0.53):  # 2.0: runs past the 3-s file end; 0.53: frame 16
            got = data.load_chunk_audio("development", "conversation1_t1", rig, start_time)
            assert got.shape == (96000, 16) and got.dtype == np.float32
            start = int(round(start_time * 30) / 30 * 48000)
            for m in range(16):
                path = tree.mic_path("development", "conversation1_t1", f"{first_mic + m:02d}")
                mic, _ = soundfile.read(path, dtype="float32")
                expected = np.zeros(96000, np.float32)
                part = mic[start:start + 96000]
                expected[:len(part)] = part
                np.testing.assert_array_equal(got[:, m], expected)
    assert tt.chunk_start_sample(0.53) == 25600


def test_load_audio_fills_the_rows_it_is_given(tree):
    """With `out`, load_audio fills the first len(keys) rows in place (a chunk that runs past
    the file end gets zeros there, whatever the buffer held) and leaves the padding rows alone."""
    data = tt.TragicTalkers(tree.root)
    keys = [tt.AudioKey("conversation1_t1", "01", 2.0), tt.AudioKey("conversation1_t1", "02", 0.0)]
    out = np.full((3, 96000, 16), 7.0, np.float32)
    assert data.load_audio("development", keys, out=out) is out
    for row, key in enumerate(keys):
        np.testing.assert_array_equal(out[row], data.load_chunk_audio("development", *key))
    assert (out[0, 48000:] == 0).all()  # the 3-s files end 1 s into the chunk at 2 s
    assert (out[2] == 7.0).all()
    np.testing.assert_array_equal(data.load_audio("development", keys), out[:2])
    # `rows`: chunk i to row rows[i], the other rows untouched
    spread = np.full((4, 96000, 16), 7.0, np.float32)
    data.load_audio("development", keys, out=spread, rows=[3, 1])
    np.testing.assert_array_equal(spread[[3, 1]], out[:2])
    assert (spread[[0, 2]] == 7.0).all()
    for rows in ([0], [1, 1], [0, 4], [-1, 0]):
        with pytest.raises(ValueError, match=r"rows must be 2 distinct rows of out \(< 4\), got"):
            data.load_audio("development", keys, out=spread, rows=rows)
    for bad in (np.zeros((1, 96000, 16), np.float32), np.zeros((2, 96000, 16), np.float64),
                np.zeros((2, 96000, 8), np.float32)):
        with pytest.raises(ValueError, match=r"out must be a \(>= 2, 96000, 16\) float32 array, got"):
            data.load_audio("development", keys, out=bad)
    with pytest.raises(ValueError, match=r"out must be a \(96000, 16\) float32 array, got \(16, 96000\)"):
        data.load_chunk_audio("development", *keys[0], out=np.zeros((16, 96000), np.float32))


def test_subset_in_any_order_keeps_each_examples_audio_and_labels(tree):
    """`subset(rows)`: example i of the subset is example rows[i] of the index, its audio chunk
    the same key, and the subset's audio keys are listed in first-use order (shuffled and
    repeated rows, as a shuffled batch gives them)."""
    index = tt.TragicTalkers(tree.root).development_chunks("GT_GT")
    rows = np.random.default_rng(4).permutation(len(index))[: max(3, len(index) // 2)]
    rows = np.concatenate([rows, rows[:2]])
    sub = index.subset(rows)
    np.testing.assert_array_equal(sub.name, index.name[rows])
    np.testing.assert_array_equal(sub.start_time, index.start_time[rows])
    np.testing.assert_array_equal(sub.target_coords, index.target_coords[rows])
    assert [sub.audio_keys[i] for i in sub.audio_id] == [index.audio_keys[index.audio_id[r]] for r in rows]
    first_use = list(dict.fromkeys(index.audio_keys[index.audio_id[r]] for r in rows))
    assert list(sub.audio_keys) == first_use


def test_test_chunks_and_metadata(tree):
    data = tt.TragicTalkers(tree.root)
    index = data.test_chunks()
    assert not index.has_labels
    # 4.0 s test sequence: chunks at 0 and 2 s for every camera
    assert len(index) == 2 * len(tree.cameras)
    assert sorted(set(index.start_time)) == [0.0, 2.0]
    lengths = json.loads((tree.root / "csv" / "seq_lengths.json").read_text())
    assert data.seq_lengths() == {k: float(v) for k, v in lengths.items()}


def test_sequence_filter(tree):
    data = tt.TragicTalkers(tree.root)
    full = data.development_chunks("GT_GT")
    part = data.development_chunks("GT_GT", sequences=["femalemonologue1_t1"])
    keep = full.sequence == "femalemonologue1_t1"
    assert list(part.name) == list(full.name[keep])
    np.testing.assert_array_equal(part.target_coords, full.target_coords[keep])
    assert [part.audio_keys[i] for i in part.audio_id] == [full.audio_keys[i] for i in full.audio_id[keep]]
    with pytest.raises(ValueError, match=r"sequence\(s\) \['nope'\] do not occur"):
        data.development_chunks("GT_GT", sequences=["nope"])


def test_unknown_condition(tree):
    with pytest.raises(ValueError, match=r"unknown condition 'GT_XX': expected one of \['GT_GT'"):
        tt.TragicTalkers(tree.root).development_chunks("GT_XX")


def test_csv_that_is_not_utf8_is_named_with_its_line(tmp_path):
    """Latin-1 text (a spreadsheet's export) gave a bare UnicodeDecodeError naming no file."""
    tree = tiny_tree.write(tmp_path / "data", dev_seconds={"conversation1_t1": 2.0}, test_seconds={},
                           cameras=("cam01",))
    path = tree.csv_path("GT_GT")
    lines = path.read_bytes().split(b"\n")
    lines[2] = lines[2] + b"\xe9"
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:3: not UTF-8 text \(byte 0xe9 "
                                         r"at offset \d+\); expected a CSV file with the columns"):
        tt.TragicTalkers(tree.root).development_chunks("GT_GT")


def test_bad_names_in_csv(tmp_path):
    tree = tiny_tree.write(tmp_path / "data", dev_seconds={"conversation1_t1": 2.0}, test_seconds={},
                           cameras=("cam01",))
    path = tree.csv_path("GT_GT")
    lines = path.read_text().splitlines()
    lines[3] = lines[3].replace("cam01", "cam23")
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(tt.LayoutError, match=r"development_GT_GT\.csv, line 4: unknown camera 'cam23'"):
        tt.TragicTalkers(tree.root).development_chunks("GT_GT")


@pytest.mark.parametrize("subtype", ["FLOAT", "DOUBLE"])
def test_non_finite_float_sample_names_the_file(tmp_path, subtype):
    tree = tiny_tree.write(tmp_path / "data", dev_seconds={"conversation1_t1": 2.0}, test_seconds={},
                           cameras=("cam01",), subtype="FLOAT")
    path = tree.mic_path("development", "conversation1_t1", "04")
    x, _ = soundfile.read(path, dtype="float64")
    x[5000] = np.nan
    soundfile.write(path, x, 48000, subtype=subtype)
    data = tt.TragicTalkers(tree.root)
    np.testing.assert_array_equal(data.load_chunk_audio("development", "conversation1_t1", "02", 0.0)[:, 3],
                                  soundfile.read(tree.mic_path("development", "conversation1_t1", "26"),
                                                 dtype="float32")[0])
    with pytest.raises(ValueError, match=r"04_conversation1_t1\.wav: non-finite sample at index 5000"):
        data.load_chunk_audio("development", "conversation1_t1", "01", 0.0)
    # Both rigs damaged: load_audio (chunks read in parallel) names the first chunk's file in
    # the order asked for, as reading them one by one does.
    other = tree.mic_path("development", "conversation1_t1", "26")
    y, _ = soundfile.read(other, dtype="float64")
    y[7000] = np.inf
    soundfile.write(other, y, 48000, subtype=subtype)
    data = tt.TragicTalkers(tree.root)
    rig1, rig2 = (tt.AudioKey("conversation1_t1", rig, 0.0) for rig in ("01", "02"))
    for keys, message in (([rig2, rig1], r"26_conversation1_t1\.wav: non-finite sample at index 7000"),
                          ([rig1, rig2], r"04_conversation1_t1\.wav: non-finite sample at index 5000")):
        with pytest.raises(ValueError, match=message):
            data.load_audio("development", keys)


# ---- label and length values (SPEC section 1), with the line of the file ------------------------

HEADER = "name,time,x,pseudo_label,va_label"


def _csv_root(tmp_path, dev_lines=(), test_lines=None, sequences=("conversation1_t1",)):
    """A data root holding only folders and CSVs: enough to parse (and build an index from) them."""
    for split in ("development", "test"):
        for sequence in sequences:
            (tmp_path / "TragicTalkers" / "audio" / split / sequence).mkdir(parents=True)
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "development_GT_GT.csv").write_text("\n".join([HEADER, *dev_lines]) + "\n")
    if test_lines is not None:
        (tmp_path / "csv" / "test_forward.csv").write_text("\n".join(["name,time", *test_lines]) + "\n")
    return tt.TragicTalkers(tmp_path)


def _row(time="0", x="0.5", pseudo="SPEAKING", va="NOT_SPEAKING", name="conversation1_t1-cam01"):
    return ",".join([name, time, x, pseudo, va])


@pytest.mark.parametrize("field, value, expected", [
    ("x", "nan", r"x 'nan' is not a finite number in \[0, 1\]"),
    ("x", "inf", r"x 'inf' is not a finite number in \[0, 1\]"),
    ("x", "1.5", r"x '1.5' is not a finite number in \[0, 1\]"),
    ("x", "-0.01", r"x '-0.01' is not a finite number in \[0, 1\]"),
    ("time", "inf", r"time 'inf' is not a finite number >= 0"),
    ("time", "nan", r"time 'nan' is not a finite number >= 0"),
    ("time", "-1", r"time '-1' is not a finite number >= 0"),
])
def test_label_values_out_of_range_name_the_line(tmp_path, field, value, expected):
    rows = [_row(time=f"{k / 30:.2f}") for k in range(5)]
    rows[3] = _row(**{"time": f"{3 / 30:.2f}", field: value})
    data = _csv_root(tmp_path, rows)
    with pytest.raises(tt.LayoutError, match=r"development_GT_GT\.csv, line 5: " + expected):
        data.development_chunks("GT_GT")


def test_label_values_at_the_limits_are_accepted(tmp_path):
    rows = [_row(time=t, x=x) for t, x in (("0", "0"), ("0.03", "1"), ("0.07", "1.0"), ("0.1", "0.25"))]
    index = _csv_root(tmp_path, rows).development_chunks("GT_GT")
    np.testing.assert_array_equal(index.target_coords[0, :5], [0.0, 1.0, 1.0, 0.25, 1.0])  # then padding


@pytest.mark.parametrize("bad_row, expected", [
    (_row(time="0.1", x="2"), r"x '2' is not a finite number"),
    (_row(time="0.1", pseudo="MAYBE"), r"unknown pseudo_label 'MAYBE'"),
    (_row(time="0.1", name="conversation1_t1-cam99"), r"unknown camera 'cam99'"),
    (_row(time="soon"), r"time 'soon' is not a number"),
    ("conversation1_t1-cam01,0.1", r"2 fields, expected 5"),
    ("conversation1_t1-cam01,0.1,0.5,SPEAKING", r"4 fields, expected 5"),  # va_label missing
])
def test_line_numbers_count_blank_lines(tmp_path, bad_row, expected):
    # line 1 header, 2 data, 3 blank, 4 data, 5 blank, 6 blank, 7 the bad row
    data = _csv_root(tmp_path, [_row(time="0"), "", _row(time="0.03"), "", "", bad_row])
    with pytest.raises(tt.LayoutError, match=r"development_GT_GT\.csv, line 7: " + expected):
        data.development_chunks("GT_GT")


def test_spaces_around_fields_are_ignored(tmp_path):
    """A space after a comma (' 0.5', ' SPEAKING') or before the line end is not part of the field:
    the reader strips every field, as it strips the header."""
    rows = [_row(time="0"), "conversation1_t1-cam01, 0.03, 0.5, SPEAKING,NOT_SPEAKING "]
    index = _csv_root(tmp_path, rows).development_chunks("GT_GT")
    np.testing.assert_array_equal(index.target_coords[0, :2], [0.5, 0.5])
    np.testing.assert_array_equal(index.pseudo_labels[0, :2], [1.0, 1.0])
    np.testing.assert_array_equal(index.speech_activity[0, :2], [0.0, 0.0])


_START_AGAIN = r"rows of conversation1_t1-cam01 start again after other names \(first on line 2\)"


def _edit_development_csv(tree, tmp_path, edit):
    root = tmp_path / "data"
    shutil.copytree(tree.root, root)
    rows = tree.label_rows("GT_GT")
    assert len(rows) == 660 and rows[90][0] == "conversation1_t1-cam11"
    (root / "csv" / "development_GT_GT.csv").write_text(
        "\n".join([HEADER, *(",".join(r) for r in edit(rows))]) + "\n")
    return tt.TragicTalkers(root)


@pytest.mark.parametrize("edit, expected", [
    # Sorted by time as text: the 8 names' rows at time "0", then the first name again.
    (lambda rows: sorted(rows, key=lambda r: r[1]), r"line 10: " + _START_AGAIN),
    (lambda rows: rows + rows, r"line 662: " + _START_AGAIN),  # the file twice: 660 rows each
    (lambda rows: rows[:11] + rows[10:], r"line 13: conversation1_t1-cam01 at time 0.33 s is frame 10, "
                                         r"not after frame 10 on line 12; expected one row per video "
                                         r"frame at 30 fps in time order"),
    (lambda rows: rows[:95] + [rows[96], rows[95]] + rows[97:],  # two rows of cam11 swapped
     r"line 98: conversation1_t1-cam11 at time 0.17 s is frame 5, not after frame 6 on line 97"),
], ids=["sorted by time as text", "the file twice", "a row repeated", "two rows swapped"])
def test_development_rows_must_be_one_per_video_frame_in_order(tree, tmp_path, edit, expected):
    """Reordered or repeated rows used to shift the labels of the chunks after them (a file
    given twice: twice the examples); the line of the first wrong row is named."""
    data = _edit_development_csv(tree, tmp_path, edit)
    with pytest.raises(tt.LayoutError, match=r"development_GT_GT\.csv, " + expected):
        data.development_chunks("GT_GT")


@pytest.mark.parametrize("edit, expected", [
    (lambda rows: rows[:10] + rows[11:], r"line 12: conversation1_t1-cam01 at time 0.37 s is frame 11 "
                                         r"where frame 10 was expected \(1 row\(s\) skip frames\)"),
    (lambda rows: rows[1:], r"line 2: conversation1_t1-cam01 at time 0.03 s is frame 1 where frame 0 "
                            r"was expected"),
], ids=["a row missing", "the first row missing"])
def test_skipped_development_frames_are_read_by_position_with_a_warning(tree, tmp_path, caplog, edit,
                                                                      expected):
    """A skipped frame cannot be told from a dataset that lacks it, so it is read as the
    reference reads it, by position (the chunk's 60 rows from its start row), and named."""
    data = _edit_development_csv(tree, tmp_path, edit)
    rows = edit(tree.label_rows("GT_GT"))
    with caplog.at_level("WARNING"):
        index = data.development_chunks("GT_GT")
    assert re.search(r"development_GT_GT\.csv, " + expected, caplog.text)
    # The example starting at 1 s reads the 60 rows from the row at time 1.0, whatever precedes it.
    start = next(i for i, r in enumerate(rows) if r[0] == "conversation1_t1-cam01" and float(r[1]) == 1.0)
    example = np.flatnonzero((index.name == "conversation1_t1-cam01") & (index.start_time == 1.0))[0]
    np.testing.assert_array_equal(index.target_coords[example, :5],
                                  np.float32([float(r[2]) for r in rows[start:start + 5]]))


def test_the_released_csvs_hold_one_row_per_video_frame(reference_dir):
    """The development CSVs come with the gated dataset; the released forward files, written
    per frame as the labels are, follow the rule that `development_chunks` enforces."""
    for system in ("ASC", "ASCs"):
        path = reference_dir / "released" / system / "test_forward.csv"
        columns, lines = tt._read_csv_columns(path, ("name", "time"))
        times = tt._parse_floats(path, "time", columns["time"], lines, low=0.0)
        tt._check_frame_rows(path, np.array(columns["name"]), times, lines)
        assert len(lines) == 78715


def test_a_test_csv_naming_a_sequence_without_audio_is_refused(tmp_path):
    data = _csv_root(tmp_path, test_lines=["conversation1_t1-cam01,0", "interactive1_t2-cam01,0"])
    with pytest.raises(tt.LayoutError, match=r"test_forward\.csv names sequence\(s\) \['interactive1_t2'\] "
                                             r"that have no folder in .*audio/test \(first on line 3\)"):
        data.test_chunks()


def test_a_label_row_of_a_sequence_without_audio_is_refused_even_inside_a_chunk(tmp_path):
    """A row renamed inside a chunk (not a chunk start) used to end its neighbours' labels early
    (padding from that frame on) without a word."""
    rows = [_row(time=f"{k / 30:.2f}") for k in range(40)]
    rows[21] = _row(time=f"{21 / 30:.2f}", name="nosuchseq_t1-cam01")
    data = _csv_root(tmp_path, rows)
    with pytest.raises(tt.LayoutError, match=r"development_GT_GT\.csv names sequence\(s\) \['nosuchseq_t1'\] "
                                             r"that have no folder in .*audio/development \(first on line 23\)"):
        data.development_chunks("GT_GT")


def test_test_index_times_are_checked_with_their_line(tmp_path):
    data = _csv_root(tmp_path, test_lines=["conversation1_t1-cam01,0", "", "conversation1_t1-cam01,-0.03"])
    with pytest.raises(tt.LayoutError, match=r"test_forward\.csv, line 4: time '-0.03' is not a finite "
                                             r"number >= 0"):
        data.test_chunks()


def test_a_test_chunk_listed_twice_is_refused_with_both_lines(tmp_path):
    """A repeated (name, start) row would be a second example of one chunk; the forward pass writes
    a chunk's rows once, so the index refuses it. Repeated rows inside a chunk are not starts."""
    lines = ["conversation1_t1-cam01,0", "conversation1_t1-cam01,0.03", "conversation1_t1-cam02,0",
             "conversation1_t1-cam01,0.03", "conversation1_t1-cam01,2.00", "conversation1_t1-cam02,2"]
    index = _csv_root(tmp_path, test_lines=lines[:5]).test_chunks()
    assert [(n, t) for n, t in zip(index.name, index.start_time)] == [
        ("conversation1_t1-cam01", 0.0), ("conversation1_t1-cam02", 0.0), ("conversation1_t1-cam01", 2.0)]
    (tmp_path / "csv" / "test_forward.csv").write_text(
        "\n".join(["name,time", *lines, "conversation1_t1-cam01,2.0"]) + "\n")
    with pytest.raises(tt.LayoutError, match=r"test_forward\.csv, line 8: the chunk of conversation1_t1-cam01 "
                                             r"at 2 s is listed again \(first on line 6\)"):
        tt.TragicTalkers(tmp_path).test_chunks()


@pytest.mark.parametrize("value, shown", [
    ("null", "null"), ('"nan"', '"nan"'), ('"inf"', '"inf"'), ('"0"', '"0"'), ("-2.5", "-2.5"),
    ("true", "true"), ('"12 s"', '"12 s"'), ("[1]", r"\[1\]"),
])
def test_seq_lengths_refuses_bad_lengths(tmp_path, value, shown):
    data = _csv_root(tmp_path)
    path = tmp_path / "csv" / "seq_lengths.json"
    path.write_text('{"conversation1_t1": "12.5", "interactive1_t2": ' + value + "}")
    with pytest.raises(tt.LayoutError, match=rf"seq_lengths\.json: length of 'interactive1_t2' is {shown}; "
                                             r"expected seconds > 0"):
        data.seq_lengths()
    path.write_text('{"conversation1_t1": "12.5", "interactive1_t2": 7}')
    assert data.seq_lengths() == {"conversation1_t1": 12.5, "interactive1_t2": 7.0}


def test_the_reference_test_index_and_lengths_pass_the_checks(tmp_path, reference_dir):
    """The real seq_lengths.json and a released test_forward.csv (name,time,...) are accepted."""
    forward = reference_dir / "released" / "ASCs" / "test_forward.csv"
    names = {line.split(",", 1)[0] for line in forward.read_text().splitlines()[1:] if line}
    data = _csv_root(tmp_path, sequences=sorted({n.rpartition("-")[0] for n in names}))
    (tmp_path / "csv" / "test_forward.csv").symlink_to(forward)
    (tmp_path / "csv" / "seq_lengths.json").symlink_to(reference_dir / "seq_lengths.json")
    lengths = data.seq_lengths()
    assert len(lengths) == 31 and min(lengths.values()) > 0
    index = data.test_chunks()
    assert set(index.sequence) == {"conversation1_t3", "femalemonologue2_t3", "interactive1_t2",
                                   "interactive4_t3", "malemonologue2_t3"}


# ---- float WAVs are scanned before use; PCM files are not read --------------------------------

def test_check_audio_finds_a_non_finite_float_sample_before_any_chunk_is_read(tmp_path, monkeypatch):
    tree = tiny_tree.write(tmp_path / "data", dev_seconds={"conversation1_t1": 2.0}, test_seconds={},
                           cameras=("cam01", "cam12"), subtype="FLOAT")
    path = tree.mic_path("development", "conversation1_t1", "30")  # rig 02, mic 8
    x, _ = soundfile.read(path, dtype="float32")
    x[-1] = np.inf  # the very last sample: the whole file is scanned
    soundfile.write(path, x, 48000, subtype="FLOAT")
    monkeypatch.setattr(tt, "SCAN_BLOCK_FRAMES", 1000)  # many blocks: the index is the file's own
    data = tt.TragicTalkers(tree.root)
    index = data.development_chunks("GT_GT")
    message = rf"30_conversation1_t1\.wav: non-finite sample at index {len(x) - 1}"
    with pytest.raises(ValueError, match=message):
        data.check_audio(index)
    rig_01 = index.subset(np.flatnonzero(index.rig == "01"))
    data.check_audio(rig_01)  # rig 01 does not use the file


def test_check_audio_reads_no_samples_of_pcm_files(tree, monkeypatch):
    def no_reading(*args, **kwargs):
        raise AssertionError("PCM samples were read")

    monkeypatch.setattr(tt.wav, "read_wav", no_reading)
    data = tt.TragicTalkers(tree.root)
    data.check_audio(data.development_chunks("GT_GT"))


@pytest.mark.parametrize("channels, rate, expected", [
    (2, 48000, r"05_conversation1_t1\.wav: 2 channels, expected a mono file"),
    (1, 44100, r"05_conversation1_t1\.wav: sample rate 44100 Hz, expected 48000 Hz"),
])
def test_a_mic_file_not_mono_48_khz_is_refused(tmp_path, channels, rate, expected):
    tree = tiny_tree.write(tmp_path / "data", dev_seconds={"conversation1_t1": 2.0}, test_seconds={},
                           cameras=("cam01",))
    path = tree.mic_path("development", "conversation1_t1", "05")
    samples = 0.1 * np.random.default_rng(0).standard_normal((rate, channels))
    soundfile.write(path, samples, rate, subtype="PCM_16")
    data = tt.TragicTalkers(tree.root)
    assert len(data.mic_files("development", "conversation1_t1", "02")) == 16  # the other rig is fine
    with pytest.raises(tt.LayoutError, match=expected):
        data.mic_files("development", "conversation1_t1", "01")
