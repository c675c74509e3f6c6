"""Data-driven initial values, usable as callable ``numpyro.param`` inits.

NumPyro calls a callable initial value with a PRNG key, and `jaxem.EM.run`
gives every restart its own key: an initializer built here inside the model,
from the model's own data argument, makes each restart start from different
data points.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = ["kmeans_plusplus", "random_points"]


def _as_points(x, num_components):
    x = jnp.asarray(x)
    if x.ndim not in (1, 2):
        raise ValueError(f"jaxem.init: x must have shape (N,) or (N, D), got {x.shape}")
    if not 1 <= num_components <= x.shape[0]:
        raise ValueError(
            f"jaxem.init: num_components must be between 1 and the number of points "
            f"({x.shape[0]}), got {num_components}"
        )
    return x


def random_points(x, num_components: int) -> Callable[[jax.Array], jax.Array]:
    """Initial locations drawn uniformly from the data points, without replacement.

    Args:
        x: data, shape ``(N,)`` or ``(N, D)``.
        num_components: number of points to draw, ``K``.

    Returns:
        A function of a PRNG key returning ``K`` distinct rows of ``x``, shape
        ``(K,)`` or ``(K, D)``: a callable ``numpyro.param`` initial value.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from jaxem.init import random_points
        >>> x = jnp.arange(10.0).reshape(5, 2)
        >>> init = random_points(x, 3)
        >>> points = init(jax.random.PRNGKey(0))
        >>> points.shape, bool(jnp.all(jnp.any(jnp.all(points[:, None] == x, -1), 1)))
        ((3, 2), True)
    """
    x = _as_points(x, num_components)

    def init(rng_key):
        index = jax.random.choice(rng_key, x.shape[0], (num_components,), replace=False)
        return x[index]

    return init


def kmeans_plusplus(x, num_components: int) -> Callable[[jax.Array], jax.Array]:
    """Initial locations by k-means++ seeding (Arthur and Vassilvitskii 2007).

    The first center is a uniformly drawn data point; each next one is a data
    point drawn with probability proportional to its squared distance to the
    nearest center chosen so far, which spreads the centers over the clusters.
    Jit- and vmap-able (a ``fori_loop`` over the ``K`` centers, ``O(N K D)``).

    Args:
        x: data, shape ``(N,)`` or ``(N, D)``.
        num_components: number of centers, ``K``.

    Returns:
        A function of a PRNG key returning ``K`` rows of ``x``, shape ``(K,)``
        or ``(K, D)``: a callable ``numpyro.param`` initial value, e.g.
        ``numpyro.param("mu", kmeans_plusplus(x, K))`` inside the model.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from jaxem.init import kmeans_plusplus
        >>> x = jnp.array([[0.0, 0.0], [0.1, 0.0], [10.0, 10.0], [10.1, 10.0]])
        >>> centers = kmeans_plusplus(x, 2)(jax.random.PRNGKey(0))
        >>> sorted(float(c) // 5 for c in centers[:, 0])  # one center per cluster
        [0.0, 2.0]

    References:
        D. Arthur and S. Vassilvitskii (2007). k-means++: the advantages of
        careful seeding. SODA.
    """
    x = _as_points(x, num_components)
    points = x if x.ndim == 2 else x[:, None]

    def init(rng_key):
        keys = jax.random.split(rng_key, num_components)
        first = jax.random.randint(keys[0], (), 0, points.shape[0])
        centers = (
            jnp.zeros((num_components, points.shape[1]), points.dtype).at[0].set(points[first])
        )
        nearest = jnp.sum((points - points[first]) ** 2, axis=-1)

        def add_center(k, carry):
            centers, nearest = carry
            # All points on the chosen centers (duplicates): any point will do.
            logits = jnp.where(jnp.sum(nearest) > 0, jnp.log(nearest), 0.0)
            index = jax.random.categorical(keys[k], logits)
            center = points[index]
            nearest = jnp.minimum(nearest, jnp.sum((points - center) ** 2, axis=-1))
            return centers.at[k].set(center), nearest

        centers, _ = jax.lax.fori_loop(1, num_components, add_center, (centers, nearest))
        return centers if x.ndim == 2 else centers[:, 0]

    return init
