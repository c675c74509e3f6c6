"""Closed-form statistics of Normal, LogNormal and MultivariateNormal arguments,
and the guards that keep them accurate in floating point.

The fast statistics are contractions (matmuls) of the weights with the data
shifted by one point per summed dim (the data mean): ``sum w x`` as
``sum w (x - s) + s sum w`` and ``sum w (x - m)^2`` expanded into
``sum w (x - s)^2 - 2 (m - s) sum w (x - s) + (m - s)^2 sum w``. One shift
serves every component, so a component far from it (a tight cluster at 0 when
another sits at 1e5) loses its digits to cancellation. Each statistic
therefore bounds its own rounding error and, where that bound exceeds what
the M-step's objective can absorb, takes an exact path instead:

* locations: ``sum w x`` contracted directly (no shift), whose error
  ``eps * sum w |x|`` is that of storing the data themselves;
* scales and covariances: the residuals ``x - m`` of every cell.

A location is solved as the ratio of two such sums, which rounds by a few
``eps |m|`` whatever the path (`LOCATION_ROUNDING`). For a component
narrower than that (collapsed onto tied points far from 0 and held up by
``reg_covar``: float32 points at -4.6e5 are 0.03 apart, its scale 1e-3) a
move of one ulp lowers Q by nats per point, and the next scale stage fits
the ulp instead of the tie. So a location moves only where the solved move
exceeds twice that bound (`keep_within_rounding`): a smaller move cannot
be told from rounding, and keeping the old value never lowers Q.

The threshold: the M-step maximizes Q, which is stationary at the maximizer,
so an error ``delta`` (relative to the component's spread) in a statistic
lowers Q by ``O(count * delta^2)``; ``delta <= sqrt(eps)`` keeps that below
the dtype's resolution of the log-likelihood. The guards are ``lax.cond``
predicates on per-component quantities (``K`` or ``K x D x D`` work), so the
fast path costs nothing more per iteration.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

from jaxem.batching import shared_predicate

__all__ = [
    "mvn_loc_solve",
    "mvn_loc_stats",
    "mvn_scatter_stats",
    "normal_loc_solve",
    "normal_loc_stats",
    "normal_scale_solve",
    "normal_scale_stats",
    "shared_statistics",
    "solve_covariance",
    "solve_precision",
    "solve_scale_tril",
]


def _arr(x, like):
    return jnp.asarray(x, dtype=jnp.result_type(like))


def _safe_div(num, den):
    return num / jnp.where(den > 0, den, 1)


def _align(shape, ndim):
    return (1,) * (ndim - len(shape)) + tuple(shape)


def _eps(x):
    return jnp.finfo(jnp.result_type(x)).eps


def _expansion_accurate(error):
    """Whether a statistic whose relative rounding error is bounded by ``error``
    (per component) is accurate enough: below ``sqrt(eps)`` everywhere (3.5e-4
    in float32, 1.5e-8 in float64). NaN (a bound that could not be computed)
    counts as inaccurate."""
    error = jnp.asarray(error)
    return shared_predicate(jnp.all(error < jnp.sqrt(_eps(error))))


_SHIFTED = contextvars.ContextVar("jaxem_shifted", default=None)
_REG_COVAR = contextvars.ContextVar("jaxem_reg_covar", default=0.0)


@contextlib.contextmanager
def shared_statistics(reg_covar=0.0):
    """Within this context, stages of one M-step share their shifted data.

    The location and scale stages both contract the weights with the
    mean-shifted data. XLA merges the two identical matmuls in a plain ``jit``,
    but inside ``run``'s while loop it hoists each copy of the loop-invariant
    shifted data on its own, and then keeps both matmuls. Computing the shifted
    data once per traced M-step keeps one.

    Args:
        reg_covar: the M-step's ``reg_covar``. The scale stages' rounding
            guards measure a scatter's error against the variance it becomes
            (``scatter / count + reg_covar``), so a degenerate component (one
            point, repeated points) does not force the exact path forever.
    """
    token = _SHIFTED.set({})
    reg_token = _REG_COVAR.set(reg_covar)
    try:
        yield
    finally:
        _REG_COVAR.reset(reg_token)
        _SHIFTED.reset(token)


def _shifted(x, cells, target, event_ndim):
    """``x`` minus its mean over the summed dims it varies along, and that mean."""
    cache = _SHIFTED.get()
    key = (id(x), tuple(target), event_ndim, len(cells.shape))
    if cache is not None and key in cache:
        return cache[key][1]
    result = _shift(x, cells, target, event_ndim)
    if cache is not None:
        cache[key] = (x, result)  # holding x keeps its id from being reused
    return result


def _shift(x, cells, target, event_ndim):
    num_cells = len(cells.shape)
    batch = _align(jnp.shape(x)[: jnp.ndim(x) - event_ndim], num_cells)
    x_aligned = jnp.reshape(x, batch + jnp.shape(x)[jnp.ndim(x) - event_ndim :])
    axes = tuple(i for i in range(num_cells) if target[i] == 1 and batch[i] != 1)
    shift = jax.lax.stop_gradient(jnp.mean(x_aligned, axis=axes, keepdims=True))
    return x_aligned - shift, shift


def _first_moment(cells, target, x, center, event_ndim, root_precision):
    """``sum w x`` over the summed dims: from the shifted first moment where that is
    accurate, else from the residuals about ``center`` (the old location).

    ``s + sum w (x - s) / sum w`` rounds by ``eps |result|`` (storing the result:
    unavoidable) plus at most ``delta = 2 eps max |x - s|`` per coordinate, which
    for a component far from the shift ``s`` (the data mean) is far larger than
    its spread. An error ``delta`` in a location lowers Q by at most ``count *
    (sum_d delta_d sqrt(P_dd))^2 / 2`` (``|P_de| <= sqrt(P_dd P_ee)``), ``P`` the
    precision the location is maximized under; the shifted form is kept while
    that is below ``count * eps``. Otherwise ``c + sum w (x - c) / sum w`` with
    ``c`` the old location (``K x N x D`` elementwise work, as the E-step), whose
    residuals are small near a fixed point.

    Args:
        center: the old location, batch dims aligned to the cells.
        root_precision: ``sqrt(P_dd)`` of every component, any batch shape, event
            dim last for a MultivariateNormal.
    """
    out = "d" if event_ndim else ""
    xs, shift = _shifted(x, cells, target, event_ndim)
    first = cells.sum(target, (cells.weight, ""), (xs, out), out=out)
    count = cells.count(target)
    count = count[..., None] if event_ndim else count
    eps = _eps(first)
    batch_axes = tuple(range(jnp.ndim(xs) - event_ndim))
    # A data-only reduction: inside ``run`` XLA computes it once, outside the loop.
    delta = 2 * eps * jnp.max(jnp.abs(xs), axis=batch_axes)
    root = jnp.max(jnp.reshape(root_precision, (-1,) + jnp.shape(delta)), axis=0)
    loss = jnp.sum(delta * root) ** 2

    def about_center():
        return cells.sum(target, (cells.weight, ""), (x - center, out), out=out) + center * count

    return jax.lax.cond(shared_predicate(loss <= eps), lambda: first + shift * count, about_center)


def normal_loc_stats(transform=lambda x: x):
    """Statistics of a Normal's (a LogNormal's, with ``transform=log``) ``loc``:
    ``(sum w P x, sum w P)`` with ``P = scale^-2``."""

    def stats(cells, target):
        scale = _arr(cells.args["scale"], cells.weight)
        precision = 1.0 / scale**2
        x = transform(cells.value)
        num_cells = len(cells.shape)
        precision = jnp.reshape(precision, _align(jnp.shape(precision), num_cells))
        if any(precision.shape[i] != 1 for i in range(num_cells) if target[i] == 1):
            # The precision varies along the summed dims (a heteroscedastic model):
            # contracted directly, no shift.
            num = cells.sum(target, (cells.weight, ""), (precision, ""), (x, ""))
            return num, cells.sum(target, (cells.weight, ""), (precision, ""))
        # The shifted first moment is the one the scale stage needs too, so XLA
        # computes it once.
        loc = _arr(cells.args["loc"], cells.weight)
        loc = jnp.reshape(loc, _align(jnp.shape(loc), num_cells))
        total = _first_moment(cells, target, x, loc, 0, jnp.sqrt(precision))
        return precision * total, precision * cells.count(target)

    return stats


def normal_scale_stats(transform=lambda x: x):
    """Statistics of a Normal's (a LogNormal's) ``scale``: ``(sum w (x - m)^2, sum w)``."""

    def stats(cells, target):
        x = transform(cells.value)
        loc = _arr(cells.args["loc"], cells.weight)
        num_cells = len(cells.shape)
        summed = [i for i in range(num_cells) if target[i] == 1]

        def residuals():
            residual = x - loc
            return cells.sum(target, (cells.weight, ""), (residual, ""), (residual, ""))

        count = cells.count(target)
        if any(_align(jnp.shape(loc), num_cells)[i] != 1 for i in summed):
            # loc varies along the dims the scale is shared over (a regression).
            return residuals(), count
        # sum w (x - m)^2 = sum w x^2 - 2 m sum w x + m^2 sum w, as contractions
        # (matmuls), x and m shifted by the data mean over the summed dims.
        xs, shift = _shifted(x, cells, target, 0)
        ls = loc - shift
        w = cells.weight
        first = cells.sum(target, (w, ""), (xs, ""))
        x_term = cells.sum(target, (w, ""), (xs**2, ""))
        m_term = count * ls**2
        sq = x_term - 2 * ls * first + m_term
        # Its rounding is below eps (x_term + m_term) (the cross term is bounded
        # by the other two), against the variance it becomes, times the count.
        tiny = jnp.finfo(sq.dtype).tiny
        variance = jnp.maximum(sq, 0.0) + count * _REG_COVAR.get()
        error = _eps(sq) * (x_term + m_term) / jnp.maximum(variance, tiny)
        error = jnp.where(count > 0, error, 0.0)
        sq = jax.lax.cond(_expansion_accurate(error), lambda: jnp.maximum(sq, 0.0), residuals)
        return sq, count

    return stats


# Relative rounding of a location solved as ``(P sum w x) / (P sum w)``, in units of
# ``eps |m|`` per coordinate: the shifted or centred first moment plus ``m count`` (two
# roundings), the products with ``P`` (two), the division (one), and the sums over a
# param's consumers (an HMM's first step and its scan: one more each), at ``eps / 2``
# apiece.
LOCATION_ROUNDING = 4.0


def keep_within_rounding(new, old, curvature):
    """``new`` where it moved from ``old`` by more than twice its rounding bound, else
    ``old``; one rule for a Normal's (a LogNormal's) location and a MultivariateNormal's.

    Q is a quadratic in the location ``m`` with curvature ``S = sum_c w_c P_c``: ``Q(m)
    = Q(m*) - |m - m*|_S^2 / 2`` in the norm ``|v|_S = sqrt(v^T S v)``, ``m*`` the exact
    maximizer. The solved ``new`` is off from ``m*`` by at most ``LOCATION_ROUNDING *
    eps * |m_d|`` per coordinate, so (``|S_de| <= sqrt(S_dd S_ee)``) by at most ``B =
    LOCATION_ROUNDING * eps * sum_d |new_d| sqrt(S_dd)`` in that norm. A move ``|new -
    old|_S > 2 B`` implies ``|old - m*|_S > B >= |new - m*|_S``: the move raises Q. A
    smaller one may be rounding alone, and where the location is sharper than its ulp
    it lowers Q. In one dimension the rule reads ``|new - old| > 2 LOCATION_ROUNDING
    eps |new|``.

    The bound counts the roundings of the ratio of sums (exact when a component's
    precision is shared by its cells, as in a mixture or an HMM); a MultivariateNormal's
    linear solve adds rounding that grows with the condition number of ``S``, which it
    does not count: there the rule keeps fewer moves, never more, than a true bound.

    Args:
        new: the solved location(s), event dim last (``(..., D)``).
        old: the location(s) before the step, broadcastable to ``new``.
        curvature: ``S``, ``(..., D, D)``, broadcastable (the solve's matrix).
    """
    # Both sides scale with sqrt(S): S normalized by its largest diagonal entry, so that
    # a component of tiny weight does not underflow.
    diag = jnp.abs(jnp.diagonal(curvature, axis1=-2, axis2=-1))
    largest = jnp.max(diag, axis=-1)
    curvature = curvature / jnp.where(largest > 0, largest, 1)[..., None, None]
    delta = new - old
    moved = jnp.einsum("...d,...de,...e->...", delta, curvature, delta)
    root = jnp.sqrt(jnp.abs(jnp.diagonal(curvature, axis1=-2, axis2=-1)))
    bound = LOCATION_ROUNDING * _eps(new) * jnp.sum(jnp.abs(new) * root, axis=-1)
    return jnp.where((jnp.sqrt(jnp.abs(moved)) > 2 * bound)[..., None], new, old)


def normal_loc_solve(stats, old, reg_covar):
    """``sum w P x / sum w P``; ``old`` where nothing weighs, or where the move is
    within rounding (`keep_within_rounding`)."""
    num, den = stats
    new = jnp.where(den > 0, _safe_div(num, den), old)
    old = jnp.broadcast_to(old, jnp.shape(new))
    kept = keep_within_rounding(new[..., None], old[..., None], den[..., None, None])
    return kept[..., 0]


def normal_scale_solve(stats, old, reg_covar):
    """``sqrt(sum w (x - m)^2 / sum w + reg_covar)``; ``old`` where nothing weighs."""
    sq, n = stats
    return jnp.where(n > 0, jnp.sqrt(_safe_div(sq, n) + reg_covar), old)


def _mvn_precision(args, like):
    if args.get("precision_matrix") is not None:
        return _arr(args["precision_matrix"], like)
    if args.get("scale_tril") is not None:
        scale_tril = _arr(args["scale_tril"], like)
    else:
        scale_tril = jnp.linalg.cholesky(_arr(args["covariance_matrix"], like))
    eye = jnp.broadcast_to(jnp.eye(scale_tril.shape[-1], dtype=scale_tril.dtype), scale_tril.shape)
    inv_tril = solve_triangular(scale_tril, eye, lower=True)
    return jnp.swapaxes(inv_tril, -1, -2) @ inv_tril


def mvn_loc_stats(cells, target):
    """Statistics of a MultivariateNormal's ``loc``: the precision-weighted
    ``(sum_c w_c P_c x_c, sum_c w_c P_c)``."""
    # Contract over the dims where neither loc nor the precision varies first.
    precision = _mvn_precision(cells.args, cells.weight)
    ndim = len(cells.shape)
    prec_batch = _align(precision.shape[:-2], ndim)
    joint = tuple(max(t, p) for t, p in zip(target, prec_batch))
    s0 = cells.count(joint)
    root = jnp.sqrt(jnp.abs(jnp.diagonal(precision, axis1=-2, axis2=-1)))
    loc = _arr(cells.args["loc"], cells.weight)
    loc = jnp.reshape(loc, _align(loc.shape[:-1], ndim) + loc.shape[-1:])
    s1 = _first_moment(cells, joint, cells.value, loc, 1, root)
    precision = precision.reshape(prec_batch + precision.shape[-2:])
    num = jnp.einsum("...de,...e->...d", precision, s1)
    den = s0[..., None, None] * precision
    extra = tuple(i for i in range(ndim) if target[i] == 1 and joint[i] != 1)
    return jnp.sum(num, axis=extra, keepdims=True), jnp.sum(den, axis=extra, keepdims=True)


def mvn_loc_solve(stats, old, reg_covar):
    """``(sum w P)^-1 sum w P x``; ``old`` where nothing weighs, or where the move is
    within rounding (`keep_within_rounding`)."""
    num, den = stats
    weight = jnp.trace(den, axis1=-2, axis2=-1)
    eye = jnp.eye(den.shape[-1], dtype=den.dtype)
    safe_den = jnp.where((weight > 0)[..., None, None], den, eye)
    new = jnp.where(
        (weight > 0)[..., None], jnp.linalg.solve(safe_den, num[..., None])[..., 0], old
    )
    return keep_within_rounding(new, old, den)


def _scatter_error(moments, scatter, count):
    """Bound on the relative error of ``scatter / count + reg_covar`` (the
    covariance the scatter becomes), when ``scatter`` was expanded from
    ``moments`` (the shifted second moments).

    Entry ``(d, e)`` of the expansion is off by ``O(eps sqrt(M_dd M_ee))``.
    Scaled by ``D = diag(S + count reg)^-1/2``, that is at most ``eps max_d
    M_dd / (S_dd + count reg)`` per entry, and a perturbation ``E`` of the
    scaled matrix ``R`` matters relative to its smallest eigenvalue, estimated
    by ``trace(R^-1) / D`` (exact for a well-conditioned ``R``, within a factor
    ``D`` otherwise): a cluster stretched along a diagonal (coordinates
    correlated to 1 - 1e-6) needs accuracy relative to its thin direction, not
    its trace. Rounding errors add up randomly, far below their worst case, so
    no factor for the ``D^2`` entries. A scatter too wrong to factor gives NaN:
    the exact path.
    """
    dim = scatter.shape[-1]
    eye = jnp.eye(dim, dtype=scatter.dtype)
    regularized = scatter + count * _REG_COVAR.get() * eye
    diag = jnp.diagonal(regularized, axis1=-2, axis2=-1)
    moment_diag = jnp.diagonal(moments, axis1=-2, axis2=-1)
    valid = count[..., 0, 0] > 0
    safe_diag = jnp.where(diag > 0, diag, jnp.nan)
    ratio = jnp.max(moment_diag / safe_diag, axis=-1)
    inv_sqrt = jax.lax.rsqrt(safe_diag)
    correlation = regularized * inv_sqrt[..., :, None] * inv_sqrt[..., None, :]
    correlation = jnp.where(valid[..., None, None], correlation, eye)
    tril = jnp.linalg.cholesky(correlation)
    inv_tril = solve_triangular(tril, jnp.broadcast_to(eye, tril.shape), lower=True)
    inverse_trace = jnp.sum(inv_tril**2, axis=(-2, -1))
    error = _eps(scatter) * ratio * inverse_trace / dim
    return jnp.where(valid, error, 0.0)


def mvn_scatter_stats(cells, target):
    """Statistics of a MultivariateNormal's covariance (any parametrization):
    ``(sum w (x - m)(x - m)^T, sum w)``, the count broadcast to ``D x D``."""
    x, loc, w = cells.value, _arr(cells.args["loc"], cells.weight), cells.weight
    dim, num_cells = x.shape[-1], len(cells.shape)
    count = cells.count(target)[..., None, None]
    count = jnp.broadcast_to(count, count.shape[:-2] + (dim, dim))

    def residuals():
        residual = x - loc
        return cells.sum(target, (w, ""), (residual, "d"), (residual, "e"), out="de")

    if cells.value_cov is not None:
        # Missing coordinates: E[(x - m)(x - m)^T] = (E[x] - m)(E[x] - m)^T + Cov[x].
        spread = cells.sum(target, (w, ""), (cells.value_cov, "de"), out="de")
        return residuals() + spread, count
    x_batch = _align(x.shape[:-1], num_cells)
    loc_batch = _align(loc.shape[:-1], num_cells)
    summed = [i for i in range(num_cells) if target[i] == 1]
    residual_size = math.prod(max(a, b) for a, b in zip(x_batch, loc_batch)) * dim
    if any(loc_batch[i] != 1 for i in summed) or math.prod(x_batch) * dim * dim > residual_size:
        return residuals(), count
    # sum w (x - m)(x - m)^T from the points' second moments x x^T: one matmul
    # with the weights, the moments depending on the data alone (inside ``run``
    # XLA computes them once, outside the loop), and no larger than the
    # K x N x D residuals. Shifted by the data mean (exact) to reduce the
    # cancellation; where its rounding bound is too large, residuals after all.
    xs, shift = _shifted(x, cells, target, 1)
    ls = jnp.reshape(loc, loc_batch + (dim,)) - shift
    moments = cells.sum(target, (w, ""), (xs[..., :, None] * xs[..., None, :], "de"), out="de")
    first = cells.sum(target, (w, ""), (xs, "d"), out="d")
    ls = jnp.broadcast_to(ls, first.shape)
    cross = ls[..., :, None] * first[..., None, :]
    scatter = (
        moments
        - cross
        - jnp.swapaxes(cross, -1, -2)
        + count * (ls[..., :, None] * ls[..., None, :])
    )
    error = _scatter_error(moments, scatter, count)
    scatter = jax.lax.cond(_expansion_accurate(error), lambda: scatter, residuals)
    return scatter, count


def _mvn_covariance(stats, old, reg_covar):
    scatter, count = stats
    valid = count[..., :1, :1] > 0
    cov = _safe_div(scatter, count)
    cov = 0.5 * (cov + jnp.swapaxes(cov, -1, -2))
    cov = cov + reg_covar * jnp.eye(cov.shape[-1], dtype=cov.dtype)
    # Keep the solve well-posed where a component has no weight; masked below.
    return valid, jnp.where(valid, cov, jnp.eye(cov.shape[-1], dtype=cov.dtype))


def solve_covariance(stats, old, reg_covar):
    """The covariance matrix ``scatter / count + reg_covar I``."""
    valid, cov = _mvn_covariance(stats, old, reg_covar)
    return jnp.where(valid, cov, old)


def solve_scale_tril(stats, old, reg_covar):
    """The Cholesky factor of `solve_covariance`'s covariance."""
    valid, cov = _mvn_covariance(stats, old, reg_covar)
    return jnp.where(valid, jnp.linalg.cholesky(cov), old)


def solve_precision(stats, old, reg_covar):
    """The inverse of `solve_covariance`'s covariance."""
    valid, cov = _mvn_covariance(stats, old, reg_covar)
    tril = jnp.linalg.cholesky(cov)
    eye = jnp.broadcast_to(jnp.eye(cov.shape[-1], dtype=cov.dtype), cov.shape)
    inv_tril = solve_triangular(tril, eye, lower=True)
    return jnp.where(valid, jnp.swapaxes(inv_tril, -1, -2) @ inv_tril, old)
