"""Compiling one EM step runs the model's Python body at most twice, and a second
``update`` call reuses the compiled step (issue 16: "fast compiles")."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.distributions import constraints

import jaxem
from tests.models import gaussian_hmm, gmm_scale_tril, poisson_regression_mixture

MAX_TRACES = 2


def counted(model):
    """A new function that runs ``model`` and counts its calls (``wrapper.num_calls``)."""

    def wrapper(*args, **kwargs):
        wrapper.num_calls += 1
        return model(*args, **kwargs)

    wrapper.num_calls = 0
    return wrapper


def _gmm():
    x = np.random.default_rng(0).normal(size=(40, 2)).astype(np.float32)
    x[:20] += 3.0
    return gmm_scale_tril, (jnp.asarray(x), 2), {}


def _poisson_regression():
    rng = np.random.default_rng(1)
    x = rng.normal(size=30).astype(np.float32)
    c = rng.poisson(np.where(np.arange(30) < 15, 1.0, 5.0)).astype(np.float32)
    return poisson_regression_mixture, (jnp.asarray(c), jnp.asarray(x), 2), {}


def _hmm():
    x = np.random.default_rng(2).normal(size=25).astype(np.float32)
    x[10:] += 2.0
    return gaussian_hmm, (jnp.asarray(x), 2), {}


CASES = {"gmm": _gmm, "gradient": _poisson_regression, "hmm": _hmm}


@pytest.mark.parametrize("name", sorted(CASES))
def test_one_compiled_update_traces_the_model_at_most_twice(name):
    base, args, kwargs = CASES[name]()
    model = counted(base)
    em = jaxem.EM(model)
    state = em.init(jax.random.PRNGKey(0), *args, **kwargs)
    model.num_calls = 0
    state, _ = em.update(state, *args, **kwargs)
    jax.block_until_ready(state)
    assert model.num_calls <= MAX_TRACES
    # A fresh fitter (nothing cached on it) compiles its step from the same state.
    fresh = jaxem.EM(model)
    model.num_calls = 0
    jax.block_until_ready(fresh.update(state, *args, **kwargs))
    assert model.num_calls <= MAX_TRACES


# A cold run: model calls (the checks: a seeded trace (2 with init_params), 2 for the
# priors' analysis, the enumerated trace with and without log-probabilities, the
# structure; the loop's initial values; the float64 recheck's enumerated trace) and
# compiled programs (the checks; the plan's probe of its params' event blocks; the
# loop; what follows it; the float64 recheck).
MAX_RUN_TRACES = 7
MAX_RUN_PROGRAMS = 5


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_cold_run_traces_the_model_and_compiles_few_programs(name):
    base, args, kwargs = CASES[name]()
    key = jax.random.PRNGKey(0)
    # Programs of the process (random keys, ...) compiled once, by another fitter.
    with pytest.warns(jaxem.ConvergenceWarning):
        jaxem.EM(base).run(key, *args, max_iter=2, **kwargs)
    model = counted(base)
    em = jaxem.EM(model)
    with pytest.warns(jaxem.ConvergenceWarning):
        compiles = _backend_compiles(lambda: em.run(key, *args, max_iter=2, **kwargs).params)
    assert model.num_calls <= MAX_RUN_TRACES
    assert compiles <= MAX_RUN_PROGRAMS
    # The M-step is planned once: the initial state's plan serves the loop's steps.
    assert len(em.m_step_settings.plans) == 1


def test_built_model_traces_once_and_matches_the_direct_trace():
    """The built model's enumerated trace, evaluated from its cached jaxpr, is the model's
    own under jit, vmap and grad, and with concrete inputs."""
    from jaxem.built import BuiltModel
    from jaxem.tracing import enumerated_trace

    base, args, _ = _gmm()
    model = counted(base)
    built = BuiltModel(model)
    params = {
        "w": jnp.array([0.3, 0.7]),
        "mu": jnp.array([[0.0, 0.0], [3.0, 3.0]]),
        "L": jnp.broadcast_to(jnp.eye(2), (2, 2, 2)),
    }

    def total(m, p):
        trace = enumerated_trace(m, p, args, {}, 1)
        return sum(jnp.sum(s.log_prob) for s in trace.sites.values())

    expected = total(base, params)
    assert np.allclose(total(built, params), expected, rtol=1e-6)
    assert np.allclose(jax.jit(lambda p: total(built, p))(params), expected, rtol=1e-6)
    grads = jax.grad(lambda p: total(built, p))(params)
    want = jax.grad(lambda p: total(base, p))(params)
    for name in params:
        assert np.allclose(grads[name], want[name], rtol=1e-5, atol=1e-5)
    stacked = jax.tree.map(lambda a: jnp.stack([a, a]), params)
    assert np.allclose(jax.vmap(lambda p: total(built, p))(stacked), expected, rtol=1e-6)
    assert model.num_calls == 1
    # The distribution arguments as the model wrote them are kept, tied to the site.
    trace = enumerated_trace(built, params, args, {}, 1)
    fn = trace.sites["x"].fn
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    cls, arguments, instance = trace.constructor_args[id(fn)]
    assert instance is fn and cls is dist.MultivariateNormal
    assert arguments["scale_tril"].shape == (2, 1, 2, 2)
    # The trace without log-probabilities came from the same run: the direct one's
    # sites (no log-probabilities, the same dims and arguments).
    bare = enumerated_trace(built, params, args, {}, 1, log_probs=False)
    direct = enumerated_trace(base, params, args, {}, 1, log_probs=False)
    assert model.num_calls == 1
    assert list(bare.sites) == list(direct.sites)
    for name, site in bare.sites.items():
        assert site.log_prob is None and site.dim_to_name == direct.sites[name].dim_to_name
        assert np.array_equal(site.value, direct.sites[name].value)
    loc = bare.sites["x"].fn
    while hasattr(loc, "base_dist"):
        loc = loc.base_dist
    np.testing.assert_allclose(loc.loc, fn.loc)
    # Another signature is traced again (once).
    enumerated_trace(built, params, args, {}, 2, log_probs=False)
    assert model.num_calls == 2


def _ordered_probit(y, x):
    """A gradient M-step model (L-BFGS): a two-class mixture of ordered regressions."""
    w = numpyro.param("w", jnp.ones(2) / 2, constraint=constraints.simplex)
    beta = numpyro.param("beta", jnp.array([-0.5, 0.5]))
    with numpyro.plate("data", y.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("y", dist.Bernoulli(logits=beta[z] * x), obs=y)


def _backend_compiles(fn):
    """How many XLA compilations ``fn()`` runs."""
    events = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        jax.block_until_ready(fn())
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return len(events)


@pytest.mark.parametrize("acceleration", [None, "squarem", "anderson"])
def test_second_update_does_not_compile_again(acceleration):
    rng = np.random.default_rng(3)
    x = rng.normal(size=30).astype(np.float32)
    y = (rng.uniform(size=30) < 1 / (1 + np.exp(-x))).astype(np.float32)
    args = (jnp.asarray(y), jnp.asarray(x))
    em = jaxem.EM(_ordered_probit, acceleration=acceleration, m_step_iters=2)
    assert em.m_step_paths(*args)["beta"].startswith("gradient")
    state = em.init(jax.random.PRNGKey(0), *args)
    state, _ = em.update(state, *args)
    jax.block_until_ready(state)
    assert _backend_compiles(lambda: em.update(state, *args)) == 0


def _linear_guide(x):
    weights = numpyro.param("weights", jnp.zeros((2, 2)))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("z", dist.Categorical(logits=jnp.stack([jnp.ones_like(x), x], -1) @ weights))


def test_second_variational_update_with_a_guide_does_not_compile_again():
    """The guide's L-BFGS state starts strongly typed too."""
    from tests.models import normal_mixture_spread

    x = np.random.default_rng(4).normal(size=30).astype(np.float32)
    x[:15] += 3.0
    vem = jaxem.VariationalEM(normal_mixture_spread, _linear_guide, e_step_iters=2)
    state = vem.init(jax.random.PRNGKey(0), jnp.asarray(x))
    state, _ = vem.update(state, jnp.asarray(x))
    jax.block_until_ready(state)
    assert _backend_compiles(lambda: vem.update(state, jnp.asarray(x))) == 0


