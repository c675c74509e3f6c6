"""A Normal location affine in params: the weighted least-squares closed form
(`jaxem.affine`), against numpy's normal equations and least squares."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.distributions import constraints
from scipy import stats

import jaxem
from jaxem.monte_carlo_stats import ClosedFormMStep
from tests.models import one_factor_analysis, shifted_regressions, weighted_factor_draws

K, P = 2, 3


def _regression_data(n=200, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, P))
    z = rng.integers(0, K, n)
    y = np.array([-2.0, 2.0])[z] + X @ np.array([1.0, -0.5, 0.25])
    return X, y + np.array([0.5, 1.5])[z] * rng.normal(size=n)


def test_one_em_step_solves_the_normal_equations_with_precision_weights(x64):
    """One EM update: (mu, beta) from numpy's weighted normal equations over the cells
    (k, n), weights r_kn / sigma_k^2 (responsibilities computed here by brute force),
    then sigma from the residuals at the new location (ECM order)."""
    X, y = _regression_data()
    init = {
        "w": jnp.array([0.4, 0.6]),
        "mu": jnp.array([-1.0, 1.0]),
        "beta": jnp.array([0.5, 0.0, 0.0]),
        "sigma": jnp.array([1.0, 3.0]),
    }
    em = jaxem.EM(shifted_regressions, reg_covar=0.0)
    paths = em.m_step_paths(jnp.asarray(X), jnp.asarray(y))
    assert paths["mu"] == (
        "closed-form (Normal.loc at site 'y' (affine jointly with 'beta': weighted least squares))"
    )
    assert paths["beta"].startswith("closed-form (Normal.loc at site 'y' (affine jointly")
    state = em.init(jax.random.PRNGKey(0), jnp.asarray(X), jnp.asarray(y), init_params=init)
    state, _ = em.update(state, jnp.asarray(X), jnp.asarray(y))
    new = {k: np.asarray(v) for k, v in em.get_params(state).items()}

    p = {k: np.asarray(v) for k, v in init.items()}
    loc = p["mu"][:, None] + (X @ p["beta"])[None, :]  # (K, N)
    log_joint = np.log(p["w"])[:, None] + stats.norm.logpdf(y, loc, p["sigma"][:, None])
    r = np.exp(log_joint - np.logaddexp.reduce(log_joint, axis=0))
    design = np.concatenate(  # cell (k, n): [one-hot k, x_n]
        [
            np.broadcast_to(np.eye(K)[:, None, :], (K, len(y), K)),
            np.broadcast_to(X, (K,) + X.shape),
        ],
        axis=-1,
    ).reshape(K * len(y), K + P)
    weights = (r / p["sigma"][:, None] ** 2).ravel()
    target = np.broadcast_to(y, (K, len(y))).ravel()
    theta = np.linalg.solve(design.T @ (weights[:, None] * design), design.T @ (weights * target))
    np.testing.assert_allclose(new["mu"], theta[:K], rtol=1e-10)
    np.testing.assert_allclose(new["beta"], theta[K:], rtol=1e-10, atol=1e-12)
    residual = (target - design @ theta).reshape(K, len(y))
    sigma = np.sqrt((r * residual**2).sum(1) / r.sum(1))
    np.testing.assert_allclose(new["sigma"], sigma, rtol=1e-10)


# A well-posed design: no NumericalWarning (result.unidentified all False).
@pytest.mark.filterwarnings("error::jaxem.exceptions.NumericalWarning")
def test_em_reaches_the_maximum_of_the_marginal_likelihood(x64):
    """The fit with the closed form against scipy's optimizer on the marginal likelihood."""
    from scipy import optimize

    X, y = _regression_data(seed=1)
    result = jaxem.EM(shifted_regressions).run(
        jax.random.PRNGKey(0), jnp.asarray(X), jnp.asarray(y), max_iter=2000, tol=1e-12
    )

    def nll(t):
        w = np.array([1 / (1 + np.exp(-t[0])), 1 / (1 + np.exp(t[0]))])
        loc = t[1:3, None] + (X @ t[3:6])[None, :]
        comp = stats.norm.logpdf(y, loc, np.exp(t[6:8])[:, None])
        return -np.logaddexp.reduce(np.log(w)[:, None] + comp, axis=0).sum()

    p = {k: np.asarray(v) for k, v in result.params.items()}
    start = np.concatenate(
        [[np.log(p["w"][0] / p["w"][1])], p["mu"], p["beta"], np.log(p["sigma"])]
    )
    opt = optimize.minimize(nll, start, method="BFGS", options={"gtol": 1e-9})
    np.testing.assert_allclose(-float(result.log_likelihood), opt.fun, rtol=1e-9)
    np.testing.assert_allclose(p["beta"], opt.x[3:6], atol=1e-5)
    assert not any(np.any(np.asarray(v)) for v in result.unidentified.values())


