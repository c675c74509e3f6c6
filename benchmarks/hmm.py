"""Gaussian HMM EM (full covariance): jaxem vs dynamax ``fit_em`` vs hmmlearn.

All implementations fit the same data (sampled from a random K-state Gaussian
HMM with a fixed seed) from the same initial parameters for exactly 20 EM
iterations. Reported per configuration and implementation: time per iteration
without compilation (a warm run divided by the number of iterations),
compilation time (first call minus a warm call), and the log-likelihood of the
final parameters, evaluated for every implementation by hmmlearn's ``score``.

Implementations:

* ``jaxem``: ``jaxem.EM(model).run(key, x, max_iter=20, tol=0.0, init_params=...)``,
  the model a NumPyro ``scan`` over time with the sequences in a plate.
* ``jaxem-parallel``: the same with ``chain_contraction="parallel"`` (a
  log-depth reduction over time; meant for GPUs).
* ``dynamax``: ``dynamax.hidden_markov_model.GaussianHMM.fit_em`` (its
  default priors, so its final parameters differ slightly: MAP, not ML). It
  compiles its EM step on every call, so its time per iteration is taken as
  (time of 21 iterations - time of 1) / 20 and its compilation time as the
  one-iteration fit minus one iteration; its final parameters are after 21
  iterations.
* ``hmmlearn``: ``hmmlearn.hmm.GaussianHMM(covariance_type="full")`` with
  ``init_params=""``, ``n_iter=20, tol=0`` (log-space implementation).

Usage::

    python benchmarks/hmm.py --all                      # float32 and float64
    python benchmarks/hmm.py --dtype float64 --configs 100000x1 --json out.json
    JAX_PLATFORMS=cuda python benchmarks/hmm.py --configs 1000000x1 \\
        --impls jaxem,jaxem-parallel,dynamax             # on a GPU

A configuration ``TxN`` is N sequences of length T. float64 needs
``jax_enable_x64``, global to a process, so ``--all`` runs one child process
per dtype and merges their results.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

CONFIGS = ((100_000, 1), (1_000, 100))
QUICK_CONFIGS = ((2_000, 1), (100, 20))
IMPLS = ("jaxem", "jaxem-parallel", "dynamax", "hmmlearn")
NUM_STATES, DIM, NUM_ITERS = 8, 8, 20
DATA_SEED, INIT_SEED = 0, 1


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    parser.add_argument("--all", action="store_true", help="both dtypes, one child process each")
    parser.add_argument("--quick", action="store_true", help="small configurations (smoke run)")
    parser.add_argument("--configs", default=None, help="comma-separated TxN, e.g. 100000x1")
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--json", default=None, help="write the results to this file")
    return parser.parse_args(argv)


def _configs(args):
    if args.configs:
        return [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",")]
    return QUICK_CONFIGS if args.quick else CONFIGS


def sample_hmm(seed, num_steps, num_seqs):
    """Sequences of a random Gaussian HMM, shape (T, N, D), float64."""
    from common import sample_hmm as sample

    return sample(seed, num_steps, num_seqs, NUM_STATES, DIM, mean_scale=2.0)


def initial_params(seed, x):
    """Uniform start, sticky transitions, means at K data points, data covariance."""
    from common import hmm_initial_params

    params = hmm_initial_params(seed, x, NUM_STATES)
    L = params.pop("L")
    return {**params, "cov": L @ np.swapaxes(L, -1, -2)}


def _score(x, params):
    """log p(x) at ``params`` by hmmlearn (float64), the common yardstick."""
    from hmmlearn import hmm

    model = hmm.GaussianHMM(NUM_STATES, "full")
    model.startprob_, model.transmat_ = params["pi"], params["A"]
    model.means_, model.covars_ = params["mu"], params["cov"]
    seqs = np.swapaxes(x, 0, 1)
    return float(model.score(seqs.reshape(-1, DIM), [x.shape[0]] * x.shape[1]))


def _clean(params):
    """float64 copies, rows renormalized (float32 rounding) for hmmlearn's checks."""
    out = {k: np.asarray(v, np.float64) for k, v in params.items()}
    out["pi"] = out["pi"] / out["pi"].sum()
    out["A"] = out["A"] / out["A"].sum(-1, keepdims=True)
    out["cov"] = 0.5 * (out["cov"] + np.swapaxes(out["cov"], -1, -2))
    return out


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    first = time.perf_counter() - start
    start = time.perf_counter()
    out = fn()
    warm = time.perf_counter() - start
    return out, first, warm


