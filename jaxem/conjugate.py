"""Conjugate priors: a prior's pseudo-statistics added to the expected statistics.

A global site's prior (`jaxem.global_sites`) conjugate to the closed-form
update of the argument the param reaches keeps that update in closed form under
MAP-EM: the posterior mode solves the same equation as the maximum-likelihood
update, from the expected sufficient statistics plus the prior's
pseudo-statistics. So a prior is one more pytree for ``solve(stats)``: the
registered ``solve_fn`` runs unchanged on ``stats + pseudo_stats(prior)``.

=====================  =====================================  ==============================
prior                  likelihood argument                    statistics after the prior
=====================  =====================================  ==============================
Dirichlet(a)           Categorical / Multinomial ``probs``    counts + a - 1
Beta(a, b)             Bernoulli / Binomial / Geometric       (sum x + a - 1,
                       ``probs``                              sum n + a + b - 2)
Gamma(a, b)            Poisson ``rate``                       (sum x + a - 1, sum w + b)
Gamma(a, b)            Exponential ``rate``                   (sum w + a - 1, sum x + b)
Gamma(a, b)            Gamma ``rate``                         (sum w c + a - 1, sum x + b)
Normal(m, s)           Normal / LogNormal ``loc``             (sum w P x + m / s^2,
                                                              sum w P + 1 / s^2)
Normal(m, s) (event)   MultivariateNormal ``loc``             (sum w P x + m / s^2,
/ MultivariateNormal                                          sum w P + diag(1 / s^2))
Wishart(nu, W)         MultivariateNormal                     (scatter + W^-1,
                       ``precision_matrix``                   sum w + nu - D - 1)
InverseWishart(nu, P)  MultivariateNormal                     (scatter + P,
                       ``covariance_matrix``                  sum w + nu + D + 1)
=====================  =====================================  ==============================

A prior on a variance or precision reaching a Normal's ``scale`` through
``jnp.sqrt(var)`` or ``1 / jnp.sqrt(tau)`` is no selection of the site: its
InverseGamma / Gamma pair lives in `jaxem.power_selection`.

Pseudo-counts that would make a statistic negative (a concentration below 1 on
a cell without weight) are clipped at zero: the mode is then on the boundary,
where such a prior's density is infinite, and the fit's log posterior says so.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import numpyro.distributions as dist

__all__ = ["add_prior_statistics", "conjugate_statistics_fn", "core_distribution"]


def core_distribution(fn):
    """The distribution under plate expansion, ``to_event`` and masks."""
    while isinstance(fn, (dist.ExpandedDistribution, dist.Independent, dist.MaskedDistribution)):
        fn = fn.base_dist
    return fn


def _like(x, ref):
    return jnp.broadcast_to(jnp.asarray(x, jnp.result_type(ref)), jnp.shape(ref))


def _dirichlet_counts(stats, prior):
    (counts,) = stats
    return (jnp.maximum(counts + _like(prior.concentration, counts) - 1, 0.0),)


def _beta_ratio(stats, prior):
    num, den = stats
    a, b = _like(prior.concentration1, num), _like(prior.concentration0, num)
    den = jnp.maximum(den + a + b - 2, 0.0)
    return jnp.clip(num + a - 1, 0.0, den), den


def _gamma_poisson(stats, prior):
    num, den = stats
    a, b = _like(prior.concentration, num), _like(prior.rate, num)
    return jnp.maximum(num + a - 1, 0.0), den + b


def _normal_loc(stats, prior):
    num, den = stats
    precision = 1.0 / _like(prior.scale, num) ** 2
    return num + precision * _like(prior.loc, num), den + precision


def _prior_precision(prior, num):
    if isinstance(prior, dist.MultivariateNormal):
        precision = jnp.asarray(prior.precision_matrix, jnp.result_type(num))
        return jnp.broadcast_to(precision, jnp.shape(num) + jnp.shape(num)[-1:])
    diagonal = 1.0 / _like(prior.scale, num) ** 2
    return diagonal[..., None] * jnp.eye(jnp.shape(num)[-1], dtype=jnp.result_type(num))


def _mvn_loc(stats, prior):
    num, den = stats
    precision = _prior_precision(prior, num)
    loc = _like(prior.loc, num)
    return num + jnp.einsum("...de,...e->...d", precision, loc), den + precision


def _wishart_precision(stats, prior):
    # log|L| (count + nu - D - 1) / 2 - tr((scatter + W0^-1) L) / 2: the mode has
    # covariance (scatter + W0^-1) / (count + nu - D - 1).
    scatter, count = stats
    dim = jnp.shape(scatter)[-1]
    nu = jnp.asarray(prior.concentration, jnp.result_type(count))[..., None, None]
    rate = jnp.broadcast_to(jnp.asarray(prior.rate_matrix, jnp.result_type(scatter)), scatter.shape)
    return scatter + rate, jnp.maximum(count + nu - dim - 1, 0.0)


def _inverse_wishart_covariance(stats, prior):
    # -log|S| (count + nu + D + 1) / 2 - tr((scatter + Psi) S^-1) / 2: the mode is
    # (scatter + Psi) / (count + nu + D + 1).
    scatter, count = stats
    dim = jnp.shape(scatter)[-1]
    nu = jnp.asarray(prior.concentration, jnp.result_type(count))[..., None, None]
    psi = jnp.broadcast_to(jnp.asarray(prior.scale_matrix, jnp.result_type(scatter)), scatter.shape)
    return scatter + psi, count + nu + dim + 1


_PROBS = (
    dist.CategoricalProbs,
    dist.MultinomialProbs,
)
_BETA = (dist.BernoulliProbs, dist.BinomialProbs, dist.GeometricProbs)

# {(prior class, likelihood class, argument): pseudo-statistics}
_CONJUGATE: dict = {}
for _cls in _PROBS:
    _CONJUGATE[(dist.Dirichlet, _cls, "probs")] = _dirichlet_counts
for _cls in _BETA:
    _CONJUGATE[(dist.Beta, _cls, "probs")] = _beta_ratio
_CONJUGATE[(dist.Gamma, dist.Poisson, "rate")] = _gamma_poisson
# The Exponential's and the Gamma's rate statistics are (count, sum x): the prior's
# a - 1 goes to the first, b to the second, as for the Poisson's (sum x, count).
_CONJUGATE[(dist.Gamma, dist.Exponential, "rate")] = _gamma_poisson
_CONJUGATE[(dist.Gamma, dist.Gamma, "rate")] = _gamma_poisson
for _cls in (dist.Normal, dist.LogNormal):
    _CONJUGATE[(dist.Normal, _cls, "loc")] = _normal_loc
for _prior in (dist.Normal, dist.MultivariateNormal):
    _CONJUGATE[(_prior, dist.MultivariateNormal, "loc")] = _mvn_loc
_CONJUGATE[(dist.Wishart, dist.MultivariateNormal, "precision_matrix")] = _wishart_precision
_CONJUGATE[(dist.InverseWishart, dist.MultivariateNormal, "covariance_matrix")] = (
    _inverse_wishart_covariance
)


def conjugate_statistics_fn(prior_cls, consumers) -> Callable | None:
    """The pseudo-statistics of a prior of class ``prior_cls`` for a param reaching
    the distribution arguments ``consumers`` (``(class, argument name)`` pairs), or
    None when the prior is not conjugate to every one of them."""
    found = {_CONJUGATE.get((prior_cls, cls, arg)) for cls, arg in consumers}
    if len(found) != 1 or None in found:
        return None
    return found.pop()


def add_prior_statistics(pseudo_fn, statistics, prior_fn, weight=1.0):
    """``statistics`` (a param's expected statistics) plus ``weight`` times the
    pseudo-statistics of its prior, the global site's distribution ``prior_fn`` (as
    traced).

    ``weight`` is ``1 / N`` for statistics averaged over ``N`` data points (online
    EM): the prior counts once for the whole data set. The pseudo-statistics are
    added to ``statistics / weight`` and the sum scaled back, so that a statistic
    clipped at zero is clipped where the total over the data set would be."""
    if isinstance(weight, (int, float)) and weight == 1.0:
        return pseudo_fn(tuple(statistics), core_distribution(prior_fn))
    totals = pseudo_fn(tuple(s / weight for s in statistics), core_distribution(prior_fn))
    return tuple(t * weight for t in totals)
