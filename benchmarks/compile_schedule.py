"""A cold ``EM.run``'s compile chain: CPU seconds per program, and its critical path.

``EM.run`` compiles its programs as a chain (``jaxem.compiling.compile_together``):
the main thread traces and lowers them one after another (the checks, the loop
while the checks compile, what follows the loop, the float64 recheck), and each
compiles on a thread of its own as soon as it is lowered. On a loaded machine the
wall time of that chain says little, so this script measures each stage's CPU
seconds instead, with the programs compiled one after another on the calling
thread (``compile_together`` replaced for the measurement): the main thread's
CPU seconds before the chain (the checks' trace and lowering, the structure, the
plan), the loop's trace and lowering (done while the checks compile), and each
program's trace, lowering and compilation (process CPU seconds: XLA compiles on
threads of its own). From them it models the chain's wall time on ``--cores``
idle cores (each thread runnable at once gets ``cores / threads`` of a core when
there are more threads than cores): the critical path that the first ``run``
waits for. The best of ``--repeats`` cold starts (each after
``jax.clear_caches()``, a new fitter) is kept, by the CPU seconds of the run. The
checks' own compilation is left out of the model: it runs while the loop is
traced, and is the shorter of the two.

Usage::

    python benchmarks/compile_schedule.py --models gmm,hmm,iohmm --repeats 2
"""

import argparse
import os
import sys
import time

import numpy as np


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="gmm,hmm,iohmm", help="of benchmarks/compile.py")
    parser.add_argument("--repeats", type=int, default=2, help="cold starts; the best is kept")
    parser.add_argument("--iters", type=int, default=20, help="EM iterations of the fit")
    parser.add_argument("--cores", type=float, default=2.0, help="cores of the modelled machine")
    return parser.parse_args(argv)


def modelled_wall(before, stages, cores=2.0):
    """The wall seconds of a chain on ``cores`` idle cores: the main thread runs
    ``before``, then each stage's ``(trace + lower)``; stage ``i``'s compilation
    (``stages[i][2]``) starts when its lowering ends. Threads share the cores
    equally when there are more of them than cores."""
    main = [before] + [trace + lower for trace, lower, _ in stages]
    starts = [None] + list(range(len(stages)))  # the compilation each main item starts
    now, item, left, compiling = 0.0, 0, main[0], []
    while item < len(main) or compiling:
        threads = (item < len(main)) + len(compiling)
        rate = min(1.0, cores / threads)
        step = min([left / rate] if item < len(main) else [np.inf])
        step = min([step] + [work / rate for work in compiling])
        now += step
        compiling = [work - step * rate for work in compiling if work - step * rate > 1e-9]
        if item < len(main):
            left -= step * rate
            if left <= 1e-9:
                if starts[item] is not None:
                    compiling.append(stages[starts[item]][2])
                item += 1
                left = main[item] if item < len(main) else 0.0
    return now


def measure(case, num_iters):
    """One cold run: ``(CPU s of the run, CPU s before the chain, [(program, trace,
    lower, compile)])``."""
    import jax

    import jaxem
    import jaxem.split_run as split_run

    record = {}

    def in_turn(*programs):  # compile_together, one program after another, timed
        record["chain"] = time.thread_time()
        outputs, rows = None, []
        for program in programs:
            start = time.process_time()
            staged = program(outputs)
            if staged is None:
                break
            traced = time.process_time()
            lowered = staged.lower() if hasattr(staged, "lower") else staged
            lowered_at = time.process_time()
            lowered.compile()
            name = getattr(staged, "fun_name", None) or lowered.as_text()[:60].split()[1][5:]
            compiled = time.process_time() - lowered_at
            rows.append([name, traced - start, lowered_at - traced, compiled])
            outputs = jax.tree.map(
                lambda i: jax.ShapeDtypeStruct(
                    i.shape, i.dtype, weak_type=getattr(i, "weak_type", False)
                ),
                staged.out_info,
            )
        record["rows"] = rows

    original = split_run.SplitRun._trace_loop_while_checking

    def loop_while_checking(self, *args, **kwargs):
        trace = original(self, *args, **kwargs)
        if trace is None:
            return None

        def timed():
            start = time.thread_time()
            trace()
            record["loop"] = time.thread_time() - start

        return timed

    jax.clear_caches()
    split_run.compile_together, saved = in_turn, split_run.compile_together
    split_run.SplitRun._trace_loop_while_checking = loop_while_checking
    try:
        em = jaxem.EM(case.model)
        start = time.thread_time()
        cpu = time.process_time()
        result = em.run(
            jax.random.PRNGKey(0), *case.args, max_iter=num_iters, tol=0.0,
            init_params=case.init_params,
        )  # fmt: skip
        jax.block_until_ready(result.params)
        cpu = time.process_time() - cpu
    finally:
        split_run.compile_together = saved
        split_run.SplitRun._trace_loop_while_checking = original
    rows = record["rows"]
    loop = record.get("loop", 0.0)
    rows[0][1] += loop  # the loop's trace and lowering, done while the checks compiled
    return cpu, record["chain"] - start - loop, rows


def main(argv=None):
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:0] = [here, os.path.dirname(here)]
    import compile as compile_benchmark

    names = [n for n in args.models.split(",") if n]
    cases = compile_benchmark.make_cases(names, np.float32)
    print(f"CPUs: {os.cpu_count()}, load average: {os.getloadavg()[0]:.2f}, iterations: "
          f"{args.iters}, best of {args.repeats}; CPU s")  # fmt: skip
    for name in names:
        cpu, before, rows = min(
            (measure(cases[name], args.iters) for _ in range(args.repeats)), key=lambda m: m[0]
        )
        wall = modelled_wall(before, [row[1:] for row in rows], args.cores)
        print(f"{name}: run {cpu:.2f}, main thread before the chain {before:.2f}; "
              f"modelled wall on {args.cores:g} idle cores {wall:.2f}")  # fmt: skip
        for program, trace, lower, compile_s in rows:
            print(f"  {program or '?':24s} trace {trace:5.2f} lower {lower:5.2f} "
                  f"compile {compile_s:5.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
