"""A fit split in two compiled programs, compiled together with its float64 recheck.

`jaxem.driver.Fitter` runs a fit whose subclass gives ``_loop_one`` and
``_finish_one`` (`jaxem.em.EM`) as two programs: every restart's loop
(`SplitRun._loop_arrays`), then every restart's evaluation after its loop and
the best one kept (`SplitRun._finish_arrays`). On the first call with a signature
they and the float64 recheck of the result (`jaxem.precision.recheck_program`)
are compiled together (`jaxem.compiling.compile_together`), so that the first
``run`` waits for little more than the largest of them rather than their sum;
the loop is traced while the checks before the fit compile
(`SplitRun._trace_loop_while_checking`, `jaxem.checks.validate`'s ``meanwhile``).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxem.arguments import merge_args
from jaxem.batching import map_restarts
from jaxem.compiling import after_loop_options, call_signature, compile_together
from jaxem.inspection import model_structure
from jaxem.precision import recheck_program

__all__ = ["SplitRun"]


class SplitRun:
    """The two programs of a split fit, for `jaxem.driver.Fitter` (which sets
    ``_loop_jits``, ``_finish_jits``, ``_compiled_together``, and gives
    ``_keep_best``, ``_loop_options``, ``m_step_settings`` and ``hard``)."""

    _loop_one = None
    _finish_one = None

    def _loop_arrays(
        self, rng_key, arrays, init_params, tol, *, spec, max_iter, num_restarts, progress_bar,
        batch_restarts=True,
    ):  # fmt: skip
        """Every restart's ``_loop_one``, stacked on a leading restart axis."""

        def loop(key):
            return self._loop_one(key, arrays, init_params, tol, spec, max_iter, progress_bar)

        if num_restarts == 1:  # the key itself, as in best_restart
            return jax.tree.map(lambda x: jnp.asarray(x)[None], loop(rng_key))
        keys = jax.random.split(rng_key, num_restarts)
        return map_restarts(loop, keys, batched=batch_restarts)

    def _finish_arrays(self, loops, arrays, tol, *, spec, batch_restarts=True):
        """Every restart's ``_finish_one`` after `_loop_arrays`, the best kept (as
        `_run_arrays`)."""

        def finish(loop):
            return self._finish_one(loop, arrays, tol, spec)

        if jax.tree.leaves(loops)[0].shape[0] == 1:
            fits = jax.tree.map(lambda x: x[None], finish(jax.tree.map(lambda x: x[0], loops)))
        else:
            fits = map_restarts(finish, loops, batched=batch_restarts)
        return self._keep_best(fits)

    def _run_in_two(self, rng_key, *, arrays, init_params, tol, spec, num_restarts, **static):
        """`_run_arrays` as two compiled programs (`_loop_arrays`, `_finish_arrays`),
        compiled together on the first call with a signature."""
        loop_jit, args, loop_kwargs = self._loop_program(
            rng_key, arrays, init_params, tol, spec, num_restarts, **static
        )
        finish_kwargs = dict(spec=spec, batch_restarts=static["batch_restarts"])
        finish_jit = self._finish_jits.with_options(after_loop_options(arrays, num_restarts))
        signature = call_signature(args, loop_kwargs)
        if signature not in self._compiled_together:
            compile_together(
                lambda _: loop_jit.trace(*args, **loop_kwargs),
                lambda loops: finish_jit.trace(loops, arrays, tol, **finish_kwargs),
                lambda fit: self._recheck_program(fit[0], arrays, spec),
            )
            self._compiled_together.add(signature)
        loops = loop_jit(*args, **loop_kwargs)
        return finish_jit(loops, arrays, tol, **finish_kwargs)

    def _loop_program(self, rng_key, arrays, init_params, tol, spec, num_restarts, **static):
        """``(jit, args, kwargs)`` of `_loop_arrays` for this call, the ``jit`` of the
        options chosen on its signature's first call (`OptionJits.for_call`)."""
        args = (rng_key, arrays, init_params, tol)
        kwargs = dict(spec=spec, num_restarts=num_restarts, **static)
        choose = partial(self._loop_options, arrays, num_restarts, static["max_iter"])
        return self._loop_jits.for_call(args, kwargs, choose), args, kwargs

    def _trace_loop_while_checking(self, rng_key, arrays, init_params, tol, spec, num_restarts,
                                   max_iter, progress_bar, batch_restarts):  # fmt: skip
        """``run``'s loop traced and lowered, a function for the checks to call while
        their program compiles (`jaxem.checks.validate`'s ``meanwhile``): the fit's
        first programs are then ready when the checks have passed. None where the
        call is not known before the checks: a fit in one program, restarts whose
        batching ``run`` has to choose."""
        args = (rng_key, arrays, init_params, np.asarray(tol, jnp.result_type(float)))
        traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(args))
        if traced or self._loop_one is None or (num_restarts > 1 and batch_restarts is None):
            return None
        batch = bool(True if batch_restarts is None else batch_restarts)
        static = dict(max_iter=int(max_iter), progress_bar=bool(progress_bar), batch_restarts=batch)
        restarts = int(num_restarts) if batch else 1  # one by one: one each
        kwargs = dict(spec=spec, num_restarts=restarts, **static)
        try:
            if call_signature(args, kwargs) in self._compiled_together:
                return None  # compiled already
        except TypeError:
            return None  # not JAX values (a callable initial value): the checks raise

        def trace():
            loop_jit, _, kwargs = self._loop_program(*args, spec, restarts, **static)
            loop_jit.trace(*args, **kwargs).lower()

        return trace

    def _recheck_program(self, result, arrays, spec):
        """The float64 recheck's program (`jaxem.precision.recheck_program`) of a fit
        whose result has the shapes of ``result``: compiled with the fit's."""
        if result.log_likelihood is None:
            return None
        model = self.m_step_settings.model
        nesting = model_structure(model, *merge_args(arrays, spec)).max_plate_nesting
        return recheck_program(
            model, result.params, result.log_likelihood, arrays, spec, hard=self.hard,
            max_plate_nesting=nesting,
        )  # fmt: skip
