"""Shared fixtures and small helpers for the jaxem test-suite."""

from pathlib import Path

import jax
import numpy as np
import pytest

DATA_DIR = Path(__file__).parents[1] / "data"


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
