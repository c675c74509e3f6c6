"""The occasionally dishonest casino: a categorical HMM, fitted and decoded.

A casino mostly rolls a fair die but now and then switches to a loaded one
that shows a six half of the time (Durbin et al. 1998, section 3.2):

    z_t | z_{t-1} ~ Categorical(A[z_{t-1}]),   roll_t | z_t ~ Categorical(B[z_t]).

From the rolls alone, EM recovers the two dice and the switching rates (all
closed-form M-steps: normalized expected counts), and Viterbi
(``jaxem.map_assignment``) says when the loaded die was in play. The fit is
checked against hmmlearn's ``CategoricalHMM`` from the same initial values.

Reference: R. Durbin, S. Eddy, A. Krogh, G. Mitchison, *Biological Sequence
Analysis*, Cambridge University Press (1998).

Run from the repository root::

    python examples/hmm_casino.py
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
TRUE_A = np.array([[0.95, 0.05], [0.10, 0.90]])
TRUE_B = np.array([[1 / 6] * 6, [0.1, 0.1, 0.1, 0.1, 0.1, 0.5]])


def casino(rolls):
    """rolls: (T,) faces 0..5; state 0 fair, 1 loaded (by the initial values)."""
    pi = numpyro.param("pi", jnp.array([0.5, 0.5]), constraint=constraints.simplex)
    A = numpyro.param("A", jnp.array([[0.9, 0.1], [0.1, 0.9]]), constraint=constraints.simplex)
    B = numpyro.param(
        "B",
        jnp.array([[0.17, 0.17, 0.17, 0.17, 0.16, 0.16], [0.1, 0.1, 0.1, 0.1, 0.2, 0.4]]),
        constraint=constraints.simplex,
    )
    z0 = numpyro.sample("z0", dist.Categorical(pi))
    numpyro.sample("roll0", dist.Categorical(B[z0]), obs=rolls[0])

    def roll(z_prev, face):
        z = numpyro.sample("z", dist.Categorical(A[z_prev]))
        numpyro.sample("roll", dist.Categorical(B[z]), obs=face)
        return z, None

    scan(roll, z0, rolls[1:])


def simulate(num_rolls, seed=0):
    rng = np.random.default_rng(seed)
    states = np.zeros(num_rolls, int)
    for t in range(1, num_rolls):
        states[t] = rng.choice(2, p=TRUE_A[states[t - 1]])
    rolls = np.array([rng.choice(6, p=TRUE_B[s]) for s in states])
    return states, rolls


def main():
    jax.config.update("jax_enable_x64", True)
    states, rolls = simulate(1000 if QUICK else 5000)
    em = EM(casino)
    result = em.run(jax.random.PRNGKey(0), jnp.asarray(rolls), max_iter=300, tol=1e-9)
    params = {k: np.asarray(v) for k, v in result.params.items()}
    print(f"{int(result.num_iters)} iterations, log-likelihood {float(result.log_likelihood):.3f}")
    print(
        "switching probabilities (fair->loaded, loaded->fair):",
        params["A"][0, 1].round(3),
        params["A"][1, 0].round(3),
        "true:",
        TRUE_A[0, 1],
        TRUE_A[1, 0],
    )
    print("P(six) fair / loaded:", params["B"][:, 5].round(3), "true:", TRUE_B[:, 5])

    from hmmlearn import hmm

    ref = hmm.CategoricalHMM(2, init_params="", n_iter=int(result.num_iters), tol=0, n_features=6)
    ref.startprob_, ref.transmat_ = np.array([0.5, 0.5]), np.array([[0.9, 0.1], [0.1, 0.9]])
    ref.emissionprob_ = np.array(
        [[0.17, 0.17, 0.17, 0.17, 0.16, 0.16], [0.1, 0.1, 0.1, 0.1, 0.2, 0.4]]
    )
    ref.fit(rolls[:, None])
    np.testing.assert_allclose(float(result.log_likelihood), ref.score(rolls[:, None]), rtol=1e-8)
    np.testing.assert_allclose(params["B"], ref.emissionprob_, atol=1e-6)

    decoded = jaxem.map_assignment(casino, result.params, jnp.asarray(rolls))
    path = np.concatenate([np.asarray(decoded["z0"])[None], np.asarray(decoded["z"])])
    np.testing.assert_array_equal(path, ref.decode(rolls[:, None])[1])
    accuracy = np.mean(path == states)
    baseline = np.mean(states == 0)
    print(f"Viterbi path agrees with the true die on {accuracy:.1%} of the rolls")
    print(f"(always guessing 'fair' agrees on {baseline:.1%})")
    assert accuracy > baseline

    posterior = np.asarray(jaxem.posterior(casino, result.params, jnp.asarray(rolls))["z"])
    shown = slice(0, 400)
    fig = Figure(figsize=(9, 3.5), layout="tight")
    ax = fig.subplots()
    ax.fill_between(
        np.arange(len(states))[shown],
        states[shown],
        step="mid",
        alpha=0.3,
        color="tab:red",
        label="loaded die in play",
    )
    ax.plot(
        np.arange(1, len(states))[shown.start : shown.stop - 1],
        posterior[shown.start : shown.stop - 1, 1],
        color="k",
        lw=1,
        label="P(loaded | rolls)",
    )
    # Head room for the legend, which otherwise hides the curve under it.
    ax.set(
        xlabel="roll",
        ylabel="probability",
        ylim=(0, 1.25),
        yticks=np.linspace(0, 1, 6),
        title="The occasionally dishonest casino",
    )
    ax.legend(loc="upper right", ncol=2)
    fig.savefig("hmm_casino.png", dpi=120)
    print("saved hmm_casino.png")


if __name__ == "__main__":
    main()
