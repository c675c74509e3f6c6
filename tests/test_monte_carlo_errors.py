"""What a new user's mistakes give with SAEM and MCEM (issue 17's audit): a message
naming the site or param and the fix, never a raw NumPyro/funsor/JAX error. Each
check fails before the fitter compiles its loop, so these tests are fast."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.distributions import constraints

import jaxem
from jaxem.densities import site_log_prob
from jaxem.exceptions import ModelError

KEY = jax.random.PRNGKey(0)
G = 20


def _y():
    return jnp.asarray(np.random.default_rng(0).normal(size=G))


def _random_intercepts(y, latent=None):
    mu = numpyro.param("mu", 0.0)
    tau = numpyro.param("tau", 1.0, constraint=constraints.positive)
    sigma = numpyro.param("sigma", 1.0, constraint=constraints.positive)
    with numpyro.plate("grp", G):
        b = (latent or (lambda: numpyro.sample("b", dist.Normal(mu, tau))))()
        numpyro.sample("y", dist.Normal(b, sigma), obs=y)


def _wrong_shape(y):
    # G draws of a 2-vector written as a (G, 2) batch inside plate(G).
    mu, tau = numpyro.param("m", 0.0), numpyro.param("t", 1.0, constraint=constraints.positive)
    _random_intercepts(y, lambda: numpyro.sample("b", dist.Normal(mu, tau).expand([G, 2])).sum(-1))


def _prior_outside_plates(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))  # meant as a parameter with a prior
    tau = numpyro.param("tau", 1.0, constraint=constraints.positive)
    sigma = numpyro.param("sigma", 1.0, constraint=constraints.positive)
    with numpyro.plate("grp", G):
        b = numpyro.sample("b", dist.Normal(mu, tau))
        numpyro.sample("y", dist.Normal(b, sigma), obs=y)


@pytest.mark.parametrize("shape", [(), (5,)])
def test_a_diagonal_normal_with_integer_arguments_is_numpyros_density(shape):
    """Normal(0, 1) keeps Python ints; jaxem's matmul kernel raised a TypeError
    (integers to a negative power)."""
    value = jnp.asarray(np.random.default_rng(1).normal(size=(5, 3)), jnp.float32)
    fn = dist.Normal(0, 1).expand(list(shape) + [3]).to_event(1)
    np.testing.assert_allclose(site_log_prob(fn, value), fn.log_prob(value), rtol=1e-6)
    # The MultivariateNormal kernel (a triangular solve) took integer arguments
    # already: a reference check that it still does.
    fn = dist.MultivariateNormal(jnp.zeros(3, jnp.int32), scale_tril=jnp.eye(3, dtype=jnp.int32))
    np.testing.assert_allclose(site_log_prob(fn, value), fn.log_prob(value), rtol=1e-6)


@pytest.mark.parametrize("fitter", [jaxem.SAEM, jaxem.MCEM])
def test_nan_data_names_the_observed_site_and_nan_as_missing(fitter):
    with pytest.raises(ModelError, match=r"observed site 'y' contains 1 NaN.*nan_as_missing"):
        fitter(_random_intercepts).run(KEY, _y().at[3].set(jnp.nan))


def test_a_bad_initial_value_names_the_param_and_its_constraint():
    with pytest.raises(ModelError, match=r"param 'tau' .*outside its constraint Positive"):
        jaxem.SAEM(_random_intercepts).run(KEY, _y(), init_params={"tau": -1.0})


def test_a_site_whose_shape_its_plate_rejects_is_named():
    with pytest.raises(
        ModelError,
        match=r"at sample site 'b' with batch shape \(20, 2\), inside "
        r"numpyro.plate\('grp', 20\) at dim -1: .*\.to_event",
    ):
        jaxem.SAEM(_wrong_shape).run(KEY, _y())


@pytest.mark.parametrize(
    "call, owner, unknown, hint",
    [
        (
            lambda y: jaxem.SAEM(_random_intercepts).run(KEY, y, max_iters=3),
            "SAEM",
            "max_iters",
            r" \(did you mean max_iter= for max_iters=\?\)",
        ),
        (
            lambda y: jaxem.MCEM(_random_intercepts).run(KEY, y, tolerance=0.1),
            "MCEM",
            "tolerance",
            r" \(did you mean tol= for tolerance=\?\)",
        ),
        (
            lambda y: jaxem.MCEM(_random_intercepts).run(KEY, y, num_restarts=2),
            "MCEM",
            "num_restarts",
            r"\. Every keyword",
        ),
    ],
    ids=["saem-max_iters", "mcem-tolerance", "mcem-num_restarts"],
)
def test_a_keyword_run_passed_on_to_the_model_is_named(call, owner, unknown, hint):
    with pytest.raises(
        TypeError,
        match=rf"jaxem: {owner}.run\(\) passed keyword '{unknown}' to the model, which does "
        rf"not take it: .* run's own keywords are max_iter, .*init_params{hint}",
    ):
        call(_y())


def _mixture_of_group_slopes(x, g, y):
    w = numpyro.param("w", jnp.array([0.5, 0.5]), constraint=constraints.simplex)
    beta = numpyro.param("beta", jnp.array([-0.5, 1.5]))
    sigma = numpyro.param("sigma", 1.0, constraint=constraints.positive)
    with numpyro.plate("grp", G):
        z = numpyro.sample("z", dist.Categorical(w))
        b = numpyro.sample("b", dist.Normal(0.0, sigma))
    with numpyro.plate("obs", y.shape[0]):
        numpyro.sample("y", dist.Normal(b[g] + beta[z[g]] * x, sigma), obs=y)


def _mixture_em(x, g, y):
    w = numpyro.param("w", jnp.array([0.5, 0.5]), constraint=constraints.simplex)
    beta = numpyro.param("beta", jnp.array([-0.5, 1.5]))
    sigma = numpyro.param("sigma", 1.0, constraint=constraints.positive)
    with numpyro.plate("grp", G):
        z = numpyro.sample("z", dist.Categorical(w))
    with numpyro.plate("obs", y.shape[0]):
        numpyro.sample("y", dist.Normal(beta[z[g]] * x, sigma), obs=y)


@pytest.mark.parametrize(
    "call",
    [
        lambda *a: jaxem.EM(_mixture_em).run(KEY, *a, max_iter=2),
        lambda *a: jaxem.SAEM(_mixture_of_group_slopes, schedule=(1, 1)).run(KEY, *a),
    ],
    ids=["em", "saem"],
)
def test_a_discrete_latent_indexed_into_another_plate_is_named(call):
    rng = np.random.default_rng(5)
    g = jnp.repeat(jnp.arange(G), 5)
    x, y = (jnp.asarray(rng.normal(size=G * 5)) for _ in range(2))
    with pytest.raises(
        ModelError,
        match=r"discrete latent site 'z' is enumerated in dim -2 .* site 'y' has size 100 "
        r".*nested inside the plate of 'z'",
    ):
        call(x, g, y)


def test_a_continuous_latent_outside_every_plate_hints_at_global_sites():
    with pytest.warns(
        UserWarning,
        match=r"latent site 'mu' is outside every plate.*"
        r"global_sites=\(\"mu\",\)",
    ) as record:
        jaxem.SAEM(_prior_outside_plates).m_step_paths(_y())
    # It points at the user's line, not at jaxem's.
    assert [w.filename for w in record if "outside every plate" in str(w.message)] == [__file__]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        jaxem.SAEM(_random_intercepts).m_step_paths(_y())
    assert not [w for w in caught if "outside every plate" in str(w.message)]
