"""The ``EM`` class: init / update / get_params / run, mirroring NumPyro's ``SVI``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxem.accelerators import ACCELERATIONS
from jaxem.arguments import merge_args
from jaxem.built import built_model
from jaxem.checks import in_support
from jaxem.closed_form_step import affine_equations
from jaxem.driver import Fitter
from jaxem.estep import e_step
from jaxem.fitter_m_step import MStep
from jaxem.global_sites import log_prior_of_trace, with_global_sites
from jaxem.gradient import default_optimizer
from jaxem.identification import unidentified_params
from jaxem.inspection import model_structure
from jaxem.kernel import StepInfo
from jaxem.loop import (
    finish_iterate,
    iterate_until_done,
    loop_key,
    static_facts,
    stationary,
    upper_bound,
)
from jaxem.m_step_options import check_m_step
from jaxem.stationarity import stationarity
from jaxem.tracing import enumerated_trace
from jaxem.uncertainty import standard_errors

__all__ = ["EM", "EMState", "EMResult"]


class EMState(NamedTuple):
    """What the EM loop carries from one iteration to the next (a pytree).

    Attributes:
        params: ``{param name: constrained value}``.
        opt_state: optax state of the gradient-path parameters (in
            unconstrained space), carried across iterations.
        iteration: number of updates done.
        acceleration: a [`jaxem.acceleration.SquaremState`][jaxem.acceleration.SquaremState] with
            ``acceleration="squarem"``, a
            [`jaxem.acceleration.AndersonState`][jaxem.acceleration.AndersonState] with
            ``acceleration="anderson"``, else ``()``.
    """

    params: dict
    opt_state: Any
    iteration: jax.Array
    acceleration: Any = ()


class EMResult(NamedTuple):
    """Result of `EM.run`.

    Attributes:
        params: ``{param name: constrained value}`` of the best restart.
        log_likelihood: marginal log-likelihood at ``params`` (for hard EM,
            the complete-data log-likelihood at the MAP assignment).
        history: shape ``(max_iter,)``: the log-likelihood at the start of every
            iteration of the best restart (with ``acceleration="squarem"``: at
            the start of every cycle; with ``acceleration="anderson"``: at the
            current point each iteration starts from, the first one
            evaluating the initial point itself), NaN after ``num_iters``.
        num_iters: number of iterations (``update`` calls) of the best restart;
            with ``acceleration="squarem"``, cycles of three EM steps each.
        converged: whether the relative change of the log-likelihood fell
            below ``tol`` and ``params`` are a stationary point: a step along
            the gradient could not raise the log-likelihood by more than 100
            times what ``tol`` allows per iteration (see `gradient`).
        diverged: whether the run stopped on a log-likelihood or parameter that
            was not finite, or not credible: above 0 for a model whose
            observed sites are all discrete, or a jump a thousand times larger
            than every earlier gain (a density evaluated where it breaks
            down). ``params`` are then the last ones before it. Also True when,
            after a float32 fit, the log-likelihood at ``params`` evaluated again
            in float64 differs from the float32 one by more than rounding
            explains (`jaxem.precision`): a density broke down in float32,
            ``params`` are the fitted ones, ``log_likelihood`` the float64 value,
            and a `NumericalWarning` names the site.
        restart_log_likelihoods: shape ``(num_restarts,)``: the final
            log-likelihood of every restart, in the order of the keys that
            ``jax.random.split(rng_key, num_restarts)`` gives (``rng_key``
            itself for one restart). The restart kept is the one with the
            highest log-likelihood among those that did not diverge.
        restart_converged: shape ``(num_restarts,)``: ``converged`` of every
            restart.
        restart_diverged: shape ``(num_restarts,)``: ``diverged`` of every
            restart.
        restart_num_iters: shape ``(num_restarts,)``: ``num_iters`` of every
            restart.
        gradient: ``{param name: gradient}``: the gradient of the
            log-likelihood (for hard EM, of the complete-data log-likelihood
            at the MAP assignment) with respect to the unconstrained value of
            every param that is not frozen, at ``params``; zero for a param
            with an entry on its constraint's boundary.
        log_prior: with ``global_sites``, the log prior density of the global
            sites at ``params`` (None without). With priors, ``history``,
            ``converged`` and the choice of the restart refer to the log
            posterior, ``gradient`` is its gradient, and ``log_likelihood`` and
            ``restart_log_likelihoods`` stay the data's log-likelihood.
        log_posterior: ``log_likelihood + log_prior``, the objective MAP-EM
            maximizes (up to the constant log p(data)); None without
            ``global_sites``.
        unbounded: ``{param name: bool}``: True for a param along which the
            log-likelihood (log posterior) still rises at ``params`` without
            levelling off (`jaxem.stationarity.stationarity`): the likelihood has no
            maximum there, e.g. a component collapsing onto tied points (its scale,
            and a free ``df``, running to 0). ``converged`` is then False.
        gains: ``{param name: gain}``: how much the log-likelihood (log
            posterior) rises, at least, by a step along the param's own part of
            the gradient at ``params`` (Q evaluated at that part's Newton step,
            `jaxem.stationarity.stationarity`; 0 where it did not rise beyond
            rounding). The params of a fit that stopped short of a maximum are
            those with large gains.
        unidentified: ``{param name: bool array of its shape}`` for the params
            solved by weighted least squares (a Normal location affine in them):
            True for an entry that the weighted design at ``params`` does not
            identify (`jaxem.identification`; ``run`` warns).
    """

    params: dict
    log_likelihood: jax.Array
    history: jax.Array
    num_iters: jax.Array
    converged: jax.Array
    diverged: jax.Array
    restart_log_likelihoods: jax.Array
    restart_converged: jax.Array
    restart_diverged: jax.Array
    restart_num_iters: jax.Array
    gradient: dict
    log_prior: jax.Array | None = None
    log_posterior: jax.Array | None = None
    unbounded: dict | None = None
    gains: dict | None = None
    unidentified: dict | None = None


class EM(Fitter):
    """Expectation-maximization for NumPyro models with discrete latent sites.

    The E-step enumerates the discrete latents exactly (NumPyro's enumeration,
    configured automatically) and obtains every posterior marginal as a
    gradient of the log marginal likelihood. The M-step updates each parameter
    in closed form where its distribution and the way it reaches the
    distribution allow it (see [`jaxem.register_closed_form`][jaxem.register_closed_form]), and by
    optax steps on the expected complete-data log-likelihood otherwise.

    Args:
        model: a NumPyro model with ``numpyro.param`` sites.
        m_step: ``"auto"`` (closed form where detected, gradient steps
            otherwise), ``"gradient"`` (gradient steps for every parameter), or
            a dict ``{param name: "gradient"}``: gradient steps for the params
            it names, ``"auto"`` for the others.
        optimizer: optax optimizer for the gradient path; default
            ``optax.lbfgs()``.
        m_step_iters: optimizer steps per EM iteration.
        hard: hard (classification) EM: the E-step takes the MAP assignment
            (max-product) instead of the posterior.
        reg_covar: added to variances and covariance diagonals, as in
            scikit-learn.
        frozen: names of parameters to keep at their initial values.
        chain_contraction: for Markov chains written with ``scan``:
            ``"sequential"`` (a forward pass in a ``lax.scan``, T steps) or
            ``"parallel"`` (a balanced reduction of the step matrices,
            log2 T steps of K^3 work each; faster on GPUs for long chains).
        acceleration: ``None`` (plain EM), ``"squarem"`` or ``"anderson"``
            (see `jaxem.acceleration`). ``"squarem"``: each iteration is
            one SQUAREM cycle (Varadhan and Roland 2008, step length S3) of
            three EM steps, extrapolated in ``log p`` for simplex parameters
            and in unconstrained space for the others, the plain EM point kept
            whenever the extrapolation would lower the log-likelihood.
            ``"anderson"``: each iteration is one EM step, at the Anderson
            extrapolation (Walker and Ni 2011) of up to six accepted points
            in unconstrained space, its coefficients ridge-damped to a bound
            (in the spirit of DAAREM, Henderson and Varadhan 2019); a point
            whose log-likelihood is below the current one is rejected and
            the next iteration takes the plain EM step instead. Both work
            with every M-step path, hard EM, restarts and sharded data; both
            are kernel wrappers (`jaxem.accelerators`).
        global_sites: names of sample sites that are parameters with priors
            (``w = numpyro.sample("w", dist.Dirichlet(...))``): EM then
            maximizes the log posterior (MAP-EM), in closed form where the
            prior is conjugate to the closed-form update (see docs/priors.md),
            by optax steps on Q + log prior otherwise. Each starts from a draw
            from its prior (or ``init_params``) and stays in the prior's
            support; ``EMResult.log_prior`` and ``log_posterior`` report the
            prior apart from ``log_likelihood``.

    Examples:
        >>> import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist
        >>> from numpyro.distributions import constraints
        >>> from jaxem import EM
        >>> def mixture(x, K=2):
        ...     w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
        ...     mu = numpyro.param("mu", jnp.array([-1.0, 1.0]))
        ...     sigma = numpyro.param("sigma", jnp.ones(K), constraint=constraints.positive)
        ...     with numpyro.plate("data", x.shape[0]):
        ...         z = numpyro.sample("z", dist.Categorical(w))
        ...         numpyro.sample("x", dist.Normal(mu[z], sigma[z]), obs=x)
        >>> noise = jnp.tile(jnp.array([-0.5, 0.5]), 50)
        >>> x = jnp.concatenate([jnp.full(50, -3.0), jnp.full(50, 3.0)]) + noise
        >>> result = EM(mixture).run(jax.random.PRNGKey(0), x, max_iter=50)
        >>> [round(float(m), 3) for m in result.params["mu"]]
        [-3.0, 3.0]
    """

    name = "EM"

    def __init__(
        self,
        model: Callable,
        *,
        m_step: str = "auto",
        optimizer: optax.GradientTransformation | None = None,
        m_step_iters: int = 10,
        hard: bool = False,
        reg_covar: float = 1e-6,
        frozen: Sequence[str] = (),
        chain_contraction: str = "sequential",
        acceleration: str | None = None,
        global_sites: Sequence[str] = (),
    ):
        m_step = check_m_step(m_step)
        if chain_contraction not in ("sequential", "parallel"):
            raise ValueError(
                f"chain_contraction must be 'sequential' or 'parallel', got {chain_contraction!r}"
            )
        if acceleration is not None and acceleration not in ACCELERATIONS:
            raise ValueError(
                f"acceleration must be None, 'squarem' or 'anderson', got {acceleration!r}"
            )
        # Built once: every trace of the model below comes from its cache.
        self.global_sites = tuple(global_sites)
        self.model = built_model(with_global_sites(model, self.global_sites))
        if self.global_sites:
            self.objective = "log posterior"  # in messages
        self.m_step = m_step
        self.hard = bool(hard)
        self.parallel = chain_contraction == "parallel"
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

    # -- the kernel ------------------------------------------------------------

    def _init_state(self, rng_key, arrays, spec, init_params):
        _, params, _, opt_state = self.m_step_settings.start(rng_key, arrays, spec, init_params)
        return EMState(params, opt_state, jnp.zeros((), jnp.int32))

    def _step(self, rng_key, state, arrays, spec):
        """One EM step (the E-step is exact: ``rng_key`` is not used)."""
        args, kwargs = merge_args(arrays, spec)
        structure = model_structure(self.model, args, kwargs)
        nesting = structure.max_plate_nesting
        result = e_step(
            self.model, state.params, args, kwargs, nesting, hard=self.hard, parallel=self.parallel
        )
        plan = self.m_step_settings.plan(state.params, arrays, spec, structure)
        params, opt_state = self.m_step_settings.update(
            state.params,
            state.opt_state,
            result.marginals,
            plan,
            args,
            kwargs,
            structure,
            result.trace,
        )
        new_state = state._replace(
            params=params, opt_state=opt_state, iteration=state.iteration + 1
        )
        return new_state, StepInfo(result.log_likelihood, jnp.array(True))

    def _fit_one(self, rng_key, arrays, init_params, tol, spec, max_iter, progress_bar):
        loop = self._loop_one(rng_key, arrays, init_params, tol, spec, max_iter, progress_bar)
        return self._finish_one(loop, arrays, tol, spec)

    def _loop_one(self, rng_key, arrays, init_params, tol, spec, max_iter, progress_bar):
        """One restart's loop: ``(its LoopCarry, the initial params)``."""
        start = self.kernel.init(rng_key, arrays, spec, init_params)
        carry = iterate_until_done(
            lambda key, state: self.kernel.step(key, state, arrays, spec),
            loop_key(rng_key),
            start,
            lambda state: state.params,
            max_iter=max_iter,
            tol=tol,
            progress_bar=progress_bar,
            upper_bound=self._upper_bound(start.params, arrays, spec),
        )
        return carry, start.params

    def _upper_bound(self, params, arrays, spec):
        # Static facts (which sites are observed, their supports and sizes).
        def bound(p, a):
            args, kwargs = merge_args(a, spec)
            nesting = model_structure(self.model, args, kwargs).max_plate_nesting
            return upper_bound(
                enumerated_trace(self.model, p, args, kwargs, nesting, log_probs=False)
            )

        return static_facts(bound, params, arrays)

    def _finish_one(self, loop, arrays, tol, spec):
        """After one restart's loop (`_loop_one`'s output): the last state evaluated,
        its stationarity and supports: ``(EMResult, the initial params)``."""
        carry, start_params = loop
        args, kwargs = merge_args(arrays, spec)
        structure = model_structure(self.model, args, kwargs)
        nesting = structure.max_plate_nesting

        def final(state):
            result = e_step(
                self.model,
                state.params,
                args,
                kwargs,
                nesting,
                hard=self.hard,
                parallel=self.parallel,
            )
            return result.log_likelihood, result.marginals

        loop = finish_iterate(carry, final, self._upper_bound(start_params, arrays, spec))
        params = loop.state.params
        free = [n for n in structure.param_names if n not in self.frozen]
        gradient, gain, unbounded, gains = stationarity(
            self.model, params, loop.aux, free, structure.constraints, args, kwargs, nesting
        )
        supported = in_support(self.model, params, args, kwargs, nesting)
        plan = self.m_step_settings.plan(params, arrays, spec, structure)
        equations = affine_equations(self.model, params, loop.aux, plan, args, kwargs, nesting)
        converged = loop.converged & stationary(gain, loop.value, tol) & supported
        diverged = loop.diverged | ~supported
        log_likelihood, log_prior, log_posterior = loop.value, None, None
        if self.global_sites:
            # The loop's objective is the log joint: the global sites' log priors are
            # factors of the enumerated trace.
            trace = enumerated_trace(self.model, params, args, kwargs, nesting)
            log_prior = log_prior_of_trace(trace, self.global_sites)
            log_posterior, log_likelihood = loop.value, loop.value - log_prior
        result = EMResult(
            params,
            log_likelihood,
            loop.history,
            loop.num_iters,
            converged,
            diverged,
            log_likelihood,
            converged,
            diverged,
            loop.num_iters,
            gradient,
            log_prior,
            log_posterior,
            unbounded,
            gains,
            unidentified_params(equations, params),
        )
        return result, start_params

    def _restart_score(self, fit):
        # MAP-EM keeps the restart of the highest log posterior.
        result = fit[0]
        return result.log_likelihood if result.log_posterior is None else result.log_posterior

    def _gradient_at(self, state, arrays, spec):
        """The gradient of the log-likelihood at ``state``'s params (by Fisher's
        identity, of Q under the E-step's marginals there)."""
        args, kwargs = merge_args(arrays, spec)
        structure = model_structure(self.model, args, kwargs)
        nesting = structure.max_plate_nesting
        result = e_step(self.model, state.params, args, kwargs, nesting, hard=self.hard)
        free = [n for n in structure.param_names if n not in self.frozen]
        gradient, _, _, _ = stationarity(
            self.model,
            state.params,
            result.marginals,
            free,
            structure.constraints,
            args,
            kwargs,
            nesting,
        )
        return gradient

    def standard_errors(self, result, *args, **kwargs):
        """Standard errors of a fit from the observed information
        ([`jaxem.standard_errors`][jaxem.standard_errors]), the fitter's frozen params left out.

        Args:
            result: the fit (`EMResult`), or its params.
            *args, **kwargs: the model's arguments, as given to ``run``.

        Returns:
            `jaxem.uncertainty.StandardErrors`.
        """
        if self.hard:
            raise ValueError(
                "jaxem: hard EM maximizes the complete-data likelihood at the MAP assignment, "
                "not the likelihood: the observed information does not give its standard "
                "errors. Refit with hard=False, or use jaxem.bootstrap."
            )
        return standard_errors(self.model, result, *args, frozen=self.frozen, **kwargs)
