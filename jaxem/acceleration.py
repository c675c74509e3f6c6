"""SQUAREM acceleration of the EM map (Varadhan and Roland 2008).

EM is a fixed-point iteration ``theta -> F(theta)`` that converges linearly,
slowly where components overlap. SQUAREM takes two EM steps,
``theta_1 = F(theta_0)`` and ``theta_2 = F(theta_1)``, and extrapolates along
the path they trace,

.. math::

    r = \\theta_1 - \\theta_0, \\quad v = \\theta_2 - 2\\theta_1 + \\theta_0, \\quad
    \\theta' = \\theta_0 + 2\\alpha r + \\alpha^2 v, \\quad
    \\alpha = \\max(1, \\min(\\alpha_{\\max}, \\lVert r \\rVert / \\lVert v \\rVert)),

with the step length of their scheme S3 (``alpha = 1`` gives ``theta_2``
back). The extrapolation is done in NumPyro's unconstrained space
(``biject_to``), so ``theta'`` always satisfies the constraints. One more EM
step from ``theta'`` stabilizes it. The cycle is accepted only if the
log-likelihood at ``theta'`` is not below that at ``theta_0``; otherwise the
plain EM point ``theta_2`` is kept, so the log-likelihood never decreases.
``alpha_max`` grows fourfold each time the step reaches it and shrinks
fourfold when such a step is rejected, as in R's SQUAREM package.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from numpyro.distributions.transforms import biject_to

__all__ = ["SquaremState", "init_squarem", "squarem_extrapolate", "squarem_step_max"]

STEP_FACTOR = 4.0


class SquaremState(NamedTuple):
    """What SQUAREM carries across cycles.

    Attributes:
        step_max: the current largest step length ``alpha_max`` (starts at 1).
        num_rejected: cycles whose extrapolation was rejected by the
            monotonicity safeguard (the plain EM point was kept instead).
    """

    step_max: jax.Array
    num_rejected: jax.Array


def init_squarem(dtype) -> SquaremState:
    """``alpha_max = 1`` (the first cycle is three plain EM steps), no rejections."""
    return SquaremState(jnp.ones((), dtype), jnp.zeros((), jnp.int32))


def squarem_extrapolate(params0, params1, params2, constraints, step_max):
    """The SQUAREM point from three successive EM iterates.

    Coordinates that are not finite in unconstrained space (a probability of
    exactly 0 or 1, an emptied mixture weight) take the plain EM value
    ``theta_2``, and parameters the EM map left unchanged (frozen, unused)
    are returned exactly.

    Returns:
        ``(params, alpha)``: constrained values and the step length used.
    """
    transforms = {n: biject_to(constraints[n]) for n in params0}
    u0, u1, u2 = (
        {n: transforms[n].inv(p[n]) for n in params0} for p in (params0, params1, params2)
    )
    finite = {n: jnp.isfinite(u0[n]) & jnp.isfinite(u1[n]) & jnp.isfinite(u2[n]) for n in u0}
    r = {n: jnp.where(finite[n], u1[n] - u0[n], 0.0) for n in u0}
    v = {n: jnp.where(finite[n], u2[n] - 2 * u1[n] + u0[n], 0.0) for n in u0}
    dtype = jnp.result_type(step_max)
    sr2 = sum(jnp.sum(x.astype(dtype) ** 2) for x in r.values())
    sv2 = sum(jnp.sum(x.astype(dtype) ** 2) for x in v.values())
    ratio = jnp.sqrt(sr2 / jnp.where(sv2 > 0, sv2, 1.0))
    alpha = jnp.where(sv2 > 0, jnp.clip(ratio, 1.0, step_max), 1.0)
    params = {}
    for n in params0:
        a = alpha.astype(jnp.result_type(u0[n]))
        u = jnp.where(finite[n], u0[n] + 2 * a * r[n] + a**2 * v[n], u2[n])
        moved = jnp.any(r[n] != 0) | jnp.any(v[n] != 0)
        value = transforms[n](u).astype(jnp.result_type(params2[n]))
        params[n] = jnp.where(moved, value, params2[n])
    return params, alpha


def squarem_step_max(state: SquaremState, alpha, accepted) -> SquaremState:
    """Adapt ``alpha_max``: grow it when a step reached it and was accepted, shrink
    it (not below 1) when such a step was rejected."""
    at_max = alpha >= state.step_max
    grown = state.step_max * STEP_FACTOR
    shrunk = jnp.maximum(state.step_max / STEP_FACTOR, 1.0)
    step_max = jnp.where(at_max, jnp.where(accepted, grown, shrunk), state.step_max)
    return SquaremState(step_max, state.num_rejected + (~accepted).astype(jnp.int32))
