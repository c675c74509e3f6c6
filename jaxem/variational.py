"""Variational EM: the E-step maximizes the ELBO over a restricted family.

Generalized EM maximizes

$$
\\mathrm{ELBO}(q, \\theta) = E_q[\\log p(x, z \\mid \\theta)] + H(q)
= \\log p(x \\mid \\theta) - \\mathrm{KL}(q \\,\\|\\, p(z \\mid x, \\theta)).
$$

Exact EM sets q to the posterior. Here q is fully factorized over the latent
sites, one categorical per site (and per plate element):

* mean field (no guide): block coordinate ascent, each factor set to the
  softmax of the gradient of $E_q[\\log p]$ with respect to it. The
  expected log joint is a sum over the enumerated factor tensors of the model
  of ``<product of the q's of the factor's latents, log factor>``, so autodiff
  gives the update for any model, and latents that share no factor are updated
  together (a greedy colouring of the latent interaction graph);
* a user guide (e.g. amortized by a small network): its parameters take optax
  steps on the ELBO, whose expectation over the guide is computed exactly
  from the guide's enumerated probabilities (no score-function noise).

The M-step is exact EM's (closed form where detected, optax otherwise), fed
with the factor marginals of q instead of the posterior's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from numpyro.distributions.transforms import biject_to

from jaxem.accelerators import ACCELERATIONS
from jaxem.arguments import merge_args
from jaxem.built import built_model
from jaxem.checks import in_support
from jaxem.driver import Fitter
from jaxem.estep import contract_factors
from jaxem.exceptions import ModelError
from jaxem.factorized import (
    coordinate_ascent,
    elbo,
    elbo_of,
    factor_marginals,
    guide_elbo,
    guide_q,
    reject_chains,
    tractable,
    uniform_q,
)
from jaxem.fitter_m_step import MStep
from jaxem.global_sites import log_prior_of_trace, with_global_sites
from jaxem.gradient import default_optimizer, safeguarded_steps, strongly_typed
from jaxem.inspection import inspect_model, model_structure
from jaxem.kernel import StepInfo
from jaxem.loop import iterate, loop_key, stationary, upper_bound
from jaxem.stationarity import stationarity
from jaxem.tracing import enumerated_trace
from jaxem.weights import reject_case_weights

__all__ = ["VariationalEM", "VEMState", "VEMResult", "elbo"]


class VEMState(NamedTuple):
    """What the variational EM loop carries from one iteration to the next.

    Attributes:
        params: ``{param name: constrained value}`` of the model.
        opt_state: optax state of the model's gradient-path parameters.
        q: ``{latent site: probabilities}``, the variational marginals, each
            with the site's plate shape in front and its values on the last
            axis (the layout of [`jaxem.posterior`][jaxem.posterior]).
        guide_params: ``{guide param name: constrained value}`` (empty without
            a guide).
        guide_opt_state: optax state of the guide parameters.
        iteration: number of updates done.
        acceleration: the accelerator's state with ``acceleration=`` (as
            `jaxem.EMState.acceleration`), else ``()``.
    """

    params: dict
    opt_state: Any
    q: dict
    guide_params: dict
    guide_opt_state: Any
    iteration: jax.Array
    acceleration: Any = ()


class VEMResult(NamedTuple):
    """Result of `VariationalEM.run`.

    Attributes:
        params: ``{param name: constrained value}`` of the best restart.
        elbo: the ELBO at ``params`` after a final E-step.
        history: shape ``(max_iter,)``: the ELBO after the E-step of every
            iteration of the best restart (at the iteration's starting
            parameters), NaN after ``num_iters``.
        num_iters: number of updates done.
        converged: whether the relative change of the ELBO fell below ``tol``
            and ``params`` are a stationary point of the ELBO at ``q`` (as
            `jaxem.EMResult.converged`).
        diverged: whether the run stopped on an ELBO or parameter that was
            not finite or not credible (as `jaxem.EMResult.diverged`);
            ``params`` are then the last ones before it. Also True when the
            exact ``log_likelihood`` of a float32 fit, evaluated again in
            float64, shows a density broken down in float32 (as for EM;
            ``log_likelihood`` is then the float64 value, ``elbo`` is not).
        log_likelihood: the exact marginal log-likelihood at ``params`` (at
            least ``elbo``), or None where exact enumeration was judged
            intractable or was switched off.
        q: the variational marginals at ``params`` (see `VEMState`).
        guide_params: the guide's parameters (empty without a guide).
        restart_elbos: shape ``(num_restarts,)``: the final ELBO of every
            restart. The restart kept is the one with the highest ELBO among
            those that did not diverge.
        restart_converged: shape ``(num_restarts,)``: ``converged`` of every
            restart.
        restart_diverged: shape ``(num_restarts,)``: ``diverged`` of every
            restart.
        restart_num_iters: shape ``(num_restarts,)``: ``num_iters`` of every
            restart.
        gradient: ``{param name: gradient}``: the gradient of the ELBO at
            ``q`` with respect to the unconstrained value of every model param
            that is not frozen, at ``params`` (as `jaxem.EMResult.gradient`).
        log_prior: with ``global_sites``, the log prior of the global sites at
            ``params`` (None without). With priors the model's joint includes
            it: ``elbo`` (and ``history``) bound ``log_likelihood + log_prior``
            from below, and ``log_likelihood`` stays the data's.
        unbounded: ``{param name: bool}``: params along which the ELBO still
            rises without levelling off (as `jaxem.EMResult.unbounded`).
        gains: ``{param name: gain}``: the rise of the ELBO, at least, by a
            step along the param's own part of the gradient (as
            `jaxem.EMResult.gains`).
    """

    params: dict
    elbo: jax.Array
    history: jax.Array
    num_iters: jax.Array
    converged: jax.Array
    diverged: jax.Array
    log_likelihood: jax.Array | None
    q: dict
    guide_params: dict
    restart_elbos: jax.Array
    restart_converged: jax.Array
    restart_diverged: jax.Array
    restart_num_iters: jax.Array
    gradient: dict
    log_prior: jax.Array | None = None
    unbounded: dict | None = None
    gains: dict | None = None


# ---------------------------------------------------------------------------
# VariationalEM.
# ---------------------------------------------------------------------------


class VariationalEM(Fitter):
    """Variational EM: the ELBO over a factorized q and the parameters.

    Same interface as [`jaxem.EM`][jaxem.EM]; the objective is the ELBO, a lower
    bound of the log-likelihood that equals it when q is the posterior. With
    ``guide=None``, q is mean field (one categorical per latent site and plate
    element) updated by coordinate ascent; with a guide, q is the guide's
    distribution and its parameters take optax steps on the ELBO. Each
    iteration does an E-step (ELBO up in q), then exact EM's M-step with the
    marginals of q (ELBO up in the parameters), so the ELBO never decreases.

    Args:
        model: a NumPyro model with ``numpyro.param`` sites and discrete latents.
        guide: None for mean field, or a NumPyro guide with the model's
            arguments, sampling every latent site of the model from a
            distribution with the same support and plates, which may depend
            on the data and on the guide's own ``numpyro.param`` sites but
            not on the other latents (its expectations are computed exactly
            by enumerating each site).
        e_step_iters: coordinate-ascent sweeps (mean field; one when no two
            latents share a factor, where one sweep is the optimum) or
            optimizer steps on the guide parameters per iteration.
        guide_optimizer: optax optimizer for the guide; default ``optax.lbfgs()``.
        m_step, optimizer, m_step_iters, reg_covar, frozen: the M-step, as in
            [`jaxem.EM`][jaxem.EM].
        exact_log_likelihood: ``"auto"`` reports the exact log-likelihood at
            the final parameters in `VEMResult` when exact enumeration
            needs at most ``2**20`` cells per plate element; True always,
            False never.
        acceleration: ``None``, ``"squarem"`` or ``"anderson"``, as in
            [`jaxem.EM`][jaxem.EM], the map accelerated being one iteration (E-step
            and M-step) of variational EM and the safeguard comparing ELBOs;
            the extrapolated params start from the q of the point they come
            from.
        global_sites: names of sample sites that are parameters with priors,
            as in [`jaxem.EM`][jaxem.EM] (MAP estimates of them, the discrete
            latents variational).

    Examples:
        >>> import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist
        >>> from numpyro.distributions import constraints
        >>> from jaxem import VariationalEM
        >>> def mixture(x, K=2):
        ...     w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
        ...     mu = numpyro.param("mu", jnp.array([-1.0, 1.0]))
        ...     sigma = numpyro.param("sigma", jnp.ones(K), constraint=constraints.positive)
        ...     with numpyro.plate("data", x.shape[0]):
        ...         z = numpyro.sample("z", dist.Categorical(w))
        ...         numpyro.sample("x", dist.Normal(mu[z], sigma[z]), obs=x)
        >>> noise = jnp.tile(jnp.array([-0.5, 0.5]), 50)
        >>> x = jnp.concatenate([jnp.full(50, -3.0), jnp.full(50, 3.0)]) + noise
        >>> result = VariationalEM(mixture).run(jax.random.PRNGKey(0), x, max_iter=50)
        >>> [round(float(m), 3) for m in result.params["mu"]]
        [-3.0, 3.0]
        >>> bool(jnp.isclose(result.elbo, result.log_likelihood))  # mean field is exact here
        True
    """

    name = "VariationalEM"
    objective = "ELBO"
    score = "elbo"
    restart_scores = "restart_elbos"

    def __init__(
        self,
        model: Callable,
        guide: Callable | None = None,
        *,
        e_step_iters: int = 5,
        guide_optimizer: optax.GradientTransformation | None = None,
        m_step: str = "auto",
        optimizer: optax.GradientTransformation | None = None,
        m_step_iters: int = 10,
        reg_covar: float = 1e-6,
        frozen: Sequence[str] = (),
        exact_log_likelihood: bool | str = "auto",
        acceleration: str | None = None,
        global_sites: Sequence[str] = (),
    ):
        if acceleration is not None and acceleration not in ACCELERATIONS:
            raise ValueError(
                f"acceleration must be None, 'squarem' or 'anderson', got {acceleration!r}"
            )
        if e_step_iters < 1:
            raise ValueError(f"e_step_iters must be at least 1, got {e_step_iters}")
        if exact_log_likelihood not in ("auto", True, False):
            raise ValueError(
                f"exact_log_likelihood must be 'auto', True or False, got {exact_log_likelihood!r}"
            )
        self.global_sites = tuple(global_sites)
        # Traced once per input signature.
        self.model = built_model(with_global_sites(model, self.global_sites))
        self.guide = guide
        self.e_step_iters = int(e_step_iters)
        self.guide_optimizer = optax.with_extra_args_support(guide_optimizer or default_optimizer())
        self.exact_log_likelihood = exact_log_likelihood
        self.acceleration = acceleration
        self.m_step_settings = MStep(
            self.model,
            mode=m_step,
            optimizer=optimizer or default_optimizer(),
            num_steps=m_step_iters,
            reg_covar=reg_covar,
            frozen=frozen,
        )
        super().__init__()

    # -- building blocks -----------------------------------------------------

    def _guide_structure(self, rng_key, args, kwargs, model_params):
        try:
            structure, params = inspect_model(self.guide, rng_key, args, kwargs)
        except ModelError as err:
            raise ModelError(f"jaxem: in the guide: {err}") from err
        clash = sorted(set(params) & set(model_params))
        if clash:
            raise ModelError(
                f"jaxem: the guide's params {clash} have the names of model params. Give the "
                "guide's params their own names."
            )
        return structure, params

    def _e_step(self, state, args, kwargs, structure, guide_constraints):
        """ELBO-maximizing q at ``state.params``: ``(state, elbo, marginals, trace)``."""
        nesting = structure.max_plate_nesting
        trace = enumerated_trace(self.model, state.params, args, kwargs, nesting)
        reject_chains(trace, "VariationalEM")
        reject_case_weights(trace, "VariationalEM")
        log_factors = {n: jax.lax.stop_gradient(s.log_prob) for n, s in trace.sites.items()}
        if self.guide is None:
            q = coordinate_ascent(state.q, log_factors, trace, self.e_step_iters)
            state = state._replace(q=q)
        else:
            names = list(state.guide_params)
            transforms = {n: biject_to(guide_constraints[n]) for n in names}

            def constrained(unconstrained):
                return {n: transforms[n](u) for n, u in unconstrained.items()}

            def loss(unconstrained):
                guide_params = constrained(unconstrained)
                q, log_q = guide_q(self.guide, guide_params, args, kwargs, nesting, trace)
                return -guide_elbo(q, log_q, log_factors, trace)

            start = {n: transforms[n].inv(state.guide_params[n]) for n in names}
            chosen, guide_opt_state = safeguarded_steps(
                loss, start, self.guide_optimizer, state.guide_opt_state, self.e_step_iters
            )
            guide_params = constrained(chosen)
            q, _ = guide_q(self.guide, guide_params, args, kwargs, nesting, trace)
            state = state._replace(q=q, guide_params=guide_params, guide_opt_state=guide_opt_state)
        return (
            state,
            elbo_of(state.q, log_factors, trace),
            factor_marginals(state.q, log_factors, trace),
            trace,
        )

    def _guide_constraints(self, args, kwargs):
        if self.guide is None:
            return {}
        structure, _ = inspect_model(self.guide, jax.random.PRNGKey(0), args, kwargs)
        return structure.constraints

    def _init_state(self, rng_key, arrays, spec, init_params):
        structure, params, _, opt_state = self.m_step_settings.start(
            rng_key, arrays, spec, init_params
        )
        args, kwargs = merge_args(arrays, spec)
        nesting = structure.max_plate_nesting
        trace = enumerated_trace(self.model, params, args, kwargs, nesting)
        reject_chains(trace, "VariationalEM")
        reject_case_weights(trace, "VariationalEM")
        if self.guide is None:
            return VEMState(params, opt_state, uniform_q(trace), {}, (), jnp.zeros((), jnp.int32))
        guide_structure, guide_params = self._guide_structure(
            jax.random.fold_in(rng_key, 1), args, kwargs, params
        )
        q, _ = guide_q(self.guide, guide_params, args, kwargs, nesting, trace)
        guide_opt_state = strongly_typed(
            self.guide_optimizer.init(
                {
                    n: biject_to(guide_structure.constraints[n]).inv(v)
                    for n, v in guide_params.items()
                }
            )
        )
        return VEMState(
            params, opt_state, q, guide_params, guide_opt_state, jnp.zeros((), jnp.int32)
        )

    def _step(self, rng_key, state, arrays, spec):
        """One iteration: the E-step in q, then the M-step (``rng_key`` not used:
        the ELBO's expectations are exact)."""
        args, kwargs = merge_args(arrays, spec)
        structure = model_structure(self.model, args, kwargs)
        state, value, marginals, trace = self._e_step(
            state, args, kwargs, structure, self._guide_constraints(args, kwargs)
        )
        plan = self.m_step_settings.plan(state.params, arrays, spec, structure)
        params, opt_state = self.m_step_settings.update(
            state.params, state.opt_state, marginals, plan, args, kwargs, structure, trace
        )
        new_state = state._replace(
            params=params, opt_state=opt_state, iteration=state.iteration + 1
        )
        return new_state, StepInfo(value, jnp.array(True))

    def _final(self, state, arrays, spec):
        """ELBO after a last E-step at the final params, and ``(state, exact
        log-likelihood, factor marginals of q)``."""
        args, kwargs = merge_args(arrays, spec)
        structure = model_structure(self.model, args, kwargs)
        state, value, marginals, trace = self._e_step(
            state, args, kwargs, structure, self._guide_constraints(args, kwargs)
        )
        exact = self.exact_log_likelihood
        if exact == "auto":
            exact = tractable(trace, 2**20)
        log_lik = None
        if exact:
            log_lik = contract_factors({n: s.log_prob for n, s in trace.sites.items()}, trace)
        return value, (state, log_lik, marginals)

    def _fit_one(self, rng_key, arrays, init_params, tol, spec, max_iter, progress_bar):
        args, kwargs = merge_args(arrays, spec)
        structure = model_structure(self.model, args, kwargs)
        nesting = structure.max_plate_nesting
        start = self.kernel.init(rng_key, arrays, spec, init_params)
        loop = iterate(
            lambda key, state: self.kernel.step(key, state, arrays, spec),
            loop_key(rng_key),
            start,
            lambda state: (state.params, state.q, state.guide_params),
            final_fn=lambda state: self._final(state, arrays, spec),
            max_iter=max_iter,
            tol=tol,
            progress_bar=progress_bar,
            upper_bound=upper_bound(
                enumerated_trace(self.model, start.params, args, kwargs, nesting, log_probs=False)
            ),
        )
        dtype = loop.history.dtype
        last, log_lik, marginals = loop.aux
        if log_lik is not None:
            log_lik = log_lik.astype(dtype)
        log_prior = None
        if self.global_sites:
            trace = enumerated_trace(self.model, last.params, args, kwargs, nesting)
            log_prior = log_prior_of_trace(trace, self.global_sites).astype(dtype)
            if log_lik is not None:
                log_lik = log_lik - log_prior
        free = [n for n in structure.param_names if n not in self.frozen]
        gradient, gain, unbounded, gains = stationarity(
            self.model, last.params, marginals, free, structure.constraints, args, kwargs, nesting
        )
        supported = in_support(self.model, last.params, args, kwargs, nesting)
        converged = loop.converged & stationary(gain, loop.value, tol) & supported
        diverged = loop.diverged | ~supported
        result = VEMResult(
            last.params,
            loop.value,
            loop.history,
            loop.num_iters,
            converged,
            diverged,
            log_lik,
            last.q,
            last.guide_params,
            loop.value,
            converged,
            diverged,
            loop.num_iters,
            gradient,
            log_prior,
            unbounded,
            gains,
        )
        return result, start.params

    def _iterates_within_a_step(self, rng_key, arrays, spec, init_params) -> bool:
        # A guide's E-step is optax steps on the guide's params, besides any
        # gradient-path param of the M-step.
        return self.guide is not None or super()._iterates_within_a_step(
            rng_key, arrays, spec, init_params
        )

    def _gradient_at(self, state, arrays, spec):
        """The gradient of the ELBO in the model params at ``state`` (q held)."""
        args, kwargs = merge_args(arrays, spec)
        structure = model_structure(self.model, args, kwargs)
        nesting = structure.max_plate_nesting
        trace = enumerated_trace(self.model, state.params, args, kwargs, nesting)
        log_factors = {n: jax.lax.stop_gradient(s.log_prob) for n, s in trace.sites.items()}
        free = [n for n in structure.param_names if n not in self.frozen]
        gradient, _, _, _ = stationarity(
            self.model,
            state.params,
            factor_marginals(state.q, log_factors, trace),
            free,
            structure.constraints,
            args,
            kwargs,
            nesting,
        )
        return gradient
