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
