"""Mixed models: jaxem SAEM / MCEM against statsmodels-free references and NUTS.

A simulated logistic GLMM (``--groups`` groups of ``--per-group`` binary responses,
a random intercept per group, one covariate): jaxem's SAEM and MCEM against what a
NumPyro user does today, NUTS on the full model (flat priors on the fixed effects,
a half-normal on the SD) followed by the posterior mean. The reference is the exact
MLE by adaptive Gauss-Hermite quadrature (20 nodes per group, vectorized in JAX,
optimized by L-BFGS). Each method's seconds are split into the first call
(compilation included), the XLA compile time within it (jax.monitoring's
backend-compile events, CPU-bound), and a second call with another seed (run
time only), wall and process CPU seconds; the machine's load average is printed
with each row, since on a shared 2-core machine wall seconds scale with it.
SAEM runs with its default number of chains (one for 1 000 groups: with many
groups one chain already averages over them), with 4 chains, and with every
default (the schedule 300 + 100 too); ``--gradient`` adds SAEM and
MCEM with ``m_step="gradient"`` (no closed form for any param), to show what the
closed form saves.

Run from the repository root::

    python benchmarks/mixed_models.py --quick           # 100 groups
    python benchmarks/mixed_models.py                   # 1000 groups x 20
    python benchmarks/mixed_models.py --only "SAEM"     # one method alone
"""

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
from scipy import optimize  # noqa: E402

import jaxem  # noqa: E402

# The GLMM jaxem fits: the model the tests fit too (tests/models.py), written once.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from models import logistic_glmm as glmm  # noqa: E402

jax.config.update("jax_enable_x64", True)


def simulate(groups, per_group, seed=0):
    rng = np.random.default_rng(seed)
    group = np.repeat(np.arange(groups), per_group)
    x = rng.normal(size=groups * per_group)
    u = rng.normal(-0.5, 1.0, size=groups)
    y = rng.random(x.shape) < 1 / (1 + np.exp(-(u[group] + 0.8 * x)))
    return jnp.asarray(group), jnp.asarray(x), jnp.asarray(y.astype(float))


def full_model(group, x, y, num_groups):
    intercept = numpyro.sample("intercept", dist.Normal(0.0, 10.0))
    slope = numpyro.sample("slope", dist.Normal(0.0, 10.0))
    sd = numpyro.sample("sd", dist.HalfNormal(5.0))
    with numpyro.plate("groups", num_groups):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
    with numpyro.plate("obs", y.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=intercept + sd * z[group] + slope * x), obs=y)


def quadrature_mle(group, x, y, num_groups, nodes=20):
    """The exact MLE: adaptive Gauss-Hermite quadrature per group."""
    gh_x, gh_w = np.polynomial.hermite.hermgauss(nodes)
    gh_x, gh_w = jnp.asarray(gh_x), jnp.asarray(gh_w)

    def log_lik(theta):
        intercept, slope, log_sd = theta
        sd = jnp.exp(log_sd)
        eta0 = slope * x

        def group_terms(u):  # u: (G,) -> sum of log p(y_g | u_g) per group
            logits = u[group] + eta0
            lp = y * logits - jnp.logaddexp(0.0, logits)
            return jax.ops.segment_sum(lp, group, num_groups)

        def joint(u):
            return group_terms(u) + jax.scipy.stats.norm.logpdf(u, intercept, sd)

        mode = jnp.full(num_groups, intercept)
        for _ in range(25):  # Newton per group (the Hessian is diagonal)
            g = jax.grad(lambda u: jnp.sum(joint(u)))(mode)
            h = jax.grad(lambda u: jnp.sum(jax.grad(lambda v: jnp.sum(joint(v)))(u)))(mode)
            mode = jax.lax.stop_gradient(mode - g / h)
        h = jax.grad(lambda u: jnp.sum(jax.grad(lambda v: jnp.sum(joint(v)))(u)))(mode)
        scale = 1.0 / jnp.sqrt(-h)
        points = mode[None, :] + jnp.sqrt(2.0) * scale[None, :] * gh_x[:, None]
        values = jax.vmap(joint)(points) + gh_x[:, None] ** 2
        per_group = jax.scipy.special.logsumexp(values, b=gh_w[:, None], axis=0)
        return jnp.sum(per_group + jnp.log(jnp.sqrt(2.0) * scale))

    value_and_grad = jax.jit(jax.value_and_grad(lambda t: -log_lik(t)))
    fit = optimize.minimize(
        lambda t: [np.asarray(v) for v in value_and_grad(jnp.asarray(t))],
        np.array([0.0, 0.0, 0.0]),
        jac=True,
        method="L-BFGS-B",
    )
    return {"intercept": fit.x[0], "slope": fit.x[1], "sd": np.exp(fit.x[2])}, -fit.fun


COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def timed(fn):
    """``(result, wall seconds, seconds of XLA compilation within, process CPU seconds)``
    (CPU seconds count every thread of this process and do not grow with the load that
    other processes put on the machine, wall seconds do)."""
    compiled = []

    def listen(event, duration, **kwargs):
        if event == COMPILE_EVENT:
            compiled.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listen)
    start, cpu = time.perf_counter(), time.process_time()
    try:
        out = jax.block_until_ready(fn())
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    return out, time.perf_counter() - start, sum(compiled), time.process_time() - cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=1000)
    parser.add_argument("--per-group", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="100 groups")
    parser.add_argument("--gradient", action="store_true", help='also m_step="gradient"')
    parser.add_argument(
        "--only", default=None, help='only this method, e.g. --only "SAEM", --only "NUTS mean"'
    )
    options = parser.parse_args()
    groups = 100 if options.quick else options.groups
    data = simulate(groups, options.per_group)
    reference, best = quadrature_mle(*data, groups)
    print(
        f"{groups} groups x {options.per_group}; exact MLE (AGHQ):",
        {k: round(float(v), 4) for k, v in reference.items()},
        f"loglik {best:.3f}",
    )
    rows = []
    print("M-step paths:", jaxem.SAEM(glmm).m_step_paths(*data, groups))
    fitters = [
        ("SAEM", jaxem.SAEM(glmm, schedule=(100, 50))),
        ("SAEM 4ch", jaxem.SAEM(glmm, schedule=(100, 50), num_chains=4)),
        ("SAEM dflt", jaxem.SAEM(glmm)),
        ("MCEM", jaxem.MCEM(glmm, max_draws=50)),
    ]
    if options.gradient:
        fitters += [
            ("SAEM grad", jaxem.SAEM(glmm, schedule=(100, 50), m_step="gradient")),
            ("MCEM grad", jaxem.MCEM(glmm, max_draws=50, m_step="gradient")),
        ]
    if options.only is not None:
        names = [name for name, _ in fitters] + ["NUTS mean"]
        if options.only not in names:
            parser.error(f"--only: no method named {options.only!r}; one of {names}")
        fitters = [(name, fitter) for name, fitter in fitters if name == options.only]
    for name, fitter in fitters:
        first, t_first, t_compile, c_first = timed(
            lambda f=fitter: f.run(jax.random.PRNGKey(0), *data, groups)
        )
        second, t_second, _, c_second = timed(
            lambda f=fitter: f.run(jax.random.PRNGKey(1), *data, groups)
        )
        rows.append(
            (
                name,
                second.params,
                t_first,
                t_compile,
                t_second,
                c_first,
                c_second,
                f"{float(second.log_likelihood):.3f} +- {float(second.log_likelihood_se):.3f}"
                f" ({int(second.num_iters)} iterations)",
                os.getloadavg()[0],
            )
        )
        print(rows[-1][0], f"{t_first:.1f} s first call, load {rows[-1][-1]:.1f}", flush=True)

    from numpyro.infer import MCMC, NUTS

    def nuts(seed):
        mcmc = MCMC(NUTS(full_model), num_warmup=500, num_samples=500, progress_bar=False)
        mcmc.run(jax.random.PRNGKey(seed), *data, groups)
        return {k: jnp.mean(v) for k, v in mcmc.get_samples().items() if k != "z"}

    if options.only in (None, "NUTS mean"):
        _, t_first, t_compile, c_first = timed(lambda: nuts(0))
        posterior, t_second, _, c_second = timed(lambda: nuts(1))
        load = os.getloadavg()[0]
        rows.append(
            ("NUTS mean", posterior, t_first, t_compile, t_second, c_first, c_second, "", load)
        )
    print(
        f"{'method':10}{'intercept':>10}{'slope':>8}{'sd':>8}{'first s':>9}{'compile s':>10}"
        f"{'run s':>8}{'cpu 1st':>8}{'cpu 2nd':>8}{'load':>6}  loglik"
    )
    for name, params, t_first, t_compile, t_second, c_first, c_second, ll, load in rows:
        print(
            f"{name:10}{float(params['intercept']):>10.4f}{float(params['slope']):>8.4f}"
            f"{float(params['sd']):>8.4f}{t_first:>9.1f}{t_compile:>10.1f}{t_second:>8.1f}"
            f"{c_first:>8.1f}{c_second:>8.1f}{load:>6.1f}  {ll}"
        )


if __name__ == "__main__":
    main()
