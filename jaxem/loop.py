"""The fit loop shared by ``EM``, ``VariationalEM`` and ``OnlineEM``.

Initial parameters; ``run``'s compiled ``lax.while_loop``
with its convergence test, divergence guard and history; restarts under
``vmap`` with the best one kept; the progress bar the compiled loop advances.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxem.arguments import merge_args, merge_init_params
from jaxem.batching import best_restart
from jaxem.exceptions import ModelError
from jaxem.inspection import inspect_model
from jaxem.validation import good_values, raise_for_bad_values

__all__ = [
    "JUMP_FACTOR",
    "STATIONARITY_FACTOR",
    "LoopCarry",
    "LoopResult",
    "all_finite",
    "best_restart",
    "check_initial_values",
    "credible",
    "finish_iterate",
    "initial_params",
    "iterate",
    "iterate_until_done",
    "loop_key",
    "raise_for_gradient",
    "refuse_differentiation",
    "run_with_progress",
    "stationary",
    "static_facts",
    "tree_where",
    "upper_bound",
]


def tree_where(condition, a, b):
    """``a`` where ``condition`` holds, else ``b``, leaf by leaf."""
    return jax.tree.map(lambda x, y: jnp.where(condition, x, y), a, b)


def all_finite(tree) -> jax.Array:
    """Whether every entry of every leaf is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


# -- set-up ------------------------------------------------------------------


def initial_params(model, frozen: Sequence[str], rng_key, arrays, spec, init_params):
    """The model's structure and its params' initial values, ``init_params`` overriding
    the ``numpyro.param`` ones; a named error for frozen names that are not params."""
    args, kwargs = merge_args(arrays, spec)
    structure, params = inspect_model(model, rng_key, args, kwargs)
    unknown = set(frozen) - set(structure.param_names)
    if unknown:
        raise ModelError(f"jaxem: frozen names {sorted(unknown)} are not params of the model.")
    return structure, merge_init_params(params, init_params)


def check_initial_values(model, rng_key, arrays, spec, init_params) -> None:
    """A named error for an ``init_params`` value outside its param's constraint or
    its global site's prior support (concrete inputs; draws from a prior lie inside)."""
    if init_params:
        structure, params = initial_params(model, (), rng_key, arrays, spec, init_params)
        raise_for_bad_values(structure, good_values(structure, params))


# -- the compiled loop --------------------------------------------------------

# An iteration whose gain in the objective exceeds this many times the largest gain
# before it is a numerical breakdown, not an EM step (see `iterate`).
JUMP_FACTOR = 1e3


class LoopResult(NamedTuple):
    """What `iterate` ends with.

    Attributes:
        state: the last state; after a divergence, the last state whose value
            was finite and credible.
        history: shape ``(max_iter,)``: the value of every iteration, NaN after
            ``num_iters``.
        num_iters: number of updates done (a rejected one not counted).
        converged: whether the relative change of the value fell below ``tol``.
        diverged: whether the loop stopped on a value or parameter that was not
            finite or not credible, or the final state's was not.
        value: ``final_fn(state)``'s value.
        aux: ``final_fn(state)``'s auxiliary output.
    """

    state: Any
    history: jax.Array
    num_iters: jax.Array
    converged: jax.Array
    diverged: jax.Array
    value: jax.Array
    aux: Any


class LoopCarry(NamedTuple):
    """What `iterate_until_done` ends with, `finish_iterate` starts from."""

    state: Any
    good: Any
    history: jax.Array
    i: jax.Array
    previous: jax.Array
    max_gain: jax.Array
    converged: jax.Array
    diverged: jax.Array
    # Whether the last step moved (see iterate's step_fn).
    moved: jax.Array


def loop_key(rng_key):
    """The key a restart's loop derives its per-iteration keys from
    (`iterate`): apart from ``rng_key`` itself, which draws the initial
    values, so that those stay what ``init(rng_key)`` gives."""
    return jax.random.split(rng_key)[1]


def upper_bound(trace):
    """The largest log-likelihood a model can have, with a margin for rounding: 0
    when every observed site is discrete (a log-probability), else None (a density
    has no bound). ``trace``: an enumerated trace (its log-probabilities unused)."""
    observed = [site for site in trace.sites.values() if site.is_observed]
    if not observed or not all(getattr(site.fn.support, "is_discrete", False) for site in observed):
        return None
    cells = sum(int(np.size(site.value)) for site in observed)
    return float(np.sqrt(np.finfo(jnp.result_type(float)).eps)) * cells


def static_facts(fn: Callable, *args):
    """``fn(*args)``, a result built from static facts only (shapes, site kinds, the
    support of a distribution), computed on abstract values: nothing ``fn`` traces
    is staged into the program being compiled around it."""
    found = []
    jax.eval_shape(lambda *a: found.append(fn(*a)), *args)
    return found[0]


