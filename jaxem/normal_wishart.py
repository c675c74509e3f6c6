"""The Normal-Wishart pair of variational Bayes EM (`jaxem.VariationalBayesEM`).

A Gaussian mixture with full covariances, as a NumPyro user writes it::

    Lam = numpyro.sample("Lam", dist.Wishart(nu0, scale_matrix=W0))   # in a plate K
    mu = numpyro.sample("mu", dist.MultivariateNormal(m0, precision_matrix=beta0 * Lam))
    x ~ dist.MultivariateNormal(mu[z], precision_matrix=Lam[z])

is conjugate jointly in ``(mu, Lam)`` (Bishop, PRML 10.2): q(mu, Lam) is
Normal-Wishart, ``q(Lam) = Wishart(nu, W)`` and ``q(mu | Lam) =
MVN(m, precision_matrix=beta Lam)``. Its sufficient statistics are
``T = (Lam, log|Lam|, Lam mu, mu^T Lam mu)``; the expected log-density of an
observation is linear in ``E_q[T]``, so the generic machinery of `jaxem.vbem`
applies once the moments are carried in arrays shaped like the two sites:

* the precision site carries ``(E[Lam], E[log|Lam|] * I)``;
* the mean site carries ``(E[Lam mu], E[mu^T Lam mu] * 1)``;

both are read back at ``[..., 0, 0]`` / ``[..., 0]`` after the model selected
them (``Lam[z]``, ``mu[z]``), which is how the other pairs select their moments.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

from jaxem.conjugate import core_distribution
from jaxem.exceptions import ModelError, a_or_an
from jaxem.numpyro_internals import user_site_name
from jaxem.vb_sites import (
    check_pair_factors,
    compiled,
    core_args,
    core_of,
    moved_arguments,
    site_args_fn,
    tangent_fn,
)
from jaxem.wishart import e_logdet, wishart_kl

__all__ = [
    "NormalWishart",
    "find_normal_wishart",
    "mean_given_precision",
    "nw_expected_log_density",
    "nw_kl",
    "nw_make",
    "nw_moments",
    "nw_point",
    "nw_priors",
    "nw_update",
]

_SPELLING = (
    "write the pair as {prec} ~ dist.Wishart(df, scale_matrix=... or rate_matrix=... or "
    "scale_tril=...), {mean} ~ dist.MultivariateNormal(m0, precision_matrix=beta0 * {prec}) "
    "and the data as dist.MultivariateNormal({mean}[z], precision_matrix={prec}[z])"
)


class NormalWishart(NamedTuple):
    """A Normal-Wishart pair: global sites ``precision`` (Wishart prior) and
    ``mean`` (MultivariateNormal prior with precision ``beta0 * precision``)
    read by the sites ``readers`` (MultivariateNormal likelihoods)."""

    precision: str
    mean: str
    readers: tuple


def _mv(a, v):
    return jnp.sum(a * v[..., None, :], -1)


def nw_moments(q_prec, q_mean):
    """``E_q[T]`` in arrays shaped like the two sites (see the module doc)."""
    nu, w = q_prec
    m, beta = q_mean
    d = m.shape[-1]
    e_lam = nu[..., None, None] * w
    e_lam_mu = _mv(e_lam, m)
    e_mu_lam_mu = d / beta + jnp.sum(m * e_lam_mu, -1)
    return (
        (e_lam, e_logdet(nu, w)[..., None, None] * jnp.eye(d, dtype=w.dtype)),
        (e_lam_mu, e_mu_lam_mu[..., None] * jnp.ones(d, m.dtype)),
    )


def nw_point(q_prec, q_mean):
    """A point in the support: the means of q(Lam) and q(mu)."""
    nu, w = q_prec
    return nu[..., None, None] * w, q_mean[0]


def nw_expected_log_density(value, loc, precision):
    """``E_q[log MVN(x | mu, Lam^-1)]`` from the moments selected like the
    distribution's ``loc`` and ``precision_matrix``."""
    e_lam_mu, e_mu_lam_mu = loc
    e_lam, e_logdet = precision
    x = jnp.asarray(value)
    d = x.shape[-1]
    quad = (
        jnp.sum(x[..., :, None] * e_lam * x[..., None, :], (-2, -1))
        - 2 * jnp.sum(x * e_lam_mu, -1)
        + e_mu_lam_mu[..., 0]
    )
    return 0.5 * e_logdet[..., 0, 0] - 0.5 * d * jnp.log(2 * jnp.pi) - 0.5 * quad


