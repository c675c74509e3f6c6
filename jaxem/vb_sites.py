"""Which sites of a model read which global sites, for variational Bayes EM.

`jaxem.VariationalBayesEM` replaces every factor that reads a global site
by its expectation under q (`jaxem.expected_log`). Which factors those are,
and through which distribution argument, is found on concrete values, once per
input signature: a JVP of the recorded constructor arguments (and of every
factor's log-probability) in a random direction of each global site. An argument
must be a selection of the site (indexing, broadcasting): that is what makes the
expectation of the factor the factor of the selected moments; or, for a Normal's
precision, the scale ``sel(tau) ** -1/2`` (`jaxem.vb_powers`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

from jaxem.conjugate import core_distribution
from jaxem.exceptions import ModelError, a_or_an
from jaxem.expected_log import (
    EXPECTED_LOG_DENSITIES,
    POWER_ARGUMENTS,
    PRIOR_FAMILIES,
    supported_pairs,
)
from jaxem.missing import MissingData
from jaxem.numpyro_internals import distribution_mask, user_site_name
from jaxem.stick_breaking import is_stick_breaking, stick_breaking_expected
from jaxem.vb_powers import PowerReads

__all__ = [
    "Reader",
    "check_pair_factors",
    "check_proper",
    "compiled",
    "core_args",
    "core_of",
    "expected_site_log_prob",
    "find_readers",
    "moved_arguments",
    "prior_params",
    "read_arguments",
    "site_args_fn",
    "tangent_fn",
    "unsupported",
]


class Reader(NamedTuple):
    """A site whose distribution argument ``argument`` is a selection of ``source``
    (``selected``), or a function of the whole site that ``expected`` takes the
    source's own moments for (``selected=False``: stick-breaking weights), or the
    selection to the power ``power`` (`jaxem.vb_powers`)."""

    source: str
    argument: str
    expected: Callable
    selected: bool = True
    power: float | None = None


def core_of(fn):
    """The distribution under missing entries, plate expansion, ``to_event``, masks."""
    return core_distribution(fn.base_dist if isinstance(fn, MissingData) else fn)


def core_args(trace, site):
    core = core_of(site.fn)
    record = trace.constructor_args.get(id(core))
    if record is None or record[2] is not core:
        return core, {}
    return core, {k: v for k, v in record[1].items() if k != "validate_args"}


def expected_site_log_prob(fn, value, expected):
    """The expected log-density of a site: ``expected(value)`` for its core
    distribution, summed over ``to_event`` dims and masked as the site is."""
    if isinstance(fn, MissingData):
        # Missing entries score nothing; the value holds a stand-in there.
        if fn.base_dist.event_shape:
            raise ModelError(
                "jaxem: VariationalBayesEM does not support missing entries (NaN) in a "
                "site with event dims; drop the incomplete rows."
            )
        lp = expected_site_log_prob(fn.base_dist, value, expected)
        return jnp.where(fn.observed, lp, 0.0)
    if isinstance(fn, dist.ExpandedDistribution):
        return expected_site_log_prob(fn.base_dist, value, expected)
    if isinstance(fn, dist.Independent):
        lp = expected_site_log_prob(fn.base_dist, value, expected)
        return jnp.sum(lp, axis=tuple(range(-fn.reinterpreted_batch_ndims, 0)))
    if isinstance(fn, dist.MaskedDistribution):
        lp = expected_site_log_prob(fn.base_dist, value, expected)
        mask = distribution_mask(fn)
        return lp if mask is None or mask is True else jnp.where(mask, lp, 0.0)
    return expected(value)


def check_proper(name, prior):
    """A ModelError for an improper prior (variational Bayes updates the prior)."""
    family = PRIOR_FAMILIES.get(type(prior))
    improper = isinstance(prior, dist.ImproperUniform)
    if family is not None:
        params = family.params(prior)
        improper = not bool(jnp.all(family.proper(params)))
    if improper:
        described = type(prior).__name__
        if family is not None:
            described += f" with parameters {[np.asarray(p).tolist() for p in params]}"
        raise ModelError(
            f"jaxem: global site '{name}' has an improper prior ({described}): "
            "variational Bayes needs a proper prior (positive concentrations and rates, "
            "finite positive scales), as q(theta) is the prior updated by the data. Give "
            f"'{name}' a proper conjugate prior ({supported_pairs()}), or fit by "
            "EM(model, global_sites=...) (MAP)."
        )


def prior_params(trace, name):
    """The constructor arrays of global site ``name``'s prior, in its
    `PRIOR_FAMILIES` entry, each broadcast to the site's shape."""
    site = trace.sites[name]
    prior = core_distribution(site.fn)
    shape = jnp.shape(site.value)
    return tuple(
        jnp.broadcast_to(jnp.asarray(p, jnp.result_type(float)), shape)
        for p in PRIOR_FAMILIES[type(prior)].params(prior)
    )


