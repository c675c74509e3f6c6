"""M-step paths: closed form, gradient (optax), frozen, and hard EM as K-means.

References: the closed-form path against the gradient path at convergence, a mixture of
regressions (one gradient and two closed-form parameters) against scipy.optimize on a
marginal likelihood written in numpy, frozen parameters against a hand-written update,
and hard EM with a fixed isotropic variance against scikit-learn's ``KMeans``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from models import gmm_diag, gmm_scale_tril, normal_mixture, poisson_mixture
from numpyro.distributions import constraints
from scipy import optimize, stats
from scipy.special import log_softmax, logsumexp, softmax
from sklearn.cluster import KMeans

import jaxem
from jaxem import EM


def regression_mix(X, y, K):
    P = X.shape[-1]
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    beta = numpyro.param("beta", jnp.zeros((K, P)))
    sigma = numpyro.param("sigma", jnp.ones(K), constraint=constraints.positive)
    with numpyro.plate("data", y.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        loc = jnp.sum(X * beta[z], axis=-1)  # row-wise X @ beta[z]: not a selection of beta
        numpyro.sample("y", dist.Normal(loc, sigma[z]), obs=y)


def kmeans_model(x, K):
    D = x.shape[-1]
    mu = numpyro.param("mu", jnp.zeros((K, D)))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(jnp.ones(K) / K))
        numpyro.sample("x", dist.Normal(mu[z], 1.0).to_event(1), obs=x)


# --- closed form and gradient reach the same optimum -------------------------------------------


def _poisson_case(rng):
    z = rng.choice(3, size=200, p=[0.3, 0.4, 0.3])
    x = rng.poisson(np.array([1.0, 6.0, 15.0])[z]).astype(np.float64)
    return (
        poisson_mixture,
        x,
        3,
        {"w": np.array([0.4, 0.3, 0.3]), "rate": np.array([2.0, 5.0, 10.0])},
    )


def _normal_case(rng):
    z = rng.choice(2, size=200, p=[0.4, 0.6])
    x = rng.normal(np.array([-2.0, 2.0])[z], np.array([0.7, 1.2])[z])
    return (
        normal_mixture,
        x,
        2,
        {"w": np.array([0.5, 0.5]), "mu": np.array([-1.0, 1.0]), "sigma": np.array([1.5, 1.5])},
    )


@pytest.mark.parametrize("make_case", [_poisson_case, _normal_case], ids=["poisson", "normal"])
def test_closed_form_and_gradient_agree(make_case, x64, rng):
    model, x, K, init = make_case(rng)
    x = jnp.asarray(x)
    init = {k: jnp.asarray(v) for k, v in init.items()}
    key = jax.random.PRNGKey(0)

    closed = EM(model)
    paths = closed.m_step_paths(x, K)
    assert all(paths[name].startswith("closed-form") for name in init), paths
    gradient = EM(model, m_step="gradient")
    assert all(p.startswith("gradient") for p in gradient.m_step_paths(x, K).values())

    r_closed = closed.run(key, x, K, max_iter=300, tol=1e-11, init_params=init)
    r_grad = gradient.run(key, x, K, max_iter=300, tol=1e-11, init_params=init)
    assert bool(r_closed.converged) and bool(r_grad.converged)
    np.testing.assert_allclose(
        float(r_grad.log_likelihood), float(r_closed.log_likelihood), rtol=1e-5
    )
    for name in init:
        np.testing.assert_allclose(
            np.asarray(r_grad.params[name]),
            np.asarray(r_closed.params[name]),
            rtol=1e-3,
            atol=1e-4,
            err_msg=name,
        )


# --- mixed closed-form / gradient (ECM) against scipy.optimize ---------------------------------


def _regression_marginal_nll(theta, X, y, K):
    P = X.shape[1]
    logits, beta, log_sigma = theta[:K], theta[K : K + K * P].reshape(K, P), theta[K + K * P :]
    log_w = log_softmax(logits)
    comp = stats.norm.logpdf(y[:, None], X @ beta.T, np.exp(log_sigma))  # (N, K)
    return -logsumexp(log_w + comp, axis=1).sum()


def test_mixture_of_regressions_matches_scipy(x64, load_csv):
    """flexmix's NPreg: ``yn ~ x + x^2`` with two latent classes (Leisch 2004)."""
    data = load_csv("NPreg.csv", columns=("x", "yn"))
    X = np.stack([np.ones(len(data)), data[:, 0], data[:, 0] ** 2], axis=1)
    y = data[:, 1]
    K = 2
    init = {
        "w": np.array([0.5, 0.5]),
        "beta": np.array([[2.0, 3.0, 0.2], [10.0, 8.0, -0.5]]),
        "sigma": np.array([5.0, 5.0]),
    }

    em = EM(regression_mix)
    paths = em.m_step_paths(jnp.asarray(X), jnp.asarray(y), K)
    assert paths["beta"].startswith("closed-form (Normal.loc at site 'y' (affine"), paths
    assert paths["sigma"].startswith("closed-form"), paths
    assert paths["w"].startswith("closed-form"), paths

    result = em.run(
        jax.random.PRNGKey(0),
        jnp.asarray(X),
        jnp.asarray(y),
        K,
        max_iter=400,
        tol=1e-12,
        init_params={k: jnp.asarray(v) for k, v in init.items()},
    )
    assert not bool(result.diverged)
    history = np.asarray(result.history)[: int(result.num_iters)]
    assert np.all(np.diff(history) >= -1e-9 * np.abs(history[1:]))

    theta0 = np.concatenate([np.log(init["w"]), init["beta"].ravel(), np.log(init["sigma"])])
    opt = optimize.minimize(
        _regression_marginal_nll,
        theta0,
        args=(X, y, K),
        method="L-BFGS-B",
        options={"gtol": 1e-10, "ftol": 1e-15, "maxiter": 5000},
    )
    assert opt.success, opt.message
    P = X.shape[1]
    expected = {
        "w": softmax(opt.x[:K]),
        "beta": opt.x[K : K + K * P].reshape(K, P),
        "sigma": np.exp(opt.x[K + K * P :]),
    }
    np.testing.assert_allclose(float(result.log_likelihood), -opt.fun, rtol=1e-7)
    np.testing.assert_allclose(
        float(
            jaxem.log_likelihood(regression_mix, result.params, jnp.asarray(X), jnp.asarray(y), K)
        ),
        -opt.fun,
        rtol=1e-7,
    )
    for name, value in expected.items():
        np.testing.assert_allclose(
            np.asarray(result.params[name]), value, rtol=1e-4, atol=1e-4, err_msg=name
        )


