"""Inference over a Markov chain's factors: forward-backward, Viterbi, sampling.

The factors of a first-order chain (:func:`jaxem.chain.find_chain`) are laid
out as a first-step tensor and per-step ``K x K`` tensors, and their
sum-product is the forward algorithm: T K^2 work in a ``lax.scan`` (or a
parallel reduction of K x K matrices, log T deep). Its gradient with respect
to the factors' log-probabilities is the posterior of every factor (Eisner
2016): backpropagation through the forward pass *is* the backward pass, and
yields the pairwise marginals the transition M-step needs. Max-product with
backpointers gives the Viterbi path; sampling backwards from the forward
messages gives a draw of the whole path (forward filtering, backward
sampling).
"""

from __future__ import annotations

import functools
import math
import operator
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxem.chain import Chain, arrange_factor, enumerated_names, step_mask

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
        return _logsumexp(first, axis=-2)
    return first


def _finite_max(x, axis):
    m = jax.lax.stop_gradient(jnp.max(x, axis=axis, keepdims=True))
    return jnp.where(jnp.isfinite(m), m, 0.0)


def _forward_sequential(alpha, steps, shape, mask):
    """log p(data) by the scaled forward pass (probabilities normalized at every
    step, the log normalizers summed), one value per plate cell ``(*plates)``;
    its gradient is the scaled backward pass of :func:`_scaled_forward`."""
    if steps is None:
        return _logsumexp(alpha, -1)
    return _scaled_forward(alpha, steps, _kept_steps(shape, mask))


def _kept_steps(shape, mask):
    """Which steps count, shape ``(T - 1, *batch)``: all of them without a mask."""
    return jnp.ones(shape[:-2], bool) if mask is None else mask


def _step_exps(steps, num_steps):
    """The step factors as ``exp(F - max F)``: ``(varying, constant, shift)``,
    the factors that vary over time (scanned over), the time-invariant ones
    (their single step), and the sum of the maxima per step."""
    varying, constant, shift = [], [], 0.0
    for factor in steps:
        top = _finite_max(factor, (-2, -1))
        exp = jnp.exp(factor - top)
        shift = shift + top[..., 0, 0]
        if exp.shape[0] == num_steps:
            varying.append(exp)
        else:
            constant.append(exp[0])
    return tuple(varying), tuple(constant), shift


def _step_matrix(slices, constant):
    """One step's matrix: the product of its factors' exponentials."""
    return functools.reduce(operator.mul, (*slices, *constant))


def _matvec(a, matrix):
    """``a @ M`` over the last axes (summing the previous state).

    Inside a scan, XLA's CPU backend runs a batched ``dot`` as a library call
    per step: for one sequence a broadcast product and a reduce, fused into one
    loop, is 5x faster (K = 8); over many sequences the ``dot`` is as fast as
    any fused form (100 sequences: 33 ms per EM iteration against 39 for K
    unrolled products and 100 for the reduce).
    """
    num_states = a.shape[-1]
    matrix = jnp.broadcast_to(matrix, matrix.shape[:-2] + (num_states, num_states))
    if math.prod(a.shape[:-1]) == 1:
        return jnp.sum(a[..., :, None] * matrix, axis=-2)
    return jnp.einsum("...p,...ps->...s", a, matrix)


def _vecmat(matrix, b):
    """``M @ b`` over the last axes (summing the current state); see :func:`_matvec`."""
    num_states = b.shape[-1]
    matrix = jnp.broadcast_to(matrix, matrix.shape[:-2] + (num_states, num_states))
    if math.prod(b.shape[:-1]) == 1:
        return jnp.sum(matrix * b[..., None, :], axis=-1)
    return jnp.einsum("...ps,...s->...p", matrix, b)


def _safe(norm):
    """A zero normalizer (an impossible step) divides by 1: its log is -inf, and
    neither the messages nor the gradients become NaN."""
    return jnp.where(norm > 0, norm, 1.0)


@jax.custom_vjp
def _scaled_forward(alpha, steps, keep):
    return _forward_pass(alpha, steps, keep).log_z


class _Forward(NamedTuple):
    log_z: jax.Array  # (*plates): one sequence's log-likelihood per plate cell
    first: jax.Array  # (*plates, K): the first step's normalized messages
    previous: jax.Array  # (T - 1, *plates, K): the messages entering each later step
    last: jax.Array  # (*plates, K): the messages after the last step
    norms: jax.Array  # (T - 1, *plates): each step's normalizer (1 at padded steps)


def _forward_pass(alpha, steps, keep) -> _Forward:
    """Forward messages ``a_t``, normalized to sum to 1. A step's matrix is the
    product of its factors' ``exp(F - max F)``, so a step of the scan is a
    K x K elementwise product, a vector-matrix product and a normalization. A
    padded step (``keep`` False) is the identity."""
    shift = _finite_max(alpha, -1)
    a = jnp.exp(alpha - shift)
    norm = jnp.sum(a, -1, keepdims=True)
    a = a / _safe(norm)
    log_z = (jnp.log(norm) + shift)[..., 0]
    varying, constant, step_shift = _step_exps(steps, keep.shape[0])

    def step(a, inputs):
        slices, keep = inputs
        b = _matvec(a, _step_matrix(slices, constant))
        norm = jnp.sum(b, -1)
        b = b / _safe(norm)[..., None]
        return jnp.where(keep[..., None], b, a), (a, jnp.where(keep, norm, 1.0))

    last, (previous, norms) = jax.lax.scan(step, a, (varying, keep))
    step_shift = jnp.broadcast_to(step_shift, keep.shape)
    log_z = log_z + jnp.sum(jnp.log(norms), 0) + jnp.sum(jnp.where(keep, step_shift, 0.0), 0)
    return _Forward(log_z, a, previous, last, norms)


