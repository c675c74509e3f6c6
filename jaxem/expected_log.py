"""Conjugate-exponential pieces of variational Bayes EM (`jaxem.vbem`).

A global site's variational posterior q(theta) is in its prior's family, an
exponential family with sufficient statistics T(theta) (``log w`` for a
Dirichlet, ``(log lam, lam)`` for a Gamma, ...). Two registries:

* :data:`PRIOR_FAMILIES`: per prior class, the moments ``E_q[T(theta)]`` of q,
  its natural parameters (the coefficients of T in ``log q``) and back;
* :data:`EXPECTED_LOG_DENSITIES`: per (likelihood class, argument, prior
  class), the expected log-density ``E_q[log p(x | theta)]`` of a site whose argument is a
  selection of theta (``w[z]``, ``lam[z]``), written from the moments selected
  the same way. It is linear in the moments, so its gradient with respect to
  them is the expected sufficient statistics, and the optimal q(theta) has
  natural parameters ``prior's + that gradient`` (conjugacy).

The expectation is written per family rather than by substituting a point into
the model's own density: NumPyro's Categorical renormalizes its ``probs``, so
``exp(E log w)`` in ``dist.Categorical`` would not give ``E log w``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax.numpy as jnp
import numpyro.distributions as dist
from jax.scipy.special import digamma, gammaln
from numpyro.distributions.kl import kl_divergence

from jaxem.exceptions import a_or_an
from jaxem.wishart import inverse_wishart_moments, wishart_kl, wishart_moments

__all__ = [
    "EXPECTED_LOG_DENSITIES",
    "POWER_ARGUMENTS",
    "categorical_expected_log_density",
    "conjugate_update",
    "normal_expected_log_density",
    "PRIOR_FAMILIES",
    "PriorFamily",
    "supported_pairs",
]


class PriorFamily(NamedTuple):
    """A conjugate prior family, q(theta) in it described by its constructor's
    arrays (``params``, each shaped like theta).

    Attributes:
        params: ``distribution -> tuple of arrays`` (its constructor arguments).
        make: ``tuple of arrays -> distribution``.
        moments: ``params -> E_q[T(theta)]``, a tuple of arrays shaped like theta.
        natural: ``params -> natural parameters`` (coefficients of T in log q).
        from_natural: the inverse of ``natural``.
        proper: ``params -> bool array``: where the density is proper.
        kl: ``(params of q, params of the prior) -> KL(q || prior)``, elementwise.
        point: ``params -> a point in the support`` (the mean, or where the mean
            may be infinite the mode).
    """

    params: Callable
    make: Callable
    moments: Callable
    natural: Callable
    from_natural: Callable
    proper: Callable
    kl: Callable
    point: Callable


def _dirichlet_moments(params):
    (alpha,) = params
    return (digamma(alpha) - digamma(jnp.sum(alpha, -1, keepdims=True)),)


def _gamma_moments(params):
    a, b = params
    return digamma(a) - jnp.log(b), a / b


def _beta_moments(params):
    a, b = params
    total = digamma(a + b)
    return digamma(a) - total, digamma(b) - total


def _normal_moments(params):
    m, s = params
    return m, m**2 + s**2


def _inverse_gamma_moments(params):
    # T(v) = (log v, 1 / v): 1 / v is Gamma(a, b).
    a, b = params
    return jnp.log(b) - digamma(a), a / b


def _matrix_nu(nu, like):
    """``nu`` broadcast to the ``d x d`` shape of a single site's q (see `jaxem.wishart`)."""
    nu = jnp.asarray(nu, like.dtype)
    return jnp.broadcast_to(nu[..., None, None], jnp.shape(nu) + like.shape[-2:])


def _corner(value, like):
    """A scalar coefficient of ``log|.|`` as a ``d x d`` array (at [0, 0]); the
    updates read it back as the sum of the array."""
    d = like.shape[-1]
    return value[..., None, None] * (jnp.arange(d)[:, None] + jnp.arange(d) == 0)


def _symmetric(m):
    return 0.5 * (m + jnp.swapaxes(m, -1, -2))


def _wishart_natural(p):
    nu, w = p[0][..., 0, 0], p[1]
    d = w.shape[-1]
    return -0.5 * jnp.linalg.inv(w), _corner(0.5 * (nu - d - 1), w)


def _wishart_from_natural(eta):
    d = eta[0].shape[-1]
    w = _symmetric(jnp.linalg.inv(-2 * _symmetric(eta[0])))
    return _matrix_nu(2 * jnp.sum(eta[1], (-2, -1)) + d + 1, w), w


