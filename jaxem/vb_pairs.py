"""The (mean, precision) pairs of variational Bayes EM.

`jaxem.normal_wishart` (a MultivariateNormal's ``loc`` and ``precision_matrix``)
and `jaxem.normal_gamma` (a Normal's ``loc`` and precision, its scale
``1 / sqrt(tau[z])``), both jointly conjugate, and `jaxem.normal_mean_field`
(independent priors on a Normal's mean and precision or variance, q(mu) q(tau))
write the same pieces for their pair; `jaxem.vbem` calls them through `PAIRS`,
keyed by the pair's class, and `update_pairs`.
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
from jaxem.normal_mean_field import SCALE_PRIORS, find_mean_field, mean_field_pieces
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

__all__ = ["PAIRS", "Pair", "find_pairs", "update_pairs"]


class Pair(NamedTuple):
    """A pair's pieces (each ``(q_precision, q_mean, ...)``, see
    `jaxem.normal_wishart`), and the argument through which its likelihoods read
    the precision (the mean is read through ``loc``). ``sequential``: the two
    factors of q are separate (mean field), and the precision's is updated after
    the mean's (`update_pairs`)."""

    moments: Callable
    point: Callable
    make: Callable
    priors: Callable
    update: Callable
    kl: Callable
    expected: Callable
    precision_arg: str
    sequential: bool = False


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
    **{
        cls: Pair(*mean_field_pieces(prior), "scale", sequential=True)
        for prior, cls in SCALE_PRIORS.items()
    },
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
    groups, readers = {**groups, **ng_groups}, {**readers, **ng_readers}
    taken = {n for g in groups.values() for n in (g.precision, g.mean)}
    mf_groups, mf_readers, mf_powers = find_mean_field(
        model, names, taken, trace, values, args, kwargs, nesting
    )
    return {**groups, **mf_groups}, {**readers, **mf_readers}, {**powers, **mf_powers}


def update_pairs(groups, priors, stats, restat):
    """Every pair's q: ``{site: params}``.

    Args:
        groups: ``{precision site: pair}``.
        priors: ``{site: prior params}``.
        stats: ``{site: expected sufficient statistics}`` at the current moments.
        restat: ``{site: moments} -> stats``, the statistics with q(z) held and
            those sites' moments replaced (the rest the current ones).

    A mean-field pair's mean is updated from ``stats``, its precision from the
    statistics at the mean's new moments: coordinate ascent, each the optimum
    given the other (the jointly conjugate pairs update both at once).
    """
    q = {}
    for g in groups.values():
        pair = PAIRS[type(g)]
        q[g.precision], q[g.mean] = pair.update(
            priors[g.precision], priors[g.mean], stats[g.precision], stats[g.mean]
        )
    later = [g for g in groups.values() if PAIRS[type(g)].sequential]
    if later:
        moved = restat(
            {g.mean: PAIRS[type(g)].moments(q[g.precision], q[g.mean])[1] for g in later}
        )
        for g in later:
            q[g.precision], _ = PAIRS[type(g)].update(
                priors[g.precision], priors[g.mean], moved[g.precision], moved[g.mean]
            )
    return q
