"""The closed-form M-step: each closed-form parameter solved from its statistics.

Executes the plan of `jaxem.mstep.plan_m_step` stage by stage (ECM): closed-form
stage 1 (locations, rates, probabilities), then stage 2 (scales, covariances)
given stage 1. Each stage's per-cell statistics come from the posterior weights
of the enumerated cells (`jaxem.closed_form.Cells`), are summed per parameter
entry by the VJP of the selection map that reads the parameter, and are solved
by the family's registered update (`jaxem.closed_form`), a conjugate prior's
pseudo-statistics added (`jaxem.conjugate`). A group of params whose Normal
locations are affine in them (`jaxem.affine`) solves its weighted normal
equations instead, built here from the same cells.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from jaxem.affine import ridge_statistics, solve_affine
from jaxem.closed_form import Cells
from jaxem.conjugate import add_prior_statistics, core_distribution
from jaxem.exceptions import ModelError
from jaxem.gaussian_stats import shared_statistics
from jaxem.missing import conditional_moments
from jaxem.mstep import site_family
from jaxem.power_selection import linearization_point
from jaxem.scaled_selection import scale_statistics
from jaxem.tracing import enumerated_trace

__all__ = [
    "affine_equations",
    "closed_form_m_step",
    "closed_form_statistics_m_step",
    "with_affine_priors",
]


def _site_cells(site, family, weight):
    """Weights and shape of a family's cells from the site marginal."""
    # to_event dims sit just left of the family's own event dims in the value.
    extra, own = family.reinterpreted_ndim, family.event_ndim
    ndim = jnp.ndim(site.value)
    event = jnp.shape(site.value)[ndim - own - extra : ndim - own] if extra else ()
    shape = tuple(jnp.shape(weight)) + tuple(event)
    weight = jnp.reshape(weight, jnp.shape(weight) + (1,) * extra)
    if family.mask is not None:
        weight = weight * family.mask
    args = dict(family.args)
    if family.observed is None:
        return Cells(weight, site.value, args, shape)
    value, value_cov = _mvn_conditional_moments(args, family.observed, site.value)
    return Cells(weight, value, args, shape, value_cov)


def _mvn_conditional_moments(args, observed, value):
    """E[x] and Cov[x] of a MultivariateNormal's cells given their observed
    coordinates, at the distribution's current arguments.

    In a staged (ECM) M-step the covariance stage sees the updated location:
    its moments are those of the missing coordinates at (new location, old
    covariance). That is an extra partial E-step, which only raises the lower
    bound, so the log-likelihood stays monotone.
    """
    loc = jnp.asarray(args["loc"])
    if args.get("covariance_matrix") is not None:
        covariance = jnp.asarray(args["covariance_matrix"])
    elif args.get("scale_tril") is not None:
        tril = jnp.asarray(args["scale_tril"])
        covariance = tril @ jnp.swapaxes(tril, -1, -2)
    else:
        covariance = jnp.linalg.inv(jnp.asarray(args["precision_matrix"]))
    dtype = jnp.result_type(covariance)
    loc = jnp.asarray(loc, dtype)
    # The covariance of the missing coordinates does not depend on the location:
    # with a covariance shared by the components it is one per row, not per cell.
    cov_batch = jnp.broadcast_shapes(covariance.shape[:-2], observed.shape[:-1])
    batch = jnp.broadcast_shapes(loc.shape[:-1], cov_batch)
    dim = value.shape[-1]
    return jax.lax.cond(
        jnp.all(observed),
        lambda: (
            jnp.broadcast_to(value, batch + (dim,)).astype(dtype),
            jnp.zeros(cov_batch + (dim, dim), dtype),
        ),
        lambda: conditional_moments(loc, covariance, observed, value),
    )


def closed_form_m_step(
    model, params, marginals, plan, args, kwargs, max_plate_nesting, reg_covar, trace=None
):
    """Update every closed-form parameter, stage by stage (ECM).

    ``trace`` is an enumerated trace at ``params`` (the E-step's), reused by the
    first stage.
    """
    params, _ = closed_form_statistics_m_step(
        model, params, marginals, plan, args, kwargs, max_plate_nesting, reg_covar, trace
    )
    return params


