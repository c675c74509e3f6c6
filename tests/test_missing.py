"""Missing observations: exact marginalization, closed-form EM, imputation.

References are independent of jaxem: the observed-data log-likelihood written per
missingness pattern with scipy / plain jnp, maximized by scipy's BFGS and polished by
Newton steps; the closed-form factored MLE of a bivariate monotone pattern; densities
of the observed coordinates from scipy.stats.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
import scipy.optimize
from numpyro.distributions import constraints
from scipy.special import logsumexp
from scipy.stats import multivariate_normal, norm, poisson

import jaxem
from jaxem import EM, ModelError, nan_as_missing


def mvn_model(x):
    dim = x.shape[1]
    mu = numpyro.param("mu", jnp.zeros(dim))
    cov = numpyro.param("cov", jnp.eye(dim), constraint=constraints.positive_definite)
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("x", dist.MultivariateNormal(mu, covariance_matrix=cov), obs=x)


def gmm(x, K=2):
    dim = x.shape[1]
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    mu = numpyro.param("mu", jnp.linspace(-1.0, 1.0, K)[:, None] * jnp.ones(dim))
    tril = numpyro.param(
        "L", jnp.broadcast_to(jnp.eye(dim), (K, dim, dim)), constraint=constraints.lower_cholesky
    )
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.MultivariateNormal(mu[z], scale_tril=tril[z]), obs=x)


def tied_gmm(x, K=2):
    dim = x.shape[1]
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    mu = numpyro.param("mu", jnp.linspace(-1.0, 1.0, K)[:, None] * jnp.ones(dim))
    precision = numpyro.param("P", jnp.eye(dim), constraint=constraints.positive_definite)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.MultivariateNormal(mu[z], precision_matrix=precision), obs=x)


def diagonal_gmm(x, K=2):
    dim = x.shape[1]
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    mu = numpyro.param("mu", jnp.linspace(-1.0, 1.0, K)[:, None] * jnp.ones(dim))
    sigma = numpyro.param("sigma", jnp.ones((K, dim)), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Normal(mu[z], sigma[z]).to_event(1), obs=x)


def normal_mixture(x, mask=None):
    w = numpyro.param("w", jnp.array([0.5, 0.5]), constraint=constraints.simplex)
    mu = numpyro.param("mu", jnp.array([-1.0, 1.0]))
    sigma = numpyro.param("sigma", jnp.ones(2), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Normal(mu[z], sigma[z]), obs=x, obs_mask=mask)


def poisson_mixture(y):
    w = numpyro.param("w", jnp.array([0.5, 0.5]), constraint=constraints.simplex)
    rate = numpyro.param("rate", jnp.array([1.0, 5.0]), constraint=constraints.positive)
    with numpyro.plate("data", y.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("y", dist.Poisson(rate[z]), obs=y)


# ---------------------------------------------------------------------------
# Independent reference: the observed-data log-likelihood per missingness pattern.
# ---------------------------------------------------------------------------


def _observed_nll(x):
    """Negative observed-data log-likelihood and its gradient in (mu, lower Cholesky
    factor of the covariance), summed over the rows' observed coordinates."""
    x = np.asarray(x, np.float64)
    dim = x.shape[1]
    rows = [(~np.isnan(row), row) for row in x if (~np.isnan(row)).any()]
    tril = np.tril_indices(dim)

    def unpack(theta):
        factor = np.zeros((dim, dim))
        factor[tril] = theta[dim:]
        return theta[:dim], factor

    def nll(theta):
        mu, factor = unpack(theta)
        cov = factor @ factor.T
        total, grad_mu, grad_cov = 0.0, np.zeros(dim), np.zeros((dim, dim))
        for seen, row in rows:
            inverse = np.linalg.inv(cov[np.ix_(seen, seen)])
            residual = row[seen] - mu[seen]
            solved = inverse @ residual
            total += 0.5 * (
                residual @ solved
                + np.linalg.slogdet(cov[np.ix_(seen, seen)])[1]
                + seen.sum() * np.log(2 * np.pi)
            )
            grad_mu[seen] -= solved
            grad_cov[np.ix_(seen, seen)] += 0.5 * (inverse - np.outer(solved, solved))
        grad_factor = 2 * grad_cov @ factor
        return total, np.concatenate([grad_mu, grad_factor[tril]])

    return nll, unpack


