"""Every bad input is a ``ValueError`` whose message names the offending site or parameter.

Site names are chosen to differ from the Python argument names (the observed site
``height`` is fed from an argument called ``data``), so a message that names the
argument instead of the site does not pass. Each case is checked through ``init`` and
through ``run``. Patterns are loose about wording but require the name.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.distributions import constraints

import jaxem
from jaxem import EM

KEY = jax.random.PRNGKey(0)


def good_model(data):
    weights = numpyro.param("weights", jnp.array([0.5, 0.5]), constraint=constraints.simplex)
    loc = numpyro.param("loc", jnp.array([-1.0, 1.0]))
    with numpyro.plate("rows", data.shape[0]):
        z = numpyro.sample("z", dist.Categorical(weights))
        numpyro.sample("height", dist.Normal(loc[z], 1.0), obs=data)


def continuous_latent_model(data):
    loc = numpyro.param("loc", jnp.array([-1.0, 1.0]))
    with numpyro.plate("rows", data.shape[0]):
        frailty = numpyro.sample("frailty", dist.Normal(0.0, 1.0))
        numpyro.sample("height", dist.Normal(loc[0] + frailty, 1.0), obs=data)


def poisson_latent_model(data):
    rate = numpyro.param("rate", jnp.array(2.0), constraint=constraints.positive)
    with numpyro.plate("rows", data.shape[0]):
        n_events = numpyro.sample("n_events", dist.Poisson(rate))
        numpyro.sample("height", dist.Normal(n_events, 1.0), obs=data)


def bad_simplex_init_model(data):
    weights = numpyro.param("weights", jnp.array([0.5, 0.7]), constraint=constraints.simplex)
    loc = numpyro.param("loc", jnp.array([-1.0, 1.0]))
    with numpyro.plate("rows", data.shape[0]):
        z = numpyro.sample("z", dist.Categorical(weights))
        numpyro.sample("height", dist.Normal(loc[z], 1.0), obs=data)


def fixed_size_plate_model(data):
    weights = numpyro.param("weights", jnp.array([0.5, 0.5]), constraint=constraints.simplex)
    loc = numpyro.param("loc", jnp.array([-1.0, 1.0]))
    with numpyro.plate("rows", 10):
        z = numpyro.sample("z", dist.Categorical(weights))
        numpyro.sample("height", dist.Normal(loc[z], 1.0), obs=data)


def no_param_model(data):
    with numpyro.plate("rows", data.shape[0]):
        z = numpyro.sample("z", dist.Categorical(jnp.array([0.5, 0.5])))
        numpyro.sample("height", dist.Normal(jnp.array([-1.0, 1.0])[z], 1.0), obs=data)


def _call(entry, em, *args, **kwargs):
    if entry == "init":
        return em.init(KEY, *args, **kwargs)
    return em.run(KEY, *args, max_iter=2, **kwargs)


ENTRIES = ["init", "run"]


def _data(n=10):
    return jnp.asarray(np.linspace(-2.0, 2.0, n), jnp.float32)


def test_good_model_is_accepted(x32):
    # Control: the same model and data without the defect fit without error.
    for entry in ENTRIES:
        _call(entry, EM(good_model), _data())


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_observations(entry, bad_value, x32):
    data = _data().at[3].set(bad_value)
    with pytest.raises(ValueError, match=r"(?s)(?=.*\bheight\b)(?=.*(?i:nan|inf|finite))"):
        _call(entry, EM(good_model), data)


@pytest.mark.parametrize("entry", ENTRIES)
def test_continuous_latent(entry, x32):
    with pytest.raises(
        ValueError, match=r"(?s)(?=.*\bfrailty\b)(?=.*(?i:continuous|discrete|enumer))"
    ):
        _call(entry, EM(continuous_latent_model), _data())


@pytest.mark.parametrize("entry", ENTRIES)
def test_non_enumerable_discrete_latent(entry, x32):
    with pytest.raises(ValueError, match=r"(?s)(?=.*\bn_events\b)(?=.*(?i:enumer|support|finite))"):
        _call(entry, EM(poisson_latent_model), _data())


@pytest.mark.parametrize("entry", ENTRIES)
def test_model_init_outside_constraint(entry, x32):
    with pytest.raises(
        ValueError, match=r"(?s)(?=.*\bweights\b)(?=.*(?i:constraint|simplex|support))"
    ):
        _call(entry, EM(bad_simplex_init_model), _data())


@pytest.mark.parametrize("entry", ENTRIES)
def test_init_params_outside_constraint(entry, x32):
    bad = {"weights": jnp.array([0.5, 0.7]), "loc": jnp.array([-1.0, 1.0])}
    with pytest.raises(
        ValueError, match=r"(?s)(?=.*\bweights\b)(?=.*(?i:constraint|simplex|support))"
    ):
        _call(entry, EM(good_model), _data(), init_params=bad)


@pytest.mark.parametrize("entry", ENTRIES)
def test_negative_scale_init_params(entry, x32):
    def model(data):
        scale = numpyro.param("spread", jnp.ones(2), constraint=constraints.positive)
        with numpyro.plate("rows", data.shape[0]):
            z = numpyro.sample("z", dist.Categorical(jnp.array([0.5, 0.5])))
            numpyro.sample("height", dist.Normal(0.0, scale[z]), obs=data)

    with pytest.raises(
        ValueError, match=r"(?s)(?=.*\bspread\b)(?=.*(?i:constraint|positive|support))"
    ):
        _call(entry, EM(model), _data(), init_params={"spread": jnp.array([1.0, -0.5])})


@pytest.mark.parametrize("entry", ENTRIES)
def test_data_shape_disagrees_with_plate(entry, x32):
    with pytest.raises(ValueError, match=r"\b(height|rows)\b"):
        _call(entry, EM(fixed_size_plate_model), _data(12))


@pytest.mark.parametrize("entry", ENTRIES)
def test_model_without_params(entry, x32):
    # The fix names both ways to declare a parameter.
    with pytest.raises(
        ValueError, match=r"(?i)\b(no|zero|any|without)\b.*param.*numpyro.param.*global_sites="
    ):
        _call(entry, EM(no_param_model), _data())


def test_public_functions_name_nan_data_and_bad_params():
    # log_likelihood / posterior / map_assignment raise named errors rather than
    # return NaN (outside jit; under jit nothing can be raised).
    x = jnp.array([0.0, 1.0, jnp.nan])
    good = {"weights": jnp.array([0.5, 0.5]), "loc": jnp.array([-1.0, 1.0])}
    bad = {**good, "weights": jnp.array([0.5, 0.7])}
    for fn in (jaxem.log_likelihood, jaxem.posterior, jaxem.map_assignment):
        with pytest.raises(jaxem.ModelError, match="observed site 'height' contains 1 NaN"):
            fn(good_model, good, x)
        with pytest.raises(jaxem.ModelError, match="param 'weights' is not finite or lies outside"):
            fn(good_model, bad, x[:2])
    assert jnp.isfinite(jaxem.log_likelihood(good_model, good, x[:2]))


@pytest.mark.parametrize("entry", ENTRIES)
def test_callable_init_params(entry, x32):
    """A callable (an init helper) belongs in the model's numpyro.param; in init_params
    it is named, with both fixes, instead of JAX's "not a valid JAX type"."""
    init_fn = jaxem.init.random_points(_data()[:, None], 2)
    with pytest.raises(
        ValueError, match=r"(?s)init_params\['loc'\] is a callable.*numpyro\.param\('loc'"
    ):
        _call(entry, EM(good_model), _data(), init_params={"loc": init_fn})


