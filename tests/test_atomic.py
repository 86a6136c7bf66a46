"""Write-then-rename (asd_jax/atomic.py): the final path only ever holds a complete file, and
two writers of one path each write their own temporary file."""

import errno
import os
import pathlib
import subprocess
import sys

import pytest

from asd_jax import atomic
import experiments


def test_write_text_leaves_only_the_file(tmp_path):
    path = tmp_path / "out.json"
    atomic.write_text(path, "first\n")
    atomic.write_text(path, "second\n")
    assert path.read_text() == "second\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_concurrent_writers_do_not_share_a_temporary_file(tmp_path):
    path = tmp_path / "table.csv"
    with atomic.partial_path(path) as first, atomic.partial_path(path) as second:
        assert first != second
        assert first.parent == second.parent == tmp_path  # same directory: the rename is atomic
        assert not first.exists() and not second.exists()
        first.write_text("a" * 1000)
        second.write_text("b")  # would truncate the first writer's file under one fixed name
        assert first.read_text() == "a" * 1000
        assert not path.exists()
    assert path.read_text() == "a" * 1000  # the last writer to finish wins, whole
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing_else(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic.partial_path(path) as partial:
            partial.write_text("half")
            raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_the_file_is_flushed_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    atomic.write_text(tmp_path / "x.txt", "data")
    assert events == ["fsync", "replace"]


def test_missing_directory_and_leftovers(tmp_path):
    with pytest.raises(FileNotFoundError, match="output directory .*no does not exist"):
        atomic.write_text(tmp_path / "no" / "x.txt", "data")
    (tmp_path / "taken").mkdir()
    with pytest.raises(IsADirectoryError, match="expected the path of a file to write") as error:
        atomic.write_text(tmp_path / "taken", "data")
    assert error.value.filename == str(tmp_path / "taken")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    path = tmp_path / "model[1].json"
    killed = [tmp_path / ".model[1].json.0123abcd.partial", tmp_path / "model[1].json.partial"]
    for p in killed + [tmp_path / ".other.json.0123.partial"]:
        p.write_text("junk")
    assert atomic.leftovers(path) == killed


def test_keep_suffix_ends_the_temporary_name_in_the_suffix(tmp_path):
    """For ffmpeg, which picks the container from the name: `.out.mp4.<hex>.partial.mp4`, still
    found by leftovers; without the option the name is unchanged."""
    path = tmp_path / "out.mp4"
    with atomic.partial_path(path, keep_suffix=True) as kept, atomic.partial_path(path) as plain:
        assert kept.name.startswith(".out.mp4.") and kept.name.endswith(".partial.mp4")
        assert plain.name.startswith(".out.mp4.") and plain.name.endswith(".partial")
        kept.write_text("killed writer")  # as a killed writer leaves them
        plain.write_text("killed writer")
        assert atomic.leftovers(path) == sorted([kept, plain])
        assert atomic.leftovers(tmp_path / "out.mkv") == []
    assert path.read_text() == "killed writer"
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]


def test_make_output_dir_names_the_file_in_the_way(tmp_path):
    made = atomic.make_output_dir(tmp_path / "a" / "b")
    assert made.is_dir() and atomic.make_output_dir(made) == made
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError, match="exists and is not a directory") as error:
        atomic.make_output_dir(tmp_path / "afile")
    assert error.value.filename == str(tmp_path / "afile")
    # a file further up: named, not mkdir's bare "File exists" about it
    with pytest.raises(NotADirectoryError, match=rf"is a file, so {tmp_path}/afile/c/d cannot be "
                                                 "made under it") as error:
        atomic.make_output_dir(tmp_path / "afile" / "c" / "d")
    assert error.value.filename == str(tmp_path / "afile")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "afile"]


