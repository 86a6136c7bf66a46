"""Write-then-rename: a file appears at its final path only once it is complete.

Every file output of the package (CSV tables, JSON logs, plots) goes through `partial_path`
(or `write_text`), so an interrupted run leaves either the previous file or nothing, never a
truncated one. Whole directory trees (the synthetic dataset, model directories) are built
aside and renamed into place by their own modules.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import os
import pathlib
import re
import socket
import uuid
from typing import Iterator

PARTIAL_SUFFIX = ".partial"
# This machine in temporary names: writers on other machines (a shared file system) are never
# judged by this one's process table.
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_WRITER = re.compile(r"\.(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{8}" + re.escape(PARTIAL_SUFFIX))


@contextlib.contextmanager
def partial_path(path: str | os.PathLike, keep_suffix: bool = False) -> Iterator[pathlib.Path]:
    """Yields a temporary path next to `path` to write; renames it onto `path` when the block
    ends cleanly, after flushing it to disk (fsync).

    The temporary name is `.<name>.<writer>.partial` in the same directory (so the rename is
    atomic), `<writer>` naming this machine (a hash of its host name), this process and the call
    (`<host hash>-<pid>-<random hex>`): concurrent writers of one path do not write into each
    other's file, and the last one to finish wins. With `keep_suffix` the name ends in `path`'s
    suffix too (`.out.mp4.<writer>.partial.mp4`), for writers that pick the format from the
    name, as ffmpeg does. Once the file is in place, the temporary files of `path` that killed
    writers left (`stale_leftovers`) are removed. The file does not exist when the block starts.
    It is removed when the block raises. The parent directory must exist. An OSError about the
    temporary file (e.g. a folder that is not writable) is raised as the same error about
    `path`, the name the caller knows.
    """
    target = path
    path = check_output_file(path)
    partial = path.with_name(f".{path.name}.{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                             f"{PARTIAL_SUFFIX}" + (path.suffix if keep_suffix else ""))
    try:
        yield partial
        _fsync(partial)
        os.replace(partial, path)
        for stale in stale_leftovers(path):
            stale.unlink(missing_ok=True)
    except OSError as error:
        if not _is_about(error, partial):
            raise
        raise _target_error(error, target) from error
    finally:
        partial.unlink(missing_ok=True)


def _is_about(error: OSError, partial: pathlib.Path) -> bool:
    """Whether `error` (with an errno) is about the file `partial`: its filename, or named in its
    message (h5py names the file only there)."""
    if not error.errno:
        return False
    if error.filename is not None:
        return os.fspath(error.filename) == str(partial)
    return str(partial) in str(error)


def _target_error(error: OSError, target: str | os.PathLike) -> OSError:
    """`error`, about the temporary file of `partial_path(target)`, as the same errno (so the
    same OSError subclass) about `target`: `<target>: Permission denied (cannot create a file
    in <folder>)`."""
    reason = os.strerror(error.errno)
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT):
        reason += f" (cannot create a file in {pathlib.Path(target).parent})"
    return OSError(error.errno, reason, os.fspath(target))  # PermissionError for EACCES, ...


def check_output_file(path: str | os.PathLike) -> pathlib.Path:
    """`path` as a Path if a file can be written there: its directory exists and `path` is not
    a directory. For the edge of long jobs, to refuse a bad output before the work."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise IsADirectoryError(21, "is a directory; expected the path of a file to write", str(path))
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output directory {path.parent} does not exist")
    return path


def refuse_same_file(out_path: str | os.PathLike, in_path: str | os.PathLike, what: str) -> None:
    """Raises ValueError when `out_path` names the existing file `in_path` (by any spelling,
    symbolic or hard link): writing it would replace the input. `what` says what the input is
    ("the input video")."""
    out_path, in_path = pathlib.Path(out_path), pathlib.Path(in_path)
    if out_path.exists() and in_path.exists() and os.path.samefile(out_path, in_path):
        raise ValueError(f"output {out_path} is {what} {in_path}: writing it would replace its "
                         "input; choose another output path")


def make_output_dir(path: str | os.PathLike) -> pathlib.Path:
    """`mkdir -p path`, with a path, or the nearest existing folder above it, that is a file
    named as such (mkdir says only "File exists")."""
    path = pathlib.Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(20, "exists and is not a directory; expected a directory to write "
                                 "into (or a path that does not exist yet)", str(path))
    existing = next((p for p in path.parents if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise NotADirectoryError(20, f"is a file, so {path} cannot be made under it", str(existing))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _fsync(path: pathlib.Path) -> None:
    """Flushes a written file to disk, so that the rename never publishes a file whose data a
    crash of the machine could still lose. A block that wrote nothing is left to fail at the
    rename."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` to `path` atomically."""
    with partial_path(path) as partial:
        partial.write_text(text)


def leftovers(path: str | os.PathLike) -> list[pathlib.Path]:
    """Temporary files of `partial_path(path)` (with or without `keep_suffix`) left by killed
    writers (also the `<name>.partial` name of earlier versions), for callers that clean up;
    not safe while a writer runs."""
    path = pathlib.Path(path)
    old = path.with_name(path.name + PARTIAL_SUFFIX)
    found = set()
    for suffix in {PARTIAL_SUFFIX, PARTIAL_SUFFIX + path.suffix}:
        found.update(path.parent.glob(f".{glob.escape(path.name)}.*{glob.escape(suffix)}"))
    return sorted(found) + ([old] if old.exists() else [])


def stale_leftovers(path: str | os.PathLike) -> list[pathlib.Path]:
    """The `leftovers` of `path` whose writer is gone: written on this machine by a process that
    no longer runs. Safe while other writers run; files of earlier versions' names (no writer in
    them), of other machines, or on a system without POSIX process checks are never stale."""
    path = pathlib.Path(path)
    stale = []
    for leftover in leftovers(path):
        writer = _WRITER.match(leftover.name, len(path.name) + 1)  # after ".<name>"
        if writer is not None and writer["host"] == _HOST and not _running(int(writer["pid"])):
            stale.append(leftover)
    return stale


def _running(pid: int) -> bool:
    """Whether process `pid` exists here (True where that cannot be asked: not POSIX)."""
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)  # signal 0: the check alone, nothing is sent
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
