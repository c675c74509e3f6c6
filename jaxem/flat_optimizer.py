"""An optax optimizer run on one flat vector of the params it is given.

The gradient path's default optimizer, `optax.lbfgs` with its zoom line search, keeps
its memory, its line search's state and every step of its bookkeeping (dot
products, scalings, selections) per leaf of the params: on the three gradient-path
params of a Student-t mixture its compiled program was twice the size of the same
optimizer's on one vector. `flattened` runs it on the params raveled into one vector
(`jax.flatten_util.ravel_pytree`), the line search's objective and gradient with
them, and hands back updates of the params' own structure: the same steps, but for
the order in which sums over the entries add up. (`optax.flatten` does the same for
the params and updates, but passes the extra arguments of a line search, the
gradient and the objective, through as they are: a tree where its inner
transformation expects the vector.)
"""

from __future__ import annotations

import optax
from jax.flatten_util import ravel_pytree

__all__ = ["flattened"]


def flattened(inner) -> optax.GradientTransformationExtraArgs:
    """``inner`` (an optax transformation) on one flat vector of the params.

    ``init`` and ``update`` take and give the params' own structure; the state is
    ``inner``'s over the vector. ``update``'s extra arguments ``grad`` (a tree like
    the params) and ``value_fn`` (a function of such a tree) reach ``inner`` as the
    raveled gradient and the objective of the vector; any other extra argument as
    it is.
    """
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return inner.init(ravel_pytree(params)[0])

    def update_fn(updates, state, params=None, **extra_args):
        flat_updates, unravel = ravel_pytree(updates)
        if params is not None:
            params = ravel_pytree(params)[0]
        if extra_args.get("grad") is not None:
            extra_args["grad"] = ravel_pytree(extra_args["grad"])[0]
        value_fn = extra_args.get("value_fn")
        if value_fn is not None:

            def flat_value_fn(flat):
                return value_fn(unravel(flat))

            extra_args["value_fn"] = flat_value_fn
        flat_updates, state = inner.update(flat_updates, state, params, **extra_args)
        return unravel(flat_updates), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
