"""Compilation and batching: ``update`` traces the model once, ``run`` vmaps, restarts, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from models import gmm_diag_kmeans, normal_mixture_spread
from numpyro.distributions import constraints

import jaxem
from jaxem import EM
from jaxem.arguments import split_args
from jaxem.batching import RESTART_AXIS, restart_axis, shared_predicate
from jaxem.loop import best_restart

MODEL_TRACES = []


def counting_mixture(x, K):
    MODEL_TRACES.append(1)  # runs once per Python-level trace of the model
    normal_mixture_spread(x, K)


def random_init_mixture(x, K):
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    mu = numpyro.param("mu", lambda key: 3.0 * jax.random.normal(key, (K,)))
    sigma = numpyro.param("sigma", jnp.ones(K), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Normal(mu[z], sigma[z]), obs=x)


def _mixture_data(seed, N=120):
    rng = np.random.default_rng(seed)
    z = rng.choice(3, size=N)
    return rng.normal(np.array([-4.0, 0.0, 3.0])[z], np.array([1.0, 0.5, 1.0])[z])


def test_update_traces_model_once(x32):
    em = EM(counting_mixture)
    x1 = jnp.asarray(_mixture_data(0), jnp.float32)
    x2 = jnp.asarray(_mixture_data(1), jnp.float32)
    assert x1.shape == x2.shape and not np.allclose(x1, x2)

    state = em.init(jax.random.PRNGKey(0), x1, 3)
    state, ll1 = em.update(state, x1, 3)
    traces_after_first = len(MODEL_TRACES)
    assert traces_after_first > 0  # the counter does see traces
    state, ll2 = em.update(state, x2, 3)  # new values, same shape: no retrace
    state, ll3 = em.update(state, x1, 3)
    assert len(MODEL_TRACES) == traces_after_first
    # The new data really went in (the count check is not vacuous).
    assert float(ll2) != float(ll1) and float(ll3) != float(ll2)


def _count_compilations(call):
    """``call()`` and the number of programs it had XLA compile. Counted when lowered:
    a program the suite's on-disk cache (tests/conftest.py) returns is never compiled,
    but it is lowered all the same."""
    compiled = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
            compiled.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        result = jax.block_until_ready(call())
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return result, len(compiled)


def test_run_compiles_no_model_trace_eagerly(x32):
    # Checks before and after the compiled loop run as a few compiled programs: the
    # validation, the run (two programs), the float64 recheck, the M-step plan's probes. An eager
    # trace of the model (once after every fit, to find the initial params) compiled
    # every op of the model on its own: 27 small programs for a Gaussian mixture.
    x = jnp.asarray(_mixture_data(2, N=53), jnp.float32)
    key = jax.random.PRNGKey(0)
    jax.clear_caches()
    first, first_count = _count_compilations(
        lambda: EM(normal_mixture_spread).run(key, x, 5, max_iter=5, tol=0)
    )
    # A new EM on the same model and shapes compiles its run programs again (the loop
    # and the evaluation after it, compiling.compile_together) and the plan's probes,
    # nothing else.
    second, second_count = _count_compilations(
        lambda: EM(normal_mixture_spread).run(key, x, 5, max_iter=5, tol=0)
    )
    assert first_count <= 9, first_count
    assert second_count <= 4, second_count
    np.testing.assert_array_equal(first.params["mu"], second.params["mu"])


def test_vmap_over_datasets(x32):
    em = EM(random_init_mixture)
    key = jax.random.PRNGKey(3)
    xs = jnp.asarray(np.stack([_mixture_data(s) for s in range(3)]), jnp.float32)

    batched = jax.vmap(lambda x: em.run(key, x, 3, max_iter=20, tol=0.0).log_likelihood)(xs)
    assert batched.shape == (3,)
    single = np.array([float(em.run(key, x, 3, max_iter=20, tol=0.0).log_likelihood) for x in xs])
    np.testing.assert_allclose(np.asarray(batched), single, rtol=1e-4)
    # The datasets differ, so equal values above cannot come from one repeated fit.
    assert len(set(np.round(single, 3))) == 3


def test_restarts_keep_the_best(x32):
    em = EM(random_init_mixture)
    x = jnp.asarray(_mixture_data(5), jnp.float32)
    result = em.run(jax.random.PRNGKey(11), x, 3, max_iter=3, tol=0.0, num_restarts=4)
    restart_lls = np.asarray(result.restart_log_likelihoods)
    assert restart_lls.shape == (4,)
    # Callable initial values get a different key per restart, so the restarts differ.
    assert len(np.unique(restart_lls)) > 1, restart_lls
    np.testing.assert_allclose(float(result.log_likelihood), restart_lls.max(), rtol=1e-6)
    np.testing.assert_allclose(
        float(jaxem.log_likelihood(random_init_mixture, result.params, x, 3)),
        restart_lls.max(),
        rtol=1e-5,
    )


def test_run_starts_where_init_does(x64):
    """One restart: ``run(key)`` starts from ``init(key)``'s values (the key is not split
    first), so a fit can be replayed step by step with ``init`` and ``update``."""
    x = jnp.asarray(_mixture_data(6))
    em = EM(random_init_mixture)
    key = jax.random.PRNGKey(7)
    one = em.run(key, x, 3, max_iter=1, tol=0.0)
    start = em.init(key, x, 3)
    np.testing.assert_allclose(
        float(one.history[0]),
        float(jaxem.log_likelihood(random_init_mixture, start.params, x, 3)),
        rtol=1e-12,
    )
    stepped, _ = em.update(start, x, 3)
    np.testing.assert_allclose(
        np.asarray(one.params["mu"]), np.asarray(stepped.params["mu"]), rtol=1e-12
    )


def test_best_restart_skips_nan_scores(x32):
    """A restart whose score is NaN (a fit that broke down) is never the one kept: the
    highest finite score wins, and every restart's score is returned in key order."""

    def fit(key):
        value = jax.random.normal(key)
        return {"score": jnp.where(value > 0.0, jnp.nan, value), "value": value}

    key = jax.random.PRNGKey(0)
    best, fits = best_restart(fit, key, 8, lambda r: r["score"])
    scores = fits["score"]
    values = np.asarray([float(jax.random.normal(k)) for k in jax.random.split(key, 8)])
    expected = np.where(values > 0.0, np.nan, values)
    np.testing.assert_array_equal(np.asarray(scores), expected)
    assert np.isnan(expected).any() and not np.isnan(expected).all()
    assert float(best["value"]) == np.nanmax(expected)


