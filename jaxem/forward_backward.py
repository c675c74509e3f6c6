"""The sum-product of a chain's step factors: the forward pass and its gradient.

A chain's factors come as log messages of the first state and per-step log
factors over the previous x the current state (`jaxem.chain_inference`
lays them out). `log_z_by_scan` is the scaled forward algorithm in a
``lax.scan``, T K^2 work; its custom gradient is the forward-filter
backward-smoother, which yields every factor's posterior (the gradient of
``log Z`` with respect to a log-factor is its posterior, Eisner 2016).
`log_z_by_tree` is a log-depth tree of log-space matrix products, for
GPUs and as an independent reference.
"""

from __future__ import annotations

import functools
import math
import operator
from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "finite_max",
    "forward_pass",
    "kept_steps",
    "log_z_by_scan",
    "log_z_by_tree",
    "logsumexp",
    "nonzero",
    "smooth",
    "split_steps",
    "step_matrix",
]


def finite_max(x, axis):
    m = jax.lax.stop_gradient(jnp.max(x, axis=axis, keepdims=True))
    return jnp.where(jnp.isfinite(m), m, 0.0)


def log_z_by_scan(alpha, steps, shape, mask):
    """log p(data), one value per plate cell ``(*plates)``, by the scaled
    forward pass (probabilities normalized at every step, the log normalizers
    summed); its gradient is the posterior of every factor, from the backward
    smoother of `_scaled_forward`."""
    if steps is None:
        return logsumexp(alpha, -1)
    return _scaled_forward(alpha, steps, kept_steps(shape, mask))


def kept_steps(shape, mask):
    """Which steps count, shape ``(T - 1, *batch)``: all of them without a mask."""
    return jnp.ones(shape[:-2], bool) if mask is None else mask


class _Steps(NamedTuple):
    """A chain's step factors, split by what they depend on.

    A factor over the previous and the current state (a transition) enters the
    forward pass as ``exp(F - max F)``: a row of a transition matrix holds a
    probability of at least 1/K, so its mass never underflows against the max.
    A factor over the current state only (an emission) stays in log space and
    is added to the log of the predicted state probabilities at each step: a
    narrow emission puts the state the chain can reach thousands of nats below
    one it cannot, and an emission shifted by its own max would lose it.
    """

    varying: tuple  # exp of the transition-like factors that vary over time
    constant: tuple  # exp of the time-invariant ones (their single step)
    shift: jax.Array  # the sum of those factors' maxima, per step
    emission: jax.Array | None  # log emissions summed: (T - 1 or 1, *plates, K)


def split_steps(steps, num_steps) -> _Steps:
    varying, constant, shift, emission = [], [], 0.0, None
    for factor in steps:
        if factor.shape[-2] == 1:
            emission = factor[..., 0, :] if emission is None else emission + factor[..., 0, :]
            continue
        top = finite_max(factor, (-2, -1))
        exp = jnp.exp(factor - top)
        shift = shift + top[..., 0, 0]
        if exp.shape[0] == num_steps:
            varying.append(exp)
        else:
            constant.append(exp[0])
    return _Steps(tuple(varying), tuple(constant), shift, emission)


def _emission_at(emission, num_steps):
    """``(scanned, fixed)``: the emissions to scan over (``None`` when they do
    not vary over time) and the time-invariant ones (``0.0`` when none)."""
    if emission is None:
        return None, 0.0
    if emission.shape[0] == num_steps:
        return emission, 0.0
    return None, emission[0]


def step_matrix(slices, constant):
    """One step's transition matrix: the product of its transition-like
    factors' exponentials, ``None`` when the step has none."""
    factors = (*slices, *constant)
    return functools.reduce(operator.mul, factors) if factors else None


