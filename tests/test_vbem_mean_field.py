"""Variational Bayes EM with a mean-field q over the latents
(``VariationalBayesEM(..., latents="mean_field")``).

References: coordinate ascent written out by hand in numpy for a two-cause
Poisson model (q(z1), q(z2), q(w1), q(w2), q(lam) and the ELBO, the KLs from
their closed forms), and the exact-enumeration fit, which bounds the mean-field
ELBO from above at the same q(theta) and equals it with one latent per point.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.contrib.control_flow import scan
from numpyro.contrib.funsor import markov
from scipy.special import digamma, gammaln, logsumexp

from jaxem import VariationalBayesEM
from jaxem.exceptions import ModelError

ALPHA1, ALPHA2, A0, B0 = 1.5, 2.0, 2.0, 0.5
SITES = ("w1", "w2", "lam")


def two_cause(x, K1=2, K2=3):
    """Two independent causes per count: x ~ Poisson(lam[z1, z2])."""
    w1 = numpyro.sample("w1", dist.Dirichlet(jnp.full(K1, ALPHA1)))
    w2 = numpyro.sample("w2", dist.Dirichlet(jnp.full(K2, ALPHA2)))
    with numpyro.plate("c1", K1, dim=-2), numpyro.plate("c2", K2, dim=-1):
        lam = numpyro.sample("lam", dist.Gamma(A0, B0))
    with numpyro.plate("data", x.shape[0]):
        z1 = numpyro.sample("z1", dist.Categorical(w1))
        z2 = numpyro.sample("z2", dist.Categorical(w2))
        numpyro.sample("x", dist.Poisson(lam[z1, z2]), obs=x)


def poisson_mixture(x, K=2):
    w = numpyro.sample("w", dist.Dirichlet(jnp.array([1.5, 2.0])[:K]))
    with numpyro.plate("components", K):
        lam = numpyro.sample("lam", dist.Gamma(jnp.array([2.0, 1.0])[:K], 0.5))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Poisson(lam[z]), obs=x)


def _counts():
    return jnp.array([0.0, 1.0, 2.0, 4.0, 5.0, 9.0, 11.0, 10.0, 3.0, 20.0, 18.0])


def _start():
    return {
        "w1": jnp.array([0.6, 0.4]),
        "w2": jnp.array([0.2, 0.3, 0.5]),
        "lam": jnp.array([[1.0, 4.0, 10.0], [2.0, 8.0, 19.0]]),
    }


_FITTERS: dict = {}


def _fitter(latents):
    """One fitter per option, shared by the tests (their compiled updates too)."""
    if latents not in _FITTERS:
        _FITTERS[latents] = VariationalBayesEM(
            two_cause, global_sites=SITES, latents=latents, e_step_iters=2
        )
    return _FITTERS[latents]


def _kl_dirichlet(alpha, alpha0):
    return (
        gammaln(alpha.sum())
        - gammaln(alpha).sum()
        - gammaln(alpha0.sum())
        + gammaln(alpha0).sum()
        + ((alpha - alpha0) * (digamma(alpha) - digamma(alpha.sum()))).sum()
    )


def _kl_gamma(a, b, a0, b0):
    """KL(Gamma(a, rate b) || Gamma(a0, rate b0))."""
    return (
        (a - a0) * digamma(a)
        - gammaln(a)
        + gammaln(a0)
        + a0 * (np.log(b) - np.log(b0))
        + a * (b0 - b) / b
    )


def _sweeps(q1, q2, log_w1, log_w2, log_px, sweeps):
    """Mean-field coordinate ascent: q(z1), then q(z2), ``sweeps`` times."""
    for _ in range(sweeps):
        log_q1 = log_w1 + np.einsum("nj,nij->ni", q2, log_px)
        q1 = np.exp(log_q1 - logsumexp(log_q1, axis=1, keepdims=True))
        log_q2 = log_w2 + np.einsum("ni,nij->nj", q1, log_px)
        q2 = np.exp(log_q2 - logsumexp(log_q2, axis=1, keepdims=True))
    return q1, q2


def _posteriors(q1, q2, x):
    """The VB-M-step: the priors' parameters plus the expected statistics."""
    joint = np.einsum("ni,nj->nij", q1, q2)
    return (
        ALPHA1 + q1.sum(0),
        ALPHA2 + q2.sum(0),
        A0 + np.einsum("nij,n->ij", joint, x),
        B0 + joint.sum(0),
    )


