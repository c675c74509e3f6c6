"""Variational Bayes EM (jaxem.VariationalBayesEM).

References: coordinate-ascent updates written out by hand in numpy (Bishop,
PRML 10.2 for a mixture), a Monte Carlo estimate of the ELBO from draws of
q(theta) with the latents summed exactly, numpyro's KL divergences.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from jax.scipy.special import gammaln
from numpyro.contrib.control_flow import scan
from numpyro.distributions import constraints
from scipy.special import digamma, logsumexp

import jaxem
from jaxem import VariationalBayesEM
from jaxem.exceptions import ModelError


def poisson_mixture(x, K=2):
    w = numpyro.sample("w", dist.Dirichlet(jnp.array([1.5, 2.0])[:K]))
    with numpyro.plate("components", K):
        lam = numpyro.sample("lam", dist.Gamma(jnp.array([2.0, 1.0])[:K], 0.5))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Poisson(lam[z]), obs=x)


def gmm(x, K=3):
    w = numpyro.sample("w", dist.Dirichlet(0.5 * jnp.ones(K)))
    with numpyro.plate("components", K):
        mu = numpyro.sample("mu", dist.Normal(1.0, 5.0))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Normal(mu[z], 1.5), obs=x)


def latent_class(y, K=2):
    w = numpyro.sample("w", dist.Dirichlet(jnp.ones(K)))
    with numpyro.plate("classes", K):
        p = numpyro.sample("p", dist.Beta(jnp.full(y.shape[1], 1.5), 2.0).to_event(1))
    with numpyro.plate("data", y.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("y", dist.Bernoulli(p[z]).to_event(1), obs=y)


def hmm(x, K=2):
    trans = numpyro.sample("trans", dist.Dirichlet(jnp.ones((K, K))).to_event(1))
    with numpyro.plate("states", K):
        mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))

    def step(z_prev, xt):
        z = numpyro.sample("z", dist.Categorical(trans[z_prev]))
        numpyro.sample("x", dist.Normal(mu[z], 1.0), obs=xt)
        return z, None

    scan(step, 0, x)


def _counts():
    return jnp.array([0.0, 1.0, 2.0, 0.0, 1.0, 8.0, 11.0, 9.0, 12.0, 10.0])


def _reals():
    key = jax.random.PRNGKey(1)
    return jnp.concatenate(
        [jax.random.normal(key, (15,)) - 3.0, jax.random.normal(jax.random.PRNGKey(2), (15,)) + 3.0]
    )


def _binary():
    key = jax.random.PRNGKey(3)
    high = jnp.arange(24)[:, None] < 12
    return (jax.random.uniform(key, (24, 4)) < jnp.where(high, 0.85, 0.15)).astype(jnp.float64)


def _check_poisson_cavi(vb, state, x, observed, steps=4):
    """Each update of the Poisson mixture equals coordinate ascent written out in
    numpy, and the reported ELBO the one written out term by term; a row whose x
    is missing keeps only its latent's factor E log w_z."""
    alpha0, a0, b0 = np.array([1.5, 2.0]), np.array([2.0, 1.0]), 0.5
    xs = np.where(observed, np.asarray(x), 0.0)
    for _ in range(steps):
        alpha, (a, b) = np.asarray(state.q["w"][0]), map(np.asarray, state.q["lam"])
        new_state, elbo = vb.update(state, x)
        # q(z): r_nk proportional to exp(E log w_k + x E log lam_k - E lam_k - log x!).
        e_log_w = digamma(alpha) - digamma(alpha.sum())
        e_log_lam, e_lam = digamma(a) - np.log(b), a / b
        log_x = xs[:, None] * e_log_lam - e_lam - np.asarray(gammaln(xs[:, None] + 1))
        log_r = e_log_w + np.where(observed[:, None], log_x, 0.0)
        log_z = logsumexp(log_r, axis=1)
        r = np.exp(log_r - log_z[:, None])
        kl_w = dist.kl_divergence(dist.Dirichlet(alpha), dist.Dirichlet(alpha0))
        kl_lam = dist.kl_divergence(dist.Gamma(a, b), dist.Gamma(a0, b0)).sum()
        np.testing.assert_allclose(elbo, log_z.sum() - kl_w - kl_lam, rtol=1e-12)
        r_x = r * observed[:, None]
        np.testing.assert_allclose(new_state.q["w"][0], alpha0 + r.sum(0), rtol=1e-12)
        np.testing.assert_allclose(new_state.q["lam"][0], a0 + r_x.T @ xs, rtol=1e-12)
        np.testing.assert_allclose(new_state.q["lam"][1], b0 + r_x.sum(0), rtol=1e-12)
        state = new_state
    return state


def test_poisson_mixture_matches_hand_written_cavi(x64):
    x = _counts()
    vb = VariationalBayesEM(poisson_mixture, global_sites=("w", "lam"))
    state = _check_poisson_cavi(vb, vb.init(jax.random.PRNGKey(0), x), x, np.ones(10, bool))
    posterior = vb.get_params(state)
    assert isinstance(posterior["w"], dist.Dirichlet)
    assert isinstance(posterior["lam"], dist.Gamma)


def test_missing_observations_drop_out_of_expected_factors(x64):
    """NaN data (jaxem.nan_as_missing): a missing x scores nothing in the
    expected factors, as in the exact ones (before, the site was taken for one
    that reads no global site and kept its density at q's mean)."""
    x = _counts().at[2].set(jnp.nan)
    vb = VariationalBayesEM(jaxem.nan_as_missing(poisson_mixture), global_sites=("w", "lam"))
    observed = ~np.isnan(np.asarray(x))
    _check_poisson_cavi(vb, vb.init(jax.random.PRNGKey(0), x), x, observed, steps=2)


