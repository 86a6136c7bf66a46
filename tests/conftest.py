"""Shared fixtures. `reference_dir` is the reference's public test data (never copied here)."""

import os
import pathlib

import pytest

# Parity tests compare float32 with float32 references (PyTorch, numpy, librosa) at ~1e-6. On
# NVIDIA GPUs JAX's default float32 matmul/convolution precision is TF32 (10-bit mantissa),
# which is ~1e-3 off; on CPU "highest" is what the default already computes. Set before JAX
# reads its configuration, so subprocesses started by tests inherit it too.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

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
