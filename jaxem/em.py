"""The ``EM`` class: init / update / get_params / run, mirroring NumPyro's ``SVI``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxem.acceleration import (
    anderson_step,
    init_anderson,
    init_squarem,
    squarem_extrapolate,
    squarem_step_max,
)
from jaxem.arguments import merge_args, split_args
from jaxem.checks import raise_for_model_arguments, validate
from jaxem.closed_form import registered_closed_forms
from jaxem.estep import e_step
from jaxem.gradient import default_optimizer, gradient_m_step, init_opt_state, stationarity
from jaxem.inspection import inspect_model, model_structure
from jaxem.loop import (
    all_finite,
    best_restart,
    initial_params,
    iterate,
    raise_for_gradient,
    run_compiled,
    stationary,
    tree_where,
    upper_bound,
)
from jaxem.mstep import closed_form_m_step, plan_m_step
from jaxem.precision import broken_down, recheck_in_float64
from jaxem.regularization import warn_if_held_by_reg_covar, warn_if_reg_covar_dominates
from jaxem.supports import argument_support, arguments_in_support
from jaxem.tracing import enumerated_trace

__all__ = ["EM", "EMState", "EMResult"]


class EMState(NamedTuple):
    """What the EM loop carries from one iteration to the next (a pytree).

    Attributes:
        params: ``{param name: constrained value}``.
        opt_state: optax state of the gradient-path parameters (in
            unconstrained space), carried across iterations.
        iteration: number of updates done.
        acceleration: a :class:`jaxem.acceleration.SquaremState` with
            ``acceleration="squarem"``, a
            :class:`jaxem.acceleration.AndersonState` with
            ``acceleration="anderson"``, else ``()``.
    """

    params: dict
    opt_state: Any
    iteration: jax.Array
    acceleration: Any = ()


class EMResult(NamedTuple):
    """Result of :meth:`EM.run`.

    Attributes:
        params: ``{param name: constrained value}`` of the best restart.
        log_likelihood: marginal log-likelihood at ``params`` (for hard EM,
            the complete-data log-likelihood at the MAP assignment).
        history: shape ``(max_iter,)``: the log-likelihood at the start of every
            iteration of the best restart (with ``acceleration="squarem"``: at
            the start of every cycle; with ``acceleration="anderson"``: at
            the point each iteration ends at), NaN after ``num_iters``.
        num_iters: number of iterations (``update`` calls) of the best restart;
            with ``acceleration="squarem"``, cycles of three EM steps each.
        converged: whether the relative change of the log-likelihood fell
            below ``tol`` and ``params`` are a stationary point: a step along
            the gradient could not raise the log-likelihood by more than 100
            times what ``tol`` allows per iteration (see :attr:`gradient`).
        diverged: whether the run stopped on a log-likelihood or parameter that
            was not finite, or not credible: above 0 for a model whose
            observed sites are all discrete, or a jump a thousand times larger
            than every earlier gain (a density evaluated where it breaks
            down). ``params`` are then the last ones before it. Also True when,
            after a float32 fit, the log-likelihood at ``params`` evaluated again
            in float64 differs from the float32 one by more than rounding
            explains (:mod:`jaxem.precision`): a density broke down in float32,
            ``params`` are the fitted ones, ``log_likelihood`` the float64 value,
            and a :class:`~jaxem.exceptions.NumericalWarning` names the site.
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


