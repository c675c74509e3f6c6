"""Imputation of missing observations from a fitted model."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpyro.distributions as dist

from jaxem.arguments import split_args
from jaxem.built import built_model
from jaxem.chain import find_chain
from jaxem.chain_inference import chain_indicators, chain_sample
from jaxem.estep import check_params_complete, e_step, structure_and_args
from jaxem.missing import MissingData, conditional_moments
from jaxem.numpyro_internals import PREV_PREFIX, first_step_name, is_first_step, is_time_dim

__all__ = ["impute"]


def _core(fn):
    """The distribution under plate expansion, masks and ``to_event``."""
    while isinstance(fn, (dist.ExpandedDistribution, dist.MaskedDistribution, dist.Independent)):
        fn = fn.base_dist
    return fn


def _cell_moments(fn, value):
    """Per-cell conditional mean (and, for a MultivariateNormal, covariance) of
    the value given its observed entries."""
    core = _core(fn.base_dist)
    if type(core) is dist.MultivariateNormal:
        return conditional_moments(core.loc, core.covariance_matrix, fn.observed, value)
    mean = jnp.broadcast_to(fn.base_dist.mean, fn.base_dist.shape())
    return jnp.where(fn.observed, value, mean), None


def _impute_site(site, marginal, rng_key, chosen=None):
    """The site's data, missing entries filled: their expectation (no
    ``rng_key``) or a draw given the latent cell ``chosen`` (an indicator shaped
    like the site's log-probability), or else given a cell drawn per row from
    ``marginal``."""
    fn, value = site.fn, site.value
    mean, cov = _cell_moments(fn, value)
    event_ndim = fn.event_dim
    # Cells: the site's log-probability dims (enumerated latents, plates and the
    # time dim of a scan's stacked site); the enumerated ones are summed out
    # with the posterior weights.
    num_cells = jnp.ndim(marginal)
    enum_axes = tuple(
        num_cells + d
        for d, n in site.dim_to_name.items()
        if n not in site.plates and not is_time_dim(n)
    )
    cell_shape = jnp.shape(marginal)
    mean = jnp.broadcast_to(mean, cell_shape + jnp.shape(mean)[jnp.ndim(mean) - event_ndim :])
    weight = jnp.reshape(marginal, cell_shape + (1,) * event_ndim)
    if rng_key is None:
        filled = jnp.sum(weight * mean, axis=enum_axes, keepdims=True)
    else:
        choice_key, draw_key = jax.random.split(rng_key)
        if chosen is None:
            chosen = _draw_cells(choice_key, marginal, enum_axes)
        indicator = jnp.reshape(chosen.astype(mean.dtype), cell_shape + (1,) * event_ndim)
        if cov is None:
            draws = jnp.broadcast_to(fn.base_dist.sample(draw_key), jnp.shape(mean))
            draws = jnp.where(fn.observed, value, draws)
        else:
            cov = jnp.broadcast_to(cov, jnp.shape(mean) + jnp.shape(mean)[-1:])
            observed = fn.observed.astype(cov.dtype)
            # V is zero on the observed block: factor V + diag(observed) and
            # keep the noise of the missing coordinates only.
            eye = jnp.eye(cov.shape[-1], dtype=cov.dtype)
            tril = jnp.linalg.cholesky(cov + eye * observed[..., None, :])
            noise = jax.random.normal(draw_key, jnp.shape(mean), cov.dtype)
            draws = mean + jnp.einsum("...de,...e->...d", tril, noise * (1 - observed))
        filled = jnp.sum(indicator * draws, axis=enum_axes, keepdims=True)
    # Summed dims left of the value's are of size 1 now; those among the value's
    # dims (a scan's stacked site) broadcast against it.
    filled = jnp.reshape(filled, jnp.shape(filled)[jnp.ndim(filled) - jnp.ndim(value) :])
    return jnp.where(fn.observed, value, filled.astype(jnp.result_type(value)))


def _draw_cells(rng_key, marginal, enum_axes):
    """One cell per row, drawn from the row's posterior over the latents its
    factor depends on: an indicator shaped like ``marginal``."""
    moved = jnp.moveaxis(marginal, enum_axes, tuple(range(len(enum_axes))))
    rows = moved.shape[len(enum_axes) :]
    flat = jnp.reshape(moved, (-1,) + rows)
    index = jax.random.categorical(rng_key, jnp.log(flat), axis=0)
    chosen = jnp.arange(flat.shape[0]).reshape((-1,) + (1,) * len(rows)) == index
    return jnp.moveaxis(jnp.reshape(chosen, moved.shape), tuple(range(len(enum_axes))), enum_axes)


@partial(jax.jit, static_argnums=(0, 4))
def _impute(model, params, rng_key, arrays, spec):
    model = built_model(model)
    structure, args, kwargs = structure_and_args(model, arrays, spec)
    check_params_complete(structure, params)
    result = e_step(model, params, args, kwargs, structure.max_plate_nesting)
    sites = result.trace.sites
    keys = {}
    for name, site in sites.items():
        if site.is_observed and isinstance(site.fn, MissingData):
            keys[name] = None if rng_key is None else jax.random.fold_in(rng_key, len(keys))
    chosen = {}
    chain = find_chain(result.trace)
    if rng_key is not None and chain is not None:
        # The states of a chain are drawn jointly (forward filtering, backward
        # sampling): each site's cell is then the one of the drawn path.
        log_factors = {name: site.log_prob for name, site in sites.items()}
        path = chain_sample(
            jax.random.fold_in(rng_key, len(keys)), log_factors, result.trace, chain
        )
        chosen = chain_indicators(path, result.trace, chain)
    filled = {
        name: _impute_site(sites[name], result.marginals[name], key, chosen.get(name))
        for name, key in keys.items()
    }
    return _join_scanned_steps(filled)


def _join_scanned_steps(filled):
    """A site in a ``scan`` body appears as its first step (``_PREV_<name>``) and
    its later steps, stacked on a leading time dim with unit dims after it
    (enumeration and plate dims the data does not vary along); give it back
    as one array over all steps, as the data was scanned."""
    joined = {}
    for name, value in filled.items():
        if is_first_step(name) and name[len(PREV_PREFIX) :] in filled:
            continue
        first = filled.get(first_step_name(name))
        if first is not None:
            later = jnp.reshape(value, jnp.shape(value)[:1] + jnp.shape(first))
            value = jnp.concatenate([first[None], later])
        elif is_first_step(name):  # a scan of one step
            name, value = name[len(PREV_PREFIX) :], value[None]
        joined[name] = value
    return joined


def impute(model, params, *args, rng_key=None, **kwargs):
    """Fill the missing entries of every site of a `jaxem.nan_as_missing` model.

    Without ``rng_key``, each missing entry becomes its conditional expectation
    given the observed data, averaged over the posterior of the discrete
    latents: $\\sum_z p(z \\mid x_{obs}) \\, E[x_{mis} \\mid x_{obs}, z]$
    (for a MultivariateNormal, the regression of the missing coordinates on
    the observed ones). With ``rng_key``, one draw instead: the discrete
    latents from their posterior, then the missing entries from their
    conditional distribution given them. The states of a ``scan`` Markov
    chain are drawn jointly, a whole path per sequence (forward filtering,
    backward sampling); elsewhere each row's latents are drawn from that
    row's posterior, independently of the other rows (exact when rows are
    independent given the params, as in a mixture).

    Args:
        model: a model wrapped with [`jaxem.nan_as_missing`][jaxem.nan_as_missing].
        params: ``{param name: constrained value}``, e.g. ``EMResult.params``.
        *args, **kwargs: the model's arguments.
        rng_key: PRNG key to draw imputations instead of expectations.

    Returns:
        ``{site name: data with the missing entries filled}`` for every observed
        site with missing entries under the wrapper. A site inside a ``scan``
        body gives all its steps at once, stacked on a leading time axis (the
        scanned data with its entries filled).

    Examples:
        >>> import jax.numpy as jnp, numpyro, numpyro.distributions as dist
        >>> import jaxem
        >>> def model(x):
        ...     mu = numpyro.param("mu", jnp.zeros(2))
        ...     cov = jnp.array([[1.0, 0.5], [0.5, 1.0]])
        ...     with numpyro.plate("data", x.shape[0]):
        ...         numpyro.sample("x", dist.MultivariateNormal(mu, cov), obs=x)
        >>> x = jnp.array([[2.0, jnp.nan]])
        >>> jaxem.impute(jaxem.nan_as_missing(model), {"mu": jnp.zeros(2)}, x)["x"].tolist()
        [[2.0, 1.0]]
    """
    arrays, spec = split_args(args, kwargs)
    return _impute(model, dict(params), rng_key, arrays, spec)
