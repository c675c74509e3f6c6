"""Gaussian HMMs (NumPyro ``scan``) with missing values.

The reference is independent of jaxem: a numpy forward-backward per sequence in which
each step's emission density is scipy's ``multivariate_normal`` over that step's
observed coordinates (a step with nothing observed contributes a factor 1), and the
conditional means of the missing coordinates written out with ``np.linalg.solve``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.contrib.control_flow import scan
from numpyro.distributions import constraints
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

import jaxem
from jaxem import EM, nan_as_missing

K = 2


def full_hmm(x):
    """Full-covariance Gaussian HMM over x of shape (T, N, D): N sequences."""
    dim = x.shape[-1]
    pi = numpyro.param("pi", jnp.ones(K) / K, constraint=constraints.simplex)
    A = numpyro.param("A", jnp.full((K, K), 1.0 / K), constraint=constraints.simplex)
    mu = numpyro.param("mu", jnp.zeros((K, dim)))
    cov = numpyro.param(
        "cov",
        jnp.broadcast_to(jnp.eye(dim), (K, dim, dim)),
        constraint=constraints.positive_definite,
    )
    with numpyro.plate("seqs", x.shape[1]):
        z0 = numpyro.sample("z0", dist.Categorical(pi))
        numpyro.sample("x0", dist.MultivariateNormal(mu[z0], covariance_matrix=cov[z0]), obs=x[0])

    def step(z_prev, x_t):
        with numpyro.plate("seqs", x.shape[1]):
            z = numpyro.sample("z", dist.Categorical(A[z_prev]))
            numpyro.sample("x", dist.MultivariateNormal(mu[z], covariance_matrix=cov[z]), obs=x_t)
        return z, None

    scan(step, z0, x[1:])


def diag_hmm(x):
    """Diagonal Gaussian HMM (Normal(...).to_event(1) emissions) over x of shape (T, N, D)."""
    dim = x.shape[-1]
    pi = numpyro.param("pi", jnp.ones(K) / K, constraint=constraints.simplex)
    A = numpyro.param("A", jnp.full((K, K), 1.0 / K), constraint=constraints.simplex)
    mu = numpyro.param("mu", jnp.zeros((K, dim)))
    sigma = numpyro.param("sigma", jnp.ones((K, dim)), constraint=constraints.positive)
    with numpyro.plate("seqs", x.shape[1]):
        z0 = numpyro.sample("z0", dist.Categorical(pi))
        numpyro.sample("x0", dist.Normal(mu[z0], sigma[z0]).to_event(1), obs=x[0])

    def step(z_prev, x_t):
        with numpyro.plate("seqs", x.shape[1]):
            z = numpyro.sample("z", dist.Categorical(A[z_prev]))
            numpyro.sample("x", dist.Normal(mu[z], sigma[z]).to_event(1), obs=x_t)
        return z, None

    scan(step, z0, x[1:])


PARAMS = {
    "pi": np.array([0.6, 0.4]),
    "A": np.array([[0.85, 0.15], [0.2, 0.8]]),
    "mu": np.array([[-1.0, 0.5, 1.0], [1.5, -0.5, 0.0]]),
    "cov": np.array(
        [
            [[1.0, 0.4, -0.2], [0.4, 0.8, 0.1], [-0.2, 0.1, 0.6]],
            [[0.7, -0.3, 0.2], [-0.3, 1.2, 0.3], [0.2, 0.3, 0.9]],
        ]
    ),
}


def _diag_params():
    params = {k: v for k, v in PARAMS.items() if k != "cov"}
    params["sigma"] = np.sqrt(np.diagonal(PARAMS["cov"], axis1=-2, axis2=-1))
    return params


def _covariances(params):
    if "cov" in params:
        return np.asarray(params["cov"])
    return np.stack([np.diag(s**2) for s in np.asarray(params["sigma"])])


def sample_hmm(rng, num_steps, num_seqs, fraction, first_missing=True):
    """Draws from the full-covariance HMM; a fraction of entries set to NaN (some steps
    with nothing observed); with ``first_missing``, also entries of the first step."""
    z = np.zeros((num_steps, num_seqs), int)
    z[0] = rng.random(num_seqs) < PARAMS["pi"][1]
    for t in range(1, num_steps):
        z[t] = rng.random(num_seqs) < PARAMS["A"][z[t - 1], 1]
    x = np.stack(
        [[rng.multivariate_normal(PARAMS["mu"][k], PARAMS["cov"][k]) for k in row] for row in z]
    )
    missing = rng.random(x.shape) < fraction
    missing[3, 0] = True  # a step with nothing observed
    if not first_missing:
        missing[0] = False
    return np.where(missing, np.nan, x)


def reference_forward_backward(x, params):
    """Per sequence: log-likelihood and posterior state marginals (T, N, K), each
    step's emission the scipy density of its observed coordinates."""
    mu, cov = np.asarray(params["mu"]), _covariances(params)
    log_pi, log_A = np.log(params["pi"]), np.log(params["A"])
    num_steps, num_seqs, _ = x.shape
    total, post = 0.0, np.zeros((num_steps, num_seqs, K))
    for n in range(num_seqs):
        emission = np.zeros((num_steps, K))
        for t in range(num_steps):
            seen = ~np.isnan(x[t, n])
            if seen.any():
                for k in range(K):
                    emission[t, k] = multivariate_normal(
                        mu[k][seen], cov[k][np.ix_(seen, seen)]
                    ).logpdf(x[t, n][seen])
        alpha = np.zeros((num_steps, K))
        beta = np.zeros((num_steps, K))
        alpha[0] = log_pi + emission[0]
        for t in range(1, num_steps):
            alpha[t] = logsumexp(alpha[t - 1][:, None] + log_A, axis=0) + emission[t]
        for t in range(num_steps - 2, -1, -1):
            beta[t] = logsumexp(log_A + (emission[t + 1] + beta[t + 1])[None, :], axis=1)
        log_lik = logsumexp(alpha[-1])
        total += log_lik
        post[:, n] = np.exp(alpha + beta - log_lik)
    return total, post