def _log_poisson(x, e_log_lam, e_lam):
    return x[:, None, None] * e_log_lam - e_lam - gammaln(x + 1)[:, None, None]


def _check_against_numpy(vb, x, steps):
    x_np, sweeps = np.asarray(x), vb.e_step_iters
    # init: mean field from uniform at the start point, then one VB-M-step.
    start = {n: np.asarray(v) for n, v in _start().items()}
    uniform = (np.full((11, 2), 1 / 2), np.full((11, 3), 1 / 3))
    log_px = _log_poisson(x_np, np.log(start["lam"]), start["lam"])
    q1, q2 = _sweeps(*uniform, np.log(start["w1"]), np.log(start["w2"]), log_px, sweeps)
    state = vb.init(jax.random.PRNGKey(0), x, init_params=_start())
    np.testing.assert_allclose(state.q_latents["z1"], q1, rtol=1e-10)
    np.testing.assert_allclose(state.q_latents["z2"], q2, rtol=1e-10)
    alpha1, alpha2, a, b = _posteriors(q1, q2, x_np)
    elbos = []
    for _ in range(steps):
        for got, want in zip(
            (state.q["w1"][0], state.q["w2"][0], *state.q["lam"]), (alpha1, alpha2, a, b)
        ):
            np.testing.assert_allclose(got, want, rtol=1e-10)
        e_log_w1 = digamma(alpha1) - digamma(alpha1.sum())
        e_log_w2 = digamma(alpha2) - digamma(alpha2.sum())
        log_px = _log_poisson(x_np, digamma(a) - np.log(b), a / b)
        q1, q2 = _sweeps(q1, q2, e_log_w1, e_log_w2, log_px, sweeps)
        expected = (
            (q1 @ e_log_w1).sum() + (q2 @ e_log_w2).sum() + np.einsum("ni,nj,nij->", q1, q2, log_px)
        )
        entropy = -(q1 * np.log(q1)).sum() - (q2 * np.log(q2)).sum()
        kl = (
            _kl_dirichlet(alpha1, np.full(2, ALPHA1))
            + _kl_dirichlet(alpha2, np.full(3, ALPHA2))
            + _kl_gamma(a, b, A0, B0).sum()
        )
        state, elbo = vb.update(state, x)
        np.testing.assert_allclose(elbo, expected + entropy - kl, rtol=1e-10)
        np.testing.assert_allclose(state.q_latents["z1"], q1, rtol=1e-10)
        np.testing.assert_allclose(state.q_latents["z2"], q2, rtol=1e-10)
        alpha1, alpha2, a, b = _posteriors(q1, q2, x_np)
        elbos.append(float(elbo))
    return state, elbos


@pytest.mark.xdist_group("vbem_mean_field")  # the fitters of _fitter, compiled once
def test_mean_field_matches_hand_written_cavi(x64):
    """Each update: q(z1) then q(z2) (e_step_iters sweeps), the ELBO at them and
    q(theta), then q(w1), q(w2), q(lam) from their statistics."""
    _check_against_numpy(_fitter("mean_field"), _counts(), steps=4)


@pytest.mark.xdist_group("vbem_mean_field")  # the fitters of _fitter, compiled once
def test_mean_field_elbo_monotone_and_below_exact(x64):
    """The mean-field ELBO never decreases, and at every q(theta) stays below the
    exact-enumeration ELBO (the best q(z) for it), strictly here: the two causes
    are coupled in the posterior."""
    x = _counts()
    mean_field, exact = _fitter("mean_field"), _fitter("exact")
    state = mean_field.init(jax.random.PRNGKey(0), x, init_params=_start())
    previous = -np.inf
    for _ in range(6):
        new_state, elbo = mean_field.update(state, x)
        _, exact_elbo = exact.update(state, x)
        assert elbo >= previous - 1e-10 * abs(elbo)
        assert elbo < exact_elbo - 1e-3
        previous, state = elbo, new_state
    fit = mean_field.run(jax.random.PRNGKey(0), x, init_params=_start(), max_iter=8, tol=0.0)
    history = np.asarray(fit.history)
    assert np.all(np.diff(history) >= -1e-10 * np.abs(history[1:]))
    # The result's q(z) and entropy are those of the final E-step's factors.
    q1, q2 = (np.asarray(fit.latent_posteriors[n]) for n in ("z1", "z2"))
    np.testing.assert_allclose(q1.sum(-1), 1.0, rtol=1e-12)
    entropy = -(q1 * np.log(q1)).sum() - (q2 * np.log(q2)).sum()
    np.testing.assert_allclose(fit.latent_entropy, entropy, rtol=1e-10)
    assert history[-1] <= fit.elbo + 1e-10 * abs(fit.elbo)


