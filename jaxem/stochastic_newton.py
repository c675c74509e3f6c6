"""SAEM's update of the params without a closed form once its step sizes decrease: a
Robbins-Monro step on the score, preconditioned by a stochastic approximation of
the complete-data information (Gu and Kong 1998; locally Lange's 1995 EM gradient
algorithm).

With ``f_k(u) = mean_chains log p(x, z_k | u)`` at this iteration's draws ``z_k``
(``u``: the free params in unconstrained coordinates),

``J_k = J_{k-1} + gamma_k (-hessian f_k(u_k) - J_{k-1})``,
``u_{k+1} = u_k + gamma_k J_k^{-1} grad f_k(u_k)``.

By Fisher's identity ``E[grad f_k(u) | u] = grad log p(x | u)`` when ``z_k`` is drawn
from ``p(z | x, u)``, so the mean field is ``J^{-1} grad log p(x | u)``, whose zeros are
the stationary points of the log-likelihood, and the log-likelihood is its Lyapunov
function while ``J`` is positive definite. The cost of an iteration is one gradient
and one Hessian on the current draws, whatever the number of iterations before it:
the exact SAEM objective (a weighted sum over every stored draw) grows with them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "MAX_COORDINATES",
    "positive_definite_solve",
    "stochastic_newton_step",
    "stochastic_newton_update",
]

# The most free coordinates the step takes: its d x d Hessian per iteration costs d
# gradients, more than the exact objective's line search beyond a few hundred.
MAX_COORDINATES = 256


def positive_definite_solve(matrix, vector):
    """``matrix^{-1} vector`` for the symmetric part of ``matrix`` with its eigenvalues
    replaced by their absolute values and floored at ``1e-8`` times the largest (a
    direction of negative curvature of one draw's log-density is still climbed, never
    descended; a direction without curvature is divided by that floor, not by 0)."""
    symmetric = 0.5 * (matrix + matrix.T)
    values, vectors = jnp.linalg.eigh(symmetric)
    size = jnp.abs(values)
    tiny = jnp.finfo(values.dtype).tiny
    floor = jnp.maximum(1e-8 * jnp.max(size), tiny)
    return vectors @ ((vectors.T @ vector) / jnp.maximum(size, floor))


def stochastic_newton_step(log_density, u, gamma, information):
    """One Robbins-Monro step of the flat free params ``u``.

    Args:
        log_density: ``u -> f_k(u)``, the complete-data log-density averaged over
            this iteration's draws (scaled as the caller likes: the step does not
            depend on a constant factor).
        u: shape ``(d,)``, the free params in unconstrained coordinates.
        gamma: the step size of this iteration.
        information: shape ``(d, d)``, the previous stochastic approximation of the
            complete-data information ``J_{k-1}``.

    Returns:
        ``(u_{k+1}, J_k)``; ``(u, J_{k-1})`` where the step is not finite.
    """
    grad = jax.grad(log_density)(u)
    hessian = jax.hessian(log_density)(u)
    return stochastic_newton_update(u, grad, hessian, gamma, information)


def stochastic_newton_update(u, grad, hessian, gamma, information):
    """`stochastic_newton_step` given ``f_k``'s gradient and Hessian at ``u``."""
    updated = information + gamma * (-hessian - information)
    new = u + gamma * positive_definite_solve(updated, grad)
    ok = jnp.all(jnp.isfinite(new)) & jnp.all(jnp.isfinite(updated))
    return jnp.where(ok, new, u), jnp.where(ok, updated, information)
