"""Warnings for a ``reg_covar`` that is not small against the data.

The closed-form variance and covariance updates add ``reg_covar`` to what the
data give (`jaxem.gaussian_stats`). On data whose spread is comparable to
it (measurements at a scale of 1e-4 with the default 1e-6), the regularizer
decides the fit: components merge or are held at a variance of ``reg_covar``,
and since the M-step then maximizes a regularized Q rather than Q, the
log-likelihood need not increase from one iteration to the next. Nothing in
the compiled loop can say so; these checks run in Python around it:

* before a fit, on the data's variance per coordinate
  (`coordinate_variance`, computed in the compiled validity check);
* after it, on the fitted variances (`warn_if_held_by_reg_covar`).
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

from jaxem.exceptions import NumericalWarning
from jaxem.gaussian_stats import (
    normal_scale_solve,
    solve_covariance,
    solve_precision,
    solve_scale_tril,
)
from jaxem.missing import MissingData
from jaxem.numpyro_internals import user_site_name

__all__ = [
    "DATA_FACTOR",
    "FLOOR_FACTOR",
    "coordinate_variance",
    "regularized_sites",
    "variances_fn",
    "warn_if_held_by_reg_covar",
    "warn_if_reg_covar_dominates",
    "warn_numerically",
]

# reg_covar above this fraction of a coordinate's variance is not small: a component a
# thousand times tighter than the data (the scale of clusters that EM separates) would
# get a variance dominated by it.
DATA_FACTOR = 1e-3

# A fitted variance below this many times reg_covar is held up by it: the data's own
# part is at most nine tenths of it.
FLOOR_FACTOR = 10.0

_GAUSSIANS = (dist.Normal, dist.LogNormal, dist.MultivariateNormal)


def coordinate_variance(fn, value, scored):
    """The variance of an observed Gaussian site's data (``log`` of it for a
    LogNormal) over its batch dims, one per coordinate (event dims, ``to_event``
    ones included); None for other families. Jittable.

    Args:
        fn: the site's distribution.
        value: its data.
        scored: which events enter the likelihood, shaped like the data's batch
            dims at the level of the core family.
    """
    observed, reinterpreted = None, 0
    while isinstance(
        fn, (MissingData, dist.ExpandedDistribution, dist.MaskedDistribution, dist.Independent)
    ):
        if isinstance(fn, MissingData):
            observed = fn.observed
        elif isinstance(fn, dist.Independent):
            reinterpreted += fn.reinterpreted_batch_ndims
        fn = fn.base_dist
    if type(fn) not in _GAUSSIANS or not jnp.issubdtype(jnp.result_type(value), jnp.inexact):
        return None
    ndim = jnp.ndim(value)
    weight = jnp.reshape(scored, jnp.shape(scored) + (1,) * fn.event_dim)
    weight = jnp.broadcast_to(weight, jnp.shape(value))
    if observed is not None:
        weight = weight & jnp.broadcast_to(observed, jnp.shape(value))
    x = jnp.log(jnp.where(weight, value, 1)) if type(fn) is dist.LogNormal else value
    x = jnp.where(weight, x, 0)
    axes = tuple(range(ndim - reinterpreted - fn.event_dim))
    count = jnp.sum(weight, axes)
    safe = jnp.maximum(count, 1)
    mean = jnp.sum(x, axes) / safe
    variance = jnp.sum(jnp.where(weight, (x - mean) ** 2, 0), axes) / safe
    return jnp.where(count > 1, variance, jnp.nan)


# The closed-form solves that add reg_covar, and the variances their params give.
_VARIANCES = {
    normal_scale_solve: lambda scale: scale[..., None] ** 2,
    solve_covariance: np.linalg.eigvalsh,
    solve_scale_tril: lambda tril: np.linalg.svd(tril, compute_uv=False) ** 2,
    solve_precision: lambda precision: 1.0 / np.linalg.eigvalsh(precision),
}


def variances_fn(update):
    """``param value -> its variances`` for a closed-form update that adds
    ``reg_covar``: the built-in Gaussian solves, or a registered update's
    ``variance_fn`` (None when neither says)."""
    return update.variance_fn or _VARIANCES.get(update.solve_fn)


def regularized_sites(plan) -> dict:
    """``{param: the sites (as the user named them) whose variance or covariance it
    is}`` for the params whose closed-form update adds ``reg_covar`` (the built-in
    Gaussian scales and covariances, and registered updates that give a
    ``variance_fn``)."""
    found = {}
    for name, path in plan.items():
        if path.kind == "closed-form" and variances_fn(path.update) is not None:
            sites = dict.fromkeys(user_site_name(site) for site, _ in path.consumers)
            found[name] = tuple(sites)
    return found


def warn_numerically(message: str) -> None:
    """A `NumericalWarning` attributed to the first caller outside jaxem."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(0), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, NumericalWarning, stacklevel=level)


