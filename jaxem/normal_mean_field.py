"""Independent priors on a Normal's mean and precision (or variance): mean field.

A Gaussian mixture as a NumPyro user often writes it, the priors independent::

    mu = numpyro.sample("mu", dist.Normal(m0, s0).expand([K]).to_event(1))
    tau = numpyro.sample("tau", dist.Gamma(a0, b0).expand([K]).to_event(1))
    x ~ dist.Normal(mu[z], 1 / jnp.sqrt(tau[z]))     # or tau[z] ** -0.5, lax.rsqrt

    v = numpyro.sample("v", dist.InverseGamma(a0, b0).expand([K]).to_event(1))
    x ~ dist.Normal(mu[z], jnp.sqrt(v[z]))           # or v[z] ** 0.5

is not jointly conjugate (the Normal-Gamma pair of `jaxem.normal_gamma` is), but
under the mean field q(mu) q(tau) each factor is conditionally conjugate:

    E_q[log N(x | mu, tau^-1/2)] = E[log tau] / 2 - log(2 pi) / 2
                                   - E[tau] (x^2 - 2 x E[mu] + E[mu^2]) / 2

is linear in q(mu)'s moments ``(E mu, E mu^2)`` given q(tau)'s, and in q(tau)'s
``(E log tau, E tau)`` given q(mu)'s (for a variance ``-E log v`` and
``E[1 / v]``). Each site keeps its own family (`jaxem.expected_log`): q(mu)
Normal, q(tau) Gamma, q(v) InverseGamma, and the KL is the sum of the two.

The VB-M-step is coordinate ascent with q(z) held: q(mu) from the statistics at
the current q(tau), then q(tau) from the statistics at the new q(mu)
(`jaxem.vb_pairs.update_pairs`). Each is the optimum given the rest, so the
ELBO never decreases; updating both from the same statistics would not
guarantee that. The selections are free: ``mu[z]`` with a tied ``tau`` (one
precision for every component) is as closed-form as ``tau[z]``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

from jaxem.conjugate import core_distribution
from jaxem.exceptions import ModelError
from jaxem.expected_log import PRIOR_FAMILIES, conjugate_update, normal_expected_log_density
from jaxem.vb_sites import check_pair_factors, prior_params, read_arguments

__all__ = [
    "MeanFieldNormal",
    "MeanFieldNormalVariance",
    "find_mean_field",
    "mean_field_pieces",
]

_SPELLING = (
    "write the independent priors as {mean} ~ dist.Normal(m0, s0) and {prec} ~ "
    "dist.Gamma(a0, b0) (a precision) or dist.InverseGamma(a0, b0) (a variance), "
    "each read only by Normal sites dist.Normal({mean}[z], 1 / jnp.sqrt({prec}[z])) "
    "(a variance: jnp.sqrt({prec}[z]))"
)


class MeanFieldNormal(NamedTuple):
    """Global sites ``mean`` (Normal prior) and ``precision`` (Gamma prior), read
    together by the Normal sites ``readers`` (``loc`` a selection of the mean,
    ``scale`` ``1 / sqrt`` of a selection of the precision)."""

    precision: str
    mean: str
    readers: tuple


class MeanFieldNormalVariance(MeanFieldNormal):
    """As `MeanFieldNormal`, ``precision`` holding an InverseGamma prior on the
    variance (the scale ``sqrt`` of a selection of it)."""


SCALE_PRIORS = {dist.Gamma: MeanFieldNormal, dist.InverseGamma: MeanFieldNormalVariance}


def mean_field_pieces(scale_prior):
    """``(moments, point, make, priors, update, kl, expected)`` of the pair whose
    scale has the prior class ``scale_prior`` (see `jaxem.vb_pairs.Pair`): each
    the two factors' own, from `jaxem.expected_log.PRIOR_FAMILIES`."""
    scale, normal = PRIOR_FAMILIES[scale_prior], PRIOR_FAMILIES[dist.Normal]

    def moments(q_prec, q_mean):
        return scale.moments(q_prec), normal.moments(q_mean)

    def point(q_prec, q_mean):
        return scale.point(q_prec), normal.point(q_mean)

    def make(q_prec, q_mean):
        return scale.make(q_prec), normal.make(q_mean)

    def priors(trace, group):
        return prior_params(trace, group.precision), prior_params(trace, group.mean)

    def update(prior_prec, prior_mean, stats_prec, stats_mean):
        # Each factor from the statistics at the other's moments: the caller takes
        # the precision's from statistics at the mean's new moments.
        return (
            conjugate_update(scale, prior_prec, stats_prec),
            conjugate_update(normal, prior_mean, stats_mean),
        )

    def kl(q_prec, q_mean, prior_prec, prior_mean):
        return jnp.sum(scale.kl(q_prec, prior_prec)) + jnp.sum(normal.kl(q_mean, prior_mean))

    def expected(value, loc, precision):
        """``E_q[log N(x | mu, sigma)]`` from q(mu)'s moments selected like the
        ``loc`` and the scale prior's selected like the ``scale``."""
        e_mu, e_mu2 = loc
        square = value**2 - 2 * value * e_mu + e_mu2
        return normal_expected_log_density(square, scale_prior, precision)

    return moments, point, make, priors, update, kl, expected


