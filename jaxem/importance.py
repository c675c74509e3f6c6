"""The observed-data log-likelihood of a model with continuous latents, by importance
sampling.

``log p(x | theta) = log E_q[p(x, z | theta) / q(z)]``, with a proposal ``q``
fitted to posterior draws of the latents (unconstrained coordinates): a
multivariate Student-t (10 degrees of freedom, heavier tails than the
posterior it imitates) with the draws' mean and covariance, one per
independent block of latents. The blocks are found from the model itself: two
latent coordinates are in one block when some log-density entry depends on
both (the sparsity of the Jacobian of every entry, at two random points), so
for a random-effects model each group is a block and the estimate is a sum of
per-group estimates, each with its own small variance, rather than one
estimate whose weights degenerate as the number of groups grows. With
discrete latents (summed out inside the density, which then does not split
into entries) the latents form one block.

The Monte Carlo standard error is the delta-method one, ``sum_g var(w_g) /
(S mean(w_g)^2)`` over blocks ``g`` of ``S`` draws each.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jax.scipy.special import gammaln

__all__ = [
    "Blocks",
    "ImportanceEstimate",
    "blocks_from_pattern",
    "find_blocks",
    "importance_log_likelihood",
    "sparsity_pattern",
]

# Degrees of freedom of the Student-t proposal.
DF = 10.0


class Blocks(NamedTuple):
    """Independent blocks of latent coordinates.

    Attributes:
        coordinate: shape ``(D,)``: the block of every latent coordinate.
        entry: shape ``(E,)``: the block of every log-density entry, ``-1`` for
            entries that depend on no latent (None: the density is not split).
        num_blocks: number of blocks (static).
    """

    coordinate: np.ndarray
    entry: np.ndarray | None
    num_blocks: int


class ImportanceEstimate(NamedTuple):
    """Attributes:
    log_likelihood: the estimate.
    standard_error: its Monte Carlo standard error.
    min_ess: the smallest effective sample size over the blocks.
    """

    log_likelihood: jax.Array
    standard_error: jax.Array
    min_ess: jax.Array


def sparsity_pattern(elementwise_fn, z_flat_points):
    """Which log-density entries depend on which latent coordinates: the nonzero
    pattern of the Jacobian of ``elementwise_fn`` at each of ``z_flat_points`` (a
    leading point axis), OR-ed. Traceable, so that a caller can compile it into
    one program (run eagerly, it costs one small compilation per primitive)."""
    jac = jax.vmap(jax.jacfwd(elementwise_fn))(z_flat_points)
    return jnp.any(jac != 0, axis=0)


def blocks_from_pattern(pattern) -> Blocks:
    """`Blocks` of a concrete ``(entries, coordinates)`` dependency pattern: the
    connected components of the coordinates linked through some entry."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    pattern = np.asarray(pattern)
    incidence = csr_matrix(pattern.astype(np.int8))
    linked = (incidence.T @ incidence).tocsr()
    num_blocks, coordinate = connected_components(linked, directed=False)
    depends = pattern.any(axis=1)
    first = np.argmax(pattern, axis=1)
    entry = np.where(depends, coordinate[first], -1).astype(np.int32)
    return Blocks(coordinate.astype(np.int32), entry, int(num_blocks))


def find_blocks(elementwise_fn, z_flat_points) -> Blocks:
    """Blocks of the coordinates of ``z_flat`` (concrete), from the sparsity of the
    Jacobian of ``elementwise_fn`` (entries of the log-density) at the given points;
    ``elementwise_fn`` None: one block."""
    num_coords = int(np.size(z_flat_points[0]))
    if elementwise_fn is None:
        return Blocks(np.zeros(num_coords, np.int32), None, 1)
    return blocks_from_pattern(sparsity_pattern(elementwise_fn, jnp.stack(z_flat_points)))


def importance_log_likelihood(
    rng_key,
    draws,
    log_target_fn,
    elementwise_fn,
    coordinate,
    entry,
    num_blocks: int,
    num_samples: int,
) -> ImportanceEstimate:
    """The importance-sampling estimate (see the module docstring).

    Args:
        rng_key: PRNG key.
        draws: posterior draws of the unconstrained latents, a dict of arrays with
            one leading draw axis.
        log_target_fn: ``z -> log p(x, z)`` (unconstrained, Jacobian included).
        elementwise_fn: ``z_flat -> entries`` summing to it, or None.
        coordinate, entry, num_blocks: the `Blocks`.
        num_samples: proposal draws.
    """
    flat = jax.vmap(lambda d: ravel_pytree(d)[0])(draws)
    _, unravel = ravel_pytree(jax.tree.map(lambda x: x[0], draws))
    n, dim = flat.shape
    dtype = flat.dtype
    mean = jnp.mean(flat, axis=0)
    centred = flat - mean
    cov = centred.T @ centred / (n - 1)
    same = coordinate[:, None] == coordinate[None, :]
    jitter = 1e-8 * jnp.maximum(jnp.mean(jnp.diag(cov)), 1e-12)
    cov = jnp.where(same, cov, 0.0) + jitter * jnp.eye(dim, dtype=dtype)
    chol = jnp.linalg.cholesky(cov)
    log_diag = jnp.log(jnp.diag(chol))
    sizes = jax.ops.segment_sum(jnp.ones(dim, dtype), coordinate, num_blocks)
    log_dets = jax.ops.segment_sum(log_diag, coordinate, num_blocks)
    normal_key, chi_key = jax.random.split(rng_key)
    eps = jax.random.normal(normal_key, (num_samples, dim), dtype)
    chi2 = 2.0 * jax.random.gamma(chi_key, DF / 2.0, (num_samples, num_blocks), dtype)
    scale = jnp.sqrt(DF / chi2)
    z = mean + (eps @ chol.T) * scale[:, coordinate]
    maha = jax.vmap(lambda e: jax.ops.segment_sum(e**2, coordinate, num_blocks))(eps)
    maha = maha * DF / chi2
    log_q = (
        gammaln((DF + sizes) / 2.0)
        - gammaln(DF / 2.0)
        - 0.5 * sizes * jnp.log(DF * jnp.pi)
        - log_dets
        - 0.5 * (DF + sizes) * jnp.log1p(maha / DF)
    )

    if elementwise_fn is None:

        def per_block(zf):
            return log_target_fn(unravel(zf))[None], jnp.zeros((), dtype)

    else:

        def per_block(zf):
            values = elementwise_fn(zf)
            grouped = jax.ops.segment_sum(
                jnp.where(entry >= 0, values, 0.0), jnp.maximum(entry, 0), num_blocks
            )
            return grouped, jnp.sum(jnp.where(entry < 0, values, 0.0))

    log_p, constant = jax.lax.map(per_block, z, batch_size=min(num_samples, 256))
    log_w = log_p - log_q
    log_w = jnp.where(jnp.isnan(log_w), -jnp.inf, log_w)
    top = jnp.max(log_w, axis=0)
    w = jnp.exp(log_w - top)
    mean_w = jnp.mean(w, axis=0)
    per_block_ll = top + jnp.log(mean_w)
    var_rel = jnp.var(w, axis=0, ddof=1) / (num_samples * mean_w**2)
    ess = jnp.sum(w, axis=0) ** 2 / jnp.sum(w**2, axis=0)
    return ImportanceEstimate(
        jnp.sum(per_block_ll) + constant[0], jnp.sqrt(jnp.sum(var_rel)), jnp.min(ess)
    )
