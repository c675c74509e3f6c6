"""Engine internals: cell contractions, M-step path detection, registry, robustness."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from models import normal_mixture, normal_mixture_spread
from numpyro.distributions import constraints

import jaxem
from jaxem import EM, ClosedFormUpdate, contract_cells, register_closed_form


@pytest.mark.parametrize(
    "cell_shape, target, shapes, events, out",
    [
        ((3, 5), (3, 1), [(3, 5), (5, 2)], ["", "d"], "d"),
        ((3, 5), (1, 1), [(3, 5), (3, 5, 2), (3, 5, 2)], ["", "d", "e"], "de"),
        ((3, 5, 4), (1, 1, 1), [(3, 5, 1)], [""], ""),  # summed dim no operand varies along
        ((3, 5, 4), (3, 1, 4), [(3, 5, 1)], [""], ""),  # kept dim no operand varies along
        ((2, 3, 5), (2, 3, 1), [(2, 3, 5), (1, 5)], ["", ""], ""),
    ],
)
def test_contract_cells_equals_broadcast_sum(cell_shape, target, shapes, events, out):
    rng = np.random.default_rng(0)
    operands = [(rng.normal(size=s), e) for s, e in zip(shapes, events)]
    result = contract_cells(
        cell_shape, target, *[(jnp.asarray(a), e) for a, e in operands], out=out
    )
    # Reference: broadcast every operand to the full cells, multiply, then sum.
    letters = "ABCDEFG"[: len(cell_shape)]
    specs, full = [], []
    for a, e in operands:
        batch = a.shape[: a.ndim - len(e)]
        a = a.reshape((1,) * (len(cell_shape) - len(batch)) + a.shape)
        full.append(np.broadcast_to(a, cell_shape + a.shape[len(cell_shape) :]))
        specs.append(letters + e)
    product = np.einsum(",".join(specs) + "->" + letters + out, *full)
    summed = tuple(i for i, t in enumerate(target) if t == 1)
    expected = product.sum(axis=summed, keepdims=True)
    expected = np.broadcast_to(expected, tuple(target) + expected.shape[len(cell_shape) :])
    np.testing.assert_allclose(np.asarray(result), expected, rtol=1e-5, atol=1e-5)


def _reversed_loc(x):
    mu = numpyro.param("mu", jnp.array([[0.0, 1.0], [1.0, 0.0]]))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(jnp.ones(2) / 2))
        numpyro.sample("x", dist.MultivariateNormal(mu[z][..., ::-1], jnp.eye(2)), obs=x)


def _scaled_loc(x):
    mu = numpyro.param("mu", jnp.array([-1.0, 1.0]))
    shared = numpyro.param("shared", 1.0, constraint=constraints.positive)
    unused = numpyro.param("unused", 0.0)  # noqa: F841
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(jnp.ones(2) / 2))
        numpyro.sample("x", dist.Normal(2.0 * mu[z], shared), obs=x)


def _cubed_loc(x):
    mu = numpyro.param("mu", jnp.array([-1.0, 1.0]))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(jnp.ones(2) / 2))
        numpyro.sample("x", dist.Normal(mu[z] ** 3, 1.0), obs=x)


def test_m_step_paths_detects_selection_and_reports_why_not():
    x2 = jnp.ones((6, 2))
    paths = EM(_reversed_loc).m_step_paths(x2)
    assert paths["mu"].startswith("gradient") and "event dims" in paths["mu"]

    x = jnp.linspace(-2, 2, 6)
    paths = EM(_scaled_loc, frozen=("shared",)).m_step_paths(x)
    # 2 mu[z] is no selection, but affine: weighted least squares (jaxem.affine).
    assert paths["mu"] == "closed-form (Normal.loc at site 'x' (affine: weighted least squares))"
    assert paths["shared"].startswith("frozen")
    assert paths["unused"].startswith("unused")
    paths = EM(_cubed_loc).m_step_paths(x)
    assert paths["mu"].startswith("gradient") and "indexing" in paths["mu"]
    assert "not affine in it either" in paths["mu"]

    paths = EM(normal_mixture_spread).m_step_paths(x)
    assert paths == {
        "w": "closed-form (CategoricalProbs.probs at site 'z')",
        "mu": "closed-form (Normal.loc at site 'x')",
        "sigma": "closed-form (Normal.scale at site 'x')",
    }
    assert all(
        p.startswith("gradient")
        for p in EM(normal_mixture_spread, m_step="gradient").m_step_paths(x).values()
    )


def test_frozen_parameters_stay_put_and_others_fit():
    x = jnp.concatenate([jnp.linspace(-4, -2, 20), jnp.linspace(2, 4, 20)])
    result = EM(_scaled_loc, frozen=("shared",)).run(jax.random.PRNGKey(0), x, max_iter=30)
    assert float(result.params["shared"]) == 1.0
    np.testing.assert_allclose(result.params["mu"], [-1.5, 1.5], atol=2e-2)


class Rayleigh(dist.Distribution):
    """A family jaxem does not know: p(x) = x / s^2 exp(-x^2 / (2 s^2))."""

    arg_constraints = {"scale": constraints.positive}
    support = constraints.positive

    def __init__(self, scale, validate_args=None):
        self.scale = scale
        super().__init__(jnp.shape(scale), validate_args=validate_args)

    def log_prob(self, value):
        return jnp.log(value) - 2 * jnp.log(self.scale) - value**2 / (2 * self.scale**2)


def _rayleigh_mixture(x):
    w = numpyro.param("w", jnp.ones(2) / 2, constraint=constraints.simplex)
    s = numpyro.param("s", jnp.array([0.5, 3.0]), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", Rayleigh(s[z]), obs=x)


def _rayleigh_stats(cells, target):
    sq = cells.sum(target, (cells.weight, ""), (cells.value**2, ""))
    return sq, cells.count(target)


def _rayleigh_solve(stats, old, reg_covar):
    sq, n = stats
    return jnp.where(n > 0, jnp.sqrt(sq / (2 * jnp.where(n > 0, n, 1))), old)


def test_user_registered_closed_form_matches_gradient_optimum(x64):
    rng = np.random.default_rng(1)
    x = jnp.asarray(np.concatenate([rng.rayleigh(0.7, 150), rng.rayleigh(4.0, 150)]))
    before = EM(_rayleigh_mixture)  # created before registration: gradient path
    assert before.m_step_paths(x)["s"].startswith("gradient")

    register_closed_form(
        Rayleigh, "scale", ClosedFormUpdate(_rayleigh_stats, _rayleigh_solve, domain=lambda c: True)
    )
    em = EM(_rayleigh_mixture)
    assert em.m_step_paths(x)["s"] == "closed-form (Rayleigh.scale at site 'x')"
    closed = em.run(jax.random.PRNGKey(0), x, max_iter=500, tol=1e-12)
    gradient = before.run(jax.random.PRNGKey(0), x, max_iter=500, tol=1e-12)
    history = np.asarray(closed.history[: int(closed.num_iters)])
    assert np.all(np.diff(history) >= -1e-9 * np.abs(history[1:]))
    np.testing.assert_allclose(closed.log_likelihood, gradient.log_likelihood, rtol=1e-8)
    np.testing.assert_allclose(closed.params["s"], gradient.params["s"], rtol=1e-4)


def test_component_without_mass_keeps_its_parameters_and_no_nan():
    x = jnp.concatenate([jnp.linspace(-1, 1, 30), jnp.linspace(4, 6, 30)])

    def model(x):
        w = numpyro.param("w", jnp.array([0.5, 0.5 - 1e-30, 1e-30]), constraint=constraints.simplex)
        mu = numpyro.param("mu", jnp.array([0.0, 5.0, 1e4]))
        L = numpyro.param("L", jnp.ones((3, 1, 1)), constraint=constraints.lower_cholesky)
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(w))
            numpyro.sample(
                "x", dist.MultivariateNormal(mu[z][..., None], scale_tril=L[z]), obs=x[:, None]
            )

    result = EM(model).run(jax.random.PRNGKey(0), x, max_iter=20, tol=0.0)
    assert not bool(result.diverged)
    for value in result.params.values():
        assert np.all(np.isfinite(value))
    assert float(result.params["mu"][2]) == 1e4  # the empty component is left alone
    assert float(result.params["L"][2, 0, 0]) == 1.0


def test_non_finite_step_stops_and_returns_last_finite_params():
    # With reg_covar=0 a component that captures a single point collapses to
    # zero variance: the next log-likelihood is infinite.
    x = jnp.array([-50.0, 0.1, 0.5, 0.9, 1.3, 1.7, 2.1])
    model = normal_mixture_spread
    result = EM(model, reg_covar=0.0).run(
        jax.random.PRNGKey(0),
        x,
        max_iter=50,
        tol=0.0,
        init_params={"mu": jnp.array([-50.0, 1.0]), "sigma": jnp.array([1.0, 1.0])},
    )
    assert bool(result.diverged)
    assert int(result.num_iters) < 50
    for value in result.params.values():
        assert np.all(np.isfinite(value))
    assert np.isfinite(float(result.log_likelihood))


def test_posterior_and_log_likelihood_of_global_and_local_latents():
    # A global latent (outside any plate) and local ones: sizes and normalization.
    def model(x):
        pg = numpyro.param("pg", jnp.array([0.3, 0.7]), constraint=constraints.simplex)
        g = numpyro.sample("g", dist.Categorical(pg))
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(jnp.array([0.5, 0.5])))
            numpyro.sample("x", dist.Normal(jnp.array([-1.0, 1.0])[z] + g, 1.0), obs=x)

    x = jnp.array([0.1, -1.2, 2.0])
    post = jaxem.posterior(model, {"pg": jnp.array([0.3, 0.7])}, x)
    assert post["g"].shape == (2,) and post["z"].shape == (3, 2)
    np.testing.assert_allclose(post["g"].sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(post["z"].sum(-1), np.ones(3), rtol=1e-6)


def test_map_assignment_is_the_joint_argmax_by_brute_force(x64):
    # z2 depends on z1: the joint MAP differs from the per-site posterior argmax.
    def model(x):
        w1 = numpyro.param("w1", jnp.array([0.55, 0.45]), constraint=constraints.simplex)
        A = numpyro.param(
            "A", jnp.array([[0.5, 0.5], [0.05, 0.95]]), constraint=constraints.simplex
        )
        with numpyro.plate("data", x.shape[0]):
            z1 = numpyro.sample("z1", dist.Categorical(w1))
            z2 = numpyro.sample("z2", dist.Categorical(A[z1]))
            numpyro.sample("x", dist.Normal(jnp.array([0.0, 0.3])[z2] + 0.1 * z1, 1.0), obs=x)

    params = {"w1": jnp.array([0.55, 0.45]), "A": jnp.array([[0.5, 0.5], [0.05, 0.95]])}
    x = jnp.array([0.2, -1.0, 2.5])
    result = jaxem.map_assignment(model, params, x)
    w1, A, mu = np.asarray(params["w1"]), np.asarray(params["A"]), np.array([0.0, 0.3])
    for n, xn in enumerate(np.asarray(x)):
        scores = {
            (a, b): np.log(w1[a]) + np.log(A[a, b]) - 0.5 * (xn - mu[b] - 0.1 * a) ** 2
            for a in range(2)
            for b in range(2)
        }
        best = max(scores, key=scores.get)
        assert (int(result["z1"][n]), int(result["z2"][n])) == best
    post = jaxem.posterior(model, params, x)
    per_site = (np.argmax(post["z1"], -1), np.argmax(post["z2"], -1))
    assert not np.array_equal(np.stack(per_site), np.stack([result["z1"], result["z2"]]))


# --- regressions found in review ----------------------------------------------------------


def test_scaled_site_depending_on_a_latent_outside_every_plate_is_rejected():
    # A scale around a plate's latents is a case weight (tests/test_weights.py); with a
    # latent outside every plate there is no element for it to weight.
    def model(x):
        mu = numpyro.param("mu", jnp.array([-1.0, 1.0]))
        with numpyro.handlers.scale(scale=3.0):
            g = numpyro.sample("g", dist.Categorical(jnp.ones(2) / 2))
            with numpyro.plate("data", x.shape[0]):
                numpyro.sample("x", dist.Normal(mu[g], 1.0), obs=x)

    with pytest.raises(jaxem.ModelError, match="'g' is scaled .* no plate holds every latent"):
        EM(model).run(jax.random.PRNGKey(0), jnp.zeros(4), max_iter=2)


def test_to_event_over_a_multivariate_family_uses_the_right_cells():
    K, J, D, N = 2, 3, 2, 60

    def shared_over_repeats(x):
        mu = numpyro.param("mu", jnp.array([[-1.0, -1.0], [1.0, 1.0]]))
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(jnp.ones(K) / K))
            loc = jnp.expand_dims(mu[z], -2)  # one mean for all J repeats
            numpyro.sample("x", dist.MultivariateNormal(loc, jnp.eye(D)).to_event(1), obs=x)

    rng = np.random.default_rng(0)
    labels = rng.integers(0, K, N)
    x = jnp.asarray(np.where(labels[:, None, None] == 0, -2.0, 2.0) + rng.normal(size=(N, J, D)))
    em = EM(shared_over_repeats)
    assert em.m_step_paths(x)["mu"].startswith("closed-form")
    closed = em.run(jax.random.PRNGKey(0), x, max_iter=50)
    gradient = EM(shared_over_repeats, m_step="gradient").run(jax.random.PRNGKey(0), x, max_iter=50)
    np.testing.assert_allclose(closed.log_likelihood, gradient.log_likelihood, rtol=1e-5)
    means = [np.asarray(x)[labels == k].mean((0, 1)) for k in range(K)]
    np.testing.assert_allclose(closed.params["mu"], means, atol=1e-4)


def test_dependence_through_a_loop_carry_is_not_taken_for_a_selection():
    def model(x):
        mu = numpyro.param("mu", jnp.array([-0.5, 0.5]))
        loc, _ = jax.lax.fori_loop(0, 2, lambda i, c: (c[1], mu), (jnp.zeros(2), jnp.zeros(2)))
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(jnp.ones(2) / 2))
            numpyro.sample("x", dist.Normal(loc[z], 1.0), obs=x)

    x = jnp.concatenate([jnp.full(50, -3.0), jnp.full(50, 3.0)])
    assert EM(model).m_step_paths(x)["mu"].startswith("gradient")
    result = EM(model).run(jax.random.PRNGKey(0), x, max_iter=50)
    np.testing.assert_allclose(result.params["mu"], [-3.0, 3.0], atol=1e-3)


def test_distribution_defaults_are_recorded():
    def model(x):  # Normal's scale left at its default
        mu = numpyro.param("mu", jnp.array([-0.5, 0.5]))
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(jnp.ones(2) / 2))
            numpyro.sample("x", dist.Normal(mu[z]), obs=x)

    x = jnp.concatenate([jnp.full(50, -2.0), jnp.full(50, 2.0)])
    assert EM(model).m_step_paths(x)["mu"].startswith("closed-form")
    closed = EM(model).run(jax.random.PRNGKey(0), x, max_iter=200, tol=1e-7)
    gradient = EM(model, m_step="gradient").run(jax.random.PRNGKey(0), x, max_iter=200, tol=1e-7)
    np.testing.assert_allclose(closed.params["mu"], gradient.params["mu"], rtol=1e-4)
    assert float(closed.params["mu"][1]) > 1.99  # overlapping tails pull it in a little


def test_float32_diagonal_mixture_is_accurate_far_from_the_origin():
    # Clusters at +-1000 with scale 0.1: an expanded quadratic form would lose
    # ~eps * (1000 / 0.1)^2 in float32.
    def model(x):
        mu = numpyro.param("mu", jnp.array([[-999.0, -999.0], [999.0, 999.0]]))
        s = numpyro.param("s", jnp.full((2, 2), 0.2), constraint=constraints.positive)
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(jnp.ones(2) / 2))
            numpyro.sample("x", dist.Normal(mu[z], s[z]).to_event(1), obs=x)

    rng = np.random.default_rng(0)
    x64 = np.concatenate([rng.normal(-1000, 0.1, (100, 2)), rng.normal(1000, 0.1, (100, 2))])
    result = EM(model).run(jax.random.PRNGKey(0), jnp.asarray(x64, jnp.float32), max_iter=30)
    halves = (x64[:100], x64[100:])
    np.testing.assert_allclose(result.params["s"], [h.std(0) for h in halves], rtol=1e-3)
    reference = sum(
        -0.5 * np.sum(((h - h.mean(0)) / h.std(0)) ** 2) - len(h) * np.sum(np.log(h.std(0)))
        for h in halves
    ) - 200 * (np.log(2 * np.pi) + np.log(2))
    np.testing.assert_allclose(float(result.log_likelihood), reference, rtol=1e-4)


def test_rejected_gradient_steps_leave_no_non_finite_optimizer_state():
    import optax

    def regression_mixture(X, y):
        w = numpyro.param("w", jnp.ones(2) / 2, constraint=constraints.simplex)
        beta = numpyro.param("beta", jnp.array([[0.5, 1.0], [-0.5, -1.0]]))
        with numpyro.plate("data", y.shape[0]):
            z = numpyro.sample("z", dist.Categorical(w))
            numpyro.sample("y", dist.Normal(jnp.sum(X * beta[z], -1), 0.1), obs=y)

    rng = np.random.default_rng(0)
    X = np.stack([np.ones(200), rng.uniform(-1, 1, 200)], 1)
    labels = rng.integers(0, 2, 200)
    y = np.where(labels == 0, X @ [1.0, 3.0], X @ [-1.0, -2.0]) + 0.1 * rng.normal(size=200)
    em = EM(regression_mixture, optimizer=optax.sgd(5.0, momentum=0.9))  # far too large
    state = em.init(jax.random.PRNGKey(0), jnp.asarray(X), jnp.asarray(y))
    for _ in range(5):
        state, _ = em.update(state, jnp.asarray(X), jnp.asarray(y))
        for leaf in jax.tree.leaves(state.opt_state):
            if jnp.issubdtype(leaf.dtype, jnp.inexact):
                assert np.all(np.isfinite(leaf))
        assert np.all(np.isfinite(state.params["beta"]))


def test_one_component_model_matches_the_closed_form_fit(x64):
    model = functools.partial(normal_mixture, K=1)
    x = jnp.asarray(np.random.default_rng(0).normal(3.0, 2.0, 50))
    result = EM(model).run(jax.random.PRNGKey(0), x, max_iter=5)
    np.testing.assert_allclose(result.params["mu"], [np.mean(x)], rtol=1e-10)
    np.testing.assert_allclose(result.params["sigma"], [np.sqrt(np.var(x) + 1e-6)], rtol=1e-10)
    expected = np.sum(-0.5 * ((x - np.mean(x)) / result.params["sigma"][0]) ** 2) - 50 * np.log(
        np.sqrt(2 * np.pi) * result.params["sigma"][0]
    )
    np.testing.assert_allclose(result.log_likelihood, expected, rtol=1e-10)
    assert jaxem.posterior(model, result.params, x)["z"].shape == (50, 1)
