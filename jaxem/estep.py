"""The E-step: enumeration, contraction, and posteriors by autodiff.

The log marginal likelihood is the sum-product contraction of the site
factors of an enumerated trace. Following Eisner (2016), the posterior
marginal of every factor is the gradient of the log marginal likelihood with
respect to that factor's log-probability tensor, so one ``value_and_grad``
gives the log-likelihood and every responsibility. Hard (classification) EM
takes the joint MAP assignment instead, found by max-product with argmax
backtracking; its "marginals" are the indicators of that assignment.
"""

from __future__ import annotations

import functools
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from numpyro import handlers
from numpyro.contrib.funsor import config_enumerate, infer_discrete

from jaxem.arguments import merge_args, split_args
from jaxem.built import built_model
from jaxem.chain import find_chain
from jaxem.chain_inference import chain_indicators, chain_map, chain_posterior, contract_chain
from jaxem.checks import validate
from jaxem.enum_dims import raise_for_mixed_enum_dims
from jaxem.funsor_contraction import funsor_log_partition
from jaxem.global_sites import global_site_names, log_prior_of_trace
from jaxem.inspection import model_structure
from jaxem.labels import known_labels, labelled_latents
from jaxem.missing import MissingEntries
from jaxem.mixture_factors import gather_latent_factors
from jaxem.safe_log import zero_safe_log
from jaxem.tracing import EnumTrace, enumerated_trace
from jaxem.weights import element_log_likelihoods, reject_case_weights, weighted_log_likelihood

__all__ = [
    "EStep",
    "check_params_complete",
    "contract_factors",
    "e_step",
    "latent_posteriors",
    "log_joint",
    "log_likelihood",
    "map_assignment",
    "map_values",
    "posterior",
    "site_posterior",
    "structure_and_args",
]


class EStep(NamedTuple):
    """Result of an E-step.

    Attributes:
        log_likelihood: the log marginal likelihood (max-product value for hard EM).
        marginals: ``{site name: posterior marginal of the site's factor}``,
            shaped like the site's log-probability tensor.
        trace: the enumerated trace the factors came from.
    """

    log_likelihood: jax.Array
    marginals: dict
    trace: EnumTrace


def contract_factors(log_factors: dict, trace: EnumTrace, parallel: bool = False):
    """log p(data): the sum-product of an enumerated trace's log-factors over its latents
    (the forward algorithm for a ``scan`` chain, a logsumexp for one latent, funsor else)."""
    if getattr(trace, "weights", None) is not None:
        return weighted_log_likelihood(log_factors, trace, parallel=parallel)
    chain = find_chain(trace)
    if chain is not None:
        return contract_chain(log_factors, trace, chain, parallel=parallel)
    latent = [name for name, site in trace.sites.items() if not site.is_observed]
    if len(latent) == 1:
        return _contract_mixture(log_factors, trace, latent[0])
    return _contract_funsor(log_factors, trace)


def _contract_mixture(log_factors: dict, trace: EnumTrace, name: str):
    """Contraction for one latent site (mixtures): a logsumexp over its values.

    Factors of sites in plates nested inside the latent's are summed over those
    plates first (conditional independence). The enumeration axis is moved first
    and the values summed out by `_logsumexp_leading`.
    """
    joint, enum_dim, rest = gather_latent_factors(log_factors, trace, name)
    if joint is None:
        return rest
    joint = jnp.moveaxis(joint, jnp.ndim(joint) + enum_dim, 0)
    return jnp.sum(_logsumexp_leading(joint.reshape(joint.shape[0], -1))) + rest


def _logsumexp_leading(x):
    """``logsumexp(x, axis=0)`` for a (K, M) array without a reduction over its
    leading axis, which XLA's CPU backend (YNNPACK) runs many times slower than
    the same work as elementwise maxima and a (K,) x (K, M) matmul."""
    if x.shape[0] > 64:  # an unrolled fold this long costs more to compile than it saves
        return jax.nn.logsumexp(x, axis=0)
    shift = jax.lax.stop_gradient(functools.reduce(jnp.maximum, list(x)))
    shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
    return jnp.log(jnp.ones(x.shape[:1], x.dtype) @ jnp.exp(x - shift)) + shift


def _contract_funsor(log_factors: dict, trace: EnumTrace):
    """General contraction: funsor's sum-product over plates and enumerated dims,
    each pairwise contraction exact in log space (see `jaxem.funsor_contraction`).

    funsor takes the log of messages that are exactly zero for states that a
    zero probability makes impossible; `zero_safe_log` keeps their zero
    cotangents from turning every marginal into NaN.
    """
    return zero_safe_log(partial(funsor_log_partition, trace=trace))(log_factors)


