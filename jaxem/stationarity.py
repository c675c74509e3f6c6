"""How far params are from a stationary point: the gain a step would still make.

EM and variational EM end a fit with `stationarity`: by Fisher's identity the
gradient of the log-likelihood (of the ELBO) at the params is the gradient of Q
under the last E-step's marginals, and Q evaluated along a few directions from
there says how much the log-likelihood could still rise, in nats. `converged`
and the unbounded-likelihood warnings are read from it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from numpyro.distributions.transforms import biject_to

from jaxem.gradient import expected_log_joint_and_magnitude

__all__ = ["stationarity"]


def stationarity(
    model, params, marginals, names, constraints, args, kwargs, max_plate_nesting, objective=None
):
    """How far ``params`` are from a stationary point, from the E-step's marginals.

    By Fisher's identity the gradient of the log-likelihood (of the ELBO, for a
    variational q) at ``params`` is the gradient ``g`` of Q, the expected
    complete-data log-likelihood under ``marginals``. Its scale is set by Q's
    curvature along it, ``g^T H g`` (a central difference of the gradient along
    ``g``): the exact line
    search along ``g`` on Q's quadratic model raises Q, and so (by the EM
    inequality) the log-likelihood, by

    $$
    \\delta = \\frac{\\lVert g \\rVert^4}{2\\, |g^T H g|},
    $$

    a gain in nats, whatever the units of the data or of the parameters. A
    param with an entry on its constraint's boundary (a weight exactly 0: its
    unconstrained value is infinite) is left out, as EM leaves it there.

    The line along ``g`` misses a gain when ``H`` is ill-conditioned: a component
    collapsing onto tied points has a location whose curvature is ~ n / scale^2
    (1e24 at a scale of 1e-12), so a gradient entry of 1e-5 there dominates
    ``g^T H g`` and hides the entries along which Q still rises linearly without
    bound (minus the number of ties, in log scale). So the gain is also taken along
    the Jacobi-preconditioned gradient ``p_i = g_i |g_i / (H g)_i|`` (``H g`` from
    the same differences; one more central difference gives ``p^T H p``), with the
    step limited to moving no coordinate by more than `TRUST_REACH` times
    ``1 + |u_i|``: the gain of the best step along ``p`` on Q's quadratic model
    within that region. Both are gains Q's quadratic model can make, so the
    larger is still a lower bound of what a Newton step would gain. When the model
    along ``p`` does not level off within the region (its curvature is not
    negative enough to stop the step), Q rises without bound there as far as the
    model can tell (its maximum along ``p`` lies beyond `UNBOUNDED_REACH` trust
    regions, or nowhere). The params reported in ``unbounded`` are those carrying ``p``
    along whose own part of ``p`` Q, evaluated `FAR_REACH` trust regions out, still
    rose at least half as much as its slope there promised: the rise has no end along
    them (a collapsing log-scale), where it ends beyond the trust region along the
    others (a log-df of 1e-10 rises until df is about 1), or Q falls (a location a few
    ulps off the ties its scale collapsed onto: a gradient of 1e15 gives it all of
    ``p``). Where no carrier passes, they are the params whose own block (below)
    rose without levelling off, the largest rises; where none did either, the
    carriers of ``p``.

    Both directions can miss a param whose curvature is far below the others': a
    location near 0 with data at 1e3 (curvature 1e-6 beside log-scales' 50) has an
    ``H g`` entry made of cross terms and a trust region of ``1 + |u|`` = 2 where its
    Newton step is 3e3. So for each param ``b`` the curvature along its own block
    ``g_b`` of ``g`` is taken too, and Q is *evaluated* at the block's Newton step
    (within the trust region where Q is not concave along it): a rise beyond Q's
    rounding is a gain the log-likelihood makes (the EM inequality), whatever the
    quadratic model's accuracy; then twice at the secant Newton step from the curvature
    between ``u`` and the last step (`SECANT_EXPANSION` times farther where that is
    rounding too). A block that levels off at the first (Q rose, and every coordinate's
    slope fell to half its value at ``u``) is not ``unbounded``.

    Args:
        names: the params to differentiate (the free ones).
        constraints: ``{param name: constraint}``.
        objective: ``{param: constrained value} -> scalar`` in place of Q from
            ``model`` and ``marginals`` (variational Bayes EM's ELBO in its params,
            q held: `jaxem.vb_params`).

    Returns:
        ``(gradient, gain, unbounded, gains)``: ``{name: dQ / d unconstrained
        value}`` (zero for a param left out), ``delta`` (``inf`` where ``g`` is not
        finite or Q is not concave along it; at least the gain along ``p`` and every
        block's evaluated rise), ``{name: bool}``, True for a param that carries the
        direction ``p`` along which Q's rise does not level off, and ``{name: rise}``,
        Q's evaluated rise along the param's block (0 where none beyond rounding).
    """
    dtype = jnp.result_type(float)
    if not names:
        return {}, jnp.zeros((), dtype), {}, {}
    transforms = {n: biject_to(constraints[n]) for n in names}
    start = {n: transforms[n].inv(params[n]) for n in names}
    inside = {n: jnp.all(jnp.isfinite(u)) for n, u in start.items()}
    start = {n: jnp.where(inside[n], u, 0.0) for n, u in start.items()}

    # The search runs on ONE flat vector of every param's unconstrained entries
    # (``ravel_pytree``): its bookkeeping between the evaluations (directions, steps,
    # differences) is a few operations on that vector, not a copy of them per param,
    # which makes its compiled program a third smaller. ``block``: each entry's param (its index in
    # ``names``); ``entry_inside``: whether its param's start is finite.
    u, unravel = ravel_pytree(start)
    block, _ = ravel_pytree({n: jnp.full(jnp.shape(start[n]), i) for i, n in enumerate(names)})
    entry_inside, _ = ravel_pytree({n: jnp.full(jnp.shape(start[n]), inside[n]) for n in names})
    entry_inside = entry_inside.astype(bool)
    scale = 1.0 + jnp.abs(u)

    def q(flat):
        unconstrained = unravel(flat)
        values = {
            n: jnp.where(inside[n], transforms[n](x), params[n]) for n, x in unconstrained.items()
        }
        if objective is not None:
            # No terms to sum: the objective's own size sets its rounding slack.
            value = objective({**params, **values})
            return value, jax.lax.stop_gradient(jnp.abs(value))
        return expected_log_joint_and_magnitude(
            model, {**params, **values}, marginals, args, kwargs, max_plate_nesting
        )

    value_and_grad_fn = jax.value_and_grad(q, has_aux=True)

    # g^T H g by a central difference of the gradient along g: the gradient at u and
    # at u +- h g, then p^T H p at u +- h' p, then for each param b the curvature along
    # its own block g_b of g (u +- h_b g_b), Q at the Newton step along g_b and Q
    # FAR_REACH trust regions along its block of p: all
    # evaluations of ONE compiled value and gradient (the steps of a scan). A
    # Hessian-vector product (forward-over-reverse) is exact but its program is 2.5
    # times the gradient's, and every fit's compile time pays for it; the gain is an
    # order-of-magnitude test, which a relative error of order eps^(2/3) does not move.
    # The step h along a direction moves no coordinate by more than eps^(1/3) (the
    # optimum for a central difference) relative to its own size (at least 1): a
    # log-scale next to a location of 1e8 moves on its own scale, not the location's.
    relative_step = jnp.finfo(dtype).eps ** (1.0 / 3.0)

    def reach_of(direction):
        return jnp.max(jnp.abs(direction) / scale, initial=0.0)

    def safe(x):
        return jnp.where(x > 0, x, 1.0)

    def evaluate(carry, step):
        direction, first_gradient, plus, block_plus, block_t, preconditioned, secant_t = carry
        sign, index = step
        # Steps 5 + 6 b + j: the block of param b (j = 0, 1: +- h_b; j = 2: Newton; j =
        # 3: FAR_REACH trust regions along the block's part of p; j = 4, 5: secant steps).
        in_blocks = index >= 5
        b, j = (index - 5) // 6, (index - 5) % 6
        own = jnp.where(j == 3, preconditioned, first_gradient)
        direction = jnp.where(in_blocks, jnp.where(block == b, own, 0.0), direction)
        reach = reach_of(direction)
        h = jnp.where(reach > 0, relative_step / safe(reach), 0.0)
        far = jnp.where(reach > 0, FAR_REACH * TRUST_REACH / safe(reach), 0.0)
        block_offset = jnp.stack([sign * h, sign * h, block_t, far, secant_t, secant_t])[j]
        offset = jnp.where(in_blocks, block_offset, sign * h)
        (value, magnitude), g = value_and_grad_fn(u + offset * direction)
        g = jnp.where(entry_inside, g, 0.0)
        finite_g = jnp.where(jnp.isfinite(g), g, 0.0)
        # Step 0 gives the gradient, the direction of steps 1 and 2; step 2 completes
        # H g, from which the preconditioned direction of steps 3 and 4 follows.
        first_gradient = jnp.where(index == 0, finite_g, first_gradient)
        plus = jnp.where(index == 1, g, plus)
        hg = (plus - g) / (2.0 * safe(h))
        # A coordinate that the step along g moved by less than eps^(2/3) of its size
        # has an H g entry of rounding and cross terms only (a weight's gradient of
        # 1e-15 did not move it at all): it takes no part in the preconditioned one.
        resolved = jnp.abs(first_gradient) / scale >= relative_step * reach_of(first_gradient)
        preconditioned = jnp.where(
            index == 2, _jacobi_direction(first_gradient, hg, resolved), preconditioned
        )
        new_direction = jnp.where(
            index == 0, finite_g, jnp.where(index == 2, preconditioned, direction)
        )
        # The block's Newton step from its curvature (j = 1), or the trust region's
        # bound where Q is not concave along it: step j = 2 evaluates Q there.
        block_plus = jnp.where(in_blocks & (j == 0), g, block_plus)
        curvature = jnp.vdot(direction, block_plus - g) / (2.0 * safe(h))
        squared = jnp.vdot(direction, direction)
        concave = curvature < 0
        t = jnp.where(
            concave,
            squared / jnp.where(concave, -curvature, 1.0),
            TRUST_REACH / safe(reach),
        )
        t = jnp.where((reach > 0) & jnp.isfinite(t), t, 0.0)
        block_t = jnp.where(in_blocks & (j == 1), t.astype(block_t.dtype), block_t)
        # The secant steps (j = 4, 5) from the curvature between u and step j = 2 (then 4).
        change = jnp.vdot(direction, g - first_gradient)
        resolved = jnp.abs(change) > ROUNDING_ULPS * jnp.finfo(dtype).eps * squared
        newton = squared * safe(offset) / jnp.where(change < 0, -change, 1.0)
        newton = jnp.where(resolved, newton, offset * SECANT_EXPANSION)
        newton = jnp.where((~resolved | (change < 0)) & jnp.isfinite(newton), newton, 0.0)
        secant_t = jnp.where(in_blocks & (j % 2 == 0) & (j > 0), newton, secant_t).astype(dtype)
        model_gain = jnp.where(concave, 0.5 * t * squared, t * squared)
        carry = (new_direction, first_gradient, plus, block_plus, block_t, preconditioned, secant_t)
        return carry, (
            g,
            h,
            direction,
            jnp.asarray(value, dtype),
            jnp.asarray(magnitude, dtype),
            jnp.asarray(model_gain, dtype) * (concave | ~in_blocks),
        )

    zeros = jnp.zeros_like(u)
    num_steps = 5 + 6 * len(names)
    signs = jnp.asarray([0.0, 1.0, -1.0, 1.0, -1.0] + [1.0, -1.0, 0, 0, 0, 0] * len(names), dtype)
    _, (grads, hs, directions, values, magnitudes, model_gains) = jax.lax.scan(
        evaluate,
        (zeros, zeros, zeros, zeros, jnp.zeros((), dtype), zeros, jnp.zeros((), dtype)),
        (signs, jnp.arange(num_steps)),
    )
    gradient = unravel(grads[0])
    finite = jnp.all(jnp.isfinite(grads[0]))

    def curvature(direction, h, plus, minus):
        # A difference that is not finite makes it NaN.
        return jnp.vdot(direction, plus - minus) / (2.0 * safe(h))

    g_dir = directions[1]
    gg = jnp.vdot(g_dir, g_dir)
    ghg = curvature(g_dir, hs[1], grads[1], grads[2])
    gain = jnp.where(ghg < 0, gg**2 / (-2.0 * jnp.where(ghg < 0, ghg, -1.0)), jnp.inf)
    gain = jnp.where(gg == 0, 0.0, gain)

    p = directions[3]
    slope = jnp.vdot(g_dir, p)  # >= 0: p_i has g_i's sign
    php = curvature(p, hs[3], grads[3], grads[4])
    reach = reach_of(p)
    limit = TRUST_REACH / safe(reach)
    concave = php < 0
    newton_step = slope / jnp.where(concave, -php, 1.0)
    levels_off = concave & (newton_step < limit)
    t = jnp.where(levels_off, newton_step, limit)
    gain_p = t * slope - 0.5 * t**2 * jnp.where(concave, -php, 0.0)
    gain_p = jnp.where((reach > 0) & (slope > 0), gain_p, 0.0)
    # Along each param's own block of g, Q's rise at the block's Newton step, evaluated
    # (not modelled): a gain that the EM inequality passes on to the log-likelihood,
    # beyond Q's rounding. The block's curvature is free of the other blocks' cross
    # terms, which make H g (and so p) miss a location whose curvature is 1e-6 beside
    # log-scales of curvature 50 (data at 1e3: the location 3e3 short of the data's
    # mean, a gain of 18 nats, seen as 0.01); and the step has no trust region in the
    # coordinate's units (1 + |u|), which at a location near 0 is 2, not 3e3.
    eps = jnp.finfo(u.dtype).eps

    def rise(at, magnitude):  # Q's rise at each block's step ``at``, beyond rounding
        up = values[at::6] - values[0]
        return jnp.where(jnp.isfinite(up) & (up > ROUNDING_ULPS * eps * magnitude), up, 0.0)

    # (A secant step may go far, where Q's terms, and so its rounding, are larger.)
    rises = rise(7, magnitudes[0])
    far_rises = [rise(at, jnp.maximum(magnitudes[0], magnitudes[at::6])) for at in (9, 10)]
    secant_rises = jnp.maximum(*far_rises)
    gain = jnp.maximum(jnp.maximum(gain, gain_p), jnp.max(jnp.maximum(rises, secant_rises)))

    # A block levels off where its concave quadratic model says: Q rose there, and
    # every coordinate's slope fell to at most half its slope at u (on a linear rise,
    # a collapsing scale's, that coordinate's slope stays, whatever the block's other
    # coordinates do).
    start_slope, end_slope = directions[7::6], grads[7::6]
    kept = (start_slope == 0) | (jnp.abs(end_slope) <= 0.5 * jnp.abs(start_slope))
    levelled = jnp.all(kept, axis=1)
    confirmed = (model_gains[6::6] > 0) & (rises > 0) & levelled
    # Unbounded as far as the model can tell: Q is not concave along p, or so nearly
    # linear that its maximum along p lies far beyond the trust region (a distant
    # optimum, merely outside it, is not enough).
    rising = (reach > 0) & (slope > 0) & ~(concave & (newton_step < UNBOUNDED_REACH * limit))
    # The params to bound. p follows the gradient's size, and so does the step h that
    # resolves its coordinates: a location a few ulps off the ties its scale collapsed
    # onto has a gradient of 1e15 and all of p (no other coordinate resolved), yet Q
    # falls along it; where two coordinates are both linear (a collapsed log-scale, a
    # log-df of 1e-10, both rising in their own units), p shares itself between them,
    # yet only the scale's rise has no end. So each param carrying p is credited only
    # where Q, evaluated FAR_REACH trust regions along its own part of p, still rose
    # at least half as fast as the slope promised (a rise that ends, ends within a few
    # of its own trust regions: a log-df's, once df reaches 1). Where none did, the
    # params whose own block rose without levelling off, by the rise; where none did
    # either, p's carriers as they are.
    p_blocks = directions[8::6]
    far_step = FAR_REACH * TRUST_REACH / jax.vmap(lambda d: safe(reach_of(d)))(p_blocks)
    promised = far_step * (p_blocks @ g_dir)
    keeps_rising = (promised > 0) & (values[8::6] - values[0] >= 0.5 * promised)
    share = jnp.abs(p) / scale
    carries = jnp.stack(
        [jnp.max(jnp.where(block == i, share, 0.0), initial=0.0) for i in range(len(names))]
    ) >= 0.1 * safe(reach)
    carries = carries & ~confirmed
    own = jnp.where((rises > 0) & ~levelled, rises, 0.0)
    credited = jnp.where(
        jnp.any(carries & keeps_rising),
        carries & keeps_rising,
        jnp.where(jnp.max(own) > 0, own >= 0.1 * jnp.max(own), carries),
    )
    unbounded = {n: rising & credited[i] for i, n in enumerate(names)}
    gains = {n: jnp.maximum(rises[i], secant_rises[i]) for i, n in enumerate(names)}
    return gradient, jnp.where(finite, gain, jnp.inf), unbounded, gains


# The region within which the gain along the preconditioned gradient is taken: no
# coordinate u_i moves by more than this times 1 + |u_i| (a log-scale by 1 + |log
# scale|; the curvature measured at u says nothing certain much farther out).
TRUST_REACH = 1.0

# Q along the preconditioned gradient rises "without levelling off" when its quadratic
# model's maximum lies beyond this many trust regions (or nowhere): on 12 tied points a
# collapsed scale's log has curvature ~0 (rounding) against a slope of -12.
UNBOUNDED_REACH = 100.0

# A secant step whose gradient difference is rounding is taken this many times farther (in
# float32 a location at 0, data at 1e8, moved 2 changes its gradient by 5e-8 of itself).
SECANT_EXPANSION = 1e3

# How far along its own part of p a param's rise is evaluated, in trust regions, to
# tell a rise without end (a collapsing log-scale's: linear, for ever) from one that
# ends beyond the trust region (a log-df of 1e-10 rises linearly until df is about 1,
# |u| = 1 trust region away: 4 promise 4 times the rise it makes). A log-scale of -25
# moved by 4 of its trust regions is -129: in float64 a scale of 1e-56.
FAR_REACH = 4.0

# Q's rise along a block counts beyond this many eps times the sum of the magnitudes of
# its terms (each term's log-probability rounded to a few eps of itself, their sum by
# up to log2(n) more).
ROUNDING_ULPS = 64.0


def _jacobi_direction(gradient, hg, resolved):
    """(Flat vectors.) ``g_i |g_i / (H g)_i|``, scaled so that its largest weight is 1: the gradient
    with each coordinate divided by its curvature as ``H g`` estimates it (exact for
    a diagonal ``H``). Coordinates where ``H g`` is 0 and ``g`` is not (Q linear
    along them) take the whole direction; a non-finite ``H g``, or a coordinate not
    ``resolved`` by the difference, gives weight 0."""
    g = jnp.where(resolved, gradient, 0.0)
    magnitude = jnp.abs(hg)
    flat = (magnitude == 0) & (g != 0)
    value = jnp.abs(g) / jnp.where(magnitude > 0, magnitude, 1.0)
    value = jnp.where(flat, jnp.inf, jnp.where(magnitude > 0, value, 0.0))
    ratio = jnp.where(jnp.isnan(hg) | jnp.isinf(hg), 0.0, value)
    largest = jnp.max(ratio, initial=0.0)
    weights = jnp.where(
        jnp.isinf(largest),
        jnp.isinf(ratio).astype(ratio.dtype),
        ratio / jnp.where(largest > 0, largest, 1.0),
    )
    return gradient * weights
