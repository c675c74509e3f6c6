"""Programs compiled for one evaluation (jaxem.compiling): same values as jax.jit."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxem.compiling import ONCE_OPTIONS, compile_once, jit_once, once_options


def _f(x, n):
    return jnp.sum(jnp.log1p(jnp.exp(x)) ** n) + jnp.linalg.cholesky(jnp.eye(2) * 2.0)[0, 0]


def test_once_options_on_cpu():
    expected = ONCE_OPTIONS if jax.default_backend() == "cpu" else once_options()
    assert once_options() == expected


def test_jit_once_matches_jit_with_static_args():
    x = jnp.linspace(-3.0, 3.0, 11)
    once = jit_once(_f, static_argnums=(1,))
    np.testing.assert_array_equal(
        np.asarray(once(x, 2)), np.asarray(jax.jit(_f, static_argnums=(1,))(x, 2))
    )
    # A new static value compiles a new program through the same wrapper.
    np.testing.assert_allclose(np.asarray(once(x, 3)), np.asarray(_f(x, 3)), rtol=1e-6)


def test_compile_once_of_a_lowered_function():
    x = jnp.linspace(-3.0, 3.0, 11)
    lowered = jax.jit(lambda x: _f(x, 2)).lower(x)
    np.testing.assert_array_equal(
        np.asarray(compile_once(lowered)(x)), np.asarray(lowered.compile()(x))
    )
