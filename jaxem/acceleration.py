"""SQUAREM (Varadhan and Roland 2008) and Anderson acceleration of the EM map.

EM is a fixed-point iteration ``theta -> F(theta)`` that converges linearly,
slowly where components overlap. SQUAREM takes two EM steps,
``theta_1 = F(theta_0)`` and ``theta_2 = F(theta_1)``, and extrapolates along
the path they trace,

$$
r = \\theta_1 - \\theta_0, \\quad v = \\theta_2 - 2\\theta_1 + \\theta_0, \\quad
\\theta' = \\theta_0 + 2\\alpha r + \\alpha^2 v, \\quad
\\alpha = \\max(1, \\min(\\alpha_{\\max}, \\lVert r \\rVert / \\lVert v \\rVert)),
$$

with the step length of their scheme S3 (``alpha = 1`` gives ``theta_2``
back; Varadhan and Roland write ``alpha`` with the opposite sign). The
extrapolation is done in ``log p`` for simplex parameters (the softmax maps
back) and in NumPyro's unconstrained space (``biject_to``) for the others, so
``theta'`` always satisfies the constraints; the step length is measured on
the simplex values themselves (see `squarem_extrapolate`). One more EM
step from ``theta'`` stabilizes it; its E-step gives the log-likelihood at
``theta'``, so the safeguard costs nothing. The cycle ends at ``F(theta')`` if
the log-likelihood at ``theta'`` is not below that at ``theta_0``, otherwise
at the plain EM point ``theta_2``, so the log-likelihood never decreases.
``alpha_max`` starts at 1, doubles each time an accepted step reaches it and
halves (not below 1) when such a step is rejected (R's SQUAREM package uses a
factor 4).

Anderson acceleration (type II in the terms of Fang and Saad 2009, in the
form of Walker and Ni 2011; safeguarded for EM in the spirit of DAAREM,
Henderson and Varadhan 2019) costs one EM step per iteration. With
``f(theta) = F(theta) - theta`` in unconstrained space and the last ``m = 5``
differences ``df_j = f(theta_{j+1}) - f(theta_j)`` and
``dF_j = F(theta_{j+1}) - F(theta_j)`` between successive accepted points, the
next point to try is

$$
\\theta' = F(\\theta_k) - \\sum_j \\gamma_j\\, dF_j, \\quad
\\gamma = \\arg\\min_\\gamma \\lVert f(\\theta_k) - \\textstyle\\sum_j \\gamma_j df_j
\\rVert^2 + \\lambda \\lVert \\gamma \\rVert^2,
$$

with the smallest ridge ``lambda >= 0`` that keeps ``||gamma||`` within a
bound adapted like SQUAREM's ``alpha_max``, by a factor 4 instead of 2 (from
1, up after an accepted step at the bound, down, not below 1, after a rejected
one). Anderson acceleration solves ``f(theta) = 0`` and is drawn to saddle
points as much as to maxima; where the extrapolation would step back against
the EM step (``<theta' - F(theta_k), f(theta_k)> < 0``: an unstable direction)
the plain EM point is taken instead. The E-step and M-step of the next
iteration run at ``theta'``; they give its log-likelihood and ``F(theta')`` at
once. If the log-likelihood is below that of ``theta_k`` (or not finite),
``theta'`` is rejected, the memory is cleared and the next iteration runs at
the plain EM point ``F(theta_k)``, so the accepted log-likelihoods never
decrease.

References:
    R. Varadhan and C. Roland (2008). Simple and globally convergent methods
    for accelerating the convergence of any EM algorithm. Scandinavian Journal
    of Statistics 35(2), 335-353.

    H. Fang and Y. Saad (2009). Two classes of multisecant methods for
    nonlinear acceleration. Numerical Linear Algebra with Applications 16(3),
    197-221.

    H. F. Walker and P. Ni (2011). Anderson acceleration for fixed-point
    iterations. SIAM Journal on Numerical Analysis 49(4), 1715-1735.

    N. C. Henderson and R. Varadhan (2019). Damped Anderson acceleration with
    restarts and monotonicity control for accelerating EM and EM-like
    algorithms. Journal of Computational and Graphical Statistics 28(4),
    834-846.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from numpyro.distributions.constraints import simplex
from numpyro.distributions.transforms import IdentityTransform, biject_to

from jaxem.loop import all_finite, tree_where

__all__ = [
    "AndersonState",
    "SquaremState",
    "anderson_step",
    "init_anderson",
    "init_squarem",
    "squarem_extrapolate",
    "squarem_step_max",
]

# Anderson's bound on ||gamma|| grows and shrinks by this factor (as SQUAREM's alpha_max
# does in R's SQUAREM).
ANDERSON_STEP_FACTOR = 4.0
# SQUAREM's alpha_max grows and shrinks by this factor (R's SQUAREM: mstep = 4); 2 needs
# fewer EM steps on the scan HMMs of benchmarks/convergence.py (fewer overshoots).
SQUAREM_STEP_FACTOR = 2.0


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


def _is_simplex(constraint) -> bool:
    return isinstance(constraint, type(simplex))


def _chart(value, constraint):
    """The coordinates SQUAREM extrapolates in: ``log p`` for a simplex (its inverse is
    the softmax, symmetric in the entries), NumPyro's unconstrained values otherwise."""
    if _is_simplex(constraint):
        return jnp.log(value)
    return biject_to(constraint).inv(value)


