"""Truncated stick-breaking (Dirichlet process) weights in variational Bayes EM.

NumPyro spells a truncated Dirichlet-process mixture with ``K - 1`` Beta sticks
and the weights built from them (Blei and Jordan 2006; the NumPyro DP mixture
example)::

    beta = numpyro.sample("beta", dist.Beta(1.0, alpha).expand([K - 1]).to_event(1))
    w = mix_weights(beta)  # w_k = beta_k prod_{j<k} (1 - beta_j), w_K = prod_j (1 - beta_j)
    z = numpyro.sample("z", dist.Categorical(w))

The weights are no selection of ``beta``, so `jaxem.vb_sites.find_readers`
asks this module whether a Categorical's ``probs`` are the stick-breaking
weights of a Beta global site (checked numerically, so any spelling of them
passes: ``jnp.cumprod``, ``StickBreakingTransform`` on ``logit(beta)`` shifted,
...). Then the expected log-density is linear in q(beta)'s moments
``(E log v, E log(1 - v))``::

    E log w_k = E log v_k + sum_{j<k} E log(1 - v_j)   (k < K),
    E log w_K = sum_{j<K} E log(1 - v_j),

so VBEM's conjugate update is closed form: ``q(v_k) = Beta(a_k + N_k,
b_k + sum_{j>k} N_j)``, ``N_k`` the expected count of component ``k``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxem.expected_log import categorical_expected_log_density

__all__ = [
    "expected_log_stick_weights",
    "is_stick_breaking",
    "stick_breaking_expected",
    "stick_breaking_weights",
]


def stick_breaking_weights(v):
    """The ``K`` weights of ``K - 1`` sticks ``v`` (last axis)."""
    v = jnp.asarray(v)
    rest = jnp.cumprod(1.0 - v, axis=-1)
    ones = jnp.ones(v.shape[:-1] + (1,), v.dtype)
    return jnp.concatenate([v, ones], -1) * jnp.concatenate([ones, rest], -1)


def expected_log_stick_weights(e_log_v, e_log_rest):
    """``E log w`` from ``E log v`` and ``E log(1 - v)`` (last axis ``K - 1``)."""
    before = jnp.cumsum(e_log_rest, axis=-1)
    zero = jnp.zeros(jnp.shape(e_log_v)[:-1] + (1,), jnp.result_type(e_log_v))
    return jnp.concatenate([e_log_v, zero], -1) + jnp.concatenate([zero, before], -1)


def stick_breaking_expected(args, value, moments):
    """The expected log-density of a Categorical whose ``probs`` are the
    stick-breaking weights of a Beta global site, from its moments."""
    return categorical_expected_log_density(args, value, (expected_log_stick_weights(*moments),))


def is_stick_breaking(probs, sticks, probs_tangent=None, sticks_tangent=None) -> bool:
    """Whether ``probs`` (concrete) are ``stick_breaking_weights(sticks)`` (broadcast
    over the site's batch dims), and, given the tangents of a JVP, whether they
    move with the sticks as the weights do (two checks, so that a coincidence at
    one point does not pass)."""
    probs, sticks = np.asarray(probs), np.asarray(sticks)
    if sticks.ndim < 1 or probs.shape[-1:] != (sticks.shape[-1] + 1,):
        return False
    weights = np.asarray(stick_breaking_weights(sticks))
    try:
        np.broadcast_shapes(probs.shape, weights.shape)
    except ValueError:
        return False
    if not np.allclose(probs, weights, rtol=1e-5, atol=1e-7):
        return False
    if probs_tangent is None:
        return True
    _, moved = jax.jvp(stick_breaking_weights, (jnp.asarray(sticks),), (sticks_tangent,))
    return bool(np.allclose(np.asarray(probs_tangent), np.asarray(moved), rtol=1e-5, atol=1e-7))
