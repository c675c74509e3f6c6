"""The ``numpyro.param`` sites of a variational Bayes EM model: point values that
maximize the ELBO with q held (variational EM with point hyperparameters, "VB-EM
with ML-II params": Beal 2003, ch. 2; Bishop, PRML 10.1).

With q(theta) q(z) held, the ELBO in the params phi is

$$
F(\\phi) = \\sum_f \\langle q_f, E_{q(\\theta)}[\\log f(\\phi)] \\rangle
- \\mathrm{KL}(q(\\theta) \\,\\|\\, p(\\theta \\mid \\phi)) + H(q(z)),
$$

each factor that reads a global site taken in expectation under q(theta) (as in
the VB-E-step), the others as they are. A param is routed once per input signature
(`VBParams.route`):

* one that reaches only factors that read no global site (a Normal's scale where
  the mean is a param, a mixture's weights under no prior) sees in F exactly EM's
  Q with q(z)'s factor marginals: the fitters' M-step (`jaxem.fitter_m_step.MStep`)
  updates it, in closed form where it has one;
* one that reaches a factor that reads a global site (a Normal's scale where the
  mean is a global site) or the prior of a global site (an empirical-Bayes
  hyperparameter) takes optax steps up F (`jaxem.gradient.ascend`).

The whole update is kept only if F did not decrease, so the ELBO never does.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxem.arguments import merge_args
from jaxem.exceptions import ModelError
from jaxem.fitter_m_step import MStep
from jaxem.gradient import ascend, gradient_names, init_opt_state
from jaxem.loop import tree_where
from jaxem.mstep import ParamPath
from jaxem.numpyro_internals import user_site_name
from jaxem.stationarity import stationarity
from jaxem.vb_sites import moved_arguments, site_args_fn, tangent_fn

__all__ = ["VBParams"]

_FROZEN = ParamPath("frozen", "a global site: its q(theta) is updated by the VB-M-step")


class VBParams:
    """The M-step of `jaxem.VariationalBayesEM`'s ``numpyro.param`` sites.

    Args:
        model: the built model with its global sites (`jaxem.global_sites`).
        global_sites: their names.
        optimizer: optax optimizer (with extra-args support) of the gradient path.
        num_steps: optimizer steps per iteration.
        reg_covar: as in `jaxem.EM`, for the closed forms of the params that read
            no global site.
    """

    def __init__(self, model, global_sites, *, optimizer, num_steps, reg_covar):
        self.model = model
        self.global_sites = tuple(global_sites)
        self.optimizer = optimizer
        self.num_steps = int(num_steps)
        self.m_step = MStep(
            model,
            mode="auto",
            optimizer=optimizer,
            num_steps=num_steps,
            reg_covar=reg_covar,
            frozen=self.global_sites,
        )

    def names(self, structure) -> list:
        """The ``numpyro.param`` sites of the model."""
        return [n for n in structure.param_names if n not in self.global_sites]

    def route(self, plan, seeded, structure, arrays, spec) -> dict:
        """``{param: ParamPath}``: closed form or gradient by EM's M-step for a param
        that reaches no factor reading a global site, gradient on the ELBO for one
        that does, ``"unused"`` for one that reaches nothing. A param that reaches
        an argument read in expectation (``mu[z] + b``) is an error."""
        names = self.names(structure)
        if not names:
            return {}
        args, kwargs = merge_args(arrays, spec)
        values = {n: jnp.asarray(seeded[n]["value"]) for n in structure.param_names}

        def log_probs(vals):
            trace = self.model.enumerated_trace(vals, args, kwargs, plan.nesting)
            return {s: site.log_prob for s, site in trace.sites.items()}

        args_jvp = tangent_fn(site_args_fn(self.model, args, kwargs, plan.nesting))
        log_probs_jvp = tangent_fn(log_probs)
        em_paths = self.m_step.plan(values, arrays, spec, structure)
        rng = np.random.default_rng(0)
        paths = {}
        for name in names:
            direction = {
                n: jnp.asarray(
                    rng.normal(size=jnp.shape(v)) if n == name else np.zeros(jnp.shape(v)),
                    jnp.result_type(v),
                )
                for n, v in values.items()
            }
            for site, argument in moved_arguments(args_jvp, values, direction):
                _refuse_read_argument(name, site, argument, plan)
            moved = [
                s
                for s, change in log_probs_jvp(values, direction).items()
                if bool(jnp.any(change != 0))
            ]
            paths[name] = _path(name, moved, plan, em_paths[name])
        return paths

    def start(self, params, structure, paths):
        """The optax state of the gradient-path params."""
        return init_opt_state(self.optimizer, params, structure.constraints, paths)

    def update(
        self, objective, params, opt_state, point, marginals, paths, arrays, spec, structure
    ):
        """One M-step of the params up ``objective`` (the ELBO in them, q held):
        closed forms, then optax steps, kept only if ``objective`` did not decrease.
        ``point``: the global sites' values where the closed forms' trace is taken
        (their factors read none); ``marginals``: q(z)'s factor marginals."""
        if not params:
            return params, opt_state
        args, kwargs = merge_args(arrays, spec)
        before = objective(params)
        new, new_opt_state = params, opt_state
        if any(p.kind == "closed-form" for p in paths.values()):
            full = {**point, **params}
            em_plan = {n: paths.get(n, _FROZEN) for n in structure.param_names}
            em_plan = {n: p if p.kind == "closed-form" else _FROZEN for n, p in em_plan.items()}
            trace = self.model.enumerated_trace(full, args, kwargs, structure.max_plate_nesting)
            full, _ = self.m_step.update(
                full, (), marginals, em_plan, args, kwargs, structure, trace
            )
            new = {n: full[n] for n in params}
        names = gradient_names(paths)
        if names:
            new, new_opt_state = ascend(
                objective,
                new,
                names,
                structure.constraints,
                self.optimizer,
                opt_state,
                self.num_steps,
            )
        after = objective(new)
        accept = jnp.isfinite(after) & (after >= before)
        return tree_where(accept, (new, new_opt_state), (params, opt_state))

    def stationarity(self, objective, params, paths, structure):
        """``(gradient, gain)`` of ``objective`` at ``params`` in the free params
        (`jaxem.stationarity.stationarity`): the gain is 0 where there are none."""
        names = [n for n, p in paths.items() if p.kind in ("closed-form", "gradient")]
        gradient, gain, _, _ = stationarity(
            None, params, None, names, structure.constraints, None, None, None, objective=objective
        )
        return gradient, gain