def _unchart(u, constraint):
    if _is_simplex(constraint):
        return jax.nn.softmax(u, axis=-1)
    return biject_to(constraint)(u)


def squarem_extrapolate(params0, params1, params2, constraints, step_max):
    """The SQUAREM point from three successive EM iterates.

    Simplex parameters are extrapolated in ``log p`` (back by the softmax), the others
    in NumPyro's unconstrained space. The step length is measured with the simplex
    parameters in their own (constrained) coordinates: a probability EM drives to 0
    (a one-sequence HMM's initial distribution, an unused transition) moves by a nearly
    constant amount in ``log p`` each step, which would make ``||r|| / ||v||`` huge and
    every extrapolation overshoot in the other parameters. Coordinates that are not
    finite, and probabilities already below machine epsilon, take the plain EM value
    ``theta_2``; parameters the EM map left unchanged (frozen, unused) are returned
    exactly.

    Returns:
        ``(params, alpha)``: constrained values and the step length used.
    """
    u0, u1, u2 = (
        {n: _chart(p[n], constraints[n]) for n in params0} for p in (params0, params1, params2)
    )
    dtype = jnp.result_type(step_max)
    floor = jnp.log(jnp.finfo(dtype).eps)
    finite = {}
    for n in u0:
        ok = jnp.isfinite(u0[n]) & jnp.isfinite(u1[n]) & jnp.isfinite(u2[n])
        if _is_simplex(constraints[n]):
            ok = ok & (u2[n] > floor)
        finite[n] = ok
    r = {n: jnp.where(finite[n], u1[n] - u0[n], 0.0) for n in u0}
    v = {n: jnp.where(finite[n], u2[n] - 2 * u1[n] + u0[n], 0.0) for n in u0}
    # Step-length coordinates: the simplex values themselves, the chart otherwise.
    metric_r, metric_v = {}, {}
    for n in u0:
        if _is_simplex(constraints[n]):
            metric_r[n] = params1[n] - params0[n]
            metric_v[n] = params2[n] - 2 * params1[n] + params0[n]
        else:
            metric_r[n], metric_v[n] = r[n], v[n]
    sr2 = sum(jnp.sum(x.astype(dtype) ** 2) for x in metric_r.values())
    sv2 = sum(jnp.sum(x.astype(dtype) ** 2) for x in metric_v.values())
    ratio = jnp.sqrt(sr2 / jnp.where(sv2 > 0, sv2, 1.0))
    alpha = jnp.where(sv2 > 0, jnp.clip(ratio, 1.0, step_max), 1.0)
    params = {}
    for n in params0:
        a = alpha.astype(jnp.result_type(u0[n]))
        u = jnp.where(finite[n], u0[n] + 2 * a * r[n] + a**2 * v[n], u2[n])
        moved = jnp.any(r[n] != 0) | jnp.any(v[n] != 0)
        value = _unchart(u, constraints[n]).astype(jnp.result_type(params2[n]))
        params[n] = jnp.where(moved, value, params2[n])
    return params, alpha


def squarem_step_max(state: SquaremState, alpha, accepted) -> SquaremState:
    """Adapt ``alpha_max``: grow it when a step reached it and was accepted, shrink
    it (not below 1) when such a step was rejected."""
    at_max = alpha >= state.step_max
    grown = state.step_max * SQUAREM_STEP_FACTOR
    shrunk = jnp.maximum(state.step_max / SQUAREM_STEP_FACTOR, 1.0)
    step_max = jnp.where(at_max, jnp.where(accepted, grown, shrunk), state.step_max)
    return SquaremState(step_max, state.num_rejected + (~accepted).astype(jnp.int32))


# -- Anderson acceleration -----------------------------------------------------

ANDERSON_MEMORY = 5
# Bisection steps for the ridge parameter (enough for float64).
_RIDGE_STEPS = 60


