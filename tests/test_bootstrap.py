"""The bootstrap: its standard errors agree with the observed information's on a
well-identified mixture, within Monte Carlo error; the states of hidden Markov models
are aligned across replicates, and whole sequences are resampled."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from models import latent_class
from numpyro.contrib.control_flow import scan
from numpyro.distributions import constraints
from test_uncertainty import hmm, mixture
from test_weights import scan_hmm

import jaxem
from jaxem.alignment import align_states, num_states, state_axes
from jaxem.arguments import split_args
from jaxem.built import built_model
from jaxem.estep import structure_and_args
from jaxem.tracing import enumerated_trace
from jaxem.weights import observation_plate

NUM_REPLICATES = 100
# The relative standard deviation of a standard deviation estimated from B draws is
# about 1 / sqrt(2 (B - 1)); four of them.
MONTE_CARLO_RTOL = 4.0 / np.sqrt(2.0 * (NUM_REPLICATES - 1))


@pytest.mark.parametrize("kind", ["nonparametric", "parametric"])
def test_bootstrap_standard_errors_agree_with_the_observed_information(kind, x64):
    rng = np.random.default_rng(3)
    x = jnp.asarray(np.concatenate([rng.normal(-3, 1.0, 120), rng.normal(3, 1.0, 180)]))
    em = jaxem.EM(mixture)
    fit = em.run(jax.random.PRNGKey(0), x, max_iter=300, tol=1e-10)
    se = em.standard_errors(fit, x)
    boot = jaxem.bootstrap(
        em, fit, jax.random.PRNGKey(1), x, num_replicates=NUM_REPLICATES, kind=kind
    )
    assert bool(np.all(boot.converged))
    for name in ("w", "mu", "sigma"):
        assert boot.params[name].shape == (NUM_REPLICATES, 2)
        np.testing.assert_allclose(
            boot.standard_errors[name], se.standard_errors[name], rtol=MONTE_CARLO_RTOL
        )
        lower, upper = boot.intervals[name]
        # The components are aligned to the fit: its estimate lies inside each interval.
        assert np.all(lower < fit.params[name]) and np.all(fit.params[name] < upper)


def test_bootstrap_refuses_an_unknown_kind(x64):
    em = jaxem.EM(mixture)
    with pytest.raises(ValueError, match="kind must be 'nonparametric' or 'parametric'"):
        jaxem.bootstrap(em, {}, jax.random.PRNGKey(0), jnp.zeros(3), kind="jackknife")


def test_nonparametric_bootstrap_of_a_single_sequence_says_what_it_can_do(x64):

    em = jaxem.EM(hmm)
    params = {
        "pi": jnp.array([0.5, 0.5]),
        "A": jnp.array([[0.8, 0.2], [0.2, 0.8]]),
        "mu": jnp.array([-1.0, 1.0]),
    }
    with pytest.raises(
        jaxem.ModelError, match=r"nonparametric bootstrap \(kind=\"parametric\" does not\)"
    ):
        jaxem.bootstrap(em, params, jax.random.PRNGKey(0), jnp.zeros(6), num_replicates=2)


# --- label switching in hidden Markov models ---------------------------------------------


def hmm3(x):
    """Three states, a batch of sequences x of shape (T, N), the plate inside the scan."""
    pi = numpyro.param("pi", jnp.ones(3) / 3, constraint=constraints.simplex)
    A = numpyro.param("A", jnp.full((3, 3), 1 / 3), constraint=constraints.simplex)
    mu = numpyro.param("mu", jnp.array([-1.0, 0.0, 1.0]))
    with numpyro.plate("seq", x.shape[1]):
        z0 = numpyro.sample("z0", dist.Categorical(pi))
        numpyro.sample("x0", dist.Normal(mu[z0], 1.0), obs=x[0])

    def step(z_prev, x_t):
        with numpyro.plate("seq", x.shape[1]):
            z = numpyro.sample("z", dist.Categorical(A[z_prev]))
            numpyro.sample("x", dist.Normal(mu[z], 1.0), obs=x_t)
        return z, None

    scan(step, z0, x[1:])


HMM3 = {
    "pi": np.array([0.5, 0.3, 0.2]),
    "A": np.array([[0.8, 0.15, 0.05], [0.1, 0.7, 0.2], [0.25, 0.05, 0.7]]),
    "mu": np.array([-2.0, 0.5, 3.0]),
}


def test_hmm_replicates_with_permuted_states_come_back_aligned(x64):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(0.0, 2.0, (12, 5)))
    # The states index pi, mu and both axes of A: read from the model's likelihood.
    reference = {n: jnp.asarray(v) for n, v in HMM3.items()}
    num = num_states(hmm3, reference, x)
    assert num == 3
    assert state_axes(hmm3, reference, num, x) == {"pi": [0], "A": [0, 1], "mu": [0]}
    # Six replicates near the reference, each with its states in another order.
    permutations = list(itertools.permutations(range(3)))
    truth = {
        n: np.stack([v + 0.01 * rng.uniform(size=v.shape) for _ in permutations])
        for n, v in HMM3.items()
    }
    truth["pi"] /= truth["pi"].sum(-1, keepdims=True)
    truth["A"] /= truth["A"].sum(-1, keepdims=True)
    permuted = {
        "pi": np.stack([truth["pi"][b][list(p)] for b, p in enumerate(permutations)]),
        "A": np.stack([truth["A"][b][np.ix_(p, p)] for b, p in enumerate(permutations)]),
        "mu": np.stack([truth["mu"][b][list(p)] for b, p in enumerate(permutations)]),
    }
    aligned = align_states(hmm3, permuted, reference, x)
    for name in ("pi", "A", "mu"):
        np.testing.assert_allclose(aligned[name], truth[name], rtol=1e-12)


def test_state_axes_keep_the_item_axis_of_a_square_emission_matrix(x64):
    # A latent class model with as many items as classes: p is (K, K), but only its
    # first axis is indexed by the classes.
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.integers(0, 2, (40, 2)).astype(float))
    params = {"p": jnp.array([[0.2, 0.7], [0.9, 0.4]]), "w": jnp.array([0.45, 0.55])}
    assert state_axes(latent_class, params, 2, x, 2) == {"p": [0], "w": [0]}


def shifted_mixture(x, c):
    """A mixture with a regression on two covariates: ``beta`` has as many entries as
    there are components, but the labels do not index it."""
    w = numpyro.param("w", jnp.array([0.5, 0.5]), constraint=constraints.simplex)
    mu = numpyro.param("mu", jnp.array([-1.0, 1.0]))
    beta = numpyro.param("beta", jnp.zeros(2))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Normal(mu[z] + c @ beta, 1.0), obs=x)


def test_state_axes_leave_out_a_param_whose_entries_are_equal_only_at_the_reference(x64):
    # Permuting beta's two entries, equal at the reference, leaves the log-likelihood
    # unchanged there, but beta is not indexed by the labels.
    rng = np.random.default_rng(2)
    c = jnp.asarray(rng.normal(size=(30, 2)))
    x = jnp.asarray(rng.normal(size=30))
    params = {"w": jnp.array([0.3, 0.7]), "mu": jnp.array([-1.0, 2.0]), "beta": jnp.full(2, 0.4)}
    assert state_axes(shifted_mixture, params, 2, x, c) == {"w": [0], "mu": [0]}


def test_the_resampling_unit_of_a_batch_of_sequences_is_a_sequence(x64):
    # The nonparametric bootstrap weights the elements of this plate (fast check; the
    # slow test below refits).
    x = jnp.zeros((20, 4))
    model = built_model(scan_hmm)
    structure, args, kwargs = structure_and_args(model, *split_args((x,), {}))
    trace = enumerated_trace(model, structure_params(scan_hmm, x), args, kwargs, 1)
    assert observation_plate(trace, "the bootstrap") == ("seq", -1)


def structure_params(model, *args):
    tr = numpyro.handlers.trace(numpyro.handlers.seed(model, 0)).get_trace(*args)
    return {n: s["value"] for n, s in tr.items() if s["type"] == "param"}


# An HMM's EM and its bootstrap compile for about 40 s.
@pytest.mark.slow
def test_nonparametric_bootstrap_resamples_whole_sequences(x64):
    # Identical sequences: any resampling of whole sequences is the same data, so every
    # replicate is the fit; resampling time steps would move them.
    rng = np.random.default_rng(2)
    sequence = np.where(np.repeat([0, 1, 0, 1], 5) == 0, -1.5, 1.5) + rng.normal(0, 1, 20)
    x = jnp.asarray(np.repeat(sequence[:, None], 4, axis=1))
    em = jaxem.EM(scan_hmm)
    fit = em.run(jax.random.PRNGKey(0), x, max_iter=200, tol=1e-10)
    boot = jaxem.bootstrap(em, fit, jax.random.PRNGKey(1), x, num_replicates=6, tol=1e-10)
    for name in ("pi", "A", "mu"):
        np.testing.assert_allclose(
            boot.params[name], np.broadcast_to(fit.params[name], boot.params[name].shape), atol=1e-6
        )


def test_aligning_states_the_model_does_not_let_permute_is_a_named_error(x64):
    def fixed_weights(x):
        mu = numpyro.param("mu", jnp.array([-1.0, 1.0]))
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(jnp.array([0.2, 0.8])))
            numpyro.sample("x", dist.Normal(mu[z], 1.0), obs=x)

    def two_sizes(x):
        mu = numpyro.param("mu", jnp.array([-1.0, 1.0]))
        nu = numpyro.param("nu", jnp.array([-1.0, 0.0, 1.0]))
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(jnp.ones(2) / 2))
            c = numpyro.sample("c", dist.Categorical(jnp.ones(3) / 3))
            numpyro.sample("x", dist.Normal(mu[z] + nu[c], 1.0), obs=x)

    x = jnp.linspace(-1.0, 3.0, 10)  # not symmetric about 0, as mu is
    mu = jnp.array([-1.0, 1.0])
    with pytest.raises(jaxem.ModelError, match="no permutation of the 2 states leaves"):
        align_states(fixed_weights, {"mu": mu[None]}, {"mu": mu}, x)
    params = {"mu": mu, "nu": jnp.array([-1.0, 0.0, 1.0])}
    batch = {n: v[None] for n, v in params.items()}
    with pytest.raises(jaxem.ModelError, match="take different numbers of values"):
        align_states(two_sizes, batch, params, x)
