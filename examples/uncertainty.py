"""Standard errors and intervals of EM estimates: observed information and bootstrap.

Part 1 is Dempster, Laird and Rubin's (1977) genetic linkage example: 197 animals
in four categories with probabilities (1/2 + theta/4, (1 - theta)/4,
(1 - theta)/4, theta/4); the first category is two cells (1/2 and theta/4), and
which cell an animal is in is the latent. The four counts are case weights (a
``numpyro.handlers.scale`` on the plate of categories). The observed information
gives theta's standard error, and the fraction of missing information is EM's
rate of convergence, which the iterates show.

Part 2 fits a two-component Gaussian mixture and compares 95% intervals from the
observed information (estimate +- 1.96 standard errors) with bootstrap percentile
intervals (nonparametric, 200 replicates fitted at once under ``vmap``), plotted in
``uncertainty.png``.

Run from the repository root::

    python examples/uncertainty.py
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from matplotlib.figure import Figure
from numpyro.distributions import constraints

import jaxem

jax.config.update("jax_enable_x64", True)

CELL_TO_CATEGORY = np.array(
    [[1, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], np.float64
)


def linkage(y, counts):
    theta = numpyro.param("theta", jnp.array(0.5), constraint=constraints.unit_interval)
    probs = jnp.stack([0.5, theta / 4, (1 - theta) / 4, (1 - theta) / 4, theta / 4])
    with numpyro.plate("category", y.shape[0]), numpyro.handlers.scale(scale=counts):
        cell = numpyro.sample("cell", dist.Categorical(probs))
        numpyro.sample("y", dist.Categorical(probs=jnp.asarray(CELL_TO_CATEGORY)[cell]), obs=y)


def mixture(x, K=2):
    w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
    mu = numpyro.param("mu", jnp.linspace(-1.0, 1.0, K))
    sigma = numpyro.param("sigma", jnp.ones(K), constraint=constraints.positive)
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", dist.Categorical(w))
        numpyro.sample("x", dist.Normal(mu[z], sigma[z]), obs=x)


def genetic_linkage():
    y, counts = jnp.arange(4), jnp.array([125.0, 18.0, 20.0, 34.0])
    em = jaxem.EM(linkage)
    fit = em.run(jax.random.PRNGKey(0), y, counts, max_iter=100, tol=1e-14)
    se = em.standard_errors(fit, y, counts)
    theta = float(fit.params["theta"])
    print(f"theta = {theta:.10f}, standard error {float(se.standard_errors['theta']):.5f}")
    print(f"observed information {1 / float(se.covariance[0, 0]):.3f}")
    print(f"fraction of missing information {float(se.missing_fraction):.4f}")
    state = em.init(jax.random.PRNGKey(0), y, counts, init_params={"theta": jnp.array(0.5)})
    previous = 0.5 - theta
    for i in range(5):
        state, _ = em.update(state, y, counts)
        error = float(state.params["theta"]) - theta
        print(f"  iteration {i + 1}: error {error:+.2e}, ratio to the last {error / previous:.4f}")
        previous = error


def mixture_intervals():
    rng = np.random.default_rng(0)
    x = jnp.asarray(np.concatenate([rng.normal(-2.0, 1.0, 120), rng.normal(2.5, 0.7, 180)]))
    em = jaxem.EM(mixture)
    fit = em.run(jax.random.PRNGKey(0), x, max_iter=300, tol=1e-10)
    se = em.standard_errors(fit, x)
    boot = jaxem.bootstrap(em, fit, jax.random.PRNGKey(1), x, num_replicates=200)
    rows = []
    print(f"\n{'param':<10}{'estimate':>10}{'obs. SE':>10}{'boot SE':>10}   bootstrap 95%")
    for name in ("w", "mu", "sigma"):
        for k in range(2):
            estimate = float(fit.params[name][k])
            lower, upper = (float(b[k]) for b in boot.intervals[name])
            wald = float(se.standard_errors[name][k])
            rows.append((f"{name}[{k}]", estimate, wald, lower, upper))
            print(
                f"{name + f'[{k}]':<10}{estimate:>10.4f}{wald:>10.4f}"
                f"{float(boot.standard_errors[name][k]):>10.4f}   [{lower:.4f}, {upper:.4f}]"
            )
    return rows


def plot(rows, path="uncertainty.png"):
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    # Each interval is drawn around its estimate (interval minus estimate): on the
    # estimates' own scale (-2 to 2.5) intervals of +-0.05 to 0.2 were too short to compare.
    for i, (_, estimate, wald, lower, upper) in enumerate(rows):
        ax.errorbar(i - 0.1, 0.0, yerr=1.96 * wald, fmt="o", color="C0", capsize=3)
        ax.errorbar(
            i + 0.1,
            0.0,
            yerr=[[estimate - lower], [upper - estimate]],
            fmt="s",
            color="C1",
            capsize=3,
        )
    ax.axhline(0.0, color="0.8", lw=0.8, zorder=0)
    ax.set_xticks(range(len(rows)), [r[0] for r in rows])
    ax.errorbar([], [], fmt="o", color="C0", label="observed information, +-1.96 SE")
    ax.errorbar([], [], fmt="s", color="C1", label="bootstrap percentile")
    # Under the axes: inside, it hid the ends of mu[0]'s intervals.
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
    ax.set_title("95% intervals of a Gaussian mixture's estimates")
    ax.set_ylabel("interval minus the estimate")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"\nsaved {path}")


if __name__ == "__main__":
    genetic_linkage()
    plot(mixture_intervals())
