"""The driver shared by ``EM``, ``VariationalEM`` and ``OnlineEM``.

A fitter is a kernel ([`jaxem.kernel`][jaxem.kernel]: how to start a state, one step),
wrapped by the accelerator its ``acceleration=`` names
(`jaxem.accelerators`), plus one restart's compiled fit, the gradient at
a state and the settings of its M-step (`jaxem.fitter_m_step.MStep`); the
driver does the rest once for all of them: ``init``, ``update``,
``get_params``, ``run`` with its validation before the compiled program,
restarts under ``vmap`` with the best one kept, the progress bar, and the
checks on the concrete result after it (distribution arguments out of their
support, params that never moved with a non-finite gradient, the float32
objective evaluated again in float64, variances held up by ``reg_covar``).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxem.accelerators import accelerate
from jaxem.arguments import merge_args, split_args
from jaxem.batching import best_restart, select_best
from jaxem.checks import raise_for_fitted_arguments
from jaxem.compiling import OptionJits
from jaxem.fit_warnings import warn_about_fit
from jaxem.fitter_m_step import MStep, describe_plan
from jaxem.identification import warn_if_unidentified
from jaxem.inspection import model_structure
from jaxem.kernel import Kernel
from jaxem.loop import (
    raise_for_gradient,
    refuse_differentiation,
    run_with_progress,
)
from jaxem.precision import broken_down, recheck_in_float64
from jaxem.regularization import warn_if_held_by_reg_covar
from jaxem.resolution import warn_if_scale_unresolved
from jaxem.split_run import SplitRun

__all__ = ["Fitter"]


class Fitter(SplitRun):
    """``init``, ``update``, ``get_params``, ``run`` and ``m_step_paths`` of a fitter,
    written once over the kernel its subclass gives:

    * ``_init_state(rng_key, arrays, spec, init_params) -> state`` and
      ``_step(rng_key, state, arrays, spec) -> (state, info)``: the kernel's
      ``init`` and ``step`` (`jaxem.kernel.Kernel`); a state is a
      NamedTuple with ``params`` (and, to be accelerated, ``acceleration``)
      fields, ``info`` a `jaxem.kernel.StepInfo`;
    * ``_fit_one(rng_key, arrays, init_params, tol, spec, max_iter, progress_bar)
      -> (result, start params)``: one restart's fit, compiled, running
      ``self.kernel`` (the kernel, accelerated) in `jaxem.loop.iterate`;
    * ``_gradient_at(state, arrays, spec)``: the objective's gradient at a state;
    * optionally ``_loop_one(rng_key, arrays, init_params, tol, spec, max_iter,
      progress_bar) -> loop`` and ``_finish_one(loop, arrays, tol, spec)``, with
      ``_fit_one`` their composition: ``run`` then compiles the loop, what
      follows it and the float64 recheck of its result as three programs, at the
      same time (`compile_together`).

    The subclass sets ``self.m_step_settings`` (an `MStep`),
    ``self.acceleration`` (None, ``"squarem"``, ``"anderson"``) and the class
    attributes naming its objective and its result's fields before calling
    ``Fitter.__init__``.
    """

    name = "EM"
    objective = "log-likelihood"
    score = "log_likelihood"
    restart_scores = "restart_log_likelihoods"
    hard = False
    acceleration: str | None = None
    m_step_settings: MStep

    # The M-step's settings, read from the one place that keeps them.
    @property
    def optimizer(self) -> optax.GradientTransformationExtraArgs:
        """The gradient path's optax optimizer."""
        return self.m_step_settings.optimizer

    @property
    def m_step_iters(self) -> int:
        """Optimizer steps per M-step of a gradient-path param."""
        return self.m_step_settings.num_steps

    @property
    def reg_covar(self) -> float:
        """Added to variances and covariance diagonals in closed-form M-steps."""
        return self.m_step_settings.reg_covar

    @property
    def frozen(self) -> tuple:
        """Names of the params kept at their initial values."""
        return self.m_step_settings.frozen

    def __init__(self):
        base = Kernel(
            init=self._init_state,
            step=self._step,
            get_params=self.get_params,
            set_params=lambda state, params: state._replace(params=dict(params)),
            constraints=self._constraints,
        )
        self.kernel = accelerate(base, self.acceleration)
        self._update_jit = jax.jit(self._update, static_argnums=(2,))
        self._initial_gradient_jit = jax.jit(self._gradient_at, static_argnums=(2,))
        static = ("spec", "max_iter", "num_restarts", "progress_bar", "batch_restarts")
        # One jit per set of XLA options, chosen per signature (loop_options).
        self._run_jits = OptionJits(self._run_arrays, static)
        self._run_jit = self._run_jits.base
        # Two programs where the subclass splits a fit (see _run_in_two).
        self._loop_jits = OptionJits(self._loop_arrays, static)
        self._finish_jits = OptionJits(self._finish_arrays, ("spec", "batch_restarts"))
        self._compiled_together: set = set()

    # -- kernel (subclasses) -------------------------------------------------

    def _init_state(self, rng_key, arrays, spec, init_params):
        raise NotImplementedError

    def _step(self, rng_key, state, arrays, spec):
        raise NotImplementedError

    def _constraints(self, arrays, spec) -> dict:
        """``{param name: constraint}`` of the model's params."""
        args, kwargs = merge_args(arrays, spec)
        return model_structure(self.m_step_settings.model, args, kwargs).constraints

    def _fit_one(self, rng_key, arrays, init_params, tol, spec, max_iter, progress_bar):
        raise NotImplementedError

    def _gradient_at(self, state, arrays, spec):
        raise NotImplementedError

    # -- driver ----------------------------------------------------------------

    def _update(self, state, arrays, spec):
        """``update``'s compiled step: the kernel's step with a key drawn from the
        state's iteration count (``run`` draws its own per iteration)."""
        rng_key = jax.random.fold_in(jax.random.PRNGKey(0), state.iteration)
        new_state, info = self.kernel.step(rng_key, state, arrays, spec)
        return new_state, info.objective

    def _run_arrays(
        self,
        rng_key,
        arrays,
        init_params,
        tol,
        *,
        spec,
        max_iter,
        num_restarts,
        progress_bar,
        batch_restarts=True,
    ):
        """Every restart, the best kept: ``(result, the kept restart's initial params)``."""

        def fit(key):
            return self._fit_one(key, arrays, init_params, tol, spec, max_iter, progress_bar)

        _, fits = best_restart(
            fit, rng_key, num_restarts, self._restart_score, batched=batch_restarts
        )
        return self._keep_best(fits)

    def _restart_score(self, fit):
        return getattr(fit[0], self.score)

    def _run_whole(self, rng_key, *, arrays, init_params, tol, spec, num_restarts, **static):
        """`_run_arrays` as one program, compiled with `loop_options`."""
        args = (rng_key, arrays, init_params, tol)
        kwargs = dict(spec=spec, num_restarts=num_restarts, **static)
        choose = partial(self._loop_options, arrays, num_restarts, static["max_iter"])
        return self._run_jits.for_call(args, kwargs, choose)(*args, **kwargs)

    def _loop_options(self, arrays, num_restarts, max_iter) -> dict:
        """`jaxem.compiling.loop_options` of a fit's loop, from what tracing it left in
        the caches: a Markov chain (`jaxem.built.BuiltModel.has_chain`), a step that
        iterates (`MStep.iterates`, or a guide)."""
        settings = self.m_step_settings
        iterates = settings.iterates() or getattr(self, "guide", None) is not None
        return settings.loop_options(arrays, num_restarts, max_iter, iterates=iterates)

    def _keep_best(self, fits):
        """``(result, start)`` of the best of ``fits`` (every restart's ``(result,
        start)`` stacked), the result's ``restart_*`` fields holding every restart's."""
        result, start = select_best(fits, self._restart_score, lambda fit: fit[0].diverged)
        stacked = fits[0]
        result = result._replace(
            restart_converged=stacked.converged,
            restart_diverged=stacked.diverged,
            restart_num_iters=stacked.num_iters,
            **{self.restart_scores: getattr(stacked, self.score)},
        )
        return result, start

    def _run_restarts_one_by_one(self, call, rng_key, num_restarts, progress_bar, max_iter):
        """The restarts as separate calls of the one-restart program (compiled once):
        a loop of the same fits, stacked and the best kept as under ``vmap``."""
        fits = []
        for key in jax.random.split(rng_key, num_restarts):
            result, start = run_with_progress(
                partial(call, key, num_restarts=1), progress_bar, max_iter, self.name
            )
            fits.append((result, start))
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *fits)
        return self._keep_best(stacked)

    def _check_fit(self, result, start, arrays, spec):
        """After ``run``, on concrete values: a ModelError for a fit whose distribution
        arguments left their support or whose gradient-path params have a non-finite
        gradient and never moved; the float32 log-likelihood checked in float64
        (`jaxem.precision.recheck_in_float64`); a NumericalWarning for variances
        held up by reg_covar, and for scales below the resolution of their location
        (`jaxem.resolution`). ``start``: the kept restart's initial params (from the
        compiled run: no model is traced eagerly here). Returns the result, updated."""
        if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((result, start))):
            return result
        settings = self.m_step_settings
        model = settings.model
        args, kwargs = merge_args(arrays, spec)
        structure = model_structure(model, args, kwargs)
        plan = settings.plan(start, arrays, spec, structure)
        if bool(result.diverged):
            raise_for_fitted_arguments(model, result.params, args, kwargs, structure)
        # A param with a non-finite gradient that never left its initial value could
        # not be fitted: an error. One that moved only cannot be checked for
        # stationarity (converged is then False and run warns).
        stuck = {
            n: g
            for n, g in result.gradient.items()
            if n in start and np.array_equal(np.asarray(result.params[n]), np.asarray(start[n]))
        }
        raise_for_gradient(
            stuck,
            describe_plan(plan),
            objective=self.objective,
            at="at the values the fit stopped at (the initial values: they never moved)",
        )
        if result.log_likelihood is not None:
            # With global sites the model's log Z is the log joint (their priors are
            # factors of it): the value rechecked is log_likelihood + log_prior.
            log_prior = getattr(result, "log_prior", None)
            prior = 0.0 if log_prior is None else log_prior
            # (Without a prior nothing is added: an eager add compiles a program.)
            value = result.log_likelihood if log_prior is None else result.log_likelihood + prior
            exact = recheck_in_float64(
                model,
                result.params,
                value,
                arrays,
                spec,
                hard=self.hard,
                name=self.name,
                max_plate_nesting=structure.max_plate_nesting,
            )
            if exact is not None:
                return broken_down(result, exact - prior, self.restart_scores, self.score)
        if not bool(result.diverged):
            warn_if_held_by_reg_covar(result.params, plan, settings.reg_covar)
            warn_if_scale_unresolved(
                model, result.params, args, kwargs, structure.max_plate_nesting, plan
            )
            warn_if_unidentified(getattr(result, "unidentified", None), plan, self.name)
        return result

    # -- public API ----------------------------------------------------------

    def init(self, rng_key, *args, init_params=None, **kwargs):
        """Initial state: params from their ``numpyro.param`` initial values.

        Args:
            rng_key: PRNG key passed to callable initial values.
            *args, **kwargs: the model's arguments.
            init_params: optional ``{param name: constrained value}`` overriding
                some or all initial values.

        Returns:
            The fitter's state ([`jaxem.EMState`][jaxem.EMState],
            [`jaxem.VEMState`][jaxem.VEMState]).
        """
        arrays, spec = split_args(args, kwargs)
        self.m_step_settings.validate(rng_key, arrays, spec, init_params)
        state = self.kernel.init(rng_key, arrays, spec, init_params)
        # run checks the gradient where it stops; a user stepping with update gets the
        # same error here, at the initial values (compiled only for a gradient M-step).
        paths = self.m_step_settings.paths(arrays, spec)
        if any(p.startswith("gradient") for p in paths.values()):
            gradient = self._initial_gradient_jit(state, arrays, spec)
            at = "at the initial values"
            raise_for_gradient(gradient, paths, objective=self.objective, at=at)
        return state

    def update(self, state, *args, **kwargs):
        """One iteration (compiled once per argument shape).

        ``update`` makes none of ``run``'s checks: it tests no convergence,
        rejects no non-finite update and warns of nothing; ``new_state`` may
        hold non-finite params, and an objective that stopped changing does
        not make a maximum (see `jaxem.EMResult.converged`). ``init``
        raises the ``ModelError`` ``run`` does for a param whose gradient is
        not finite, at the initial values.

        A step that draws random numbers (a Monte Carlo E-step) draws them
        from ``jax.random.fold_in(jax.random.PRNGKey(0), state.iteration)``;
        ``run`` gives each iteration its own key from its ``rng_key``.

        Returns:
            ``(new_state, objective)``: the objective at ``state``'s params,
            with every acceleration: the log-likelihood (the ELBO for
            ``VariationalEM``, after this iteration's E-step; for ``OnlineEM``
            the minibatch's). Plain EM's E-step computes it in this iteration,
            a SQUAREM cycle's first E-step does, and with Anderson
            acceleration it is the value at the current (last accepted)
            point, which the iteration that accepted it computed.
        """
        arrays, spec = split_args(args, kwargs)
        return self._update_jit(state, arrays, spec)

    def get_params(self, state) -> dict:
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
        batch_restarts: bool | None = None,
        **kwargs,
    ):
        """Run to convergence inside one compiled ``lax.while_loop``.

        Restarts (each with its own key for callable initial values) are one
        compiled program (compiled once per value of ``num_restarts``), and the
        best final objective (log-likelihood, or ELBO for ``VariationalEM``) is
        kept among the restarts that did not diverge. Batched (``vmap``), every
        array gets a restart axis and the loop runs until the last restart has
        stopped, the ones that stopped earlier carried along unchanged; one
        after another, each restart stops at its own iteration.

        Args:
            rng_key: PRNG key; split into one key per restart.
            *args, **kwargs: the model's arguments.
            max_iter: maximum number of iterations.
            tol: stop when ``|ll_t - ll_{t-1}| <= tol * |ll_t|``; 0 runs exactly
                ``max_iter`` iterations.
            num_restarts: number of restarts, each from its own key of
                ``jax.random.split(rng_key, num_restarts)`` (``rng_key``
                itself when 1).
            init_params: ``{param name: constrained value}`` overriding the
                initial values of some parameters in every restart.
            progress_bar: show a tqdm progress bar (iterations done).
            batch_restarts: run the restarts under ``vmap`` (True) or one after
                another inside the compiled program (False). None chooses:
                one after another on a CPU when an M-step or E-step iterates
                (a gradient-path param, a guide), where ``vmap`` turns every
                inner loop and branch of the optimizer into one that runs
                until the slowest restart is done (several times slower than
                separate fits); batched otherwise.

        Returns:
            The fitter's result ([`jaxem.EMResult`][jaxem.EMResult],
            [`jaxem.VEMResult`][jaxem.VEMResult]).
        """
        if max_iter < 1 or num_restarts < 1:
            raise ValueError("max_iter and num_restarts must be at least 1")
        arrays, spec = split_args(args, kwargs)
        init_params = None if init_params is None else dict(init_params)
        trace_loop = self._trace_loop_while_checking(
            rng_key, arrays, init_params, tol, spec, num_restarts, max_iter, progress_bar,
            batch_restarts,
        )  # fmt: skip
        self.m_step_settings.validate(rng_key, arrays, spec, init_params, meanwhile=trace_loop)
        inputs = (arrays, init_params)
        # Only traced inputs can be differentiated (a custom_jvp applied to concrete
        # values would compile a program of its own on every call).
        if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(inputs)):
            arrays, init_params = refuse_differentiation(inputs, self.name)
        if batch_restarts is None:
            batch_restarts = num_restarts == 1 or self._restarts_batch_well(
                rng_key, arrays, spec, init_params
            )
        traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((rng_key, inputs)))
        split = self._loop_one is not None and not traced
        whole = self._run_jit if traced else self._run_whole  # options: not under a trace
        call = partial(
            self._run_in_two if split else whole,
            arrays=arrays,
            init_params=init_params,
            tol=np.asarray(tol, jnp.result_type(float)),
            spec=spec,
            max_iter=int(max_iter),
            progress_bar=bool(progress_bar),
            batch_restarts=bool(batch_restarts),
        )
        if num_restarts > 1 and not batch_restarts and not traced:
            result, start = self._run_restarts_one_by_one(
                call, rng_key, num_restarts, progress_bar, max_iter
            )
        else:
            result, start = run_with_progress(
                partial(call, rng_key, num_restarts=int(num_restarts)),
                progress_bar,
                max_iter,
                self.name,
            )
        diverged_before = _concrete_flag(result.diverged)
        result = self._check_fit(result, start, arrays, spec)
        # A divergence the check found (a density broken down in float32) was warned
        # about there, with its cause; the generic message would misdescribe it.
        if diverged_before is not False or not _concrete_flag(result.diverged):
            warn_about_fit(
                result, name=self.name, objective=self.objective, max_iter=max_iter, tol=tol
            )
        return result

    def _restarts_batch_well(self, rng_key, arrays, spec, init_params) -> bool:
        """Whether restarts are faster under ``vmap`` than one after another: on an
        accelerator, or when no step of the fit is an inner iteration."""
        if jax.default_backend() != "cpu":
            return True
        return not self._iterates_within_a_step(rng_key, arrays, spec, init_params)

    def _iterates_within_a_step(self, rng_key, arrays, spec, init_params) -> bool:
        """Whether an iteration runs an inner optimizer (a gradient-path param); the
        params' shapes only, traced abstractly (nothing is compiled)."""
        settings = self.m_step_settings
        params = jax.eval_shape(
            lambda a, i: settings.initial_params(rng_key, a, spec, i)[1], arrays, init_params
        )
        structure = model_structure(settings.model, *merge_args(arrays, spec))
        plan = settings.plan(params, arrays, spec, structure)
        return any(path.kind == "gradient" for path in plan.values())

    def m_step_paths(self, *args, **kwargs) -> dict:
        """How each parameter is updated: ``{name: "closed-form (...)" | "gradient (...)" |
        "frozen" | "unused (...)"}``, for the model called with these arguments."""
        return self.m_step_settings.paths(*split_args(args, kwargs))


def _concrete_flag(flag):
    """``bool(flag)``, or None under ``jit``/``vmap``."""
    return None if isinstance(flag, jax.core.Tracer) else bool(flag)
