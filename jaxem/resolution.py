"""A warning for a fitted scale at or below the floating-point resolution of its location.

Numbers near ``m`` are ``eps |m|`` apart (``eps``: the dtype's machine epsilon, 1.2e-7
in float32). A Normal component whose standard deviation is comparable with that
spacing cannot be fitted: neither its location nor the data it sits on are known finer
than a few of those steps, so the fitted location, the scale the next stage fits around
it and the log-likelihood are set by rounding, not by the data. A float32 HMM on tied
data at -4.6e5 (spacing 0.03) collapses a component onto the ties with a scale of
``sqrt(reg_covar) = 1e-3``; its location then lands an ulp off the tie, the scale fits
the ulp (0.031), and the fit ends 47 nats below the float64 one with nothing but a
`ConvergenceWarning` (``tests/test_properties.py``).

The threshold is `RESOLUTION_ULPS` steps: a location moves only when its solved move
exceeds ``2 * LOCATION_ROUNDING * eps |m|`` (`jaxem.gaussian_stats.keep_within_rounding`),
so it is resolved to that distance and no finer. A standard deviation at or below it
may leave the location a whole standard deviation from the maximizer of Q (half a nat
per point) with the guard unable to tell the move from rounding. A healthy fit is far
from it: data at an offset of 1e3 standard deviations (the property tests' largest in
float32) have ``sd / (eps |m|)`` near 8e3, a thousand times the threshold.

One coordinate of a MultivariateNormal is compared through its conditional standard
deviation given the other coordinates, ``1 / sqrt(P_dd)`` (``P`` the precision): the
spread along which the location must be resolved, never larger than the marginal
``sqrt(Sigma_dd)``. A LogNormal's location is that of ``log x``, whose resolution is
``eps (|m| + 1)`` (the rounding of ``x`` adds ``eps`` to its logarithm).

The check runs once, after a fit (outside the compiled loop), on the enumerated trace at
the fitted params: every Normal, LogNormal and MultivariateNormal site whose location
or scale some param fits in closed form, in mixtures and HMMs alike, masked cells left
out.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

from jaxem.gaussian_stats import LOCATION_ROUNDING
from jaxem.numpyro_internals import user_site_name
from jaxem.regularization import variances_fn, warn_numerically
from jaxem.supports import core_and_mask
from jaxem.tracing import enumerated_trace

__all__ = ["RESOLUTION_ULPS", "unresolved_scales", "warn_if_scale_unresolved"]

# A standard deviation at or below this many spacings eps |location| is below the
# resolution of its location: the distance within which keep_within_rounding leaves a
# location unmoved.
RESOLUTION_ULPS = 2 * LOCATION_ROUNDING

_SCALE_ARGS = ("scale", "scale_tril", "covariance_matrix", "precision_matrix")


def _location_and_scale(core):
    """``(location, |location| as its resolution sees it, scale)``, one per coordinate
    (event dim last; a MultivariateNormal's conditional standard deviations), or None
    for a family without a location and scale."""
    if type(core) is dist.Normal:
        loc = jnp.asarray(core.loc)[..., None]
        return loc, jnp.abs(loc), jnp.asarray(core.scale)[..., None]
    if type(core) is dist.LogNormal:
        loc = jnp.asarray(core.base_dist.loc)[..., None]
        return loc, jnp.abs(loc) + 1, jnp.asarray(core.base_dist.scale)[..., None]
    if type(core) is dist.MultivariateNormal:
        precision = jnp.diagonal(core.precision_matrix, axis1=-2, axis2=-1)
        return core.loc, jnp.abs(core.loc), 1.0 / jnp.sqrt(precision)
    return None


def _checked_sites(plan) -> dict:
    """``{site: {"loc": params, "scale": params}}`` for the sites whose location or
    scale argument some param fits in closed form (internal site names)."""
    sites: dict = {}
    for name, path in plan.items():
        if path.kind != "closed-form":
            continue
        for site, arg in path.consumers:
            role = "loc" if arg == "loc" else "scale" if arg in _SCALE_ARGS else None
            if role is not None:
                sites.setdefault(site, {"loc": [], "scale": []})[role].append(name)
    return sites


def unresolved_scales(trace, plan) -> dict:
    """``{site: (family, loc params, scale params, sd, location, dtype)}`` for every
    checked site (see `_checked_sites`) with a scale at most
    ``RESOLUTION_ULPS * eps * |location|`` in a cell that counts (masked cells do
    not); ``sd`` and ``location`` those of the coordinate with the smallest ratio
    (concrete ``trace``)."""
    found = {}
    for site, roles in _checked_sites(plan).items():
        if site not in trace.sites:
            continue
        core, mask = core_and_mask(trace.sites[site].fn)
        found_args = _location_and_scale(core)
        if found_args is None:
            continue
        loc, magnitude, sd = (np.asarray(a) for a in found_args)
        if not np.issubdtype(sd.dtype, np.floating):
            continue
        batch = [sd.shape[:-1], magnitude.shape[:-1], tuple(core.batch_shape)]
        if mask is not None:
            batch.append(np.shape(mask))
        shape = np.broadcast_shapes(*batch) + sd.shape[-1:]
        loc, magnitude, sd = (np.broadcast_to(a, shape) for a in (loc, magnitude, sd))
        eps = float(np.finfo(sd.dtype).eps)
        counts = magnitude > 0
        if mask is not None:
            counts = counts & np.broadcast_to(np.asarray(mask, bool)[..., None], shape)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(counts, sd / (eps * magnitude), np.inf)
        if not ratio.size or not np.min(ratio) <= RESOLUTION_ULPS:
            continue
        worst = np.unravel_index(np.argmin(ratio), shape)
        found[site] = (
            type(core).__name__,
            tuple(roles["loc"]),
            tuple(roles["scale"]),
            float(sd[worst]),
            float(loc[worst]),
            sd.dtype,
        )
    return found


def _may_be_unresolved(params, plan, sites) -> bool:
    """A necessary condition for `unresolved_scales` to find anything, from the params
    alone (no trace, nothing compiled: the check costs a healthy fit nothing): some
    site's smallest standard deviation bound, ``sqrt`` of the smallest variance (or
    covariance eigenvalue, below every conditional variance) its scale params give, at
    most ``RESOLUTION_ULPS * eps * (max |location param| + 1)``. True where a site's
    location or scale is not such a param (then the trace decides)."""
    for roles in sites.values():
        if not roles["loc"] or not roles["scale"]:
            return True
        smallest = np.inf
        for name in roles["scale"]:
            variances = variances_fn(plan[name].update)
            if variances is None:
                return True
            values = np.asarray(variances(np.asarray(params[name], np.float64)))
            smallest = min(smallest, float(np.sqrt(np.maximum(np.min(values), 0.0))))
        locs = [np.asarray(params[name]) for name in roles["loc"]]
        largest = max(float(np.max(np.abs(loc.astype(np.float64)))) for loc in locs)
        eps = float(np.finfo(np.result_type(*locs)).eps)
        if not smallest > RESOLUTION_ULPS * eps * (largest + 1):
            return True
    return False


def warn_if_scale_unresolved(model, params, args, kwargs, max_plate_nesting, plan) -> None:
    """A `NumericalWarning` for every site (as the user named it) whose fitted standard
    deviation is at or below `RESOLUTION_ULPS` spacings of its location
    (`unresolved_scales`; concrete ``params``): it names the site, the params, the
    dtype and what to do."""
    sites = _checked_sites(plan)
    if not sites or not _may_be_unresolved(params, plan, sites):
        return
    fitted = {k: jnp.asarray(v) for k, v in params.items()}
    trace = enumerated_trace(model, fitted, args, kwargs, max_plate_nesting, log_probs=False)
    # One warning per group of params, naming every site they fit (an HMM's first
    # step and its later steps), with the numbers of the worst cell.
    groups: dict = {}
    for site, found in unresolved_scales(trace, plan).items():
        family, locs, scales, sd, loc, dtype = found
        key = (family, tuple(dict.fromkeys(locs + scales)), dtype.name)
        sites, worst = groups.get(key, ({}, None))
        sites[user_site_name(site)] = None
        spacing = float(np.spacing(np.asarray(abs(loc), dtype)))
        if worst is None or sd / spacing < worst[0] / worst[2]:
            worst = (sd, loc, spacing)
        groups[key] = (sites, worst)
    for (family, names, dtype), (sites, (sd, loc, spacing)) in groups.items():
        where = ", ".join(f"'{s}'" for s in sites)
        params_named = f", params {', '.join(repr(p) for p in names)}" if names else ""
        log = " (the location of log x)" if family == "LogNormal" else ""
        eps = float(np.finfo(dtype).eps)
        threshold = RESOLUTION_ULPS * eps * (abs(loc) + (family == "LogNormal"))
        warn_numerically(
            f"jaxem: the fitted scale {sd:.3g} of site{'s' if len(sites) > 1 else ''} "
            f"{where} ({family}{params_named}) is below the floating-point "
            f"resolution of its location {loc:.7g}{log}: {dtype} numbers there are "
            f"{spacing:.3g} apart, and a scale at most {RESOLUTION_ULPS:g} eps "
            f"|location| = {threshold:.3g} (eps = {eps:.3g}, {dtype}'s machine epsilon) "
            "cannot be fitted: the location, the scale and the log-likelihood are then set "
            "by rounding, not by the data (a component collapsed onto tied points, or data "
            f"far from 0 against their spread). {_fix(dtype)}"
        )


_STANDARDIZE = (
    "center and scale the data (subtract the mean and divide by the standard deviation "
    "of each coordinate; transform the fitted params back)"
)


def _fix(dtype: str) -> str:
    if dtype == "float64":
        return f"Fit fewer components or {_STANDARDIZE}."
    return (
        "Fit in float64 (jax.config.update('jax_enable_x64', True) before creating the "
        f"data), or {_STANDARDIZE}."
    )
