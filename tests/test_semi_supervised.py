"""obs_mask on a discrete latent: semi-supervised mixtures and chains.

``numpyro.sample("z", Categorical(w), obs=labels, obs_mask=known)`` fixes z at
the known labels and leaves the other entries latent. References: the
semi-supervised log-likelihood by brute force in numpy, and a numpy EM whose
responsibilities of the labelled points are their one-hot labels.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.contrib.control_flow import scan
from numpyro.contrib.funsor import markov
from scipy.special import logsumexp
from scipy.stats import norm

import jaxem
from jaxem import EM
from jaxem.exceptions import ModelError


def semi_supervised(x, labels, known):
    w = numpyro.param("w", jnp.array([0.5, 0.5]), constraint=dist.constraints.simplex)
    mu = numpyro.param("mu", jnp.array([-0.5, 0.5]))
    sigma = numpyro.param("sigma", jnp.ones(2), constraint=dist.constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w), obs=labels, obs_mask=known)
        numpyro.sample("x", dist.Normal(mu[z], sigma[z]), obs=x)


def _data(rng, n=30):
    z = (rng.random(n) < 0.3).astype(np.int32)
    x = np.where(z == 1, rng.normal(2.0, 0.7, n), rng.normal(-1.0, 1.2, n))
    known = rng.random(n) < 0.4
    # A wrong filler for the unknown labels: the old code fitted it as data.
    labels = np.where(known, z, 0).astype(np.int32)
    return x, labels, known


def _log_joint(params, x, labels, known):
    """(N, K) log p(z = k, x_n), with -inf off the label of a labelled point."""
    w, mu, sigma = (np.asarray(params[n]) for n in ("w", "mu", "sigma"))
    log_joint = np.log(w) + norm.logpdf(x[:, None], mu, sigma)
    return np.where(known[:, None] & (np.arange(len(w)) != labels[:, None]), -np.inf, log_joint)


def _numpy_em(params, x, labels, known, num_iters):
    params = {k: np.asarray(v) for k, v in params.items()}
    for _ in range(num_iters):
        log_joint = _log_joint(params, x, labels, known)
        resp = np.exp(log_joint - logsumexp(log_joint, axis=1, keepdims=True))
        counts = resp.sum(0)
        mu = resp.T @ x / counts
        var = (resp * (x[:, None] - mu) ** 2).sum(0) / counts
        params = {"w": counts / len(x), "mu": mu, "sigma": np.sqrt(var)}
    return params


def test_log_likelihood_and_posterior_match_brute_force(x64, rng):
    x, labels, known = _data(rng)
    params = {"w": jnp.array([0.6, 0.4]), "mu": jnp.array([-1.0, 1.5]), "sigma": jnp.ones(2)}
    args = (jnp.asarray(x), jnp.asarray(labels), jnp.asarray(known))
    log_joint = _log_joint(params, x, labels, known)
    expected = logsumexp(log_joint, axis=1)
    np.testing.assert_allclose(
        jaxem.log_likelihood(semi_supervised, params, *args), expected.sum(), rtol=1e-12
    )
    posterior = jaxem.posterior(semi_supervised, params, *args)
    assert set(posterior) == {"z"}
    np.testing.assert_allclose(posterior["z"], np.exp(log_joint - expected[:, None]), atol=1e-12)
    np.testing.assert_array_equal(posterior["z"][known], np.eye(2)[labels[known]])
    assignment = jaxem.map_assignment(semi_supervised, params, *args)["z"]
    np.testing.assert_array_equal(assignment, np.argmax(log_joint, axis=1))


def test_em_matches_numpy_semi_supervised_em(x64, rng):
    x, labels, known = _data(rng, 40)
    args = (jnp.asarray(x), jnp.asarray(labels), jnp.asarray(known))
    em = EM(semi_supervised, reg_covar=0.0)
    assert all(path.startswith("closed-form") for path in em.m_step_paths(*args).values())
    fit = em.run(jax.random.PRNGKey(0), *args, max_iter=25, tol=0)
    init = {"w": np.array([0.5, 0.5]), "mu": np.array([-0.5, 0.5]), "sigma": np.ones(2)}
    expected = _numpy_em(init, x, labels, known, 25)
    for name in ("w", "mu", "sigma"):
        np.testing.assert_allclose(fit.params[name], expected[name], rtol=1e-9)
    log_joint = _log_joint(fit.params, x, labels, known)
    np.testing.assert_allclose(fit.log_likelihood, logsumexp(log_joint, axis=1).sum(), rtol=1e-10)


def test_hard_em_keeps_the_labels(x64, rng):
    x, labels, known = _data(rng)
    args = (jnp.asarray(x), jnp.asarray(labels), jnp.asarray(known))
    fit = EM(semi_supervised, hard=True).run(jax.random.PRNGKey(0), *args, max_iter=20)
    assert np.isfinite(fit.log_likelihood)
    log_joint = _log_joint(fit.params, x, labels, known)
    # Classification EM's objective: the best cell of every point, labelled ones at their label.
    np.testing.assert_allclose(fit.log_likelihood, log_joint.max(axis=1).sum(), rtol=1e-10)


def test_impute_uses_the_known_label(x64):
    model = jaxem.nan_as_missing(semi_supervised, sites=["x"])
    params = {"w": jnp.array([0.3, 0.7]), "mu": jnp.array([-2.0, 4.0]), "sigma": jnp.ones(2)}
    x = jnp.array([jnp.nan, jnp.nan, 1.0])
    labels, known = jnp.array([1, 0, 0]), jnp.array([True, False, True])
    filled = jaxem.impute(model, params, x, labels, known)["x"]
    # A labelled point takes its component's mean; an unlabelled one the mixture's.
    np.testing.assert_allclose(filled, [4.0, 0.3 * -2.0 + 0.7 * 4.0, 1.0], rtol=1e-12)


def item_mixture(y, known):
    """A latent class model whose item responses have an obs_mask: nothing
    depends on the unobserved responses, which are summed out exactly."""
    w = numpyro.param("w", jnp.array([0.4, 0.6]), constraint=dist.constraints.simplex)
    theta = numpyro.param(
        "theta", jnp.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]), constraint=dist.constraints.simplex
    )
    with numpyro.plate("data", y.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("y", dist.Categorical(theta[z]), obs=y, obs_mask=known)


def test_unused_unobserved_part_is_summed_out(x64):
    y, known = jnp.array([0, 2, 1, 2]), jnp.array([True, False, True, True])
    params = {"w": jnp.array([0.4, 0.6]), "theta": jnp.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])}
    kept = jnp.asarray(known)
    expected = np.log(params["w"] @ params["theta"][:, y[kept]]).sum()
    np.testing.assert_allclose(jaxem.log_likelihood(item_mixture, params, y, known), expected)
    assert set(jaxem.posterior(item_mixture, params, y, known)) == {"z"}


def _chain_params():
    return {
        "init": jnp.array([0.6, 0.4]),
        "trans": jnp.array([[0.8, 0.2], [0.3, 0.7]]),
        "mu": jnp.array([-1.0, 1.0]),
    }


def markov_chain(x, labels, known):
    init = numpyro.param("init", jnp.array([0.6, 0.4]), constraint=dist.constraints.simplex)
    trans = numpyro.param("trans", jnp.eye(2) * 0.6 + 0.2, constraint=dist.constraints.simplex)
    mu = numpyro.param("mu", jnp.array([-1.0, 1.0]))
    z = None
    for t in markov(range(len(x))):
        probs = init if z is None else trans[z]
        z = numpyro.sample(f"z_{t}", dist.Categorical(probs), obs=labels[t], obs_mask=known[t])
        numpyro.sample(f"x_{t}", dist.Normal(mu[z], 1.0), obs=x[t])


def test_markov_loop_with_known_states_matches_brute_force(x64):
    x = np.array([-2.0, 0.3, 1.5, 2.0, -1.0])
    labels, known = np.array([0, 1, 0, 0, 0]), np.array([False, True, False, True, False])
    params = _chain_params()
    p = {k: np.asarray(v) for k, v in params.items()}
    paths, scores = [], []
    for path in itertools.product(range(2), repeat=len(x)):
        if any(known[t] and path[t] != labels[t] for t in range(len(x))):
            continue
        steps = [np.log(p["trans"][a, b]) for a, b in zip(path, path[1:])]
        score = np.log(p["init"][path[0]]) + sum(steps) + norm.logpdf(x, p["mu"][list(path)]).sum()
        paths.append(path)
        scores.append(score)
    args = (jnp.asarray(x), jnp.asarray(labels), jnp.asarray(known))
    total = logsumexp(scores)
    np.testing.assert_allclose(jaxem.log_likelihood(markov_chain, params, *args), total)
    posterior = jaxem.posterior(markov_chain, params, *args)
    weights = np.exp(np.array(scores) - total)
    for t in range(len(x)):
        expected = [weights[[path[t] == k for path in paths]].sum() for k in range(2)]
        np.testing.assert_allclose(posterior[f"z_{t}"], expected, atol=1e-12)
    best = paths[int(np.argmax(scores))]
    assignment = jaxem.map_assignment(markov_chain, params, *args)
    assert [int(assignment[f"z_{t}"]) for t in range(len(x))] == list(best)


def scan_chain(x, labels, known):
    init = numpyro.param("init", jnp.array([0.6, 0.4]), constraint=dist.constraints.simplex)
    trans = numpyro.param("trans", jnp.eye(2) * 0.6 + 0.2, constraint=dist.constraints.simplex)
    mu = numpyro.param("mu", jnp.array([-1.0, 1.0]))

    def step(z_prev, inputs):
        x_t, label, is_known = inputs
        z = numpyro.sample("z", dist.Categorical(trans[z_prev]), obs=label, obs_mask=is_known)
        numpyro.sample("x", dist.Normal(mu[z], 1.0), obs=x_t)
        return z, None

    z0 = numpyro.sample("z0", dist.Categorical(init))
    numpyro.sample("x0", dist.Normal(mu[z0], 1.0), obs=x[0])
    scan(step, z0, (x[1:], labels[1:], known[1:]))


def test_known_states_in_a_scan_chain_are_refused(x64):
    x = jnp.array([-2.0, 0.3, 1.5, 2.0])
    labels, known = jnp.array([0, 1, 0, 0]), jnp.array([False, True, False, True])
    with pytest.raises(ModelError, match="site 'z' has an obs_mask inside a scan body.*markov"):
        jaxem.log_likelihood(scan_chain, _chain_params(), x, labels, known)


def test_obs_mask_on_scan_emissions_matches_brute_force(x64):
    def hmm(y, known):
        trans = numpyro.param("trans", jnp.eye(2) * 0.6 + 0.2, constraint=dist.constraints.simplex)
        emit = numpyro.param("emit", jnp.full((2, 3), 1 / 3), constraint=dist.constraints.simplex)

        def step(z_prev, inputs):
            y_t, is_known = inputs
            z = numpyro.sample("z", dist.Categorical(trans[z_prev]))
            numpyro.sample("y", dist.Categorical(emit[z]), obs=y_t, obs_mask=is_known)
            return z, None

        scan(step, 0, (y, known))

    params = {
        "trans": jnp.array([[0.8, 0.2], [0.3, 0.7]]),
        "emit": jnp.array([[0.6, 0.3, 0.1], [0.1, 0.2, 0.7]]),
    }
    y, known = np.array([0, 2, 1, 2, 0]), np.array([True, True, False, True, False])
    scores = []
    for path in itertools.product(range(2), repeat=len(y)):
        prev = (0,) + path[:-1]
        score = sum(np.log(params["trans"][a, b]) for a, b in zip(prev, path))
        emissions = [np.log(params["emit"][path[t], y[t]]) for t in np.flatnonzero(known)]
        scores.append(score + sum(emissions))
    args = (jnp.asarray(y), jnp.asarray(known))
    np.testing.assert_allclose(jaxem.log_likelihood(hmm, params, *args), logsumexp(scores))
    fit = EM(hmm).run(jax.random.PRNGKey(0), *args, max_iter=5)
    assert np.isfinite(fit.log_likelihood)