def test_gmm_loc_matches_hand_written_cavi(x64):
    """A Normal prior on a Normal's mean with a known scale: q(mu) Normal with
    precision 1/s0^2 + N_k/sigma^2."""
    x = _reals()
    vb = VariationalBayesEM(gmm, global_sites=("w", "mu"))
    state = vb.init(jax.random.PRNGKey(4), x)
    xs, sigma = np.asarray(x), 1.5
    for _ in range(3):
        alpha = np.asarray(state.q["w"][0])
        m, s = map(np.asarray, state.q["mu"])
        new_state, elbo = vb.update(state, x)
        e_log_w = digamma(alpha) - digamma(alpha.sum())
        square = xs[:, None] ** 2 - 2 * xs[:, None] * m + m**2 + s**2
        log_r = e_log_w - 0.5 * square / sigma**2 - np.log(sigma) - 0.5 * np.log(2 * np.pi)
        log_z = logsumexp(log_r, axis=1)
        r = np.exp(log_r - log_z[:, None])
        kl = dist.kl_divergence(dist.Dirichlet(alpha), dist.Dirichlet(0.5 * np.ones(3)))
        kl = kl + dist.kl_divergence(dist.Normal(m, s), dist.Normal(1.0, 5.0)).sum()
        np.testing.assert_allclose(elbo, log_z.sum() - kl, rtol=1e-12)
        precision = 1 / 25.0 + r.sum(0) / sigma**2
        np.testing.assert_allclose(new_state.q["mu"][1], precision**-0.5, rtol=1e-12)
        np.testing.assert_allclose(
            new_state.q["mu"][0], (1.0 / 25.0 + r.T @ xs / sigma**2) / precision, rtol=1e-12
        )
        state = new_state


def mix_weights(beta):
    """Stick-breaking weights, as in NumPyro's Dirichlet-process mixture example."""
    rest = jnp.cumprod(1 - beta, axis=-1)
    return jnp.pad(beta, (0, 1), constant_values=1) * jnp.pad(rest, (1, 0), constant_values=1)


def dp_poisson(x, K=4):
    """A truncated Dirichlet-process Poisson mixture: K - 1 Beta(1, alpha) sticks."""
    with numpyro.plate("sticks", K - 1):
        beta = numpyro.sample("beta", dist.Beta(1.0, 0.5))
    with numpyro.plate("components", K):
        lam = numpyro.sample("lam", dist.Gamma(2.0, 0.5))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(mix_weights(beta)))
        numpyro.sample("x", dist.Poisson(lam[z]), obs=x)


# The Poisson and Gaussian mixtures' ELBOs are checked term by term above.
CASES = {
    "dp_poisson": (
        dp_poisson,
        _counts,
        ("beta", "lam"),
        {"beta": np.full(3, 0.3), "lam": np.array([1.0, 4.0, 8.0, 11.0])},
    ),
    "latent_class": (latent_class, _binary, ("w", "p"), None),
    "hmm": (hmm, _reals, ("trans", "mu"), {"mu": np.array([-1.0, 1.0])}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_elbo_monotone_and_equal_to_monte_carlo(case, x64):
    """The ELBO never decreases, and equals a Monte Carlo estimate of
    E_q[log p(x, z, theta) - log q(z) - log q(theta)]: theta drawn from q, the
    latents summed exactly under q(z)'s factor marginals."""
    model, data_fn, sites, init = CASES[case]
    data = data_fn()
    init = None if init is None else {k: jnp.asarray(v) for k, v in init.items()}
    fit = VariationalBayesEM(model, global_sites=sites).run(
        jax.random.PRNGKey(0), data, max_iter=60, tol=0, init_params=init
    )
    history = np.asarray(fit.history[: int(fit.num_iters)])
    assert np.all(np.diff(history) >= -1e-9 * np.abs(history[1:]))
    assert history[-1] <= float(fit.elbo) + 1e-9 * abs(float(fit.elbo))

    draws = {n: q.sample(jax.random.PRNGKey(5), (400,)) for n, q in fit.posteriors.items()}
    joint_model = jaxem.with_global_sites(model, sites)

    def one(theta):
        trace = jaxem_trace(joint_model, theta, data)
        expected = sum(
            jnp.sum(fit.latent_marginals[n] * site.log_prob)
            for n, site in trace.sites.items()
            if n not in sites
        )
        # numpyro's Beta.log_prob is off by ~1e-7 per entry in float64: exact densities.
        log_prior = sum(exact_log_density(trace.sites[n].fn, theta[n]) for n in sites)
        log_q = sum(exact_log_density(fit.posteriors[n], theta[n]) for n in sites)
        return expected + log_prior - log_q

    values = np.asarray(jax.lax.map(one, draws))
    estimate = values.mean() + float(fit.latent_entropy)
    se = values.std(ddof=1) / np.sqrt(len(values))
    assert abs(estimate - float(fit.elbo)) < 3 * se + 1e-9


def exact_log_density(d, x):
    """The log density of a Dirichlet, Beta, Gamma or Normal (possibly expanded or
    with event dims) at x, summed, from jax.scipy's formulas."""
    while isinstance(d, (dist.ExpandedDistribution, dist.Independent)):
        d = d.base_dist
    if isinstance(d, dist.Dirichlet):
        alpha = jnp.broadcast_to(d.concentration, jnp.shape(x))
        norm = gammaln(alpha.sum(-1)) - gammaln(alpha).sum(-1)
        return jnp.sum(norm) + jnp.sum((alpha - 1) * jnp.log(x))
    if isinstance(d, dist.Beta):
        return jnp.sum(jax.scipy.stats.beta.logpdf(x, d.concentration1, d.concentration0))
    if isinstance(d, dist.Gamma):
        return jnp.sum(jax.scipy.stats.gamma.logpdf(x, d.concentration, scale=1 / d.rate))
    return jnp.sum(jax.scipy.stats.norm.logpdf(x, d.loc, d.scale))


def jaxem_trace(model, params, data):
    from jaxem.built import built_model
    from jaxem.inspection import model_structure

    built = built_model(model)
    nesting = model_structure(built, (data,), {}).max_plate_nesting
    return built.enumerated_trace(params, (data,), {}, nesting)


def test_prunes_unneeded_components(x64):
    """A small Dirichlet concentration empties surplus components: their
    expected weights fall to about the prior's share."""
    x = _reals()

    def model(x, K=6):
        w = numpyro.sample("w", dist.Dirichlet(1e-3 * jnp.ones(K)))
        with numpyro.plate("components", K):
            mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(w))
            numpyro.sample("x", dist.Normal(mu[z], 1.0), obs=x)

    # Started from every component in use (a draw from this prior puts all weight on one).
    start = {"w": jnp.ones(6) / 6, "mu": jnp.linspace(-5.0, 5.0, 6)}
    fit = VariationalBayesEM(model, global_sites=("w", "mu")).run(
        jax.random.PRNGKey(0), x, max_iter=500, tol=1e-10, init_params=start
    )
    history = np.asarray(fit.history[: int(fit.num_iters)])
    assert np.all(np.diff(history) >= -1e-9 * np.abs(history[1:]))
    weights = np.sort(np.asarray(fit.posteriors["w"].mean))
    assert np.sum(weights > 0.05) == 2
    np.testing.assert_allclose(weights[-2:].sum(), 1.0, atol=1e-3)


# -- bad input --------------------------------------------------------------------


def test_unsupported_prior_names_site_and_pairs(x64):
    def model(x):
        w = numpyro.sample("w", dist.Dirichlet(jnp.ones(2)))
        with numpyro.plate("components", 2):
            lam = numpyro.sample("lam", dist.LogNormal(0.0, 1.0))
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(w))
            numpyro.sample("x", dist.Poisson(lam[z]), obs=x)

    with pytest.raises(
        ModelError, match=r"'lam' has a LogNormal prior.*Gamma prior on a Poisson"
    ) as err:
        VariationalBayesEM(model, global_sites=("w", "lam")).run(jax.random.PRNGKey(0), _counts())
    # Each pair in words, with its article.
    assert "Gamma prior on an Exponential 'rate'" in str(err.value)


