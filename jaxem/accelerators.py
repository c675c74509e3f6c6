"""SQUAREM and Anderson acceleration as wrappers of any kernel.

``squarem(kernel)`` and ``anderson(kernel)`` take a `jaxem.kernel.Kernel`
and return one: its steps call the inner kernel's ``step`` as the EM map
``theta -> F(theta)`` and extrapolate the params it returns (the mathematics
is in `jaxem.acceleration`). They read and replace params through the
kernel's ``get_params`` and ``set_params``, and extrapolate in the
coordinates its ``constraints`` give, so they accelerate exact EM,
variational EM, or a kernel written by hand alike. ``accelerate`` is what
the fitters' ``acceleration=`` option builds.

Every wrapped step's ``info.objective`` is, as for the plain kernel, the
objective at the params of the state passed in: for SQUAREM the value of the
cycle's first E-step, for Anderson the value at the current (last accepted)
point, computed by the step that accepted it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxem.acceleration import (
    anderson_step,
    init_anderson,
    init_squarem,
    squarem_extrapolate,
    squarem_step_max,
)
from jaxem.kernel import AcceleratedState, Kernel
from jaxem.loop import all_finite, tree_where

__all__ = ["ACCELERATIONS", "AndersonInfo", "SquaremInfo", "accelerate", "anderson", "squarem"]


class SquaremInfo(NamedTuple):
    """What one SQUAREM cycle reports.

    Attributes:
        objective: at the params of the state passed in (the first E-step's).
        moved: whether the cycle ended at a new point.
        accepted: whether the extrapolated point was kept (else the plain
            two-step point).
        step_length: the step length ``alpha`` used.
        extrapolated_objective: the objective at the extrapolated point.
    """

    objective: jax.Array
    moved: jax.Array
    accepted: jax.Array
    step_length: jax.Array
    extrapolated_objective: jax.Array


class AndersonInfo(NamedTuple):
    """What one Anderson step reports.

    Attributes:
        objective: at the params of the state passed in (the current point,
            evaluated by the step that accepted it).
        moved: whether the trial was accepted as the new current point (the
            first step evaluates the initial point itself: not a move).
        accepted: whether the trial passed the monotonicity safeguard.
        trial_objective: the objective at the trial point, the value this
            step's E-step computed.
    """

    objective: jax.Array
    moved: jax.Array
    accepted: jax.Array
    trial_objective: jax.Array


def squarem(kernel: Kernel) -> Kernel:
    """SQUAREM (Varadhan and Roland 2008, step length S3) around ``kernel``.

    Each step is one cycle of three inner steps: two from the current point,
    then one from the extrapolation of the three points; the cycle ends at
    that last step's point when the objective at the extrapolated point is
    finite and not below the objective at the current point, else at the
    plain two-step point. Each inner step gets its own key, split from the
    cycle's.

    Args:
        kernel: the kernel whose step is the map to accelerate.

    Returns:
        A kernel whose state is an `jaxem.kernel.AcceleratedState` (the
        inner state, a
        [`jaxem.acceleration.SquaremState`][jaxem.acceleration.SquaremState])
        and whose info is a `SquaremInfo`.
    """

    def init(rng_key, arrays, spec, init_params):
        state = kernel.init(rng_key, arrays, spec, init_params)
        return AcceleratedState(state, init_squarem(jnp.result_type(float)))

    def step(rng_key, state, arrays, spec):
        constraints = kernel.constraints(arrays, spec)
        keys = jax.random.split(rng_key, 3)
        start, squarem_state = state.inner, state.acceleration
        first, first_info = kernel.step(keys[0], start, arrays, spec)
        second, second_info = kernel.step(keys[1], first, arrays, spec)
        extrapolated, alpha = squarem_extrapolate(
            *(kernel.get_params(s) for s in (start, first, second)),
            constraints,
            squarem_state.step_max,
        )
        third, third_info = kernel.step(
            keys[2], kernel.set_params(second, extrapolated), arrays, spec
        )
        objective = first_info.objective
        accepted = (
            jnp.isfinite(third_info.objective)
            & (third_info.objective >= objective)
            & all_finite(kernel.get_params(third))
        )
        inner = tree_where(accepted, third, second)
        info = SquaremInfo(
            objective=objective,
            moved=accepted | first_info.moved | second_info.moved,
            accepted=accepted,
            step_length=alpha,
            extrapolated_objective=third_info.objective,
        )
        return AcceleratedState(inner, squarem_step_max(squarem_state, alpha, accepted)), info

    return _wrapped(kernel, init, step)


def anderson(kernel: Kernel) -> Kernel:
    """Anderson acceleration (Walker and Ni 2011, safeguarded in the spirit of
    DAAREM) around ``kernel``.

    Each step is one inner step, at the trial point: the Anderson
    extrapolation of the accepted points before it. The trial becomes the
    current point when its objective is not below the current point's, else
    the memory is cleared and the next step runs at the plain point
    ``F(current)``.

    Args:
        kernel: the kernel whose step is the map to accelerate.

    Returns:
        A kernel whose state is an `jaxem.kernel.AcceleratedState` (the
        inner state at the current point, an
        [`jaxem.acceleration.AndersonState`][jaxem.acceleration.AndersonState]) and whose info is an
        `AndersonInfo`.
    """

    def init(rng_key, arrays, spec, init_params):
        state = kernel.init(rng_key, arrays, spec, init_params)
        constraints = kernel.constraints(arrays, spec)
        return AcceleratedState(state, init_anderson(kernel.get_params(state), constraints))

    def step(rng_key, state, arrays, spec):
        constraints = kernel.constraints(arrays, spec)
        current, memory = state.inner, state.acceleration
        trial = dict(memory.trial)
        evaluated, trial_info = kernel.step(
            rng_key, kernel.set_params(current, trial), arrays, spec
        )
        new_memory = anderson_step(
            memory, trial_info.objective, kernel.get_params(evaluated), constraints
        )
        accepted = new_memory.accepted
        inner = tree_where(accepted, kernel.set_params(evaluated, trial), current)
        # Before the first step the trial is the initial point itself.
        objective = jnp.where(
            memory.started,
            memory.log_likelihood,
            trial_info.objective.astype(memory.log_likelihood.dtype),
        )
        info = AndersonInfo(
            objective=objective,
            moved=accepted & memory.started,
            accepted=accepted,
            trial_objective=trial_info.objective,
        )
        return AcceleratedState(inner, new_memory), info

    return _wrapped(kernel, init, step)


ACCELERATIONS = {"squarem": squarem, "anderson": anderson}


def accelerate(kernel: Kernel, acceleration: str | None) -> Kernel:
    """``kernel`` wrapped by the accelerator named ``acceleration`` (None: itself),
    over the inner kernel's own state type.

    The fitters' states ([`jaxem.EMState`][jaxem.EMState],
    [`jaxem.VEMState`][jaxem.VEMState]) have an
    ``acceleration`` field: the wrapper's state is kept there (``()`` without
    acceleration), so a state keeps its type and fields with every accelerator,
    and its ``iteration`` counts the wrapped steps (SQUAREM cycles).
    """
    if acceleration is None:
        return kernel
    wrapped = ACCELERATIONS[acceleration](kernel)

    def nested(state):
        return AcceleratedState(state._replace(acceleration=()), state.acceleration)

    def flat(state, iteration=None):
        out = state.inner._replace(acceleration=state.acceleration)
        return out if iteration is None else out._replace(iteration=iteration)

    def init(rng_key, arrays, spec, init_params):
        return flat(wrapped.init(rng_key, arrays, spec, init_params))

    def step(rng_key, state, arrays, spec):
        new_state, info = wrapped.step(rng_key, nested(state), arrays, spec)
        iteration = state.iteration + 1 if "iteration" in state._fields else None
        return flat(new_state, iteration), info

    return Kernel(
        init=init,
        step=step,
        get_params=kernel.get_params,
        set_params=kernel.set_params,
        constraints=kernel.constraints,
    )


def _wrapped(kernel: Kernel, init, step) -> Kernel:
    return Kernel(
        init=init,
        step=step,
        get_params=lambda state: kernel.get_params(state.inner),
        set_params=lambda state, params: state._replace(
            inner=kernel.set_params(state.inner, params)
        ),
        constraints=kernel.constraints,
    )