def test_float32_by_default(x32):
    x = jnp.asarray(_mixture_data(2), jnp.float32)
    result = EM(random_init_mixture).run(jax.random.PRNGKey(0), x, 3, max_iter=5, tol=0.0)
    assert result.log_likelihood.dtype == jnp.float32
    assert result.history.dtype == jnp.float32
    assert all(v.dtype == jnp.float32 for v in result.params.values())
    assert result.history.shape == (5,)


def test_float64_when_enabled(x64):
    x = jnp.asarray(_mixture_data(2))
    assert x.dtype == jnp.float64
    result = EM(random_init_mixture).run(jax.random.PRNGKey(0), x, 3, max_iter=5, tol=0.0)
    assert result.log_likelihood.dtype == jnp.float64
    assert result.history.dtype == jnp.float64
    assert all(v.dtype == jnp.float64 for v in result.params.values())


def test_run_stops_on_relative_tolerance(x32):
    x = jnp.asarray(_mixture_data(0), jnp.float32)
    tol = 1e-6
    # From a start near the three clusters: the random one of key 0 collapses a component
    # onto one point, where only reg_covar holds its variance (not a stationary point of
    # the log-likelihood, so not converged).
    start = {"mu": jnp.array([-3.0, 0.5, 2.0])}
    result = EM(random_init_mixture).run(
        jax.random.PRNGKey(0), x, 3, max_iter=200, tol=tol, init_params=start
    )
    n = int(result.num_iters)
    history = np.asarray(result.history)
    assert bool(result.converged) and 2 < n < 200
    assert np.all(np.isnan(history[n:])) and np.all(np.isfinite(history[:n]))
    # Relative changes of the recorded log-likelihoods (the final value appended): the stop
    # is at the first change <= tol, whichever of the last two pairs the loop compares.
    seq = np.append(history[:n].astype(np.float64), float(result.log_likelihood))
    rel_change = np.abs(np.diff(seq)) / np.abs(seq[1:])
    assert rel_change[-2:].min() <= tol, rel_change[-4:]
    assert np.all(rel_change[:-2] > tol), rel_change