def scipy_mle(x):
    """Maximizer of the observed-data log-likelihood: scipy's BFGS, polished by Newton
    steps on the exact gradient (Hessian by central differences of the gradient)."""
    dim = x.shape[1]
    nll, unpack = _observed_nll(x)
    start = np.concatenate([np.nanmean(x, 0), np.diag(np.nanstd(x, 0))[np.tril_indices(dim)]])
    result = scipy.optimize.minimize(
        nll, start, jac=True, method="BFGS", options={"gtol": 1e-11, "maxiter": 10000}
    )
    theta = result.x
    for _ in range(10):
        steps = 1e-6 * np.maximum(np.abs(theta), 1.0)
        hessian = np.stack(
            [
                (nll(theta + h * e)[1] - nll(theta - h * e)[1]) / (2 * h)
                for h, e in zip(steps, np.eye(len(theta)))
            ]
        )
        theta = theta - np.linalg.solve(0.5 * (hessian + hessian.T), nll(theta)[1])
    assert np.max(np.abs(nll(theta)[1])) < 1e-8
    mu, factor = unpack(theta)
    return mu, factor @ factor.T, -nll(theta)[0]


def mcar(rng, x, fraction):
    x = np.array(x, dtype=np.float64)
    x[rng.random(x.shape) < fraction] = np.nan
    return x


def assert_monotone(history):
    history = np.asarray(history)
    history = history[np.isfinite(history)]
    assert np.all(np.diff(history) >= -1e-10 * np.abs(history[1:]))


def fit_mvn(x, max_iter=500):
    init = {"mu": jnp.asarray(np.nanmean(x, 0)), "cov": jnp.diag(jnp.asarray(np.nanvar(x, 0)))}
    em = EM(nan_as_missing(mvn_model), reg_covar=0.0)
    return em.run(jax.random.PRNGKey(0), jnp.asarray(x), max_iter=max_iter, tol=0, init_params=init)


# ---------------------------------------------------------------------------
# A multivariate normal with missing values: EM reaches the observed-data MLE.
# ---------------------------------------------------------------------------


def test_mvn_mcar_em_is_the_observed_data_mle(x64, rng):
    cov = np.array([[2.0, 0.8, -0.5], [0.8, 1.0, 0.3], [-0.5, 0.3, 1.5]])
    x = mcar(rng, rng.multivariate_normal([1.0, -2.0, 0.5], cov, size=40), 0.3)
    em = EM(nan_as_missing(mvn_model))
    assert all(p.startswith("closed-form") for p in em.m_step_paths(jnp.asarray(x)).values())
    fit = fit_mvn(x)
    mu, cov_hat, max_ll = scipy_mle(x)
    np.testing.assert_allclose(fit.params["mu"], mu, rtol=1e-6)
    np.testing.assert_allclose(fit.params["cov"], cov_hat, rtol=1e-6)
    np.testing.assert_allclose(fit.log_likelihood, max_ll, rtol=1e-10)
    assert_monotone(fit.history)


