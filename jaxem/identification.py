"""Whether the coefficients solved by weighted least squares (`jaxem.affine`) are
identified at a fit, and the warning when they are not.

A group of params whose Normal locations are affine in them solves the normal
equations ``G theta = b``. Where the weighted Gram matrix ``G`` (its Normal priors'
precisions included) is singular, or singular to the working precision, the
maximizer is not unique: collinear covariates, a component that no data reach, a
coefficient no data inform. The M-step then takes the pseudo-inverse step (the
maximizer nearest the current values) and the fitted coefficients along the null
directions are whatever the start made them. Each fitter computes, in its compiled
program, which entries of those params are not identified at the fitted params
(`unidentified_entries`, from the normal equations that an M-step from there would
solve: `jaxem.closed_form_step.affine_equations`) and stores them in its result
(``result.unidentified``); ``run`` warns with `warn_if_unidentified`.

The test: scale ``G`` to a unit diagonal; its eigenvalues below ``size * sqrt(eps)``
(``eps`` the dtype's machine epsilon, ``size`` the group's coordinates) span the
null directions: along them the solve amplifies rounding by more than
``1 / sqrt(eps)``, at least 1e7 in float64, 3e3 in float32 (a correlation between two
covariates above 1 - 3e-4 in float32). An entry is not identified when more than 1 %
of its unit vector lies in that span (``sum_k v_ik^2`` over the null eigenvectors),
or when no weight reaches it at all.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jaxem.closed_form_step import with_affine_priors
from jaxem.exceptions import NumericalWarning
from jaxem.fit_warnings import user_stacklevel
from jaxem.numpyro_internals import user_site_name
from jaxem.tracing import enumerated_trace

__all__ = [
    "unidentified_entries",
    "unidentified_from_statistics",
    "unidentified_params",
    "warn_if_unidentified",
]

NULL_SHARE = 0.01


def unidentified_entries(gram, olds):
    """``[bool array of each param's shape]``: the entries of a group's params (in
    group order, as `jaxem.affine.solve_affine` flattens them) that the normal
    equations with Gram matrix ``gram`` do not identify (see the module docstring)."""
    flat, unravel = ravel_pytree(list(olds))
    gram = jnp.asarray(gram, flat.dtype)
    size = flat.size
    diagonal = jnp.diagonal(gram)
    informed = diagonal > 0
    inv_sd = jnp.where(informed, jax.lax.rsqrt(jnp.where(informed, diagonal, 1)), 0)
    scaled = gram * inv_sd[:, None] * inv_sd[None, :]
    eigenvalues, vectors = jnp.linalg.eigh(scaled)
    threshold = size * jnp.sqrt(jnp.finfo(flat.dtype).eps)
    null = (eigenvalues <= threshold) | ~jnp.isfinite(eigenvalues)
    share = jnp.sum(jnp.where(null[None, :], vectors**2, 0), axis=1)
    flags = ~informed | (share > NULL_SHARE) | ~jnp.all(jnp.isfinite(scaled))
    return [f > 0.5 for f in unravel(flags.astype(flat.dtype))]


def unidentified_params(equations, params) -> dict:
    """``{param: bool array of its shape}`` for every param of the groups in
    ``equations`` (``{group: (gram, rhs)}``, `jaxem.closed_form_step.affine_equations`)."""
    found = {}
    for group, (gram, _) in equations.items():
        found.update(zip(group, unidentified_entries(gram, [params[n] for n in group])))
    return found


def unidentified_from_statistics(
    model, params, statistics, plan, args, kwargs, max_plate_nesting, prior_weight
) -> dict:
    """`unidentified_params` from the normal equations that a fitter keeps
    (``statistics``, ``{param: (gram, rhs)}``: online EM's running averages), its
    members' priors added with ``prior_weight`` (`with_affine_priors`)."""
    paths = {n: p for n, p in plan.items() if p.kind == "closed-form" and p.affine}
    groups = [g for g in dict.fromkeys(p.affine for p in paths.values()) if g[0] in statistics]
    if not groups:
        return {}
    trace = enumerated_trace(model, params, args, kwargs, max_plate_nesting, log_probs=False)
    equations = {
        g: with_affine_priors(statistics[g[0]], g, paths, trace, params, prior_weight)
        for g in groups
    }
    return unidentified_params(equations, params)


def warn_if_unidentified(unidentified, plan, name: str) -> None:
    """A `NumericalWarning` naming the params (their entries) and sites of a fit whose
    least-squares coefficients are not identified (``unidentified``: a result's
    ``{param: bool array}``; ``plan``: ``{param: ParamPath}``, for the sites), with
    the fix. Nothing under ``jit``/``vmap`` or when every entry is identified."""
    if not unidentified or any(isinstance(v, jax.core.Tracer) for v in unidentified.values()):
        return
    found = {n: np.asarray(v) for n, v in unidentified.items() if np.any(np.asarray(v))}
    if not found:
        return
    described, sites = [], []
    for param, flags in found.items():
        if flags.ndim == 0:
            described.append(f"'{param}'")
        else:
            entries = [tuple(int(i) for i in index) for index in np.argwhere(flags)]
            shown = ", ".join(str(e[0] if len(e) == 1 else e) for e in entries[:8])
            more = f", ... ({len(entries)} of {flags.size})" if len(entries) > 8 else ""
            described.append(f"'{param}' (entries {shown}{more})")
        path = plan.get(param)
        for site, _ in getattr(path, "consumers", ()):
            sites.append(f"'{user_site_name(site)}'")
    where = ", ".join(dict.fromkeys(sites))
    warnings.warn(
        f"jaxem: {name}: the coefficients {', '.join(described)} of the Normal location at "
        f"site {where} are not identified: the weighted design of the least-squares "
        "M-step is rank-deficient at the fitted params (collinear covariates, a component "
        "no data reach, or a coefficient no data inform), so the likelihood has no unique "
        "maximizer along them and their fitted values are set by the start (the "
        "pseudo-inverse step moves them least). Drop or combine the collinear covariates, "
        "remove the empty component, or add a prior: a Normal prior on them (global_sites) "
        "is solved in closed form as a ridge term.",
        NumericalWarning,
        stacklevel=user_stacklevel(),
    )