def _backward_pass(varying, constant, keep, forward):
    """The scaled backward messages ``b_{t-1} = M_t b_t / n_t``, with the forward
    pass's normalizers: ``(b_0, (b_1, ..., b_{T-1}))``."""

    def step(b, inputs):
        slices, norm, keep = inputs
        back = _vecmat(_step_matrix(slices, constant), b) / norm[..., None]
        return jnp.where(keep[..., None], back, b), b

    norms = _safe(forward.norms)
    return jax.lax.scan(step, jnp.ones_like(forward.first), (varying, norms, keep), reverse=True)


def _scaled_forward_fwd(alpha, steps, keep):
    forward = _forward_pass(alpha, steps, keep)
    return forward.log_z, (steps, keep, forward)


def _scaled_forward_bwd(residuals, cotangent):
    """A step's pairwise posterior is ``a_{t-1}[p] M_t[p, s] b_t[s] / n_t``; the
    gradient with respect to a step factor is that summed over the dims the
    factor does not vary along, and with respect to the first step's
    log-messages it is the first state's posterior ``a_0 b_0``.

    The usual factors are summed without building the (T - 1, K, K) pairwise
    array: one over the current state only (an emission) gets the per-step
    posterior ``a_t b_t``, and when every time-varying factor is such, a
    time-invariant one (the transition matrix) gets
    ``C[p, s] sum_t a_{t-1}[p] V_t[s] b_t[s] / n_t``, one matmul over time.
    """
    steps, keep, forward = residuals
    varying, constant, _ = _step_exps(steps, keep.shape[0])
    b_first, later = _backward_pass(varying, constant, keep, forward)
    scale = cotangent * jnp.where(keep, 1.0 / _safe(forward.norms), 0.0)
    weighted = later * scale[..., None]  # b_t / n_t
    after = jnp.concatenate([forward.previous[1:], forward.last[None]])  # a_t
    # The cotangent has one entry per plate cell (a sequence's weight).
    current = cotangent[..., None] * jnp.where(keep[..., None], after * later, 0.0)
    over_time = pairwise = None
    if all(e.shape[-2] == 1 for e in varying):
        emissions = functools.reduce(operator.mul, varying)[..., 0, :] if varying else 1.0
        summed = jnp.einsum("t...p,t...s->...ps", forward.previous, emissions * weighted)
        over_time = functools.reduce(operator.mul, constant, summed)[None]
    grads = []
    for factor in steps:
        shape = jnp.shape(factor)
        if shape[-2] == 1:
            grads.append(_sum_to(current[..., None, :], shape))
        elif over_time is not None and shape[0] == 1:
            grads.append(_sum_to(over_time, shape))
        else:
            if pairwise is None:
                matrices = _all_matrices(varying, constant)
                pairwise = forward.previous[..., :, None] * matrices * weighted[..., None, :]
            grads.append(_sum_to(pairwise, shape))
    return cotangent[..., None] * forward.first * b_first, tuple(grads), None


_scaled_forward.defvjp(_scaled_forward_fwd, _scaled_forward_bwd)


def _all_matrices(varying, constant):
    """Every step's matrix at once, ``(T - 1 or 1, *plates, K, K)``."""
    return functools.reduce(operator.mul, (*varying, *(c[None] for c in constant)))


def _sum_to(x, shape):
    """Sum ``x`` over the dims where ``shape`` (of equal length) is 1."""
    axes = tuple(i for i, (n, m) in enumerate(zip(x.shape, shape)) if m == 1 and n != 1)
    return jnp.sum(x, axis=axes, keepdims=True) if axes else x


def _logsumexp(x, axis):
    """``logsumexp`` whose gradient is 0, not NaN, where every term is -inf (an
    impossible cell, e.g. after a transition probability reached 0)."""
    shift = _finite_max(x, axis)
    total = jnp.sum(jnp.exp(x - shift), axis=axis, keepdims=True)
    out = jnp.where(total > 0, jnp.log(jnp.where(total > 0, total, 1.0)) + shift, -jnp.inf)
    return jnp.squeeze(out, axis)


def _log_matmul(x, y):
    """``log(exp(x) @ exp(y))`` over the last two axes, as a logsumexp over the
    inner index: a product of many steps spans thousands of nats, more than a
    matmul of exponentials scaled by row and column maxima can represent."""
    return _logsumexp(x[..., :, :, None] + y[..., None, :, :], axis=-2)


