"""VariationalEM against exact EM and brute-force ELBOs.

Mean field is exact for mixtures (one latent per point), so there VEM must
reproduce EM; on an HMM it is not, and the ELBO must stay below the exact
log-likelihood while increasing. The ELBO itself is checked against a sum over
every joint latent configuration of q(z) (log p(x, z) - log q(z)).
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from models import normal_mixture_spread
from numpyro import handlers
from numpyro.contrib.funsor import markov
from numpyro.distributions import constraints
from numpyro.infer.util import log_density

import jaxem
from jaxem.factorized import colour, tractable
from jaxem.tracing import enumerated_trace


def hmm(y, K=2):
    """Gaussian HMM written as a Python loop under ``markov`` (one site per step)."""
    init = numpyro.param("init", jnp.ones(K) / K, constraint=constraints.simplex)
    trans = numpyro.param(
        "trans",
        jnp.full((K, K), 0.2 / (K - 1)) + (0.8 - 0.2 / (K - 1)) * jnp.eye(K),
        constraint=constraints.simplex,
    )
    mu = numpyro.param("mu", jnp.linspace(-1.0, 1.0, K))
    z = None
    for t in markov(range(y.shape[0])):
        z = numpyro.sample(f"z_{t}", dist.Categorical(init if z is None else trans[z]))
        numpyro.sample(f"y_{t}", dist.Normal(mu[z], 1.0), obs=y[t])


def hierarchical(x):
    """A global latent g, per-point latents z depending on it, data depending on both."""
    w = numpyro.param("w", jnp.array([0.2, 0.5, 0.3]), constraint=constraints.simplex)
    table = numpyro.param(
        "table", jnp.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7]]), constraint=constraints.simplex
    )
    mu = numpyro.param("mu", jnp.array([[-1.0, 0.5], [0.0, 1.5], [2.0, -0.5]]))
    g = numpyro.sample("g", dist.Categorical(w))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(table[g]))
        numpyro.sample("x", dist.Normal(mu[g, z], 1.0), obs=x)


def _mixture_data(rng):
    return jnp.asarray(np.concatenate([rng.normal(-2.0, 1.0, 60), rng.normal(2.0, 0.5, 40)]))


def _hmm_data(rng, T=9):
    return jnp.asarray(rng.normal(np.repeat([-1.0, 1.0, -1.0], T // 3), 1.0))


def test_mean_field_matches_em_on_a_mixture(x64, rng):
    x = _mixture_data(rng)
    key = jax.random.PRNGKey(0)
    exact = jaxem.EM(normal_mixture_spread).run(key, x, max_iter=100, tol=1e-12)
    variational = jaxem.VariationalEM(normal_mixture_spread).run(key, x, max_iter=100, tol=1e-12)
    for name, value in exact.params.items():
        np.testing.assert_allclose(variational.params[name], value, rtol=1e-6)
    # Mean field is the posterior here: the bound is tight.
    np.testing.assert_allclose(variational.elbo, variational.log_likelihood, rtol=1e-6)
    np.testing.assert_allclose(variational.elbo, exact.log_likelihood, rtol=1e-6)
    np.testing.assert_allclose(
        variational.q["z"],
        jaxem.posterior(normal_mixture_spread, variational.params, x)["z"],
        atol=1e-8,
    )
    assert int(variational.num_iters) == int(exact.num_iters)


def test_mean_field_on_an_hmm_stays_below_the_log_likelihood_and_increases(x64, rng):
    y = _hmm_data(rng)
    vem = jaxem.VariationalEM(hmm, e_step_iters=3)
    state = vem.init(jax.random.PRNGKey(0), y)
    elbos, log_liks = [], []
    for _ in range(10):
        log_liks.append(float(jaxem.log_likelihood(hmm, state.params, y)))
        state, value = vem.update(state, y)
        elbos.append(float(value))
    elbos, log_liks = np.array(elbos), np.array(log_liks)
    assert np.all(elbos <= log_liks + 1e-10 * np.abs(log_liks))
    assert np.all(np.diff(elbos) >= -1e-10 * np.abs(elbos[1:]))
    assert elbos[-1] > elbos[0] + 1.0  # it does climb
    # Neighbouring time steps are coupled: mean field leaves a visible gap.
    assert np.min(log_liks - elbos) > 1e-3


def _quadratic_guide(x, K=2):
    """Amortized guide: logits from a linear layer on (1, x, x^2), the form of the
    exact posterior of a univariate Gaussian mixture."""
    weights = numpyro.param("weights", jnp.zeros((3, K)))
    features = jnp.stack([jnp.ones_like(x), x, x**2], axis=-1)
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("z", dist.Categorical(logits=features @ weights))


def test_amortized_guide_reaches_em_optimum_on_a_mixture(x64, rng):
    x = _mixture_data(rng)
    key = jax.random.PRNGKey(0)
    exact = jaxem.EM(normal_mixture_spread).run(key, x, max_iter=100, tol=1e-12)
    vem = jaxem.VariationalEM(normal_mixture_spread, _quadratic_guide, e_step_iters=20)
    result = vem.run(key, x, max_iter=150, tol=1e-12)
    for name, value in exact.params.items():
        np.testing.assert_allclose(result.params[name], value, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(result.elbo, exact.log_likelihood, rtol=1e-7)
    assert result.elbo <= result.log_likelihood + 1e-9
    history = np.asarray(result.history)[: int(result.num_iters)]
    assert np.all(np.diff(history) >= -1e-10 * np.abs(history[1:]))
    assert set(result.guide_params) == {"weights"}


def _brute_force_elbo(model, params, q, latent_sites, args):
    """sum over every joint configuration z of q(z) (log p(x, z) - log q(z))."""
    choices = []  # (site, index into the site's value array, number of values)
    for name in latent_sites:
        for index in np.ndindex(q[name].shape[:-1]):
            choices.append((name, index, q[name].shape[-1]))
    total = 0.0
    for assignment in itertools.product(*[range(k) for _, _, k in choices]):
        values = {name: np.zeros(q[name].shape[:-1], int) for name in latent_sites}
        log_q = 0.0
        for (name, index, _), value in zip(choices, assignment):
            values[name][index] = value
            log_q += np.log(q[name][index + (value,)])
        conditioned = handlers.condition(model, {n: jnp.asarray(v) for n, v in values.items()})
        log_p, _ = log_density(conditioned, args, {}, params)
        total += np.exp(log_q) * (float(log_p) - log_q)
    return total


def _random_q(rng, shapes):
    return {n: rng.dirichlet(np.ones(s[-1]), size=s[:-1]) for n, s in shapes.items()}


@pytest.mark.parametrize("case", ["hierarchical", "hmm"])
def test_elbo_equals_brute_force(x64, rng, case):
    if case == "hierarchical":
        model, args = hierarchical, (jnp.array([0.3, -1.2, 2.5]),)
        params = {
            "w": jnp.array([0.2, 0.5, 0.3]),
            "table": jnp.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7]]),
            "mu": jnp.array([[-1.0, 0.5], [0.0, 1.5], [2.0, -0.5]]),
        }
        q = _random_q(rng, {"g": (3,), "z": (3, 2)})
    else:
        model, args = hmm, (jnp.array([0.4, -1.0, 1.3]), 3)
        params = {
            "init": jnp.array([0.5, 0.3, 0.2]),
            "trans": jnp.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]]),
            "mu": jnp.array([-1.0, 0.0, 1.0]),
        }
        q = _random_q(rng, {f"z_{t}": (3,) for t in range(3)})
    expected = _brute_force_elbo(model, params, q, list(q), args)
    value = jaxem.elbo(model, params, {n: jnp.asarray(v) for n, v in q.items()}, *args)
    np.testing.assert_allclose(value, expected, rtol=1e-10)
    # A lower bound, tight only at the posterior.
    assert value < jaxem.log_likelihood(model, params, *args)


def test_mean_field_fixed_point_on_a_tiny_model_beats_random_q(x64, rng):
    # After many sweeps, q is a coordinate-wise optimum: each site's factor is
    # the softmax of its expected log joint, checked by brute force over one
    # site's values with the others' q fixed.
    x = jnp.array([0.3, -1.2, 2.5])
    vem = jaxem.VariationalEM(hierarchical, e_step_iters=50)
    state = vem.init(jax.random.PRNGKey(0), x)
    params = state.params
    q = vem.update(state, x)[0].q  # the E-step's q, at the params of ``state``
    base = float(jaxem.elbo(hierarchical, params, q, x))
    for _ in range(5):
        other = _random_q(rng, {"g": (3,), "z": (3, 2)})
        for name in q:
            trial = {**q, name: other[name]}
            assert float(jaxem.elbo(hierarchical, params, trial, x)) <= base + 1e-10


def test_colouring_and_tractability():
    params = {"init": jnp.ones(2) / 2, "trans": jnp.eye(2) * 0.5 + 0.25, "mu": jnp.zeros(2)}
    found = []

    def structure_only(y):
        trace = enumerated_trace(hmm, params, (y,), {}, 0)
        # Eliminating a chain needs pairwise tables: 2 x 2 cells.
        found.extend([colour(trace), tractable(trace, 4), tractable(trace, 3)])
        return y

    jax.eval_shape(structure_only, jnp.zeros(5))
    assert found == [[["z_0", "z_2", "z_4"], ["z_1", "z_3"]], True, False]


def test_restarts_under_vmap_keep_the_best(rng):
    x = _mixture_data(rng)

    def random_start(x, K=2):
        w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
        mu = numpyro.param("mu", lambda key: jax.random.normal(key, (K,)) * 3)
        sigma = numpyro.param("sigma", jnp.ones(K), constraint=constraints.positive)
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(w))
            numpyro.sample("x", dist.Normal(mu[z], sigma[z]), obs=x)

    vem = jaxem.VariationalEM(random_start, exact_log_likelihood=False)
    result = vem.run(jax.random.PRNGKey(1), x, max_iter=50, num_restarts=3)
    assert result.restart_elbos.shape == (3,)
    assert result.elbo == np.max(result.restart_elbos)
    assert result.log_likelihood is None


def _guide_missing_site(x, K=2):
    numpyro.param("weights", jnp.zeros(K))


def _guide_observes(x, K=2):
    weights = numpyro.param("weights", jnp.zeros(K))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("z", dist.Categorical(logits=weights))
        numpyro.sample("x", dist.Normal(0.0, 1.0), obs=x)


def _structured_guide(y, K=2):
    logits = numpyro.param("logits", jnp.zeros((K, K)))
    z = None
    for t in markov(range(y.shape[0])):
        z = numpyro.sample(f"z_{t}", dist.Categorical(logits=logits[0 if z is None else z]))


def _guide_shadowing(x, K=2):
    w = numpyro.param("w", jnp.zeros(K))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("z", dist.Categorical(logits=w))


@pytest.mark.parametrize(
    "model, guide, data, message",
    [
        (normal_mixture_spread, _guide_missing_site, "mixture", r"misses \['z'\]"),
        (normal_mixture_spread, _guide_observes, "mixture", "guide observes site"),
        (hmm, _structured_guide, "hmm", "guide site 'z_1' depends on the guide's latent"),
        (normal_mixture_spread, _guide_shadowing, "mixture", r"guide's params \['w'\]"),
    ],
)
def test_bad_guides_are_named(rng, model, guide, data, message):
    x = _mixture_data(rng) if data == "mixture" else jnp.array([0.5, -0.5])
    with pytest.raises(jaxem.ModelError, match=message):
        jaxem.VariationalEM(model, guide).init(jax.random.PRNGKey(0), x)


def test_bad_arguments_are_named(rng):
    x = _mixture_data(rng)[:4]
    params = {"w": jnp.ones(2) / 2, "mu": jnp.zeros(2), "sigma": jnp.ones(2)}
    with pytest.raises(ValueError, match="e_step_iters must be at least 1"):
        jaxem.VariationalEM(normal_mixture_spread, e_step_iters=0)
    with pytest.raises(ValueError, match="exact_log_likelihood must be"):
        jaxem.VariationalEM(normal_mixture_spread, exact_log_likelihood="yes")
    with pytest.raises(ValueError, match=r"latent sites \['z'\]"):
        jaxem.elbo(normal_mixture_spread, params, {}, x)
    with pytest.raises(ValueError, match=r"q\['z'\] has shape \(4,\), expected \(4, 2\)"):
        jaxem.elbo(normal_mixture_spread, params, {"z": jnp.ones(4)}, x)
