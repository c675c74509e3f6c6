"""Case weights (a per-element ``numpyro.handlers.scale`` on a data plate) and the
per-observation log-likelihood, against brute-force enumeration, replicated rows and
scikit-learn."""

import itertools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from models import latent_class
from numpyro.contrib.control_flow import scan
from numpyro.contrib.funsor import markov
from numpyro.distributions import constraints
from scipy.stats import norm
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

import jaxem
from jaxem import EM
from jaxem.exceptions import ModelError, NumericalWarning


def weighted_mixture(x, weights=1.0, K=2):
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    mu = numpyro.param("mu", jnp.linspace(-1.0, 1.0, K))
    sigma = numpyro.param("sigma", jnp.ones(K), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]), numpyro.handlers.scale(scale=weights):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Normal(mu[z], sigma[z]), obs=x)


def weighted_latent_class(x, weights, K):
    with numpyro.handlers.scale(scale=weights):
        latent_class(x, K)


def scan_hmm(x, weights=1.0):
    """A batch of sequences, x of shape (T, N), the plate inside the scan body."""
    pi = numpyro.param("pi", jnp.array([0.4, 0.6]), constraint=constraints.simplex)
    A = numpyro.param("A", jnp.array([[0.8, 0.2], [0.3, 0.7]]), constraint=constraints.simplex)
    mu = numpyro.param("mu", jnp.array([-1.0, 1.0]))
    with numpyro.plate("seq", x.shape[1]), numpyro.handlers.scale(scale=weights):
        z0 = numpyro.sample("z0", dist.Categorical(pi))
        numpyro.sample("x0", dist.Normal(mu[z0], 1.0), obs=x[0])

    def step(z_prev, x_t):
        with numpyro.plate("seq", x.shape[1]), numpyro.handlers.scale(scale=weights):
            z = numpyro.sample("z", dist.Categorical(A[z_prev]))
            numpyro.sample("x", dist.Normal(mu[z], 1.0), obs=x_t)
        return z, None

    scan(step, z0, x[1:])


def loop_hmm(x, weights=1.0):
    """The same chain as a Python loop under ``markov`` (contracted by funsor)."""
    pi = numpyro.param("pi", jnp.array([0.4, 0.6]), constraint=constraints.simplex)
    A = numpyro.param("A", jnp.array([[0.8, 0.2], [0.3, 0.7]]), constraint=constraints.simplex)
    mu = numpyro.param("mu", jnp.array([-1.0, 1.0]))
    with numpyro.plate("seq", x.shape[1]), numpyro.handlers.scale(scale=weights):
        z = numpyro.sample("z_0", dist.Categorical(pi))
        numpyro.sample("x_0", dist.Normal(mu[z], 1.0), obs=x[0])
        for t in markov(range(1, x.shape[0])):
            z = numpyro.sample(f"z_{t}", dist.Categorical(A[z]))
            numpyro.sample(f"x_{t}", dist.Normal(mu[z], 1.0), obs=x[t])


HMM_PARAMS = {
    "pi": np.array([0.4, 0.6]),
    "A": np.array([[0.8, 0.2], [0.3, 0.7]]),
    "mu": np.array([-1.0, 1.0]),
}


def brute_force_sequences(x, params):
    """log p(x[:, n]) of every sequence, summing over all K^T paths."""
    pi, A, mu = params["pi"], params["A"], params["mu"]
    T, N = x.shape
    out = np.zeros(N)
    for n in range(N):
        total = 0.0
        for path in itertools.product(range(2), repeat=T):
            p = pi[path[0]] * norm.pdf(x[0, n], mu[path[0]])
            for t in range(1, T):
                p *= A[path[t - 1], path[t]] * norm.pdf(x[t, n], mu[path[t]])
            total += p
        out[n] = np.log(total)
    return out


# --- per-observation log-likelihood -------------------------------------------------------


