"""reg_covar that dominates the data, and distribution arguments outside their support.

A regularizer comparable to the data's variance decides the fit (components merge or
are held at a variance of reg_covar) and makes the log-likelihood non-monotone: a
NumericalWarning says so, before the fit (the data's scale) and after it (a fitted
variance held up by reg_covar). A param that reaches a distribution argument through
a function can put that argument outside its support: a ModelError at the initial
values, and after a fit that moved it there.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.contrib.control_flow import scan
from numpyro.distributions import constraints

import jaxem
from jaxem import EM, VariationalEM
from jaxem.exceptions import ModelError, NumericalWarning
from tests.models import gmm_diag, gmm_scale_tril, normal_mixture_spread

RNG = np.random.default_rng(0)
X1 = np.concatenate([RNG.normal(-3.0, 1.0, 60), RNG.normal(3.0, 1.0, 60)])
X2 = np.concatenate([RNG.normal(-2.0, 1.0, (60, 2)), RNG.normal(2.0, 1.0, (60, 2))])
STATES = (np.arange(120) // 15) % 2
Y = np.where(STATES == 0, -2.0, 2.0) + RNG.normal(0.0, 1.0, 120)


def hmm(y, K=2):
    A = numpyro.param("A", jnp.full((K, K), 0.1) + 0.8 * jnp.eye(K), constraint=constraints.simplex)
    pi = numpyro.param("pi", jnp.ones(K) / K, constraint=constraints.simplex)
    mu = numpyro.param("mu", jnp.mean(y) + jnp.std(y) * jnp.linspace(-1.0, 1.0, K))
    sigma = numpyro.param("sigma", jnp.full(K, jnp.std(y)), constraint=constraints.positive)

    def step(z, y_t):
        z = numpyro.sample("z", dist.Categorical(A[z]))
        numpyro.sample("y", dist.Normal(mu[z], sigma[z]), obs=y_t)
        return z, None

    scan(step, numpyro.sample("z0", dist.Categorical(pi)), y)


def _messages(record):
    return [str(w.message) for w in record if issubclass(w.category, NumericalWarning)]


def test_reg_covar_against_data_at_a_small_scale_warns_before_and_after_the_fit():
    # Two clusters at scale 1e-4 (variance 1e-7): reg_covar=1e-6 merges them into two
    # identical components held at a variance of about reg_covar, "converged".
    x = jnp.asarray(X1 * 1e-4)
    init = {"mu": jnp.array([-3e-4, 3e-4]), "sigma": jnp.full(2, 1e-4)}
    with pytest.warns(NumericalWarning) as record:
        EM(normal_mixture_spread).run(jax.random.PRNGKey(0), x, init_params=init)
    before, after = _messages(record)
    assert "reg_covar=1e-06 is not small against the data of site 'x'" in before
    assert "smallest variance per coordinate is 9." in before
    assert "param 'sigma'" in before
    assert "Standardize the data" in before and "lower reg_covar" in before
    assert "need not increase monotonically" in before
    assert "fitted variance of param 'sigma' (site 'x')" in after
    assert "within a factor 10 of reg_covar=1e-06" in after
    assert "Standardize the data" in after
    # The warnings point at the caller, not inside jaxem.
    assert all(w.filename == __file__ for w in record)


@pytest.mark.filterwarnings("ignore::jaxem.ConvergenceWarning")
def test_hmm_sigma_held_at_sqrt_reg_covar_warns():
    # At scale 1e-5 every sigma sits at sqrt(reg_covar) = 1e-3 and the history decreases.
    with pytest.warns(NumericalWarning) as record:
        result = EM(hmm).run(jax.random.PRNGKey(0), jnp.asarray(Y * 1e-5))
    np.testing.assert_allclose(result.params["sigma"], 1e-3, rtol=1e-3)
    before, after = _messages(record)
    assert "site 'y'" in before and "param 'sigma'" in before
    assert "fitted variance of param 'sigma' (site 'y')" in after


@pytest.mark.filterwarnings("ignore::jaxem.ConvergenceWarning")
def test_full_covariance_eigenvalue_held_by_reg_covar_warns():
    x = jnp.asarray(X2 * 1e-4)
    init = {"mu": jnp.array([[-2e-4, -2e-4], [2e-4, 2e-4]])}
    with pytest.warns(NumericalWarning) as record:
        EM(gmm_scale_tril).run(jax.random.PRNGKey(0), x, K=2, init_params=init)
    before, after = _messages(record)
    assert "param 'L'" in before
    assert "smallest covariance eigenvalue of param 'L' (site 'x')" in after


def shared_scale_mixture(x):
    w = numpyro.param("w", jnp.ones(2) / 2, constraint=constraints.simplex)
    mu = numpyro.param("mu", jnp.array([-3e-4, 3e-4]))
    sigma = numpyro.param("sigma", 1e-4, constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Normal(mu[z], sigma), obs=x)


@pytest.mark.filterwarnings("ignore::jaxem.ConvergenceWarning")
def test_scalar_variance_held_by_reg_covar_warns():
    # One sigma shared by the components: the check used to fail on its 0-d array.
    with pytest.warns(NumericalWarning, match=r"fitted variance of param 'sigma' \(site 'x'\) is"):
        EM(shared_scale_mixture).run(jax.random.PRNGKey(0), jnp.asarray(X1 * 1e-5), max_iter=5)


def test_lowering_reg_covar_as_advised_fits_small_scale_data_without_warning():
    x = jnp.asarray(X1 * 1e-4)
    init = {"mu": jnp.array([-3e-4, 3e-4]), "sigma": jnp.full(2, 1e-4)}
    with warnings.catch_warnings():
        warnings.simplefilter("error", NumericalWarning)
        result = EM(normal_mixture_spread, reg_covar=1e-14).run(
            jax.random.PRNGKey(0), x, init_params=init
        )
    reference = EM(normal_mixture_spread).run(
        jax.random.PRNGKey(0), jnp.asarray(X1), init_params={"mu": init["mu"] * 1e4}
    )
    np.testing.assert_allclose(result.params["mu"], reference.params["mu"] * 1e-4, rtol=1e-3)
    np.testing.assert_allclose(result.params["sigma"], reference.params["sigma"] * 1e-4, rtol=1e-3)


def test_ordinary_models_on_standardized_data_do_not_warn():
    x1 = jnp.asarray((X1 - X1.mean()) / X1.std())
    x2 = jnp.asarray((X2 - X2.mean(0)) / X2.std(0))
    init2 = {"mu": jnp.array([[-1.0, -1.0], [1.0, 1.0]])}
    with warnings.catch_warnings():
        warnings.simplefilter("error", NumericalWarning)
        EM(normal_mixture_spread).run(jax.random.PRNGKey(0), x1)
        EM(gmm_diag).run(jax.random.PRNGKey(0), x2, K=2, init_params=init2)
        EM(gmm_scale_tril).run(jax.random.PRNGKey(0), x2, K=2, init_params=init2)
        EM(hmm).run(jax.random.PRNGKey(0), jnp.asarray(Y))


# -- arguments outside their support ------------------------------------------


def scale_product(x, K=2):
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    mu = numpyro.param("mu", jnp.array([-1.0, 1.0]))
    a = numpyro.param("a", jnp.ones(K))
    b = numpyro.param("b", jnp.ones(K))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Normal(mu[z], (a * b)[z]), obs=x)


def rescaled_weights(x, K=2):
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    c = numpyro.param("c", 1.0, constraint=constraints.positive)
    mu = numpyro.param("mu", jnp.array([-1.0, 1.0]))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w * c))
        numpyro.sample("x", dist.Normal(mu[z], 1.0), obs=x)


def scaled_probability(x):
    p = numpyro.param("p", 0.5, constraint=constraints.unit_interval)
    c = numpyro.param("c", 1.0, constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("x", dist.Bernoulli(p * c), obs=x)


def test_argument_outside_its_support_at_the_initial_values_names_site_argument_params():
    x = jnp.asarray(X1)
    init = {"b": jnp.array([1.0, -1.0])}
    match = (
        r"argument 'scale' of Normal at site 'x' lies outside its support "
        r"\(constraints.positive\) at the initial parameter values "
        r"\(1 of its entries, e.g. -1\.\).*"
        r"computed from param\(s\) \['a', 'b'\]"
    )
    with pytest.raises(ModelError, match=match):
        EM(scale_product).run(jax.random.PRNGKey(0), x, init_params=init)
    params = {"w": jnp.ones(2) / 2, "mu": jnp.zeros(2), "a": jnp.ones(2), "b": -jnp.ones(2)}
    with pytest.raises(ModelError, match="at the given parameter values"):
        jaxem.log_likelihood(scale_product, params, x)


def test_probabilities_rescaled_off_the_simplex_by_the_fit_are_an_error():
    # Categorical(w * c): c runs to 3e38 and the "log-likelihood" to +17000, which the
    # run reported with diverged=False.
    match = r"'probs' of Categorical at site 'z'.*fitted.*\['c', 'w'\]"
    with pytest.raises(ModelError, match=match):
        EM(rescaled_weights).run(jax.random.PRNGKey(0), jnp.asarray(X1))


def test_variational_em_checks_the_fitted_arguments_too():
    # The after-fit check is the shared driver's: VariationalEM used to return the fit
    # with the probabilities w * c off the simplex, diverged False.
    match = r"'probs' of Categorical at site 'z'.*fitted.*\['c', 'w'\]"
    with pytest.raises(ModelError, match=match):
        VariationalEM(rescaled_weights).run(jax.random.PRNGKey(0), jnp.asarray(X1))


def test_probability_pushed_above_one_is_not_a_converged_fit():
    # All ones: the likelihood grows with p * c up to 1 and beyond, where NumPyro clamps.
    match = r"'probs' of Bernoulli at site 'x'.*fitted.*\['c', 'p'\]"
    with pytest.raises(ModelError, match=match):
        EM(scaled_probability).run(jax.random.PRNGKey(0), jnp.ones(20))
    # Inside the support (p * c = 0.9 is the maximum) the same model fits.
    x = jnp.asarray((np.arange(20) % 10 != 0).astype(np.float32))
    result = EM(scaled_probability).run(jax.random.PRNGKey(0), x)
    assert bool(result.converged)
    np.testing.assert_allclose(result.params["p"] * result.params["c"], 0.9, rtol=1e-4)


def test_under_jit_an_argument_out_of_support_marks_the_fit_diverged():
    fit = jax.jit(lambda x: EM(rescaled_weights).run(jax.random.PRNGKey(0), x))
    result = fit(jnp.asarray(X1))
    assert bool(result.diverged) and not bool(result.converged)


# -- registered closed forms -------------------------------------------------


class _RegularizedRayleigh(dist.Distribution):
    """Rayleigh(scale); exists only here, so registering its update touches no other test."""

    arg_constraints = {"scale": constraints.positive}
    support = constraints.positive

    def __init__(self, scale):
        self.scale = scale
        super().__init__(jnp.shape(scale))

    def log_prob(self, x):
        return jnp.log(x) - 2 * jnp.log(self.scale) - x**2 / (2 * self.scale**2)


def _rayleigh_stats(cells, target):
    return cells.sum(target, (cells.weight, ""), (cells.value**2, "")), cells.count(target)


def _rayleigh_solve(stats, old, reg_covar):
    sum_sq, count = stats
    safe = jnp.where(count > 0, count, 1)
    return jnp.where(count > 0, jnp.sqrt(sum_sq / (2 * safe) + reg_covar), old)


def rayleigh_mixture(x):
    w = numpyro.param("w", jnp.ones(2) / 2, constraint=constraints.simplex)
    s = numpyro.param("s", jnp.array([0.5, 2.0]) * jnp.std(x), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", _RegularizedRayleigh(s[z]), obs=x)


@pytest.mark.filterwarnings("ignore::jaxem.ConvergenceWarning")
def test_registered_update_that_declares_its_variances_is_checked_against_reg_covar():
    # Scale^2 about 1e-10: reg_covar=1e-6 decides it. The check used to cover the
    # built-in Gaussian updates only.
    x = jnp.asarray(np.abs(X1) * 1e-5)
    jaxem.register_closed_form(
        _RegularizedRayleigh,
        "scale",
        jaxem.ClosedFormUpdate(
            _rayleigh_stats, _rayleigh_solve, variance_fn=lambda s: s[..., None] ** 2
        ),
    )
    match = r"fitted variance of param 's' \(site 'x'\).*within a factor 10 of reg_covar=1e-06"
    em = EM(rayleigh_mixture)
    with pytest.warns(NumericalWarning, match=match):
        em.run(jax.random.PRNGKey(0), x, max_iter=5)
    # On data at a scale of 1: no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error", NumericalWarning)
        em.run(jax.random.PRNGKey(0), x * 1e5, max_iter=5)