def _name_mixed_enum_dims(trace, max_plate_nesting) -> None:
    sites = [(n, s.fn, s.value, not s.is_observed) for n, s in trace.sites.items()]
    raise_for_mixed_enum_dims(sites, max_plate_nesting)


def e_step(model, params, args, kwargs, max_plate_nesting, *, hard=False, parallel=False) -> EStep:
    """Log-likelihood and posterior marginals of every factor at ``params``.

    ``parallel`` contracts a Markov chain by a log-depth reduction over time
    instead of a sequential scan (faster on GPUs for long sequences).
    """
    trace = enumerated_trace(model, params, args, kwargs, max_plate_nesting)
    log_factors = {name: jax.lax.stop_gradient(s.log_prob) for name, s in trace.sites.items()}
    if not hard:
        try:
            value, marginals = jax.value_and_grad(contract_factors)(log_factors, trace, parallel)
        except (TypeError, ValueError):
            _name_mixed_enum_dims(trace, max_plate_nesting)
            raise
        return EStep(value, marginals, trace)
    reject_case_weights(trace, "hard EM")
    chain = find_chain(trace)
    if chain is not None:
        # Viterbi by max-product with backpointers, as for mixtures below.
        marginals = chain_indicators(chain_map(log_factors, trace, chain), trace, chain)
        # The indicators count steps where a factor is the same at every step.
        value = sum(
            jnp.sum(jnp.where(marginals[name] > 0, marginals[name] * log_factors[name], 0.0))
            for name in log_factors
        )
        return EStep(value, marginals, trace)
    # Hard EM: the derivative of a max-product contraction is the indicator of
    # the MAP assignment, but autodiff finds it by testing ``x == max(x)``, which
    # fails when XLA recomputes x in two fusions with different rounding. The
    # MAP assignment is found by max-product with argmax backtracking instead.
    assignment = map_values(model, params, args, kwargs, max_plate_nesting)
    marginals = {name: _indicator(site, trace, assignment) for name, site in trace.sites.items()}
    value = sum(
        jnp.sum(jnp.where(marginals[name] > 0, log_factors[name], 0.0)) for name in log_factors
    )
    return EStep(value, marginals, trace)


def map_values(model, params, args, kwargs, max_plate_nesting) -> dict:
    """The joint MAP assignment of the latent sites (max-product, then argmax
    backtracking through funsor's adjoint; Viterbi for a Markov chain),
    ``{site name: values}``."""
    trace = enumerated_trace(model, params, args, kwargs, max_plate_nesting)
    chain = find_chain(trace)
    if chain is not None:
        return chain_map({name: s.log_prob for name, s in trace.sites.items()}, trace, chain)
    substituted = handlers.substitute(MissingEntries(model), data=params)
    decoded = infer_discrete(
        config_enumerate(substituted),
        temperature=0,
        first_available_dim=-max_plate_nesting - 1,
        rng_key=jax.random.PRNGKey(0),
    )
    decoded_trace = handlers.trace(decoded).get_trace(*args, **kwargs)
    assignment = {
        name: site["value"]
        for name, site in decoded_trace.items()
        if site["type"] == "sample" and not site["is_observed"] and name in trace.sites
    }
    # NumPyro's densities leave the known entries of an obs_mask latent free
    # (nothing depends on them); their MAP is the label.
    for name in labelled_latents(trace.sites):
        labels, known = known_labels(trace.sites, name)
        value = assignment[name]
        known = jnp.reshape(known, jnp.shape(known) + (1,) * (jnp.ndim(labels) - jnp.ndim(known)))
        assignment[name] = jnp.where(known, labels, value).astype(jnp.result_type(value))
    return assignment


def _indicator(site, trace, assignment):
    """Indicator, over a factor's cells, of the cells that agree with the MAP
    assignment of every latent the factor is enumerated over."""
    shape = jnp.shape(site.log_prob)
    indicator = jnp.ones(shape, dtype=jnp.result_type(site.log_prob))
    for name in site.dim_to_name.values():
        if name in assignment:
            support = trace.sites[name].value
            indicator = indicator * (support == assignment[name])
    return jnp.broadcast_to(indicator, shape)