def unsupported(name, what):
    return (
        f"jaxem: global site '{name}' has {what}, which VariationalBayesEM does not "
        f"support in closed form. Supported conjugate pairs: {supported_pairs()}. For a "
        "MAP fit of any prior use EM(model, global_sites=...)."
    )


def compiled(fn):
    """``fn`` compiled once and called for the direction of every global site:
    eager JVPs of a whole model trace are slow. Eager (as written) where the
    model cannot be traced under ``jit`` or an output is not an array."""
    jitted = jax.jit(fn)

    def call(*a):
        try:
            return jitted(*a)
        except Exception:  # noqa: BLE001 - the eager call gives the same values
            return fn(*a)

    return call


def tangent_fn(fn):
    """``(values, direction) -> d fn(values) [direction]``, compiled (`compiled`)."""
    return compiled(lambda values, direction: jax.jvp(fn, (values,), (direction,))[1])


def site_args_fn(model, args, kwargs, nesting):
    """``values -> {site: its distribution's constructor arguments}`` in the
    enumerated trace at ``values`` (the global sites' values)."""

    def fn(vals):
        tr = model.enumerated_trace(vals, args, kwargs, nesting, log_probs=False)
        return {s: core_args(tr, site)[1] for s, site in tr.sites.items()}

    return fn


def moved_arguments(jvp, values, direction) -> dict:
    """``{(site, argument): change}`` for the distribution arguments that
    ``jvp`` (a `tangent_fn` of `site_args_fn`) moves along ``direction``."""
    moved = jvp(values, direction)
    return {
        (s, a): c
        for s, arguments in moved.items()
        for a, c in arguments.items()
        if isinstance(c, jax.Array) and bool(jnp.any(c != 0))
    }


def check_pair_factors(model, groups, names, values, direction, args, kwargs, nesting, spelling):
    """Raise unless every factor that moves with a conjugate pair's two global
    sites (``groups``: ``{precision site: pair}``, each with ``precision``,
    ``mean`` and ``readers``) is one of the pair's readers, taken in expectation;
    ``spelling`` (with ``{prec}`` and ``{mean}``) says how to write the pair."""

    def log_probs(vals):
        tr = model.enumerated_trace(vals, args, kwargs, nesting)
        return {s: site.log_prob for s, site in tr.sites.items() if s not in names}

    jvp_log_probs = tangent_fn(log_probs)
    for group in groups.values():
        for source in (group.precision, group.mean):
            moved = jvp_log_probs(values, direction(source))
            for site, change in moved.items():
                if bool(jnp.any(change != 0)) and site not in group.readers:
                    raise ModelError(
                        f"jaxem: site '{user_site_name(site)}' reads global site '{source}' "
                        "in a way VariationalBayesEM cannot take the expectation of; "
                        + spelling.format(prec=group.precision, mean=group.mean)
                        + "."
                    )