def closed_form_statistics_m_step(
    model,
    params,
    marginals,
    plan,
    args,
    kwargs,
    max_plate_nesting,
    reg_covar,
    trace=None,
    combine_fn=None,
    prior_weight=1.0,
):
    """`closed_form_m_step` that also returns each parameter's statistics.

    Every closed-form update solves from statistics summed over the data (the
    sufficient statistics, pulled back to the parameter's entries).
    ``combine_fn(name, statistics) -> statistics``, when given, maps them
    before the solve; online EM uses it to mix a minibatch's statistics into
    running averages, and ``prior_weight`` (``1 / N``) weighs a conjugate
    prior's pseudo-statistics against such averages over ``N`` data points.

    Returns:
        ``(params, {name: statistics solved from})``.
    """
    with shared_statistics(reg_covar):
        return _closed_form_stages(
            model,
            params,
            marginals,
            plan,
            args,
            kwargs,
            max_plate_nesting,
            reg_covar,
            trace,
            combine_fn,
            prior_weight,
        )


def _closed_form_stages(
    model,
    params,
    marginals,
    plan,
    args,
    kwargs,
    max_plate_nesting,
    reg_covar,
    trace,
    combine_fn,
    prior_weight=1.0,
):
    params, solved_from = dict(params), {}
    closed = {n: p for n, p in plan.items() if p.kind == "closed-form"}
    for stage in sorted({p.update.stage for p in closed.values()}):
        paths = {name: path for name, path in closed.items() if path.update.stage == stage}
        if trace is None:
            trace = enumerated_trace(
                model, params, args, kwargs, max_plate_nesting, log_probs=False
            )
        per_cell = {name: path for name, path in paths.items() if not path.affine}
        statistics = (
            _stage_statistics(
                model, params, marginals, per_cell, args, kwargs, max_plate_nesting, trace
            )
            if per_cell
            else {}
        )
        for group in dict.fromkeys(path.affine for path in paths.values() if path.affine):
            # A Normal location affine in the group: one set of normal equations.
            consumers = paths[group[0]].consumers
            group_statistics = _affine_statistics(
                model, params, marginals, group, consumers, args, kwargs, max_plate_nesting, trace
            )
            statistics.update(dict.fromkeys(group, group_statistics))
        new_values = {}
        for name, path in paths.items():
            if combine_fn is not None:
                statistics[name] = combine_fn(name, statistics[name])
            solved_from[name] = statistics[name]
            old = params[name]
            if path.affine:
                # Every member solves the group's (identical) statistics; keeps its part.
                # Its members' priors added after combine_fn: once, not per minibatch.
                equations = with_affine_priors(
                    statistics[name], path.affine, paths, trace, params, prior_weight
                )
                olds = [params[n] for n in path.affine]
                new = solve_affine(equations, olds)[path.affine.index(name)]
            else:
                if path.prior is not None:
                    # Added after combine_fn: a prior counts once, not once per minibatch.
                    site, pseudo_fn = path.prior
                    statistics[name] = add_prior_statistics(
                        pseudo_fn, statistics[name], trace.sites[site].fn, prior_weight
                    )
                new = path.update.solve_fn(statistics[name], old, reg_covar)
            _check_solution(name, path, old, new)
            new_values[name] = jnp.asarray(new).astype(jnp.result_type(old))
        params.update(new_values)
        trace = None
    return params, solved_from


def with_affine_priors(statistics, group, paths, trace, params, prior_weight=1.0):
    """The normal equations ``statistics`` of an affine ``group`` (`jaxem.affine`) with
    the ridge terms of its members' Normal priors (`jaxem.affine.ridge_statistics`,
    read from the global sites of ``trace``) added, times ``prior_weight`` (``1 / N``
    against statistics averaged over ``N`` data points)."""
    sites = [paths[n].prior[0] if paths[n].prior is not None else None for n in group]
    if all(site is None for site in sites):
        return tuple(statistics)
    priors = [None if s is None else core_distribution(trace.sites[s].fn) for s in sites]
    gram, rhs = ridge_statistics(priors, [params[n] for n in group])
    return statistics[0] + prior_weight * gram, statistics[1] + prior_weight * rhs


