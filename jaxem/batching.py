"""Data-dependent branches shared by the restarts that run under ``vmap``.

The float32 rounding guards (the diagonal-Normal density, the closed-form
scatters) pick a branch with ``lax.cond``. Under ``vmap`` a ``cond`` whose
predicate differs across the batch becomes a ``select``: every restart would
compute both branches, the cheap expansion and the ``K x N x D`` exact one
(measured 5x slower per iteration for 4 restarts of a diagonal mixture).
`best_restart <jaxem.loop.best_restart>` names its ``vmap`` axis, and
`shared_predicate` reduces a predicate over it, so the ``cond`` stays a
branch: all restarts take the fast path, or all take the exact one.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp

__all__ = ["RESTART_AXIS", "restart_axis", "restarts_active", "shared_predicate"]

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