def nw_priors(trace, group):
    """``((nu0, W0), (m0, beta0))`` shaped like q, read from the trace's priors
    (``beta0`` is the ratio of the mean's prior precision to the site's value)."""
    lam = jnp.asarray(trace.sites[group.precision].value)
    shape = lam.shape
    wishart = core_distribution(trace.sites[group.precision].fn)
    dtype = jnp.result_type(float)
    nu0 = jnp.broadcast_to(jnp.asarray(wishart.concentration, dtype), shape[:-2])
    w0 = jnp.broadcast_to(jnp.asarray(wishart.scale_matrix, dtype), shape)
    # The distribution's attributes, not its recorded arguments: this trace may
    # have come through a JAX transformation (an aux output) that drops the records.
    mvn = core_distribution(trace.sites[group.mean].fn)
    m0 = jnp.broadcast_to(jnp.asarray(mvn.loc, dtype), shape[:-1])
    precision = jnp.broadcast_to(mvn.precision_matrix, shape)
    beta0 = precision[..., 0, 0] / lam[..., 0, 0]
    return (nu0, w0), (m0, beta0)


def nw_update(prior_prec, prior_mean, stats_prec, stats_mean):
    """q(mu, Lam) with natural parameters the prior's plus the expected
    sufficient statistics (``d log Z_q / d E[T]``)."""
    nu0, w0 = prior_prec
    m0, beta0 = prior_mean
    d = m0.shape[-1]
    g_lam, g_logdet = stats_prec
    g_lam_mu, g_mu_lam_mu = stats_mean
    g_lam = 0.5 * (g_lam + jnp.swapaxes(g_lam, -1, -2))
    # Coefficients of (Lam, log|Lam|, Lam mu, mu^T Lam mu) in log p + E log p(x | .).
    outer0 = m0[..., :, None] * m0[..., None, :]
    eta_lam = -0.5 * (jnp.linalg.inv(w0) + beta0[..., None, None] * outer0) + g_lam
    eta_logdet = 0.5 * (nu0 - d) + jnp.sum(g_logdet, (-2, -1))
    eta_lam_mu = beta0[..., None] * m0 + g_lam_mu
    eta_mu_lam_mu = -0.5 * beta0 + jnp.sum(g_mu_lam_mu, -1)
    beta = -2 * eta_mu_lam_mu
    m = eta_lam_mu / beta[..., None]
    w_inv = -2 * eta_lam - beta[..., None, None] * m[..., :, None] * m[..., None, :]
    w = jnp.linalg.inv(w_inv)
    w = 0.5 * (w + jnp.swapaxes(w, -1, -2))
    return (2 * eta_logdet + d, w), (m, beta)


def nw_kl(q_prec, q_mean, prior_prec, prior_mean):
    """``KL(q(mu, Lam) || p(mu, Lam))`` summed: the Wisharts' KL plus the
    expected KL of the conditional Gaussians."""
    nu, w = q_prec
    m, beta = q_mean
    nu0, w0 = prior_prec
    m0, beta0 = prior_mean
    d = m.shape[-1]
    diff = m - m0
    kl_mean = 0.5 * (
        d * beta0 / beta
        - d
        + d * jnp.log(beta / beta0)
        + beta0 * nu * jnp.sum(diff * _mv(w, diff), -1)
    )
    return jnp.sum(wishart_kl(nu, w, nu0, w0) + kl_mean)


def nw_make(q_prec, q_mean):
    """``(q(Lam), q(mu))`` as NumPyro distributions: ``Wishart(nu, W)`` and
    the marginal of mu, ``MultivariateStudentT(nu - D + 1, m, ((nu - D + 1) beta W)^-1)``.
    (q(mu | Lam) is `mean_given_precision`.)"""
    nu, w = q_prec
    m, beta = q_mean
    d = m.shape[-1]
    df = nu - d + 1
    cov = jnp.linalg.inv((df * beta)[..., None, None] * w)
    return (
        dist.Wishart(nu, scale_matrix=w),
        dist.MultivariateStudentT(df, m, jnp.linalg.cholesky(cov)),
    )