def _model_operations_outside_calls(jaxpr, model_file):
    """The equations of ``jaxpr`` (and its sub-jaxprs) that come from ``model_file``'s
    code, outside the calls of the built model's cached trace (``model_trace``)."""
    found = 0
    for eqn in jaxpr.eqns:
        if "model_trace" in str(eqn.params.get("name", "")):
            continue
        frames = eqn.source_info.traceback.frames if eqn.source_info.traceback else []
        found += any(f.file_name.endswith(model_file) for f in frames)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _model_operations_outside_calls(inner, model_file)
    return found


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_compiled_step_calls_the_cached_model_trace_instead_of_inlining_it(name):
    """Every evaluation of the model in a step (the E-step, each closed-form stage, the
    gradient path's values and gradients) is one call of the built model's cached
    jaxpr, whose derivative and lowering JAX builds once: none of the model's own
    operations is bound in the step itself."""
    base, args, kwargs = CASES[name]()
    em = jaxem.EM(base)
    state = em.init(jax.random.PRNGKey(0), *args, **kwargs)
    arrays, spec = jaxem.arguments.split_args(args, kwargs)
    jaxpr = jax.make_jaxpr(em._update, static_argnums=(2,))(state, arrays, spec).jaxpr
    calls = [e for e in jaxpr.eqns if "model_trace" in str(e.params.get("name", ""))]
    assert calls
    assert _model_operations_outside_calls(jaxpr, "tests/models.py") == 0