class AndersonState(NamedTuple):
    """What Anderson acceleration carries across iterations.

    Vectors are the parameters' unconstrained values (``biject_to``),
    flattened; "the current point" is ``EMState.params``, the last accepted
    one.

    Attributes:
        trial: ``{param name: constrained value}``: where the next iteration
            runs its E-step and M-step (the Anderson point, or the plain EM
            point after a rejection).
        plain: whether ``trial`` is the plain EM point ``F(current)`` (then
            accepted without the test: EM does not lower the likelihood): after
            a rejection, with an empty memory, or where the extrapolation
            stepped back against the EM step.
        log_likelihood: at the current point; ``-inf`` before the first
            iteration.
        image: ``F(current)``, constrained: the fall-back after a rejection.
        started: whether the current point has been evaluated.
        residual: shape ``(n,)``: ``F(current) - current``, zero where either is
            not finite or at its constraint's boundary.
        value: shape ``(n,)``: ``F(current)``, zero there too.
        finite: shape ``(n,)``: where neither is (the coordinates extrapolated).
        residual_diffs: shape ``(m, n)``: ring buffer of differences of
            successive residuals.
        value_diffs: shape ``(m, n)``: the matching differences of ``F``.
        count: valid rows of the ring buffers (0 after a restart).
        position: the row the next difference goes to.
        step_max: the current bound on ``||gamma||`` (starts at 1).
        capped: whether the trial's ``gamma`` reached ``step_max``.
        accepted: whether the last trial was accepted.
        num_rejected: trials rejected by the monotonicity safeguard.
    """

    trial: dict
    plain: jax.Array
    log_likelihood: jax.Array
    image: dict
    started: jax.Array
    residual: jax.Array
    value: jax.Array
    finite: jax.Array
    residual_diffs: jax.Array
    value_diffs: jax.Array
    count: jax.Array
    position: jax.Array
    step_max: jax.Array
    capped: jax.Array
    accepted: jax.Array
    num_rejected: jax.Array


def _flat(params, constraints):
    """Unconstrained values of ``params`` as one vector, where they can be extrapolated,
    and the function undoing the flattening.

    Not extrapolated: non-finite coordinates, and those of a non-identity transform
    beyond ``log(1 / eps)``, where the constrained value has reached its boundary to
    rounding (an emptied mixture weight: NumPyro's stick-breaking inverse clips it to a
    large finite value that jumps with the rounding of the other weights).
    """
    values, usable = {}, {}
    for n, v in params.items():
        transform = biject_to(constraints[n])
        u = transform.inv(v)
        values[n] = u
        bound = -jnp.log(jnp.finfo(jnp.result_type(u)).eps)
        inside = isinstance(transform, IdentityTransform) | (jnp.abs(u) < bound)
        usable[n] = jnp.isfinite(u) & inside
    flat, unflatten = ravel_pytree(values)
    return flat, ravel_pytree(usable)[0].astype(bool), unflatten


def init_anderson(params, constraints, memory: int = ANDERSON_MEMORY) -> AndersonState:
    """Empty memory; the first trial is ``params`` itself."""
    flat, _, _ = _flat(params, constraints)
    n, dtype = flat.shape[0], flat.dtype
    zeros = jnp.zeros((n,), dtype)
    return AndersonState(
        trial=dict(params),
        plain=jnp.array(True),
        log_likelihood=jnp.array(-jnp.inf, dtype),
        image=dict(params),
        started=jnp.array(False),
        residual=zeros,
        value=zeros,
        finite=jnp.zeros((n,), bool),
        residual_diffs=jnp.zeros((memory, n), dtype),
        value_diffs=jnp.zeros((memory, n), dtype),
        count=jnp.zeros((), jnp.int32),
        position=jnp.zeros((), jnp.int32),
        step_max=jnp.ones((), dtype),
        capped=jnp.array(False),
        accepted=jnp.array(True),
        num_rejected=jnp.zeros((), jnp.int32),
    )


def _coefficients(residual_diffs, valid, residual, step_max):
    """``gamma`` minimizing ``||residual - D^T gamma||^2 + lambda ||gamma||^2`` over the
    valid rows ``D`` of ``residual_diffs``, ``lambda >= 0`` the smallest such that
    ``||gamma|| <= step_max``; and whether the bound was reached."""
    a = jnp.where(valid[:, None], residual_diffs, 0.0).T  # (n, m)
    u, s, vt = jnp.linalg.svd(a, full_matrices=False)
    eps = jnp.finfo(a.dtype).eps
    kept = s > eps * max(a.shape) * s[0]
    s = jnp.where(kept, s, 0.0)
    sc = s * (u.T @ residual)
    s2 = s**2

    def norm2(ridge):
        return jnp.sum(jnp.where(kept, (sc / jnp.where(kept, s2 + ridge, 1.0)) ** 2, 0.0))

    capped = norm2(0.0) > step_max**2
    target = jnp.minimum(norm2(0.0), step_max**2)
    # norm2 decreases in lambda from norm2(0) and is below target at sqrt(sum(sc^2) / target).
    high = jnp.sqrt(jnp.sum(sc**2) / jnp.where(target > 0, target, 1.0))

    def bisect(_, bounds):
        low, high = bounds
        mid = 0.5 * (low + high)
        above = norm2(mid) > target
        return jnp.where(above, mid, low), jnp.where(above, high, mid)

    low, high = jax.lax.fori_loop(0, _RIDGE_STEPS, bisect, (jnp.zeros_like(high), high))
    ridge = jnp.where(capped, high, 0.0)
    d = jnp.where(kept, sc / jnp.where(kept, s2 + ridge, 1.0), 0.0)
    return vt.T @ d, capped


