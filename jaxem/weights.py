"""Case weights and the log-likelihood of each observation.

A per-element ``numpyro.handlers.scale`` around the sites of a data plate is a
case weight: element ``n`` of the plate counts ``w_n`` times. jaxem weights the
element's *marginal* log-likelihood, after its latents are summed out,

$$
\\log L(\\theta) = \\sum_n w_n \\log \\sum_{z_n} p(x_n, z_n \\mid \\theta),
$$

which is what replicating element ``n`` ``w_n`` times gives for integer
weights (scaling each factor instead, ``log sum_z p^w``, would not be). The
posterior marginals, the gradient of this with respect to the log factors,
come out weighted, so every M-step (closed form or gradient) uses weighted
statistics with no change.

The per-element values come from the same contraction as the total, stopped
before the data plate is multiplied out: a logsumexp over one latent (a
mixture), the forward pass per sequence (a batch of ``scan`` chains), funsor's
sum-product with the data plate left free (anything else).
"""

from __future__ import annotations

from typing import NamedTuple

import funsor
import jax
import jax.numpy as jnp
import numpy as np
from funsor import ops

from jaxem.chain import find_chain
from jaxem.chain_inference import chain_log_likelihoods
from jaxem.exceptions import ModelError
from jaxem.funsor_contraction import exact_log
from jaxem.mixture_factors import gather_latent_factors
from jaxem.numpyro_internals import user_site_name
from jaxem.safe_log import zero_safe_log

__all__ = [
    "CaseWeights",
    "element_log_likelihoods",
    "find_case_weights",
    "observation_plate",
    "reject_case_weights",
    "weighted_log_likelihood",
]


class CaseWeights(NamedTuple):
    """The case weights of an enumerated trace.

    Attributes:
        plate: the data plate whose elements are weighted.
        dim: its (negative) dim.
        values: ``(N,)``: each element's weight.
    """

    plate: str
    dim: int
    values: jax.Array


def _is_one(scale) -> bool:
    return scale is None or (
        not isinstance(scale, jax.core.Tracer) and bool(np.all(np.asarray(scale) == 1))
    )


def _same(a, b) -> bool:
    if a is b:
        return True
    if isinstance(a, jax.core.Tracer) or isinstance(b, jax.core.Tracer) or a is None or b is None:
        return False
    a, b = np.asarray(a), np.asarray(b)
    try:
        return bool(np.all(np.broadcast_to(a, np.broadcast_shapes(a.shape, b.shape)) == b))
    except ValueError:
        return False


def _plates(site) -> dict:
    return {f.name: f for f in site["cond_indep_stack"] if f.dim is not None}


def find_case_weights(tr: dict, latent_names: set) -> CaseWeights | None:
    """The case weights of a NumPyro trace: None unless a scaled site depends on
    an enumerated latent (a scale elsewhere multiplies the site's log-density).

    Raises:
        ModelError: a scale that is not one weight per element of a plate holding
            every latent, or sites of that plate with different scales.
    """
    sites = {n: s for n, s in tr.items() if s["type"] == "sample"}

    def depends(name, site):
        names = set(site["infer"].get("dim_to_name", {}).values())
        return name in latent_names or bool(names & latent_names)

    scaled = [n for n, s in sites.items() if not _is_one(s["scale"]) and depends(n, s)]
    if not scaled:
        return None
    first = scaled[0]
    scale = sites[first]["scale"]
    shared = None
    for name in sorted(latent_names):
        plates = set(_plates(sites[name]))
        shared = plates if shared is None else shared & plates
    fix = (
        "Case weights are one number per element of a plate that holds every latent: "
        "numpyro.handlers.scale(scale=weights) with weights of shape (N,) around the whole "
        "body of that plate (the latents and the observations)."
    )
    if not shared:
        latent = sorted(latent_names)[0]
        raise ModelError(
            f"jaxem: site '{user_site_name(first)}' is scaled (numpyro.handlers.scale or a "
            f"subsampled plate) and depends on an enumerated latent, but no plate holds every "
            f"latent (latent '{user_site_name(latent)}' is outside the others' plates), so there "
            f"is no element whose marginal log-likelihood the scale could weight. {fix}"
        )
    frames = _plates(sites[first])
    shape = jnp.shape(scale)
    varying = {i - len(shape) for i, size in enumerate(shape) if size != 1}
    candidates = sorted((frames[p] for p in shared if p in frames), key=lambda f: f.dim)
    by_dim = {f.dim: f for f in candidates}
    if len(varying) > 1 or (varying and not varying <= set(by_dim)):
        raise ModelError(
            f"jaxem: site '{user_site_name(first)}' has a scale of shape {tuple(shape)}, which "
            f"varies along dims other than one plate holding every latent "
            f"({sorted(f.name for f in candidates)}). {fix}"
        )
    frame = by_dim[varying.pop()] if varying else candidates[-1]
    for name, site in sites.items():
        if frame.name in _plates(site) and not _same(site["scale"], scale):
            raise ModelError(
                f"jaxem: sites '{user_site_name(first)}' and '{user_site_name(name)}' of plate "
                f"'{frame.name}' have different scales. A scale on a site that depends on an "
                "enumerated latent is a case weight, which must be the same for every site of "
                f"an element. {fix}"
            )
    values = jnp.asarray(scale)
    size = frame.size
    if values.size == size and size != 1:
        values = jnp.reshape(values, (size,))
    else:
        values = jnp.broadcast_to(jnp.reshape(values, ()), (size,))
    if not isinstance(values, jax.core.Tracer):
        raise_for_bad_weights(np.asarray(values), frame.name)
    return CaseWeights(frame.name, frame.dim, values)


