"""The memory an enumeration needs, checked before anything is compiled.

Exact enumeration builds one log-probability tensor per sample site over the
values of every latent the site depends on and over its plates: a site that
depends on 20 binary latents has 2^20 cells per data point, a transition
between two Categorical latents with K values has K^2. Such a program takes
minutes to compile and then runs out of memory. The shapes are known when the
model is traced (before compilation), so `check_enumeration_size`
refuses it there, naming the sites and latents responsible.

The limit is ``jaxem.memory.max_enumeration_bytes``, a module-level setting
(bytes; ``None`` turns the check off)::

    import jaxem.memory
    jaxem.memory.max_enumeration_bytes = 64 * 2**30  # a machine with more memory
"""

from __future__ import annotations

import math

import numpy as np

from jaxem.exceptions import ModelError
from jaxem.numpyro_internals import PREV_PREFIX, UNOBSERVED_SUFFIX

__all__ = ["max_enumeration_bytes", "enumeration_bytes", "check_enumeration_size"]

#: Largest estimated peak memory of one enumerated site, in bytes (4 GiB).
max_enumeration_bytes: int | None = 4 * 2**30

# The E-step keeps a factor, the sum of the factors it is contracted with, their
# exponentials and its gradient (the posterior marginals) at once: about four
# tensors of the factor's size.
_COPIES = 4


def enumeration_bytes(shape, dtype) -> int:
    """Estimated peak bytes of the E-step for one factor of ``shape``."""
    return _COPIES * math.prod(shape) * np.dtype(dtype).itemsize


def check_enumeration_size(factors: dict, latent_names, plate_names) -> None:
    """Raise a `ModelError` when a factor would not fit in memory.

    Args:
        factors: ``{site name: (shape, dtype, dim_to_name)}`` of the
            log-probability tensors the enumerated trace will build.
        latent_names: names of the enumerated latent sites.
        plate_names: names of the plates.
    """
    limit = max_enumeration_bytes
    if limit is None or not factors:
        return
    name, (shape, dtype, dim_to_name) = max(
        factors.items(), key=lambda item: enumeration_bytes(item[1][0], item[1][1])
    )
    needed = enumeration_bytes(shape, dtype)
    if needed <= limit:
        return
    latents, plates = [], []
    for dim, dim_name in sorted(dim_to_name.items()):
        size = shape[len(shape) + dim]
        if dim_name in latent_names:
            latents.append(f"'{_user_name(dim_name)}' ({size} values)")
        elif dim_name in plate_names:
            plates.append(f"'{dim_name}' ({size})")
    over = ", ".join(latents) or "no latent"
    raise ModelError(
        f"jaxem: enumerating the discrete latents needs about {_gib(needed)} for site "
        f"'{_user_name(name)}' alone (a tensor of shape {tuple(shape)} over the latent(s) "
        f"{over}; plates {', '.join(plates) or 'none'}), more than the limit of {_gib(limit)} "
        "(jaxem.memory.max_enumeration_bytes). Give those latents fewer values; let each "
        "site depend on fewer latents at once; write a chain of latents as a numpyro "
        "markov loop or scan, so that only neighbouring steps are enumerated together; fit "
        "many latents with jaxem.VariationalEM; or, on a machine with the memory, raise "
        "jaxem.memory.max_enumeration_bytes."
    )


def _user_name(name: str) -> str:
    # NumPyro's names for the first step of a scan and for the unknown part of
    # an obs_mask site.
    name = name.removeprefix(PREV_PREFIX)
    return name.removesuffix(UNOBSERVED_SUFFIX)


def _gib(num_bytes) -> str:
    return f"{num_bytes / 2**30:.3g} GiB"
