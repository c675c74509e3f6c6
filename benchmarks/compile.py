"""Compile time of ``jaxem.EM`` on seven models, model traces per compiled step, and
parallel restarts against a loop of the same fits.

Models (data simulated with NumPy from fixed seeds, float32 unless ``--dtype
float64``):

* ``gmm``: full-covariance Gaussian mixture, (N, D, K) = (10 000, 2, 3), the
  initial parameters of ``gmm.py`` (closed-form M-step).
* ``gamma``: Gamma mixture, N = 2 000, K = 3 (rates in closed form given the
  concentrations, concentrations by gradient steps).
* ``zip``: zero-inflated Poisson regression, N = 2 000, 3 covariates: a latent
  zero indicator, a Poisson rate ``exp(X @ beta)`` in the non-zero state.
* ``moe``: mixture of experts, N = 2 000, 3 covariates, K = 3 linear-Gaussian
  experts, softmax gating on the covariates.
* ``student``: Student-t mixture, N = 2 000, K = 2, degrees of freedom
  constrained to ``interval(1, 100)`` (all but the weights by gradient steps).
* ``iohmm``: input-output HMM, 5 sequences of 200 steps, K = 2 states, Gaussian
  emissions, transition logits linear in an input covariate (``scan``).
* ``hmm``: full-covariance Gaussian HMM, 5 sequences of 200 steps, K = 3,
  D = 2 (``scan``, the model of ``common.gaussian_hmm``), also fitted by
  dynamax's ``GaussianHMM.fit_em`` from the same initial parameters.

Per model:

* ``compile s``: wall time of the first ``EM(model).run(key, ..., max_iter,
  tol=0)`` minus that of the same call warm, median over ``--repeats`` cold
  starts (each with ``jax.clear_caches()``, a new ``EM`` and a new model
  function, so that no cache keyed on the model survives); ``jax s``: the
  tracing, lowering and XLA compilation time that JAX reports through
  ``jax.monitoring`` during the first call (median); ``cpu s``: the same difference
  in process CPU seconds (every thread; less sensitive to other jobs' load).
* ``traces``: how many times the model's Python body runs during ``EM.init``,
  during the first ``EM.update`` after it (the compilation of one step), during a
  second ``update`` (0 if it reuses the compiled step), during a cold ``run`` and
  during a warm one.
* ``dynamax s`` (``hmm`` only): dynamax compiles its EM loop on every ``fit_em``
  call, so its compile time is ``2 t(M) - t(2M)``, ``t(M)`` the wall time of a
  fit of M iterations (median over the repeats).

Restarts (models with a gradient M-step, from ``em.m_step_paths``):
``run(key, ..., num_restarts=R)`` (as ``run`` chooses: one ``vmap``, or on a CPU
with a gradient path one restart after another; ``--batch-restarts`` forces the
``vmap``) against a Python loop of ``R`` ``run`` calls with the keys it splits,
both warm, median of ``--repeats`` interleaved timings. The gradient-path
parameters of these models start from key-dependent values, so the restarts are
different fits; restart ``i`` of ``run`` and run ``i`` of the loop get the same
key, ``jax.random.split(key, R)[i]``, and so start from the same point.
``max rel. diff ll``: the largest relative difference of their log-likelihoods
after ``--iters`` iterations, and ``after 1``: the same after one iteration
(which shows that they start from the same point). One after another, the two
are the same program and agree to the bit. Under ``vmap`` the batched
program rounds differently, and along an L-BFGS path (its line search's
accept tests) a rounding difference grows: on ``moe`` with 8 restarts the two
agreed to 1.3e-7 after one iteration and differed by up to 18 % after 20 (with
3 restarts in float64: 1e-9 relative after 3 iterations, 1e-4 after 20).

Usage::

    python benchmarks/compile.py --json benchmarks/results/compile.json  # ~30 min, 2 loaded cores
    python benchmarks/compile.py --models gmm,hmm --repeats 5
    python benchmarks/compile.py --models moe --batch-restarts  # restarts under vmap
    python benchmarks/compile.py --report a.json,b.json     # merged tables of earlier runs
"""

import argparse
import importlib.metadata
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

MODEL_NAMES = ("gmm", "gamma", "zip", "moe", "student", "iohmm", "hmm")
NUM_ITERS = 20
NUM_RESTARTS = 8
DATA_SEED = 0
INIT_SEED = 1
COMPILE_TARGET_S = 2.0
TRACE_TARGET = 2