def test_prior_not_conjugate_to_its_likelihood(x64):
    def model(x):
        with numpyro.plate("components", 2):
            lam = numpyro.sample("lam", dist.Normal(5.0, 1.0))
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(jnp.ones(2) / 2))
            numpyro.sample("x", dist.Poisson(lam[z]), obs=x)

    with pytest.raises(ModelError, match=r"'lam'.*Normal prior on a Poisson 'rate'.*EM\(model"):
        VariationalBayesEM(model, global_sites=("lam",)).run(jax.random.PRNGKey(0), _counts())


def test_transformed_argument_is_an_error(x64):
    def model(x):
        with numpyro.plate("components", 2):
            lam = numpyro.sample("lam", dist.Gamma(2.0, 1.0))
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(jnp.ones(2) / 2))
            numpyro.sample("x", dist.Poisson(2.0 * lam[z]), obs=x)

    with pytest.raises(ModelError, match=r"'lam'.*through a transformation"):
        VariationalBayesEM(model, global_sites=("lam",)).run(jax.random.PRNGKey(0), _counts())


def test_improper_prior_is_an_error(x64):
    def improper(x):
        mu = numpyro.sample("mu", dist.ImproperUniform(constraints.real, (), (2,)))
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(jnp.ones(2) / 2))
            numpyro.sample("x", dist.Normal(mu[z], 1.0), obs=x)

    with pytest.raises(ModelError, match=r"'mu' has an improper prior"):
        VariationalBayesEM(improper, global_sites=("mu",)).run(jax.random.PRNGKey(0), _reals())

    def flat(x):
        with numpyro.plate("components", 2):
            mu = numpyro.sample("mu", dist.Normal(0.0, jnp.inf))
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(jnp.ones(2) / 2))
            numpyro.sample("x", dist.Normal(mu[z], 1.0), obs=x)

    with pytest.raises(ModelError, match=r"'mu' has an improper prior \(Normal"):
        VariationalBayesEM(flat, global_sites=("mu",)).run(jax.random.PRNGKey(0), _reals())


def test_global_site_in_data_plate_is_an_error(x64):
    def model(x):
        with numpyro.plate("data", x.shape[0]):
            lam = numpyro.sample("lam", dist.Gamma(2.0, 1.0))
            numpyro.sample("x", dist.Poisson(lam), obs=x)

    with pytest.raises(ModelError, match=r"global site 'lam' is inside plate 'data'"):
        VariationalBayesEM(model, global_sites=("lam",)).run(jax.random.PRNGKey(0), _counts())


