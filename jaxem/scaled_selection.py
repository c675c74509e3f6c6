"""A Gaussian's precision or covariance read as a positive constant times a selection.

The conjugate prior of a MultivariateNormal's mean reads the precision it pairs
with, scaled (the Normal-Wishart prior, Bishop PRML 2.3.6)::

    lam = numpyro.sample("lam", dist.Wishart(nu0, scale_matrix=W0))      # plate K
    mu = numpyro.sample("mu", dist.MultivariateNormal(m0, precision_matrix=beta0 * lam))
    x ~ dist.MultivariateNormal(mu[z], precision_matrix=lam[z])

or with ``Sigma ~ InverseWishart(nu0, Psi)``, ``covariance_matrix=Sigma / beta0``
and ``covariance_matrix=Sigma[z]``. The map from ``lam`` to the prior's
``precision_matrix`` is no selection but ``k * sel(lam)`` with a constant ``k >
0`` (``beta0``; ``1 / beta0`` for the covariance). It is found the way a power
of a selection is (`jaxem.power_selection`, here the power 1: the chain of
products and quotients with scalar constants, verified on values), and the site
reading it counts as observations of the precision like any other: a cell with scatter
``S`` has the log density ``log|k L| / 2 - tr(k L S) / 2``, in ``L`` that of count
1 and scatter ``k S`` (for a covariance, ``-log|k C| / 2 - tr(S (k C)^-1) / 2``:
count 1, scatter ``S / k``). The selection map's VJP multiplies what it pulls
back by ``k``, so a cell's statistics are scaled first (`scale_statistics`).

Under MAP-EM this makes the Normal-Wishart pair closed form jointly. The mean's
conditional mode ``(beta0 lam + n lam)^-1 (beta0 lam m0 + lam S1) = (beta0 m0 +
S1) / (beta0 + n)`` does not depend on ``lam``, so the closed-form stages (means,
then precisions given the new means) maximize Q + log prior jointly in one
M-step. The precision's mode, the Wishart's pseudo-statistics
(`jaxem.conjugate`) and the mean's prior added to the data's, is

    lam^-1 = (S + W0^-1 + beta0 (mu - m0)(mu - m0)^T) / (n + nu0 - D),

the mode of the Normal-Wishart posterior (for the InverseWishart,
``Sigma = (S + Psi + beta0 (mu - m0)(mu - m0)^T) / (n + nu0 + D + 2)``).
"""

from __future__ import annotations

import numpy as np
import numpyro.distributions as dist

__all__ = ["scale_statistics", "scaled_description", "scaled_selection_factor"]

# How the (scatter, count) of a cell are scaled before the VJP, which multiplies
# both by k: a precision's scatter enters the param's as k S (count 1), a
# covariance's as S / k (count 1).
_PRE_VJP = {
    "precision_matrix": lambda scatter, count, k: (scatter, count / k),
    "covariance_matrix": lambda scatter, count, k: (scatter / k**2, count / k),
}


def scaled_selection_factor(powers, output_index, name, cls, arg_name) -> float | None:
    """The constant ``k > 0`` with output ``output_index`` (argument ``arg_name``
    of ``cls``) equal to ``k * sel(param)``, one ``k`` for every cell; None when it
    is not (or the argument is no MultivariateNormal's precision or covariance).

    Args:
        powers: the plan's `jaxem.power_selection.PowerSelections`.
    """
    if cls is not dist.MultivariateNormal or arg_name not in _PRE_VJP:
        return None
    found = powers.scaled_power(output_index, name, powers=(1.0,))
    if found is None:
        return None
    _, k, tolerance = found
    k = np.asarray(k, np.float64)
    if k.size == 0 or not np.allclose(k, k.flat[0], rtol=tolerance, atol=0):
        return None  # a factor per entry of the matrix is no scaled precision
    return float(k.flat[0])


def scale_statistics(arg_name, statistics, factor):
    """A cell's ``(scatter, count)`` for an argument ``factor * sel(param)``, ready
    for the selection map's VJP (which multiplies them by ``factor``)."""
    scatter, count = statistics
    return _PRE_VJP[arg_name](scatter, count, factor)


def scaled_description(arg_name, factor) -> str:
    """How the param reaches the argument, for ``m_step_paths``."""
    return f"{arg_name} = {factor:g} * param"