def _inverse_wishart_natural(p):
    nu, psi = p[0][..., 0, 0], p[1]
    d = psi.shape[-1]
    return -0.5 * psi, _corner(-0.5 * (nu + d + 1), psi)


def _inverse_wishart_from_natural(eta):
    d = eta[0].shape[-1]
    psi = -2 * _symmetric(eta[0])
    return _matrix_nu(-2 * jnp.sum(eta[1], (-2, -1)) - d - 1, psi), psi


def _proper_matrix(p):
    d = p[1].shape[-1]
    return jnp.all(p[0] > d - 1) & jnp.all(jnp.linalg.eigvalsh(_symmetric(p[1])) > 0)


def _kl_of(make):
    return lambda q, prior: kl_divergence(make(q), make(prior))


def _mean_of(make):
    return lambda q: make(q).mean


def _normal_from_natural(eta):
    var = -0.5 / eta[1]
    return eta[0] * var, jnp.sqrt(var)


PRIOR_FAMILIES: dict = {
    dist.Dirichlet: PriorFamily(
        params=lambda d: (d.concentration,),
        make=lambda p: dist.Dirichlet(p[0]),
        moments=_dirichlet_moments,
        natural=lambda p: (p[0] - 1.0,),
        from_natural=lambda eta: (eta[0] + 1.0,),
        proper=lambda p: p[0] > 0,
        kl=_kl_of(lambda p: dist.Dirichlet(p[0])),
        point=_mean_of(lambda p: dist.Dirichlet(p[0])),
    ),
    dist.Gamma: PriorFamily(
        params=lambda d: (d.concentration, d.rate),
        make=lambda p: dist.Gamma(*p),
        moments=_gamma_moments,
        natural=lambda p: (p[0] - 1.0, -p[1]),
        from_natural=lambda eta: (eta[0] + 1.0, -eta[1]),
        proper=lambda p: (p[0] > 0) & (p[1] > 0),
        kl=_kl_of(lambda p: dist.Gamma(*p)),
        point=_mean_of(lambda p: dist.Gamma(*p)),
    ),
    dist.Beta: PriorFamily(
        params=lambda d: (d.concentration1, d.concentration0),
        make=lambda p: dist.Beta(*p),
        moments=_beta_moments,
        natural=lambda p: (p[0] - 1.0, p[1] - 1.0),
        from_natural=lambda eta: (eta[0] + 1.0, eta[1] + 1.0),
        proper=lambda p: (p[0] > 0) & (p[1] > 0),
        kl=_kl_of(lambda p: dist.Beta(*p)),
        point=_mean_of(lambda p: dist.Beta(*p)),
    ),
    dist.Normal: PriorFamily(
        params=lambda d: (d.loc, d.scale),
        make=lambda p: dist.Normal(*p),
        moments=_normal_moments,
        natural=lambda p: (p[0] / p[1] ** 2, -0.5 / p[1] ** 2),
        from_natural=_normal_from_natural,
        proper=lambda p: (p[1] > 0) & jnp.isfinite(p[1]),
        kl=_kl_of(lambda p: dist.Normal(*p)),
        point=_mean_of(lambda p: dist.Normal(*p)),
    ),
    # On a Normal's variance. log q(v) = -(a + 1) log v - b / v + const; the KL is
    # that of the Gammas of 1 / v (NumPyro registers none for InverseGamma), and the
    # point the mode (the mean is infinite for a <= 1).
    dist.InverseGamma: PriorFamily(
        params=lambda d: (d.concentration, d.rate),
        make=lambda p: dist.InverseGamma(*p),
        moments=_inverse_gamma_moments,
        natural=lambda p: (-p[0] - 1.0, -p[1]),
        from_natural=lambda eta: (-eta[0] - 1.0, -eta[1]),
        proper=lambda p: (p[0] > 0) & (p[1] > 0),
        kl=_kl_of(lambda p: dist.Gamma(*p)),
        point=lambda p: p[1] / (p[0] + 1.0),
    ),
    # On a MultivariateNormal's precision_matrix (its loc known); q = (nu, W), nu
    # broadcast to d x d, moments (E Lam, E log|Lam| I) (`jaxem.wishart`).
    dist.Wishart: PriorFamily(
        params=lambda d: (_matrix_nu(d.concentration, d.scale_matrix), d.scale_matrix),
        make=lambda p: dist.Wishart(p[0][..., 0, 0], scale_matrix=p[1]),
        moments=wishart_moments,
        natural=_wishart_natural,
        from_natural=_wishart_from_natural,
        proper=_proper_matrix,
        kl=lambda q, p: wishart_kl(q[0][..., 0, 0], q[1], p[0][..., 0, 0], p[1]),
        point=lambda p: p[0] * p[1],
    ),
    # On a MultivariateNormal's covariance_matrix (its loc known); q = (nu, Psi),
    # moments (E Sigma^-1, E log|Sigma| I); the KL is that of the Wisharts of the
    # inverses, the point the mode.
    dist.InverseWishart: PriorFamily(
        params=lambda d: (_matrix_nu(d.concentration, d.scale_matrix), d.scale_matrix),
        make=lambda p: dist.InverseWishart(p[0][..., 0, 0], scale_matrix=p[1]),
        moments=inverse_wishart_moments,
        natural=_inverse_wishart_natural,
        from_natural=_inverse_wishart_from_natural,
        proper=_proper_matrix,
        kl=lambda q, p: wishart_kl(
            q[0][..., 0, 0], jnp.linalg.inv(q[1]), p[0][..., 0, 0], jnp.linalg.inv(p[1])
        ),
        point=lambda p: p[1] / (p[0] + p[1].shape[-1] + 1.0),
    ),
}