def site_posterior(site, marginal):
    """Marginal of a latent site from its factor's marginal.

    The factor spans the site's own enumeration dim, the enumeration dims of
    the latents it depends on, and the plate dims; sum out the other latents
    and put the site's enumerated values on the last axis.
    """
    ndim = jnp.ndim(marginal)
    plate_ndim = max((-d for d, n in site.dim_to_name.items() if n in site.plates), default=0)
    own = [d for d, n in site.dim_to_name.items() if n == site.name]
    if not own:  # a support of one value, which NumPyro does not name
        return jnp.ones(jnp.shape(marginal)[ndim - plate_ndim :] + (1,), jnp.result_type(marginal))
    own_axis = ndim + own[0]
    enum_axes = tuple(a for a in range(ndim - plate_ndim) if a != own_axis)
    return jnp.moveaxis(jnp.sum(marginal, axis=enum_axes), 0, -1)


def structure_and_args(model, arrays, spec):
    """``(structure, args, kwargs)``: the model's
    `jaxem.inspection.ModelStructure` and its arguments merged back from
    `jaxem.arguments.split_args`."""
    args, kwargs = merge_args(arrays, spec)
    return model_structure(model, args, kwargs), args, kwargs


def check_params_complete(structure, params):
    """Raise unless ``params`` has a value for every param of the model."""
    missing = set(structure.param_names) - set(params)
    if missing:
        raise ValueError(f"jaxem: params are missing values for {sorted(missing)}.")


@partial(jax.jit, static_argnums=(0, 3, 4, 5))
def _log_likelihood(model, params, arrays, spec, per_observation=False, with_prior=False):
    model = built_model(model)
    structure, args, kwargs = structure_and_args(model, arrays, spec)
    check_params_complete(structure, params)
    trace = enumerated_trace(model, params, args, kwargs, structure.max_plate_nesting)
    log_factors = {name: s.log_prob for name, s in trace.sites.items()}
    names = global_site_names(model)
    if per_observation:
        # The global sites' priors are factors of the trace, not data (jaxem.global_sites).
        log_factors = {n: jnp.zeros_like(f) if n in names else f for n, f in log_factors.items()}
        return element_log_likelihoods(log_factors, trace, priors=names)
    value = contract_factors(log_factors, trace)
    if not names or with_prior:
        return value
    return value - log_prior_of_trace(trace, names)


@partial(jax.jit, static_argnums=(0, 3))
def _posterior(model, params, arrays, spec):
    model = built_model(model)
    structure, args, kwargs = structure_and_args(model, arrays, spec)
    check_params_complete(structure, params)
    result = e_step(model, params, args, kwargs, structure.max_plate_nesting)
    log_factors = {name: site.log_prob for name, site in result.trace.sites.items()}
    return latent_posteriors(result.trace, log_factors, result.marginals, structure.latent_sites)


def latent_posteriors(trace, log_factors, marginals, latent_sites) -> dict:
    """``{latent site, as the user named it: its posterior marginal}`` (values on
    the last axis; a ``scan`` chain's per-step marginals, ``(*plates, T, K)``), from
    an enumerated trace, its (possibly expected) log factors and their marginals."""
    chain = find_chain(trace)
    user_names = labelled_latents(trace.sites)
    return {
        user_names.get(name, name): chain_posterior(log_factors, trace, chain)
        if chain is not None and name == chain.name
        else site_posterior(trace.sites[name], marginals[name])
        for name in latent_sites
    }


@partial(jax.jit, static_argnums=(0, 3))
def _map_assignment(model, params, arrays, spec):
    model = built_model(model)
    structure, args, kwargs = structure_and_args(model, arrays, spec)
    check_params_complete(structure, params)
    assignment = map_values(model, params, args, kwargs, structure.max_plate_nesting)
    trace = enumerated_trace(
        model, params, args, kwargs, structure.max_plate_nesting, log_probs=False
    )
    user_names = labelled_latents(trace.sites)
    return {user_names.get(name, name): value for name, value in assignment.items()}


def map_assignment(model, params, *args, **kwargs):
    """The most likely joint assignment of the discrete latent sites.

    Max-product over the enumerated factors, then argmax backtracking: the
    exact joint MAP, not the per-site argmax of `posterior` (the two can
    differ when latents depend on each other).

    Args:
        model: a NumPyro model with ``numpyro.param`` sites and discrete latents.
        params: ``{param name: constrained value}``.
        *args, **kwargs: the model's arguments.

    Returns:
        ``{latent site name: MAP values}``, shaped like the site's values.

    Examples:
        >>> import jax.numpy as jnp, numpyro, numpyro.distributions as dist
        >>> import jaxem
        >>> def model(x):
        ...     w = numpyro.param("w", jnp.array([0.5, 0.5]))
        ...     with numpyro.plate("data", x.shape[0]):
        ...         z = numpyro.sample("z", dist.Categorical(w))
        ...         numpyro.sample("x", dist.Normal(jnp.array([-1.0, 1.0])[z], 1.0), obs=x)
        >>> jaxem.map_assignment(model, {"w": jnp.array([0.5, 0.5])}, jnp.array([-2.0, 0.5]))["z"]
        Array([0, 1], dtype=int32)
    """
    arrays, spec = split_args(args, kwargs)
    _validate(model, params, arrays, spec)
    return _map_assignment(model, dict(params), arrays, spec)


