"""Data-dependent branches shared by the restarts that run under ``vmap``.

The float32 rounding guards (the diagonal-Normal density, the closed-form
scatters) pick a branch with ``lax.cond``. Under ``vmap`` a ``cond`` whose
predicate differs across the batch becomes a ``select``: every restart would
compute both branches, the cheap expansion and the ``K x N x D`` exact one
(4 restarts of a diagonal mixture, N = 100 000, D = K = 16, float32: 67.2 ms
per restart-iteration against 12.6 with the shared predicate, by
``python benchmarks/restarts.py --no-sklearn`` before and after commit 0604e75,
as ``benchmarks/README.md`` records them).
`best_restart` names its ``vmap`` axis, and
`shared_predicate` reduces a predicate over it, so the ``cond`` stays a
branch: all restarts take the fast path, or all take the exact one.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = [
    "RESTART_AXIS",
    "best_restart",
    "map_restarts",
    "restart_axis",
    "restarts_active",
    "select_best",
    "shared_predicate",
]

RESTART_AXIS = "jaxem_restarts"
_ACTIVE = contextvars.ContextVar("jaxem_restart_axis", default=False)


@contextlib.contextmanager
def restart_axis():
    """Within this context, code is traced under ``vmap(..., axis_name=RESTART_AXIS)``."""
    token = _ACTIVE.set(True)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def restarts_active() -> bool:
    """Whether code is traced under the restarts' ``vmap`` (see `restart_axis`):
    what `shared_predicate` stages depends on it."""
    return _ACTIVE.get()


def shared_predicate(pred):
    """``pred`` (a scalar bool) if it holds for every restart, else ``False``.

    Outside restarts this is ``pred`` itself. Use it for a ``cond`` whose false
    branch is exact and the true branch a faster one that is accurate where
    ``pred`` holds: a restart may then take the exact branch because another
    restart needed it, which changes its result only by rounding.
    """
    if not _ACTIVE.get():
        return pred
    return jax.lax.pmin(jnp.asarray(pred, jnp.int32), RESTART_AXIS) > 0


def map_restarts(fn: Callable, xs, *, batched: bool):
    """``fn`` over the leading (restart) axis of ``xs``: under ``vmap`` with the
    named axis (``batched``), so that the rounding guards branch once for all
    restarts rather than compute both branches in each, or one after another
    (``lax.map``)."""
    if batched:
        with restart_axis():
            return jax.vmap(fn, axis_name=RESTART_AXIS)(xs)
    return jax.lax.map(fn, xs)


def best_restart(
    fit_fn: Callable,
    rng_key,
    num_restarts: int,
    score_fn: Callable,
    diverged_fn=None,
    *,
    batched: bool = True,
):
    """``fit_fn(key)`` for ``num_restarts`` keys split from ``rng_key``: under
    ``vmap`` (``batched``), or one after another inside the compiled program
    (``lax.map``), each restart then stopping at its own iteration. The kept
    restart: `select_best`.

    One restart runs ``fit_fn(rng_key)`` itself (no vmap), so that it starts
    where ``init(rng_key)`` does. The restart kept is the one with the highest
    score (NaN counting as -inf) among those that did not diverge
    (``diverged_fn``); among all restarts only when every one diverged.

    Returns:
        ``(result of the restart kept, results of every restart stacked on a
        leading axis of size num_restarts)``.
    """
    if num_restarts == 1:
        result = fit_fn(rng_key)
        return result, jax.tree.map(lambda x: jnp.asarray(x)[None], result)
    fits = map_restarts(fit_fn, jax.random.split(rng_key, num_restarts), batched=batched)
    return select_best(fits, score_fn, diverged_fn), fits


def select_best(fits, score_fn: Callable, diverged_fn=None):
    """The restart with the highest score (NaN counting as -inf) among those that
    did not diverge; among all restarts only when every one diverged. ``fits``:
    results stacked on a leading restart axis. With one restart it is that one, taken
    by a static index (a dynamic one costs a few operations per leaf, ~200 of a
    fit's program after its loop)."""
    if jax.tree.leaves(fits)[0].shape[0] == 1:
        return jax.tree.map(lambda x: x[0], fits)
    scores = score_fn(fits)
    scores = jnp.where(jnp.isnan(scores), -jnp.inf, scores)
    usable = jnp.ones(scores.shape, bool) if diverged_fn is None else ~diverged_fn(fits)
    pool = jnp.where(jnp.any(usable), usable, True)
    masked = jnp.where(pool, scores, -jnp.inf)
    best = jnp.where(jnp.any(masked > -jnp.inf), jnp.argmax(masked), jnp.argmax(pool))
    return jax.tree.map(lambda x: x[best], fits)
