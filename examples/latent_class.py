"""Latent class analysis of pathologists' carcinoma ratings.

Data: seven pathologists (A to G) each rated 118 slides of the uterine cervix
for carcinoma (1 = no, 2 = yes); Agresti (2002), shipped with R's poLCA. A
latent class model explains the agreement between raters by an unobserved class
``c`` of each slide (say "clearly negative", "ambiguous", "clearly positive"),
given which the seven ratings are independent:

    c ~ Categorical(w),   y_j | c ~ Bernoulli(p[c, j])  for j = 1..7.

EM updates both ``w`` and ``p`` in closed form (posterior-weighted proportions).

Theory points: the likelihood has several local optima, hence restarts; adding
classes always raises the log-likelihood, and BIC picks the number of classes;
and many fitted probabilities sit on the boundary (0 or 1), where EM still
behaves because its updates are proportions, not gradient steps. poLCA reports a
maximum log-likelihood of -293.705 for three classes.

Run from the repository root::

    python examples/latent_class.py
"""

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints

import jaxem
from jaxem import EM

QUICK = os.environ.get("JAXEM_EXAMPLE_QUICK") == "1"
DATA = Path(__file__).resolve().parents[1] / "data" / "carcinoma.csv"
POLCA_3_CLASS_LOG_LIK = -293.705


def latent_class(y, K=3):
    N, num_items = y.shape
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    p = numpyro.param(
        "p",
        lambda key: jax.random.uniform(key, (K, num_items), minval=0.1, maxval=0.9),
        constraint=constraints.unit_interval,
    )
    with numpyro.plate("slides", N):
        c = numpyro.sample("c", dist.Categorical(w))
        numpyro.sample("y", dist.Bernoulli(p[c]).to_event(1), obs=y)


def main():
    raters = DATA.read_text().splitlines()[0].split(",")
    # Ratings are coded 1 = no, 2 = yes; the Bernoulli wants 0/1.
    y = jnp.asarray(np.loadtxt(DATA, delimiter=",", skiprows=1) - 1, dtype=jnp.float32)
    num_restarts = 5 if QUICK else 20

    fits = {}
    print(f"Carcinoma ratings: {y.shape[0]} slides x {y.shape[1]} pathologists")
    print(f"{'K':>2} {'log-lik':>9} {'BIC':>8} {'iters':>5} converged  restarts' log-lik range")
    for K in range(1, 5):
        fit = EM(latent_class).run(
            jax.random.PRNGKey(K), y, K=K, max_iter=1000, tol=1e-8, num_restarts=num_restarts
        )
        bic = float(jaxem.bic(latent_class, fit.params, y, K=K))
        restarts = np.asarray(fit.restart_log_likelihoods)
        print(
            f"{K:>2} {float(fit.log_likelihood):9.3f} {bic:8.2f} {int(fit.num_iters):5d}"
            f" {str(bool(fit.converged)):>9}  [{restarts.min():.3f}, {restarts.max():.3f}]"
        )
        fits[K] = (fit, bic)
    best_k = min(fits, key=lambda K: fits[K][1])
    fit = fits[best_k][0]
    print(f"lowest BIC: K={best_k}")

    log_lik_3 = float(fits[3][0].log_likelihood)
    print(f"3-class log-likelihood {log_lik_3:.3f} (poLCA: {POLCA_3_CLASS_LOG_LIK})")
    assert abs(log_lik_3 - POLCA_3_CLASS_LOG_LIK) < 0.01, log_lik_3

    # Classes are only defined up to relabeling: list them from least to most "yes".
    p = np.asarray(fit.params["p"])
    w = np.asarray(fit.params["w"])
    order = np.argsort(p.mean(axis=1))
    print(f"\nP(rating = yes | class), K={best_k}")
    print(f"{'class':>5} {'weight':>6} " + " ".join(f"{r:>5}" for r in raters))
    for rank, k in enumerate(order):
        print(f"{rank + 1:>5} {w[k]:6.3f} " + " ".join(f"{v:5.3f}" for v in p[k]))


if __name__ == "__main__":
    main()