def _validate(model, params, arrays, spec) -> None:
    """Named errors for NaN data and params outside their constraints, rather
    than a NaN result (concrete inputs only: nothing can be raised under jit)."""
    args, kwargs = merge_args(arrays, spec)
    names = model_structure(model, args, kwargs).param_names
    # Entries that are not params of the model are ignored, as by the E-step.
    params = {name: params[name] for name in names if name in params}
    # Coordinates that no row observes are marginalized here; only fitting needs them.
    validate(model, jax.random.PRNGKey(0), arrays, spec, params, fitting=False)


def log_likelihood(model, params, *args, per_observation=False, **kwargs):
    """Marginal log-likelihood of a model at given parameter values.

    The discrete latent sites are summed out exactly by enumeration.

    Args:
        model: a NumPyro model with ``numpyro.param`` sites and discrete latents.
        params: ``{param name: constrained value}``, e.g. ``EM.get_params(state)``.
        *args, **kwargs: the model's arguments.
        per_observation: one value per element of the data plate (the plate that
            holds every sample site; with case weights, the weighted plate), as
            scikit-learn's ``score_samples``: each element's log-likelihood with
            its latents summed out, times its case weight; the values sum to the
            log-likelihood. A model with no such plate (a single ``scan`` chain
            is one observation) raises ``ModelError``.

    Returns:
        Scalar log p(data | params), or ``(N,)`` with ``per_observation=True``.

    Examples:
        >>> import jax.numpy as jnp, numpyro, numpyro.distributions as dist
        >>> import jaxem
        >>> def model(x):
        ...     w = numpyro.param("w", jnp.array([0.5, 0.5]))
        ...     with numpyro.plate("data", x.shape[0]):
        ...         z = numpyro.sample("z", dist.Categorical(w))
        ...         numpyro.sample("x", dist.Normal(jnp.array([-1.0, 1.0])[z], 1.0), obs=x)
        >>> ll = jaxem.log_likelihood(model, {"w": jnp.array([0.5, 0.5])}, jnp.zeros(3))
        >>> round(float(ll), 4)
        -4.2568
        >>> jaxem.log_likelihood(model, {"w": jnp.array([0.5, 0.5])}, jnp.zeros(3),
        ...                      per_observation=True).shape
        (3,)
    """
    arrays, spec = split_args(args, kwargs)
    _validate(model, params, arrays, spec)
    return _log_likelihood(model, dict(params), arrays, spec, bool(per_observation))


def log_joint(model, params, *args, **kwargs):
    """``log p(data | params) + log p(params)``: MAP-EM's objective.

    With global sites (`jaxem.global_sites`) the log prior of their values is
    added to `log_likelihood`; without, the two are equal.

    Args:
        model: the (built) model, global sites marked.
        params: ``{param name: constrained value}``.
        *args, **kwargs: the model's arguments.

    Returns:
        Scalar.
    """
    arrays, spec = split_args(args, kwargs)
    _validate(model, params, arrays, spec)
    return _log_likelihood(model, dict(params), arrays, spec, False, True)


def posterior(model, params, *args, **kwargs):
    """Posterior marginal probabilities of every discrete latent site.

    Args:
        model: a NumPyro model with ``numpyro.param`` sites and discrete latents.
        params: ``{param name: constrained value}``.
        *args, **kwargs: the model's arguments.

    Returns:
        ``{latent site name: probabilities}``, the enumerated values on the last
        axis and the site's plate shape in front, e.g. ``(N, K)`` for the
        assignment of N points to K components.

    Examples:
        >>> import jax.numpy as jnp, numpyro, numpyro.distributions as dist
        >>> import jaxem
        >>> def model(x):
        ...     w = numpyro.param("w", jnp.array([0.5, 0.5]))
        ...     with numpyro.plate("data", x.shape[0]):
        ...         z = numpyro.sample("z", dist.Categorical(w))
        ...         numpyro.sample("x", dist.Normal(jnp.array([-1.0, 1.0])[z], 1.0), obs=x)
        >>> jaxem.posterior(model, {"w": jnp.array([0.5, 0.5])}, jnp.zeros(3))["z"].shape
        (3, 2)
    """
    arrays, spec = split_args(args, kwargs)
    _validate(model, params, arrays, spec)
    return _posterior(model, dict(params), arrays, spec)