def test_per_observation_matches_sklearn_score_samples(x64):
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(-2, 0.7, 40), rng.normal(1.5, 1.2, 60)])
    gm = GaussianMixture(2, random_state=0).fit(x[:, None])
    params = {
        "w": jnp.asarray(gm.weights_),
        "mu": jnp.asarray(gm.means_[:, 0]),
        "sigma": jnp.asarray(np.sqrt(gm.covariances_[:, 0, 0])),
    }
    per = jaxem.log_likelihood(weighted_mixture, params, jnp.asarray(x), per_observation=True)
    assert per.shape == (100,)
    np.testing.assert_allclose(per, gm.score_samples(x[:, None]), rtol=1e-10)
    total = jaxem.log_likelihood(weighted_mixture, params, jnp.asarray(x))
    np.testing.assert_allclose(jnp.sum(per), total, rtol=1e-12)


@pytest.mark.parametrize("model", [scan_hmm, loop_hmm])
def test_per_observation_of_a_batch_of_sequences_is_brute_force(model, x64):
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (4, 3)))
    params = {k: jnp.asarray(v) for k, v in HMM_PARAMS.items()}
    per = jaxem.log_likelihood(model, params, jnp.asarray(x), per_observation=True)
    np.testing.assert_allclose(per, brute_force_sequences(x, HMM_PARAMS), rtol=1e-10)


def test_per_observation_of_a_single_chain_says_what_it_can_do(x64):
    def single(x):
        pi = numpyro.param("pi", jnp.array([0.4, 0.6]), constraint=constraints.simplex)
        z0 = numpyro.sample("z0", dist.Categorical(pi))
        numpyro.sample("x0", dist.Normal(jnp.array([-1.0, 1.0])[z0], 1.0), obs=x[0])

        def step(z_prev, x_t):
            z = numpyro.sample("z", dist.Categorical(jnp.full((2, 2), 0.5)[z_prev]))
            numpyro.sample("x", dist.Normal(jnp.array([-1.0, 1.0])[z], 1.0), obs=x_t)
            return z, None

        scan(step, z0, x[1:])

    params = {"pi": jnp.array([0.4, 0.6])}
    with pytest.raises(ModelError, match="single sequence .* is one observation"):
        jaxem.log_likelihood(single, params, jnp.zeros(5), per_observation=True)
    assert np.isfinite(jaxem.log_likelihood(single, params, jnp.zeros(5)))


def test_per_observation_names_a_site_outside_the_data_plate(x64):
    def model(x, y):
        mu = numpyro.param("mu", jnp.array([-1.0, 1.0]))
        numpyro.sample("y", dist.Normal(mu[0], 1.0), obs=y)
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(jnp.ones(2) / 2))
            numpyro.sample("x", dist.Normal(mu[z], 1.0), obs=x)

    with pytest.raises(ModelError, match="site 'y' is outside plate 'data'"):
        jaxem.log_likelihood(
            model, {"mu": jnp.array([-1.0, 1.0])}, jnp.zeros(3), 0.5, per_observation=True
        )


# --- case weights ---------------------------------------------------------------------------


@pytest.mark.parametrize("model", [scan_hmm, loop_hmm])
def test_weighted_sequences_are_weighted_marginals(model, x64):
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (4, 3)))
    params = {k: jnp.asarray(v) for k, v in HMM_PARAMS.items()}
    weights = np.array([1.0, 3.0, 0.5])
    expected = weights * brute_force_sequences(x, HMM_PARAMS)
    ll = jaxem.log_likelihood(model, params, jnp.asarray(x), jnp.asarray(weights))
    np.testing.assert_allclose(ll, expected.sum(), rtol=1e-10)
    per = jaxem.log_likelihood(
        model, params, jnp.asarray(x), jnp.asarray(weights), per_observation=True
    )
    np.testing.assert_allclose(per, expected, rtol=1e-10)
    # The E-step's marginals are the gradient of this: integer weights give those of
    # the replicated sequences (the M-step reads its statistics from them).
    counts = jnp.array([2.0, 1.0, 1.0])

    def weighted(p):
        return jaxem.log_likelihood(model, p, jnp.asarray(x), counts)

    def replicated(p):
        return jaxem.log_likelihood(model, p, jnp.asarray(x[:, [0, 0, 1, 2]]))

    for name, g in jax.grad(weighted)(params).items():
        np.testing.assert_allclose(g, jax.grad(replicated)(params)[name], rtol=1e-10)


