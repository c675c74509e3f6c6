"""Bad data and initial values are named errors before fitting (jaxem.validation).

Each case goes through ``run`` (fitting) and, where the check does not depend on
fitting, through ``log_likelihood``. Site names differ from the Python argument names,
so a message that names the argument instead of the site does not pass.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.distributions import constraints

import jaxem
from jaxem import EM, ModelError

KEY = jax.random.PRNGKey(0)


def _run(model, *args, **kwargs):
    return EM(model).run(KEY, *args, max_iter=3, **kwargs)


def normal_mixture(data, num_rows=None, mask=None):
    weights = numpyro.param("weights", jnp.ones(2) / 2, constraint=constraints.simplex)
    loc = numpyro.param("loc", jnp.array([-1.0, 1.0]))
    with numpyro.plate("rows", data.shape[0] if num_rows is None else num_rows):
        z = numpyro.sample("z", dist.Categorical(weights))
        numpyro.sample("height", dist.Normal(loc[z], 1.0), obs=data, obs_mask=mask)


def mvn_mixture(data):
    weights = numpyro.param("weights", jnp.ones(2) / 2, constraint=constraints.simplex)
    loc = numpyro.param("loc", jnp.array([[-1.0, 0.0], [1.0, 0.0]]))
    with numpyro.plate("rows", data.shape[0]):
        z = numpyro.sample("z", dist.Categorical(weights))
        numpyro.sample("point", dist.MultivariateNormal(loc[z], jnp.eye(2)), obs=data)


def count_mixture(family):
    def model(data):
        weights = numpyro.param("weights", jnp.ones(2) / 2, constraint=constraints.simplex)
        if family == "bernoulli":
            p = numpyro.param("p", jnp.array([0.3, 0.7]), constraint=constraints.unit_interval)
            make = lambda z: dist.Bernoulli(p[z])  # noqa: E731
        elif family == "poisson":
            rate = numpyro.param("rate", jnp.array([1.0, 3.0]), constraint=constraints.positive)
            make = lambda z: dist.Poisson(rate[z])  # noqa: E731
        else:
            probs = numpyro.param("probs", jnp.full((2, 3), 1 / 3), constraint=constraints.simplex)
            make = lambda z: dist.Categorical(probs[z])  # noqa: E731
        with numpyro.plate("rows", data.shape[0]):
            z = numpyro.sample("z", dist.Categorical(weights))
            numpyro.sample("answer", make(z), obs=data)

    return model


def _data(n=10):
    return jnp.asarray(np.linspace(-2.0, 2.0, n), jnp.float32)


# -- 2.3: data must have exactly the site's shape --------------------------------


def test_data_of_size_one_against_a_plate(x32):
    with pytest.raises(ModelError, match=r"site 'height' has data of shape \(1,\).*\(200,\)"):
        _run(normal_mixture, jnp.array([0.3]), 200)
    with pytest.raises(ModelError, match=r"site 'height' has data of shape \(1,\)"):
        jaxem.log_likelihood(normal_mixture, {"weights": jnp.ones(2) / 2}, jnp.array([0.3]), 200)


@pytest.mark.parametrize("dim", [1, 3])
def test_mvn_data_with_the_wrong_number_of_coordinates(dim, x32):
    data = jnp.ones((10, dim))
    with pytest.raises(
        ModelError,
        match=rf"(?s)site 'point' has data of shape \(10, {dim}\).*\(10, 2\).*event shape \(2,\)",
    ):
        _run(mvn_mixture, data)


def test_exact_shapes_are_accepted(x32):
    assert jnp.isfinite(_run(mvn_mixture, jnp.ones((10, 2))).log_likelihood)


# -- 2.10: data outside the support ----------------------------------------------


@pytest.mark.parametrize(
    "family, data, support, shown",
    [
        ("bernoulli", [1.0, 2.0, 0.0, 2.0], r"\{0, 1\}", r"\[1\] = 2\.0, \[3\] = 2\.0"),
        ("poisson", [1.0, -1.0, 3.0, 0.0], "non-negative integers", r"\[1\] = -1\.0"),
        ("poisson", [1.0, 2.5, 3.0, 0.0], "non-negative integers", r"\[1\] = 2\.5"),
        ("categorical", [0, 1, 3, 2], r"integers 0, \.\.\., 2", r"\[2\] = 3"),
    ],
)
def test_data_outside_the_support(family, data, support, shown, x32):
    model = count_mixture(family)
    count = 2 if family == "bernoulli" else 1
    pattern = rf"(?s)site 'answer' has {count} observed value\(s\) outside.*{support}.*{shown}"
    with pytest.raises(ModelError, match=pattern):
        _run(model, jnp.asarray(data))
    params = {"weights": jnp.ones(2) / 2}
    with pytest.raises(ModelError, match=pattern):
        jaxem.log_likelihood(model, params, jnp.asarray(data))


def test_only_observed_entries_are_checked_against_the_support(x32):
    # Missing entries (NaN under nan_as_missing, or masked by obs_mask) may hold
    # anything; the observed ones are in the support: a fit, not an error.
    data = jnp.array([1.0, 0.0, jnp.nan, 1.0])
    fit = _run(jaxem.nan_as_missing(count_mixture("bernoulli")), data)
    assert jnp.isfinite(fit.log_likelihood)

    def masked(data, mask):
        p = numpyro.param("p", jnp.array(0.3), constraint=constraints.unit_interval)
        with numpyro.plate("rows", data.shape[0]):
            numpyro.sample("answer", dist.Bernoulli(p), obs=data, obs_mask=mask)

    mask = jnp.array([True, True, False, True])
    fit = _run(masked, jnp.array([1.0, 0.0, 7.0, 1.0]), mask)
    np.testing.assert_allclose(fit.params["p"], 2 / 3, rtol=1e-5)
    with pytest.raises(ModelError, match=r"site 'answer' \(obs_mask= part 'answer_observed'\)"):
        _run(masked, jnp.array([1.0, 0.0, 7.0, 1.0]), jnp.ones(4, bool))


# -- 2.11: nothing observed --------------------------------------------------------


def test_nothing_observed(x32):
    with pytest.raises(ModelError, match=r"nothing is observed: every entry of .*'height'"):
        _run(jaxem.nan_as_missing(normal_mixture), jnp.full(4, jnp.nan))
    with pytest.raises(ModelError, match=r"nothing is observed: every entry of .*'height'"):
        _run(normal_mixture, _data(4), None, jnp.zeros(4, bool))

    def no_observed_site(data):
        weights = numpyro.param("weights", jnp.ones(2) / 2, constraint=constraints.simplex)
        with numpyro.plate("rows", data.shape[0]):
            numpyro.sample("z", dist.Categorical(weights))

    with pytest.raises(ModelError, match="nothing is observed: the model has no observed"):
        _run(no_observed_site, _data(4))


def test_obs_mask_that_broadcasts_to_the_plate(x32):
    # NumPyro's obs_mask broadcasts to the site's batch shape: a (1,) mask is the
    # same as a full one (it used to fail with an AssertionError).
    full = _run(normal_mixture, _data(4), None, jnp.ones(4, bool))
    broadcast = _run(normal_mixture, _data(4), None, jnp.array([True]))
    np.testing.assert_allclose(broadcast.log_likelihood, full.log_likelihood, rtol=1e-6)


# -- section 3: integer initial values, list data -------------------------------


def test_integer_initial_values_are_cast_to_float(x32):
    def int_init(data):
        weights = numpyro.param("weights", jnp.ones(2) / 2, constraint=constraints.simplex)
        loc = numpyro.param("loc", jnp.array([-1, 1]))
        with numpyro.plate("rows", data.shape[0]):
            z = numpyro.sample("z", dist.Categorical(weights))
            numpyro.sample("height", dist.Normal(loc[z], 1.0), obs=data)

    reference = _run(normal_mixture, _data())
    fit = _run(int_init, _data())
    assert fit.params["loc"].dtype == jnp.float32
    np.testing.assert_allclose(fit.params["loc"], reference.params["loc"], rtol=1e-5)
    # A float init_params entry is no longer truncated to the model's integer dtype.
    half = _run(int_init, _data(), init_params={"loc": jnp.array([-0.5, 0.5])})
    np.testing.assert_allclose(
        half.params["loc"],
        _run(normal_mixture, _data(), init_params={"loc": jnp.array([-0.5, 0.5])}).params["loc"],
        rtol=1e-5,
    )
    ints = _run(normal_mixture, _data(), init_params={"loc": jnp.array([-1, 1])})
    np.testing.assert_allclose(ints.params["loc"], reference.params["loc"], rtol=1e-5)


def test_param_with_a_discrete_constraint(x32):
    def model(data):
        shift = numpyro.param("shift", jnp.array(1), constraint=constraints.nonnegative_integer)
        with numpyro.plate("rows", data.shape[0]):
            numpyro.sample("height", dist.Normal(shift, 1.0), obs=data)

    with pytest.raises(ModelError, match="param 'shift' has the discrete constraint"):
        _run(model, _data())


def test_data_as_a_python_list(x32):
    def model(data):
        weights = numpyro.param("weights", jnp.ones(2) / 2, constraint=constraints.simplex)
        loc = numpyro.param("loc", jnp.array([-1.0, 1.0]))
        with numpyro.plate("rows", len(data)):
            z = numpyro.sample("z", dist.Categorical(weights))
            numpyro.sample("height", dist.Normal(loc[z], 1.0), obs=data)

    values = [0.1, 0.5, 2.0, -1.0]
    from_list = _run(model, values)
    from_array = _run(model, jnp.asarray(values))
    np.testing.assert_allclose(from_list.log_likelihood, from_array.log_likelihood, rtol=1e-6)


# -- 2.16: priors are not data ----------------------------------------------------


def with_factor(kind):
    def model(data):
        weights = numpyro.param("weights", jnp.ones(2) / 2, constraint=constraints.simplex)
        loc = numpyro.param("loc", jnp.array([-1.0, 1.0]))
        if kind == "factor":
            numpyro.factor("loc_prior", dist.Normal(0.0, 10.0).log_prob(loc).sum())
        elif kind == "observed":
            numpyro.sample("loc_prior", dist.Normal(0.0, 10.0).expand([2]).to_event(1), obs=loc)
        with numpyro.plate("rows", data.shape[0]):
            z = numpyro.sample("z", dist.Categorical(weights))
            numpyro.sample("height", dist.Normal(loc[z], 1.0), obs=data)
            if kind == "likelihood":
                # A per-observation term that involves the data: part of the likelihood.
                numpyro.factor("tilt", -0.1 * (data - loc[z]) ** 4)
            elif kind == "in_plate":
                # Depends on parameters only, but one term per observation (e.g. a
                # truncation's normalizer): part of the likelihood.
                numpyro.factor("normalizer", -0.01 * loc[0] ** 2 * jnp.ones(data.shape[0]))

    return model


@pytest.mark.parametrize("kind", ["factor", "observed"])
def test_a_prior_is_not_counted_as_data(kind, x32):
    pattern = r"(?s)site 'loc_prior' has a log-density that depends on parameters only.*prior"
    with pytest.raises(ModelError, match=pattern):
        _run(with_factor(kind), _data())
    params = {"weights": jnp.ones(2) / 2, "loc": jnp.array([-1.0, 1.0])}
    with pytest.raises(ModelError, match=pattern):
        jaxem.log_likelihood(with_factor(kind), params, _data())


@pytest.mark.parametrize("kind", ["likelihood", "in_plate"])
def test_a_factor_of_the_likelihood_keeps_working(kind, x64):
    data = jnp.linspace(-2.0, 2.0, 6)
    params = {"weights": jnp.array([0.3, 0.7]), "loc": jnp.array([-1.0, 1.5])}
    # Brute force: sum over the rows of log sum_z w_z N(x | loc_z, 1) exp(factor).
    normal = dist.Normal(params["loc"], 1.0).log_prob(data[:, None])
    if kind == "likelihood":
        extra = -0.1 * (data[:, None] - params["loc"]) ** 4
    else:
        extra = -0.01 * params["loc"][0] ** 2 * jnp.ones((6, 2))
    expected = jnp.sum(jax.nn.logsumexp(jnp.log(params["weights"]) + normal + extra, axis=-1))
    value = jaxem.log_likelihood(with_factor(kind), params, data)
    np.testing.assert_allclose(value, expected, rtol=1e-10)
    assert jnp.isfinite(_run(with_factor(kind), data).log_likelihood)


def test_a_cold_runs_checks_raise_first_while_it_traces_its_loop():
    # A cold run traces its loop while the checks' program compiles (the meanwhile of
    # jaxem.checks.validate): the checks' error still comes first, as a warm run's, and
    # an error of what is traced meanwhile is left to its own call.
    from jaxem.arguments import split_args
    from jaxem.checks import validate

    bad = jnp.array([0.5, jnp.inf, 1.0, 2.0])
    traced = []

    def listener(event, duration, **kwargs):
        if event.endswith("jaxpr_trace_duration"):
            traced.append(kwargs.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        with pytest.raises(ModelError, match="'height'") as cold:
            _run(normal_mixture, bad)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert "_loop_arrays" in traced, traced
    with pytest.raises(ModelError) as warm:
        _run(normal_mixture, bad)
    assert str(cold.value) == str(warm.value)

    def fails():
        raise RuntimeError("traced meanwhile")

    arrays, spec = split_args((bad,), {})
    with pytest.raises(ModelError, match="'height'"):
        validate(normal_mixture, KEY, arrays, spec, meanwhile=fails)
    arrays, spec = split_args((bad.at[1].set(0.0),), {})
    assert validate(normal_mixture, KEY, arrays, spec, meanwhile=fails) is not None
