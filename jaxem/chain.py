"""Markov chains written with ``numpyro.contrib.control_flow.scan``.

Under enumeration NumPyro traces a ``scan`` as three groups of sites: the first
step, unrolled, with its sites renamed ``_PREV_<name>``; the remaining steps,
stacked along a ``_time_<name>`` dim, in which the previous step's latent is
the enumeration variable ``_PREV_<name>``; and the sites outside the scan, such
as an initial state ``z0`` carried into it. The factors of a first-order chain
therefore fall into

* global factors, over the latent outside the scan (if any),
* first-step factors, over that latent and the chain's first state,
* stacked factors, over the previous and the current state of every later step,

and their sum-product is the forward algorithm: T K^2 work in a ``lax.scan``
(or a parallel reduction of K x K matrices, log T deep). Its gradient with
respect to the factors' log-probabilities is the posterior of every factor
(Eisner 2016): backpropagation through the forward pass *is* the backward
pass, and yields the pairwise marginals the transition M-step needs.
Max-product with backpointers gives the Viterbi path; sampling backwards
from the forward messages gives a draw of the whole path (forward filtering,
backward sampling).
"""

from __future__ import annotations

import functools
import math
import operator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxem.exceptions import ModelError
from jaxem.masks import counted_cells, mask_of
from jaxem.numpyro_internals import (
    PREV_PREFIX,
    UNOBSERVED_SUFFIX,
    is_time_dim,
    user_site_name,
)

__all__ = [
    "Chain",
    "find_chain",
    "contract_chain",
    "chain_posterior",
    "chain_map",
    "chain_sample",
    "chain_indicators",
    "chain_padding_problems",
    "raise_for_chain_padding",
    "labelled_scan_message",
]


class Chain(NamedTuple):
    """The Markov chain of an enumerated trace.

    Attributes:
        name: the latent site inside the scan body (its stacked steps).
        first: the name of its first, unrolled step (``_PREV_<name>``); the
            stacked factors name the previous state by it too.
        time: the name of the stacked sites' time dim (None for a scan of length 1).
        initial: the latent outside the scan carried into it, or None.
        global_sites, first_sites, stacked_sites: the sites of each group.
        plate_dims: ``{dim: plate name}`` of the chain's latent site.
        num_plate_dims: the plate dims of the trace (its ``max_plate_nesting``).
    """

    name: str
    first: str
    time: str | None
    initial: str | None
    global_sites: tuple
    first_sites: tuple
    stacked_sites: tuple
    plate_dims: dict
    num_plate_dims: int


def _enumerated(site):
    """The enumeration variables of a site's factor (not its plates, not time)."""
    return {n for n in site.dim_to_name.values() if n not in site.plates and not is_time_dim(n)}


def labelled_scan_message(name) -> str:
    """The error for known states (``obs_mask`` on the latent) in a ``scan`` chain."""
    return (
        f"jaxem: site '{name}' has an obs_mask inside a scan body and later sites depend on "
        "its value (a Markov chain whose states are known at some steps). jaxem enumerates "
        "the unknown entries of such a site in mixtures and in Python loops, but not in a "
        "scan chain: write the chain as a Python loop over "
        "numpyro.contrib.funsor.markov(range(T)) with obs_mask= at each step, or drop "
        "obs_mask from the state (obs_mask on the emissions of a scan chain is supported)."
    )