def test_run_under_user_jit(x32):
    em = EM(random_init_mixture)
    x = jnp.asarray(_mixture_data(4), jnp.float32)
    key = jax.random.PRNGKey(1)
    jitted = jax.jit(lambda data: em.run(key, data, 3, max_iter=10, tol=0.0).log_likelihood)
    np.testing.assert_allclose(
        float(jitted(x)), float(em.run(key, x, 3, max_iter=10, tol=0.0).log_likelihood), rtol=1e-5
    )


def _branches(em, x, K, num_restarts):
    """Branch ops (``cond``s not turned into ``select``s) in the lowered ``run``."""

    def run(x):
        key = jax.random.PRNGKey(0)
        return em.run(key, x, K, max_iter=2, tol=0.0, num_restarts=num_restarts).log_likelihood

    text = jax.jit(run).lower(x).as_text()
    return text.count("stablehlo.case") + text.count("stablehlo.if")


def test_restarts_share_the_rounding_guards(x32):
    """The float32 rounding guards (a ``cond`` between a matmul expansion and the exact
    K x N x D sum) stay branches under the restarts' ``vmap``: with a per-restart
    predicate each restart would compute both. Where a guard must fire (tight clusters
    at +-500), each restart still equals its fit run alone, and the scales are exact."""
    rng = np.random.default_rng(5)
    centers = np.array([[500.0, -500.0], [-500.0, 500.0], [500.0, 500.0]])
    labels = np.repeat([0, 1, 2], 200)
    x = centers[labels] + rng.normal(size=(600, 2)) * 0.1
    data = jnp.asarray(x, jnp.float32)
    em = EM(gmm_diag_kmeans)
    assert _branches(em, data, 3, 1) >= 2  # the two guards are there
    assert _branches(em, data, 3, 3) == _branches(em, data, 3, 1)

    key = jax.random.PRNGKey(2)
    result = em.run(key, data, 3, max_iter=5, tol=0.0, num_restarts=3)
    singles = [em.run(k, data, 3, max_iter=5, tol=0.0) for k in jax.random.split(key, 3)]
    np.testing.assert_allclose(
        np.asarray(result.restart_log_likelihoods),
        [float(s.log_likelihood) for s in singles],
        rtol=1e-6,
    )
    best = singles[int(np.argmax([float(s.log_likelihood) for s in singles]))]
    mu, sigma = np.asarray(best.params["mu"]), np.asarray(best.params["sigma"])
    for k in range(3):
        nearest = np.argmin(np.abs(mu - centers[k]).sum(-1))
        np.testing.assert_allclose(mu[nearest], x[labels == k].mean(0), rtol=1e-6)
        np.testing.assert_allclose(sigma[nearest], x[labels == k].std(0), rtol=1e-4)


def test_shared_predicate_holds_only_if_every_restart_holds(x32):
    """Under the restarts' vmap a guard's fast branch is taken only if its predicate holds
    for every restart (one restart needing the exact branch sends all there); outside
    restarts the predicate is returned as is."""

    def shared(preds):
        with restart_axis():
            return jax.vmap(shared_predicate, axis_name=RESTART_AXIS)(jnp.asarray(preds))

    np.testing.assert_array_equal(shared([True, False, True]), [False, False, False])
    np.testing.assert_array_equal(shared([True, True, True]), [True, True, True])
    np.testing.assert_array_equal(shared([False, False]), [False, False])
    assert bool(shared_predicate(jnp.array(True)))
    assert not bool(shared_predicate(jnp.array(False)))