def _matvec(a, matrix):
    """``a @ M`` over the last axes (summing the previous state); without a
    transition matrix, every state is reached with the total mass of ``a``.

    Inside a scan, XLA's CPU backend runs a batched ``dot`` as a library call
    per step: for one sequence a broadcast product and a reduce, fused into one
    loop, is faster; over many sequences the ``dot`` is as fast as any fused
    form. (Both measured once, by ``benchmarks/hmm.py`` on variants of this
    function that are no longer in jaxem; the numbers are not given since no
    command reproduces them.)
    """
    if matrix is None:
        return jnp.broadcast_to(jnp.sum(a, -1, keepdims=True), a.shape)
    num_states = a.shape[-1]
    matrix = jnp.broadcast_to(matrix, matrix.shape[:-2] + (num_states, num_states))
    if math.prod(a.shape[:-1]) == 1:
        return jnp.sum(a[..., :, None] * matrix, axis=-2)
    return jnp.einsum("...p,...ps->...s", a, matrix)


def _vecmat(matrix, b):
    """``M @ b`` over the last axes (summing the current state); see `_matvec`."""
    if matrix is None:
        return jnp.broadcast_to(jnp.sum(b, -1, keepdims=True), b.shape)
    num_states = b.shape[-1]
    matrix = jnp.broadcast_to(matrix, matrix.shape[:-2] + (num_states, num_states))
    if math.prod(b.shape[:-1]) == 1:
        return jnp.sum(matrix * b[..., None, :], axis=-1)
    return jnp.einsum("...ps,...s->...p", matrix, b)


def nonzero(norm):
    """A zero normalizer (an impossible step) divides by 1: its log is -inf, and
    neither the messages nor the gradients become NaN."""
    return jnp.where(norm > 0, norm, 1.0)


@jax.custom_vjp
def _scaled_forward(alpha, steps, keep):
    return forward_pass(alpha, steps, keep).log_z


class _Forward(NamedTuple):
    log_z: jax.Array  # (*plates): one sequence's log-likelihood per plate cell
    first: jax.Array  # (*plates, K): the first step's normalized messages
    previous: jax.Array  # (T - 1, *plates, K): the messages entering each later step
    last: jax.Array  # (*plates, K): the messages after the last step


def forward_pass(alpha, steps, keep) -> _Forward:
    """Forward messages ``a_t``, normalized to sum to 1. A step predicts the
    state, ``u = a @ M`` (M the product of the transition-like factors'
    ``exp(F - max F)``), weighs it by the emissions and normalizes. A padded
    step (``keep`` False) is the identity.

    The fast pass weighs by ``exp(E - max E)`` computed for all steps at once.
    Where a narrow emission puts the reachable states more than the float
    range below an unreachable one, a step's normalizer underflows (or sinks
    to where its rounding shows); then the whole pass is redone in log space,
    shifted per step by the largest ``log u + E``, so the states that carry the
    mass are represented whatever the emissions' range.
    """
    shift = finite_max(alpha, -1)
    a = jnp.exp(alpha - shift)
    norm = jnp.sum(a, -1, keepdims=True)
    a = a / nonzero(norm)
    log_z = (jnp.log(norm) + shift)[..., 0]  # one value per plate cell
    parts = split_steps(steps, keep.shape[0])
    fast, smallest = _fast_forward(a, parts, keep)
    finfo = jnp.finfo(a.dtype)
    underflowed = smallest < finfo.tiny / finfo.eps
    forward = jax.lax.cond(underflowed, lambda: _log_space_forward(a, parts, keep), lambda: fast)
    step_shift = jnp.sum(jnp.where(keep, jnp.broadcast_to(parts.shift, keep.shape), 0.0), 0)
    return forward._replace(log_z=forward.log_z + log_z + step_shift)