# -- detection (Python, concrete values, once per input signature) ------------------


def find_mean_field(model, names, taken, trace, values, args, kwargs, nesting):
    """The mean-field (mean, precision) pairs among the global sites ``names``
    outside ``taken`` (the jointly conjugate pairs): the Normal sites whose
    ``loc`` reads a Normal-prior site and ``scale`` a Gamma- or
    InverseGamma-prior site, each read checked by `jaxem.vb_sites.read_arguments`.

    Returns:
        ``({precision site: pair}, {reading site: pair}, {(site, "scale"):
        (precision site, power)})``.

    Raises:
        ModelError: naming the sites, for a mean read with two precisions (or the
            reverse), or a mean or precision also read some other way.
    """
    families = {n: type(core_distribution(trace.sites[n].fn)) for n in names if n not in taken}
    scales = [n for n, f in families.items() if f in SCALE_PRIORS]
    means = [n for n, f in families.items() if f is dist.Normal]
    if not scales or not means:
        return {}, {}, {}  # no pair possible: skip the JVPs
    reads = read_arguments(model, scales + means, trace, values, args, kwargs, nesting, families)
    by_pair: dict = {}
    power_args = {}
    for site, found in reads.items():
        by_arg = {r.argument: r for r in found}
        if len(found) != 2 or set(by_arg) != {"loc", "scale"}:
            continue  # one global site: left to `find_readers` (two: its error)
        loc, scale = by_arg["loc"], by_arg["scale"]
        if families[loc.source] is not dist.Normal or families[scale.source] not in SCALE_PRIORS:
            continue
        by_pair.setdefault((scale.source, loc.source), []).append(site)
        power_args[(site, "scale")] = (scale.source, scale.power)
    groups, readers = {}, {}
    for (prec, mean), sites in by_pair.items():
        fix = _SPELLING.format(prec=prec, mean=mean)
        others = [(p, m) for p, m in by_pair if (p == prec) != (m == mean)]
        if others:
            p, m = others[0]
            raise ModelError(
                f"jaxem: Normal sites read the mean '{mean}' with the precision '{prec}' "
                f"and '{m}' with '{p}': VariationalBayesEM's mean-field Normal pair needs "
                f"each mean read with one precision (or variance) and the reverse; {fix}."
            )
        group = SCALE_PRIORS[families[prec]](prec, mean, tuple(sorted(sites)))
        groups[prec] = group
        readers.update({s: group for s in sites})
    if groups:
        tangents = {
            n: jnp.asarray(np.random.default_rng(3).normal(size=jnp.shape(v)), jnp.result_type(v))
            for n, v in values.items()
        }

        def direction(source):
            return {
                n: (tangents[n] if n == source else jnp.zeros_like(v)) for n, v in values.items()
            }

        # Every factor moving with the pair must be one of its readers.
        check_pair_factors(
            model, groups, names, values, direction, args, kwargs, nesting, _SPELLING
        )
    return groups, readers, {k: v for k, v in power_args.items() if k[0] in readers}
