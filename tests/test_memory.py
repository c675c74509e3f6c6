"""Enumerations too large for memory are refused from their shapes, before compiling."""

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
import pytest

import jaxem
import jaxem.memory
from jaxem.exceptions import ModelError


def factorial(x, num_latents=20):
    """Each data point depends on 20 binary latents at once: 2^20 cells per point."""
    p = numpyro.param("p", jnp.full(num_latents, 0.5), constraint=dist.constraints.unit_interval)
    weights = numpyro.param("weights", jnp.linspace(-1.0, 1.0, num_latents))
    with numpyro.plate("data", x.shape[0]):
        loc = 0.0
        for j in range(num_latents):
            loc = loc + weights[j] * numpyro.sample(f"z{j}", dist.Bernoulli(p[j]))
        numpyro.sample("x", dist.Normal(loc, 1.0), obs=x)


def wide_mixture(x, num_components=100_000):
    w = numpyro.param(
        "w", jnp.ones(num_components) / num_components, constraint=dist.constraints.simplex
    )
    mu = numpyro.param("mu", jnp.linspace(-3.0, 3.0, num_components))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Normal(mu[z], 1.0), obs=x)


def test_twenty_binary_latents_per_point_are_refused():
    with pytest.raises(ModelError, match=r"GiB for site 'x'.*'z0' \(2 values\).*VariationalEM"):
        jaxem.EM(factorial).run(jax.random.PRNGKey(0), jnp.zeros(500), max_iter=2)


def test_a_categorical_with_100000_values_is_refused():
    with pytest.raises(ModelError, match=r"shape \(100000, 20000\).*'z' \(100000 values\)"):
        jaxem.log_likelihood(
            wide_mixture,
            {"w": jnp.ones(100_000) / 100_000, "mu": jnp.zeros(100_000)},
            jnp.zeros(20_000),
        )


def test_the_limit_can_be_changed(monkeypatch):
    params = {"w": jnp.ones(50) / 50, "mu": jnp.zeros(50)}
    assert jnp.isfinite(jaxem.log_likelihood(wide_mixture, params, jnp.zeros(100), 50))
    # 4 copies of a (50, 101) float32 factor: 80 800 bytes.
    monkeypatch.setattr(jaxem.memory, "max_enumeration_bytes", 50_000)
    with pytest.raises(ModelError, match="shape \\(50, 101\\).*max_enumeration_bytes"):
        jaxem.log_likelihood(wide_mixture, params, jnp.zeros(101), 50)
