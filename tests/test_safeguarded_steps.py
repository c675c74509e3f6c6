"""`jaxem.gradient.safeguarded_steps`: optax steps kept only where the loss did not rise.

The accept test compares the loss at the end with the loss at the start, both values of
one compiled program: the value and gradient in the body of a scan of the steps plus one
more evaluation at the end (not the first step's value against a separate loss program at
the end: their rounding differs, and decided the path of a degenerate fit,
tests/test_convergence.py::test_a_component_collapsing_onto_ties_is_not_convergence)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxem.gradient import safeguarded_steps


def _counted_quadratic():
    def loss(x):
        loss.num_calls += 1
        return jnp.sum((x - 3.0) ** 2)

    loss.num_calls = 0
    return loss


@pytest.mark.parametrize("learning_rate, accepted", [(0.1, True), (1.5, False)])
def test_steps_are_kept_only_where_the_loss_did_not_rise(learning_rate, accepted):
    loss = _counted_quadratic()
    optimizer = optax.with_extra_args_support(optax.sgd(learning_rate))
    start = jnp.zeros(2, jnp.float32)

    @jax.jit
    def run(x):
        return safeguarded_steps(loss, x, optimizer, optimizer.init(x), 3)

    chosen, _ = run(start)
    # Traced once, in the scan's body (value and gradient): no other program evaluates it.
    assert loss.num_calls == 1
    # sgd on (x - 3)^2: x <- x - 2 lr (x - 3), three times from 0.
    end = 3.0 - 3.0 * (1.0 - 2.0 * learning_rate) ** 3
    # lr 1.5 overshoots (the loss grows from 18 to 1458): the start is kept.
    want = np.full(2, end if accepted else 0.0, np.float32)
    np.testing.assert_allclose(np.asarray(chosen), want, rtol=1e-6)
