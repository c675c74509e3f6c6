"""Wishart and InverseWishart expectations for variational Bayes EM.

For ``Lam ~ Wishart(nu, W)`` (``d x d``): ``E[Lam] = nu W`` and
``E[log|Lam|] = sum_i digamma((nu - i) / 2) + d log 2 + log|W|`` (Bishop, PRML
B.80-B.81). ``Sigma ~ InverseWishart(nu, Psi)`` is ``Sigma^-1 ~ Wishart(nu,
Psi^-1)``, so ``E[Sigma^-1] = nu Psi^-1``, ``E[log|Sigma|] = -E[log|Sigma^-1|]``,
and the KL of two InverseWisharts is that of the Wisharts of the inverses.

Used by the Normal-Wishart pair (`jaxem.normal_wishart`) and by the single
Wishart prior on a MultivariateNormal's ``precision_matrix`` and InverseWishart
prior on its ``covariance_matrix`` (`jaxem.expected_log`), whose q carries
``nu`` broadcast to the site's ``d x d`` shape (every array of a single site's
q is shaped like the site) and its log-determinant moment as ``E[log|.|] * I``.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.scipy.special import digamma, multigammaln

__all__ = [
    "e_logdet",
    "inverse_wishart_moments",
    "log_normalizer",
    "logdet",
    "wishart_kl",
    "wishart_moments",
]


def logdet(m):
    return jnp.linalg.slogdet(m)[1]


def e_logdet(nu, w):
    """``E[log|Lam|]`` under ``Wishart(nu, W)`` (``nu`` batch-shaped)."""
    d = w.shape[-1]
    i = jnp.arange(d)
    return jnp.sum(digamma(0.5 * (nu[..., None] - i)), -1) + d * jnp.log(2.0) + logdet(w)


def log_normalizer(nu, w, d):
    """log B(W, nu) of a Wishart density: -nu/2 log|W| - nu d/2 log 2 - log Gamma_d(nu/2)."""
    return -0.5 * nu * logdet(w) - 0.5 * nu * d * jnp.log(2.0) - multigammaln(0.5 * nu, d)


def wishart_kl(nu, w, nu0, w0):
    """``KL(Wishart(nu, W) || Wishart(nu0, W0))``, batch-shaped."""
    d = w.shape[-1]
    e_log = e_logdet(nu, w)
    log_q = log_normalizer(nu, w, d) + 0.5 * (nu - d - 1) * e_log - 0.5 * nu * d
    trace = jnp.trace(jnp.linalg.solve(w0, w), axis1=-2, axis2=-1)
    log_p = log_normalizer(nu0, w0, d) + 0.5 * (nu0 - d - 1) * e_log - 0.5 * nu * trace
    return log_q - log_p


def _eye_times(value, like):
    return value[..., None, None] * jnp.eye(like.shape[-1], dtype=like.dtype)


def wishart_moments(params):
    """``(E[Lam], E[log|Lam|] I)`` of a single site's ``q = (nu as d x d, W)``."""
    nu, w = params[0][..., 0, 0], params[1]
    return nu[..., None, None] * w, _eye_times(e_logdet(nu, w), w)


def inverse_wishart_moments(params):
    """``(E[Sigma^-1], E[log|Sigma|] I)`` of a single site's ``q = (nu as d x d, Psi)``."""
    nu, psi = params[0][..., 0, 0], params[1]
    psi_inv = jnp.linalg.inv(psi)
    return nu[..., None, None] * psi_inv, _eye_times(-e_logdet(nu, psi_inv), psi)
