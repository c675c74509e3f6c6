"""Model selection: free-parameter counts, BIC and AIC."""

from __future__ import annotations

import functools
import math
from functools import partial

import jax
import jax.numpy as jnp
from numpyro.distributions.transforms import biject_to

from jaxem.arguments import merge_args, split_args
from jaxem.chain import find_chain
from jaxem.estep import log_likelihood
from jaxem.global_sites import global_site_names, with_global_sites
from jaxem.inspection import inspect_model
from jaxem.masks import counted_cells
from jaxem.numpyro_internals import is_time_dim
from jaxem.tracing import enumerated_trace

__all__ = ["num_free_params", "num_observations", "bic", "aic"]


def num_free_params(model, params, *args, **kwargs) -> int:
    """Number of free parameters, counted in unconstrained space.

    A simplex of size K has K - 1 free entries, a D x D ``lower_cholesky`` or
    ``positive_definite`` matrix D (D + 1) / 2, an unconstrained array its size.
    """
    structure, _ = inspect_model(model, jax.random.PRNGKey(0), args, kwargs)
    total = 0
    for name in structure.param_names:
        transform = biject_to(structure.constraints[name])
        total += math.prod(transform.inverse_shape(jnp.shape(params[name])))
    return int(total)


def num_observations(model, *args, **kwargs) -> int:
    """Number of observations: the largest number of observed cells among the
    observed sites (the number of data points of a mixture, not points times
    dimensions); for a Markov chain written with ``scan``, the observed cells
    of its steps summed over time (the number of real time steps, as in
    hmmlearn), and likewise for a chain written as a Python loop under
    ``markov`` (where latents depend on latents, the observations of each
    latent are summed over the latents). Only cells that count are counted: masked cells
    (``numpyro.handlers.mask``, ``obs_mask``, the padding of sequences) and
    cells with nothing observed (NaN under [`jaxem.nan_as_missing`][jaxem.nan_as_missing]) are not.
    With case weights (a per-element ``numpyro.handlers.scale`` on a data plate,
    see [`jaxem.weights`][jaxem.weights]), the sum of the weights (a float).
    """
    arrays, spec = split_args(args, kwargs)
    count = _num_observations(model, arrays, spec)
    return float(count) if jnp.issubdtype(count.dtype, jnp.floating) else int(count)


@partial(jax.jit, static_argnums=(0, 2))
def _num_observations(model, arrays, spec):
    args, kwargs = merge_args(arrays, spec)
    structure, params = inspect_model(model, jax.random.PRNGKey(0), args, kwargs)
    trace = enumerated_trace(model, params, args, kwargs, structure.max_plate_nesting)
    if trace.weights is not None:
        return jnp.sum(trace.weights.values)
    chain = find_chain(trace)
    # A chain's observations are its steps (in its plates): several observed
    # cells per step in a nested plate are the coordinates of one observation.
    plate_dims = None if chain is None else chain.plate_dims
    counts = {}
    global_sites = global_site_names(model)  # parameters, not observations
    for name, site in trace.sites.items():
        if site.is_observed and name not in global_sites:
            counts[name] = _observed_cells(site, plate_dims)
    if not counts:
        return jnp.ones((), jnp.int32)
    if chain is None:
        return _unrolled_count(trace, counts)
    # One observation per real step: the largest count among the sites of each
    # position of the chain (initial state, first step, later steps), summed.
    positions = {"initial": [], "first": [], "steps": [], "other": []}
    for name in counts:
        site = trace.sites[name]
        if name in chain.stacked_sites:
            positions["steps"].append(counts[name])
        elif name in chain.first_sites:
            positions["first"].append(counts[name])
        elif chain.initial is not None and chain.initial in site.dim_to_name.values():
            positions["initial"].append(counts[name])
        else:
            positions["other"].append(counts[name])
    along = sum(
        functools.reduce(jnp.maximum, c) for key, c in positions.items() if c and key != "other"
    )
    return functools.reduce(jnp.maximum, positions["other"], along)


def _latents_of(site, latents):
    """The latent sites a site's factor depends on (its enumerated dims)."""
    return frozenset(n for n in site.dim_to_name.values() if n in latents and n != site.name)


def _unrolled_count(trace, counts):
    """The observations of a model without ``scan``.

    A mixture's observed sites are coordinates of the same data points: the
    largest count. Where latents depend on other latents (a chain written as a
    Python loop under ``markov``: ``z_t`` depends on ``z_{t-1}``), each latent
    is a unit with its own observations, as a ``scan`` chain's steps: the
    observed sites are grouped by the latents they depend on, the largest
    count of each group (in the plates of its latents) summed over the groups.
    Sites that depend on no latent count as in a mixture.
    """
    sites = trace.sites
    latents = {n for n, s in sites.items() if not s.is_observed}
    if not any(_latents_of(sites[n], latents) for n in latents):
        return functools.reduce(jnp.maximum, counts.values())
    groups, other = {}, []
    for name, count in counts.items():
        site = sites[name]
        depends = _latents_of(site, latents)
        if not depends:
            other.append(count)
            continue
        plate_dims = {d: p for n in depends for d, p in sites[n].plate_dims.items()}
        groups.setdefault(depends, []).append(_observed_cells(site, plate_dims))
    along = sum(functools.reduce(jnp.maximum, group) for group in groups.values())
    return functools.reduce(jnp.maximum, other, along)


