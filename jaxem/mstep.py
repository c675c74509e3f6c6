"""M-step planning: which parameters take a closed form, and which gradient steps.

For every parameter, decide (once per compilation, from the model's jaxpr)
whether it takes a closed-form update or gradient steps. The closed-form
updates are executed by `jaxem.closed_form_step`, stage by stage: per-cell
statistics from the posterior weights, summed per parameter entry by the VJP
of the selection map.

A param that reaches only Normal locations, affinely (``X @ beta[z]``), takes a
weighted least-squares closed form instead (`jaxem.affine`), decided from the same
jaxpr.

The order within one M-step is: closed-form stage 1 (locations, rates,
probabilities, affine locations), closed-form stage 2 (scales, covariances) given stage 1, then
the gradient-path parameters given all closed-form ones. Each step maximizes
(or, for gradient steps, does not decrease) Q with the others fixed: an ECM
step, so the log-likelihood never decreases.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

from jaxem.affine import affine_paths
from jaxem.arguments import merge_args
from jaxem.closed_form import ClosedFormUpdate
from jaxem.conjugate import conjugate_statistics_fn, core_distribution
from jaxem.exceptions import ModelError
from jaxem.global_sites import global_site_names
from jaxem.m_step_options import check_m_step_names, forced_gradient, forced_reason
from jaxem.missing import MissingData
from jaxem.numpyro_internals import distribution_mask, user_site_name
from jaxem.power_selection import (
    PowerSelections,
    is_power_update,
    power_description,
    prior_arguments,
)
from jaxem.scaled_selection import scaled_description, scaled_selection_factor
from jaxem.selection import SelectionProbe, dependencies
from jaxem.supports import constraint_spelling, constraint_wider_than_support
from jaxem.tracing import enumerated_trace

__all__ = ["ParamPath", "SiteFamily", "plan_m_step", "site_family"]


class ParamPath(NamedTuple):
    """How one parameter is updated.

    Attributes:
        kind: ``"closed-form"``, ``"gradient"``, ``"frozen"`` or ``"unused"``.
        reason: a human-readable explanation (which sites and arguments, or why
            no closed form applies).
        update: the closed-form update, for ``"closed-form"``.
        consumers: ``(site name, argument name)`` pairs the parameter reaches.
        prior: for a global site with a conjugate prior (`jaxem.conjugate`),
            ``(site name, pseudo-statistics function)``: the prior's
            pseudo-statistics are added to the expected ones before the solve.
        scaled: ``((site name, argument name), k)`` for each consumer whose
            argument is ``k * sel(param)`` (`jaxem.scaled_selection`): a
            Normal-Wishart prior's mean, ``precision_matrix=beta0 * lam``.
        affine: for a Normal location affine in params (`jaxem.affine`), the
            params solved jointly with this one by weighted least squares (this
            one included, in model order); ``()`` otherwise.
    """

    kind: str
    reason: str
    update: ClosedFormUpdate | None = None
    consumers: tuple = ()
    prior: tuple | None = None
    scaled: tuple = ()
    affine: tuple = ()


class SiteFamily(NamedTuple):
    cls: type
    args: dict
    reinterpreted_ndim: int
    mask: object
    event_ndim: int
    observed: object = None


def site_family(fn, records, registry=None):
    """Unwrap missing entries, plate expansion, ``to_event`` and masks down to a
    registered family (any recorded distribution when ``registry`` is None)."""
    reinterpreted, masks, observed = 0, [], None
    if isinstance(fn, MissingData):
        observed = fn.observed
        fn = fn.base_dist
    while True:
        if isinstance(fn, dist.ExpandedDistribution):
            fn = fn.base_dist
        elif isinstance(fn, dist.Independent):
            reinterpreted += fn.reinterpreted_batch_ndims
            fn = fn.base_dist
        elif isinstance(fn, dist.MaskedDistribution):
            masks.append((distribution_mask(fn), reinterpreted))
            fn = fn.base_dist
        else:
            break
    record = records.get(id(fn))
    if (registry is not None and type(fn) not in registry) or record is None or record[2] is not fn:
        return None, fn
    cls, arguments, _ = record
    args = {k: v for k, v in arguments.items() if k != "validate_args"}
    mask = None
    for m, depth in masks:
        if m is None or isinstance(m, bool):
            if m is False:
                mask = jnp.zeros(())
            continue
        m = jnp.asarray(m).reshape(jnp.shape(m) + (1,) * (reinterpreted - depth))
        mask = m if mask is None else mask * m
    if observed is not None:
        # Missing entries drop out of the statistics (their factor is marginalized),
        # except inside a MultivariateNormal event, whose statistics take the
        # conditional moments of the missing coordinates instead (_site_cells);
        # a MultivariateNormal row with nothing observed drops out too.
        event_axes = tuple(range(-fn.event_dim, 0))
        entries = jnp.any(observed, axis=event_axes) if fn.event_dim else observed
        mask = entries if mask is None else mask * entries
        if not (cls is dist.MultivariateNormal and fn.event_dim == 1):
            observed = None
    return SiteFamily(cls, args, reinterpreted, mask, fn.event_dim, observed), fn


def _array_args(args):
    return {
        k: jnp.asarray(v)
        for k, v in args.items()
        if v is not None
        and isinstance(v, (jax.Array, np.ndarray, float, int, np.generic))
        and not isinstance(v, bool)
    }


def plan_m_step(
    model, params, arrays, spec, structure, registry, *, frozen=(), mode="auto", cache=None
):
    """Decide how each parameter is updated.

    Traces ``params -> (log-probabilities, distribution arguments)`` once,
    labels each output with the parameters it depends on (and whether through
    selection only), then checks every consumer against the registry.

    The plan depends only on shapes and dtypes, so a fitter passes a ``cache``
    dict (its own: the registry and options are fixed per fitter) and the
    model is traced once per input signature rather than once per place that
    needs the plan (the initial state, every EM step of a SQUAREM cycle).

    Returns:
        ``{param name: ParamPath}`` in model order.
    """
    if cache is not None:
        # The params' names sorted: a state's params come back from a loop's carry
        # (a pytree: its dicts' keys sorted) in another order than the model's.
        key = (
            spec,
            tuple((n, jnp.shape(params[n]), jnp.result_type(params[n])) for n in sorted(params)),
            tuple((jnp.shape(a), jnp.result_type(a)) for a in arrays),
        )
        if key not in cache:
            cache[key] = plan_m_step(
                model, params, arrays, spec, structure, registry, frozen=frozen, mode=mode
            )
        return cache[key]
    check_m_step_names(mode, structure.param_names)
    forced = forced_gradient(mode)
    layout = []
    global_sites = global_site_names(model)

    def traced(flat_params, flat_arrays):
        p = dict(zip(structure.param_names, flat_params))
        args, kwargs = merge_args(flat_arrays, spec)
        trace = enumerated_trace(model, p, args, kwargs, structure.max_plate_nesting)
        keys, outputs = [], []
        for name, site in trace.sites.items():
            keys.append(("log_prob", name, None))
            outputs.append(site.log_prob)
            if name in global_sites:
                keys.append(("prior", name, type(core_distribution(site.fn))))
                outputs.append(jnp.zeros(()))
                for arg_name, value in prior_arguments(core_distribution(site.fn)).items():
                    keys.append(("prior_arg", name, arg_name))
                    outputs.append(value)
            family, base = site_family(site.fn, trace.constructor_args, registry)
            keys.append(("value", name, None))
            outputs.append(jnp.asarray(site.value))
            if family is None:
                keys.append(("family", name, type(base).__name__))
                outputs.append(jnp.zeros(()))
                continue
            for arg_name, value in _array_args(family.args).items():
                keys.append(("arg", name, (family.cls, arg_name)))
                outputs.append(value)
        layout.append(keys)
        return outputs

    def struct(x):
        return jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))

    flat_params = [struct(params[n]) for n in structure.param_names]
    flat_arrays = [struct(a) for a in arrays]
    closed = jax.make_jaxpr(traced)(flat_params, flat_arrays)
    keys = layout[-1]
    labels = dependencies(
        closed, [{n: True} for n in structure.param_names] + [{}] * len(flat_arrays)
    )
    # Params reaching a Normal's scale as sqrt / 1 / sqrt of a selection (a variance,
    # a precision): checked on first use only.
    powers = PowerSelections(closed, keys, structure.param_names, params, arrays)
    unsupported_site = {k[1]: k[2] for k in keys if k[0] == "family"}
    prior_classes = {k[1]: k[2] for k in keys if k[0] == "prior"}

    _raise_for_params_outside_support(structure, keys, labels)
    # The event-block probes of every param: one program.
    probe = SelectionProbe(closed, [i for i, k in enumerate(keys) if k[0] == "arg"])
    plan = {}
    for index, name in enumerate(structure.param_names):
        if name in frozen:
            plan[name] = ParamPath("frozen", "frozen by the user")
            continue
        # A global site's own prior is not a consumer: it enters the solve as
        # pseudo-statistics (conjugate) or through Q (gradient path).
        own = name if name in prior_classes else None
        reached = [(k, lab[name]) for k, lab in zip(keys, labels) if name in lab and k[1] != own]
        sites = sorted({k[1] for k, _ in reached if k[0] == "log_prob"})
        if own is not None and not sites:
            plan[name] = ParamPath("gradient", f"reaches its prior at site '{own}' only")
            continue
        if not sites:
            plan[name] = ParamPath("unused", "does not reach any sample site")
            continue
        if mode == "gradient":
            plan[name] = ParamPath("gradient", "m_step='gradient'")
            continue
        if name in forced:
            plan[name] = ParamPath("gradient", forced_reason(name))
            continue
        plan[name] = _decide(
            name,
            index,
            reached,
            sites,
            unsupported_site,
            registry,
            structure,
            probe,
            params,
            arrays,
            keys,
            powers,
        )
        if own is not None:
            arguments = {
                k[2]
                for k, _ in reached
                if k[0] == "arg" and (k[1], k[2][1]) in plan[name].consumers
            }
            plan[name] = _with_prior(
                plan[name], own, prior_classes[own], arguments, powers, prior_classes
            )
    if mode == "gradient":
        return plan
    # A Normal location affine in params: weighted least squares (jaxem.affine).
    return affine_paths(
        plan, keys, labels, closed, structure, params, registry, prior_classes, forced
    )


def _with_prior(path, site, prior_cls, arguments, powers=None, prior_classes=()):
    """A global site's path: its closed form kept where the prior is conjugate
    (`jaxem.conjugate`, `jaxem.power_selection` for a variance or precision),
    gradient steps on Q + log prior otherwise."""
    if path.kind != "closed-form":
        return path
    prior = f"{prior_cls.__name__} at site '{user_site_name(site)}'"
    # A global site whose prior reads this one scaled: a Normal-Wishart's mean.
    means = [s for (s, _), _ in path.scaled if s in prior_classes]
    if means and prior_cls in (dist.Wishart, dist.InverseWishart):
        shown = ", ".join(f"'{user_site_name(s)}'" for s in dict.fromkeys(means))
        prior += f", Normal-{prior_cls.__name__} with the mean at site {shown}"
    if is_power_update(path.update):
        pseudo_fn, why_not = powers.conjugate(path.update, prior_cls, site)
        if pseudo_fn is None:
            return ParamPath("gradient", f"its prior ({prior}) {why_not}; {path.reason}")
    else:
        pseudo_fn = conjugate_statistics_fn(prior_cls, arguments)
    if pseudo_fn is None:
        return ParamPath(
            "gradient",
            f"its prior ({prior}) has no conjugate closed form with {path.reason}",
        )
    return path._replace(reason=f"conjugate prior: {prior}; {path.reason}", prior=(site, pseudo_fn))


def _raise_for_params_outside_support(structure, keys, labels) -> None:
    """A named error for a param whose values are an argument's values (a selection)
    but whose constraint allows values outside the argument's support."""
    for name in structure.param_names:
        for key, label in zip(keys, labels):
            if key[0] != "arg" or not label.get(name, False):
                continue
            (cls, arg_name), site = key[2], key[1]
            supports = getattr(cls, "arg_constraints", None)
            support = supports.get(arg_name) if isinstance(supports, dict) else None
            declared = structure.constraints[name]
            if constraint_wider_than_support(declared, support):
                spelling = constraint_spelling(support)
                if name in structure.global_sites:
                    raise ModelError(
                        f"jaxem: global site '{name}' has a prior whose support is "
                        f"{constraint_spelling(declared)}, and is argument '{arg_name}' of "
                        f"{cls.__name__} at site '{site}', whose values must satisfy "
                        f"{spelling}: its MAP estimate could leave that support. Give it a "
                        f"prior on {spelling} (for a scale: dist.HalfNormal, dist.LogNormal, "
                        "dist.Gamma)."
                    )
                raise ModelError(
                    f"jaxem: param '{name}' (constraint {constraint_spelling(declared)}) is "
                    f"argument '{arg_name}' of {cls.__name__} at site '{site}', whose values "
                    f"must satisfy {spelling}; EM keeps a param inside its own constraint "
                    "only, so it would leave that support and the fit would be meaningless. "
                    f"Declare it: numpyro.param('{name}', ..., constraint={spelling})."
                )


