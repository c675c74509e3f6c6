"""Monte Carlo EM (Wei and Tanner 1990) with a NUTS/HMC E-step, a growing Monte Carlo
sample size and a stopping rule that allows for Monte Carlo error."""

from __future__ import annotations

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

    Stopping rule (Booth and Hobert 1999): every free param entry's relative
    change ``|theta_k+1 - theta_k| / (|theta_k| + 1e-3)`` is below ``tol`` for
    three iterations in a row after the sample size reached ``max_draws`` (one
    iteration's change can fall below ``tol`` by chance; three in a row at the
    largest sample size rarely do). ``converged`` says that it held.

    Args:
        model: see :class:`jaxem.SAEM`.
        num_draws, growth, max_draws: the sample-size schedule (per chain).
        kernel, num_chains, num_warmup, optimizer, m_step_iters, frozen,
        num_is_draws, num_is_samples: see :class:`jaxem.SAEM`.
    """

    name = "MCEM"
    _convergence_rule = (
        "the relative change of the params did not stay below tol for three iterations "
        "at the largest sample size"
    )

    def __init__(
        self,
        model: Callable,
        *,
        num_draws: int = 10,
        growth: float = 1.25,
        max_draws: int = 200,
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

    def _accumulate(self, state, fresh, num):
        used = jnp.arange(self.num_slots) < num
        return fresh, used.astype(jnp.result_type(float)) / num

    def _stop(self, state, new_state, tol):
        changes = [
            jnp.max(
                jnp.abs(new_state.params[n] - state.params[n]) / (jnp.abs(state.params[n]) + 1e-3)
            )
            for n in state.params
            if n not in self.frozen
        ]
        small = jnp.max(jnp.stack(changes)) < tol
        full = self._draws_per_chain(state.iteration) >= self.max_draws
        streak = jnp.where(small & full, new_state.streak + 1, 0)
        done = streak >= 3
        return done, done, streak

    def run(
        self, rng_key, *args, max_iter: int = 200, tol: float = 2e-3, init_params=None, **kwargs
    ):
        """Run to the stopping rule (or ``max_iter``) in one compiled loop, then draw
        the latents at the fitted params and estimate the log-likelihood by
        importance sampling.

        Returns:
            A :class:`jaxem.monte_carlo.MCResult`.
        """
        if max_iter < 1:
            raise ValueError("max_iter must be at least 1")
        return self._run(
            rng_key, args, kwargs, max_iter=int(max_iter), tol=tol, init_params=init_params
        )
