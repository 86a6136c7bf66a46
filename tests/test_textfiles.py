"""asd_jax.textfiles: text read as UTF-8 or refused naming the file and line; bounded excerpts."""

import numpy as np
import pytest

from asd_jax import textfiles


def test_excerpt_is_bounded_and_printable():
    assert textfiles.excerpt("short") == "'short'"
    long = "x" * 500
    assert textfiles.excerpt(long) == repr("x" * textfiles.EXCERPT_CHARS) + "..."
    # Bytes are decoded, undecodable ones replaced (a binary file given for a CSV).
    assert textfiles.excerpt(b"ab\xffcd") == repr("ab\ufffdcd")
    assert textfiles.excerpt(np.frombuffer(b"q" * 1000, np.uint8), limit=5) == "'qqqqq'..."
    assert textfiles.excerpt(list(range(100)), limit=10) == repr(list(range(100)))[:10] + "..."


def test_text_in_another_encoding_is_refused_naming_file_line_and_byte(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_bytes("a,b\n1,2\ncaf\u00e9,3\n".encode("latin-1"))
    with pytest.raises(ValueError, match=rf"{path}:3: not UTF-8 text \(byte 0xe9 at offset 11\); "
                                         r"expected a CSV"):
        textfiles.read_text(path, "a CSV")


def test_a_nul_byte_is_refused_as_binary(tmp_path):
    path = tmp_path / "config.json"
    path.write_bytes(b"{\n\n\"a\": 1\0}")
    with pytest.raises(ValueError, match=rf"{path}:3: not a text file \(a NUL byte at offset 9\)"):
        textfiles.read_text(path, "JSON")


def test_utf8_with_a_byte_order_mark_reads_without_it(tmp_path):
    path = tmp_path / "a.csv"
    path.write_bytes(b"\xef\xbb\xbfname,\xc3\xa9\n")
    assert textfiles.read_text(path, "a CSV") == "name,\u00e9\n"