@pytest.mark.parametrize("name", ["apple.csv", "missvals.csv"])
def test_mvnmle_datasets(x64, load_csv, name):
    """Little & Rubin's data sets shipped with R's mvnmle."""
    x = load_csv(name)
    fit = fit_mvn(x)
    mu, cov, max_ll = scipy_mle(x)
    np.testing.assert_allclose(fit.params["mu"], mu, rtol=1e-6)
    np.testing.assert_allclose(fit.params["cov"], cov, rtol=1e-6)
    np.testing.assert_allclose(fit.log_likelihood, max_ll, rtol=1e-10)
    assert_monotone(fit.history)
    if name == "apple.csv":
        # Monotone pattern: the factored likelihood (Anderson 1957) gives the MLE in
        # closed form, and Little & Rubin print it (mu = 14.72, 49.33; sigma11 = 89.53,
        # sigma12 = -90.69, sigma22 = 114.69).
        size, complete = x[:, 0], ~np.isnan(x[:, 1])
        xc, yc = x[complete, 0], x[complete, 1]
        slope = np.mean((xc - xc.mean()) * (yc - yc.mean())) / np.var(xc)
        residual_var = np.var(yc - slope * xc)
        mu1, s11 = size.mean(), size.var()
        expected_mu = [mu1, yc.mean() + slope * (mu1 - xc.mean())]
        expected_cov = [[s11, slope * s11], [slope * s11, residual_var + slope**2 * s11]]
        np.testing.assert_allclose(fit.params["mu"], expected_mu, rtol=1e-8)
        np.testing.assert_allclose(fit.params["cov"], expected_cov, rtol=1e-8)
        np.testing.assert_allclose(fit.params["mu"], [14.72, 49.33], atol=0.005)
        np.testing.assert_allclose(
            fit.params["cov"], [[89.53, -90.69], [-90.69, 114.69]], atol=0.01
        )


@pytest.mark.parametrize("acceleration, em_steps_per_iter", [("squarem", 3), ("anderson", 1)])
def test_accelerated_em_reaches_the_observed_data_mle(
    x64, load_csv, acceleration, em_steps_per_iter
):
    """Missing data make EM slow (much of the information is missing); accelerated EM
    reaches the same maximizer as scipy in fewer EM steps, never going down."""
    x = load_csv("missvals.csv")
    mu, cov, max_ll = scipy_mle(x)
    init = {"mu": jnp.asarray(np.nanmean(x, 0)), "cov": jnp.diag(jnp.asarray(np.nanvar(x, 0)))}
    em = EM(nan_as_missing(mvn_model), reg_covar=0.0, acceleration=acceleration)
    fit = em.run(jax.random.PRNGKey(0), jnp.asarray(x), max_iter=150, tol=0, init_params=init)
    np.testing.assert_allclose(fit.params["mu"], mu, rtol=1e-6)
    np.testing.assert_allclose(fit.params["cov"], cov, rtol=1e-6)
    np.testing.assert_allclose(fit.log_likelihood, max_ll, rtol=1e-10)
    assert_monotone(fit.history)

    def em_steps_to(history, steps_per_iter):
        (hits,) = np.nonzero(max_ll - np.asarray(history) < 1e-8 * abs(max_ll))
        assert hits.size, "never within 1e-8 of the maximum"
        return steps_per_iter * int(hits[0])

    # A property, not a count: how many steps Anderson's extrapolation saves depends on the
    # rounding of its small least-squares solves, which changes with the jax/XLA release
    # (74, 112 and 66 EM steps have been seen; SQUAREM 45; plain EM 192: docs/missing-data.md).
    plain = fit_mvn(x)
    assert em_steps_to(fit.history, em_steps_per_iter) < em_steps_to(plain.history, 1)


# ---------------------------------------------------------------------------
# Mixtures with missing values.
# ---------------------------------------------------------------------------


def _gmm_params(rng, K, dim):
    tril = np.tril(rng.normal(size=(K, dim, dim)) * 0.3) + np.eye(dim)
    return {
        "w": jnp.asarray(rng.dirichlet(np.ones(K))),
        "mu": jnp.asarray(rng.normal(size=(K, dim)) * 2),
        "L": jnp.asarray(tril),
    }


def gmm_observed_log_likelihood(x, params):
    """sum over rows of log sum_k w_k N(x_v | mu_kv, S_kvv), v the row's observed
    coordinates (scipy), rows with nothing observed contributing log 1."""
    cov = np.asarray(params["L"] @ jnp.swapaxes(params["L"], -1, -2))
    total = 0.0
    for row in x:
        seen = ~np.isnan(row)
        if not seen.any():
            continue
        terms = [
            np.log(params["w"][k])
            + multivariate_normal(
                np.asarray(params["mu"][k])[seen], cov[k][np.ix_(seen, seen)]
            ).logpdf(row[seen])
            for k in range(len(params["w"]))
        ]
        total += logsumexp(terms)
    return total