def test_scaled_site_is_an_error(x64):
    """Expected factors are unscaled: a weighted site would be fitted as unweighted."""

    def model(x):
        with numpyro.plate("components", 2):
            lam = numpyro.sample("lam", dist.Gamma(2.0, 1.0))
        with numpyro.plate("data", x.shape[0]), numpyro.handlers.scale(scale=2.0 * jnp.ones(10)):
            z = numpyro.sample("z", dist.Categorical(jnp.ones(2) / 2))
            numpyro.sample("x", dist.Poisson(lam[z]), obs=x)

    with pytest.raises(ModelError, match=r"scaled sites.*site 'x'"):
        VariationalBayesEM(model, global_sites=("lam",)).run(jax.random.PRNGKey(0), _counts())


def test_factor_reading_a_global_site_unseen_is_an_error(x64):
    """A site that reads a global site through a wrapper whose arguments jaxem does
    not see (a TransformedDistribution) is an error, not a density kept at one point."""

    def model(x):
        with numpyro.plate("components", 2):
            mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(jnp.ones(2) / 2))
            log_normal = dist.TransformedDistribution(
                dist.Normal(mu[z], 1.0), dist.transforms.ExpTransform()
            )
            numpyro.sample("x", log_normal, obs=x)

    with pytest.raises(ModelError, match=r"'mu'.*read by site 'x'.*cannot take the expectation"):
        VariationalBayesEM(model, global_sites=("mu",)).run(
            jax.random.PRNGKey(0), jnp.exp(_reals())
        )


# -- Normal-Wishart: a Gaussian mixture with full covariances ----------------------

NW_ALPHA0, NW_BETA0, NW_NU0 = 0.7, 0.5, 4.0


def _nw_prior():
    return np.array([0.5, -0.2]), np.array([[0.8, 0.2], [0.2, 0.5]])


def full_gmm(x, K=3, spelling="scale_matrix"):
    m0, w0 = map(jnp.asarray, _nw_prior())
    wishart = {
        "scale_matrix": lambda: dist.Wishart(NW_NU0, scale_matrix=w0),
        "rate_matrix": lambda: dist.Wishart(NW_NU0, rate_matrix=jnp.linalg.inv(w0)),
        "scale_tril": lambda: dist.Wishart(NW_NU0, scale_tril=jnp.linalg.cholesky(w0)),
    }[spelling]
    w = numpyro.sample("w", dist.Dirichlet(NW_ALPHA0 * jnp.ones(K)))
    with numpyro.plate("components", K):
        lam = numpyro.sample("lam", wishart())
        mu = numpyro.sample("mu", dist.MultivariateNormal(m0, precision_matrix=NW_BETA0 * lam))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.MultivariateNormal(mu[z], precision_matrix=lam[z]), obs=x)


def _nw_data(n=(12, 12, 9)):
    rng = np.random.default_rng(0)
    centers, scales = np.array([[3.0, 0.0], [-2.0, -1.0], [0.0, 3.0]]), (1.0, 0.5, 1.0)
    return np.concatenate([rng.normal(size=(k, 2)) * s + c for k, s, c in zip(n, scales, centers)])


def _nw_start(K=3):
    mu = np.array([[2.0, 0.0], [-1.0, -1.0], [0.0, 2.0]])[:K]
    return {"w": np.ones(K) / K, "mu": mu, "lam": np.stack([np.eye(2)] * K)}


_NW_FITS: dict = {}