def affine_equations(
    model, params, marginals, plan, args, kwargs, max_plate_nesting, trace=None, combine_fn=None
):
    """``{group: (gram, rhs)}``: the normal equations, priors included, of every group
    of params on the affine path of ``plan`` at ``params`` (what the M-step from there
    solves), ``combine_fn(statistics)`` applied to the data's part first (a Monte
    Carlo average). For the check that a fit's coefficients are identified
    (`jaxem.identification`)."""
    paths = {n: p for n, p in plan.items() if p.kind == "closed-form" and p.affine}
    if not paths:
        return {}
    if trace is None:
        trace = enumerated_trace(model, params, args, kwargs, max_plate_nesting, log_probs=False)
    equations = {}
    for group in dict.fromkeys(path.affine for path in paths.values()):
        statistics = _affine_statistics(
            model,
            params,
            marginals,
            group,
            paths[group[0]].consumers,
            args,
            kwargs,
            max_plate_nesting,
            trace,
        )
        if combine_fn is not None:
            statistics = combine_fn(statistics)
        equations[group] = with_affine_priors(statistics, group, paths, trace, params)
    return equations


def _check_solution(name, path, old, new) -> None:
    """A named error, at trace time, for a ``solve_fn`` whose result does not have
    the parameter's shape and a dtype that casts to the parameter's safely
    (broadcasting it would fill every entry from one, silently)."""
    problem = None
    if not hasattr(new, "shape") or not hasattr(new, "dtype"):
        problem = f"returned {type(new).__name__}, not an array"
    elif tuple(new.shape) != tuple(jnp.shape(old)):
        problem = f"returned shape {tuple(new.shape)}, expected {tuple(jnp.shape(old))}"
    elif not (
        jnp.issubdtype(new.dtype, jnp.floating) or jnp.issubdtype(new.dtype, jnp.integer)
    ) or jnp.issubdtype(new.dtype, jnp.complexfloating):
        problem = f"returned dtype {new.dtype}, expected {jnp.result_type(old)}"
    if problem is not None:
        raise ModelError(
            f"jaxem: the closed-form update registered for {path.reason} "
            f"(register_closed_form) {problem} for param '{name}' (shape "
            f"{tuple(jnp.shape(old))}, dtype {jnp.result_type(old)}). Its solve_fn(stats, "
            "old, reg_covar) must return a real array of the param's shape: one value per "
            "entry of the param."
        )


def _stage_statistics(model, params, marginals, paths, args, kwargs, max_plate_nesting, trace):
    """``{param: statistics}`` of one stage's closed-form params (``paths``), from one
    trace of the model and one VJP of the selection map of all of them.

    Each consumer ``(site, argument)`` gets its statistics once, pulled back to every
    param of the stage at once (a param that does not reach it gets zeros there);
    each param sums its own consumers' in their order. ``trace``: an enumerated
    trace at ``params`` (the E-step's for the first stage), or None.
    """
    if trace is None:
        trace = enumerated_trace(model, params, args, kwargs, max_plate_nesting, log_probs=False)
    updates, factors = {}, {}
    for path in paths.values():
        for key in path.consumers:
            updates.setdefault(key, path.update)
        # An argument k * sel(param) (a Normal-Wishart prior's mean): the VJP
        # multiplies by k, the statistics are scaled for it.
        factors.update(path.scaled)

    def arguments(values):
        own = enumerated_trace(
            model, {**params, **values}, args, kwargs, max_plate_nesting, log_probs=False
        )
        outs = {}
        for site_name, arg_name in updates:
            family, _ = site_family(own.sites[site_name].fn, own.constructor_args)
            outs[(site_name, arg_name)] = jnp.asarray(family.args[arg_name])
        return outs

    # At a variance's or precision's linearization point the VJP is the selection's
    # times the power (`jaxem.power_selection`); every other VJP is the selection's.
    point = {n: linearization_point(path.update, params[n]) for n, path in paths.items()}
    outs, vjp_fn = jax.vjp(arguments, point)
    pulled = {}
    for key, arg in outs.items():
        update = updates[key]
        site = trace.sites[key[0]]
        family, _ = site_family(site.fn, trace.constructor_args)
        cells = _site_cells(site, family, jax.lax.stop_gradient(marginals[key[0]]))
        num_cells = len(cells.shape)
        arg_batch = jnp.shape(arg)[: jnp.ndim(arg) - update.event_ndim]
        target = (1,) * (num_cells - len(arg_batch)) + tuple(arg_batch)
        stats = update.stats_fn(cells, target)
        stats = tuple(
            jnp.reshape(s, jnp.shape(arg) + jnp.shape(s)[num_cells + update.event_ndim :])
            for s in stats
        )
        if key in factors:
            stats = scale_statistics(key[1], stats, factors[key])
        pulled[key] = [_pullback(vjp_fn, outs, key, s, jnp.ndim(arg)) for s in stats]
    statistics = {}
    for name, path in paths.items():
        totals = None
        for key in dict.fromkeys(path.consumers):
            per_entry = tuple(by_param[name] for by_param in pulled[key])
            if totals is not None:
                per_entry = tuple(a + b for a, b in zip(totals, per_entry))
            totals = per_entry
        statistics[name] = totals
    return statistics


