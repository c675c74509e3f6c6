"""Coefficients that the weighted least-squares closed form (`jaxem.affine`) cannot
identify (collinear covariates, an empty component): flagged in the result
(``result.unidentified``) and warned about by every fitter (`jaxem.identification`)."""

import itertools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.distributions import constraints

import jaxem
from jaxem.exceptions import NumericalWarning
from jaxem.identification import unidentified_entries
from tests.models import shifted_regressions

K = 2


def shifted_ridge(X, y):
    """shifted_regressions with a Normal prior on beta (a global site)."""
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    mu = numpyro.param("mu", jnp.array([-1.0, 1.0]))
    beta = numpyro.sample("beta", dist.Normal(0.0, 1.0).expand([X.shape[1]]).to_event(1))
    sigma = numpyro.param("sigma", jnp.ones(K), constraint=constraints.positive)
    with numpyro.plate("data", y.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("y", dist.Normal(mu[z] + X @ beta, sigma[z]), obs=y)


def _data(n=200, collinear=True, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3))
    if collinear:
        X[:, 2] = X[:, 0] - 2.0 * X[:, 1]
    z = rng.integers(0, K, n)
    y = np.array([-3.0, 3.0])[z] + X[:, :2] @ np.array([1.0, -0.5]) + rng.normal(size=n)
    return X, y


MESSAGE = (
    r"EM: the coefficients 'beta' \(entries 0, 1, 2\) of the Normal location at site 'y' are "
    r"not identified: the weighted design of the least-squares M-step is rank-deficient"
)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_em_warns_about_collinear_covariates_and_a_prior_identifies_them(request, dtype):
    """X[:, 2] = X[:, 0] - 2 X[:, 1]: beta is not identified (its three entries share the
    null direction); the intercepts are. With a Normal prior on beta (a ridge term) the
    fit is identified: no warning."""
    request.getfixturevalue("x64" if dtype == "float64" else "x32")
    X, y = (jnp.asarray(a, dtype) for a in _data())
    with pytest.warns(NumericalWarning, match=MESSAGE) as record:
        result = jaxem.EM(shifted_regressions).run(jax.random.PRNGKey(0), X, y, max_iter=200)
    message = str(next(w.message for w in record if "not identified" in str(w.message)))
    assert "Drop or combine the collinear covariates" in message
    assert "add a prior: a Normal prior on them (global_sites)" in message
    assert "'mu'" not in message
    np.testing.assert_array_equal(result.unidentified["beta"], [True, True, True])
    np.testing.assert_array_equal(result.unidentified["mu"], [False, False])

    with warnings.catch_warnings():
        warnings.simplefilter("error", NumericalWarning)
        ridge = jaxem.EM(shifted_ridge, global_sites=("beta",)).run(
            jax.random.PRNGKey(0), X, y, max_iter=200
        )
    assert not np.any(np.asarray(ridge.unidentified["beta"]))


def test_em_warns_about_an_empty_component_and_not_about_a_well_posed_fit(x64):
    """Component 1 has no weight: its coefficients are not identified (and keep their
    values). A fit with well-posed covariates warns about nothing."""

    def model(X, y):
        beta = numpyro.param("beta", jnp.array([[0.3, -0.1], [5.0, 6.0]]))
        with numpyro.plate("data", y.shape[0]):
            z = numpyro.sample("z", dist.Categorical(jnp.array([1.0, 0.0])))
            numpyro.sample("y", dist.Normal((beta[z] * X).sum(-1), 1.0), obs=y)

    X, y = _data(collinear=False)
    with pytest.warns(NumericalWarning, match=r"'beta' \(entries \(1, 0\), \(1, 1\)\) of"):
        result = jaxem.EM(model).run(jax.random.PRNGKey(0), X[:, :2], y, max_iter=20)
    np.testing.assert_array_equal(result.unidentified["beta"], [[False, False], [True, True]])
    np.testing.assert_array_equal(result.params["beta"][1], [5.0, 6.0])

    with warnings.catch_warnings():
        warnings.simplefilter("error", NumericalWarning)
        fit = jaxem.EM(shifted_regressions).run(jax.random.PRNGKey(0), X, y, max_iter=200)
    assert not any(np.any(np.asarray(v)) for v in fit.unidentified.values())


