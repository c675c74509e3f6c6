"""What ``pyproject.toml`` promises (issue 15, part 1): the ``examples`` extra installs
everything the example scripts import (hmmlearn was missing, so the quickstart's install
line did not run ``hmm_casino.py``), and the pinned test environment (``constraints.txt``)
lies inside the declared version ranges, with an upper bound on NumPyro, whose internals
jaxem uses. Read from the files and the installed packages' metadata; no network."""

import ast
import importlib.metadata
import pathlib
import sys

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# tomllib is in the standard library from Python 3.11 (the pinned environment's).
tomllib = pytest.importorskip("tomllib")

REPO = pathlib.Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _requirements(extra=None):
    listed = PROJECT["dependencies"] + (PROJECT["optional-dependencies"][extra] if extra else [])
    return [Requirement(r) for r in listed]


def _closure(requirements):
    """The canonical names of the distributions installing ``requirements`` brings in
    (their dependencies without extras, read from the installed metadata)."""
    seen, todo = set(), [r.name for r in requirements]
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for line in requires:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return seen


def _imported_modules(path):
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"jaxem"}


def test_the_examples_extra_installs_every_import_of_the_examples():
    installed = _closure(_requirements("examples"))
    providers = importlib.metadata.packages_distributions()
    missing = {}
    for script in sorted((REPO / "examples").glob("*.py")):
        for module in sorted(_imported_modules(script)):
            names = {canonicalize_name(n) for n in providers.get(module, [module])}
            if not names & installed:
                missing.setdefault(script.name, []).append(module)
    assert not missing, f"not installed by pip install -e '.[examples]': {missing}"


def _pins():
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def test_the_pinned_versions_lie_in_the_declared_ranges():
    pins = _pins()
    outside = []
    extras = [None, *PROJECT["optional-dependencies"]]
    listed = {str(r): r for extra in extras for r in _requirements(extra)}
    for requirement in listed.values():
        pinned = pins.get(canonicalize_name(requirement.name))
        assert pinned is not None, f"{requirement.name} is not pinned in constraints.txt"
        if not requirement.specifier.contains(pinned, prereleases=True):
            outside.append(f"{requirement} (pinned {pinned})")
    assert not outside, outside
    (numpyro,) = [r for r in _requirements() if r.name == "numpyro"]
    assert any(s.operator in ("<", "<=", "~=", "==") for s in numpyro.specifier), (
        "numpyro needs an upper bound: jaxem uses its internals (jaxem.numpyro_internals)"
    )
