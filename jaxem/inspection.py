"""Model inspection: what a seeded trace tells about a model.

Running the model once under ``seed`` gives the ``numpyro.param`` sites
(initial values and constraints), the plates and the kinds of the sample
sites (`inspect_model`). Its static part, the `ModelStructure`,
depends on the shapes and dtypes of the arguments alone, so it is traced once
per model and signature (`model_structure`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.distributions.distribution import validation_enabled

from jaxem.arguments import check_model_call, merge_args, split_args
from jaxem.exceptions import ModelError
from jaxem.global_sites import check_global_sites, global_site_names
from jaxem.labels import known_labels_in_trace
from jaxem.masks import mask_dtype_message
from jaxem.missing import MissingData, MissingEntries
from jaxem.numpyro_internals import distribution_mask
from jaxem.selection import dependencies
from jaxem.tracing import enumerated_trace
from jaxem.validation import check_observed_site, core_family, model_failure

__all__ = ["ModelStructure", "inspect_model", "model_structure", "mvn_sites_of_params"]


class ModelStructure(NamedTuple):
    """What a seeded trace of the model tells about it (static information).

    Attributes:
        param_names: names of the ``numpyro.param`` sites, in model order.
        constraints: ``{param name: constraint}``.
        latent_sites: names of the discrete latent sample sites, in model order.
        observed_sites: names of the observed sample sites.
        max_plate_nesting: number of batch dimensions used by plates.
        global_sites: the params that are sample sites with priors
            (`jaxem.global_sites`), constrained to their prior's support.
    """

    param_names: tuple[str, ...]
    constraints: dict
    latent_sites: tuple[str, ...]
    observed_sites: tuple[str, ...]
    max_plate_nesting: int
    global_sites: tuple[str, ...] = ()


def _describe(fn) -> str:
    base = fn
    while hasattr(base, "base_dist"):
        base = base.base_dist
    return type(base).__name__


def _support_value(msg):
    if msg["type"] != "sample" or msg["is_observed"]:
        return None
    fn = msg["fn"]
    if not (fn.support.is_discrete and fn.has_enumerate_support):
        return None  # reported by inspect_model
    first = fn.enumerate_support(expand=False)[0]
    return jnp.broadcast_to(first, fn.shape(msg["kwargs"].get("sample_shape", ())))


def inspect_model(model, rng_key, args, kwargs, *, observed_values=False):
    """Run the model once under ``seed`` and classify its sites.

    Returns:
        ``(structure, initial_params)``: a `ModelStructure` and the
        initial (constrained) values of the params, callable initial values
        called with keys derived from ``rng_key``, integer ones cast to the
        default float dtype (EM moves them continuously); with
        ``observed_values``, also ``{observed site: (distribution, data)}``.

    Raises:
        ModelError: no params, a param with a discrete constraint, a continuous
            or non-enumerable latent site, data whose shape is not the site's
            (`jaxem.validation.check_observed_site`). Checks of values (NaN
            data, initial values outside their constraints) are in
            `jaxem.validation.check_values`.
    """
    check_model_call(model, args, kwargs)
    # Latent sites take a value of their support instead of a prior draw: the
    # trace is for params and structure, and sampling N labels would be staged
    # into every compiled program that inspects the model.
    no_sampling = handlers.substitute(MissingEntries(model), substitute_fn=_support_value)
    try:
        # NumPyro's own argument checks would reject an invalid initial value
        # without naming the param; jaxem's checks below do.
        with validation_enabled(False):
            tr = handlers.trace(handlers.seed(no_sampling, rng_key)).get_trace(*args, **kwargs)
    except ModelError:
        raise
    except ValueError as err:
        message = mask_dtype_message(err)
        raise (ModelError(message) if message else model_failure(err)) from err

    params, constraints_, latent, observed = {}, {}, [], []
    nesting = 0
    global_sites = global_site_names(model)
    if global_sites:
        check_global_sites(global_sites, tr)
    for name, site in tr.items():
        if site["type"] == "param":
            constraint = site["kwargs"].get("constraint", dist.constraints.real)
            params[name] = _float_param(name, site["value"], constraint)
            constraints_[name] = constraint
        elif site["type"] == "sample":
            for frame in site["cond_indep_stack"]:
                if frame.dim is not None:
                    nesting = max(nesting, -frame.dim)
            if name in global_sites:
                # A parameter with a prior: constrained to the prior's support.
                support = site["fn"].support
                params[name] = _float_param(name, site["value"], support)
                constraints_[name] = support
                continue
            if site["is_observed"]:
                check_observed_site(name, site)
                observed.append(name)
                continue
            fn = site["fn"]
            if not fn.support.is_discrete:
                raise ModelError(
                    f"jaxem: latent sample site '{name}' ({_describe(fn)}) is continuous and "
                    "EM enumerates discrete latent sites only. If it is a parameter with a "
                    f"prior, name it a global site: EM(model, global_sites=('{name}',)) fits "
                    "it by MAP-EM. If it is a latent variable (one value per observation), "
                    "fit it with jaxem.MCEM or jaxem.SAEM (Monte Carlo E-step). Otherwise "
                    "observe it (obs=...), make it a numpyro.param, or integrate it out of "
                    "the model analytically."
                )
            if not fn.has_enumerate_support:
                raise ModelError(
                    f"jaxem: latent sample site '{name}' ({_describe(fn)}) is discrete but its "
                    "support cannot be enumerated (it is infinite or too large). Use a "
                    "distribution with finite support (e.g. Categorical over a truncated "
                    "range) or observe the site."
                )
            latent.append(name)
    if not params:  # global sites are params too
        raise ModelError(
            "jaxem: the model has no numpyro.param sites, so there are no parameters to fit. "
            "Declare each parameter with numpyro.param(name, init_value, constraint=...), or "
            "give it a prior as a numpyro.sample site and name it in global_sites=(...)."
        )
    labelled = [n for n in latent if n in known_labels_in_trace(tr)]
    if labelled:
        # The unobserved part of an obs_mask site that no site depends on is
        # dropped from the enumerated trace (enumerated_trace): observed data.
        kept = enumerated_trace(model, params, args, kwargs, nesting, log_probs=False).sites
        leaves = {n for n in labelled if n not in kept}
        observed = [n for n in tr if n in leaves or n in observed]
        latent = [n for n in latent if n not in leaves]
    structure = ModelStructure(
        tuple(params), constraints_, tuple(latent), tuple(observed), nesting, global_sites
    )
    if observed_values:
        return structure, params, {n: (tr[n]["fn"], tr[n]["value"]) for n in observed}
    return structure, params


def _float_param(name, value, constraint):
    """An initial value in a float dtype: an integer one (``jnp.array([0, 1])``) would
    get no gradient (JAX's float0) and be truncated by every update."""
    if constraint.is_discrete:
        raise ModelError(
            f"jaxem: param '{name}' has the discrete constraint {constraint}. EM moves "
            "params continuously; a discrete unknown is a latent sample site (enumerated), "
            "a known one a model argument."
        )
    if jnp.issubdtype(jnp.result_type(value), jnp.inexact):
        return value
    return jnp.asarray(value, jnp.result_type(float))


def model_structure(model, args, kwargs) -> ModelStructure:
    """The `ModelStructure` of a model, from an abstract trace.

    Nothing of the trace (initial values, latent samples) is staged into an
    enclosing ``jit``: only the static structure comes out. The structure depends
    on the arrays' shapes and dtypes alone, so it is traced once per model and
    signature (``run`` checks its inputs against it on every call).
    """
    check_model_call(model, args, kwargs)
    arrays, spec = split_args(args, kwargs)
    leaves, treedef = jax.tree.flatten(arrays)
    signature = tuple((tuple(jnp.shape(a)), jnp.result_type(a)) for a in leaves)
    try:
        hash(model)
    except TypeError:  # a callable object without a hash: trace it every time
        return _trace_structure(model, spec, treedef, signature)
    return _cached_structure(model, spec, treedef, signature)


def _trace_structure(model, spec, treedef, signature) -> ModelStructure:
    found = []

    def structure_only(arrays):
        args, kwargs = merge_args(arrays, spec)
        structure, params = inspect_model(model, jax.random.PRNGKey(0), args, kwargs)
        found.append(structure)
        return params

    shapes = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in signature]
    jax.eval_shape(structure_only, jax.tree.unflatten(treedef, shapes))
    return found[0]