def _affine_statistics(model, params, marginals, group, consumers, args, kwargs, nesting, trace):
    """The normal equations ``(J^T W J, J^T W (y - c))`` of a group of params whose
    Normal locations (``consumers``) are ``J theta + c`` (`jaxem.affine`): ``W`` the
    cells' weights times their precisions ``scale^-2`` at ``params``; ``J`` by one
    JVP per coordinate of the group, at ``params`` (exact: the map is affine)."""

    def locations(values):
        values = dict(zip(group, values))
        own = enumerated_trace(model, {**params, **values}, args, kwargs, nesting, log_probs=False)
        return {
            key: jnp.asarray(site_family(own.sites[key[0]].fn, own.constructor_args)[0].args["loc"])
            for key in consumers
        }

    point = [params[n] for n in group]  # in group order, as solve_affine flattens them
    flat, unravel = ravel_pytree(point)
    at_point, jvp_fn = jax.linearize(locations, point)
    columns = jax.vmap(lambda e: jvp_fn(unravel(e)))(jnp.eye(flat.size, dtype=flat.dtype))
    gram, moment = 0.0, 0.0
    for key in consumers:
        site = trace.sites[key[0]]
        family, _ = site_family(site.fn, trace.constructor_args)
        cells = _site_cells(site, family, jax.lax.stop_gradient(marginals[key[0]]))
        precision = 1.0 / jnp.asarray(family.args["scale"], flat.dtype) ** 2
        design = jnp.moveaxis(columns[key], 0, -1)  # loc's shape + (coordinates,)
        residual = cells.value - at_point[key]
        target = (1,) * len(cells.shape)
        weighted = ((cells.weight, ""), (precision, ""), (design, "i"))
        gram = gram + cells.sum(target, *weighted, (design, "j"), out="ij")
        moment = moment + cells.sum(target, *weighted, (residual, ""), out="i")
    gram = jnp.reshape(gram, (flat.size, flat.size))
    # y - c = residual + J theta: statistics that do not depend on the point.
    return gram, jnp.reshape(moment, (flat.size,)) + gram @ flat


def _pullback(vjp_fn, outs, key, stat, arg_ndim):
    """VJP of the selection map for one statistic, vectorized over its extra dims:
    ``{param: statistic per entry}``."""
    extra_shape = jnp.shape(stat)[arg_ndim:]
    flat = jnp.reshape(stat, jnp.shape(stat)[:arg_ndim] + (-1,))

    def one(cotangent):
        cts = {k: jnp.zeros_like(v) for k, v in outs.items()}
        cts[key] = cotangent.astype(outs[key].dtype)
        (result,) = vjp_fn(cts)
        return result

    pulled = jax.vmap(one, in_axes=-1, out_axes=-1)(flat)
    return {n: jnp.reshape(p, jnp.shape(p)[:-1] + extra_shape) for n, p in pulled.items()}
