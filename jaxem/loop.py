"""The fit loop shared by ``EM``, ``VariationalEM`` and ``OnlineEM``.

Initial parameters; ``run``'s compiled ``lax.while_loop``
with its convergence test, divergence guard and history; restarts under
``vmap`` with the best one kept; the progress bar the compiled loop advances.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxem.batching import RESTART_AXIS, restart_axis
from jaxem.exceptions import ModelError
from jaxem.tracing import inspect_model, merge_args, merge_init_params, split_args

__all__ = [
    "LoopResult",
    "all_finite",
    "best_restart",
    "initial_params",
    "iterate",
    "run_compiled",
    "tree_where",
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


# -- the compiled loop --------------------------------------------------------


class LoopResult(NamedTuple):
    """What :func:`iterate` ends with.

    Attributes:
        state: the last state; after a divergence, the last state whose value
            was finite.
        history: shape ``(max_iter,)``: the value of every iteration, NaN after
            ``num_iters``.
        num_iters: number of updates done (a rejected one not counted).
        converged: whether the relative change of the value fell below ``tol``.
        diverged: whether the loop stopped on a non-finite value.
    """

    state: Any
    history: jax.Array
    num_iters: jax.Array
    converged: jax.Array
    diverged: jax.Array


class _Carry(NamedTuple):
    state: Any
    good: Any
    history: jax.Array
    i: jax.Array
    previous: jax.Array
    converged: jax.Array
    diverged: jax.Array


_PROGRESS_BARS: list = []


def _report_progress(iteration) -> None:
    if _PROGRESS_BARS:
        bar = _PROGRESS_BARS[-1]
        bar.n = max(bar.n, int(np.max(iteration)))
        bar.refresh()


def iterate(
    update_fn: Callable,
    state,
    checked_fn: Callable,
    *,
    max_iter: int,
    tol,
    progress_bar: bool,
    moved_fn: Callable | None = None,
) -> LoopResult:
    """Run ``update_fn`` in a ``lax.while_loop`` until convergence or ``max_iter``.

    Args:
        update_fn: ``state -> (new_state, value)``, ``value`` the objective
            at ``state`` (the one this iteration's E-step computed).
        state: the initial state.
        checked_fn: ``state -> pytree`` whose leaves must all be finite after
            an update; otherwise the loop stops (diverged) and keeps the state
            before.
        max_iter: maximum number of updates.
        tol: stop when ``|value_t - value_{t-1}| <= tol * |value_t|``; 0 runs
            exactly ``max_iter`` updates, even at a fixed point.
        progress_bar: advance the bar of :func:`run_with_progress`.
        moved_fn: ``new_state -> bool``: whether the update moved to a new point.
            After one that did not (an accelerated step its safeguard rejected,
            ``value`` repeating the last one) the convergence test is skipped.
            Default: every update moves.

    Returns:
        A :class:`LoopResult`.
    """
    dtype = jnp.result_type(float)

    def cond(c):
        return (c.i < max_iter) & ~c.converged & ~c.diverged

    def body(c):
        new_state, value = update_fn(c.state)
        finite = jnp.isfinite(value)
        ok = finite & all_finite(checked_fn(new_state))
        change = jnp.abs(value - c.previous)
        converged = ok & (c.i > 0) & (tol > 0) & (change <= tol * jnp.abs(value))
        if moved_fn is not None:
            converged = converged & moved_fn(new_state)
        if progress_bar:
            jax.debug.callback(_report_progress, c.i + 1)
        return _Carry(
            state=tree_where(ok, new_state, c.state),
            good=tree_where(finite, c.state, c.good),
            history=c.history.at[c.i].set(value.astype(dtype)),
            i=c.i + 1,
            previous=value.astype(dtype),
            converged=converged,
            diverged=~ok,
        )

    carry = _Carry(
        state=state,
        good=state,
        history=jnp.full((max_iter,), jnp.nan, dtype),
        i=jnp.zeros((), jnp.int32),
        previous=jnp.array(jnp.nan, dtype),
        converged=jnp.array(False),
        diverged=jnp.array(False),
    )
    carry = jax.lax.while_loop(cond, body, carry)
    return LoopResult(
        state=tree_where(carry.diverged, carry.good, carry.state),
        history=carry.history,
        num_iters=carry.i - carry.diverged.astype(carry.i.dtype),
        converged=carry.converged,
        diverged=carry.diverged,
    )


def best_restart(fit_fn: Callable, rng_key, num_restarts: int, score_fn: Callable):
    """``fit_fn(key)`` for ``num_restarts`` keys split from ``rng_key`` under ``vmap``.

    One restart runs ``fit_fn(rng_key)`` itself (no vmap), so that it starts
    where ``init(rng_key)`` does.

    Returns:
        ``(result of the restart with the highest score (NaN counting as
        -inf), shape (num_restarts,) scores of every restart)``.
    """
    if num_restarts == 1:
        result = fit_fn(rng_key)
        return result, score_fn(result)[None]
    # The named axis lets the rounding guards branch once for all restarts
    # (jaxem.batching) rather than compute both branches in each.
    with restart_axis():
        fits = jax.vmap(fit_fn, axis_name=RESTART_AXIS)(jax.random.split(rng_key, num_restarts))
    scores = score_fn(fits)
    best = jnp.argmax(jnp.where(jnp.isnan(scores), -jnp.inf, scores))
    return jax.tree.map(lambda x: x[best], fits), scores


# -- run ----------------------------------------------------------------------


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


def run_compiled(
    run_jit: Callable,
    validate_fn: Callable,
    rng_key,
    args,
    kwargs,
    *,
    max_iter: int,
    tol: float,
    num_restarts: int,
    init_params,
    progress_bar: bool,
    desc: str,
):
    """The body of ``run``: check the counts, validate the data and initial values
    (``validate_fn(rng_key, arrays, spec, init_params)``: named errors here, the
    compiled run cannot raise), then ``run_jit(rng_key, arrays, init_params, tol,
    spec=..., max_iter=..., num_restarts=..., progress_bar=...)``."""
    if max_iter < 1 or num_restarts < 1:
        raise ValueError("max_iter and num_restarts must be at least 1")
    arrays, spec = split_args(args, kwargs)
    init_params = None if init_params is None else dict(init_params)
    validate_fn(rng_key, arrays, spec, init_params)
    call = partial(
        run_jit,
        rng_key,
        arrays,
        init_params,
        jnp.asarray(tol, jnp.result_type(float)),
        spec=spec,
        max_iter=int(max_iter),
        num_restarts=int(num_restarts),
        progress_bar=bool(progress_bar),
    )
    return run_with_progress(call, progress_bar, max_iter, desc)
