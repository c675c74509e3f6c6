"""Mixed models: jaxem SAEM / MCEM against statsmodels MixedLM, NUTS and SVI.

Issue 17's benchmark. Three datasets, each with its exact maximum-likelihood estimate
as the reference:

- ``sleepstudy`` (``data/sleepstudy.csv``), the linear mixed model
  ``Reaction ~ Days + (Days | Subject)``: statsmodels ``MixedLM(reml=False)`` (the
  exact Gaussian marginal likelihood of tests/test_mcem.py when statsmodels is
  missing);
- ``cbpp`` (``data/cbpp.csv``), a binomial GLMM with a herd random
  intercept, and ``glmm``, a simulated logistic GLMM (``--groups`` groups of
  ``--per-group`` binary responses, one covariate): adaptive Gauss-Hermite
  quadrature per group (20 nodes, vectorized in JAX, optimized by L-BFGS).

Rows: jaxem ``SAEM`` and ``MCEM`` (the settings of tests/test_mcem.py on sleepstudy
and cbpp); what a NumPyro user does today: ``NUTS`` on the full model (weak priors on
the parameters, 500 warm-up and 500 draws) and its posterior mean, and ``SVI``
(the jaxem model itself: its ``numpyro.param`` sites fitted by the ELBO, the random
effects given an ``AutoNormal`` guide, Adam); and ``MixedLM`` on sleepstudy.
"NUTS then optimize" adds nothing one can run: the joint density of the
parameters and random effects has no maximum at the MLE (it grows without bound as
a random-effect SD goes to 0), and maximizing the marginal likelihood over the
posterior draws of the random effects is Monte Carlo EM, the MCEM row. So the
posterior mean is the NumPyro user's estimate; under weak priors it differs from
the MLE by the posterior's skewness, which shrinks with the number of groups.

Per row: the first call (compilation included), the XLA compile seconds within it
(jax.monitoring's backend-compile events), a second call with another seed (run
time only), wall and process CPU seconds (CPU seconds count every thread of this
process and do not grow with the load that other processes put on the machine),
the largest relative error of the estimates of either call against the MLE, and
whether both calls are within issue 17's tolerances: fixed effects within 0.5 %,
standard deviations within 3 % (sleepstudy and the simulated GLMM); fixed effects
within 0.1 absolute and the SD within 15 % (cbpp, tests/test_mcem.py's Monte Carlo
tolerance with 15 herds); jaxem's log-likelihood within 3 of its standard errors of
the maximum. The load average is printed with each row.

Run from the repository root::

    python benchmarks/mixed_models.py --quick               # GLMM of 100 groups, one call
    python benchmarks/mixed_models.py                       # all three, GLMM 1000 x 20
    python benchmarks/mixed_models.py --datasets glmm --only SAEM,NUTS
    python benchmarks/mixed_models.py --datasets glmm --variants   # + SAEM 4ch, SAEM dflt
"""

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
from conftest import data_path  # noqa: E402

# The models jaxem fits are the tests' (tests/models.py, tests/test_mcem.py), written once.
from models import logistic_glmm as glmm  # noqa: E402
from models import sleepstudy_model  # noqa: E402
from scipy import optimize  # noqa: E402
from test_mcem import _lmm_mle, cbpp_model  # noqa: E402

import jaxem  # noqa: E402

jax.config.update("jax_enable_x64", True)


def simulate(groups, per_group, seed=0):
    rng = np.random.default_rng(seed)
    group = np.repeat(np.arange(groups), per_group)
    x = rng.normal(size=groups * per_group)
    u = rng.normal(-0.5, 1.0, size=groups)
    y = rng.random(x.shape) < 1 / (1 + np.exp(-(u[group] + 0.8 * x)))
    return jnp.asarray(group), jnp.asarray(x), jnp.asarray(y.astype(float))


def load_csv(name):
    table = np.genfromtxt(data_path(name), delimiter=",", names=True)
    return {n: np.asarray(table[n], float) for n in table.dtype.names}


# -- the full models a NumPyro user samples with NUTS (weak priors, non-centred) ----------


def glmm_full(group, x, y, num_groups):
    intercept = numpyro.sample("intercept", dist.Normal(0.0, 10.0))
    slope = numpyro.sample("slope", dist.Normal(0.0, 10.0))
    sd = numpyro.sample("sd", dist.HalfNormal(5.0))
    with numpyro.plate("groups", num_groups):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
    with numpyro.plate("obs", y.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=intercept + sd * z[group] + slope * x), obs=y)


