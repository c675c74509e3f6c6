"""`jaxem.flat_optimizer.flattened`: an optax optimizer on one flat vector of the params.

The gradient path's default optimizer is ``flattened(optax.lbfgs())``: the same steps as
``optax.lbfgs()`` on the params' own structure (to rounding: sums over the entries add
up in another order), with a state over one vector, whose compiled program is smaller.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from jaxem.flat_optimizer import flattened
from jaxem.gradient import default_optimizer
from jaxem.lbfgs_memory import cautious_curvature


def _loss(params):
    """Not quadratic, coupled across the two params, curvatures 1 to 40."""
    a, b = params["a"], params["b"]
    scales = jnp.arange(1.0, 7.0).reshape(2, 3)
    return (
        jnp.sum((a - jnp.array([1.0, -2.0])) ** 2)
        + jnp.sum(scales * (b - 0.5) ** 2)
        + 0.1 * jnp.sum(b**4)
        + (a[0] * b[1, 2] - 1.0) ** 2
    )


def _path(optimizer, num_steps=8):
    """The params after each of ``num_steps`` steps (stacked), and the last state."""

    def step(carry, _):
        params, state = carry
        value, grad = jax.value_and_grad(_loss)(params)
        updates, state = optimizer.update(
            grad, state, params, value=value, grad=grad, value_fn=_loss
        )
        params = optax.apply_updates(params, updates)
        return (params, state), params

    @jax.jit
    def run(params):
        (_, state), path = jax.lax.scan(
            step, (params, optimizer.init(params)), None, length=num_steps
        )
        return path, state

    return run(_start())


def _start():
    return {"a": jnp.zeros(2), "b": jnp.ones((2, 3))}


def test_flattened_lbfgs_takes_the_steps_of_optax_lbfgs(x64):
    flat_path, flat_state = _path(flattened(optax.lbfgs()))
    tree_path, _ = _path(optax.lbfgs())
    assert jax.tree.structure(flat_path) == jax.tree.structure(tree_path)
    for name in tree_path:
        np.testing.assert_allclose(flat_path[name], tree_path[name], rtol=1e-10, atol=1e-12)
    # It moved: eight L-BFGS steps towards the minimum.
    last = jax.tree.map(lambda x: x[-1], tree_path)
    assert float(_loss(last)) < 0.1 * float(_loss(_start()))
    # Its memory and line search hold one vector of the 2 + 6 entries.
    lbfgs = flat_state[0]
    assert isinstance(lbfgs, optax.ScaleByLBFGSState)
    assert lbfgs.params.shape == (8,)
    assert lbfgs.diff_params_memory.shape == (10, 8)


def test_the_default_optimizer_is_flat():
    state = default_optimizer().init({"a": jnp.zeros(2), "b": jnp.zeros((2, 3))})
    assert state[0].params.shape == (8,)


def test_cautious_curvature_compares_a_point_tree_with_the_flat_state(x64):
    """A call that starts where the last one's state was measured restarts the count
    (`jaxem.lbfgs_memory.cautious_curvature` with ``point``), the point a tree and the
    state's params its raveled vector; one that starts elsewhere keeps it."""
    _, state = _path(flattened(optax.lbfgs()), num_steps=4)
    lbfgs = state[0]
    assert int(lbfgs.count) == 4
    _, unravel = ravel_pytree({"a": jnp.zeros(2), "b": jnp.zeros((2, 3))})
    same = unravel(lbfgs.params)
    elsewhere = jax.tree.map(lambda x: x + 1.0, same)
    assert int(cautious_curvature(state, same)[0].count) == 0
    assert int(cautious_curvature(state, elsewhere)[0].count) == 4
