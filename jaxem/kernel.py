"""The kernel interface: one EM variant as a pair of pure functions.

In the spirit of blackjax's ``SamplingAlgorithm`` and optax's
``GradientTransformation``, a `Kernel` is a NamedTuple of pure
functions; the model, the M-step settings and every other choice live in
their closures, and the state is a pytree that the loop carries:

* ``init(rng_key, arrays, spec, init_params) -> state``: the state at the
  initial params (``rng_key`` for callable initial values);
* ``step(rng_key, state, arrays, spec) -> (state, info)``: one iteration.
  ``rng_key`` is this iteration's own key (the run loop derives one per
  iteration from the run's key, `jaxem.loop.iterate`); an exact E-step
  ignores it, a Monte Carlo E-step draws from it. ``info`` is a NamedTuple
  whose first two fields are those of `StepInfo`: ``objective``, the
  objective (log-likelihood, ELBO) at the params of the state passed in, and
  ``moved``, whether the new state's params are a new point (False where a
  safeguard kept the point, so that the next objective repeats this one);
  the other fields are the kernel's diagnostics (accept flags, step lengths);
* ``get_params(state) -> {param name: constrained value}`` and
  ``set_params(state, params) -> state``: read and replace the params of a
  state (an accelerator extrapolates them and runs the next step from there);
* ``constraints(arrays, spec) -> {param name: constraint}``: the constraints
  of those params (an accelerator extrapolates in unconstrained coordinates).

``arrays`` are the model's array arguments (a pytree, traced under ``jit``),
``spec`` the rest of its arguments (static): `jaxem.arguments.split_args`.

A wrapper is a function from kernels to kernels
([`jaxem.accelerators.squarem`][jaxem.accelerators.squarem],
[`jaxem.accelerators.anderson`][jaxem.accelerators.anderson]); its state holds the inner
kernel's state
and its own (`AcceleratedState`), and it calls the inner ``step`` as a
black box, so it works for any kernel: exact EM, variational EM, and the
E-step kinds to come.

Examples:
    A kernel written by hand: the fixed-point map ``m -> (m + 2) / 2`` (its
    fixed point is 2), with the objective ``-(m - 2)^2``, accelerated by
    SQUAREM:

    >>> import jax, jax.numpy as jnp
    >>> from numpyro.distributions import constraints
    >>> from jaxem.kernel import Kernel, StepInfo
    >>> from jaxem.accelerators import squarem
    >>> halving = Kernel(
    ...     init=lambda rng_key, arrays, spec, init_params: {"m": init_params["m"]},
    ...     step=lambda rng_key, state, arrays, spec: (
    ...         {"m": (state["m"] + 2.0) / 2.0},
    ...         StepInfo(-((state["m"] - 2.0) ** 2), jnp.array(True)),
    ...     ),
    ...     get_params=lambda state: state,
    ...     set_params=lambda state, params: dict(params),
    ...     constraints=lambda arrays, spec: {"m": constraints.real},
    ... )
    >>> fast = squarem(halving)
    >>> state = fast.init(jax.random.PRNGKey(0), (), None, {"m": jnp.array(0.0)})
    >>> state, info = fast.step(jax.random.PRNGKey(1), state, (), None)
    >>> float(fast.get_params(state)["m"])  # alpha_max = 1: three plain steps
    1.75
    >>> state, info = fast.step(jax.random.PRNGKey(2), state, (), None)
    >>> float(fast.get_params(state)["m"])  # a linear map: the extrapolation lands on 2
    2.0
    >>> bool(info.accepted), float(info.objective)  # the objective at m = 1.75
    (True, -0.0625)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

__all__ = ["AcceleratedState", "Kernel", "StepInfo"]


class StepInfo(NamedTuple):
    """What one step of a kernel reports (the fields every ``info`` starts with).

    Attributes:
        objective: the objective (log-likelihood; ELBO for variational EM) at
            the params of the state the step was given: for exact EM, the
            value this step's E-step computed.
        moved: whether the new state's params are a new point. False where a
            safeguard kept the point (an accelerated step rejected, an online
            update skipped): the next step's objective then repeats this one,
            and the run loop does not read the repetition as convergence.
    """

    objective: jax.Array
    moved: jax.Array


class Kernel(NamedTuple):
    """One EM variant as pure functions (see the module docstring).

    Attributes:
        init: ``(rng_key, arrays, spec, init_params) -> state``.
        step: ``(rng_key, state, arrays, spec) -> (state, info)``, ``info`` a
            NamedTuple starting with `StepInfo`'s fields.
        get_params: ``state -> {param name: constrained value}``.
        set_params: ``(state, params) -> state`` with those params.
        constraints: ``(arrays, spec) -> {param name: constraint}``.
    """

    init: Callable
    step: Callable
    get_params: Callable
    set_params: Callable
    constraints: Callable


class AcceleratedState(NamedTuple):
    """The state of a wrapped kernel.

    Attributes:
        inner: the inner kernel's state (its params the current point).
        acceleration: the wrapper's own state (a
            [`jaxem.acceleration.SquaremState`][jaxem.acceleration.SquaremState], an
            [`jaxem.acceleration.AndersonState`][jaxem.acceleration.AndersonState]).
    """

    inner: Any
    acceleration: Any