class Case(NamedTuple):
    """One model and its data: ``model(*args)``, ``init_params`` passed to ``run``."""

    model: Callable
    args: tuple
    init_params: dict | None
    size: str


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODEL_NAMES), help="comma-separated subset")
    parser.add_argument("--repeats", type=int, default=3, help="cold starts and warm timings")
    parser.add_argument("--iters", type=int, default=NUM_ITERS, help="EM iterations per fit")
    parser.add_argument("--restarts", type=int, default=NUM_RESTARTS)
    parser.add_argument("--no-restarts", action="store_true", help="skip the restart rows")
    parser.add_argument(
        "--batch-restarts",
        action="store_true",
        help="restarts under vmap (batch_restarts=True) even where run would loop over them",
    )
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--json", default=None, help="write the results to this file")
    parser.add_argument(
        "--report", default=None, help="comma-separated JSON files: print their tables, run nothing"
    )
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------
# Models. Parameters on the gradient path start from key-dependent values, so
# that restarts differ.
# ---------------------------------------------------------------------------


def _models():
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from common import gaussian_hmm, gmm_full
    from numpyro.contrib.control_flow import scan
    from numpyro.distributions import constraints

    def gamma_mixture(y, K):
        w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
        concentration = numpyro.param(
            "concentration",
            lambda key: jax.random.uniform(key, (K,), minval=1.0, maxval=4.0),
            constraint=constraints.positive,
        )
        rate = numpyro.param(
            "rate",
            1.0 / jnp.quantile(y, jnp.linspace(0.2, 0.8, K)),
            constraint=constraints.positive,
        )
        with numpyro.plate("data", y.shape[0]):
            z = numpyro.sample("z", dist.Categorical(w))
            numpyro.sample("y", dist.Gamma(concentration[z], rate[z]), obs=y)

    def zip_regression(X, y):
        w = numpyro.param("w", jnp.ones(2) / 2, constraint=constraints.simplex)
        beta = numpyro.param("beta", lambda key: 0.1 * jax.random.normal(key, (X.shape[1],)))
        with numpyro.plate("data", y.shape[0]):
            z = numpyro.sample("z", dist.Categorical(w))
            # state 0 is a structural zero: a Poisson of negligible rate
            rate = jnp.where(z == 1, jnp.exp(X @ beta), 1e-8)
            numpyro.sample("y", dist.Poisson(rate), obs=y)

    def mixture_of_experts(X, y, K):
        P = X.shape[1]
        gate = numpyro.param("gate", lambda key: 0.1 * jax.random.normal(key, (P, K)))
        beta = numpyro.param("beta", lambda key: jax.random.normal(key, (K, P)))
        sigma = numpyro.param("sigma", jnp.ones(K), constraint=constraints.positive)
        with numpyro.plate("data", y.shape[0]):
            z = numpyro.sample("z", dist.Categorical(logits=X @ gate))
            numpyro.sample("y", dist.Normal((beta[z] * X).sum(-1), sigma[z]), obs=y)

    def student_mixture(y, K):
        w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
        df = numpyro.param(
            "df",
            lambda key: jax.random.uniform(key, (K,), minval=2.0, maxval=20.0),
            constraint=constraints.interval(1.0, 100.0),
        )
        loc = numpyro.param("loc", lambda key: 2.0 * jax.random.normal(key, (K,)))
        scale = numpyro.param("scale", jnp.ones(K), constraint=constraints.positive)
        with numpyro.plate("data", y.shape[0]):
            z = numpyro.sample("z", dist.Categorical(w))
            numpyro.sample("y", dist.StudentT(df[z], loc[z], scale[z]), obs=y)

    def input_output_hmm(x, u, K):
        """x, u: (T, N); the transition out of state i at time t has logits
        ``b[i] + u[t] * W[i]``."""
        pi = numpyro.param("pi", jnp.ones(K) / K, constraint=constraints.simplex)
        b = numpyro.param("b", jnp.log(0.5 * jnp.eye(K) + 0.5 / K))
        W = numpyro.param("W", lambda key: 0.1 * jax.random.normal(key, (K, K)))
        mu = numpyro.param("mu", jnp.quantile(x, jnp.linspace(0.25, 0.75, K)))
        sigma = numpyro.param("sigma", jnp.full(K, x.std()), constraint=constraints.positive)
        with numpyro.plate("seqs", x.shape[1]):
            z0 = numpyro.sample("z0", dist.Categorical(pi))
            numpyro.sample("x0", dist.Normal(mu[z0], sigma[z0]), obs=x[0])

        def step(z_prev, xu):
            x_t, u_t = xu
            with numpyro.plate("seqs", x.shape[1]):
                logits = b[z_prev] + u_t[:, None] * W[z_prev]
                z = numpyro.sample("z", dist.Categorical(logits=logits))
                numpyro.sample("x", dist.Normal(mu[z], sigma[z]), obs=x_t)
            return z, None

        scan(step, z0, (x[1:], u[1:]))

    return {
        "gmm": gmm_full,
        "gamma": gamma_mixture,
        "zip": zip_regression,
        "moe": mixture_of_experts,
        "student": student_mixture,
        "iohmm": input_output_hmm,
        "hmm": gaussian_hmm,
    }


