"""Checks of a model's arguments, data and initial values, before anything is fitted.

Everything here runs outside the compiled loop, on concrete values where it can
(`jaxem.checks.validate` gathers the values in one compiled check per model
and signature and calls `raise_for_invalid`):

* observed sites: data of exactly the site's shape (no broadcasting), inside
  the distribution's support, something observed at all;
* initial values: finite and inside their constraints (their names, shapes and
  kinds are checked by `jaxem.arguments.merge_init_params`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

from jaxem.exceptions import ModelError
from jaxem.missing import MissingData
from jaxem.numpyro_internals import (
    OBSERVED_SUFFIX,
    UNOBSERVED_SUFFIX,
    distribution_mask,
    failing_site,
)
from jaxem.regularization import coordinate_variance

__all__ = [
    "Validity",
    "check_observed_site",
    "check_values",
    "core_family",
    "good_values",
    "model_failure",
    "non_finite_data_error",
    "raise_for_bad_values",
    "raise_for_invalid",
]

# How many offending entries an out-of-support error shows.
_NUM_SHOWN = 3


# ---------------------------------------------------------------------------
# Observed sites.
# ---------------------------------------------------------------------------


def core_family(fn):
    """The distribution under plate expansion, masks, ``to_event`` and missing entries."""
    while isinstance(
        fn, (MissingData, dist.ExpandedDistribution, dist.MaskedDistribution, dist.Independent)
    ):
        fn = fn.base_dist
    return fn


def _user_name(name: str) -> str:
    # NumPyro splits a site with obs_mask= into "<name>_observed" and "<name>_unobserved".
    for suffix in (OBSERVED_SUFFIX, UNOBSERVED_SUFFIX):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _site_label(name: str) -> str:
    if _user_name(name) != name:
        return f"'{_user_name(name)}' (obs_mask= part '{name}')"
    return f"'{name}'"


def check_observed_site(name: str, site: dict) -> None:
    """Raise a `ModelError` unless an observed site's data has the shape of
    its distribution after plates (``sample_shape + batch_shape + event_shape``),
    up to size-1 dims of the distribution that the data fills (a distribution
    shared by repeated measurements).

    Data that merely broadcasts is refused: a single value against a plate of
    200 would be fitted as 200 copies of it, and an ``(N, 1)`` array against a
    2-D MultivariateNormal would fill both coordinates.
    """
    fn, value = site["fn"], site["value"]
    if isinstance(core_family(fn), dist.Unit):
        return  # numpyro.factor: the value is a placeholder, the factor is the density
    sample_shape = tuple(site["kwargs"].get("sample_shape", ()))
    event = tuple(fn.event_shape)
    expected = sample_shape + tuple(fn.batch_shape) + event
    shape = tuple(jnp.shape(value))
    core_event = tuple(core_family(fn).event_shape)
    # The distribution may broadcast to the data (one mean shared by repeated
    # measurements: every data value is still scored once); the data may not broadcast
    # to the distribution, and the core family's event (a MultivariateNormal's D) must
    # match exactly.
    if (
        len(shape) == len(expected)
        and all(s == e or e == 1 for s, e in zip(shape, expected))
        and shape[len(shape) - len(core_event) :] == core_event
    ):
        return
    plates = ", ".join(f"'{f.name}' (size {f.size}, dim {f.dim})" for f in site["cond_indep_stack"])
    if event and shape[len(shape) - len(event) :] != event:
        fix = (
            f"The trailing dims of the data are the event shape {event}: e.g. a "
            f"{event[-1]}-dimensional MultivariateNormal takes rows of {event[-1]} coordinates."
        )
    else:
        fix = (
            "Give the data the plate's size along each plate dim, or declare trailing data "
            "dims as event dims with .to_event()."
        )
    raise ModelError(
        f"jaxem: observed site {_site_label(name)} has data of shape {shape}, but its "
        f"distribution has shape {expected} (batch shape {tuple(fn.batch_shape)} from its "
        f"plates {plates or '(none)'} and arguments, event shape {event}). jaxem does not "
        f"broadcast data (a size-1 axis would be fitted as copies of one value). {fix}"
    )


def _observed_entries(fn, value):
    """``(scored, in_support)``: which events of an observed site enter the likelihood
    (not masked by ``obs_mask``/``handlers.mask``, not entirely missing), and which lie
    in the support of the distribution; both shaped like the data's batch dims at the
    level of the core family (its event dims removed)."""
    observed, masks = None, []
    while isinstance(
        fn, (MissingData, dist.ExpandedDistribution, dist.MaskedDistribution, dist.Independent)
    ):
        if isinstance(fn, MissingData):
            observed = fn.observed
        elif isinstance(fn, dist.MaskedDistribution):
            masks.append((distribution_mask(fn), fn.event_dim))
        fn = fn.base_dist
    event_ndim = fn.event_dim
    shape = jnp.shape(value)[: jnp.ndim(value) - event_ndim]
    scored = jnp.ones(shape, bool)
    for mask, mask_event_ndim in masks:
        if mask is None or mask is True:
            continue
        if mask is False:
            scored = jnp.zeros(shape, bool)
            continue
        # A mask is shaped like the batch of its wrapper, whose event dims may be
        # batch dims of the core family (to_event outside the mask).
        mask = jnp.reshape(mask, jnp.shape(mask) + (1,) * (mask_event_ndim - event_ndim))
        scored = scored & jnp.broadcast_to(mask, shape)
    if observed is not None:
        observed = jnp.broadcast_to(observed, jnp.shape(value))
        scored = scored & jnp.any(observed, axis=tuple(range(len(shape), jnp.ndim(value))))
    if isinstance(fn, dist.Unit):
        return scored, jnp.ones(shape, bool)
    try:
        in_support = fn.support.check(value)
    except NotImplementedError:  # a custom constraint without a check
        in_support = True
    return scored, jnp.broadcast_to(in_support, shape)


def describe_support(fn) -> str:
    """The support of a site's distribution in words (concrete arguments)."""
    support = core_family(fn).support
    constraints = dist.constraints
    words = [
        (constraints.boolean, "{0, 1}"),
        (constraints.nonnegative_integer, "the non-negative integers 0, 1, 2, ..."),
        (constraints.positive_integer, "the positive integers 1, 2, ..."),
        (constraints.positive, "the positive reals"),
        (constraints.nonnegative, "the non-negative reals"),
        (constraints.simplex, "the simplex (non-negative entries summing to 1)"),
    ]
    for constraint, text in words:
        if support is constraint:
            return text
    low, high = getattr(support, "lower_bound", None), getattr(support, "upper_bound", None)
    if low is not None and high is not None and jnp.size(low) == 1 and jnp.size(high) == 1:
        low, high = np.asarray(low).item(), np.asarray(high).item()
        if support.is_discrete:
            return f"the integers {low}, ..., {high}"
        return f"the interval [{low}, {high}]"
    return repr(support)


