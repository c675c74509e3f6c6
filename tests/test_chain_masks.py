"""Padded and degenerate Markov chains (issue 15): masked steps, counts of observations,
VariationalEM on ``scan`` chains, length-1 and nested scans.

References: brute-force enumeration over all K^T paths of each unpadded sequence.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from hmmlearn import hmm
from numpyro.contrib.control_flow import scan
from numpyro.contrib.funsor import markov
from numpyro.distributions import constraints
from test_chain import gaussian_hmm

import jaxem
from jaxem import ModelError

K = 2
# NumPy float64: module-level jax arrays would be float32 (made before the x64 fixture).
PARAMS = {
    "pi": np.array([0.6, 0.4]),
    "A": np.array([[0.8, 0.2], [0.3, 0.7]]),
    "mu": np.array([-1.0, 1.0]),
}
SEQS = [np.array([0.3, -1.2, 0.8, 1.5, -0.1]), np.array([1.1, 0.4, -0.7])]


def _scan_params():
    """The params of the scan HMMs below: ``[A; pi]`` (the carry starts at its extra
    row ``pi``) and the emission means ``mu``."""
    pi = numpyro.param("pi", jnp.ones(K) / K, constraint=constraints.simplex)
    A = numpyro.param("A", jnp.ones((K, K)) / K, constraint=constraints.simplex)
    mu = numpyro.param("mu", jnp.zeros(K))
    rows = jnp.concatenate([A, pi[None]])
    return rows, mu


def scan_hmm(x, mask, masked="zx"):
    """Every step inside the scan: the carry starts at the extra row ``pi`` of ``[A; pi]``.
    ``mask`` masks the site(s) named in ``masked`` (both the latent and the observation
    unless told otherwise)."""
    rows, mu = _scan_params()

    def step(z_prev, inputs):
        x_t, m_t = inputs
        with numpyro.plate("seqs", x.shape[1]):
            with numpyro.handlers.mask(mask=m_t if "z" in masked else True):
                z = numpyro.sample("z", dist.Categorical(rows[z_prev]))
            with numpyro.handlers.mask(mask=m_t if "x" in masked else True):
                numpyro.sample("x", dist.Normal(mu[z], 1.0), obs=x_t)
        return z, None

    scan(step, jnp.full(x.shape[1], K), (x, mask))


def loop_hmm(x, mask, mask_observations=True):
    """One sequence, a Python loop under ``markov``: one latent site per step, its
    observation masked with it (or not, with ``mask_observations=False``)."""
    pi = numpyro.param("pi", jnp.ones(K) / K, constraint=constraints.simplex)
    A = numpyro.param("A", jnp.ones((K, K)) / K, constraint=constraints.simplex)
    mu = numpyro.param("mu", jnp.zeros(K))
    z = None
    for t in markov(range(x.shape[0])):
        with numpyro.handlers.mask(mask=mask[t]):
            z = numpyro.sample(f"z_{t}", dist.Categorical(pi if z is None else A[z]))
        with numpyro.handlers.mask(mask=mask[t] if mask_observations else True):
            numpyro.sample(f"x_{t}", dist.Normal(mu[z], 1.0), obs=x[t])


def brute_force(seq):
    """log p(seq) by summing over all K^T paths (NaN entries missing)."""
    p = {k: np.asarray(v) for k, v in PARAMS.items()}
    terms = []
    for path in itertools.product(range(K), repeat=len(seq)):
        lp = np.log(p["pi"][path[0]])
        lp += sum(np.log(p["A"][a, b]) for a, b in zip(path[:-1], path[1:]))
        lp += sum(
            -0.5 * (v - p["mu"][k]) ** 2 - 0.5 * np.log(2 * np.pi)
            for v, k in zip(seq, path)
            if not np.isnan(v)  # a missing observation has no emission
        )
        terms.append(lp)
    return np.logaddexp.reduce(terms)


def _padded(at_start, length=6):
    x, mask = np.zeros((length, len(SEQS))), np.zeros((length, len(SEQS)), bool)
    for i, s in enumerate(SEQS):
        where = slice(length - len(s), None) if at_start else slice(None, len(s))
        x[where, i], mask[where, i] = s, True
    return jnp.asarray(x), jnp.asarray(mask)


def test_scan_chain_padded_at_the_end_equals_brute_force(x64):
    x, mask = _padded(at_start=False)
    ll = jaxem.log_likelihood(scan_hmm, PARAMS, x, mask)
    np.testing.assert_allclose(float(ll), sum(brute_force(s) for s in SEQS), rtol=1e-12)


def test_scan_chain_padded_at_the_start_is_rejected(x64):
    x, mask = _padded(at_start=True)
    with pytest.raises(
        ModelError,
        match=r"site 'z' is masked at its first step .* sequence\(s\) "
        r"\[0, 1\] of plate\(s\) \['seqs'\].*pad every sequence at its end",
    ):
        jaxem.log_likelihood(scan_hmm, PARAMS, x, mask)
    with pytest.raises(ModelError, match="at steps before real ones"):
        jaxem.EM(scan_hmm).run(jax.random.PRNGKey(0), x, mask, max_iter=2)


def test_a_gap_after_the_initial_state_is_rejected(x64):
    # z0 and x0 sit outside the scan, unmasked: masking the first scanned steps of a
    # sequence leaves a real initial state followed by masked steps.
    x = jnp.zeros((6, 2, 2))
    mask = jnp.ones((6, 2), bool).at[:3, 1].set(False)
    params = {
        "pi": jnp.ones(3) / 3,
        "A": jnp.ones((3, 3)) / 3,
        "mu": jnp.zeros((3, 2)),
        "sigma": jnp.ones((3, 2)),
    }
    with pytest.raises(ModelError, match=r"sequence\(s\) \[1\]"):
        jaxem.log_likelihood(gaussian_hmm, params, x, mask)


def test_masked_steps_of_a_markov_loop_contribute_nothing(x64):
    seq = SEQS[1]
    x = jnp.zeros(6).at[: len(seq)].set(seq)
    mask = jnp.arange(6) < len(seq)
    ll = jaxem.log_likelihood(loop_hmm, PARAMS, x, mask)
    np.testing.assert_allclose(float(ll), brute_force(seq), rtol=1e-12)
    fit = jaxem.EM(loop_hmm).run(jax.random.PRNGKey(0), x, mask, max_iter=3, init_params=PARAMS)
    np.testing.assert_allclose(float(fit.history[0]), brute_force(seq), rtol=1e-12)


def test_a_markov_loop_padded_at_the_start_is_rejected(x64):
    seq = SEQS[1]
    x = jnp.zeros(6).at[-len(seq) :].set(seq)
    mask = jnp.arange(6) >= 6 - len(seq)
    with pytest.raises(ModelError, match="latent site 'z_2' is masked where latent site 'z_3'"):
        jaxem.log_likelihood(loop_hmm, PARAMS, x, mask)


def test_num_observations_and_bic_count_real_steps_only(x64):
    x, mask = _padded(at_start=False)
    n = sum(len(s) for s in SEQS)
    assert jaxem.num_observations(scan_hmm, x, mask) == n
    k = jaxem.num_free_params(scan_hmm, PARAMS, x, mask)
    expected = -2 * sum(brute_force(s) for s in SEQS) + k * np.log(n)
    np.testing.assert_allclose(float(jaxem.bic(scan_hmm, PARAMS, x, mask)), expected, rtol=1e-12)
    # Initial state and first observation outside the scan: they count as a step too.
    lengths = [7, 4, 9]
    x3 = np.zeros((9, 3, 2))
    mask3 = np.arange(9)[:, None] < np.array(lengths)
    assert jaxem.num_observations(gaussian_hmm, jnp.asarray(x3), jnp.asarray(mask3)) == 20
    assert jaxem.num_observations(gaussian_hmm, jnp.asarray(x3)) == 27


def test_variational_em_and_elbo_reject_scan_chains(x64):
    x, mask = _padded(at_start=False)
    with pytest.raises(
        ModelError,
        match="VariationalEM does not support the Markov chain of site 'z'.*Use jaxem.EM",
    ):
        jaxem.VariationalEM(scan_hmm).run(jax.random.PRNGKey(0), x, mask, max_iter=2)
    with pytest.raises(
        ModelError, match="jaxem.elbo does not support the Markov chain of site 'z'"
    ):
        jaxem.elbo(scan_hmm, PARAMS, {}, x, mask)


def test_a_chain_of_one_step_is_a_mixture(x64):
    # gaussian_hmm scans over x[1:]: with T = 1 the scan has no step.
    params = {
        "pi": jnp.array([0.2, 0.3, 0.5]),
        "A": jnp.ones((3, 3)) / 3,
        "mu": jnp.array([[0.0, 1.0], [1.0, -1.0], [2.0, 0.5]]),
        "sigma": jnp.ones((3, 2)),
    }
    x = jnp.array([[[0.5, 0.2], [1.8, -0.3]]])
    ll = jaxem.log_likelihood(gaussian_hmm, params, x)
    log_dens = jax.scipy.stats.norm.logpdf(x[0][:, None, :], params["mu"]).sum(-1)
    expected = jax.scipy.special.logsumexp(jnp.log(params["pi"]) + log_dens, axis=-1).sum()
    np.testing.assert_allclose(float(ll), float(expected), rtol=1e-12)


def _nested(x):
    A = numpyro.param("A", jnp.ones((2, 2)) / 2, constraint=constraints.simplex)

    def inner(z_prev, x_t):
        z = numpyro.sample("z", dist.Categorical(A[z_prev]))
        numpyro.sample("x", dist.Normal(z, 1.0), obs=x_t)
        return z, None

    def outer(carry, xs):
        scan(inner, 0, xs)
        return carry, None

    scan(outer, 0, x)


def test_nested_scans_are_rejected():
    with pytest.raises(ModelError, match="a scan inside the body of another scan"):
        jaxem.log_likelihood(_nested, {"A": jnp.ones((2, 2)) / 2}, jnp.zeros((3, 4)))


def test_m_step_paths_name_the_sites_the_user_wrote():
    paths = jaxem.EM(scan_hmm).m_step_paths(jnp.zeros((4, 2)), jnp.ones((4, 2), bool))
    assert not any("_PREV_" in p for p in paths.values()), paths
    assert paths["mu"] == "closed-form (Normal.loc at site 'x')"


# --- masks that broadcast, non-boolean masks --------------------------------------------


# gaussian_hmm's parameters (3 states, 2 dims) in NumPy float64.
GAUSSIAN = {
    "pi": np.array([0.5, 0.3, 0.2]),
    "A": np.array([[0.85, 0.1, 0.05], [0.1, 0.8, 0.1], [0.1, 0.15, 0.75]]),
    "mu": np.array([[-2.0, 0.0], [0.0, 2.0], [2.0, -1.0]]),
    "sigma": np.array([[1.0, 0.7], [0.8, 1.1], [0.6, 0.8]]),
}


def _hmmlearn_reference():
    ref = hmm.GaussianHMM(3, "diag")
    ref.n_features = 2
    ref.startprob_, ref.transmat_ = GAUSSIAN["pi"], GAUSSIAN["A"]
    ref.means_, ref.covars_ = GAUSSIAN["mu"], GAUSSIAN["sigma"] ** 2
    return ref


def _gaussian_seqs(length, num_seqs, seed):
    ref = _hmmlearn_reference()
    return [ref.sample(length, random_state=seed + i)[0] for i in range(num_seqs)]


@pytest.mark.parametrize("num_seqs, mask_shape", [(3, "T1"), (1, "T")])
def test_a_mask_shared_by_the_sequences_broadcasts_over_them(x64, num_seqs, mask_shape):
    # NumPyro broadcasts a mask of shape (1,) or () over the plate of sequences:
    # every sequence cut at the same length, as the full (T, N) mask.
    length, real = 8, 6
    seqs = _gaussian_seqs(length, num_seqs, seed=3)
    x = jnp.asarray(np.stack(seqs, axis=1))
    steps = jnp.arange(length) < real
    mask = steps[:, None] if mask_shape == "T1" else steps
    full = jnp.broadcast_to(steps[:, None], (length, num_seqs))
    p = {k: jnp.asarray(v) for k, v in GAUSSIAN.items()}
    ll = jaxem.log_likelihood(gaussian_hmm, p, x, mask)
    np.testing.assert_allclose(float(ll), float(jaxem.log_likelihood(gaussian_hmm, p, x, full)))
    ref = _hmmlearn_reference()
    np.testing.assert_allclose(float(ll), sum(ref.score(s[:real]) for s in seqs), rtol=1e-10)
    assert jaxem.num_observations(gaussian_hmm, x, mask) == real * num_seqs
    # The E-step's statistics: padded steps have posterior zero.
    posterior = jaxem.posterior(gaussian_hmm, p, x, mask)["z"]  # (N, T - 1, K)
    np.testing.assert_allclose(posterior.sum(-1), np.broadcast_to(steps[1:], (num_seqs, 7)))


def test_a_float_mask_is_rejected_in_the_users_terms(x64):
    x, mask = _padded(at_start=False)
    with pytest.raises(
        ModelError,
        match=r"numpyro.handlers.mask was given a mask that is not "
        r"boolean.*mask.astype\(bool\)",
    ):
        jaxem.log_likelihood(scan_hmm, PARAMS, x, mask.astype(jnp.float32))


def _method_masked_hmm(x, mask):
    """``Distribution.mask``, which (unlike ``numpyro.handlers.mask``) casts a 0/1
    float mask to bool."""
    rows, mu = _scan_params()

    def step(z_prev, inputs):
        x_t, m_t = inputs
        with numpyro.plate("seqs", x.shape[1]):
            z = numpyro.sample("z", dist.Categorical(rows[z_prev]).mask(m_t))
            numpyro.sample("x", dist.Normal(mu[z], 1.0).mask(m_t), obs=x_t)
        return z, None

    scan(step, jnp.full(x.shape[1], K), (x, mask))


def test_a_float_mask_of_distribution_mask_equals_brute_force(x64):
    x, mask = _padded(at_start=False)
    ll = jaxem.log_likelihood(_method_masked_hmm, PARAMS, x, mask.astype(jnp.float64))
    np.testing.assert_allclose(float(ll), sum(brute_force(s) for s in SEQS), rtol=1e-12)


# --- Python-loop chains: observations -----------------------------------------------------


def _loop_gaussian_hmm(x, mask):
    """``GAUSSIAN``'s HMM over x (T, N, 2) as a Python loop under ``markov``."""
    pi = numpyro.param("pi", jnp.ones(3) / 3, constraint=constraints.simplex)
    A = numpyro.param("A", jnp.ones((3, 3)) / 3, constraint=constraints.simplex)
    mu = numpyro.param("mu", jnp.zeros((3, 2)))
    sigma = numpyro.param("sigma", jnp.ones((3, 2)), constraint=constraints.positive)
    z = None
    for t in markov(range(x.shape[0])):
        with numpyro.plate("seqs", x.shape[1]), numpyro.handlers.mask(mask=mask[t]):
            z = numpyro.sample(f"z_{t}", dist.Categorical(pi if z is None else A[z]))
            numpyro.sample(f"x_{t}", dist.Normal(mu[z], sigma[z]).to_event(1), obs=x[t])