_cached_structure = functools.lru_cache(maxsize=256)(_trace_structure)


def mvn_sites_of_params(model, rng_key, args, kwargs, params) -> dict:
    """``{param: names of the MultivariateNormal observed sites whose arguments
    depend on it}``, params reaching no such site left out.

    Read from the jaxpr of ``params -> (loc, scale_tril)`` of every such site
    in a seeded trace (`jaxem.selection.dependencies`, which follows
    calls and ``scan`` bodies; the stacked site of a ``scan`` body is one site
    there). Other control flow makes every output depend on every input: a
    param may be reported to reach more sites than it does, never fewer.
    """
    names = tuple(params)
    sites = []

    def site_args(values):
        fixed = handlers.substitute(MissingEntries(model), data=dict(zip(names, values)))
        no_sampling = handlers.substitute(fixed, substitute_fn=_support_value)
        with validation_enabled(False):
            tr = handlers.trace(handlers.seed(no_sampling, rng_key)).get_trace(*args, **kwargs)
        sites.clear()
        outputs = []
        for name, site in tr.items():
            fn = site["fn"] if site["type"] == "sample" and site["is_observed"] else None
            # The part of an obs_mask site that is missing as a whole scores nothing.
            if fn is None:
                continue
            if isinstance(fn, dist.MaskedDistribution) and distribution_mask(fn) is False:
                continue
            core = core_family(fn.base_dist if isinstance(fn, MissingData) else fn)
            if type(core) is dist.MultivariateNormal:
                sites.append(name)
                outputs.append((core.loc, core.scale_tril))
        return outputs

    closed = jax.make_jaxpr(site_args)([params[name] for name in names])
    labels = dependencies(closed, [{name: True} for name in names])
    reach = {}
    for index, site in enumerate(sites):
        for name in {**labels[2 * index], **labels[2 * index + 1]}:
            reach.setdefault(name, []).append(site)
    return {name: tuple(found) for name, found in reach.items()}