def _nw_fits(spelling="scale_matrix"):
    """``(x, K, iterations, jaxem's fit, scikit-learn's fit)`` from the same initial
    responsibilities, computed once per spelling (the Monte Carlo test reuses it)."""
    if spelling in _NW_FITS:
        return _NW_FITS[spelling]
    import warnings

    from scipy.stats import multivariate_normal
    from sklearn.mixture import BayesianGaussianMixture

    x, start, K, n = _nw_data(), _nw_start(), 3, 6
    m0, w0 = _nw_prior()
    log_r = np.log(start["w"]) + np.stack(
        [
            multivariate_normal.logpdf(x, start["mu"][k], np.linalg.inv(start["lam"][k]))
            for k in range(K)
        ],
        1,
    )
    resp = np.exp(log_r - logsumexp(log_r, 1, keepdims=True))

    class FromResponsibilities(BayesianGaussianMixture):
        def _initialize_parameters(self, X, random_state, xp=None):
            self._initialize(X, resp)

    sk = FromResponsibilities(
        n_components=K,
        covariance_type="full",
        weight_concentration_prior_type="dirichlet_distribution",
        weight_concentration_prior=NW_ALPHA0,
        mean_precision_prior=NW_BETA0,
        mean_prior=m0,
        degrees_of_freedom_prior=NW_NU0,
        covariance_prior=np.linalg.inv(w0),  # sklearn's is W0^-1
        reg_covar=0.0,
        tol=0.0,
        max_iter=n,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # max_iter reached, by design
        sk.fit(x)

    fit = VariationalBayesEM(
        lambda x: full_gmm(x, K, spelling), global_sites=("w", "lam", "mu")
    ).run(
        jax.random.PRNGKey(0),
        jnp.asarray(x),
        max_iter=n,
        tol=0,
        init_params={k: jnp.asarray(v) for k, v in start.items()},
    )
    _NW_FITS[spelling] = (x, K, n, fit, sk)
    return _NW_FITS[spelling]


# Shares _nw_fits with the Monte Carlo test when both run on one worker (see pyproject).
@pytest.mark.xdist_group("normal_wishart")
@pytest.mark.parametrize(
    "spelling",
    [
        "scale_matrix",
        # The other spellings of the Wishart prior: the same fit, deselected by default (CI time).
        pytest.param("rate_matrix", marks=pytest.mark.slow),
        pytest.param("scale_tril", marks=pytest.mark.slow),
    ],
)
def test_normal_wishart_matches_sklearn(spelling, x64):
    """Same priors, same initial responsibilities (the posterior at the same point):
    every variational parameter equals scikit-learn's BayesianGaussianMixture after
    the same number of iterations, and the ELBO its lower bound plus the constant
    it drops."""
    x, K, n, fit, sk = _nw_fits(spelling)
    m0, w0 = _nw_prior()
    (alpha,), (nu, w), (m, beta) = fit.q["w"], fit.q["lam"], fit.q["mu"]
    rtol = 1e-6
    np.testing.assert_allclose(alpha, sk.weight_concentration_, rtol=rtol)
    np.testing.assert_allclose(beta, sk.mean_precision_, rtol=rtol)
    np.testing.assert_allclose(m, sk.means_, rtol=rtol)
    np.testing.assert_allclose(nu, sk.degrees_of_freedom_, rtol=rtol)
    # sklearn's covariances_ is E[Lam]^-1 = W^-1 / nu; precisions_cholesky_ is U
    # (upper triangular) with U U^T = E[Lam] = nu W.
    np.testing.assert_allclose(np.linalg.inv(w) / nu[:, None, None], sk.covariances_, rtol=rtol)
    u = sk.precisions_cholesky_
    np.testing.assert_allclose(nu[:, None, None] * w, u @ np.swapaxes(u, 1, 2), rtol=rtol)

    # sklearn's lower bound after iteration i is L(r_i, q_i), r_i the responsibilities
    # it updated q_i from, less the terms constant in q: the data's -N D/2 log 2 pi
    # and the priors' log normalizers (log pi terms cancel between Wisharts).
    N, D = x.shape
    constant = (
        -0.5 * N * D * np.log(2 * np.pi)
        + gammaln(K * NW_ALPHA0)
        - K * gammaln(NW_ALPHA0)
        + K
        * (
            0.5 * D * np.log(NW_BETA0)
            - 0.5 * NW_NU0 * np.linalg.slogdet(w0)[1]
            - 0.5 * NW_NU0 * D * np.log(2.0)
            - sum(gammaln(0.5 * (NW_NU0 - i)) for i in range(D))
        )
    )
    sklearn_bound = np.asarray(sk.lower_bounds_) + constant
    # Ours at q_i has q(z) optimal for q_i: at least L(r_i, q_i), equal at convergence.
    ours = np.append(np.asarray(fit.history[1:n]), float(fit.elbo))
    assert np.all(ours >= sklearn_bound - 1e-9 * np.abs(sklearn_bound))
    np.testing.assert_allclose(ours[-1], sklearn_bound[-1], rtol=1e-8)
    assert isinstance(fit.posteriors["lam"], dist.Wishart)
    assert isinstance(fit.posteriors["mu"], dist.MultivariateStudentT)


@pytest.mark.xdist_group("normal_wishart")
def test_normal_wishart_elbo_monotone_and_equal_to_monte_carlo(x64):
    """The Normal-Wishart ELBO never decreases and equals a Monte Carlo estimate of
    E_q[log p(x, z, theta) - log q]: (Lam, mu) drawn jointly from q(Lam) q(mu | Lam),
    densities of the priors and of q from scipy."""
    from scipy.stats import dirichlet, wishart

    from jaxem.normal_wishart import mean_given_precision

    x, K, _, fit, _ = _nw_fits()
    x = jnp.asarray(x)
    sites = ("w", "lam", "mu")
    model = lambda x: full_gmm(x, K)  # noqa: E731
    history = np.asarray(fit.history[: int(fit.num_iters)])
    assert np.all(np.diff(history) >= -1e-9 * np.abs(history[1:]))
    assert history[-1] <= float(fit.elbo) + 1e-9 * abs(float(fit.elbo))

    draws = 300

    @jax.jit  # one compilation, not one per eager sampling op
    def sample(key):
        keys = jax.random.split(key, 3)
        lam = fit.posteriors["lam"].sample(keys[0], (draws,))
        mu = mean_given_precision(fit.q["mu"], lam).sample(keys[1])
        return fit.posteriors["w"].sample(keys[2], (draws,)), lam, mu

    w, lam, mu = sample(jax.random.PRNGKey(5))
    joint_model = jaxem.with_global_sites(model, sites)

    def expected(theta):
        trace = jaxem_trace(joint_model, theta, x)
        return sum(
            jnp.sum(fit.latent_marginals[n] * site.log_prob)
            for n, site in trace.sites.items()
            if n not in sites
        )

    values = np.array(jax.lax.map(expected, {"w": w, "lam": lam, "mu": mu}))
    m0, w0 = _nw_prior()
    (alpha,), (nu, scale), (m, beta) = (
        tuple(map(np.asarray, fit.q[s])) for s in ("w", "lam", "mu")
    )
    lam, mu, w = np.asarray(lam), np.asarray(mu), np.asarray(w)

    def mvn_logpdf(v, mean, precision):  # (draws, D) under (draws, D, D) precisions
        d = v - mean
        quad = np.einsum("ni,nij,nj->n", d, precision, d)
        return 0.5 * (np.linalg.slogdet(precision)[1] - quad - d.shape[-1] * np.log(2 * np.pi))

    values += dirichlet.logpdf(w.T, NW_ALPHA0 * np.ones(K)) - dirichlet.logpdf(w.T, alpha)
    for k in range(K):
        lam_k = np.moveaxis(lam[:, k], 0, -1)  # scipy's wishart: draws on the last axis
        values += wishart.logpdf(lam_k, NW_NU0, w0) - wishart.logpdf(lam_k, nu[k], scale[k])
        values += mvn_logpdf(mu[:, k], m0, NW_BETA0 * lam[:, k])
        values -= mvn_logpdf(mu[:, k], m[k], beta[k] * lam[:, k])
    estimate = values.mean() + float(fit.latent_entropy)
    se = values.std(ddof=1) / np.sqrt(draws)
    assert abs(estimate - float(fit.elbo)) < 3 * se + 1e-9


def _nw_variant(kind):
    def model(x, K=2):
        m0, w0 = map(jnp.asarray, _nw_prior())
        w = numpyro.sample("w", dist.Dirichlet(jnp.ones(K)))
        if kind == "tied":  # one precision shared by the components
            lam = numpyro.sample("lam", dist.Wishart(NW_NU0, scale_matrix=w0))
        with numpyro.plate("components", K):
            if kind == "tied":
                mu = numpyro.sample(
                    "mu", dist.MultivariateNormal(m0, precision_matrix=NW_BETA0 * lam)
                )
            elif kind == "inverse_wishart":
                sigma = numpyro.sample("sigma", dist.InverseWishart(NW_NU0, w0))
                mu = numpyro.sample("mu", dist.MultivariateNormal(m0, sigma / NW_BETA0))
            else:
                lam = numpyro.sample("lam", dist.Wishart(NW_NU0, scale_matrix=w0))
                mean_prior = (
                    dist.MultivariateNormal(m0, jnp.eye(2))
                    if kind == "independent_mean"
                    else dist.MultivariateNormal(m0, precision_matrix=NW_BETA0 * lam)
                )
                mu = numpyro.sample("mu", mean_prior)
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(w))
            if kind == "inverse_wishart":
                likelihood = dist.MultivariateNormal(mu[z], sigma[z])
            elif kind == "covariance":
                likelihood = dist.MultivariateNormal(mu[z], jnp.linalg.inv(lam[z]))
            elif kind == "other_component":
                likelihood = dist.MultivariateNormal(mu[z], precision_matrix=lam[1 - z])
            elif kind == "tied":
                likelihood = dist.MultivariateNormal(mu[z], precision_matrix=lam)
            else:
                likelihood = dist.MultivariateNormal(mu[z], precision_matrix=lam[z])
            numpyro.sample("x", likelihood, obs=x)

    return model


