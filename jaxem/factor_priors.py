"""Observed sites that are priors on parameters rather than data.

A ``numpyro.factor`` that depends on parameters only, or an observed site whose
``obs=`` value is made of parameters, is a prior: EM would silently add it to the
log-likelihood and to `bic`. `prior_sites` finds them, before anything is fitted
(`jaxem.checks.validate` reports them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.distributions.distribution import validation_enabled
from numpyro.primitives import Messenger

from jaxem.arguments import is_array, merge_args
from jaxem.global_sites import global_site_names
from jaxem.missing import MissingEntries
from jaxem.selection import dependencies
from jaxem.validation import core_family

__all__ = ["prior_sites"]


class _RawObserved(Messenger):
    """Record the value each observed site receives from the model (``obs=``)."""

    def __init__(self, fn):
        self.values = {}
        super().__init__(fn)

    def process_message(self, msg):
        if msg["type"] == "sample" and msg["is_observed"]:
            self.values[msg["name"]] = msg["value"]


def prior_sites(model, rng_key, arrays, spec, params: dict) -> tuple[str, ...]:
    """Names of the observed sites that are priors on parameters rather than data.

    Read from the jaxpr of ``(params, model arguments, site values) -> (each
    numpyro.factor's log-factor, each observed site's obs= value)``, latent and
    observed site values substituted as inputs (`jaxem.selection.dependencies`).
    A site is a prior when

    * it is a ``numpyro.factor`` whose log-factor depends on no model argument,
      no latent value and no observed value (it depends on parameters only, or
      is a constant), and it lies in no plate of a sample site (a factor inside
      the data's plate is a per-observation term of the likelihood, such as a
      truncation's normalizer); or
    * it is an observed sample site whose ``obs=`` value depends on parameters
      and on no model argument or site value (``numpyro.sample("prior",
      dist.Normal(0, 10), obs=mu)``). Data held in the model as a constant is data.
    """
    args, kwargs = merge_args(arrays, spec)
    fixed = handlers.substitute(MissingEntries(model), data=params)
    with validation_enabled(False):
        tr = handlers.trace(handlers.seed(fixed, rng_key)).get_trace(*args, **kwargs)
    sample_sites = {n: s for n, s in tr.items() if s["type"] == "sample"}
    if not any(s["is_observed"] for s in sample_sites.values()):
        return ()
    values = {
        n: s["value"]
        for n, s in sample_sites.items()
        # An empty value (the sites of a scan of no steps) carries nothing to depend on,
        # and substituting it would make NumPyro's scan index into it.
        if not isinstance(core_family(s["fn"]), dist.Unit) and jnp.size(s["value"]) > 0
    }
    names = tuple(params)
    outputs: list = []

    def analysed(param_values, array_values, site_values):
        args, kwargs = merge_args(array_values, spec)
        raw = _RawObserved(model)
        data = {**dict(zip(names, param_values)), **site_values}
        fixed = handlers.substitute(MissingEntries(raw), data=data)
        with validation_enabled(False):
            tr = handlers.trace(handlers.seed(fixed, rng_key)).get_trace(*args, **kwargs)
        outputs.clear()
        results = []
        for name, site in tr.items():
            if site["type"] != "sample" or not site["is_observed"]:
                continue
            core = core_family(site["fn"])
            if isinstance(core, dist.Unit):
                outputs.append((name, True))
                results.append(core.log_factor)
            elif name in raw.values and is_array(raw.values[name]):
                outputs.append((name, False))
                results.append(raw.values[name])
        return results

    try:
        closed = jax.make_jaxpr(analysed)([params[n] for n in names], list(arrays), values)
    except Exception:  # noqa: BLE001
        # NumPyro could not re-run the model with its site values substituted (a nested
        # scan, say): no prior can be told apart here, and the enumerated trace that every
        # entry point builds next reports what is wrong with the model in its own words.
        return ()
    labels = [{"param": True}] * len(names) + [{"data": True}] * (
        len(closed.jaxpr.invars) - len(names)
    )
    found = dependencies(closed, labels)
    flagged = [
        name
        for (name, is_factor), depends in zip(outputs, found)
        if "data" not in depends and (is_factor or "param" in depends)
    ]
    data_plates = {
        frame.name
        for name, site in sample_sites.items()
        if name in values and name not in flagged
        for frame in site["cond_indep_stack"]
    }

    def in_data_plate(name):
        return any(frame.name in data_plates for frame in sample_sites[name]["cond_indep_stack"])

    # An obs= value made of parameters is a prior wherever it sits; a factor inside
    # the data's plate is a per-observation term of the likelihood. A global site's
    # prior is the model's, declared (jaxem.global_sites): reported apart.
    global_sites = global_site_names(model)
    return tuple(
        name
        for name in flagged
        if (name in values or not in_data_plate(name)) and name not in global_sites
    )