def test_weighted_mixture_is_the_replicated_fit_and_sklearns(x64):
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(-2, 0.7, 15), rng.normal(1.5, 1.2, 25)])
    counts = rng.integers(1, 4, size=x.shape[0])
    rows = np.repeat(x, counts)
    init = {"w": jnp.array([0.4, 0.6]), "mu": jnp.array([-1.0, 0.5]), "sigma": jnp.ones(2)}
    num_iters = 25
    weighted = EM(weighted_mixture).run(
        jax.random.PRNGKey(0),
        jnp.asarray(x),
        jnp.asarray(counts, jnp.float64),
        max_iter=num_iters,
        tol=0,
        init_params=init,
    )
    replicated = EM(weighted_mixture).run(
        jax.random.PRNGKey(0), jnp.asarray(rows), max_iter=num_iters, tol=0, init_params=init
    )
    gm = GaussianMixture(
        2,
        max_iter=num_iters,
        tol=0.0,
        reg_covar=1e-6,
        weights_init=np.asarray(init["w"]),
        means_init=np.asarray(init["mu"])[:, None],
        precisions_init=np.ones((2, 1, 1)),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gm.fit(rows[:, None])
    np.testing.assert_allclose(weighted.log_likelihood, replicated.log_likelihood, rtol=1e-10)
    for name in init:
        np.testing.assert_allclose(weighted.params[name], replicated.params[name], rtol=1e-9)
    np.testing.assert_allclose(weighted.params["w"], gm.weights_, rtol=1e-6)
    np.testing.assert_allclose(weighted.params["mu"], gm.means_[:, 0], rtol=1e-6)
    np.testing.assert_allclose(weighted.params["sigma"] ** 2, gm.covariances_[:, 0, 0], rtol=1e-6)
    # n is the sum of the weights, in num_observations and bic.
    args = (weighted_mixture, weighted.params, jnp.asarray(x), jnp.asarray(counts, jnp.float64))
    assert jaxem.num_observations(weighted_mixture, *args[2:]) == counts.sum()
    np.testing.assert_allclose(
        jaxem.bic(*args), jaxem.bic(weighted_mixture, replicated.params, jnp.asarray(rows))
    )


def carcinoma_patterns(load_csv):
    """The 118 ratings of the carcinoma data as 20 response patterns with counts."""
    x = load_csv("carcinoma.csv") - 1.0
    patterns, counts = np.unique(x, axis=0, return_counts=True)
    return x, patterns, counts.astype(np.float64)


def carcinoma_init():
    p = np.array([0.2, 0.5, 0.8])[:, None] + np.linspace(-0.05, 0.05, 7)[None, :]
    return {"w": jnp.full(3, 1.0 / 3), "p": jnp.asarray(p)}


def test_carcinoma_from_response_patterns_is_the_fit_to_the_rows(x64, load_csv):
    x, patterns, counts = carcinoma_patterns(load_csv)
    assert patterns.shape == (20, 7) and counts.sum() == 118
    kwargs = dict(max_iter=2000, tol=1e-12, init_params=carcinoma_init())
    rows = EM(latent_class).run(jax.random.PRNGKey(0), jnp.asarray(x), 3, **kwargs)
    weighted = EM(weighted_latent_class).run(
        jax.random.PRNGKey(0), jnp.asarray(patterns), jnp.asarray(counts), 3, **kwargs
    )
    assert abs(float(rows.log_likelihood) - (-293.705)) < 1e-3
    np.testing.assert_allclose(weighted.log_likelihood, rows.log_likelihood, rtol=1e-10)
    for name in ("w", "p"):
        np.testing.assert_allclose(weighted.params[name], rows.params[name], atol=1e-7)
    # The standard errors too. Some item probabilities reach exactly 0 (poLCA reports
    # them as 0.0000): held there, with NaN errors, in both fits alike.
    boundary = r"p\[\d, \d\].* on the boundary of its constraint"
    with pytest.warns(NumericalWarning, match=boundary):
        se_rows = jaxem.standard_errors(latent_class, rows, jnp.asarray(x), 3)
    with pytest.warns(NumericalWarning, match=boundary):
        se_weighted = jaxem.standard_errors(
            weighted_latent_class, weighted, jnp.asarray(patterns), jnp.asarray(counts), 3
        )
    for name in ("w", "p"):
        np.testing.assert_allclose(
            se_weighted.standard_errors[name], se_rows.standard_errors[name], rtol=1e-5
        )
    assert np.isfinite(se_rows.standard_errors["w"]).all()
    assert np.isnan(se_rows.standard_errors["p"]).any()
    assert np.isfinite(se_rows.standard_errors["p"]).sum() > 10
    assert (
        jaxem.num_observations(weighted_latent_class, jnp.asarray(patterns), jnp.asarray(counts), 3)
        == 118
    )


def test_a_scalar_scale_on_a_plate_weights_every_element(x64):
    x = jnp.array([-1.0, 0.2, 1.5])
    params = {"w": jnp.array([0.3, 0.7]), "mu": jnp.array([-1.0, 1.0]), "sigma": jnp.ones(2)}
    once = jaxem.log_likelihood(weighted_mixture, params, x)
    np.testing.assert_allclose(jaxem.log_likelihood(weighted_mixture, params, x, 3.0), 3 * once)


def test_different_scales_within_an_element_are_an_error(x64):
    def model(x):
        mu = numpyro.param("mu", jnp.array([-1.0, 1.0]))
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(jnp.ones(2) / 2))
            with numpyro.handlers.scale(scale=jnp.arange(1.0, 4.0)):
                numpyro.sample("x", dist.Normal(mu[z], 1.0), obs=x)

    with pytest.raises(ModelError, match="'x' and 'z' of plate 'data' have different scales"):
        jaxem.log_likelihood(model, {"mu": jnp.array([-1.0, 1.0])}, jnp.zeros(3))


