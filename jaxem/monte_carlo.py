"""What [`jaxem.SAEM`][jaxem.SAEM] and [`jaxem.MCEM`][jaxem.MCEM] share: a kernel whose E-step draws
the continuous latents with NumPyro's HMC/NUTS (`jaxem.mcmc_estep`), an M-step
maximizing a weighted Monte Carlo estimate of ``Q`` over stored draws, the compiled
loop, the importance-sampling log-likelihood at the end (`jaxem.importance`),
and the warnings about divergent transitions and degenerate weights.

A subclass says how an iteration's draws enter ``Q`` (``_draws_per_chain``,
``_accumulate``) and when to stop (``_stop``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from numpyro.distributions.transforms import biject_to

from jaxem.arguments import merge_args, merge_init_params, split_args
from jaxem.compiling import OptionJits, jit_once, monte_carlo_options
from jaxem.exceptions import ModelError
from jaxem.global_sites import global_site_names, with_global_sites
from jaxem.identification import warn_if_unidentified
from jaxem.importance import importance_log_likelihood
from jaxem.kernel import Kernel
from jaxem.loop import all_finite, loop_key, tree_where
from jaxem.mcmc_estep import LatentModel, Sampler, sampler_settings
from jaxem.monte_carlo_objective import MonteCarloObjective
from jaxem.monte_carlo_start import MonteCarloStart, padded_members
from jaxem.monte_carlo_stationarity import fit_stationarity
from jaxem.monte_carlo_stats import ClosedFormMStep
from jaxem.monte_carlo_types import MCInfo, MCResult, MCState
from jaxem.monte_carlo_warnings import warn_about_monte_carlo_fit
from jaxem.stochastic_newton import MAX_COORDINATES
from jaxem.uncertainty import standard_errors

__all__ = ["MCInfo", "MCResult", "MCState", "MonteCarloEM"]


# Chains of MCEM by default, and the most SAEM chooses (a model whose latents form
# one block).
DEFAULT_CHAINS = 4


class MonteCarloEM(MonteCarloObjective, MonteCarloStart):
    """The shared part of [`jaxem.SAEM`][jaxem.SAEM] and [`jaxem.MCEM`][jaxem.MCEM] (see there)."""

    name = "MonteCarloEM"

    def __init__(
        self,
        model: Callable,
        *,
        kernel="nuts",
        num_chains: int | None = None,
        num_warmup: int = 100,
        optimizer: optax.GradientTransformation | None = None,
        m_step_iters: int = 10,
        frozen: Sequence[str] = (),
        num_is_draws: int = 250,
        num_is_samples: int = 2000,
        m_step: str = "auto",
        reg_covar: float = 1e-6,
        global_sites: Sequence[str] = (),
    ):
        if (num_chains is not None and num_chains < 1) or m_step_iters < 1:
            raise ValueError("num_chains and m_step_iters must be at least 1")
        if num_is_draws < 2 or num_is_samples < 2:
            raise ValueError("num_is_draws and num_is_samples must be at least 2")
        model = with_global_sites(model, global_sites)
        self.global_sites = global_site_names(model)
        self.model = model
        self.latent = LatentModel(model)
        algo, settings = sampler_settings(kernel)
        self.sampler = Sampler(self.latent, algo, num_warmup, settings)
        # None: chosen from the number of independent groups of latents (chains_for).
        self.num_chains = None if num_chains is None else int(num_chains)
        self.lbfgs = optimizer is None
        self.optimizer = optax.with_extra_args_support(optimizer or optax.lbfgs())
        self.m_step_iters = int(m_step_iters)
        self.frozen = tuple(frozen)
        self.closed_form = ClosedFormMStep(model, m_step, reg_covar, self.frozen)
        self.num_is_draws = int(num_is_draws)
        self.num_is_samples = int(num_is_samples)
        self.kernel = Kernel(
            init=self._init_state,
            step=self._step,
            get_params=self.get_params,
            set_params=lambda state, params: state._replace(params=dict(params)),
            constraints=lambda arrays, spec: self._structure(arrays, spec).constraints,
        )
        self._update_jit = jax.jit(self._update, static_argnums=(2,))
        self._init_jit = jax.jit(self._init_state, static_argnums=(2, 4))
        # One jit of the fit per set of XLA options (see _fit_program).
        self._fit_jits = OptionJits(self._fit, ("spec", "max_iter", "num_blocks", "num_chains"))
        # Run once per model and signature: compiled without backend optimizations.
        self._start_jit = jit_once(self._start_values, static_argnames=("spec", "with_pattern"))
        self._pattern_jit = jit_once(self._dense_pattern, static_argnames=("spec",))

    # -- subclass hooks ---------------------------------------------------------

    num_slots: int = 1

    def _draws_per_chain(self, iteration):
        """Transitions per chain in iteration ``iteration`` (may be traced)."""
        raise NotImplementedError

    def _accumulate(self, state, fresh, num):
        """``(draws, weights)`` of ``Q`` after this iteration's ``fresh`` draws
        (``(slots, chains, ...)``, the first ``num`` slots filled)."""
        raise NotImplementedError

    def _maximize(self, structure, state, draws, weights, fresh, num, args, kwargs):
        """The M-step on ``Q`` of ``(draws, weights)`` (a subclass may take a shortcut):
        ``(params, Q at the state's params, gain, gain_se, information)``."""
        del fresh, num
        found = self._closed_then_gradient(structure, state.params, draws, weights, args, kwargs)
        return found + (state.information,)

    def _stop(self, state, new_state, tol):
        """``(stop, converged, streak)`` after an update."""
        raise NotImplementedError

    def _most_draws_per_chain(self) -> int:
        """The most transitions per chain in one iteration."""
        raise NotImplementedError

    def _expected_transitions(self, max_iter: int) -> int:
        """Transitions per chain its XLA options count: ``max_iter`` at the most each."""
        return max_iter * self._most_draws_per_chain()

    def _drift(self, history, free, constraints):
        """A test that the params still drifted when the loop ended (`SAEM`'s first
        phase; see `jaxem.monte_carlo_stationarity.phase_drift`), or None."""
        return None

    def _fit_steps(self, num_iters):
        """`SAEM`'s decreasing step sizes, or None (`MCEM`): see ``fit_steps`` of
        `jaxem.monte_carlo_stationarity.stationarity_check`."""
        return None

    def default_num_chains(self, num_groups: int) -> int:
        """Chains when ``num_chains`` is not given, for ``num_groups`` independent
        groups of latents: 4 (`MCEM`; `SAEM` chooses from ``num_groups``)."""
        return DEFAULT_CHAINS

    def chains_for(self, num_groups: int) -> int:
        """The chains a fit runs: ``num_chains`` if given, else `default_num_chains`."""
        if self.num_chains is not None:
            return self.num_chains
        return self.default_num_chains(int(num_groups))

    # -- the model ---------------------------------------------------------------

    def _structure(self, arrays, spec):
        args, kwargs = merge_args(arrays, spec)
        structure = self.latent.inspect(jax.random.PRNGKey(0), args, kwargs)
        unknown = set(self.frozen) - set(structure.params)
        if unknown:
            raise ModelError(f"jaxem: frozen names {sorted(unknown)} are not params of the model.")
        return structure

    def _init_state(self, rng_key, arrays, spec, init_params, num_chains=DEFAULT_CHAINS):
        structure = self._structure(arrays, spec)
        args, kwargs = merge_args(arrays, spec)
        params = merge_init_params(dict(structure.params), init_params)
        params = {n: jnp.asarray(v, jnp.result_type(float)) for n, v in params.items()}
        init_key, chain_key = jax.random.split(rng_key)
        keys = jax.random.split(init_key, num_chains)
        z0 = jax.vmap(lambda k: self.latent.prior_draw(structure, params, k, args, kwargs))(keys)
        chains = self.sampler.init(
            chain_key, structure, lambda arrays: merge_args(arrays, spec), params, arrays, z0
        )
        constrained = jax.vmap(lambda z: self.latent.constrain(structure, z)[0])(chains.z)
        draws = jax.tree.map(lambda x: jnp.zeros((self.num_slots,) + x.shape, x.dtype), constrained)
        zero = jnp.zeros((), jnp.int32)
        weights = jnp.zeros((self.num_slots,), jnp.result_type(float))
        nothing = jnp.zeros((), jnp.result_type(float))
        example = jax.tree.map(lambda x: x[None], constrained)
        free = self._free_names(params, example, args, kwargs)
        size = sum(int(np.size(biject_to(structure.constraints[n]).inv(params[n]))) for n in free)
        # Beyond MAX_COORDINATES SAEM keeps the exact Q (see SAEM._maximize): no matrix.
        size = size if size <= MAX_COORDINATES else 0
        information = jnp.zeros((size, size), jnp.result_type(float))
        return MCState(params, chains, draws, weights, zero, zero, nothing, nothing, information)

    @property
    def num_fresh(self) -> int:
        """Transitions per chain the temporary draw buffer holds."""
        return max(self.num_slots, self.num_is_draws)

    def _step(self, rng_key, state, arrays, spec):
        new_state, info, _ = self._step_or_draw(rng_key, state, arrays, spec, jnp.array(False))
        return new_state, info

    def _step_or_draw(self, rng_key, state, arrays, spec, final):
        """One iteration, or (``final``) ``num_is_draws`` transitions at the state's params
        and no M-step: one sampler and one M-step in the program for both.
        Returns ``(state, info, unconstrained draws (num_fresh, chains, ...))``."""
        structure = self._structure(arrays, spec)
        args, kwargs = merge_args(arrays, spec)
        num = jnp.where(final, self.num_is_draws, self._draws_per_chain(state.iteration))
        fresh = jax.tree.map(
            lambda x: jnp.zeros((self.num_fresh,) + x.shape, x.dtype), state.chains.z
        )

        def collect(buffer, i, z):
            slot = jnp.minimum(i, self.num_fresh - 1)
            return jax.tree.map(lambda b, v: b.at[slot].set(v), buffer, z)

        chains, fresh, info = self.sampler.transitions(
            rng_key,
            state.chains,
            structure,
            lambda arrays: merge_args(arrays, spec),
            state.params,
            arrays,
            num,
            fresh,
            collect,
        )

        def update():
            constrained = jax.vmap(jax.vmap(lambda x: self.latent.constrain(structure, x)[0]))(
                jax.tree.map(lambda x: x[: self.num_slots], fresh)
            )
            draws, weights = self._accumulate(state, constrained, num)
            found = self._maximize(structure, state, draws, weights, constrained, num, args, kwargs)
            return (draws, weights) + found

        def keep():
            nan = jnp.array(jnp.nan, jnp.result_type(float))
            return (
                state.draws,
                state.weights,
                state.params,
                nan,
                state.gain,
                state.gain_se,
                state.information,
            )

        draws, weights, params, objective, gain, gain_se, information = jax.lax.cond(
            final, keep, update
        )
        new_state = state._replace(
            information=information,
            gain=gain,
            gain_se=gain_se,
            params=params,
            chains=chains,
            draws=draws,
            weights=weights,
            iteration=state.iteration + (~final).astype(state.iteration.dtype),
        )
        info = MCInfo(
            objective, ~final, info.accept_prob, info.num_divergences, info.step_size, num
        )
        return new_state, info, fresh

    # -- the compiled fit ----------------------------------------------------------

    def _fit(
        self,
        rng_key,
        arrays,
        init_params,
        tol,
        coordinate,
        entry,
        members,
        *,
        spec,
        max_iter,
        num_blocks,
        num_chains,
    ):
        structure = self._structure(arrays, spec)
        args, kwargs = merge_args(arrays, spec)
        state = self._init_state(rng_key, arrays, spec, init_params, num_chains)
        key = loop_key(rng_key)
        dtype = jnp.result_type(float)
        nan = jnp.full((max_iter,), jnp.nan, dtype)
        carry = dict(
            state=state,
            history=nan,
            params=jax.tree.map(
                lambda x: jnp.full((max_iter,) + x.shape, jnp.nan, dtype), state.params
            ),
            accept=nan,
            step_size=nan,
            divergences=jnp.zeros((), jnp.int32),
            i=jnp.zeros((), jnp.int32),
            stop=jnp.array(False),
            converged=jnp.array(False),
            diverged=jnp.array(False),
            finished=jnp.array(False),
            final=jax.tree.map(
                lambda x: jnp.zeros((self.num_fresh,) + x.shape, x.dtype), state.chains.z
            ),
        )

        def body(c):
            # The iteration after the last update draws the latents at the fitted params.
            final = (c["i"] >= max_iter) | c["stop"] | c["diverged"]
            new, info, fresh = self._step_or_draw(
                jax.random.fold_in(key, c["i"] + final), c["state"], arrays, spec, final
            )
            ok = final | (jnp.isfinite(info.objective) & all_finite(new.params))
            stop, converged, streak = self._stop(c["state"], new, tol)
            new = new._replace(streak=streak)
            i = c["i"]
            record = jnp.where(final, max_iter, i)  # out of range: dropped
            return dict(
                state=tree_where(ok, new, c["state"]),
                history=c["history"].at[record].set(info.objective, mode="drop"),
                params=jax.tree.map(
                    lambda h, p: h.at[record].set(p, mode="drop"), c["params"], new.params
                ),
                accept=c["accept"].at[record].set(info.accept_prob, mode="drop"),
                step_size=c["step_size"].at[record].set(info.step_size, mode="drop"),
                divergences=(c["divergences"] + info.num_divergences).astype(jnp.int32),
                i=i + (ok & ~final).astype(jnp.int32),
                stop=jnp.where(final, c["stop"], stop),
                converged=jnp.where(final, c["converged"], converged & ok),
                diverged=jnp.where(final, c["diverged"], ~ok),
                finished=final,
                final=tree_where(final, fresh, c["final"]),
            )

        c = jax.lax.while_loop(lambda c: ~c["finished"], body, carry)
        state = c["state"]
        params = state.params
        draws = jax.tree.map(
            lambda x: x[: self.num_is_draws].reshape((-1,) + x.shape[2:]), c["final"]
        )

        def target(z):
            return self.latent.log_target(structure, params, z, args, kwargs)

        elementwise = None
        if entry is not None:
            _, unravel = ravel_pytree(jax.tree.map(lambda x: x[0], draws))

            def elementwise(zf):
                return self.latent.elementwise(structure, params, unravel(zf), args, kwargs)

        estimate = importance_log_likelihood(
            jax.random.fold_in(key, max_iter + 2),
            draws,
            target,
            elementwise,
            coordinate,
            entry,
            num_blocks,
            self.num_is_samples,
            members,
        )
        k = sum(
            int(np.size(biject_to(structure.constraints[n]).inv(v)))
            for n, v in params.items()
            if n not in self.frozen
        )
        n_obs = max(structure.num_observations, 1)
        # With global sites the target holds their log prior, a constant in the latents.
        log_prior = None
        if self.global_sites:
            log_prior = self.latent.log_prior(self.global_sites, params, args, kwargs)
        ll = estimate.log_likelihood - (0.0 if log_prior is None else log_prior)
        constrained = jax.vmap(lambda z: self.latent.constrain(structure, z)[0])(draws)
        free = [n for n in params if n not in self.frozen]
        drift = self._drift(c["params"], free, structure.constraints)
        drifting = False if drift is None else drift.drifting
        draws_at_fit = jax.tree.map(lambda x: x[: self.num_is_draws], c["final"])
        stationarity = fit_stationarity(
            self.latent, structure, params, free, draws_at_fit, state.weights, entry, num_blocks,
            args, kwargs, self._fit_steps(c["i"]),
        )  # fmt: skip
        return MCResult(
            params=params,
            log_likelihood=ll,
            log_likelihood_se=estimate.standard_error,
            aic=-2.0 * ll + 2.0 * k,
            bic=-2.0 * ll + k * math.log(n_obs),
            history=c["history"],
            param_history=c["params"],
            num_iters=c["i"],
            converged=c["converged"] & ~c["diverged"] & stationarity.stationary & ~drifting,
            diverged=c["diverged"],
            accept_prob=c["accept"],
            num_divergences=c["divergences"],
            step_size=c["step_size"],
            draws=constrained,
            min_ess=estimate.min_ess,
            log_prior=log_prior,
            stationarity=stationarity,
            drift=drift,
            unidentified=self.closed_form.unidentified(
                params, *self._flat(state.draws, state.weights), args, kwargs
            ),
        )

    # -- public API --------------------------------------------------------------

    def init(self, rng_key, *args, init_params=None, **kwargs) -> MCState:
        """Initial state: params from their ``numpyro.param`` values (``init_params``
        overriding some), chains started at draws from the model."""
        arrays, spec = split_args(args, kwargs)
        init_params = None if init_params is None else dict(init_params)
        blocks = self._checked_blocks(
            rng_key, arrays, spec, init_params, with_pattern=self.num_chains is None
        )
        num_chains = self.num_chains if blocks is None else self.chains_for(blocks.num_blocks)
        return self._init_jit(rng_key, arrays, spec, init_params, num_chains)

    def _checked_blocks(self, rng_key, arrays, spec, init_params, *, with_pattern=True):
        """Check a fit's start; the independent blocks of its latents (or None)."""
        _, params, owner, num_coords = self._check_start(
            rng_key, arrays, spec, init_params, with_pattern=with_pattern
        )
        if not with_pattern:
            return None
        return self._blocks(
            owner, num_coords, lambda: self._pattern_jit(rng_key, arrays, params, spec=spec)
        )

    def _update(self, state, arrays, spec):
        rng_key = jax.random.fold_in(jax.random.PRNGKey(0), state.iteration)
        new_state, info = self.kernel.step(rng_key, state, arrays, spec)
        return new_state, info.objective

    def update(self, state, *args, **kwargs):
        """One iteration, its draws from ``fold_in(PRNGKey(0), state.iteration)``:
        ``(new_state, Q estimate at state's params)``."""
        arrays, spec = split_args(args, kwargs)
        return self._update_jit(state, arrays, spec)

    def standard_errors(self, result, *args, **kwargs):
        """Standard errors of a fit by Louis' identity over its posterior draws
        ([`jaxem.standard_errors`][jaxem.standard_errors]), the fitter's frozen
        params left out and, with ``global_sites``, the log prior included (MAP).

        Args:
            result: the fit (`MCResult`).
            *args, **kwargs: the model's arguments, as given to ``run``.

        Returns:
            `jaxem.uncertainty.StandardErrors`, with ``monte_carlo_error``.
        """
        return standard_errors(self.model, result, *args, frozen=self.frozen, **kwargs)

    def get_params(self, state) -> dict:
        """Constrained parameter values of a state."""
        return dict(state.params)

    def _run(self, rng_key, args, kwargs, *, max_iter, tol, init_params):
        arrays, spec = split_args(args, kwargs)
        init_params = None if init_params is None else dict(init_params)
        blocks = self._checked_blocks(rng_key, arrays, spec, init_params)
        num_chains = self.chains_for(blocks.num_blocks)
        program = self._fit_program(arrays, num_chains, int(max_iter))
        result = program(
            rng_key,
            arrays,
            init_params,
            np.asarray(tol, jnp.result_type(float)),
            jnp.asarray(blocks.coordinate),
            None if blocks.entry is None else jnp.asarray(blocks.entry),
            padded_members(blocks),
            spec=spec,
            max_iter=int(max_iter),
            num_blocks=blocks.num_blocks,
            num_chains=num_chains,
        )
        if not bool(result.diverged) and result.unidentified:
            first = jax.tree.map(lambda x: x[0], result.draws)
            plan = self.closed_form.plan(result.params, first, *merge_args(arrays, spec))
            warn_if_unidentified(result.unidentified, plan, self.name)
        warn_about_monte_carlo_fit(
            result,
            name=self.name,
            max_iter=max_iter,
            convergence_rule=self._convergence_rule,
            stationarity_fix=self._stationarity_fix,
            num_is_samples=self.num_is_samples,
        )
        return result

    _convergence_rule = _stationarity_fix = ""

    def _fit_program(self, arrays, num_chains, max_iter):
        """The compiled fit, with the XLA options of its work (`_expected_transitions`
        and the final draws; `jaxem.compiling.monte_carlo_options`)."""
        transitions = self._expected_transitions(max_iter) + self.num_is_draws
        return self._fit_jits.with_options(monte_carlo_options(arrays, num_chains, transitions))
