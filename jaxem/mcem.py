"""Monte Carlo EM (Wei and Tanner 1990) with a NUTS/HMC E-step, a growing Monte Carlo
sample size and a stopping rule that allows for Monte Carlo error."""

from __future__ import annotations

import math
from collections.abc import Callable

import jax.numpy as jnp

from jaxem.monte_carlo import MonteCarloEM

__all__ = ["MCEM"]


class MCEM(MonteCarloEM):
    """Monte Carlo EM for models with continuous latents.

    Iteration ``k`` draws ``m_k`` transitions from each of ``num_chains`` NUTS (or
    HMC) chains targeting ``p(z | x, theta_k)`` (warm-started from the previous
    iteration, discrete latents summed out exactly) and maximizes the Monte Carlo
    estimate ``Q_k(theta) = mean_draws log p(x, z | theta)``. ``m_k =
    min(ceil(num_draws * growth ** k), max_draws)`` grows geometrically: early
    iterations are cheap, and late ones, where the EM steps are smaller than the
    Monte Carlo error of a fixed sample size, average more draws (the schedule
    form of Caffo, Jank and Jones 2005's advice).

    Stopping rule (ascent-based, after Caffo, Jank and Jones 2005): the M-step's
    rise of the Monte Carlo ``Q``, evaluated on the same draws, plus 1.645 times
    its Monte Carlo standard error (the draws taken as independent), is below
    ``tol`` (log-likelihood units) for three iterations in a row at the largest
    sample size: EM's step would raise the log-likelihood by less than ``tol``
    with about 95% confidence (a single iteration can meet it by chance, three
    in a row rarely). ``converged`` says that it held and that the score at the
    fitted params is zero but for Monte Carlo noise
    (`jaxem.monte_carlo_stationarity`: the rule can hold where EM is merely slow).
    A parameter is then within Monte Carlo error of the maximum, not closer: ``max_draws`` sets
    that error. An M-step raises ``Q`` on its own draws even at the maximum (it
    fits their noise), by roughly the number of free parameters over twice the
    number of effective draws, so ``tol`` must be above that floor: the default
    1e-2 suits ``max_draws`` of 100-200 per chain and a few dozen parameters.

    Args:
        model: see [`jaxem.SAEM`][jaxem.SAEM].
        num_draws: draws per chain in the first iteration.
        growth: factor by which the draws per chain grow each iteration.
        max_draws: the largest number of draws per chain.
        **options: ``kernel``, ``num_chains``, ``num_warmup``, ``optimizer``,
            ``m_step_iters``, ``frozen``, ``num_is_draws``, ``num_is_samples``,
            ``m_step``, ``reg_covar``, ``global_sites``, as for
            [`jaxem.SAEM`][jaxem.SAEM], except that ``num_chains`` is 4 by
            default whatever the number of groups: an iteration's Monte Carlo
            sample is ``num_chains x m_k`` draws, not averaged over iterations
            as SAEM's are, and the ``tol`` floor above (free params over twice
            the effective draws) is set for it. Closed-form params solve from
            their sufficient statistics averaged over the iteration's draws.
    """

    name = "MCEM"
    _convergence_rule = (
        "the rise of Q plus its Monte Carlo error did not stay below tol for three "
        "iterations at the largest sample size"
    )
    _stationarity_fix = (
        "The stopping rule held where EM's steps are small but the log-likelihood still "
        "rises (a flat direction, slow EM): lower tol, or raise max_draws so that each "
        "step's Monte Carlo error is smaller than its rise."
    )

    def __init__(
        self,
        model: Callable,
        *,
        num_draws: int = 10,
        growth: float = 1.25,
        max_draws: int = 100,
        **options,
    ):
        if num_draws < 1 or max_draws < num_draws or growth < 1.0:
            raise ValueError(
                "need 1 <= num_draws <= max_draws and growth >= 1, got "
                f"num_draws={num_draws}, max_draws={max_draws}, growth={growth}"
            )
        self.num_draws = int(num_draws)
        self.growth = float(growth)
        self.max_draws = int(max_draws)
        self.num_slots = self.max_draws
        super().__init__(model, **options)

    def _draws_per_chain(self, iteration):
        dtype = jnp.result_type(float)
        size = jnp.ceil(self.num_draws * self.growth ** iteration.astype(dtype))
        return jnp.minimum(size, self.max_draws).astype(jnp.int32)

    def _most_draws_per_chain(self) -> int:
        return self.max_draws

    def _expected_transitions(self, max_iter: int) -> int:
        """The draws per chain until the stopping rule can first hold: the iterations
        whose sample grows to ``max_draws``, then three at ``max_draws`` (at most
        ``max_iter`` iterations). The bound, ``max_iter x max_draws``, is rarely
        reached (the rule usually holds soon after the growth), and a program compiled
        for it paid XLA's optimizations where a first call did not get them back (see
        `jaxem.compiling`'s docstring)."""
        total, size, k = 0, self.num_draws, 0
        while k < max_iter and size < self.max_draws:
            total += size
            k += 1
            size = min(math.ceil(self.num_draws * self.growth**k), self.max_draws)
        return total + min(3, max_iter - k) * self.max_draws

    def _accumulate(self, state, fresh, num):
        used = jnp.arange(self.num_slots) < num
        return fresh, used.astype(jnp.result_type(float)) / num

    def _stop(self, state, new_state, tol):
        # Ascent-based (Caffo, Jank and Jones 2005): the rise of Q over the same draws,
        # with its Monte Carlo error, bounds the rise of the log-likelihood an exact EM
        # step would make. Stop when its upper 95% bound is below tol, at the largest
        # sample size, for three iterations in a row.
        bound = new_state.gain + 1.645 * new_state.gain_se
        full = self._draws_per_chain(state.iteration) >= self.max_draws
        streak = jnp.where((bound < tol) & full, new_state.streak + 1, 0)
        done = streak >= 3
        return done, done, streak

    def run(
        self, rng_key, *args, max_iter: int = 200, tol: float = 1e-2, init_params=None, **kwargs
    ):
        """Run to the stopping rule (or ``max_iter``) in one compiled loop, then draw
        the latents at the fitted params and estimate the log-likelihood by
        importance sampling.

        Returns:
            A `jaxem.monte_carlo.MCResult`.
        """
        if max_iter < 1:
            raise ValueError("max_iter must be at least 1")
        return self._run(
            rng_key, args, kwargs, max_iter=int(max_iter), tol=tol, init_params=init_params
        )