def read_arguments(model, names, trace, values, args, kwargs, nesting, families) -> dict:
    """Which distribution argument of which site each global site in ``names``
    reaches, found by a JVP in a random direction, each read checked: a selection
    of the global site, or its power (`jaxem.vb_powers`), or stick-breaking
    weights. ``values`` holds every global site (``names`` may leave out the
    jointly conjugate pairs).

    Returns:
        ``{site: [Reader, ...]}``, one Reader per global site the site reads (in
        the order of ``names``).
    """
    names = list(names)
    tangents = _tangents(values)
    site_args = site_args_fn(model, args, kwargs, nesting)
    reads: dict = {}
    site_args_jvp, site_args_fast = tangent_fn(site_args), compiled(site_args)
    at_values = None
    powers = PowerReads(site_args, values)
    for source in names:
        moved = site_args_jvp(values, _direction(tangents, values, source))
        linear = site_args_fast(_direction(tangents, values, source))
        for site_name, arguments in moved.items():
            shown = user_site_name(site_name)  # as the user wrote it (a scan step)
            for arg, change in arguments.items():
                if not isinstance(change, jax.Array) or not bool(jnp.any(change != 0)):
                    continue
                if site_name in values:
                    raise ModelError(
                        f"jaxem: the prior of global site '{shown}' depends on global "
                        f"site '{source}' (its '{arg}'): VariationalBayesEM supports "
                        "independent conjugate priors only. Fix the prior's parameters, "
                        "or fit by EM(model, global_sites=...) (MAP)."
                    )
                site = trace.sites[site_name]
                core = core_of(site.fn)
                found = reads.setdefault(site_name, [])
                if (
                    families[source] is dist.Beta
                    and isinstance(core, dist.CategoricalProbs)
                    and arg == "probs"
                ):
                    # Truncated stick-breaking (Dirichlet process) weights of Beta sticks.
                    at_values = site_args_fast(values) if at_values is None else at_values
                    if is_stick_breaking(
                        at_values[site_name][arg], values[source], change, tangents[source]
                    ):
                        found.append(Reader(source, arg, stick_breaking_expected, selected=False))
                        continue
                key = (type(core), arg, families[source])
                expected = EXPECTED_LOG_DENSITIES.get(key)
                pair = (
                    f"{a_or_an(families[source].__name__)} prior on "
                    f"{a_or_an(type(core).__name__)} '{arg}'"
                )
                if expected is None:
                    raise ModelError(unsupported(source, pair + f" (site '{shown}')"))
                power = POWER_ARGUMENTS.get(key)
                if power is not None:
                    # Read through a power (1 / sqrt(tau[z]), sqrt(v[z])), verified exactly.
                    if powers.power(site_name, arg, source) != power[0]:
                        raise ModelError(
                            f"jaxem: global site '{source}' has "
                            f"{a_or_an(families[source].__name__)} prior and reaches the "
                            f"'{arg}' of "
                            f"site '{shown}' ({type(core).__name__}) in a spelling "
                            "VariationalBayesEM cannot take in closed form. Supported: "
                            f"{power[1]}. For a MAP fit of any prior use "
                            "EM(model, global_sites=...)."
                        )
                    found.append(Reader(source, arg, expected, power=power[0]))
                    continue
                # A selection (indexing, broadcasting) of the global site maps a
                # direction to its own entries, and linearly: E log(2 lam) is not
                # E log lam, nor is E(mu + 1)^2 E mu^2 + 1.
                selected = np.asarray(linear[site_name][arg])
                if not (
                    np.allclose(selected, np.asarray(change))
                    and np.all(np.isin(selected, np.asarray(tangents[source])))
                ):
                    raise ModelError(
                        unsupported(
                            source,
                            pair + f" through a transformation (site '{shown}': "
                            "write the argument as the global site itself or an "
                            "indexing of it)",
                        )
                    )
                found.append(Reader(source, arg, expected))
    return {s: found for s, found in reads.items() if found}


def _tangents(values):
    rng = np.random.default_rng(0)
    return {
        n: jnp.asarray(rng.normal(size=jnp.shape(values[n])), jnp.result_type(values[n]))
        for n in values
    }


def _direction(tangents, values, source):
    return {n: (tangents[n] if n == source else jnp.zeros_like(values[n])) for n in values}


def find_readers(model, names, trace, values, args, kwargs, nesting, families) -> dict:
    """``{site: Reader}``: the one global site in ``names`` each site reads
    (`read_arguments`), every factor that moves with one of them checked to be
    taken in expectation."""
    names = list(names)
    readers = {}
    for site_name, found in read_arguments(
        model, names, trace, values, args, kwargs, nesting, families
    ).items():
        if len(found) > 1:
            raise ModelError(
                f"jaxem: site '{user_site_name(site_name)}' reads two global sites "
                f"('{found[0].source}' and '{found[1].source}'): "
                "VariationalBayesEM supports one global site per distribution, "
                "besides the conjugate pairs (for a Normal's mean and precision, "
                "mu ~ dist.Normal(m0, 1 / jnp.sqrt(beta0 * tau)), or independent priors "
                "mu ~ dist.Normal(m0, s0), tau ~ dist.Gamma(a0, b0) with "
                "x ~ dist.Normal(mu[z], 1 / jnp.sqrt(tau[z]))). "
                "Fit by EM(model, global_sites=...) (MAP)."
            )
        readers[site_name] = found[0]

    # Every factor that moves with a global site must be one taken in expectation:
    # a site read through anything not recorded above would otherwise keep its
    # density at one point of q (silently a different model).
    def site_log_probs(vals):
        tr = model.enumerated_trace(vals, args, kwargs, nesting)
        return {s: site.log_prob for s, site in tr.sites.items() if s not in values}

    log_probs_jvp = tangent_fn(site_log_probs)
    tangents = _tangents(values)
    for source in names:
        moved = log_probs_jvp(values, _direction(tangents, values, source))
        for site_name, change in moved.items():
            shown = user_site_name(site_name)  # as the user wrote it (a scan step)
            reader = readers.get(site_name)
            if bool(jnp.any(change != 0)) and (reader is None or reader.source != source):
                raise ModelError(
                    unsupported(
                        source,
                        f"{a_or_an(families[source].__name__)} prior, read by site '{shown}' "
                        f"({type(trace.sites[site_name].fn).__name__}) in a way it cannot "
                        "take the expectation of",
                    )
                )
    return readers