def test_a_scale_that_varies_within_an_element_is_an_error(x64):
    def model(x):
        p = numpyro.param("p", jnp.array([0.3, 0.6]), constraint=constraints.unit_interval)
        with numpyro.handlers.scale(scale=jnp.ones((3, 4))), numpyro.plate("data", 4):
            z = numpyro.sample("z", dist.Categorical(jnp.ones(2) / 2))
            with numpyro.plate("items", 3):
                numpyro.sample("x", dist.Bernoulli(p[z]), obs=x)

    with pytest.raises(ModelError, match="varies along dims other than one plate"):
        jaxem.log_likelihood(model, {"p": jnp.array([0.3, 0.6])}, jnp.zeros((3, 4)))


def test_weights_that_are_not_finite_or_negative_are_an_error(x64):
    params = {"w": jnp.array([0.5, 0.5]), "mu": jnp.array([-1.0, 1.0]), "sigma": jnp.ones(2)}
    with pytest.raises(ModelError, match="element 1 has weight nan"):
        jaxem.log_likelihood(weighted_mixture, params, jnp.zeros(3), jnp.array([1.0, jnp.nan, 2.0]))
    with pytest.raises(ModelError, match="element 1 has weight -1.0"):
        EM(weighted_mixture).run(
            jax.random.PRNGKey(0), jnp.zeros(3), jnp.array([1.0, -1.0, 2.0]), max_iter=2
        )


@pytest.mark.parametrize(
    "fitter, match",
    [
        (lambda m: EM(m, hard=True), "hard EM does not support"),
        (lambda m: jaxem.VariationalEM(m), "VariationalEM does not support"),
        (lambda m: jaxem.OnlineEM(m), "OnlineEM does not support"),
    ],
)
def test_fitters_without_case_weights_say_so(fitter, match, x64):
    x = jnp.array([-1.0, 0.2, 1.5])
    fit = fitter(weighted_mixture)
    with pytest.raises(ModelError, match=match):
        state = fit.init(jax.random.PRNGKey(0), x, jnp.ones(3))
        fit.update(state, x, jnp.ones(3))


def test_per_observation_of_a_latent_with_one_value_is_the_observations_density(x64):
    # A support of one value has no enumeration dim: nothing to sum out (this raised an
    # IndexError).
    def one_class(x):
        mu = numpyro.param("mu", jnp.array([0.5]))
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(jnp.ones(1)))
            numpyro.sample("x", dist.Normal(mu[z], 1.0), obs=x)

    x = jnp.array([0.1, -0.3, 1.2])
    params = {"mu": jnp.array([0.5])}
    per = jaxem.log_likelihood(one_class, params, x, per_observation=True)
    np.testing.assert_allclose(per, norm.logpdf(np.asarray(x), 0.5, 1.0), rtol=1e-12)
    np.testing.assert_allclose(per.sum(), jaxem.log_likelihood(one_class, params, x))
