"""The structure of Markov chains written with ``numpyro.contrib.control_flow.scan``.

Under enumeration NumPyro traces a ``scan`` as three groups of sites: the first
step, unrolled, with its sites renamed ``_PREV_<name>``; the remaining steps,
stacked along a ``_time_<name>`` dim, in which the previous step's latent is
the enumeration variable ``_PREV_<name>``; and the sites outside the scan, such
as an initial state ``z0`` carried into it. The factors of a first-order chain
therefore fall into

* global factors, over the latent outside the scan (if any),
* first-step factors, over that latent and the chain's first state,
* stacked factors, over the previous and the current state of every later step.

`find_chain` recognizes them (and refuses the scans jaxem cannot
contract), `arrange_factor` lays a factor out as ``(*plates, *states)``,
and `chain_padding_problems` checks that masked steps are padding at the
end of a sequence. The algorithms over the arranged factors (forward-backward,
Viterbi, sampling) are in `jaxem.chain_inference`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

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
    "arrange_factor",
    "chain_padding_problems",
    "enumerated_names",
    "find_chain",
    "labelled_scan_message",
    "raise_for_chain_padding",
    "step_mask",
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


def enumerated_names(site):
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
    for site_name in (*firsts, *stacked):
        if _is_factor(sites[site_name].fn):
            raise ModelError(
                f"jaxem: numpyro.factor '{user_site_name(site_name)}' is inside the scan body "
                f"of the Markov chain over '{name}'. NumPyro's scan labels the dims of a "
                "factor's log-factor inconsistently with its values (the time axis is "
                "misplaced), so jaxem cannot place it in the chain. Write the term into a "
                "distribution instead: a term on the states into the transition's logits "
                "(dist.Categorical(logits=jnp.log(A[z_prev]) + bonus[z_prev])), a term on the "
                "data alone as one numpyro.factor after the scan, over every step."
            )
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
            extra = enumerated_names(sites[site_name]) - names
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


def _is_factor(fn) -> bool:
    """Whether a site's distribution is a ``numpyro.factor`` (``dist.Unit``), under
    masks, plates and ``to_event``."""
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return isinstance(fn, dist.Unit)


def arrange_factor(x, site, names, chain):
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


def step_mask(site, chain):
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
    arranged = arrange_factor(full.astype(jnp.int32), site, names, chain)
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
        steps = step_mask(sites[chain.name], chain)
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
    arranged = arrange_factor(counts.astype(jnp.int32), site, names, chain)
    return jnp.moveaxis(arranged[..., 0, 0] > 0, chain.num_plate_dims, 0)


def raise_for_chain_padding(problems, name: str, plates: tuple) -> None:
    """Raise a `ModelError` naming the chain's site ``name`` (or the
    observed site) and the sequences of a true `chain_padding_problems`
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