def conjugate_update(family, prior, stats):
    """q(theta) in ``family`` whose natural parameters are the prior's plus the
    expected sufficient statistics ``stats`` (the VB-M-step of one site)."""
    return family.from_natural(tuple(p + s for p, s in zip(family.natural(prior), stats)))


# -- expected log-densities: (args, value, moments selected like the argument) ----


def _categorical(args, value, moments):
    (log_w,) = moments
    value = jnp.asarray(value)
    shape = jnp.broadcast_shapes(jnp.shape(value), jnp.shape(log_w)[:-1])
    log_w = jnp.broadcast_to(log_w, shape + jnp.shape(log_w)[-1:])
    index = jnp.broadcast_to(value, shape)[..., None].astype(jnp.int32)
    return jnp.take_along_axis(log_w, index, -1)[..., 0]


categorical_expected_log_density = _categorical


def _bernoulli(args, value, moments):
    log_p, log_q = moments
    return value * log_p + (1 - value) * log_q


def _total_count(args):
    return jnp.asarray(args.get("total_count", 1), jnp.result_type(float))


def _binomial(args, value, moments):
    # log C(n, x) + x E log p + (n - x) E log(1 - p), the count n fixed.
    log_p, log_q = moments
    n = _total_count(args)
    log_choose = gammaln(n + 1.0) - gammaln(value + 1.0) - gammaln(n - value + 1.0)
    return log_choose + value * log_p + (n - value) * log_q


def _multinomial(args, value, moments):
    # log n! - sum_k log x_k! + sum_k x_k E log w_k, the count n fixed.
    (log_w,) = moments
    n = _total_count(args)
    log_coefficient = gammaln(n + 1.0) - jnp.sum(gammaln(value + 1.0), -1)
    return log_coefficient + jnp.sum(value * log_w, -1)


def _mvn_expected(args, value, e_precision, e_log_det_precision):
    diff = jnp.asarray(value) - jnp.asarray(args.get("loc", 0.0))
    d = diff.shape[-1]
    quad = jnp.sum(diff[..., :, None] * e_precision * diff[..., None, :], (-2, -1))
    return 0.5 * e_log_det_precision - 0.5 * d * jnp.log(2 * jnp.pi) - 0.5 * quad


def _mvn_precision(args, value, moments):
    # Moments of Lam, selected: (E Lam, E log|Lam| I).
    e_lam, e_log_det = moments
    return _mvn_expected(args, value, e_lam, e_log_det[..., 0, 0])


def _mvn_covariance(args, value, moments):
    # Moments of Sigma, selected: (E Sigma^-1, E log|Sigma| I).
    e_inverse, e_log_det = moments
    return _mvn_expected(args, value, e_inverse, -e_log_det[..., 0, 0])


def _poisson(args, value, moments):
    log_rate, rate = moments
    return value * log_rate - rate - gammaln(value + 1.0)


def _exponential(args, value, moments):
    log_rate, rate = moments
    return log_rate - rate * value


def _normal_loc(args, value, moments):
    mean, second = moments
    scale = args["scale"]
    square = value**2 - 2 * value * mean + second
    return -0.5 * square / scale**2 - jnp.log(scale) - 0.5 * jnp.log(2 * jnp.pi)


