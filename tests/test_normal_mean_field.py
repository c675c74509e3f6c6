"""Variational Bayes EM with independent priors on a Normal's mean and precision.

``mu ~ Normal(m0, s0)``, ``tau ~ Gamma(a0, b0)`` (or ``v ~ InverseGamma(a0, b0)``
on the variance), ``x ~ Normal(mu[z], 1 / sqrt(tau[z]))``: mean field q(mu) q(tau),
each factor in closed form (`jaxem.normal_mean_field`). Checked against coordinate
ascent written out by hand in numpy from the same initial responsibilities, and the
ELBO against a Monte Carlo estimate.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from scipy.special import digamma, gammaln, logsumexp
from scipy.stats import norm

from jaxem import VariationalBayesEM
from jaxem.exceptions import ModelError

ALPHA0, M0, S0, A0, B0 = 0.8, 0.3, 2.0, 2.5, 1.5
START = {"w": [0.5, 0.5], "mu": [-1.0, 1.0], "tau": [1.0, 0.5]}


def _data():
    rng = np.random.default_rng(0)
    return np.concatenate([rng.normal(-2.0, 0.5, 12), rng.normal(2.0, 1.5, 14)])


def mixture(x, mu_known=None, K=2, kind="precision"):
    """``kind``: "precision" (Gamma on tau[z]), "variance" (InverseGamma on v[z]),
    "tied" (one Gamma precision for both components); ``mu_known``: the means
    given, not global sites."""
    w = numpyro.sample("w", dist.Dirichlet(ALPHA0 * jnp.ones(K)))
    mu = mu_known
    if mu is None:
        mu = numpyro.sample("mu", dist.Normal(M0, S0).expand([K]).to_event(1))
    if kind == "variance":
        v = numpyro.sample("v", dist.InverseGamma(A0, B0).expand([K]).to_event(1))
    else:
        shape = [] if kind == "tied" else [K]
        tau = numpyro.sample("tau", dist.Gamma(A0, B0).expand(shape).to_event(len(shape)))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        scale = {
            "variance": lambda: jnp.sqrt(v[z]),
            "tied": lambda: 1 / jnp.sqrt(tau),
        }.get(kind, lambda: 1 / jnp.sqrt(tau[z]))()
        numpyro.sample("x", dist.Normal(mu[z], scale), obs=x)


def _kl_gamma(a, b, a0, b0):
    return (
        (a - a0) * digamma(a)
        - gammaln(a)
        + gammaln(a0)
        + a0 * (np.log(b) - np.log(b0))
        + a * (b0 - b) / b
    )


class NumpyCAVI:
    """Coordinate ascent written out: q(z), then q(w) and q(mu) given q(tau), then
    q(tau) given the new q(mu). Gamma(a, b) on the precision and InverseGamma(a, b)
    on the variance give the same numbers (1 / v ~ Gamma(a, b))."""

    def __init__(self, x, kind, mu_known=None):
        self.x, self.tied, self.known = x, kind == "tied", mu_known

    def m_step(self, r, e_tau):
        """``(alpha, m, s2, a, b)`` from responsibilities ``r`` and E[tau] (per
        component, or one number if tied)."""
        x, n = self.x, r.sum(0)
        if self.known is None:
            precision = 1 / S0**2 + e_tau * n
            m = (M0 / S0**2 + e_tau * (r.T @ x)) / precision
            s2 = 1 / precision
        else:
            m, s2 = self.known, np.zeros(2)
        weighted = r * ((x[:, None] - m) ** 2 + s2)
        if self.tied:
            a, b = A0 + 0.5 * n.sum(), B0 + 0.5 * weighted.sum()
        else:
            a, b = A0 + 0.5 * n, B0 + 0.5 * weighted.sum(0)
        return ALPHA0 + n, m, s2, a, b

    def start(self, w, mu, tau):
        """The responsibilities at a point, then the M-step at the prior's E[tau]."""
        mu = self.known if self.known is not None else mu
        log_r = np.log(w) + norm.logpdf(self.x[:, None], mu, 1 / np.sqrt(tau))
        r = np.exp(log_r - logsumexp(log_r, 1, keepdims=True))
        return self.m_step(r, A0 / B0)

    def responsibilities(self, q):
        """``(q(z), log Z)``: q(z) optimal for q(theta) and its normalizers."""
        alpha, m, s2, a, b = q
        e_log_w = digamma(alpha) - digamma(alpha.sum())
        e_log_tau, e_tau = digamma(a) - np.log(b), a / b
        square = (self.x[:, None] - m) ** 2 + s2
        log_r = e_log_w + 0.5 * e_log_tau - 0.5 * np.log(2 * np.pi) - 0.5 * e_tau * square
        log_z = logsumexp(log_r, axis=1)
        return np.exp(log_r - log_z[:, None]), log_z

    def step(self, q):
        """``(ELBO at q, next q)``."""
        alpha, m, s2, a, b = q
        r, log_z = self.responsibilities(q)
        kl = float(dist.kl_divergence(dist.Dirichlet(alpha), dist.Dirichlet(ALPHA0 * np.ones(2))))
        kl += np.sum(_kl_gamma(a, b, A0, B0))
        if self.known is None:
            kl += np.sum(np.log(S0 / np.sqrt(s2)) + (s2 + (m - M0) ** 2) / (2 * S0**2) - 0.5)
        return log_z.sum() - kl, self.m_step(r, a / b)