def test_gmm_log_likelihood_is_the_observed_data_log_likelihood(x64, rng):
    params = _gmm_params(rng, 3, 3)
    x = mcar(rng, rng.normal(size=(25, 3)) * 2, 0.35)
    x[0] = np.nan  # a row with nothing observed contributes log 1
    got = jaxem.log_likelihood(nan_as_missing(gmm), params, jnp.asarray(x), K=3)
    np.testing.assert_allclose(got, gmm_observed_log_likelihood(x, params), rtol=1e-12)


@pytest.mark.parametrize("model", [gmm, tied_gmm], ids=["full", "tied-precision"])
def test_gmm_em_with_missing_values_is_monotone_and_closed_form(x64, rng, model):
    x = np.concatenate([rng.normal(size=(30, 3)) - 2, rng.normal(size=(30, 3)) * 0.7 + 2])
    x = mcar(rng, x @ np.array([[1.0, 0.4, 0.0], [0.0, 1.0, 0.3], [0.0, 0.0, 1.0]]), 0.3)
    em = EM(nan_as_missing(model))
    assert all(p.startswith("closed-form") for p in em.m_step_paths(jnp.asarray(x)).values())
    fit = em.run(jax.random.PRNGKey(0), jnp.asarray(x), max_iter=40, tol=0)
    assert_monotone(fit.history)
    assert fit.history[-1] > fit.history[0] + 10
    np.testing.assert_allclose(
        fit.log_likelihood, jaxem.log_likelihood(nan_as_missing(model), fit.params, x), rtol=1e-12
    )


def test_diagonal_and_discrete_sites_drop_missing_entries(x64, rng):
    params = {
        "w": jnp.array([0.3, 0.7]),
        "mu": jnp.array([[-1.0, 0.0], [1.0, 2.0]]),
        "sigma": jnp.array([[1.0, 0.5], [2.0, 1.5]]),
    }
    x = mcar(rng, rng.normal(size=(20, 2)), 0.4)
    seen = ~np.isnan(x)
    per_component = [
        np.log(params["w"][k])
        + np.sum(
            np.where(seen, norm(params["mu"][k], params["sigma"][k]).logpdf(np.nan_to_num(x)), 0),
            axis=1,
        )
        for k in range(2)
    ]
    expected = np.sum(logsumexp(np.stack(per_component), axis=0))
    model = nan_as_missing(diagonal_gmm)
    np.testing.assert_allclose(jaxem.log_likelihood(model, params, jnp.asarray(x)), expected)
    fit = EM(model).run(jax.random.PRNGKey(0), jnp.asarray(x), max_iter=30, tol=0)
    assert_monotone(fit.history)
    assert all(p.startswith("closed-form") for p in EM(model).m_step_paths(x).values())

    y = np.array([0.0, 3.0, np.nan, 7.0, 1.0, np.nan, 6.0])
    kept = y[~np.isnan(y)]
    poisson_params = {"w": jnp.array([0.4, 0.6]), "rate": jnp.array([1.0, 5.0])}
    expected = np.sum(
        logsumexp(np.log([[0.4], [0.6]]) + poisson([[1.0], [5.0]]).logpmf(kept[None]), axis=0)
    )
    got = jaxem.log_likelihood(nan_as_missing(poisson_mixture), poisson_params, jnp.asarray(y))
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    # Missing entries carry no weight: the fit equals the fit to the observed entries.
    fit_missing = EM(nan_as_missing(poisson_mixture)).run(
        jax.random.PRNGKey(0), jnp.asarray(y), max_iter=50, tol=0
    )
    fit_kept = EM(poisson_mixture).run(jax.random.PRNGKey(0), jnp.asarray(kept), max_iter=50, tol=0)
    for name in ("w", "rate"):
        np.testing.assert_allclose(fit_missing.params[name], fit_kept.params[name], rtol=1e-8)


