"""Closed forms for a Normal location affine in params: weighted least squares.

A Normal whose location is an affine function of some params, with a design
that may depend on the data and the latents, ``Normal(X @ beta[z], sigma[z])``,
``Normal((beta[z] * X).sum(-1), sigma)``, ``Normal(mean + scores @ loadings.T,
noise)`` (the scores drawn by a Monte Carlo E-step), has an expected
complete-data log-likelihood that is exactly quadratic in those params given the
scale. With ``loc = J theta + c`` over the cells, weights ``w`` (posterior cell
weights, or Monte Carlo draw weights) and precisions ``P = scale^-2``, its
maximizer solves the normal equations

    (J^T W J) theta = J^T W (y - c),   W = diag(w P),

whose two sides are sums over the cells, linear in the weights: averaging them
over weighted draws (SAEM, MCEM) or minibatches (online EM) and then solving is
the stochastic-approximation recursion on genuine sufficient statistics.

Detection (`affine_paths`) reads the planner's jaxpr of ``params -> (log
probabilities, distribution arguments)`` once more, without another trace of the
model: a param takes this path when every output it reaches is the ``loc`` of a
Normal (the sites' log-probabilities aside), never the scale, a value, another
family or a prior's argument; params that share a location are solved jointly,
and the location must be of degree at most 1 in them jointly
(`jaxem.selection.affine_degrees`). The Jacobian ``J`` is materialized (one JVP
per coordinate), so the group has at most `MAX_AFFINE_COORDINATES` coordinates and
``J`` at most `MAX_JACOBIAN_ENTRIES` entries; a larger group keeps the gradient path.

A param that is a global site (MAP) takes this path too when its prior is a Normal,
or a MultivariateNormal over its last axis, whose arguments depend on no param: the
log prior is quadratic, a ridge term ``(Lambda, Lambda m)`` added to the normal
equations (`ridge_statistics`, added by `jaxem.closed_form_step` after any Monte
Carlo or running average). Any other prior keeps the gradient path.

The solve (`solve_affine`) scales the normal equations to a unit diagonal and
factors them by Cholesky. A coordinate with no weight (an empty component) keeps
its value; a design that is singular or nearly so (collinear columns) is solved
by the pseudo-inverse from the current point: a maximizer of Q all the same, the
one that moves the params least. Such coefficients are not identified: each fitter
flags them at the fit and warns (`jaxem.identification`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax.flatten_util import ravel_pytree

from jaxem.closed_form import ClosedFormUpdate
from jaxem.numpyro_internals import user_site_name
from jaxem.selection import affine_degrees

__all__ = [
    "AFFINE_UPDATE",
    "MAX_AFFINE_COORDINATES",
    "MAX_JACOBIAN_ENTRIES",
    "affine_paths",
    "ridge_statistics",
    "solve_affine",
]

MAX_AFFINE_COORDINATES = 64
MAX_JACOBIAN_ENTRIES = 2**25


def _executed_elsewhere(*_):
    raise NotImplementedError(
        "jaxem: an affine Normal location is solved by jaxem.closed_form_step, not per cell"
    )


# The update of a param on this path: stage 1 (before the scale), real values. Its
# statistics and solve are the group's (`jaxem.closed_form_step`), not per cell.
AFFINE_UPDATE = ClosedFormUpdate(_executed_elsewhere, _executed_elsewhere, stage=1)


def _candidate(name, keys, labels, unsupported_site, domain, constraint, own=None):
    """The output indices of the Normal locations ``name`` reaches, or None when it
    reaches anything else (a scale, a value, another family, a prior's argument).
    ``own``: the param's own global site (its prior), left to `_ridge_prior`."""
    locs, sites = [], set()
    for index, (key, label) in enumerate(zip(keys, labels)):
        if name not in label or key[1] == own:
            continue
        kind, site, detail = key
        if kind == "log_prob":
            sites.add(site)
        elif kind == "arg" and detail == (dist.Normal, "loc"):
            locs.append(index)
        else:
            return None
    if not locs or any(s in unsupported_site for s in sites):
        return None
    if sites != {keys[i][1] for i in locs} or not domain(constraint):
        return None
    return locs


def _ridge_prior(site, prior_cls, keys, labels):
    """Why the prior of the global site ``site`` is no ridge term of the normal
    equations, or None when it is: a Normal, or a MultivariateNormal, whose arguments
    depend on no param."""
    shown = f"its prior ({prior_cls.__name__} at site '{user_site_name(site)}')"
    if prior_cls not in _RIDGE_PRIORS:
        return f"{shown} is not Normal or MultivariateNormal: no weighted least squares"
    own = [(key, label) for key, label in zip(keys, labels) if key[0] == "arg" and key[1] == site]
    if not own:
        return f"{shown} was not recognized: no weighted least squares"
    reading = sorted({p for _, label in own for p in label})
    if reading:
        arguments = sorted({key[2][1] for key, label in own if label})
        return (
            f"{shown} has {', '.join(arguments)} depending on params {reading}: no weighted "
            "least squares (a prior with fixed arguments is a ridge term)"
        )
    return None


_RIDGE_PRIORS = (dist.Normal, dist.MultivariateNormal)


def _groups(candidates):
    """Params sharing a location (transitively), each group in model order."""
    order = list(candidates)
    parent = {n: n for n in order}

    def root(n):
        while parent[n] != n:
            n = parent[n]
        return n

    first_at: dict = {}
    for name in order:
        for index in candidates[name]:
            other = first_at.setdefault(index, name)
            parent[root(name)] = root(other)
    groups: dict = {}
    for name in order:
        groups.setdefault(root(name), []).append(name)
    return [tuple(g) for g in groups.values()]


def affine_paths(
    plan, keys, labels, closed, structure, params, registry, own_priors, forced=frozenset()
):
    """``plan`` with the gradient-path params whose Normal locations are affine in
    them moved to this closed form (`jaxem.mstep.ParamPath` with ``affine`` set to
    the group solved jointly).

    Args:
        plan: ``{param: ParamPath}`` from the selection rules.
        keys, labels: the planner's outputs and their dependencies.
        closed: the planner's jaxpr (inputs: the params in ``structure.param_names``
            order, then the data arrays).
        own_priors: ``{global site: its prior's class}`` (MAP): a param with a Normal
            or MultivariateNormal prior whose arguments depend on no param takes
            this path with the prior as a ridge term (``ParamPath.prior`` is then
            ``(site, None)``); any other prior keeps the gradient path.
        forced: params sent down the gradient path by name (``m_step={name:
            "gradient"}``): not on this path.
    """
    normal_loc = registry.get(dist.Normal, {}).get("loc")
    if normal_loc is None:
        return plan
    unsupported_site = {k[1]: k[2] for k in keys if k[0] == "family"}
    candidates, no_ridge = {}, {}
    for name, path in plan.items():
        if path.kind != "gradient" or name in forced:
            continue
        own = name if name in own_priors else None
        locs = _candidate(
            name,
            keys,
            labels,
            unsupported_site,
            normal_loc.domain,
            structure.constraints[name],
            own,
        )
        if locs is None:
            continue
        why_not = None if own is None else _ridge_prior(own, own_priors[own], keys, labels)
        if why_not is not None:
            no_ridge[name] = why_not
            continue
        candidates[name] = locs
    plan = dict(plan)
    for name, why_not in no_ridge.items():
        plan[name] = plan[name]._replace(reason=f"{plan[name].reason}; {why_not}")
    if not candidates:
        return plan
    names = list(structure.param_names)
    num_arrays = len(closed.jaxpr.invars) - len(names)
    for group in _groups(candidates):
        locs = sorted({i for n in group for i in candidates[n]})
        sites = ", ".join(dict.fromkeys(f"'{user_site_name(keys[i][1])}'" for i in locs))
        degrees = affine_degrees(closed, [int(n in group) for n in names] + [0] * num_arrays)
        size = sum(int(np.prod(jnp.shape(params[n]))) for n in group)
        cells = sum(int(np.prod(closed.jaxpr.outvars[i].aval.shape)) for i in locs)
        why_not = None
        if any(degrees[i] > 1 for i in locs):
            why_not = f"Normal.loc at site {sites} is not affine in it either"
        elif size > MAX_AFFINE_COORDINATES or size * cells > MAX_JACOBIAN_ENTRIES:
            why_not = (
                f"Normal.loc at site {sites} is affine, but in {size} coordinates over "
                f"{cells} cells: above the weighted least-squares limits "
                f"(jaxem.affine.MAX_AFFINE_COORDINATES = {MAX_AFFINE_COORDINATES}, "
                f"MAX_JACOBIAN_ENTRIES = {MAX_JACOBIAN_ENTRIES})"
            )
        if why_not is not None:
            for n in group:
                plan[n] = plan[n]._replace(reason=f"{plan[n].reason}; {why_not}")
            continue
        consumers = tuple((keys[i][1], "loc") for i in locs)
        for n in group:
            others = ", ".join(f"'{m}'" for m in group if m != n)
            jointly = f" jointly with {others}" if others else ""
            prior, ridge = None, ""
            if n in own_priors:
                prior = (n, None)
                ridge = (
                    f"; its prior ({own_priors[n].__name__} at site '{user_site_name(n)}') "
                    "a ridge term"
                )
            plan[n] = type(plan[n])(
                "closed-form",
                f"Normal.loc at site {sites} (affine{jointly}: weighted least squares{ridge})",
                AFFINE_UPDATE,
                consumers,
                prior=prior,
                affine=group,
            )
    return plan


def ridge_statistics(priors, olds):
    """The normal equations ``(gram, rhs)`` of a group's priors: for a member with a
    Normal prior ``N(m, s^2)`` (entrywise) the diagonal ``s^-2`` and ``s^-2 m``, for
    one with a MultivariateNormal prior ``N(m, P^-1)`` over its last axis the blocks
    ``P`` and ``P m``, zeros for a member without a prior (None), laid out as
    `solve_affine` flattens the group. Added to the data's equations, their solution
    maximizes Q plus the log priors (MAP)."""
    grams, rhss = [], []
    for prior, old in zip(priors, olds):
        shape, dtype = jnp.shape(old), jnp.result_type(old)
        size = int(np.prod(shape))
        if prior is None:
            grams.append(jnp.zeros((size, size), dtype))
            rhss.append(jnp.zeros((size,), dtype))
        elif isinstance(prior, dist.MultivariateNormal):
            dim = shape[-1]
            precision = jnp.broadcast_to(prior.precision_matrix.astype(dtype), shape + (dim,))
            precision = precision.reshape(-1, dim, dim)
            loc = jnp.broadcast_to(prior.loc.astype(dtype), shape).reshape(-1, dim)
            blocks = jnp.eye(precision.shape[0], dtype=dtype)
            grams.append(jnp.einsum("kl,kij->kilj", blocks, precision).reshape(size, size))
            rhss.append(jnp.einsum("kij,kj->ki", precision, loc).reshape(size))
        else:
            precision = jnp.broadcast_to(jnp.asarray(prior.scale, dtype) ** -2, shape)
            loc = jnp.broadcast_to(jnp.asarray(prior.loc, dtype), shape)
            grams.append(jnp.diag(precision.reshape(size)))
            rhss.append((precision * loc).reshape(size))
    return jax.scipy.linalg.block_diag(*grams), jnp.concatenate(rhss)


def solve_affine(statistics, olds):
    """The params of a group from its normal equations ``(gram, rhs)``: ``gram theta
    = rhs`` (see the module docstring), ``olds`` the group's current values, in
    group order. Returns the new values, in the same order."""
    gram, rhs = statistics
    flat, unravel = ravel_pytree(list(olds))
    gram, rhs = gram.astype(flat.dtype), rhs.astype(flat.dtype)
    size = flat.size
    diagonal = jnp.diagonal(gram)
    informed = diagonal > 0
    inv_sd = jnp.where(informed, jax.lax.rsqrt(jnp.where(informed, diagonal, 1)), 0)
    # Unit diagonal; a coordinate without weight decoupled, its step 0.
    scaled = gram * inv_sd[:, None] * inv_sd[None, :] + jnp.diag(jnp.where(informed, 0, 1))
    residual = (rhs - gram @ flat) * inv_sd
    chol = jnp.linalg.cholesky(scaled)
    pivots = jnp.diagonal(chol)
    eps = jnp.finfo(flat.dtype).eps
    well_posed = jnp.all(jnp.isfinite(chol)) & (jnp.min(pivots) ** 2 > 10 * size * eps)
    step = jax.lax.cond(
        well_posed,
        lambda: jax.scipy.linalg.cho_solve((jnp.where(well_posed, chol, 1.0), True), residual),
        lambda: jnp.linalg.pinv(scaled, hermitian=True) @ residual,
    )
    return unravel(flat + jnp.where(informed, step * inv_sd, 0))
