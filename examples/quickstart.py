"""Quickstart: fit a 2-D Gaussian mixture by expectation-maximization.

The model is an ordinary NumPyro program: mixing weights ``w``, means ``mu`` and
Cholesky factors ``L`` of the covariances are ``numpyro.param`` sites, and the
component ``z`` of each point is a discrete latent ``numpyro.sample`` site.
jaxem enumerates ``z`` to get the posterior responsibilities (E-step) and then
updates every parameter in closed form: weighted counts, means and covariances
(M-step).

Theory point: every EM iteration increases the marginal log-likelihood
``log p(x | theta)``, but EM only finds a local optimum, so we run a few random
restarts (the ``mu`` initializer receives a PRNG key; each restart draws its own
starting means) and keep the best one.

Run from the repository root::

    python examples/quickstart.py
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
from matplotlib.ticker import MaxNLocator
from numpyro.distributions import constraints

import jaxem
from jaxem import EM

QUICK = os.environ.get("JAXEM_EXAMPLE_QUICK") == "1"


def gmm(x, K=3):
    N, D = x.shape
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    # Start the means at K distinct data points (Forgy initialization): random
    # normal draws can land far from data that is not centered at the origin.
    mu = numpyro.param("mu", lambda key: x[jax.random.choice(key, N, (K,), replace=False)])
    L = numpyro.param(
        "L", jnp.broadcast_to(jnp.eye(D), (K, D, D)), constraint=constraints.lower_cholesky
    )
    with numpyro.plate("data", N):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.MultivariateNormal(mu[z], scale_tril=L[z]), obs=x)


def sample_data(rng, num_points=600):
    weights = np.array([0.5, 0.3, 0.2])
    means = np.array([[0.0, 0.0], [4.0, 3.0], [-3.0, 4.0]])
    covs = np.array(
        [[[1.0, 0.6], [0.6, 1.0]], [[1.5, -0.7], [-0.7, 0.8]], [[0.4, 0.0], [0.0, 1.2]]]
    )
    z = rng.choice(len(weights), size=num_points, p=weights)
    x = np.stack([rng.multivariate_normal(means[k], covs[k]) for k in z])
    return jnp.asarray(x, dtype=jnp.float32)


def draw_ellipse(ax, mean, cov, color):
    """Draws the 1- and 2-standard-deviation contours of a 2-D Gaussian."""
    eigvals, eigvecs = np.linalg.eigh(cov)
    angle = np.degrees(np.arctan2(eigvecs[1, -1], eigvecs[0, -1]))
    for num_std in (1.0, 2.0):
        width, height = 2 * num_std * np.sqrt(eigvals[::-1])
        ax.add_patch(Ellipse(mean, width, height, angle=angle, fill=False, color=color, lw=1.5))


def main():
    x = sample_data(np.random.default_rng(0))
    K = 3

    em = EM(gmm)
    result = em.run(
        jax.random.PRNGKey(1), x, K=K, max_iter=200, tol=1e-6, num_restarts=2 if QUICK else 5
    )
    params = result.params
    covs = params["L"] @ jnp.swapaxes(params["L"], -1, -2)

    print(f"Gaussian mixture, N={x.shape[0]}, K={K}, full covariance")
    print("restart log-likelihoods:", np.round(np.asarray(result.restart_log_likelihoods), 2))
    print()
    print(f"{'k':>2} {'weight':>7} {'mean':>18} {'cov diag':>18}")
    for k in range(K):
        mean = ", ".join(f"{v:7.3f}" for v in params["mu"][k])
        var = ", ".join(f"{v:7.3f}" for v in jnp.diag(covs[k]))
        print(f"{k:>2} {float(params['w'][k]):7.3f} {mean:>18} {var:>18}")
    print()
    print(f"log-likelihood {float(result.log_likelihood):.3f}")
    print(f"BIC            {float(jaxem.bic(gmm, params, x, K=K)):.3f}")
    print(f"iterations     {int(result.num_iters)}")
    print(f"converged      {bool(result.converged)}")

    labels = np.asarray(jnp.argmax(jaxem.posterior(gmm, params, x, K=K)["z"], axis=-1))
    history = np.asarray(result.history)[: int(result.num_iters)]

    fig = Figure(figsize=(11, 4.5), layout="tight")
    ax_data, ax_ll = fig.subplots(1, 2, width_ratios=(1.3, 1))
    colors = colormaps["tab10"].colors
    ax_data.scatter(x[:, 0], x[:, 1], c=[colors[k] for k in labels], s=8, alpha=0.6)
    for k in range(K):
        draw_ellipse(ax_data, np.asarray(params["mu"][k]), np.asarray(covs[k]), colors[k])
        ax_data.plot(*params["mu"][k], marker="x", color="black", ms=8)
    ax_data.set(
        title="Posterior argmax of z, 1 and 2 sd ellipses",
        xlabel="x[:, 0]",
        ylabel="x[:, 1]",
        aspect="equal",
    )
    # The gap to the final log-likelihood on a log scale: plotted as it is, the first
    # iteration's low value flattens the rest of the curve.
    final = float(result.log_likelihood)
    gap = final - history
    shown = gap > 0
    ax_ll.semilogy(np.arange(1, len(history) + 1)[shown], gap[shown], marker=".")
    ax_ll.set(
        title="EM never decreases the log-likelihood",
        xlabel="iteration",
        ylabel=f"gap to the final log-likelihood ({final:.1f})",
    )
    ax_ll.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.savefig("quickstart.png", dpi=120)
    print("saved quickstart.png")


if __name__ == "__main__":
    main()
