"""Standard errors from the observed information: Dempster, Laird and Rubin's genetic
linkage example, finite-difference Hessians of ``log_likelihood``, case weights."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.contrib.control_flow import scan
from numpyro.distributions import constraints
from numpyro.distributions.transforms import biject_to

import jaxem
from jaxem import EM
from jaxem.exceptions import NumericalWarning

# Dempster, Laird and Rubin (1977), section 1: 197 animals in four categories with cell
# probabilities (1/2 + theta/4, (1 - theta)/4, (1 - theta)/4, theta/4). The first
# category is two cells, 1/2 and theta/4, which one an animal is in is the latent.
CELL_TO_CATEGORY = np.array(
    [[1, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], np.float64
)
LINKAGE_COUNTS = np.array([125.0, 18.0, 20.0, 34.0])


def linkage(y, counts):
    theta = numpyro.param("theta", jnp.array(0.5), constraint=constraints.unit_interval)
    probs = jnp.stack([0.5, theta / 4, (1 - theta) / 4, (1 - theta) / 4, theta / 4])
    with numpyro.plate("category", y.shape[0]), numpyro.handlers.scale(scale=counts):
        cell = numpyro.sample("cell", dist.Categorical(probs))
        emission = jnp.asarray(CELL_TO_CATEGORY)[cell]
        numpyro.sample("y", dist.Categorical(probs=emission), obs=y)


def mixture(x, K=2):
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    mu = numpyro.param("mu", jnp.linspace(-1.0, 1.0, K))
    sigma = numpyro.param("sigma", jnp.ones(K), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Normal(mu[z], sigma[z]), obs=x)


def hmm(x):
    pi = numpyro.param("pi", jnp.array([0.5, 0.5]), constraint=constraints.simplex)
    A = numpyro.param("A", jnp.array([[0.8, 0.2], [0.2, 0.8]]), constraint=constraints.simplex)
    mu = numpyro.param("mu", jnp.array([-1.0, 1.0]))
    z0 = numpyro.sample("z0", dist.Categorical(pi))
    numpyro.sample("x0", dist.Normal(mu[z0], 1.0), obs=x[0])

    def step(z_prev, x_t):
        z = numpyro.sample("z", dist.Categorical(A[z_prev]))
        numpyro.sample("x", dist.Normal(mu[z], 1.0), obs=x_t)
        return z, None

    scan(step, z0, x[1:])


def mixture_data():
    rng = np.random.default_rng(0)
    return jnp.asarray(np.concatenate([rng.normal(-2, 0.8, 60), rng.normal(2, 1.0, 90)]))


def hmm_data():
    rng = np.random.default_rng(1)
    states = np.repeat([0, 1, 0, 1, 1, 0], 10)
    return jnp.asarray(np.where(states == 0, -1.0, 1.0) * 1.5 + rng.normal(0, 1.0, states.size))


def finite_difference_covariance(model, params, names, *args, step=1e-4, log_prior=None):
    """The delta-method covariance of the constrained params from a central-difference
    Hessian of jaxem.log_likelihood (plus ``log_prior(params)``, if given) in
    unconstrained coordinates (float64)."""
    structure_params = {n: params[n] for n in names}
    constraints_ = {
        "w": constraints.simplex,
        "pi": constraints.simplex,
        "A": constraints.simplex,
        "sigma": constraints.positive,
        "mu": constraints.real,
    }
    transforms = {n: biject_to(constraints_[n]) for n in names}
    u0 = {n: np.asarray(transforms[n].inv(structure_params[n])) for n in names}
    sizes = [u0[n].size for n in names]
    flat0 = np.concatenate([u0[n].ravel() for n in names])

    def unflatten(flat):
        out, offset = {}, 0
        for n, size in zip(names, sizes):
            out[n] = transforms[n](jnp.asarray(flat[offset : offset + size].reshape(u0[n].shape)))
            offset += size
        return out

    # Compiled once (under jit the checks of concrete values are skipped).
    def objective(p):
        value = jaxem.log_likelihood(model, p, *args)
        return value if log_prior is None else value + log_prior(p)

    compiled = jax.jit(objective)

    def f(flat):
        return float(compiled({**params, **unflatten(flat)}))

    d = flat0.size
    hessian = np.zeros((d, d))
    for i in range(d):
        for j in range(i, d):
            e_i, e_j = np.eye(d)[i] * step, np.eye(d)[j] * step
            value = (
                f(flat0 + e_i + e_j)
                - f(flat0 + e_i - e_j)
                - f(flat0 - e_i + e_j)
                + f(flat0 - e_i - e_j)
            ) / (4 * step**2)
            hessian[i, j] = hessian[j, i] = value
    jacobian = np.zeros((sum(np.asarray(params[n]).size for n in names), d))
    for i in range(d):
        e = np.eye(d)[i] * 1e-6
        plus = np.concatenate([np.asarray(v).ravel() for v in unflatten(flat0 + e).values()])
        minus = np.concatenate([np.asarray(v).ravel() for v in unflatten(flat0 - e).values()])
        jacobian[:, i] = (plus - minus) / 2e-6
    return jacobian @ np.linalg.inv(-hessian) @ jacobian.T


# --- Dempster, Laird and Rubin (1977) -------------------------------------------------------


def test_genetic_linkage_standard_error_and_rate_of_convergence(x64):
    y, counts = jnp.arange(4), jnp.asarray(LINKAGE_COUNTS)
    em = EM(linkage)
    fit = em.run(jax.random.PRNGKey(0), y, counts, max_iter=100, tol=1e-14)
    theta = float(fit.params["theta"])
    np.testing.assert_allclose(theta, 0.6268214979, rtol=1e-8)
    se = em.standard_errors(fit, y, counts)
    np.testing.assert_allclose(float(se.standard_errors["theta"]), 0.05147, rtol=1e-4)
    np.testing.assert_allclose(1.0 / float(se.covariance[0, 0]), 377.517, rtol=1e-4)
    assert se.index == {"theta": slice(0, 1)}
    # The closed-form observed information of the four-cell multinomial.
    x1, x2, x3, x4 = LINKAGE_COUNTS
    closed = x1 / (2 + theta) ** 2 + (x2 + x3) / (1 - theta) ** 2 + x4 / theta**2
    np.testing.assert_allclose(1.0 / float(se.covariance[0, 0]), closed, rtol=1e-8)
    # EM's observed rate of convergence, from successive iterates, is the fraction of
    # missing information (DLR's Table 1: 0.1328).
    state = em.init(jax.random.PRNGKey(0), y, counts, init_params={"theta": jnp.array(0.5)})
    iterates = [float(state.params["theta"])]
    for _ in range(6):
        state, _ = em.update(state, y, counts)
        iterates.append(float(state.params["theta"]))
    # The root of 197 theta^2 - 15 theta - 68 = 0 (the fit is within 1e-8 of it).
    exact = (15 + np.sqrt(15**2 + 4 * 197 * 68)) / (2 * 197)
    errors = np.asarray(iterates) - exact
    rates = errors[1:] / errors[:-1]  # 0.1465, 0.1346, 0.1330, 0.1328, 0.1328, ...
    np.testing.assert_allclose(rates[4:], float(se.missing_fraction), rtol=1e-4)
    np.testing.assert_allclose(float(se.missing_fraction), 0.1328, atol=1e-4)


# --- against finite differences of log_likelihood ------------------------------------------


def test_mixture_standard_errors_equal_a_finite_difference_hessian(x64):
    x = mixture_data()
    fit = EM(mixture).run(jax.random.PRNGKey(0), x, max_iter=500, tol=1e-12)
    se = jaxem.standard_errors(mixture, fit, x)
    names = ["w", "mu", "sigma"]
    expected = finite_difference_covariance(mixture, fit.params, names, x)
    np.testing.assert_allclose(se.covariance, expected, rtol=1e-4, atol=1e-8)
    for name in names:
        np.testing.assert_allclose(
            se.standard_errors[name], np.sqrt(np.diag(expected))[se.index[name]], rtol=1e-4
        )
    # A simplex: both weights have an error, and they sum to 1 with no variance.
    cov_w = se.covariance[se.index["w"], se.index["w"]]
    np.testing.assert_allclose(cov_w @ np.ones(2), 0.0, atol=1e-12)
    np.testing.assert_allclose(se.standard_errors["w"][0], se.standard_errors["w"][1])
    # A frozen param has no standard error; the others' are conditional on its value.
    frozen = jaxem.standard_errors(mixture, fit, x, frozen=["w"])
    assert set(frozen.standard_errors) == {"mu", "sigma"} and frozen.covariance.shape == (4, 4)
    expected = finite_difference_covariance(mixture, fit.params, ["mu", "sigma"], x)
    np.testing.assert_allclose(frozen.covariance, expected, rtol=1e-4, atol=1e-8)


def test_hmm_standard_errors_equal_a_finite_difference_hessian(x64):
    x = hmm_data()
    # The initial distribution of a single sequence goes to a vertex: held fixed.
    em = EM(hmm, frozen=["pi"])
    fit = em.run(jax.random.PRNGKey(0), x, max_iter=500, tol=1e-12)
    se = em.standard_errors(fit, x)
    names = ["A", "mu"]
    expected = finite_difference_covariance(hmm, fit.params, names, x)
    np.testing.assert_allclose(se.covariance, expected, rtol=2e-4, atol=1e-8)


PRIOR_SCALE = 0.5


def mixture_with_a_prior(x):
    """`mixture` with Normal(0, PRIOR_SCALE) priors on the means (a global site)."""
    w = numpyro.param("w", jnp.ones(2) / 2, constraint=constraints.simplex)
    mu = numpyro.sample("mu", dist.Normal(0.0, PRIOR_SCALE).expand([2]).to_event(1))
    sigma = numpyro.param("sigma", jnp.ones(2), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Normal(mu[z], sigma[z]), obs=x)


def test_map_standard_errors_are_the_curvature_of_the_log_posterior(x64):
    """A MAP fit's information is that of the objective it maximized (the Laplace
    approximation), log p(x | theta) + log p(theta), not of the likelihood alone."""
    x = mixture_data()[::5]
    em = EM(mixture_with_a_prior, global_sites=("mu",))
    fit = em.run(jax.random.PRNGKey(0), x, max_iter=500, tol=1e-12)
    se = em.standard_errors(fit, x)
    names = ["w", "mu", "sigma"]

    def log_prior(p):
        return jnp.sum(dist.Normal(0.0, PRIOR_SCALE).log_prob(p["mu"]))

    expected = finite_difference_covariance(mixture, fit.params, names, x, log_prior=log_prior)
    np.testing.assert_allclose(se.covariance, expected, rtol=1e-4, atol=1e-8)
    # The likelihood's curvature alone gives larger errors for the means.
    likelihood_only = finite_difference_covariance(mixture, fit.params, names, x)
    index = se.index["mu"]
    assert np.all(np.diag(likelihood_only)[index] > 1.05 * np.diag(expected)[index])


# --- warnings and errors --------------------------------------------------------------------


def test_a_point_that_is_not_a_maximum_is_a_warning_naming_the_params(x64):
    # Two equal components: the direction that separates their means is flat or downhill.
    x = mixture_data()
    params = {"w": jnp.array([0.5, 0.5]), "mu": jnp.array([0.2, 0.2]), "sigma": jnp.full(2, 2.0)}
    with pytest.warns(NumericalWarning, match=r"not positive definite .* involve .*mu\[0\]"):
        se = jaxem.standard_errors(mixture, params, x)
    assert np.all(np.isnan(se.standard_errors["mu"]))


def test_hard_em_has_no_observed_information_errors(x64):
    x = mixture_data()
    em = EM(mixture, hard=True)
    with pytest.raises(ValueError, match="hard EM maximizes the complete-data likelihood"):
        em.standard_errors({"w": jnp.array([0.5, 0.5])}, x)
