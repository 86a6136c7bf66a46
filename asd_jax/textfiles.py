"""Text files read by the package: UTF-8 or an error naming the file and line, and file content
quoted in error messages as a bounded, printable excerpt (a binary file or a line of megabytes
given where a CSV or JSON was expected must not flood the terminal)."""

from __future__ import annotations

import os
import pathlib
from typing import Any

import numpy as np

EXCERPT_CHARS = 80  # file content echoed in an error message is cut to this many characters


def excerpt(value: Any, limit: int = EXCERPT_CHARS) -> str:
    """A bounded, printable repr of file content for an error message: text (bytes decoded as
    UTF-8, undecodable bytes replaced) as the repr of its first `limit` characters, any other
    value as the first `limit` characters of its repr; "..." follows where it was cut."""
    if isinstance(value, (bytes, bytearray, np.ndarray)):
        value = bytes(value[:4 * (limit + 1)]).decode("utf-8", "replace")  # >= limit + 1 chars
    if isinstance(value, str):
        return repr(value[:limit]) + ("..." if len(value) > limit else "")
    shown = repr(value)
    return shown[:limit] + ("..." if len(shown) > limit else "")


def check_text(data: bytes, path: str | os.PathLike, expected: str) -> None:
    """Raises naming the file and line if `data` is not UTF-8 text (or holds a NUL byte, which
    no text file does): a binary file, or text in another encoding, given for `expected`."""
    nul = data.find(b"\0")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        if nul < 0 or e.start < nul:
            line = data.count(b"\n", 0, e.start) + 1
            raise ValueError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                             f"{e.start}); expected {expected}") from None
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        raise ValueError(f"{path}:{line}: not a text file (a NUL byte at offset {nul}); expected "
                         f"{expected}")


def read_text(path: str | os.PathLike, expected: str) -> str:
    """The UTF-8 text of a file (a leading BOM dropped), or an error naming the file (see
    `check_text`)."""
    data = pathlib.Path(path).read_bytes()
    check_text(data, path, expected)
    return data.decode("utf-8-sig")
