"""Variational Bayes EM with numpyro.param sites beside the global sites: point
values that maximize the ELBO with q held (jaxem.vb_params).

References: the same coordinate ascent written out by hand in numpy (VB-E-step,
VB-M-step, then the param's exact ELBO maximizer in closed form), and
scipy.optimize maximizing the ELBO in the param with q held.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from numpyro.distributions import constraints
from scipy.optimize import minimize_scalar
from scipy.special import digamma, gammaln, logsumexp

from jaxem import VariationalBayesEM
from jaxem.exceptions import ConvergenceWarning, ModelError

ALPHA0, M0, S0 = 1.5, 0.5, 4.0


def gmm_shared_scale(x, K=2):
    w = numpyro.sample("w", dist.Dirichlet(ALPHA0 * jnp.ones(K)))
    with numpyro.plate("components", K):
        mu = numpyro.sample("mu", dist.Normal(M0, S0))
    sigma = numpyro.param("sigma", 1.0, constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Normal(mu[z], sigma), obs=x)


def gmm_softplus_scale(x, K=2):
    w = numpyro.sample("w", dist.Dirichlet(ALPHA0 * jnp.ones(K)))
    with numpyro.plate("components", K):
        mu = numpyro.sample("mu", dist.Normal(M0, S0))
    rho = numpyro.param("rho", 0.3)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Normal(mu[z], jax.nn.softplus(rho)), obs=x)


def poisson_weights_param(x, K=2):
    """The weights a param without prior (their factor reads no global site: EM's
    closed form), the rates global sites."""
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    with numpyro.plate("components", K):
        lam = numpyro.sample("lam", dist.Gamma(2.0, 0.5))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Poisson(lam[z]), obs=x)


def poisson_prior_rate(x, K=2):
    """Empirical Bayes: the rate of the rates' Gamma prior is a param."""
    w = numpyro.sample("w", dist.Dirichlet(ALPHA0 * jnp.ones(K)))
    b = numpyro.param("b", 1.0, constraint=constraints.positive)
    with numpyro.plate("components", K):
        lam = numpyro.sample("lam", dist.Gamma(2.0, b))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Poisson(lam[z]), obs=x)


