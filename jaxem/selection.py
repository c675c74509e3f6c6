"""Which parameters reach which distribution arguments, and how.

A parameter admits a closed-form M-step when it reaches the arguments of
supported distributions only through *selection*: indexing by a latent,
broadcasting, reshaping, slicing, transposing, concatenating. Such a map is
linear with 0/1 coefficients, so its VJP sums per-cell sufficient statistics
into per-parameter-entry statistics, which covers mixtures, tied parameters
and transition matrices with one mechanism.

This module walks the jaxpr of ``params -> (log-probs, distribution
arguments)`` and labels every variable with the parameters it depends on and
whether the dependence is a pure selection.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.extend import core as jex_core
from jax.interpreters import partial_eval as pe

from jaxem.compiling import compile_once

__all__ = ["NONLINEAR", "SelectionProbe", "affine_degrees", "dependencies", "probe_selection"]

_ALL = None
# primitive name -> operand positions that carry selected values (None: all).
# A parameter reaching any other position (an index, a predicate) is not a selection.
_SELECTION_PRIMITIVES = {
    "broadcast_in_dim": (0,),
    "reshape": (0,),
    "squeeze": (0,),
    "expand_dims": (0,),
    "transpose": (0,),
    "rev": (0,),
    "slice": (0,),
    "dynamic_slice": (0,),
    "gather": (0,),
    "concatenate": _ALL,
    "pad": (0,),
    "split": (0,),
    "copy": (0,),
    "convert_element_type": (0,),
    "stack": _ALL,
    "device_put": _ALL,
    "optimization_barrier": _ALL,
}


def _merge(into: dict, labels: dict, selection: bool = True) -> None:
    for name, is_selection in labels.items():
        into[name] = into.get(name, True) and is_selection and selection


# Primitives that call a sub-jaxpr once with their own inputs; ``scan`` is
# followed by _propagate_scan (selection only from constants to stacked
# outputs); other loops and branches are opaque: a label crossing them is not a
# selection.
_CALL_PRIMITIVES = {
    "jit",
    "pjit",
    "closed_call",
    "core_call",
    "custom_jvp_call",
    "custom_vjp_call",
    "custom_vjp_call_jaxpr",
    "remat",
    "checkpoint",
}


def _sub_jaxpr(eqn):
    if eqn.primitive.name not in _CALL_PRIMITIVES:
        return None
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        sub = eqn.params.get(key)
        if sub is None:
            continue
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns") and len(sub.invars) == len(eqn.invars):
            return sub
    return None


def _propagate_scan(eqn, inputs, rule=None):
    """Labels through a ``lax.scan``. Its stacked outputs select the body's
    per-step outputs, so a parameter that enters the body as a constant and
    reaches a stacked output through selections only is selected (``A[z_prev]``
    inside a Markov chain's step). A value that passes through the carry is
    not a selection (each iteration composes the map anew); the carry's labels
    are iterated to a fixed point, which exists because labels only gain names.
    """
    body = eqn.params["jaxpr"].jaxpr
    num_consts, num_carry = eqn.params["num_consts"], eqn.params["num_carry"]
    consts, carry, xs = (
        inputs[:num_consts],
        inputs[num_consts : num_consts + num_carry],
        inputs[num_consts + num_carry :],
    )
    carry = [dict.fromkeys(labels, False) for labels in carry]
    while True:
        outputs = _propagate(body, consts + carry + xs, rule)
        new_carry = [
            {**before, **dict.fromkeys(after, False)}
            for before, after in zip(carry, outputs[:num_carry])
        ]
        if new_carry == carry:
            return carry + outputs[num_carry:]
        carry = new_carry


def _forward(jaxpr, inputs, empty, transfer):
    """Values carried forward through ``jaxpr``: ``inputs`` on its inputs, ``empty()``
    on literals and on values that depend on none of them; ``transfer(eqn, values)``
    gives an equation's outputs from its inputs' values, called only when one of
    them is not empty."""
    env = dict(zip(jaxpr.invars, inputs))

    def read(var):
        if isinstance(var, jex_core.Literal):
            return empty()
        return env.get(var, empty())

    for eqn in jaxpr.eqns:
        values = [read(v) for v in eqn.invars]
        if any(values):
            env.update(zip(eqn.outvars, transfer(eqn, values)))
    return [read(v) for v in jaxpr.outvars]


def _propagate(jaxpr, in_labels, rule=None):
    return _forward(jaxpr, in_labels, dict, functools.partial(_labels_out, rule=rule))


def _labels_out(eqn, inputs, rule=None):
    """The labels of an equation's outputs from its inputs' (see `dependencies`)."""
    sub = _sub_jaxpr(eqn)
    outputs = None if rule is None or sub is not None else rule(eqn, inputs)
    if outputs is not None:
        return outputs
    if sub is not None:
        return _propagate(sub, inputs, rule)
    if eqn.primitive.name == "scan":
        return _propagate_scan(eqn, inputs, rule)
    positions = _SELECTION_PRIMITIVES.get(eqn.primitive.name, ())
    if eqn.primitive.name == "convert_element_type" and not np.issubdtype(
        eqn.params["new_dtype"], np.floating
    ):
        positions = ()  # to an integer or bool: the VJP is zero, not a selection
    merged: dict = {}
    for pos, labels in enumerate(inputs):
        if labels:
            is_operand = positions is _ALL or pos in positions
            if eqn.primitive.name == "select_n":
                is_operand = pos > 0
            _merge(merged, labels, is_operand)
    return [merged] * len(eqn.outvars)


def dependencies(closed_jaxpr, input_labels, rule=None):
    """Label every output of a jaxpr with the inputs it depends on.

    Args:
        closed_jaxpr: the jaxpr of a function of flat inputs.
        input_labels: one ``{name: True}`` dict per input (``{}`` for inputs
            that are not parameters).
        rule: optional ``(eqn, input labels) -> output labels or None``, asked
            first for every equation with a labeled input (outside call
            primitives, which are followed into); None keeps the rules above.
            `jaxem.power_selection` uses it to follow elementwise powers.

    Returns:
        One dict per output: ``{param name: True if the output depends on the
        parameter only through selection operations, else False}``.
    """
    return _propagate(closed_jaxpr.jaxpr, list(input_labels), rule)


def probe_selection(closed_jaxpr, inputs, output_indices):
    """Evaluate some outputs of a jaxpr on concrete inputs (parameter entry ids).

    Used on selection maps: feeding ``arange(size)`` as the parameter tells
    which parameter entry lands in each cell of the distribution argument.
    Returns one numpy array per index in ``output_indices``, or None where the
    jaxpr closes over traced values.
    """
    used = [i in output_indices for i in range(len(closed_jaxpr.jaxpr.outvars))]
    jaxpr, used_inputs = pe.dce_jaxpr(closed_jaxpr.jaxpr, used, instantiate=True)
    consts = closed_jaxpr.consts
    if any(isinstance(c, jax.core.Tracer) for c in consts):
        return None
    args = [x for x, u in zip(inputs, used_inputs) if u]
    # Compiled as one program, outside any trace the caller is in (evaluated op
    # by op, every op would be compiled on its own).
    lowered = jax.jit(jex_core.jaxpr_as_fun(jex_core.ClosedJaxpr(jaxpr, consts))).lower(*args)
    outs = compile_once(lowered)(*args)
    kept = [i for i in range(len(used)) if used[i]]
    return [np.asarray(outs[kept.index(i)]) for i in output_indices]


class SelectionProbe:
    """`probe_selection` over one jaxpr for every param of a plan, compiled once: the
    program computes all of ``output_indices`` (the outputs any probe may read: the
    distribution arguments), each call feeds its own inputs (the same shapes) and reads
    some of them. One compilation instead of one per param probed."""

    def __init__(self, closed_jaxpr, output_indices):
        self.closed = closed_jaxpr
        self.indices = sorted(set(output_indices))
        self.compiled = None

    def __call__(self, inputs, output_indices):
        """Like ``probe_selection(closed_jaxpr, inputs, output_indices)``."""
        if any(isinstance(c, jax.core.Tracer) for c in self.closed.consts):
            return None
        if self.compiled is None:
            used = [i in self.indices for i in range(len(self.closed.jaxpr.outvars))]
            jaxpr, _ = pe.dce_jaxpr(self.closed.jaxpr, used, instantiate=True)
            function = jex_core.jaxpr_as_fun(jex_core.ClosedJaxpr(jaxpr, self.closed.consts))
            # Compiled outside any trace the caller is in (see probe_selection).
            self.compiled = compile_once(jax.jit(function).lower(*inputs))
        outs = self.compiled(*inputs)
        return [np.asarray(outs[self.indices.index(i)]) for i in output_indices]


# -- affine maps: the polynomial degree of each output in some inputs -----------------

NONLINEAR = 2  # any degree above 1: not affine
# Linear in every operand: the output's degree is the largest of the operands'.
_LINEAR_PRIMITIVES = {
    "add",
    "add_any",
    "sub",
    "neg",
    "reduce_sum",
    "cumsum",
    *(name for name, positions in _SELECTION_PRIMITIVES.items() if positions is _ALL),
}
# Linear in these operand positions; every other operand must not depend on the inputs.
_LINEAR_POSITIONS = {
    **{name: positions for name, positions in _SELECTION_PRIMITIVES.items() if positions},
    "select_n": None,  # every case; the predicate (position 0) is checked below
    "dynamic_update_slice": (0, 1),
    "scatter-add": (0, 2),
    "scatter_add": (0, 2),
    "pad": (0, 1),
}


def _degree_of(eqn, degrees):
    name = eqn.primitive.name
    if name in ("mul", "dot_general"):
        return min(sum(degrees), NONLINEAR)
    if name == "div":
        return degrees[0] if degrees[1] == 0 else NONLINEAR
    if name == "integer_pow":
        return degrees[0] if eqn.params["y"] == 1 else NONLINEAR
    if name == "convert_element_type" and not np.issubdtype(eqn.params["new_dtype"], np.floating):
        return NONLINEAR
    if name in _LINEAR_PRIMITIVES:
        return max(degrees)
    if name in _LINEAR_POSITIONS:
        positions = _LINEAR_POSITIONS[name]
        if name == "select_n":
            positions = range(1, len(degrees))
        if any(d for i, d in enumerate(degrees) if i not in positions):
            return NONLINEAR  # an index, a predicate, a padding width
        return max(degrees)
    return NONLINEAR


def _propagate_degrees(jaxpr, in_degrees):
    return _forward(jaxpr, in_degrees, int, _degrees_out)


def _degrees_out(eqn, degrees):
    sub = _sub_jaxpr(eqn)
    if sub is not None:
        return _propagate_degrees(sub, degrees)
    # Loops and branches (scan, while, cond) are not followed: not affine.
    return [_degree_of(eqn, degrees)] * len(eqn.outvars)


def affine_degrees(closed_jaxpr, in_degrees):
    """The degree of every output of a jaxpr as a polynomial in the inputs with
    degree 1 (the others held fixed): 0 (does not depend on them), 1 (affine in
    them) or `NONLINEAR`.

    Sums, negation, selections (indexing, broadcasting, reshaping, transposing,
    concatenating, gathering, ``select_n`` with a fixed predicate), sums over axes,
    products (``mul``, ``dot_general``) whose degrees add up to at most 1 and division
    by a fixed divisor keep the degree; anything else (another primitive, a loop, a
    branch, an index or predicate that depends on the inputs) is `NONLINEAR`, which
    may call an affine map nonlinear but never the reverse.

    Args:
        closed_jaxpr: the jaxpr of a function of flat inputs.
        in_degrees: one int per input, 1 for the inputs to analyze, 0 for the others.
    """
    return _propagate_degrees(closed_jaxpr.jaxpr, list(in_degrees))
