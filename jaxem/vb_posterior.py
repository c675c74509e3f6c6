"""q(theta) of `jaxem.VariationalBayesEM`'s global sites under its plan: the
moments and a point of q, q as NumPyro distributions, the VB-M-step (prior
natural parameters plus expected statistics), the priors' parameters and the KL
of q from them. Single sites go through their prior family
(`jaxem.expected_log.PRIOR_FAMILIES`), conjugate pairs through `jaxem.vb_pairs`.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxem.expected_log import PRIOR_FAMILIES, conjugate_update
from jaxem.vb_pairs import PAIRS, update_pairs
from jaxem.vb_sites import prior_params

__all__ = ["kl", "moments", "new_q", "point", "posteriors", "prior_values", "singles"]


def singles(plan) -> list:
    """The global sites outside a conjugate pair (Normal-Wishart, Normal-Gamma, ...)."""
    paired = {n for g in plan.groups.values() for n in (g.precision, g.mean)}
    return [n for n in plan.global_sites if n not in paired]


def moments(q, plan) -> dict:
    """``{global site: E_q[T(theta)]}``, the expected sufficient statistics of q(theta)."""
    out = {n: PRIOR_FAMILIES[plan.families[n]].moments(q[n]) for n in singles(plan)}
    for g in plan.groups.values():
        out[g.precision], out[g.mean] = PAIRS[type(g)].moments(q[g.precision], q[g.mean])
    return out


def point(q, plan) -> dict:
    """``{global site: a point of q(theta)}`` (where the model is traced)."""
    out = {n: PRIOR_FAMILIES[plan.families[n]].point(q[n]) for n in singles(plan)}
    for g in plan.groups.values():
        out[g.precision], out[g.mean] = PAIRS[type(g)].point(q[g.precision], q[g.mean])
    return out


def posteriors(q, plan) -> dict:
    """``{global site: q(theta) as a NumPyro distribution}``, in the user's order."""
    out = {n: PRIOR_FAMILIES[plan.families[n]].make(q[n]) for n in singles(plan)}
    for g in plan.groups.values():
        out[g.precision], out[g.mean] = PAIRS[type(g)].make(q[g.precision], q[g.mean])
    return {n: out[n] for n in plan.global_sites}


def new_q(priors, stats, plan, restat) -> dict:
    """The VB-M-step: natural parameters the prior's plus the statistics
    (``restat``: see `jaxem.vb_pairs.update_pairs`)."""
    q = {
        name: conjugate_update(PRIOR_FAMILIES[plan.families[name]], priors[name], stats[name])
        for name in singles(plan)
    }
    return {**q, **update_pairs(plan.groups, priors, stats, restat)}


def prior_values(trace, plan) -> dict:
    """``{global site: its prior's parameters}``, read from the trace."""
    priors = {}
    for g in plan.groups.values():
        priors[g.precision], priors[g.mean] = PAIRS[type(g)].priors(trace, g)
    for name in singles(plan):
        priors[name] = prior_params(trace, name)
    return priors


def kl(q, priors, plan):
    """``KL(q(theta) || p(theta))``, summed over the global sites."""
    total = 0.0
    for name in singles(plan):
        family = PRIOR_FAMILIES[plan.families[name]]
        total = total + jnp.sum(family.kl(q[name], priors[name]))
    for g in plan.groups.values():
        total = total + PAIRS[type(g)].kl(
            q[g.precision], q[g.mean], priors[g.precision], priors[g.mean]
        )
    return total
