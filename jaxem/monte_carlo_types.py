"""The state, per-iteration report and result of [`jaxem.SAEM`][jaxem.SAEM] and
[`jaxem.MCEM`][jaxem.MCEM]."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["MCInfo", "MCResult", "MCState"]


class MCState(NamedTuple):
    """The state a Monte Carlo EM loop carries.

    Attributes:
        params: ``{param name: constrained value}``.
        chains: NumPyro ``HMCState`` of every chain (leading chain axis).
        draws: ``{latent name: (slots, chains, *shape)}`` constrained draws that
            enter ``Q``.
        weights: shape ``(slots,)``: the weight of each slot in ``Q`` (shared by
            its chains).
        iteration: number of updates done.
        streak: consecutive iterations meeting the stopping rule (MCEM).
        gain: the last M-step's rise of the Monte Carlo ``Q``.
        gain_se: its Monte Carlo standard error (draws taken as independent).
        information: ``(d, d)``: SAEM's stochastic approximation of the
            complete-data information of the ``d`` unconstrained coordinates of
            the params without a closed form (`jaxem.stochastic_newton`); unused
            by MCEM.
    """

    params: dict
    chains: Any
    draws: dict
    weights: jax.Array
    iteration: jax.Array
    streak: jax.Array
    gain: jax.Array = jnp.zeros(())
    gain_se: jax.Array = jnp.zeros(())
    information: jax.Array = jnp.zeros((0, 0))


class MCInfo(NamedTuple):
    """One iteration's report: `jaxem.kernel.StepInfo`'s fields, then the
    chains' diagnostics.

    Attributes:
        objective: the Monte Carlo estimate of ``Q`` at the params of the state
            passed in (not the log-likelihood).
        moved: whether the params moved.
        accept_prob: mean acceptance probability of this iteration's transitions.
        num_divergences: divergent transitions in this iteration.
        step_size: mean step size of the chains.
        num_draws: draws per chain this iteration.
    """

    objective: jax.Array
    moved: jax.Array
    accept_prob: jax.Array
    num_divergences: jax.Array
    step_size: jax.Array
    num_draws: jax.Array


class MCResult(NamedTuple):
    """Result of `SAEM.run` / `MCEM.run`.

    Attributes:
        params: ``{param name: constrained value}``.
        log_likelihood: the observed-data log-likelihood at ``params``,
            estimated by importance sampling (`jaxem.importance`).
        log_likelihood_se: its Monte Carlo standard error.
        aic, bic: from ``log_likelihood``, the number of free parameter
            entries and the number of observed entries.
        history: shape ``(max_iter,)``: the Monte Carlo estimate of ``Q`` at
            the start of every iteration, NaN after ``num_iters``.
        param_history: ``{param name: (max_iter, *shape)}``: the params after
            every iteration, NaN after ``num_iters``.
        num_iters: iterations done.
        converged: SAEM: its schedule ran to the end; MCEM: the stopping rule
            held (see [`jaxem.MCEM`][jaxem.MCEM]); and, for both, the params are a
            stationary point of the log-likelihood within Monte Carlo error
            (``stationarity.stationary``). False after a divergence.
        diverged: whether the run stopped on non-finite params or ``Q``
            (``params`` are then the last finite ones).
        accept_prob: shape ``(max_iter,)``: mean acceptance per iteration.
        num_divergences: divergent transitions over the fit and the final draws.
        step_size: shape ``(max_iter,)``: mean step size per iteration.
        draws: ``{latent name: (draws, *shape)}``: posterior draws of the
            continuous latents at ``params`` (constrained).
        min_ess: the smallest effective sample size of the importance weights
            over independent blocks of latents.
        log_prior: with ``global_sites``, the log prior density of the global
            sites at ``params`` (MAP: the fit maximizes ``log_likelihood +
            log_prior``); None without.
        stationarity: the check that the score at ``params`` is zero but for
            Monte Carlo noise, and the Newton step's log-likelihood gain
            (`jaxem.monte_carlo_stationarity.Stationarity`).
        drift: SAEM: the test that the params had settled by the end of its
            first phase (`jaxem.monte_carlo_stationarity.Drift`); None for MCEM.
        unidentified: ``{param name: bool array}`` as in
            [`jaxem.EMResult`][jaxem.EMResult], from the normal equations averaged
            over the draws that enter ``Q`` at the end of the fit.
    """

    params: dict
    log_likelihood: jax.Array
    log_likelihood_se: jax.Array
    aic: jax.Array
    bic: jax.Array
    history: jax.Array
    param_history: dict
    num_iters: jax.Array
    converged: jax.Array
    diverged: jax.Array
    accept_prob: jax.Array
    num_divergences: jax.Array
    step_size: jax.Array
    draws: dict
    min_ess: jax.Array
    log_prior: jax.Array | None = None
    stationarity: Any = None
    drift: Any = None
    unidentified: dict | None = None