def reference_impute(x, params, post):
    """sum_k p(z_t = k | data) E[x_missing | x_observed, z_t = k], per step and sequence."""
    mu, cov = np.asarray(params["mu"]), _covariances(params)
    filled = np.array(x)
    for t, n in zip(*np.nonzero(np.isnan(x).any(-1))):
        seen = ~np.isnan(x[t, n])
        mean = np.zeros(x.shape[-1])
        for k in range(K):
            cond = mu[k].copy()
            if seen.any():
                gain = np.linalg.solve(cov[k][np.ix_(seen, seen)], cov[k][seen][:, ~seen]).T
                cond[~seen] = mu[k][~seen] + gain @ (x[t, n][seen] - mu[k][seen])
            mean += post[t, n, k] * cond
        filled[t, n, ~seen] = mean[~seen]
    return filled


def _jnp(params):
    return {k: jnp.asarray(v) for k, v in params.items()}


MODELS = [(full_hmm, lambda: PARAMS), (diag_hmm, _diag_params)]
# The full-covariance HMM exercises everything the diagonal one does (and the
# conditional means); the diagonal one's fits run under -m slow, for CI time.
MODELS_DIAG_SLOW = [
    pytest.param(full_hmm, lambda: PARAMS, id="full"),
    pytest.param(diag_hmm, _diag_params, id="diag", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("first_missing", [False, True])
@pytest.mark.parametrize("model, params", MODELS, ids=["full", "diag"])
def test_log_likelihood_and_posterior_equal_the_reference(x64, rng, model, params, first_missing):
    params = params()
    x = sample_hmm(rng, 25, 3, 0.25, first_missing)
    ll = jaxem.log_likelihood(nan_as_missing(model), _jnp(params), jnp.asarray(x))
    ref_ll, ref_post = reference_forward_backward(x, params)
    np.testing.assert_allclose(float(ll), ref_ll, rtol=1e-8)
    post = jaxem.posterior(nan_as_missing(model), _jnp(params), jnp.asarray(x))
    np.testing.assert_allclose(post["z0"], ref_post[0], atol=1e-9)
    # Plate dims first: (N, T - 1, K).
    np.testing.assert_allclose(post["z"], np.swapaxes(ref_post[1:], 0, 1), atol=1e-9)
    grads = jax.grad(lambda p: jaxem.log_likelihood(nan_as_missing(model), p, jnp.asarray(x)))(
        _jnp(params)
    )
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads.values())


@pytest.mark.parametrize("model, params", MODELS_DIAG_SLOW)
def test_complete_data_equals_the_ordinary_path(x64, rng, model, params):
    params = _jnp(params())
    x = jnp.asarray(sample_hmm(rng, 20, 2, 0.0, first_missing=False)[:, :, :])
    x = jnp.where(jnp.isnan(x), 0.0, x)  # the forced empty step, filled
    wrapped = nan_as_missing(model)
    assert float(jaxem.log_likelihood(wrapped, params, x)) == float(
        jaxem.log_likelihood(model, params, x)
    )
    for name, value in jaxem.posterior(model, params, x).items():
        np.testing.assert_array_equal(jaxem.posterior(wrapped, params, x)[name], value)
    # Two EM steps through `update` (the compiled step alone: compiling `run` with its
    # after-fit checks for both models tripled this test's time).
    key = jax.random.PRNGKey(0)
    fits = []
    for em in (EM(model, reg_covar=0.0), EM(wrapped, reg_covar=0.0)):
        state, history = em.init(key, x, init_params=params), []
        for _ in range(2):
            state, ll = em.update(state, x)
            history.append(float(ll))
        fits.append((history, em.get_params(state)))
    (history, fitted), (history_wrapped, fitted_wrapped) = fits
    # Same kernels and statistics; the two programs differ in the (untaken) branch
    # for missing entries, so XLA may order a sum differently: last-bit equality.
    np.testing.assert_allclose(history_wrapped, history, rtol=1e-13)
    for name, value in fitted.items():
        np.testing.assert_allclose(fitted_wrapped[name], value, rtol=1e-12)


@pytest.mark.parametrize("model, params", MODELS_DIAG_SLOW)
def test_em_is_monotone_and_closed_form(x64, rng, model, params):
    x = sample_hmm(rng, 30, 3, 0.3)
    # The first step's site x0 never observes coordinate 1; the emission params it
    # shares with the scanned site x are estimated from the later steps.
    x[0, :, 1] = np.nan
    x = jnp.asarray(x)
    em = EM(nan_as_missing(model), reg_covar=0.0)
    paths = em.m_step_paths(x)
    assert all(p.startswith("closed-form") for p in paths.values()), paths
    init = _jnp(params())
    init["mu"] = init["mu"] + 0.3
    fit = em.run(jax.random.PRNGKey(0), x, max_iter=15, tol=0, init_params=init)
    history = np.asarray(fit.history)
    assert np.all(np.isfinite(history))
    assert np.all(np.diff(history) >= -1e-9 * np.abs(history[1:]))
    assert history[-1] > history[0] + 1.0
    # The history is the observed-data log-likelihood of the reference.
    np.testing.assert_allclose(
        float(jaxem.log_likelihood(nan_as_missing(model), fit.params, x)),
        reference_forward_backward(np.asarray(x), jax.tree.map(np.asarray, fit.params))[0],
        rtol=1e-8,
    )


@pytest.mark.parametrize("model, params", MODELS, ids=["full", "diag"])
def test_impute_is_the_posterior_mean_of_the_conditional_means(x64, rng, model, params):
    params = params()
    x = sample_hmm(rng, 20, 2, 0.3)
    filled = jaxem.impute(nan_as_missing(model), _jnp(params), jnp.asarray(x))
    _, post = reference_forward_backward(x, params)
    ref = reference_impute(x, params, post)
    np.testing.assert_allclose(filled["x0"], ref[0], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(filled["x"], ref[1:], rtol=1e-9, atol=1e-12)


def test_a_coordinate_missing_at_every_step_is_marginalized_but_not_fitted(x64, rng):
    x = sample_hmm(rng, 12, 2, 0.2)
    x[:, :, 1] = np.nan
    model = nan_as_missing(full_hmm)
    ll = jaxem.log_likelihood(model, _jnp(PARAMS), jnp.asarray(x))
    np.testing.assert_allclose(float(ll), reference_forward_backward(x, PARAMS)[0], rtol=1e-8)
    message = (
        r"coordinate\(s\) \[1\] of the MultivariateNormal site\(s\) 'x', 'x0' are missing in "
        r"every row of every site that param\(s\) 'cov', 'mu' reach"
    )
    with pytest.raises(jaxem.ModelError, match=message):
        EM(model).run(jax.random.PRNGKey(0), jnp.asarray(x), max_iter=2)


def test_impute_draws_the_states_of_a_sequence_jointly(x64):
    # Three steps; coordinate 0 is missing at every step and separates the states
    # (means -4 and 4, sd 0.1), so the sign of its draw tells the state it was drawn
    # under. Coordinates 1 and 2 are observed and weakly informative; with a sticky
    # chain the states' joint posterior is far from the product of their marginals.
    params = {
        "pi": np.array([0.55, 0.45]),
        "A": np.array([[0.9, 0.1], [0.15, 0.85]]),
        "mu": np.array([[-4.0, 0.0, 0.3], [4.0, 0.4, 0.0]]),
        "cov": np.stack([np.diag([0.01, 1.0, 1.0]), np.diag([0.01, 0.8, 1.2])]),
    }
    sequence = np.array([[np.nan, 0.3, -0.2], [np.nan, 0.5, 0.6], [np.nan, -0.4, 0.1]])
    num_draws = 4000
    x = np.repeat(sequence[:, None], num_draws, axis=1)  # independent copies
    draws = jaxem.impute(
        nan_as_missing(full_hmm), _jnp(params), jnp.asarray(x), rng_key=jax.random.PRNGKey(7)
    )
    states = np.concatenate([draws["x0"][None], draws["x"]])[..., 0] > 0  # (3, draws)
    np.testing.assert_array_equal(draws["x"][..., 1:], x[1:, :, 1:])
    # Brute force over the 8 paths.
    emission = np.array(
        [
            [
                multivariate_normal(params["mu"][k][1:], params["cov"][k][1:, 1:]).logpdf(row[1:])
                for k in range(K)
            ]
            for row in sequence
        ]
    )
    paths = np.array(np.meshgrid(*[range(K)] * 3, indexing="ij")).reshape(3, -1).T
    log_joint = [
        np.log(params["pi"][a])
        + np.log(params["A"][a, b])
        + np.log(params["A"][b, c])
        + emission[0, a]
        + emission[1, b]
        + emission[2, c]
        for a, b, c in paths
    ]
    expected = np.exp(log_joint - logsumexp(log_joint))
    counts = np.array([np.mean(np.all(states.T == path, axis=1)) for path in paths])
    std_error = np.sqrt(expected * (1 - expected) / num_draws)
    assert np.all(np.abs(counts - expected) < 5 * std_error), (counts, expected)
    # Draws of the states one step at a time, from their marginals, would not do.
    marginals = [np.sum(expected[paths[:, t] == 1]) for t in range(3)]
    independent = np.prod(
        [np.where(paths[:, t] == 1, marginals[t], 1 - marginals[t]) for t in range(3)], axis=0
    )
    assert np.max(np.abs(independent - expected) / std_error) > 20
