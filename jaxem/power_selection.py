"""Closed forms for a Normal's variance or precision: a scale that is a power of a selection.

A model that holds a Normal's variance or precision, not its scale, spells the
scale as a power of it: ``Normal(mu[z], jnp.sqrt(var[z]))`` or
``Normal(mu[z], 1 / jnp.sqrt(tau[z]))`` (``tau ** -0.5``, ``lax.rsqrt(tau)``).
The map from the param to the scale is then no selection (`jaxem.selection`),
but ``scale = sel(theta) ** p`` with ``p = 1/2`` (a variance) or ``p = -1/2`` (a
precision), and Q is maximized in closed form all the same: the variance is
``S / n`` (``S = sum w (x - m)^2``, ``n = sum w``), the precision ``n / S``.

Detection has two parts:

* structure: a second labeling of the model's jaxpr (`dependencies` with
  `power_rule`) follows a param's selection through the elementwise ops
  ``sqrt``, ``rsqrt``, ``pow``, ``integer_pow``, ``div`` and ``mul`` whose other
  operand is a scalar constant (a literal, or an array that depends on neither a
  param nor the data). Each such op maps ``c x^q`` to ``c' x^q'``, so the
  argument is ``k * sel(theta) ** q`` with the same ``k`` and ``q`` in every cell
  (an op that mixes two values derived from params, or a chained value with
  another one, ends the chain);
* values: the argument, evaluated with every entry of the param at ``c`` for
  three values of ``c``, is ``c ** p`` to rounding, and its derivative in ``c``
  is ``p c ** (p - 1)``: so ``k = 1`` and ``q = p``.

The statistics are pulled back to the param's entries by the VJP of the
argument at ``theta = 1``, where ``d scale / d theta`` is exactly ``p`` in every
cell: that VJP is ``p`` times the selection's, and the statistics are divided by
``p`` first (`linearization_point`).

Under MAP-EM an InverseGamma(a, b) prior on the variance and a Gamma(a, b)
prior on the precision are conjugate. With Q's part ``-(n/2) log v - S / (2v)``
the log posterior is ``-(n/2 + a + 1) log v - (S/2 + b) / v``, whose mode is
``v = (S + 2b) / (n + 2a + 2)``; for the precision it is
``(n/2 + a - 1) log t - (S/2 + b) t``, mode ``t = (n + 2a - 2) / (S + 2b)``, which
exists for every weight ``n >= 0`` only when ``a > 1`` (for ``a <= 1`` an
entry with ``n <= 2 - 2a`` has its supremum at ``t -> 0``). So a Gamma prior takes
the closed form when its concentration is a constant above 1, gradient steps on
Q + log prior otherwise.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax.extend import core as jex_core
from jax.interpreters import partial_eval as pe
from numpyro.distributions import constraints

from jaxem.closed_form import ClosedFormUpdate
from jaxem.compiling import compile_once
from jaxem.gaussian_stats import normal_scale_stats
from jaxem.numpyro_internals import RealConstraint, base_constraint
from jaxem.selection import dependencies, probe_selection

__all__ = [
    "PowerSelections",
    "is_power_update",
    "linearization_point",
    "power_description",
    "power_rule",
    "prior_arguments",
    "update_power",
]

DATA = "<data>"  # the label of the data arrays: a chain's constants must not depend on them
_CHAIN = "power"  # a param name ``n`` followed through a chain is labeled ``(n, _CHAIN)``
_ELEMENTWISE = {"sqrt", "rsqrt", "pow", "integer_pow", "div", "mul"}
# Selections that put several operands into one output: a chained value may meet
# only constants there (a cell of a constant receives no statistics).
_MERGING = {"concatenate", "select_n", "stack", "pad"}
_PROBE_POINTS = (0.3, 1.7, 5.0)


def _is_param_key(key) -> bool:
    return key != DATA


def _scalar_constant(var, labels) -> bool:
    """A scalar operand that depends on neither a param nor the data: a literal
    (``0.1 * lam``) or a constant array (``jnp.asarray(0.1) * lam``)."""
    if isinstance(var, jex_core.Literal):
        return np.ndim(var.val) == 0
    return not labels and tuple(getattr(var.aval, "shape", (None,))) == ()


def power_rule(eqn, inputs):
    """The rule (`jaxem.selection.dependencies`) that follows a selection of a
    param through elementwise powers with scalar constants."""
    name = eqn.primitive.name
    labeled = [i for i, labels in enumerate(inputs) if labels]
    if name in _ELEMENTWISE:
        if len(labeled) != 1 or (name == "pow" and labeled[0] != 0):
            return None
        (position,) = labeled
        others = [(v, inputs[i]) for i, v in enumerate(eqn.invars) if i != position]
        if not all(_scalar_constant(v, labels) for v, labels in others):
            return None
        labels = inputs[position]
        params = {k: v for k, v in labels.items() if _is_param_key(k)}
        if not params or not all(v is True for v in params.values()):
            return None
        out = {(k if isinstance(k, tuple) else (k, _CHAIN)): True for k in params}
        if DATA in labels:
            out[DATA] = False  # data reached the selection as an index
        return [out] * len(eqn.outvars)
    if name in _MERGING and len(labeled) > 1:
        chained = any(isinstance(k, tuple) for i in labeled for k in inputs[i])
        if chained:
            merged = {k: False for i in labeled for k in inputs[i]}
            return [merged] * len(eqn.outvars)
    return None


def prior_arguments(prior) -> dict:
    """The arguments of a global site's prior that decide whether its closed form
    exists: a Gamma's concentration."""
    if type(prior) is dist.Gamma:
        return {"concentration": jnp.asarray(prior.concentration)}
    return {}


