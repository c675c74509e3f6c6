"""Smoke test: every example script runs to completion, in the default run (CI's).

Each script runs as a subprocess from a temporary working directory (plots are
written there) with ``JAXEM_EXAMPLE_QUICK=1``, which cuts restarts and iterations so
the whole file stays fast. The scripts assert their own key numbers (the two-coin
result of Do & Batzoglou, poLCA's carcinoma log-likelihood, scikit-learn's K-means
centers, ...), so a wrong fit fails here too. They are marked ``examples``, so
``pytest -m examples`` runs them alone.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
SCRIPTS = sorted(p.name for p in EXAMPLES.glob("*.py"))


def test_every_example_is_listed_in_readme():
    readme = (EXAMPLES / "README.md").read_text()
    assert [name for name in SCRIPTS if name not in readme] == []


def test_the_default_run_runs_every_example():
    """CI runs the README's plain ``pytest -q``: its selection (pyproject's addopts) must
    keep every example (issue 20: a broken example went unnoticed while they were left out)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    completed = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-n", "0"]
        + ["-p", "no:cacheprovider", "tests/test_examples.py"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    collected = re.findall(r"::test_example_runs\[([\w.]+)\]", completed.stdout)
    assert sorted(collected) == SCRIPTS, completed.stdout


@pytest.mark.examples
@pytest.mark.parametrize("script", SCRIPTS)
def test_example_runs(script, tmp_path):
    # The repository root goes on the path so the examples import this checkout of jaxem
    # even when it is not installed.
    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, MPLBACKEND="Agg", JAXEM_EXAMPLE_QUICK="1", PYTHONPATH=python_path)
    completed = subprocess.run(
        [sys.executable, str(EXAMPLES / script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    lines = completed.stdout.splitlines()
    for plot in [line.split()[-1] for line in lines if line.startswith("saved ")]:
        assert (tmp_path / plot).stat().st_size > 0, plot