class EM:
    """Expectation-maximization for NumPyro models with discrete latent sites.

    The E-step enumerates the discrete latents exactly (NumPyro's enumeration,
    configured automatically) and obtains every posterior marginal as a
    gradient of the log marginal likelihood. The M-step updates each parameter
    in closed form where its distribution and the way it reaches the
    distribution allow it (see :func:`jaxem.register_closed_form`), and by
    optax steps on the expected complete-data log-likelihood otherwise.

    Args:
        model: a NumPyro model with ``numpyro.param`` sites.
        m_step: ``"auto"`` (closed form where detected, gradient steps
            otherwise) or ``"gradient"`` (gradient steps for every parameter).
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
            (see :mod:`jaxem.acceleration`). ``"squarem"``: each iteration is
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
            with every M-step path, hard EM, restarts and sharded data.

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
    ):
        if m_step not in ("auto", "gradient"):
            raise ValueError(f"m_step must be 'auto' or 'gradient', got {m_step!r}")
        if chain_contraction not in ("sequential", "parallel"):
            raise ValueError(
                f"chain_contraction must be 'sequential' or 'parallel', got {chain_contraction!r}"
            )
        if acceleration not in (None, "squarem", "anderson"):
            raise ValueError(
                f"acceleration must be None, 'squarem' or 'anderson', got {acceleration!r}"
            )
        if m_step_iters < 1:
            raise ValueError(f"m_step_iters must be at least 1, got {m_step_iters}")
        self.model = model
        self.m_step = m_step
        self.optimizer = optax.with_extra_args_support(optimizer or default_optimizer())
        self.m_step_iters = int(m_step_iters)
        self.hard = bool(hard)
        self.reg_covar = float(reg_covar)
        self.frozen = tuple(frozen)
        self.parallel = chain_contraction == "parallel"
        self.acceleration = acceleration
        self._registry = registered_closed_forms()
        self._plans: dict = {}
        self._update_jit = jax.jit(self._update_arrays, static_argnums=(2,))
        self._initial_gradient_jit = jax.jit(self._initial_gradient, static_argnums=(2,))
        self._run_jit = jax.jit(
            self._run_arrays, static_argnames=("spec", "max_iter", "num_restarts", "progress_bar")
        )

    # -- building blocks -----------------------------------------------------

    def _plan(self, params, arrays, spec, structure):
        return plan_m_step(
            self.model,
            params,
            arrays,
            spec,
            structure,
            self._registry,
            frozen=self.frozen,
            mode=self.m_step,
            cache=self._plans,
        )

    def _initial_params(self, rng_key, arrays, spec, init_params):
        return initial_params(self.model, self.frozen, rng_key, arrays, spec, init_params)

    def _validate(self, rng_key, arrays, spec, init_params) -> None:
        """Raise a named error for bad data or initial values, and warn when reg_covar
        is not small against the data (concrete inputs only)."""
        validity = validate(self.model, rng_key, arrays, spec, init_params, frozen=self.frozen)
        if validity is not None:

            def plan():
                structure, params = self._initial_params(rng_key, arrays, spec, init_params)
                return self._plan(params, arrays, spec, structure)

            warn_if_reg_covar_dominates(validity.spread, plan, self.reg_covar)

    def _init_arrays(self, rng_key, arrays, spec, init_params):
        structure, params = self._initial_params(rng_key, arrays, spec, init_params)
        plan = self._plan(params, arrays, spec, structure)
        opt_state = init_opt_state(self.optimizer, params, structure.constraints, plan)
        acceleration = ()
        if self.acceleration == "squarem":
            acceleration = init_squarem(jnp.result_type(float))
        elif self.acceleration == "anderson":
            acceleration = init_anderson(params, structure.constraints)
        return EMState(params, opt_state, jnp.zeros((), jnp.int32), acceleration)

    def _update_arrays(self, state, arrays, spec):
        if self.acceleration == "squarem":
            return self._squarem_update(state, arrays, spec)
        if self.acceleration == "anderson":
            return self._anderson_update(state, arrays, spec)
        return self._em_step(state, arrays, spec)

    def _anderson_update(self, state, arrays, spec):
        """One EM step at the Anderson trial point; the point becomes the current one
        if its log-likelihood is not below the current one's. Returns the new state and
        the log-likelihood at its params."""
        args, kwargs = merge_args(arrays, spec)
        constraints = model_structure(self.model, args, kwargs).constraints
        anderson = state.acceleration
        evaluated, log_lik = self._em_step(state._replace(params=anderson.trial), arrays, spec)
        anderson = anderson_step(anderson, log_lik, evaluated.params, constraints)
        params, opt_state = tree_where(
            anderson.accepted,
            (dict(state.acceleration.trial), evaluated.opt_state),
            (state.params, state.opt_state),
        )
        value = jnp.where(anderson.accepted, log_lik, state.acceleration.log_likelihood)
        return EMState(params, opt_state, state.iteration + 1, anderson), value

    def _squarem_update(self, state, arrays, spec):
        """One SQUAREM cycle: two EM steps, the extrapolation, one EM step from it;
        the plain two-step point instead when the extrapolation lowers the
        log-likelihood or is not finite."""
        args, kwargs = merge_args(arrays, spec)
        constraints = model_structure(self.model, args, kwargs).constraints
        squarem = state.acceleration
        first, log_lik = self._em_step(state, arrays, spec)
        second, _ = self._em_step(first, arrays, spec)
        extrapolated, alpha = squarem_extrapolate(
            state.params, first.params, second.params, constraints, squarem.step_max
        )
        third, extrapolated_log_lik = self._em_step(
            second._replace(params=extrapolated), arrays, spec
        )
        accepted = (
            jnp.isfinite(extrapolated_log_lik)
            & (extrapolated_log_lik >= log_lik)
            & all_finite(third.params)
        )
        chosen = tree_where(
            accepted, (third.params, third.opt_state), (second.params, second.opt_state)
        )
        squarem = squarem_step_max(squarem, alpha, accepted)
        return EMState(*chosen, state.iteration + 1, squarem), log_lik

    def _em_step(self, state, arrays, spec):
        args, kwargs = merge_args(arrays, spec)
        structure = model_structure(self.model, args, kwargs)
        nesting = structure.max_plate_nesting
        result = e_step(
            self.model, state.params, args, kwargs, nesting, hard=self.hard, parallel=self.parallel
        )
        plan = self._plan(state.params, arrays, spec, structure)
        params, opt_state = self._m_step(
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
        return new_state, result.log_likelihood

    def _m_step(self, params, opt_state, marginals, plan, args, kwargs, structure, trace):
        """Closed-form updates (staged ECM), then optax steps on the gradient-path params,
        from the E-step's (or a variational q's) factor marginals: ``(params, opt_state)``.
        ``trace``: the enumerated trace at ``params``."""
        nesting = structure.max_plate_nesting
        params = closed_form_m_step(
            self.model, params, marginals, plan, args, kwargs, nesting, self.reg_covar, trace
        )
        return gradient_m_step(
            self.model,
            params,
            marginals,
            plan,
            structure,
            self.optimizer,
            opt_state,
            self.m_step_iters,
            args,
            kwargs,
        )

    def _fit_one(self, rng_key, arrays, init_params, tol, spec, max_iter, progress_bar):
        args, kwargs = merge_args(arrays, spec)
        structure = model_structure(self.model, args, kwargs)
        nesting = structure.max_plate_nesting
        start = self._init_arrays(rng_key, arrays, spec, init_params)

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

        loop = iterate(
            lambda state: self._update_arrays(state, arrays, spec),
            start,
            lambda state: state.params,
            final_fn=final,
            max_iter=max_iter,
            tol=tol,
            progress_bar=progress_bar,
            moved_fn=(
                (lambda state: state.acceleration.accepted)
                if self.acceleration == "anderson"
                else None
            ),
            upper_bound=upper_bound(
                enumerated_trace(self.model, start.params, args, kwargs, nesting, log_probs=False)
            ),
        )
        params = loop.state.params
        free = [n for n in structure.param_names if n not in self.frozen]
        gradient, gain = stationarity(
            self.model, params, loop.aux, free, structure.constraints, args, kwargs, nesting
        )
        # Params that feed an argument through a function (w * c as probabilities) can
        # carry it out of its support, where the log-likelihood means nothing.
        in_support = arguments_in_support(
            enumerated_trace(self.model, params, args, kwargs, nesting, log_probs=False)
        )
        converged = loop.converged & stationary(gain, loop.value, tol) & in_support
        diverged = loop.diverged | ~in_support
        return EMResult(
            params,
            loop.value,
            loop.history,
            loop.num_iters,
            converged,
            diverged,
            loop.value,
            converged,
            diverged,
            loop.num_iters,
            gradient,
        )

    def _run_arrays(
        self, rng_key, arrays, init_params, tol, *, spec, max_iter, num_restarts, progress_bar
    ):
        def fit(key):
            return self._fit_one(key, arrays, init_params, tol, spec, max_iter, progress_bar)

        result, fits = best_restart(
            fit, rng_key, num_restarts, lambda r: r.log_likelihood, lambda r: r.diverged
        )
        return result._replace(
            restart_log_likelihoods=fits.log_likelihood,
            restart_converged=fits.converged,
            restart_diverged=fits.diverged,
            restart_num_iters=fits.num_iters,
        )

    def _check_fit(self, result, arrays, spec):
        """After ``run`` (concrete results only): a ModelError for a fit whose
        distribution arguments left their support or whose gradient-path params have a
        non-finite gradient; the float32 log-likelihood checked in float64
        (:func:`jaxem.precision.recheck_in_float64`); a NumericalWarning for variances
        held up by reg_covar. Returns the result, updated."""
        if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(result)):
            return result
        args, kwargs = merge_args(arrays, spec)
        structure, params = inspect_model(self.model, jax.random.PRNGKey(0), args, kwargs)
        plan = self._plan(params, arrays, spec, structure)
        if bool(result.diverged):
            fitted = {k: jnp.asarray(v) for k, v in result.params.items()}
            trace = enumerated_trace(
                self.model, fitted, args, kwargs, structure.max_plate_nesting, log_probs=False
            )
            found = argument_support(trace)
            if any(int(count) for count, _ in found.values()):
                raise_for_model_arguments(self.model, args, kwargs, fitted, found, "fitted")
        # A param with a non-finite gradient that never left its initial value could
        # not be fitted: an error. One that moved only cannot be checked for
        # stationarity (converged is then False and run warns).
        stuck = {
            n: g
            for n, g in result.gradient.items()
            if n in params and np.array_equal(np.asarray(result.params[n]), np.asarray(params[n]))
        }
        raise_for_gradient(
            stuck,
            {name: f"{path.kind} ({path.reason})" for name, path in plan.items()},
            at="at the values the fit stopped at (the initial values: they never moved)",
        )
        exact = recheck_in_float64(
            self.model, result.params, result.log_likelihood, arrays, spec, hard=self.hard
        )
        if exact is not None:
            return broken_down(result, exact, "restart_log_likelihoods")
        if not bool(result.diverged):
            warn_if_held_by_reg_covar(result.params, plan, self.reg_covar)
        return result

    def _initial_gradient(self, state, arrays, spec):
        """The gradient of the log-likelihood at ``state``'s params (by Fisher's
        identity, of Q under the E-step's marginals there)."""
        args, kwargs = merge_args(arrays, spec)
        structure = model_structure(self.model, args, kwargs)
        nesting = structure.max_plate_nesting
        result = e_step(self.model, state.params, args, kwargs, nesting, hard=self.hard)
        free = [n for n in structure.param_names if n not in self.frozen]
        gradient, _ = stationarity(
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

    # -- public API ----------------------------------------------------------

    def init(self, rng_key, *args, init_params=None, **kwargs) -> EMState:
        """Initial state: params from their ``numpyro.param`` initial values.

        Args:
            rng_key: PRNG key passed to callable initial values.
            *args, **kwargs: the model's arguments.
            init_params: optional ``{param name: constrained value}`` overriding
                some or all initial values.

        Returns:
            An :class:`EMState`.
        """
        arrays, spec = split_args(args, kwargs)
        self._validate(rng_key, arrays, spec, init_params)
        state = self._init_arrays(rng_key, arrays, spec, init_params)
        # run checks the gradient where it stops; a user stepping with update gets the
        # same error here, at the initial values (compiled only for a gradient M-step).
        paths = self.m_step_paths(*args, **kwargs)
        if any(p.startswith("gradient") for p in paths.values()):
            gradient = self._initial_gradient_jit(state, arrays, spec)
            raise_for_gradient(gradient, paths, at="at the initial values")
        return state

    def update(self, state: EMState, *args, **kwargs):
        """One EM iteration (compiled once per argument shape); with
        ``acceleration="squarem"``, one SQUAREM cycle of three EM steps; with
        ``acceleration="anderson"``, one EM step at the Anderson trial point.

        ``update`` makes none of ``run``'s checks: it tests no convergence,
        rejects no non-finite update and warns of nothing; ``new_state`` may
        hold non-finite params, and a log-likelihood that stopped changing
        does not make a maximum (see :attr:`EMResult.converged`). ``init``
        raises the ``ModelError`` ``run`` does for a param whose gradient is
        not finite, at the initial values.

        Returns:
            ``(new_state, log_likelihood)``, the log-likelihood being that of
            ``state`` (the value computed by this iteration's E-step); with
            ``acceleration="anderson"``, that of ``new_state``'s params.
        """
        arrays, spec = split_args(args, kwargs)
        return self._update_jit(state, arrays, spec)

    def get_params(self, state: EMState) -> dict:
        """Constrained parameter values ``{param name: value}`` of a state."""
        return dict(state.params)

    def run(
        self,
        rng_key,
        *args,
        max_iter: int = 100,
        tol: float = 1e-5,
        num_restarts: int = 1,
        init_params: dict | None = None,
        progress_bar: bool = False,
        **kwargs,
    ) -> EMResult:
        """Run EM to convergence inside one compiled ``lax.while_loop``.

        Restarts run under ``vmap`` (each with its own key for callable
        initial values) and the best final log-likelihood is kept. They are
        one compiled program (compiled once per value of ``num_restarts``):
        the loop runs until the last restart has stopped, the ones that
        stopped earlier carried along unchanged.

        Args:
            rng_key: PRNG key; split into one key per restart.
            *args, **kwargs: the model's arguments.
            max_iter: maximum number of EM iterations.
            tol: stop when ``|ll_t - ll_{t-1}| <= tol * |ll_t|``; 0 runs exactly
                ``max_iter`` iterations.
            num_restarts: number of restarts, each from its own key of
                ``jax.random.split(rng_key, num_restarts)`` (``rng_key``
                itself when 1).
            init_params: ``{param name: constrained value}`` overriding the
                initial values of some parameters in every restart.
            progress_bar: show a tqdm progress bar (iterations done).

        Returns:
            An :class:`EMResult`.
        """
        return run_compiled(
            self._run_jit,
            self._validate,
            rng_key,
            args,
            kwargs,
            max_iter=max_iter,
            tol=tol,
            num_restarts=num_restarts,
            init_params=init_params,
            progress_bar=progress_bar,
            desc="EM",
            check_fn=self._check_fit,
        )

    def m_step_paths(self, *args, **kwargs) -> dict:
        """How each parameter is updated: ``{name: "closed-form (...)" | "gradient (...)" |
        "frozen" | "unused (...)"}``, for the model called with these arguments."""
        arrays, spec = split_args(args, kwargs)
        structure, params = inspect_model(
            self.model, jax.random.PRNGKey(0), *merge_args(arrays, spec)
        )
        plan = self._plan(params, arrays, spec, structure)
        return {name: f"{path.kind} ({path.reason})" for name, path in plan.items()}
