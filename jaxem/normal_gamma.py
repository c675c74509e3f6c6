"""The Normal-Gamma pair of variational Bayes EM (`jaxem.VariationalBayesEM`).

The univariate analogue of `jaxem.normal_wishart`: a Gaussian mixture whose
components have unknown means and precisions, as a NumPyro user writes it::

    tau = numpyro.sample("tau", dist.Gamma(a0, b0).expand([K]).to_event(1))
    mu = numpyro.sample("mu", dist.Normal(m0, 1 / jnp.sqrt(beta0 * tau)).to_event(1))
    x ~ dist.Normal(mu[z], 1 / jnp.sqrt(tau[z]))      # or tau[z] ** -0.5, lax.rsqrt

is conjugate jointly in ``(mu, tau)``: q(mu, tau) is Normal-Gamma, ``q(tau) =
Gamma(a, b)`` and ``q(mu | tau) = Normal(m, 1 / sqrt(beta tau))``. Its sufficient
statistics are ``T = (log tau, tau, tau mu, tau mu^2)`` and

    E_q[log N(x | mu, tau^-1/2)] = E[log tau] / 2 - log(2 pi) / 2
                                   - (x^2 E[tau] - 2 x E[tau mu] + E[tau mu^2]) / 2,

linear in ``E_q[T]``; with ``E[tau mu^2] = E[tau] m^2 + 1 / beta`` the last term is
``E[tau] (x - m)^2 + 1 / beta``. The precision site carries ``(E[log tau], E[tau])``
(a Gamma's moments), the mean site ``(E[tau mu], E[tau mu^2])``, each shaped like
its site: the model's ``mu[z]`` selects the mean's moments, and its
``1 / sqrt(tau[z])`` the precision's through `jaxem.vb_powers`.

A Wishart(nu, W) in one dimension is Gamma(nu / 2, 1 / (2 W)) on the precision:
this pair is the D = 1 Normal-Wishart pair, and its fit is that one's.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax.scipy.special import digamma
from numpyro.distributions.kl import kl_divergence

from jaxem.conjugate import core_distribution
from jaxem.exceptions import ModelError
from jaxem.numpyro_internals import user_site_name
from jaxem.vb_powers import PowerReads, select_moments
from jaxem.vb_sites import (
    check_pair_factors,
    compiled,
    core_of,
    moved_arguments,
    site_args_fn,
    tangent_fn,
)

__all__ = [
    "NormalGamma",
    "find_normal_gamma",
    "mean_given_precision",
    "ng_expected_log_density",
    "ng_kl",
    "ng_make",
    "ng_moments",
    "ng_point",
    "ng_priors",
    "ng_update",
]

_SPELLING = (
    "write the pair as {prec} ~ dist.Gamma(a0, b0), {mean} ~ dist.Normal(m0, 1 / "
    "jnp.sqrt(beta0 * {prec})) with beta0 a number, and the data as "
    "dist.Normal({mean}[z], 1 / jnp.sqrt({prec}[z])) ({prec}[z] ** -0.5 or "
    "jax.lax.rsqrt({prec}[z]) also work)"
)


class NormalGamma(NamedTuple):
    """A Normal-Gamma pair: global sites ``precision`` (Gamma prior) and ``mean``
    (Normal prior with scale ``1 / sqrt(beta0 * precision)``) read by the sites
    ``readers`` (Normal likelihoods, scale ``1 / sqrt(precision[z])``)."""

    precision: str
    mean: str
    readers: tuple


def ng_moments(q_prec, q_mean):
    """``E_q[T]`` in arrays shaped like the two sites (see the module doc)."""
    a, b = q_prec
    m, beta = q_mean
    e_tau = a / b
    return (digamma(a) - jnp.log(b), e_tau), (e_tau * m, e_tau * m**2 + 1.0 / beta)


def ng_point(q_prec, q_mean):
    """A point in the support: the means of q(tau) and q(mu)."""
    a, b = q_prec
    return a / b, q_mean[0]


def ng_expected_log_density(value, loc, scale):
    """``E_q[log N(x | mu, tau^-1/2)]`` from the moments selected like the
    distribution's ``loc`` and ``scale``."""
    e_tau_mu, e_tau_mu2 = loc
    e_log_tau, e_tau = scale
    quad = value**2 * e_tau - 2 * value * e_tau_mu + e_tau_mu2
    return 0.5 * e_log_tau - 0.5 * jnp.log(2 * jnp.pi) - 0.5 * quad


