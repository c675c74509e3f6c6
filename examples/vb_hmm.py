"""Variational Bayes HMM: surplus hidden states are switched off.

Beal (2003, chapter 3) fits a hidden Markov model by variational Bayes: Dirichlet
priors on the initial distribution and on every row of the transition matrix,
conjugate priors on the emissions, and a mean-field posterior
q(pi) q(A) q(emissions) q(z_{1:T}) in which the chain's posterior q(z_{1:T})
stays exact (forward-backward under exp E[log pi], exp E[log A] and the expected
log emission densities). Given more states than the data need, the Dirichlet
priors with a concentration below one let the variational posterior leave the
surplus states unvisited: their expected occupancy sum_t q(z_t = k) falls to
(nearly) zero, where maximum likelihood would split the real states among them.

Here a three-state Gaussian HMM is simulated and fitted with K = 6 states by
``jaxem.VariationalBayesEM``: the model is written as for NUTS, with ``scan``,

    pi ~ Dirichlet(a0),  A_j ~ Dirichlet(a0),  Lam_k ~ Wishart(nu0, W0),
    mu_k | Lam_k ~ N(m0, (beta0 Lam_k)^-1),
    z_0 ~ Categorical(pi),  z_t | z_{t-1} ~ Categorical(A_{z_{t-1}}),
    x_t | z_t ~ N(mu_{z_t}, Lam_{z_t}^-1)

(the emissions one-dimensional, written as a MultivariateNormal so that the
Normal-Wishart pair gives the unknown mean and precision their joint conjugate
posterior). The expected occupancy of state k is read off q(mu_k): its precision
factor is beta0 + N_k. The plot shows the series coloured by the Viterbi path at
the posterior means, and the expected occupancies.

Reference: M. J. Beal, *Variational Algorithms for Approximate Bayesian
Inference*, PhD thesis, Gatsby Unit, University College London (2003).

Run from the repository root::

    python examples/vb_hmm.py
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from matplotlib.figure import Figure
from numpyro.contrib.control_flow import scan

import jaxem
from jaxem import VariationalBayesEM

QUICK = os.environ.get("JAXEM_EXAMPLE_QUICK") == "1"
K = 6  # states in the model; the data have three
TRUE_MEANS = np.array([-3.0, 0.0, 3.0])
TRUE_SD = 0.7
TRUE_A = np.array([[0.90, 0.05, 0.05], [0.05, 0.90, 0.05], [0.05, 0.05, 0.90]])
SITES = ("pi", "trans", "precision", "loc")
BETA0 = 0.1


def model(x, concentration):
    """x: (T, 1), a one-dimensional series as MultivariateNormal emissions."""
    pi = numpyro.sample("pi", dist.Dirichlet(concentration * jnp.ones(K)))
    trans = numpyro.sample("trans", dist.Dirichlet(concentration * jnp.ones((K, K))).to_event(1))
    with numpyro.plate("states", K):
        precision = numpyro.sample("precision", dist.Wishart(2.0, scale_matrix=jnp.eye(1)))
        loc = numpyro.sample(
            "loc", dist.MultivariateNormal(jnp.zeros(1), precision_matrix=BETA0 * precision)
        )
    z0 = numpyro.sample("z0", dist.Categorical(pi))
    numpyro.sample("x0", dist.MultivariateNormal(loc[z0], precision_matrix=precision[z0]), obs=x[0])

    def step(z_prev, xt):
        z = numpyro.sample("z", dist.Categorical(trans[z_prev]))
        numpyro.sample("x", dist.MultivariateNormal(loc[z], precision_matrix=precision[z]), obs=xt)
        return z, None

    scan(step, z0, x[1:])


def simulate(T, seed=0):
    rng = np.random.default_rng(seed)
    states = np.zeros(T, int)
    for t in range(1, T):
        states[t] = rng.choice(3, p=TRUE_A[states[t - 1]])
    return states, TRUE_MEANS[states] + TRUE_SD * rng.normal(size=T)


def main():
    jax.config.update("jax_enable_x64", True)
    states, series = simulate(500)
    x = jnp.asarray(series[:, None])
    vb = VariationalBayesEM(model, global_sites=SITES)
    concentration = 0.5
    # Coordinate ascent finds a local optimum of the ELBO, some with a real state split
    # in two: a few starts (every state in use, the means at distinct data points; one
    # compiled fit serves them all), and the highest ELBO kept.
    fits = []
    for seed in range(4 if QUICK else 8):
        loc = np.random.default_rng(seed).choice(series, K, replace=False)
        start = {
            "pi": jnp.ones(K) / K,
            "trans": jnp.full((K, K), 1.0 / K),
            "precision": jnp.ones((K, 1, 1)),
            "loc": jnp.asarray(loc[:, None]),
        }
        fit = vb.run(
            jax.random.PRNGKey(seed),
            x,
            jnp.asarray(concentration),
            init_params=start,
            max_iter=1000,
            tol=1e-9,
        )
        fits.append(fit)
        print(f"start {seed}: ELBO {float(fit.elbo):.3f} after {int(fit.num_iters)} iterations")
    fit = max(fits, key=lambda f: float(f.elbo))
    history = np.asarray(fit.history[: int(fit.num_iters)])
    assert np.all(np.diff(history) >= -1e-9 * np.abs(history[1:])), "the ELBO went down"

    means = np.asarray(fit.q["loc"][0])[:, 0]
    occupancy = np.asarray(fit.q["loc"][1]) - BETA0  # beta_k = beta0 + N_k
    nu, scale = map(np.asarray, fit.q["precision"])
    sd = 1.0 / np.sqrt(nu * scale[:, 0, 0])  # E[precision]^-1/2
    order = np.argsort(-occupancy)
    print(f"best ELBO {float(fit.elbo):.3f}")
    print(
        "expected occupancy sum_t q(z_t = k), by state:",
        " ".join(f"{n:.3g}" for n in occupancy),
    )
    used = np.flatnonzero(occupancy > 1.0)
    print(
        f"{len(used)} of {K} states in use; their means {np.round(np.sort(means[used]), 2)} "
        f"(true {TRUE_MEANS}), sds {np.round(sd[used][np.argsort(means[used])], 2)} "
        f"(true {TRUE_SD})"
    )
    trans = np.asarray(fit.posteriors["trans"].mean)[np.ix_(used, used)][
        np.ix_(np.argsort(means[used]), np.argsort(means[used]))
    ]
    print("expected transition matrix among them:\n", np.round(trans, 3))
    assert len(used) == 3, "VB should keep exactly the three states of the simulation"
    assert occupancy[order[3:]].sum() < 0.5, "the surplus states should be (nearly) empty"
    np.testing.assert_allclose(np.sort(means[used]), TRUE_MEANS, atol=0.3)

    # The most likely path at the posterior means (a point, for the picture).
    point = {
        "pi": fit.posteriors["pi"].mean,
        "trans": fit.posteriors["trans"].mean,
        "precision": jnp.asarray(nu[:, None, None] * scale),
        "loc": jnp.asarray(means[:, None]),
    }
    path = jaxem.map_assignment(
        jaxem.with_global_sites(model, SITES), point, x, jnp.asarray(concentration)
    )
    viterbi = np.concatenate([np.atleast_1d(np.asarray(path["z0"])), np.ravel(path["z"])])

    figure = Figure(figsize=(11, 4))
    left, right = figure.subplots(1, 2, gridspec_kw={"width_ratios": [3, 1]})
    time = np.arange(len(series))
    left.plot(time, series, color="0.7", lw=0.8)
    colour = {k: f"C{i}" for i, k in enumerate(used)}  # the same colour in both panels
    for k in used:
        on = viterbi == k
        left.scatter(
            time[on], series[on], s=8, color=colour[k], label=f"state {k}: mean {means[k]:.2f}"
        )
    left.set_xlabel("t")
    left.set_ylabel("x_t")
    left.set_title(f"K = {K} states, Dirichlet concentration {concentration}: Viterbi path")
    left.legend(fontsize=8)
    right.bar(np.arange(K), occupancy, color=[colour.get(k, "0.6") for k in range(K)])
    right.set_yscale("symlog", linthresh=1e-3)
    right.set_xlabel("state k")
    right.set_ylabel("expected occupancy sum_t q(z_t = k)")
    right.set_title("Surplus states are switched off")
    figure.tight_layout()
    figure.savefig("vb_hmm.png", dpi=120)
    print("saved vb_hmm.png")


if __name__ == "__main__":
    main()
