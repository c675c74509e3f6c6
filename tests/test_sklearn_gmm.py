"""Gaussian mixtures written as NumPyro models against scikit-learn ``GaussianMixture``.

From the same initial parameters, after the same number of EM iterations, jaxem and
scikit-learn must agree on the weights, means, covariances, the per-iteration
log-likelihood trace and the final log-likelihood (float64, relative 1e-6).
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from models import full_gmm, gmm_diag, gmm_scale_tril, normal_mixture
from numpyro.distributions import constraints
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

import jaxem
from jaxem import EM

NUM_ITERS = 25
REG_COVAR = 1e-6
RTOL = 1e-6


# --- models (module level so jit caches are shared between tests) -----------------------
# The full-covariance mixtures (full_gmm) and the univariate normal_mixture are shared with
# other modules (models.py).


gmm_covariance_matrix = full_gmm("covariance_matrix")
gmm_precision_matrix = full_gmm("precision_matrix")


def gmm_tied(x, K):
    D = x.shape[-1]
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    mu = numpyro.param("mu", jnp.zeros((K, D)))
    L = numpyro.param("L", jnp.eye(D), constraint=constraints.lower_cholesky)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.MultivariateNormal(mu[z], scale_tril=L), obs=x)


def gmm_spherical(x, K):
    D = x.shape[-1]
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    mu = numpyro.param("mu", jnp.zeros((K, D)))
    sigma = numpyro.param("sigma", jnp.ones(K), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Normal(mu[z], sigma[z][..., None]).to_event(1), obs=x)


# --- covariance parameterisations ------------------------------------------------------
# Each entry: (model, sklearn covariance_type,
#              jaxem init params from (weights, means, covariances (K, D, D)),
#              sklearn precisions_init from covariances (K, D, D),
#              jaxem fitted params -> sklearn's ``covariances_`` layout).


def _tril_init(w, mu, cov):
    return {"w": w, "mu": mu, "L": np.linalg.cholesky(cov)}


def _tied_init(w, mu, cov):
    return {"w": w, "mu": mu, "L": np.linalg.cholesky(cov[0])}


COVARIANCE_TYPES = {
    "full_scale_tril": (
        gmm_scale_tril,
        "full",
        _tril_init,
        lambda cov: np.linalg.inv(cov),
        lambda p: np.asarray(p["L"]) @ np.swapaxes(np.asarray(p["L"]), -1, -2),
    ),
    "full_covariance_matrix": (
        gmm_covariance_matrix,
        "full",
        lambda w, mu, cov: {"w": w, "mu": mu, "cov": cov},
        lambda cov: np.linalg.inv(cov),
        lambda p: np.asarray(p["cov"]),
    ),
    "full_precision_matrix": (
        gmm_precision_matrix,
        "full",
        lambda w, mu, cov: {"w": w, "mu": mu, "prec": np.linalg.inv(cov)},
        lambda cov: np.linalg.inv(cov),
        lambda p: np.linalg.inv(np.asarray(p["prec"])),
    ),
    "diag": (
        gmm_diag,
        "diag",
        lambda w, mu, cov: {
            "w": w,
            "mu": mu,
            "sigma": np.sqrt(np.diagonal(cov, axis1=-2, axis2=-1)),
        },
        lambda cov: 1.0 / np.diagonal(cov, axis1=-2, axis2=-1),
        lambda p: np.asarray(p["sigma"]) ** 2,
    ),
    "tied": (
        gmm_tied,
        "tied",
        _tied_init,
        lambda cov: np.linalg.inv(cov[0]),
        lambda p: np.asarray(p["L"]) @ np.asarray(p["L"]).T,
    ),
    "spherical": (
        gmm_spherical,
        "spherical",
        lambda w, mu, cov: {
            "w": w,
            "mu": mu,
            "sigma": np.sqrt(np.diagonal(cov, axis1=-2, axis2=-1).mean(-1)),
        },
        lambda cov: 1.0 / np.diagonal(cov, axis1=-2, axis2=-1).mean(-1),
        lambda p: np.asarray(p["sigma"]) ** 2,
    ),
}


def _synthetic_data(rng, N=240, D=2, K=3):
    centers = np.array([[0.0, 0.0], [4.0, 1.0], [1.0, 5.0]])[:K, :D]
    scales = [
        np.array([[1.0, 0.0], [0.6, 0.7]]),
        np.array([[0.5, 0.0], [-0.3, 1.2]]),
        np.eye(2) * 0.8,
    ]
    labels = rng.choice(K, size=N, p=[0.5, 0.3, 0.2][:K])
    eps = rng.standard_normal((N, D))
    return np.stack([centers[k] + scales[k][:D, :D] @ e for k, e in zip(labels, eps)])


def _initial_parameters(x, K, rng):
    """Deliberately rough start: data points as means, the pooled covariance, unequal weights."""
    N, D = x.shape
    w = np.arange(1, K + 1, dtype=np.float64)
    w = w / w.sum()
    mu = x[rng.choice(N, size=K, replace=False)]
    cov = np.broadcast_to(np.cov(x.T, bias=True).reshape(D, D), (K, D, D)).copy()
    # Different covariances per component (except in the tied model, which uses cov[0]).
    cov *= np.linspace(0.8, 1.2, K)[:, None, None]
    return w, mu, cov


def _fit_sklearn(x, K, covariance_type, w, mu, precisions):
    gm = GaussianMixture(
        K,
        covariance_type=covariance_type,
        max_iter=NUM_ITERS,
        tol=0.0,
        reg_covar=REG_COVAR,
        weights_init=w,
        means_init=mu,
        precisions_init=precisions,
        random_state=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gm.fit(x)
    assert gm.n_iter_ == NUM_ITERS
    return gm


def _compare(model, x, K, covariance_type, init_params, precisions_init, to_sklearn_cov, w, mu):
    N = x.shape[0]
    gm = _fit_sklearn(x, K, covariance_type, w, mu, precisions_init)

    em = EM(model)
    init = {name: jnp.asarray(value) for name, value in init_params.items()}
    result = em.run(
        jax.random.PRNGKey(0), jnp.asarray(x), K, max_iter=NUM_ITERS, tol=0.0, init_params=init
    )

    assert int(result.num_iters) == NUM_ITERS
    params = result.params
    for name, value in params.items():
        assert value.dtype == jnp.float64, name

    expected_ll = gm.score(x) * N
    np.testing.assert_allclose(np.asarray(params["w"]), gm.weights_, rtol=RTOL, atol=1e-10)
    np.testing.assert_allclose(
        np.asarray(params["mu"]).reshape(gm.means_.shape), gm.means_, rtol=RTOL, atol=1e-8
    )
    np.testing.assert_allclose(to_sklearn_cov(params), gm.covariances_, rtol=RTOL, atol=1e-8)
    np.testing.assert_allclose(
        float(jaxem.log_likelihood(model, params, jnp.asarray(x), K)), expected_ll, rtol=RTOL
    )
    np.testing.assert_allclose(float(result.log_likelihood), expected_ll, rtol=RTOL)

    # sklearn's lower bound of a GaussianMixture is the mean log-likelihood computed in the
    # E-step of each iteration, i.e. at the parameters *before* that iteration's update, which
    # is what jaxem's history records.
    history = np.asarray(result.history)
    assert history.shape == (NUM_ITERS,)
    np.testing.assert_allclose(history, np.asarray(gm.lower_bounds_) * N, rtol=RTOL)


@pytest.mark.parametrize("name", list(COVARIANCE_TYPES))
def test_synthetic_matches_sklearn(name, x64, rng):
    model, covariance_type, make_init, make_precisions, to_sklearn_cov = COVARIANCE_TYPES[name]
    K = 3
    x = _synthetic_data(rng, K=K)
    w, mu, cov = _initial_parameters(x, K, rng)
    _compare(
        model,
        x,
        K,
        covariance_type,
        make_init(w, mu, cov),
        make_precisions(cov),
        to_sklearn_cov,
        w,
        mu,
    )


@pytest.mark.parametrize("K", [2, 3])
def test_acidity_univariate_matches_sklearn(K, x64, load_csv):
    """Log acidity index of 155 lakes (mclust's ``acidity``), univariate Normal mixture."""
    x = load_csv("acidity.csv")[:, 0]
    w = np.full(K, 1.0 / K)
    mu = np.quantile(x, np.linspace(0.2, 0.8, K))
    sigma = np.full(K, 0.5)
    gm = _fit_sklearn(x[:, None], K, "diag", w, mu[:, None], 1.0 / sigma[:, None] ** 2)

    init = {"w": jnp.asarray(w), "mu": jnp.asarray(mu), "sigma": jnp.asarray(sigma)}
    result = EM(normal_mixture).run(
        jax.random.PRNGKey(0), jnp.asarray(x), K, max_iter=NUM_ITERS, tol=0.0, init_params=init
    )
    params = result.params
    np.testing.assert_allclose(np.asarray(params["w"]), gm.weights_, rtol=RTOL)
    np.testing.assert_allclose(np.asarray(params["mu"]), gm.means_[:, 0], rtol=RTOL)
    np.testing.assert_allclose(np.asarray(params["sigma"]) ** 2, gm.covariances_[:, 0], rtol=RTOL)
    np.testing.assert_allclose(
        float(result.log_likelihood), gm.score(x[:, None]) * x.shape[0], rtol=RTOL
    )
    np.testing.assert_allclose(
        float(jaxem.log_likelihood(normal_mixture, params, jnp.asarray(x), K)),
        gm.score(x[:, None]) * x.shape[0],
        rtol=RTOL,
    )


def test_npreg_bivariate_full_matches_sklearn(x64, load_csv):
    """Columns ``x`` and ``yn`` of flexmix's ``NPreg`` (two continuous variables), full cov."""
    x = load_csv("NPreg.csv", columns=("x", "yn"))
    K = 2
    w = np.array([0.4, 0.6])
    mu = np.array([[3.0, 20.0], [7.0, 35.0]])
    cov = np.broadcast_to(np.cov(x.T, bias=True), (K, 2, 2)).copy()
    _compare(
        gmm_scale_tril,
        x,
        K,
        "full",
        _tril_init(w, mu, cov),
        np.linalg.inv(cov),
        COVARIANCE_TYPES["full_scale_tril"][4],
        w,
        mu,
    )
