"""The engine's layout rules, read from its source: no module uses another's private
names, and NumPyro's internals are named in one module only (jaxem.numpyro_internals)."""

import ast
import pathlib
import re

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "jaxem"
INTERNALS = "numpyro_internals.py"
# The site and dim names NumPyro makes up (jaxem.numpyro_internals names them), where
# they do not continue a word (``is_observed`` is a key of NumPyro's public messages).
NUMPYRO_NAMES = re.compile(r"(?<![A-Za-z0-9])_(PREV_|time|observed\b|unobserved\b)")


def _modules():
    return sorted(PACKAGE.glob("*.py"))


# Names a module binds to NumPyro's modules, and the private attribute of NumPyro's
# distributions that jaxem reads (numpyro_internals.distribution_mask).
NUMPYRO_MODULES = {"numpyro", "dist", "constraints", "handlers", "transforms"}
NUMPYRO_ATTRIBUTES = {"_mask"}


def _private_imports(path):
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and (
            node.attr in NUMPYRO_ATTRIBUTES
            or (
                node.attr.startswith("_")
                and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name)
                and node.value.id in NUMPYRO_MODULES
            )
        ):
            found.append(f"{path.name}:{node.lineno} .{node.attr}")
        if isinstance(node, ast.ImportFrom) and node.module:
            root = node.module.split(".")[0]
            private_module = any(part.startswith("_") for part in node.module.split("."))
            for alias in node.names:
                if root in ("jaxem", "numpyro") and (alias.name.startswith("_") or private_module):
                    found.append(f"{path.name}:{node.lineno} {node.module}.{alias.name}")
    return found


def _numpyro_name_literals(path):
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        f"{path.name}:{node.lineno} {node.value!r}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
        and NUMPYRO_NAMES.search(node.value)
    ]


@pytest.mark.parametrize("path", _modules(), ids=lambda p: p.name)
def test_no_module_uses_private_names_of_another(path):
    if path.name == INTERNALS:
        pytest.skip("the one module that imports NumPyro's private names")
    assert _private_imports(path) == []


@pytest.mark.parametrize("path", _modules(), ids=lambda p: p.name)
def test_numpyro_site_names_are_spelled_in_numpyro_internals_only(path):
    if path.name == INTERNALS:
        pytest.skip("the module that names them")
    assert _numpyro_name_literals(path) == []


def _switches_x64_on_import(tree) -> list[int]:
    """Lines of module-level statements (outside any function or class) that call
    ``jax.config.update("jax_enable_x64", ...)``."""
    found = []
    for statement in tree.body:
        if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        for node in ast.walk(statement):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "update"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and node.args[0].value == "jax_enable_x64"
            ):
                found.append(node.lineno)
    return found


TEST_MODULES = sorted((pathlib.Path(__file__).parent).glob("test_*.py"))


@pytest.mark.parametrize("path", TEST_MODULES, ids=lambda p: p.name)
def test_no_test_module_switches_float64_on_when_imported(path):
    """A test module that enables float64 when imported enables it for every test
    collected after it, in every xdist worker: float32 tests and doctests then run in
    float64 and fail, or pass for the wrong dtype. Use the ``x64`` fixture
    (``pytestmark = pytest.mark.usefixtures("x64")`` for a whole module)."""
    lines = _switches_x64_on_import(ast.parse(path.read_text()))
    assert not lines, f"{path.name} switches jax_enable_x64 at import, line(s) {lines}"