# ---------------------------------------------------------------------------
# Values: one compiled check, then named errors.
# ---------------------------------------------------------------------------


class Validity(NamedTuple):
    """What one compiled check found (arrays; `raise_for_invalid` reads them).

    Attributes:
        non_finite: ``{observed site: number of NaN or infinite entries}``.
        good_params: ``{param: finite and inside its constraint}``.
        partial: ``{site with missing entries: number of events partly missing in
            a family without a closed-form marginal}``.
        coverage: ``{param: {MultivariateNormal site it reaches: which coordinates
            some row observes}}`` (see `check_values`).
        outside_support: ``{observed site: (number of observed events outside the
            support, their first indices (k, ndim), their values)}``.
        num_observed: ``{observed site: number of events that enter the likelihood}``.
        priors: ``{site: 0}`` for the sites whose density depends on parameters only
            (`prior_sites`).
        arguments: ``{(site, argument): (number of cells outside its support, an
            example)}`` (`jaxem.supports.argument_support`).
        spread: ``{observed Gaussian site: variance of its data per coordinate}``
            (`jaxem.regularization.coordinate_variance`).
    """

    non_finite: dict
    good_params: dict
    partial: dict
    coverage: dict
    outside_support: dict
    num_observed: dict
    priors: dict
    arguments: dict
    spread: dict