def _softmax(logits):
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    return probs / probs.sum(-1, keepdims=True)


def _covariates(rng, n):
    """An intercept and two standard normal covariates, shape (n, 3)."""
    return np.column_stack([np.ones(n), rng.normal(size=(n, 2))])


def _gmm_data(rng):
    from common import initial_params, sample_gmm

    x = sample_gmm(DATA_SEED, 10_000, 2, 3)
    return (x, 3), initial_params(INIT_SEED, x, 3, "full"), "N=10000 D=2 K=3"


def _gamma_data(rng):
    z = rng.choice(3, size=2_000, p=[0.3, 0.4, 0.3])
    y = rng.gamma(np.array([2.0, 5.0, 20.0])[z], 1.0 / np.array([2.0, 1.0, 2.0])[z])
    return (y, 3), None, "N=2000 K=3"


def _zip_data(rng):
    X = _covariates(rng, 2_000)
    counts = rng.poisson(np.exp(X @ np.array([0.5, 0.8, -0.5])))
    y = np.where(rng.uniform(size=2_000) < 0.3, 0, counts)
    return (X, y), None, "N=2000 P=3"


def _moe_data(rng):
    X = _covariates(rng, 2_000)
    gate = np.array([[0.0, 0.5, -0.5], [0.0, 2.0, -2.0], [0.0, -1.0, 2.0]])
    cumulative = np.cumsum(_softmax(X @ gate), -1)
    z = (rng.uniform(size=(2_000, 1)) > cumulative).sum(-1).clip(max=2)
    beta = np.array([[-2.0, 1.0, 0.0], [0.0, -1.0, 1.0], [2.0, 0.5, 0.5]])
    y = (beta[z] * X).sum(-1) + np.array([0.5, 0.3, 0.8])[z] * rng.normal(size=2_000)
    return (X, y, 3), None, "N=2000 P=3 K=3"


def _student_data(rng):
    z = rng.choice(2, size=2_000, p=[0.6, 0.4])
    noise = rng.standard_t(np.array([3.0, 10.0])[z])
    y = np.array([-2.0, 2.0])[z] + np.array([1.0, 0.5])[z] * noise
    return (y, 2), None, "N=2000 K=2"


def _iohmm_data(rng):
    num_steps, num_seqs = 200, 5
    u = rng.normal(size=(num_steps, num_seqs))
    b = np.log(np.array([[0.9, 0.1], [0.2, 0.8]]))
    W = np.array([[-1.5, 1.5], [1.0, -1.0]])
    states = np.empty((num_steps, num_seqs), int)
    states[0] = rng.integers(2, size=num_seqs)
    for t in range(1, num_steps):
        logits = b[states[t - 1]] + u[t][:, None] * W[states[t - 1]]  # (N, K)
        cumulative = np.cumsum(_softmax(logits), -1)
        states[t] = (rng.uniform(size=(num_seqs, 1)) > cumulative).sum(-1).clip(max=1)
    x = np.array([-1.0, 1.5])[states] + np.array([0.8, 0.6])[states] * rng.normal(size=u.shape)
    return (x, u, 2), None, "T=200 N=5 K=2"


def _hmm_data(rng):
    from common import hmm_initial_params, sample_hmm

    x = sample_hmm(DATA_SEED, 200, 5, 3, 2)
    return (x, 3), hmm_initial_params(INIT_SEED, x, 3), "T=200 N=5 K=3 D=2"


_DATA = {
    "gmm": _gmm_data,
    "gamma": _gamma_data,
    "zip": _zip_data,
    "moe": _moe_data,
    "student": _student_data,
    "iohmm": _iohmm_data,
    "hmm": _hmm_data,
}


