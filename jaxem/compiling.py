"""Programs compiled for one evaluation: the checks before a fit and after it.

The validation of a model's data and initial values, the M-step plan's probes
and the float64 recheck of a fitted log-likelihood each run once per model and
argument signature, on a fit's first ``run``. Their compile time is all a user
waits for; how fast the code runs does not matter. They are compiled without
XLA's backend optimizations (LLVM at ``-O0`` on CPU and GPU), which shortens
their compile time; their values can differ from an optimized program's in the
last bits (LLVM's optimizations contract and reorder floating-point
operations), which a check need not care about. On a CPU they are also compiled without XLA's fusion
emitters (the older LLVM IR emitters instead), which shortens it again. (Both
were measured once, on a Gaussian mixture's data check, when each change was
made; no command in the repository reproduces the numbers, so none is given.)

A fit's first ``run`` compiles three programs: its loop, the evaluation after
it (the last state's E-step, the stationarity test, the supports) and, for a
float32 fit, the float64 recheck of the result (`jaxem.precision`).
`compile_together` traces and lowers them one after another on the calling
thread and compiles each on a thread of its own as soon as it is lowered (XLA
releases the GIL while it compiles), so that a machine with two cores traces the
evaluation while the loop compiles, and the recheck while the evaluation
compiles, rather than doing all of it in turn; the loop itself is traced while
the checks before the fit compile (`jaxem.checks.validate`'s ``meanwhile``), which
then run and raise before anything else runs. The evaluation after the loop
runs once per fit. On small data (`SMALL_DATA`: at most 100 000 numbers over
the restarts) it is compiled with `once_options` (no backend optimization, and
on a CPU the older emitters), which compiles it in about half the CPU time for
a run a few milliseconds longer: on the scan Gaussian HMM of
``benchmarks/compile.py`` (2 000 numbers) in 2.0 rather than 4.5 CPU s, a run
of 6.4 rather than 3.4 ms, the same values to the bit (``python
benchmarks/compile_programs.py --models hmm --options default,emitters``, best
of 2, load average 12-19 on 2 cores); on the full-covariance Gaussian mixture of
the same benchmark (K = 3, D = 2), in 0.7 rather than 1.7 CPU s, for a run of 35
rather than 18 ms at 10 000 x 2 numbers (``python benchmarks/compile_programs.py
--models gmm --options default,loop-emitters`` before the limit was raised from
10 000, which gave this mixture's the older emitters only, on the critical path
of its first ``run``), 185 rather than 96 at 50 000 x 2 and 644 rather than 386
at 200 000 x 2 (``compile_programs.measure`` on ``common.sample_gmm`` data of
those sizes), the same log-likelihood to the bit (best of 2 cold starts, load
average 5-6). On more data it is compiled with the older emitters only
(`emitter_options`): without backend optimization its run grows with the data
(``benchmarks/gmm.py``'s 100 000 x 16 diagonal mixture from 49-52 to 217 ms per
iteration, 50 iterations, load average ~15), and the sizes of
``benchmarks/gmm.py`` and ``benchmarks/hmm.py`` run as fast as before. Its
largest part is the stationarity test (`jaxem.stationarity.stationarity`: a scan of one value and
gradient of Q), run on one flat vector of the params rather than per param,
which keeps its program small.

The fit's loop is compiled by `loop_options`, a rule of its work: ``W`` = numbers
in the data x restarts x ``max_iter`` (the most the loop can run), x
`ITERATING_WEIGHT` (300) when a step runs an inner optimizer (a gradient-path
param, a guide). Up to `SMALL_WORK` (10^7) it is compiled with `once_options`, up
to `LARGE_WORK` (5 x 10^7) with `emitter_options`, above it with XLA's defaults;
a Markov chain (a ``scan``) never gets the defaults: its loop compiled with the
older emitters was as fast or faster at every size measured (the scan Gaussian HMM
of ``benchmarks/compile.py``: 43 against 47 ms per 100 iterations; of
``benchmarks/hmm.py``, 1 000 x 100, float32: 469 -> 232 ms per iteration in one
earlier measurement, and 143-206 against 129-186 ms, within the noise, in three
runs each under load average 10: ``benchmarks/README.md``). The
thresholds are where the compile CPU seconds saved equal the run time lost over
``max_iter`` iterations, per number of data, on ``python
benchmarks/compile_programs.py --options default,loop-emitters,loop-O0,loop-once``
(the loop compiled with XLA's defaults / the older emitters / both switches;
compile CPU s / run ms; gmm and hmm measured before this rule with ``--models
gmm,hmm --iters 100``, moe, zip and student at commit 98acfeb with ``--models
moe,zip,student --iters 20 --repeats 1``, load average 7-18 on 2 cores):

| model | iterations | defaults | emitters | once | break-even W |
|---|---:|---:|---:|---:|---|
| gmm | 100 | 2.40 / 67 | 0.93 / 89 | 0.48 / 127 | 2.4e7 once/emitters, 1.3e8 emitters/defaults |
| hmm | 100 | 6.20 / 47 | 3.05 / 43 | 1.48 / 75 | 1.0e7 once/emitters |
| moe | 20 | 5.41 / 660 | 3.74 / 786 | 1.33 / 696 | 1.8e7 once/defaults |
| zip | 20 | 4.06 / 288 | 2.72 / 176 | 1.03 / 579 | 6.7e5 once/emitters |
| student | 20 | 5.79 / 244 | 5.59 / 181 | 2.55 / 3876 | 3.3e4 once/emitters |

(break-even W: compile s saved / run s lost per iteration x numbers of data; gmm:
20 000 numbers, hmm and student 2 000, moe and zip 8 000.) `SMALL_WORK` is the
closed-form break-evens (gmm, hmm); `ITERATING_WEIGHT` brings the worst loop with
an inner optimizer measured (the Student-t mixture: its L-BFGS steps evaluate
``lgamma``/``digamma`` many times, which run 16x slower without backend
optimization) to it. `LARGE_WORK` is below the break-even of the Gaussian mixture
(1.3e8, measured at 10 000 x 2): the 100 000 x 16 mixtures of ``benchmarks/gmm.py``
(8e7) keep XLA's defaults, as before; the older emitters' run cost at that size
was not measured. On ``moe`` the older emitters ran 19 % slower than the defaults
(one noisy run); with the weight its loops above 1.7e5 numbers x iterations get
the defaults. The work counts numbers of data, not what each costs: a model with
many states or dimensions per number loses more per iteration than the models
above (``benchmarks/hmm.py``'s 100 x 20 HMM, K = 8, D = 8, lost little: 7.0 -> 7.4 ms
per iteration). The facts are read from what tracing the loop left in the caches
(`OptionJits`: the loop is traced once, by a ``jit`` without options, and the
``jit`` of the options chosen finds that trace in JAX's cache), not from a trace
of their own: the model's chain (`jaxem.built.BuiltModel.has_chain`) and the
plans' gradient paths (`jaxem.fitter_m_step.MStep.iterates`). ``EM.run`` and
``VariationalEM.run`` (one program, loop and evaluation after it) use the rule
for one run: a program run again and again with the same shapes (a simulation
study, a bootstrap) keeps the options of its first run's work (compiling it again
with better options once many runs have added up was tried, but made the second
call of a fit pay a compilation, which a user does not expect of a warm call);
under a user's ``jit`` or ``vmap`` the enclosing program's options apply;
``update`` (and so `jaxem.OnlineEM`, which compiles no loop) and
`jaxem.VariationalBayesEM` keep XLA's defaults.

A Monte Carlo fit (`jaxem.SAEM`, `jaxem.MCEM`) is one program, loop and
importance sampling together, compiled by `monte_carlo_options`, a rule of its
work ``W`` (`monte_carlo_work`): numbers in the data x chains x the MCMC
transitions a chain is expected to make (SAEM: ``max_iter`` x ``num_mcmc_steps``,
which it makes; MCEM: its growing sample sizes up to ``max_draws``, then three
iterations at ``max_draws``, the least its stopping rule needs; plus the
``num_is_draws`` at the fitted params). Every transition evaluates the model's
density and gradient at each leapfrog step of NUTS or HMC, so the run lost
without backend optimization grows with ``W``, while the compile time saved
hardly does (it is the sampler's and M-step's program, whatever the data).
Up to `SMALL_SAMPLING_WORK` (5 x 10^6) it is compiled with `once_options`,
above it with `emitter_options`; XLA's defaults never won. Measured with
``python benchmarks/compile_monte_carlo.py --cases cbpp,sleepstudy,glmm``
(compile CPU s / run CPU s of the second seed, each after ``jax.clear_caches()``;
SAEM with 200 iterations on cbpp and sleepstudy, ``schedule=(100, 50)`` on the
GLMM of ``benchmarks/mixed_models.py``; load average 8-11 on 2 cores):

| case | W | once | emitters | defaults |
|---|---:|---:|---:|---:|
| cbpp (56 x 4 numbers, 4 chains) | 4.0e5 | 6.8 / 0.35 | 16.1 / 0.12 | 19.0 / 0.10 |
| sleepstudy (180 x 3 numbers, 3 chains) | 7.3e5 | 8.4 / 2.25 | 19.1 / 0.68 | 27.5 / 0.71 |
| GLMM (20 000 x 3 numbers, 1 chain) | 2.4e7 | 4.7 / 26.9 | 11.0 / 7.3 | 17.0 / 6.7 |

The break-evens (compile CPU s saved / run CPU s lost, times ``W``): the GLMM
7.7e6, sleepstudy 5.0e6, cbpp 1.6e7, and sleepstudy's MCEM (``python
benchmarks/compile_monte_carlo.py --cases sleepstudy-mcem``, ``max_draws=200``, 17
iterations run: 1 476 transitions per chain and 250 final, W 3.7e6) 6.4e6:
`once_options` compiled it in 6.5 rather than 16.0 CPU s and ran it in 8.8 rather
than 3.3. `SMALL_SAMPLING_WORK` is the lowest of them. MCEM's ``W`` was once its
bound, ``max_iter`` x ``max_draws`` per chain (6.5e7 on sleepstudy): its stopping
rule usually holds soon after the growth, and that fit took the older emitters and
a first call 4 CPU s longer. An MCEM fit that runs many iterations at
``max_draws`` pays for the estimate in run time: sleepstudy's, run to
``max_iter=60``, makes 10 076 transitions per chain, seven times the 1 476
expected, each about 2.7 times as costly without backend optimization (8.8 / 3.3
above). The older emitters with
``xla_backend_optimization_level=1`` (``python benchmarks/compile_monte_carlo.py
--options O1``) compiled the GLMM's fit in 9.1 CPU s for a run of 8.1 (one
measurement, load 12): within the noise of the older emitters alone. The fits'
results agree to the digits printed on cbpp and the GLMM; on sleepstudy the chains
part after the last bits differ and the fit lands elsewhere within its Monte Carlo
error (``beta`` 251.35 and 251.57, the MLE 251.41).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable

import jax

__all__ = [
    "EMITTER_OPTIONS",
    "ONCE_OPTIONS",
    "LARGE_WORK",
    "SMALL_DATA",
    "SMALL_WORK",
    "ITERATING_WEIGHT",
    "OptionJits",
    "after_loop_options",
    "compile_once",
    "compile_together",
    "data_size",
    "emitter_options",
    "jit_once",
    "loop_options",
    "loop_work",
    "monte_carlo_options",
    "monte_carlo_work",
    "once_options",
    "SMALL_SAMPLING_WORK",
]

# XLA options of a program evaluated once: no backend optimization passes.
ONCE_OPTIONS = {"xla_backend_optimization_level": 0}

# XLA options on a CPU of a program run once and of a Monte Carlo fit: the LLVM IR
# emitters rather than the fusion emitters (same arithmetic, compiled faster).
EMITTER_OPTIONS = {"xla_cpu_use_fusion_emitters": False}

# At most this many numbers in a fit's data arrays (times its restarts): its evaluation
# after the loop is compiled with once_options (see the module's docstring).
SMALL_DATA = 100_000

# A fit loop's work (`loop_work`: numbers of data x restarts x max_iter, x
# ITERATING_WEIGHT when a step runs an inner optimizer) at most SMALL_WORK: its loop
# is compiled with once_options; at most LARGE_WORK, or any work for a Markov chain:
# emitter_options; above it: XLA's defaults. Fitted in the module's docstring.
SMALL_WORK = 10_000_000
LARGE_WORK = 50_000_000
ITERATING_WEIGHT = 300

# A Monte Carlo fit's work (`monte_carlo_work`: numbers of data x chains x MCMC
# transitions) at most SMALL_SAMPLING_WORK: its program is compiled with
# once_options, else emitter_options (module docstring).
SMALL_SAMPLING_WORK = 5_000_000

# Platforms whose XLA compiler takes ONCE_OPTIONS (a plugin may refuse an option it
# does not know).
_PLATFORMS = ("cpu", "gpu", "cuda", "rocm")


def once_options() -> dict:
    """`ONCE_OPTIONS` on CPU and GPU (with `EMITTER_OPTIONS` on CPU), else none."""
    if jax.default_backend() not in _PLATFORMS:
        return {}
    return {**ONCE_OPTIONS, **emitter_options()}


def emitter_options() -> dict:
    """`EMITTER_OPTIONS` on CPU, else none."""
    return dict(EMITTER_OPTIONS) if jax.default_backend() == "cpu" else {}


def data_size(arrays) -> int:
    """How many numbers the data ``arrays`` (a pytree) hold."""
    return sum(int(getattr(x, "size", 1)) for x in jax.tree.leaves(arrays))


def after_loop_options(arrays, num_restarts: int = 1) -> dict:
    """XLA options of the evaluation after a fit's loop on the data ``arrays`` (a
    pytree): `once_options` when they hold at most `SMALL_DATA` numbers times
    ``num_restarts``, else `emitter_options`."""
    small = data_size(arrays) * num_restarts <= SMALL_DATA
    return once_options() if small else emitter_options()


def loop_work(arrays, num_restarts: int, max_iter: int, *, iterates: bool = False) -> int:
    """A fit loop's work: numbers in the data ``arrays`` x ``num_restarts`` x
    ``max_iter``, x `ITERATING_WEIGHT` when a step ``iterates`` (runs an inner
    optimizer)."""
    weight = ITERATING_WEIGHT if iterates else 1
    return data_size(arrays) * int(num_restarts) * int(max_iter) * weight


def loop_options(
    arrays, num_restarts: int, max_iter: int, *, chain: bool = False, iterates: bool = False
) -> dict:
    """XLA options of a fit's loop (see the module's docstring), by its work
    (`loop_work`): `once_options` up to `SMALL_WORK`, `emitter_options` up to
    `LARGE_WORK` and, for a Markov chain (``chain``), above it too; XLA's defaults
    above it otherwise."""
    work = loop_work(arrays, num_restarts, max_iter, iterates=iterates)
    if work <= SMALL_WORK:
        return once_options()
    if chain or work <= LARGE_WORK:
        return emitter_options()
    return {}


class OptionJits:
    """``jax.jit(fn, static_argnames=...)``, one per set of XLA options, and the set
    each call signature was given.

    `for_call` traces a signature's first call with the default ``jit`` (``base``),
    which runs ``fn``'s Python once and fills the caches the options are chosen
    from; the ``jit`` of the options chosen then finds that trace in JAX's cache
    (keyed on ``fn`` and the arguments, not on the compiler options), so nothing
    is traced twice. ``fn`` is held once: JAX's caches compare it by identity.
    """

    def __init__(self, fn: Callable, static_argnames: tuple):
        self.fn = fn
        self.static_argnames = static_argnames
        self.base = jax.jit(fn, static_argnames=static_argnames)
        self._jits: dict = {}  # {XLA options as sorted items: jit}, as asked for
        self.chosen: dict = {}  # {call signature: the XLA options chosen}

    def with_options(self, options: dict):
        """The ``jit`` compiled with ``options`` (``base`` for none)."""
        key = tuple(sorted(options.items()))
        jit = self._jits.get(key)
        if jit is None:
            jit = self.base
            if key:
                jit = jax.jit(
                    self.fn, static_argnames=self.static_argnames, compiler_options=dict(options)
                )
            self._jits[key] = jit
        return jit

    @property
    def made(self) -> list:
        """The option sets asked for so far (as sorted items), in order."""
        return list(self._jits)

    def for_call(self, args: tuple, kwargs: dict, choose: Callable[[], dict]):
        """The ``jit`` for ``fn(*args, **kwargs)``: on a signature's first call, traced
        by ``base`` and then given ``choose()``'s options (a ``base`` that fails to
        trace is returned as it is: its call raises as usual)."""
        signature = call_signature(args, kwargs)
        options = self.chosen.get(signature)
        if options is None:
            try:
                self.base.trace(*args, **kwargs)
            except Exception:  # noqa: BLE001
                return self.base  # the call traces it again and raises there
            options = self.chosen[signature] = choose()
        return self.with_options(options)


def call_signature(args: tuple, kwargs: dict) -> tuple:
    """What ``jit`` compiles a call for: ``args``' tree, abstract values and
    shardings, and ``kwargs`` (static, hashable)."""
    leaves, tree = jax.tree.flatten(args)
    return (
        tree,
        tuple((jax.typeof(x), getattr(x, "sharding", None)) for x in leaves),
        tuple(sorted(kwargs.items())),
    )


def monte_carlo_work(arrays, num_chains: int, num_transitions: int) -> int:
    """A Monte Carlo fit's work: numbers in the data ``arrays`` (a pytree) x
    ``num_chains`` x ``num_transitions`` (the most MCMC transitions per chain)."""
    return data_size(arrays) * int(num_chains) * int(num_transitions)


def monte_carlo_options(arrays, num_chains: int, num_transitions: int) -> dict:
    """XLA options of a Monte Carlo fit's program (see the module's docstring):
    `once_options` when its `monte_carlo_work` is at most `SMALL_SAMPLING_WORK`,
    else `emitter_options`."""
    work = monte_carlo_work(arrays, num_chains, num_transitions)
    return once_options() if work <= SMALL_SAMPLING_WORK else emitter_options()


def jit_once(fn: Callable, **jit_kwargs) -> Callable:
    """``jax.jit(fn, **jit_kwargs)`` compiled with `once_options` (chosen at the
    first call, when the backend is known). Its ``trace`` is the ``jit``'s: a
    program traced, lowered and compiled from it ahead of a call (`compile_together`)
    is the one the call finds in the cache."""
    jits: list = []

    def the_jit():
        if not jits:
            jits.append(jax.jit(fn, compiler_options=once_options() or None, **jit_kwargs))
        return jits[0]

    @functools.wraps(fn)
    def call(*args, **kwargs):
        return the_jit()(*args, **kwargs)

    call.trace = lambda *args, **kwargs: the_jit().trace(*args, **kwargs)
    return call


def compile_once(lowered):
    """``lowered.compile()`` (a ``jax.stages.Lowered``) with `once_options`."""
    return lowered.compile(compiler_options=once_options() or None)


def compile_together(*programs):
    """Compile ``programs`` concurrently, leaving them in their ``jit``'s caches:
    each is traced and lowered on this thread, one after another, and compiled on a
    thread of its own as soon as it is lowered (XLA releases the GIL while it
    compiles), so that this thread traces the next program while the previous ones
    compile; returns once all are compiled. Nothing is run.

    Each of ``programs`` is a function of the previous program's outputs (as
    ``jax.ShapeDtypeStruct``, weak types kept; None for the first) that traces its
    program and returns the ``jax.stages.Traced`` (``jit.trace(...)``) or the
    ``jax.stages.Lowered`` (one that must be lowered under a context of its own,
    x64, say), or None: nothing to compile, nor after it. A program that fails to
    trace, lower or compile here is left to its call, which compiles it again and
    raises as usual; the programs after it are not compiled."""
    workers = []
    outputs = None
    try:
        for program in programs:
            try:
                staged = program(outputs)
                if staged is None:
                    break
                lowered = staged.lower() if hasattr(staged, "lower") else staged
            except Exception:  # noqa: BLE001
                break  # the call traces it again and raises there
            worker = threading.Thread(target=_quietly(lowered.compile), daemon=True)
            worker.start()
            workers.append(worker)
            # The traced outputs keep their weak types (a lowered program's do not).
            outputs = jax.tree.map(_struct, staged.out_info)
    finally:
        for worker in workers:
            worker.join()


def _struct(info):
    return jax.ShapeDtypeStruct(
        info.shape,
        info.dtype,
        weak_type=getattr(info, "weak_type", False),
        sharding=getattr(info, "sharding", None),
    )


def _quietly(fn):
    def call():
        try:
            fn()
        except Exception:  # noqa: BLE001
            pass  # the call compiles it again and raises there

    return call