def _decide(
    name,
    index,
    reached,
    sites,
    unsupported_site,
    registry,
    structure,
    probe,
    params,
    arrays,
    keys,
    powers,
):
    def gradient(reason):
        return ParamPath("gradient", reason)

    consumers, updates = [], set()
    for key, is_selection in reached:
        kind, site, detail = key
        if kind == "value":
            return gradient(f"reaches the value of site '{user_site_name(site)}'")
        if kind != "arg":
            continue
        cls, arg_name = detail
        update = registry.get(cls, {}).get(arg_name)
        if update is None:
            return gradient(
                f"reaches argument '{arg_name}' of {cls.__name__} at site "
                f"'{user_site_name(site)}', which has no closed-form update"
            )
        if not is_selection and arg_name == "scale":
            # sqrt(var[z]) or 1 / sqrt(tau[z]): a variance's or precision's update.
            update = powers.update(keys.index(key), name, cls)
        factor = None
        if not is_selection and not is_power_update(update):
            # beta0 * lam: a Normal-Wishart prior's mean reading the precision.
            factor = scaled_selection_factor(powers, keys.index(key), name, cls, arg_name)
            if factor is None:
                return gradient(
                    f"reaches {cls.__name__}.{arg_name} at site '{user_site_name(site)}' "
                    "through operations other than indexing/broadcasting/reshaping"
                    + _SCALED_HINT.get((cls, arg_name), "")
                )
        consumers.append((site, arg_name, cls, keys.index(key), factor))
        updates.add(update)
    for site in sites:
        if site in unsupported_site:
            return gradient(
                f"reaches site '{user_site_name(site)}' ({unsupported_site[site]}), which has no "
                "closed-form update"
            )
        if not any(c[0] == site for c in consumers):
            return gradient(
                f"reaches site '{user_site_name(site)}' other than through a distribution argument"
            )
    if len(updates) != 1:
        return gradient(
            "reaches different kinds of distribution arguments: "
            + ", ".join(sorted({f"{c[2].__name__}.{c[1]}" for c in consumers}))
        )
    (update,) = updates
    constraint = structure.constraints[name]
    if not update.domain(constraint):
        return gradient(
            f"its constraint {constraint} does not contain the closed-form solution's values"
        )
    if update.event_ndim and not _event_blocks_intact(
        probe, index, params, arrays, structure, consumers, update.event_ndim
    ):
        return gradient("the selection map does not keep the distribution's event dims whole")
    # A scan's first step and its later steps are one site to the user.
    described = (
        f"{c[2].__name__}.{c[1]} at site '{user_site_name(c[0])}'"
        + ("" if c[4] is None else f" ({scaled_description(c[1], c[4])})")
        for c in consumers
    )
    description = ", ".join(dict.fromkeys(described))
    if is_power_update(update):
        description += f" ({power_description(update)})"
    scaled = tuple(dict.fromkeys(((c[0], c[1]), c[4]) for c in consumers if c[4] is not None))
    return ParamPath(
        "closed-form",
        description,
        update,
        tuple((c[0], c[1]) for c in consumers),
        scaled=scaled,
    )