def random_start_poisson_regression(c, x, K):
    """A mixture of Poisson regressions (gradient M-step for ``a`` and ``b``) whose
    intercepts start from the restart's key."""
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    a = numpyro.param("a", lambda key: jax.random.normal(key, (K,)))
    b = numpyro.param("b", jnp.zeros(K))
    with numpyro.plate("data", c.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("c", dist.Poisson(jax.nn.softplus(a[z] + b[z] * x)), obs=c)


def _poisson_regression_data(dtype=jnp.float32, N=150):
    rng = np.random.default_rng(4)
    x = rng.normal(size=N)
    z = rng.choice(2, size=N)
    c = rng.poisson(np.log1p(np.exp(np.array([0.0, 2.0])[z] + np.array([0.5, -0.5])[z] * x)))
    return jnp.asarray(c, dtype), jnp.asarray(x, dtype)


def test_restarts_one_after_another_are_the_same_fits(x64):
    """Batched (vmap), one after another (lax.map) and jitted, the restarts are the fits
    that separate runs from the split keys make. The restarts are compiled as other
    programs than a separate fit, so they round differently, and L-BFGS amplifies that
    once its steps reach rounding noise (its carried curvature pairs then hold noise):
    in float32, or in float64 with 10 steps per M-step, a restart's log-likelihood moved
    by 0.02 to 0.07 nats under LLVM -O0, as far as the three fits are apart. In float64
    with 3 steps per M-step, short of that noise, it moved by 2.5e-9 nats (1e-11
    relative) and the fits are 0.08 nats (3e-4) apart: rtol 1e-8 is 1000 times the one
    and 30000 times below the other."""
    c, x = _poisson_regression_data(jnp.float64)
    em = EM(random_start_poisson_regression, m_step_iters=3)
    key = jax.random.PRNGKey(5)
    kwargs = dict(max_iter=8, tol=0.0, num_restarts=3)
    batched = em.run(key, c, x, 2, batch_restarts=True, **kwargs)
    one_by_one = em.run(key, c, x, 2, batch_restarts=False, **kwargs)
    separate = [em.run(k, c, x, 2, max_iter=8, tol=0.0) for k in jax.random.split(key, 3)]
    lls = np.array([float(r.log_likelihood) for r in separate])
    assert np.min(np.abs(np.diff(np.sort(lls)))) > 1e-4 * np.abs(lls).max(), lls  # three fits
    for result in (batched, one_by_one):
        np.testing.assert_allclose(np.asarray(result.restart_log_likelihoods), lls, rtol=1e-8)
        np.testing.assert_allclose(float(result.log_likelihood), lls.max(), rtol=1e-8)
        np.testing.assert_allclose(
            np.asarray(result.params["a"]),
            np.asarray(separate[lls.argmax()].params["a"]),
            rtol=1e-6,
        )
        assert result.restart_num_iters.shape == (3,)
    # Inside jit the restarts run one after another in the compiled program (lax.map).
    jitted = jax.jit(
        lambda c: em.run(key, c, x, 2, batch_restarts=False, **kwargs).restart_log_likelihoods
    )(c)
    np.testing.assert_allclose(np.asarray(jitted), lls, rtol=1e-8)


def test_restarts_of_a_gradient_m_step_run_one_after_another_on_a_cpu(x32):
    # vmap turns the optimizer's inner loops into loops that run until the slowest
    # restart is done: several times the work of separate fits on a CPU.
    c, x = _poisson_regression_data()
    key = jax.random.PRNGKey(0)
    gradient = EM(random_start_poisson_regression)
    closed = EM(random_init_mixture)
    arrays, spec = split_args((c, x, 2), {})
    assert not gradient._restarts_batch_well(key, arrays, spec, None)
    arrays, spec = split_args((jnp.asarray(_mixture_data(0)), 3), {})
    assert closed._restarts_batch_well(key, arrays, spec, None)