ITERS = 8
_FITS: dict = {}


def _fit(kind):
    """``(fit, scale site, numpy reference, its q after each iteration, its ELBOs)``
    for ``ITERS`` iterations from ``START`` (computed once per kind)."""
    if kind not in _FITS:
        known = np.array([-1.5, 1.0]) if kind.endswith("known_mean") else None
        model_kind = kind.removesuffix("_known_mean")
        scale_site = "v" if model_kind == "variance" else "tau"
        sites = ("w", scale_site) + (() if known is not None else ("mu",))
        tau = np.array(START["tau"]) if model_kind != "tied" else np.array(0.7)
        start = {"w": START["w"], "mu": START["mu"]}
        start[scale_site] = 1 / tau if model_kind == "variance" else tau
        start = {k: jnp.asarray(v) for k, v in start.items() if k in sites}
        vb = VariationalBayesEM(
            lambda x: mixture(x, None if known is None else jnp.asarray(known), kind=model_kind),
            global_sites=sites,
        )
        fit = vb.run(
            jax.random.PRNGKey(0), jnp.asarray(_data()), init_params=start, max_iter=ITERS, tol=0
        )
        ref = NumpyCAVI(_data(), model_kind, known)
        qs, elbos = [ref.start(np.array(START["w"]), np.array(START["mu"]), tau)], []
        for _ in range(ITERS):
            elbo, q = ref.step(qs[-1])
            qs.append(q)
            elbos.append(elbo)
        _FITS[kind] = fit, scale_site, ref, qs, elbos
    return _FITS[kind]


@pytest.mark.xdist_group("normal_mean_field")
@pytest.mark.parametrize(
    "kind",
    [
        "precision",
        "variance",
        "variance_known_mean",
        # One precision for every component: the same path, deselected by default (CI).
        pytest.param("tied", marks=pytest.mark.slow),
    ],
)
def test_mean_field_matches_hand_written_cavi(kind, x64):
    """The ELBO at every iteration and q(w), q(mu), q(tau) (or q(v)) at the end equal
    the numpy coordinate ascent from the same initial responsibilities."""
    fit, scale_site, ref, qs, elbos = _fit(kind)
    np.testing.assert_allclose(fit.history, elbos, rtol=1e-10)
    alpha, m, s2, a, b = qs[-1]
    np.testing.assert_allclose(fit.q["w"][0], alpha, rtol=1e-10)
    np.testing.assert_allclose(fit.q[scale_site][0], a, rtol=1e-10)
    np.testing.assert_allclose(fit.q[scale_site][1], b, rtol=1e-10)
    family = dist.InverseGamma if scale_site == "v" else dist.Gamma
    assert type(fit.posteriors[scale_site]) is family
    if ref.known is None:
        np.testing.assert_allclose(fit.q["mu"][0], m, rtol=1e-10)
        np.testing.assert_allclose(fit.q["mu"][1], np.sqrt(s2), rtol=1e-10)
        assert type(fit.posteriors["mu"]) is dist.Normal
    np.testing.assert_allclose(fit.latent_posteriors["z"], ref.responsibilities(qs[-1])[0])


