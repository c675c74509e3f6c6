"""Parameters whose declared constraint is wider than the support of the
distribution argument they feed.

A parameter that reaches an argument by selection alone (indexing,
broadcasting: its entries are the argument's values) must be declared inside
the argument's support: EM's updates keep a parameter inside its own
constraint, not inside the argument's, so a ``real`` parameter used as
Categorical probabilities leaves the simplex and the fit reports a
log-likelihood above any possible value.

A parameter that reaches an argument through a function (``jnp.abs(p)``,
``a * b``, ``w * c``) cannot be judged from the constraints; its values are
checked instead (`argument_support`): on the initial values before a
fit, and on the fitted values after it, where an argument that left its
support marks the fit as diverged.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from numpyro.distributions import constraints

from jaxem.exceptions import ModelError
from jaxem.missing import MissingData
from jaxem.numpyro_internals import (
    DependentConstraint,
    RealConstraint,
    SimplexConstraint,
    base_constraint,
    distribution_mask,
    user_site_name,
)
from jaxem.selection import dependencies

__all__ = [
    "argument_support",
    "arguments_in_support",
    "constraint_wider_than_support",
    "core_and_mask",
    "constraint_spelling",
    "params_of_argument",
    "raise_for_arguments",
]


def _is_real(constraint) -> bool:
    return isinstance(base_constraint(constraint), RealConstraint)


def _upper_bounded(constraint) -> bool:
    base = base_constraint(constraint)
    return isinstance(base, (SimplexConstraint, constraints.interval, constraints.less_than))


def constraint_wider_than_support(param_constraint, arg_constraint) -> bool:
    """Whether values satisfying ``param_constraint`` can lie outside
    ``arg_constraint`` (only the cases that can be decided from the constraints:
    an unconstrained param feeding a constrained argument, a param bounded below
    only feeding an argument bounded above). Undecided pairs give False."""
    if arg_constraint is None or _is_real(arg_constraint):
        return False
    if isinstance(base_constraint(arg_constraint), DependentConstraint):
        return False
    if _is_real(param_constraint):
        return True
    param_base = base_constraint(param_constraint)
    return isinstance(param_base, constraints.greater_than) and _upper_bounded(arg_constraint)


def constraint_spelling(constraint) -> str:
    """How a user writes ``constraint``, e.g. ``constraints.simplex``."""
    for name in (
        "simplex",
        "positive",
        "nonnegative",
        "unit_interval",
        "positive_definite",
        "lower_cholesky",
        "corr_cholesky",
        "corr_matrix",
        "ordered_vector",
        "positive_ordered_vector",
        "softplus_positive",
        "softplus_lower_cholesky",
        "scaled_unit_lower_cholesky",
    ):
        if constraint is getattr(constraints, name, None):
            return f"constraints.{name}"
    base = base_constraint(constraint)
    if base is not constraint:
        return constraint_spelling(base)
    if isinstance(base, constraints.interval):
        return f"constraints.interval({base.lower_bound}, {base.upper_bound})"
    if isinstance(base, constraints.greater_than):
        return f"constraints.greater_than({base.lower_bound})"
    return repr(constraint)


# ---------------------------------------------------------------------------
# Argument values.
# ---------------------------------------------------------------------------


def core_and_mask(fn):
    """The distribution under missing entries, plate expansion, masks and ``to_event``,
    and where it counts: a boolean array aligned to its batch shape, or None."""
    masks, reinterpreted = [], 0
    while isinstance(
        fn, (MissingData, dist.ExpandedDistribution, dist.MaskedDistribution, dist.Independent)
    ):
        if isinstance(fn, dist.Independent):
            reinterpreted += fn.reinterpreted_batch_ndims
        elif isinstance(fn, dist.MaskedDistribution):
            masks.append((distribution_mask(fn), reinterpreted))
        fn = fn.base_dist
    mask = None
    for m, depth in masks:
        if m is None or m is True:
            continue
        m = jnp.asarray(m, bool)
        # A mask outside to_event lacks the dims that to_event made event dims.
        m = jnp.reshape(m, jnp.shape(m) + (1,) * (reinterpreted - depth))
        mask = m if mask is None else mask & m
    return fn, mask


def _check(constraint, value):
    # A value on the lower boundary of a positive argument (a Poisson rate of 0) is the
    # limit of distributions in the support, with the limit's density: a degenerate
    # but correct model (a zero-inflated component written Poisson(rate * (1 - s))).
    if isinstance(constraint, constraints.greater_than):
        return value >= constraint.lower_bound
    return constraint(value)


def argument_support(trace) -> dict:
    """Where the distribution arguments of an enumerated trace lie outside their
    support (NumPyro's ``arg_constraints``), over every enumerated value of the
    latents; cells masked out do not count. Jittable.

    Returns:
        ``{(site, argument): (number of cells outside the support, the argument's
        value in the first of them)}`` for every constrained argument.
    """
    found = {}
    for name, site in trace.sites.items():
        core, mask = core_and_mask(site.fn)
        if isinstance(core, dist.Unit):
            continue
        for arg, value in core.get_args().items():
            constraint = core.arg_constraints.get(arg)
            if constraint is None or constraints.is_dependent(constraint):
                continue
            value = jnp.asarray(value)
            ok = jnp.asarray(_check(constraint, value), bool)
            event = jnp.shape(value)[jnp.ndim(value) - constraint.event_dim :]
            shapes = [jnp.shape(ok), tuple(core.batch_shape)]
            if mask is not None:
                shapes.append(jnp.shape(mask))
            batch = jnp.broadcast_shapes(*shapes)
            bad = ~jnp.broadcast_to(ok, batch)
            if mask is not None:
                bad = bad & jnp.broadcast_to(mask, batch)
            values = jnp.broadcast_to(value, batch + tuple(event)).reshape((-1, *event))
            first = jnp.argmax(jnp.reshape(bad, -1)) if bad.size else 0
            found[(name, arg)] = (jnp.sum(bad), values[first] if bad.size else value)
    return found


def arguments_in_support(trace) -> jax.Array:
    """Whether every constrained argument of an enumerated trace lies in its support
    (see `argument_support`)."""
    counts = [count for count, _ in argument_support(trace).values()]
    return jnp.all(jnp.stack(counts) == 0) if counts else jnp.array(True)


def params_of_argument(trace_fn: Callable, params: dict, site: str, arg: str) -> list:
    """The params an argument's value depends on, read from the jaxpr of
    ``params -> argument`` (``trace_fn(params)``: an enumerated trace)."""
    names = tuple(params)

    def argument(values):
        core, _ = core_and_mask(trace_fn(dict(zip(names, values))).sites[site].fn)
        return core.get_args()[arg]

    closed = jax.make_jaxpr(argument)([params[n] for n in names])
    (found,) = dependencies(closed, [{n: True} for n in names])
    return [n for n in names if n in found]


def raise_for_arguments(
    found: dict, when: str, params_of: Callable[[str, str], list], family_of: Callable
) -> None:
    """A `ModelError` for the first argument of `argument_support`
    (concrete values) outside its support.

    Args:
        found: `argument_support`'s output.
        when: which values these are: "initial", "given" or "fitted".
        params_of: ``(site, argument) -> names of the params it depends on``.
        family_of: ``site -> its distribution`` (core family), for the message.
    """
    for (site, arg), (count, example) in found.items():
        if not int(count):
            continue
        core = family_of(site)
        support = constraint_spelling(core.arg_constraints[arg])
        params = params_of(site, arg)
        source = f"computed from param(s) {params}" if params else "not computed from any param"
        cause = (
            "EM keeps each param inside its own constraint, not inside the argument's, so "
            "the fit moved the argument out of its support and its log-likelihood is "
            "meaningless (e.g. probabilities that no longer sum to 1 give a likelihood above "
            "any possible value)"
            if when == "fitted"
            else "the log-density there is not a probability density, so nothing fitted "
            "from it would mean anything"
        )
        family = type(core).__name__
        for suffix in ("Probs", "Logits"):  # dist.Categorical(probs) is CategoricalProbs
            family = family.removesuffix(suffix)
        example = np.array2string(np.asarray(example), precision=4, threshold=12)
        raise ModelError(
            f"jaxem: argument '{arg}' of {family} at site "
            f"'{user_site_name(site)}' lies outside its support ({support}) at the {when} "
            f"parameter values ({int(count)} of its entries, e.g. {example}); "
            f"it is {source}. {cause[0].upper()}{cause[1:]}. Write the argument so that it "
            "stays in its support whatever the params' values within their constraints (a "
            "param with constraints.simplex as probabilities, not a rescaled one; a positive "
            "param, or jnp.exp / jax.nn.softplus of a real one, as a scale), or give the "
            "params constraints that guarantee it."
        )