# ---------------------------------------------------------------------------
# Edge cases: rows with nothing observed, columns never observed, complete data.
# ---------------------------------------------------------------------------


def test_rows_with_every_entry_missing_change_nothing(x64, rng):
    x = mcar(rng, rng.normal(size=(30, 3)) @ np.diag([1.0, 2.0, 0.5]), 0.25)
    padded = np.concatenate([x, np.full((5, 3), np.nan)])
    model = nan_as_missing(mvn_model)
    params = {"mu": jnp.array([0.1, -0.2, 0.3]), "cov": jnp.diag(jnp.array([1.0, 3.0, 0.5]))}
    np.testing.assert_allclose(
        jaxem.log_likelihood(model, params, jnp.asarray(padded)),
        jaxem.log_likelihood(model, params, jnp.asarray(x)),
        rtol=1e-13,
    )
    fit, fit_padded = fit_mvn(x, max_iter=100), fit_mvn(padded, max_iter=100)
    for name in ("mu", "cov"):
        np.testing.assert_allclose(fit_padded.params[name], fit.params[name], rtol=1e-10)


def test_a_column_never_observed_is_marginalized_but_not_fitted(x64, rng):
    params = _gmm_params(rng, 2, 3)
    x = mcar(rng, rng.normal(size=(20, 3)) * 2, 0.2)
    x[:, 1] = np.nan
    model = nan_as_missing(gmm)
    # The densities marginalize the column like any missing entry.
    got = jaxem.log_likelihood(model, params, jnp.asarray(x))
    np.testing.assert_allclose(got, gmm_observed_log_likelihood(x, params), rtol=1e-12)
    post = jaxem.posterior(model, params, jnp.asarray(x))["z"]
    np.testing.assert_allclose(np.sum(post, -1), 1.0, rtol=1e-12)
    assert np.all(np.isfinite(jaxem.impute(model, params, jnp.asarray(x))["x"]))
    # Fitting cannot estimate the column's mean and covariances.
    message = (
        r"coordinate\(s\) \[1\] of the MultivariateNormal site\(s\) 'x' are missing in every "
        r"row of every site that param\(s\) 'L', 'mu' reach.*Drop those coordinates"
    )
    for fitter in (EM(model), jaxem.VariationalEM(model), jaxem.OnlineEM(model)):
        with pytest.raises(ModelError, match=message):
            fitter.init(jax.random.PRNGKey(0), jnp.asarray(x))
    with pytest.raises(ModelError, match=message):
        EM(model).run(jax.random.PRNGKey(0), jnp.asarray(x), max_iter=2)
    x = rng.normal(size=(10, 3))
    x[:, 2] = np.nan
    with pytest.raises(ModelError, match=r"\[2\] of the .* site\(s\) 'x' .* 'cov', 'mu' reach"):
        EM(nan_as_missing(mvn_model)).init(jax.random.PRNGKey(0), jnp.asarray(x))


def test_a_coordinate_is_needed_in_some_site_of_each_param():
    def shared_mean(a, b):
        mu = numpyro.param("mu", jnp.zeros(2))
        cov_a = numpyro.param("cov_a", jnp.eye(2), constraint=constraints.positive_definite)
        cov_b = numpyro.param("cov_b", jnp.eye(2), constraint=constraints.positive_definite)
        with numpyro.plate("a_rows", a.shape[0]):
            numpyro.sample("a", dist.MultivariateNormal(mu, cov_a), obs=a)
        with numpyro.plate("b_rows", b.shape[0]):
            numpyro.sample("b", dist.MultivariateNormal(mu, cov_b), obs=b)

    a = jnp.array([[1.0, jnp.nan], [0.5, jnp.nan], [0.2, jnp.nan]])
    b = jnp.array([[1.0, 2.0], [jnp.nan, 0.5], [0.3, jnp.nan]])
    # b observes mu's coordinate 1, but cov_a reaches a alone, which never does.
    with pytest.raises(
        ModelError, match=r"\[1\] of the .* site\(s\) 'a' .* param\(s\) 'cov_a' reach"
    ):
        EM(nan_as_missing(shared_mean)).init(jax.random.PRNGKey(0), a, b)
    # Not an error when cov_a is not fitted.
    EM(nan_as_missing(shared_mean), frozen=["cov_a"]).init(jax.random.PRNGKey(0), a, b)


