"""Variational Bayes Gaussian mixture on Old Faithful: how many components survive.

Bishop (PRML, section 10.2) fits a mixture of K = 6 full-covariance Gaussians to
the Old Faithful eruptions (standardized) by variational Bayes: with a small
Dirichlet concentration alpha0 on the weights, the components the data do not
need are emptied (their expected weight falls to about alpha0 / (N + K alpha0)),
and two survive; a large alpha0 keeps every component in use.

The model is written as for NUTS, priors included, and fitted by
``jaxem.VariationalBayesEM`` (the Normal-Wishart pair, as scikit-learn's
``BayesianGaussianMixture``): weights ~ Dirichlet(alpha0), per component
Lam_k ~ Wishart(nu0, W0), mu_k | Lam_k ~ MVN(m0, (beta0 Lam_k)^-1), and
x_n ~ MVN(mu_{z_n}, Lam_{z_n}^-1) with z_n summed out. alpha0 is a model argument:
one compiled fit serves every value. The plot shows the data with the surviving
components at the smallest alpha0, and the expected weights of the six
components against alpha0.

Run from the repository root::

    python examples/vb_old_faithful.py
"""

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from matplotlib.figure import Figure

from jaxem import VariationalBayesEM

QUICK = os.environ.get("JAXEM_EXAMPLE_QUICK") == "1"
DATA = Path(__file__).resolve().parents[1] / "data" / "faithful.csv"
K = 6


def model(x, alpha0):
    weights = numpyro.sample("weights", dist.Dirichlet(alpha0 * jnp.ones(K)))
    with numpyro.plate("components", K):
        precision = numpyro.sample("precision", dist.Wishart(3.0, scale_matrix=jnp.eye(2)))
        loc = numpyro.sample(
            "loc", dist.MultivariateNormal(jnp.zeros(2), precision_matrix=1.0 * precision)
        )
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(weights))
        numpyro.sample("x", dist.MultivariateNormal(loc[z], precision_matrix=precision[z]), obs=x)


def ellipse(mean, cov, scale=2.0, num=100):
    """Points on the ``scale``-standard-deviation contour of a 2-D Gaussian."""
    angles = np.linspace(0, 2 * np.pi, num)
    return mean + scale * (np.linalg.cholesky(cov) @ np.stack([np.cos(angles), np.sin(angles)])).T


def main():
    jax.config.update("jax_enable_x64", True)
    raw = np.loadtxt(DATA, delimiter=",", skiprows=1)
    x = jnp.asarray((raw - raw.mean(0)) / raw.std(0))  # standardized, as in PRML
    # Every component in use at the start: means at data points spread over the
    # eruptions axis, unit precisions, equal weights.
    order = np.argsort(np.asarray(x[:, 0]))
    start = {
        "weights": jnp.ones(K) / K,
        "loc": x[order[np.linspace(10, len(order) - 10, K).astype(int)]],
        "precision": jnp.broadcast_to(4.0 * jnp.eye(2), (K, 2, 2)),
    }
    vb = VariationalBayesEM(model, global_sites=("weights", "precision", "loc"))
    alphas = [1e-3, 1.0, 100.0] if QUICK else [1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0]
    fits = {}
    for alpha0 in alphas:
        fit = vb.run(
            jax.random.PRNGKey(0),
            x,
            jnp.asarray(alpha0),
            init_params=start,
            max_iter=150 if QUICK else 1000,
            tol=1e-8,
        )
        weights = np.asarray(fit.posteriors["weights"].mean)
        fits[alpha0] = fit
        print(
            f"alpha0 = {alpha0:g}: expected weights {np.round(np.sort(weights)[::-1], 3)}, "
            f"{int(np.sum(weights > 0.01))} components above 1%, ELBO {float(fit.elbo):.3f} "
            f"({int(fit.num_iters)} iterations)"
        )

    figure = Figure(figsize=(10, 4))
    left, right = figure.subplots(1, 2)
    smallest = fits[alphas[0]]
    weights = np.asarray(smallest.posteriors["weights"].mean)
    nu, scale = map(np.asarray, smallest.q["precision"])
    means = np.asarray(smallest.q["loc"][0])
    left.scatter(x[:, 0], x[:, 1], s=8, c="0.6")
    # Numbered and coloured by weight, as in the right panel (the same colour is the same
    # component in both).
    for rank, k in enumerate(np.argsort(weights)[::-1]):
        if weights[k] <= 0.01:
            break
        cov = np.linalg.inv(nu[k] * scale[k])  # E[precision]^-1
        curve = ellipse(means[k], cov)
        label = f"component {rank + 1}: E[w] = {weights[k]:.2f}"
        left.plot(curve[:, 0], curve[:, 1], color=f"C{rank}", label=label)
    left.set_xlabel("eruption duration (standardized)")
    left.set_ylabel("waiting time (standardized)")
    left.set_title(f"K = {K}, alpha0 = {alphas[0]:g}: the components that survive (2 sd)")
    left.legend(fontsize=8)

    table = np.array(
        [np.sort(np.asarray(fits[a].posteriors["weights"].mean))[::-1] for a in alphas]
    )
    for k in range(K):
        right.plot(alphas, table[:, k], "o-", color=f"C{k}", label=f"component {k + 1} (by weight)")
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("Dirichlet concentration alpha0")
    right.set_ylabel("expected weight E[w_k]")
    right.set_title("Small alpha0 empties unneeded components\n(the four emptied ones overlap)")
    right.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig("vb_old_faithful.png", dpi=120)
    print("saved vb_old_faithful.png")


if __name__ == "__main__":
    main()