def raise_for_bad_weights(values, plate: str) -> None:
    """ModelError for case weights that are negative or not finite (concrete values)."""
    bad = ~np.isfinite(values) | (values < 0)
    if np.any(bad):
        index = int(np.argmax(bad))
        raise ModelError(
            f"jaxem: the case weights of plate '{plate}' (numpyro.handlers.scale) must be "
            f"finite and non-negative; element {index} has weight {values[index]}. Drop the "
            "element."
        )


def reject_case_weights(trace, fitter: str) -> None:
    """ModelError: ``fitter`` does not support case weights."""
    weights = getattr(trace, "weights", None)
    if weights is not None:
        raise ModelError(
            f"jaxem: plate '{weights.plate}' has case weights (a per-element "
            f"numpyro.handlers.scale on sites that depend on an enumerated latent), which "
            f"{fitter} does not support. Fit the weighted model with EM (soft, not hard), or "
            "replicate the weighted elements."
        )


def _plate_dim(trace, plate):
    for site in trace.sites.values():
        for dim, name in site.plate_dims.items():
            if name == plate:
                return dim
    return None


def observation_plate(trace, purpose: str = "per_observation=True", priors=()) -> tuple[str, int]:
    """``(name, dim)`` of the data plate: the case weights' plate, else the
    plate that holds every sample site but the global sites named in
    ``priors`` (the outermost one if several do).

    Raises:
        ModelError: no plate holds every sample site.
    """
    weights = getattr(trace, "weights", None)
    if weights is not None:
        return weights.plate, weights.dim
    sites = {n: s for n, s in trace.sites.items() if n not in priors}
    shared = None
    for site in sites.values():
        shared = set(site.plates) if shared is None else shared & set(site.plates)
    if not shared:
        counts = {}
        for site in sites.values():
            for plate in site.plates:
                counts[plate] = counts.get(plate, 0) + 1
        plate = max(counts, key=counts.get, default=None)
        outside = next(n for n, s in sites.items() if plate not in s.plates)
        where = f"plate '{plate}'" if plate else "every plate"
        scalar = purpose.startswith("per_observation")
        if find_chain(trace) is not None:
            hint = (
                " A single sequence (a scan chain without a plate of sequences) is one "
                "observation"
                + (
                    ": its log-likelihood is log_likelihood(...) with per_observation=False"
                    if scalar
                    else ""
                )
                + "; for one value per sequence, put the sequences in a numpyro.plate."
            )
        else:
            hint = " Put the site inside the plate" + (
                ", or use per_observation=False." if scalar else "."
            )
        raise ModelError(
            f"jaxem: {purpose} needs a data plate that holds every sample site, "
            f"each element of it one observation; site '{user_site_name(outside)}' is "
            f"outside {where}.{hint}"
        )
    dims = {p: _plate_dim(trace, p) for p in shared}
    name = max(dims, key=lambda p: dims[p])
    return name, dims[name]


def _logsumexp(x, axis):
    """``logsumexp`` with a zero (not NaN) gradient where every term is -inf."""
    shift = jax.lax.stop_gradient(jnp.max(x, axis=axis, keepdims=True))
    shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
    total = jnp.sum(jnp.exp(x - shift), axis=axis, keepdims=True)
    out = jnp.where(total > 0, jnp.log(jnp.where(total > 0, total, 1.0)) + shift, -jnp.inf)
    return jnp.squeeze(out, axis)


def _to_elements(x, dim, size):
    """``x`` summed over every axis but ``dim``, as ``(size,)``."""
    x = jnp.asarray(x)
    if -dim > x.ndim or x.shape[dim] == 1:
        # Not broadcast along the plate: counted once in the total, spread evenly.
        return jnp.broadcast_to(jnp.sum(x) / size, (size,))
    axis = x.ndim + dim
    return jnp.sum(jnp.moveaxis(x, axis, 0).reshape(size, -1), axis=1)