def normal_expected_log_density(square, scale_prior, moments):
    """``E_q[log N(x | mu, sigma)]`` from ``square = E_q[(x - mu)^2]`` and the
    moments of the prior on the scale: a Gamma on the precision ``(E log tau,
    E tau)`` or an InverseGamma on the variance ``(E log v, E[1 / v])``."""
    e_log, e_precision = moments
    e_log_precision = e_log if scale_prior is dist.Gamma else -e_log
    return 0.5 * e_log_precision - 0.5 * jnp.log(2 * jnp.pi) - 0.5 * e_precision * square


def _normal_precision(args, value, moments):
    # The scale is tau ** -1/2 (`jaxem.vb_powers`): the moments are tau's, selected.
    return normal_expected_log_density((value - args["loc"]) ** 2, dist.Gamma, moments)


def _normal_variance(args, value, moments):
    # The scale is v ** 1/2: the moments are v's, selected.
    return normal_expected_log_density((value - args["loc"]) ** 2, dist.InverseGamma, moments)


# {(likelihood class, argument, prior class): expected log-density}
EXPECTED_LOG_DENSITIES: dict = {
    (dist.CategoricalProbs, "probs", dist.Dirichlet): _categorical,
    (dist.BernoulliProbs, "probs", dist.Beta): _bernoulli,
    (dist.BinomialProbs, "probs", dist.Beta): _binomial,
    (dist.MultinomialProbs, "probs", dist.Dirichlet): _multinomial,
    (dist.Poisson, "rate", dist.Gamma): _poisson,
    (dist.Exponential, "rate", dist.Gamma): _exponential,
    (dist.Normal, "loc", dist.Normal): _normal_loc,
    (dist.MultivariateNormal, "precision_matrix", dist.Wishart): _mvn_precision,
    (dist.MultivariateNormal, "covariance_matrix", dist.InverseWishart): _mvn_covariance,
    # Read through a power, not a selection: scale = 1 / sqrt(tau[z]), sqrt(v[z])
    # (`jaxem.vb_powers`).
    (dist.Normal, "scale", dist.Gamma): _normal_precision,
    (dist.Normal, "scale", dist.InverseGamma): _normal_variance,
}

# {(likelihood class, argument, prior class): (power, the supported spellings)}: the
# arguments a prior reads through a power of a selection, not a selection.
POWER_ARGUMENTS: dict = {
    (dist.Normal, "scale", dist.Gamma): (
        -0.5,
        "precision tau (scale=1 / jnp.sqrt(tau[z]), tau[z] ** -0.5 or "
        "jax.lax.rsqrt(tau[z]), tau the site or an indexing of it)",
    ),
    (dist.Normal, "scale", dist.InverseGamma): (
        0.5,
        "variance v (scale=jnp.sqrt(v[z]) or v[z] ** 0.5, v the site or an indexing of it)",
    ),
}


def supported_pairs() -> str:
    """The conjugate pairs, in words (for messages)."""
    singles = ", ".join(
        f"{prior.__name__} prior on {a_or_an(cls.__name__)}'s "
        f"{POWER_ARGUMENTS[(cls, arg, prior)][1]}"
        if (cls, arg, prior) in POWER_ARGUMENTS
        else f"{prior.__name__} prior on {a_or_an(cls.__name__.removesuffix('Probs'))} '{arg}'"
        for cls, arg, prior in EXPECTED_LOG_DENSITIES
    )
    return (
        singles + ", Beta prior on the sticks of a Categorical's stick-breaking 'probs' "
        "(truncated Dirichlet process: w_k = v_k prod_{j<k} (1 - v_j), w_K = "
        "prod_{j<K} (1 - v_j)), independent Normal prior on a Normal's 'loc' beside a "
        "Gamma prior on its precision or an InverseGamma prior on its variance (mean "
        "field: x ~ Normal(mu[z], 1 / jnp.sqrt(tau[z])) or Normal(mu[z], "
        "jnp.sqrt(v[z]))), Normal-Gamma prior on a Normal's 'loc' and precision "
        "(tau ~ Gamma, mu ~ Normal(m0, 1 / jnp.sqrt(beta0 * tau)), "
        "x ~ Normal(mu[z], 1 / jnp.sqrt(tau[z]))), "
        "Normal-Wishart prior on a MultivariateNormal's 'loc' and "
        "'precision_matrix' (Lam ~ Wishart, mu ~ MultivariateNormal(m0, "
        "precision_matrix=beta0 * Lam))"
    )
