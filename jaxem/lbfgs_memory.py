"""The L-BFGS memory that the gradient path carries from one EM iteration to the next.

`jaxem.gradient.safeguarded_steps` runs ``m_step_iters`` optax steps per EM iteration
and carries the optimizer state to the next (DESIGN.md §3). optax's `scale_by_lbfgs`
keeps every curvature pair with s.y != 0, so the pairs of a converged tail, rounding
noise, would steer the next M-step: `cautious_curvature` drops them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

__all__ = ["cautious_curvature"]


def _is_lbfgs(node):
    return isinstance(node, optax.ScaleByLBFGSState)


def _rows(tree, num_rows):
    return jnp.concatenate([leaf.reshape(num_rows, -1) for leaf in jax.tree.leaves(tree)], axis=1)


def cautious_curvature(opt_state, point=None):
    """``opt_state`` with the curvature pairs of rounding noise dropped from every
    L-BFGS memory in it (`optax.ScaleByLBFGSState`); any other state as it is.

    optax's `scale_by_lbfgs` keeps every pair (s, y) with s.y != 0, weight 1/s.y.
    The steps of a converged tail are of the size of rounding (s of one ulp, y the
    noise of the gradient: weights up to 1e30, of either sign), and jaxem carries
    the state from one EM iteration to the next, so such pairs steered the next
    M-step (its line search used all its steps; float32 fits stalled short of a
    stationary point). A pair is kept only where s.y > sqrt(eps) |s| |y| (the
    cautious update of Li and Fukushima, 2001) and |s| > sqrt(eps) (|x| + 1), x the
    point it was measured at; the others get weight 0, a no-op in optax's two-loop
    recursion. (optax uses a pair in the update that forms it, before this sees it:
    a noise pair steers that one step, none after it.)

    With ``point`` (the start of a new call of `safeguarded_steps`), optax's next
    update would form a pair from the last step of the previous call to ``point``,
    across two objectives: where that step is that small too (0 where the previous
    call ended where this one starts), its s.y / |y|^2, optax's scale of the first
    direction, is about 0 and the first step did not move. Such a state restarts
    its count: optax forms no pair at its first update and scales the direction by
    min(1, 1/|g|) (the pairs kept in memory still precondition it).
    """

    def clean(state):
        if not _is_lbfgs(state):
            return state
        num_pairs = state.weights_memory.shape[0]
        s = _rows(state.diff_params_memory, num_pairs)
        y = _rows(state.diff_updates_memory, num_pairs)
        x = _rows(state.params, 1)[0]
        tiny = jnp.sqrt(jnp.finfo(s.dtype).eps)
        floor = tiny * (jnp.linalg.norm(x) + 1.0)
        s_norm = jnp.linalg.norm(s, axis=1)
        keep = (jnp.sum(s * y, axis=1) > tiny * s_norm * jnp.linalg.norm(y, axis=1)) & (
            s_norm > floor
        )
        state = state._replace(weights_memory=jnp.where(keep, state.weights_memory, 0.0))
        if point is not None:
            # (Entries in the order of the leaves: ``point`` may be the tree whose
            # raveled vector the state's params are, `jaxem.flat_optimizer.flattened`.)
            step = _rows(point, 1)[0] - x
            count = jnp.where(jnp.linalg.norm(step) > floor, state.count, 0)
            state = state._replace(count=count.astype(state.count.dtype))
        return state

    return jax.tree.map(clean, opt_state, is_leaf=_is_lbfgs)