def run_jaxem(x, init, dtype, parallel):
    import jax
    import jax.numpy as jnp
    from common import gaussian_hmm

    import jaxem

    params = {
        "pi": init["pi"],
        "A": init["A"],
        "mu": init["mu"],
        "L": np.linalg.cholesky(init["cov"]),
    }
    params = {k: jnp.asarray(v, dtype) for k, v in params.items()}
    data = jnp.asarray(x, dtype)
    em = jaxem.EM(gaussian_hmm, chain_contraction="parallel" if parallel else "sequential")

    def fit():
        result = em.run(
            jax.random.PRNGKey(0), data, NUM_STATES, max_iter=NUM_ITERS, tol=0.0, init_params=params
        )
        return jax.block_until_ready(result)

    result, first, warm = _timed(fit)
    L = np.asarray(result.params["L"], np.float64)
    final = {k: np.asarray(result.params[k]) for k in ("pi", "A", "mu")}
    final["cov"] = L @ np.swapaxes(L, -1, -2)
    return final, first, warm


def run_dynamax(x, init, dtype):
    import jax
    import jax.numpy as jnp
    from dynamax.hidden_markov_model import GaussianHMM

    model = GaussianHMM(NUM_STATES, DIM)
    params, props = model.initialize(
        jax.random.PRNGKey(0),
        initial_probs=jnp.asarray(init["pi"], dtype),
        transition_matrix=jnp.asarray(init["A"], dtype),
        emission_means=jnp.asarray(init["mu"], dtype),
        emission_covariances=jnp.asarray(init["cov"], dtype),
    )
    emissions = jnp.asarray(np.swapaxes(x, 0, 1), dtype)  # (N, T, D)

    def fit(num_iters):
        start = time.perf_counter()
        fitted, _ = model.fit_em(params, props, emissions, num_iters=num_iters, verbose=False)
        return jax.block_until_ready(fitted), time.perf_counter() - start

    # fit_em compiles its EM step on every call: the time per iteration is the
    # difference between a long and a one-iteration fit.
    _, one = fit(1)
    fitted, full = fit(NUM_ITERS + 1)
    warm = full - one  # NUM_ITERS iterations, no compilation
    first = warm + (one - warm / NUM_ITERS)  # plus the compilation
    final = {
        "pi": np.asarray(fitted.initial.probs),
        "A": np.asarray(fitted.transitions.transition_matrix),
        "mu": np.asarray(fitted.emissions.means),
        "cov": np.asarray(fitted.emissions.covs),
    }
    return final, first, warm


def run_hmmlearn(x, init):
    from hmmlearn import hmm

    seqs = np.swapaxes(x, 0, 1)

    def fit():
        model = hmm.GaussianHMM(
            NUM_STATES,
            "full",
            init_params="",
            n_iter=NUM_ITERS,
            tol=0,
            covars_prior=0,
            covars_weight=0,
        )
        model.startprob_, model.transmat_ = init["pi"], init["A"]
        model.means_, model.covars_ = init["mu"], init["cov"]
        return model.fit(seqs.reshape(-1, DIM), [x.shape[0]] * x.shape[1])

    start = time.perf_counter()
    model = fit()
    elapsed = time.perf_counter() - start
    final = {"pi": model.startprob_, "A": model.transmat_, "mu": model.means_}
    final["cov"] = model.covars_
    return final, elapsed, elapsed


def run(args):
    import jax

    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    rows = []
    for num_steps, num_seqs in _configs(args):
        x = sample_hmm(DATA_SEED, num_steps, num_seqs)
        init = initial_params(INIT_SEED, x)
        for impl in args.impls.split(","):
            if impl == "hmmlearn" and args.dtype == "float32":
                continue  # hmmlearn computes in float64 only
            if impl in ("jaxem", "jaxem-parallel"):
                final, first, warm = run_jaxem(x, init, args.dtype, impl == "jaxem-parallel")
            elif impl == "dynamax":
                final, first, warm = run_dynamax(x, init, args.dtype)
            elif impl == "hmmlearn":
                final, first, warm = run_hmmlearn(x, init)
            else:
                raise ValueError(f"unknown implementation {impl!r}")
            row = {
                "dtype": args.dtype,
                "T": num_steps,
                "N": num_seqs,
                "impl": impl,
                "ms_per_iter": 1000 * warm / NUM_ITERS,
                "compile_s": max(first - warm, 0.0),
                "log_likelihood": _score(x, _clean(final)),
                "platform": jax.devices()[0].platform,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def _table(rows):
    lines = [
        "| dtype | T x N | impl | ms / iter | compile (s) | final log-lik |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dtype']} | {r['T']} x {r['N']} | {r['impl']} | {r['ms_per_iter']:.1f} | "
            f"{r['compile_s']:.1f} | {r['log_likelihood']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    if args.all:
        rows = []
        for dtype in ("float32", "float64"):
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "rows.json")
                child = ["--impls", args.impls, "--dtype", dtype, "--json", out]
                child += ["--quick"] if args.quick else []
                child += ["--configs", args.configs] if args.configs else []
                subprocess.run([sys.executable, __file__, *child], check=True)
                with open(out) as f:
                    rows += json.load(f)
    else:
        rows = run(args)
    print(_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
