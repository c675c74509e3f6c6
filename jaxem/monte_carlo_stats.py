"""Closed-form M-steps of [`jaxem.SAEM`][jaxem.SAEM] and [`jaxem.MCEM`][jaxem.MCEM] from Monte
Carlo averages of sufficient statistics.

Given a draw ``z`` of the continuous latents, the model with ``z`` substituted as
observed values is one that [`jaxem.EM`][jaxem.EM] fits exactly: its discrete latents
(if any) are enumerated, and every parameter that the closed-form registry
(`jaxem.closed_form`) covers solves from weighted sufficient statistics of its
cells (``sum_n u_n``, ``sum_n (y_n - m_n)^2``, ``sum_g phi_g phi_g^T``, ...). The
exact engine's planner (`jaxem.mstep.plan_m_step`) decides, on that conditioned
model, which params take a closed form; its statistics are computed per draw
(`jaxem.closed_form_step.closed_form_statistics_m_step`), averaged over the draws with their
weights (a ``psum`` over the vmapped draw axis) and solved. The other params take
the gradient path on the Monte Carlo ``Q`` afterwards, given the closed-form ones
(an ECM step, as in `EM`).

MCEM's weights are ``1 / m_k`` on the iteration's draws. SAEM's are the stored
draws' stochastic-approximation weights (``gamma_j prod_{i > j} (1 - gamma_i)``),
so the averaged genuine sufficient statistics are exactly Delyon, Lavielle and
Moulines' (1999) recursion ``s_k = s_{k-1} + gamma_k (S(z_k) - s_{k-1})``. The
registry's statistics are those genuine ones combined with the current params
(``sum (x - m)^2 = sum x^2 - 2 m sum x + n m^2`` at the location just solved,
``sum P x`` with the current precision ``P``): linear in the genuine statistics,
so averaging them over the weighted draws at the current params gives what
solving from the recursion's statistics would (saemix's variance update
``E[phi phi^T] - mu mu^T``), and stays right where a statistic's weighting
depends on the params (a precision-weighted location).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from numpyro.handlers import condition

from jaxem.arguments import split_args
from jaxem.built import built_model
from jaxem.closed_form import registered_closed_forms
from jaxem.closed_form_step import affine_equations, closed_form_statistics_m_step
from jaxem.estep import e_step
from jaxem.exceptions import ModelError
from jaxem.fitter_m_step import describe_plan
from jaxem.identification import unidentified_params
from jaxem.inspection import model_structure
from jaxem.m_step_options import check_m_step, check_m_step_names
from jaxem.mstep import ParamPath, plan_m_step
from jaxem.tracing import enumerated_trace

__all__ = ["ClosedFormMStep", "conditioned_model"]

_DRAWS = "jaxem_monte_carlo_draws"


def conditioned_model(model) -> Callable:
    """``model`` with its continuous latents given as observed values: called as
    ``conditioned(latents, *args, **kwargs)`` with ``latents = {site: value}``."""

    def conditioned(latents, *args, **kwargs):
        return condition(model, data=latents)(*args, **kwargs)

    # Read by jaxem.global_sites.global_site_names: the global sites of a MAP fit stay
    # params with priors (conjugate closed forms or gradient steps on Q + log prior).
    conditioned.model = model
    return conditioned


class ClosedFormMStep:
    """The closed-form part of a Monte Carlo M-step.

    Args:
        model: the NumPyro model.
        mode: ``"auto"`` (closed form wherever the registry applies),
            ``"gradient"`` (every param on the gradient path), or a dict
            ``{param name: "gradient"}`` (those params on the gradient path).
        reg_covar: added to variances and covariance diagonals, as in `EM`.
        frozen: params kept at their initial values.
    """

    def __init__(self, model, mode: str, reg_covar: float, frozen: tuple):
        mode = check_m_step(mode)
        # Built once (jaxem.built): every trace below evaluates one cached program.
        self.conditioned = built_model(conditioned_model(model))
        self.mode = mode
        self.reg_covar = float(reg_covar)
        self.frozen = tuple(frozen)
        self.registry = registered_closed_forms()
        self._plans: dict = {}

    def _inputs(self, z, args, kwargs):
        arrays, spec = split_args((z,) + tuple(args), kwargs)
        full_args = (z,) + tuple(args)
        return arrays, spec, model_structure(self.conditioned, full_args, kwargs), full_args

    def plan(self, params, z, args, kwargs) -> dict:
        """``{param: jaxem.mstep.ParamPath}`` on the model given one draw ``z``
        (constrained latents; only their shapes matter)."""
        check_m_step_names(self.mode, params)
        try:
            arrays, spec, structure, _ = self._inputs(z, args, kwargs)
            return plan_m_step(
                self.conditioned,
                params,
                arrays,
                spec,
                structure,
                self.registry,
                frozen=self.frozen,
                mode=self.mode,
                cache=self._plans,
            )
        except ModelError as err:
            # EM's checks are stricter than the chains need (EM does not broadcast data,
            # nor allow a param whose constraint is wider than its argument's support):
            # without EM's cells there is no closed form, and Q's gradient still applies.
            reason = (
                "no closed form: EM's planner refuses the model with the latents as data ("
                + str(err).removeprefix("jaxem: ")
                + ")"
            )
            return {
                n: ParamPath("frozen", "frozen by the user")
                if n in self.frozen
                else ParamPath("gradient", reason)
                for n in params
            }

    def paths(self, params, z, args, kwargs) -> dict:
        """``{param: "closed-form (...)" | "gradient (...)" | ...}`` as `EM.m_step_paths`."""
        return describe_plan(self.plan(params, z, args, kwargs))

    def closed_names(self, params, z, args, kwargs) -> tuple:
        """The params that take the closed form."""
        plan = self.plan(params, z, args, kwargs)
        return tuple(n for n, p in plan.items() if p.kind == "closed-form")

    def step(self, params, draws, weights, args, kwargs):
        """The params with the closed-form ones solved from the draws' averaged
        statistics (``params`` itself when no param has a closed form).

        Args:
            params: the params at the start of the M-step.
            draws: ``{latent: (num_draws, *shape)}`` constrained draws.
            weights: shape ``(num_draws,)``, summing to 1 (0 for unused draws).
            args, kwargs: the model's arguments.
        """
        first = jax.tree.map(lambda x: x[0], draws)
        plan = self.plan(params, first, args, kwargs)
        closed = {n: p for n, p in plan.items() if p.kind == "closed-form"}
        if not closed:
            return params

        def one(z, w):
            full_args, nesting, trace, marginals = self._cells(params, z, args, kwargs)
            return closed_form_statistics_m_step(
                self.conditioned,
                params,
                marginals,
                closed,
                full_args,
                kwargs,
                nesting,
                self.reg_covar,
                trace,
                combine_fn=lambda _, statistics: _averaged(statistics, w),
            )[0]

        new = jax.vmap(one, axis_name=_DRAWS)(draws, weights)
        # Every draw solved from the same averaged statistics: the first holds the result.
        return jax.tree.map(lambda x: x[0], new)

    def unidentified(self, params, draws, weights, args, kwargs) -> dict:
        """`jaxem.identification.unidentified_params` of the least-squares params at
        ``params``, from the normal equations averaged over the weighted draws (what
        `step` from there would solve); ``{}`` when no param takes that path."""
        first = jax.tree.map(lambda x: x[0], draws)
        plan = self.plan(params, first, args, kwargs)
        if not any(p.kind == "closed-form" and p.affine for p in plan.values()):
            return {}

        def one(z, w):
            full_args, nesting, trace, marginals = self._cells(params, z, args, kwargs)
            return affine_equations(
                self.conditioned, params, marginals, plan, full_args, kwargs, nesting, trace,
                combine_fn=lambda statistics: _averaged(statistics, w),
            )  # fmt: skip

        equations = jax.vmap(one, axis_name=_DRAWS)(draws, weights)
        equations = jax.tree.map(lambda x: x[0], equations)
        return unidentified_params(equations, params)

    def _cells(self, params, z, args, kwargs):
        """``(args with z, plate nesting, trace, cell weights)`` of the model given one
        draw ``z``."""
        _, _, structure, full_args = self._inputs(z, args, kwargs)
        nesting = structure.max_plate_nesting
        if structure.latent_sites:
            # Discrete latents of the conditioned model are enumerated exactly.
            estep = e_step(self.conditioned, params, full_args, kwargs, nesting)
            return full_args, nesting, estep.trace, estep.marginals
        # Nothing to enumerate: every cell weighs 1 (no contraction to compile).
        trace = enumerated_trace(self.conditioned, params, full_args, kwargs, nesting)
        marginals = {n: jnp.ones_like(site.log_prob) for n, site in trace.sites.items()}
        return full_args, nesting, trace, marginals


def _averaged(statistics, weight):
    """Statistics averaged over the vmapped draws with their weights; unused draws
    (weight 0) may hold placeholder values: kept out exactly."""
    return tuple(
        jax.lax.psum(jnp.where(weight > 0, weight * s, jnp.zeros_like(s)), _DRAWS)
        for s in statistics
    )
