"""The importance sampler's blocks and proposal (`jaxem.importance`): the cheap
dependence probe against the dense Jacobian it replaces, and the block-by-block
proposal against the dense one and against an exact log-likelihood."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from models import logistic_glmm
from numpyro.distributions import constraints

import jaxem
from jaxem.arguments import split_args
from jaxem.importance import (
    SEVERAL,
    blocks_from_pattern,
    blocks_from_probe,
    dependence_probe,
    importance_log_likelihood,
    sparsity_pattern,
)


def test_the_probe_names_the_one_coordinate_of_each_entry(x64):
    # Entries of 11 coordinates: on one (0, 3, 10, 7), on none, on two (1 and 2; 5 and 9).
    def entries(z):
        return jnp.stack(
            [z[0] ** 2, 2.0 * z[3], jnp.ones(()), z[1] * z[2], jnp.sin(z[10]), z[5] - z[9], z[7]]
        )

    points = jax.random.normal(jax.random.PRNGKey(0), (2, 11))
    # Compiled: run eagerly, every primitive is a compilation of its own.
    owner = jax.jit(lambda p, k: dependence_probe(entries, p, k))(points, jax.random.PRNGKey(1))
    owner = np.asarray(owner)
    np.testing.assert_array_equal(owner, [0, 3, -1, SEVERAL, 10, SEVERAL, 7])
    # The dense pattern agrees where the probe names a coordinate.
    pattern = np.asarray(jax.jit(lambda p: sparsity_pattern(entries, p))(points))
    for e, c in enumerate(owner):
        if c >= 0:
            np.testing.assert_array_equal(np.flatnonzero(pattern[e]), [c])


def _intercept_and_slope(group, x, y, num_groups):
    sd = numpyro.param("sd", jnp.ones(2), constraint=constraints.positive)
    with numpyro.plate("groups", num_groups):
        u = numpyro.sample("u", dist.Normal(0.0, sd).to_event(1))
    with numpyro.plate("obs", y.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=u[group, 0] + u[group, 1] * x), obs=y)


def _data(groups=7, per_group=3):
    rng = np.random.default_rng(0)
    group = np.repeat(np.arange(groups), per_group)
    x = rng.normal(size=group.size)
    y = (rng.random(group.size) < 0.5).astype(float)
    return jnp.asarray(group), jnp.asarray(x), jnp.asarray(y), groups


def _probe_and_dense(model):
    """``(the probe's owners, number of coordinates, the fitter's blocks, the dense
    Jacobian's blocks)``."""
    fitter = jaxem.SAEM(model, schedule=(1, 1), num_chains=1)
    arrays, spec = split_args(_data(), {})
    key = jax.random.PRNGKey(3)
    _, params, owner, num_coords = fitter._check_start(key, arrays, spec, None, with_pattern=True)
    pattern = fitter._pattern_jit(key, arrays, params, spec=spec)
    blocks = fitter._blocks(owner, num_coords, lambda: pattern)
    return np.asarray(owner), num_coords, blocks, blocks_from_pattern(pattern)


def test_the_probe_gives_the_dense_jacobians_blocks(x64):
    # A random intercept per group: every entry depends on one coordinate at most.
    owner, num_coords, blocks, dense = _probe_and_dense(logistic_glmm)
    assert num_coords == 7 and blocks.num_blocks == dense.num_blocks == 7
    assert blocks_from_probe(owner, num_coords) is not None
    for field in ("coordinate", "entry", "members"):
        np.testing.assert_array_equal(getattr(blocks, field), getattr(dense, field))
    # An intercept and a slope per group: the observations depend on two coordinates,
    # so the blocks come from the dense pattern (one block per group).
    owner, num_coords, blocks, dense = _probe_and_dense(_intercept_and_slope)
    assert np.any(owner == SEVERAL) and blocks_from_probe(owner, num_coords) is None
    assert blocks.num_blocks == 7 and blocks.members.shape == (7, 2)
    np.testing.assert_array_equal(blocks.coordinate, np.repeat(np.arange(7), 2))
    np.testing.assert_array_equal(blocks.entry, dense.entry)


def test_the_block_proposal_is_the_dense_proposal_and_finds_the_exact_value(x64):
    # Three independent Gaussian blocks of latent coordinates {0, 3}, {1}, {2, 4}, each
    # density times a known constant: the log-likelihood is the sum of their logs.
    coordinate = np.array([0, 1, 2, 0, 2], np.int32)
    members = np.array([[0, 3], [1, 5], [2, 4]], np.int32)  # padded with D = 5
    means = [jnp.array([1.0, -2.0]), jnp.array([0.5]), jnp.array([3.0, 0.0])]
    covs = [
        jnp.array([[1.0, 0.6], [0.6, 2.0]]),
        jnp.array([[0.3]]),
        jnp.array([[0.5, -0.2], [-0.2, 0.4]]),
    ]
    log_constants = jnp.array([2.0, -1.0, 0.5])
    index = [np.flatnonzero(coordinate == b) for b in range(3)]

    def elementwise(zf):
        return jnp.stack(
            [
                log_constants[b]
                + jax.scipy.stats.multivariate_normal.logpdf(zf[index[b]], means[b], covs[b])
                for b in range(3)
            ]
        )

    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    flat = jnp.zeros((400, 5))
    for b in range(3):
        block = jax.random.multivariate_normal(keys[b], means[b], covs[b], (400,))
        flat = flat.at[:, index[b]].set(block)
    draws = {"z": flat}
    entry = jnp.arange(3, dtype=jnp.int32)

    @jax.jit
    def estimate(members):
        return importance_log_likelihood(
            jax.random.PRNGKey(1),
            draws,
            lambda z: jnp.sum(elementwise(z["z"])),
            elementwise,
            jnp.asarray(coordinate),
            entry,
            3,
            4000,
            members,
        )

    blocked, dense = estimate(jnp.asarray(members)), estimate(None)
    np.testing.assert_allclose(blocked.log_likelihood, dense.log_likelihood, rtol=1e-12)
    np.testing.assert_allclose(blocked.standard_error, dense.standard_error, rtol=1e-9)
    # Against the exact value, within 4 Monte Carlo standard errors.
    se = float(blocked.standard_error)
    assert 0.0 < se < 0.05
    assert abs(float(blocked.log_likelihood) - float(jnp.sum(log_constants))) < 4 * se