def make_cases(names, dtype):
    """Each model with its data (NumPy, seed ``DATA_SEED`` per model, so a subset gets
    the same data) as arrays of ``dtype``, and its initial parameters."""
    import jax.numpy as jnp

    models = _models()
    cases = {}
    for name in names:
        if name not in _DATA:
            raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODEL_NAMES)}")
        args, init, size = _DATA[name](np.random.default_rng(DATA_SEED))
        args = tuple(jnp.asarray(a, dtype) if isinstance(a, np.ndarray) else a for a in args)
        if init is not None:
            init = {k: jnp.asarray(v, dtype) for k, v in init.items()}
        cases[name] = Case(models[name], args, init, size)
    return cases


# ---------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------


def counted(model):
    """A new function that runs ``model`` and counts its calls (``wrapper.num_calls``)."""

    def wrapper(*args, **kwargs):
        wrapper.num_calls += 1
        return model(*args, **kwargs)

    wrapper.num_calls = 0
    return wrapper


def count_traces(case, key):
    """Model traces during ``init``, the first ``update`` after it and a second
    ``update``, with a new model function (no cache keyed on it)."""
    import jax
    from common import block

    import jaxem

    jax.clear_caches()
    model = counted(case.model)
    em = jaxem.EM(model)
    state = em.init(key, *case.args, init_params=case.init_params)
    counts = {"init": model.num_calls}
    for name in ("update", "update_again"):
        model.num_calls = 0
        state, _ = block(em.update(state, *case.args))
        counts[name] = model.num_calls
    return counts


def time_compile(case, key, num_iters):
    """One cold start: (first run - warm run seconds, JAX-reported compile seconds,
    warm run seconds, model traces in the first run, model traces in the warm run,
    first run - warm run process CPU seconds)."""
    import jax
    from common import first_call, warm_call

    import jaxem

    jax.clear_caches()
    model = counted(case.model)
    em = jaxem.EM(model)

    def fit():
        return em.run(key, *case.args, max_iter=num_iters, tol=0.0, init_params=case.init_params)

    cpu = time.process_time()
    first, jax_compile, _ = first_call(fit)
    cpu_first = time.process_time() - cpu
    num_traces = model.num_calls
    cpu = time.process_time()
    warm, _ = warm_call(fit)
    cpu_warm = time.process_time() - cpu
    traces = model.num_calls - num_traces
    return first - warm, jax_compile, warm, num_traces, traces, cpu_first - cpu_warm


def time_dynamax(case, num_iters):
    """One cold start of dynamax's ``GaussianHMM.fit_em`` on the ``hmm`` case:
    (``2 t(M) - t(2M)``, JAX-reported compile seconds of the M-iteration fit, the same
    difference in process CPU seconds)."""
    import jax
    import jax.numpy as jnp
    from common import first_call
    from dynamax.hidden_markov_model import GaussianHMM

    x, num_states = case.args
    init = case.init_params
    hmm = GaussianHMM(num_states, x.shape[-1])
    params, props = hmm.initialize(
        jax.random.PRNGKey(0),
        initial_probs=init["pi"],
        transition_matrix=init["A"],
        emission_means=init["mu"],
        emission_covariances=init["L"] @ jnp.swapaxes(init["L"], -1, -2),
    )
    emissions = jnp.swapaxes(x, 0, 1)  # (N, T, D)

    def fit(iters):
        return lambda: hmm.fit_em(params, props, emissions, num_iters=iters, verbose=False)

    jax.clear_caches()
    cpu = time.process_time()
    short, jax_compile, _ = first_call(fit(num_iters))
    cpu_short = time.process_time() - cpu
    long, _, _ = first_call(fit(2 * num_iters))
    cpu_long = time.process_time() - cpu - cpu_short
    return 2 * short - long, jax_compile, 2 * cpu_short - cpu_long


