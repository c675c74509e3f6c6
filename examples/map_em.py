"""MAP-EM on the Gaussian mixture of NumPyro's enumeration tutorial.

NumPyro's tutorial "Gaussian Mixture Model" writes its parameters as sample
sites with priors, the way a model for NUTS is written,

    weights ~ Dirichlet(0.5, 0.5),   scale ~ LogNormal(0, 2),
    locs[k] ~ Normal(0, 10),
    z_i ~ Categorical(weights),      x_i | z_i ~ Normal(locs[z_i], scale),

and finds the MAP estimate of the global sites with an ``AutoDelta`` guide and
SVI. jaxem fits the same model, unchanged, by MAP-EM: naming the sample sites
that are parameters in ``EM(model, global_sites=(...))``. The M-step maximizes
Q + log prior: the weights (Dirichlet-Categorical) and the locations
(Normal-Normal) in closed form from the expected statistics plus the priors'
pseudo-statistics, the scale (a LogNormal prior, not conjugate) by L-BFGS on
Q + log prior; ``em.m_step_paths`` says so.

With a Dirichlet concentration below 1 the log posterior is unbounded where a
weight goes to 0: the MAP estimate is a local mode (the one the tutorial finds).
The script checks it against a direct maximization of log p(x | theta) +
log p(theta) by scipy from a nearby point, and plots the data with the mixture
densities at the MAP and at the maximum-likelihood estimate.

Run from the repository root::

    python examples/map_em.py
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import scipy.optimize
from matplotlib.figure import Figure
from numpyro.distributions import constraints

from jaxem import EM

DATA = [0.0, 1.0, 10.0, 11.0, 12.0]
K = 2


def model(data):
    weights = numpyro.sample("weights", dist.Dirichlet(0.5 * jnp.ones(K)))
    scale = numpyro.sample("scale", dist.LogNormal(0.0, 2.0))
    with numpyro.plate("components", K):
        locs = numpyro.sample("locs", dist.Normal(0.0, 10.0))
    with numpyro.plate("data", len(data)):
        assignment = numpyro.sample("assignment", dist.Categorical(weights))
        numpyro.sample("obs", dist.Normal(locs[assignment], scale), obs=data)


def ml_model(data):
    """The same mixture with plain params: maximum likelihood."""
    weights = numpyro.param("weights", jnp.ones(K) / K, constraint=constraints.simplex)
    scale = numpyro.param("scale", 1.0, constraint=constraints.positive)
    locs = numpyro.param("locs", lambda key: jax.random.normal(key, (K,)) * 5.0)
    with numpyro.plate("data", len(data)):
        assignment = numpyro.sample("assignment", dist.Categorical(weights))
        numpyro.sample("obs", dist.Normal(locs[assignment], scale), obs=data)


def log_posterior(weight, scale, locs, data):
    """log p(x | theta) + log p(theta), written out: the reference for scipy."""
    weights = jnp.stack([weight, 1.0 - weight])
    per_component = dist.Normal(locs, scale).log_prob(data[:, None]) + jnp.log(weights)
    log_lik = jax.nn.logsumexp(per_component, axis=-1).sum()
    log_prior = (
        dist.Dirichlet(0.5 * jnp.ones(K)).log_prob(weights)
        + dist.LogNormal(0.0, 2.0).log_prob(scale)
        + dist.Normal(0.0, 10.0).log_prob(locs).sum()
    )
    return log_lik + log_prior


def scipy_map(data, start):
    def negative(v):
        return -log_posterior(jax.nn.sigmoid(v[0]), jnp.exp(v[1]), v[2:], data)

    value_and_grad = jax.jit(jax.value_and_grad(negative))

    def fun(v):
        value, grad = value_and_grad(jnp.asarray(v))
        return float(value), np.asarray(grad, np.float64)

    found = scipy.optimize.minimize(fun, start, jac=True, method="BFGS", options={"gtol": 1e-9})
    return jax.nn.sigmoid(found.x[0]), np.exp(found.x[1]), found.x[2:], -found.fun


def main():
    jax.config.update("jax_enable_x64", True)
    data = jnp.array(DATA)
    em = EM(model, global_sites=("weights", "scale", "locs"))
    for name, path in em.m_step_paths(data).items():
        print(f"{name:>8}: {path}")
    # As the tutorial's init_loc_fn: equal weights, half the data's variance, the
    # locations at data points. A draw from the priors (the default initial values)
    # could start a component where no data point is; with a concentration below 1
    # its weight would then go to 0, where the Dirichlet's density is infinite (the
    # run says diverged).
    init_params = {
        "weights": jnp.ones(K) / K,
        "scale": jnp.sqrt(data.var() / 2),
        "locs": jnp.array([data.min(), data.max()]),
    }
    fit = em.run(jax.random.PRNGKey(0), data, max_iter=1000, tol=1e-12, init_params=init_params)
    params = {k: np.asarray(v) for k, v in fit.params.items()}
    print(
        f"MAP-EM: weights {np.round(params['weights'], 4)}, locs {np.round(params['locs'], 4)}, "
        f"scale {params['scale']:.4f}"
    )
    print(
        f"log-likelihood {float(fit.log_likelihood):.6f} + log prior {float(fit.log_prior):.6f}"
        f" = log posterior {float(fit.log_posterior):.6f} ({int(fit.num_iters)} iterations,"
        f" converged {bool(fit.converged)})"
    )

    start = np.concatenate(
        [
            [np.log(params["weights"][0] / params["weights"][1]) + 0.05],
            [np.log(params["scale"]) - 0.05],
            params["locs"] + 0.1,
        ]
    )
    weight, scale, locs, best = scipy_map(data, start)
    print(
        f"scipy:  weights {np.round([weight, 1 - weight], 4)}, locs {np.round(locs, 4)}, "
        f"scale {scale:.4f}, log posterior {best:.6f}"
    )
    np.testing.assert_allclose(params["locs"], locs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(params["weights"][0], weight, rtol=1e-5)
    np.testing.assert_allclose(params["scale"], scale, rtol=1e-5)
    np.testing.assert_allclose(float(fit.log_posterior), best, rtol=1e-8)

    ml = EM(ml_model).run(jax.random.PRNGKey(1), data, max_iter=1000, tol=1e-12, num_restarts=4)
    ml_params = {k: np.asarray(v) for k, v in ml.params.items()}
    print(
        f"ML-EM:  weights {np.round(ml_params['weights'], 4)}, locs "
        f"{np.round(ml_params['locs'], 4)}, scale {ml_params['scale']:.4f}, log-likelihood "
        f"{float(ml.log_likelihood):.6f}"
    )

    grid = np.linspace(-5.0, 17.0, 400)

    def density(p):
        return np.sum(
            p["weights"] * np.exp(dist.Normal(p["locs"], p["scale"]).log_prob(grid[:, None])),
            axis=-1,
        )

    figure = Figure(figsize=(6, 3.5))
    ax = figure.subplots()
    ax.plot(grid, density(params), label="MAP-EM")
    ax.plot(grid, density(ml_params), "--", label="maximum likelihood")
    ax.plot(DATA, np.zeros(len(DATA)), "k|", markersize=20, label="data")
    ax.set_xlabel("x")
    ax.set_ylabel("mixture density")
    ax.legend()
    figure.tight_layout()
    figure.savefig("map_em.png", dpi=120)
    print("saved map_em.png")


if __name__ == "__main__":
    main()
