"""The two-coin experiment of Do & Batzoglou (2008), soft and hard EM.

Two coins A and B have unknown biases ``theta_A`` and ``theta_B``. Five times,
one of the coins is picked with probability 1/2 and tossed ten times; we see
the number of heads (5, 9, 8, 4, 7) but not which coin was used. The coin is a
discrete latent, and each set of tosses is

    coin ~ Categorical(0.5, 0.5),   heads | coin ~ Binomial(10, theta[coin]).

The mixing weights are a constant (not a ``numpyro.param``), as in the paper,
so EM only updates ``theta``.

Theory point: soft EM weighs every set by the posterior probability of each
coin, and from theta = (0.6, 0.5) reaches theta_A = 0.71, theta_B = 0.58 after
one iteration and 0.80, 0.52 after ten, the paper's Figure 1b. Hard EM
(classification EM) assigns each set to its most likely coin instead; here it
lands after one step on the estimates one would get if the coins were observed
(0.80, 0.45, Figure 1a) and stays there: a fixed point of hard EM, but not the
maximum-likelihood estimate, which has a higher marginal log-likelihood.

Reference: C. B. Do and S. Batzoglou, "What is the expectation maximization
algorithm?", Nature Biotechnology 26, 897-899 (2008).

Run from the repository root::

    python examples/two_coins.py
"""

from itertools import pairwise

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints

import jaxem
from jaxem import EM

HEADS = jnp.array([5.0, 9.0, 8.0, 4.0, 7.0])
NUM_TOSSES = 10
NUM_ITERS = 10


def two_coins(heads):
    theta = numpyro.param("theta", jnp.array([0.6, 0.5]), constraint=constraints.unit_interval)
    with numpyro.plate("sets", heads.shape[0]):
        coin = numpyro.sample("coin", dist.Categorical(jnp.array([0.5, 0.5])))
        numpyro.sample("heads", dist.Binomial(NUM_TOSSES, probs=theta[coin]), obs=heads)


def table_row(params):
    """(theta_A, theta_B, marginal log-likelihood) at params."""
    theta_a, theta_b = (float(t) for t in params["theta"])
    return theta_a, theta_b, float(jaxem.log_likelihood(two_coins, params, HEADS))


def trace_em(em):
    """Runs NUM_ITERS EM updates one by one, returning a table row per iteration."""
    state = em.init(jax.random.PRNGKey(0), HEADS)
    rows = [table_row(em.get_params(state))]
    for _ in range(NUM_ITERS):
        # update also returns a log-likelihood, but under hard EM it is the
        # classification objective; the table shows the marginal one for both.
        state, _ = em.update(state, HEADS)
        rows.append(table_row(em.get_params(state)))
    return rows


def print_table(title, rows):
    print(title)
    print(f"{'iter':>4} {'theta_A':>8} {'theta_B':>8} {'log-lik':>9}")
    for iteration, (theta_a, theta_b, log_lik) in enumerate(rows):
        print(f"{iteration:>4} {theta_a:8.4f} {theta_b:8.4f} {log_lik:9.4f}")
    print()


def main():
    soft = trace_em(EM(two_coins))
    hard = trace_em(EM(two_coins, hard=True))
    print_table("Soft EM (Do & Batzoglou 2008, Figure 1b)", soft)
    print_table("Hard EM (classification EM)", hard)

    soft_log_liks = [row[2] for row in soft]
    # EM's defining property: the marginal log-likelihood never decreases.
    assert all(b >= a - 1e-5 for a, b in pairwise(soft_log_liks)), soft_log_liks
    assert abs(soft[1][0] - 0.71) < 0.005 and abs(soft[1][1] - 0.58) < 0.005, soft[1]
    theta_a, theta_b, soft_log_lik = soft[-1]
    assert abs(theta_a - 0.80) < 0.005 and abs(theta_b - 0.52) < 0.005, (theta_a, theta_b)
    hard_a, hard_b, hard_log_lik = hard[-1]
    assert abs(hard_a - 0.80) < 1e-4 and abs(hard_b - 0.45) < 1e-4, (hard_a, hard_b)
    assert soft_log_lik > hard_log_lik
    print(
        f"soft EM after {NUM_ITERS} iterations: theta_A={theta_a:.2f}, theta_B={theta_b:.2f}"
        " (paper: 0.80, 0.52)"
    )
    print(
        f"hard EM: theta_A={hard_a:.2f}, theta_B={hard_b:.2f} (complete-data MLE: 0.80, 0.45),"
        f" log-lik {hard_log_lik:.4f} < soft EM {soft_log_lik:.4f}"
    )


if __name__ == "__main__":
    main()
