"""The plan of `jaxem.VariationalBayesEM` (`build_plan`): which global site each
factor reads and through which argument, the conjugate pairs, the priors'
families, the checks that the model is one VBEM fits in closed form. Read once per
input signature from concrete values; the ``numpyro.param`` sites beside the global
sites are routed by `jaxem.vb_params`."""

from __future__ import annotations

import jax.numpy as jnp
from numpyro import handlers

from jaxem.arguments import check_model_call, merge_args
from jaxem.conjugate import core_distribution
from jaxem.exceptions import ModelError, a_or_an
from jaxem.expected_log import PRIOR_FAMILIES
from jaxem.factorized import reject_chains
from jaxem.global_sites import check_global_sites
from jaxem.inspection import model_structure
from jaxem.numpyro_internals import user_site_name
from jaxem.vb_pairs import find_pairs
from jaxem.vb_sites import check_proper, find_readers, unsupported
from jaxem.vb_types import VBPlan

__all__ = ["build_plan"]


def build_plan(model, global_sites, latents, arrays, spec, rng_key):
    """``(VBPlan, seeded trace, structure)`` of ``model`` (a `jaxem.built.BuiltModel`
    of a `jaxem.global_sites.GlobalSiteModel`) on concrete ``arrays``; the plan's
    ``param_paths`` are left empty. The factors are read at a draw of the global
    sites from their priors and the ``numpyro.param`` sites at their initial values."""
    args, kwargs = merge_args(arrays, spec)

    def refuse_improper(msg):
        # Before NumPyro draws from it (it cannot, or draws inf).
        if msg["name"] in global_sites:
            check_proper(msg["name"], core_distribution(msg["fn"]))

    check_model_call(model, args, kwargs)
    checked = handlers.substitute(model.model, substitute_fn=refuse_improper)
    seeded = handlers.trace(handlers.seed(checked, rng_key)).get_trace(*args, **kwargs)
    check_global_sites(global_sites, seeded)
    structure = model_structure(model, args, kwargs)
    nesting = structure.max_plate_nesting
    values = {n: jnp.asarray(seeded[n]["value"]) for n in global_sites}
    trace = model.enumerated_trace(values, args, kwargs, nesting)
    if latents == "mean_field":
        reject_chains(
            trace,
            "VariationalBayesEM(latents='mean_field')",
            exact="VariationalBayesEM(latents='exact') (Beal's variational Bayesian HMM)",
        )
    groups, nw_readers, powers = find_pairs(
        model, global_sites, trace, values, args, kwargs, nesting
    )
    paired = {n for g in groups.values() for n in (g.precision, g.mean)}
    families = {}
    for name in global_sites:
        prior = core_distribution(trace.sites[name].fn)
        if name not in paired and type(prior) not in PRIOR_FAMILIES:
            raise ModelError(unsupported(name, f"{a_or_an(type(prior).__name__)} prior"))
        families[name] = type(prior)
    singles = [n for n in global_sites if n not in paired]
    readers = find_readers(model, singles, trace, values, args, kwargs, nesting, families)
    both = sorted(set(readers) & set(nw_readers))
    if both:
        raise ModelError(
            f"jaxem: site '{user_site_name(both[0])}' reads global site "
            f"'{readers[both[0]].source}' besides the conjugate pair "
            f"'{nw_readers[both[0]].mean}'/'{nw_readers[both[0]].precision}': "
            "VariationalBayesEM supports one conjugate prior per distribution. "
            "Fit by EM(model, global_sites=...) (MAP)."
        )
    # The expected factors are written unscaled: a scaled site (case weights,
    # handlers.scale) reading a global site would be fitted as if unweighted.
    scaled = [
        user_site_name(n)
        for n in (*readers, *nw_readers)
        if seeded.get(user_site_name(n), {}).get("scale") is not None
    ]
    if scaled or trace.weights is not None:
        raise ModelError(
            f"jaxem: VariationalBayesEM does not support scaled sites (case weights, "
            f"numpyro.handlers.scale){': site ' + repr(scaled[0]) if scaled else ''}. "
            "Fit the unweighted model, or use EM(model, global_sites=...) (MAP)."
        )
    powers.update(
        {
            (site, r.argument): (r.source, r.power)
            for site, r in readers.items()
            if r.power is not None
        }
    )
    plan = VBPlan(readers, families, nesting, groups, nw_readers, powers, tuple(global_sites))
    return plan, seeded, structure