def find_chain(trace) -> Chain | None:
    """The Markov chain of an enumerated trace; None when the model has no ``scan``.

    Raises:
        ModelError: a ``scan`` that is not a first-order chain of one latent
            site (history above 1, several latent sites per step, several
            latents outside the scan, a latent outside it shared across the
            chain's plate).
    """
    sites = trace.sites
    times = {n for s in sites.values() for n in s.dim_to_name.values() if is_time_dim(n)}
    firsts = [n for n in sites if n.startswith(PREV_PREFIX)]
    if not times and not firsts:
        return None
    if any(n.startswith(PREV_PREFIX + PREV_PREFIX) for n in firsts) or len(times) > 1:
        site = user_site_name(next(iter(firsts), "?"))
        raise ModelError(
            f"jaxem: site '{site}' is inside a scan with history > 1 or inside several scans. "
            "jaxem contracts one first-order Markov chain (scan(..., history=1)); write "
            "higher-order chains with a tuple state of one latent site."
        )
    first_latents = [n for n in firsts if not sites[n].is_observed]
    labelled = sorted(
        user_site_name(n)[: -len(UNOBSERVED_SUFFIX)]
        for n in firsts
        if n.endswith(UNOBSERVED_SUFFIX)
    )
    if not first_latents and labelled:
        raise ModelError(labelled_scan_message(labelled[0]))
    if len(first_latents) != 1:
        names = sorted(user_site_name(n) for n in first_latents) or sorted(
            user_site_name(n) for n in firsts
        )
        raise ModelError(
            f"jaxem: the scan body has latent sites {names}; jaxem contracts scan bodies with "
            "exactly one discrete latent site (a first-order chain). Combine several latents "
            "per step into one Categorical over their joint values."
        )
    first = first_latents[0]
    name = first[len(PREV_PREFIX) :]
    time = next(iter(times), None)
    # The later steps of the body's sites: their time dim is left out of
    # dim_to_name where it has size 1 (a site that is the same at every step).
    stacked = tuple(n for n in sites if not n.startswith(PREV_PREFIX) and PREV_PREFIX + n in sites)
    global_sites = tuple(n for n in sites if n not in stacked and n not in firsts)
    global_latents = [n for n in global_sites if not sites[n].is_observed]
    if len(global_latents) > 1:
        raise ModelError(
            f"jaxem: latent sites {global_latents} sit outside the scan of '{name}'; jaxem "
            "supports at most one latent outside a scan (the initial state carried into it)."
        )
    initial = global_latents[0] if global_latents else None
    allowed = (
        (stacked, {name, first}, "its previous and current state"),
        (tuple(firsts), {first, initial}, "the chain's first state and the initial state"),
        (global_sites, {initial}, "the initial state"),
    )
    for group, names, what in allowed:
        for site_name in group:
            extra = _enumerated(sites[site_name]) - names
            if extra:
                raise ModelError(
                    f"jaxem: site '{user_site_name(site_name)}' depends on latent(s) "
                    f"{sorted(map(user_site_name, extra))}, but a factor of a Markov chain over "
                    f"'{name}' may depend on {what} only."
                )
    chain_site = sites[name] if name in sites else sites[first]
    plate_dims = dict(chain_site.plate_dims)
    num_plate_dims = max((-d for s in sites.values() for d in s.plate_dims), default=0)
    if initial is not None:
        initial_plates = set(sites[initial].plate_dims)
        shared = set(plate_dims) - initial_plates
        if shared:
            raise ModelError(
                f"jaxem: the initial state '{initial}' is shared by the chain's plate(s) "
                f"{sorted(plate_dims[d] for d in shared)}, which couples the sequences. Sample "
                "the initial state inside a plate of the same size and dim as the chain's."
            )
    return Chain(
        name, first, time, initial, global_sites, tuple(firsts), stacked, plate_dims, num_plate_dims
    )


def _arrange(x, site, names, chain):
    """A factor tensor as ``(*plates, *[one axis per name])``.

    The plates are the trace's plate dims (size 1 where the factor does not
    vary); plate dims the chain does not have are summed (conditional
    independence), as is every enumerated dim not in ``names``: this turns a
    factor's marginal into the marginal of the named variables.
    """
    x = jnp.asarray(x)
    num_plates = chain.num_plate_dims
    need = max([num_plates] + [-d for d in site.dim_to_name])
    x = jnp.reshape(x, (1,) * (need - x.ndim) + x.shape)
    ndim = x.ndim
    name_to_axis = {n: ndim + d for d, n in site.dim_to_name.items()}
    x = jnp.reshape(x, x.shape + (1,) * sum(n not in name_to_axis for n in names))
    extra = iter(range(ndim, x.ndim))
    named = [name_to_axis[n] if n in name_to_axis else next(extra) for n in names]
    plates = [ndim + d for d in range(-num_plates, 0)]
    kept_plates = [ndim + d for d in chain.plate_dims]
    summed = tuple(a for a in range(x.ndim) if a not in named and a not in kept_plates)
    x = jnp.sum(x, axis=summed, keepdims=True)
    rest = [a for a in range(x.ndim) if a not in named and a not in plates]
    x = jnp.transpose(x, plates + named + rest)
    return jnp.reshape(x, x.shape[: len(plates) + len(named)])


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
            term = _arrange(log_factors[n], sites[n], [chain.initial], chain)
            initial = term if initial is None else initial + term
        else:
            constant = constant + jnp.sum(log_factors[n])
    first_names = [chain.initial, chain.first] if chain.initial else [chain.first]
    first = sum(_arrange(log_factors[n], sites[n], first_names, chain) for n in chain.first_sites)
    steps = steps_shape = mask = None
    plate_shapes = [jnp.shape(first)[: chain.num_plate_dims]]
    if chain.stacked_sites:
        names = [chain.time, chain.first, chain.name]
        # Summing the sites' factors would materialize a (T - 1, K, K) array
        # of mostly repeated values (a transition matrix plus per-step
        # emissions); the forward pass multiplies them per step instead.
        steps = tuple(
            jnp.moveaxis(_arrange(log_factors[n], sites[n], names, chain), chain.num_plate_dims, 0)
            for n in chain.stacked_sites
        )
        steps_shape = jnp.broadcast_shapes(*(jnp.shape(f) for f in steps))
        plate_shapes.append(steps_shape[1:-2])
        mask = _step_mask(sites[chain.name], chain)
    shape = jnp.broadcast_shapes(*plate_shapes)
    if initial is not None:
        first = first + initial[..., :, None]  # the initial state's factors join the first step
    first = jnp.broadcast_to(first, shape + jnp.shape(first)[chain.num_plate_dims :])
    if steps is not None:
        steps_shape = steps_shape[:1] + shape + steps_shape[-2:]
        if mask is not None:
            mask = jnp.broadcast_to(mask, steps_shape[:-2])
    return _Tensors(constant, initial, first, steps, steps_shape, mask)


