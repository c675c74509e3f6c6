"""The observed-data log-likelihood of a model with continuous latents, by importance
sampling.

``log p(x | theta) = log E_q[p(x, z | theta) / q(z)]``, with a proposal ``q``
fitted to posterior draws of the latents (unconstrained coordinates): a
multivariate Student-t (10 degrees of freedom, heavier tails than the
posterior it imitates) with the draws' mean and covariance, one per
independent block of latents. The blocks are found from the model itself: two
latent coordinates are in one block when some log-density entry depends on
both (the nonzero pattern of the Jacobian of every entry, at two random points),
so for a random-effects model each group is a block and the estimate is a sum of
per-group estimates, each with its own small variance, rather than one
estimate whose weights degenerate as the number of groups grows. With
discrete latents (summed out inside the density, which then does not split
into entries) the latents form one block.

The pattern is first probed by ``4 ceil(log2 D)`` Jacobian-vector products instead
of the ``2 D`` columns of the dense Jacobian (`dependence_probe`): with a random
positive tangent on the coordinates whose index has bit ``b`` set, and one on the
others, an entry that depends on a single coordinate is nonzero in exactly one of
the two for every ``b``, and the bits spell that coordinate; an entry that depends
on two coordinates is nonzero in both for a bit where their indices differ. When
every entry depends on at most one coordinate (a random intercept per group) that
is the whole pattern; otherwise the dense Jacobian is computed (`sparsity_pattern`).
The proposal is then sampled and evaluated block by block (each block's covariance
and Cholesky factor padded to the largest block), not as one dense ``D x D``
matrix.

The Monte Carlo standard error is the delta-method one, ``sum_g var(w_g) /
(S mean(w_g)^2)`` over blocks ``g`` of ``S`` draws each.
"""

from __future__ import annotations

import math
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
    "blocks_from_probe",
    "dependence_probe",
    "find_blocks",
    "importance_log_likelihood",
    "sparsity_pattern",
]

# Degrees of freedom of the Student-t proposal (even: its chi-square is a sum of
# ERLANG exponentials).
DF = 10.0
ERLANG = 5


class Blocks(NamedTuple):
    """Independent blocks of latent coordinates.

    Attributes:
        coordinate: shape ``(D,)``: the block of every latent coordinate.
        entry: shape ``(E,)``: the block of every log-density entry, ``-1`` for
            entries that depend on no latent (None: the density is not split).
        num_blocks: number of blocks (static).
        members: shape ``(num_blocks, B)``: the coordinates of every block in
            increasing order, padded with ``D`` to the largest block's size ``B``.
    """

    coordinate: np.ndarray
    entry: np.ndarray | None
    num_blocks: int
    members: np.ndarray | None = None


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


# The entry of `dependence_probe` that depends on several coordinates (or whose probe
# is inconsistent): the dense pattern is needed.
SEVERAL = -2


def dependence_probe(elementwise_fn, z_flat_points, rng_key):
    """For every log-density entry: the one latent coordinate it depends on, ``-1``
    if none, `SEVERAL` if more than one (see the module docstring), from Jacobian-
    vector products at each of ``z_flat_points`` (a leading point axis) with random
    positive tangents on the coordinates whose index has bit ``b`` set and on the
    others. Traceable."""
    num_coords = z_flat_points.shape[-1]
    bits = max(1, math.ceil(math.log2(num_coords)))
    index = jnp.arange(num_coords)
    on = ((index[None, :] >> jnp.arange(bits)[:, None]) & 1).astype(z_flat_points.dtype)
    weight = jax.random.uniform(rng_key, (num_coords,), z_flat_points.dtype, minval=0.5, maxval=1.5)
    tangents = jnp.concatenate([on, 1.0 - on]) * weight  # (2 bits, D)

    def nonzero(z):
        def jvp(t):
            return jax.jvp(elementwise_fn, (z,), (t,))[1]

        return jax.vmap(jvp)(tangents) != 0  # (2 bits, E)

    hit = jnp.any(jax.vmap(nonzero)(z_flat_points), axis=0)
    one, zero = hit[:bits], hit[bits:]
    coordinate = jnp.sum(one.astype(jnp.int32) << jnp.arange(bits)[:, None], axis=0)
    depends = jnp.any(hit, axis=0)
    single = jnp.all(one != zero, axis=0) & (coordinate < num_coords)
    return jnp.where(depends, jnp.where(single, coordinate, SEVERAL), -1).astype(jnp.int32)


def blocks_from_probe(owner, num_coords: int) -> Blocks | None:
    """`Blocks` of a concrete `dependence_probe` result: every coordinate a block of
    its own when each entry depends on at most one; None (the dense pattern is
    needed) otherwise."""
    owner = np.asarray(owner)
    if np.any(owner == SEVERAL):
        return None
    coordinate = np.arange(num_coords, dtype=np.int32)
    return Blocks(coordinate, owner.astype(np.int32), num_coords, coordinate[:, None])