def test_num_observations_and_bic_of_a_markov_loop_equal_hmmlearn(x64):
    lengths = [6, 4, 5]
    seqs = [s[:n] for s, n in zip(_gaussian_seqs(6, 3, seed=7), lengths)]
    x, mask = np.zeros((6, 3, 2)), np.zeros((6, 3), bool)
    for i, s in enumerate(seqs):
        x[: len(s), i], mask[: len(s), i] = s, True
    x, mask = jnp.asarray(x), jnp.asarray(mask)
    p = {k: jnp.asarray(v) for k, v in GAUSSIAN.items()}
    assert jaxem.num_observations(_loop_gaussian_hmm, x, mask) == sum(lengths)
    ref = _hmmlearn_reference()
    data = np.concatenate(seqs)
    np.testing.assert_allclose(
        float(jaxem.bic(_loop_gaussian_hmm, p, x, mask)), ref.bic(data, lengths), rtol=1e-10
    )


# --- observations that count at padded steps ----------------------------------------------


# ``scan_hmm`` with the mask around the latent only (unless ``masked`` says otherwise).
_latent_masked_hmm = functools.partial(scan_hmm, masked="z")


def test_an_observation_counting_at_a_padded_step_is_rejected(x64):
    x, mask = _padded(at_start=False)
    with pytest.raises(
        ModelError,
        match=r"observed site 'x' counts at steps where the Markov chain's latent site 'z' is "
        r"masked \(padding\) in sequence\(s\) \[0, 1\] of plate\(s\) \['seqs'\]",
    ):
        jaxem.log_likelihood(_latent_masked_hmm, PARAMS, x, mask)
    # NaN (nothing observed) at the padded steps under nan_as_missing counts nothing.
    model = jaxem.nan_as_missing(_latent_masked_hmm)
    ll = jaxem.log_likelihood(model, PARAMS, jnp.where(mask, x, jnp.nan), mask)
    np.testing.assert_allclose(float(ll), sum(brute_force(s) for s in SEQS), rtol=1e-12)
    # The observation masked and the latent kept: trailing missing observations,
    # whose latents sum out exactly.
    ll = jaxem.log_likelihood(_latent_masked_hmm, PARAMS, x, mask, masked="x")
    np.testing.assert_allclose(float(ll), sum(brute_force(s) for s in SEQS), rtol=1e-12)
    assert jaxem.num_observations(_latent_masked_hmm, x, mask, masked="x") == 8