def _observed_cells(site, plate_dims=None):
    """Cells of an observed site's plates (and time steps) that count: not
    masked, and with at least one entry observed. With ``plate_dims``, the cells
    of those plates only (one that counts where any cell of the others does)."""
    real = counted_cells(site.fn, site.value)
    # The enumerated dims of a site that depends on latents are not cells.
    for dim, name in site.dim_to_name.items():
        if name not in site.plates and not is_time_dim(name) and -dim <= real.ndim:
            real = jnp.take(real, jnp.array([0]), axis=dim)
        elif plate_dims is not None and name in site.plates and dim not in plate_dims:
            real = jnp.any(real, axis=dim, keepdims=True)
    return jnp.sum(real).astype(jnp.int32)


_count_observations = num_observations  # bic's keyword argument shadows the function


def bic(model, params, *args, num_observations=None, global_sites=(), **kwargs):
    """Bayesian information criterion ``-2 log L + k log n`` (lower is better).

    Under MAP-EM (``global_sites``), ``params`` are the MAP estimate and ``L``
    is still the data's likelihood ``p(x | params)`` (the prior does not enter:
    `jaxem.EMResult.log_likelihood`, not ``log_posterior``); ``k`` counts
    the global sites' free entries like any param's. BIC approximates
    ``-2 log p(x | model)`` around the maximum-likelihood estimate; the MAP
    estimate approaches it as ``n`` grows, so for large ``n`` the two BICs agree,
    while for small ``n`` a strong prior makes this one larger than the
    maximum-likelihood fit's.

    Args:
        model: the model.
        params: fitted ``{param name: value}``.
        *args, **kwargs: the model's arguments.
        num_observations: n; by default the observed cells that count, or the sum
            of the case weights (see `num_observations`).
        global_sites: the sample sites that are parameters with priors, as in
            [`jaxem.EM`][jaxem.EM]; their values are in ``params``.

    Examples:
        >>> import jax.numpy as jnp, numpyro, numpyro.distributions as dist
        >>> from numpyro.distributions import constraints
        >>> import jaxem
        >>> def model(x):
        ...     w = numpyro.param("w", jnp.array([0.5, 0.5]), constraint=constraints.simplex)
        ...     mu = numpyro.param("mu", jnp.array([-1.0, 1.0]))
        ...     with numpyro.plate("data", x.shape[0]):
        ...         z = numpyro.sample("z", dist.Categorical(w))
        ...         numpyro.sample("x", dist.Normal(mu[z], 1.0), obs=x)
        >>> params = {"w": jnp.array([0.5, 0.5]), "mu": jnp.array([-1.0, 1.0])}
        >>> x = jnp.array([-1.0, -1.2, 0.9, 1.1])
        >>> k, n = jaxem.num_free_params(model, params, x), jaxem.num_observations(model, x)
        >>> (k, n)
        (3, 4)
        >>> bool(jnp.isclose(jaxem.bic(model, params, x),
        ...                  -2 * jaxem.log_likelihood(model, params, x) + k * jnp.log(n)))
        True
    """
    model = with_global_sites(model, global_sites)
    n = num_observations
    if n is None:
        n = _count_observations(model, *args, **kwargs)
    k = num_free_params(model, params, *args, **kwargs)
    return -2.0 * log_likelihood(model, params, *args, **kwargs) + k * math.log(n)


def aic(model, params, *args, global_sites=(), **kwargs):
    """Akaike information criterion ``-2 log L + 2 k`` (lower is better).

    Under MAP-EM, ``L`` is the data's likelihood at the MAP estimate and ``k``
    counts the global sites' free entries, as for `bic`.

    Args:
        model: the model.
        params: fitted ``{param name: value}``.
        *args, **kwargs: the model's arguments.
        global_sites: the sample sites that are parameters with priors, as in
            [`jaxem.EM`][jaxem.EM]; their values are in ``params``.

    Examples:
        >>> import jax.numpy as jnp, numpyro, numpyro.distributions as dist
        >>> import jaxem
        >>> def model(x):
        ...     mu = numpyro.param("mu", jnp.array([-1.0, 1.0]))
        ...     with numpyro.plate("data", x.shape[0]):
        ...         z = numpyro.sample("z", dist.Categorical(jnp.array([0.5, 0.5])))
        ...         numpyro.sample("x", dist.Normal(mu[z], 1.0), obs=x)
        >>> params, x = {"mu": jnp.array([-1.0, 1.0])}, jnp.array([-1.0, 1.0])
        >>> bool(jnp.isclose(jaxem.aic(model, params, x),
        ...                  -2 * jaxem.log_likelihood(model, params, x) + 2 * 2))
        True
    """
    model = with_global_sites(model, global_sites)
    k = num_free_params(model, params, *args, **kwargs)
    return -2.0 * log_likelihood(model, params, *args, **kwargs) + 2.0 * k