def _step_mask(site, chain):
    """``(T - 1, *plates)``: False at the steps where the chain's latent site is
    masked (``numpyro.handlers.mask``), None if it is not masked."""
    return _position_mask(site, [chain.time, chain.first, chain.name], chain)


def _position_mask(site, names, chain):
    """A latent site's mask arranged as ``(*plates)`` (``(T - 1, *plates)`` for
    the stacked site: ``names`` starts with the time dim), None if unmasked."""
    full = mask_of(site.fn)
    if full is None:
        return None
    if site.log_prob is not None:
        full = jnp.broadcast_to(full, jnp.broadcast_shapes(full.shape, jnp.shape(site.log_prob)))
    # The mask may not depend on the enumerated states: take any state's entry.
    arranged = _arrange(full.astype(jnp.int32), site, names, chain)
    num_states = len(names) - (names[0] == chain.time)
    arranged = arranged[(...,) + (0,) * num_states] > 0
    return jnp.moveaxis(arranged, chain.num_plate_dims, 0) if names[0] == chain.time else arranged


def chain_padding_problems(trace, chain: Chain):
    """Which sequences break the padding rule: ``(padding, observed)``.

    ``padding``, ``(*plates)`` booleans: a sequence's masked positions (initial
    state, first step, later steps) must all come after its real ones, and its
    first position must be real. ``observed``, ``{observed site: (*plates)
    booleans}``: a sequence where an observed site of the scan body counts at a
    padded step (the latent masked, the observation not).

    jaxem skips a masked step by carrying the state over: at the end of a
    sequence that is exact (nothing follows), but a masked first step leaves
    the chain's prior on a state nobody observed, and a masked step before a
    real one links the real step to the wrong state. A padded step is skipped
    whole, with every factor of the scan body at that step: an observation
    still counting there would be dropped.
    """
    sites = trace.sites
    positions = []
    if chain.initial is not None:
        positions.append(_position_mask(sites[chain.initial], [chain.initial], chain))
    first_names = [chain.initial, chain.first] if chain.initial else [chain.first]
    positions.append(_position_mask(sites[chain.first], first_names, chain))
    steps = None
    if chain.stacked_sites and chain.name in sites:
        steps = _step_mask(sites[chain.name], chain)
        positions.extend(list(steps) if steps is not None else [None])
    if all(p is None for p in positions):
        return jnp.zeros((), bool), {}
    shape = jnp.broadcast_shapes(*(jnp.shape(p) for p in positions if p is not None))
    real = jnp.stack(
        [jnp.ones(shape, bool) if p is None else jnp.broadcast_to(p, shape) for p in positions]
    )
    padding = ~real[0] | jnp.any(~real[:-1] & real[1:], axis=0)
    # The first step and the initial state are real wherever the padding rule
    # holds: only the later steps can drop an observation that counts.
    observed = {}
    if steps is not None:
        for name in chain.stacked_sites:
            if sites[name].is_observed:
                counts = _counted_steps(sites[name], chain)
                observed[user_site_name(name)] = jnp.any(counts & ~steps, axis=0)
    return padding, observed


def _counted_steps(site, chain):
    """Where an observed site of the scan body counts, ``(T - 1 or 1, *plates)``:
    at a step and sequence where any of its cells (in nested plates) counts."""
    counts = counted_cells(site.fn, site.value)
    counts = jnp.broadcast_to(counts, jnp.broadcast_shapes(counts.shape, jnp.shape(site.log_prob)))
    names = [chain.time, chain.first, chain.name]
    arranged = _arrange(counts.astype(jnp.int32), site, names, chain)
    return jnp.moveaxis(arranged[..., 0, 0] > 0, chain.num_plate_dims, 0)


