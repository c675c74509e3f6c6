"""A Poisson mixture on the London Times death notices, with BIC over K.

Data: the number of deaths of women aged 80 or over reported per day in The
Times of London over 1910-1912 (1096 days), the classic test case of Hasselblad
(1969) for mixtures of exponential-family distributions. The counts are
overdispersed for a single Poisson (variance > mean), which a mixture of
Poissons explains by days of a low and of a high death rate:

    z ~ Categorical(w),   deaths | z ~ Poisson(rate[z]).

Both ``w`` and ``rate`` have closed-form M-steps (weighted proportions and
weighted means).

Theory points: BIC chooses the number of components (two here); and EM
converges linearly, at a rate set by the fraction of missing information. The
two components overlap so much that EM needs hundreds of iterations, and when
the log-likelihood has settled to ten digits the rates are still off in the
third decimal: the likelihood is nearly flat along a ridge. The maximum (by
direct numerical maximization) is w = (0.3599, 0.6401), rate = (1.2561, 2.6634),
log-likelihood -1989.946. The script runs in float64 so that the stopping rule
is not limited by float32 rounding of the log-likelihood.

Acceleration: from one start, plain EM, SQUAREM and Anderson acceleration
(``EM(..., acceleration=...)``, see docs/scaling.md) reach the same maximum;
plain EM needs about 2000 EM steps, SQUAREM about 200, Anderson under 20 (its
memory of five differences covers the model's three free parameters).

Reference: V. Hasselblad, "Estimation of finite mixtures of distributions from
the exponential family", JASA 64, 1459-1471 (1969).

Run from the repository root::

    python examples/poisson_mixture.py
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from matplotlib.figure import Figure
from numpyro.distributions import constraints

import jaxem
from jaxem import EM

QUICK = os.environ.get("JAXEM_EXAMPLE_QUICK") == "1"
# Number of days (out of 1096) with 0, 1, ..., 9 death notices.
DAYS_WITH_COUNT = np.array([162, 267, 271, 185, 111, 61, 27, 8, 3, 1])
# The two-component maximum-likelihood estimate, by direct numerical maximization.
MLE_WEIGHTS, MLE_RATES, MLE_LOG_LIK = (0.3599, 0.6401), (1.2561, 2.6634), -1989.946


def poisson_mixture(deaths, K=2):
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    # Spread the initial rates around the sample mean so the components start apart.
    rate = numpyro.param(
        "rate",
        lambda key: deaths.mean() * jax.random.uniform(key, (K,), minval=0.3, maxval=1.7),
        constraint=constraints.positive,
    )
    with numpyro.plate("days", deaths.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("deaths", dist.Poisson(rate[z]), obs=deaths)


def main():
    # Before any array is created: float64 from here on.
    jax.config.update("jax_enable_x64", True)
    values = np.arange(len(DAYS_WITH_COUNT))
    deaths = jnp.asarray(np.repeat(values, DAYS_WITH_COUNT), dtype=jnp.float64)
    print(f"{len(deaths)} days, mean {deaths.mean():.4f}, variance {deaths.var():.4f}")

    fits = {}
    print(f"{'K':>2} {'log-lik':>10} {'BIC':>9} {'iters':>5} converged  rates")
    for K in range(1, 5):
        fit = EM(poisson_mixture).run(
            jax.random.PRNGKey(K),
            deaths,
            K=K,
            max_iter=5000,
            tol=1e-10,
            num_restarts=3 if QUICK else 10,
        )
        bic = float(jaxem.bic(poisson_mixture, fit.params, deaths, K=K))
        fits[K] = (fit, bic)
        rates = ", ".join(f"{r:.4f}" for r in np.sort(np.asarray(fit.params["rate"])))
        print(
            f"{K:>2} {float(fit.log_likelihood):10.3f} {bic:9.2f} {int(fit.num_iters):5d}"
            f" {str(bool(fit.converged)):>9}  {rates}"
        )
    best_k = min(fits, key=lambda K: fits[K][1])
    fit = fits[best_k][0]
    print(f"lowest BIC: K={best_k}")
    order = np.argsort(np.asarray(fit.params["rate"]))
    print(
        f"K={best_k} fit   w = {np.asarray(fit.params['w'])[order].round(4)},"
        f" rate = {np.asarray(fit.params['rate'])[order].round(4)}"
    )
    print(f"maximum     w = {MLE_WEIGHTS}, rate = {MLE_RATES}")
    two = fits[2][0]
    print(f"K=2 log-likelihood {float(two.log_likelihood):.3f} (MLE: {MLE_LOG_LIK})")
    assert abs(float(two.log_likelihood) - MLE_LOG_LIK) < 1e-3

    # The slow convergence, and what extrapolating the EM map does about it: the same
    # start for the three methods, run until the relative change is below 1e-14.
    start = {"w": jnp.array([0.3, 0.7]), "rate": jnp.array([1.0, 2.5])}
    print("\nK=2 from w = (0.3, 0.7), rate = (1.0, 2.5), tol = 1e-14:")
    print(f"{'method':>8} {'iters':>5} {'EM steps':>8} {'log-lik':>14} {'max |rate - max|':>16}")
    steps, log_liks, histories = {}, [], {}
    for acceleration, steps_per_iter in ((None, 1), ("squarem", 3), ("anderson", 1)):
        fit = EM(poisson_mixture, acceleration=acceleration).run(
            jax.random.PRNGKey(0), deaths, K=2, max_iter=20000, tol=1e-14, init_params=start
        )
        name = acceleration or "EM"
        steps[name] = int(fit.num_iters) * steps_per_iter
        error = np.max(np.abs(np.sort(np.asarray(fit.params["rate"])) - MLE_RATES))
        print(
            f"{name:>8} {int(fit.num_iters):5d} {steps[name]:8d}"
            f" {float(fit.log_likelihood):14.8f} {error:16.1e}"
        )
        assert bool(fit.converged)
        assert error < 1e-4  # the maximum is given to four decimals
        log_liks.append(float(fit.log_likelihood))
        histories[name] = (np.asarray(fit.history)[: int(fit.num_iters)], steps_per_iter)
    assert max(log_liks) - min(log_liks) < 1e-8  # the same maximum
    assert steps["squarem"] < steps["EM"] / 5 and steps["anderson"] < steps["EM"] / 5

    # Expected number of days with each count under the one- and best-component fits.
    fig = Figure(figsize=(12, 4), layout="tight")
    ax, ax_conv = fig.subplots(1, 2)
    ax.bar(values, DAYS_WITH_COUNT, color="lightgray", label="observed")
    for K, marker in ((1, "o"), (best_k, "s")):
        params = fits[K][0].params
        component_pmf = jnp.exp(dist.Poisson(params["rate"][:, None]).log_prob(values))
        pmf = np.asarray(params["w"] @ component_pmf)
        ax.plot(values, len(deaths) * pmf, marker=marker, label=f"K={K} fit")
    ax.set(
        xlabel="death notices per day",
        ylabel="number of days",
        title="London Times deaths of women 80+, 1910-1912",
    )
    ax.legend()
    # Convergence from the common start: the gap to the maximum against EM steps done
    # (a SQUAREM cycle is three), on log scales since the counts differ a hundredfold.
    best = max(log_liks)
    for name, (history, steps_per_iter) in histories.items():
        # history[i] is the log-likelihood after i iterations (at the i-th cycle's start).
        done = np.arange(len(history)) * steps_per_iter
        gap = best - history
        shown = (gap > 0) & (done > 0)
        ax_conv.loglog(done[shown], gap[shown], label=f"{name}: {steps[name]} EM steps")
    ax_conv.set(
        xlabel="EM steps done",
        ylabel="maximum log-likelihood minus the iteration's",
        title="K=2 from one start, tol = 1e-14",
    )
    # Outside the axes: inside, it hid where the Anderson curve drops.
    ax_conv.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.savefig("poisson_mixture.png", dpi=120)
    print("saved poisson_mixture.png")


if __name__ == "__main__":
    main()
