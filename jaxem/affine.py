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

The solve (`solve_affine`) scales the normal equations to a unit diagonal and
factors them by Cholesky. A coordinate with no weight (an empty component) keeps
its value; a design that is singular or nearly so (collinear columns) is solved
by the pseudo-inverse from the current point: a maximizer of Q all the same, the
one that moves the params least.
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


def _candidate(name, keys, labels, unsupported_site, domain, constraint):
    """The output indices of the Normal locations ``name`` reaches, or None when it
    reaches anything else (a scale, a value, another family, a prior's argument)."""
    locs, sites = [], set()
    for index, (key, label) in enumerate(zip(keys, labels)):
        if name not in label:
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


def affine_paths(plan, keys, labels, closed, structure, params, registry, own_priors):
    """``plan`` with the gradient-path params whose Normal locations are affine in
    them moved to this closed form (`jaxem.mstep.ParamPath` with ``affine`` set to
    the group solved jointly).

    Args:
        plan: ``{param: ParamPath}`` from the selection rules.
        keys, labels: the planner's outputs and their dependencies.
        closed: the planner's jaxpr (inputs: the params in ``structure.param_names``
            order, then the data arrays).
        own_priors: the params that are global sites with a prior (MAP): not on
            this path (their prior would need its own statistics).
    """
    normal_loc = registry.get(dist.Normal, {}).get("loc")
    if normal_loc is None:
        return plan
    unsupported_site = {k[1]: k[2] for k in keys if k[0] == "family"}
    candidates = {}
    for name, path in plan.items():
        if path.kind != "gradient" or name in own_priors:
            continue
        locs = _candidate(
            name, keys, labels, unsupported_site, normal_loc.domain, structure.constraints[name]
        )
        if locs is not None:
            candidates[name] = locs
    if not candidates:
        return plan
    plan = dict(plan)
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
            plan[n] = type(plan[n])(
                "closed-form",
                f"Normal.loc at site {sites} (affine{jointly}: weighted least squares)",
                AFFINE_UPDATE,
                consumers,
                affine=group,
            )
    return plan


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
