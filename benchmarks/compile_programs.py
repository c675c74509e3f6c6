"""CPU seconds to compile a fit's two programs, per set of XLA options, and their runtime.

``EM.run`` compiles a fit as two programs (``jaxem.driver``): the loop, and the
evaluation after it (the last state's E-step, the stationarity test, the
supports). For each model of ``benchmarks/compile.py`` (the same data and
initial parameters) and each set of XLA options below, this script traces,
lowers and compiles both programs the way ``run`` does, one after the other on
one thread, and reports the process CPU seconds of each stage
(``time.process_time``, best of ``--repeats`` cold starts, each after
``jax.clear_caches()``), the best of 5 warm wall-clock runs of each compiled
program, and the fit's log-likelihood (the values are compared across option
sets: same options, same bits).

Option sets (``loop`` / ``after loop``):

* ``default``: XLA's defaults / ``after_loop_options`` (on a CPU with at most
  ``SMALL_DATA`` numbers of data ``xla_backend_optimization_level=0`` and the
  older emitters, else the older emitters only). ``run`` compiles the loop with
  ``jaxem.compiling.loop_options``: the loop options of ``default``,
  ``loop-emitters`` or ``loop-once``, by the fit's work.
* ``emitters``: XLA's defaults / the older emitters only.
* ``loop-emitters``: the older emitters / ``once_options``.
* ``loop-O0``: ``xla_backend_optimization_level=0`` / ``once_options``.
* ``loop-once``: ``once_options`` for both.
* ``after-O1``: XLA's defaults / the older emitters and
  ``xla_backend_optimization_level=1``.

Usage::

    python benchmarks/compile_programs.py --models gmm,hmm --repeats 2
    python benchmarks/compile_programs.py --models gmm --iters 200 --options default,loop-once
"""

import argparse
import json
import os
import sys
import time

import numpy as np

OLDER_EMITTERS = {"xla_cpu_use_fusion_emitters": False}
NO_BACKEND_OPT = {"xla_backend_optimization_level": 0}
ONCE = {**NO_BACKEND_OPT, **OLDER_EMITTERS}
OPTIONS = {
    "default": ({}, None),  # None: jaxem.compiling.after_loop_options
    "emitters": ({}, OLDER_EMITTERS),
    "loop-emitters": (OLDER_EMITTERS, ONCE),
    "loop-O0": (NO_BACKEND_OPT, ONCE),
    "loop-once": (ONCE, ONCE),
    "after-O1": ({}, {**OLDER_EMITTERS, "xla_backend_optimization_level": 1}),
}
STATIC = ("spec", "max_iter", "num_restarts", "progress_bar", "batch_restarts")


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="gmm,moe,student,hmm", help="of benchmarks/compile.py")
    parser.add_argument("--options", default=",".join(OPTIONS), help="comma-separated option sets")
    parser.add_argument("--repeats", type=int, default=2, help="cold starts; the best is kept")
    parser.add_argument("--iters", type=int, default=20, help="EM iterations of the loop")
    return parser.parse_args(argv)


def _cpu(fn):
    start = time.process_time()
    out = fn()
    return out, time.process_time() - start


def _best_wall(fn, repeats=5):
    import jax

    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def measure(case, loop_options, after_options, num_iters):
    """One cold start: CPU seconds of each stage of both programs, their warm wall
    seconds and the fit's log-likelihood."""
    import jax

    import jaxem
    from jaxem.arguments import split_args
    from jaxem.compiling import after_loop_options

    jax.clear_caches()
    key = jax.random.PRNGKey(0)
    em = jaxem.EM(case.model)
    arrays, spec = split_args(case.args, {})
    init = None if case.init_params is None else dict(case.init_params)
    em.m_step_settings.validate(key, arrays, spec, init)
    tol = np.asarray(0.0, np.float32)
    args = (key, arrays, init, tol)
    if after_options is None:
        after_options = after_loop_options(arrays)
    loop_kwargs = dict(
        spec=spec, max_iter=num_iters, num_restarts=1, progress_bar=False, batch_restarts=True
    )
    after_kwargs = dict(spec=spec, batch_restarts=True)
    loop_jit = jax.jit(em._loop_arrays, static_argnames=STATIC)
    after_jit = jax.jit(em._finish_arrays, static_argnames=("spec", "batch_restarts"))
    row = {}
    traced, row["loop_trace"] = _cpu(lambda: loop_jit.trace(*args, **loop_kwargs))
    lowered, row["loop_lower"] = _cpu(traced.lower)
    loop, row["loop_compile"] = _cpu(lambda: lowered.compile(compiler_options=loop_options or None))
    outputs = jax.tree.map(
        lambda i: jax.ShapeDtypeStruct(i.shape, i.dtype, weak_type=getattr(i, "weak_type", False)),
        traced.out_info,
    )
    traced, row["after_trace"] = _cpu(lambda: after_jit.trace(outputs, arrays, tol, **after_kwargs))
    lowered, row["after_lower"] = _cpu(traced.lower)
    after, row["after_compile"] = _cpu(
        lambda: lowered.compile(compiler_options=after_options or None)
    )
    loops = loop(*args)
    row["loop_run"] = _best_wall(lambda: loop(*args))
    row["after_run"] = _best_wall(lambda: after(loops, arrays, tol))
    result, _ = after(loops, arrays, tol)
    row["log_likelihood"] = float(np.ravel(result.log_likelihood)[0])
    return row


def main(argv=None):
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:0] = [here, os.path.dirname(here)]
    import compile as compile_benchmark

    names = [n for n in args.models.split(",") if n]
    cases = compile_benchmark.make_cases(names, "float32")
    print(f"CPUs: {os.cpu_count()}, load average: {os.getloadavg()[0]:.2f}, iterations: "
          f"{args.iters}, repeats: {args.repeats}; CPU s (compile), wall ms (run)")  # fmt: skip
    print(f"{'model':8s} {'options':14s} {'loop lower':>10s} {'compile':>8s} {'run ms':>7s} | "
          f"{'after lower':>11s} {'compile':>8s} {'run ms':>7s} | log-likelihood")  # fmt: skip
    for name, case in cases.items():
        for option in args.options.split(","):
            rows = [measure(case, *OPTIONS[option], args.iters) for _ in range(args.repeats)]
            best = {k: min(r[k] for r in rows) for k in rows[0] if k != "log_likelihood"}
            lls = sorted({r["log_likelihood"] for r in rows})
            print(
                f"{name:8s} {option:14s} {best['loop_trace'] + best['loop_lower']:10.2f} "
                f"{best['loop_compile']:8.2f} {1e3 * best['loop_run']:7.1f} | "
                f"{best['after_trace'] + best['after_lower']:11.2f} {best['after_compile']:8.2f} "
                f"{1e3 * best['after_run']:7.1f} | {' '.join(f'{v!r}' for v in lls)}",
                flush=True,
            )
            print("# " + json.dumps({"model": name, "options": option, **best, "lls": lls}))
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
