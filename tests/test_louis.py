"""Standard errors of Monte Carlo EM fits by Louis' identity: exact on an enumerable
model (every configuration of the latents with its posterior probability), and within
Monte Carlo error of a finite-difference Hessian of the closed-form marginal
log-likelihood of a linear mixed model."""

import itertools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.distributions import constraints
from scipy import stats
from test_uncertainty import mixture

import jaxem
from jaxem.exceptions import ModelError
from jaxem.louis import louis_standard_errors

# --- a discrete latent, enumerated exactly: the identity without Monte Carlo noise ---------


def test_louis_identity_with_exact_enumeration_equals_the_observed_information(x64):
    x = jnp.array([-2.1, -1.4, -2.6, 1.8, 2.4, 1.1])
    # Louis' identity holds at any params: near the maximum, the information is positive
    # definite and the standard errors are defined.
    params = {
        "w": jnp.array([0.5, 0.5]),
        "mu": jnp.array([-2.0, 1.8]),
        "sigma": jnp.array([0.5, 0.55]),
    }
    exact = jaxem.standard_errors(mixture, params, x)
    # The posterior of every configuration of the labels: a product over the points.
    p = {n: np.asarray(v) for n, v in params.items()}
    log_r = np.log(p["w"]) + stats.norm.logpdf(np.asarray(x)[:, None], p["mu"], p["sigma"])
    r = np.exp(log_r - np.logaddexp.reduce(log_r, axis=1, keepdims=True))
    configurations = np.array(list(itertools.product(range(2), repeat=x.shape[0])))
    weights = np.prod(r[np.arange(x.shape[0]), configurations], axis=1)
    louis = louis_standard_errors(
        mixture, params, {"z": jnp.asarray(configurations)}, x, weights=weights
    )
    np.testing.assert_allclose(louis.information, exact.information, rtol=1e-8, atol=1e-8)
    # E[-H_c] is the Hessian of EM's Q: the complete information.
    np.testing.assert_allclose(
        louis.complete_information, exact.complete_information, rtol=1e-8, atol=1e-8
    )
    for name in ("w", "mu", "sigma"):
        np.testing.assert_allclose(
            louis.standard_errors[name], exact.standard_errors[name], rtol=1e-8
        )
    np.testing.assert_allclose(louis.covariance, exact.covariance, rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(louis.missing_fraction, exact.missing_fraction, rtol=1e-7)
    assert louis.monte_carlo_error is None


# --- a linear mixed model: Gaussian, so the marginal log-likelihood is closed-form ---------

NUM_GROUPS, PER_GROUP = 8, 5


def random_intercept(y):
    mu = numpyro.param("mu", jnp.array(0.0))
    tau = numpyro.param("tau", jnp.array(1.0), constraint=constraints.positive)
    sigma = numpyro.param("sigma", jnp.array(1.0), constraint=constraints.positive)
    with numpyro.plate("group", y.shape[0]):
        b = numpyro.sample("b", dist.Normal(0.0, tau))
        numpyro.sample("y", dist.Normal(mu + b[:, None], sigma).to_event(1), obs=y)


def lmm_data():
    rng = np.random.default_rng(4)
    b = rng.normal(0.0, 1.5, NUM_GROUPS)
    return 2.0 + b[:, None] + rng.normal(0.0, 1.0, (NUM_GROUPS, PER_GROUP))


def marginal_log_likelihood(y, mu, tau, sigma):
    n = y.shape[1]
    cov = sigma**2 * np.eye(n) + tau**2 * np.ones((n, n))
    return stats.multivariate_normal(np.full(n, mu), cov).logpdf(y).sum()


def finite_difference_standard_errors(y, params, step=1e-4):
    """SEs of (mu, tau, sigma) from a central-difference Hessian of the closed-form
    marginal log-likelihood in (mu, log tau, log sigma), by the delta method."""
    u0 = np.array([params["mu"], np.log(params["tau"]), np.log(params["sigma"])], np.float64)

    def f(u):
        return marginal_log_likelihood(y, u[0], np.exp(u[1]), np.exp(u[2]))

    hessian = np.zeros((3, 3))
    for i in range(3):
        for j in range(3):
            e_i, e_j = np.eye(3)[i] * step, np.eye(3)[j] * step
            hessian[i, j] = (
                f(u0 + e_i + e_j) - f(u0 + e_i - e_j) - f(u0 - e_i + e_j) + f(u0 - e_i - e_j)
            ) / (4 * step**2)
    jacobian = np.diag([1.0, np.exp(u0[1]), np.exp(u0[2])])
    return np.sqrt(np.diag(jacobian @ np.linalg.inv(-hessian) @ jacobian.T))


def assert_within_monte_carlo_error(se, expected, spread=4.0, floor=0.03):
    for k, name in enumerate(("mu", "tau", "sigma")):
        error = float(se.monte_carlo_error[name])
        assert np.isfinite(error) and error > 0
        tolerance = spread * error + floor * expected[k]
        assert abs(float(se.standard_errors[name]) - expected[k]) < tolerance, (
            name,
            float(se.standard_errors[name]),
            expected[k],
            error,
        )


def test_louis_with_exact_posterior_draws_equals_the_closed_form_information(x64):
    y = lmm_data()
    params = {"mu": 2.2, "tau": 1.3, "sigma": 0.9}
    # The posterior of each intercept is normal: draw it exactly.
    precision = 1 / params["tau"] ** 2 + PER_GROUP / params["sigma"] ** 2
    mean = (PER_GROUP / params["sigma"] ** 2) * (y.mean(1) - params["mu"]) / precision
    rng = np.random.default_rng(5)
    # Louis' identity subtracts two large terms where the latents hide most of the
    # information (mu: the intercepts absorb it), so it needs many draws.
    draws = mean + rng.normal(size=(40000, NUM_GROUPS)) / np.sqrt(precision)
    se = louis_standard_errors(
        random_intercept,
        {n: jnp.asarray(v) for n, v in params.items()},
        {"b": jnp.asarray(draws)},
        jnp.asarray(y),
    )
    expected = finite_difference_standard_errors(y, params)
    assert_within_monte_carlo_error(se, expected, floor=0.0)
    for name in ("mu", "tau", "sigma"):
        assert float(se.monte_carlo_error[name]) < 0.06 * float(se.standard_errors[name])


# NUTS compiles for about 30 s: out of the default run (the two tests above check the
# identity on exact draws).
@pytest.mark.slow
def test_saem_standard_errors_by_louis_identity_match_the_closed_form_information(x64):
    y = jnp.asarray(lmm_data())
    # A schedule SAEM declares converged (with (40, 40) or (100, 100) the params still move
    # at the end of the first phase, and `run` says so): the fit is the control for the
    # warning below, so its standard errors come without one.
    em = jaxem.SAEM(random_intercept, schedule=(200, 100), num_is_draws=250, num_is_samples=500)
    result = em.run(jax.random.PRNGKey(0), y)
    assert bool(result.converged)
    with warnings.catch_warnings():
        warnings.simplefilter("error", jaxem.ConvergenceWarning)
        se = jaxem.standard_errors(random_intercept, result, y)
    params = {n: float(v) for n, v in result.params.items()}
    # Louis' identity gives the observed information at the fit's params, whatever they
    # are: compare there. (SAEM's estimate is not the MLE: mu ends 0.08 to 0.14 below the
    # grand mean, 1.743, over seeds 0 to 2, the intercepts written as deviations being the
    # slow direction docs/monte-carlo-em.md warns of; the log-likelihood it leaves, the
    # stationarity gain, is 0.02 to 0.04, which `converged` accepts.)
    expected = finite_difference_standard_errors(np.asarray(y), params)
    assert_within_monte_carlo_error(se, expected)
    assert se.covariance.shape == (3, 3)
    with pytest.warns(jaxem.ConvergenceWarning, match="Monte Carlo fit did not converge"):
        jaxem.standard_errors(random_intercept, result._replace(converged=jnp.array(False)), y)


def test_louis_names_a_continuous_latent_without_draws(x64):
    y = jnp.asarray(lmm_data())
    params = {"mu": jnp.array(2.0), "tau": jnp.array(1.0), "sigma": jnp.array(1.0)}
    with pytest.raises(ModelError, match="latent site 'b' is continuous and has no draws"):
        louis_standard_errors(random_intercept, params, {"c": jnp.zeros((3, 8))}, y)
    with pytest.raises(ModelError, match="draws of latent site 'b' are not all finite"):
        louis_standard_errors(random_intercept, params, {"b": jnp.full((3, 8), jnp.nan)}, y)
    with pytest.raises(ModelError, match=r"draws of latent site 'b' have shape \(4,\)"):
        louis_standard_errors(random_intercept, params, {"b": jnp.zeros((3, 4))}, y)
    with pytest.raises(ModelError, match="draws name site 'y', which is observed"):
        louis_standard_errors(
            random_intercept, params, {"b": jnp.zeros((3, 8)), "y": jnp.zeros((3, 8, 5))}, y
        )


def test_louis_refuses_case_weights_by_name(x64):
    def weighted(y, weights):
        mu = numpyro.param("mu", jnp.array(0.0))
        with numpyro.plate("group", y.shape[0]), numpyro.handlers.scale(scale=weights):
            b = numpyro.sample("b", dist.Normal(0.0, 1.0))
            numpyro.sample("y", dist.Normal(mu + b, 1.0), obs=y)

    with pytest.raises(ModelError, match="site 'b' is scaled .case weights"):
        louis_standard_errors(
            weighted,
            {"mu": jnp.array(0.0)},
            {"b": jnp.zeros((3, 4))},
            jnp.zeros(4),
            jnp.array([1.0, 2.0, 1.0, 3.0]),
        )


def test_a_monte_carlo_fitter_s_standard_errors_leave_its_frozen_params_out(x64):
    """`SAEM.standard_errors` passes the fitter's ``frozen``: a result does not record it."""
    y = lmm_data()
    params = {"mu": 2.2, "tau": 1.3, "sigma": 0.9}
    precision = 1 / params["tau"] ** 2 + PER_GROUP / params["sigma"] ** 2
    mean = (PER_GROUP / params["sigma"] ** 2) * (y.mean(1) - params["mu"]) / precision
    draws = mean + np.random.default_rng(6).normal(size=(400, NUM_GROUPS)) / np.sqrt(precision)
    params = {n: jnp.asarray(v) for n, v in params.items()}
    draws = {"b": jnp.asarray(draws)}
    # The fields a fit fills that standard errors read; no chain is run.
    result = jaxem.MCResult(**dict.fromkeys(jaxem.MCResult._fields))._replace(
        params=params, draws=draws, converged=jnp.array(True)
    )
    with warnings.catch_warnings():  # a converged fit's standard errors come without a warning
        warnings.simplefilter("error", jaxem.ConvergenceWarning)
        se = jaxem.SAEM(random_intercept, frozen=("sigma",)).standard_errors(result, jnp.asarray(y))
    assert set(se.standard_errors) == {"mu", "tau"} and se.covariance.shape == (2, 2)
    expected = louis_standard_errors(
        random_intercept, params, draws, jnp.asarray(y), frozen=("sigma",)
    )
    for name in ("mu", "tau"):
        np.testing.assert_allclose(se.standard_errors[name], expected.standard_errors[name])
    with pytest.warns(jaxem.ConvergenceWarning, match="Monte Carlo fit did not converge"):
        jaxem.SAEM(random_intercept).standard_errors(
            result._replace(converged=jnp.array(False)), jnp.asarray(y)
        )
