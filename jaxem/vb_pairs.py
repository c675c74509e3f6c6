"""The jointly conjugate (mean, precision) pairs of variational Bayes EM.

`jaxem.normal_wishart` (a MultivariateNormal's ``loc`` and ``precision_matrix``)
and `jaxem.normal_gamma` (a Normal's ``loc`` and precision, its scale
``1 / sqrt(tau[z])``) write the same pieces for their pair; `jaxem.vbem` calls
them through `PAIRS`, keyed by the pair's class.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from jaxem.normal_gamma import (
    NormalGamma,
    find_normal_gamma,
    ng_expected_log_density,
    ng_kl,
    ng_make,
    ng_moments,
    ng_point,
    ng_priors,
    ng_update,
)
from jaxem.normal_wishart import (
    NormalWishart,
    find_normal_wishart,
    nw_expected_log_density,
    nw_kl,
    nw_make,
    nw_moments,
    nw_point,
    nw_priors,
    nw_update,
)

__all__ = ["PAIRS", "Pair", "find_pairs"]


class Pair(NamedTuple):
    """A pair's pieces (each ``(q_precision, q_mean, ...)``, see
    `jaxem.normal_wishart`), and the argument through which its likelihoods read
    the precision (the mean is read through ``loc``)."""

    moments: Callable
    point: Callable
    make: Callable
    priors: Callable
    update: Callable
    kl: Callable
    expected: Callable
    precision_arg: str


PAIRS = {
    NormalWishart: Pair(
        nw_moments,
        nw_point,
        nw_make,
        nw_priors,
        nw_update,
        nw_kl,
        nw_expected_log_density,
        "precision_matrix",
    ),
    NormalGamma: Pair(
        ng_moments, ng_point, ng_make, ng_priors, ng_update, ng_kl, ng_expected_log_density, "scale"
    ),
}


def find_pairs(model, names, trace, values, args, kwargs, nesting):
    """The pairs among the global sites ``names``.

    Returns:
        ``({precision site: pair}, {reading site: pair}, {(site, argument):
        (global site, power)})``, the last the arguments read through a power
        (`jaxem.vb_powers`).
    """
    groups, readers = find_normal_wishart(model, names, trace, values, args, kwargs, nesting)
    ng_groups, ng_readers, powers = find_normal_gamma(
        model, names, trace, values, args, kwargs, nesting
    )
    return {**groups, **ng_groups}, {**readers, **ng_readers}, powers