# --- frozen parameters ------------------------------------------------------------------------


def test_frozen_params_stay_put(x64, rng):
    _, x, K, init = _normal_case(rng)
    x = jnp.asarray(x)
    init = {k: jnp.asarray(v) for k, v in init.items()}
    em = EM(normal_mixture, frozen=("mu",))
    assert em.m_step_paths(x, K)["mu"].startswith("frozen")

    state = em.init(jax.random.PRNGKey(0), x, K, init_params=init)
    state, _ = em.update(state, x, K)
    one_step = em.get_params(state)
    assert np.array_equal(np.asarray(one_step["mu"]), np.asarray(init["mu"]))

    # The other parameters take the exact EM update given the fixed means.
    xs, mu, sigma, w = (
        np.asarray(x),
        np.asarray(init["mu"]),
        np.asarray(init["sigma"]),
        np.asarray(init["w"]),
    )
    log_joint = np.log(w) + stats.norm.logpdf(xs[:, None], mu, sigma)
    resp = np.exp(log_joint - logsumexp(log_joint, axis=1, keepdims=True))
    nk = resp.sum(0)
    np.testing.assert_allclose(np.asarray(one_step["w"]), nk / len(xs), rtol=1e-10)
    variance = (resp * (xs[:, None] - mu) ** 2).sum(0) / nk + 1e-6  # reg_covar
    np.testing.assert_allclose(np.asarray(one_step["sigma"]) ** 2, variance, rtol=1e-10)

    result = em.run(jax.random.PRNGKey(0), x, K, max_iter=20, tol=0.0, init_params=init)
    assert np.array_equal(np.asarray(result.params["mu"]), np.asarray(init["mu"]))
    assert not np.allclose(np.asarray(result.params["sigma"]), np.asarray(init["sigma"]))