@pytest.mark.parametrize(
    "kind, sites, match",
    [
        ("covariance", ("w", "lam", "mu"), r"site 'x' reads 'lam' through \['covariance_matrix'\]"),
        ("independent_mean", ("w", "lam", "mu"), r"'lam' has a Wishart prior but no global site"),
        (
            "inverse_wishart",
            ("w", "sigma", "mu"),
            r"'sigma' has an InverseWishart prior.*precision",
        ),
        ("other_component", ("w", "lam", "mu"), r"site 'x' reads 'mu' and 'lam' at different"),
        ("tied", ("w", "lam", "mu"), r"one mean per precision matrix"),
    ],
)
def test_normal_wishart_unsupported_spelling_names_site(kind, sites, match, x64):
    with pytest.raises(ModelError, match=match):
        VariationalBayesEM(_nw_variant(kind), global_sites=sites).run(
            jax.random.PRNGKey(0), jnp.asarray(_nw_data((5, 5, 0)))
        )


# -- Beal's variational Bayesian HMM: the chain's posterior stays exact ------------

BEAL_SCALE = 0.8


def beal_hmm(x, K=3):
    """Dirichlet priors on the initial distribution and on each row of the
    transition matrix, Normal priors on the emission means (scale known)."""
    pi = numpyro.sample("pi", dist.Dirichlet(jnp.array([1.0, 2.0, 0.5])[:K]))
    trans = numpyro.sample("trans", dist.Dirichlet(jnp.full((K, K), 0.7)).to_event(1))
    with numpyro.plate("states", K):
        mu = numpyro.sample("mu", dist.Normal(0.5, 4.0))
    z0 = numpyro.sample("z0", dist.Categorical(pi))
    numpyro.sample("x0", dist.Normal(mu[z0], BEAL_SCALE), obs=x[0])

    def step(z_prev, xt):
        z = numpyro.sample("z", dist.Categorical(trans[z_prev]))
        numpyro.sample("x", dist.Normal(mu[z], BEAL_SCALE), obs=xt)
        return z, None

    scan(step, z0, x[1:])


def _beal_forward_backward(log_pi, log_a, log_e):
    """log Z, the marginals gamma_t(k) and the summed pair marginals
    sum_t xi_t(j, k) of a chain with (unnormalized) log potentials, in numpy."""
    T, K = log_e.shape
    log_alpha = np.zeros((T, K))
    log_alpha[0] = log_pi + log_e[0]
    for t in range(1, T):
        log_alpha[t] = logsumexp(log_alpha[t - 1][:, None] + log_a, axis=0) + log_e[t]
    log_beta = np.zeros((T, K))
    for t in range(T - 2, -1, -1):
        log_beta[t] = logsumexp(log_a + (log_e[t + 1] + log_beta[t + 1])[None], axis=1)
    log_z = logsumexp(log_alpha[-1])
    gamma = np.exp(log_alpha + log_beta - log_z)
    xi = sum(
        np.exp(log_alpha[t - 1][:, None] + log_a + (log_e[t] + log_beta[t])[None] - log_z)
        for t in range(1, T)
    )
    return log_z, gamma, xi


