"""VariationalBayesEM's conjugate pairs with a fixed count (Beta-Binomial,
Dirichlet-Multinomial), each against a hand-written numpy coordinate ascent
from the same start: the variational parameters and the ELBO (with the
Binomial / Multinomial coefficient) at every iteration."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from scipy.special import digamma, gammaln, logsumexp

import jaxem

jax.config.update("jax_enable_x64", True)

K, N_TRIALS, ITERS = 2, 10, 4


def _kl_dirichlet(a, a0):
    """KL(Dir(a) || Dir(a0)) over the last axis, summed over the rest."""
    a, a0 = np.broadcast_arrays(np.asarray(a, float), np.asarray(a0, float))
    sa, sa0 = a.sum(-1), a0.sum(-1)
    kl = (
        gammaln(sa)
        - gammaln(a).sum(-1)
        - gammaln(sa0)
        + gammaln(a0).sum(-1)
        + ((a - a0) * (digamma(a) - digamma(sa)[..., None])).sum(-1)
    )
    return float(np.sum(kl))


def _e_log_dirichlet(a):
    return digamma(a) - digamma(a.sum(-1, keepdims=True))


def _coordinate_ascent(log_lik_of, update_of, kl_of, q, iters):
    """VBEM by hand: ``log_lik_of(q) -> (N, K)`` expected log-densities plus
    E log w; ``update_of(r) -> q``; returns the ELBO at the start of each
    iteration and the final q."""
    history = []
    for _ in range(iters):
        log_rho = log_lik_of(q)
        history.append(float(logsumexp(log_rho, -1).sum()) - kl_of(q))
        r = np.exp(log_rho - logsumexp(log_rho, -1, keepdims=True))
        q = update_of(r)
    return np.array(history), q


def binomial_model(x):
    w = numpyro.sample("w", dist.Dirichlet(jnp.full(K, 1.5)))
    with numpyro.plate("c", K):
        p = numpyro.sample("p", dist.Beta(2.0, 3.0))
    with numpyro.plate("d", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Binomial(N_TRIALS, p[z]), obs=x)


def multinomial_model(x):
    w = numpyro.sample("w", dist.Dirichlet(jnp.full(K, 1.5)))
    with numpyro.plate("c", K):
        p = numpyro.sample("p", dist.Dirichlet(jnp.array([1.0, 2.0, 0.5])))
    with numpyro.plate("d", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Multinomial(N_TRIALS, p[z]), obs=x)


def _fit(model, x, init):
    fit = jaxem.VariationalBayesEM(model, global_sites=("w", "p"))
    return fit.run(jax.random.PRNGKey(0), jnp.asarray(x), max_iter=ITERS, tol=0.0, init_params=init)


def test_beta_binomial_matches_numpy_coordinate_ascent():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.binomial(N_TRIALS, 0.2, 25), rng.binomial(N_TRIALS, 0.7, 20)])
    x = x.astype(float)
    w_init, p_init = np.array([0.4, 0.6]), np.array([0.3, 0.6])
    n = N_TRIALS
    log_choose = gammaln(n + 1) - gammaln(x + 1) - gammaln(n - x + 1)

    def update(r):
        nk = r.sum(0)
        return 1.5 + nk, 2.0 + r.T @ x, 3.0 + r.T @ (n - x)

    def log_lik(q):
        alpha, a, b = q
        e_log_p, e_log_q = digamma(a) - digamma(a + b), digamma(b) - digamma(a + b)
        return (
            _e_log_dirichlet(alpha)
            + log_choose[:, None]
            + x[:, None] * e_log_p
            + (n - x)[:, None] * e_log_q
        )

    def kl(q):
        alpha, a, b = q
        ab = np.stack([a, b], -1)
        return _kl_dirichlet(alpha, np.full(K, 1.5)) + _kl_dirichlet(ab, np.array([2.0, 3.0]))

    # The start: the latents' exact posterior at init_params, then one VB-M-step.
    log_post = np.log(w_init) + log_choose[:, None] + x[:, None] * np.log(p_init)
    log_post = log_post + (n - x)[:, None] * np.log1p(-p_init)
    r0 = np.exp(log_post - logsumexp(log_post, -1, keepdims=True))
    history, (alpha, a, b) = _coordinate_ascent(log_lik, update, kl, update(r0), ITERS)

    result = _fit(binomial_model, x, {"w": jnp.asarray(w_init), "p": jnp.asarray(p_init)})
    assert isinstance(result.posteriors["p"], dist.Beta)
    assert isinstance(result.posteriors["w"], dist.Dirichlet)
    np.testing.assert_allclose(np.asarray(result.history), history, rtol=1e-10)
    np.testing.assert_allclose(np.asarray(result.q["w"][0]), alpha, rtol=1e-10)
    np.testing.assert_allclose(np.asarray(result.q["p"][0]), a, rtol=1e-10)
    np.testing.assert_allclose(np.asarray(result.q["p"][1]), b, rtol=1e-10)
    assert np.all(np.diff(history) >= -1e-9)


def test_dirichlet_multinomial_matches_numpy_coordinate_ascent():
    rng = np.random.default_rng(1)
    x = np.concatenate(
        [
            rng.multinomial(N_TRIALS, [0.7, 0.2, 0.1], 25),
            rng.multinomial(N_TRIALS, [0.1, 0.3, 0.6], 20),
        ]
    ).astype(float)
    w_init = np.array([0.5, 0.5])
    p_init = np.array([[0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    beta0 = np.array([1.0, 2.0, 0.5])
    log_coefficient = gammaln(N_TRIALS + 1) - gammaln(x + 1).sum(-1)

    def update(r):
        return 1.5 + r.sum(0), beta0 + r.T @ x

    def log_lik(q):
        alpha, beta = q
        return _e_log_dirichlet(alpha) + log_coefficient[:, None] + x @ _e_log_dirichlet(beta).T

    def kl(q):
        alpha, beta = q
        return _kl_dirichlet(alpha, np.full(K, 1.5)) + _kl_dirichlet(beta, beta0)

    log_post = np.log(w_init) + log_coefficient[:, None] + x @ np.log(p_init).T
    r0 = np.exp(log_post - logsumexp(log_post, -1, keepdims=True))
    history, (alpha, beta) = _coordinate_ascent(log_lik, update, kl, update(r0), ITERS)

    result = _fit(multinomial_model, x, {"w": jnp.asarray(w_init), "p": jnp.asarray(p_init)})
    assert isinstance(result.posteriors["p"], dist.Dirichlet)
    assert result.posteriors["p"].batch_shape == (K,)
    np.testing.assert_allclose(np.asarray(result.history), history, rtol=1e-10)
    np.testing.assert_allclose(np.asarray(result.q["w"][0]), alpha, rtol=1e-10)
    np.testing.assert_allclose(np.asarray(result.q["p"][0]), beta, rtol=1e-10)
    assert np.all(np.diff(history) >= -1e-9)


def test_binomial_probs_transformed_is_an_error():
    # E log of a transformed p is not a function of E log p: refused, naming p.
    def model(x):
        p = numpyro.sample("p", dist.Beta(2.0, 2.0))
        with numpyro.plate("d", x.shape[0]):
            numpyro.sample("x", dist.Binomial(N_TRIALS, 2.0 * p / (1.0 + p)), obs=x)

    with pytest.raises(jaxem.ModelError, match="'p'.*transformation"):
        jaxem.VariationalBayesEM(model, global_sites=("p",)).run(
            jax.random.PRNGKey(0), jnp.array([3.0, 4.0])
        )