class _PowerUpdate(NamedTuple):
    power: float
    prior_cls: type
    prior_offset: float  # pseudo-count: the prior adds 2a + offset to n
    update: ClosedFormUpdate


def _positive(constraint) -> bool:
    c = base_constraint(constraint)
    return isinstance(c, RealConstraint) or (
        isinstance(c, constraints.greater_than) and float(c.lower_bound) == 0.0
    )


def _divided_stats(base, power):
    def stats(cells, target):
        return tuple(s / power for s in base(cells, target))

    return stats


def _safe_variance(sq, n, reg_covar):
    return sq / jnp.where(n > 0, n, 1) + reg_covar


def _solve_variance(stats, old, reg_covar):
    """``S / n + reg_covar``; ``old`` where nothing weighs."""
    sq, n = stats
    return jnp.where(n > 0, _safe_variance(sq, n, reg_covar), old)


def _solve_precision(stats, old, reg_covar):
    """``1 / (S / n + reg_covar)``; ``old`` where nothing weighs."""
    sq, n = stats
    return jnp.where(n > 0, 1.0 / _safe_variance(sq, n, reg_covar), old)


def _make(power, solve, variance_fn, transform):
    return ClosedFormUpdate(
        _divided_stats(normal_scale_stats(transform), power),
        solve,
        stage=2,
        domain=_positive,
        variance_fn=variance_fn,
    )


_UPDATES = {}
for _cls, _transform in ((dist.Normal, lambda x: x), (dist.LogNormal, jnp.log)):
    _UPDATES[(_cls, 0.5)] = _PowerUpdate(
        0.5,
        dist.InverseGamma,
        2.0,
        _make(0.5, _solve_variance, lambda v: v[..., None], _transform),
    )
    _UPDATES[(_cls, -0.5)] = _PowerUpdate(
        -0.5,
        dist.Gamma,
        -2.0,
        _make(-0.5, _solve_precision, lambda t: 1.0 / t[..., None], _transform),
    )
_BY_UPDATE = {id(u.update): u for u in _UPDATES.values()}


def is_power_update(update) -> bool:
    """Whether a closed-form update is a variance or precision update of this module."""
    return id(update) in _BY_UPDATE