def cbpp_full(herd, period, size, incidence, num_herds=15):
    intercept = numpyro.sample("intercept", dist.Normal(0.0, 10.0))
    effects = numpyro.sample("period_effects", dist.Normal(0.0, 10.0).expand([3]).to_event(1))
    sd = numpyro.sample("sd_herd", dist.HalfNormal(5.0))
    with numpyro.plate("herds", num_herds):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
    logits = intercept + sd * z[herd] + jnp.concatenate([jnp.zeros(1), effects])[period]
    with numpyro.plate("obs", size.shape[0]):
        numpyro.sample("incidence", dist.Binomial(size, logits=logits), obs=incidence)


def sleepstudy_full(days, subject, y, num_subjects=18):
    beta = numpyro.sample("beta", dist.Normal(0.0, 1000.0).expand([2]).to_event(1))
    sd = numpyro.sample("sd_re", dist.HalfNormal(100.0).expand([2]).to_event(1))
    corr = numpyro.sample("corr", dist.LKJCholesky(2, 1.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(100.0))
    with numpyro.plate("subject", num_subjects):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    phi = beta + z @ (sd[:, None] * corr).T
    with numpyro.plate("obs", y.shape[0]):
        numpyro.sample("y", dist.Normal(phi[subject, 0] + phi[subject, 1] * days, sigma), obs=y)


# -- references ------------------------------------------------------------------------


def random_intercept_mle(obs_log_lik, group, num_groups, theta0, nodes=20):
    """The exact MLE of a model with a Normal(0, sd) random intercept per group, by
    adaptive Gauss-Hermite quadrature per group. ``obs_log_lik(theta, u_obs)``: each
    observation's log-likelihood given its group's intercept; ``theta[-1]`` is log sd.
    Returns ``(theta, maximum log-likelihood)``."""
    gh_x, gh_w = (jnp.asarray(a) for a in np.polynomial.hermite.hermgauss(nodes))

    def log_lik(theta):
        sd = jnp.exp(theta[-1])

        def joint(u):  # (G,) -> log p(y_g, u_g) per group
            terms = jax.ops.segment_sum(obs_log_lik(theta, u[group]), group, num_groups)
            return terms + jax.scipy.stats.norm.logpdf(u, 0.0, sd)

        def second(u):
            return jax.grad(lambda v: jnp.sum(jax.grad(lambda w: jnp.sum(joint(w)))(v)))(u)

        mode = jnp.zeros(num_groups)
        for _ in range(25):  # Newton per group (the Hessian is diagonal)
            g = jax.grad(lambda u: jnp.sum(joint(u)))(mode)
            mode = jax.lax.stop_gradient(mode - g / second(mode))
        scale = 1.0 / jnp.sqrt(-second(mode))
        points = mode[None, :] + jnp.sqrt(2.0) * scale[None, :] * gh_x[:, None]
        values = jax.vmap(joint)(points) + gh_x[:, None] ** 2
        per_group = jax.scipy.special.logsumexp(values, b=gh_w[:, None], axis=0)
        return jnp.sum(per_group + jnp.log(jnp.sqrt(2.0) * scale))

    value_and_grad = jax.jit(jax.value_and_grad(lambda t: -log_lik(t)))
    fit = optimize.minimize(
        lambda t: [np.asarray(v) for v in value_and_grad(jnp.asarray(t))],
        np.asarray(theta0, float),
        jac=True,
        method="L-BFGS-B",
        options={"gtol": 1e-9},
    )
    return fit.x, -fit.fun


def mixedlm_fit(data):
    """statsmodels ``MixedLM(reml=False)`` on sleepstudy: ``(params, log-likelihood)``."""
    import pandas as pd
    import statsmodels.formula.api as smf

    frame = pd.DataFrame(data)
    model = smf.mixedlm("Reaction ~ Days", frame, groups=frame["Subject"], re_formula="~Days")
    fit = model.fit(reml=False)
    params = {
        "beta": np.asarray(fit.fe_params),
        "sd_re": np.sqrt(np.diag(np.asarray(fit.cov_re))),
        "sigma": np.sqrt(fit.scale),
    }
    return params, fit.llf


def have_statsmodels():
    try:
        import statsmodels  # noqa: F401
    except ImportError:
        return False
    return True


# -- datasets: the arguments, the reference MLE, the fitters and the tolerances ---------


def sleepstudy_case(options):
    data = load_csv("sleepstudy.csv")
    subject = np.unique(data["Subject"], return_inverse=True)[1]
    if have_statsmodels():
        reference, best = mixedlm_fit(data)
        source = "statsmodels MixedLM(reml=False)"
    else:
        beta, sds, sigma, best = _lmm_mle(data["Reaction"], data["Days"], subject)
        reference = {"beta": beta, "sd_re": sds, "sigma": sigma}
        source = "exact marginal likelihood, BFGS (statsmodels not installed)"
    return dict(
        args=tuple(jnp.asarray(a) for a in (data["Days"], subject, data["Reaction"])),
        reference=reference,
        best=best,
        source=source,
        saem=lambda: jaxem.SAEM(sleepstudy_model, schedule=(100, 100)),
        mcem=(lambda: jaxem.MCEM(sleepstudy_model, max_draws=200), {"max_iter": 60}),
        full=sleepstudy_full,
        jaxem_model=sleepstudy_model,
        mixedlm=lambda: mixedlm_fit(data)[0] if have_statsmodels() else None,
        # (relative tolerance, absolute tolerance) per param.
        tolerance={"beta": (5e-3, 0.0), "sd_re": (3e-2, 0.0), "sigma": (3e-2, 0.0)},
    )


def cbpp_case(options):
    data = load_csv("cbpp.csv")
    herd = data["herd"].astype(int) - 1
    period = data["period"].astype(int) - 1
    size, incidence = data["size"], data["incidence"]
    log_choose = jnp.asarray(
        jax.scipy.special.gammaln(size + 1)
        - jax.scipy.special.gammaln(incidence + 1)
        - jax.scipy.special.gammaln(size - incidence + 1)
    )

    def obs_log_lik(theta, u):
        effects = jnp.concatenate([jnp.zeros(1), theta[1:4]])
        logits = theta[0] + u + effects[period]
        return incidence * logits - size * jnp.logaddexp(0.0, logits) + log_choose

    theta, best = random_intercept_mle(obs_log_lik, herd, 15, [-1.4, -1.0, -1.1, -1.6, -0.5])
    return dict(
        args=tuple(jnp.asarray(a) for a in (herd, period, size, incidence)),
        reference={
            "intercept": theta[0],
            "period_effects": theta[1:4],
            "sd_herd": np.exp(theta[4]),
        },
        best=best,
        source="adaptive Gauss-Hermite quadrature",
        saem=lambda: jaxem.SAEM(cbpp_model, schedule=(100, 100)),
        mcem=(lambda: jaxem.MCEM(cbpp_model), {}),
        full=cbpp_full,
        jaxem_model=cbpp_model,
        tolerance={"intercept": (0.0, 0.1), "period_effects": (0.0, 0.1), "sd_herd": (0.15, 0.0)},
    )


def glmm_case(options):
    groups = 100 if options.quick else options.groups
    group, x, y = simulate(groups, options.per_group)

    def obs_log_lik(theta, u):
        logits = theta[0] + u + theta[1] * x
        return y * logits - jnp.logaddexp(0.0, logits)

    theta, best = random_intercept_mle(obs_log_lik, group, groups, [0.0, 0.0, 0.0])
    return dict(
        args=(group, x, y, groups),
        reference={"intercept": theta[0], "slope": theta[1], "sd": np.exp(theta[2])},
        best=best,
        source=f"adaptive Gauss-Hermite quadrature; {groups} groups x {options.per_group}",
        saem=lambda: jaxem.SAEM(glmm, schedule=(100, 50)),
        mcem=(lambda: jaxem.MCEM(glmm, max_draws=50), {}),
        full=glmm_full,
        jaxem_model=glmm,
        variants={
            "SAEM 4ch": lambda: jaxem.SAEM(glmm, schedule=(100, 50), num_chains=4),
            "SAEM dflt": lambda: jaxem.SAEM(glmm),
        },
        gradient={
            "SAEM grad": lambda: jaxem.SAEM(glmm, schedule=(100, 50), m_step="gradient"),
            "MCEM grad": lambda: jaxem.MCEM(glmm, max_draws=50, m_step="gradient"),
        },
        tolerance={"intercept": (5e-3, 0.0), "slope": (5e-3, 0.0), "sd": (3e-2, 0.0)},
    )


CASES = {"sleepstudy": sleepstudy_case, "cbpp": cbpp_case, "glmm": glmm_case}

# -- timing and scoring ------------------------------------------------------------------

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def timed(fn):
    """``(result, wall seconds, seconds of XLA compilation within, process CPU seconds)``."""
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


def score(params, reference, tolerance):
    """``(largest relative error, within every tolerance)`` of ``params`` (numpy)."""
    worst, within = 0.0, True
    for name, (rtol, atol) in tolerance.items():
        value, ref = np.asarray(params[name], float), np.asarray(reference[name], float)
        error = np.abs(value - ref)
        worst = max(worst, float(np.max(error / np.abs(ref))))
        within &= bool(np.all(error <= atol + rtol * np.abs(ref)))
    return worst, within


def methods(case, options):
    """``{name: fit(seed) -> (params, log-likelihood or None, its se or None)}``."""
    args = case["args"]

    def jaxem_fit(make, run_options=None):
        fitter = make()

        def fit(seed):
            result = fitter.run(jax.random.PRNGKey(seed), *args, **(run_options or {}))
            return result.params, result.log_likelihood, result.log_likelihood_se

        return fit

    def nuts(seed):
        from numpyro.infer import MCMC, NUTS

        samples = 200 if options.quick else 500
        mcmc = MCMC(NUTS(case["full"]), num_warmup=samples, num_samples=samples, progress_bar=False)
        mcmc.run(jax.random.PRNGKey(seed), *args)
        means = {k: jnp.mean(v, axis=0) for k, v in mcmc.get_samples().items() if k != "z"}
        return means, None, None

    def svi(seed):
        from numpyro.infer import SVI, Trace_ELBO
        from numpyro.infer.autoguide import AutoNormal

        model = case["jaxem_model"]
        guide = AutoNormal(model)
        run = SVI(model, guide, numpyro.optim.Adam(0.05), Trace_ELBO()).run
        result = run(jax.random.PRNGKey(seed), options.svi_steps, *args, progress_bar=False)
        return {k: v for k, v in result.params.items() if k in case["reference"]}, None, None

    found = {"SAEM": jaxem_fit(case["saem"]), "NUTS": nuts, "MCEM": jaxem_fit(*case["mcem"])}
    found["SVI"] = svi
    if case.get("mixedlm") is not None and have_statsmodels():
        found["MixedLM"] = lambda seed: (case["mixedlm"](), None, None)
    if options.variants:
        found.update({n: jaxem_fit(m) for n, m in case.get("variants", {}).items()})
    if options.gradient:
        found.update({n: jaxem_fit(m) for n, m in case.get("gradient", {}).items()})
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default=None, help="comma-separated: " + ",".join(CASES))
    parser.add_argument("--groups", type=int, default=1000)
    parser.add_argument("--per-group", type=int, default=20)
    parser.add_argument(
        "--quick", action="store_true", help="the GLMM alone, 100 groups, one call per method"
    )
    parser.add_argument("--only", default=None, help="comma-separated methods, e.g. SAEM,NUTS")
    parser.add_argument("--variants", action="store_true", help="GLMM: SAEM 4ch and SAEM dflt")
    parser.add_argument("--gradient", action="store_true", help='GLMM: m_step="gradient" too')
    parser.add_argument("--svi-steps", type=int, default=5000)
    options = parser.parse_args()
    datasets = options.datasets or ("glmm" if options.quick else ",".join(CASES))
    rows = []
    for dataset in datasets.split(","):
        case = CASES[dataset](options)
        print(
            f"{dataset}: MLE ({case['source']})",
            {k: np.round(np.asarray(v, float), 4).tolist() for k, v in case["reference"].items()},
            f"loglik {case['best']:.3f}",
            flush=True,
        )
        fits = methods(case, options)
        names = list(fits) if options.only is None else options.only.split(",")
        for name in names:
            if name not in fits:
                parser.error(f"--only: no method {name!r} on {dataset}; one of {list(fits)}")
            seeds = range(1 if options.quick else 2)
            calls = [timed(lambda s=seed, fit=fits[name]: fit(s)) for seed in seeds]
            scores = [score(c[0][0], case["reference"], case["tolerance"]) for c in calls]
            within = all(s[1] for s in scores)
            params, ll, se = calls[0][0]
            if ll is not None:
                best = case["best"]
                within &= all(abs(float(c[0][1]) - best) <= 3 * float(c[0][2]) for c in calls)
                ll = f"{float(ll):.2f} +- {float(se):.2f}"
            second = calls[-1] if len(calls) > 1 else (None, np.nan, np.nan, np.nan)
            rows.append((
                dataset, name, max(s[0] for s in scores), within, calls[0][1], calls[0][2],
                second[1], calls[0][3], second[3], os.getloadavg()[0], ll or "",
            ))  # fmt: skip
            print(
                f"  {name}: {calls[0][1]:.1f} s first call ({calls[0][3]:.1f} CPU s), "
                f"load {rows[-1][-2]:.1f};",
                {k: np.round(np.asarray(v, float), 4).tolist() for k, v in params.items()},
                flush=True,
            )
    print(
        f"{'dataset':11}{'method':10}{'max rel err':>12}{'within':>7}{'first s':>8}"
        f"{'compile s':>10}{'second s':>9}{'CPU 1st':>8}{'CPU 2nd':>8}{'load':>6}  loglik"
    )
    for dataset, name, err, ok, first, comp, second, cpu1, cpu2, load, ll in rows:
        print(
            f"{dataset:11}{name:10}{err:>12.4f}{'yes' if ok else 'no':>7}{first:>8.1f}"
            f"{comp:>10.1f}{second:>9.1f}{cpu1:>8.1f}{cpu2:>8.1f}{load:>6.1f}  {ll}"
        )


if __name__ == "__main__":
    main()
