"""Known labels: discrete latents with an ``obs_mask`` (semi-supervised EM).

NumPyro splits ``numpyro.sample(name, fn, obs=labels, obs_mask=known)`` into an
observed site ``<name>_observed`` (masked to the known entries) and a latent
``<name>_unobserved`` (masked to the others). Enumerated, the latent part
keeps only the cell of the label where the label is known
(`restrict_to_labels`), so a labelled point counts once and its posterior
is one-hot at its label.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpyro.distributions as dist

from jaxem.missing import mask_like
from jaxem.numpyro_internals import (
    OBSERVED_SUFFIX,
    PREV_PREFIX,
    UNOBSERVED_SUFFIX,
    distribution_mask,
)

__all__ = ["known_labels", "known_labels_in_trace", "labelled_latents", "restrict_to_labels"]


def _masked_part(fn):
    """The mask of the MaskedDistribution under a site's plate expansion and
    ``to_event`` wrappers, or None."""
    while isinstance(fn, (dist.ExpandedDistribution, dist.Independent)):
        fn = fn.base_dist
    return distribution_mask(fn) if isinstance(fn, dist.MaskedDistribution) else None


def known_labels_in_trace(tr) -> dict:
    """``{latent site: (labels, known)}`` for the unobserved parts of discrete
    sites with an ``obs_mask``.

    NumPyro splits ``sample(name, fn, obs=labels, obs_mask=known)`` into an
    observed site ``<name>_observed`` (masked to the known entries) and a latent
    ``<name>_unobserved`` (masked to the others), and returns
    ``where(known, labels, unobserved)``.
    """
    found = {}
    for name, site in tr.items():
        if site["type"] != "sample" or site["is_observed"]:
            continue
        if not name.endswith(UNOBSERVED_SUFFIX):
            continue
        observed = tr.get(name[: -len(UNOBSERVED_SUFFIX)] + OBSERVED_SUFFIX)
        if observed is None or observed["type"] != "sample" or not observed["is_observed"]:
            continue
        known = _masked_part(observed["fn"])
        if known is not None:
            found[name] = (observed["value"], known)
    return found


def restrict_to_labels(log_prob, value, event_dim, labels, known):
    """The factor of an ``obs_mask`` latent with its known entries fixed.

    The latent part's density is masked to 0 at the known entries, and the value
    NumPyro returns there is the label whatever the enumerated value: summing
    over the values would count each labelled point K times. Only the cell of
    the label is kept (the others are impossible), so the point counts once and
    its posterior is one-hot at its label.
    """
    differs = jnp.asarray(value) != jnp.asarray(labels)
    if event_dim:
        differs = jnp.any(differs, axis=tuple(range(-event_dim, 0)))
    # Finite, and far enough down that exp() is exactly 0: -inf would make the
    # gradients of the contraction (the posteriors) NaN where two impossible
    # cells meet (inf - inf).
    impossible = jnp.asarray(_IMPOSSIBLE, jnp.result_type(log_prob))
    return jnp.where(jnp.asarray(known, bool) & differs, impossible, log_prob)


_IMPOSSIBLE = -1e30  # a log-probability: a sum of a few stays finite in float32


def labelled_latents(sites: dict) -> dict:
    """``{latent site: the name the user gave it}`` for the enumerated
    unobserved parts of discrete sites with an ``obs_mask``
    (``"z_unobserved" -> "z"``), from the sites of a `jaxem.tracing.EnumTrace`."""
    found = {}
    for name, site in sites.items():
        if site.is_observed or not name.endswith(UNOBSERVED_SUFFIX):
            continue
        base = name[: -len(UNOBSERVED_SUFFIX)]
        observed = sites.get(base + OBSERVED_SUFFIX)
        if observed is not None and observed.is_observed and _masked_part(observed.fn) is not None:
            found[name] = base.removeprefix(PREV_PREFIX)
    return found


def known_labels(sites: dict, name: str):
    """``(labels, known)`` of the ``obs_mask`` latent ``name`` (see
    `labelled_latents`)."""
    observed = sites[name[: -len(UNOBSERVED_SUFFIX)] + OBSERVED_SUFFIX]
    labels = observed.value
    batch = jnp.shape(labels)[: jnp.ndim(labels) - observed.fn.event_dim]
    return labels, mask_like(jnp.asarray(_masked_part(observed.fn), bool), batch)