def update_power(update) -> float:
    """The power ``p`` of a variance (1/2) or precision (-1/2) update: the
    distribution argument is ``sel(param) ** p``."""
    return _BY_UPDATE[id(update)].power


def power_description(update) -> str:
    """How the param reaches the scale, for ``m_step_paths``."""
    if _BY_UPDATE[id(update)].power > 0:
        return "scale = sqrt(param): a variance"
    return "scale = 1 / sqrt(param): a precision"


def linearization_point(update, value):
    """Where the selection map's VJP is taken for a param with ``update``: at 1 for a
    power (d scale / d param is the power, exactly, there), at ``value`` otherwise."""
    if is_power_update(update):
        return jnp.ones_like(value)
    return value


def _pseudo_statistics(offset):
    def pseudo(stats, prior):
        sq, n = stats
        a = jnp.broadcast_to(jnp.asarray(prior.concentration, jnp.result_type(n)), jnp.shape(n))
        b = jnp.broadcast_to(jnp.asarray(prior.rate, jnp.result_type(sq)), jnp.shape(sq))
        return sq + 2 * b, n + 2 * a + offset

    return pseudo


_PSEUDO = {2.0: _pseudo_statistics(2.0), -2.0: _pseudo_statistics(-2.0)}


class PowerSelections:
    """Which params reach a Normal's scale as a verified power of a selection.

    Built per M-step plan from the jaxpr of ``(params, data) -> outputs`` and the
    outputs' ``keys`` (`jaxem.mstep.plan_m_step`); labels and probes are computed
    on first use only.

    Args:
        closed: the closed jaxpr.
        keys: one key per output, ``(kind, site, detail)``.
        param_names: the params, the jaxpr's first inputs, in order.
        params: their values (shapes and dtypes are used).
        arrays: the data arrays, the jaxpr's other inputs (shapes and dtypes).
    """

    def __init__(self, closed, keys, param_names, params, arrays):
        self.closed, self.keys = closed, keys
        self.param_names, self.params, self.arrays = list(param_names), params, arrays
        self._labels = None

    def _output_labels(self):
        if self._labels is None:
            inputs = [{n: True} for n in self.param_names] + [{DATA: True}] * len(self.arrays)
            self._labels = dependencies(self.closed, inputs, rule=power_rule)
        return self._labels

    def _zero_inputs(self):
        inputs = [
            np.zeros(jnp.shape(self.params[n]), jnp.result_type(self.params[n]))
            for n in self.param_names
        ]
        return inputs + [np.zeros(jnp.shape(a), jnp.result_type(a)) for a in self.arrays]

    def update(self, output_index, name, cls):
        """The closed-form update of param ``name`` reaching ``cls``'s ``scale`` at
        output ``output_index``, or None when it is not a verified power."""
        if (cls, 0.5) not in _UPDATES:
            return None
        labels = self._output_labels()[output_index]
        chained = {k: v for k, v in labels.items() if _is_param_key(k)}
        if chained != {(name, _CHAIN): True}:
            return None
        power = self._probe_power(output_index, name)
        return None if power is None else _UPDATES[(cls, power)].update

    def _probe(self, output_index, name):
        """``(c, values, slopes)``: the output and its derivative in ``c`` with every
        entry of the param at ``c`` (for each probe point), the other inputs at 0;
        None where the jaxpr closes over traced values or the output is empty."""
        closed = self.closed
        if any(isinstance(c, jax.core.Tracer) for c in closed.consts):
            return None
        used = [i == output_index for i in range(len(closed.jaxpr.outvars))]
        jaxpr, used_inputs = pe.dce_jaxpr(closed.jaxpr, used, instantiate=True)
        fun = jex_core.jaxpr_as_fun(jex_core.ClosedJaxpr(jaxpr, closed.consts))
        position = self.param_names.index(name)
        inputs = self._zero_inputs()
        value = self.params[name]
        shape, dtype = jnp.shape(value), jnp.result_type(value)

        def argument(c):
            args = [
                jnp.full(shape, c, dtype) if i == position else x
                for i, x in enumerate(inputs)
                if used_inputs[i]
            ]
            return fun(*args)[0]

        def value_and_slope(c):
            return jax.jvp(argument, (c,), (jnp.ones((), dtype),))

        points = np.asarray(_PROBE_POINTS, dtype)
        # One compiled program for all points (op by op, each op would compile).
        lowered = jax.jit(jax.vmap(value_and_slope)).lower(points)
        values, slopes = (np.asarray(v, np.float64) for v in compile_once(lowered)(points))
        if values[0].size == 0:
            return None
        c = points.astype(np.float64).reshape((-1,) + (1,) * (values.ndim - 1))
        return c, values, slopes, 64 * float(jnp.finfo(dtype).eps)

    def _probe_power(self, output_index, name):
        """The power p in {1/2, -1/2} with argument = c ** p and d argument / dc =
        p c ** (p - 1) in every cell, every entry of the param at c; None if none."""
        found = self.scaled_power(output_index, name)
        if found is None or not np.allclose(found[1], 1.0, rtol=found[2], atol=0):
            return None
        return found[0]

    def scaled_power(self, output_index, name, powers=(0.5, -0.5)):
        """``(p, k, tolerance)`` with the output ``k * sel(param) ** p``, p in
        ``powers`` and ``k`` a positive array shaped like the output, verified as
        the chain's structure and ``k c ** p`` (and its slope) at every probe point
        ``c``; None if the output is not such a power of ``name`` alone.

        `jaxem.vbem`'s Normal-Gamma pair reads a prior scale ``1 / sqrt(beta0 tau)``
        with it (``k = beta0 ** -0.5``), `jaxem.scaled_selection` a Normal-Wishart
        prior's ``precision_matrix = beta0 * lam`` (``p = 1``).
        """
        labels = self._output_labels()[output_index]
        chained = {k: v for k, v in labels.items() if _is_param_key(k)}
        if chained != {(name, _CHAIN): True}:
            return None
        probed = self._probe(output_index, name)
        if probed is None:
            return None
        c, values, slopes, tolerance = probed
        for power in powers:
            k = values[0] / c[0] ** power
            if (
                np.all(k > 0)
                and np.allclose(values, k * c**power, rtol=tolerance, atol=0)
                and np.allclose(slopes, power * k * c ** (power - 1), rtol=tolerance, atol=0)
            ):
                return power, k, tolerance
        return None

    def constant(self, output_index):
        """An output's value when it depends on neither a param nor the data (a
        prior's constant argument), else None."""
        if self._output_labels()[output_index]:
            return None
        outs = probe_selection(self.closed, self._zero_inputs(), [output_index])
        return None if outs is None else outs[0]

    def conjugate(self, update, prior_cls, prior_site):
        """``(pseudo-statistics function, None)`` of a global site's prior on a
        variance or precision param with ``update``, or ``(None, why not)``."""
        found = _BY_UPDATE[id(update)]
        if prior_cls is not found.prior_cls:
            return None, "is not conjugate to it (InverseGamma on a variance, Gamma on a precision)"
        if found.prior_offset < 0:
            index = next(
                (
                    i
                    for i, k in enumerate(self.keys)
                    if k == ("prior_arg", prior_site, "concentration")
                ),
                None,
            )
            concentration = None if index is None else self.constant(index)
            if concentration is None:
                return None, (
                    "has a concentration that is not a constant, and the precision's mode "
                    "exists for every component only when it is above 1"
                )
            if not np.all(concentration > 1):
                return None, (
                    f"has concentration {np.min(concentration):g} <= 1: the precision's "
                    "posterior mode (n + 2a - 2) / (S + 2b) does not exist for a component "
                    "with weight n <= 2 - 2a"
                )
        return _PSEUDO[found.prior_offset], None
