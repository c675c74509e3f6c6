"""A Poisson HMM on counts, with K chosen by BIC.

Counts that switch between regimes of low and high intensity (simulated here
from a three-state Poisson HMM, in the spirit of Zucchini & MacDonald's
earthquake counts) are overdispersed and autocorrelated; a Poisson HMM
explains both:

    z_t | z_{t-1} ~ Categorical(A[z_{t-1}]),   count_t | z_t ~ Poisson(rate[z_t]).

The initial state is the extra last row of ``A``, a constant carried into the
``scan`` (no latent outside it). All M-steps are closed-form; BIC picks the
number of states, which is checked to be the true three, and the fitted rates
are checked against the truth.

Reference: W. Zucchini, I. L. MacDonald, R. Langrock, *Hidden Markov Models for
Time Series: An Introduction Using R*, 2nd ed., CRC Press (2016).

Run from the repository root::

    python examples/hmm_poisson.py
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from matplotlib.figure import Figure
from numpyro.contrib.control_flow import scan
from numpyro.distributions import constraints

import jaxem
from jaxem import EM

QUICK = os.environ.get("JAXEM_EXAMPLE_QUICK") == "1"
TRUE_RATES = np.array([2.0, 8.0, 20.0])
TRUE_A = np.array([[0.9, 0.08, 0.02], [0.05, 0.9, 0.05], [0.02, 0.08, 0.9]])


def poisson_hmm(counts, K):
    """counts: (T,); A has K + 1 rows, the last one the initial distribution."""
    sticky = jnp.full((K, K), 0.1 / K) + 0.9 * jnp.eye(K)
    start = jnp.ones((1, K)) / K
    A = numpyro.param("A", jnp.concatenate([sticky, start]), constraint=constraints.simplex)
    # Spread initial rates over the data's quantiles.
    rate = numpyro.param(
        "rate",
        jnp.quantile(counts, jnp.linspace(0.1, 0.9, K)) + 0.5,
        constraint=constraints.positive,
    )

    def step(z_prev, count):
        z = numpyro.sample("z", dist.Categorical(A[z_prev]))
        numpyro.sample("count", dist.Poisson(rate[z]), obs=count)
        return z, None

    scan(step, jnp.array(K), counts)


def simulate(num_steps, seed=0):
    rng = np.random.default_rng(seed)
    states = np.zeros(num_steps, int)
    for t in range(1, num_steps):
        states[t] = rng.choice(3, p=TRUE_A[states[t - 1]])
    return states, rng.poisson(TRUE_RATES[states])


def main():
    jax.config.update("jax_enable_x64", True)
    states, counts = simulate(400 if QUICK else 2000)
    data = jnp.asarray(counts, jnp.float64)
    fits = {}
    for K in (1, 2, 3, 4):
        result = EM(poisson_hmm).run(jax.random.PRNGKey(0), data, K, max_iter=300, tol=1e-8)
        bic = float(jaxem.bic(poisson_hmm, result.params, data, K, num_observations=len(counts)))
        fits[K] = (result, bic)
        print(f"K={K}: log-likelihood {float(result.log_likelihood):10.2f}  BIC {bic:10.2f}")
    best = min(fits, key=lambda k: fits[k][1])
    print(f"BIC chooses K={best}")
    assert best == 3
    result = fits[3][0]
    rates = np.sort(np.asarray(result.params["rate"]))
    print("rates", rates.round(2), "true", TRUE_RATES)
    np.testing.assert_allclose(rates, TRUE_RATES, rtol=0.25)  # 400 counts in quick runs

    decoded = np.asarray(jaxem.map_assignment(poisson_hmm, result.params, data, 3)["z"])
    fitted_rates = np.asarray(result.params["rate"])
    fig = Figure(figsize=(9, 3.5), layout="tight")
    ax = fig.subplots()
    shown = slice(0, 300)
    ax.bar(np.arange(len(counts))[shown], counts[shown], color="lightgray", label="counts")
    ax.step(
        np.arange(len(counts))[shown],
        fitted_rates[decoded][shown],
        where="mid",
        color="tab:red",
        label="rate of the Viterbi state",
    )
    ax.set(xlabel="time", ylabel="count", title="Poisson HMM, K = 3")
    ax.legend(loc="upper right")
    fig.savefig("hmm_poisson.png", dpi=120)
    print("saved hmm_poisson.png")


if __name__ == "__main__":
    main()
