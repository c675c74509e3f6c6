"""SAEM's default number of chains comes from the number of independent groups of
latents (Monolix's rule: chains x groups >= 50, here at most 4); an explicit
``num_chains`` and MCEM's default (4) stay as they are."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models import logistic_glmm

import jaxem


def _data(num_groups, per_group=3):
    rng = np.random.default_rng(0)
    group = jnp.repeat(jnp.arange(num_groups), per_group)
    x = jnp.asarray(rng.normal(size=group.shape[0]))
    y = jnp.asarray((rng.random(group.shape[0]) < 0.5).astype(float))
    return group, x, y, num_groups


@pytest.mark.parametrize(
    ("num_groups", "chains"),
    [(1, 4), (13, 4), (15, 4), (17, 3), (18, 3), (25, 2), (49, 2), (50, 1), (1000, 1)],
)
def test_saem_chooses_chains_from_the_number_of_groups(num_groups, chains):
    assert jaxem.SAEM(logistic_glmm).chains_for(num_groups) == chains
    assert jaxem.SAEM(logistic_glmm, num_chains=2).chains_for(num_groups) == 2
    assert jaxem.MCEM(logistic_glmm).chains_for(num_groups) == 4


def test_the_groups_are_the_independent_blocks_of_latents(x64):
    # 18 random intercepts: 18 blocks, ceil(50 / 18) = 3 chains; an explicit num_chains
    # is kept. (The fit's own draws: tests/test_mcem_compile.py.)
    data = _data(18)
    state = jaxem.SAEM(logistic_glmm).init(jax.random.PRNGKey(0), *data)
    assert state.chains.z["u"].shape == (3, 18)
    explicit = jaxem.SAEM(logistic_glmm, num_chains=2).init(jax.random.PRNGKey(0), *data)
    assert explicit.chains.z["u"].shape == (2, 18)


def test_one_chain_runs_without_vmap():
    # vmap of NUTS's tree-building while_loop turns every branch into selects: one
    # chain runs the function on its own values (no batching tracer), with the chain
    # axis given back; more chains are vmapped. Both give vmap's values.
    from jaxem.mcmc_estep import over_chains

    seen = []

    def fn(z, key):
        seen.append(isinstance(z["u"], jax.core.Tracer))
        return {"u": z["u"] * 2.0 + jax.random.normal(key, z["u"].shape)}, jnp.sum(z["u"])

    for num_chains, batched in [(1, False), (3, True)]:
        z = {"u": jnp.arange(num_chains * 4.0).reshape(num_chains, 4)}
        keys = jax.random.split(jax.random.PRNGKey(0), num_chains)
        seen.clear()
        out = over_chains(fn, z, keys)
        assert seen == [batched]
        expected = jax.vmap(fn)(z, keys)
        assert jax.tree.map(jnp.shape, out) == jax.tree.map(jnp.shape, expected)
        jax.tree.map(np.testing.assert_array_equal, out, expected)