def _fast_forward(a, parts, keep):
    """The forward pass with the emissions' exponentials taken before the scan:
    ``(forward, smallest kept normalizer)`` (its ``log_z`` without the
    first step and the transition shifts)."""
    num_steps = keep.shape[0]
    emission, emission_shift = None, 0.0
    if parts.emission is not None:
        top = finite_max(parts.emission, -1)
        emission, emission_shift = jnp.exp(parts.emission - top), top[..., 0]
    scanned, fixed = _emission_at(emission, num_steps)
    # The emission joins the step's matrix (a column scaling) rather than
    # scaling ``a @ M``: XLA's CPU backend then fuses the whole step into two
    # loops, faster over a long single sequence (measured once).
    fixed = () if emission is None or scanned is not None else (fixed[..., None, :],)

    def step(a, inputs):
        slices, emission, keep = inputs
        column = fixed if emission is None else (emission[..., None, :],)
        matrix = step_matrix((*slices, *column), parts.constant)
        b = _matvec(a, matrix)
        norm = jnp.sum(b, -1)
        b = b / nonzero(norm)[..., None]
        # Each stacked output costs a copy per step on CPU: the predicted
        # probabilities are recomputed at once by the backward pass instead.
        return jnp.where(keep[..., None], b, a), (a, jnp.where(keep, norm, 1.0))

    last, (previous, norms) = jax.lax.scan(step, a, (parts.varying, scanned, keep))
    emission_shift = jnp.where(keep, jnp.broadcast_to(emission_shift, keep.shape), 0.0)
    log_z = jnp.sum(jnp.log(norms), 0) + jnp.sum(emission_shift, 0)
    smallest = jnp.min(norms)  # 0 too: an impossible step is redone, and stays -inf
    return _Forward(log_z, a, previous, last), smallest


def _log_space_forward(a, parts, keep):
    """The forward pass with the emissions in log space: per step, ``log u + E``
    shifted by its max (see `forward_pass`)."""
    scanned, fixed = _emission_at(parts.emission, keep.shape[0])

    def step(a, inputs):
        slices, emission, keep = inputs
        predicted = _matvec(a, step_matrix(slices, parts.constant))
        scores = _log(predicted) + (fixed if emission is None else emission)
        top = finite_max(scores, -1)
        b = jnp.exp(scores - top)
        norm = jnp.sum(b, -1)
        b = b / nonzero(norm)[..., None]
        log_norm = jnp.where(keep, jnp.log(norm) + top[..., 0], 0.0)
        return jnp.where(keep[..., None], b, a), (a, log_norm)

    last, (previous, log_norms) = jax.lax.scan(step, a, (parts.varying, scanned, keep))
    return _Forward(jnp.sum(log_norms, 0), a, previous, last)


def _log(x):
    """``log x`` with ``log 0 = -inf`` and no NaN from a zero anywhere."""
    return jnp.where(x > 0, jnp.log(jnp.where(x > 0, x, 1.0)), -jnp.inf)


def smooth(parts, keep, forward):
    """The posterior of each state by the forward-filter backward-smoother:
    ``g_{t-1} = a_{t-1} * (M_t @ (g_t / u_t))``, with ``u_t = a_{t-1} @ M_t``
    the predicted probabilities of the forward pass. Only probabilities of at
    most 1 enter (``a_{t-1}[p] M_t[p, s] / u_t[s]`` is the probability of the
    previous state given the current one), never an emission, so nothing the
    forward pass could represent over- or underflows here.

    Returns ``(g_0, (g_1, ..., g_{T-1}), (r_1, ..., r_{T-1}))`` with
    ``r_t = g_t / u_t`` (0 at padded steps): the pairwise posterior of step t
    is ``a_{t-1}[p] M_t[p, s] r_t[s]``.
    """
    tiny = jnp.finfo(forward.last.dtype).tiny

    def step(posterior, inputs):
        slices, previous, predicted, keep = inputs
        # A state predicted below the smallest normal number would give a
        # ratio past the largest float; it stays at most 1/tiny.
        ratio = jnp.where(predicted > 0, posterior / jnp.maximum(predicted, tiny), 0.0)
        ratio = jnp.where(keep[..., None], ratio, 0.0)
        back = previous * _vecmat(step_matrix(slices, parts.constant), ratio)
        return jnp.where(keep[..., None], back, posterior), (posterior, ratio)

    inputs = (parts.varying, forward.previous, _predicted(parts, forward.previous), keep)
    first, (later, ratios) = jax.lax.scan(step, forward.last, inputs, reverse=True)
    return first, later, ratios