_SCALED_HINT = {
    (dist.MultivariateNormal, "precision_matrix"): (
        " (a closed form reads a precision param as lam[z], or, in a Normal-Wishart "
        "prior's mean, as precision_matrix=beta0 * lam with a constant beta0 > 0)"
    ),
    (dist.MultivariateNormal, "covariance_matrix"): (
        " (a closed form reads a covariance param as Sigma[z], or, in a "
        "Normal-InverseWishart prior's mean, as covariance_matrix=Sigma / beta0 with a "
        "constant beta0 > 0)"
    ),
}


def _event_blocks_intact(probe, index, params, arrays, structure, consumers, event_ndim):
    """Check that each cell's event block is one whole trailing block of the param
    (``probe``: the plan's `jaxem.selection.SelectionProbe`)."""
    value = params[structure.param_names[index]]
    shape, dtype = jnp.shape(value), jnp.result_type(value)
    if len(shape) < event_ndim:
        return False
    size = int(np.prod(shape))
    if size >= 2 ** (24 if dtype == jnp.float32 else 53):
        return False  # ids would not be exact: no proof, no closed form
    inputs = []
    for i, n in enumerate(structure.param_names):
        p = params[n]
        if i == index:
            inputs.append(np.arange(size, dtype=dtype).reshape(shape))
        else:
            inputs.append(np.zeros(jnp.shape(p), jnp.result_type(p)))
    inputs += [np.zeros(jnp.shape(a), jnp.result_type(a)) for a in arrays]
    block = int(np.prod(shape[len(shape) - event_ndim :]))
    outs = probe(inputs, [consumer[3] for consumer in consumers])
    if outs is None:
        return False  # the map closes over traced values: unproven, so gradient
    for out, consumer in zip(outs, consumers):
        if consumer[4] is not None:  # k * ids: back to the ids
            out = np.asarray(out, np.float64) / consumer[4]
            if not np.all(np.abs(out - np.rint(out)) < 0.25):
                return False
            out = np.rint(out)
        if tuple(out.shape[out.ndim - event_ndim :]) != tuple(shape[len(shape) - event_ndim :]):
            return False
        rows = out.reshape(-1, block)
        if not (np.all(rows - rows[:, :1] == np.arange(block)) and np.all(rows[:, 0] % block == 0)):
            return False
    return True
