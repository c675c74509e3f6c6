"""SAEM and MCEM: continuous latents drawn by NUTS inside the EM loop, against exact
maximum-likelihood references computed here (Gaussian marginal likelihood,
adaptive Gauss-Hermite quadrature, scikit-learn's factor analysis, brute force)."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.distributions import constraints
from numpyro.handlers import condition
from scipy import optimize, special, stats

import jaxem
from jaxem.exceptions import ModelError, NumericalWarning
from tests.models import sleepstudy_model

# -- sleepstudy: a linear mixed model, Reaction ~ Days + (Days | Subject) ---------------


def _sleepstudy(load_csv):
    data = load_csv("sleepstudy.csv")
    y, days = data[:, 0], data[:, 1]
    subject = np.unique(data[:, 2], return_inverse=True)[1]
    return y, days, subject


def _lmm_log_likelihood(y, days, subject, beta, cov, sigma2):
    """The exact marginal log-likelihood of the linear mixed model."""
    total = 0.0
    for g in np.unique(subject):
        rows = subject == g
        design = np.stack([np.ones(rows.sum()), days[rows]], axis=1)
        marginal = design @ cov @ design.T + sigma2 * np.eye(rows.sum())
        total += stats.multivariate_normal(design @ beta, marginal).logpdf(y[rows])
    return total


def _lmm_mle(y, days, subject):
    """The maximum-likelihood estimate (what statsmodels' MixedLM(reml=False) finds)."""

    def unpack(t):
        chol = np.array([[np.exp(t[2]), 0.0], [t[3], np.exp(t[4])]])
        return t[:2], chol @ chol.T, np.exp(2 * t[5])

    fit = optimize.minimize(
        lambda t: -_lmm_log_likelihood(y, days, subject, *unpack(t)),
        [250.0, 10.0, 3.0, 0.0, 1.5, 3.0],
        method="BFGS",
    )
    beta, cov, sigma2 = unpack(fit.x)
    return beta, np.sqrt(np.diag(cov)), np.sqrt(sigma2), -fit.fun


# MCEM's fit takes about as long as SAEM's; both run with `pytest -m slow`, SAEM's in CI too.
@pytest.mark.parametrize("fitter", ["SAEM", pytest.param("MCEM", marks=pytest.mark.slow)])
def test_sleepstudy_reaches_the_maximum_likelihood_estimate(x64, load_csv, fitter):
    y, days, subject = _sleepstudy(load_csv)
    beta, sds, sigma, best = _lmm_mle(y, days, subject)
    if fitter == "SAEM":
        em = jaxem.SAEM(sleepstudy_model, schedule=(100, 100))
    else:
        em = jaxem.MCEM(sleepstudy_model, max_draws=200)
    args = (jnp.asarray(days), jnp.asarray(subject), jnp.asarray(y))
    options = {"tol": 1e-2, "max_iter": 60} if fitter == "MCEM" else {}
    result = em.run(jax.random.PRNGKey(0), *args, **options)
    assert bool(result.converged) and not bool(result.diverged)
    params = {k: np.asarray(v) for k, v in result.params.items()}
    np.testing.assert_allclose(params["beta"], beta, rtol=5e-3)
    np.testing.assert_allclose(params["sd_re"], sds, rtol=3e-2)
    np.testing.assert_allclose(params["sigma"], sigma, rtol=3e-2)
    se = float(result.log_likelihood_se)
    assert 0 < se < 0.5
    assert abs(float(result.log_likelihood) - best) <= 3 * se
    # The importance-sampling estimate against the exact value at the fitted params.
    chol = params["sd_re"][:, None] * params["corr"]
    exact = _lmm_log_likelihood(
        y, days, subject, params["beta"], chol @ chol.T, params["sigma"] ** 2
    )
    assert abs(float(result.log_likelihood) - exact) <= 3 * se
    k, n = 6, 180
    np.testing.assert_allclose(float(result.bic), -2 * float(result.log_likelihood) + k * np.log(n))
    accept = np.asarray(result.accept_prob)[: int(result.num_iters)]
    assert np.mean(accept[len(accept) // 2 :]) > 0.5  # after the adaptation


# -- cbpp: a binomial GLMM with a herd random intercept ----------------------------------


def cbpp_model(herd, period, size, incidence, num_herds=15):
    intercept = numpyro.param("intercept", 0.0)
    effects = numpyro.param("period_effects", jnp.zeros(3))
    sd = numpyro.param("sd_herd", 1.0, constraint=constraints.positive)
    with numpyro.plate("herds", num_herds):
        u = numpyro.sample("u", dist.Normal(intercept, sd))
    logits = u[herd] + jnp.concatenate([jnp.zeros(1), effects])[period]
    with numpyro.plate("obs", size.shape[0]):
        numpyro.sample("incidence", dist.Binomial(size, logits=logits), obs=incidence)


def _cbpp_log_likelihood(theta, herd, period, size, incidence, nodes=40):
    """Adaptive Gauss-Hermite quadrature of the marginal likelihood, herd by herd."""
    intercept, effects, sd = theta[0], np.concatenate([[0.0], theta[1:4]]), np.exp(theta[4])
    x, w = special.roots_hermite(nodes)
    total = 0.0
    for h in np.unique(herd):
        rows = herd == h
        offset = effects[period[rows]]

        k, n = incidence[rows], size[rows]
        log_choose = np.sum(
            special.gammaln(n + 1) - special.gammaln(k + 1) - special.gammaln(n - k + 1)
        )

        def log_joint(u, k=k, n=n, log_choose=log_choose, offset=offset):
            # Binomial(n, expit(eta)) and Normal(intercept, sd) log-densities written out:
            # scipy.stats' per-call overhead made the Nelder-Mead reference (258
            # evaluations, ~20 mode-finding steps per herd each) 15 CPU s of this test.
            eta = np.add.outer(u, offset)
            binomial = k * special.log_expit(eta) + (n - k) * special.log_expit(-eta)
            normal = -0.5 * ((u - intercept) / sd) ** 2 - np.log(sd) - 0.5 * np.log(2 * np.pi)
            return log_choose + binomial.sum(-1) + normal

        mode = optimize.minimize_scalar(lambda u: -log_joint(np.atleast_1d(u))[0]).x
        step = 1e-4
        curvature = (
            -(
                log_joint(np.array([mode + step]))[0]
                - 2 * log_joint(np.array([mode]))[0]
                + log_joint(np.array([mode - step]))[0]
            )
            / step**2
        )
        scale = 1.0 / np.sqrt(curvature)
        u = mode + np.sqrt(2.0) * scale * x
        total += special.logsumexp(log_joint(u) + x**2, b=w) + np.log(np.sqrt(2.0) * scale)
    return total


def test_cbpp_glmm_reaches_the_quadrature_mle(x64, load_csv):
    data = load_csv("cbpp.csv")
    herd = data[:, 0].astype(int) - 1
    incidence, size = data[:, 1], data[:, 2]
    period = data[:, 3].astype(int) - 1
    reference = optimize.minimize(
        lambda t: -_cbpp_log_likelihood(t, herd, period, size, incidence),
        [-1.4, -1.0, -1.1, -1.6, np.log(0.6)],
        method="Nelder-Mead",
        options={"xatol": 1e-6, "fatol": 1e-8, "maxiter": 4000},
    )
    best = -reference.fun
    args = tuple(jnp.asarray(a) for a in (herd, period, size, incidence))
    result = jaxem.SAEM(cbpp_model, schedule=(100, 100)).run(jax.random.PRNGKey(1), *args)
    assert bool(result.converged)
    params = {k: np.asarray(v) for k, v in result.params.items()}
    # Monte Carlo tolerance: a few times SAEM's Monte Carlo error (about 0.02 on
    # these scales with 4 chains x 100 draws in the averaging phase).
    np.testing.assert_allclose(params["intercept"], reference.x[0], atol=0.1)
    np.testing.assert_allclose(params["period_effects"], reference.x[1:4], atol=0.1)
    np.testing.assert_allclose(params["sd_herd"], np.exp(reference.x[4]), rtol=0.15)
    se = float(result.log_likelihood_se)
    theta = np.concatenate(
        [[params["intercept"]], params["period_effects"], [np.log(params["sd_herd"])]]
    )
    at_fit = _cbpp_log_likelihood(theta, herd, period, size, incidence)
    assert abs(float(result.log_likelihood) - at_fit) <= 3 * se
    assert best - at_fit < 0.05


# -- factor analysis -------------------------------------------------------------------


def factor_model(x, num_factors=1):
    n, p = x.shape
    mean = numpyro.param("mean", jnp.zeros(p))
    loadings = numpyro.param("loadings", jnp.full((p, num_factors), 0.5))
    noise = numpyro.param("noise", jnp.ones(p), constraint=constraints.positive)
    with numpyro.plate("rows", n):
        scores = numpyro.sample("scores", dist.Normal(0.0, 1.0).expand([num_factors]).to_event(1))
        numpyro.sample("x", dist.Normal(mean + scores @ loadings.T, noise).to_event(1), obs=x)


def test_factor_analysis_reaches_scikit_learns_log_likelihood(x64, rng):
    from sklearn.decomposition import FactorAnalysis

    n, p = 150, 4
    loadings = np.array([[1.0], [0.8], [0.6], [0.4]])
    x = rng.normal(size=(n, 1)) @ loadings.T + rng.normal(size=(n, p)) * 0.5 + 1.0
    reference = FactorAnalysis(n_components=1, tol=1e-10, max_iter=10_000).fit(x)
    best = reference.score(x) * n
    result = jaxem.SAEM(factor_model, schedule=(100, 50)).run(jax.random.PRNGKey(2), jnp.asarray(x))
    params = {k: np.asarray(v) for k, v in result.params.items()}
    cov = params["loadings"] @ params["loadings"].T + np.diag(params["noise"] ** 2)
    exact = stats.multivariate_normal(params["mean"], cov).logpdf(x).sum()
    assert best - exact < 0.5  # within Monte Carlo error of the maximum
    se = float(result.log_likelihood_se)
    assert abs(float(result.log_likelihood) - exact) <= 3 * se


# -- a discrete and a continuous latent -------------------------------------------------


def clustered_intercepts(y, num_groups=8):
    """Groups belong to one of two classes (discrete, enumerated) and have their own
    random intercept (continuous, drawn)."""
    w = numpyro.param("w", jnp.array([0.5, 0.5]), constraint=constraints.simplex)
    mu = numpyro.param("mu", jnp.array([-1.0, 1.0]))
    tau = numpyro.param("tau", 1.0, constraint=constraints.positive)
    sigma = numpyro.param("sigma", 1.0, constraint=constraints.positive)
    with numpyro.plate("groups", num_groups):
        c = numpyro.sample("c", dist.Categorical(w))
        b = numpyro.sample("b", dist.Normal(0.0, tau))
        with numpyro.plate("members", y.shape[0], dim=-2):
            numpyro.sample("y", dist.Normal(mu[c] + b, sigma), obs=y)


def test_discrete_and_continuous_latents(x64, rng):
    classes = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    y = np.array([-3.0, 3.0])[classes] + 0.3 * rng.normal(size=8) + rng.normal(size=(10, 8))
    result = jaxem.SAEM(clustered_intercepts, schedule=(60, 40), num_is_draws=50).run(
        jax.random.PRNGKey(3), jnp.asarray(y)
    )
    mu = np.sort(np.asarray(result.params["mu"]))
    np.testing.assert_allclose(mu, [-3.0, 3.0], atol=0.6)
    params = {k: np.asarray(v) for k, v in result.params.items()}
    draw = {"b": result.draws["b"][-1]}
    found = np.asarray(
        jaxem.posterior(condition(clustered_intercepts, draw), params, jnp.asarray(y))["c"]
    )
    # Brute force: p(c_g = k | b_g, y_g) by Bayes' rule over the two classes.
    b = np.asarray(draw["b"])
    log_joint = np.log(params["w"])[None, :] + stats.norm.logpdf(
        y[:, :, None], params["mu"][None, None, :] + b[None, :, None], params["sigma"]
    ).sum(0)
    expected = np.exp(log_joint - special.logsumexp(log_joint, axis=1, keepdims=True))
    np.testing.assert_allclose(found, expected, atol=1e-8)
    assert float(result.log_likelihood_se) > 0


# -- bad input ------------------------------------------------------------------------------


def _improper(y):
    s = numpyro.param("s", 1.0, constraint=constraints.positive)
    z = numpyro.sample("z", dist.ImproperUniform(constraints.real, (), ()))
    numpyro.sample("y", dist.Normal(z, s), obs=y)


def _not_finite(y):
    s = numpyro.param("s", 1.0, constraint=constraints.positive)
    z = numpyro.sample("z", dist.Normal(0.0, 1.0))
    numpyro.factor("penalty", jnp.log(jnp.abs(z) * 0.0))  # log 0 for every z
    numpyro.sample("y", dist.Normal(z, s), obs=y)


def _infinite_discrete(y):
    s = numpyro.param("s", 1.0, constraint=constraints.positive)
    k = numpyro.sample("k", dist.Poisson(3.0))
    z = numpyro.sample("z", dist.Normal(0.0, 1.0))
    numpyro.sample("y", dist.Normal(z + k, s), obs=y)


def _flat_root(y):
    s = numpyro.param("s", 1.0, constraint=constraints.positive)
    z = numpyro.sample("z", dist.Normal(0.0, 1.0))
    numpyro.sample("y", dist.Normal(jnp.abs(z) ** 0.5 * 0.0 + jnp.cbrt(z - z), s), obs=y)


# The checks are shared by both fitters (monte_carlo.py): each message is tested once,
# the first with both fitters.
@pytest.mark.parametrize(
    "model, match, fitter",
    [
        (_improper, "latent sample site 'z' has an improper density", jaxem.SAEM),
        (_improper, "latent sample site 'z' has an improper density", jaxem.MCEM),
        (_not_finite, "log-density of the model is not finite", jaxem.MCEM),
        (_infinite_discrete, "'k' .*cannot be enumerated", jaxem.SAEM),
        (_flat_root, r"gradient .* latent sites \['z'\] is not finite", jaxem.MCEM),
    ],
)
def test_bad_latent_densities_are_named(model, match, fitter):
    with pytest.raises(ModelError, match=match):
        fitter(model).run(jax.random.PRNGKey(0), jnp.ones(3))


def test_em_refuses_a_continuous_latent_and_points_to_monte_carlo_em():
    with pytest.raises(ModelError, match="MCEM or jaxem.SAEM"):
        jaxem.EM(_not_finite).run(jax.random.PRNGKey(0), jnp.ones(3))


# Five draws make a poor proposal: that warning is true here and not the point.
@pytest.mark.filterwarnings("ignore:.*importance weights.*:jaxem.exceptions.NumericalWarning")
def test_divergent_transitions_are_reported(x64):
    from numpyro.infer import NUTS

    def model(y):
        m = numpyro.param("m", 0.0)
        z = numpyro.sample("z", dist.Normal(m, 1.0))
        numpyro.sample("y", dist.Normal(z, 1.0), obs=y)

    # A step size far too large for the posterior, never adapted: every transition
    # diverges.
    kernel = NUTS(model, step_size=1e3, adapt_step_size=False, adapt_mass_matrix=False)
    em = jaxem.SAEM(
        model, kernel=kernel, schedule=(3, 2), num_warmup=0, num_is_draws=5, num_is_samples=50
    )
    with pytest.warns(NumericalWarning, match="divergent transitions"):
        result = em.run(jax.random.PRNGKey(0), jnp.ones(3))
    assert int(result.num_divergences) > 0


# MCEM draws through the same seeded sampler code; its case runs under -m slow (CI time).
@pytest.mark.parametrize("fitter", [jaxem.SAEM, pytest.param(jaxem.MCEM, marks=pytest.mark.slow)])
def test_the_same_seed_gives_the_same_fit(x64, fitter):
    def model(y):
        m = numpyro.param("m", 0.0)
        s = numpyro.param("s", 1.0, constraint=constraints.positive)
        with numpyro.plate("groups", y.shape[0]):
            z = numpyro.sample("z", dist.Normal(m, s))
            numpyro.sample("y", dist.Normal(z, 1.0), obs=y)

    y = jnp.linspace(-1.0, 3.0, 6)
    if fitter is jaxem.SAEM:
        em, options = jaxem.SAEM(model, schedule=(10, 5), num_is_draws=20), {}
    else:
        em, options = jaxem.MCEM(model, max_draws=20, num_is_draws=20), {"max_iter": 15}
    first = em.run(jax.random.PRNGKey(4), y, **options)
    again = em.run(jax.random.PRNGKey(4), y, **options)
    for name in first.params:
        np.testing.assert_array_equal(np.asarray(again.params[name]), first.params[name])
    assert float(again.log_likelihood) == float(first.log_likelihood)
    other = em.run(jax.random.PRNGKey(5), y, **options)
    assert float(other.params["m"]) != float(first.params["m"])


# -- closed-form M-steps from Monte Carlo averages of sufficient statistics ---------------


def test_m_step_paths_say_which_params_take_the_closed_form():
    days, subject, y = jnp.zeros(6), jnp.array([0, 0, 1, 1, 2, 2]), jnp.ones(6)
    paths = jaxem.SAEM(sleepstudy_model).m_step_paths(days, subject, y, num_subjects=3)
    assert paths["beta"].startswith("closed-form (MultivariateNormal.loc at site 'phi')")
    assert paths["sigma"].startswith("closed-form (Normal.scale at site 'y')")
    # A scale_tril built from two params is not a selection of either.
    assert paths["sd_re"].startswith("gradient") and paths["corr"].startswith("gradient")
    herd, period = jnp.array([0, 1, 1]), jnp.array([0, 1, 2])
    paths = jaxem.MCEM(cbpp_model).m_step_paths(herd, period, jnp.ones(3), jnp.ones(3), 2)
    assert paths["intercept"].startswith("closed-form (Normal.loc at site 'u')")
    assert paths["sd_herd"].startswith("closed-form (Normal.scale at site 'u')")
    assert paths["period_effects"].startswith("gradient")
    # Discrete latents enumerated given the drawn ones: the weights have a closed form.
    paths = jaxem.SAEM(clustered_intercepts).m_step_paths(jnp.ones((3, 8)))
    assert paths["w"].startswith("closed-form (Categorical")
    assert paths["tau"].startswith("closed-form") and paths["sigma"].startswith("closed-form")
    # mu[c] + b: affine in mu given the drawn intercepts b (jaxem.affine).
    assert paths["mu"].startswith("closed-form (Normal.loc at site 'y' (affine")
    forced = jaxem.SAEM(clustered_intercepts, m_step="gradient").m_step_paths(jnp.ones((3, 8)))
    assert all(p.startswith("gradient") for p in forced.values())
    with pytest.raises(ValueError, match="m_step must be 'auto', 'gradient' or a dict"):
        jaxem.SAEM(clustered_intercepts, m_step="closed")


def _random_intercepts(y):
    m = numpyro.param("m", 0.0)
    s = numpyro.param("s", 1.0, constraint=constraints.positive)
    with numpyro.plate("groups", y.shape[0]):
        z = numpyro.sample("z", dist.Normal(m, s))
        numpyro.sample("y", dist.Normal(z, 1.0), obs=y)


def test_saem_approximates_the_sufficient_statistics(x64):
    """SAEM's closed-form params against Delyon, Lavielle and Moulines' recursion on
    the sufficient statistics S = (sum_g z_g, sum_g z_g^2) of the same draws:
    s_k = s_{k-1} + gamma_k (S(z_k) - s_{k-1}), m_k = s_k[0] / G, s_k^2 = s_k[1] / G - m_k^2."""
    y = jnp.linspace(-1.0, 3.0, 6)
    em = jaxem.SAEM(_random_intercepts, schedule=(2, 4), num_chains=3, reg_covar=0.0)
    state = em.init(jax.random.PRNGKey(0), y)
    stats_ = np.zeros(2)
    for k in range(6):
        state, _ = em.update(state, y)
        z = np.asarray(state.draws["z"][k % 4])  # (chains, groups): this iteration's draws
        gamma = 1.0 if k < 2 else 1.0 / (k - 1)
        stats_ += gamma * (np.array([z.sum(1).mean(), (z**2).sum(1).mean()]) - stats_)
        m = stats_[0] / 6
        np.testing.assert_allclose(float(state.params["m"]), m, rtol=1e-9)
        np.testing.assert_allclose(
            float(state.params["s"]), np.sqrt(stats_[1] / 6 - m**2), rtol=1e-9
        )


# "exact": more free coordinates than the step takes (MAX_COORDINATES patched to 0):
# L-BFGS on the exact Q over the stored draws, the same update up to its tolerance
# (slow, for CI time: the default path is the Newton step).
@pytest.mark.parametrize(
    "path, rtol", [("newton", 1e-10), pytest.param("exact", 1e-7, marks=pytest.mark.slow)]
)
def test_saem_newton_step_on_a_quadratic_q_is_the_exact_saem_update(x64, monkeypatch, path, rtol):
    """A param without a closed form (``m_step="gradient"``) once the step sizes
    decrease takes the Robbins-Monro step u + gamma_k J_k^{-1} grad f_k(u) with J_k the
    averaged complete-data information (jaxem.stochastic_newton). With ``s`` frozen,
    log p(z | m) is quadratic in m with constant curvature G / s^2, so that step is
    m_{k+1} = (1 - gamma_k) m_k + gamma_k mean_chains(sum_g z_g) / G: the recursion of
    the sufficient statistic, i.e. the maximizer of the exact SAEM objective."""
    if path == "exact":
        monkeypatch.setattr("jaxem.monte_carlo.MAX_COORDINATES", 0)
    y = jnp.linspace(-1.0, 3.0, 6)
    em = jaxem.SAEM(
        _random_intercepts, schedule=(2, 4), num_chains=3, m_step="gradient", frozen=("s",)
    )
    assert em.m_step_paths(y)["m"].startswith("gradient")
    state = em.init(jax.random.PRNGKey(0), y)
    for k in range(6):
        before = float(state.params["m"])
        state, _ = em.update(state, y)
        if k <= 2:  # gamma = 1 (k = K1 included): L-BFGS on this iteration's draws
            continue
        z = np.asarray(state.draws["z"][k % 4])  # (chains, groups): this iteration's draws
        gamma = 1.0 / (k - 1)
        expected = (1 - gamma) * before + gamma * z.sum(1).mean() / 6
        np.testing.assert_allclose(float(state.params["m"]), expected, rtol=rtol)
        if path == "newton":
            # The information of f = Q / (number of observations): (G / s^2) / 6 = 1.
            np.testing.assert_allclose(np.asarray(state.information), [[1.0]], rtol=1e-10)
        else:
            assert state.information.shape == (0, 0)


def test_the_newton_step_never_descends(x64):
    """One draw's log-density may curve upward along a direction (far from the
    maximum): the step's information matrix then counts that curvature by its size,
    so the step still climbs; a direction without curvature is divided by 1e-8 times
    the largest curvature, not by 0."""
    from jaxem.stochastic_newton import positive_definite_solve

    rotation = np.array([[np.cos(0.3), -np.sin(0.3)], [np.sin(0.3), np.cos(0.3)]])
    matrix = rotation @ np.diag([2.0, -4.0]) @ rotation.T
    grad = np.array([1.0, -2.0])
    expected = rotation @ np.diag([1 / 2.0, 1 / 4.0]) @ rotation.T @ grad
    found = np.asarray(positive_definite_solve(jnp.asarray(matrix), jnp.asarray(grad)))
    np.testing.assert_allclose(found, expected, rtol=1e-12)
    assert found @ grad > 0  # an ascent direction
    flat = np.asarray(positive_definite_solve(jnp.diag(jnp.array([1.0, 0.0])), jnp.asarray(grad)))
    np.testing.assert_allclose(flat, [1.0, -2.0e8], rtol=1e-12)


def test_mcem_averages_the_sufficient_statistics_over_its_draws(x64):
    y = jnp.linspace(-1.0, 3.0, 6)
    em = jaxem.MCEM(_random_intercepts, num_draws=4, max_draws=8, num_chains=2, reg_covar=0.0)
    state = em.init(jax.random.PRNGKey(0), y)
    state, _ = em.update(state, y)
    z = np.asarray(state.draws["z"][:4])  # (draws, chains, groups): the 4 used slots
    m = z.sum(-1).mean() / 6
    np.testing.assert_allclose(float(state.params["m"]), m, rtol=1e-10)
    scale = np.sqrt(((z - m) ** 2).sum(-1).mean() / 6)
    np.testing.assert_allclose(float(state.params["s"]), scale, rtol=1e-10)


# -- global sites: parameters with priors (MAP) -------------------------------------------


def _map_model(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 0.5))
    s = numpyro.param("s", 1.0, constraint=constraints.positive)
    with numpyro.plate("groups", y.shape[1]):
        z = numpyro.sample("z", dist.Normal(mu, s))
        with numpyro.plate("members", y.shape[0], dim=-2):
            numpyro.sample("y", dist.Normal(z, 1.0), obs=y)


@pytest.mark.slow  # a full SAEM fit; the fast check of the MAP update is below
def test_global_sites_are_fitted_by_map(x64, rng):
    """A prior on a fixed effect: SAEM maximizes log p(y | mu, s) + log p(mu), against
    scipy on the exact Gaussian marginal; the log-likelihood it reports is the data's."""
    members, groups = 5, 6
    y = 2.0 + rng.normal(size=(1, groups)) + rng.normal(size=(members, groups))

    def log_likelihood(mu, s):
        cov = s**2 * np.ones((members, members)) + np.eye(members)
        return stats.multivariate_normal(np.full(members, mu), cov).logpdf(y.T).sum()

    def negative_log_posterior(t):
        return -log_likelihood(t[0], np.exp(t[1])) - stats.norm.logpdf(t[0], 0.0, 0.5)

    reference = optimize.minimize(negative_log_posterior, [1.0, 0.0], method="Nelder-Mead")
    mle = optimize.minimize(lambda t: -log_likelihood(t[0], np.exp(t[1])), [1.0, 0.0]).x
    assert abs(mle[0] - reference.x[0]) > 0.3  # the prior matters here
    em = jaxem.SAEM(_map_model, global_sites=("mu",), schedule=(30, 40), num_is_draws=50)
    paths = em.m_step_paths(jnp.asarray(y))
    assert paths["mu"].startswith("closed-form (conjugate prior: Normal at site 'mu'")
    result = em.run(jax.random.PRNGKey(0), jnp.asarray(y))
    mu, s = float(result.params["mu"]), float(result.params["s"])
    np.testing.assert_allclose(mu, reference.x[0], atol=0.06)
    np.testing.assert_allclose(s, np.exp(reference.x[1]), rtol=0.1)
    np.testing.assert_allclose(float(result.log_prior), stats.norm.logpdf(mu, 0.0, 0.5))
    se = float(result.log_likelihood_se)
    assert abs(float(result.log_likelihood) - log_likelihood(mu, s)) <= 3 * se + 1e-6


def test_a_model_em_would_refuse_keeps_the_gradient_path():
    """EM does not broadcast data; the chains do. Such a model fits as before, every
    param on the gradient path, and m_step_paths says why."""

    def model(y):
        m = numpyro.param("m", 0.0)
        z = numpyro.sample("z", dist.Normal(m, 1.0))
        numpyro.sample("y", dist.Normal(z, 1.0), obs=y)  # one z for every y: broadcast

    paths = jaxem.SAEM(model).m_step_paths(jnp.ones(3))
    assert paths["m"].startswith("gradient (no closed form: EM's planner refuses the model")
    assert "does not broadcast data" in paths["m"]


def test_a_conjugate_prior_enters_the_averaged_statistics(x64):
    """MCEM's MAP update of ``mu`` (a Normal prior on a Normal random effect's
    location): the posterior mean given the draws' averaged statistics,
    (sum_g z_g / s^2 + 0 / 0.5^2) / (G / s^2 + 1 / 0.5^2), at the initial s = 1."""
    y = jnp.asarray(np.linspace(0.0, 4.0, 12).reshape(2, 6))
    em = jaxem.MCEM(_map_model, global_sites=("mu",), num_draws=4, max_draws=8, num_chains=2)
    state = em.init(jax.random.PRNGKey(0), y, init_params={"mu": 1.0})
    state, _ = em.update(state, y)
    z = np.asarray(state.draws["z"][:4])  # (draws, chains, groups)
    np.testing.assert_allclose(float(state.params["mu"]), z.sum(-1).mean() / (6 + 4), rtol=1e-10)
    with pytest.raises(TypeError, match="global_sites must be a sequence of site names"):
        jaxem.SAEM(_map_model, global_sites="mu")