def credible(value, previous, max_gain, upper_bound=None):
    """Whether ``value`` is finite and could come from an EM step after ``previous``.

    Not credible: a value above ``upper_bound`` (a log-likelihood of discrete
    observations is at most 0), and a gain ``value - previous`` more than
    `JUMP_FACTOR` times ``max_gain``, the largest gain before it. EM's gains
    shrink as it converges (geometrically near a maximum) and grow only gradually
    away from a saddle point, so a gain a thousand times every earlier one is a
    density evaluated where its rounding error dominates (a variance collapsing to
    0, a Student-t ``df`` running to 1e16) rather than progress.
    """
    ok = jnp.isfinite(value)
    ok = ok & ~((max_gain > 0) & (value - previous > JUMP_FACTOR * max_gain))
    if upper_bound is not None:
        ok = ok & (value <= upper_bound)
    return ok


_PROGRESS_BARS: list = []


def _report_progress(iteration) -> None:
    if _PROGRESS_BARS:
        bar = _PROGRESS_BARS[-1]
        bar.n = max(bar.n, int(np.max(iteration)))
        bar.refresh()


def iterate(
    step_fn: Callable,
    rng_key,
    state,
    checked_fn: Callable,
    *,
    final_fn: Callable,
    max_iter: int,
    tol,
    progress_bar: bool,
    upper_bound=None,
) -> LoopResult:
    """Run ``step_fn`` in a ``lax.while_loop`` until convergence or ``max_iter``.

    Every value is checked (`credible`): one that is not finite, above
    ``upper_bound`` or a jump no EM step makes stops the loop as a divergence,
    and the state before it is kept. After the loop ``final_fn`` evaluates the
    last state (the output of the last update, which no iteration evaluated);
    if its value fails the same checks, the run is a divergence too and the
    state before the last update is returned.

    Args:
        step_fn: a kernel's step ([`jaxem.kernel`][jaxem.kernel]), its data bound:
            ``(rng_key, state) -> (new_state, info)``, ``info.objective`` the
            objective at ``state``'s params and ``info.moved`` whether
            ``new_state``'s params are a new point. After a step that did not
            move (an accelerated step its safeguard rejected), the next
            objective repeats this one and its convergence test is skipped.
        rng_key: the run's key; iteration ``i`` gets
            ``jax.random.fold_in(rng_key, i)`` (ignored by an exact E-step).
        state: the initial state.
        checked_fn: ``state -> pytree`` whose leaves must all be finite after
            an update; otherwise the loop stops (diverged) and keeps the state
            before.
        final_fn: ``state -> (value, aux)``: the objective at a state's params.
        max_iter: maximum number of updates.
        tol: stop when ``|value_t - value_{t-1}| <= tol * |value_t|``; 0 runs
            exactly ``max_iter`` updates, even at a fixed point.
        progress_bar: advance the bar of `run_with_progress`.
        upper_bound: a value no state can exceed (None: no bound).

    Returns:
        A `LoopResult`.
    """
    carry = iterate_until_done(
        step_fn,
        rng_key,
        state,
        checked_fn,
        max_iter=max_iter,
        tol=tol,
        progress_bar=progress_bar,
        upper_bound=upper_bound,
    )
    return finish_iterate(carry, final_fn, upper_bound)


def iterate_until_done(
    step_fn, rng_key, state, checked_fn, *, max_iter, tol, progress_bar, upper_bound=None
) -> LoopCarry:
    """`iterate`'s ``lax.while_loop`` alone (its arguments): the `LoopCarry` it stops
    with, which `finish_iterate` evaluates. Apart, the two can be compiled as two
    programs (see `jaxem.compiling.compile_together`)."""
    dtype = jnp.result_type(float)

    def cond(c):
        return (c.i < max_iter) & ~c.converged & ~c.diverged

    def body(c):
        new_state, info = step_fn(jax.random.fold_in(rng_key, c.i), c.state)
        value = info.objective.astype(dtype)
        finite = credible(value, c.previous, c.max_gain, upper_bound)
        ok = finite & all_finite(checked_fn(new_state))
        change = jnp.abs(value - c.previous)
        converged = ok & (c.i > 0) & (tol > 0) & (change <= tol * jnp.abs(value)) & c.moved
        if progress_bar:
            jax.debug.callback(_report_progress, c.i + 1)
        gain = jnp.where((c.i > 0) & finite, value - c.previous, 0.0)
        return LoopCarry(
            state=tree_where(ok, new_state, c.state),
            good=tree_where(finite, c.state, c.good),
            history=c.history.at[c.i].set(value),
            i=c.i + 1,
            previous=value,
            max_gain=jnp.maximum(c.max_gain, gain),
            converged=converged,
            diverged=~ok,
            moved=jnp.asarray(info.moved, bool),
        )

    carry = LoopCarry(
        state=state,
        good=state,
        history=jnp.full((max_iter,), jnp.nan, dtype),
        i=jnp.zeros((), jnp.int32),
        previous=jnp.array(jnp.nan, dtype),
        max_gain=jnp.zeros((), dtype),
        converged=jnp.array(False),
        diverged=jnp.array(False),
        moved=jnp.array(True),
    )
    return jax.lax.while_loop(cond, body, carry)