def _reals(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.normal(-2.0, 0.7, n // 2), rng.normal(2.5, 0.7, n - n // 2)])


def _counts(n=40, seed=1):
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.poisson(1.0, n // 2), rng.poisson(8.0, n - n // 2)]).astype(float)


def _kl_dirichlet(a, a0):
    return (
        gammaln(a.sum())
        - gammaln(a).sum()
        - gammaln(a0.sum())
        + gammaln(a0).sum()
        + np.sum((a - a0) * (digamma(a) - digamma(a.sum())))
    )


def _kl_normal(m, v, m0, v0):
    return np.sum(0.5 * np.log(v0 / v) + (v + (m - m0) ** 2) / (2 * v0) - 0.5)


def _kl_gamma(a, b, a0, b0):
    return np.sum(
        (a - a0) * digamma(a)
        - gammaln(a)
        + gammaln(a0)
        + a0 * (np.log(b) - np.log(b0))
        + a * (b0 - b) / b
    )


def _numpy_gmm_shared_scale(x, w0, mu0, sigma0, iters):
    """VB-E, VB-M, then sigma^2 = sum_nk r_nk E_q[(x_n - mu_k)^2] / N (the ELBO's
    exact maximizer in sigma with q held): ``(ELBO history, final ELBO, alpha, m, v,
    sigma)``."""
    n, k = len(x), len(w0)
    a0 = np.full(k, ALPHA0)
    log_r = (
        np.log(w0) - 0.5 * np.log(2 * np.pi * sigma0**2) - (x[:, None] - mu0) ** 2 / (2 * sigma0**2)
    )
    r = np.exp(log_r - logsumexp(log_r, axis=1, keepdims=True))
    sigma = sigma0

    def vb_m(r, sigma):
        nk = r.sum(0)
        precision = 1 / S0**2 + nk / sigma**2
        m = (M0 / S0**2 + (r * x[:, None]).sum(0) / sigma**2) / precision
        return a0 + nk, m, 1 / precision

    def e_and_elbo(alpha, m, v, sigma):
        e_log_w = digamma(alpha) - digamma(alpha.sum())
        log_rho = (
            e_log_w
            - 0.5 * np.log(2 * np.pi * sigma**2)
            - ((x[:, None] - m) ** 2 + v) / (2 * sigma**2)
        )
        log_z = logsumexp(log_rho, axis=1)
        elbo = log_z.sum() - _kl_dirichlet(alpha, a0) - _kl_normal(m, v, M0, S0**2)
        return np.exp(log_rho - log_z[:, None]), elbo

    alpha, m, v = vb_m(r, sigma)
    history = []
    for _ in range(iters):
        r, elbo = e_and_elbo(alpha, m, v, sigma)
        history.append(elbo)
        alpha, m, v = vb_m(r, sigma)
        sigma = np.sqrt(np.sum(r * ((x[:, None] - m) ** 2 + v)) / n)
    _, elbo = e_and_elbo(alpha, m, v, sigma)
    return np.array(history), elbo, alpha, m, v, sigma


def _numpy_poisson_weights(x, w0, lam0, iters):
    """VB-E, VB-M (Gamma rates), then w = N_k / N (EM's closed form)."""
    k = len(w0)
    a0, b0 = np.full(k, 2.0), np.full(k, 0.5)
    log_px = x[:, None] * np.log(lam0) - lam0 - gammaln(x + 1)[:, None]
    log_r = np.log(w0) + log_px
    r = np.exp(log_r - logsumexp(log_r, axis=1, keepdims=True))
    w = w0

    def vb_m(r):
        return a0 + (r * x[:, None]).sum(0), b0 + r.sum(0)

    def e_and_elbo(a, b, w):
        log_rho = (
            np.log(w) + x[:, None] * (digamma(a) - np.log(b)) - a / b - gammaln(x + 1)[:, None]
        )
        log_z = logsumexp(log_rho, axis=1)
        return np.exp(log_rho - log_z[:, None]), log_z.sum() - _kl_gamma(a, b, a0, b0)

    a, b = vb_m(r)
    history = []
    for _ in range(iters):
        r, elbo = e_and_elbo(a, b, w)
        history.append(elbo)
        a, b = vb_m(r)
        w = r.sum(0) / len(x)
    _, elbo = e_and_elbo(a, b, w)
    return np.array(history), elbo, a, b, w


@pytest.mark.parametrize("latents", ["exact", "mean_field"])
def test_shared_scale_param_matches_numpy_coordinate_ascent(x64, latents):
    """(a) Dirichlet weights and Normal means as global sites, a numpyro.param
    scale (gradient path: its factor reads the means): the fixed point of the ascent,
    its ELBO, q(theta) and the scale, agree with a numpy implementation of the same
    ascent, whose scale step is the exact maximizer in closed form; the first ELBO is
    the same and the history never falls. One latent per observation: mean field over
    the latents is exact. Both run to the fixed point (60 iterations; the ELBO stops
    changing after ~15), not a fixed number of steps compared step by step: L-BFGS
    carries curvature pairs of rounding noise from one M-step to the next, and under
    LLVM -O0 that left the scale unmoved for one iteration (one step behind numpy's
    from there on, to the same fixed point)."""
    x = _reals()
    w0, mu0, sigma0 = np.array([0.5, 0.5]), np.array([-1.0, 1.0]), 2.0
    iters = 60
    fitter = VariationalBayesEM(gmm_shared_scale, global_sites=("w", "mu"), latents=latents)
    init = {"w": jnp.asarray(w0), "mu": jnp.asarray(mu0), "sigma": jnp.asarray(sigma0)}
    fit = fitter.run(
        jax.random.PRNGKey(0), jnp.asarray(x), max_iter=iters, tol=0.0, init_params=init
    )
    history, elbo, alpha, m, v, sigma = _numpy_gmm_shared_scale(x, w0, mu0, sigma0, iters)
    assert int(fit.num_iters) == iters
    assert abs(history[-1] - history[-2]) < 1e-13 * abs(history[-1])  # numpy's fixed point
    jax_history = np.asarray(fit.history)
    np.testing.assert_allclose(jax_history[0], history[0], rtol=1e-12)
    assert np.all(np.diff(jax_history) >= -1e-12 * np.abs(jax_history[1:])), jax_history
    np.testing.assert_allclose(jax_history[-1], history[-1], rtol=1e-10)
    np.testing.assert_allclose(float(fit.elbo), elbo, rtol=1e-10)
    np.testing.assert_allclose(float(fit.params["sigma"]), sigma, rtol=1e-8)
    np.testing.assert_allclose(np.asarray(fit.posteriors["w"].concentration), alpha, rtol=1e-8)
    np.testing.assert_allclose(np.asarray(fit.posteriors["mu"].loc), m, rtol=1e-8)
    np.testing.assert_allclose(np.asarray(fit.posteriors["mu"].scale) ** 2, v, rtol=1e-8)
    paths = fitter.m_step_paths(jnp.asarray(x))
    assert paths["sigma"].startswith("gradient (reaches site 'x', which reads global site 'mu'")
    assert paths["mu"] == "variational posterior (Normal prior)"


def test_weights_param_takes_em_closed_form_and_matches_numpy(x64):
    """A param whose factor reads no global site (mixture weights without prior)
    takes EM's closed form on q(z)'s marginals: the ascent matches numpy's."""
    x = _counts()
    w0, lam0 = np.array([0.3, 0.7]), np.array([2.0, 6.0])
    iters = 12
    fitter = VariationalBayesEM(poisson_weights_param, global_sites=("lam",))
    assert fitter.m_step_paths(jnp.asarray(x))["w"].startswith("closed-form")
    init = {"w": jnp.asarray(w0), "lam": jnp.asarray(lam0)}
    fit = fitter.run(
        jax.random.PRNGKey(0), jnp.asarray(x), max_iter=iters, tol=0.0, init_params=init
    )
    history, elbo, a, b, w = _numpy_poisson_weights(x, w0, lam0, iters)
    np.testing.assert_allclose(np.asarray(fit.history), history, rtol=1e-10)
    np.testing.assert_allclose(float(fit.elbo), elbo, rtol=1e-10)
    np.testing.assert_allclose(np.asarray(fit.params["w"]), w, rtol=1e-10)
    np.testing.assert_allclose(np.asarray(fit.posteriors["lam"].concentration), a, rtol=1e-10)
    np.testing.assert_allclose(np.asarray(fit.posteriors["lam"].rate), b, rtol=1e-10)


def _softplus_objective(fit, x):
    """The ELBO in rho (numpy), q(theta) and q(z) held at the fit's."""
    r = np.asarray(fit.latent_posteriors["z"])
    m, s = np.asarray(fit.posteriors["mu"].loc), np.asarray(fit.posteriors["mu"].scale)

    def elbo(rho):
        scale = np.logaddexp(0.0, rho)
        e_log = -0.5 * np.log(2 * np.pi * scale**2) - ((x[:, None] - m) ** 2 + s**2) / (
            2 * scale**2
        )
        return np.sum(r * e_log)

    return elbo, "rho"


def _prior_rate_objective(fit, x):
    """The ELBO in the prior's rate b (numpy): minus the KL of q(lam) from Gamma(2, b)."""
    a, b = np.asarray(fit.posteriors["lam"].concentration), np.asarray(fit.posteriors["lam"].rate)

    def elbo(log_b0):
        return -_kl_gamma(a, b, 2.0, np.exp(log_b0))

    return elbo, "b"


@pytest.mark.parametrize(
    "model, data, global_sites, objective, reason",
    [
        (gmm_softplus_scale, _reals, ("w", "mu"), _softplus_objective, "reads global site 'mu'"),
        (poisson_prior_rate, _counts, ("w", "lam"), _prior_rate_objective, "prior of global"),
    ],
    ids=["softplus-scale", "prior-rate"],
)
def test_gradient_path_param_is_the_elbo_maximizer(
    x64, model, data, global_sites, objective, reason
):
    """(b) The ELBO never decreases and the final param maximizes the ELBO in it
    with q held, as scipy.optimize finds it; converged holds."""
    x = data()
    fitter = VariationalBayesEM(model, global_sites=global_sites)
    fit = fitter.run(jax.random.PRNGKey(3), jnp.asarray(x), max_iter=300, tol=1e-12)
    history = np.asarray(fit.history)[: int(fit.num_iters)]
    assert np.all(np.diff(history) >= -1e-10 * np.abs(history[1:]))
    assert bool(fit.converged)
    elbo, name = objective(fit, x)
    found = minimize_scalar(lambda u: -elbo(u), bracket=(-3.0, 3.0), tol=1e-12).x
    value = float(fit.params[name])
    if name == "b":
        value = np.log(value)
    np.testing.assert_allclose(value, found, rtol=1e-6, atol=1e-8)
    assert reason in fitter.m_step_paths(jnp.asarray(x))[name]


def test_param_in_an_argument_read_in_expectation_is_an_error(x64):
    """(c) mu[z] + b: the expectation of the factor is not the factor of the
    selected moments; the error names the param, the site and the fixes."""

    def model(x):
        with numpyro.plate("components", 2):
            mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
        b = numpyro.param("b", 0.0)
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(jnp.ones(2) / 2))
            numpyro.sample("x", dist.Normal(mu[z] + b, 1.0), obs=x)

    with pytest.raises(
        ModelError,
        match=r"param 'b' reaches argument 'loc' of site 'x', which VariationalBayesEM takes "
        r"in expectation over global site 'mu'.*Make 'b' a global site",
    ):
        VariationalBayesEM(model, global_sites=("mu",)).run(
            jax.random.PRNGKey(0), jnp.asarray(_reals())
        )


def test_params_that_do_not_move_are_not_converged(x64):
    """The ELBO settles in q while the param's optimizer makes no progress (a zero
    learning rate): not converged, and the warning says why."""
    x = jnp.asarray(_reals())
    fitter = VariationalBayesEM(
        gmm_softplus_scale, global_sites=("w", "mu"), optimizer=optax.sgd(0.0)
    )
    with pytest.warns(ConvergenceWarning, match="not a stationary point of the ELBO"):
        fit = fitter.run(jax.random.PRNGKey(3), x, max_iter=300, tol=1e-8)
    assert int(fit.num_iters) < 300
    assert not bool(fit.converged)
    assert float(fit.params["rho"]) == 0.3
    assert abs(float(fit.gradient["rho"])) > 1.0


def test_a_fit_that_reaches_max_iter_says_so(x64):
    """Stopped by max_iter with the ELBO still changing by more than tol: not converged,
    and the warning names max_iter and tol."""
    x = jnp.asarray(_reals())
    fitter = VariationalBayesEM(gmm_softplus_scale, global_sites=("w", "mu"))
    with pytest.warns(ConvergenceWarning, match=r"reached max_iter=2 before .* tol=1e-12"):
        fit = fitter.run(jax.random.PRNGKey(3), x, max_iter=2, tol=1e-12)
    assert int(fit.num_iters) == 2
    assert not bool(fit.converged)
