"""Data-driven initial values (jaxem.init) and restarts that use them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models import gmm_diag_kmeans

from jaxem import EM
from jaxem.init import kmeans_plusplus, random_points


def test_kmeans_plusplus_follows_squared_distances(x32):
    """The second center is drawn with probability proportional to the squared distance to
    the first: compare the frequencies over many keys with the exact D^2 probabilities."""
    x = jnp.array([0.0, 1.0, 3.0])
    keys = jax.random.split(jax.random.PRNGKey(0), 20000)
    centers = np.asarray(jax.vmap(kmeans_plusplus(x, 2))(keys))
    first, second = centers[:, 0], centers[:, 1]
    points = np.asarray(x)
    np.testing.assert_allclose([np.mean(first == p) for p in points], 1 / 3, atol=0.015)
    for p in points:
        d2 = (points - p) ** 2
        expected = d2 / d2.sum()
        chosen = second[first == p]
        observed = [np.mean(chosen == q) for q in points]
        np.testing.assert_allclose(observed, expected, atol=0.02)


def test_kmeans_plusplus_one_center_per_cluster(x32):
    rng = np.random.default_rng(0)
    means = np.array([[-50.0, 0.0], [0.0, 50.0], [50.0, 0.0]])
    x = jnp.asarray(np.repeat(means, 100, axis=0) + rng.normal(size=(300, 2)), jnp.float32)
    keys = jax.random.split(jax.random.PRNGKey(1), 50)
    centers = np.asarray(jax.vmap(kmeans_plusplus(x, 3))(keys))  # (50, 3, 2)
    assert centers.shape == (50, 3, 2)
    # every center is a data point ...
    assert np.all(np.min(np.abs(centers[:, :, None, :] - np.asarray(x)).sum(-1), -1) == 0)
    # ... and each draw puts one center in each cluster
    cluster = np.argmin(((centers[:, :, None, :] - means) ** 2).sum(-1), -1)
    assert np.all(np.sort(cluster, -1) == [0, 1, 2])


def test_kmeans_plusplus_duplicate_points_and_1d_shape(x32):
    centers = kmeans_plusplus(jnp.ones(5), 3)(jax.random.PRNGKey(0))
    assert centers.shape == (3,)
    np.testing.assert_array_equal(np.asarray(centers), 1.0)


def test_random_points_are_distinct_rows(x32):
    x = jnp.arange(40.0).reshape(20, 2)
    keys = jax.random.split(jax.random.PRNGKey(2), 30)
    points = np.asarray(jax.vmap(random_points(x, 20))(keys))
    # K = N: a permutation of the rows, every time
    np.testing.assert_array_equal(
        np.sort(points[:, :, 0], -1), np.tile(np.asarray(x)[:, 0], (30, 1))
    )
    assert len({tuple(p[:, 0]) for p in points}) > 1


@pytest.mark.parametrize("make_init", [kmeans_plusplus, random_points])
def test_bad_arguments(make_init):
    with pytest.raises(ValueError, match="num_components must be between 1 and the number"):
        make_init(jnp.zeros((3, 2)), 4)
    with pytest.raises(ValueError, match=r"x must have shape \(N,\) or \(N, D\)"):
        make_init(jnp.zeros((3, 2, 2)), 2)


def test_restarts_from_kmeans_plusplus(x32):
    """Every restart starts from its own k-means++ draw; every restart's final log-likelihood
    is reported, equals a fit started from that restart's key alone, and the best is kept."""
    rng = np.random.default_rng(4)
    means = np.array([[-6.0, 0.0], [0.0, 6.0], [6.0, 0.0], [0.0, -6.0]])
    x = jnp.asarray(np.repeat(means, 50, axis=0) + rng.normal(size=(200, 2)), jnp.float32)
    key = jax.random.PRNGKey(3)
    em = EM(gmm_diag_kmeans)
    result = em.run(key, x, 4, max_iter=40, num_restarts=3)
    restart_lls = np.asarray(result.restart_log_likelihoods)
    assert restart_lls.shape == (3,)
    singles = [float(em.run(k, x, 4, max_iter=40).log_likelihood) for k in jax.random.split(key, 3)]
    np.testing.assert_allclose(restart_lls, singles, rtol=1e-5)
    assert float(result.log_likelihood) == restart_lls.max()
    # The restarts really started apart (one k-means++ draw per key).
    starts = [np.asarray(em.init(k, x, 4).params["mu"]) for k in jax.random.split(key, 3)]
    assert not np.allclose(starts[0], starts[1]) and not np.allclose(starts[1], starts[2])
    # The best fit found the four clusters.
    found = np.asarray(result.params["mu"])
    assert np.max(np.min(np.abs(found[:, None] - means).sum(-1), 0)) < 0.5, found
