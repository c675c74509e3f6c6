"""``converged`` and ``diverged`` are true statements; warnings say when a fit is doubtful."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from numpyro.distributions import constraints

from jaxem import EM, VariationalEM
from jaxem.exceptions import ConvergenceWarning, ModelError
from jaxem.loop import JUMP_FACTOR, best_restart, credible


def mixture(x):
    w = numpyro.param("w", jnp.ones(2) / 2, constraint=constraints.simplex)
    mu = numpyro.param("mu", jnp.array([-1.0, 1.0]))
    sigma = numpyro.param("sigma", jnp.ones(2), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Normal(mu[z], sigma[z]), obs=x)


X = jnp.concatenate([jnp.linspace(-4.0, -2.0, 20), jnp.linspace(2.0, 4.0, 20)])


def test_a_converged_fit_is_stationary_and_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        result = EM(mixture).run(jax.random.PRNGKey(0), X, max_iter=100)
    assert bool(result.converged) and not bool(result.diverged)
    # The gradient of the log-likelihood is rounding noise next to its scale (N = 40).
    for value in result.gradient.values():
        assert np.all(np.abs(np.asarray(value)) < 1e-2)
    assert result.restart_converged.shape == (1,) and bool(result.restart_converged[0])


def test_the_output_of_the_last_update_is_checked():
    # Constant data, no regularization: one update collapses the variances to 0.
    with pytest.warns(ConvergenceWarning, match="diverged"):
        result = EM(mixture, reg_covar=0.0).run(jax.random.PRNGKey(0), jnp.ones(10), max_iter=1)
    assert bool(result.diverged) and not bool(result.converged)
    assert np.isfinite(float(result.log_likelihood))
    assert all(np.all(np.isfinite(v)) for v in result.params.values())


@pytest.mark.parametrize("engine", [EM, VariationalEM])
def test_rejected_gradient_steps_are_not_convergence(engine):
    # Steps of 5.0 overshoot from the start: every one is rejected, the params never
    # move, and the log-likelihood repeats.
    fit = engine(mixture, m_step="gradient", optimizer=optax.sgd(5.0))
    with pytest.warns(ConvergenceWarning, match="not at a stationary point"):
        result = fit.run(jax.random.PRNGKey(0), X, max_iter=50)
    assert not bool(result.converged) and not bool(result.diverged)
    np.testing.assert_array_equal(result.params["mu"], [-1.0, 1.0])


def test_a_non_finite_gradient_names_the_param():
    def zero_inflated(x):
        pi = numpyro.param("pi", 0.3, constraint=constraints.unit_interval)
        rate = numpyro.param("rate", 2.0, constraint=constraints.positive)
        with numpyro.plate("data", x.shape[0]):
            s = numpyro.sample("s", dist.Bernoulli(pi))
            numpyro.sample("x", dist.Poisson(rate * (1 - s)), obs=x)

    x = jnp.array([0.0, 0.0, 1.0, 3.0, 2.0, 0.0, 4.0, 1.0])
    with pytest.raises(ModelError, match=r"\['rate'\].*ZeroInflatedPoisson"):
        EM(zero_inflated).run(jax.random.PRNGKey(0), x, max_iter=20)


def test_max_iter_reached_warns_and_tol_zero_does_not():
    with pytest.warns(ConvergenceWarning, match=r"did not converge in max_iter=3.*Raise max_iter"):
        result = EM(mixture).run(jax.random.PRNGKey(0), X, max_iter=3)
    assert not bool(result.converged)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        EM(mixture).run(jax.random.PRNGKey(0), X, max_iter=3, tol=0.0)


def test_a_log_likelihood_above_zero_for_discrete_data_is_a_divergence():
    # Categorical probs declared without the simplex constraint: the gradient M-step
    # pushes them up without bound, and log p(x) passes 0, which no probability can.
    def unnormalized(x):
        w = numpyro.param("w", jnp.ones(2) / 2, constraint=constraints.simplex)
        probs = numpyro.param("probs", jnp.full((2, 3), 1 / 3), constraint=constraints.positive)
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(w))
            numpyro.sample("x", dist.Categorical(probs[z]), obs=x)

    x = jnp.array([0, 1, 2, 2, 1, 0, 0, 2])
    with pytest.warns(ConvergenceWarning, match="diverged"):
        result = EM(unnormalized, m_step="gradient").run(jax.random.PRNGKey(0), x, max_iter=200)
    assert bool(result.diverged)
    assert float(result.log_likelihood) <= 1e-3


def test_credible_values():
    ok = credible(jnp.array(-10.0), jnp.array(-11.0), jnp.array(5.0))
    assert bool(ok)
    jump = credible(jnp.array(-11.0 + 2 * JUMP_FACTOR), jnp.array(-11.0), jnp.array(1.0))
    assert not bool(jump)
    assert not bool(credible(jnp.array(0.5), jnp.array(-1.0), jnp.array(5.0), upper_bound=0.0))
    assert not bool(credible(jnp.array(jnp.nan), jnp.array(-1.0), jnp.array(5.0)))


def test_best_restart_keeps_the_best_restart_that_did_not_diverge():
    def fit(key):
        score = jax.random.normal(key)
        return {"score": score, "diverged": score > 0.5}

    key = jax.random.PRNGKey(0)
    best, fits = best_restart(fit, key, 8, lambda r: r["score"], lambda r: r["diverged"])
    scores, diverged = np.asarray(fits["score"]), np.asarray(fits["diverged"])
    assert diverged.any() and not diverged.all()
    assert float(best["score"]) == scores[~diverged].max() < scores.max()
    # Every restart diverged: the best of them all.
    best, _ = best_restart(fit, key, 8, lambda r: r["score"], lambda r: jnp.array(True))
    assert float(best["score"]) == scores.max()


@pytest.mark.parametrize("engine", [EM, VariationalEM])
def test_every_restart_reports_converged_diverged_and_num_iters(engine):
    def random_start(x):
        w = numpyro.param("w", jnp.ones(2) / 2, constraint=constraints.simplex)
        mu = numpyro.param("mu", lambda key: 3.0 * jax.random.normal(key, (2,)))
        sigma = numpyro.param("sigma", jnp.ones(2), constraint=constraints.positive)
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(w))
            numpyro.sample("x", dist.Normal(mu[z], sigma[z]), obs=x)

    result = engine(random_start).run(jax.random.PRNGKey(1), X, max_iter=200, num_restarts=3)
    for field in (result.restart_converged, result.restart_diverged, result.restart_num_iters):
        assert field.shape == (3,)
    best = int(np.argmax(np.where(result.restart_diverged, -np.inf, _scores(result))))
    assert int(result.num_iters) == int(result.restart_num_iters[best])
    assert bool(result.converged) == bool(result.restart_converged[best])


def _scores(result):
    if hasattr(result, "restart_elbos"):
        return np.asarray(result.restart_elbos)
    return np.asarray(result.restart_log_likelihoods)


@pytest.mark.parametrize("engine", [EM, VariationalEM])
def test_run_cannot_be_differentiated(engine):
    # The log-likelihood's gradient in the data used to come back as zeros, silently.
    fit = engine(mixture)
    field = "log_likelihood" if engine is EM else "elbo"
    with pytest.raises(TypeError, match="cannot be differentiated"):
        jax.grad(lambda x: getattr(fit.run(jax.random.PRNGKey(0), x, max_iter=5), field))(X)
