"""CPU seconds to compile a Monte Carlo fit's program, per set of XLA options, and its run.

A fit of `jaxem.SAEM` or `jaxem.MCEM` is one program (the loop, the importance
sampling and the stationarity test after it). For each case below and each set of
XLA options (``once``: ``xla_backend_optimization_level=0`` and the older emitters;
``emitters``: the older emitters only; ``default``: XLA's defaults; ``O1``:
``xla_backend_optimization_level=1`` and the older emitters) this script
lowers the program the way ``run`` does (the checks before the fit first, as
``run``), compiles it and reports the process CPU seconds of the compilation
(``time.process_time``, every thread) and of two runs of the compiled program
(seeds 0 and 1; the first includes nothing but the run), with the fitted params
and log-likelihood of the second, so that the option sets' results can be compared.

``--loop-only`` replaces the importance sampling and the stationarity test after
the loop by zeros of their shapes (``jax.eval_shape``), to tell how much of the
compilation they take (the results are then meaningless; use ``--runs 0``).

Cases: ``glmm`` (the simulated logistic GLMM of ``benchmarks/mixed_models.py``,
1 000 groups x 20, SAEM ``schedule=(100, 50)``), ``glmm-mcem`` (the same, MCEM
``max_draws=50``), ``sleepstudy`` and ``cbpp`` (SAEM ``schedule=(100, 100)``, as
tests/test_mcem.py) and ``sleepstudy-mcem`` (MCEM ``max_draws=200``).

Usage::

    python benchmarks/compile_monte_carlo.py --cases glmm --options once,emitters,default
    python benchmarks/compile_monte_carlo.py --cases sleepstudy,cbpp,sleepstudy-mcem
    python benchmarks/compile_monte_carlo.py --options emitters,once --runs 0 --loop-only
"""

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

OLDER_EMITTERS = {"xla_cpu_use_fusion_emitters": False}
OPTIONS = {
    "once": {"xla_backend_optimization_level": 0, **OLDER_EMITTERS},
    "emitters": OLDER_EMITTERS,
    "default": {},
    "O1": {"xla_backend_optimization_level": 1, **OLDER_EMITTERS},
}
STATIC = ("spec", "max_iter", "num_blocks", "num_chains")


def _cases():
    import jax.numpy as jnp
    from conftest import load_csv
    from mixed_models import simulate
    from models import logistic_glmm, sleepstudy_model
    from test_mcem import cbpp_model

    import jaxem

    def glmm():
        return (*simulate(1000, 20), 1000)

    def sleepstudy():
        data = load_csv("sleepstudy.csv")
        subject = np.unique(data[:, 2], return_inverse=True)[1]
        return tuple(jnp.asarray(a) for a in (data[:, 1], subject, data[:, 0]))

    def cbpp():
        data = load_csv("cbpp.csv")
        herd = data[:, 0].astype(int) - 1
        period = data[:, 3].astype(int) - 1
        return tuple(jnp.asarray(a) for a in (herd, period, data[:, 2], data[:, 1]))

    return {
        # (fitter, data, max_iter, tol): what run passes (SAEM: its schedule, tol 0).
        "glmm": (lambda: jaxem.SAEM(logistic_glmm, schedule=(100, 50)), glmm, 150, 0.0),
        "glmm-mcem": (lambda: jaxem.MCEM(logistic_glmm, max_draws=50), glmm, 200, 1e-2),
        "sleepstudy": (
            lambda: jaxem.SAEM(sleepstudy_model, schedule=(100, 100)),
            sleepstudy,
            200,
            0.0,
        ),
        "sleepstudy-mcem": (
            lambda: jaxem.MCEM(sleepstudy_model, max_draws=200),
            sleepstudy,
            200,
            1e-2,
        ),
        "cbpp": (lambda: jaxem.SAEM(cbpp_model, schedule=(100, 100)), cbpp, 200, 0.0),
    }


def _without_after_loop():
    """Zeros of their shapes for the importance sampling and stationarity test."""
    import jax
    import jax.numpy as jnp

    import jaxem.monte_carlo as mc

    def zeros_of(fn):
        def stand_in(*args, **kwargs):
            shapes = jax.eval_shape(lambda: fn(*args, **kwargs))
            return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

        return stand_in

    mc.importance_log_likelihood = zeros_of(mc.importance_log_likelihood)
    mc.fit_stationarity = zeros_of(mc.fit_stationarity)


def _cpu(fn):
    import jax

    start = time.process_time()
    out = jax.block_until_ready(fn())
    return out, time.process_time() - start


def measure(make_fitter, args, max_iter, tol, options, runs):
    """Compile CPU s, the run CPU s of each seed, and the last run's result."""
    import jax

    from jaxem.arguments import split_args
    from jaxem.monte_carlo_start import padded_members

    jax.clear_caches()
    fitter = make_fitter()
    arrays, spec = split_args(args, {})
    key = jax.random.PRNGKey(0)
    blocks = fitter._checked_blocks(key, arrays, spec, None)
    dynamic = (
        arrays,
        None,
        np.asarray(tol, np.float64),
        jax.numpy.asarray(blocks.coordinate),
        None if blocks.entry is None else jax.numpy.asarray(blocks.entry),
        padded_members(blocks),
    )
    static = dict(
        spec=spec,
        max_iter=max_iter,
        num_blocks=blocks.num_blocks,
        num_chains=fitter.chains_for(blocks.num_blocks),
    )
    jit = jax.jit(fitter._fit, static_argnames=STATIC)
    lowered, lower_s = _cpu(lambda: jit.lower(key, *dynamic, **static))
    compiled, compile_s = _cpu(lambda: lowered.compile(compiler_options=options or None))
    run_s, result = [], None
    for seed in range(runs):
        result, seconds = _cpu(lambda s=seed: compiled(jax.random.PRNGKey(s), *dynamic))
        run_s.append(seconds)
    return lower_s, compile_s, run_s, result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="glmm", help="comma-separated: " + ",".join(_cases()))
    parser.add_argument("--options", default="once,emitters,default")
    parser.add_argument("--runs", type=int, default=2, help="compiled runs (0: compile only)")
    parser.add_argument("--max-iter", type=int, default=None, help="the fit's max_iter")
    parser.add_argument("--loop-only", action="store_true", help="no program after the loop")
    options = parser.parse_args()
    if options.loop_only:
        _without_after_loop()
    import jax

    jax.config.update("jax_enable_x64", True)
    cases = _cases()
    print(f"load average {os.getloadavg()[0]:.1f}; CPU s (process, every thread)")
    print(f"{'case':16}{'options':10}{'lower':>7}{'compile':>8}  run s per seed  | result")
    for name in options.cases.split(","):
        make_fitter, data, max_iter, tol = cases[name]
        args = data()
        for option in options.options.split(","):
            lower_s, compile_s, run_s, result = measure(
                make_fitter, args, options.max_iter or max_iter, tol, OPTIONS[option], options.runs
            )
            if result is None:  # --runs 0: compile only
                print(f"{name:16}{option:10}{lower_s:7.1f}{compile_s:8.1f}", flush=True)
                continue
            params = {k: np.round(np.asarray(v), 4).tolist() for k, v in result.params.items()}
            print(
                f"{name:16}{option:10}{lower_s:7.1f}{compile_s:8.1f}  "
                f"{' '.join(f'{s:.2f}' for s in run_s):15} | {params} "
                f"ll {float(result.log_likelihood):.3f} +- {float(result.log_likelihood_se):.3f} "
                f"({int(result.num_iters)} it, conv {bool(result.converged)}) "
                f"load {os.getloadavg()[0]:.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
