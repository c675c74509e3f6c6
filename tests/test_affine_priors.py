"""The weighted least-squares closed form (`jaxem.affine`) with Normal priors on the
coefficients (MAP-EM: a ridge term), and ``m_step={param: "gradient"}``."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.distributions import constraints
from scipy import optimize, stats

import jaxem
from jaxem.exceptions import ModelError
from jaxem.global_sites import with_global_sites
from jaxem.monte_carlo_stats import ClosedFormMStep
from tests.models import one_factor_analysis, shifted_regressions, weighted_factor_draws

K, P = 2, 3
PRIOR_LOC = np.array([0.5, -0.25, 0.0])
PRIOR_COV = np.array([[0.3, 0.1, 0.0], [0.1, 0.2, 0.05], [0.0, 0.05, 0.1]])
PRIOR_SCALE = np.array([0.3, 0.2, 0.5])


def regressions(X, y, prior="mvn"):
    """A mixture of K regressions whose coefficients ``beta`` (K, P) have a prior."""
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    if prior == "mvn":
        beta_prior = dist.MultivariateNormal(PRIOR_LOC, PRIOR_COV).expand([K]).to_event(1)
    else:
        beta_prior = dist.Normal(PRIOR_LOC, PRIOR_SCALE).expand([K, P]).to_event(2)
    beta = numpyro.sample("beta", beta_prior)
    sigma = numpyro.param("sigma", jnp.ones(K), constraint=constraints.positive)
    with numpyro.plate("data", y.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("y", dist.Normal((beta[z] * X).sum(-1), sigma[z]), obs=y)


def _data(n=60, seed=0):
    rng = np.random.default_rng(seed)
    X = np.concatenate([np.ones((n, 1)), rng.normal(size=(n, P - 1))], axis=1)
    z = rng.integers(0, K, n)
    coef = np.array([[-1.0, 1.0, 0.5], [2.0, -0.5, 0.0]])
    return X, (coef[z] * X).sum(-1) + np.array([0.5, 1.0])[z] * rng.normal(size=n)


@pytest.mark.parametrize("prior", ["mvn", "normal"])
def test_one_em_step_solves_the_ridge_normal_equations(x64, prior):
    """One MAP-EM update of beta: per component, (X^T R_k X / s_k^2 + L) b = X^T R_k y /
    s_k^2 + L m, with brute-force responsibilities R_k and the prior's precision L
    (a full one for the MultivariateNormal prior), against numpy."""
    X, y = _data()
    init = {
        "w": jnp.array([0.4, 0.6]),
        "beta": jnp.array([[0.0, 0.5, 0.0], [1.0, 0.0, 0.0]]),
        "sigma": jnp.array([1.0, 2.0]),
    }
    em = jaxem.EM(regressions, global_sites=("beta",), reg_covar=0.0)
    paths = em.m_step_paths(jnp.asarray(X), jnp.asarray(y), prior)
    assert paths["beta"] == (
        "closed-form (Normal.loc at site 'y' (affine: weighted least squares; its prior "
        f"({'MultivariateNormal' if prior == 'mvn' else 'Normal'} at site 'beta') a ridge "
        "term))"
    )
    args = (jnp.asarray(X), jnp.asarray(y), prior)
    state = em.init(jax.random.PRNGKey(0), *args, init_params=init)
    state, _ = em.update(state, *args)
    beta = np.asarray(em.get_params(state)["beta"])

    p = {k: np.asarray(v) for k, v in init.items()}
    loc = p["beta"] @ X.T  # (K, N)
    log_joint = np.log(p["w"])[:, None] + stats.norm.logpdf(y, loc, p["sigma"][:, None])
    r = np.exp(log_joint - np.logaddexp.reduce(log_joint, axis=0))
    if prior == "mvn":
        precision = np.linalg.inv(PRIOR_COV)
    else:
        precision = np.diag(PRIOR_SCALE**-2.0)
    for k in range(K):
        weights = r[k] / p["sigma"][k] ** 2
        gram = X.T @ (weights[:, None] * X) + precision
        expected = np.linalg.solve(gram, X.T @ (weights * y) + precision @ PRIOR_LOC)
        np.testing.assert_allclose(beta[k], expected, rtol=1e-10)


def test_map_em_reaches_the_maximum_of_the_log_posterior(x64):
    """The MAP fit with the ridge closed form against scipy's optimizer on the log
    posterior (the marginal likelihood plus the Normal prior's log density)."""
    X, y = _data(n=80, seed=1)
    args = (jnp.asarray(X), jnp.asarray(y), "normal")
    # SQUAREM: plain EM converges linearly, and stops ~6e-6 short in beta at tol=1e-13.
    result = jaxem.EM(regressions, global_sites=("beta",), acceleration="squarem").run(
        jax.random.PRNGKey(0), *args, max_iter=1000, tol=1e-14
    )

    def negative_log_likelihood(t):
        w = np.array([1 / (1 + np.exp(-t[0])), 1 / (1 + np.exp(t[0]))])
        comp = stats.norm.logpdf(y, _beta(t) @ X.T, np.exp(t[1 + K * P :])[:, None])
        return -np.logaddexp.reduce(np.log(w)[:, None] + comp, axis=0).sum()

    def negative_log_posterior(t):
        prior = stats.norm.logpdf(_beta(t), PRIOR_LOC, PRIOR_SCALE).sum()
        return negative_log_likelihood(t) - prior

    p = {k: np.asarray(v) for k, v in result.params.items()}
    start = np.concatenate([[np.log(p["w"][0] / p["w"][1])], p["beta"].ravel(), np.log(p["sigma"])])
    opt = optimize.minimize(negative_log_posterior, start, method="BFGS", options={"gtol": 1e-9})
    np.testing.assert_allclose(-float(result.log_posterior), opt.fun, rtol=1e-10)
    # Measured 8e-7: scipy's own optimum is as far (BFGS and Nelder-Mead differ by that).
    np.testing.assert_allclose(p["beta"].ravel(), opt.x[1 : 1 + K * P], atol=5e-6)
    # The prior moved the fit: the maximum-likelihood coefficients are elsewhere.
    mle = optimize.minimize(negative_log_likelihood, opt.x, method="BFGS")
    assert np.max(np.abs(_beta(mle.x) - p["beta"])) > 0.1


def _beta(t):
    return t[1 : 1 + K * P].reshape(K, P)


def test_the_monte_carlo_m_step_adds_the_ridge_to_the_draw_averaged_equations(x64):
    """Factor analysis with a Normal prior on the mean: the mean and loadings are
    numpy's weighted least squares over the stacked draws plus the prior's precision
    on the mean's coordinate, per variable."""
    x, draws, weights, params = weighted_factor_draws()
    num_draws, n, _ = draws.shape
    p = x.shape[1]

    model = with_global_sites(_factor_with_mean_prior, ("mean",))
    step = ClosedFormMStep(model, "auto", 0.0, ())
    first = {"scores": jnp.asarray(draws[0])}
    assert "a ridge term" in step.paths(params, first, (x,), {})["mean"]
    new = step.step(params, {"scores": jnp.asarray(draws)}, jnp.asarray(weights), (x,), {})
    design = np.concatenate([np.ones((num_draws * n, 1)), draws.reshape(-1, 1)], axis=1)
    w = np.repeat(weights, n)
    noise = np.asarray(params["noise"])
    for j in range(p):
        target = np.tile(x[:, j], num_draws)
        gram = design.T @ (w[:, None] * design) / noise[j] ** 2 + np.diag([0.1**-2, 0.0])
        rhs = design.T @ (w * target) / noise[j] ** 2 + np.array([2.0 * 0.1**-2, 0.0])
        coef = np.linalg.solve(gram, rhs)
        np.testing.assert_allclose(float(new["mean"][j]), coef[0], rtol=1e-10)
        np.testing.assert_allclose(float(new["loadings"][j, 0]), coef[1], rtol=1e-9)


def _factor_with_mean_prior(x):
    """tests.models.one_factor_analysis with a Normal(2, 0.1) prior on ``mean``."""
    n, p = x.shape
    mean = numpyro.sample("mean", dist.Normal(2.0, 0.1).expand([p]).to_event(1))
    loadings = numpyro.param("loadings", jnp.full((p, 1), 0.5))
    noise = numpyro.param("noise", jnp.ones(p), constraint=constraints.positive)
    with numpyro.plate("rows", n):
        scores = numpyro.sample("scores", dist.Normal(0.0, 1.0).expand([1]).to_event(1))
        numpyro.sample("x", dist.Normal(mean + scores @ loadings.T, noise).to_event(1), obs=x)


def test_a_prior_whose_scale_is_a_param_keeps_the_gradient_path():
    def model(X, y):
        tau = numpyro.param("tau", 1.0, constraint=constraints.positive)
        beta = numpyro.sample("beta", dist.Normal(0.0, tau).expand([X.shape[1]]).to_event(1))
        with numpyro.plate("data", y.shape[0]):
            z = numpyro.sample("z", dist.Categorical(jnp.ones(2) / 2))
            numpyro.sample("y", dist.Normal(X @ beta + z, 1.0), obs=y)

    paths = jaxem.EM(model, global_sites=("beta",)).m_step_paths(jnp.ones((5, 2)), jnp.ones(5))
    assert paths["beta"].startswith("gradient"), paths["beta"]
    assert (
        "its prior (Normal at site 'beta') has scale depending on params ['tau']: no weighted "
        "least squares"
    ) in paths["beta"]


def test_a_prior_of_another_family_keeps_the_gradient_path():
    def model(X, y):
        beta = numpyro.sample("beta", dist.Laplace(0.0, 1.0).expand([X.shape[1]]).to_event(1))
        with numpyro.plate("data", y.shape[0]):
            z = numpyro.sample("z", dist.Categorical(jnp.ones(2) / 2))
            numpyro.sample("y", dist.Normal(X @ beta + z, 1.0), obs=y)

    paths = jaxem.EM(model, global_sites=("beta",)).m_step_paths(jnp.ones((5, 2)), jnp.ones(5))
    assert paths["beta"].startswith("gradient"), paths["beta"]
    assert "its prior (Laplace at site 'beta') is not Normal or MultivariateNormal" in paths["beta"]


# -- m_step={param: "gradient"} -------------------------------------------------------------


def test_m_step_names_the_params_that_take_the_gradient_path():
    X, y = jnp.ones((5, P)), jnp.ones(5)
    paths = jaxem.EM(shifted_regressions, m_step={"beta": "gradient"}).m_step_paths(X, y)
    assert paths["beta"] == "gradient (m_step={'beta': 'gradient'})"
    # mu alone is still affine: a selection into the location plus a constant.
    assert paths["mu"].startswith("closed-form"), paths["mu"]
    assert paths["sigma"] == "closed-form (Normal.scale at site 'y')"
    online = jaxem.OnlineEM(shifted_regressions, m_step={"mu": "gradient", "beta": "gradient"})
    assert online.m_step_paths(X, y)["mu"] == "gradient (m_step={'mu': 'gradient'})"
    saem = jaxem.SAEM(one_factor_analysis, m_step={"loadings": "gradient"})
    saem_paths = saem.m_step_paths(jnp.ones((5, 4)))
    assert saem_paths["loadings"] == "gradient (m_step={'loadings': 'gradient'})"
    assert saem_paths["mean"] == (
        "closed-form (Normal.loc at site 'x' (affine: weighted least squares))"
    )
    with pytest.raises(ModelError, match=r"m_step names \['gamma'\], which are not params"):
        jaxem.EM(shifted_regressions, m_step={"gamma": "gradient"}).m_step_paths(X, y)
    with pytest.raises(ModelError, match=r"m_step names \['gamma'\]"):
        jaxem.SAEM(one_factor_analysis, m_step={"gamma": "gradient"}).m_step_paths(jnp.ones((5, 4)))
    with pytest.raises(ValueError, match="m_step as a dict maps param names to 'gradient'"):
        jaxem.EM(shifted_regressions, m_step={"beta": "closed"})
    with pytest.raises(ValueError, match="m_step must be 'auto', 'gradient' or a dict"):
        jaxem.MCEM(one_factor_analysis, m_step="closed")


def test_online_em_weighs_the_ridge_once_for_the_whole_data_set(x64):
    """OnlineEM's first update (step size 1) on the whole data set, num_data its size:
    the running normal equations are averages per data point and the ridge weighs
    1 / num_data, so beta is the batch MAP-EM step's (checked against numpy above).
    With num_data ten times larger the prior weighs less and beta differs."""
    X, y = _data()
    args = (jnp.asarray(X), jnp.asarray(y), "mvn")
    init = {"beta": jnp.array([[0.0, 0.5, 0.0], [1.0, 0.0, 0.0]])}
    em = jaxem.EM(regressions, global_sites=("beta",), reg_covar=0.0)
    state = em.init(jax.random.PRNGKey(0), *args, init_params=init)
    batch = np.asarray(em.get_params(em.update(state, *args)[0])["beta"])

    def online_beta(num_data):
        online = jaxem.OnlineEM(
            regressions, global_sites=("beta",), num_data=num_data, reg_covar=0.0
        )
        state = online.init(jax.random.PRNGKey(0), *args, init_params=init)
        assert "a ridge term" in online.m_step_paths(*args)["beta"]
        return np.asarray(online.update(state, *args)[0].params["beta"])

    np.testing.assert_allclose(online_beta(len(y)), batch, rtol=1e-10)
    assert np.max(np.abs(online_beta(10 * len(y)) - batch)) > 1e-3
