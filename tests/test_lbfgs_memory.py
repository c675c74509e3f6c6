"""L-BFGS memory across calls of the gradient path (`jaxem.gradient.safeguarded_steps`).

jaxem carries the optax state from one EM iteration to the next. Curvature pairs of
rounding noise (the converged tail of the last call) are dropped from every L-BFGS
memory in it, and so is the pair that would span the two calls where its step is
that small: such a state steps as a freshly initialized ``optax.lbfgs``. Pairs of
real curvature are kept, and other optimizers' states are carried as they are.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxem.gradient import safeguarded_steps
from jaxem.lbfgs_memory import cautious_curvature

CURVATURE = jnp.array([1.0, 10.0])


def quadratic(center):
    return lambda x: 0.5 * jnp.sum(CURVATURE * (x - jnp.asarray(center)) ** 2)


def noise_pairs(state):
    """``state`` with every pair of its memory the rounding noise of a converged tail
    (s of 1e-16, y of -1e-14, weight 1/s.y: -8.5e29 in the VBEM shared-scale case)."""
    lbfgs = state[0]
    s = jnp.full_like(lbfgs.diff_params_memory, 1e-16)
    y = jnp.full_like(lbfgs.diff_updates_memory, -1e-14)
    weights = 1.0 / jnp.sum(s * y, axis=1)
    lbfgs = lbfgs._replace(diff_params_memory=s, diff_updates_memory=y, weights_memory=weights)
    return (lbfgs, *state[1:])


@pytest.mark.parametrize("memory", ["converged", "noise"])
@pytest.mark.parametrize("num_steps", [1, 3])
def test_a_call_after_a_converged_one_steps_as_a_fresh_lbfgs(memory, num_steps):
    optimizer = optax.lbfgs()
    x0 = jnp.zeros(2)
    x1, state = safeguarded_steps(quadratic([1.0, 1.0]), x0, optimizer, optimizer.init(x0), 20)
    np.testing.assert_allclose(x1, [1.0, 1.0], rtol=1e-6)
    if memory == "noise":
        state = noise_pairs(state)
    loss = quadratic([3.0, -2.0])  # the next EM iteration's objective
    carried, _ = safeguarded_steps(loss, x1, optimizer, state, num_steps)
    fresh, _ = safeguarded_steps(loss, x1, optimizer, optimizer.init(x1), num_steps)
    # The first step moves (it did not: the pair spanning the two calls, s = 0,
    # scaled the direction by s.y / |y|^2 = 0; noise pairs sent it anywhere).
    assert loss(carried) < 0.5 * loss(x1), (carried, loss(carried), loss(x1))
    np.testing.assert_allclose(carried, fresh, rtol=1e-6)


def _lbfgs_and_others(state):
    """The L-BFGS states in an optax state, and every other leaf."""
    nodes = jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, optax.ScaleByLBFGSState))
    lbfgs = [s for s in nodes if isinstance(s, optax.ScaleByLBFGSState)]
    return lbfgs, [s for s in nodes if not isinstance(s, optax.ScaleByLBFGSState)]


@pytest.mark.parametrize(
    "optimizer, num_lbfgs",
    [(optax.adam(0.1), 0), (optax.chain(optax.clip_by_global_norm(1.0), optax.lbfgs()), 1)],
    ids=["adam", "clip-then-lbfgs"],
)
def test_noise_pairs_are_dropped_real_ones_kept_and_other_states_untouched(optimizer, num_lbfgs):
    x = jnp.array([0.3, -0.2])
    loss = quadratic([1.0, 1.0])
    state = optimizer.init(x)
    for _ in range(3):  # two real pairs, of a quadratic: s.y > 0
        value, grad = jax.value_and_grad(loss)(x)
        updates, state = optimizer.update(grad, state, x, value=value, grad=grad, value_fn=loss)
        x = optax.apply_updates(x, updates)
    lbfgs, others = _lbfgs_and_others(state)
    assert len(lbfgs) == num_lbfgs
    if lbfgs:  # a third pair of rounding noise in the next slot
        (old,) = lbfgs
        real = np.asarray(old.weights_memory) != 0
        assert real.sum() == 2 and np.all(np.asarray(old.weights_memory)[real] > 0)
        slot = 2
        old = old._replace(
            diff_params_memory=old.diff_params_memory.at[slot].set(1e-16),
            diff_updates_memory=old.diff_updates_memory.at[slot].set(-1e-14),
            weights_memory=old.weights_memory.at[slot].set(-5e27),
        )
        state = (state[0], (old, *state[1][1:]), *state[2:])
    new_lbfgs, new_others = _lbfgs_and_others(cautious_curvature(state))
    for old, new in zip(_lbfgs_and_others(state)[0], new_lbfgs, strict=True):
        expected = np.where(real, np.asarray(old.weights_memory), 0.0)
        np.testing.assert_array_equal(new.weights_memory, expected)
        assert int(new.count) == int(old.count) == 3
    for a, b in zip(others, new_others, strict=True):
        np.testing.assert_array_equal(a, b)
