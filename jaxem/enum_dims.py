"""The named error for a discrete latent whose enumerated values reach another plate.

Enumeration puts each discrete latent's values in a dim left of the plates. A site
that indexes a plated discrete latent by an array of another plate (``beta[z[g]]``:
a group's label looked up per observation) mixes that dim with the data's: its
batch shape holds the data's size where the latent's values lie, and the
contraction fails deep inside funsor ("Output mismatch", SAEM/MCEM) or JAX ("add
got incompatible shapes", EM). The fitters call `raise_for_mixed_enum_dims` on
that failure, with the sites of the enumerated trace, to name the latent instead.
"""

from __future__ import annotations

import numpy as np

from jaxem.exceptions import ModelError

__all__ = ["raise_for_mixed_enum_dims"]


def raise_for_mixed_enum_dims(sites, max_plate_nesting: int) -> None:
    """A ModelError naming the discrete latent and the site that mixes its enumerated
    dim with another size; nothing when no site does.

    Args:
        sites: ``(name, fn, value, is_enumerated)`` of every sample site of a trace
            enumerated with ``first_available_dim = -max_plate_nesting - 1``.
        max_plate_nesting: the model's plate nesting.
    """
    owner: dict = {}  # enum dim -> (latent name, its number of values)
    for name, fn, value, enumerated in sites:
        if not enumerated:
            continue
        shape = np.shape(value)[: np.ndim(value) - fn.event_dim]
        for dim, size in _enum_dims(shape, max_plate_nesting):
            owner.setdefault(dim, (name, size))
    for name, fn, _, _ in sites:
        for dim, size in _enum_dims(tuple(fn.batch_shape), max_plate_nesting):
            if dim in owner and size != owner[dim][1]:
                latent, num_values = owner[dim]
                raise ModelError(
                    f"jaxem: discrete latent site '{latent}' is enumerated in dim {dim} (its "
                    f"{num_values} values), but the distribution of site '{name}' has size "
                    f"{size} in that dim (batch shape {tuple(fn.batch_shape)}): '{name}' "
                    f"uses '{latent}' indexed by an array of another plate (such as "
                    f"{latent}[g], a group's value looked up per observation), which mixes "
                    f"the enumerated values of '{latent}' with that plate. A latent's "
                    "values can only reach sites inside its own plate: put the observations "
                    f"in a plate nested inside the plate of '{latent}' (data shaped "
                    "(observations per group, groups), ragged groups padded and masked), "
                    f"and index params by the latent itself with Vindex "
                    f"(numpyro.contrib.indexing.Vindex(beta)[..., {latent}])."
                )


def _enum_dims(shape, max_plate_nesting):
    """``(dim, size)`` of the dims of ``shape`` left of the plates, size above 1."""
    ndim = len(shape)
    for i, size in enumerate(shape):
        dim = i - ndim
        if dim < -max_plate_nesting and size > 1:
            yield dim, int(size)