def test_beal_hmm_matches_hand_written_forward_backward(x64):
    """A scan HMM under VBEM is Beal's variational Bayesian HMM (Beal 2003, ch. 3):
    q(z) is the exact chain posterior under exp E[log pi], exp E[log A] and the
    expected log emissions (forward-backward written out in numpy here), the ELBO
    is its log normalizer less the KLs, and q(pi), q(A) rows, q(mu) are the priors
    updated by the expected initial counts, transition counts and emission sums."""
    x = _reals()[::2]  # 15 steps
    xs, K, s = np.asarray(x), 3, BEAL_SCALE
    vb = VariationalBayesEM(beal_hmm, global_sites=("pi", "trans", "mu"))
    start = {
        "pi": jnp.ones(K) / K,
        "trans": jnp.full((K, K), 1.0 / K),
        "mu": jnp.array([-2.0, 0.0, 2.0]),
    }
    state = vb.init(jax.random.PRNGKey(0), x, init_params=start)
    alpha_pi0, alpha_a0, m0, s0 = np.array([1.0, 2.0, 0.5]), np.full((K, K), 0.7), 0.5, 4.0
    elbos = []
    for _ in range(4):
        alpha_pi = np.asarray(state.q["pi"][0])
        alpha_a = np.asarray(state.q["trans"][0])
        m, sd = map(np.asarray, state.q["mu"])
        new_state, elbo = vb.update(state, x)
        log_pi = digamma(alpha_pi) - digamma(alpha_pi.sum())
        log_a = digamma(alpha_a) - digamma(alpha_a.sum(1, keepdims=True))
        square = xs[:, None] ** 2 - 2 * xs[:, None] * m + m**2 + sd**2
        log_e = -0.5 * square / s**2 - np.log(s) - 0.5 * np.log(2 * np.pi)
        log_z, gamma, xi = _beal_forward_backward(log_pi, log_a, log_e)
        kl = dist.kl_divergence(dist.Dirichlet(alpha_pi), dist.Dirichlet(alpha_pi0))
        kl = kl + dist.kl_divergence(dist.Dirichlet(alpha_a), dist.Dirichlet(alpha_a0)).sum()
        kl = kl + dist.kl_divergence(dist.Normal(m, sd), dist.Normal(m0, s0)).sum()
        np.testing.assert_allclose(elbo, log_z - kl, rtol=1e-12)
        np.testing.assert_allclose(new_state.q["pi"][0], alpha_pi0 + gamma[0], rtol=1e-12)
        np.testing.assert_allclose(new_state.q["trans"][0], alpha_a0 + xi, rtol=1e-12)
        precision = 1 / s0**2 + gamma.sum(0) / s**2
        np.testing.assert_allclose(new_state.q["mu"][1], precision**-0.5, rtol=1e-12)
        mean = (m0 / s0**2 + gamma.T @ xs / s**2) / precision
        np.testing.assert_allclose(new_state.q["mu"][0], mean, rtol=1e-12)
        elbos.append(float(elbo))
        state = new_state
    assert np.all(np.diff(elbos) >= -1e-12 * np.abs(elbos[1:]))


def test_a_vb_hmm_s_latent_posteriors_are_its_chain_marginals_by_the_user_s_names(x64):
    """``latent_posteriors`` holds q(z) per step as ``jaxem.posterior`` gives it for
    EM (forward-backward under the final q), keyed by the user's site names: no
    internal name of a ``scan``'s first step."""
    x = _reals()[::2]
    xs, K, s = np.asarray(x), 3, BEAL_SCALE
    vb = VariationalBayesEM(beal_hmm, global_sites=("pi", "trans", "mu"))
    start = {
        "pi": jnp.ones(K) / K,
        "trans": jnp.full((K, K), 1.0 / K),
        "mu": jnp.array([-2.0, 0.0, 2.0]),
    }
    fit = vb.run(jax.random.PRNGKey(0), x, init_params=start, max_iter=3, tol=0.0)
    assert not any(name.startswith("_") for name in fit.latent_posteriors)
    alpha_pi, alpha_a = np.asarray(fit.q["pi"][0]), np.asarray(fit.q["trans"][0])
    m, sd = map(np.asarray, fit.q["mu"])
    log_pi = digamma(alpha_pi) - digamma(alpha_pi.sum())
    log_a = digamma(alpha_a) - digamma(alpha_a.sum(1, keepdims=True))
    square = xs[:, None] ** 2 - 2 * xs[:, None] * m + m**2 + sd**2
    log_e = -0.5 * square / s**2 - np.log(s) - 0.5 * np.log(2 * np.pi)
    gamma = _beal_forward_backward(log_pi, log_a, log_e)[1]
    assert set(fit.latent_posteriors) == {"z0", "z"}
    np.testing.assert_allclose(fit.latent_posteriors["z0"], gamma[0], rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(fit.latent_posteriors["z"], gamma[1:], rtol=1e-10, atol=1e-14)


# -- truncated stick-breaking (Dirichlet process) weights ---------------------------

DP_ALPHA = 0.8


def dp_gmm(x, K=3, sticks="cumprod"):
    """full_gmm with truncated Dirichlet-process weights: K - 1 Beta(1, alpha) sticks."""
    m0, w0 = map(jnp.asarray, _nw_prior())
    beta = numpyro.sample("beta", dist.Beta(1.0, DP_ALPHA).expand([K - 1]).to_event(1))
    if sticks == "cumprod":
        weights = mix_weights(beta)
    else:  # numpyro's transform, on the logits shifted as it shifts them back
        shift = jnp.log(jnp.arange(K - 1, 0, -1.0))
        weights = dist.transforms.StickBreakingTransform()(jax.scipy.special.logit(beta) + shift)
    with numpyro.plate("components", K):
        lam = numpyro.sample("lam", dist.Wishart(NW_NU0, scale_matrix=w0))
        mu = numpyro.sample("mu", dist.MultivariateNormal(m0, precision_matrix=NW_BETA0 * lam))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(weights))
        numpyro.sample("x", dist.MultivariateNormal(mu[z], precision_matrix=lam[z]), obs=x)