def mixture_of_experts(X, y, K):
    """benchmarks/compile.py's moe."""
    gate = numpyro.param("gate", lambda key: 0.1 * jax.random.normal(key, (X.shape[1], K)))
    beta = numpyro.param("beta", lambda key: jax.random.normal(key, (K, X.shape[1])))
    sigma = numpyro.param("sigma", jnp.ones(K), constraint=constraints.positive)
    with numpyro.plate("data", y.shape[0]):
        z = numpyro.sample("z", dist.Categorical(logits=X @ gate))
        numpyro.sample("y", dist.Normal((beta[z] * X).sum(-1), sigma[z]), obs=y)


def test_m_step_paths_of_experts_and_factor_loadings():
    paths = jaxem.EM(mixture_of_experts).m_step_paths(jnp.ones((5, 3)), jnp.ones(5), 3)
    assert paths["beta"] == "closed-form (Normal.loc at site 'y' (affine: weighted least squares))"
    assert paths["gate"].startswith("gradient")
    assert paths["sigma"] == "closed-form (Normal.scale at site 'y')"
    paths = jaxem.SAEM(one_factor_analysis).m_step_paths(jnp.ones((5, 4)))
    assert paths["mean"] == (
        "closed-form (Normal.loc at site 'x' (affine jointly with 'loadings': weighted least "
        "squares))"
    )
    assert paths["loadings"].startswith("closed-form (Normal.loc at site 'x' (affine jointly")
    forced = jaxem.SAEM(one_factor_analysis, m_step="gradient").m_step_paths(jnp.ones((5, 4)))
    assert forced["mean"].startswith("gradient") and forced["loadings"].startswith("gradient")


def test_the_monte_carlo_m_step_solves_the_draw_averaged_normal_equations(x64):
    """Factor analysis given weighted draws of the scores: mean and loadings are numpy's
    weighted least squares over the stacked draws (per variable), the noise the
    weighted residual sd at them."""
    x, draws, weights, params = weighted_factor_draws()
    num_draws, n, _ = draws.shape
    p = x.shape[1]
    step = ClosedFormMStep(one_factor_analysis, "auto", 0.0, ())
    new = step.step(params, {"scores": jnp.asarray(draws)}, jnp.asarray(weights), (x,), {})
    design = np.concatenate([np.ones((num_draws * n, 1)), draws.reshape(-1, 1)], axis=1)
    w = np.repeat(weights, n)
    for j in range(p):
        target = np.tile(x[:, j], num_draws)
        coef = np.linalg.solve(design.T @ (w[:, None] * design), design.T @ (w * target))
        np.testing.assert_allclose(float(new["mean"][j]), coef[0], rtol=1e-10)
        np.testing.assert_allclose(float(new["loadings"][j, 0]), coef[1], rtol=1e-9)
        sd = np.sqrt(np.sum(w * (target - design @ coef) ** 2) / n)
        np.testing.assert_allclose(float(new["noise"][j]), sd, rtol=1e-10)


