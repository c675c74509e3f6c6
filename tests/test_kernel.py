"""The kernel interface (jaxem/kernel.py): SQUAREM and Anderson wrap any kernel, the run
loop gives every step its own key, and ``update`` returns the objective at the state
passed in with every acceleration."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models import normal_mixture
from numpyro.distributions import constraints

import jaxem
from jaxem import EM, VariationalEM
from jaxem.accelerators import anderson, squarem
from jaxem.kernel import Kernel, StepInfo
from jaxem.loop import iterate

# A symmetric contraction with eigenvalues 0.95 and 0.5 around the fixed point (1, -2):
# plain iteration needs ~ log(tol) / log(0.95) steps.
_RATE = jnp.array([[0.725, 0.225], [0.225, 0.725]])
_FIXED = jnp.array([1.0, -2.0])


def _objective(m):
    return 10.0 - jnp.sum((m - _FIXED) ** 2)


def _linear_kernel(draws=False):
    """A kernel written by hand: ``m -> m* + R (m - m*)``, objective ``10 - |m - m*|^2`` at
    the state passed in (away from 0, for the loop's relative convergence test). With
    ``draws``, the state also records a normal draw from each step's key (in
    ``draws[iteration]``)."""

    def init(rng_key, arrays, spec, init_params):
        state = {"params": {"m": init_params["m"]}, "iteration": jnp.zeros((), jnp.int32)}
        if draws:
            state["draws"] = jnp.full((spec,), jnp.nan)
        return state

    def step(rng_key, state, arrays, spec):
        m = state["params"]["m"]
        new = dict(state, params={"m": _FIXED + _RATE @ (m - _FIXED)})
        new["iteration"] = state["iteration"] + 1
        if draws:
            new["draws"] = state["draws"].at[state["iteration"]].set(jax.random.normal(rng_key))
        return new, StepInfo(_objective(m), jnp.array(True))

    return Kernel(
        init=init,
        step=step,
        get_params=lambda state: state["params"],
        set_params=lambda state, params: dict(state, params=dict(params)),
        constraints=lambda arrays, spec: {"m": constraints.real},
    )


def _run(kernel, max_iter, tol, rng_key=None, spec=None):
    rng_key = jax.random.PRNGKey(0) if rng_key is None else rng_key
    state = kernel.init(rng_key, (), spec, {"m": jnp.array([5.0, 5.0])})
    return jax.jit(
        lambda key, s: iterate(
            lambda k, s: kernel.step(k, s, (), spec),
            key,
            s,
            kernel.get_params,
            final_fn=lambda s: (_objective(kernel.get_params(s)["m"]), ()),
            max_iter=max_iter,
            tol=tol,
            progress_bar=False,
        )
    )(rng_key, state)


@pytest.mark.parametrize("wrapper", [squarem, anderson])
def test_wrappers_accelerate_a_kernel_written_by_hand(wrapper, x64):
    """SQUAREM and Anderson wrap a kernel that is not EM's: they reach its fixed point, with
    a monotone objective, in far fewer steps of the inner map than plain iteration."""
    plain = _run(_linear_kernel(), 2000, 1e-14)
    fast = _run(wrapper(_linear_kernel()), 2000, 1e-14)
    assert bool(plain.converged) and bool(fast.converged) and not bool(fast.diverged)
    np.testing.assert_allclose(np.asarray(fast.state.inner["params"]["m"]), _FIXED, atol=1e-6)
    history = np.asarray(fast.history)[: int(fast.num_iters)]
    assert np.all(np.diff(history) >= 0), history
    steps_per_iter = 3 if wrapper is squarem else 1
    assert steps_per_iter * int(fast.num_iters) * 5 < int(plain.num_iters)


def test_the_loop_gives_each_step_its_own_key():
    """iterate derives iteration i's key as fold_in(rng_key, i): distinct draws, the same
    for the same run key; SQUAREM's three inner steps each get their own key."""
    key = jax.random.PRNGKey(3)
    loop = _run(_linear_kernel(draws=True), 6, 0.0, key, spec=6)
    draws = np.asarray(loop.state["draws"])
    expected = [float(jax.random.normal(jax.random.fold_in(key, i))) for i in range(6)]
    np.testing.assert_allclose(draws, expected, rtol=1e-6)
    assert len(set(draws.tolist())) == 6
    again = _run(_linear_kernel(draws=True), 6, 0.0, key, spec=6)
    np.testing.assert_array_equal(np.asarray(again.state["draws"]), draws)
    other = _run(_linear_kernel(draws=True), 6, 0.0, jax.random.PRNGKey(4), spec=6)
    assert not np.any(np.asarray(other.state["draws"]) == draws)
    # SQUAREM: 2 cycles, 3 inner steps each, 6 distinct draws.
    cycles = _run(squarem(_linear_kernel(draws=True)), 2, 0.0, key, spec=6)
    inner = np.asarray(cycles.state.inner["draws"])
    assert np.all(np.isfinite(inner)) and len(set(inner.tolist())) == 6