def _members(coordinate, num_blocks: int) -> np.ndarray:
    """The ``(num_blocks, B)`` coordinates of every block, padded with ``D``."""
    coordinate = np.asarray(coordinate)
    order = np.argsort(coordinate, kind="stable")
    sizes = np.bincount(coordinate, minlength=num_blocks)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    position = np.arange(coordinate.size) - starts[coordinate[order]]
    members = np.full((num_blocks, max(int(sizes.max(initial=1)), 1)), coordinate.size, np.int32)
    members[coordinate[order], position] = order
    return members


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
    members = _members(coordinate, int(num_blocks))
    return Blocks(coordinate.astype(np.int32), entry, int(num_blocks), members)


def find_blocks(elementwise_fn, z_flat_points) -> Blocks:
    """Blocks of the coordinates of ``z_flat`` (concrete), from the sparsity of the
    Jacobian of ``elementwise_fn`` (entries of the log-density) at the given points;
    ``elementwise_fn`` None: one block."""
    num_coords = int(np.size(z_flat_points[0]))
    if elementwise_fn is None:
        return Blocks(np.zeros(num_coords, np.int32), None, 1, np.arange(num_coords)[None])
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
    members=None,
) -> ImportanceEstimate:
    """The importance-sampling estimate (see the module docstring).

    Args:
        rng_key: PRNG key.
        draws: posterior draws of the unconstrained latents, a dict of arrays with
            one leading draw axis.
        log_target_fn: ``z -> log p(x, z)`` (unconstrained, Jacobian included).
        elementwise_fn: ``z_flat -> entries`` summing to it, or None.
        coordinate, entry, num_blocks, members: the `Blocks` (``members`` None: the
            proposal as one dense ``D x D`` matrix, the same draws and densities).
        num_samples: proposal draws.
    """
    flat = jax.vmap(lambda d: ravel_pytree(d)[0])(draws)
    _, unravel = ravel_pytree(jax.tree.map(lambda x: x[0], draws))
    n, dim = flat.shape
    dtype = flat.dtype
    mean = jnp.mean(flat, axis=0)
    centred = flat - mean
    normal_key, chi_key = jax.random.split(rng_key)
    eps = jax.random.normal(normal_key, (num_samples, dim), dtype)
    # chi-square with DF = 10 degrees of freedom: twice an Erlang(5) variable, a sum of
    # five standard exponentials (jax.random.gamma's rejection sampler costs seconds of
    # compilation; u in [0, 1), so log1p(-u) is finite).
    u = jax.random.uniform(chi_key, (ERLANG, num_samples, num_blocks), dtype)
    chi2 = -2.0 * jnp.sum(jnp.log1p(-u), axis=0)
    scale = jnp.sqrt(DF / chi2)
    sizes = jax.ops.segment_sum(jnp.ones(dim, dtype), coordinate, num_blocks)
    variance = jnp.sum(centred**2, axis=0) / (n - 1)
    jitter = 1e-8 * jnp.maximum(jnp.mean(variance), 1e-12)
    if members is None:
        cov = centred.T @ centred / (n - 1)
        same = coordinate[:, None] == coordinate[None, :]
        cov = jnp.where(same, cov, 0.0) + jitter * jnp.eye(dim, dtype=dtype)
        chol = jnp.linalg.cholesky(cov)
        log_dets = jax.ops.segment_sum(jnp.log(jnp.diag(chol)), coordinate, num_blocks)
        z = mean + (eps @ chol.T) * scale[:, coordinate]
    else:
        # Block by block: (num_blocks, B) coordinates, padded with a zero column ``dim``.
        real = members < dim
        padded = jnp.concatenate([centred, jnp.zeros((n, 1), dtype)], axis=1)[:, members]
        cov = jnp.einsum("nkb,nkc->kbc", padded, padded) / (n - 1)
        cov = cov + jitter * jnp.eye(members.shape[1], dtype=dtype)
        chol = jnp.linalg.cholesky(cov)
        diag = jnp.diagonal(chol, axis1=1, axis2=2)
        log_dets = jnp.sum(jnp.where(real, jnp.log(diag), 0.0), axis=1)
        eps_blocks = jnp.concatenate([eps, jnp.zeros((num_samples, 1), dtype)], axis=1)
        moved = jnp.einsum("kbc,skc->skb", chol, eps_blocks[:, members]) * scale[:, :, None]
        # Back to coordinate order: coordinate c sits at (its block, its place in it).
        place = (
            jnp.zeros(dim + 1, jnp.int32)
            .at[members]
            .set(jnp.arange(members.size, dtype=jnp.int32).reshape(members.shape))
        )
        z = mean + moved.reshape(num_samples, -1)[:, place[:dim]]
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
