"""The M-step every fitter shares (`MStep`): its plan, the initial values it starts
from, the checks of data and initial values before a fit, and one update of the
params (closed-form stages, then optax steps), with `describe_plan` for
``m_step_paths``."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import optax

from jaxem.arguments import merge_args
from jaxem.checks import validate
from jaxem.closed_form import registered_closed_forms
from jaxem.closed_form_step import closed_form_m_step
from jaxem.compiling import loop_options
from jaxem.gradient import gradient_m_step, init_opt_state
from jaxem.inspection import inspect_model
from jaxem.loop import initial_params
from jaxem.m_step_options import check_m_step
from jaxem.mstep import plan_m_step
from jaxem.regularization import warn_if_reg_covar_dominates

__all__ = ["MStep", "describe_plan"]


def describe_plan(plan) -> dict:
    """``{param name: "closed-form (...)" | "gradient (...)" | "frozen" | ...}``."""
    return {name: f"{path.kind} ({path.reason})" for name, path in plan.items()}


class MStep:
    """The M-step of a fitter: its plan, the initial values it starts from, the
    checks of data and initial values, and one update of the params.

    Args:
        model: the NumPyro model.
        mode: ``"auto"``, ``"gradient"`` or ``{param name: "gradient"}`` (see
            [`jaxem.EM`][jaxem.EM]).
        optimizer: the optax optimizer of the gradient path (given extra-args
            support here).
        num_steps: optimizer steps per update.
        reg_covar: added to variances and covariance diagonals.
        frozen: names of the params kept at their initial values.
    """

    def __init__(
        self,
        model,
        *,
        mode: str,
        optimizer: optax.GradientTransformationExtraArgs,
        num_steps: int,
        reg_covar: float,
        frozen: Sequence[str],
    ):
        if num_steps < 1:
            raise ValueError(f"m_step_iters must be at least 1, got {num_steps}")
        self.model = model
        self.mode = check_m_step(mode)
        self.optimizer = optax.with_extra_args_support(optimizer)
        self.num_steps = int(num_steps)
        self.reg_covar = float(reg_covar)
        self.frozen = tuple(frozen)
        self.registry = registered_closed_forms()
        # The plan depends on shapes and dtypes only (see plan_m_step).
        self.plans: dict = {}

    def plan(self, params, arrays, spec, structure) -> dict:
        """``{param name: ParamPath}`` (`jaxem.mstep.plan_m_step`), cached."""
        return plan_m_step(
            self.model,
            params,
            arrays,
            spec,
            structure,
            self.registry,
            frozen=self.frozen,
            mode=self.mode,
            cache=self.plans,
        )

    def iterates(self) -> bool:
        """Whether a plan made so far has a gradient-path param (an inner optimizer)."""
        paths = (path for plan in self.plans.values() for path in plan.values())
        return any(path.kind == "gradient" for path in paths)

    def loop_options(self, arrays, num_restarts, max_iter, *, iterates) -> dict:
        """`jaxem.compiling.loop_options` of a fit's loop on ``arrays``; a chain if a
        trace of the model made so far has one (`jaxem.built.BuiltModel.has_chain`)."""
        has_chain = getattr(self.model, "has_chain", None)
        chain = bool(has_chain()) if callable(has_chain) else False
        return loop_options(arrays, num_restarts, max_iter, chain=chain, iterates=iterates)

    def initial_params(self, rng_key, arrays, spec, init_params):
        """``(structure, initial params)`` (`jaxem.loop.initial_params`)."""
        return initial_params(self.model, self.frozen, rng_key, arrays, spec, init_params)

    def start(self, rng_key, arrays, spec, init_params):
        """``(structure, initial params, plan, optax state)``."""
        structure, params = self.initial_params(rng_key, arrays, spec, init_params)
        plan = self.plan(params, arrays, spec, structure)
        opt_state = init_opt_state(self.optimizer, params, structure.constraints, plan)
        return structure, params, plan, opt_state

    def validate(self, rng_key, arrays, spec, init_params, meanwhile=None) -> None:
        """Raise a named error for bad data or initial values, and warn when reg_covar
        is not small against the data (concrete inputs only). ``meanwhile``: see
        `jaxem.checks.validate`."""
        validity = validate(
            self.model, rng_key, arrays, spec, init_params, frozen=self.frozen, meanwhile=meanwhile
        )
        if validity is not None:

            def plan():
                structure, params = self.initial_params(rng_key, arrays, spec, init_params)
                return self.plan(params, arrays, spec, structure)

            warn_if_reg_covar_dominates(validity.spread, plan, self.reg_covar)

    def update(self, params, opt_state, marginals, plan, args, kwargs, structure, trace):
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
            self.num_steps,
            args,
            kwargs,
        )

    def paths(self, arrays, spec) -> dict:
        """How each param is updated (`jaxem.EM.m_step_paths`)."""
        args, kwargs = merge_args(arrays, spec)
        structure, params = inspect_model(self.model, jax.random.PRNGKey(0), args, kwargs)
        return describe_plan(self.plan(params, arrays, spec, structure))