def check_values(
    structure, params: dict, sites: dict, reach=None, priors=(), arguments=None
) -> Validity:
    """Validity of data and initial values as arrays (jittable).

    Args:
        structure: the model's `jaxem.inspection.ModelStructure`.
        params: initial values.
        sites: ``{observed site: (distribution, data)}`` at ``params``, missing
            entries filled (`jaxem.missing.MissingEntries`).
        reach: ``{param: the MultivariateNormal sites whose arguments depend
            on it}`` (`jaxem.inspection.mvn_sites_of_params`).
        priors: names of the sites that are priors (`prior_sites`).
        arguments: `jaxem.supports.argument_support` of the model at
            ``params`` (None: not checked).

    Returns:
        A `Validity`. Its ``coverage`` holds only params that reach
        nothing but sites with missing entries, all with the same number of
        coordinates, that being the length of the param's last axis (a
        per-coordinate param).
    """
    non_finite = {
        name: jnp.sum(~jnp.isfinite(value))
        for name, (_, value) in sites.items()
        if jnp.issubdtype(jnp.result_type(value), jnp.inexact)
    }
    good_params = good_values(structure, params)
    missing = {name: fn for name, (fn, _) in sites.items() if isinstance(fn, MissingData)}
    partial = {}
    for name, fn in missing.items():
        core = core_family(fn)
        if core.event_dim and type(core) is not dist.MultivariateNormal:
            axes = tuple(range(-core.event_dim, 0))
            entries = fn.observed
            partial[name] = jnp.sum(jnp.any(entries, axis=axes) & ~jnp.all(entries, axis=axes))
    coverage = {}
    for name, reached in (reach or {}).items():
        # A site without missing entries observes every coordinate.
        if not all(site in missing for site in reached):
            continue
        sizes = {missing[site].event_shape[-1] for site in reached}
        if len(sizes) != 1 or jnp.shape(params[name])[-1:] != tuple(sizes):
            continue
        coverage[name] = {
            site: jnp.any(jnp.reshape(missing[site].observed, (-1, *sizes)), axis=0)
            for site in reached
        }
    outside, num_observed, spread = {}, {}, {}
    for name, (fn, value) in sites.items():
        if jnp.size(value) == 0:  # a site of a scan of no steps observes nothing
            continue
        scored, in_support = _observed_entries(fn, value)
        num_observed[name] = jnp.sum(scored)
        variance = coordinate_variance(fn, value, scored)
        if variance is not None:
            spread[name] = variance
        bad = scored & ~in_support
        if bad.ndim == 0:
            bad = bad[None]
            value = jnp.asarray(value)[None]
        index = jnp.nonzero(bad, size=_NUM_SHOWN, fill_value=0)
        outside[name] = (jnp.sum(bad), jnp.stack(index, axis=-1), jnp.asarray(value)[index])
    priors = {name: jnp.zeros(()) for name in priors}
    return Validity(
        non_finite,
        good_params,
        partial,
        coverage,
        outside,
        num_observed,
        priors,
        arguments or {},
        spread,
    )


def raise_for_invalid(
    structure,
    validity: Validity,
    *,
    fitting: bool = True,
    frozen=(),
    support_of: Callable[[str], str] | None = None,
) -> None:
    """Raise a `ModelError` naming the first invalid site or param.

    A param whose coordinates are missing in every row of every site it
    reaches (``validity.coverage``) is an error only when ``fitting`` and the
    param is not ``frozen``: the data say nothing about those entries, but the
    densities (log-likelihood, posterior, imputation) marginalize them exactly.
    Likewise a model with nothing observed is an error only when ``fitting``
    (its log-likelihood, 0, is correct). ``support_of(site)`` describes the
    support of a site's distribution, for the out-of-support error.
    """
    for counts, message in ((validity.non_finite, _NON_FINITE), (validity.partial, _PARTIAL)):
        for name, count in counts.items():
            if int(count):
                raise ModelError(message.format(name=name, count=int(count)))
    for name, (count, index, values) in validity.outside_support.items():
        if int(count):
            _raise_outside_support(name, int(count), index, values, support_of)
    for name in validity.priors:
        raise ModelError(
            f"jaxem: site '{name}' has a log-density that depends on parameters only, not on "
            "any data: it is a prior (numpyro.factor or an observed site whose value is a "
            "parameter), and EM would silently add it to log_likelihood, bic and aic as if it "
            "were data. For MAP estimation, write the parameter as a sample site with its "
            "prior, numpyro.sample(name, prior), and name it in EM(model, global_sites=(...)): "
            "the log prior is then reported apart (log_prior) and log_likelihood stays the "
            "data's. Otherwise remove the prior from the model. If the site is part of the "
            "likelihood of the data, make it depend on the data: pass the data as an argument "
            "of the model, or put the site inside the data's plate."
        )
    if fitting and not sum(int(count) for count in validity.num_observed.values()):
        sites = ", ".join(
            f"'{name}'" for name in dict.fromkeys(map(_user_name, validity.num_observed))
        )
        what = (
            f"every entry of the observed site(s) {sites} is missing (NaN under "
            "jaxem.nan_as_missing, or masked by obs_mask= or handlers.mask)"
            if sites
            else "the model has no observed sample site (numpyro.sample(..., obs=data))"
        )
        raise ModelError(
            f"jaxem: nothing is observed: {what}. The likelihood of no data is constant, so "
            "EM has nothing to fit. Pass data with observed entries."
        )
    if fitting:
        fitted = {name: v for name, v in validity.coverage.items() if name not in frozen}
        _raise_for_unobserved_coordinates(fitted)
    raise_for_bad_values(structure, validity.good_params)


def non_finite_data_error(name: str, count: int) -> ModelError:
    """The error for an observed site with ``count`` NaN or infinite data entries,
    pointing to `jaxem.nan_as_missing` (every fitter raises it)."""
    return ModelError(_NON_FINITE.format(name=name, count=count))


