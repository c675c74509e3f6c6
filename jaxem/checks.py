"""Checking a model's data and parameter values before it is fitted or evaluated.

`validate` is the entry point of every fitter and public function: one
compiled check per model and argument signature gathers the values
(`jaxem.validation.check_values`, the supports of distribution
arguments, the masks of latent sites), then the named errors are raised from
the concrete results (`jaxem.validation.raise_for_invalid`,
`jaxem.supports.raise_for_arguments`,
`jaxem.chain.raise_for_chain_padding`,
`jaxem.masks.raise_for_latent_masks`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from numpyro import handlers

from jaxem.arguments import check_init_params, merge_args, merge_init_params
from jaxem.chain import chain_padding_problems, find_chain, raise_for_chain_padding
from jaxem.compiling import compile_together, jit_once
from jaxem.factor_priors import prior_sites
from jaxem.inspection import inspect_model, model_structure, mvn_sites_of_params
from jaxem.masks import latent_mask_problems, mask_of, raise_for_latent_masks
from jaxem.missing import MissingData
from jaxem.supports import (
    argument_support,
    arguments_in_support,
    params_of_argument,
    raise_for_arguments,
)
from jaxem.tracing import enumerated_trace
from jaxem.validation import (
    check_values,
    core_family,
    describe_support,
    raise_for_invalid,
)
from jaxem.weights import raise_for_bad_weights

__all__ = ["in_support", "raise_for_fitted_arguments", "raise_for_model_arguments", "validate"]


def validate(model, rng_key, arrays, spec, params=None, *, fitting=True, frozen=(), meanwhile=None):
    """Raise a `ModelError` for bad data or parameter values.

    Checks the observed data (NaN or infinite entries, values outside the
    support, missing-data problems, sites that are priors rather than data)
    and the parameters: the model's initial values, overridden by ``params``
    (a partial or full ``{param name: value}``). One compiled check per model
    and argument signature (eager checks would compile op by op); skipped when
    any input is a tracer (under ``jit``/``vmap`` nothing can be raised).
    ``meanwhile()``: called while the check's program compiles, on a thread of
    its own (`jaxem.compiling.compile_together`), before it runs: a fit traces its
    loop there; an error it raises is ignored (its call raises it again, after
    this check's errors).
    With ``fitting``, also a model with nothing observed and MultivariateNormal
    coordinates that the data never observe, for the params not ``frozen``
    (`jaxem.validation.raise_for_invalid`). Distribution arguments outside
    their support are an error too (`jaxem.supports.argument_support`).

    Returns:
        The `jaxem.validation.Validity` found, None under ``jit``/``vmap``.
    """
    check_init_params(params)
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((rng_key, arrays, params))):
        return None
    validity, problems = _compiled(
        _checks, _checks_jit, model, spec, rng_key, arrays, params, meanwhile=meanwhile
    )
    args, kwargs = merge_args(arrays, spec)

    def support_of(site):
        # Only on the way to an error: the support's bounds may be arrays, concrete here.
        _, initial = inspect_model(model, rng_key, args, kwargs)
        fixed = handlers.substitute(model, data=merge_init_params(initial, params))
        _, _, sites = inspect_model(fixed, rng_key, args, kwargs, observed_values=True)
        return describe_support(sites[site][0])

    structure = model_structure(model, args, kwargs)
    raise_for_invalid(structure, validity, fitting=fitting, frozen=frozen, support_of=support_of)
    if any(int(count) for count, _ in validity.arguments.values()):
        _, initial = inspect_model(model, rng_key, args, kwargs)
        merged = merge_init_params(initial, params)
        when = "initial" if fitting else "given"
        raise_for_model_arguments(model, args, kwargs, merged, validity.arguments, when)
    if problems is None:  # they could not be traced: raise here, as before
        problems = _compiled(
            _mask_problems, _mask_problems_jit, model, spec, rng_key, arrays, params
        )
    for key, bad in problems.items():
        if key[0] == "chain":
            raise_for_chain_padding(bad, key[1], key[2])
        elif key[0] == "weights":
            raise_for_bad_weights(np.asarray(bad), key[1])
    raise_for_latent_masks({key[1:]: bad for key, bad in problems.items() if key[0] == "latent"})
    return validity


def _compiled(fn, fn_jit, model, *args, meanwhile=None):
    """``fn_jit(model, *args)``, the compiled check cached per model and signature,
    or ``fn`` run op by op for a model without a hash (a callable object), which
    cannot be a static argument of ``jit``. ``meanwhile``: see `validate`."""
    try:
        hash(model)
    except TypeError:
        return fn(model, *args)
    if meanwhile is not None:
        compile_together(lambda _: fn_jit.trace(model, *args), lambda _: meanwhile())
    return fn_jit(model, *args)


def raise_for_model_arguments(model, args, kwargs, params, found, when: str) -> None:
    """The `ModelError` of `jaxem.supports.raise_for_arguments` for the
    arguments ``found`` outside their support at ``params`` (all of them, concrete),
    naming the params each depends on (read from the model's jaxpr)."""
    nesting = model_structure(model, args, kwargs).max_plate_nesting

    def trace_fn(values):
        return enumerated_trace(model, values, args, kwargs, nesting, log_probs=False)

    def family_of(site):
        return core_family(trace_fn(params).sites[site].fn)

    def params_of(site, arg):
        return params_of_argument(trace_fn, params, site, arg)

    raise_for_arguments(found, when, params_of, family_of)


def _mask_problems(model, spec, rng_key, arrays, params) -> dict:
    """Masked latents that are not padding, on concrete masks: ``{("chain", site,
    plates): per sequence}`` for a ``scan`` chain, else ``{("latent", masked,
    dependent): bool}`` (see `jaxem.masks`). Empty without masked latents."""
    args, kwargs = merge_args(arrays, spec)
    structure, initial = inspect_model(model, rng_key, args, kwargs)
    return _mask_problems_at(model, structure, merge_init_params(initial, params), args, kwargs)


def _mask_problems_at(model, structure, params, args, kwargs) -> dict:
    """`_mask_problems` at the merged ``params``, of the model's ``structure``."""
    nesting = structure.max_plate_nesting
    trace = enumerated_trace(model, params, args, kwargs, nesting, log_probs=False)
    # Case weights given as a model argument are checked here, on concrete values.
    weights = (
        {} if trace.weights is None else {("weights", trace.weights.plate): trace.weights.values}
    )
    if all(s.is_observed or mask_of(s.fn) is None for s in trace.sites.values()):
        return weights
    # The log-probabilities name the time dim of a scan whose mask varies over time.
    trace = enumerated_trace(model, params, args, kwargs, nesting)
    chain = find_chain(trace)
    if chain is not None:
        plates = tuple(chain.plate_dims[d] for d in sorted(chain.plate_dims))
        return {**weights, ("chain", chain.name, plates): chain_padding_problems(trace, chain)}
    return {
        **weights,
        **{("latent", *key): bad for key, bad in latent_mask_problems(trace).items()},
    }


_mask_problems_jit = jit_once(_mask_problems, static_argnums=(0, 1))


def _checks(model, spec, rng_key, arrays, params):
    """`_validity` and `_mask_problems` in one program (one compilation); the mask
    problems None where they cannot be traced (a model the checks before them
    reject, say: `validate` then raises those first)."""
    validity, structure, merged = _validity(model, spec, rng_key, arrays, params)
    try:
        problems = _mask_problems_at(model, structure, merged, *merge_args(arrays, spec))
    except Exception:  # noqa: BLE001
        problems = None
    return validity, problems


_checks_jit = jit_once(_checks, static_argnums=(0, 1))


def _validity(model, spec, rng_key, arrays, params):
    """``(validity, structure, the params checked)``."""
    args, kwargs = merge_args(arrays, spec)
    if not params:
        # The sites at the initial values: one run gives them with the values.
        structure, merged, sites = inspect_model(model, rng_key, args, kwargs, observed_values=True)
    else:
        structure, initial = inspect_model(model, rng_key, args, kwargs)
        merged = merge_init_params(initial, params)
        # The sites at the params being checked: a support may depend on them.
        fixed = handlers.substitute(model, data=merged)
        _, _, sites = inspect_model(fixed, rng_key, args, kwargs, observed_values=True)
    reach = None
    if any(
        isinstance(fn, MissingData) and type(core_family(fn)) is dist.MultivariateNormal
        for fn, _ in sites.values()
    ):
        reach = mvn_sites_of_params(model, rng_key, args, kwargs, merged)
    priors = prior_sites(model, rng_key, arrays, spec, merged)
    try:
        nesting = structure.max_plate_nesting
        trace = enumerated_trace(model, merged, args, kwargs, nesting, log_probs=False)
        arguments = argument_support(trace)
    except Exception:  # noqa: BLE001
        # A model that cannot be enumerated: the enumerated trace that every entry
        # point builds next reports what is wrong with it in its own words.
        arguments = None
    return check_values(structure, merged, sites, reach, priors, arguments), structure, merged


def in_support(model, params, args, kwargs, nesting) -> jax.Array:
    """Whether every distribution argument of the model lies in its support at
    ``params``. Params that feed an argument through a function (``w * c`` as
    probabilities) can carry it out of its support, where the log-likelihood
    means nothing."""
    trace = enumerated_trace(model, params, args, kwargs, nesting, log_probs=False)
    return arguments_in_support(trace)


def raise_for_fitted_arguments(model, params, args, kwargs, structure) -> None:
    """A ModelError naming the distribution arguments that the fitted ``params``
    (concrete) put outside their support, and the params feeding them."""
    fitted = {k: jnp.asarray(v) for k, v in params.items()}
    trace = enumerated_trace(
        model, fitted, args, kwargs, structure.max_plate_nesting, log_probs=False
    )
    found = argument_support(trace)
    if any(int(count) for count, _ in found.values()):
        raise_for_model_arguments(model, args, kwargs, fitted, found, "fitted")