def mean_given_precision(q_mean, precision):
    """q(mu | Lam): ``MultivariateNormal(m, precision_matrix=beta * Lam)``, the
    conjugate half of a Normal-Wishart posterior.

    Args:
        q_mean: ``result.q[mean site]``, the pair ``(m, beta)``.
        precision: a value (or draws) of the precision site.

    Returns:
        The conditional posterior of the mean site given ``precision``.
    """
    m, beta = q_mean
    return dist.MultivariateNormal(m, precision_matrix=beta[..., None, None] * precision)


# -- detection (Python, concrete values, once per input signature) ------------------


def _is_selection(linear, change, tangent):
    linear, change = np.asarray(linear), np.asarray(change)
    return np.allclose(linear, change) and bool(np.all(np.isin(linear, np.asarray(tangent))))


def find_normal_wishart(model, names, trace, values, args, kwargs, nesting):
    """The Normal-Wishart pairs among the global sites ``names``.

    Returns:
        ``({precision site: NormalWishart}, {reading site: NormalWishart})``.

    Raises:
        ModelError: naming the site, for a Wishart, InverseWishart or
            MultivariateNormal prior written in a spelling that is not the
            conjugate one.
    """
    names = list(names)
    priors = {n: core_distribution(trace.sites[n].fn) for n in names}
    # Without a global MultivariateNormal prior there is no pair: a Wishart or an
    # InverseWishart is a single site on a known-mean precision or covariance
    # (`jaxem.expected_log`).
    has_mean = any(isinstance(p, dist.MultivariateNormal) for p in priors.values())
    for n, prior in priors.items():
        if isinstance(prior, dist.WishartCholesky) or (
            isinstance(prior, dist.InverseWishart) and has_mean
        ):
            raise ModelError(
                f"jaxem: global site '{n}' has {a_or_an(type(prior).__name__)} prior: "
                "VariationalBayesEM's Normal-Wishart pair is written on the precision; "
                + _SPELLING.format(prec=n, mean="mu")
                + ". For a MAP fit use EM(model, global_sites=...)."
            )
    wisharts = [n for n in names if isinstance(priors[n], dist.Wishart)]
    if not wisharts or not has_mean:
        return {}, {}
    rng = np.random.default_rng(1)
    tangents = {
        n: jnp.asarray(rng.normal(size=jnp.shape(values[n])), jnp.result_type(values[n]))
        for n in names
    }
    fn = site_args_fn(model, args, kwargs, nesting)
    linear = compiled(fn)(tangents)
    jvp = tangent_fn(fn)

    def direction(source):
        return {n: (tangents[n] if n == source else jnp.zeros_like(values[n])) for n in values}

    groups, readers = {}, {}
    for prec in wisharts:
        prior = priors[prec]
        dim = jnp.shape(values[prec])[-1]
        if not bool(jnp.all(jnp.asarray(prior.concentration) > dim - 1)):
            raise ModelError(
                f"jaxem: global site '{prec}' has an improper Wishart prior (df "
                f"{np.asarray(prior.concentration).tolist()} must exceed dimension - 1 = "
                f"{dim - 1}): variational Bayes needs a proper prior."
            )
        moved = moved_arguments(jvp, values, direction(prec))
        means = [s for s, _ in moved if s in names]
        fix = _SPELLING.format(prec=prec, mean=means[0] if means else "mu")
        if len(set(means)) != 1:
            raise ModelError(
                f"jaxem: global site '{prec}' has a Wishart prior but "
                + (
                    "no global site's prior reads it"
                    if not means
                    else f"the priors of {sorted(set(means))} read it"
                )
                + f": VariationalBayesEM supports the Normal-Wishart pair; {fix}."
            )
        mean = means[0]
        core = priors[mean]
        if jnp.shape(values[mean])[:-1] != jnp.shape(values[prec])[:-2]:
            # A tied precision shared by several means: q(mu, Lam) is then no
            # product of Normal-Wisharts, and the per-pair updates would be wrong.
            raise ModelError(
                f"jaxem: global site '{mean}' has shape {jnp.shape(values[mean])} and "
                f"'{prec}' {jnp.shape(values[prec])}: VariationalBayesEM's Normal-Wishart "
                "pair needs one mean per precision matrix (in the same plates; a tied "
                f"precision is not supported); {fix}."
            )
        if not isinstance(core, dist.MultivariateNormal) or set(
            a for s, a in moved if s == mean
        ) != {"precision_matrix"}:
            raise ModelError(
                f"jaxem: the prior of global site '{mean}' reads '{prec}' in a way "
                f"VariationalBayesEM cannot take in closed form; {fix}."
            )
        lin = np.asarray(linear[mean]["precision_matrix"])
        t = np.asarray(tangents[prec])
        beta0 = lin[..., 0, 0] / t[..., 0, 0]
        if not np.allclose(lin, beta0[..., None, None] * t) or not np.all(beta0 > 0):
            raise ModelError(
                f"jaxem: the prior of global site '{mean}' must have precision_matrix = "
                f"beta0 * {prec} with a positive beta0; {fix}."
            )
        if ("loc" in core_args(trace, trace.sites[mean])[1]) and (mean, "loc") in moved:
            raise ModelError(
                f"jaxem: the prior mean of global site '{mean}' reads '{prec}'; {fix}."
            )
        moved_mean = moved_arguments(jvp, values, direction(mean))
        sites = sorted({s for s, _ in moved if s != mean} | {s for s, _ in moved_mean})
        for site in sites:
            shown = user_site_name(site)
            if site in names:
                raise ModelError(
                    f"jaxem: the prior of global site '{shown}' reads '{mean}': "
                    "VariationalBayesEM supports independent priors only; " + fix + "."
                )
            if not isinstance(core_of(trace.sites[site].fn), dist.MultivariateNormal):
                raise ModelError(
                    f"jaxem: site '{shown}' reads '{prec}'/'{mean}' but is a "
                    f"{type(core_of(trace.sites[site].fn)).__name__}; {fix}."
                )
            by_prec = {a for s, a in moved if s == site}
            by_mean = {a for s, a in moved_mean if s == site}
            if by_prec != {"precision_matrix"} or by_mean != {"loc"}:
                raise ModelError(
                    f"jaxem: site '{shown}' reads '{prec}' through {sorted(by_prec) or 'nothing'} "
                    f"and '{mean}' through {sorted(by_mean) or 'nothing'}: VariationalBayesEM "
                    f"needs loc={mean}[z] and precision_matrix={prec}[z] (a covariance_matrix or "
                    f"scale_tril spelling is not conjugate in closed form); {fix}."
                )
            for source, arg, changes in (
                (prec, "precision_matrix", moved),
                (mean, "loc", moved_mean),
            ):
                if not _is_selection(linear[site][arg], changes[(site, arg)], tangents[source]):
                    raise ModelError(
                        f"jaxem: site '{shown}' reads '{source}' through a transformation "
                        f"of it ({arg}); write the argument as the global site itself or an "
                        f"indexing of it; {fix}."
                    )
        # loc and precision_matrix must select the same component (mu[z] with
        # Lam[z]): E[Lam_j mu_k] for j != k is no selection of E[Lam mu].
        batch = jnp.shape(values[mean])[:-1]
        ids = jnp.reshape(1.0 + jnp.arange(math.prod(batch)), batch)
        probe = dict(values)
        probe[prec] = ids[..., None, None] * jnp.ones_like(values[prec])
        probe[mean] = ids[..., None] * jnp.ones_like(values[mean])
        selected = compiled(fn)(probe)
        for site in sites:
            loc_ids = np.asarray(selected[site]["loc"])[..., 0]
            prec_ids = np.asarray(selected[site]["precision_matrix"])[..., 0, 0]
            if not np.array_equal(*np.broadcast_arrays(loc_ids, prec_ids)):
                raise ModelError(
                    f"jaxem: site '{user_site_name(site)}' reads '{mean}' and '{prec}' at "
                    f"different components: the Normal-Wishart pair needs loc={mean}[z] and "
                    f"precision_matrix={prec}[z] with the same index; {fix}."
                )
        group = NormalWishart(prec, mean, tuple(sites))
        groups[prec] = group
        for site in sites:
            readers[site] = group

    # Every factor moving with the pair must be one taken in expectation.
    check_pair_factors(model, groups, names, values, direction, args, kwargs, nesting, _SPELLING)
    return groups, readers
