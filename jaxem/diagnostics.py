"""Model selection: free-parameter counts, BIC and AIC."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from numpyro import handlers
from numpyro.distributions.transforms import biject_to

from jaxem.estep import log_likelihood
from jaxem.tracing import inspect_model

__all__ = ["num_free_params", "num_observations", "bic", "aic"]


def num_free_params(model, params, *args, **kwargs) -> int:
    """Number of free parameters, counted in unconstrained space.

    A simplex of size K has K - 1 free entries, a D x D ``lower_cholesky`` or
    ``positive_definite`` matrix D (D + 1) / 2, an unconstrained array its size.
    """
    structure, _ = inspect_model(model, jax.random.PRNGKey(0), args, kwargs)
    total = 0
    for name in structure.param_names:
        transform = biject_to(structure.constraints[name])
        total += math.prod(transform.inverse_shape(jnp.shape(params[name])))
    return int(total)


def num_observations(model, *args, **kwargs) -> int:
    """Number of observations: the largest batch size among the observed sites
    (the number of data points of a mixture, not points times dimensions)."""
    trace = handlers.trace(handlers.seed(model, jax.random.PRNGKey(0))).get_trace(*args, **kwargs)
    sizes = [
        math.prod(site["fn"].batch_shape)
        for site in trace.values()
        if site["type"] == "sample" and site["is_observed"]
    ]
    return int(max(sizes, default=1))


_count_observations = num_observations  # bic's keyword argument shadows the function


def bic(model, params, *args, num_observations=None, **kwargs):
    """Bayesian information criterion ``-2 log L + k log n`` (lower is better).

    Args:
        model: the model.
        params: fitted ``{param name: value}``.
        *args, **kwargs: the model's arguments.
        num_observations: n; by default the largest batch size among observed
            sites (see :func:`num_observations`).

    Examples:
        >>> import jax.numpy as jnp, numpyro, numpyro.distributions as dist
        >>> from numpyro.distributions import constraints
        >>> import jaxem
        >>> def model(x):
        ...     w = numpyro.param("w", jnp.array([0.5, 0.5]), constraint=constraints.simplex)
        ...     mu = numpyro.param("mu", jnp.array([-1.0, 1.0]))
        ...     with numpyro.plate("data", x.shape[0]):
        ...         z = numpyro.sample("z", dist.Categorical(w))
        ...         numpyro.sample("x", dist.Normal(mu[z], 1.0), obs=x)
        >>> params = {"w": jnp.array([0.5, 0.5]), "mu": jnp.array([-1.0, 1.0])}
        >>> x = jnp.array([-1.0, -1.2, 0.9, 1.1])
        >>> k, n = jaxem.num_free_params(model, params, x), jaxem.num_observations(model, x)
        >>> (k, n)
        (3, 4)
        >>> bool(jnp.isclose(jaxem.bic(model, params, x),
        ...                  -2 * jaxem.log_likelihood(model, params, x) + k * jnp.log(n)))
        True
    """
    n = num_observations
    if n is None:
        n = _count_observations(model, *args, **kwargs)
    k = num_free_params(model, params, *args, **kwargs)
    return -2.0 * log_likelihood(model, params, *args, **kwargs) + k * math.log(n)


def aic(model, params, *args, **kwargs):
    """Akaike information criterion ``-2 log L + 2 k`` (lower is better).

    Args:
        model: the model.
        params: fitted ``{param name: value}``.
        *args, **kwargs: the model's arguments.

    Examples:
        >>> import jax.numpy as jnp, numpyro, numpyro.distributions as dist
        >>> import jaxem
        >>> def model(x):
        ...     mu = numpyro.param("mu", jnp.array([-1.0, 1.0]))
        ...     with numpyro.plate("data", x.shape[0]):
        ...         z = numpyro.sample("z", dist.Categorical(jnp.array([0.5, 0.5])))
        ...         numpyro.sample("x", dist.Normal(mu[z], 1.0), obs=x)
        >>> params, x = {"mu": jnp.array([-1.0, 1.0])}, jnp.array([-1.0, 1.0])
        >>> bool(jnp.isclose(jaxem.aic(model, params, x),
        ...                  -2 * jaxem.log_likelihood(model, params, x) + 2 * 2))
        True
    """
    k = num_free_params(model, params, *args, **kwargs)
    return -2.0 * log_likelihood(model, params, *args, **kwargs) + 2.0 * k