@pytest.mark.parametrize(
    # The transform's spelling: the same fit, deselected by default (CI time).
    "sticks",
    ["cumprod", pytest.param("transform", marks=pytest.mark.slow)],
)
def test_stick_breaking_matches_sklearn_dirichlet_process(sticks, x64):
    """From the same responsibilities (the posterior at the same point) and the same
    priors, the VB-M-step gives scikit-learn's BayesianGaussianMixture
    (weight_concentration_prior_type="dirichlet_process") q(v_k) = Beta(1 + N_k,
    alpha + sum_{j>k} N_j) for the K - 1 sticks, its Normal-Wishart parameters, and
    its E[log w_k] = E[log v_k] + sum_{j<k} E[log(1 - v_j)] for k < K. The last
    component differs by a convention: scikit-learn keeps a K-th stick v_K ~
    Beta(1 + N_K, alpha) (weights summing to less than 1), NumPyro's spelling sets
    v_K = 1, so scikit-learn's E[log w_K] is ours plus E[log v_K]. Iterations after
    the first differ through that last weight, so only this step is compared."""
    from scipy.stats import multivariate_normal
    from sklearn.mixture import BayesianGaussianMixture

    from jaxem.stick_breaking import expected_log_stick_weights

    x, start, K = _nw_data(), _nw_start(), 3
    m0, w0 = _nw_prior()
    log_r = np.log(start["w"]) + np.stack(
        [
            multivariate_normal.logpdf(x, start["mu"][k], np.linalg.inv(start["lam"][k]))
            for k in range(K)
        ],
        1,
    )
    resp = np.exp(log_r - logsumexp(log_r, 1, keepdims=True))
    sk = BayesianGaussianMixture(
        n_components=K,
        covariance_type="full",
        weight_concentration_prior_type="dirichlet_process",
        weight_concentration_prior=DP_ALPHA,
        mean_precision_prior=NW_BETA0,
        mean_prior=m0,
        degrees_of_freedom_prior=NW_NU0,
        covariance_prior=np.linalg.inv(w0),
        reg_covar=0.0,
    )
    sk._check_parameters(x)
    sk._initialize(x, resp)

    # A point with the start's weights: the sticks that break into them.
    w = start["w"]
    sticks_start = w[:-1] / (1.0 - np.concatenate([[0.0], np.cumsum(w)[:-2]]))
    init = {"beta": sticks_start, "mu": start["mu"], "lam": start["lam"]}
    vb = VariationalBayesEM(lambda x: dp_gmm(x, K, sticks), global_sites=("beta", "lam", "mu"))
    state = vb.init(
        jax.random.PRNGKey(0),
        jnp.asarray(x),
        init_params={k: jnp.asarray(v) for k, v in init.items()},
    )
    (a, b), (nu, scale), (m, beta) = state.q["beta"], state.q["lam"], state.q["mu"]
    rtol = 1e-10
    np.testing.assert_allclose(a, sk.weight_concentration_[0][:-1], rtol=rtol)
    np.testing.assert_allclose(b, sk.weight_concentration_[1][:-1], rtol=rtol)
    np.testing.assert_allclose(beta, sk.mean_precision_, rtol=rtol)
    np.testing.assert_allclose(m, sk.means_, rtol=rtol)
    np.testing.assert_allclose(nu, sk.degrees_of_freedom_, rtol=rtol)
    u = sk.precisions_cholesky_
    np.testing.assert_allclose(nu[:, None, None] * scale, u @ np.swapaxes(u, 1, 2), rtol=rtol)
    e_log_v = digamma(np.asarray(a)) - digamma(np.asarray(a + b))
    e_log_rest = digamma(np.asarray(b)) - digamma(np.asarray(a + b))
    ours = np.asarray(expected_log_stick_weights(e_log_v, e_log_rest))
    theirs = sk._estimate_log_weights()
    np.testing.assert_allclose(ours[:-1], theirs[:-1], rtol=rtol)
    a_last, b_last = sk.weight_concentration_[0][-1], sk.weight_concentration_[1][-1]
    e_log_v_last = digamma(a_last) - digamma(a_last + b_last)
    np.testing.assert_allclose(theirs[-1], ours[-1] + e_log_v_last, rtol=rtol)
    assert isinstance(vb.get_params(state)["beta"], dist.Beta)


def test_beta_prior_on_weights_other_than_sticks_is_an_error(x64):
    """Beta sticks whose weights are not the stick-breaking ones (reversed) are a
    transformation VBEM cannot take the expectation through: an error."""

    def model(x, K=3):
        with numpyro.plate("sticks", K - 1):
            beta = numpyro.sample("beta", dist.Beta(1.0, 0.5))
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(mix_weights(beta)[::-1]))
            numpyro.sample("x", dist.Poisson(jnp.array([1.0, 5.0, 10.0])[z]), obs=x)

    with pytest.raises(
        ModelError, match=r"'beta' has a Beta prior on a CategoricalProbs 'probs'.*stick-breaking"
    ):
        VariationalBayesEM(model, global_sites=("beta",)).run(jax.random.PRNGKey(0), _counts())