def latent_regression(X, y):
    """Group effects z_g ~ Normal(X_g beta, s), observed through y_g ~ Normal(z_g, 1):
    beta is affine in the location of the latent site z (SAEM, MCEM)."""
    beta = numpyro.param("beta", jnp.zeros(X.shape[1]))
    s = numpyro.param("s", 1.0, constraint=constraints.positive)
    with numpyro.plate("groups", y.shape[0]):
        z = numpyro.sample("z", dist.Normal(X @ beta, s))
        numpyro.sample("y", dist.Normal(z, 1.0), obs=y)


# MCEM draws through the same code (the finish program's normal equations); its case
# runs under -m slow (CI time).
@pytest.mark.parametrize("fitter", ["SAEM", pytest.param("MCEM", marks=pytest.mark.slow)])
def test_monte_carlo_fitters_warn_about_collinear_covariates(x64, fitter):
    rng = np.random.default_rng(1)
    column = rng.normal(size=8)
    X = jnp.asarray(np.stack([np.ones(8), column, column], 1))
    y = jnp.asarray(1.0 + 2.0 * column + rng.normal(size=8))
    if fitter == "SAEM":
        em, options = jaxem.SAEM(latent_regression, schedule=(10, 5), num_is_draws=20), {}
    else:
        em = jaxem.MCEM(latent_regression, max_draws=20, num_is_draws=20)
        options = {"max_iter": 15}
    assert em.m_step_paths(X, y)["beta"].startswith("closed-form")
    match = (
        rf"{fitter}: the coefficients 'beta' \(entries 1, 2\) of the Normal location at site "
        "'z' are not identified"
    )
    with pytest.warns(NumericalWarning, match=match):
        result = em.run(jax.random.PRNGKey(0), X, y, **options)
    np.testing.assert_array_equal(result.unidentified["beta"], [False, True, True])


def test_online_em_warns_about_collinear_covariates(x64):
    X, y = _data(n=400)
    batches = [
        (jnp.asarray(X[i : i + 100]), jnp.asarray(y[i : i + 100])) for i in range(0, 400, 100)
    ]
    online = jaxem.OnlineEM(shifted_regressions)
    with pytest.warns(NumericalWarning, match=MESSAGE.replace("EM:", "OnlineEM:")):
        result = online.run(jax.random.PRNGKey(0), itertools.chain(batches, batches))
    np.testing.assert_array_equal(result.unidentified["beta"], [True, True, True])
    np.testing.assert_array_equal(result.unidentified["mu"], [False, False])


def test_the_threshold_is_fitted_to_the_dtype(x64):
    """Two covariates correlated at 1 - 1e-6: a scaled Gram eigenvalue of ~2e-6, below
    size * sqrt(eps) in float32 (6.9e-4), above it in float64 (3e-8)."""
    gram = np.array([[1.0, 1.0 - 1e-6], [1.0 - 1e-6, 1.0]]) * np.array([4.0, 9.0])[:, None] ** 0.5
    gram = gram * np.array([4.0, 9.0])[None, :] ** 0.5  # unscaled: variances 4 and 9
    (flags64,) = unidentified_entries(jnp.asarray(gram), [jnp.zeros(2, jnp.float64)])
    (flags32,) = unidentified_entries(jnp.asarray(gram, jnp.float32), [jnp.zeros(2, jnp.float32)])
    np.testing.assert_array_equal(flags64, [False, False])
    np.testing.assert_array_equal(flags32, [True, True])
    (empty,) = unidentified_entries(jnp.diag(jnp.array([1.0, 0.0])), [jnp.zeros(2)])
    np.testing.assert_array_equal(empty, [False, True])
