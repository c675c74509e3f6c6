"""A mixture of regressions on flexmix's NPreg data, an EM with weighted least-squares M-steps.

Data: NPreg from R's flexmix (Leisch 2004), 200 artificial points in two
groups of 100 with a known generating model

    group 1: yn = 5 x + e,               group 2: yn = 15 + 10 x - x^2 + e,   e ~ N(0, 3^2).

As in flexmix's own example ``flexmix(yn ~ x + I(x^2), k = 2)`` we fit a
quadratic regression per component, with a latent group ``z``:

    z ~ Categorical(w),   yn | x, z ~ Normal(beta0[z] + beta1[z] x + beta2[z] x^2, sigma[z]).

Theory point: the weights ``w`` and noise scales ``sigma`` reach their
distributions only by indexing with ``z``; the coefficients reach the Normal's
location through arithmetic with ``x``, but affinely, so the expected
complete-data log-likelihood is quadratic in them and jaxem solves it exactly by
weighted least squares (as flexmix does), then the scales given the new lines.
``em.m_step_paths`` shows which parameter took which path. About half of the
random starts end in a worse local optimum (log-likelihood -700.29) rather than
the maximum (-642.532): restarts matter. ``EM(..., m_step="gradient")`` takes
optax steps for every parameter instead (an ECM-style fit).

Run from the repository root::

    python examples/regression_mixture.py
"""

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from matplotlib import colormaps
from matplotlib.figure import Figure
from numpyro.distributions import constraints

import jaxem
from jaxem import EM

QUICK = os.environ.get("JAXEM_EXAMPLE_QUICK") == "1"
DATA = Path(__file__).resolve().parents[1] / "data" / "NPreg.csv"
TRUE_COEFFICIENTS = {1: (0.0, 5.0, 0.0), 2: (15.0, 10.0, -1.0)}
ROW_NAMES = ("weight", "beta0", "beta1", "beta2", "sigma")
# Maximum log-likelihood, from an EM with exact weighted-least-squares M-steps (as flexmix's).
MLE_LOG_LIK = -642.532


def regression_mixture(x, y, K=2):
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    # Random intercepts and slopes on the scale of y, so that restarts start from
    # different lines (with flat starting lines only, every restart of an exact EM
    # reaches the same local maximum, -700.29).
    beta0 = numpyro.param("beta0", lambda key: y.mean() + y.std() * jax.random.normal(key, (K,)))
    slope = y.std() / x.std()
    beta1 = numpyro.param("beta1", lambda key: slope * jax.random.normal(key, (K,)))
    beta2 = numpyro.param("beta2", jnp.zeros(K))
    sigma = numpyro.param("sigma", jnp.full(K, y.std()), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        loc = beta0[z] + beta1[z] * x + beta2[z] * x**2
        numpyro.sample("y", dist.Normal(loc, sigma[z]), obs=y)


def least_squares(x, y):
    """Quadratic least-squares coefficients (intercept, x, x^2) and residual scale (MLE)."""
    design = np.stack([np.ones_like(x), x, x**2], axis=-1)
    coefficients = np.linalg.lstsq(design, y, rcond=None)[0]
    return coefficients, np.std(y - design @ coefficients)


def print_row(label, values):
    print(label + " " + " ".join(f"{v:7.3f}" for v in values))


def main():
    data = np.genfromtxt(DATA, delimiter=",", names=True)
    x = jnp.asarray(data["x"], dtype=jnp.float32)
    y = jnp.asarray(data["yn"], dtype=jnp.float32)
    true_class = data["class"].astype(int)

    em = EM(regression_mixture)
    print("M-step paths:")
    for name, path in em.m_step_paths(x, y).items():
        print(f"  {name:<6} {path}")
    result = em.run(
        jax.random.PRNGKey(0), x, y, max_iter=500, tol=1e-7, num_restarts=4 if QUICK else 10
    )
    params = result.params
    print(
        f"log-likelihood {float(result.log_likelihood):.3f}, iterations {int(result.num_iters)},"
        f" converged {bool(result.converged)}"
    )
    print("restart log-likelihoods:", np.round(np.asarray(result.restart_log_likelihoods), 3))
    print(f"maximum log-likelihood (exact weighted-least-squares EM): {MLE_LOG_LIK}")
    # The best restart reaches the maximum of flexmix's weighted least-squares EM.
    assert abs(float(result.log_likelihood) - MLE_LOG_LIK) < 0.01, result.log_likelihood

    labels = np.asarray(jnp.argmax(jaxem.posterior(regression_mixture, params, x, y)["z"], -1))
    # Name each fitted component after the true group that most of its points come from.
    group_of = {k: np.bincount(true_class[labels == k], minlength=3).argmax() for k in range(2)}
    agreement = np.mean(np.array([group_of[k] for k in labels]) == true_class)

    print(f"\n{'group':>5} {'':>9} " + " ".join(f"{h:>7}" for h in ROW_NAMES))
    for k in sorted(range(2), key=group_of.get):
        group = group_of[k]
        members = true_class == group
        oracle, oracle_sigma = least_squares(data["x"][members], data["yn"][members])
        fitted = [float(params[name][k]) for name in ("w", "beta0", "beta1", "beta2", "sigma")]
        print_row(f"{group:>5} {'EM fit':>9}", fitted)
        print_row(f"{'':>5} {'true':>9}", [0.5, *TRUE_COEFFICIENTS[group], 3.0])
        print_row(f"{'':>5} {'OLS|class':>9}", [members.mean(), *oracle, oracle_sigma])
    print(f"points assigned to their true group: {agreement:.1%}")

    grid = np.linspace(float(x.min()), float(x.max()), 200)
    fig = Figure(figsize=(7, 4.5), layout="tight")
    ax = fig.subplots()
    colors = colormaps["tab10"].colors
    ax.scatter(x, y, c=[colors[k] for k in labels], s=12, alpha=0.7)
    for k in range(2):
        b0, b1, b2 = (float(params[name][k]) for name in ("beta0", "beta1", "beta2"))
        ax.plot(
            grid,
            b0 + b1 * grid + b2 * grid**2,
            color=colors[k],
            lw=2,
            label=f"component {k}: {b0:.1f} {b1:+.2f} x {b2:+.3f} x$^2$",
        )
    ax.set(xlabel="x", ylabel="yn", title="NPreg: mixture of two quadratic regressions")
    ax.legend()
    fig.savefig("regression_mixture.png", dpi=120)
    print("saved regression_mixture.png")


if __name__ == "__main__":
    main()
