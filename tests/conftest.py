"""Shared fixtures. `reference_dir` is the reference's public test data (never copied here)."""

import os
import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _reference_dir() -> pathlib.Path | None:
    env = os.environ.get("ASD_REFERENCE_DIR")
    if env:
        return pathlib.Path(env)
    default = REPO_ROOT.parent / "shared" / "reference"
    return default if default.exists() else None


@pytest.fixture(scope="session")
def reference_dir() -> pathlib.Path:
    """Path of ../shared/reference (or $ASD_REFERENCE_DIR).

    Missing data skips the test, except under CI=true where it is a failure.
    """
    path = _reference_dir()
    if path is None or not (path / "GT").is_dir():
        msg = (f"reference data not found (ASD_REFERENCE_DIR={os.environ.get('ASD_REFERENCE_DIR')!r}, "
               f"default {REPO_ROOT.parent / 'shared' / 'reference'}); it must hold GT/ and released/")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path
