"""Log-space contractions whose derivatives stay finite at impossible states.

The posterior marginals are the gradient of log Z with respect to the log
factors (see `jaxem.estep`). A contraction in log space computes each
intermediate message as ``log(sum(exp(...)))``; the message of a state that
cannot occur (a probability of exactly zero, or a sum whose terms all
underflow) is ``log(0) = -inf``. Its cotangent is zero, since ``exp(-inf)``
contributes nothing downstream, but the derivative of ``log`` there is
infinite, and ``0 * inf`` is NaN: one impossible state poisons every marginal
it shares a contraction with.

funsor's contraction calls ``log`` inside its own code, so the fix is applied
to the traced program: `zero_safe_log` re-evaluates a function's jaxpr
with every ``log`` replaced by one whose derivative at 0 is 0. The value is
unchanged, and so is the derivative anywhere the argument is positive.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

__all__ = ["zero_safe_log"]


@jax.custom_jvp
def _log(x):
    return jnp.log(x)


@_log.defjvp
def _log_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    positive = x > 0
    # The inner where keeps the transpose from dividing the zero cotangent by 0.
    return jnp.log(x), jnp.where(positive, t / jnp.where(positive, x, 1.0), 0.0)


def _evaluate(jaxpr, consts, *args):
    env = {}

    def read(var):
        return var.val if isinstance(var, jex_core.Literal) else env[var]

    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        invals = [read(var) for var in eqn.invars]
        if eqn.primitive.name == "log":
            outvals = [_log(*invals)]
        elif eqn.primitive.name in ("jit", "pjit"):
            inner = eqn.params["jaxpr"]
            outvals = _evaluate(inner.jaxpr, inner.consts, *invals)
        else:
            params = eqn.primitive.get_bind_params(eqn.params)
            outvals = eqn.primitive.bind(*invals, **params)
            if not eqn.primitive.multiple_results:
                outvals = [outvals]
        env.update(zip(eqn.outvars, outvals))
    return [read(var) for var in jaxpr.outvars]


def zero_safe_log(fn):
    """``fn`` with every ``log`` it computes given a zero derivative at 0.

    Args:
        fn: a function of arrays (a pytree of them) returning arrays.

    Returns:
        A function with the same values as ``fn``, whose derivatives agree with
        ``fn``'s wherever no ``log`` in it meets a zero, and which treats the
        slope of ``log`` at 0 as 0 (a zero cotangent times an infinite slope
        is 0, not NaN).

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> def log_z(t):  # a log-space sum whose first term is impossible
        ...     return jnp.log(jnp.exp(jnp.log(jnp.exp(t[0]))) + jnp.exp(t[1]))
        >>> t = jnp.array([-jnp.inf, 0.0])
        >>> jax.grad(log_z)(t)
        Array([nan,  1.], dtype=float32)
        >>> jax.grad(zero_safe_log(log_z))(t)
        Array([0., 1.], dtype=float32)
    """

    def safe(*args):
        closed, out_tree = jax.make_jaxpr(fn, return_shape=True)(*args)
        outs = _evaluate(closed.jaxpr, closed.consts, *jax.tree.leaves(args))
        return jax.tree.unflatten(jax.tree.structure(out_tree), outs)

    return safe