def _forward_parallel(alpha, steps, shape, mask):
    """The product of the step matrices as a balanced tree of log-matmuls:
    log2(T) sequential levels of K^3 work, which a GPU runs in parallel."""
    if steps is None:
        return _logsumexp(alpha, -1)
    stacked = jnp.broadcast_to(sum(steps), shape)
    if mask is not None:
        # A padded step is the identity: log 1 on the diagonal, log 0 elsewhere.
        eye = jnp.where(jnp.eye(stacked.shape[-1], dtype=bool), 0.0, -jnp.inf).astype(stacked.dtype)
        stacked = jnp.where(mask[..., None, None], stacked, eye)
    mats = stacked
    while mats.shape[0] > 1:
        if mats.shape[0] % 2:
            eye = jnp.where(jnp.eye(mats.shape[-1], dtype=bool), 0.0, -jnp.inf).astype(mats.dtype)
            mats = jnp.concatenate([mats, jnp.broadcast_to(eye, (1,) + mats.shape[1:])])
        mats = _log_matmul(mats[0::2], mats[1::2])
    final = _log_matmul(alpha[..., None, :], mats[0])[..., 0, :]
    return _logsumexp(final, -1)


def contract_chain(log_factors: dict, trace, chain: Chain, *, parallel: bool = False):
    """log p(data): the sum-product of a chain's factors by the forward algorithm.

    Args:
        log_factors: ``{site name: log-probability tensor}`` of the trace.
        trace: the enumerated trace.
        chain: its :class:`Chain`.
        parallel: a parallel (log-depth) reduction over time instead of a scan.
    """
    return _contract_tensors(_tensors(log_factors, trace, chain), parallel)


def chain_log_likelihoods(log_factors: dict, trace, chain: Chain, *, parallel: bool = False):
    """The chain's log-likelihood per plate cell, ``(*plates)`` over the trace's
    ``max_plate_nesting`` plate dims (one value per sequence of a batch), without
    the factors over no latent."""
    tensors = _tensors(log_factors, trace, chain)
    forward = _forward_parallel if parallel else _forward_sequential
    return forward(_initial_log_messages(tensors), tensors.steps, tensors.shape, tensors.mask)


def _contract_tensors(tensors, parallel):
    alpha = _initial_log_messages(tensors)
    forward = _forward_parallel if parallel else _forward_sequential
    return jnp.sum(forward(alpha, tensors.steps, tensors.shape, tensors.mask)) + tensors.constant


def chain_posterior(log_factors: dict, trace, chain: Chain):
    """Per-step marginals of the chain's latent, ``(*plates, T, K)`` (zeros at
    padded steps), by the scaled forward-backward pass: ``a_t b_t``."""
    tensors = _tensors(log_factors, trace, chain)
    alpha = _initial_log_messages(tensors)
    if tensors.steps is None:
        shift = _finite_max(alpha, -1)
        first = jnp.exp(alpha - shift)
        out = (first / _safe(jnp.sum(first, -1, keepdims=True)))[None]
    else:
        keep = _kept_steps(tensors.shape, tensors.mask)
        forward = _forward_pass(alpha, tensors.steps, keep)
        varying, constant, _ = _step_exps(tensors.steps, keep.shape[0])
        b_first, later = _backward_pass(varying, constant, keep, forward)
        # The message after step t is the one entering step t + 1.
        after = jnp.concatenate([forward.previous[1:], forward.last[None]])
        later = jnp.where(keep[..., None], after * later, 0.0)
        out = jnp.concatenate([(forward.first * b_first)[None], later])
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
    (forward filtering, backward sampling), in the format of :func:`chain_map`.

    The last state is drawn from the last forward message, then each earlier
    one given the next: ``p(s_{t-1} | s_t, data) ∝ a_{t-1}[s_{t-1}] M_t[s_{t-1}, s_t]``
    (the scaled forward messages ``a`` and step matrices ``M`` of the forward
    pass), and the initial state outside the scan given the first. A padded
    step is the identity, so its state is the next step's.
    """
    tensors = _tensors(log_factors, trace, chain)
    alpha = _initial_log_messages(tensors)
    first_key, steps_key, initial_key = jax.random.split(rng_key, 3)
    if tensors.steps is None:
        states = jax.random.categorical(first_key, alpha)[None]
    else:
        keep = _kept_steps(tensors.shape, tensors.mask)
        forward = _forward_pass(alpha, tensors.steps, keep)
        varying, constant, _ = _step_exps(tensors.steps, keep.shape[0])
        last = jax.random.categorical(first_key, jnp.log(forward.last))

        def step(state, inputs):
            key, slices, previous, keep = inputs
            matrix = _step_matrix(slices, constant)
            num_states = previous.shape[-1]
            matrix = jnp.broadcast_to(matrix, matrix.shape[:-2] + (num_states, num_states))
            column = jnp.take_along_axis(matrix, state[..., None, None], axis=-1)[..., 0]
            drawn = jax.random.categorical(key, jnp.log(previous * column))
            return jnp.where(keep, drawn, state), state

        keys = jax.random.split(steps_key, keep.shape[0])
        start, later = jax.lax.scan(
            step, last, (keys, varying, forward.previous, keep), reverse=True
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
