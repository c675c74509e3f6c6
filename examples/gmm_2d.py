"""Full, diagonal and tied covariance Gaussian mixtures, compared by BIC.

Three NumPyro models differ only in how the covariance of component ``z`` is
written:

- full: ``MultivariateNormal(mu[z], scale_tril=L[z])``, one Cholesky factor per component;
- diagonal: ``Normal(mu[z], sigma[z]).to_event(1)``, axis-aligned ellipses;
- tied: ``MultivariateNormal(mu[z], scale_tril=L)``, one covariance shared by all.

jaxem derives the closed-form M-step of all three from the way a parameter
reaches the distribution (indexed by ``z``, or only broadcast for the tied
``L``), so none needs custom code.

Theory point: the richer model always reaches the higher log-likelihood, so
models are compared by BIC = -2 log-lik + k log N, which charges each of the k
free parameters log N. The data here are drawn from three clusters that share
one tilted covariance: the full model gains almost nothing over the tied one
for its six extra parameters, and BIC picks the tied model; the diagonal model
cannot tilt its ellipses and loses clearly.

Run from the repository root::

    python examples/gmm_2d.py
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Ellipse
from numpyro.distributions import constraints

import jaxem
from jaxem import EM

QUICK = os.environ.get("JAXEM_EXAMPLE_QUICK") == "1"


def init_means(x, K):
    """Initializer for the means: K distinct data points, drawn with the PRNG key it receives."""
    return lambda key: x[jax.random.choice(key, x.shape[0], (K,), replace=False)]


def full_gmm(x, K=3):
    N, D = x.shape
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    mu = numpyro.param("mu", init_means(x, K))
    L = numpyro.param(
        "L", jnp.broadcast_to(jnp.eye(D), (K, D, D)), constraint=constraints.lower_cholesky
    )
    with numpyro.plate("data", N):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.MultivariateNormal(mu[z], scale_tril=L[z]), obs=x)


def diag_gmm(x, K=3):
    N, D = x.shape
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    mu = numpyro.param("mu", init_means(x, K))
    sigma = numpyro.param("sigma", jnp.ones((K, D)), constraint=constraints.positive)
    with numpyro.plate("data", N):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Normal(mu[z], sigma[z]).to_event(1), obs=x)


def tied_gmm(x, K=3):
    N, D = x.shape
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    mu = numpyro.param("mu", init_means(x, K))
    L = numpyro.param("L", jnp.eye(D), constraint=constraints.lower_cholesky)
    with numpyro.plate("data", N):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.MultivariateNormal(mu[z], scale_tril=L), obs=x)


def sample_data(rng, num_points=400):
    """Three clusters with one shared covariance."""
    means = np.array([[0.0, 0.0], [3.0, -2.0], [-1.0, 3.5]])
    shared_cov = np.array([[1.2, 0.8], [0.8, 1.0]])
    z = rng.choice(len(means), size=num_points, p=[0.4, 0.35, 0.25])
    x = means[z] + rng.multivariate_normal(np.zeros(2), shared_cov, size=num_points)
    return jnp.asarray(x, dtype=jnp.float32), z


def covariances(name, params, K):
    """(K, D, D) covariance matrices of a fitted model."""
    if name == "diagonal":
        return jax.vmap(jnp.diag)(params["sigma"] ** 2)
    L = params["L"] @ jnp.swapaxes(params["L"], -1, -2)
    return jnp.broadcast_to(L, (K,) + L.shape[-2:])


def draw_ellipse(ax, mean, cov, color):
    """Draws the 2-standard-deviation contour of a 2-D Gaussian."""
    eigvals, eigvecs = np.linalg.eigh(cov)
    angle = np.degrees(np.arctan2(eigvecs[1, -1], eigvecs[0, -1]))
    width, height = 4 * np.sqrt(eigvals[::-1])
    ax.add_patch(Ellipse(mean, width, height, angle=angle, fill=False, color=color, lw=2))


def main():
    x, true_z = sample_data(np.random.default_rng(0))
    K = 3
    models = {"full": full_gmm, "diagonal": diag_gmm, "tied": tied_gmm}

    fits = {}
    for name, model in models.items():
        fits[name] = EM(model).run(
            jax.random.PRNGKey(0),
            x,
            K=K,
            max_iter=300,
            tol=1e-7,
            num_restarts=3 if QUICK else 10,
        )

    print(f"N={x.shape[0]} points from 3 clusters with a shared covariance, K={K}")
    print(
        f"{'covariance':<10} {'log-lik':>9} {'k':>3} {'AIC':>8} {'BIC':>8} {'iters':>5} converged"
    )
    bics, labels = {}, {}
    for name, model in models.items():
        fit = fits[name]
        log_lik = float(fit.log_likelihood)
        aic = float(jaxem.aic(model, fit.params, x, K=K))
        bics[name] = float(jaxem.bic(model, fit.params, x, K=K))
        num_free = round((aic + 2 * log_lik) / 2)  # AIC = -2 log-lik + 2 k
        print(
            f"{name:<10} {log_lik:9.3f} {num_free:3d} {aic:8.3f} {bics[name]:8.3f}"
            f" {int(fit.num_iters):5d} {bool(fit.converged)}"
        )
        responsibilities = jaxem.posterior(model, fit.params, x, K=K)["z"]
        labels[name] = np.asarray(jnp.argmax(responsibilities, axis=-1))
    best = min(bics, key=bics.get)
    print(f"lowest BIC: {best}")
    print(f"true cluster (rows) x {best}-model cluster (columns):")
    print(np.array([np.bincount(labels[best][true_z == k], minlength=K) for k in range(K)]))

    fig = Figure(figsize=(17, 4.2), layout="tight")
    axes = fig.subplots(1, 4)
    colors = colormaps["tab10"].colors
    for ax, name in zip(axes, models, strict=False):
        params = fits[name].params
        ax.scatter(x[:, 0], x[:, 1], c=[colors[k] for k in labels[name]], s=10, alpha=0.6)
        for k, cov in enumerate(covariances(name, params, K)):
            draw_ellipse(ax, np.asarray(params["mu"][k]), np.asarray(cov), colors[k])
        ax.set(title=f"{name}: BIC {bics[name]:.1f}", xlabel="x[:, 0]", aspect="equal")
    axes[0].set_ylabel("x[:, 1]")
    # Every model's log-likelihood below the highest final one, on a log scale: drawn as
    # it is, the first iteration's low value flattens the final differences.
    top = max(float(fit.log_likelihood) for fit in fits.values())
    for name, fit in fits.items():
        history = np.asarray(fit.history)[: int(fit.num_iters)]
        gap = top - history
        shown = gap > 0
        final = float(fit.log_likelihood)
        axes[3].plot(
            np.arange(1, len(history) + 1)[shown], gap[shown], label=f"{name}: ends at {final:.1f}"
        )
    axes[3].set(
        title="log-likelihood per EM iteration",
        xlabel="iteration",
        ylabel=f"highest final log-likelihood ({top:.1f}) minus it",
        xscale="log",
        yscale="log",
    )
    axes[3].legend(fontsize=8)
    fig.savefig("gmm_2d.png", dpi=110)
    print("saved gmm_2d.png")


if __name__ == "__main__":
    main()