def _not_affine(X, y):
    a = numpyro.param("a", jnp.zeros(X.shape[1]))
    b = numpyro.param("b", jnp.zeros(X.shape[1]))
    c, d = numpyro.param("c", 1.0), numpyro.param("d", 1.0)
    e = numpyro.param("e", jnp.zeros(X.shape[1]))
    f = numpyro.param("f", 0.0)
    g = numpyro.param("g", 0.0)
    with numpyro.plate("data", y.shape[0]):
        z = numpyro.sample("z", dist.Categorical(jnp.ones(2) / 2))
        numpyro.sample("y1", dist.Normal(jnp.exp(X @ a) + z, 1.0), obs=y)
        numpyro.sample("y2", dist.Normal(X @ b**2, 1.0), obs=y)
        numpyro.sample("y3", dist.Normal(c * d * X[:, 0], 1.0), obs=y)  # degree 2 jointly
        numpyro.sample("y4", dist.Normal(X @ e, jnp.exp(e[0])), obs=y)  # reaches the scale
        numpyro.sample("y5", dist.Normal(f * X[:, 0], 1.0), obs=y)
        numpyro.sample("y6", dist.StudentT(3.0, f, 1.0), obs=y)  # f reaches another family
        numpyro.sample("y7", dist.Normal(jnp.where(g > 0, 1.0, 2.0) * X[:, 0], 1.0), obs=y)


def test_a_location_that_is_not_affine_keeps_the_gradient_path():
    paths = jaxem.EM(_not_affine).m_step_paths(jnp.ones((5, 2)), jnp.ones(5))
    assert all(path.startswith("gradient") for path in paths.values()), paths
    for name in "abcd":
        assert "is not affine in it either" in paths[name], paths[name]
    # Reaching a scale, or another family: no candidates, their reasons unchanged.
    assert "affine" not in paths["e"] and "affine" not in paths["f"]


def test_an_empty_component_keeps_its_coefficients_and_a_collinear_design_moves_least(x64):
    """Component 2 has no weight: its coefficients keep their values. The design's two
    columns are equal: the step is the minimum-norm one (numpy's pinv), and the fitted
    locations are numpy's least squares."""

    def model(X, y):
        beta = numpyro.param("beta", jnp.array([[0.3, -0.1], [5.0, 6.0]]))
        with numpyro.plate("data", y.shape[0]):
            z = numpyro.sample("z", dist.Categorical(jnp.array([1.0, 0.0])))
            numpyro.sample("y", dist.Normal((beta[z] * X).sum(-1), 1.0), obs=y)

    rng = np.random.default_rng(3)
    column = rng.normal(size=40)
    X, y = np.stack([column, column], 1), 2.0 * column + 0.1 * rng.normal(size=40)
    em = jaxem.EM(model)
    state = em.init(jax.random.PRNGKey(0), jnp.asarray(X), jnp.asarray(y))
    old = np.asarray(em.get_params(state)["beta"])
    state, _ = em.update(state, jnp.asarray(X), jnp.asarray(y))
    beta = np.asarray(em.get_params(state)["beta"])
    np.testing.assert_array_equal(beta[1], old[1])
    step = np.linalg.pinv(X) @ (y - X @ old[0])
    np.testing.assert_allclose(beta[0], old[0] + step, rtol=1e-7)
    fitted = X @ np.linalg.lstsq(X, y, rcond=None)[0]
    np.testing.assert_allclose(X @ beta[0], fitted, rtol=1e-7)


@pytest.mark.parametrize("name", ["mul", "degree"])
def test_affine_degrees_of_small_programs(name):
    from jaxem.selection import NONLINEAR, affine_degrees

    if name == "mul":
        fn = lambda a, b, x: (a * x + b, a * b, x * x, jnp.where(x > 0, a, b), a[jnp.int32(b[0])])  # noqa: E731
        expected = [1, NONLINEAR, 0, 1, NONLINEAR]
    else:
        fn = lambda a, b, x: (x @ a / 2.0, 1.0 / a, jnp.sin(a), jnp.cumsum(a - b), a @ b)  # noqa: E731
        expected = [1, NONLINEAR, NONLINEAR, 1, NONLINEAR]
    closed = jax.make_jaxpr(fn)(jnp.ones(3), jnp.ones(3), jnp.ones(3))
    assert affine_degrees(closed, [1, 1, 0]) == expected