def _overlapping_mixture():
    rng = np.random.default_rng(11)
    z = rng.integers(0, 2, 200)
    x = jnp.asarray(rng.normal(np.array([-1.0, 1.0])[z], 1.0))
    return x, {"mu": jnp.array([-0.5, 0.2]), "sigma": jnp.array([1.5, 0.7])}


@pytest.mark.parametrize("acceleration", [None, "squarem", "anderson"])
def test_update_returns_the_objective_at_the_state_passed_in(acceleration, x64):
    """With every acceleration, update's value is the log-likelihood at the params of the
    state passed in (before: with Anderson, at the new state's)."""
    x, init = _overlapping_mixture()
    em = EM(normal_mixture, acceleration=acceleration)
    state = em.init(jax.random.PRNGKey(0), x, 2, init_params=init)
    for _ in range(6):
        new_state, value = em.update(state, x, 2)
        expected = float(jaxem.log_likelihood(normal_mixture, state.params, x, 2))
        np.testing.assert_allclose(float(value), expected, rtol=1e-12)
        state = new_state
    assert int(state.iteration) == 6


@pytest.mark.parametrize("acceleration", ["squarem", "anderson"])
def test_accelerated_variational_em(acceleration, x64):
    """VariationalEM(acceleration=...) wraps the variational kernel: on a mixture (mean
    field is exact there) it reaches plain VariationalEM's fixed point, which is EM's, in
    fewer E-steps, with a monotone ELBO."""
    x, init = _overlapping_mixture()
    kw = dict(max_iter=3000, tol=1e-12, init_params=init)
    plain = VariationalEM(normal_mixture).run(jax.random.PRNGKey(0), x, 2, **kw)
    fast = VariationalEM(normal_mixture, acceleration=acceleration).run(
        jax.random.PRNGKey(0), x, 2, **kw
    )
    assert bool(plain.converged) and bool(fast.converged) and not bool(fast.diverged)
    np.testing.assert_allclose(float(fast.elbo), float(plain.elbo), rtol=1e-9)
    np.testing.assert_allclose(float(fast.elbo), float(fast.log_likelihood), rtol=1e-9)
    for name in plain.params:
        np.testing.assert_allclose(
            np.asarray(fast.params[name]), np.asarray(plain.params[name]), atol=1e-4
        )
    history = np.asarray(fast.history)[: int(fast.num_iters)]
    assert np.all(np.diff(history) >= -1e-10 * np.abs(history[1:])), history
    steps_per_iter = 3 if acceleration == "squarem" else 1
    assert steps_per_iter * int(fast.num_iters) < int(plain.num_iters)
    assert fast.q["z"].shape == (200, 2)


def test_bad_variational_acceleration_name():
    with pytest.raises(
        ValueError, match="acceleration must be None, 'squarem' or 'anderson', got 'nesterov'"
    ):
        VariationalEM(normal_mixture, acceleration="nesterov")


@pytest.mark.parametrize("fitter", [jaxem.EM, VariationalEM, jaxem.OnlineEM])
def test_every_fitter_refuses_m_step_iters_below_one_and_reads_its_settings_back(fitter):
    with pytest.raises(ValueError, match="m_step_iters must be at least 1, got 0"):
        fitter(normal_mixture, m_step_iters=0)
    built = fitter(normal_mixture, m_step_iters=3, reg_covar=1e-4, frozen=["w"])
    assert (built.m_step_iters, built.reg_covar, built.frozen) == (3, 1e-4, ("w",))
    # The optimizer the M-step runs is the one the fitter reports.
    assert built.optimizer is built.m_step_settings.optimizer
