"""NumPyro models shared by several test modules.

Only models that several tests write identically live here; a model that one module
uses, or that differs in a detail that matters (an initial value, a default argument),
stays next to its tests. Module-level functions, so jit caches keyed on the model are
shared between tests.
"""

import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints

import jaxem


def normal_mixture(x, K):
    """Univariate Gaussian mixture; means start at 0, scales at 1, weights uniform."""
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    mu = numpyro.param("mu", jnp.zeros(K))
    sigma = numpyro.param("sigma", jnp.ones(K), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Normal(mu[z], sigma[z]), obs=x)


def normal_mixture_spread(x, K=2):
    """As :func:`normal_mixture`, but the means start spread over [-1, 1] (so the
    default start is not a symmetric fixed point) and K defaults to 2."""
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    mu = numpyro.param("mu", jnp.linspace(-1.0, 1.0, K))
    sigma = numpyro.param("sigma", jnp.ones(K), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Normal(mu[z], sigma[z]), obs=x)


def gmm_scale_tril(x, K):
    """Full-covariance Gaussian mixture parameterised by Cholesky factors L (K, D, D)."""
    D = x.shape[-1]
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    mu = numpyro.param("mu", jnp.zeros((K, D)))
    L = numpyro.param(
        "L", jnp.broadcast_to(jnp.eye(D), (K, D, D)), constraint=constraints.lower_cholesky
    )
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.MultivariateNormal(mu[z], scale_tril=L[z]), obs=x)


def gmm_diag(x, K):
    """Diagonal-covariance Gaussian mixture: per-component standard deviations sigma (K, D)."""
    D = x.shape[-1]
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    mu = numpyro.param("mu", jnp.zeros((K, D)))
    sigma = numpyro.param("sigma", jnp.ones((K, D)), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Normal(mu[z], sigma[z]).to_event(1), obs=x)


def gmm_diag_kmeans(x, K):
    """``gmm_diag`` with k-means++ initial locations (a new draw per key)."""
    D = x.shape[-1]
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    mu = numpyro.param("mu", jaxem.init.kmeans_plusplus(x, K))
    sigma = numpyro.param("sigma", jnp.ones((K, D)), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Normal(mu[z], sigma[z]).to_event(1), obs=x)


def poisson_mixture(x, K):
    """Poisson mixture; rates start at 1, weights uniform."""
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    rate = numpyro.param("rate", jnp.ones(K), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Poisson(rate[z]), obs=x)