def finish_iterate(carry: LoopCarry, final_fn: Callable, upper_bound=None) -> LoopResult:
    """`iterate`'s end: ``final_fn`` evaluates the loop's last state (and the one
    before it), a last value that is not credible makes a divergence."""
    dtype = jnp.result_type(float)
    last = tree_where(carry.diverged, carry.good, carry.state)
    # The last state and the one before it are evaluated by one compiled final_fn (the
    # two steps of a lax.map): two call sites would compile the E-step twice more.
    values, auxes = jax.lax.map(
        final_fn, jax.tree.map(lambda a, b: jnp.stack([a, b]), last, carry.good)
    )
    values = values.astype(dtype)
    value = values[0]
    # The last update's output: its params were checked in the loop, its value was not.
    previous = jnp.where(carry.diverged, jnp.nan, carry.previous)
    bad = ~carry.diverged & ~credible(value, previous, carry.max_gain, upper_bound)
    state = tree_where(bad, carry.good, last)
    value, aux = jax.tree.map(lambda x: jnp.where(bad, x[1], x[0]), (values, auxes))
    diverged = carry.diverged | bad
    return LoopResult(
        state=state,
        history=carry.history,
        num_iters=carry.i - diverged.astype(carry.i.dtype),
        converged=carry.converged & ~bad,
        diverged=diverged,
        value=value,
        aux=aux,
    )


def stationary(gain, value, tol):
    """Whether the gain still to be had along the gradient (see
    `jaxem.stationarity.stationarity`) is negligible: at most
    `STATIONARITY_FACTOR` times what the convergence test allows per
    iteration, ``tol * |value|`` (``|value|`` at least 1)."""
    return gain <= STATIONARITY_FACTOR * tol * jnp.maximum(jnp.abs(value), 1.0)


# A fit whose gradient step would gain more than this many times ``tol * |value|`` is
# not at a stationary point. EM converging at rate r still has about
# ``change / (1 - r)`` to gain when its change falls below ``tol * |value|``; 100
# tolerates r up to 0.99 and catches a run that stopped because its M-step made no
# progress (every gradient step rejected), far from a maximum.
STATIONARITY_FACTOR = 100.0


# -- run ----------------------------------------------------------------------


_NOT_DIFFERENTIABLE = (
    "jaxem: {name}.run cannot be differentiated (jax.grad, jax.jvp): its loop stops on a "
    "data-dependent test, and differentiating through it would not give the derivative of "
    "the fitted parameters (implicit differentiation of the fixed point is not implemented). "
    "Differentiate jaxem.log_likelihood at result.params instead (at a maximum its "
    "derivative in the data is the total one), or unroll a fixed number of {name}.update "
    "calls."
)


def refuse_differentiation(tree, name: str):
    """``tree`` itself; differentiating through it raises a ``TypeError`` saying why."""

    @jax.custom_jvp
    def identity(tree):
        return tree

    @identity.defjvp
    def _refuse(primals, tangents):
        raise TypeError(_NOT_DIFFERENTIABLE.format(name=name))

    return identity(tree)


def raise_for_gradient(gradient, paths, *, objective: str = "log-likelihood", at: str) -> None:
    """A `ModelError` naming the gradient-path params whose
    gradient (``{name: gradient}``, concrete) is not finite: their gradient M-step
    rejects every step, so they cannot be fitted. ``paths``: ``m_step_paths``'
    ``{name: description}``; ``at``: where the gradient was taken, for the message.
    Nothing under ``jit``/``vmap`` (the values are not known)."""
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(gradient)):
        return
    bad = sorted(
        n
        for n, g in gradient.items()
        if paths[n].startswith("gradient") and not np.all(np.isfinite(np.asarray(g)))
    )
    if bad:
        raise ModelError(
            f"jaxem: the gradient of the {objective} with respect to the params {bad} is not "
            f"finite {at}, so their gradient M-step rejects every step and they cannot be "
            "fitted. A log-probability that is not differentiable at some enumerated value "
            "of a latent is the usual cause: a rate or probability multiplied by a latent "
            "that can be 0 (e.g. Poisson(rate * (1 - s)): use dist.ZeroInflatedPoisson), or "
            "the log of 0. Write the model so that every log-probability is differentiable "
            "in these params, or start them elsewhere (init_params)."
        )


def run_with_progress(call, progress_bar: bool, max_iter: int, desc: str):
    """``call()``, with a tqdm bar that the compiled loop advances when asked."""
    if not progress_bar:
        return call()
    from tqdm.auto import tqdm

    bar = tqdm(total=max_iter, desc=desc, unit="it")
    _PROGRESS_BARS.append(bar)
    try:
        return jax.block_until_ready(call())
    finally:
        _PROGRESS_BARS.remove(bar)
        bar.close()