def time_restarts(case, key, num_iters, num_restarts, num_repeats, batch_restarts=None):
    """Warm seconds of ``run(num_restarts=R, batch_restarts=...)`` and of a loop of R
    single runs (median of interleaved repeats), the largest relative difference of
    their log-likelihoods, and the same after one iteration (the same keys)."""
    import jax
    import jax.numpy as jnp
    from common import warm_call

    import jaxem

    em = jaxem.EM(case.model)
    keys = jax.random.split(key, num_restarts)
    kwargs = dict(max_iter=num_iters, tol=0.0, init_params=case.init_params)

    def parallel():
        return em.run(
            key, *case.args, num_restarts=num_restarts, batch_restarts=batch_restarts, **kwargs
        ).restart_log_likelihoods

    def loop():
        return jnp.stack([em.run(k, *case.args, **kwargs).log_likelihood for k in keys])

    parallel_lls, loop_lls = np.asarray(parallel()), np.asarray(loop())  # compile both
    parallel_s, loop_s = [], []
    for _ in range(num_repeats):
        parallel_s.append(warm_call(parallel)[0])
        loop_s.append(warm_call(loop)[0])
    kwargs["max_iter"] = 1
    first_diff = _max_rel_diff(np.asarray(parallel()), np.asarray(loop()))
    rel_diff = _max_rel_diff(parallel_lls, loop_lls)
    return statistics.median(parallel_s), statistics.median(loop_s), rel_diff, first_diff


def _max_rel_diff(a, b):
    return float(np.nanmax(np.abs(a - b) / np.abs(b)))


def has_gradient_path(case):
    import jaxem

    paths = jaxem.EM(case.model).m_step_paths(*case.args)
    return paths, any(path.startswith("gradient") for path in paths.values())


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def _cell(record, key):
    return f"{record[key]:6.2f}" if key in record else f"{'-':>6s}"


def print_report(records, restart_records, num_iters, num_restarts):
    header = (
        f"{'model':8s} {'size':18s} {'compile s':>9s} {'cpu s':>6s} {'jax s':>6s} "
        f"{'warm s':>7s} {'dynamax s':>9s} {'cpu s':>6s} | traces: {'init':>4s} {'update':>6s} "
        f"{'again':>5s} {'run':>4s} {'warm':>4s}"
    )
    print()
    print(f"Compilation, {num_iters} EM iterations per fit (median of the cold starts)")
    print(header)
    print("-" * len(header))
    for r in records:
        dynamax = f"{r['dynamax_compile_s']:9.2f}" if "dynamax_compile_s" in r else f"{'-':>9s}"
        dynamax_cpu = _cell(r, "dynamax_compile_cpu_s")
        t = r["traces"]
        print(
            f"{r['model']:8s} {r['size']:18s} {r['compile_s']:9.2f} {_cell(r, 'compile_cpu_s')} "
            f"{r['jax_compile_s']:6.2f} {r['warm_s']:7.3f} {dynamax} {dynamax_cpu} |         "
            f"{t['init']:4d} {t['update']:6d} {t['update_again']:5d} {t['run']:4d} "
            f"{t['warm_run']:4d}"
        )
    print(
        "compile s: first run - warm run (cpu s: the same in process CPU seconds); jax s:\n"
        "tracing + lowering + XLA compilation that jax.monitoring reports during the first\n"
        "run; warm s: the warm run; dynamax s: 2 t(M) - t(2M) of fit_em. traces: model\n"
        "calls in init, in the first update after it, in a second update, in a cold run\n"
        "and in a warm run."
    )
    if restart_records:
        header = (
            f"{'model':8s} {'parallel s':>10s} {'loop s':>8s} {'parallel/loop':>13s}  "
            "max rel. diff ll (after 1)"
        )
        print()
        print(f"Restarts: run(num_restarts={num_restarts}) vs {num_restarts} runs, warm (median)")
        print(header)
        print("-" * len(header))
        for r in restart_records:
            print(
                f"{r['model']:8s} {r['parallel_s']:10.3f} {r['loop_s']:8.3f} "
                f"{r['ratio']:12.2f}x  {r['max_rel_diff']:.1e} "
                f"({r.get('max_rel_diff_first_iter', float('nan')):.1e})"
            )
    print()
    print("Targets:")
    for line in _targets(records, restart_records):
        print(line)


def _targets(records, restart_records):
    lines = []
    for r in records:
        checks = [
            (f"compile <= {COMPILE_TARGET_S:g} s", r["compile_s"] <= COMPILE_TARGET_S,
             f"{r['compile_s']:.2f} s"),
            (f"traces per step <= {TRACE_TARGET}", r["traces"]["update"] <= TRACE_TARGET,
             str(r["traces"]["update"])),
        ]  # fmt: skip
        if "dynamax_compile_s" in r:
            ok = r["compile_s"] <= r["dynamax_compile_s"]
            checks.append(("compile <= dynamax", ok, f"{r['compile_s']:.2f} s vs "
                           f"{r['dynamax_compile_s']:.2f} s"))  # fmt: skip
        lines += [f"{'PASS' if ok else 'FAIL'}  {r['model']:8s} {n:24s} {v}" for n, ok, v in checks]
    for r in restart_records:
        ok = r["parallel_s"] <= r["loop_s"]
        lines.append(f"{'PASS' if ok else 'FAIL'}  {r['model']:8s} {'restarts <= loop':24s} "
                     f"{r['ratio']:.2f}x")  # fmt: skip
    return lines