def test_nan_without_opt_in_is_an_error(rng):
    x = rng.normal(size=(10, 3))
    x[2, 1] = np.nan
    with pytest.raises(ModelError, match=r"'x' contains 1 NaN.*jaxem.nan_as_missing\(model\)"):
        EM(mvn_model).init(jax.random.PRNGKey(0), jnp.asarray(x))
    # Only the named sites treat NaN as missing.
    with pytest.raises(ModelError, match="'x' contains 1 NaN"):
        EM(nan_as_missing(mvn_model, sites=["other"])).init(jax.random.PRNGKey(0), x)
    x[3, 0] = np.inf
    with pytest.raises(ModelError, match="'x' contains 1 NaN or infinite"):
        EM(nan_as_missing(mvn_model)).init(jax.random.PRNGKey(0), jnp.asarray(x))


def test_partly_missing_event_without_a_marginal_is_an_error():
    def multinomial_mixture(counts):
        w = numpyro.param("w", jnp.array([0.5, 0.5]), constraint=constraints.simplex)
        p = numpyro.param("p", jnp.array([[0.2, 0.8], [0.7, 0.3]]), constraint=constraints.simplex)
        with numpyro.plate("data", counts.shape[0]):
            z = numpyro.sample("z", dist.Categorical(w))
            numpyro.sample("counts", dist.Multinomial(5, p[z]), obs=counts)

    counts = jnp.array([[1.0, 4.0], [jnp.nan, 2.0], [jnp.nan, jnp.nan]])
    with pytest.raises(ModelError, match="'counts' has 1 event.*some but not all entries missing"):
        EM(nan_as_missing(multinomial_mixture)).init(jax.random.PRNGKey(0), counts)
    # Whole events missing are marginalized.
    state = EM(nan_as_missing(multinomial_mixture)).init(jax.random.PRNGKey(0), counts[::2])
    assert set(state.params) == {"w", "p"}


