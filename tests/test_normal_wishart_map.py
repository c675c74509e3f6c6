"""MAP-EM with a joint Normal-Wishart prior on a MultivariateNormal's mean and precision.

``mu ~ MultivariateNormal(m0, precision_matrix=beta0 * lam)`` reads the
precision ``lam`` scaled (`jaxem.scaled_selection`): the M-step stays in closed
form for both sites. The reference is a scipy maximization (L-BFGS-B over logit
weights, free means and log-Cholesky factors) of the enumerated marginal written
out here plus the priors' log densities, in float64. The covariance spelling
(InverseWishart on ``Sigma``, ``covariance_matrix=Sigma / beta0``) likewise.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
import scipy.optimize
from jax.scipy.special import logsumexp

from jaxem import EM, OnlineEM

_RNG = np.random.default_rng(3)
X = np.concatenate(
    [
        _RNG.normal([2.0, 1.0], 0.6, size=(7, 2)),
        _RNG.normal([-1.5, -1.0], [0.5, 0.9], size=(6, 2)),
    ]
)
NU0, W0, BETA0, M0 = 5.0, np.array([[0.5, 0.1], [0.1, 0.4]]), 0.3, np.array([0.2, -0.1])
PSI0 = np.linalg.inv(W0)  # the InverseWishart's scale, for the covariance spelling


def _priors(spelling):
    """The precision (or covariance) site's prior and the mean's, given its value."""
    if spelling == "precision":
        return (
            dist.Wishart(NU0, scale_matrix=jnp.asarray(W0)),
            lambda lam: dist.MultivariateNormal(jnp.asarray(M0), precision_matrix=BETA0 * lam),
        )
    return (
        dist.InverseWishart(NU0, jnp.asarray(PSI0)),
        lambda sigma: dist.MultivariateNormal(jnp.asarray(M0), covariance_matrix=sigma / BETA0),
    )


def mixture(spelling):
    def model(x, K=2):
        matrix_prior, mean_prior = _priors(spelling)
        w = numpyro.sample("w", dist.Dirichlet(2.0 * jnp.ones(K)))
        with numpyro.plate("components", K):
            lam = numpyro.sample("lam", matrix_prior)
            mu = numpyro.sample("mu", mean_prior(lam))
        arg = "precision_matrix" if spelling == "precision" else "covariance_matrix"
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(w))
            numpyro.sample("x", dist.MultivariateNormal(mu[z], **{arg: lam[z]}), obs=x)

    return model


def _log_posterior(w0, mu, matrices, spelling):
    """The enumerated marginal, hand-written, plus the log priors (sampled coordinates)."""
    precisions = matrices if spelling == "precision" else jnp.linalg.inv(matrices)
    x = jnp.asarray(X)
    d = x[:, None, :] - mu[None]  # (N, K, D)
    quad = jnp.einsum("nkd,kde,nke->nk", d, precisions, d)
    logdet = jnp.linalg.slogdet(precisions)[1]
    w = jnp.stack([w0, 1 - w0])
    joint = jnp.log(w) + 0.5 * logdet - 0.5 * quad - jnp.log(2 * jnp.pi)
    matrix_prior, mean_prior = _priors(spelling)
    log_prior = (
        dist.Dirichlet(2.0 * jnp.ones(2)).log_prob(w)
        + matrix_prior.log_prob(matrices).sum()
        + mean_prior(matrices).log_prob(mu).sum()
    )
    return jnp.sum(logsumexp(joint, axis=1)) + log_prior


def _matrices(u):
    """Two SPD matrices from 6 unconstrained numbers (log-Cholesky)."""
    rows = u.reshape(2, 3)
    zero = jnp.zeros(2)
    tril = jnp.stack(
        [
            jnp.stack([jnp.exp(rows[:, 0]), zero], -1),
            jnp.stack([rows[:, 1], jnp.exp(rows[:, 2])], -1),
        ],
        -2,
    )
    return tril @ jnp.swapaxes(tril, -1, -2)


def _unconstrained(w, mu, matrices):
    tril = np.linalg.cholesky(np.asarray(matrices))
    chol = np.stack([np.log(tril[:, 0, 0]), tril[:, 1, 0], np.log(tril[:, 1, 1])], -1)
    return np.concatenate([[np.log(w[0] / w[1])], np.ravel(mu), np.ravel(chol)])


@functools.cache
def _scipy_map(spelling, start):
    def negative(u):
        return -_log_posterior(
            jax.nn.sigmoid(u[0]), u[1:5].reshape(2, 2), _matrices(u[5:]), spelling
        )

    value_and_grad = jax.jit(jax.value_and_grad(negative))

    def fun(u):
        value, grad = value_and_grad(jnp.asarray(u))
        return float(value), np.asarray(grad, np.float64)

    found = scipy.optimize.minimize(
        fun,
        np.asarray(start),
        jac=True,
        method="L-BFGS-B",
        options={"ftol": 1e-16, "gtol": 1e-12, "maxiter": 5000},
    )
    u = found.x
    return (
        float(jax.nn.sigmoid(u[0])),
        u[1:5].reshape(2, 2),
        np.asarray(_matrices(jnp.asarray(u[5:]))),
        -found.fun,
    )


@pytest.mark.parametrize(
    "spelling",
    # The covariance spelling's closed form is checked by the one-step mode formulas.
    ["precision", pytest.param("covariance", marks=pytest.mark.slow)],
)
def test_normal_wishart_map_em_is_closed_form_and_matches_scipy(spelling, x64):
    em = EM(mixture(spelling), global_sites=("w", "lam", "mu"), reg_covar=0.0)
    paths = em.m_step_paths(X)
    prior = "Wishart" if spelling == "precision" else "InverseWishart"
    assert paths["lam"].startswith(
        f"closed-form (conjugate prior: {prior} at site 'lam', Normal-{prior} with the mean "
        "at site 'mu'"
    ), paths["lam"]
    arg = "precision_matrix = 0.3" if spelling == "precision" else "covariance_matrix = 3.33333"
    assert f"at site 'mu' ({arg} * param)" in paths["lam"], paths["lam"]
    assert paths["mu"].startswith("closed-form (conjugate prior: MultivariateNormal"), paths["mu"]
    init = {
        "w": jnp.array([0.5, 0.5]),
        "mu": jnp.array([[1.0, 0.5], [-1.0, -0.5]]),
        "lam": jnp.stack([jnp.eye(2), jnp.eye(2)]),
    }
    result = em.run(jax.random.PRNGKey(0), X, init_params=init, max_iter=500, tol=1e-14)
    assert bool(result.converged)
    assert np.all(np.diff(result.history[: int(result.num_iters)]) > -1e-9)  # monotone
    p = result.params
    start = _unconstrained(p["w"], p["mu"], p["lam"])
    # Perturbed, so that scipy must climb to the mode itself.
    start = tuple(np.round(start + 0.05 * np.cos(np.arange(start.size)), 2))
    w0, mu, matrices, best = _scipy_map(spelling, start)
    np.testing.assert_allclose(p["w"][0], w0, rtol=1e-6)
    np.testing.assert_allclose(p["mu"], mu, rtol=1e-6)
    np.testing.assert_allclose(p["lam"], matrices, rtol=1e-6)
    np.testing.assert_allclose(result.log_posterior, best, rtol=1e-10)


def known_groups(spelling):
    """The pair with observed groups ``g`` (no latent): a precision shared by the
    groups (``beta0`` a constant array, not a literal: the chain takes it too), or
    a covariance per group."""

    def model(x, g):
        if spelling == "shared precision":
            lam = numpyro.sample("lam", dist.Wishart(NU0, scale_matrix=jnp.asarray(W0)))
            with numpyro.plate("components", 2):
                beta0 = jnp.asarray(BETA0)
                mean_prior = dist.MultivariateNormal(jnp.asarray(M0), precision_matrix=beta0 * lam)
                mu = numpyro.sample("mu", mean_prior)
            reading = {"precision_matrix": lam}
        else:
            with numpyro.plate("components", 2):
                sigma = numpyro.sample("lam", dist.InverseWishart(NU0, jnp.asarray(PSI0)))
                mean_prior = dist.MultivariateNormal(
                    jnp.asarray(M0), covariance_matrix=sigma / BETA0
                )
                mu = numpyro.sample("mu", mean_prior)
            reading = {"covariance_matrix": sigma[g]}
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", dist.MultivariateNormal(mu[g], **reading), obs=x)

    return model


@pytest.mark.parametrize("spelling", ["shared precision", "covariance"])
def test_normal_wishart_joint_mode_formulas_in_one_step(spelling, x64):
    """Known groups: one M-step from anywhere gives the joint mode, the
    Normal-(Inverse)Wishart posterior's: ``mu_k = (beta0 m0 + S1_k) / (beta0 +
    n_k)``; a precision shared by the groups ``lam^-1 = (S + W0^-1 + beta0 sum_k
    e_k e_k^T) / (n + K + nu0 - D - 1)`` (``e_k = mu_k - m0``: each mean's prior is
    one more observation of it); a covariance per group ``Sigma_k = (S_k + Psi +
    beta0 e_k e_k^T) / (n_k + nu0 + D + 2)``."""
    groups = np.array([0] * 7 + [1] * 6)
    em = EM(known_groups(spelling), global_sites=("lam", "mu"), reg_covar=0.0)
    prior = "Wishart" if spelling == "shared precision" else "InverseWishart"
    path = em.m_step_paths(X, groups)["lam"]
    assert f"Normal-{prior} with the mean at site 'mu'" in path, path
    matrix = 3.0 * jnp.eye(2)
    init = {"lam": matrix if prior == "Wishart" else jnp.stack([matrix, matrix])}
    init["mu"] = jnp.zeros((2, 2))
    state, _ = em.update(em.init(jax.random.PRNGKey(0), X, groups, init_params=init), X, groups)
    n = np.bincount(groups)
    mu = np.stack([(BETA0 * M0 + X[groups == k].sum(0)) / (BETA0 + n[k]) for k in range(2)])
    np.testing.assert_allclose(state.params["mu"], mu, rtol=1e-12)
    scatters = [
        (X[groups == k] - mu[k]).T @ (X[groups == k] - mu[k]) + BETA0 * np.outer(e, e)
        for k, e in enumerate(mu - M0)
    ]
    if prior == "Wishart":
        total = sum(scatters) + np.linalg.inv(W0)
        expected = np.linalg.inv(total / (len(X) + 2 + NU0 - 2 - 1))
    else:
        expected = np.stack([(s + PSI0) / (n[k] + NU0 + 2 + 2) for k, s in enumerate(scatters)])
    np.testing.assert_allclose(state.params["lam"], expected, rtol=1e-12)


def test_data_site_reading_a_scaled_precision_is_closed_form(x64):
    """Maximum likelihood with ``precision_matrix = 2 * lam``: each point counts
    once with its scatter doubled, ``lam^-1 = 2 sum x x^T / n``."""

    def scaled_data(x):
        lam = numpyro.param("lam", jnp.eye(2), constraint=dist.constraints.positive_definite)
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample(
                "x", dist.MultivariateNormal(jnp.zeros(2), precision_matrix=2.0 * lam), obs=x
            )

    ml = EM(scaled_data, reg_covar=0.0)
    assert "(precision_matrix = 2 * param)" in ml.m_step_paths(X)["lam"]
    state, _ = ml.update(ml.init(jax.random.PRNGKey(0), X), X)
    np.testing.assert_allclose(state.params["lam"], np.linalg.inv(2 * X.T @ X / len(X)), rtol=1e-12)


NOT_PROPORTIONAL = {
    "plus identity": lambda lam, beta0: BETA0 * lam + jnp.eye(2),
    "one factor per component": lambda lam, beta0: jnp.array([0.3, 0.6])[:, None, None] * lam,
    "factor from the data": lambda lam, beta0: beta0 * lam,
}


@pytest.mark.parametrize("spelling", list(NOT_PROPORTIONAL))
def test_mean_prior_not_proportional_to_the_precision_takes_gradient_steps(spelling, x64):
    """A mean's prior precision that is not one constant times the precision site
    (``beta0 * lam + I``; a factor per component; a factor passed as data, which
    the plan cannot read) is no Normal-Wishart prior: optax steps on Q + log prior,
    with the path saying why and how to spell the closed form."""

    def model(x, beta0, K=2):
        w = numpyro.sample("w", dist.Dirichlet(2.0 * jnp.ones(K)))
        with numpyro.plate("components", K):
            lam = numpyro.sample("lam", dist.Wishart(NU0, scale_matrix=jnp.asarray(W0)))
            prior_precision = NOT_PROPORTIONAL[spelling](lam, beta0)
            mu = numpyro.sample(
                "mu", dist.MultivariateNormal(jnp.asarray(M0), precision_matrix=prior_precision)
            )
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(w))
            numpyro.sample("x", dist.MultivariateNormal(mu[z], precision_matrix=lam[z]), obs=x)

    em = EM(model, global_sites=("w", "lam", "mu"))
    path = em.m_step_paths(X, jnp.asarray(BETA0))["lam"]
    assert path.startswith(
        "gradient (reaches MultivariateNormal.precision_matrix at site 'mu' through operations "
        "other than indexing"
    ), path
    assert "precision_matrix=beta0 * lam with a constant beta0 > 0" in path, path


def test_online_map_em_counts_the_mean_prior_once_for_the_data_set(x64):
    """OnlineEM(num_data=N): the mean's prior, read by the precision's closed form,
    weighs 1 / N against the running statistics per data point, like the prior's
    pseudo-statistics. One step (step size 1, from zero statistics) on a minibatch
    of B = N / 2 points is then batch MAP-EM's step on the minibatch twice over."""
    batch = X[:7]
    init = {
        "w": jnp.array([0.6, 0.4]),
        "mu": jnp.array([[1.0, 0.5], [-1.0, -0.5]]),
        "lam": jnp.stack([jnp.eye(2), 2.0 * jnp.eye(2)]),
    }
    names = ("w", "lam", "mu")
    online = OnlineEM(
        mixture("precision"), global_sites=names, num_data=2 * len(batch), reg_covar=0.0
    )
    state, _ = online.update(online.init(jax.random.PRNGKey(0), batch, init_params=init), batch)
    em = EM(mixture("precision"), global_sites=names, reg_covar=0.0)
    twice = np.concatenate([batch, batch])
    expected, _ = em.update(em.init(jax.random.PRNGKey(0), twice, init_params=init), twice)
    for name in names:
        np.testing.assert_allclose(state.params[name], expected.params[name], rtol=1e-10)
