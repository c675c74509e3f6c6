"""The gradient M-step: optax on the expected complete-data log-likelihood.

Parameters without a closed-form update take ``m_step_iters`` optax steps on

$$
-Q(\\theta) = -\\sum_f \\langle \\mathrm{sg}(q_f), \\log f(\\theta) \\rangle
$$

in unconstrained space (NumPyro's ``biject_to``), the optimizer state carried
across EM iterations. The step is accepted only if Q did not decrease, so
the log-likelihood stays monotone (generalized EM) whatever the optimizer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from numpyro.distributions.transforms import biject_to

from jaxem.flat_optimizer import flattened
from jaxem.lbfgs_memory import cautious_curvature
from jaxem.tracing import enumerated_trace

__all__ = [
    "ascend",
    "default_optimizer",
    "expected_log_joint",
    "expected_log_joint_and_magnitude",
    "gradient_m_step",
    "safeguarded_steps",
    "strongly_typed",
    "to_unconstrained",
]


def default_optimizer() -> optax.GradientTransformationExtraArgs:
    """L-BFGS with a zoom line search: Q is smooth and deterministic, so a
    quasi-Newton method converges in a few steps where Adam would oscillate; on one
    flat vector of the params (`flattened`), a smaller program than per param."""
    return flattened(optax.lbfgs())


def expected_log_joint(model, params, marginals, args, kwargs, max_plate_nesting):
    """Q(params) = sum over sites of <marginal, log-probability>."""
    return expected_log_joint_and_magnitude(
        model, params, marginals, args, kwargs, max_plate_nesting
    )[0]


def expected_log_joint_and_magnitude(model, params, marginals, args, kwargs, max_plate_nesting):
    """``(Q, sum of |terms|)``: the second sets the rounding error of the first."""
    trace = enumerated_trace(model, params, args, kwargs, max_plate_nesting)
    total, magnitude = 0.0, 0.0
    for name, site in trace.sites.items():
        weight = jax.lax.stop_gradient(marginals[name])
        term = jnp.where(weight > 0, weight * site.log_prob, 0.0)
        total = total + jnp.sum(term)
        magnitude = magnitude + jnp.sum(jnp.abs(term))
    return total, jax.lax.stop_gradient(magnitude)


def to_unconstrained(params, constraints, names):
    return {n: biject_to(constraints[n]).inv(params[n]) for n in names}


def gradient_names(plan) -> list:
    """The params an M-step plan (`jaxem.mstep.plan_m_step`) updates by optax steps."""
    return [n for n, path in plan.items() if path.kind == "gradient"]


def init_opt_state(optimizer, params, constraints, plan):
    """Optax state over the unconstrained values of the plan's gradient-path params
    (``()`` when every param has a closed form, is frozen or unused)."""
    names = gradient_names(plan)
    if not names:
        return ()
    return strongly_typed(optimizer.init(to_unconstrained(params, constraints, names)))


def strongly_typed(opt_state):
    """An optax state with every leaf a strongly typed array.

    Python scalars in an initial state (L-BFGS's line-search info) enter a compiled
    step weakly typed and leave it strongly typed: the second ``update`` would
    compile again.
    """
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.result_type(x)), opt_state)


def gradient_m_step(
    model, params, marginals, plan, structure, optimizer, opt_state, num_steps, args, kwargs
):
    """Take ``num_steps`` optax steps on -Q for the plan's gradient-path parameters.

    Returns:
        ``(params, opt_state)``, both unchanged when the plan has no gradient path.
    """
    names = gradient_names(plan)
    if not names:
        return params, opt_state

    def objective(values):
        return expected_log_joint(
            model, values, marginals, args, kwargs, structure.max_plate_nesting
        )

    return ascend(objective, params, names, structure.constraints, optimizer, opt_state, num_steps)


def ascend(objective, params, names, constraints, optimizer, opt_state, num_steps):
    """``num_steps`` optax steps up ``objective`` (``{param: constrained value} ->
    scalar``) in the unconstrained values of the params ``names``, the others held
    (`safeguarded_steps`): ``(params, opt_state)``. The gradient path of every
    fitter: `gradient_m_step` on Q, `jaxem.vb_params` on the ELBO of variational
    Bayes EM."""
    transforms = {n: biject_to(constraints[n]) for n in names}

    def constrained(unconstrained):
        return {**params, **{n: transforms[n](u) for n, u in unconstrained.items()}}

    def loss(unconstrained):
        return -objective(constrained(unconstrained))

    start = to_unconstrained(params, constraints, names)
    chosen, opt_state = safeguarded_steps(loss, start, optimizer, opt_state, num_steps)
    return constrained(chosen), opt_state


def safeguarded_steps(loss_fn, start, optimizer, opt_state, num_steps):
    """Take ``num_steps`` optax steps on ``loss_fn`` from ``start``, kept only if
    the loss did not increase (so the objective of the enclosing EM loop stays
    monotone whatever the optimizer).

    L-BFGS memories keep no pairs of rounding noise (`cautious_curvature`).

    The losses compared come from one compiled program, the value and gradient in
    the body of a scan of ``num_steps + 1`` evaluations (the last takes no step):
    no separate loss programs to compile, whose rounding could tip the comparison.

    Returns:
        ``(chosen, opt_state)``: the end point and the optimizer state after the
        steps, or ``start`` and the incoming state (its L-BFGS memory cleaned) when
        the steps were rejected.
    """

    opt_state = cautious_curvature(opt_state, start)

    def evaluate(carry, index):
        point, state = carry
        value, grad = jax.value_and_grad(loss_fn)(point)

        def advance(state):
            updates, state = optimizer.update(
                grad, state, point, value=value, grad=grad, value_fn=loss_fn
            )
            return optax.apply_updates(point, updates), cautious_curvature(state)

        carry = jax.lax.cond(index < num_steps, advance, lambda s: (point, s), state)
        return carry, value

    (end, end_state), losses = jax.lax.scan(evaluate, (start, opt_state), jnp.arange(num_steps + 1))
    start_loss, end_loss = losses[0], losses[-1]
    accept = jnp.isfinite(end_loss) & (end_loss <= start_loss)
    # A rejected trajectory's optimizer state (momenta, curvature pairs) is
    # dropped with it: it may hold the non-finite values that got it rejected.
    chosen, state = jax.tree.map(
        lambda a, b: jnp.where(accept, a, b), (end, end_state), (start, opt_state)
    )
    # A state that is non-finite all the same (handed in so) would reject every
    # later step: start the optimizer afresh.
    finite = jnp.all(
        jnp.stack(
            [
                jnp.all(jnp.isfinite(x))
                for x in jax.tree.leaves(state)
                if jnp.issubdtype(x.dtype, jnp.inexact)
            ]
            or [jnp.array(True)]
        )
    )
    fresh = optimizer.init(chosen)
    state = jax.tree.map(lambda a, b: jnp.where(finite, a, b), state, fresh)
    return chosen, state
