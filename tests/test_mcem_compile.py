"""SAEM/MCEM compile what a fit needs once: the checks before the fit are one
program (not every primitive of the model run eagerly on the full data), and a
second fit on data of the same shapes compiles nothing."""

import warnings

import jax
import jax.monitoring
import jax.numpy as jnp
import numpy as np
from models import logistic_glmm

import jaxem
from jaxem.compiling import once_options

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
    """Counts XLA compilations while active (jax.monitoring's compile events)."""

    def __init__(self):
        self.count = 0

    def __call__(self, event, duration, **kwargs):
        if event == COMPILE_EVENT:
            self.count += 1

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self)


# MCEM goes through the same checks and compiled fit (CI time: one case, ~30 s).
def test_a_fit_compiles_a_few_programs_and_a_second_fit_none(x64):
    rng = np.random.default_rng(0)
    group = jnp.repeat(jnp.arange(25), 2)
    x = jnp.asarray(rng.normal(size=50))
    y = jnp.asarray((rng.random(50) < 0.5).astype(float))
    small = dict(num_is_draws=5, num_is_samples=20)
    # The default number of chains: ceil(50 / 25 groups) = 2 (tests/test_mcem_chains.py).
    fit = jaxem.SAEM(logistic_glmm, schedule=(3, 2), num_warmup=5, **small)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a 5-iteration fit on 50 points: not the point here
        with CompileCounter() as first:
            result = fit.run(jax.random.PRNGKey(0), group, x, y, 25)
        with CompileCounter() as second:
            fit.run(jax.random.PRNGKey(1), group, x, y, 25)
    assert result.draws["u"].shape == (5 * 2, 25)
    # The checks before the fit used to run eagerly: about a hundred one-primitive
    # programs on the first call, and a fresh jit of the model's elementwise
    # density on every call. Now: the model's trace at the start (a few small
    # eager ops), one program for the checks, one for the fit.
    assert first.count <= 40, first.count
    assert second.count == 0, second.count
    # Small work (150 numbers x 2 chains x 10 transitions): compiled without backend
    # optimization (jaxem.compiling.monte_carlo_options; tests/test_compiling.py).
    assert fit._fit_jits.made == [tuple(sorted(once_options().items()))]
