"""Shared fixtures. `reference_dir` is the reference's public test data (never copied here)."""

import atexit
import os
import pathlib
import shutil
import tempfile

import pytest

# Parity tests compare float32 with float32 references (PyTorch, numpy, librosa) at ~1e-6. On
# NVIDIA GPUs JAX's default float32 matmul/convolution precision is TF32 (10-bit mantissa),
# which is ~1e-3 off; on CPU "highest" is what the default already computes. Set before JAX
# reads its configuration, so subprocesses started by tests inherit it too.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")


def _use_a_private_compilation_cache() -> None:
    """Gives this pytest process an empty persistent XLA compilation cache of its own.

    Many tests compile the same programs (the tiny train step, the paper-size forward pass),
    and the end-to-end tests start subprocesses that compile again what the test compiled
    just before; with the cache, each distinct program is compiled once per process tree
    (`make test` on 2 cores: 601 s without it, 491 s with it). A cache directory the user set
    is kept. A pytest-xdist worker inherits the variables of the pytest process that started
    it, so a directory made here is marked as ours, and each worker makes its own: JAX writes
    cache entries without a lock, and a worker must not read another's half-written entry.
    """
    ours = os.environ.get("ASD_JAX_TEST_COMPILATION_CACHE")
    if os.environ.get("JAX_COMPILATION_CACHE_DIR") not in (None, ours):
        return
    path = tempfile.mkdtemp(prefix="asd_jax_xla_cache_")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["ASD_JAX_TEST_COMPILATION_CACHE"] = path
    # JAX caches only compilations that took 1 s or more by default; most of ours take less.
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")


_use_a_private_compilation_cache()

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
