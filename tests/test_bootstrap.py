"""The bootstrap: its standard errors agree with the observed information's on a
well-identified mixture, within Monte Carlo error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_uncertainty import hmm, mixture

import jaxem

NUM_REPLICATES = 100
# The relative standard deviation of a standard deviation estimated from B draws is
# about 1 / sqrt(2 (B - 1)); four of them.
MONTE_CARLO_RTOL = 4.0 / np.sqrt(2.0 * (NUM_REPLICATES - 1))


@pytest.mark.parametrize("kind", ["nonparametric", "parametric"])
def test_bootstrap_standard_errors_agree_with_the_observed_information(kind, x64):
    rng = np.random.default_rng(3)
    x = jnp.asarray(np.concatenate([rng.normal(-3, 1.0, 120), rng.normal(3, 1.0, 180)]))
    em = jaxem.EM(mixture)
    fit = em.run(jax.random.PRNGKey(0), x, max_iter=300, tol=1e-10)
    se = em.standard_errors(fit, x)
    boot = jaxem.bootstrap(
        em, fit, jax.random.PRNGKey(1), x, num_replicates=NUM_REPLICATES, kind=kind
    )
    assert bool(np.all(boot.converged))
    for name in ("w", "mu", "sigma"):
        assert boot.params[name].shape == (NUM_REPLICATES, 2)
        np.testing.assert_allclose(
            boot.standard_errors[name], se.standard_errors[name], rtol=MONTE_CARLO_RTOL
        )
        lower, upper = boot.intervals[name]
        # The components are aligned to the fit: its estimate lies inside each interval.
        assert np.all(lower < fit.params[name]) and np.all(fit.params[name] < upper)


def test_bootstrap_refuses_an_unknown_kind(x64):
    em = jaxem.EM(mixture)
    with pytest.raises(ValueError, match="kind must be 'nonparametric' or 'parametric'"):
        jaxem.bootstrap(em, {}, jax.random.PRNGKey(0), jnp.zeros(3), kind="jackknife")


def test_nonparametric_bootstrap_of_a_single_sequence_says_what_it_can_do(x64):

    em = jaxem.EM(hmm)
    params = {
        "pi": jnp.array([0.5, 0.5]),
        "A": jnp.array([[0.8, 0.2], [0.2, 0.8]]),
        "mu": jnp.array([-1.0, 1.0]),
    }
    with pytest.raises(
        jaxem.ModelError, match=r"nonparametric bootstrap \(kind=\"parametric\" does not\)"
    ):
        jaxem.bootstrap(em, params, jax.random.PRNGKey(0), jnp.zeros(6), num_replicates=2)
