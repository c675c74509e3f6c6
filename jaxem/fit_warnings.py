"""The warnings a fit ends with: a `ConvergenceWarning` that says why a result is
doubtful (it diverged, reached ``max_iter``, or stopped away from a stationary
point) and what to change. One place for the text of each, for every fitter."""

from __future__ import annotations

import os
import sys
import warnings

import jax
import numpy as np

from jaxem.exceptions import ConvergenceWarning

__all__ = ["user_stacklevel", "warn_about_fit", "warn_about_vb_fit"]

_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the user's line: the caller of the
    outermost jaxem frame on the stack, however deep in jaxem (and in JAX's tracing)
    the warning is raised. For ``warnings.warn`` called by the function that calls
    this."""
    frame, level, outermost = sys._getframe(1), 1, 1
    while frame is not None:
        if os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE + os.sep):
            outermost = level
        frame, level = frame.f_back, level + 1
    return outermost + 1


def warn_about_fit(result, *, name: str, objective: str, max_iter: int, tol: float) -> None:
    """Emit a `ConvergenceWarning` when the kept restart of
    ``result`` diverged, reached ``max_iter`` (``tol > 0``) or stopped away from a
    stationary point. Nothing under ``jit``/``vmap`` (the values are not known)."""
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(result)):
        return
    num_restarts = int(np.size(result.restart_diverged))
    num_diverged = int(np.sum(np.asarray(result.restart_diverged)))
    n = int(result.num_iters)
    kept = (
        f" (the best of {num_restarts} restarts; {num_diverged} diverged)"
        if num_restarts > 1
        else ""
    )
    if bool(result.diverged):
        which = f"all {num_restarts} restarts" if num_restarts > 1 else name
        warnings.warn(
            f"jaxem: {which} diverged: after {n} iterations the {objective} or a parameter "
            "became non-finite, or the " + objective + " jumped beyond what an EM step can "
            "reach (a density evaluated where it breaks down: a variance collapsing to 0, a "
            "free shape parameter running off). The result holds the last parameters before "
            "it. Keep the parameters away from the degenerate values (reg_covar > 0, bounds "
            "in the constraints, frozen shape parameters), start elsewhere (init_params), or "
            "use num_restarts > 1.",
            ConvergenceWarning,
            stacklevel=3,
        )
        return
    if bool(result.converged):
        return
    if n >= max_iter:
        if tol <= 0:
            return
        history = np.asarray(result.history, np.float64)
        change = abs(history[n - 1] - history[n - 2]) / abs(history[n - 1]) if n > 1 else np.nan
        warnings.warn(
            f"jaxem: {name} did not converge in max_iter={max_iter} iterations{kept}: the "
            f"last relative change of the {objective} was {change:.3g}, above tol={tol:g}. "
            "Raise max_iter, use acceleration='squarem' (EM), or loosen tol.",
            ConvergenceWarning,
            stacklevel=3,
        )
        return
    unbounded = sorted(
        k for k, v in (getattr(result, "unbounded", None) or {}).items() if bool(np.any(v))
    )
    if unbounded:
        warnings.warn(
            f"jaxem: {name} stopped after {n} iterations{kept} with the {objective} no longer "
            f"changing much, but it still rises along the params {unbounded} without "
            f"levelling off: the {objective} is unbounded there (it has no maximum), so "
            "converged is False (see result.unbounded and result.gradient). The usual cause "
            "is a component collapsing onto tied (repeated) data points, its scale (and a "
            "free df) running to 0. Put a prior on the scale (global_sites), bound the scale "
            "or df away from 0 with a constraint (constraints.greater_than), freeze df, or "
            "remove the ties.",
            ConvergenceWarning,
            stacklevel=3,
        )
        return
    gradient = {k: np.asarray(v) for k, v in result.gradient.items()}
    gains = {k: float(v) for k, v in (getattr(result, "gains", None) or {}).items()}
    bad = sorted(k for k, v in gradient.items() if not np.all(np.isfinite(v)))
    if bad:
        where = f"is not finite for {bad}"
    elif gains and max(gains.values()) > 0:
        # Named by what a step along each param's part of the gradient gains (in the
        # objective's units), not by the gradient's size (in each param's units).
        most = max(gains.values())
        largest = sorted(k for k, v in gains.items() if v >= 0.1 * most)
        where = f"is far from zero, mostly in {largest} (a step there gains {most:.3g})"
    else:
        norms = {k: float(np.sum(v.astype(np.float64) ** 2)) for k, v in gradient.items()}
        total = sum(norms.values())
        largest = sorted(k for k, v in norms.items() if v >= 0.1 * total)
        where = f"is far from zero, mostly in {largest}"
    warnings.warn(
        f"jaxem: {name} stopped after {n} iterations{kept} with the {objective} no longer "
        f"changing, but not at a stationary point: its gradient {where} (see "
        "result.gradient, result.gains), so the result is not a maximum and converged is "
        "False. Causes: "
        "M-step gradient steps that are all rejected (a learning rate too large: a smaller "
        "one, or the default optax.lbfgs()), or that stall on params of very different "
        "curvatures (a location at the data's scale, 1e3, beside log-scales, in float32: "
        "start them near the data with init_params, standardize the data, or fit in "
        "float64), a non-finite gradient of a density (write the model so that its "
        "log-probability is differentiable at the parameters), or reg_covar dominating "
        "the variances of data at a small scale (rescale the data or lower reg_covar).",
        ConvergenceWarning,
        stacklevel=3,
    )


def warn_about_vb_fit(result, *, name: str, max_iter: int, tol: float) -> None:
    """Emit a `ConvergenceWarning` when a variational Bayes fit (`VBResult`) stopped on a
    non-finite ELBO or parameter, reached ``max_iter`` (``tol > 0``), or stopped with
    params that are not a stationary point of the ELBO."""
    if bool(result.diverged):
        warnings.warn(
            f"jaxem: {name} stopped after {int(result.num_iters)} iterations on an "
            "ELBO or a variational parameter that was not finite; the result holds the "
            "last finite one.",
            ConvergenceWarning,
            stacklevel=3,
        )
    elif tol > 0 and not bool(result.converged):
        stalled = int(result.num_iters) < max_iter  # the ELBO settled, the params did not
        warnings.warn(
            f"jaxem: {name} stopped with params that are not a stationary point of "
            "the ELBO (result.gradient): their M-step made no progress; check optimizer "
            "and m_step_iters."
            if stalled
            else f"jaxem: {name} reached max_iter={max_iter} before the relative "
            f"change of the ELBO fell below tol={tol}; raise max_iter.",
            ConvergenceWarning,
            stacklevel=3,
        )