def test_one_latent_per_point_mean_field_is_exact(x64):
    """A mixture's latents share no factor: mean field is the exact posterior,
    and the two options give the same fit, from init on."""
    x = jnp.array([0.0, 1.0, 2.0, 0.0, 1.0, 8.0, 11.0, 9.0, 12.0, 10.0])
    exact, mean_field = (
        VariationalBayesEM(poisson_mixture, global_sites=("w", "lam"), latents=latents)
        for latents in ("exact", "mean_field")
    )
    exact_state = exact.init(jax.random.PRNGKey(0), x)
    state = mean_field.init(jax.random.PRNGKey(0), x)
    for _ in range(3):
        for name in ("w", "lam"):
            for got, want in zip(state.q[name], exact_state.q[name]):
                np.testing.assert_allclose(got, want, rtol=1e-10)
        exact_state, exact_elbo = exact.update(exact_state, x)
        state, elbo = mean_field.update(state, x)
        np.testing.assert_allclose(elbo, exact_elbo, rtol=1e-10)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"latents": "meanfield"}, "latents must be 'exact'.*or 'mean_field'.*'meanfield'"),
        ({"latents": None}, "latents must be 'exact'.*got None"),
        ({"latents": "mean_field", "e_step_iters": 0}, "e_step_iters must be at least 1"),
    ],
)
def test_bad_option_is_an_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VariationalBayesEM(poisson_mixture, global_sites=("w", "lam"), **kwargs)


def scan_hmm(x, K=2):
    trans = numpyro.sample("trans", dist.Dirichlet(jnp.ones((K, K))).to_event(1))
    with numpyro.plate("states", K):
        mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))

    def step(z_prev, xt):
        z = numpyro.sample("z", dist.Categorical(trans[z_prev]))
        numpyro.sample("x", dist.Normal(mu[z], 1.0), obs=xt)
        return z, None

    scan(step, 0, x)


def test_scan_chain_with_mean_field_is_an_error():
    """As for VariationalEM: a scan's steps are one stacked site, which a
    factorized q would give one factor for all time steps."""
    vb = VariationalBayesEM(scan_hmm, global_sites=("trans", "mu"), latents="mean_field")
    with pytest.raises(ModelError, match=r"chain of site 'z'.*latents='exact'.*Python loop"):
        vb.init(jax.random.PRNGKey(0), jnp.array([0.1, -0.3, 2.0, 2.2]))


def loop_hmm(x, K=2):
    trans = numpyro.sample("trans", dist.Dirichlet(jnp.ones((K, K))).to_event(1))
    with numpyro.plate("states", K):
        mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    z = 0
    for t in markov(range(x.shape[0])):
        z = numpyro.sample(f"z_{t}", dist.Categorical(trans[z]))
        numpyro.sample(f"x_{t}", dist.Normal(mu[z], 1.0), obs=x[t])


@pytest.mark.slow
def test_python_loop_chain_gets_one_factor_per_step(x64):
    """The alternative the scan error names: a chain written as a Python loop under
    markov has one latent site per step, so one factor per step; the ELBO never
    decreases and stays below the exact (forward-backward) one. (Slow: the loop
    compiles one site per step.)"""
    x = jnp.array([0.1, -0.3, 2.0, 2.2, 0.0])
    start = {"trans": jnp.array([[0.7, 0.3], [0.4, 0.6]]), "mu": jnp.array([0.0, 2.0])}
    mean_field = VariationalBayesEM(loop_hmm, global_sites=("trans", "mu"), latents="mean_field")
    exact = VariationalBayesEM(loop_hmm, global_sites=("trans", "mu"))
    state = mean_field.init(jax.random.PRNGKey(0), x, init_params=start)
    assert sorted(state.q_latents) == [f"z_{t}" for t in range(5)]
    previous = -np.inf
    for _ in range(4):
        new_state, elbo = mean_field.update(state, x)
        _, exact_elbo = exact.update(state, x)
        assert previous - 1e-10 * abs(elbo) <= elbo < exact_elbo - 1e-4
        previous, state = elbo, new_state
    # Steps near 2 and near 0 lean to different states.
    assert state.q_latents["z_2"][1] > 0.5 > state.q_latents["z_4"][1]