def raise_for_chain_padding(problems, name: str, plates: tuple) -> None:
    """Raise a :class:`ModelError` naming the chain's site ``name`` (or the
    observed site) and the sequences of a true :func:`chain_padding_problems`
    (concrete values).

    Args:
        problems: its result.
        name: the chain's latent site.
        plates: the names of the chain's plates, outermost first.
    """
    padding, observed = problems
    where = _sequences(padding, plates)
    if where:
        raise ModelError(
            f"jaxem: the Markov chain of site '{name}' is masked at its first step or at "
            f"steps before real ones in {where} (padding at the start or a gap). jaxem skips "
            "masked steps only at the end of a sequence: pad every sequence at its end (mask "
            "True for its real steps, then False), keep its first step real (drop empty "
            "sequences), and for missing observations inside a sequence mask (or set NaN under "
            "jaxem.nan_as_missing) the observed site only, not the latent."
        )
    for site, bad in observed.items():
        where = _sequences(bad, plates)
        if where:
            raise ModelError(
                f"jaxem: observed site '{site}' counts at steps where the Markov chain's latent "
                f"site '{name}' is masked (padding) in {where}. jaxem skips a padded step whole, "
                f"so these observations would be ignored. Mask '{site}' with '{name}' (put "
                "numpyro.handlers.mask(mask=m_t) around both sites in the scan body), or set "
                "its padded values to NaN under jaxem.nan_as_missing; if they are real "
                f"observations, unmask '{name}' there (mask the observed site only for missing "
                "observations)."
            )


def _sequences(problems, plates) -> str:
    """``"sequence(s) [...] of plate(s) [...]"`` for a ``(*plates)`` boolean
    array, or an empty string where none is true."""
    problems = np.asarray(problems)
    if not problems.any():
        return ""
    trim = problems.ndim - len(plates)
    problems = problems.reshape(problems.shape[trim:]) if trim > 0 else problems
    bad = [tuple(int(i) for i in idx) for idx in np.argwhere(problems)]
    shown = [i[0] if len(i) == 1 else i for i in bad[:10]]
    where = f"sequence(s) {shown}{' ...' if len(bad) > 10 else ''}"
    if plates:
        where += f" of plate(s) {list(plates)}"
    return where


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
    step, the log normalizers summed); its gradient is the scaled backward pass
    of :func:`_scaled_forward`."""
    if steps is None:
        return jnp.sum(_logsumexp(alpha, -1))
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
    log_z: jax.Array
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
    log_z = jnp.sum(jnp.log(norm) + shift)
    varying, constant, step_shift = _step_exps(steps, keep.shape[0])

    def step(a, inputs):
        slices, keep = inputs
        b = _matvec(a, _step_matrix(slices, constant))
        norm = jnp.sum(b, -1)
        b = b / _safe(norm)[..., None]
        return jnp.where(keep[..., None], b, a), (a, jnp.where(keep, norm, 1.0))

    last, (previous, norms) = jax.lax.scan(step, a, (varying, keep))
    step_shift = jnp.broadcast_to(step_shift, keep.shape)
    log_z = log_z + jnp.sum(jnp.log(norms)) + jnp.sum(jnp.where(keep, step_shift, 0.0))
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
    current = cotangent * jnp.where(keep[..., None], after * later, 0.0)
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
    return cotangent * forward.first * b_first, tuple(grads), None


_scaled_forward.defvjp(_scaled_forward_fwd, _scaled_forward_bwd)


def _all_matrices(varying, constant):
    """Every step's matrix at once, ``(T - 1 or 1, *plates, K, K)``."""
    return functools.reduce(operator.mul, (*varying, *(c[None] for c in constant)))


def _sum_to(x, shape):
    """Sum ``x`` over the dims where ``shape`` (of equal length) is 1."""
    axes = tuple(i for i, (n, m) in enumerate(zip(x.shape, shape)) if m == 1 and n != 1)
    return jnp.sum(x, axis=axes, keepdims=True) if axes else x


_scaled_forward.defvjp(_scaled_forward_fwd, _scaled_forward_bwd)


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
        return jnp.sum(_logsumexp(alpha, -1))
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
    return jnp.sum(_logsumexp(final, -1))


def contract_chain(log_factors: dict, trace, chain: Chain, *, parallel: bool = False):
    """log p(data): the sum-product of a chain's factors by the forward algorithm.

    Args:
        log_factors: ``{site name: log-probability tensor}`` of the trace.
        trace: the enumerated trace.
        chain: its :class:`Chain`.
        parallel: a parallel (log-depth) reduction over time instead of a scan.
    """
    return _contract_tensors(_tensors(log_factors, trace, chain), parallel)


def _contract_tensors(tensors, parallel):
    alpha = _initial_log_messages(tensors)
    forward = _forward_parallel if parallel else _forward_sequential
    return forward(alpha, tensors.steps, tensors.shape, tensors.mask) + tensors.constant


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
    mask = _step_mask(sites[chain.name], chain) if chain.stacked_sites else None
    out = {}
    for name, site in sites.items():
        shape = jnp.shape(site.log_prob)
        stacked = name in chain.stacked_sites
        time_dim = _time_dim(site) if stacked else None
        indicator = jnp.ones((), jnp.result_type(site.log_prob))
        for var in _enumerated(site):
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
