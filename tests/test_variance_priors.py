"""Closed-form M-steps for a Normal's variance or precision (`jaxem.power_selection`).

A scale spelled ``jnp.sqrt(var[z])`` (a variance) or ``1 / jnp.sqrt(tau[z])``,
``tau[z] ** -0.5``, ``lax.rsqrt(tau[z])`` (a precision) takes the closed form, in
maximum likelihood and under an InverseGamma / Gamma prior (MAP-EM). The MAP
reference is a scipy maximization of log p(x | theta) + log p(theta), the first
term the enumerated marginal of a 2-component mixture written out here, in
float64.
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
from numpyro.contrib.control_flow import scan
from numpyro.distributions import constraints

from jaxem import EM

X = np.concatenate([np.linspace(-3.0, -1.0, 8), np.linspace(1.5, 4.5, 7)])

SCALES = {
    "sqrt": lambda v: jnp.sqrt(v),
    "1/sqrt": lambda v: 1 / jnp.sqrt(v),
    "**-0.5": lambda v: v**-0.5,
    "rsqrt": lambda v: jax.lax.rsqrt(v),
}


def mixture(spelling, prior):
    def model(x, K=2):
        w = numpyro.sample("w", dist.Dirichlet(2.0 * jnp.ones(K)))
        with numpyro.plate("components", K):
            mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
            v = numpyro.sample("v", prior)
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(w))
            numpyro.sample("x", dist.Normal(mu[z], SCALES[spelling](v[z])), obs=x)

    return model


def _log_posterior(w0, mu, v, variance, prior):
    """The enumerated marginal plus the log priors, in the sampled coordinates."""
    w = jnp.stack([w0, 1 - w0])
    scale = jnp.sqrt(v) if variance else 1 / jnp.sqrt(v)
    x = jnp.asarray(X)[:, None]
    joint = jnp.log(w) - 0.5 * ((x - mu) / scale) ** 2 - jnp.log(scale) - 0.5 * jnp.log(2 * jnp.pi)
    log_prior = (
        dist.Dirichlet(2.0 * jnp.ones(2)).log_prob(w)
        + dist.Normal(0.0, 5.0).log_prob(mu).sum()
        + prior.log_prob(v).sum()
    )
    return jnp.sum(logsumexp(joint, axis=1)) + log_prior


@functools.cache
def _scipy_map(variance, start):
    """argmax of the log posterior (logit w, mu, log v unconstrained), from ``start``."""
    prior = dist.InverseGamma(3.0, 2.0) if variance else dist.Gamma(3.0, 2.0)

    def negative(u):
        return -_log_posterior(jax.nn.sigmoid(u[0]), u[1:3], jnp.exp(u[3:5]), variance, prior)

    value_and_grad = jax.jit(jax.value_and_grad(negative))

    def fun(u):
        value, grad = value_and_grad(jnp.asarray(u))
        return float(value), np.asarray(grad, np.float64)

    found = scipy.optimize.minimize(
        fun, np.asarray(start), jac=True, method="BFGS", options={"gtol": 1e-11}
    )
    u = found.x
    return jax.nn.sigmoid(u[0]), u[1:3], np.exp(u[3:5]), -found.fun


@pytest.mark.parametrize("spelling", list(SCALES))
def test_map_em_variance_or_precision_prior_is_closed_form_and_matches_scipy(spelling, x64):
    variance = spelling == "sqrt"
    prior = dist.InverseGamma(3.0, 2.0) if variance else dist.Gamma(3.0, 2.0)
    em = EM(mixture(spelling, prior), global_sites=("w", "mu", "v"), reg_covar=0.0)
    path = em.m_step_paths(X)["v"]
    expected = "InverseGamma" if variance else "Gamma"
    assert path.startswith(f"closed-form (conjugate prior: {expected} at site 'v'"), path
    assert ("a variance" if variance else "a precision") in path, path
    init = {"w": jnp.array([0.5, 0.5]), "mu": jnp.array([-1.0, 1.0]), "v": jnp.array([1.0, 1.0])}
    result = em.run(jax.random.PRNGKey(0), X, init_params=init, max_iter=1000, tol=1e-13)
    assert bool(result.converged)
    assert np.all(np.diff(result.history[: int(result.num_iters)]) > -1e-9)  # monotone
    p = result.params
    start = np.concatenate(
        [[np.log(p["w"][0] / p["w"][1])], np.asarray(p["mu"]), np.log(np.asarray(p["v"]))]
    )
    # Perturbed, so that scipy must climb to the mode itself.
    start = tuple(np.round(start + 0.05 * np.cos(np.arange(5)), 2))
    w0, mu, v, best = _scipy_map(variance, start)
    np.testing.assert_allclose(p["w"][0], w0, rtol=1e-6)
    np.testing.assert_allclose(p["mu"], mu, rtol=1e-6)
    np.testing.assert_allclose(p["v"], v, rtol=1e-6)
    np.testing.assert_allclose(result.log_posterior, best, rtol=1e-10)


def test_map_em_mode_formulas_on_one_cluster(x64):
    """One component: the modes are (S + 2b) / (n + 2a + 2) and (n + 2a - 2) / (S + 2b)."""
    a, b, mu = 3.0, 2.0, 0.5

    def model(x, prior, spelling):
        v = numpyro.sample("v", prior)
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", dist.Normal(mu, SCALES[spelling](v)), obs=x)

    S, n = float(np.sum((X - mu) ** 2)), X.size
    for prior, spelling, mode in (
        (dist.InverseGamma(a, b), "sqrt", (S + 2 * b) / (n + 2 * a + 2)),
        (dist.Gamma(a, b), "rsqrt", (n + 2 * a - 2) / (S + 2 * b)),
    ):
        fitted = functools.partial(model, prior=prior, spelling=spelling)
        em = EM(fitted, global_sites=("v",), reg_covar=0.0)
        assert "conjugate prior" in em.m_step_paths(X)["v"]
        result = em.run(jax.random.PRNGKey(0), X, init_params={"v": jnp.array(1.0)}, max_iter=5)
        np.testing.assert_allclose(result.params["v"], mode, rtol=1e-12)


def ml_mixture(spelling):
    def model(x, K=2):
        w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
        mu = numpyro.param("mu", jnp.array([-1.0, 1.0]))
        s = numpyro.param("s", jnp.array([1.0, 2.0]), constraint=constraints.positive)
        scale = s if spelling == "scale" else SCALES[spelling](s)
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(w))
            numpyro.sample("x", dist.Normal(mu[z], scale[z]), obs=x)

    return model


@pytest.mark.parametrize("spelling", ["sqrt", "1/sqrt"])
def test_ml_variance_or_precision_param_is_closed_form_and_matches_the_scale_spelling(
    spelling, x64
):
    key = jax.random.PRNGKey(0)
    reference = EM(ml_mixture("scale"), reg_covar=0.0).run(key, X, max_iter=1000, tol=1e-13)
    em = EM(ml_mixture(spelling), reg_covar=0.0)
    path = em.m_step_paths(X)["s"]
    assert path.startswith("closed-form (Normal.scale at site 'x'"), path
    # The same start: s is the scale's square (a variance) or its inverse square.
    power = 2.0 if spelling == "sqrt" else -2.0
    init = {"s": jnp.array([1.0, 2.0]) ** power}
    result = em.run(key, X, init_params=init, max_iter=1000, tol=1e-13)
    assert bool(result.converged)
    np.testing.assert_allclose(result.params["s"], reference.params["s"] ** power, rtol=1e-9)
    np.testing.assert_allclose(result.params["mu"], reference.params["mu"], rtol=1e-9)
    np.testing.assert_allclose(result.log_likelihood, reference.log_likelihood, rtol=1e-12)


@pytest.mark.parametrize(
    "scale",
    [
        lambda s, x: 2 * jnp.sqrt(s),  # not the variance: a constant factor
        lambda s, x: s**0.25,  # the square root of the scale
        lambda s, x: jnp.sqrt(s) * jnp.ones_like(x),  # a factor the chain cannot see is 1
        lambda s, x: jnp.sqrt(s + 1.0),
    ],
)
def test_other_transforms_of_a_scale_param_keep_gradient_steps(scale):
    def model(x):
        mu = numpyro.param("mu", 0.0)
        s = numpyro.param("s", 1.0, constraint=constraints.positive)
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", dist.Normal(mu, scale(s, x)), obs=x)

    assert EM(model).m_step_paths(X)["s"].startswith("gradient"), EM(model).m_step_paths(X)


@pytest.mark.parametrize("a", [1.0, 0.5])
def test_gamma_precision_prior_without_a_mode_for_small_weights_takes_gradient_steps(a):
    """With concentration a <= 1 the posterior mode of a precision does not exist for
    a component of weight n <= 2 - 2a: no closed form, and the path says why."""
    em = EM(mixture("rsqrt", dist.Gamma(a, 2.0)), global_sites=("w", "mu", "v"))
    path = em.m_step_paths(X)["v"]
    assert path.startswith("gradient (its prior (Gamma at site 'v') has concentration"), path
    assert "<= 1" in path and "does not exist" in path, path


def test_non_conjugate_prior_on_a_variance_takes_gradient_steps():
    em = EM(mixture("sqrt", dist.Gamma(3.0, 2.0)), global_sites=("w", "mu", "v"))
    path = em.m_step_paths(X)["v"]
    assert path.startswith("gradient (its prior (Gamma at site 'v') is not conjugate"), path


def scan_hmm(variance):
    def model(x, K=2):
        A = numpyro.param("A", jnp.array([[0.8, 0.2], [0.3, 0.7]]), constraint=constraints.simplex)
        mu = numpyro.param("mu", jnp.array([-1.0, 1.0]))
        s = numpyro.param("s", jnp.array([1.0, 4.0]), constraint=constraints.positive)
        scale = jnp.sqrt(s) if variance else s
        z0 = numpyro.sample("z0", dist.Categorical(jnp.ones(K) / K))
        numpyro.sample("x0", dist.Normal(mu[z0], scale[z0]), obs=x[0])

        def step(z_prev, x_t):
            z = numpyro.sample("z", dist.Categorical(A[z_prev]))
            numpyro.sample("x", dist.Normal(mu[z], jnp.sqrt(s[z]) if variance else s[z]), obs=x_t)
            return z, None

        scan(step, z0, x[1:])

    return model


def test_scan_hmm_variance_is_closed_form_and_steps_like_the_scale(x64):
    """Inside numpyro's scan too; EM on the variance takes the scale's steps, squared."""
    x = jnp.asarray(X[[0, 8, 1, 2, 9, 10, 3, 11, 12, 4]])
    path = EM(scan_hmm(True)).m_step_paths(x)["s"]
    assert path.startswith("closed-form (Normal.scale at site 'x0', Normal.scale at site 'x'")
    assert "a variance" in path, path
    key = jax.random.PRNGKey(0)
    reference = EM(scan_hmm(False), reg_covar=0.0).run(key, x, max_iter=15, tol=0.0)
    init = {"s": jnp.array([1.0, 16.0])}
    result = EM(scan_hmm(True), reg_covar=0.0).run(key, x, init_params=init, max_iter=15, tol=0.0)
    np.testing.assert_allclose(result.params["s"], reference.params["s"] ** 2, rtol=1e-9)
    np.testing.assert_allclose(result.history, reference.history, rtol=1e-12)