def ng_priors(trace, group):
    """``((a0, b0), (m0, beta0))`` shaped like q, read from the trace's priors
    (``beta0`` is the ratio of the mean's prior precision to the site's value)."""
    tau = jnp.asarray(trace.sites[group.precision].value)
    dtype = jnp.result_type(float)
    gamma = core_distribution(trace.sites[group.precision].fn)
    a0 = jnp.broadcast_to(jnp.asarray(gamma.concentration, dtype), tau.shape)
    b0 = jnp.broadcast_to(jnp.asarray(gamma.rate, dtype), tau.shape)
    normal = core_distribution(trace.sites[group.mean].fn)
    m0 = jnp.broadcast_to(jnp.asarray(normal.loc, dtype), tau.shape)
    beta0 = jnp.broadcast_to(normal.scale, tau.shape) ** -2 / tau
    return (a0, b0), (m0, beta0)


def ng_update(prior_prec, prior_mean, stats_prec, stats_mean):
    """q(mu, tau) with natural parameters the prior's plus the expected
    sufficient statistics (``d log Z_q / d E[T]``)."""
    a0, b0 = prior_prec
    m0, beta0 = prior_mean
    g_log_tau, g_tau = stats_prec
    g_tau_mu, g_tau_mu2 = stats_mean
    # Coefficients of (log tau, tau, tau mu, tau mu^2) in log p + E log p(x | .).
    eta_log_tau = a0 - 0.5 + g_log_tau
    eta_tau = -b0 - 0.5 * beta0 * m0**2 + g_tau
    eta_tau_mu = beta0 * m0 + g_tau_mu
    eta_tau_mu2 = -0.5 * beta0 + g_tau_mu2
    beta = -2 * eta_tau_mu2
    m = eta_tau_mu / beta
    return (eta_log_tau + 0.5, -eta_tau - 0.5 * beta * m**2), (m, beta)


def ng_kl(q_prec, q_mean, prior_prec, prior_mean):
    """``KL(q(mu, tau) || p(mu, tau))`` summed: the Gammas' KL plus the expected
    KL of the conditional Normals."""
    a, b = q_prec
    m, beta = q_mean
    a0, b0 = prior_prec
    m0, beta0 = prior_mean
    kl_mean = 0.5 * (beta0 / beta - 1 + jnp.log(beta / beta0) + beta0 * (a / b) * (m - m0) ** 2)
    return jnp.sum(kl_divergence(dist.Gamma(a, b), dist.Gamma(a0, b0)) + kl_mean)


def ng_make(q_prec, q_mean):
    """``(q(tau), q(mu))`` as NumPyro distributions: ``Gamma(a, b)`` and the
    marginal of mu, ``StudentT(2 a, m, sqrt(b / (a beta)))``. (q(mu | tau) is
    `mean_given_precision`.)"""
    a, b = q_prec
    m, beta = q_mean
    return dist.Gamma(a, b), dist.StudentT(2 * a, m, jnp.sqrt(b / (a * beta)))


def mean_given_precision(q_mean, precision):
    """q(mu | tau): ``Normal(m, 1 / sqrt(beta * tau))``, the conjugate half of a
    Normal-Gamma posterior.

    Args:
        q_mean: ``result.q[mean site]``, the pair ``(m, beta)``.
        precision: a value (or draws) of the precision site.

    Returns:
        The conditional posterior of the mean site given ``precision``.
    """
    m, beta = q_mean
    return dist.Normal(m, 1 / jnp.sqrt(beta * precision))


# -- detection (Python, concrete values, once per input signature) ------------------


