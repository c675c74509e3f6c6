"""The log-density of a site's distribution, with fast kernels for Gaussians.

`site_log_prob` is ``fn.log_prob(value)`` except for the densities that
dominate a fit's run time on CPU: a diagonal Normal (``Normal(...).to_event(1)``)
and a MultivariateNormal are evaluated as matmuls over the components and the
points, as scikit-learn does, rather than elementwise over a ``K x N x D``
array or by a triangular solve per point. Sites with missing entries
(`jaxem.missing.MissingData`) are marginalized over them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from jax.scipy.linalg import solve_triangular

from jaxem.batching import shared_predicate
from jaxem.closed_form import contract_cells
from jaxem.missing import MissingData, missing_log_prob

__all__ = ["site_log_prob"]


def site_log_prob(fn, value):
    """``fn.log_prob(value)``, with a faster kernel for multivariate normals.

    NumPyro evaluates a MultivariateNormal by a triangular solve against every
    data point, which XLA runs slowly on CPU; inverting the K small Cholesky
    factors once and multiplying is much faster (as scikit-learn does).
    """
    if isinstance(fn, MissingData):
        # Complete data (checked at run time) takes the kernels below, exactly
        # as without the wrapper.
        complete = lambda: site_log_prob(fn.base_dist, value)  # noqa: E731
        shape = jax.eval_shape(complete).shape
        return jax.lax.cond(
            jnp.all(fn.observed),
            complete,
            lambda: jnp.broadcast_to(missing_log_prob(fn.base_dist, fn.observed, value), shape),
        )
    if isinstance(fn, dist.ExpandedDistribution):
        log_prob = site_log_prob(fn.base_dist, value)
        batch = jnp.shape(value)[: max(jnp.ndim(value) - fn.event_dim, 0)]
        return jnp.broadcast_to(log_prob, jnp.broadcast_shapes(fn.batch_shape, batch))
    if isinstance(fn, dist.Independent):
        base = fn.base_dist
        while isinstance(base, dist.ExpandedDistribution):  # plates expand inside to_event
            base = base.base_dist
        if fn.reinterpreted_batch_ndims == 1 and type(base) is dist.Normal:
            log_prob, error = _diagonal_normal_log_prob(base.loc, base.scale, value)
            # The expansion into matmuls cancels when clusters sit far from the
            # data mean; where its worst-case rounding error could reach 1e-3 nats
            # in some cell (float32 with far-apart, tight clusters), evaluate the
            # exact density instead.
            log_prob = jax.lax.cond(
                shared_predicate(error < 1e-3),
                lambda: log_prob,
                lambda: site_log_prob(fn.base_dist, value).sum(-1),
            )
            # The data may vary along a dim where the distribution does not (the
            # time dim of a scan's stacked site, of size 1 in the distribution).
            batch = jnp.shape(value)[: max(jnp.ndim(value) - fn.event_dim, 0)]
            return jnp.broadcast_to(log_prob, jnp.broadcast_shapes(fn.batch_shape, batch))
        log_prob = site_log_prob(fn.base_dist, value)
        return jnp.sum(log_prob, axis=tuple(range(-fn.reinterpreted_batch_ndims, 0)))
    if type(fn) is dist.MultivariateNormal:
        return _mvn_log_prob(fn.loc, fn.scale_tril, value)
    return fn.log_prob(value)


def _diagonal_normal_log_prob(loc, scale, value):
    """log N(value | loc, diag(scale^2)) summed over the last dim, as matmuls.

    sum_d (x_d - m_d)^2 / s_d^2 expands into three contractions over d, so K
    components against N points cost matmuls instead of a K x N x D array of
    elementwise work (as scikit-learn does). Both x and m are first shifted by
    the data mean, which cancels exactly and reduces the cancellation.

    Returns:
        ``(log_prob, error)``: the densities and a bound on their rounding error.
    """
    loc, scale, value = _as_float(loc, scale, value)
    dim = value.shape[-1]
    loc = _with_last_dim(loc, dim)
    precision = _with_last_dim(scale, dim) ** -2
    flat = value.reshape(-1, dim)
    # The mean as a matmul: XLA's CPU reduction over a leading axis is slow.
    shift = jax.lax.stop_gradient(jnp.ones(flat.shape[:1], flat.dtype) @ flat / flat.shape[0])
    x, m = value - shift, loc - shift
    batch = jnp.broadcast_shapes(loc.shape[:-1], precision.shape[:-1], value.shape[:-1])
    x_term = contract_cells(batch, batch, (x**2, "d"), (precision, "d"))
    m_term = contract_cells(batch, batch, (m**2 * precision, "d"))
    quadratic = x_term - 2 * contract_cells(batch, batch, (x, "d"), (m * precision, "d")) + m_term
    log_det = -0.5 * contract_cells(batch, batch, (jnp.log(precision), "d"))
    log_prob = -0.5 * quadratic - log_det - 0.5 * dim * jnp.log(2 * jnp.pi)
    # The rounding is below eps * (x_term + m_term) in each cell. Rather than a pass
    # over the cells, bound their maximum by the data's largest squared norm (which
    # depends on the data alone: inside ``run`` XLA computes it once) times each
    # component's largest precision, plus its m_term.
    largest = jnp.max(jnp.sum(x**2, axis=-1))
    bound = largest * jnp.max(precision, axis=-1) + jnp.sum(m**2 * precision, axis=-1)
    error = jnp.finfo(log_prob.dtype).eps * jnp.max(bound)
    return log_prob, jax.lax.stop_gradient(error)


def _as_float(*arrays):
    """The arrays in their common float dtype: a distribution built from Python
    ints (``Normal(0, 1)``) keeps integer arguments, which ``** -2`` and the
    matmuls below reject or truncate."""
    dtype = jnp.result_type(float, *arrays)
    return tuple(jnp.asarray(a, dtype) for a in arrays)


def _with_last_dim(a, dim):
    a = jnp.asarray(a)
    a = a[None] if a.ndim == 0 else a
    return jnp.broadcast_to(a, a.shape[:-1] + (dim,))


def _mvn_log_prob(loc, scale_tril, value):
    batch = jnp.broadcast_shapes(scale_tril.shape[:-2], value.shape[:-1], loc.shape[:-1])
    # Batch dims of size 1 (the enumeration and plate dims a site does not
    # vary along, e.g. in a scan body) are dropped first: XLA's CPU backend
    # lays a matmul's output with unit dims out in a slow order (measured 4x
    # slower for a Gaussian HMM's emissions).
    varying = [i for i, size in enumerate(batch) if size != 1]
    if len(varying) < len(batch):
        ndim = len(batch)

        def squeeze(a, event_ndim):
            a = jnp.asarray(a)
            shape = (1,) * (ndim + event_ndim - a.ndim) + a.shape
            return a.reshape(tuple(shape[i] for i in varying) + shape[ndim:])

        log_prob = _mvn_log_prob(squeeze(loc, 1), squeeze(scale_tril, 2), squeeze(value, 1))
        return log_prob.reshape(batch)
    dim = scale_tril.shape[-1]
    eye = jnp.broadcast_to(jnp.eye(dim, dtype=scale_tril.dtype), scale_tril.shape)
    inv_tril = solve_triangular(scale_tril, eye, lower=True)
    # L^-1 applied to the residuals x - loc: a K x N x D array, the size of the
    # whitened output (no K x N x D x D broadcast), contracted per component. Not
    # L^-1 x - L^-1 loc: each term rounds by eps times its size, and for a
    # component far from 0 against its scale they cancel (float32: a component of
    # scale 10 at 1e5 lost 1e-2 nats per point). Measured on benchmarks/gmm.py
    # (full, float32, N=1e4 D=2 K=3 and N=1e5 D=16 K=16): no slower per iteration
    # than the two separate matmuls; a lax.cond choosing between the two forms was
    # twice as slow (both operand sets stay live).
    batch = jnp.broadcast_shapes(scale_tril.shape[:-2], value.shape[:-1], loc.shape[:-1])
    whitened = contract_cells(batch, batch, (inv_tril, "de"), (value - loc, "e"), out="d")
    half_log_det = jnp.sum(jnp.log(jnp.diagonal(scale_tril, axis1=-2, axis2=-1)), axis=-1)
    return -0.5 * jnp.sum(whitened**2, axis=-1) - half_log_det - 0.5 * dim * jnp.log(2 * jnp.pi)
