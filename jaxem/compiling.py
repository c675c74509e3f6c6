"""Programs compiled for one evaluation: the checks before a fit and after it.

The validation of a model's data and initial values, the M-step plan's probes
and the float64 recheck of a fitted log-likelihood each run once per model and
argument signature, on a fit's first ``run``. Their compile time is all a user
waits for; how fast the code runs does not matter. They are compiled without
XLA's backend optimizations (LLVM at ``-O0`` on CPU and GPU), which cuts their
compile time by about a third (a Gaussian mixture's data check: 0.80 s to
0.49 s of CPU time) and leaves the arithmetic as it is. The compiled fit loop
is compiled as usual.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax

__all__ = ["ONCE_OPTIONS", "compile_once", "jit_once", "once_options"]

# XLA options of a program evaluated once: no backend optimization passes.
ONCE_OPTIONS = {"xla_backend_optimization_level": 0}

# Platforms whose XLA compiler takes ONCE_OPTIONS (a plugin may refuse an option it
# does not know).
_PLATFORMS = ("cpu", "gpu", "cuda", "rocm")


def once_options() -> dict:
    """`ONCE_OPTIONS` on CPU and GPU, else none."""
    return dict(ONCE_OPTIONS) if jax.default_backend() in _PLATFORMS else {}


def jit_once(fn: Callable, **jit_kwargs) -> Callable:
    """``jax.jit(fn, **jit_kwargs)`` compiled with `once_options` (chosen at the
    first call, when the backend is known)."""
    compiled = None

    @functools.wraps(fn)
    def call(*args, **kwargs):
        nonlocal compiled
        if compiled is None:
            compiled = jax.jit(fn, compiler_options=once_options() or None, **jit_kwargs)
        return compiled(*args, **kwargs)

    return call


def compile_once(lowered):
    """``lowered.compile()`` (a ``jax.stages.Lowered``) with `once_options`."""
    return lowered.compile(compiler_options=once_options() or None)
