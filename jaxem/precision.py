"""A float32 fit's log-likelihood evaluated again in float64, after the fit.

A density evaluated where float32 rounding dominates it returns values wrong by
nats per data point: NumPyro's ``StudentT`` as a free ``df`` runs off to 1e6,
where ``gammaln(df / 2) - gammaln((df + 1) / 2)`` cancels two numbers near 1e7
to a few units. A gradient M-step then climbs that rounding noise, and the fit
reports a log-likelihood far above the true one, every step looking like
progress. Nothing computed in float32 tells such a value from a real one: EM's
ascent identity ``ll(t) - Q_old(t) = H(q_old) + KL(q_old || p(z | x, t))`` holds
for any function used as ``log p``, broken or not, and the jump rule of
`jaxem.loop.credible` sees only jumps a thousand times every earlier gain.

So once, after a float32 fit and outside the compiled loop, the log-likelihood
at the fitted params is evaluated in float64 (the same params and data, exactly
representable). A well-conditioned float32 evaluation agrees with it to
``sqrt(eps32) * (|ll| + cells)`` with a wide margin (summation error grows like
``eps * log(cells)``); a disagreement beyond that is a density that broke down.
The fit is then a divergence, its ``log_likelihood`` the float64 value, and a
`NumericalWarning` names the site, found by comparing
every site's log-probabilities in the two precisions. A float64 fit has no
higher precision to compare with; this check does nothing there.
"""

from __future__ import annotations

import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers

from jaxem.arguments import merge_args
from jaxem.compiling import jit_once
from jaxem.estep import contract_factors, e_step
from jaxem.exceptions import NumericalWarning
from jaxem.inspection import model_structure
from jaxem.numpyro_internals import PREV_PREFIX
from jaxem.tracing import enumerated_trace

__all__ = ["BREAKDOWN_TOLERANCE", "broken_down", "recheck_in_float64", "recheck_program"]

# The relative disagreement between the float32 and float64 log-likelihoods (per
# |ll| + observed cells) beyond which a float32 density broke down: sqrt(eps32).
BREAKDOWN_TOLERANCE = float(np.sqrt(np.finfo(np.float32).eps))


def _to_float64(tree):
    # On the host: an eager jnp conversion would compile a program per array shape.
    return jax.tree.map(
        lambda a: (
            np.asarray(a, np.float64) if jnp.issubdtype(jnp.result_type(a), jnp.floating) else a
        ),
        tree,
    )


def _e_step(model, params, arrays, spec, hard, nesting):
    args, kwargs = merge_args(arrays, spec)
    if nesting is None:
        nesting = model_structure(model, args, kwargs).max_plate_nesting
    return e_step(model, params, args, kwargs, nesting, hard=hard)


@partial(jit_once, static_argnums=(0, 3, 4, 5))
def _value(model, params, arrays, spec, hard, nesting):
    """The log-likelihood and the number of observed cells. Soft EM's is the
    contraction of the log factors alone (`jaxem.estep.contract_factors`, the value
    the E-step's ``value_and_grad`` returns): the marginals are not traced."""
    args, kwargs = merge_args(arrays, spec)
    if nesting is None:
        nesting = model_structure(model, args, kwargs).max_plate_nesting
    if hard:
        result = e_step(model, params, args, kwargs, nesting, hard=True)
        value, trace = result.log_likelihood, result.trace
    else:
        trace = enumerated_trace(model, params, args, kwargs, nesting)
        value = contract_factors({n: s.log_prob for n, s in trace.sites.items()}, trace)
    cells = sum(int(np.size(s.value)) for s in trace.sites.values() if s.is_observed)
    return value, cells


@partial(jit_once, static_argnums=(0, 3, 4, 5))
def _site_terms(model, params, arrays, spec, hard, nesting):
    result = _e_step(model, params, arrays, spec, hard, nesting)
    return {n: s.log_prob for n, s in result.trace.sites.items()}, result.marginals


def _broken_sites(model, params, arrays, spec, hard, nesting):
    """``[(site, distribution name)]``: the sites whose float32 log-probabilities differ
    most from their float64 ones, weighted by the float64 posterior."""
    log_probs32, _ = _site_terms(model, params, arrays, spec, hard, nesting)
    with jax.enable_x64(True):
        log_probs64, marginals = _site_terms(
            model, _to_float64(params), _to_float64(arrays), spec, hard, nesting
        )
        errors = {}
        for name, lp64 in log_probs64.items():
            lp64 = np.asarray(lp64, np.float64)
            diff = np.abs(np.asarray(log_probs32[name], np.float64) - lp64)
            weight = np.asarray(marginals[name], np.float64)
            errors[name] = float(np.sum(np.where(weight > 0, weight * np.nan_to_num(diff), 0.0)))
    largest = max(errors.values(), default=0.0)
    names = sorted(n for n, e in errors.items() if largest > 0 and e >= 0.1 * largest)
    args, kwargs = merge_args(arrays, spec)
    with handlers.block():
        trace = handlers.trace(handlers.seed(handlers.substitute(model, params), 0)).get_trace(
            *args, **kwargs
        )
    described = []
    for name in names:
        # A scan's first step and later steps are one site, named as the user wrote it.
        user_name = name.removeprefix(PREV_PREFIX)
        fn = trace.get(user_name, {}).get("fn")
        while hasattr(fn, "base_dist"):
            fn = fn.base_dist
        described.append((user_name, type(fn).__name__ if fn is not None else None))
    return list(dict.fromkeys(described))


