"""Floating-point accuracy of the closed-form M-step.

The fast statistics shift all data by one point (the data mean); a component
far from it loses its digits to cancellation unless a guard takes an exact
path. Started at the maximum-likelihood estimate (numpy float64 weighted means
and variances of the same data), EM must stay there and must not lower the
log-likelihood, in float32 and float64, for univariate, diagonal and full
Gaussian mixtures.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from models import gmm_diag, gmm_scale_tril, normal_mixture
from numpyro.distributions import constraints
from scipy import stats
from scipy.special import logsumexp

import jaxem
from jaxem import EM, ClosedFormUpdate, register_closed_form
from jaxem.exceptions import ModelError, NumericalWarning

REG_COVAR = 1e-6


def _far_clusters(dtype, dim):
    """Well-separated clusters (hard responsibilities) far from the data mean.

    float32: a tight cluster at 0 and a wide one at 1e5 (the data mean, 5e4, is
    1e7 standard deviations from the tight one). float64: two clusters near 0
    and one point at 1e18, its own component.
    """
    rng = np.random.default_rng(0)
    if dtype == "float32":
        centers = [np.zeros(dim), np.full(dim, 1e5)]
        spreads = [np.linspace(0.01, 0.02, dim), np.full(dim, 10.0)]
        sizes = [100, 100]
    else:
        centers = [np.full(dim, -3.0), np.full(dim, 3.0), np.full(dim, 1e18)]
        spreads = [np.full(dim, 0.5), np.full(dim, 0.3), np.zeros(dim)]
        sizes = [60, 40, 1]
    labels = np.repeat(np.arange(len(sizes)), sizes)
    x = np.concatenate(
        [c + s * rng.normal(size=(n, dim)) for c, s, n in zip(centers, spreads, sizes)]
    )
    # The reference moments are those of the data as the fit sees them.
    x = x.astype(dtype).astype(np.float64)
    return x, labels


def _mle(x, labels):
    K = labels.max() + 1
    weights = np.bincount(labels) / len(labels)
    means = np.stack([x[labels == k].mean(0) for k in range(K)])
    covs = np.stack(
        [np.cov(x[labels == k].T, bias=True).reshape(x.shape[1], x.shape[1]) for k in range(K)]
    )
    covs = covs + REG_COVAR * np.eye(x.shape[1])
    return weights, means, covs


def _reference_log_likelihood(x, weights, means, covs):
    terms = [
        np.log(w) + stats.multivariate_normal(m, c).logpdf(x).reshape(len(x))
        for w, m, c in zip(weights, means, covs)
    ]
    return float(np.sum(logsumexp(terms, axis=0)))


@pytest.mark.parametrize("family", ["normal", "diag", "full"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_em_stays_at_the_mle_of_components_far_from_the_data_mean(family, dtype):
    with jax.enable_x64(dtype == "float64"):
        dim = 1 if family == "normal" else 2
        x, labels = _far_clusters(dtype, dim)
        weights, means, covs = _mle(x, labels)
        K = len(weights)
        init = {"w": jnp.asarray(weights, dtype), "mu": jnp.asarray(means, dtype)}
        if family == "normal":
            model, data = normal_mixture, jnp.asarray(x[:, 0], dtype)
            init["mu"] = init["mu"][:, 0]
            init["sigma"] = jnp.asarray(np.sqrt(covs[:, 0, 0]), dtype)
        elif family == "diag":
            model, data = gmm_diag, jnp.asarray(x, dtype)
            init["sigma"] = jnp.asarray(np.sqrt(np.diagonal(covs, axis1=1, axis2=2)), dtype)
        else:
            model, data = gmm_scale_tril, jnp.asarray(x, dtype)
            init["L"] = jnp.asarray(np.linalg.cholesky(covs), dtype)
        if family != "full":
            covs = covs * np.eye(dim)  # diagonal models: the MLE of the variances alone
        expected = _reference_log_likelihood(x, weights, means, covs)
        rtol = 1e-5 if dtype == "float32" else 1e-10
        em = EM(model, reg_covar=REG_COVAR)
        result = em.run(jax.random.PRNGKey(0), data, K, max_iter=5, tol=0.0, init_params=init)
        start = float(jaxem.log_likelihood(model, init, data, K))
        np.testing.assert_allclose(start, expected, rtol=rtol)
        history = np.asarray(result.history, np.float64)
        assert np.all(np.diff(history) >= -rtol * abs(expected)), history
        np.testing.assert_allclose(float(result.log_likelihood), expected, rtol=rtol)
        # The parameters stay at the MLE, to within the data's own resolution.
        spread = np.sqrt(np.diagonal(covs, axis1=1, axis2=2))
        mu = np.asarray(result.params["mu"], np.float64).reshape(K, dim)
        resolution = np.finfo(dtype).eps * np.abs(means)
        tol = 1e-3 if dtype == "float32" else 1e-7
        assert np.all(np.abs(mu - means) <= tol * spread + 4 * resolution), (mu, means)
        if family == "full":
            L = np.asarray(result.params["L"], np.float64)
            variances = np.diagonal(L @ np.swapaxes(L, -1, -2), axis1=1, axis2=2)
        else:
            variances = np.asarray(result.params["sigma"], np.float64).reshape(K, dim) ** 2
        np.testing.assert_allclose(variances, spread**2, rtol=100 * tol)


@pytest.mark.parametrize("family", ["normal", "diag", "full"])
@pytest.mark.parametrize(("dtype", "far"), [("float32", -460152.57568657), ("float64", 2.5e14)])
def test_a_component_collapsed_on_ties_far_from_zero_stays_there(family, dtype, far):
    """A component collapsed onto 12 tied points far from 0, held up by reg_covar: its
    scale (1e-3) is below the spacing of numbers at its location (0.03 in float32 at
    4.6e5, 0.03 in float64 at 2.5e14). The location, solved as a ratio of two rounded
    sums (a linear solve for the full covariance), came out an ulp or two off the tie;
    that lowered the log-likelihood by 47 nats in one step, and the next scale stage
    fitted the ulps (scale 0.03, no warning). It must stay on the tie, and reg_covar
    holding it up is warned about. ``full``: 2-D tied points, a MultivariateNormal
    with a Cholesky factor param (its location dropped 52 nats in one step)."""
    with jax.enable_x64(dtype == "float64"):
        rng = np.random.default_rng(1)
        if family == "full":
            tie = np.array([far, -0.7 * far])
            x = np.concatenate([np.tile(tie, (12, 1)), tie + 1e5 * rng.standard_normal((36, 2))])
            x = x.astype(dtype)
            spread = np.cov(x[12:].T.astype(np.float64), bias=True)
            init = {
                "mu": np.stack([x[0], x[12:].mean(0)]),
                "L": np.stack([1e-3 * np.eye(2), np.linalg.cholesky(spread)]),
            }
            model, data, scale_name = gmm_scale_tril, x, "L"
        else:
            x = np.concatenate([np.full(12, far), far + 1e5 * rng.standard_normal(36)])
            x = x.astype(dtype)
            mu = np.array([x[0], x[12:].mean()])
            sigma = np.array([1e-3, x[12:].std()])
            model, data, scale_name = normal_mixture, x, "sigma"
            if family == "diag":
                # A second coordinate with no ties: the collapse is in the first alone.
                data = np.stack([x, x[::-1]], 1)
                mu = np.stack([mu, [data[:12, 1].mean(), data[12:, 1].mean()]], 1)
                sigma = np.stack([sigma, [data[:12, 1].std(), data[12:, 1].std()]], 1)
                model = gmm_diag
            init = {"mu": mu, "sigma": sigma}
        init = {k: jnp.asarray(v, dtype) for k, v in init.items()}
        init["w"] = jnp.asarray([0.25, 0.75], dtype)
        with pytest.warns(NumericalWarning, match="reg_covar") as caught:
            result = EM(model, reg_covar=REG_COVAR).run(
                jax.random.PRNGKey(0), jnp.asarray(data), 2, max_iter=5, tol=0.0, init_params=init
            )
        # Its scale, 1e-3, is below the resolution of its location (jaxem.resolution).
        unresolved = [
            str(w.message) for w in caught if "floating-point resolution" in str(w.message)
        ]
        assert len(unresolved) == 1, [str(w.message) for w in caught]
        family_name = "MultivariateNormal" if family == "full" else "Normal"
        for part in (f"site 'x' ({family_name}, params 'mu', '{scale_name}')", dtype, "center"):
            assert part in unresolved[0], unresolved[0]
        history = np.asarray(result.history, np.float64)
        slack = 64 * np.finfo(dtype).eps * (abs(history[0]) + len(x))
        assert np.all(np.diff(history) >= -slack), history
        assert float(result.log_likelihood) >= history[0] - slack
        mu = np.asarray(result.params["mu"]).reshape(2, -1)
        tied = x[0] if family == "full" else x[0, None]
        np.testing.assert_array_equal(mu[0, : len(tied)], tied)
        scale = np.asarray(result.params[scale_name], np.float64)
        first = np.diagonal(scale[0]) if family == "full" else scale.reshape(2, -1)[0, :1]
        np.testing.assert_allclose(first, np.sqrt(REG_COVAR), rtol=1e-3)


def _lognormal_mixture(x, K):
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    mu = numpyro.param("mu", jnp.zeros(K))
    sigma = numpyro.param("sigma", jnp.ones(K), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.LogNormal(mu[z], sigma[z]), obs=x)


def test_a_lognormal_scale_below_the_resolution_of_its_log_location_is_warned():
    """The LogNormal member of the check above: 12 float32 points tied at e^50 (their
    log, 50, has float32 spacing 3.8e-6), a component collapsed on them with scale
    sqrt(reg_covar) = 1e-6 below 8 eps (|50| + 1) = 4.9e-5."""
    rng = np.random.default_rng(2)
    logs = np.concatenate([np.full(12, 50.0), 50.0 + rng.standard_normal(36)])
    x = np.exp(logs).astype(np.float32)
    init = {
        "w": jnp.asarray([0.25, 0.75]),
        "mu": jnp.asarray([np.log(x[0]), logs[12:].mean()], jnp.float32),
        "sigma": jnp.asarray([1e-6, logs[12:].std()], jnp.float32),
    }
    with pytest.warns(NumericalWarning, match="floating-point resolution") as caught:
        EM(_lognormal_mixture, reg_covar=1e-12).run(
            jax.random.PRNGKey(0), jnp.asarray(x), 2, max_iter=2, tol=0.0, init_params=init
        )
    message = next(str(w.message) for w in caught if "resolution" in str(w.message))
    for part in ("site 'x' (LogNormal, params 'mu', 'sigma')", "log x", "float32", "float64"):
        assert part in message, message


class _Rayleigh(dist.Distribution):
    arg_constraints = {"scale": constraints.positive}
    support = constraints.positive

    def __init__(self, scale):
        self.scale = scale
        super().__init__(jnp.shape(scale))

    def log_prob(self, x):
        return jnp.log(x) - 2 * jnp.log(self.scale) - x**2 / (2 * self.scale**2)


def _rayleigh_stats(cells, target):
    sum_sq = cells.sum(target, (cells.weight, ""), (cells.value**2, ""))
    return sum_sq, cells.count(target)


def _rayleigh_mixture(x, K=2):
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    scale = numpyro.param("scale", jnp.arange(1.0, K + 1.0), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", _Rayleigh(scale[z]), obs=x)


@pytest.mark.parametrize(
    "solve, problem",
    [
        (
            lambda stats, old, reg: jnp.sqrt(jnp.sum(stats[0]) / jnp.sum(stats[1]) / 2),
            r"shape \(\)",
        ),
        (lambda stats, old, reg: jnp.ones((3,)), r"shape \(3,\)"),
        (lambda stats, old, reg: old > 0, "dtype bool"),
    ],
    ids=["scalar", "wrong-length", "bool"],
)
def test_registered_solve_fn_of_the_wrong_shape_is_a_named_error(solve, problem):
    # _Rayleigh exists only here: each case re-registers its own update.
    register_closed_form(_Rayleigh, "scale", ClosedFormUpdate(_rayleigh_stats, solve))
    x = jnp.asarray(np.random.default_rng(0).rayleigh(2.0, size=50), jnp.float32)
    with pytest.raises(ModelError, match=rf"_Rayleigh\.scale at site 'x'.*{problem}.*'scale'"):
        EM(_rayleigh_mixture).run(jax.random.PRNGKey(0), x, max_iter=2)


def _categorical_mixture(x, K=2, C=3, probs_constraint=constraints.real):
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    probs = numpyro.param(
        "probs", jnp.array([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]]), constraint=probs_constraint
    )
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Categorical(probs[z]), obs=x)


def _real_scale_mixture(x, K=2):
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    mu = numpyro.param("mu", jnp.array([-1.0, 1.0]))
    sigma = numpyro.param("sigma", jnp.ones(K))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Normal(mu[z], sigma[z]), obs=x)


def _softmax_probs_mixture(x, K=2):
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    logits = numpyro.param("logits", jnp.zeros((K, 3)) + jnp.arange(3.0))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Categorical(jax.nn.softmax(logits)[z]), obs=x)


@pytest.mark.parametrize(
    "model, message",
    [
        (
            _categorical_mixture,
            r"param 'probs' \(constraint .*Real.*\) is argument 'probs' of CategoricalProbs at "
            r"site 'x'.*constraint=constraints\.simplex\)",
        ),
        (
            _real_scale_mixture,
            r"param 'sigma' .* argument 'scale' of Normal at site 'x'.*"
            r"constraint=constraints\.positive\)",
        ),
    ],
    ids=["categorical-probs", "normal-scale"],
)
def test_param_wider_than_the_argument_support_is_a_named_error(model, message):
    """The issue's case: a Categorical ``probs`` param declared ``real`` left the simplex
    under gradient steps and the fit reported a log-likelihood of +8308, converged."""
    x = jnp.asarray(np.random.default_rng(0).integers(0, 3, size=40))
    if model is _real_scale_mixture:
        x = jnp.asarray(np.random.default_rng(0).normal(size=40), jnp.float32)
    with pytest.raises(ModelError, match=message):
        EM(model).run(jax.random.PRNGKey(0), x, max_iter=3)
    with pytest.raises(ModelError, match=message):
        EM(model).m_step_paths(x)


def test_params_inside_the_argument_support_fit():
    """Declared on the simplex, or reaching it through softmax, the same model fits."""
    x = jnp.asarray(np.random.default_rng(0).integers(0, 3, size=40))
    simplex = functools.partial(_categorical_mixture, probs_constraint=constraints.simplex)
    for model in (simplex, _softmax_probs_mixture):
        result = EM(model).run(jax.random.PRNGKey(0), x, max_iter=3)
        assert float(result.log_likelihood) < 0


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_full_covariance_density_far_from_the_data_mean(dtype):
    with jax.enable_x64(dtype == "float64"):
        x, labels = _far_clusters(dtype, 2)
        weights, means, covs = _mle(x, labels)
        init = {
            "w": jnp.asarray(weights, dtype),
            "mu": jnp.asarray(means, dtype),
            "L": jnp.asarray(np.linalg.cholesky(covs), dtype),
        }
        start = float(
            jaxem.log_likelihood(gmm_scale_tril, init, jnp.asarray(x, dtype), len(weights))
        )
        expected = _reference_log_likelihood(x, weights, means, covs)
        np.testing.assert_allclose(start, expected, rtol=1e-5 if dtype == "float32" else 1e-10)
