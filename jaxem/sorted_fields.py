"""NumPyro distributions flattened in an order that is the same in every process.

NumPyro flattens a distribution's array fields in the iteration order of a Python
set of their names (`Distribution.gather_pytree_data_fields`, numpyro 0.22), and a
set of strings iterates in an order that changes with each interpreter's hash seed.
A traced function that returns a flattened trace (the scan steps of a Markov chain,
`jaxem.scan`) then lists a Normal's ``loc`` and ``scale`` in one order in one process
and in the other order in the next: the same fit compiles to a different XLA program
each time a script runs, and JAX's persistent compilation cache
(``jax_compilation_cache_dir``) never finds the program it stored.

`with_sorted_fields` replaces each distribution in a pytree by a node that flattens
its fields in the order of their names; `with_distributions` puts the distributions
back. Between the two, flattening gives the same leaves in the same order in every
process.
"""

from __future__ import annotations

import jax
import numpyro.distributions as dist

__all__ = ["with_distributions", "with_sorted_fields"]


@jax.tree_util.register_pytree_node_class
class SortedFields:
    """A distribution as its class, its static data and ``{field name: value}``
    (flattened in the order of the names, as every dict is)."""

    def __init__(self, cls, aux, fields: dict):
        self.cls = cls
        self.aux = aux
        self.fields = fields

    def tree_flatten(self):
        return (self.fields,), (self.cls, self.aux)

    @classmethod
    def tree_unflatten(cls, static, children):
        return cls(*static, *children)


def _is_distribution(x) -> bool:
    return isinstance(x, dist.Distribution)


def with_sorted_fields(tree):
    """``tree`` with every NumPyro distribution in it (nested ones too) replaced by
    its `SortedFields`."""

    def convert(x):
        if not _is_distribution(x):
            return x
        data, aux = x.tree_flatten()
        names = type(x).gather_pytree_data_fields()
        if len(names) != len(data):  # a class that flattens otherwise: left as it is
            return x
        fields = {name: with_sorted_fields(value) for name, value in zip(names, data)}
        return SortedFields(type(x), aux, fields)

    return jax.tree.map(convert, tree, is_leaf=_is_distribution)


def with_distributions(tree):
    """The inverse of `with_sorted_fields`."""

    def convert(x):
        if not isinstance(x, SortedFields):
            return x
        names = x.cls.gather_pytree_data_fields()
        return x.cls.tree_unflatten(x.aux, tuple(with_distributions(x.fields[n]) for n in names))

    return jax.tree.map(convert, tree, is_leaf=lambda x: isinstance(x, SortedFields))
