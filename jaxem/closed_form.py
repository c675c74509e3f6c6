"""Closed-form M-steps: the registry of exponential-family updates.

For a distribution argument ``a`` reached from a parameter ``theta`` by a
selection map ``g`` (``a = g(theta)``, e.g. ``mu[z]``), the expected
complete-data log-likelihood is maximized in closed form from weighted
sufficient statistics. Each registered update says

* ``stats_fn(cells, target)``: the weighted statistics of the cells, summed
  over the cell dims along which the argument is broadcast (``target`` is the
  argument's batch shape aligned to the cells), e.g. ``sum_n w_kn x_n``;
* ``solve_fn(stats, old, reg_covar)``: the maximizer, from the statistics of
  each parameter entry (the VJP of ``g`` applied to the cell statistics).

Contracting over the broadcast dims before the VJP keeps memory at
O(data + parameters): a full-covariance mixture never builds an N x K x D x D
tensor. Arguments of one distribution are updated in stages (location before
scale), which is an ECM step: each stage maximizes Q given the others, so the
log-likelihood still never decreases.
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from numpyro.distributions import constraints

from jaxem.gaussian_stats import (
    mvn_loc_solve,
    mvn_loc_stats,
    mvn_scatter_stats,
    normal_loc_solve,
    normal_loc_stats,
    normal_scale_solve,
    normal_scale_stats,
    solve_covariance,
    solve_precision,
    solve_scale_tril,
)
from jaxem.numpyro_internals import (
    LowerCholeskyConstraint,
    PositiveDefiniteConstraint,
    RealConstraint,
    SimplexConstraint,
    base_constraint,
)

__all__ = [
    "Cells",
    "ClosedFormUpdate",
    "register_closed_form",
    "registered_closed_forms",
    "contract_cells",
]

_BATCH_LETTERS = string.ascii_uppercase


def contract_cells(cell_shape, target, *operands, out=""):
    """Sum a product of cell-wise arrays down to ``target`` without broadcasting them.

    Each operand is ``(array, event_subscripts)``: the array's leading dims are
    cell (batch) dims, right-aligned to ``cell_shape``, and its trailing dims are
    named by the lowercase ``event_subscripts``. The product of the operands is
    summed over every cell dim where ``target`` is 1 and over the event letters
    not in ``out``; it is computed with one einsum over the operands' own
    (unbroadcast) shapes, so ``w_kn x_nd x_ne -> S_kde`` never builds a K x N x D x D
    array.

    Args:
        cell_shape: the full cell shape (the batch shape of the distribution's
            log-probability).
        target: shape to reduce to, same length as ``cell_shape``, 1 on summed dims.
        *operands: ``(array, event_subscripts)`` pairs.
        out: the event letters to keep, in order.

    Returns:
        Array of shape ``target + (sizes of out letters)``.

    Examples:
        >>> import jax.numpy as jnp
        >>> w, x = jnp.ones((3, 5)), jnp.ones((5, 2))
        >>> contract_cells((3, 5), (3, 1), (w, ""), (x, "d"), out="d").shape
        (3, 1, 2)
    """
    num_cell = len(cell_shape)
    if len(target) != num_cell:
        raise ValueError(f"target {target} and cell shape {cell_shape} differ in length")
    specs, arrays, varying = [], [], set()
    for array, event in operands:
        array = jnp.asarray(array)
        batch_ndim = array.ndim - len(event)
        if batch_ndim > num_cell:
            raise ValueError(f"operand of shape {array.shape} has more dims than the cells")
        spec, squeeze = "", []
        for i, size in enumerate(array.shape[:batch_ndim]):
            cell_dim = num_cell - batch_ndim + i
            if size not in (1, cell_shape[cell_dim]):
                raise ValueError(
                    f"operand of shape {array.shape} (event '{event}') does not broadcast to "
                    f"the cells {tuple(cell_shape)}"
                )
            if size == 1:
                squeeze.append(i)
            else:
                spec += _BATCH_LETTERS[cell_dim]
                varying.add(cell_dim)
        arrays.append(jnp.squeeze(array, axis=tuple(squeeze)) if squeeze else array)
        specs.append(spec + event)
    kept = [i for i in range(num_cell) if target[i] != 1 and i in varying]
    result = jnp.einsum(
        ",".join(specs) + "->" + "".join(_BATCH_LETTERS[i] for i in kept) + out, *arrays
    )
    # Summed dims along which no operand varies contribute their size as a factor.
    multiplicity = math.prod(
        cell_shape[i] for i in range(num_cell) if target[i] == 1 and i not in varying
    )
    if multiplicity != 1:
        result = result * multiplicity
    event_shape = result.shape[len(kept) :]
    shape = tuple(target[i] if i in kept else 1 for i in range(num_cell)) + event_shape
    return jnp.broadcast_to(result.reshape(shape), tuple(target) + event_shape)


class Cells(NamedTuple):
    """The cells of one distribution in one site, with their posterior weights.

    Attributes:
        weight: posterior weight of every cell (the marginal of the site's
            factor), broadcastable to ``shape``.
        value: the site's value: observed data, or the enumerated values of a
            latent site; its batch dims broadcast to ``shape``.
        args: the distribution's constructor arguments as the model passed them
            (defaults filled in), batch dims right-aligned to ``shape``.
        shape: the cell shape: the distribution's batch shape over the
            enumeration and plate dims.
        value_cov: None for complete data. For a MultivariateNormal site with
            missing coordinates ([`jaxem.nan_as_missing`][jaxem.nan_as_missing]), ``value`` holds
            each cell's conditional mean E[x | observed coordinates] and
            ``value_cov`` its conditional covariance, broadcastable to ``cells.shape + (D, D)``
            (zero in the observed rows and columns), so E[x x^T] is
            ``value value^T + value_cov``.
    """

    weight: jax.Array
    value: jax.Array
    args: dict
    shape: tuple
    value_cov: jax.Array | None = None

    def sum(self, target, *operands, out=""):
        """``contract_cells(self.shape, target, *operands, out=out)``."""
        return contract_cells(self.shape, target, *operands, out=out)

    def count(self, target):
        """Total weight of the cells mapped to each entry of ``target``."""
        return self.sum(target, (self.weight, ""))


class ClosedFormUpdate(NamedTuple):
    """Closed-form conditional maximizer of one distribution argument.

    Attributes:
        stats_fn: ``(cells, target) -> tuple of arrays`` shaped ``target +
            argument event shape + extra dims``: weighted statistics summed to
            ``target``.
        solve_fn: ``(stats, old_value, reg_covar) -> new_value``: the maximizer
            given the statistics summed per parameter entry (shaped ``param
            shape + extra dims``). Entries without weight must keep ``old_value``.
        event_ndim: number of trailing event dims of the argument (1 for the
            probabilities of a Categorical or the loc of a MultivariateNormal).
        stage: arguments are updated in increasing stage order, each given the
            others (location before scale). Arguments of one distribution in one
            stage must not depend on each other.
        domain: predicate on the param's constraint: the update's values must
            satisfy it.
        variance_fn: for an update whose ``solve_fn`` adds ``reg_covar`` to a
            variance, ``param value -> the variances it gives`` (a NumPy array,
            one per coordinate on the last axis), e.g. ``lambda s: s[..., None]
            ** 2`` for a scale. After a fit jaxem warns (``NumericalWarning``)
            when the smallest is at most 10 times ``reg_covar``: the
            regularizer, not the data, holds it up. jaxem cannot read from a
            ``solve_fn`` how ``reg_covar`` enters it, so without ``variance_fn``
            a registered update is never checked; the built-in Gaussian scale
            and covariance updates are.
    """

    stats_fn: Callable
    solve_fn: Callable
    event_ndim: int = 0
    stage: int = 1
    domain: Callable[[Any], bool] = lambda constraint: True
    variance_fn: Callable | None = None


_REGISTRY: dict = {}


def register_closed_form(dist_class, arg_name, update: ClosedFormUpdate) -> None:
    """Register a closed-form update of argument ``arg_name`` of ``dist_class``.

    The argument name is the constructor keyword of the distribution. The
    registration applies to every ``EM`` created afterwards.

    Examples:
        A Rayleigh family, whose scale has the closed form
        $\\hat\\sigma^2 = \\sum_c w_c x_c^2 / (2 \\sum_c w_c)$:

        >>> import jax.numpy as jnp, numpyro.distributions as dist
        >>> from numpyro.distributions import constraints
        >>> from jaxem import ClosedFormUpdate, register_closed_form
        >>> class Rayleigh(dist.Distribution):
        ...     arg_constraints = {"scale": constraints.positive}
        ...     support = constraints.positive
        ...     def __init__(self, scale):
        ...         self.scale = scale
        ...         super().__init__(jnp.shape(scale))
        ...     def log_prob(self, x):
        ...         return jnp.log(x) - 2 * jnp.log(self.scale) - x**2 / (2 * self.scale**2)
        >>> def stats(cells, target):
        ...     sum_sq = cells.sum(target, (cells.weight, ""), (cells.value**2, ""))
        ...     return sum_sq, cells.count(target)
        >>> def solve(stats, old, reg_covar):
        ...     sum_sq, count = stats
        ...     return jnp.where(count > 0, jnp.sqrt(sum_sq / (2 * count)), old)
        >>> register_closed_form(Rayleigh, "scale", ClosedFormUpdate(stats, solve))
    """
    if not isinstance(update, ClosedFormUpdate):
        raise TypeError("update must be a jaxem.closed_form.ClosedFormUpdate")
    _REGISTRY.setdefault(dist_class, {})[arg_name] = update


def registered_closed_forms() -> dict:
    """A copy of the registry: ``{distribution class: {argument name: update}}``."""
    return {cls: dict(updates) for cls, updates in _REGISTRY.items()}


# ---------------------------------------------------------------------------
# Constraint domains.
# ---------------------------------------------------------------------------


def _unconstrained(c) -> bool:
    return isinstance(base_constraint(c), RealConstraint)


def _positive(c) -> bool:
    c = base_constraint(c)
    return _unconstrained(c) or (
        isinstance(c, constraints.greater_than) and float(c.lower_bound) == 0.0
    )


def _unit_interval(c) -> bool:
    c = base_constraint(c)
    return _unconstrained(c) or (
        isinstance(c, constraints.interval)
        and float(c.lower_bound) == 0.0
        and float(c.upper_bound) == 1.0
    )


def _simplex(c) -> bool:
    return isinstance(c, SimplexConstraint)


def _positive_definite(c) -> bool:
    return isinstance(c, PositiveDefiniteConstraint)


def _lower_cholesky(c) -> bool:
    return isinstance(c, LowerCholeskyConstraint)


# ---------------------------------------------------------------------------
# Shared solvers.
# ---------------------------------------------------------------------------


def _safe_div(num, den):
    return num / jnp.where(den > 0, den, 1)


def _ratio(stats, old, reg_covar):
    num, den = stats
    return jnp.where(den > 0, _safe_div(num, den), old)


def _probability(stats, old, reg_covar):
    # num <= den exactly, but the two sums round separately.
    return jnp.clip(_ratio(stats, old, reg_covar), 0.0, 1.0)


def _positive_ratio(stats, old, reg_covar):
    num, den = stats
    tiny = jnp.finfo(jnp.result_type(old)).tiny
    return jnp.where(den > 0, jnp.maximum(_safe_div(num, den), tiny), old)


def _logit(p):
    eps = jnp.finfo(jnp.result_type(p)).eps
    p = jnp.clip(p, eps, 1 - eps)
    return jnp.log(p) - jnp.log1p(-p)


def _ratio_logits(stats, old, reg_covar):
    num, den = stats
    return jnp.where(den > 0, _logit(_safe_div(num, den)), old)


def _normalize(stats, old, reg_covar):
    (counts,) = stats
    total = jnp.sum(counts, axis=-1, keepdims=True)
    return jnp.where(total > 0, _safe_div(counts, total), old)


def _normalize_logits(stats, old, reg_covar):
    (counts,) = stats
    total = jnp.sum(counts, axis=-1, keepdims=True)
    tiny = jnp.finfo(jnp.result_type(old)).tiny
    logits = jnp.log(jnp.maximum(_safe_div(counts, total), tiny))
    return jnp.where(total > 0, logits, old)


def _arr(x, like):
    return jnp.asarray(x, dtype=jnp.result_type(like))


# ---------------------------------------------------------------------------
# Families.
# ---------------------------------------------------------------------------


def _mean_stats(transform=lambda x: x):
    def stats(cells, target):
        x = transform(cells.value)
        return cells.sum(target, (cells.weight, ""), (x, "")), cells.count(target)

    return stats


def _count_stats(cells, target):
    """sum w and sum w x: the rate of an Exponential."""
    return cells.count(target), cells.sum(target, (cells.weight, ""), (cells.value, ""))


def _geometric_stats(cells, target):
    n = cells.count(target)
    return n, n + cells.sum(target, (cells.weight, ""), (cells.value, ""))


def _binomial_stats(cells, target):
    total = _arr(cells.args["total_count"], cells.weight)
    num = cells.sum(target, (cells.weight, ""), (cells.value, ""))
    return num, cells.sum(target, (cells.weight, ""), (total, ""))


def _gamma_rate_stats(cells, target):
    concentration = _arr(cells.args["concentration"], cells.weight)
    num = cells.sum(target, (cells.weight, ""), (concentration, ""))
    return num, cells.sum(target, (cells.weight, ""), (cells.value, ""))


def _categorical_stats(probs_key):
    def stats(cells, target):
        num_categories = jnp.shape(cells.args[probs_key])[-1]
        one_hot = jax.nn.one_hot(cells.value, num_categories, dtype=cells.weight.dtype)
        return (cells.sum(target, (cells.weight, ""), (one_hot, "c"), out="c"),)

    return stats


def _vector_count_stats(cells, target):
    """sum w x over count vectors (Multinomial)."""
    return (cells.sum(target, (cells.weight, ""), (cells.value, "c"), out="c"),)


def _register_builtins() -> None:
    ratio = ClosedFormUpdate(_mean_stats(), _positive_ratio, domain=_positive)
    probs = ClosedFormUpdate(_mean_stats(), _probability, domain=_unit_interval)
    logits = ClosedFormUpdate(_mean_stats(), _ratio_logits, domain=_unconstrained)

    register_closed_form(dist.Poisson, "rate", ratio)
    register_closed_form(dist.BernoulliProbs, "probs", probs)
    register_closed_form(dist.BernoulliLogits, "logits", logits)
    # A probability and its logit solve from the same statistics.
    for probs_cls, logits_cls, stats in (
        (dist.BinomialProbs, dist.BinomialLogits, _binomial_stats),
        (dist.GeometricProbs, dist.GeometricLogits, _geometric_stats),
    ):
        register_closed_form(
            probs_cls, "probs", ClosedFormUpdate(stats, _probability, domain=_unit_interval)
        )
        register_closed_form(
            logits_cls, "logits", ClosedFormUpdate(stats, _ratio_logits, domain=_unconstrained)
        )
    register_closed_form(
        dist.Exponential, "rate", ClosedFormUpdate(_count_stats, _positive_ratio, domain=_positive)
    )
    register_closed_form(
        dist.Gamma, "rate", ClosedFormUpdate(_gamma_rate_stats, _positive_ratio, domain=_positive)
    )

    for cls, key in ((dist.CategoricalProbs, "probs"), (dist.CategoricalLogits, "logits")):
        solve = _normalize if key == "probs" else _normalize_logits
        domain = _simplex if key == "probs" else _unconstrained
        register_closed_form(
            cls, key, ClosedFormUpdate(_categorical_stats(key), solve, event_ndim=1, domain=domain)
        )
    for cls, key in (
        (dist.MultinomialProbs, "probs"),
        (dist.MultinomialLogits, "logits"),
    ):
        solve = _normalize if key == "probs" else _normalize_logits
        domain = _simplex if key == "probs" else _unconstrained
        register_closed_form(
            cls, key, ClosedFormUpdate(_vector_count_stats, solve, event_ndim=1, domain=domain)
        )

    for cls, transform in ((dist.Normal, lambda x: x), (dist.LogNormal, jnp.log)):
        register_closed_form(
            cls,
            "loc",
            ClosedFormUpdate(normal_loc_stats(transform), normal_loc_solve, domain=_unconstrained),
        )
        register_closed_form(
            cls,
            "scale",
            ClosedFormUpdate(
                normal_scale_stats(transform), normal_scale_solve, stage=2, domain=_positive
            ),
        )

    mvn = dist.MultivariateNormal
    register_closed_form(
        mvn,
        "loc",
        ClosedFormUpdate(mvn_loc_stats, mvn_loc_solve, event_ndim=1, domain=_unconstrained),
    )
    for key, solve, domain in (
        ("covariance_matrix", solve_covariance, _positive_definite),
        ("scale_tril", solve_scale_tril, _lower_cholesky),
        ("precision_matrix", solve_precision, _positive_definite),
    ):
        register_closed_form(
            mvn,
            key,
            ClosedFormUpdate(mvn_scatter_stats, solve, event_ndim=2, stage=2, domain=domain),
        )


_register_builtins()