_loop_latent_masked = functools.partial(loop_hmm, mask_observations=False)


def test_an_observation_counting_under_a_masked_latent_of_a_loop_is_rejected(x64):
    seq = SEQS[1]
    x = jnp.zeros(6).at[: len(seq)].set(seq)
    mask = jnp.arange(6) < len(seq)
    with pytest.raises(
        ModelError,
        match="observed site 'x_3' counts where latent site 'z_3', which it depends on, is masked",
    ):
        jaxem.log_likelihood(_loop_latent_masked, PARAMS, x, mask)
    model = jaxem.nan_as_missing(_loop_latent_masked)
    ll = jaxem.log_likelihood(model, PARAMS, jnp.where(mask, x, jnp.nan), mask)
    np.testing.assert_allclose(float(ll), brute_force(seq), rtol=1e-12)


def _obs_mask_hmm(x, observed):
    """``scan_hmm`` with missing observations given by ``obs_mask`` in the scan body."""
    rows, mu = _scan_params()

    def step(z_prev, inputs):
        x_t, m_t = inputs
        with numpyro.plate("seqs", x.shape[1]):
            z = numpyro.sample("z", dist.Categorical(rows[z_prev]))
            numpyro.sample("x", dist.Normal(mu[z], 1.0), obs=x_t, obs_mask=m_t)
        return z, None

    scan(step, jnp.full(x.shape[1], K), (x, observed))


def test_obs_mask_in_a_scan_body_marginalizes_the_missing_observations(x64):
    x = np.array([[0.3, 1.1], [-1.2, 0.4], [0.8, -0.7], [1.5, 0.2]])
    observed = np.ones((4, 2), bool)
    observed[2, 0] = observed[1, 1] = False
    ll = jaxem.log_likelihood(_obs_mask_hmm, PARAMS, jnp.asarray(x), jnp.asarray(observed))
    expected = sum(brute_force(np.where(observed[:, i], x[:, i], np.nan)) for i in range(2))
    np.testing.assert_allclose(float(ll), expected, rtol=1e-12)
    assert jaxem.num_observations(_obs_mask_hmm, jnp.asarray(x), jnp.asarray(observed)) == 6