def test_an_error_about_the_temporary_file_names_the_target(tmp_path):
    """A folder that is not writable said `<dir>/.p.csv.<hex>.partial: Permission denied`."""
    path = tmp_path / "p.csv"
    with pytest.raises(PermissionError) as error:
        with atomic.partial_path(path) as partial:
            raise PermissionError(errno.EACCES, "Permission denied", str(partial))
    assert (error.value.errno, error.value.filename) == (errno.EACCES, str(path))
    assert error.value.strerror == f"Permission denied (cannot create a file in {tmp_path})"
    assert experiments.error_message(error.value) == (
        f"{path}: Permission denied (cannot create a file in {tmp_path})")
    # h5py names the file only in its message
    with pytest.raises(PermissionError) as error:
        with atomic.partial_path(path) as partial:
            raise PermissionError(errno.EACCES, f"Unable to create file (name = '{partial}')")
    assert error.value.filename == str(path) and ".partial" not in str(error.value)
    # an error about another file passes unchanged
    other = FileNotFoundError(errno.ENOENT, "No such file or directory", str(tmp_path / "in.csv"))
    with pytest.raises(FileNotFoundError) as error:
        with atomic.partial_path(path):
            raise other
    assert error.value is other
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def _denied(folder):
    """Whether creating a file in `folder` is refused with EACCES (sysfs refuses even root)."""
    probe = os.path.join(folder, f".probe{os.getpid()}")
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except OSError as error:
        return error.errno == errno.EACCES
    os.unlink(probe)
    return False


@pytest.mark.skipif(not _denied("/sys"), reason="needs /sys, where no one can create a file")
def test_a_folder_that_is_not_writable_names_the_target():
    with pytest.raises(PermissionError) as error:
        atomic.write_text("/sys/p.csv", "data")
    assert experiments.error_message(error.value) == (
        "/sys/p.csv: Permission denied (cannot create a file in /sys)")


def test_the_same_file_is_refused_by_any_spelling_a_hard_link_included(tmp_path):
    """Names that resolve to different paths can still be one file (a hard link)."""
    source = tmp_path / "in.wav"
    source.write_bytes(b"input")
    hard = tmp_path / "sub" / "out.csv"
    hard.parent.mkdir()
    os.link(source, hard)
    for out in (hard, tmp_path / "sub" / ".." / "in.wav"):
        with pytest.raises(ValueError, match=r"is the input .*: writing it would replace its input"):
            atomic.refuse_same_file(out, source, "the input")
    atomic.refuse_same_file(tmp_path / "other.csv", source, "the input")  # not there yet: fine


def test_a_file_that_cannot_be_flushed_is_not_published(tmp_path, monkeypatch):
    """The fsync before the rename may fail (too many open files, say): an error, and the target
    is not written, rather than a file published unflushed."""
    target = tmp_path / "out.json"
    real_open = os.open

    def no_more_descriptors(path, *args, **kwargs):
        if pathlib.Path(path).name.startswith("."):  # the hidden temporary file
            raise OSError(errno.EMFILE, "Too many open files")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_more_descriptors)
    with pytest.raises(OSError, match="Too many open files"):
        atomic.write_text(target, "{}")
    assert not list(tmp_path.iterdir())  # neither the target nor the temporary file


def test_a_write_removes_what_killed_writers_of_the_path_left(tmp_path):
    """A writer killed (SIGKILL, power cut) leaves its hidden temporary file; the next complete
    write of the same path removes it, but never the file of a writer that may still run: this
    process's, another machine's, or one of an earlier version's names (no writer in it)."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = int(gone.stdout)  # a process that has ended
    with atomic.partial_path(tmp_path / "probe.csv") as probe:
        probe.write_text("")
        host = probe.name.split(".")[3].split("-")[0]  # ".probe.csv.<host>-<pid>-<hex>.partial"
    path = tmp_path / "out.csv"
    killed = [tmp_path / f".out.csv.{host}-{dead}-0123abcd.partial"]
    kept = [tmp_path / f".out.csv.{host}-{os.getpid()}-0123abcd.partial",  # running
            tmp_path / f".out.csv.{'0' * 8 if host != '0' * 8 else '1' * 8}-{dead}-0123abcd.partial",
            tmp_path / ".out.csv.0123456789abcdef.partial",  # an earlier version's name
            tmp_path / f".other.csv.{host}-{dead}-0123abcd.partial"]  # another path's
    for p in killed + kept:
        p.write_text("junk")
    assert atomic.stale_leftovers(path) == killed
    atomic.write_text(path, "data")
    assert sorted(tmp_path.iterdir()) == sorted(kept + [path, tmp_path / "probe.csv"])
