"""Markov chains written with ``numpyro.contrib.control_flow.scan``.

References: brute-force enumeration over all K^T paths (log-likelihood, per-step and
pairwise posteriors, the MAP path), hmmlearn (Viterbi, and EM iterations from the same
initial parameters), and a model's single sequences for padded batches.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from hmmlearn import hmm
from numpyro.contrib.control_flow import scan
from numpyro.distributions import constraints
from scipy import stats
from test_brute_force import brute_force

import jaxem
from jaxem import EM, ModelError
from jaxem.chain import arrange_factor, find_chain
from jaxem.estep import e_step
from jaxem.inspection import inspect_model

K = 3


# --- models -----------------------------------------------------------------------------


def two_emissions_hmm(x, c):
    """N sequences (plate), an initial state outside the scan, two observed sites per step."""
    pi = numpyro.param("pi", jnp.ones(K) / K, constraint=constraints.simplex)
    A = numpyro.param("A", jnp.ones((K, K)) / K, constraint=constraints.simplex)
    mu = numpyro.param("mu", jnp.zeros(K))
    sigma = numpyro.param("sigma", jnp.ones(K), constraint=constraints.positive)
    rate = numpyro.param("rate", jnp.ones(K), constraint=constraints.positive)
    with numpyro.plate("seqs", x.shape[1]):
        z0 = numpyro.sample("z0", dist.Categorical(pi))
        numpyro.sample("x0", dist.Normal(mu[z0], sigma[z0]), obs=x[0])
        numpyro.sample("c0", dist.Poisson(rate[z0]), obs=c[0])

    def step(z_prev, xc):
        x_t, c_t = xc
        with numpyro.plate("seqs", x.shape[1]):
            z = numpyro.sample("z", dist.Categorical(A[z_prev]))
            numpyro.sample("x", dist.Normal(mu[z], sigma[z]), obs=x_t)
            numpyro.sample("c", dist.Poisson(rate[z]), obs=c_t)
        return z, None

    scan(step, z0, (x[1:], c[1:]))


def start_row_hmm(x):
    """No latent outside the scan: the carry starts at an extra row of the transition
    matrix (the initial distribution); several observations per step in a nested plate."""
    A = numpyro.param("A", jnp.ones((3, 2)) / 2, constraint=constraints.simplex)
    mu = numpyro.param("mu", jnp.array([-1.0, 1.0]))

    def step(z_prev, x_t):
        z = numpyro.sample("z", dist.Categorical(A[z_prev]))
        with numpyro.plate("obs", x.shape[1]):
            numpyro.sample("x", dist.Normal(mu[z], 1.0), obs=x_t)
        return z, None

    scan(step, jnp.array(2), x)


def gaussian_hmm(x, mask=None):
    """Diagonal-covariance Gaussian HMM over x of shape (T, N, D); ``mask`` (T, N) marks
    the real steps of padded sequences."""
    num_states, dim = 3, x.shape[-1]
    pi = numpyro.param("pi", jnp.ones(num_states) / num_states, constraint=constraints.simplex)
    A = numpyro.param(
        "A", jnp.ones((num_states, num_states)) / num_states, constraint=constraints.simplex
    )
    mu = numpyro.param("mu", jnp.zeros((num_states, dim)))
    sigma = numpyro.param("sigma", jnp.ones((num_states, dim)), constraint=constraints.positive)
    mask = jnp.ones(x.shape[:2], bool) if mask is None else mask
    with numpyro.plate("seqs", x.shape[1]):
        z0 = numpyro.sample("z0", dist.Categorical(pi))
        numpyro.sample("x0", dist.Normal(mu[z0], sigma[z0]).to_event(1), obs=x[0])

    def step(z_prev, inputs):
        x_t, m_t = inputs
        with numpyro.plate("seqs", x.shape[1]), numpyro.handlers.mask(mask=m_t):
            z = numpyro.sample("z", dist.Categorical(A[z_prev]))
            numpyro.sample("x", dist.Normal(mu[z], sigma[z]).to_event(1), obs=x_t)
        return z, None

    scan(step, z0, (x[1:], mask[1:]))


def full_cov_hmm(x):
    """Full-covariance Gaussian HMM over x of shape (T, D), one sequence."""
    num_states, dim = 3, x.shape[-1]
    pi = numpyro.param("pi", jnp.ones(num_states) / num_states, constraint=constraints.simplex)
    A = numpyro.param(
        "A", jnp.ones((num_states, num_states)) / num_states, constraint=constraints.simplex
    )
    mu = numpyro.param("mu", jnp.zeros((num_states, dim)))
    cov = numpyro.param(
        "cov",
        jnp.broadcast_to(jnp.eye(dim), (num_states, dim, dim)),
        constraint=constraints.positive_definite,
    )
    z0 = numpyro.sample("z0", dist.Categorical(pi))
    numpyro.sample("x0", dist.MultivariateNormal(mu[z0], covariance_matrix=cov[z0]), obs=x[0])

    def step(z_prev, x_t):
        z = numpyro.sample("z", dist.Categorical(A[z_prev]))
        numpyro.sample("x", dist.MultivariateNormal(mu[z], covariance_matrix=cov[z]), obs=x_t)
        return z, None

    scan(step, z0, x[1:])


def categorical_hmm(y, num_symbols=4):
    """Categorical emissions over y of shape (T, N)."""
    pi = numpyro.param("pi", jnp.ones(K) / K, constraint=constraints.simplex)
    A = numpyro.param("A", jnp.ones((K, K)) / K, constraint=constraints.simplex)
    B = numpyro.param("B", jnp.ones((K, num_symbols)) / num_symbols, constraint=constraints.simplex)
    with numpyro.plate("seqs", y.shape[1]):
        z0 = numpyro.sample("z0", dist.Categorical(pi))
        numpyro.sample("y0", dist.Categorical(B[z0]), obs=y[0])

    def step(z_prev, y_t):
        with numpyro.plate("seqs", y.shape[1]):
            z = numpyro.sample("z", dist.Categorical(A[z_prev]))
            numpyro.sample("y", dist.Categorical(B[z]), obs=y_t)
        return z, None

    scan(step, z0, y[1:])


# --- brute force ------------------------------------------------------------------------


def _two_emissions_case():
    params = {
        "pi": np.array([0.5, 0.3, 0.2]),
        "A": np.array([[0.7, 0.2, 0.1], [0.25, 0.6, 0.15], [0.2, 0.3, 0.5]]),
        "mu": np.array([-1.5, 0.3, 2.0]),
        "sigma": np.array([0.8, 1.1, 0.6]),
        "rate": np.array([0.5, 2.0, 4.0]),
    }
    x = np.array([[-1.2, 2.1], [0.4, 1.7], [1.9, -0.3], [-1.0, 0.2]])  # (T=4, N=2)
    c = np.array([[0, 4], [2, 3], [5, 1], [1, 0]])

    def log_joint(z):
        path = np.concatenate([z["z0"][:, None], z["z"]], axis=1)  # (C, T, N)
        p = params
        lp = np.log(p["pi"][path[:, 0]]).sum(-1)
        lp += np.log(p["A"][path[:, :-1], path[:, 1:]]).sum((-1, -2))
        lp += stats.norm.logpdf(x, p["mu"][path], p["sigma"][path]).sum((-1, -2))
        return lp + stats.poisson.logpmf(c, p["rate"][path]).sum((-1, -2))

    latents = {"z0": ((2,), K), "z": ((3, 2), K)}
    return params, (x, c), latents, log_joint


def _pairwise(latents, log_joint):
    """Brute-force p(z_{t-1} = i, z_t = j) for the scanned steps, (T - 1, N, K, K)."""
    import itertools

    from scipy.special import logsumexp

    num_steps, num_seqs = latents["z"][0]
    configs = np.array(list(itertools.product(range(K), repeat=num_seqs * (num_steps + 1))))
    z0 = configs[:, :num_seqs]
    zs = configs[:, num_seqs:].reshape(-1, num_steps, num_seqs)
    lj = log_joint({"z0": z0, "z": zs})
    w = np.exp(lj - logsumexp(lj))
    path = np.concatenate([z0[:, None], zs], axis=1)
    out = np.zeros((num_steps, num_seqs, K, K))
    for t in range(1, num_steps):
        for n in range(num_seqs):
            np.add.at(out[t, n], (path[:, t, n], path[:, t + 1, n]), w)
    return out[1:]


def test_chain_against_brute_force(x64):
    params, args, latents, log_joint = _two_emissions_case()
    expected_ll, expected_post, _, best = brute_force(latents, log_joint)
    p = {k: jnp.asarray(v) for k, v in params.items()}
    jargs = tuple(jnp.asarray(a) for a in args)
    np.testing.assert_allclose(
        float(jaxem.log_likelihood(two_emissions_hmm, p, *jargs)), expected_ll, rtol=1e-10
    )
    post = jaxem.posterior(two_emissions_hmm, p, *jargs)
    assert post["z"].shape == (2, 3, K)  # (sequences, steps, states)
    np.testing.assert_allclose(post["z"], np.moveaxis(expected_post["z"], 0, 1), atol=1e-10)
    np.testing.assert_allclose(post["z0"], expected_post["z0"], atol=1e-10)

    # Pairwise posteriors from the marginal of the transition factor, both contractions.
    structure, _ = inspect_model(two_emissions_hmm, jax.random.PRNGKey(0), jargs, {})
    nesting = structure.max_plate_nesting
    expected_pairs = _pairwise(latents, log_joint)
    for parallel in (False, True):

        @functools.partial(jax.jit, static_argnums=2)
        def ll_and_pairs(p, args, parallel):
            result = e_step(two_emissions_hmm, p, args, {}, nesting, parallel=parallel)
            chain = find_chain(result.trace)
            names = [chain.time, chain.first, chain.name]
            site = result.trace.sites["z"]
            return result.log_likelihood, arrange_factor(result.marginals["z"], site, names, chain)

        ll, pairs = ll_and_pairs(p, jargs, parallel)
        np.testing.assert_allclose(float(ll), expected_ll, rtol=1e-10)
        # The transition factor is the same at every step, so its marginal is the
        # pairwise posterior summed over the steps: the expected transition counts.
        assert pairs.shape == (2, 1, K, K)
        np.testing.assert_allclose(pairs[:, 0], expected_pairs.sum(0), atol=1e-10)

    # Viterbi = the brute-force joint argmax.
    decoded = jaxem.map_assignment(two_emissions_hmm, p, *jargs)
    np.testing.assert_array_equal(decoded["z"], best["z"])
    np.testing.assert_array_equal(decoded["z0"], best["z0"])


def test_chain_without_initial_latent_against_brute_force(x64):
    params = {"A": np.array([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4]]), "mu": np.array([-0.7, 1.1])}
    x = np.array([[-1.0, 0.2], [0.5, 1.4], [1.8, 0.9], [-0.2, -1.1], [0.3, 0.8]])  # (T, 2 obs)

    def log_joint(z):
        path = z["z"]  # (C, T)
        prev = np.concatenate([np.full((path.shape[0], 1), 2), path[:, :-1]], axis=1)
        lp = np.log(params["A"][prev, path]).sum(-1)
        return lp + stats.norm.logpdf(x, params["mu"][path][..., None], 1.0).sum((-1, -2))

    latents = {"z": ((5,), 2)}
    expected_ll, expected_post, _, best = brute_force(latents, log_joint)
    p = {k: jnp.asarray(v) for k, v in params.items()}
    xj = jnp.asarray(x)
    np.testing.assert_allclose(
        float(jaxem.log_likelihood(start_row_hmm, p, xj)), expected_ll, rtol=1e-10
    )
    post = jaxem.posterior(start_row_hmm, p, xj)["z"]
    np.testing.assert_allclose(post, expected_post["z"], atol=1e-10)
    np.testing.assert_array_equal(jaxem.map_assignment(start_row_hmm, p, xj)["z"], best["z"])


# --- hmmlearn ---------------------------------------------------------------------------


def _gaussian_data(num_steps, num_seqs, seed=0):
    gen = hmm.GaussianHMM(3, "diag")
    gen.startprob_ = np.array([0.5, 0.3, 0.2])
    gen.transmat_ = np.array([[0.85, 0.1, 0.05], [0.1, 0.8, 0.1], [0.1, 0.15, 0.75]])
    gen.means_ = np.array([[-2.0, 0.0], [0.0, 2.0], [2.0, -1.0]])
    gen.covars_ = np.array([[1.0, 0.5], [0.7, 1.2], [0.4, 0.6]])
    return [gen.sample(num_steps, random_state=seed + i)[0] for i in range(num_seqs)]


_GAUSSIAN_INIT = {
    "pi": np.array([0.4, 0.3, 0.3]),
    "A": np.full((3, 3), 0.2) + 0.4 * np.eye(3),
    "mu": np.array([[-1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]),
    "sigma": np.ones((3, 2)),
}


def test_viterbi_equals_hmmlearn_decode(x64):
    (seq,) = _gaussian_data(200, 1, seed=5)
    ref = hmm.GaussianHMM(3, "diag")
    ref.startprob_, ref.transmat_ = _GAUSSIAN_INIT["pi"], _GAUSSIAN_INIT["A"]
    ref.means_, ref.covars_ = _GAUSSIAN_INIT["mu"], _GAUSSIAN_INIT["sigma"] ** 2
    log_prob, states = ref.decode(seq, algorithm="viterbi")
    p = {k: jnp.asarray(v) for k, v in _GAUSSIAN_INIT.items()}
    decoded = jaxem.map_assignment(gaussian_hmm, p, jnp.asarray(seq[:, None]))
    path = np.concatenate([np.asarray(decoded["z0"]), np.asarray(decoded["z"])[:, 0]])
    np.testing.assert_array_equal(path, states)


@pytest.mark.parametrize("num_steps, num_seqs", [(300, 1), (40, 6)])
def test_gaussian_hmm_em_equals_hmmlearn(x64, num_steps, num_seqs):
    seqs = _gaussian_data(num_steps, num_seqs)
    x = jnp.asarray(np.stack(seqs, axis=1))
    num_iters = 8
    result = EM(gaussian_hmm, reg_covar=0.0).run(
        jax.random.PRNGKey(0),
        x,
        max_iter=num_iters,
        tol=0.0,
        init_params={k: jnp.asarray(v) for k, v in _GAUSSIAN_INIT.items()},
    )
    ref = hmm.GaussianHMM(
        3, "diag", init_params="", n_iter=num_iters, tol=0, covars_prior=0, covars_weight=0
    )
    ref.startprob_, ref.transmat_ = _GAUSSIAN_INIT["pi"], _GAUSSIAN_INIT["A"]
    ref.means_, ref.covars_ = _GAUSSIAN_INIT["mu"], _GAUSSIAN_INIT["sigma"] ** 2
    data, lengths = np.concatenate(seqs), [num_steps] * num_seqs
    ref.fit(data, lengths=lengths)
    np.testing.assert_allclose(result.history, list(ref.monitor_.history), rtol=1e-9)
    np.testing.assert_allclose(result.log_likelihood, ref.score(data, lengths), rtol=1e-9)
    np.testing.assert_allclose(result.params["pi"], ref.startprob_, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(result.params["A"], ref.transmat_, rtol=1e-6)
    np.testing.assert_allclose(result.params["mu"], ref.means_, rtol=1e-6)
    np.testing.assert_allclose(result.params["sigma"] ** 2, ref._covars_, rtol=1e-6)


def test_full_covariance_hmm_em_equals_hmmlearn(x64):
    rng = np.random.default_rng(3)
    gen = hmm.GaussianHMM(3, "full")
    gen.startprob_ = np.array([0.6, 0.3, 0.1])
    gen.transmat_ = np.array([[0.8, 0.15, 0.05], [0.1, 0.8, 0.1], [0.2, 0.1, 0.7]])
    gen.means_ = rng.normal(size=(3, 3)) * 2
    factors = rng.normal(size=(3, 3, 3)) * 0.5
    gen.covars_ = factors @ np.swapaxes(factors, -1, -2) + 0.3 * np.eye(3)
    seq, _ = gen.sample(250, random_state=0)
    init = {
        "pi": np.full(3, 1 / 3),
        "A": np.full((3, 3), 0.1) + 0.7 * np.eye(3),
        "mu": seq[[0, 100, 200]],
        "cov": np.broadcast_to(np.cov(seq.T), (3, 3, 3)).copy(),
    }
    num_iters = 6
    result = EM(full_cov_hmm, reg_covar=0.0).run(
        jax.random.PRNGKey(0),
        jnp.asarray(seq),
        max_iter=num_iters,
        tol=0.0,
        init_params={k: jnp.asarray(v) for k, v in init.items()},
    )
    ref = hmm.GaussianHMM(
        3, "full", init_params="", n_iter=num_iters, tol=0, covars_prior=0, covars_weight=0
    )
    ref.startprob_, ref.transmat_, ref.means_, ref.covars_ = (
        init["pi"],
        init["A"],
        init["mu"],
        init["cov"],
    )
    ref.fit(seq)
    np.testing.assert_allclose(result.history, list(ref.monitor_.history), rtol=1e-9)
    np.testing.assert_allclose(result.params["A"], ref.transmat_, rtol=1e-6)
    np.testing.assert_allclose(result.params["mu"], ref.means_, rtol=1e-6)
    np.testing.assert_allclose(result.params["cov"], ref.covars_, rtol=1e-6)


@pytest.mark.parametrize("num_steps, num_seqs", [(400, 1), (30, 10)])
def test_categorical_hmm_em_equals_hmmlearn(x64, num_steps, num_seqs):
    gen = hmm.CategoricalHMM(3)
    gen.startprob_ = np.array([0.5, 0.25, 0.25])
    gen.transmat_ = np.array([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.05, 0.15, 0.8]])
    gen.emissionprob_ = np.array(
        [[0.7, 0.1, 0.1, 0.1], [0.1, 0.6, 0.2, 0.1], [0.05, 0.05, 0.2, 0.7]]
    )
    seqs = [gen.sample(num_steps, random_state=i)[0][:, 0] for i in range(num_seqs)]
    init = {
        "pi": np.array([0.3, 0.3, 0.4]),
        "A": np.full((3, 3), 0.2) + 0.4 * np.eye(3),
        "B": np.array([[0.4, 0.2, 0.2, 0.2], [0.2, 0.4, 0.2, 0.2], [0.2, 0.2, 0.3, 0.3]]),
    }
    num_iters = 8
    result = EM(categorical_hmm).run(
        jax.random.PRNGKey(0),
        jnp.asarray(np.stack(seqs, axis=1)),
        max_iter=num_iters,
        tol=0.0,
        init_params={k: jnp.asarray(v) for k, v in init.items()},
    )
    ref = hmm.CategoricalHMM(3, init_params="", n_iter=num_iters, tol=0, n_features=4)
    ref.startprob_, ref.transmat_, ref.emissionprob_ = init["pi"], init["A"], init["B"]
    ref.fit(np.concatenate(seqs)[:, None], lengths=[num_steps] * num_seqs)
    np.testing.assert_allclose(result.history, list(ref.monitor_.history), rtol=1e-9)
    np.testing.assert_allclose(result.params["pi"], ref.startprob_, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(result.params["A"], ref.transmat_, rtol=1e-6)
    np.testing.assert_allclose(result.params["B"], ref.emissionprob_, rtol=1e-6)


# --- sequences of different lengths -----------------------------------------------------


def test_padded_sequences_equal_separate_sequences_and_hmmlearn(x64):
    lengths = [30, 18, 25]
    seqs = _gaussian_data(30, 3, seed=11)
    seqs = [s[:n] for s, n in zip(seqs, lengths)]
    x = np.full((30, 3, 2), 1e3)  # padding: finite, far from the data, masked out
    mask = np.zeros((30, 3), bool)
    for i, s in enumerate(seqs):
        x[: len(s), i], mask[: len(s), i] = s, True
    p = {k: jnp.asarray(v) for k, v in _GAUSSIAN_INIT.items()}
    xj, mj = jnp.asarray(x), jnp.asarray(mask)

    ref = hmm.GaussianHMM(3, "diag")
    ref.startprob_, ref.transmat_ = _GAUSSIAN_INIT["pi"], _GAUSSIAN_INIT["A"]
    ref.means_, ref.covars_ = _GAUSSIAN_INIT["mu"], _GAUSSIAN_INIT["sigma"] ** 2
    separate = sum(ref.score(s) for s in seqs)
    ll = jaxem.log_likelihood(gaussian_hmm, p, xj, mj)
    np.testing.assert_allclose(float(ll), separate, rtol=1e-10)
    grads = jax.grad(lambda q: jaxem.log_likelihood(gaussian_hmm, q, xj, mj))(p)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads.values())
    post = jaxem.posterior(gaussian_hmm, p, xj, mj)["z"]  # (3, 29, K): padded steps are zero
    np.testing.assert_allclose(post.sum(-1), mask[1:].T.astype(float), atol=1e-12)
    decoded = jaxem.map_assignment(gaussian_hmm, p, xj, mj)
    for i, s in enumerate(seqs):
        path = np.concatenate([decoded["z0"][i : i + 1], decoded["z"][: len(s) - 1, i]])
        np.testing.assert_array_equal(path, ref.decode(s)[1])

    num_iters = 5
    result = EM(gaussian_hmm, reg_covar=0.0).run(
        jax.random.PRNGKey(0), xj, mj, max_iter=num_iters, tol=0.0, init_params=p
    )
    ref = hmm.GaussianHMM(
        3, "diag", init_params="", n_iter=num_iters, tol=0, covars_prior=0, covars_weight=0
    )
    ref.startprob_, ref.transmat_ = _GAUSSIAN_INIT["pi"], _GAUSSIAN_INIT["A"]
    ref.means_, ref.covars_ = _GAUSSIAN_INIT["mu"], _GAUSSIAN_INIT["sigma"] ** 2
    ref.fit(np.concatenate(seqs), lengths=lengths)
    np.testing.assert_allclose(result.history, list(ref.monitor_.history), rtol=1e-9)
    np.testing.assert_allclose(result.params["A"], ref.transmat_, rtol=1e-6)
    np.testing.assert_allclose(result.params["sigma"] ** 2, ref._covars_, rtol=1e-6)


# --- errors -----------------------------------------------------------------------------


def _history_two(x):
    A = numpyro.param("A", jnp.ones((2, 2)) / 2, constraint=constraints.simplex)

    def step(z_prev, x_t):
        z = numpyro.sample("z", dist.Categorical(A[z_prev]))
        numpyro.sample("x", dist.Normal(z, 1.0), obs=x_t)
        return z, None

    scan(step, 0, x, history=2)


def _two_latents_per_step(x):
    A = numpyro.param("A", jnp.ones((2, 2)) / 2, constraint=constraints.simplex)

    def step(carry, x_t):
        z = numpyro.sample("z", dist.Categorical(A[carry[0]]))
        w = numpyro.sample("w", dist.Categorical(A[carry[1]]))
        numpyro.sample("x", dist.Normal(z + w, 1.0), obs=x_t)
        return (z, w), None

    scan(step, (0, 0), x)


def _shared_initial_state(x):
    pi = numpyro.param("pi", jnp.ones(2) / 2, constraint=constraints.simplex)
    A = numpyro.param("A", jnp.ones((2, 2)) / 2, constraint=constraints.simplex)
    z0 = numpyro.sample("z0", dist.Categorical(pi))

    def step(z_prev, x_t):
        with numpyro.plate("seqs", x.shape[1]):
            z = numpyro.sample("z", dist.Categorical(A[z_prev]))
            numpyro.sample("x", dist.Normal(z, 1.0), obs=x_t)
        return z, None

    scan(step, z0 * jnp.ones(x.shape[1], jnp.int32), x)


def _factor_in_the_body(x):
    A = numpyro.param("A", jnp.ones((2, 2)) / 2, constraint=constraints.simplex)

    def step(z_prev, x_t):
        z = numpyro.sample("z", dist.Categorical(A[z_prev]))
        numpyro.sample("x", dist.Normal(z, 1.0), obs=x_t)
        # A "sticky" bonus on staying in a state: NumPyro's scan mislabels its dims.
        numpyro.factor("sticky", 0.5 * (z == z_prev))
        return z, None

    scan(step, 0, x)


@pytest.mark.parametrize(
    "model, x, message",
    [
        (_history_two, jnp.zeros(5), "history > 1"),
        (_factor_in_the_body, jnp.zeros(5), "numpyro.factor 'sticky' is inside the scan body"),
        (_two_latents_per_step, jnp.zeros(5), "latent sites ['w', 'z']"),
        (_shared_initial_state, jnp.zeros((5, 3)), "initial state 'z0' is shared"),
    ],
)
def test_unsupported_chains_are_rejected(model, x, message):
    params = {"A": jnp.ones((2, 2)) / 2, "pi": jnp.ones(2) / 2}
    with pytest.raises(ModelError, match=message.replace("[", r"\[").replace("]", r"\]")):
        jaxem.log_likelihood(model, params, x)


# --- a carry that changes: the steps run in lax.scan -------------------------------------


def ar_hmm(x):
    """Autoregressive HMM: the carry holds the previous observation, so the steps cannot be
    evaluated all at once; ``phi`` reaches the emission through a product (gradient path)."""
    pi = numpyro.param("pi", jnp.ones(2) / 2, constraint=constraints.simplex)
    A = numpyro.param("A", jnp.array([[0.8, 0.2], [0.3, 0.7]]), constraint=constraints.simplex)
    phi = numpyro.param("phi", jnp.array([0.2, 0.8]))
    sigma = numpyro.param("sigma", jnp.ones(()), constraint=constraints.positive)
    z0 = numpyro.sample("z0", dist.Categorical(pi))
    numpyro.sample("x0", dist.Normal(0.0, sigma), obs=x[0])

    def step(carry, x_t):
        z_prev, x_prev = carry
        z = numpyro.sample("z", dist.Categorical(A[z_prev]))
        numpyro.sample("x", dist.Normal(phi[z] * x_prev, sigma), obs=x_t)
        return (z, x_t), None

    scan(step, (z0, x[0]), x[1:])


def test_autoregressive_chain_against_brute_force(x64):
    params = {
        "pi": np.array([0.6, 0.4]),
        "A": np.array([[0.8, 0.2], [0.3, 0.7]]),
        "phi": np.array([-0.5, 0.9]),
        "sigma": np.array(0.7),
    }
    x = np.array([0.3, -0.4, 0.9, 1.1, 0.2])

    def log_joint(z):
        path = np.concatenate([z["z0"][:, None], z["z"]], axis=1)  # (C, T)
        lp = np.log(params["pi"][path[:, 0]]) + stats.norm.logpdf(x[0], 0.0, params["sigma"])
        lp = lp + np.log(params["A"][path[:, :-1], path[:, 1:]]).sum(-1)
        loc = params["phi"][path[:, 1:]] * x[:-1]
        return lp + stats.norm.logpdf(x[1:], loc, params["sigma"]).sum(-1)

    latents = {"z0": ((), 2), "z": ((4,), 2)}
    expected_ll, expected_post, _, best = brute_force(latents, log_joint)
    p = {k: jnp.asarray(v) for k, v in params.items()}
    xj = jnp.asarray(x)
    np.testing.assert_allclose(float(jaxem.log_likelihood(ar_hmm, p, xj)), expected_ll, rtol=1e-10)
    post = jaxem.posterior(ar_hmm, p, xj)
    np.testing.assert_allclose(post["z"], expected_post["z"], atol=1e-10)
    decoded = jaxem.map_assignment(ar_hmm, p, xj)
    np.testing.assert_array_equal(decoded["z"], best["z"])


# --- log-likelihood never decreases --------------------------------------------------------


def poisson_hmm(c):
    pi = numpyro.param("pi", jnp.ones(2) / 2, constraint=constraints.simplex)
    A = numpyro.param("A", jnp.array([[0.7, 0.3], [0.3, 0.7]]), constraint=constraints.simplex)
    rate = numpyro.param("rate", jnp.array([1.0, 3.0]), constraint=constraints.positive)
    z0 = numpyro.sample("z0", dist.Categorical(pi))
    numpyro.sample("c0", dist.Poisson(rate[z0]), obs=c[0])

    def step(z_prev, c_t):
        z = numpyro.sample("z", dist.Categorical(A[z_prev]))
        numpyro.sample("c", dist.Poisson(rate[z]), obs=c_t)
        return z, None

    scan(step, z0, c[1:])


@pytest.mark.parametrize(
    "model, data, options",
    [
        (ar_hmm, "ar", {}),
        (poisson_hmm, "counts", {"hard": True}),
        (two_emissions_hmm, "two", {"chain_contraction": "parallel"}),
    ],
)
def test_log_likelihood_never_decreases(x64, model, data, options):
    rng = np.random.default_rng(7)
    if data == "ar":
        args = (jnp.asarray(np.cumsum(rng.normal(size=60)) * 0.3),)
    elif data == "counts":
        args = (jnp.asarray(np.concatenate([rng.poisson(1.0, 40), rng.poisson(6.0, 40)])),)
    else:
        x = np.concatenate([rng.normal(-1.5, 1.0, (20, 4)), rng.normal(1.5, 1.0, (20, 4))])
        c = rng.poisson(np.where(x > 0, 4.0, 1.0))
        args = (jnp.asarray(x), jnp.asarray(c))
    result = EM(model, **options).run(jax.random.PRNGKey(0), *args, max_iter=15, tol=0.0)
    history = np.asarray(result.history)
    assert np.all(np.isfinite(history))
    assert np.all(np.diff(history) >= -1e-9 * np.abs(history[1:])), history
    assert history[-1] > history[0]


def test_parallel_contraction_of_a_long_chain_in_float32():
    # A product of many steps spans thousands of nats: the parallel reduction must not
    # underflow where the sequential pass (normalized at every step) does not.
    seqs = _gaussian_data(400, 3, seed=2)
    x = jnp.asarray(np.stack(seqs, axis=1), jnp.float32)
    p = {k: jnp.asarray(v, jnp.float32) for k, v in _GAUSSIAN_INIT.items()}
    structure, _ = inspect_model(gaussian_hmm, jax.random.PRNGKey(0), (x,), {})

    @functools.partial(jax.jit, static_argnums=1)
    def log_lik(p, parallel):
        return e_step(
            gaussian_hmm, p, (x,), {}, structure.max_plate_nesting, parallel=parallel
        ).log_likelihood

    ref = hmm.GaussianHMM(3, "diag")
    ref.startprob_, ref.transmat_ = _GAUSSIAN_INIT["pi"], _GAUSSIAN_INIT["A"]
    ref.means_, ref.covars_ = _GAUSSIAN_INIT["mu"], _GAUSSIAN_INIT["sigma"] ** 2
    expected = ref.score(np.concatenate(seqs), [400] * 3)
    for parallel in (False, True):
        np.testing.assert_allclose(float(log_lik(p, parallel)), expected, rtol=1e-5)


def test_impossible_transitions_give_finite_posteriors(x64):
    # Transition probabilities of exactly 0 make some cells of the parallel reduction
    # sums of -inf only; their gradient (a posterior) must be 0, not NaN.
    params, args, _, _ = _two_emissions_case()
    params = dict(params, A=np.array([[0.7, 0.3, 0.0], [0.0, 0.6, 0.4], [0.2, 0.0, 0.8]]))
    p = {k: jnp.asarray(v) for k, v in params.items()}
    jargs = tuple(jnp.asarray(a) for a in args)

    @functools.partial(jax.jit, static_argnums=1)
    def marginals(p, parallel):
        result = e_step(two_emissions_hmm, p, jargs, {}, 1, parallel=parallel)
        return result.log_likelihood, result.marginals

    ll_seq, seq = marginals(p, False)
    ll_par, par = marginals(p, True)
    np.testing.assert_allclose(float(ll_par), float(ll_seq), rtol=1e-10)
    for name in seq:
        assert bool(jnp.all(jnp.isfinite(par[name]))), name
        np.testing.assert_allclose(par[name], seq[name], atol=1e-10, err_msg=name)


@pytest.mark.parametrize("case", ["emissions over time", "time-invariant emission", "narrow"])
def test_scaled_forward_pass_equals_the_log_space_contraction(x64, case):
    """The scan's scaled forward pass and its smoother give the value and the
    gradient (the posterior of every factor) of the log-space tree contraction,
    for every kind of step factor: a time-invariant transition, one varying over
    time, emissions varying over time or not, padded steps. With a narrow
    emission that favours a state the chain cannot reach, the fast pass
    underflows and the log-space pass takes over."""
    from jaxem.forward_backward import log_z_by_scan, log_z_by_tree

    K, T, N = 3, 7, 2
    keys = jax.random.split(jax.random.PRNGKey(3), 5)
    alpha = jax.random.normal(keys[0], (N, K))
    transition = jnp.log(jax.nn.softmax(jax.random.normal(keys[1], (1, 1, K, K)), -1))
    emission = 3.0 * jax.random.normal(keys[3], (T - 1, N, 1, K))
    if case == "narrow":
        # The chains start in state 0 and never leave it.
        alpha = alpha.at[:, 1:].set(-jnp.inf)
        transition = transition.at[..., 0, 1:].set(-jnp.inf)
        emission = emission.at[..., 1:].add(800.0)
    steps = (transition, 0.5 * jax.random.normal(keys[2], (T - 1, N, K, K)))
    if case == "time-invariant emission":
        steps = steps + (jax.random.normal(keys[4], (1, 1, 1, K)),)
    else:
        steps = steps + (emission, jax.random.normal(keys[4], (1, 1, 1, K)))
    shape = (T - 1, N, K, K)
    mask = jnp.ones((T - 1, N), bool).at[4:, 1].set(False)
    weights = jnp.array([1.0, 2.5])  # one log-likelihood per sequence, weighted

    def weighted(log_z):
        return jax.value_and_grad(lambda *a: jnp.sum(weights * log_z(*a, shape, mask)), (0, 1))

    got = weighted(log_z_by_scan)(alpha, steps)
    expected = weighted(log_z_by_tree)(alpha, steps)
    assert np.isfinite(expected[0])
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-12)
    for g, e in zip(jax.tree.leaves(got[1]), jax.tree.leaves(expected[1])):
        np.testing.assert_allclose(g, e, rtol=1e-8, atol=1e-10)