def recheck_program(model, params, value, arrays, spec, *, hard=False, max_plate_nesting=None):
    """The float64 program `recheck_in_float64` runs first for a fit whose ``params``
    and ``value`` have these shapes and dtypes (``jax.ShapeDtypeStruct`` pytrees, the
    fit's outputs before it runs), traced and lowered, for `jaxem.compiling.compile_together`
    to compile it while the fit's own programs compile; None where it runs none (a
    ``value`` not float32). Its call then finds it compiled."""
    if jnp.dtype(value.dtype) != jnp.float32:
        return None
    with jax.enable_x64(True):
        params64 = jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(
                s.shape, np.float64 if jnp.issubdtype(s.dtype, jnp.floating) else s.dtype
            ),
            params,
        )
        traced = _value.trace(model, params64, _to_float64(arrays), spec, hard, max_plate_nesting)
        return traced.lower()


def recheck_in_float64(
    model, params, value, arrays, spec, *, hard=False, name="EM", max_plate_nesting=None
):
    """Whether ``value``, a float32 fit's log-likelihood at ``params``, is its float64
    value up to float32 rounding; if not, warn (naming the site whose density broke
    down) and return the float64 value.

    Args:
        model: the fitted model.
        params: ``{param name: value}`` the fit returned (concrete).
        value: the log-likelihood the fit reported at ``params``.
        arrays, spec: the model's arguments (`jaxem.arguments.split_args`).
        hard: the value is hard EM's (the complete-data log-likelihood at the MAP
            assignment).
        name: the engine, for the message.
        max_plate_nesting: the model's (`jaxem.inspection.ModelStructure`), which
            the float32 fit found already; None finds it again (a trace of the model
            in float64).

    Returns:
        None when the value is right (or cannot be checked: already float64, or
        under ``jit``/``vmap``), else the float64 log-likelihood at ``params``.
    """
    leaves = jax.tree.leaves((params, value, arrays))
    if any(isinstance(x, jax.core.Tracer) for x in leaves):
        return None
    if jnp.result_type(value) != jnp.float32 or not np.isfinite(float(value)):
        return None
    with jax.enable_x64(True):
        exact, cells = _value(
            model, _to_float64(params), _to_float64(arrays), spec, hard, max_plate_nesting
        )
        exact = float(exact)
    reported = float(value)
    if not np.isfinite(exact):
        return None
    if abs(reported - exact) <= BREAKDOWN_TOLERANCE * (abs(exact) + int(cells)):
        return None
    sites = _broken_sites(model, params, arrays, spec, hard, max_plate_nesting)
    where = ", ".join(f"'{s}' ({d})" if d else f"'{s}'" for s, d in sites) or "unknown"
    warnings.warn(
        f"jaxem: {name}'s log-likelihood at the fitted params is {reported:.7g} in float32 "
        f"but {exact:.7g} in float64: the float32 log-density of site {where} broke down "
        "at these params (its arguments reached values where rounding dominates it, e.g. "
        "a shape parameter such as a Student-t df running off to a huge value, or a scale "
        "collapsing), and the fit climbed rounding error. diverged is True, converged "
        "False, and log_likelihood holds the float64 value (history and gradient do not). "
        "Fit in float64 (jax.config.update('jax_enable_x64', True)), keep the site's "
        "parameters where its density is accurate (bounds in the param's constraint, or "
        "frozen=[...]), or start elsewhere (init_params).",
        NumericalWarning,
        stacklevel=4,
    )
    return exact


def broken_down(result, exact, scores: str, score: str = "log_likelihood"):
    """``result`` (an ``EMResult`` or ``VEMResult``) marked diverged and not converged,
    its ``log_likelihood`` the float64 value ``exact``; the kept restart's entries of
    ``restart_converged``/``restart_diverged`` (and of the ``scores`` field, when it holds
    log-likelihoods) too. The kept restart is the one whose ``score`` field, ``num_iters``
    and ``diverged`` equal the result's (it is a copy of that restart's values)."""
    dtype = jnp.result_type(result.log_likelihood)
    kept = np.flatnonzero(
        (np.asarray(getattr(result, scores)) == np.asarray(getattr(result, score)))
        & (np.asarray(result.restart_num_iters) == np.asarray(result.num_iters))
        & (np.asarray(result.restart_diverged) == np.asarray(result.diverged))
    )[:1]
    updates = {
        "log_likelihood": jnp.asarray(exact, dtype),
        "converged": jnp.asarray(False),
        "diverged": jnp.asarray(True),
        "restart_converged": jnp.asarray(result.restart_converged).at[kept].set(False),
        "restart_diverged": jnp.asarray(result.restart_diverged).at[kept].set(True),
    }
    if score == "log_likelihood":
        updates[scores] = jnp.asarray(getattr(result, scores)).at[kept].set(exact)
    return result._replace(**updates)
