"""A linear mixed model on lme4's sleepstudy, fitted by SAEM and MCEM.

Reaction times of 18 subjects over 10 days of sleep deprivation,
``Reaction ~ Days + (Days | Subject)``: each subject has its own intercept and
slope, drawn from a bivariate normal around the fixed effects. The subjects'
intercepts and slopes are continuous latents: SAEM and MCEM draw them with NUTS
inside the EM loop. The maximum-likelihood estimate (lme4 with REML=FALSE,
statsmodels' MixedLM(reml=False)) is fixed effects 251.4 and 10.47, random-effect
SDs 23.78 and 5.72, residual SD 25.59, log-likelihood -875.97.

Plot: the parameters per iteration of SAEM (exploration, then averaging).

Run from the repository root::

    python examples/sleepstudy_saem.py
"""

import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints

import jaxem

jax.config.update("jax_enable_x64", True)
QUICK = bool(os.environ.get("JAXEM_EXAMPLE_QUICK"))
DATA = Path(__file__).resolve().parents[1] / "data" / "sleepstudy.csv"


def sleepstudy(days, subject, y, num_subjects=18):
    beta = numpyro.param("beta", jnp.array([200.0, 5.0]))
    sd = numpyro.param("sd_re", jnp.array([10.0, 3.0]), constraint=constraints.positive)
    corr = numpyro.param("corr", jnp.eye(2), constraint=constraints.corr_cholesky)
    sigma = numpyro.param("sigma", 30.0, constraint=constraints.positive)
    with numpyro.plate("subject", num_subjects):
        phi = numpyro.sample("phi", dist.MultivariateNormal(beta, scale_tril=sd[:, None] * corr))
    with numpyro.plate("obs", y.shape[0]):
        numpyro.sample("y", dist.Normal(phi[subject, 0] + phi[subject, 1] * days, sigma), obs=y)


def main():
    data = np.genfromtxt(DATA, delimiter=",", names=True)
    subject = jnp.asarray(np.unique(data["Subject"], return_inverse=True)[1])
    args = (jnp.asarray(data["Days"]), subject, jnp.asarray(data["Reaction"]))
    fitters = {"SAEM": jaxem.SAEM(sleepstudy, schedule=(60, 40) if QUICK else (300, 100))}
    if not QUICK:
        fitters["MCEM"] = jaxem.MCEM(sleepstudy)
    results = {}
    print(f"{'':6}{'beta':>18}{'sd_re':>16}{'sigma':>8}{'loglik':>18}{'seconds':>9}")
    print(f"{'ML':6}{'251.41  10.47':>18}{'23.78  5.72':>16}{'25.59':>8}{'-875.97':>18}")
    for name, fitter in fitters.items():
        start = time.perf_counter()
        result = fitter.run(jax.random.PRNGKey(0), *args)
        seconds = time.perf_counter() - start
        results[name] = result
        p = {k: np.asarray(v) for k, v in result.params.items()}
        ll = f"{float(result.log_likelihood):.2f} +- {float(result.log_likelihood_se):.2f}"
        print(
            f"{name:6}{p['beta'][0]:>10.2f}{p['beta'][1]:>8.2f}{p['sd_re'][0]:>9.2f}"
            f"{p['sd_re'][1]:>7.2f}{float(p['sigma']):>8.2f}{ll:>18}{seconds:>9.1f}"
        )
        np.testing.assert_allclose(p["beta"], [251.405, 10.467], rtol=1e-2)

    import matplotlib.pyplot as plt

    history = results["SAEM"].param_history
    fig, axes = plt.subplots(1, 3, figsize=(11, 3))
    for ax, (name, column, truth) in zip(
        axes, [("beta", 1, 10.467), ("sd_re", 0, 23.78), ("sigma", None, 25.59)], strict=True
    ):
        values = np.asarray(history[name])
        values = values if column is None else values[:, column]
        ax.plot(values, label="SAEM iterate")
        ax.axhline(truth, color="k", ls=":", label="maximum likelihood (lme4)")
        ax.axvline(
            fitters["SAEM"].schedule[0], color="grey", lw=0.5, label="step sizes start to shrink"
        )
        ax.set_title(name if column is None else f"{name}[{column}]")
        ax.set_xlabel("SAEM iteration")
    axes[0].set_ylabel("parameter value")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig("sleepstudy_saem.png", dpi=100)
    print("saved sleepstudy_saem.png")


if __name__ == "__main__":
    main()