@pytest.mark.xdist_group("normal_mean_field")
def test_mean_field_elbo_monotone_and_equal_to_monte_carlo(x64):
    """The ELBO never decreases over the run, and equals a Monte Carlo estimate of
    E_q[log p(x, z, theta) - log q]: (w, mu, tau) drawn independently from q,
    densities from scipy, the latents summed exactly under q(z)."""
    from scipy.stats import dirichlet, gamma

    fit = _fit("precision")[0]
    history = np.asarray(fit.history[: int(fit.num_iters)])
    assert np.all(np.diff(history) >= -1e-9 * np.abs(history[1:]))
    assert history[-1] <= float(fit.elbo) + 1e-9 * abs(float(fit.elbo))
    assert float(fit.elbo) - history[0] > 1.0  # it moved

    draws, rng = 400, np.random.default_rng(5)
    (alpha,), (a, b), (m, s) = (tuple(map(np.asarray, fit.q[k])) for k in ("w", "tau", "mu"))
    w = rng.dirichlet(alpha, size=draws)
    tau = rng.gamma(a, 1 / b, size=(draws, 2))
    mu = rng.normal(m, s, size=(draws, 2))
    x = _data()
    r = np.asarray(fit.latent_marginals["x"])  # shaped like the site's factor: (K, N)
    log_x = norm.logpdf(x[None, None, :], mu[:, :, None], 1 / np.sqrt(tau[:, :, None]))
    values = np.sum(r[None] * (log_x + np.log(w)[:, :, None]), axis=(1, 2))
    values += dirichlet.logpdf(w.T, ALPHA0 * np.ones(2)) - dirichlet.logpdf(w.T, alpha)
    values += np.sum(gamma.logpdf(tau, A0, scale=1 / B0) - gamma.logpdf(tau, a, scale=1 / b), 1)
    values += np.sum(norm.logpdf(mu, M0, S0) - norm.logpdf(mu, m, s), 1)
    estimate = values.mean() + float(fit.latent_entropy)
    se = values.std(ddof=1) / np.sqrt(draws)
    assert abs(estimate - float(fit.elbo)) < 3 * se + 1e-9


def _variant(kind):
    def model(x, K=2):
        mu = numpyro.sample("mu", dist.Normal(M0, S0).expand([K]).to_event(1))
        tau = numpyro.sample("tau", dist.Gamma(A0, B0).expand([K]).to_event(1))
        if kind == "two_precisions":
            tau2 = numpyro.sample("tau2", dist.Gamma(A0, B0).expand([K]).to_event(1))
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(jnp.ones(K) / K))
            numpyro.sample("x", dist.Normal(mu[z], 1 / jnp.sqrt(tau[z])), obs=x)
            if kind == "two_precisions":
                numpyro.sample("y", dist.Normal(mu[z], 1 / jnp.sqrt(tau2[z])), obs=x)
            else:  # the mean also read with a known scale
                numpyro.sample("y", dist.Normal(mu[z], 1.0), obs=x)

    return model


@pytest.mark.parametrize(
    "kind, sites, match",
    [
        (
            "two_precisions",
            ("mu", "tau", "tau2"),
            r"read the mean 'mu' with the precision 'tau' and 'mu' with 'tau2'",
        ),
        ("known_scale_too", ("mu", "tau"), r"site 'y' reads global site 'mu' in a way"),
    ],
)
def test_mean_field_unsupported_spelling_names_sites(kind, sites, match, x64):
    with pytest.raises(ModelError, match=match + r".*mu ~ dist.Normal\(m0, s0\)"):
        VariationalBayesEM(_variant(kind), global_sites=sites).run(
            jax.random.PRNGKey(0), jnp.asarray(_data())
        )


def test_variance_prior_wrong_spelling_names_supported_ones(x64):
    """An InverseGamma prior reaching a Normal's scale other than as sqrt(v[z])."""

    def model(x, K=2):
        v = numpyro.sample("v", dist.InverseGamma(A0, B0).expand([K]).to_event(1))
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(jnp.ones(K) / K))
            numpyro.sample("x", dist.Normal(jnp.zeros(K)[z], v[z]), obs=x)

    match = r"'v' has an InverseGamma prior and reaches the 'scale'.*scale=jnp.sqrt\(v\[z\]\)"
    with pytest.raises(ModelError, match=match):
        VariationalBayesEM(model, global_sites=("v",)).run(
            jax.random.PRNGKey(0), jnp.asarray(_data())
        )


@pytest.mark.parametrize("pair", ["mean_field", "normal_gamma"])
def test_scaled_site_reading_a_pair_is_an_error(pair, x64):
    """The expected factors are written unscaled: a scaled site reading a (mean,
    precision) pair would be fitted as if unweighted (it was, silently)."""

    def model(x):
        tau = numpyro.sample("tau", dist.Gamma(A0, B0))
        mean_scale = 1 / jnp.sqrt(0.5 * tau) if pair == "normal_gamma" else S0
        mu = numpyro.sample("mu", dist.Normal(M0, mean_scale))
        with numpyro.plate("data", x.shape[0]), numpyro.handlers.scale(scale=3.0):
            numpyro.sample("x", dist.Normal(mu, 1 / jnp.sqrt(tau)), obs=x)

    with pytest.raises(ModelError, match=r"does not support scaled sites.*site 'x'"):
        VariationalBayesEM(model, global_sites=("mu", "tau")).run(
            jax.random.PRNGKey(0), jnp.asarray(_data())
        )