def anderson_step(state: AndersonState, log_lik, image, constraints):
    """Take the result of the E-step and M-step at ``state.trial``: accept or reject
    the trial, update the memory, choose the next trial.

    Args:
        state: the `AndersonState` whose ``trial`` was evaluated.
        log_lik: the log-likelihood at ``state.trial``.
        image: the EM map at ``state.trial`` (constrained values).
        constraints: ``{param name: constraint}``.

    Returns:
        The new state; its ``accepted`` says whether the trial is now the
        current point (else the current point stays, and the next trial is the
        plain EM point from it).
    """
    # A plain EM point is kept whatever its value, as plain EM would (a non-finite
    # value then stops the loop as a divergence).
    accepted = state.plain | (
        jnp.isfinite(log_lik) & (log_lik >= state.log_likelihood) & all_finite(image)
    )
    trial, usable_trial, _ = _flat(state.trial, constraints)
    mapped, usable_mapped, unflatten = _flat(image, constraints)
    finite = usable_trial & usable_mapped
    residual = jnp.where(finite, mapped - trial, 0.0)
    value = jnp.where(finite, mapped, 0.0)

    # Memory: the differences to the previous accepted point; cleared on a rejection.
    memory = state.residual_diffs.shape[0]
    both = finite & state.finite
    push = accepted & state.started
    row = state.position
    residual_diffs = jnp.where(
        push,
        state.residual_diffs.at[row].set(jnp.where(both, residual - state.residual, 0.0)),
        state.residual_diffs,
    )
    value_diffs = jnp.where(
        push,
        state.value_diffs.at[row].set(jnp.where(both, value - state.value, 0.0)),
        state.value_diffs,
    )
    count = jnp.where(accepted, jnp.minimum(state.count + push.astype(jnp.int32), memory), 0)
    position = jnp.where(accepted, (row + push.astype(jnp.int32)) % memory, 0)
    grown = jnp.where(
        accepted,
        state.step_max * ANDERSON_STEP_FACTOR,
        jnp.maximum(state.step_max / ANDERSON_STEP_FACTOR, 1.0),
    )
    step_max = jnp.where(state.capped & ~state.plain, grown, state.step_max)

    # The Anderson point from the accepted trial.
    valid = jnp.arange(memory) < count
    gamma, capped = _coefficients(residual_diffs, valid, residual, step_max)
    correction = jnp.where(finite, jnp.where(valid[:, None], value_diffs, 0.0).T @ gamma, 0.0)
    # Stepping back against the EM step heads for a saddle: take the EM point.
    backward = jnp.vdot(correction, residual) > 0
    correction = jnp.where(backward, 0.0, correction)
    point = unflatten(jnp.where(finite, mapped - correction, mapped))
    corrections = unflatten(correction)
    # A param the correction leaves alone (frozen, unused, converged) keeps its EM
    # value exactly rather than a round trip through unconstrained space, and so does
    # one whose extrapolation would move an entry the EM step left unchanged (an
    # emptied weight stays exactly 0: EM cannot revive it, nor may the extrapolation).
    anderson = {}
    for n in image:
        extrapolated = biject_to(constraints[n])(point[n]).astype(jnp.result_type(image[n]))
        pinned = (image[n] == state.trial[n]) & (extrapolated != image[n])
        keep = ~jnp.any(corrections[n] != 0) | jnp.any(pinned)
        anderson[n] = jnp.where(keep, image[n], extrapolated)

    return AndersonState(
        trial=tree_where(accepted, anderson, state.image),
        plain=~accepted | ~jnp.any(correction != 0),
        log_likelihood=jnp.where(accepted, log_lik, state.log_likelihood).astype(
            state.log_likelihood.dtype
        ),
        image=tree_where(accepted, dict(image), state.image),
        started=state.started | accepted,
        residual=jnp.where(accepted, residual, state.residual),
        value=jnp.where(accepted, value, state.value),
        finite=jnp.where(accepted, finite, state.finite),
        residual_diffs=residual_diffs,
        value_diffs=value_diffs,
        count=count,
        position=position,
        step_max=step_max,
        capped=accepted & capped & ~backward & (count > 0),
        accepted=accepted,
        num_rejected=state.num_rejected + (~accepted).astype(jnp.int32),
    )
