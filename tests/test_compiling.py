"""Programs compiled for one evaluation, and a fit's two programs compiled together
(jaxem.compiling): same values as jax.jit, each program compiled once."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxem
from jaxem.compiling import (
    EMITTER_OPTIONS,
    ITERATING_WEIGHT,
    LARGE_WORK,
    ONCE_OPTIONS,
    SMALL_DATA,
    SMALL_SAMPLING_WORK,
    SMALL_WORK,
    after_loop_options,
    compile_once,
    compile_together,
    emitter_options,
    jit_once,
    loop_options,
    monte_carlo_options,
    monte_carlo_work,
    once_options,
)
from tests.models import gaussian_hmm, gmm_scale_tril, logistic_glmm, student_t_mixture


def _f(x, n):
    return jnp.sum(jnp.log1p(jnp.exp(x)) ** n) + jnp.linalg.cholesky(jnp.eye(2) * 2.0)[0, 0]


def test_once_options_on_cpu():
    if jax.default_backend() == "cpu":
        assert once_options() == {**ONCE_OPTIONS, **EMITTER_OPTIONS}
        assert emitter_options() == EMITTER_OPTIONS


def test_jit_once_matches_jit_with_static_args():
    x = jnp.linspace(-3.0, 3.0, 11)
    once = jit_once(_f, static_argnums=(1,))
    np.testing.assert_array_equal(
        np.asarray(once(x, 2)), np.asarray(jax.jit(_f, static_argnums=(1,))(x, 2))
    )
    # A new static value compiles a new program through the same wrapper.
    np.testing.assert_allclose(np.asarray(once(x, 3)), np.asarray(_f(x, 3)), rtol=1e-6)


def test_compile_once_of_a_lowered_function():
    x = jnp.linspace(-3.0, 3.0, 11)
    lowered = jax.jit(lambda x: _f(x, 2)).lower(x)
    np.testing.assert_array_equal(
        np.asarray(compile_once(lowered)(x)), np.asarray(lowered.compile()(x))
    )


def _lowered_during(fn, stage="jaxpr_to_mlir_module_duration"):
    """``fn()``'s value and the names of the programs lowered (``stage``: or compiled,
    ``"backend_compile_duration"``) while it ran (a program found in ``jit``'s cache
    is not lowered again)."""
    names = []

    def listener(event, duration, **kwargs):
        if event.endswith(stage):
            names.append(kwargs.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        value = jax.block_until_ready(fn())
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return value, names


def test_compile_together_leaves_its_programs_in_jits_cache(x32):
    # The first program's second output is weakly typed: the second program must be
    # compiled for a weak input, or its call would compile it again. The third is
    # lowered by its own function (as the float64 recheck is, under x64).
    def first_fn(x):
        return 2.0 * x, 1.0

    def second_fn(out, x):
        return out[0] + out[1] * x

    def third_fn(y):
        return jnp.sum(y)

    first, second, third = jax.jit(first_fn), jax.jit(second_fn), jax.jit(third_fn)
    x = jnp.linspace(0.0, 1.0, 5)
    _, names = _lowered_during(
        lambda: compile_together(
            lambda _: first.trace(x),
            lambda out: second.trace(out, x),
            lambda y: third.trace(y).lower(),
        )
    )
    assert sorted(names) == ["jit(first_fn)", "jit(second_fn)", "jit(third_fn)"]
    out = first(x)
    assert out[1].weak_type
    value, names = _lowered_during(lambda: third(second(out, x)), "backend_compile_duration")
    assert names == []
    np.testing.assert_array_equal(np.asarray(value), np.sum(second_fn(first_fn(x), x)))


def test_compile_together_stops_at_none_and_leaves_an_error_to_the_call(x32):
    first = jax.jit(lambda x: x + 1.0)
    second = jax.jit(lambda y: y.reshape(7))  # wrong size: fails to trace
    third = jax.jit(lambda y: y * 3.0)
    x = jnp.ones(3)
    _, names = _lowered_during(
        lambda: compile_together(
            lambda _: first.trace(x),
            lambda out: second.trace(out),
            lambda out: third.trace(out),  # not reached: no outputs to trace it on
        )
    )
    assert names == ["jit(<lambda>)"]
    with pytest.raises(TypeError, match="reshape"):
        second(first(x))
    _, names = _lowered_during(
        lambda: compile_together(lambda _: third.trace(x), lambda out: None, lambda out: 1 / 0)
    )
    assert names == ["jit(<lambda>)"]


def test_run_compiles_its_loop_and_what_follows_once_each(x32):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 2)).astype(np.float32)
    x[:30] += 3.0
    x = jnp.asarray(x)
    key = jax.random.PRNGKey(0)
    for num_restarts, batch in [(1, None), (3, True), (3, False)]:
        em = jaxem.EM(gmm_scale_tril)

        def fit(k, em=em, num_restarts=num_restarts, batch=batch):
            return em.run(
                k, x, 2, max_iter=8, tol=0.0, num_restarts=num_restarts, batch_restarts=batch
            )

        result, names = _lowered_during(lambda fit=fit: fit(key))
        programs = [n for n in names if n.endswith("_arrays)")]
        assert sorted(programs) == ["jit(_finish_arrays)", "jit(_loop_arrays)"], names
        _, names = _lowered_during(lambda fit=fit: fit(key))
        assert [n for n in names if n.endswith("_arrays)")] == []
        # The same fit traced as one program (what jax.jit of run compiles).
        single = jax.jit(fit)(key)
        for a, b in zip(jax.tree.leaves(result), jax.tree.leaves(single), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6, atol=1e-6)


def test_a_cold_run_compiles_its_loop_what_follows_and_the_recheck_together(x32):
    # The checks before the fit, the loop, the evaluation after it and the float64
    # recheck of its result are compiled once each, off the main thread
    # (compile_together; the loop traced while the checks compile), before the fit
    # runs; nothing is compiled again when they run.
    x = jnp.asarray(np.random.default_rng(1).normal(size=(50, 2)), jnp.float32)
    compiled = []

    def listener(event, duration, **kwargs):
        if event.endswith("backend_compile_duration"):
            main = threading.current_thread() is threading.main_thread()
            compiled.append((kwargs.get("fun_name"), main))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        result = jaxem.EM(gmm_scale_tril).run(jax.random.PRNGKey(0), x, 2, max_iter=4)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    names = [name for name, _ in compiled]
    together = ["jit(_checks)", "jit(_loop_arrays)", "jit(_finish_arrays)", "jit(_value)"]
    assert sorted(n for n in names if n in together) == sorted(together), compiled
    assert all(not main for name, main in compiled if name in together), compiled
    assert [n for n in names if n in together][0] == "jit(_checks)", compiled
    assert np.isfinite(float(result.log_likelihood))


@pytest.mark.parametrize("num_points", [40, SMALL_DATA // 2 + 1])
def test_the_program_after_a_fits_loop_is_compiled_by_the_datas_size(x32, num_points):
    # It runs once per fit: on small data without backend optimization (and on a CPU
    # with the older emitters), like the checks before the fit; on more data (here
    # 2 x num_points > SMALL_DATA numbers) with the older emitters only, as its run
    # would grow with the data. The loop keeps XLA's defaults.
    x = jnp.asarray(np.random.default_rng(0).normal(size=(num_points, 2)), jnp.float32)
    em = jaxem.EM(gmm_scale_tril)
    result = em.run(jax.random.PRNGKey(0), x, 2, max_iter=3)
    small = 2 * num_points <= SMALL_DATA
    expected = once_options() if small else emitter_options()
    assert em._finish_jits.made == [tuple(sorted(expected.items()))]
    assert after_loop_options(x) == expected
    assert after_loop_options(x[:20], num_restarts=SMALL_DATA // 40 + 1) == emitter_options()
    # The same fit as one program with XLA's defaults (run under a user's jit).
    key = jax.random.PRNGKey(0)
    reference = jax.jit(lambda x: jaxem.EM(gmm_scale_tril).run(key, x, 2, max_iter=3))(x)
    np.testing.assert_allclose(result.log_likelihood, reference.log_likelihood, rtol=1e-5)


def test_loop_options_choose_a_tier_by_the_loops_work_and_structure():
    x = np.zeros((100, 2), np.float32)  # 200 numbers
    small, large = SMALL_WORK // 200, LARGE_WORK // 200
    assert loop_options(x, 1, small) == once_options()
    assert loop_options(x, 1, small + 1) == emitter_options()
    assert loop_options(x, 2, small // 2 + 1) == emitter_options()  # restarts count
    assert loop_options(x, 1, large) == emitter_options()
    assert loop_options(x, 1, large + 1) == {}
    assert loop_options(x, 1, large + 1, chain=True) == emitter_options()  # never {}
    # A step running an inner optimizer weighs ITERATING_WEIGHT plain ones.
    weight = ITERATING_WEIGHT
    assert loop_options(x, 1, small, iterates=True) == {}
    assert loop_options(x, 1, small // weight, iterates=True) == once_options()
    assert loop_options(x, 1, small // weight + 1, iterates=True) == emitter_options()
    assert loop_options(x, 1, large // weight, iterates=True) == emitter_options()
    assert loop_options(x, 1, large // weight + 1, iterates=True) == {}


def _loop_options_of(em) -> list:
    return [dict(options) for options in em._loop_jits.chosen.values()]


def _two_blobs():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 2)).astype(np.float32)
    x[:20] += 3.0
    return jnp.asarray(x)


def test_run_compiles_its_loop_with_the_options_of_its_work_and_structure(x32):
    # The fit loop is compiled by loop_options, from what tracing it found (no model
    # trace of its own): max_iter sets the work (the program does not change with it;
    # these fits converge in a few iterations), and the values agree.
    x, key = _two_blobs(), jax.random.PRNGKey(0)
    fits = []
    for max_iter, expected in [(SMALL_WORK // 80, once_options()), (LARGE_WORK // 80 + 1, {})]:
        em = jaxem.EM(gmm_scale_tril)
        fits.append(em.run(key, x, 2, max_iter=max_iter))
        assert _loop_options_of(em) == [expected], max_iter
    np.testing.assert_allclose(fits[1].log_likelihood, fits[0].log_likelihood, rtol=1e-6)
    # A Markov chain: the older emitters however large (its loop runs faster with them).
    em = jaxem.EM(gaussian_hmm)
    em.run(key, x[:, 0], 2, max_iter=LARGE_WORK // 40 + 1)
    assert _loop_options_of(em) == [emitter_options()]


@pytest.mark.slow
def test_run_weighs_a_loop_whose_steps_iterate(x32):
    # Gradient-path params: the first tier needs ITERATING_WEIGHT times less work.
    x, key = _two_blobs(), jax.random.PRNGKey(0)
    em = jaxem.EM(student_t_mixture)
    em.run(key, x[:, 0], 2, max_iter=SMALL_WORK // (40 * ITERATING_WEIGHT) + 1)
    assert _loop_options_of(em) == [emitter_options()]


def _options_key(options):
    return tuple(sorted(options.items()))


def test_a_monte_carlo_fit_is_compiled_by_its_work():
    # W = numbers of data x chains x the most transitions per chain; once_options up to
    # SMALL_SAMPLING_WORK (5e6), the older emitters above it. Here 500 numbers x 2
    # chains: a transition per chain weighs 1 000, the threshold is 5 000 transitions.
    arrays = (jnp.zeros(250), jnp.zeros((125, 2)))
    assert SMALL_SAMPLING_WORK == 5_000_000
    assert monte_carlo_work(arrays, 2, 5000) == SMALL_SAMPLING_WORK
    assert monte_carlo_options(arrays, 2, 5000) == once_options()
    assert monte_carlo_options(arrays, 2, 5001) == emitter_options()
    assert monte_carlo_options(arrays, 5, 2000) == once_options()
    assert monte_carlo_options(arrays, 6, 2000) == emitter_options()
    # SAEM counts every transition a chain makes: max_iter x num_mcmc_steps, plus
    # num_is_draws (the largest max_iter compiled with once_options).
    fitters = [
        (jaxem.SAEM(logistic_glmm, num_is_draws=250), 4750),
        (jaxem.SAEM(logistic_glmm, num_is_draws=250, num_mcmc_steps=2), 2375),
        (jaxem.SAEM(logistic_glmm, num_is_draws=1000), 4000),
    ]
    once, emitters = _options_key(once_options()), _options_key(emitter_options())
    both = [once, emitters] if once != emitters else [once]
    for fitter, most in fitters:
        fitter._fit_program(arrays, 2, most)
        assert fitter._fit_jits.made == [once]
        fitter._fit_program(arrays, 2, most + 1)
        assert fitter._fit_jits.made == both
    # MCEM counts the draws until its stopping rule can first hold, whatever max_iter:
    # 10 + 20 + ... + 640 (1 270) while the sample grows, three iterations at
    # max_draws, num_is_draws 250: 4 520 transitions with max_draws=1000, 5 120 with
    # 1200 (its bound, max_iter x max_draws, would be 10^9).
    small = jaxem.MCEM(logistic_glmm, num_draws=10, growth=2.0, max_draws=1000)
    assert small._expected_transitions(10**6) == 1270 + 3 * 1000
    small._fit_program(arrays, 2, 10**6)
    assert small._fit_jits.made == [once]
    large = jaxem.MCEM(logistic_glmm, num_draws=10, growth=2.0, max_draws=1200)
    large._fit_program(arrays, 2, 10**6)
    assert large._fit_jits.made == [emitters]
    # Fewer iterations than that: those that max_iter allows.
    assert small._expected_transitions(5) == 10 + 20 + 40 + 80 + 160
    assert small._expected_transitions(9) == 1270 + 2 * 1000
    # The sizes are the fit's own (MCEM._draws_per_chain), summed.
    sizes = [int(small._draws_per_chain(jnp.asarray(k))) for k in range(10)]
    assert sum(sizes) == small._expected_transitions(10)
