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
from scipy.special import digamma, gammaln, logsumexp, multigammaln
from scipy.stats import invwishart, multivariate_normal, wishart

import jaxem

# float64 in every test (the conftest fixture restores the setting afterwards; a
# module-level jax.config.update would switch it on for every test collected after).
pytestmark = pytest.mark.usefixtures("x64")

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


def _fit(model, x, init, site="p"):
    fit = jaxem.VariationalBayesEM(model, global_sites=("w", site))
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


# -- a Wishart prior on a precision, an InverseWishart prior on a covariance (known means)

MEANS = np.array([[-2.0, 0.0], [2.0, 0.5]])
PRIOR_SCALE = np.array([[2.0, 0.3], [0.3, 1.0]])
NU0 = 4.0


def wishart_model(x):
    w = numpyro.sample("w", dist.Dirichlet(jnp.full(K, 1.5)))
    with numpyro.plate("c", K):
        lam = numpyro.sample("lam", dist.Wishart(NU0, scale_matrix=jnp.asarray(PRIOR_SCALE)))
    with numpyro.plate("d", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        loc = jnp.asarray(MEANS)[z]
        numpyro.sample("x", dist.MultivariateNormal(loc, precision_matrix=lam[z]), obs=x)


def inverse_wishart_model(x):
    w = numpyro.sample("w", dist.Dirichlet(jnp.full(K, 1.5)))
    with numpyro.plate("c", K):
        cov = numpyro.sample("lam", dist.InverseWishart(NU0, jnp.asarray(PRIOR_SCALE)))
    with numpyro.plate("d", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        loc = jnp.asarray(MEANS)[z]
        numpyro.sample("x", dist.MultivariateNormal(loc, covariance_matrix=cov[z]), obs=x)


def _sum_digamma(nu, d):
    return sum(digamma(0.5 * (nu - i)) for i in range(d))


def _log_normalizer(nu, s, d):
    """The log-constant of a Wishart / InverseWishart density but its log|scale| term."""
    return -0.5 * nu * d * np.log(2.0) - multigammaln(0.5 * nu, d)


@pytest.mark.parametrize("inverse", [False, True], ids=["wishart", "inverse_wishart"])
def test_wishart_precision_and_inverse_wishart_covariance_match_numpy(inverse):
    rng = np.random.default_rng(2)
    d = 2
    x = np.concatenate(
        [
            rng.multivariate_normal(MEANS[0], [[1.0, 0.4], [0.4, 0.7]], 25),
            rng.multivariate_normal(MEANS[1], [[0.5, -0.2], [-0.2, 1.5]], 20),
        ]
    )
    diff = x[:, None, :] - MEANS[None]  # (N, K, d)
    outer = diff[..., :, None] * diff[..., None, :]
    w_init = np.array([0.5, 0.5])
    mat_init = np.array([[[1.0, 0.2], [0.2, 1.0]], [[0.8, 0.0], [0.0, 1.2]]])
    prior_inv = np.linalg.inv(PRIOR_SCALE)

    def update(r):
        scatter = np.einsum("nk,nkij->kij", r, outer)
        nu = NU0 + r.sum(0)
        # Wishart: W^-1 = W0^-1 + S; InverseWishart: Psi = Psi0 + S.
        s = PRIOR_SCALE + scatter if inverse else np.linalg.inv(prior_inv + scatter)
        return 1.5 + r.sum(0), nu, s

    def e_precision(q):
        _, nu, s = q
        # (E[precision], E log|precision|)
        if inverse:
            return nu[:, None, None] * np.linalg.inv(s), -(
                np.linalg.slogdet(s)[1] - _sum_digamma(nu, d) - d * np.log(2)
            )
        return nu[:, None, None] * s, np.linalg.slogdet(s)[1] + _sum_digamma(nu, d) + d * np.log(2)

    def log_lik(q):
        e_prec, e_logdet = e_precision(q)
        quad = np.einsum("nki,kij,nkj->nk", diff, e_prec, diff)
        return _e_log_dirichlet(q[0]) + 0.5 * e_logdet - 0.5 * d * np.log(2 * np.pi) - 0.5 * quad

    def kl(q):
        _, nu, s = q
        e_prec, e_logdet = e_precision(q)
        sign = 1.0 if inverse else -1.0
        # E_q log q - E_q log p, each: constant + (power) E log|M| - 1/2 tr(A E[precision-ish])
        log_q = _log_normalizer(nu, s, d) + sign * 0.5 * nu * np.linalg.slogdet(s)[1]
        log_p = (
            _log_normalizer(NU0, PRIOR_SCALE, d)
            + sign * 0.5 * NU0 * np.linalg.slogdet(PRIOR_SCALE)[1]
        )
        if inverse:  # E log|Sigma| = -e_logdet; tr(Psi E Sigma^-1)
            log_q = log_q + 0.5 * (nu + d + 1) * e_logdet - 0.5 * nu * d
            trace = np.einsum("ij,kji->k", PRIOR_SCALE, e_prec)
            log_p = log_p + 0.5 * (NU0 + d + 1) * e_logdet - 0.5 * trace
        else:
            log_q = log_q + 0.5 * (nu - d - 1) * e_logdet - 0.5 * nu * d
            trace = np.einsum("ij,kji->k", prior_inv, e_prec)
            log_p = log_p + 0.5 * (NU0 - d - 1) * e_logdet - 0.5 * trace
        return _kl_dirichlet(q[0], np.full(K, 1.5)) + float(np.sum(log_q - log_p))

    cov_init = mat_init if inverse else np.linalg.inv(mat_init)
    log_post = np.log(w_init) + np.stack(
        [multivariate_normal(MEANS[k], cov_init[k]).logpdf(x) for k in range(K)], -1
    )
    r0 = np.exp(log_post - logsumexp(log_post, -1, keepdims=True))
    history, (alpha, nu, s) = _coordinate_ascent(log_lik, update, kl, update(r0), ITERS)

    model = inverse_wishart_model if inverse else wishart_model
    result = _fit(model, x, {"w": jnp.asarray(w_init), "lam": jnp.asarray(mat_init)}, "lam")
    np.testing.assert_allclose(np.asarray(result.history), history, rtol=1e-10)
    np.testing.assert_allclose(np.asarray(result.q["w"][0]), alpha, rtol=1e-10)
    np.testing.assert_allclose(np.asarray(result.q["lam"][1]), s, rtol=1e-10)
    np.testing.assert_allclose(np.asarray(result.q["lam"][0])[:, 0, 0], nu, rtol=1e-10)
    assert np.all(np.diff(history) >= -1e-9)
    # The posterior is the NumPyro distribution of scipy's parametrization.
    posterior = result.posteriors["lam"]
    assert type(posterior) is (dist.InverseWishart if inverse else dist.Wishart)
    reference = invwishart if inverse else wishart
    point = np.array([[1.3, 0.1], [0.1, 0.9]])
    np.testing.assert_allclose(
        np.asarray(posterior.log_prob(jnp.asarray(point))),
        [reference(df=nu[k], scale=s[k]).logpdf(point) for k in range(K)],
        rtol=1e-10,
    )


def test_wishart_read_as_a_covariance_is_an_error():
    # A Wishart's expectations say nothing about E log MVN with covariance Lam^-1
    # written as a matrix inverse: refused, naming the site and the argument.
    def model(x):
        with numpyro.plate("c", K):
            lam = numpyro.sample("lam", dist.Wishart(NU0, scale_matrix=jnp.eye(2)))
        with numpyro.plate("d", x.shape[0]):
            cov = jnp.linalg.inv(lam[0])
            numpyro.sample("x", dist.MultivariateNormal(jnp.zeros(2), cov), obs=x)

    with pytest.raises(jaxem.ModelError, match="'lam' has a Wishart prior on a Multivariate"):
        jaxem.VariationalBayesEM(model, global_sites=("lam",)).run(
            jax.random.PRNGKey(0), jnp.zeros((3, 2))
        )


def test_improper_inverse_wishart_prior_is_an_error():
    # df 0.5 <= dimension - 1: no density, no q; refused before any fit.
    def model(x):
        with numpyro.plate("c", K):
            cov = numpyro.sample("cov", dist.InverseWishart(0.5, jnp.eye(2)))
        with numpyro.plate("d", x.shape[0]):
            numpyro.sample("x", dist.MultivariateNormal(jnp.zeros(2), cov[0]), obs=x)

    with pytest.raises(jaxem.ModelError, match=r"'cov' has an improper prior \(InverseWishart"):
        jaxem.VariationalBayesEM(model, global_sites=("cov",)).run(
            jax.random.PRNGKey(0), jnp.zeros((3, 2))
        )