def find_normal_gamma(model, names, trace, values, args, kwargs, nesting):
    """The Normal-Gamma pairs among the global sites ``names``: a Gamma site read
    by another global site's Normal prior (a Gamma site no prior reads is left to
    `jaxem.vb_sites.find_readers`).

    Returns:
        ``({precision site: NormalGamma}, {reading site: NormalGamma},
        {(site, argument): (global site, power)})``, the last the arguments read
        through a power (`jaxem.vb_powers.select_moments`).

    Raises:
        ModelError: naming the site, for a pair written in a spelling that is not
            the conjugate one.
    """
    names = list(names)
    priors = {n: core_distribution(trace.sites[n].fn) for n in names}
    gammas = [n for n in names if type(priors[n]) is dist.Gamma]
    if not gammas or not any(type(p) is dist.Normal for p in priors.values()):
        return {}, {}, {}  # no pair possible: skip the JVPs

    fn = site_args_fn(model, args, kwargs, nesting)
    rng = np.random.default_rng(2)
    tangents = {
        n: jnp.asarray(rng.normal(size=jnp.shape(values[n])), jnp.result_type(values[n]))
        for n in names
    }
    jvp = tangent_fn(fn)
    powers = PowerReads(fn, values)

    def direction(source):
        return {n: (tangents[n] if n == source else jnp.zeros_like(values[n])) for n in values}

    groups, readers, power_args = {}, {}, {}
    for prec in gammas:
        moved = moved_arguments(jvp, values, direction(prec))
        means = sorted({s for s, _ in moved if s in names})
        if not means:
            continue  # a Gamma prior on its own (a rate, or a precision with known mean)
        fix = _SPELLING.format(prec=prec, mean=means[0])
        mean = means[0]
        if len(means) != 1 or type(priors[mean]) is not dist.Normal:
            raise ModelError(
                f"jaxem: the priors of global sites {means} read global site '{prec}' "
                "(Gamma prior): VariationalBayesEM supports one Normal prior on a mean "
                f"reading a precision, the Normal-Gamma pair; {fix}."
            )
        if jnp.shape(values[mean]) != jnp.shape(values[prec]):
            # A tied precision shared by several means: q(mu, tau) is then no
            # product of Normal-Gammas, and the per-pair updates would be wrong.
            raise ModelError(
                f"jaxem: global site '{mean}' has shape {jnp.shape(values[mean])} and "
                f"'{prec}' {jnp.shape(values[prec])}: VariationalBayesEM's Normal-Gamma "
                "pair needs one mean per precision (in the same plates; a tied precision "
                f"is not supported); {fix}."
            )
        scaled = powers.scaled_power(mean, "scale", prec)
        if {a for s, a in moved if s == mean} != {"scale"} or scaled is None or scaled[0] != -0.5:
            raise ModelError(
                f"jaxem: the prior of global site '{mean}' reads '{prec}' in a way "
                f"VariationalBayesEM cannot take in closed form; {fix}."
            )
        # mu_k's prior scale must read tau_k itself: its JVP at tau = 1 is
        # -k / 2 times the direction, entry by entry.
        at_one = {n: (jnp.ones_like(v) if n == prec else v) for n, v in values.items()}
        own = np.asarray(jvp(at_one, direction(prec))[mean]["scale"]) / (-0.5 * scaled[1])
        if own.shape != jnp.shape(values[prec]) or not np.allclose(own, tangents[prec]):
            raise ModelError(
                f"jaxem: the prior scale of global site '{mean}' must read '{prec}' entry "
                f"by entry (each mean its own precision); {fix}."
            )
        moved_mean = moved_arguments(jvp, values, direction(mean))
        substituted = compiled(fn)(tangents)
        sites = sorted({s for s, _ in moved if s != mean} | {s for s, _ in moved_mean})
        for site in sites:
            shown = user_site_name(site)
            if site in names:
                raise ModelError(
                    f"jaxem: the prior of global site '{shown}' reads '{mean}' or "
                    f"'{prec}': VariationalBayesEM supports independent priors only; {fix}."
                )
            core = core_of(trace.sites[site].fn)
            by_prec = {a for s, a in moved if s == site}
            by_mean = {a for s, a in moved_mean if s == site}
            if type(core) is not dist.Normal or by_prec != {"scale"} or by_mean != {"loc"}:
                raise ModelError(
                    f"jaxem: site '{shown}' ({type(core).__name__}) reads '{prec}' through "
                    f"{sorted(by_prec) or 'nothing'} and '{mean}' through "
                    f"{sorted(by_mean) or 'nothing'}: VariationalBayesEM needs a Normal with "
                    f"loc={mean}[z] and scale=1 / jnp.sqrt({prec}[z]); {fix}."
                )
            selected = np.asarray(substituted[site]["loc"])
            change = np.asarray(moved_mean[(site, "loc")])
            loc_ok = np.allclose(selected, change) and np.all(
                np.isin(selected, np.asarray(tangents[mean]))
            )
            if not loc_ok or powers.power(site, "scale", prec) != -0.5:
                raise ModelError(
                    f"jaxem: site '{shown}' reads '{mean}' or '{prec}' through a "
                    "transformation VariationalBayesEM cannot take in closed form; "
                    f"{fix}."
                )
            power_args[(site, "scale")] = (prec, -0.5)
        # loc and scale must select the same component (mu[z] with tau[z]):
        # E[tau_j mu_k] for j != k is no selection of E[tau mu].
        ids = jnp.reshape(1.0 + jnp.arange(math.prod(jnp.shape(values[mean]))), values[mean].shape)
        probe = dict(values)
        probe[prec], probe[mean] = ids.astype(values[prec].dtype), ids.astype(values[mean].dtype)
        chosen = compiled(lambda v: select_moments(fn, v, power_args))(probe)
        for site in sites:
            loc_ids, prec_ids = (np.asarray(chosen[site][a]) for a in ("loc", "scale"))
            if not np.allclose(*np.broadcast_arrays(loc_ids, prec_ids)):
                raise ModelError(
                    f"jaxem: site '{user_site_name(site)}' reads '{mean}' and '{prec}' at "
                    f"different components: the Normal-Gamma pair needs loc={mean}[z] and "
                    f"scale=1 / jnp.sqrt({prec}[z]) with the same index; {fix}."
                )
        group = NormalGamma(prec, mean, tuple(sites))
        groups[prec] = group
        for site in sites:
            readers[site] = group

    # Every factor moving with the pair must be one taken in expectation.
    check_pair_factors(model, groups, names, values, direction, args, kwargs, nesting, _SPELLING)
    return groups, readers, power_args
