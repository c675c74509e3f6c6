"""Shared fixtures and small helpers for the jaxem test-suite."""

import os
import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest

DATA_DIR = Path(__file__).parents[1] / "data"

# Where this session's compiled programs are kept on disk (set by the first process; the
# xdist workers and the example subprocesses inherit it).
_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
_created_cache_dir = None


# XLA's CPU compiler options for the tests (see `_compile_fast`).
_FAST_XLA_FLAGS = (
    "--xla_cpu_use_fusion_emitters=false",
    "--xla_backend_optimization_level=0",
)


def _compile_fast():
    """Compile the suite's programs with XLA's older CPU emitters rather than its
    fusion emitters, as jaxem already compiles the programs it runs once
    (`jaxem.compiling`), and with LLVM's optimization level 0. The suite is almost
    all compile time: the emitters cut about a quarter of it, -O0 as well halves it
    (tests/test_acceleration.py and test_chain.py: 445 to 331 to 215 CPU s). -O0
    rounds differently (other instructions, other orders of operations); the tests
    that sat on a rounding edge were made robust to it (they pass with the defaults
    too). A flag already in ``XLA_FLAGS`` is left as it is. The flags must be in
    ``XLA_FLAGS`` before JAX starts its CPU backend, which no test has done yet here;
    the xdist workers and the subprocesses of the tests inherit them.
    ``JAXEM_TESTS_XLA_DEFAULTS=1`` runs the suite with XLA's defaults instead (what
    a user's programs are compiled with)."""
    if os.environ.get("JAXEM_TESTS_XLA_DEFAULTS") == "1":
        return
    flags = os.environ.get("XLA_FLAGS", "").split()
    names = {f.split("=")[0] for f in flags}
    flags += [f for f in _FAST_XLA_FLAGS if f.split("=")[0] not in names]
    os.environ["XLA_FLAGS"] = " ".join(flags)


def pytest_configure(config):
    """Share compiled XLA programs across the tests of one session.

    Most tests build a new fitter (a new ``jax.jit`` of a new bound method) for a model
    another test already compiled, and jit's in-memory cache is keyed on the function,
    so the same program would be compiled again and again; the persistent cache is
    keyed on the program itself. The directory is new for every session (removed at
    its end), so a run never depends on what an earlier one left behind, and CI's
    cold run measures the same thing as a local one. A user's own
    ``JAX_COMPILATION_CACHE_DIR`` is left alone.
    """
    global _created_cache_dir
    _compile_fast()
    if not os.environ.get(_CACHE_ENV):
        _created_cache_dir = tempfile.mkdtemp(prefix="jaxem-tests-xla-")
        os.environ[_CACHE_ENV] = _created_cache_dir
    jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_ENV])
    # Cache every program: the suite's programs are many and each compiles in well
    # under jax's default threshold of one second.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_unconfigure(config):
    if _created_cache_dir is not None and not os.environ.get("PYTEST_XDIST_WORKER"):
        shutil.rmtree(_created_cache_dir, ignore_errors=True)


def data_path(name):
    """Path of a real dataset shipped with the repository (``data/<name>``)."""
    return DATA_DIR / name


def load_csv(name, columns=None):
    """Numeric columns of ``data/<name>`` as a float64 array of shape (rows, columns)."""
    table = np.genfromtxt(data_path(name), delimiter=",", names=True, dtype=None, encoding="utf-8")
    columns = table.dtype.names if columns is None else columns
    return np.stack([np.asarray(table[c], dtype=np.float64) for c in columns], axis=-1)


def _enable_x64(enabled):
    # jax >= 0.4.36 exposes the config state as a context manager; older versions only
    # have the experimental helper.
    if callable(getattr(jax, "enable_x64", None)):
        return jax.enable_x64(enabled)
    from jax.experimental import disable_x64, enable_x64

    return enable_x64() if enabled else disable_x64()


@pytest.fixture
def x64():
    """Run the test with float64 enabled; restores the previous setting afterwards.

    Create arrays inside the test (after the fixture is active) so they are float64.
    """
    with _enable_x64(True):
        yield


@pytest.fixture
def x32():
    """Run the test with jax's default float32 (even if x64 was enabled globally)."""
    with _enable_x64(False):
        yield


@pytest.fixture(name="data_path")
def data_path_fixture():
    """The :func:`data_path` helper, as a fixture (no import of conftest needed)."""
    return data_path


@pytest.fixture(name="load_csv")
def load_csv_fixture():
    """The :func:`load_csv` helper, as a fixture."""
    return load_csv


@pytest.fixture
def rng():
    """A seeded numpy generator, fresh for every test."""
    return np.random.default_rng(20240611)


@pytest.fixture(autouse=True, scope="module")
def _fresh_compilation_caches():
    """Drop the compiled programs of each test module once it is done: a worker that
    keeps every executable of the suite has crashed inside XLA's CPU compiler
    ("Failed to materialize symbols") late in a run."""
    yield
    jax.clear_caches()
