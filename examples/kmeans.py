"""K-means is hard EM on an isotropic Gaussian mixture.

Take a Gaussian mixture whose weights are equal and whose components share one
fixed isotropic variance, both constants rather than parameters:

    z ~ Categorical(1/K, ..., 1/K),   x | z ~ Normal(mu[z], sigma^2 I).

Hard (classification) EM replaces the posterior over ``z`` by its argmax. With
equal weights and equal variances the most probable component is the nearest
mean, and the M-step sets each mean to the average of its points: exactly
Lloyd's algorithm for K-means, whatever the value of sigma.

Theory point: started from the same centers, ``EM(model, hard=True)`` and
scikit-learn's ``KMeans`` take the same steps and stop at the same centers and
the same inertia (sum of squared distances to the nearest center). The
objective of hard EM, the complete-data log-likelihood log p(x, z*) at the MAP
labels z*, is -inertia / 2 plus a constant when sigma = 1.

Run from the repository root::

    python examples/kmeans.py
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from sklearn.cluster import KMeans

from jaxem import EM


def kmeans_model(x, K=4):
    N, D = x.shape
    # Forgy initialization: K distinct data points (init_params overrides it below).
    mu = numpyro.param("mu", lambda key: x[jax.random.choice(key, N, (K,), replace=False)])
    with numpyro.plate("data", N):
        z = numpyro.sample("z", dist.Categorical(jnp.ones(K) / K))
        numpyro.sample("x", dist.Normal(mu[z], 1.0).to_event(1), obs=x)


def sample_blobs(rng, num_points=1000):
    centers = np.array([[0.0, 0.0], [5.0, 1.0], [1.0, 5.0], [6.0, 6.0]])
    z = rng.integers(len(centers), size=num_points)
    return centers[z] + rng.normal(scale=1.2, size=(num_points, 2))


def inertia(x, centers):
    squared_distances = ((x[:, None, :] - centers[None, :, :]) ** 2).sum(-1)
    return squared_distances.min(-1).sum()


def main():
    rng = np.random.default_rng(0)
    x = sample_blobs(rng)
    K = 4
    # Both methods start from the same K distinct data points.
    init_centers = x[rng.choice(len(x), size=K, replace=False)]

    em = EM(kmeans_model, hard=True)
    result = em.run(
        jax.random.PRNGKey(0),
        jnp.asarray(x, dtype=jnp.float32),
        K=K,
        max_iter=100,
        tol=1e-12,  # stop at the fixed point (no label changes), like KMeans(tol=0)
        init_params={"mu": jnp.asarray(init_centers, dtype=jnp.float32)},
    )
    em_centers = np.asarray(result.params["mu"], dtype=np.float64)

    km = KMeans(n_clusters=K, init=init_centers, n_init=1, algorithm="lloyd", tol=0.0).fit(x)
    # Both start from init_centers in the same order and Lloyd steps keep each
    # cluster's identity, so center k of one method is center k of the other.
    sk_centers = km.cluster_centers_

    print(f"K-means on N={len(x)} 2-D points, K={K}, same initial centers")
    print(f"{'':>2} {'hard EM center':>20} {'KMeans center':>20}")
    for k in range(K):
        em_c = ", ".join(f"{v:8.4f}" for v in em_centers[k])
        sk_c = ", ".join(f"{v:8.4f}" for v in sk_centers[k])
        print(f"{k:>2} {em_c:>20} {sk_c:>20}")
    em_inertia = inertia(x, em_centers)
    print(f"inertia      hard EM {em_inertia:.4f}   KMeans {km.inertia_:.4f}")
    print(f"iterations   hard EM {int(result.num_iters)}   KMeans {km.n_iter_}")
    max_diff = np.abs(em_centers - sk_centers).max()
    print(f"max |center difference| {max_diff:.2e}")
    assert max_diff < 1e-3, max_diff

    # What hard EM maximizes is log p(x, z*) at the MAP labels z*; with unit
    # variance it is -inertia / 2 plus a constant, so K-means minimizes inertia.
    N, D = x.shape
    objective = float(result.history[int(result.num_iters) - 1])
    constant = -N * np.log(K) - N * D / 2 * np.log(2 * np.pi)
    print(
        f"hard-EM objective {objective:.3f} = -inertia/2 - N log K - N D log(2 pi)/2"
        f" = {-em_inertia / 2 + constant:.3f}"
    )


if __name__ == "__main__":
    main()
