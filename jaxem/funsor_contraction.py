"""funsor's sum-product, with every log-space contraction computed exactly.

Models whose latents neither form one mixture nor a ``scan`` chain (NumPyro
``markov`` loops, latents sharing a factor) are contracted by funsor's
tensor variable elimination. funsor evaluates each pairwise contraction
``logsumexp_j(a[..., j] + b[..., j])`` as ``log(einsum(exp(a - max a),
exp(b - max b)))``, shifting each operand by its own maximum over the summed
dims. When every term that carries mass sits far below those two maxima (a
narrow emission density meeting a state the other factor makes impossible or
all but impossible), every ``exp`` underflows to 0 and the message is
``log(0) = -inf``: a finite log-likelihood computed as ``-inf`` with no error.

`exact_log` is funsor's eager interpretation with one rule in front:
the log-space contraction of two tensors is the broadcast sum of the two,
reduced by a logsumexp, which shifts every output cell by the maximum of its
own terms, so no term that matters can underflow. It materializes the pairwise
joint of the two operands (as funsor's own max-product does for MAP), where the
einsum held only the output; the operands are the small per-step factors of an
enumerated model.
"""

from __future__ import annotations

import funsor
import jax.numpy as jnp
from funsor import ops
from funsor.cnf import Contraction
from funsor.interpretations import DispatchedInterpretation, PrioritizedInterpretation, eager
from funsor.tensor import Tensor

__all__ = ["exact_log", "funsor_log_partition"]

_exact_base = DispatchedInterpretation("exact_log")
exact_log = PrioritizedInterpretation(_exact_base, eager)
"""funsor's eager interpretation, with exact log-space pairwise contractions."""


@_exact_base.register(Contraction, ops.LogaddexpOp, ops.AddOp, frozenset, Tensor, Tensor)
def _exact_pairwise(red_op, bin_op, reduced_vars, lhs, rhs):
    if not all(term.dtype == "real" for term in (lhs, rhs)):
        return None  # not a log-density: funsor's own rules apply
    # Both steps are exact in log space: the sum is elementwise, and the
    # logsumexp (jax.scipy's) shifts each output cell by the max of its terms.
    return (lhs + rhs).reduce(ops.logaddexp, reduced_vars)


def funsor_log_partition(log_factors: dict, trace) -> jnp.ndarray:
    """log Z: the sum-product of an enumerated trace's log-factors by funsor.

    Sums out every latent and multiplies out every plate, with the pairwise
    contractions of `exact_log`.

    Args:
        log_factors: ``{site name: log-probability tensor}`` of the trace's sites.
        trace: the `jaxem.tracing.EnumTrace` the factors come from (its
            sites name the dims of each tensor and the plates they sit in).

    Returns:
        The scalar log marginal likelihood.
    """
    factors, sum_vars, plates = [], set(), set()
    for name, site in trace.sites.items():
        log_prob = log_factors[name]
        dim_to_name = site.dim_to_name
        if not dim_to_name:
            log_prob = jnp.sum(log_prob)
        factors.append(funsor.to_funsor(log_prob, output=funsor.Real, dim_to_name=dim_to_name))
        if not site.is_observed:
            sum_vars.add(name)
        plates.update(site.plates)
    plates = frozenset(plates)
    with funsor.interpretations.lazy:
        lazy = funsor.sum_product.sum_product(
            ops.logaddexp,
            ops.add,
            factors,
            eliminate=frozenset(sum_vars) | plates,
            plates=plates,
        )
    with exact_log:
        result = funsor.optimizer.apply_optimizer(lazy)
    return result.data