# --- hard EM with fixed uniform weights and unit variance is K-means ----------------------------


def _blobs(rng):
    centers = np.array([[0.0, 0.0], [5.0, 0.5], [2.0, 4.5]])
    labels = rng.choice(3, size=150)
    return centers[labels] + rng.normal(scale=0.9, size=(150, 2))


@pytest.mark.parametrize("num_iters", [2, 40])
def test_hard_em_is_kmeans(num_iters, x64):
    x = _blobs(np.random.default_rng(7))
    K = 3
    start = x[[0, 1, 2]].copy()  # three points, far from the final centres
    km = KMeans(
        n_clusters=K, init=start, n_init=1, algorithm="lloyd", max_iter=num_iters, tol=0.0
    ).fit(x)
    converged = KMeans(
        n_clusters=K, init=start, n_init=1, algorithm="lloyd", max_iter=200, tol=0.0
    ).fit(x)
    if num_iters == 2:
        # Not yet at the fixed point, so this checks the iterates themselves.
        assert not np.allclose(km.cluster_centers_, converged.cluster_centers_, atol=1e-3)

    em = EM(kmeans_model, hard=True)
    result = em.run(
        jax.random.PRNGKey(0),
        jnp.asarray(x),
        K,
        max_iter=num_iters,
        tol=0.0,
        init_params={"mu": jnp.asarray(start)},
    )
    centers = np.asarray(result.params["mu"])
    np.testing.assert_allclose(centers, km.cluster_centers_, rtol=1e-10, atol=1e-10)
    labels = np.argmax(
        np.asarray(jaxem.posterior(kmeans_model, result.params, jnp.asarray(x), K)["z"]), axis=-1
    )
    np.testing.assert_array_equal(labels, km.labels_)


@pytest.mark.parametrize("cov", ["diag", "full"])
def test_float32_far_tight_clusters(cov, x32):
    """The closed-form scale and the diagonal-Normal density expand sums of squares
    into matmuls after shifting by the data mean. Two tight clusters (sd 0.1, 0.2) at
    +-500 put the expansion's float32 rounding (~eps * 500^2 / 0.1^2, above 1) far past
    its guards, which must switch to the residuals: one EM step matches float64 numpy."""
    rng = np.random.default_rng(3)
    centers = np.array([[500.0, -500.0], [-500.0, 500.0]])
    labels = np.repeat([0, 1], 400)
    x = centers[labels] + rng.normal(size=(800, 2)) * np.array([0.1, 0.2])
    K = 2
    init = {"w": jnp.full(K, 0.5), "mu": jnp.asarray(centers, jnp.float32)}
    model = gmm_diag if cov == "diag" else gmm_scale_tril
    if cov == "diag":
        init["sigma"] = jnp.ones((K, 2))
    else:
        init["L"] = jnp.broadcast_to(jnp.eye(2), (K, 2, 2))
    data = jnp.asarray(x, jnp.float32)
    # The E-step's density: the log-likelihood at the start, against scipy in float64.
    start = float(jaxem.log_likelihood(model, init, data, K))
    expected_start = np.sum(
        logsumexp([np.log(0.5) + stats.norm(c, 1.0).logpdf(x).sum(-1) for c in centers], axis=0)
    )
    np.testing.assert_allclose(start, expected_start, rtol=1e-6)
    # After one step the responsibilities are hard (to exp(-1e5)): per-cluster moments.
    result = EM(model).run(jax.random.PRNGKey(0), data, K, max_iter=1, tol=0.0, init_params=init)
    for k in range(K):
        points = x[labels == k]
        np.testing.assert_allclose(result.params["mu"][k], points.mean(0), rtol=1e-6)
        if cov == "diag":
            np.testing.assert_allclose(result.params["sigma"][k], points.std(0), rtol=1e-4)
        else:
            L = np.asarray(result.params["L"][k], np.float64)
            expected = np.cov(points.T, bias=True)
            np.testing.assert_allclose(L @ L.T, expected, rtol=1e-3, atol=1e-6)