def test_complete_data_equals_the_ordinary_path(x64, rng):
    x = jnp.asarray(rng.normal(size=(40, 2)) + np.repeat([[-2.0, 0.0], [2.0, 1.0]], 20, axis=0))
    plain = EM(gmm).run(jax.random.PRNGKey(0), x, max_iter=15, tol=0)
    missing = EM(nan_as_missing(gmm)).run(jax.random.PRNGKey(0), x, max_iter=15, tol=0)
    np.testing.assert_allclose(missing.history, plain.history, rtol=1e-12)
    for name in ("w", "mu", "L"):
        np.testing.assert_allclose(missing.params[name], plain.params[name], rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------
# NumPyro's obs_mask.
# ---------------------------------------------------------------------------


def test_obs_mask_marginalizes_like_nan(x64, rng):
    x = np.concatenate([rng.normal(size=15) - 2, rng.normal(size=15) + 2])
    mask = rng.random(30) > 0.3
    with_nan = np.where(mask, x, np.nan)
    params = {"w": jnp.array([0.4, 0.6]), "mu": jnp.array([-1.5, 2.5]), "sigma": jnp.ones(2)}
    kept = jaxem.log_likelihood(normal_mixture, params, jnp.asarray(x[mask]))
    masked = jaxem.log_likelihood(normal_mixture, params, jnp.asarray(with_nan), jnp.asarray(mask))
    nan = jaxem.log_likelihood(nan_as_missing(normal_mixture), params, jnp.asarray(with_nan))
    np.testing.assert_allclose(masked, kept, rtol=1e-12)
    np.testing.assert_allclose(nan, kept, rtol=1e-12)
    fit_masked = EM(normal_mixture).run(
        jax.random.PRNGKey(0), jnp.asarray(with_nan), jnp.asarray(mask), max_iter=40, tol=0
    )
    fit_kept = EM(normal_mixture).run(
        jax.random.PRNGKey(0), jnp.asarray(x[mask]), max_iter=40, tol=0
    )
    assert all(np.isfinite(v).all() for v in fit_masked.params.values())
    for name in ("w", "mu", "sigma"):
        np.testing.assert_allclose(fit_masked.params[name], fit_kept.params[name], rtol=1e-9)


# ---------------------------------------------------------------------------
# Imputation.
# ---------------------------------------------------------------------------


def test_impute_conditional_expectation(x64, rng):
    params = _gmm_params(rng, 2, 3)
    x = mcar(rng, rng.normal(size=(12, 3)), 0.4)
    model = nan_as_missing(gmm)
    filled = np.asarray(jaxem.impute(model, params, jnp.asarray(x))["x"])
    responsibilities = np.asarray(jaxem.posterior(model, params, jnp.asarray(x))["z"])
    cov = np.asarray(params["L"] @ jnp.swapaxes(params["L"], -1, -2))
    mu = np.asarray(params["mu"])
    for n, row in enumerate(x):
        seen, hidden = ~np.isnan(row), np.isnan(row)
        expected = row.copy()
        expected[hidden] = 0.0
        for k in range(2):
            conditional = mu[k][hidden]
            if seen.any():
                gain = cov[k][np.ix_(hidden, seen)] @ np.linalg.inv(cov[k][np.ix_(seen, seen)])
                conditional = conditional + gain @ (row[seen] - mu[k][seen])
            expected[hidden] += responsibilities[n, k] * conditional
        np.testing.assert_allclose(filled[n], expected, rtol=1e-10, atol=1e-12)


def test_impute_draws_from_the_conditional(x64):
    cov = jnp.array([[1.0, 0.6], [0.6, 2.0]])
    params = {"mu": jnp.array([1.0, -1.0]), "cov": cov}
    x = jnp.tile(jnp.array([[2.0, jnp.nan]]), (4000, 1))
    draws = jaxem.impute(nan_as_missing(mvn_model), params, x, rng_key=jax.random.PRNGKey(3))["x"]
    assert np.all(np.asarray(draws[:, 0]) == 2.0)
    mean, var = 0.6 * 1.0 - 1.0, 2.0 - 0.36
    np.testing.assert_allclose(np.mean(draws[:, 1]), mean, atol=4 * np.sqrt(var / 4000))
    np.testing.assert_allclose(np.var(draws[:, 1]), var, rtol=0.1)


def test_missing_values_under_restarts(rng):
    # Under vmap the all-observed shortcut (lax.cond) runs both branches.
    x = jnp.asarray(mcar(rng, rng.normal(size=(30, 2)), 0.3), jnp.float32)
    fit = EM(nan_as_missing(gmm)).run(jax.random.PRNGKey(0), x, max_iter=10, num_restarts=2)
    assert np.isfinite(fit.restart_log_likelihoods).all()
    assert all(np.isfinite(v).all() for v in fit.params.values())


def test_pattern_table_equals_per_row_factorization(x64, rng, monkeypatch):
    """Up to 6 coordinates, per-row quantities come from a table over all 2^D patterns."""
    from jaxem import missing

    x = mcar(rng, rng.normal(size=(40, 3)), 0.4)
    observed, value = jnp.asarray(~np.isnan(x)), jnp.asarray(np.nan_to_num(x))
    loc = jnp.asarray(rng.normal(size=(2, 1, 3)))
    tril = jnp.asarray(np.tril(rng.normal(size=(2, 1, 3, 3)) * 0.3) + np.eye(3))
    cov = tril @ jnp.swapaxes(tril, -1, -2)

    def compute():
        return (
            missing._masked_mvn_log_prob(loc, cov, observed, value),
            *missing.conditional_moments(loc, cov, observed, value),
        )

    table = compute()
    monkeypatch.setattr(missing, "_MAX_TABLE_DIM", 0)
    per_row = compute()
    assert [a.shape for a in table] == [(2, 40), (2, 40, 3), (2, 40, 3, 3)]
    for a, b in zip(table, per_row):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
