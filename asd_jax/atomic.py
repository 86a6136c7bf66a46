"""Write-then-rename: a file appears at its final path only once it is complete.

Every output of the package (CSV tables, JSON logs, plots) goes through `partial_path`, so an
interrupted run leaves either the previous file or nothing, never a truncated one.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
from typing import Iterator


@contextlib.contextmanager
def partial_path(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Yields `<path>.partial` to write; renames it onto `path` when the block ends cleanly.

    The partial file is removed when the block raises. The parent directory must exist.
    """
    path = pathlib.Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output directory {path.parent} does not exist")
    partial = path.with_name(path.name + ".partial")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` to `path` atomically."""
    with partial_path(path) as partial:
        partial.write_text(text)
