"""Stochastic approximation EM (Delyon, Lavielle and Moulines 1999; Kuhn and Lavielle
2004), the method behind Monolix, saemix and nlmixr2, with a NUTS/HMC E-step."""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxem.monte_carlo import DEFAULT_CHAINS, MCResult, MCState, MonteCarloEM
from jaxem.monte_carlo_stationarity import phase_drift
from jaxem.stochastic_newton import stochastic_newton_update

__all__ = ["SAEM"]

# Chains x independent groups SAEM's default number of chains reaches (Monolix's
# automatic number of chains: enough chains that chains x subjects >= 50).
MIN_CHAIN_GROUPS = 50


class SAEM(MonteCarloEM):
    """Stochastic approximation EM for models with continuous latents.

    Every iteration moves each of ``num_chains`` chains by ``num_mcmc_steps``
    transitions of NUTS (or HMC) targeting ``p(z | x, theta_k)`` (warm-started from
    the previous iteration, discrete latents summed out exactly), and updates the
    stochastic approximation of the expected complete-data log-likelihood

    ``Q_k(theta) = Q_{k-1}(theta) + gamma_k (mean_chains log p(x, z_k | theta) - Q_{k-1}(theta))``

    and raises ``Q_k``. A param that [`jaxem.EM`][jaxem.EM]'s closed-form registry
    covers on the model given the draws (a random effect's location and scale, a
    residual scale, mixture weights; `m_step_paths` says which) is solved from its
    sufficient statistics averaged over the stored draws with the weights of
    ``Q_k``: exactly the stochastic approximation ``s_k = s_{k-1} + gamma_k (S(z_k) -
    s_{k-1})`` of Delyon et al. (1999), as saemix does. The others (in unconstrained
    coordinates ``u``) take, while ``gamma_k = 1``, ``m_step_iters`` L-BFGS steps (or
    the given optax optimizer) on this iteration's ``log p(x, z_k | theta)`` (a
    stochastic EM step); once ``gamma_k < 1``, one Robbins-Monro step
    ``u_{k+1} = u_k + gamma_k J_k^{-1} grad log p(x, z_k | u_k)`` with ``J_k`` the
    stochastic approximation of the complete-data information (Gu and Kong 1998;
    `jaxem.stochastic_newton`), whose cost does not grow with the iterations as the
    exact ``Q_k`` over every stored draw would; where ``log p`` is quadratic in them
    it is the exact maximizer of ``Q_k``. `MCResult.history` is then the Monte
    Carlo ``log p(x, z_k | theta_k)`` of each iteration's own draws. With more than
    `jaxem.stochastic_newton.MAX_COORDINATES` free coordinates, the optimizer on
    the exact ``Q_k`` over the stored draws instead.
    The step sizes: ``gamma_k = 1`` for the first ``schedule[0]`` iterations (exploration), then
    ``gamma_k = (k - schedule[0] + 1) ** -decay`` for ``schedule[1]`` iterations
    (saemix's defaults: 300 + 100, decay 1). With ``decay`` in (1/2, 1] the
    ``theta_k`` converge almost surely to a stationary point of the log-likelihood
    (Delyon et al. 1999).

    Args:
        model: a NumPyro model; ``numpyro.param`` sites are the parameters, every
            latent continuous sample site is drawn, every discrete one enumerated.
        schedule: ``(K1, K2)``: iterations with ``gamma = 1``, then decreasing.
        decay: exponent of the decreasing step sizes.
        num_mcmc_steps: transitions per chain and iteration.
        kernel: ``"nuts"`` (default), ``"hmc"`` or a ``numpyro.infer.NUTS``/``HMC``
            instance whose settings (target_accept_prob, max_tree_depth,
            dense_mass, ...) are used; its model is ignored.
        num_chains: chains, run side by side under ``vmap``. By default
            ``min(4, ceil(50 / G))`` for ``G`` independent groups of latents (the
            importance sampler's blocks: the subjects of a mixed model), as
            Monolix chooses its number of chains so that chains x subjects >= 50
            (saemix's default is one chain): every group is a chain of its
            own, and SAEM averages its draws over the iterations, so with 50
            groups or more one chain suffices (1 000 groups: 1 chain, 18
            subjects: 3, 15 herds: 4); at most 4, the chains MCEM runs.
        num_warmup: transitions (from the start of the fit) during which step size
            and diagonal mass matrix are adapted.
        optimizer: optax optimizer of the M-step while ``gamma = 1``; default
            ``optax.lbfgs()``.
        m_step_iters: optimizer steps per iteration while ``gamma = 1``.
        frozen: params kept at their initial values.
        num_is_draws: posterior draws per chain at the fitted params, for the
            importance-sampling proposal and ``result.draws``.
        num_is_samples: importance samples of the log-likelihood.
        m_step: ``"auto"`` (closed form where the registry applies),
            ``"gradient"`` (optimizer steps for every param), or a dict
            ``{param name: "gradient"}`` (optimizer steps for the params it names).
        reg_covar: added to variances and covariance diagonals of the closed-form
            updates, as in `EM`.
        global_sites: sample sites that are parameters with priors (MAP, as in
            `EM`); every other continuous sample site is a latent drawn by the
            chains. ``result.log_prior`` reports their log prior.
    """

    name = "SAEM"
    _convergence_rule = "its step-size schedule did not reach its end"
    _stationarity_fix = (
        "The usual cause: a first phase too short, the params still drifting when the "
        "step sizes began to decrease (which freezes them). Lengthen it: schedule=(K1, K2) "
        "with a larger K1 (result.param_history shows the drift), or run more chains "
        "(num_chains)."
    )

    def __init__(
        self,
        model: Callable,
        *,
        schedule: tuple[int, int] = (300, 100),
        decay: float = 1.0,
        num_mcmc_steps: int = 1,
        **options,
    ):
        k1, k2 = (int(k) for k in schedule)
        if k1 < 0 or k2 < 1:
            raise ValueError(f"schedule must be (K1 >= 0, K2 >= 1), got {schedule!r}")
        if not 0.5 < decay <= 1.0:
            raise ValueError(f"decay must be in (0.5, 1], got {decay!r}")
        if num_mcmc_steps < 1:
            raise ValueError("num_mcmc_steps must be at least 1")
        self.schedule = (k1, k2)
        self.decay = float(decay)
        self.num_mcmc_steps = int(num_mcmc_steps)
        self.num_slots = k2
        super().__init__(model, **options)

    def default_num_chains(self, num_groups: int) -> int:
        """``min(4, ceil(50 / num_groups))``: see ``num_chains``."""
        return min(DEFAULT_CHAINS, max(1, math.ceil(MIN_CHAIN_GROUPS / max(num_groups, 1))))

    def gamma(self, iteration):
        """The step size of iteration ``iteration`` (0-based)."""
        k1 = self.schedule[0]
        dtype = jnp.result_type(float)
        after = jnp.maximum(iteration - k1 + 1, 1).astype(dtype)
        return jnp.where(iteration < k1, jnp.ones((), dtype), after**-self.decay)

    def _draws_per_chain(self, iteration):
        return jnp.asarray(self.num_mcmc_steps, jnp.int32)

    def _most_draws_per_chain(self) -> int:
        return self.num_mcmc_steps

    def _latest(self, fresh, num):
        return jax.tree.map(lambda x: x[jnp.minimum(num, self.num_slots) - 1], fresh)

    def _accumulate(self, state, fresh, num):
        gamma = self.gamma(state.iteration)
        slot = state.iteration % self.num_slots
        latest = self._latest(fresh, num)
        draws = jax.tree.map(lambda b, v: b.at[slot].set(v), state.draws, latest)
        weights = (state.weights * (1.0 - gamma)).at[slot].set(gamma)
        # A slot overwritten (a schedule longer than the buffer) loses its weight.
        return draws, weights / jnp.sum(weights)

    def _maximize(self, structure, state, draws, weights, fresh, num, args, kwargs):
        latest = jax.tree.map(lambda x: x[None], self._latest(fresh, num))
        one = jnp.ones((1,), weights.dtype)
        gamma = self.gamma(state.iteration)
        free = self._free_names(state.params, latest, args, kwargs)
        if free and state.information.shape[0] == 0:
            # More than MAX_COORDINATES free coordinates (jaxem.stochastic_newton): the
            # exact Q over the stored draws, maximized by the optimizer (with gamma = 1
            # only this iteration's draws carry weight).
            found = jax.lax.cond(
                gamma >= 1.0,
                lambda: self._closed_then_gradient(
                    structure, state.params, latest, one, args, kwargs
                ),
                lambda: self._closed_then_gradient(
                    structure, state.params, draws, weights, args, kwargs
                ),
            )
            return found + (state.information,)

        # The closed-form params from the stochastic approximation of their statistics:
        # with gamma = 1 the weights are this iteration's draws' alone (a stochastic EM
        # step), the same as the statistics of `latest` (one program for both phases).
        start = self.closed_form.step(state.params, *self._flat(draws, weights), args, kwargs)
        if free:

            def explore():
                # gamma = 1: the optimizer on this iteration's draws.
                return self._optimized(structure, state.params, latest, one, args, kwargs, start)

            point = jax.lax.cond(gamma >= 1.0, explore, lambda: start)
            # The others: while gamma = 1 the information the first averaging iteration
            # starts from, at the optimizer's params; then a Robbins-Monro step on this
            # iteration's draws (jaxem.stochastic_newton): its cost does not grow with
            # the stored draws. One gradient and Hessian in the program for both.
            u, f, to_params = self._free_log_density(
                structure, point, free, latest, one, args, kwargs
            )
            grad, hessian = jax.grad(f)(u), jax.hessian(f)(u)
            stepped, information = stochastic_newton_update(
                u, grad, hessian, gamma, state.information
            )
            exploring = gamma >= 1.0
            params = jax.lax.cond(exploring, lambda: point, lambda: to_params(stepped))
            information = jnp.where(exploring, -hessian, information)
        else:
            params, information = start, state.information
        gain, gain_se, q = self._gain(structure, state.params, params, latest, one, args, kwargs)
        return params, q, gain, gain_se, information

    def _drift(self, history, free, constraints):
        return phase_drift(history, free, constraints, self.schedule[0])

    def _fit_steps(self, num_iters):
        # The second phase's step sizes (the first is 1), 0 for iterations not run.
        k1, k2 = self.schedule
        iteration = k1 + jnp.arange(k2)
        return jnp.where(iteration < num_iters, self.gamma(iteration), 0.0)

    def _stop(self, state, new_state, tol):
        done = new_state.iteration >= sum(self.schedule)
        return done, done, new_state.streak

    def run(self, rng_key, *args, max_iter: int | None = None, init_params=None, **kwargs):
        """Run the schedule (``K1 + K2`` iterations, or ``max_iter`` if smaller: then
        ``converged`` is False) in one compiled loop, then draw the latents at the
        fitted params and estimate the log-likelihood by importance sampling.
        ``converged`` also requires that the params had settled by the end of the
        first phase and that their score is zero but for Monte Carlo noise
        (`jaxem.monte_carlo_stationarity`; a `ConvergenceWarning` says which failed).

        Returns:
            A `jaxem.monte_carlo.MCResult`.
        """
        total = sum(self.schedule)
        max_iter = total if max_iter is None else int(max_iter)
        if max_iter < 1:
            raise ValueError("max_iter must be at least 1")
        return self._run(rng_key, args, kwargs, max_iter=max_iter, tol=0.0, init_params=init_params)


__all__ += ["MCResult", "MCState"]