def _refuse_read_argument(name, site, argument, plan) -> None:
    reader = plan.readers.get(site)
    pair = plan.nw_readers.get(site)
    if reader is not None and argument == reader.argument:
        source = f"global site '{reader.source}'"
    elif pair is not None:
        source = f"the conjugate pair '{pair.mean}'/'{pair.precision}'"
    else:
        return
    raise ModelError(
        f"jaxem: param '{name}' reaches argument '{argument}' of site "
        f"'{user_site_name(site)}', which VariationalBayesEM takes in expectation over "
        f"{source}: that argument must be a selection of the global site alone. Make "
        f"'{name}' a global site with a conjugate prior (a numpyro.sample site named in "
        "global_sites), fix its value, or fit by EM(model, global_sites=...) (MAP)."
    )


def _path(name, moved, plan, em_path) -> ParamPath:
    """How param ``name`` is updated, from the sites whose log-densities it moves."""
    for site in moved:
        if site in plan.global_sites:
            return ParamPath(
                "gradient",
                f"reaches the prior of global site '{user_site_name(site)}': optax on the "
                "ELBO (its KL)",
            )
        source = plan.readers.get(site) or plan.nw_readers.get(site)
        if source is not None:
            read = getattr(source, "source", None) or f"{source.mean}'/'{source.precision}"
            return ParamPath(
                "gradient",
                f"reaches site '{user_site_name(site)}', which reads global site '{read}': "
                "optax on the ELBO (its expected log-density)",
            )
    if not moved:
        return ParamPath("unused", "does not reach any sample site")
    return em_path
