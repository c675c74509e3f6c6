"""Masked latent sites (``numpyro.handlers.mask`` around a discrete latent).

NumPyro scores a masked cell 0 whatever its value, so enumerating a masked
latent sums K equal terms: every masked cell would add ``log K`` to the
log-likelihood (and to the ELBO). jaxem gives a masked latent cell the
uniform log-factor ``-log K`` instead, so that it contributes nothing: the
padded steps of a sequence (a masked latent, and the sites that depend on it
masked too) then leave the likelihood of the real steps unchanged.

This is exact only when nothing that still counts depends on the masked
latent's value: a masked latent feeding an unmasked one (a sequence padded at
its start, or a gap inside it) would make that latent's prior an average over
a uniform previous state, a model nobody wrote. `latent_mask_problems`
finds such cells on concrete masks before fitting; Markov chains written with
``scan`` have their own rule (`jaxem.chain.chain_padding_problems`).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpyro.distributions as dist

from jaxem.exceptions import ModelError
from jaxem.missing import MissingData
from jaxem.numpyro_internals import OBSERVED_SUFFIX, UNOBSERVED_SUFFIX, distribution_mask

__all__ = [
    "mask_of",
    "counted_cells",
    "uniform_where_masked",
    "latent_mask_problems",
    "raise_for_latent_masks",
    "mask_dtype_message",
]


def mask_of(fn):
    """Where a site counts: a boolean array over the distribution's batch shape
    (``numpyro.handlers.mask`` and ``.mask()``, through plate expansion), or
    None if it is not masked."""
    full = None
    while True:
        if isinstance(fn, dist.MaskedDistribution):
            mask = distribution_mask(fn)
            if mask is False:
                mask = jnp.zeros(fn.batch_shape, bool)
            if mask is not True and mask is not None:
                mask = jnp.asarray(mask, bool)
                mask = jnp.broadcast_to(mask, jnp.broadcast_shapes(mask.shape, fn.batch_shape))
                full = mask if full is None else full & mask
            fn = fn.base_dist
        elif isinstance(fn, (dist.ExpandedDistribution, dist.Independent)):
            fn = fn.base_dist
        else:
            return full


def counted_cells(fn, value):
    """Where an observed site counts, a boolean array over its batch shape
    (that of its distribution and its value together): not masked, and with at
    least one entry observed (not NaN under [`jaxem.nan_as_missing`][jaxem.nan_as_missing])."""
    value_batch = jnp.shape(value)[: jnp.ndim(value) - fn.event_dim]
    real = jnp.ones(jnp.broadcast_shapes(fn.batch_shape, value_batch), bool)
    if isinstance(fn, MissingData):
        observed = jnp.broadcast_to(fn.observed, jnp.shape(value))
        real = real & jnp.any(observed, axis=tuple(range(-fn.event_dim, 0)))
        fn = fn.base_dist
    mask = mask_of(fn)
    return real if mask is None else real & mask


def uniform_where_masked(log_prob, fn, own_dim):
    """A latent site's log-factor with its masked cells set to ``-log K`` (its
    K values then sum to 1: the cell contributes nothing).

    Args:
        log_prob: the site's enumerated log-probability tensor.
        fn: its distribution.
        own_dim: the (negative) dim of its enumerated values, None for a
            support of one value (nothing to correct).
    """
    mask = mask_of(fn)
    if mask is None or own_dim is None:
        return log_prob
    num_values = jnp.shape(log_prob)[own_dim]
    uniform = jnp.asarray(-math.log(num_values), jnp.result_type(log_prob))
    return jnp.where(mask, log_prob, uniform)


def _is_obs_mask_part(name, sites):
    """NumPyro's ``obs_mask`` splits a site into ``<name>_observed`` and a latent
    ``<name>_unobserved`` masked where the data is observed; there its value is
    the observation, so what depends on it does not vary with its enumerated
    value: the uniform factor is exact and nothing needs checking."""
    base = name[: -len(UNOBSERVED_SUFFIX)]
    return name.endswith(UNOBSERVED_SUFFIX) and base + OBSERVED_SUFFIX in sites


def latent_mask_problems(trace) -> dict:
    """``{(masked latent, site depending on it, whether that site is observed):
    whether some cell of the second counts where the first is masked}`` over an
    enumerated trace (arrays, so that the check runs inside a compiled
    validation).

    A latent that depends on a masked one would get a prior averaged over a
    uniform value; an observed site that counts where the latent it depends on
    is masked would be scored under that uniform value (the user masked the
    latent of a padded step but not its observation): both are models nobody
    wrote.
    """
    sites = trace.sites
    problems = {}
    for name, site in sites.items():
        if site.is_observed or _is_obs_mask_part(name, sites):
            continue
        mask = mask_of(site.fn)
        if mask is None:
            continue
        for other_name, other in sites.items():
            if other_name == name or name not in other.dim_to_name.values():
                continue
            if other.is_observed:
                counts = counted_cells(other.fn, other.value)
            else:
                other_mask = mask_of(other.fn)
                counts = jnp.ones((), bool) if other_mask is None else other_mask
            problems[(name, other_name, other.is_observed)] = jnp.any(~mask & counts)
    return problems


def raise_for_latent_masks(problems: dict) -> None:
    """Raise a `ModelError` for the first true entry of
    `latent_mask_problems` (concrete values)."""
    for (name, other, observed), bad in problems.items():
        if not bool(bad):
            continue
        if observed:
            raise ModelError(
                f"jaxem: observed site '{other}' counts where latent site '{name}', which it "
                f"depends on, is masked: it would be scored under a uniform '{name}', a model "
                f"nobody wrote. Mask '{other}' wherever '{name}' is masked (put "
                "numpyro.handlers.mask around both sites, e.g. at the padded steps of a "
                f"sequence), or unmask '{name}' if these are real observations; for missing "
                "observations mask (or set NaN under jaxem.nan_as_missing) the observed site "
                "only and keep the latent."
            )
        raise ModelError(
            f"jaxem: latent site '{name}' is masked where latent site '{other}', which "
            f"depends on it, is not. A masked latent must be padding: everything that "
            f"depends on it must be masked too, or '{other}' would get a prior averaged "
            f"over a uniform '{name}'. Pad sequences at their end (mask True for the real "
            "steps, then False), not at their start or in their middle; for missing "
            "observations, mask (or set NaN under jaxem.nan_as_missing) the observed site "
            "only and keep the latent."
        )


def mask_dtype_message(err: Exception) -> str | None:
    """A message in the user's terms for NumPyro's rejection of a mask that is
    not boolean (``numpyro.handlers.mask`` accepts dtype bool only), or None
    for any other error."""
    if "`mask` should be a bool array" not in str(err):
        return None
    return (
        "jaxem: numpyro.handlers.mask was given a mask that is not boolean: NumPyro accepts "
        "a mask of dtype bool only (a float or integer 0/1 mask is rejected). Pass "
        "mask.astype(bool), or build it from a comparison such as lengths[:, None] > t."
    )
