"""The factors of one enumerated latent (a mixture), gathered for a logsumexp.

`jaxem.estep` contracts them to the log-likelihood and `jaxem.weights` to one
log-likelihood per element of the data plate: both first sum, per site, the
factors over the plates nested inside the latent's (conditional independence)
and add up those that depend on the latent.
"""

from __future__ import annotations

import jax.numpy as jnp

__all__ = ["gather_latent_factors"]


def gather_latent_factors(log_factors: dict, trace, name: str):
    """``(joint, enum_dim, rest)`` for the one latent site ``name``.

    Args:
        log_factors: ``{site name: log-density}`` of an enumerated trace.
        trace: the trace (`jaxem.tracing.EnumTrace`).
        name: the latent site.

    Returns:
        ``joint``: the sum of the factors that depend on the latent, each summed
        over the plates nested inside the latent's (kept as size-1 axes);
        ``enum_dim``: the latent's enumeration dim (negative), None for a
        support of one value (``joint`` is then None too); ``rest``: the sum of
        every other factor.
    """
    latent = trace.sites[name]
    enum_dims = [d for d, n in latent.dim_to_name.items() if n == name]
    if not enum_dims:  # a support of one value: nothing to sum out
        return None, None, sum(jnp.sum(log_prob) for log_prob in log_factors.values())
    involved, rest = [], 0.0
    for site_name, site in trace.sites.items():
        log_prob = log_factors[site_name]
        if name not in site.dim_to_name.values():
            rest = rest + jnp.sum(log_prob)
            continue
        inner = tuple(
            jnp.ndim(log_prob) + d
            for d, n in site.dim_to_name.items()
            if n in site.plates and n not in latent.plates
        )
        involved.append(jnp.sum(log_prob, axis=inner, keepdims=True) if inner else log_prob)
    return sum(involved[1:], involved[0]), enum_dims[0], rest