_CONSEQUENCE = (
    "The fit is then one of the regularized objective, not of the likelihood: components "
    "merge or are held at a variance of reg_covar, and the log-likelihood need not "
    "increase monotonically from one iteration to the next (the M-step maximizes Q plus "
    "the regularizer). Standardize the data (subtract the mean and divide by the standard "
    "deviation of each coordinate; transform the fitted params back) or lower reg_covar"
)


def warn_if_reg_covar_dominates(spread: dict, plan_fn: Callable[[], dict], reg_covar) -> None:
    """Warn when ``reg_covar`` exceeds `DATA_FACTOR` times the smallest positive
    variance per coordinate (``spread``: `jaxem.validation.Validity.spread`,
    concrete) of a site whose variance some param fits in closed form.

    ``plan_fn()`` gives the M-step plan (`jaxem.mstep.plan_m_step`); it is
    called only when some site's data are at such a scale."""
    if reg_covar <= 0:
        return
    small = [
        np.nanmin(np.where(v > 0, v, np.nan))
        for v in (np.asarray(x, np.float64).reshape(-1) for x in spread.values())
        if np.any(v > 0)
    ]
    if not small or reg_covar <= DATA_FACTOR * min(small):
        return
    for name, sites in regularized_sites(plan_fn()).items():
        for site in sites:
            variance = np.asarray(spread.get(site, np.nan), np.float64).reshape(-1)
            variance = variance[np.isfinite(variance) & (variance > 0)]
            if not variance.size or reg_covar <= DATA_FACTOR * variance.min():
                continue
            smallest = float(variance.min())
            warn_numerically(
                f"jaxem: reg_covar={reg_covar:g} is not small against the data of site "
                f"'{site}', whose smallest variance per coordinate is {smallest:.3g} "
                f"(standard deviation {np.sqrt(smallest):.3g}); it is added to every variance "
                f"that param '{name}' gets in closed form, so it is not negligible there. "
                f"{_CONSEQUENCE}, e.g. EM(model, reg_covar={DATA_FACTOR**2 * smallest:.1g})."
            )
            return


def warn_if_held_by_reg_covar(params: dict, plan, reg_covar: float) -> None:
    """Warn when a fitted variance (a covariance eigenvalue) of a param whose closed-form
    update adds ``reg_covar`` is at most `FLOOR_FACTOR` times ``reg_covar``: the
    regularizer, not the data, holds that component up (concrete ``params``)."""
    if reg_covar <= 0:
        return
    for name, sites in regularized_sites(plan).items():
        update = plan[name].update
        variances = np.asarray(variances_fn(update)(np.asarray(params[name], np.float64)))
        smallest = np.min(variances, axis=-1)
        held = smallest <= FLOOR_FACTOR * reg_covar
        if not np.any(held):
            continue
        # A scalar param (one variance shared by every component) has no entries to name.
        entries = [[int(i) for i in index] for index in np.argwhere(held)] if held.ndim else []
        matrix = update.variance_fn is None and update.solve_fn is not normal_scale_solve
        what = "smallest covariance eigenvalue" if matrix else "variance"
        site_list = ", ".join(f"'{s}'" for s in sites)
        shown = entries[:3] if smallest.ndim else []
        where = f" at entries {shown}{' ...' if len(entries) > 3 else ''}" if shown else ""
        warn_numerically(
            f"jaxem: the fitted {what} of param '{name}' (site {site_list}){where} is "
            f"{float(np.min(smallest)):.3g}, within a factor {FLOOR_FACTOR:g} of "
            f"reg_covar={reg_covar:g}: the regularizer, not the data, holds that component "
            "up (the data at that scale, or a component collapsed onto few points). "
            f"{_CONSEQUENCE}; if a component collapsed, fit fewer components or start "
            "elsewhere (num_restarts > 1)."
        )