def model_failure(err: Exception) -> ModelError:
    """The error for a model that raised while it was traced, naming the sample site
    NumPyro was processing (and the plate that rejected its shape) when it can."""
    found = failing_site(err)
    if found is None:
        return ModelError(f"jaxem: running the model failed: {err}")
    name, plate, fn = found
    where = f"at sample site '{name}'"
    if plate is not None:
        batch = f" with batch shape {tuple(fn.batch_shape)}" if fn is not None else ""
        where += f"{batch}, inside numpyro.plate('{plate.name}', {plate.size}) at dim {plate.dim}"
    if plate is None and "shape" not in str(err):
        return ModelError(f"jaxem: running the model failed {where}: {err}")
    return ModelError(
        f"jaxem: running the model failed {where}: {err}. Inside a plate of size N at dim "
        "d, a site's batch shape must have N (or 1) at dim d: the plates make the batch "
        "dims from the right, and the dims of one draw belong in .to_event(n) (e.g. "
        "dist.Normal(mu, tau).expand([2]).to_event(1) inside plate(N) for N draws of a "
        "2-vector, not .expand([N, 2])). Check the shapes of this site's distribution."
    )


def good_values(structure, params: dict) -> dict:
    """``{param: finite and inside its constraint (a global site: its prior's support)}``."""
    return {
        name: jnp.all(jnp.isfinite(params[name]))
        & jnp.all(structure.constraints[name].check(params[name]))
        for name in structure.param_names
    }


def raise_for_bad_values(structure, good: dict) -> None:
    """A ModelError naming the first param or global site whose value is bad
    (``good``: `good_values`, concrete)."""
    for name, ok in good.items():
        if not bool(ok) and name in structure.global_sites:
            raise ModelError(
                f"jaxem: the value of global site '{name}' is not finite or lies outside the "
                f"support of its prior, {structure.constraints[name]}. Give an initial value "
                "in that support (init_params), or a prior whose support holds it."
            )
        if not bool(ok):
            raise ModelError(
                f"jaxem: the value of param '{name}' is not finite or lies outside its "
                f"constraint {structure.constraints[name]}. Give a value that satisfies it (the "
                "model's initial value, init_params, or the params passed in): e.g. a simplex "
                "sums to 1 along its last axis, lower_cholesky needs a positive diagonal."
            )


_NON_FINITE = (
    "jaxem: observed site '{name}' contains {count} NaN or infinite "
    "value(s). If NaN marks missing values, fit jaxem.nan_as_missing(model) (NaN "
    "entries are then marginalized) or pass obs_mask= to numpyro.sample; otherwise "
    "remove or correct those entries before fitting. Infinite values are never "
    "treated as missing."
)
_PARTIAL = (
    "jaxem: observed site '{name}' has {count} event(s) with some but not "
    "all entries missing, and its distribution has no closed-form marginal over "
    "part of an event (jaxem marginalizes partly missing events of a "
    "MultivariateNormal or of independent univariate entries, .to_event()). "
    "Mark whole events missing, or model the entries as separate sites."
)


def _raise_outside_support(name, count, index, values, support_of) -> None:
    index, values = np.asarray(index), np.asarray(values)
    shown = ", ".join(
        f"[{', '.join(str(i) for i in position)}] = {value.tolist()}"
        for position, value in zip(index[: min(count, _NUM_SHOWN)], values)
    )
    support = f" ({support_of(name)})" if support_of is not None else ""
    raise ModelError(
        f"jaxem: observed site {_site_label(name)} has {count} observed value(s) outside the "
        f"support of its distribution{support}, where its log-density is -inf; the first at "
        f"(index in the site's data) {shown}. Recode the data into the support (e.g. "
        "Bernoulli takes 0/1, Categorical takes 0, ..., K-1, Poisson non-negative integers), "
        "drop those entries, or mark them missing (obs_mask= or jaxem.nan_as_missing)."
    )


def _raise_for_unobserved_coordinates(coverage: dict) -> None:
    """The error for the coordinates that no row of any site a param reaches
    observes, naming every param with the same sites and coordinates."""
    failures: dict = {}
    for name, per_site in coverage.items():
        seen = np.any(np.stack([np.asarray(v) for v in per_site.values()]), axis=0)
        if not seen.all():
            key = (tuple(per_site), tuple(np.flatnonzero(~seen).tolist()))
            failures.setdefault(key, []).append(name)
    if not failures:
        return
    (sites, coords), params = next(iter(failures.items()))
    site_list = ", ".join(f"'{s}'" for s in sites)
    param_list = ", ".join(f"'{p}'" for p in params)
    raise ModelError(
        f"jaxem: coordinate(s) {list(coords)} of the MultivariateNormal site(s) {site_list} "
        f"are missing in every row of every site that param(s) {param_list} reach, so the "
        "data say nothing about those params' entries for them and EM cannot estimate "
        "them. Drop those coordinates from the data and the model, or fit data that "
        "observe each coordinate somewhere (log_likelihood, posterior and impute accept "
        "such data: the missing coordinates are marginalized)."
    )
