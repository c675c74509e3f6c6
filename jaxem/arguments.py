"""A model's arguments: arrays are traced, everything else is static.

``run``, ``log_likelihood`` and every other entry point split the model's
``(args, kwargs)`` into traced array leaves and a hashable static spec
(`split_args`), so that a new dataset of the same shape does not
recompile, and merge them back inside the compiled function
(`merge_args`). Initial values given by the user (``init_params``) are
checked and merged into the model's own here too.
"""

from __future__ import annotations

import difflib
import inspect
import sys
from collections.abc import Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxem.exceptions import ModelError

__all__ = [
    "check_model_call",
    "check_init_params",
    "is_array",
    "merge_args",
    "merge_init_params",
    "split_args",
]


class _StaticLeaves(NamedTuple):
    """Hashable description of the non-array leaves of (args, kwargs)."""

    treedef: Any
    is_array: tuple[bool, ...]
    static_values: tuple[Hashable, ...]


def is_array(x) -> bool:
    """Whether a model argument is an array (traced) rather than a static value."""
    return isinstance(x, (jax.Array, np.ndarray, np.generic)) or hasattr(x, "__jax_array__")


def split_args(args: tuple, kwargs: dict):
    """Split model arguments into traced array leaves and a hashable static spec.

    Arrays are traced (a new dataset of the same shape does not recompile);
    everything else (ints such as a number of components, strings, callables,
    the numbers of a Python list) is static, as NumPyro users expect.
    """
    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
    flags = tuple(is_array(leaf) for leaf in leaves)
    arrays = [leaf for leaf, a in zip(leaves, flags) if a]
    static = tuple(leaf for leaf, a in zip(leaves, flags) if not a)
    try:
        hash(static)
    except TypeError as err:
        raise ModelError(
            "jaxem: a non-array model argument is not hashable, so it cannot be treated as "
            f"static ({err}). Pass data as arrays (jnp.asarray) and static options as ints, "
            "floats, strings or tuples."
        ) from None
    return arrays, _StaticLeaves(treedef, flags, static)


def check_model_call(model, args: tuple, kwargs: dict) -> None:
    """A `TypeError` in jaxem's words when the model cannot take ``args`` and
    ``kwargs``: every keyword a fitter's ``run`` does not know is passed on to the
    model, so a misspelt option (or an option of another fitter, such as
    ``num_restarts`` given to a fitter without restarts) would otherwise fail deep
    inside the model. Models whose signature cannot be read are left alone."""
    try:
        signature = inspect.signature(model)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(*args, **kwargs)
    except TypeError as err:
        unknown = [k for k in kwargs if k not in signature.parameters]
        takes_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
        name = getattr(model, "__name__", "the model")
        if unknown and not takes_any:
            raise TypeError(_unknown_keyword_message(name, signature, unknown)) from None
        raise TypeError(
            f"jaxem: the model's arguments do not match its signature {name}{signature}: {err}"
        ) from None


# The public methods of the fitters that pass the keywords they do not know on to the model.
_FORWARDING = ("run", "init", "update", "standard_errors", "m_step_paths")
# Their parameters that are not options.
_NOT_OPTIONS = ("self", "rng_key", "state", "result", "args", "kwargs")


def _forwarding_method():
    """``(class name, method name, its own keywords)`` of the outermost jaxem fitter
    method on the call stack that passes keywords on to the model, or None (the
    error path only: the stack tells which method the user called)."""
    found, frame = None, inspect.currentframe()
    while frame is not None:
        owner, name = frame.f_locals.get("self"), frame.f_code.co_name
        method = getattr(type(owner), name, None) if name in _FORWARDING else None
        public = getattr(sys.modules.get("jaxem"), type(owner).__name__, None)
        if method is not None and public is type(owner):
            own = [p for p in inspect.signature(method).parameters if p not in _NOT_OPTIONS]
            found = (type(owner).__name__, name, own)
        frame = frame.f_back
    return found


def _unknown_keyword_message(name, signature, unknown) -> str:
    words = ", ".join(map(repr, unknown))
    takes = f"(its arguments: {', '.join(signature.parameters) or 'none'})"
    method = _forwarding_method()
    if method is None:
        return (
            f"jaxem: {name}() takes no argument {words} {takes}. A keyword that the fitter's "
            "method does not know is passed on to the model: check the spelling of the "
            "method's options (help(<fitter>.run))."
        )
    owner, called, own = method
    close = {
        k: difflib.get_close_matches(k, own, n=1)
        or [o for o in own if k.startswith(o) or o.startswith(k)][:1]
        for k in unknown
    }
    hint = "".join(f" (did you mean {m[0]}= for {k}=?)" for k, m in close.items() if m)
    return (
        f"jaxem: {owner}.{called}() passed keyword {words} to the model, which does not "
        f"take it: {name}() takes no argument {words} {takes}. {called}'s own keywords are "
        f"{', '.join(own)}{hint}. Every keyword a fitter's method does not know is passed "
        "on to the model; an option of another fitter (e.g. num_restarts, which EM.run "
        f"has) is not one of {owner}.{called}'s."
    )


def merge_args(arrays, spec: _StaticLeaves):
    """Inverse of `split_args`."""
    arrays = iter(arrays)
    static = iter(spec.static_values)
    leaves = [next(arrays) if a else next(static) for a in spec.is_array]
    return jax.tree_util.tree_unflatten(spec.treedef, leaves)


def check_init_params(init_params: dict | None) -> None:
    """A named error for ``init_params`` entries that are callables, not values."""
    for name, value in (init_params or {}).items():
        if callable(value):
            raise ModelError(
                f"jaxem: init_params['{name}'] is a callable ({value!r}); init_params takes "
                "values. A callable initial value (such as jaxem.init.kmeans_plusplus(x, K)) "
                f"goes in the model, numpyro.param('{name}', init_fn), where run calls it "
                "with each restart's key; or pass init_fn(jax.random.PRNGKey(0)) here."
            )


def merge_init_params(params: dict, init_params: dict | None) -> dict:
    """``params`` with the entries of ``init_params`` (checked names and shapes), each
    cast to the dtype of the model's param (a float dtype: integer initial values are
    cast when the model is inspected)."""
    if not init_params:
        return params
    unknown = set(init_params) - set(params)
    if unknown:
        raise ModelError(
            f"jaxem: init_params names {sorted(unknown)} that are not params of the model "
            f"(params: {list(params)})."
        )
    merged = dict(params)
    for name, value in init_params.items():
        value = jnp.asarray(value, dtype=jnp.result_type(params[name]))
        if jnp.shape(value) != jnp.shape(params[name]):
            raise ModelError(
                f"jaxem: init_params['{name}'] has shape {jnp.shape(value)} but the model's "
                f"param '{name}' has shape {jnp.shape(params[name])}."
            )
        merged[name] = value
    return merged