def _predicted(parts, previous):
    """``u_t = a_{t-1} @ M_t`` for every step at once, ``(T - 1, *plates, K)``."""
    if not parts.varying and not parts.constant:
        return jnp.broadcast_to(jnp.sum(previous, -1, keepdims=True), previous.shape)
    if not parts.varying:
        return _matvec(previous, step_matrix((), parts.constant))
    return jnp.einsum("t...p,t...ps->t...s", previous, _all_matrices(parts.varying, parts.constant))


def _scaled_forward_fwd(alpha, steps, keep):
    forward = forward_pass(alpha, steps, keep)
    return forward.log_z, (steps, keep, forward)


def _scaled_forward_bwd(residuals, cotangent):
    """The gradient of ``log Z`` with respect to a log-factor is its posterior:
    an emission gets the per-step posterior ``g_t``, a transition-like factor
    the pairwise posterior ``a_{t-1}[p] M_t[p, s] r_t[s]`` summed over the dims
    it does not vary along, and the first step's log-messages the first
    state's posterior ``g_0`` (see `smooth`).

    A time-invariant transition matrix, when no transition-like factor varies
    over time, gets ``C[p, s] sum_t a_{t-1}[p] r_t[s]``: one matmul over time
    instead of the (T - 1, K, K) pairwise array.
    """
    steps, keep, forward = residuals
    parts = split_steps(steps, keep.shape[0])
    first, later, ratios = smooth(parts, keep, forward)
    # The cotangent has one entry per plate cell (a sequence's weight).
    cotangent = cotangent[..., None]
    current = cotangent * jnp.where(keep[..., None], later, 0.0)
    over_time = pairwise = None
    if not parts.varying and parts.constant:
        summed = jnp.einsum("t...p,t...s->...ps", forward.previous, cotangent * ratios)
        over_time = functools.reduce(operator.mul, parts.constant, summed)[None]
    grads = []
    for factor in steps:
        shape = jnp.shape(factor)
        if shape[-2] == 1:
            grads.append(_sum_to(current[..., None, :], shape))
        elif over_time is not None:
            grads.append(_sum_to(over_time, shape))
        else:
            if pairwise is None:
                matrices = _all_matrices(parts.varying, parts.constant)
                pairwise = forward.previous[..., :, None] * matrices * ratios[..., None, :]
                pairwise = cotangent[..., None] * pairwise
            grads.append(_sum_to(pairwise, shape))
    return cotangent * first, tuple(grads), None


_scaled_forward.defvjp(_scaled_forward_fwd, _scaled_forward_bwd)


def _all_matrices(varying, constant):
    """Every step's matrix at once, ``(T - 1 or 1, *plates, K, K)``."""
    return functools.reduce(operator.mul, (*varying, *(c[None] for c in constant)))


def _sum_to(x, shape):
    """Sum ``x`` over the dims where ``shape`` (of equal length) is 1."""
    axes = tuple(i for i, (n, m) in enumerate(zip(x.shape, shape)) if m == 1 and n != 1)
    return jnp.sum(x, axis=axes, keepdims=True) if axes else x


def logsumexp(x, axis):
    """``logsumexp`` whose gradient is 0, not NaN, where every term is -inf (an
    impossible cell, e.g. after a transition probability reached 0)."""
    shift = finite_max(x, axis)
    total = jnp.sum(jnp.exp(x - shift), axis=axis, keepdims=True)
    out = jnp.where(total > 0, jnp.log(jnp.where(total > 0, total, 1.0)) + shift, -jnp.inf)
    return jnp.squeeze(out, axis)


def _log_matmul(x, y):
    """``log(exp(x) @ exp(y))`` over the last two axes, as a logsumexp over the
    inner index: a product of many steps spans thousands of nats, more than a
    matmul of exponentials scaled by row and column maxima can represent."""
    return logsumexp(x[..., :, :, None] + y[..., None, :, :], axis=-2)


def log_z_by_tree(alpha, steps, shape, mask):
    """log p(data), one value per plate cell ``(*plates)``, by the product of
    the step matrices as a balanced tree of log-matmuls: log2(T) sequential
    levels of K^3 work, which a GPU runs in parallel."""
    if steps is None:
        return logsumexp(alpha, -1)
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
    return logsumexp(final, -1)