def main(argv=None):
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    if args.report:
        report(args.report.split(","))
        return
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:0] = [here, os.path.dirname(here)]
    import jax

    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    from common import metadata

    names = [n for n in args.models.split(",") if n]
    meta = metadata()
    for package in ("dynamax", "hmmlearn"):
        try:
            meta["versions"][package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            meta["versions"][package] = None
    print(
        f"CPUs: {meta['cpu_count']}, load average: {meta['load_average'][0]:.2f}, "
        f"XLA_FLAGS: {meta['xla_flags']!r}, devices: {jax.devices()}, dtype: {args.dtype}, "
        f"iterations: {args.iters}, repeats: {args.repeats}",
        flush=True,
    )
    cases = make_cases(names, args.dtype)
    key = jax.random.PRNGKey(0)
    records, restart_records = [], []
    for name, case in cases.items():
        start = time.perf_counter()
        traces = count_traces(case, key)
        timings = [time_compile(case, key, args.iters) for _ in range(args.repeats)]
        record = {
            "model": name,
            "size": case.size,
            "compile_s": statistics.median(t[0] for t in timings),
            "jax_compile_s": statistics.median(t[1] for t in timings),
            "warm_s": statistics.median(t[2] for t in timings),
            "compile_s_all": [t[0] for t in timings],
            "compile_cpu_s": statistics.median(t[5] for t in timings),
            "traces": {**traces, "run": timings[0][3], "warm_run": timings[0][4]},
        }
        if name == "hmm":
            dynamax = [time_dynamax(case, args.iters) for _ in range(args.repeats)]
            record["dynamax_compile_s"] = statistics.median(d[0] for d in dynamax)
            record["dynamax_jax_compile_s"] = statistics.median(d[1] for d in dynamax)
            record["dynamax_compile_s_all"] = [d[0] for d in dynamax]
            record["dynamax_compile_cpu_s"] = statistics.median(d[2] for d in dynamax)
        paths, gradient = has_gradient_path(case)
        record["m_step_paths"] = paths
        records.append(record)
        print(json.dumps(record), flush=True)
        if gradient and not args.no_restarts:
            parallel_s, loop_s, rel_diff, first_diff = time_restarts(
                case, key, args.iters, args.restarts, args.repeats, args.batch_restarts or None
            )
            restart_records.append({
                "model": name,
                "num_restarts": args.restarts,
                "parallel_s": parallel_s,
                "loop_s": loop_s,
                "ratio": parallel_s / loop_s,
                "max_rel_diff": rel_diff,
                "max_rel_diff_first_iter": first_diff,
            })  # fmt: skip
            print(json.dumps(restart_records[-1]), flush=True)
        print(f"# {name}: {time.perf_counter() - start:.0f} s", flush=True)
        _write_json(args, meta, records, restart_records)
    print_report(records, restart_records, args.iters, args.restarts)


def _write_json(args, meta, records, restart_records):
    """Writes what is measured so far (after every model: a run stopped by a time limit
    keeps the finished models)."""
    if not args.json:
        return
    meta = {**meta, "load_average_end": os.getloadavg()}
    with open(args.json, "w") as f:
        json.dump(
            {"meta": meta, "iters": args.iters, "num_restarts": args.restarts,
             "records": records, "restarts": restart_records},
            f,
            indent=1,
        )  # fmt: skip


def report(paths):
    """Prints the tables of JSON files written by ``--json`` (say, of runs of model
    subsets), merged."""
    records, restart_records = [], []
    for path in paths:
        with open(path) as f:
            saved = json.load(f)
        load = saved["meta"]["load_average"][0], saved["meta"]["load_average_end"][0]
        print(f"{path}: load average {load[0]:.2f} at the start, {load[1]:.2f} at the end")
        records += saved["records"]
        restart_records += saved["restarts"]
    print_report(records, restart_records, saved["iters"], saved["num_restarts"])


if __name__ == "__main__":
    main()