def vb_poisson_mixture(x):
    w = numpyro.sample("w", dist.Dirichlet(jnp.ones(2)))
    with numpyro.plate("components", 2):
        lam = numpyro.sample("lam", dist.Gamma(2.0, 1.0))
    with numpyro.plate("rows", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("counts", dist.Poisson(lam[z]), obs=x)


@pytest.mark.parametrize(
    "call, unknown",
    [
        # An option of another fitter: VariationalBayesEM.run has no restarts.
        (
            lambda x: jaxem.VariationalBayesEM(vb_poisson_mixture, global_sites=("w", "lam")).run(
                KEY, x, num_restarts=3
            ),
            "num_restarts",
        ),
        # A misspelt option, with global sites (the wrapped model keeps its signature).
        (
            lambda x: EM(vb_poisson_mixture, global_sites=("w", "lam")).run(KEY, x, max_iters=3),
            "max_iters",
        ),
        (lambda x: EM(good_model).init(KEY, x, tol=1e-3), "tol"),
    ],
    ids=["vbem-num_restarts", "map-em-max_iters", "em-init-tol"],
)
def test_a_keyword_the_model_does_not_take_is_named(call, unknown, x32):
    """Keywords a fitter does not know go to the model; one it cannot take is a jaxem
    error naming it and the model's arguments, not a TypeError from inside the model."""
    x = jnp.asarray([0.0, 1.0, 3.0, 4.0, 2.0, 5.0])
    with pytest.raises(
        TypeError, match=rf"jaxem: .*takes no argument '{unknown}' \(its arguments: "
    ):
        call(x)