def _mixture_elements(log_factors, trace, name, dim, size):
    """Per element: the logsumexp over one latent's values (the mixture contraction
    of `jaxem.estep.contract_factors`, stopped before the plate sum)."""
    joint, enum_dim, rest = gather_latent_factors(log_factors, trace, name)
    if joint is None:  # a support of one value: nothing to sum out
        return sum(_to_elements(f, dim, size) for f in log_factors.values())
    # The enumeration dim is left of the plate dims: removing it leaves their negative dims.
    joint = _logsumexp(joint, jnp.ndim(joint) + enum_dim)
    return _to_elements(joint, dim, size)


def _funsor_elements(log_factors, trace, plate, dim, size):
    """Per element: funsor's sum-product with ``plate`` left free."""

    def contract(log_factors):
        factors, sum_vars, plates = [], set(), set()
        for name, site in trace.sites.items():
            log_prob = log_factors[name]
            if not site.dim_to_name:
                log_prob = jnp.sum(log_prob)
            factors.append(
                funsor.to_funsor(log_prob, output=funsor.Real, dim_to_name=site.dim_to_name)
            )
            if not site.is_observed:
                sum_vars.add(name)
            plates.update(site.plates)
        with funsor.interpretations.lazy:
            lazy = funsor.sum_product.sum_product(
                ops.logaddexp,
                ops.add,
                factors,
                eliminate=frozenset(sum_vars) | (frozenset(plates) - {plate}),
                plates=frozenset(plates),
            )
        with exact_log:
            result = funsor.optimizer.apply_optimizer(lazy)
        if plate in result.inputs:
            return result.align((plate,)).data
        return jnp.broadcast_to(result.data / size, (size,))

    return zero_safe_log(contract)(log_factors)


def element_log_likelihoods(log_factors: dict, trace, *, parallel: bool = False, priors=()):
    """Each element's log-likelihood over the data plate (`observation_plate`),
    weighted by its case weight, ``(N,)``; they sum to the log-likelihood.
    ``priors`` names the global sites, whose prior belongs to no element (their
    factors in ``log_factors`` are zeros).

    Raises:
        ModelError: no data plate, or a site outside it.
    """
    plate, dim = observation_plate(trace, priors=priors)
    outside = [n for n, s in trace.sites.items() if plate not in s.plates and n not in priors]
    if outside:
        raise ModelError(
            f"jaxem: per_observation=True gives one value per element of plate '{plate}', "
            f"but site '{user_site_name(outside[0])}' is outside that plate, so its "
            "log-density belongs to no element. Put the site inside the plate, or use "
            "per_observation=False."
        )
    elements, _ = _split(log_factors, trace, plate, dim, parallel)
    weights = getattr(trace, "weights", None)
    return elements if weights is None else weights.values * elements


def weighted_log_likelihood(log_factors: dict, trace, *, parallel: bool = False):
    """``sum_n w_n log p(x_n)`` over the weighted plate, plus the (already scaled)
    log-densities of the sites outside it."""
    weights = trace.weights
    elements, outside = _split(log_factors, trace, weights.plate, weights.dim, parallel)
    return jnp.sum(weights.values * elements) + outside


def _split(log_factors, trace, plate, dim, parallel):
    """``(per-element log-likelihood (N,), sum of the sites outside the plate)``."""
    sites = trace.sites
    latents = {n for n, s in sites.items() if not s.is_observed}
    size = max(
        (
            jnp.shape(log_factors[n])[dim]
            for n, s in sites.items()
            if plate in s.plates and -dim <= jnp.ndim(log_factors[n])
        ),
        default=1,
    )
    block = {n for n, s in sites.items() if n in latents or latents & set(s.dim_to_name.values())}
    outside = sum(
        (jnp.sum(log_factors[n]) for n, s in sites.items() if plate not in s.plates),
        jnp.zeros((), jnp.result_type(float)),
    )
    elements = sum(
        (
            _to_elements(log_factors[n], dim, size)
            for n, s in sites.items()
            if plate in s.plates and n not in block
        ),
        jnp.zeros((size,), jnp.result_type(float)),
    )
    if not latents:
        return elements, outside
    # The sites over no latent are counted above; zeros keep the structure.
    blocked = {n: f if n in block else jnp.zeros_like(f) for n, f in log_factors.items()}
    chain = find_chain(trace)
    if chain is not None:
        per_plate = chain_log_likelihoods(blocked, trace, chain, parallel=parallel)
        elements = elements + _to_elements(per_plate, dim, size)
    elif len(latents) == 1:
        elements = elements + _mixture_elements(blocked, trace, next(iter(latents)), dim, size)
    else:
        elements = elements + _funsor_elements(blocked, trace, plate, dim, size)
    return elements, outside
