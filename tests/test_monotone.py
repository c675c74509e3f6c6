"""Exact EM never decreases the log-likelihood, over a zoo of mixture models.

Each zoo entry also carries a scipy.stats version of its marginal log-likelihood, so the
first history entry and the final log-likelihood are checked against an independent value,
and the fit must move far from its starting point (a test that cannot fail is no test).
The latent class model on the real ``carcinoma`` data is compared with a numpy EM run to
convergence and with poLCA's published maxima (-317.2568 for 2 classes, -293.705 for 3).
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from models import gmm_scale_tril, latent_class, normal_mixture, poisson_mixture
from numpyro.distributions import constraints
from scipy import stats
from scipy.special import logsumexp, xlog1py, xlogy

import jaxem
from jaxem import EM

MAX_ITER = 30


# --- the zoo: module-level models, data, deliberately poor starting points, scipy density ---
# (the normal, mvn, poisson and latent class models are shared with other modules: models.py)


def binomial_mix(x, K):
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    p = numpyro.param("p", jnp.full(K, 0.5), constraint=constraints.unit_interval)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Binomial(total_count=10, probs=p[z]), obs=x)


def categorical_mix(x, K):
    # x: (N, J) answers in {0..C-1} to J items
    J, C = x.shape[-1], 4
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    theta = numpyro.param("theta", jnp.ones((K, J, C)) / C, constraint=constraints.simplex)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Categorical(probs=theta[z]).to_event(1), obs=x)


def exponential_mix(x, K):
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    rate = numpyro.param("rate", jnp.ones(K), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Exponential(rate[z]), obs=x)


def geometric_mix(x, K):
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    p = numpyro.param("p", jnp.full(K, 0.5), constraint=constraints.unit_interval)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Geometric(probs=p[z]), obs=x)


def lognormal_mix(x, K):
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    mu = numpyro.param("mu", jnp.zeros(K))
    sigma = numpyro.param("sigma", jnp.ones(K), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.LogNormal(mu[z], sigma[z]), obs=x)


def tied_scale_mix(x, K):
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    mu = numpyro.param("mu", jnp.zeros(K))
    sigma = numpyro.param("sigma", jnp.ones(()), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Normal(mu[z], sigma), obs=x)


def _labels(rng, N, w):
    return rng.choice(len(w), size=N, p=w)


def _normal_case(rng):
    z = _labels(rng, 200, [0.3, 0.5, 0.2])
    x = rng.normal(np.array([-3.0, 0.0, 4.0])[z], np.array([1.0, 0.6, 1.5])[z])
    init = {
        "w": np.array([0.6, 0.2, 0.2]),
        "mu": np.array([-0.5, 0.0, 0.5]),
        "sigma": np.array([3.0, 3.0, 3.0]),
    }

    def component_logpdf(p):
        return stats.norm.logpdf(x[:, None], p["mu"], p["sigma"])

    return x, 3, init, component_logpdf


def _mvn_case(rng):
    z = _labels(rng, 200, [0.5, 0.5])
    centers = np.array([[0.0, 0.0], [3.0, 2.0]])
    x = centers[z] + rng.normal(size=(200, 2)) @ np.array([[1.0, 0.4], [0.0, 0.7]])
    init = {
        "w": np.array([0.5, 0.5]),
        "mu": np.array([[1.0, 1.0], [1.5, 1.0]]),
        "L": np.broadcast_to(2.0 * np.eye(2), (2, 2, 2)).copy(),
    }

    def component_logpdf(p):
        cov = p["L"] @ np.swapaxes(p["L"], -1, -2)
        return np.stack(
            [stats.multivariate_normal(p["mu"][k], cov[k]).logpdf(x) for k in range(2)], -1
        )

    return x, 2, init, component_logpdf


def _latent_class_case(rng):
    truth = np.array([[0.9, 0.8, 0.85, 0.2, 0.1], [0.15, 0.3, 0.1, 0.8, 0.9]])
    z = _labels(rng, 200, [0.4, 0.6])
    x = (rng.uniform(size=(200, 5)) < truth[z]).astype(np.float64)
    init = {
        "w": np.array([0.5, 0.5]),
        "p": np.array([[0.6, 0.55, 0.5, 0.45, 0.4], [0.4, 0.45, 0.5, 0.55, 0.6]]),
    }

    def component_logpdf(p):
        return (xlogy(x[:, None, :], p["p"]) + xlog1py(1 - x[:, None, :], -p["p"])).sum(-1)

    return x, 2, init, component_logpdf


def _binomial_case(rng):
    z = _labels(rng, 200, [0.3, 0.7])
    x = rng.binomial(10, np.array([0.2, 0.75])[z]).astype(np.float64)
    init = {"w": np.array([0.5, 0.5]), "p": np.array([0.45, 0.55])}

    def component_logpdf(p):
        return stats.binom.logpmf(x[:, None], 10, p["p"])

    return x, 2, init, component_logpdf


def _categorical_case(rng):
    truth = np.array([[[0.7, 0.1, 0.1, 0.1]] * 3, [[0.1, 0.1, 0.2, 0.6]] * 3])
    z = _labels(rng, 200, [0.5, 0.5])
    u = rng.uniform(size=(200, 3, 1))
    x = (u > np.cumsum(truth[z], -1)).sum(-1)
    init = {
        "w": np.array([0.5, 0.5]),
        "theta": np.stack(
            [np.tile([0.3, 0.25, 0.25, 0.2], (3, 1)), np.tile([0.2, 0.25, 0.25, 0.3], (3, 1))]
        ),
    }

    def component_logpdf(p):
        theta = p["theta"]  # (K, J, C); theta[:, j, x[n, j]] -> (K, N, J)
        return np.log(theta[:, np.arange(3), x]).sum(-1).T

    return x.astype(np.int32), 2, init, component_logpdf


def _poisson_case(rng):
    z = _labels(rng, 200, [0.4, 0.6])
    x = rng.poisson(np.array([2.0, 12.0])[z]).astype(np.float64)
    init = {"w": np.array([0.5, 0.5]), "rate": np.array([6.0, 7.0])}

    def component_logpdf(p):
        return stats.poisson.logpmf(x[:, None], p["rate"])

    return x, 2, init, component_logpdf


def _exponential_case(rng):
    z = _labels(rng, 300, [0.5, 0.5])
    x = rng.exponential(np.array([0.2, 5.0])[z])
    init = {"w": np.array([0.5, 0.5]), "rate": np.array([0.8, 1.2])}

    def component_logpdf(p):
        return stats.expon.logpdf(x[:, None], scale=1.0 / p["rate"])

    return x, 2, init, component_logpdf


def _geometric_case(rng):
    z = _labels(rng, 300, [0.5, 0.5])
    x = (rng.geometric(np.array([0.7, 0.08])[z]) - 1).astype(np.float64)  # failures before success
    init = {"w": np.array([0.5, 0.5]), "p": np.array([0.3, 0.4])}

    def component_logpdf(p):
        return stats.geom.logpmf(x[:, None], p["p"], loc=-1)

    return x, 2, init, component_logpdf


def _lognormal_case(rng):
    z = _labels(rng, 200, [0.5, 0.5])
    x = np.exp(rng.normal(np.array([0.0, 2.5])[z], np.array([0.4, 0.6])[z]))
    init = {"w": np.array([0.5, 0.5]), "mu": np.array([1.0, 1.5]), "sigma": np.array([2.0, 2.0])}

    def component_logpdf(p):
        return stats.lognorm.logpdf(x[:, None], s=p["sigma"], scale=np.exp(p["mu"]))

    return x, 2, init, component_logpdf


def _tied_scale_case(rng):
    z = _labels(rng, 200, [0.3, 0.4, 0.3])
    x = rng.normal(np.array([-4.0, 0.0, 4.0])[z], 1.0)
    init = {
        "w": np.array([0.2, 0.3, 0.5]),
        "mu": np.array([-1.0, 0.0, 1.0]),
        "sigma": np.array(2.0),
    }

    def component_logpdf(p):
        return stats.norm.logpdf(x[:, None], p["mu"], p["sigma"])

    return x, 3, init, component_logpdf


ZOO = {
    "normal": (normal_mixture, _normal_case),
    "mvn": (gmm_scale_tril, _mvn_case),
    "bernoulli_latent_class": (latent_class, _latent_class_case),
    "binomial": (binomial_mix, _binomial_case),
    "categorical": (categorical_mix, _categorical_case),
    "poisson": (poisson_mixture, _poisson_case),
    "exponential": (exponential_mix, _exponential_case),
    "geometric": (geometric_mix, _geometric_case),
    "lognormal": (lognormal_mix, _lognormal_case),
    "tied_scale": (tied_scale_mix, _tied_scale_case),
}


def reference_log_likelihood(component_logpdf, params):
    """log p(x) = sum_n logsumexp_k (log w_k + log f_k(x_n)), in float64 numpy."""
    params = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    with np.errstate(divide="ignore"):  # an emptied component has weight exactly 0
        log_w = np.log(params["w"])
    return float(logsumexp(log_w + component_logpdf(params), axis=-1).sum())


def assert_monotone(history, rel_tol):
    history = np.asarray(history, dtype=np.float64)
    assert np.all(np.isfinite(history)), history
    decrease = history[:-1] - history[1:]
    allowed = rel_tol * np.abs(history[1:])
    worst = int(np.argmax(decrease - allowed))
    assert np.all(decrease <= allowed), (
        f"log-likelihood decreased at iteration {worst + 1}: "
        f"{history[worst]!r} -> {history[worst + 1]!r}"
    )


def _run_zoo(name, dtype):
    model, make_case = ZOO[name]
    rng = np.random.default_rng(sorted(ZOO).index(name) + 17)
    x, K, init, component_logpdf = make_case(rng)
    x = jnp.asarray(x) if x.dtype.kind == "i" else jnp.asarray(x, dtype=dtype)
    result = EM(model).run(
        jax.random.PRNGKey(0),
        x,
        K,
        max_iter=MAX_ITER,
        tol=0.0,
        init_params={k: jnp.asarray(v, dtype=dtype) for k, v in init.items()},
    )
    return result, init, component_logpdf


@pytest.mark.parametrize("name", list(ZOO))
def test_monotone_float32(name, x32):
    result, init, component_logpdf = _run_zoo(name, jnp.float32)
    assert result.log_likelihood.dtype == jnp.float32
    _check_fit(result, init, component_logpdf, rel_tol=1e-5, ref_rtol=1e-5)


@pytest.mark.parametrize("name", list(ZOO))
def test_monotone_float64(name, x64):
    result, init, component_logpdf = _run_zoo(name, jnp.float64)
    assert result.log_likelihood.dtype == jnp.float64
    _check_fit(result, init, component_logpdf, rel_tol=1e-10, ref_rtol=1e-10)


def _check_fit(result, init, component_logpdf, rel_tol, ref_rtol):
    # (Whether tol=0 runs all MAX_ITER updates is test_tol_zero_runs_every_update's business.)
    assert int(result.num_iters) >= 5
    assert not bool(result.diverged)
    history = np.asarray(result.history)[: int(result.num_iters)]
    assert_monotone(np.append(history, float(result.log_likelihood)), rel_tol)

    initial = reference_log_likelihood(component_logpdf, init)
    final = reference_log_likelihood(component_logpdf, result.params)
    np.testing.assert_allclose(history[0], initial, rtol=ref_rtol)
    np.testing.assert_allclose(float(result.log_likelihood), final, rtol=ref_rtol)
    # The starting points are poor: EM must move a long way, not stall.
    assert final - initial > max(5.0, 0.02 * abs(initial)), (initial, final)


def test_tol_zero_runs_every_update(x32):
    """API contract: ``run(max_iter=n, tol=0.0)`` does exactly n updates, even once the
    float32 log-likelihood stops changing (this Poisson mixture gets there in < 30 iterations)."""
    result, _, _ = _run_zoo("poisson", jnp.float32)
    assert int(result.num_iters) == MAX_ITER
    assert np.all(np.isfinite(np.asarray(result.history)))


# --- latent class analysis of the carcinoma data (poLCA) ------------------------------------


def _carcinoma(load_csv):
    return load_csv("carcinoma.csv") - 1.0  # ratings 1 (no) / 2 (yes) -> 0 / 1


def _carcinoma_init(K):
    base = {2: [0.3, 0.7], 3: [0.2, 0.5, 0.8]}[K]
    p = np.array(base)[:, None] + np.linspace(-0.05, 0.05, 7)[None, :]
    return {"w": np.full(K, 1.0 / K), "p": p}


def numpy_latent_class_em(x, w, p, num_iters):
    """Reference EM for a latent class model of binary items, in float64 numpy."""
    for _ in range(num_iters):
        log_joint = np.log(w) + (xlogy(x[:, None, :], p) + xlog1py(1 - x[:, None, :], -p)).sum(-1)
        log_marginal = logsumexp(log_joint, axis=1)
        resp = np.exp(log_joint - log_marginal[:, None])
        nk = resp.sum(0)
        w = nk / x.shape[0]
        p = np.clip(
            resp.T @ x / nk[:, None], 0.0, 1.0
        )  # estimates on the boundary are the MLE here
    log_joint = np.log(w) + (xlogy(x[:, None, :], p) + xlog1py(1 - x[:, None, :], -p)).sum(-1)
    return w, p, float(logsumexp(log_joint, axis=1).sum())


@pytest.mark.parametrize("K, polca_log_likelihood", [(2, -317.2568), (3, -293.705)])
def test_carcinoma_latent_class(K, polca_log_likelihood, x64, load_csv):
    x = _carcinoma(load_csv)
    init = _carcinoma_init(K)
    w_ref, p_ref, ll_ref = numpy_latent_class_em(x, init["w"], init["p"], num_iters=2000)
    assert abs(ll_ref - polca_log_likelihood) < 1e-3  # the reference itself reaches poLCA's optimum

    result = EM(latent_class).run(
        jax.random.PRNGKey(0),
        jnp.asarray(x),
        K,
        max_iter=150,
        tol=0.0,
        init_params={k: jnp.asarray(v) for k, v in init.items()},
    )
    # Several item probabilities converge to exactly 0 or 1 here; that must not break the fit.
    assert not bool(result.diverged)
    history = np.asarray(result.history)[: int(result.num_iters)]
    assert_monotone(history, 1e-10)
    np.testing.assert_allclose(float(result.log_likelihood), ll_ref, rtol=1e-6)
    np.testing.assert_allclose(
        float(jaxem.log_likelihood(latent_class, result.params, jnp.asarray(x), K)),
        ll_ref,
        rtol=1e-6,
    )
    np.testing.assert_allclose(np.asarray(result.params["w"]), w_ref, atol=1e-6)
    np.testing.assert_allclose(np.asarray(result.params["p"]), p_ref, atol=1e-6)


# --- a component that loses all its mass ----------------------------------------------------


@pytest.mark.parametrize("name", ["normal", "mvn"])
@pytest.mark.parametrize("use_x64", [False, True], ids=["float32", "float64"])
def test_empty_component_stays_finite(name, use_x64):
    """One component starts so far from the data that its responsibilities underflow to
    exactly zero: the fit must stay finite (DESIGN: no NaN) and monotone."""
    model, make_case = ZOO[name]
    with jax.enable_x64(use_x64):
        dtype = jnp.float64 if use_x64 else jnp.float32
        x, K, init, component_logpdf = make_case(np.random.default_rng(3))
        init = {k: np.array(v, dtype=np.float64) for k, v in init.items()}
        init["mu"][-1] = 1e3  # every coordinate of the last mean, far away
        result = EM(model).run(
            jax.random.PRNGKey(0),
            jnp.asarray(x, dtype),
            K,
            max_iter=10,
            tol=0.0,
            init_params={k: jnp.asarray(v, dtype) for k, v in init.items()},
        )
        assert not bool(result.diverged)
        for pname, value in result.params.items():
            assert np.all(np.isfinite(np.asarray(value))), (pname, value)
        assert np.isfinite(float(result.log_likelihood))
        history = np.asarray(result.history)[: int(result.num_iters)]
        assert_monotone(
            np.append(history, float(result.log_likelihood)), 1e-10 if use_x64 else 1e-5
        )
        np.testing.assert_allclose(
            float(result.log_likelihood),
            reference_log_likelihood(component_logpdf, result.params),
            rtol=1e-10 if use_x64 else 1e-5,
        )
