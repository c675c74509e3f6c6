"""Inference over a Markov chain's factors: forward-backward, Viterbi, sampling.

The factors of a first-order chain (`jaxem.chain.find_chain`) are laid
out as a first-step tensor and per-step ``K x K`` tensors, and their
sum-product is the forward algorithm (`jaxem.forward_backward`): T K^2
work in a ``lax.scan`` (or a parallel reduction of K x K matrices, log T
deep). Its gradient with respect
to the factors' log-probabilities is the posterior of every factor (Eisner
2016): the backward pass, and it yields the pairwise marginals the
transition M-step needs. Max-product with
backpointers gives the Viterbi path; sampling backwards from the forward
messages gives a draw of the whole path (forward filtering, backward
sampling).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxem.chain import Chain, arrange_factor, enumerated_names, step_mask
from jaxem.forward_backward import (
    finite_max,
    forward_pass,
    kept_steps,
    log_z_by_scan,
    log_z_by_tree,
    logsumexp,
    nonzero,
    smooth,
    split_steps,
    step_matrix,
)

__all__ = [
    "chain_indicators",
    "chain_log_likelihoods",
    "chain_map",
    "chain_posterior",
    "chain_sample",
    "contract_chain",
]


class _Tensors(NamedTuple):
    constant: jax.Array  # log-factors over no latent
    initial: jax.Array | None  # (*plates, K0): factors over the initial state
    first: jax.Array  # (*plates, [K0], K): first-step factors
    # The later steps' log-factors over the previous x the current state, one
    # per site, unbroadcast: (T - 1 or 1, *plates or 1, K or 1, K or 1).
    steps: tuple | None
    shape: tuple | None  # their broadcast shape, (T - 1, *plates, K, K)
    mask: jax.Array | None  # (T - 1, *plates): False where a step is padding


def _tensors(log_factors, trace, chain) -> _Tensors:
    sites = trace.sites
    constant, initial = 0.0, None
    for n in chain.global_sites:
        if chain.initial in sites[n].dim_to_name.values():
            term = arrange_factor(log_factors[n], sites[n], [chain.initial], chain)
            initial = term if initial is None else initial + term
        else:
            constant = constant + jnp.sum(log_factors[n])
    first_names = [chain.initial, chain.first] if chain.initial else [chain.first]
    first = sum(
        arrange_factor(log_factors[n], sites[n], first_names, chain) for n in chain.first_sites
    )
    steps = steps_shape = mask = None
    plate_shapes = [jnp.shape(first)[: chain.num_plate_dims]]
    if chain.stacked_sites:
        names = [chain.time, chain.first, chain.name]
        # Summing the sites' factors would materialize a (T - 1, K, K) array
        # of mostly repeated values (a transition matrix plus per-step
        # emissions); the forward pass multiplies them per step instead.
        steps = tuple(
            jnp.moveaxis(
                arrange_factor(log_factors[n], sites[n], names, chain), chain.num_plate_dims, 0
            )
            for n in chain.stacked_sites
        )
        steps_shape = jnp.broadcast_shapes(*(jnp.shape(f) for f in steps))
        plate_shapes.append(steps_shape[1:-2])
        mask = step_mask(sites[chain.name], chain)
    shape = jnp.broadcast_shapes(*plate_shapes)
    if initial is not None:
        first = first + initial[..., :, None]  # the initial state's factors join the first step
    first = jnp.broadcast_to(first, shape + jnp.shape(first)[chain.num_plate_dims :])
    if steps is not None:
        steps_shape = steps_shape[:1] + shape + steps_shape[-2:]
        if mask is not None:
            mask = jnp.broadcast_to(mask, steps_shape[:-2])
    return _Tensors(constant, initial, first, steps, steps_shape, mask)


def _initial_log_messages(tensors):
    """Log forward messages of the first step, ``(*plates, K)``."""
    first = tensors.first
    if tensors.initial is not None:
        return logsumexp(first, axis=-2)
    return first


def contract_chain(log_factors: dict, trace, chain: Chain, *, parallel: bool = False):
    """log p(data): the sum-product of a chain's factors by the forward algorithm.

    Args:
        log_factors: ``{site name: log-probability tensor}`` of the trace.
        trace: the enumerated trace.
        chain: its `Chain`.
        parallel: a parallel (log-depth) reduction over time instead of a scan.
    """
    return _contract_tensors(_tensors(log_factors, trace, chain), parallel)


def chain_log_likelihoods(log_factors: dict, trace, chain: Chain, *, parallel: bool = False):
    """The chain's log-likelihood per plate cell, ``(*plates)`` over the trace's
    ``max_plate_nesting`` plate dims (one value per sequence of a batch), without
    the factors over no latent."""
    tensors = _tensors(log_factors, trace, chain)
    return _per_plate_cell(tensors, parallel)


def _per_plate_cell(tensors, parallel):
    forward = log_z_by_tree if parallel else log_z_by_scan
    return forward(_initial_log_messages(tensors), tensors.steps, tensors.shape, tensors.mask)


def _contract_tensors(tensors, parallel):
    return jnp.sum(_per_plate_cell(tensors, parallel)) + tensors.constant


def chain_posterior(log_factors: dict, trace, chain: Chain):
    """Per-step marginals of the chain's latent, ``(*plates, T, K)`` (zeros at
    padded steps), by the scaled forward-backward pass: ``a_t b_t``."""
    tensors = _tensors(log_factors, trace, chain)
    alpha = _initial_log_messages(tensors)
    if tensors.steps is None:
        shift = finite_max(alpha, -1)
        first = jnp.exp(alpha - shift)
        out = (first / nonzero(jnp.sum(first, -1, keepdims=True)))[None]
    else:
        keep = kept_steps(tensors.shape, tensors.mask)
        forward = forward_pass(alpha, tensors.steps, keep)
        parts = split_steps(tensors.steps, keep.shape[0])
        first, later, _ = smooth(parts, keep, forward)
        later = jnp.where(keep[..., None], later, 0.0)
        out = jnp.concatenate([first[None], later])
    out = jnp.moveaxis(out, 0, -2)  # (*plates, T, K)
    return out.reshape(out.shape[chain.num_plate_dims - _chain_plate_ndim(chain) :])


def _chain_plate_ndim(chain):
    return max((-d for d in chain.plate_dims), default=0)


def chain_map(log_factors: dict, trace, chain: Chain) -> dict:
    """Viterbi: the jointly most likely states, ``{chain site: (T, *plates)}`` and,
    with an initial state outside the scan, ``{initial site: (*plates)}``."""
    tensors = _tensors(log_factors, trace, chain)
    first = tensors.first
    if tensors.initial is not None:
        initial_arg = jnp.argmax(first, axis=-2)
        delta = jnp.max(first, axis=-2)
    else:
        delta = first
    num_states = delta.shape[-1]
    if tensors.steps is not None:
        num_steps = tensors.shape[0]
        is_varying = [f.shape[0] == num_steps for f in tensors.steps]
        varying = tuple(f for f, v in zip(tensors.steps, is_varying) if v)

        def forward(delta, inputs):
            slices, keep = inputs
            slices = iter(slices)
            factor = sum(next(slices) if v else f[0] for f, v in zip(tensors.steps, is_varying))
            scores = delta[..., :, None] + factor
            pointer = jnp.argmax(scores, axis=-2)
            new = jnp.max(scores, axis=-2)
            if keep is not None:
                new = jnp.where(keep[..., None], new, delta)
                pointer = jnp.where(keep[..., None], pointer, jnp.arange(num_states))
            return new, pointer

        delta, pointers = jax.lax.scan(forward, delta, (varying, tensors.mask), length=num_steps)
        last = jnp.argmax(delta, axis=-1)

        def backward(state, pointer):
            previous = jnp.take_along_axis(pointer, state[..., None], axis=-1)[..., 0]
            return previous, state

        start, later = jax.lax.scan(backward, last, pointers, reverse=True)
        states = jnp.concatenate([start[None], later])
    else:
        states = jnp.argmax(delta, axis=-1)[None]
    init = None
    if tensors.initial is not None:
        init = jnp.take_along_axis(initial_arg, states[0][..., None], axis=-1)[..., 0]
    return _assignment(states, init, trace, chain)


def _assignment(states, init, trace, chain) -> dict:
    """``{chain site: states (T, *chain plates)}`` and, with an initial state,
    ``{initial site: (*its plates)}``, from ``(T, *trace plates)`` states."""
    trim = chain.num_plate_dims - _chain_plate_ndim(chain)
    values = {chain.name: states.reshape(states.shape[:1] + states.shape[1 + trim :])}
    if init is not None:
        site = trace.sites[chain.initial]
        init_ndim = max((-d for d in site.plate_dims), default=0)
        values[chain.initial] = (
            init.reshape(init.shape[init.ndim - init_ndim :]) if init_ndim else init.reshape(())
        )
    return values


def chain_sample(rng_key, log_factors: dict, trace, chain: Chain) -> dict:
    """A draw of the chain's states from their joint posterior given the data
    (forward filtering, backward sampling), in the format of `chain_map`.

    The last state is drawn from the last forward message, then each earlier
    one given the next: ``p(s_{t-1} | s_t, data) ∝ a_{t-1}[s_{t-1}] M_t[s_{t-1}, s_t]``
    (the scaled forward messages ``a`` and the transition matrices ``M`` of
    the forward pass; an emission is the same for every previous state), and
    the initial state outside the scan given the first. A padded step is the
    identity, so its state is the next step's.
    """
    tensors = _tensors(log_factors, trace, chain)
    alpha = _initial_log_messages(tensors)
    first_key, steps_key, initial_key = jax.random.split(rng_key, 3)
    if tensors.steps is None:
        states = jax.random.categorical(first_key, alpha)[None]
    else:
        keep = kept_steps(tensors.shape, tensors.mask)
        forward = forward_pass(alpha, tensors.steps, keep)
        parts = split_steps(tensors.steps, keep.shape[0])
        last = jax.random.categorical(first_key, jnp.log(forward.last))

        def step(state, inputs):
            key, slices, previous, keep = inputs
            weights = previous
            matrix = step_matrix(slices, parts.constant)
            if matrix is not None:
                num_states = previous.shape[-1]
                matrix = jnp.broadcast_to(matrix, matrix.shape[:-2] + (num_states, num_states))
                weights = weights * jnp.take_along_axis(matrix, state[..., None, None], -1)[..., 0]
            drawn = jax.random.categorical(key, jnp.log(weights))
            return jnp.where(keep, drawn, state), state

        keys = jax.random.split(steps_key, keep.shape[0])
        start, later = jax.lax.scan(
            step, last, (keys, parts.varying, forward.previous, keep), reverse=True
        )
        states = jnp.concatenate([start[None], later])
    init = None
    if tensors.initial is not None:
        # tensors.first holds the initial state's factors: (*plates, K0, K).
        given_first = jnp.take_along_axis(tensors.first, states[0][..., None, None], axis=-1)
        init = jax.random.categorical(initial_key, given_first[..., 0], axis=-1)
    return _assignment(states, init, trace, chain)


def chain_indicators(values: dict, trace, chain: Chain) -> dict:
    """Hard-EM "marginals": for every factor, the number of steps whose cell
    agrees with the Viterbi path (1 or 0 for a factor with a full time dim;
    padded steps count 0)."""
    sites = trace.sites
    num_plates = chain.num_plate_dims
    states = values[chain.name]  # (T, *chain plates)
    states = states.reshape(
        states.shape[:1] + (1,) * (num_plates - (states.ndim - 1)) + states.shape[1:]
    )
    mask = step_mask(sites[chain.name], chain) if chain.stacked_sites else None
    out = {}
    for name, site in sites.items():
        shape = jnp.shape(site.log_prob)
        stacked = name in chain.stacked_sites
        time_dim = _time_dim(site) if stacked else None
        indicator = jnp.ones((), jnp.result_type(site.log_prob))
        for var in enumerated_names(site):
            if var == chain.initial:
                assigned = values[chain.initial]
            elif stacked:
                assigned = states[1:] if var == chain.name else states[:-1]
            else:
                assigned = states[0]
            if stacked:
                assigned = _place_time(assigned, time_dim, num_plates)
            indicator = indicator * (sites[var].value == assigned)
        if mask is not None and stacked:
            indicator = indicator * _place_time(mask, time_dim, num_plates)
        # Sum over the dims along which the factor itself does not vary.
        full = jnp.broadcast_shapes(jnp.shape(indicator), shape)
        indicator = jnp.broadcast_to(indicator, full)
        ndim = len(full)
        aligned = (1,) * (ndim - len(shape)) + tuple(shape)
        summed = tuple(a for a in range(ndim) if aligned[a] == 1 and full[a] != 1)
        out[name] = jnp.sum(indicator, axis=summed, keepdims=True).reshape(shape)
    return out


def _time_dim(site):
    """The time dim of a scanned site, where NumPyro's scan puts it."""
    fn = site.fn
    return -min(len(fn.batch_shape), jnp.ndim(site.value) - fn.event_dim)


def _place_time(x, time_dim, num_plates):
    """``(T - 1, *plates)`` -> the time dim at ``time_dim``, plates rightmost."""
    plates = x.shape[1:]
    plates = (1,) * (num_plates - len(plates)) + plates
    return x.reshape(x.shape[:1] + (1,) * (-time_dim - 1 - num_plates) + plates)
