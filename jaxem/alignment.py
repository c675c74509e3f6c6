"""Label switching: the states of a mixture or a hidden Markov model, aligned.

A model whose latent takes K values is often unchanged when its K labels are
permuted together with every param axis they index: a mixture's weights and
component params (their leading axis), a hidden Markov model's initial
distribution, emission params, and both axes of its transition matrix. Refits of
resampled data (the bootstrap) may find the same optimum with the labels in
another order; `align_states` puts each refit's states in the order closest to a
reference fit.

Which param axes the labels index is read from the model, not guessed from
shapes: among the axes of size K, the largest set whose joint permutation
leaves the log-likelihood unchanged (so a ``(K, K)`` emission matrix of a latent
class model keeps its columns, and a transition matrix gets its rows and columns
permuted). Unchanged at the reference params and at a random point near them: a
symmetry of the model holds at every point, while a param that happens to have
equal entries at the reference (exactly symmetric data) is unchanged by a
permutation only there.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.distributions.transforms import biject_to
from scipy.optimize import linear_sum_assignment

from jaxem.arguments import split_args
from jaxem.built import built_model
from jaxem.estep import log_likelihood, structure_and_args
from jaxem.exceptions import ModelError
from jaxem.tracing import enumerated_trace

__all__ = ["align_states", "match_states", "num_states", "permute_states", "state_axes"]

# Exhaustive matching over the K! permutations up to this K; above it, a linear
# assignment on the first state axis of each param.
MAX_EXHAUSTIVE = 6
# At most 2 ** MAX_CANDIDATES log-likelihood evaluations to find the state axes.
MAX_CANDIDATES = 10


def num_states(model, params: dict, *args, **kwargs) -> int | None:
    """The number of values K shared by every latent site of the model, or None
    if the latent sites take different numbers of values (or there are none)."""
    model = built_model(model)
    arrays, spec = split_args(args, kwargs)
    structure, margs, mkwargs = structure_and_args(model, arrays, spec)
    if not structure.latent_sites:
        return None
    trace = enumerated_trace(model, params, margs, mkwargs, structure.max_plate_nesting)
    sizes = {int(trace.sites[n].value.size) for n in structure.latent_sites}
    return sizes.pop() if len(sizes) == 1 else None


def permute_states(params: dict, axes: dict, permutation) -> dict:
    """``params`` with the axes ``axes[name]`` of each param permuted by
    ``permutation`` (``new[..., i, ...] = old[..., permutation[i], ...]``)."""
    out = dict(params)
    for name, names_axes in axes.items():
        value = params[name]
        for axis in names_axes:
            value = jnp.take(jnp.asarray(value), jnp.asarray(permutation), axis=axis)
        out[name] = value
    return out


def state_axes(model, params: dict, num: int, *args, **kwargs) -> dict | None:
    """``{param name: axes}`` the labels of a latent with ``num`` values index: the
    largest set of axes of size ``num`` whose joint permutation leaves the
    log-likelihood at ``params`` unchanged; None if no set does (the labels are
    identified, or the model ties them to something else)."""
    model = built_model(model)
    params = {n: jnp.asarray(v) for n, v in params.items()}
    candidates = [
        (name, axis)
        for name, value in params.items()
        for axis, size in enumerate(jnp.shape(value))
        if size == num
    ][:MAX_CANDIDATES]
    if num < 2 or not candidates:
        return None
    compiled = jax.jit(lambda p: log_likelihood(model, p, *args, **kwargs))
    points = [params, _nearby(model, params, args, kwargs)]
    references = [float(compiled(p)) for p in points]
    dtype = jnp.result_type(*params.values())
    relative = float(np.sqrt(np.finfo(np.dtype(dtype)).eps))
    shift = np.roll(np.arange(num), 1)

    def unchanged(axes):
        for point, reference in zip(points, references):
            value = float(compiled(permute_states(point, axes, shift)))
            tolerance = relative * max(1.0, abs(reference))
            if not np.isfinite(value) or abs(value - reference) > tolerance:
                return False
        return True

    for size in range(len(candidates), 0, -1):
        for chosen in itertools.combinations(candidates, size):
            axes: dict = {}
            for name, axis in chosen:
                axes.setdefault(name, []).append(axis)
            if unchanged(axes):
                return axes
    return None


def _nearby(model, params, args, kwargs):
    """``params`` moved by a fixed random step of 0.1 in each unconstrained
    coordinate: a point where entries equal by chance at ``params`` differ."""
    arrays, spec = split_args(args, kwargs)
    structure = structure_and_args(model, arrays, spec)[0]
    rng = np.random.default_rng(0)
    out = dict(params)
    for name, value in params.items():
        if name not in structure.constraints:
            continue
        transform = biject_to(structure.constraints[name])
        free = transform.inv(value)
        step = 0.1 * rng.standard_normal(np.shape(free))
        moved = transform(free + jnp.asarray(step, jnp.result_type(free)))
        # A value on its constraint's boundary (a simplex vertex) has no finite
        # coordinates: it stays where it is.
        if bool(jnp.all(jnp.isfinite(moved))):
            out[name] = moved
    return out


def align_states(model, estimates: dict, reference: dict, *args, axes=None, **kwargs) -> dict:
    """Each replicate's states permuted to the order closest to a reference fit.

    Args:
        model: the NumPyro model.
        estimates: ``{param name: (B, *shape)}``: B replicates' params.
        reference: ``{param name: shape}``: the fit to align to.
        *args, **kwargs: the model's arguments (to find which axes the states
            index, by `state_axes`).
        axes: ``{param name: axes}`` the states index; None: found by `state_axes`.

    Returns:
        ``estimates`` with each replicate's states permuted (every axis they
        index, together: a transition matrix's rows and columns) to minimize the
        squared distance to ``reference``, each param scaled by its magnitude.

    Raises:
        ModelError: the latent sites take different numbers of values, or no
            permutation of the states leaves the log-likelihood unchanged.
    """
    reference = {n: jnp.asarray(v) for n, v in reference.items()}
    num = num_states(model, reference, *args, **kwargs)
    if num is None:
        raise ModelError(
            "jaxem: the latent sites of the model take different numbers of values (or there "
            "are none), so which labels to align is ambiguous: pass align=False."
        )
    if axes is None:
        axes = state_axes(model, reference, num, *args, **kwargs)
    if axes is None:
        raise ModelError(
            f"jaxem: no permutation of the {num} states leaves the log-likelihood unchanged "
            "(the labels are identified by the model), so there is nothing to align: pass "
            "align=False."
        )
    return match_states(estimates, reference, axes, num)


def match_states(estimates: dict, reference: dict, axes: dict, num: int) -> dict:
    """`align_states` with the state axes given (no model needed)."""
    estimates = {n: np.asarray(v) for n, v in estimates.items()}
    reference = {n: np.asarray(v) for n, v in reference.items()}
    batch = next(iter(estimates.values())).shape[0]
    scales = {n: np.mean(np.abs(reference[n])) + 1e-12 for n in axes}
    if num <= MAX_EXHAUSTIVE:
        permutations = np.array(list(itertools.permutations(range(num))))
        cost = np.zeros((batch, len(permutations)))
        for n, ax in axes.items():
            permuted = estimates[n][:, None]  # (B, 1, *shape)
            permuted = np.broadcast_to(
                permuted, (batch, len(permutations)) + estimates[n].shape[1:]
            )
            for axis in ax:
                index_shape = [1] * permuted.ndim
                index_shape[1], index_shape[2 + axis] = len(permutations), num
                index = np.broadcast_to(permutations.reshape(index_shape), permuted.shape)
                permuted = np.take_along_axis(permuted, index, axis=2 + axis)
            diff = (permuted - reference[n][None, None]) / scales[n]
            cost += np.sum(diff.reshape(batch, len(permutations), -1) ** 2, axis=-1)
        best = permutations[np.argmin(cost, axis=1)]
    else:
        # The cost of giving replicate state i the reference's label j, over each
        # param's first state axis (a linear assignment per replicate).
        best = np.zeros((batch, num), int)
        for b in range(batch):
            cost = np.zeros((num, num))
            for n, ax in axes.items():
                mine = np.moveaxis(estimates[n][b], ax[0], 0).reshape(num, -1)
                theirs = np.moveaxis(reference[n], ax[0], 0).reshape(num, -1)
                cost += np.sum((mine[:, None] - theirs[None]) ** 2, axis=-1) / scales[n] ** 2
            rows, cols = linear_sum_assignment(cost)
            best[b, cols] = rows
    out = dict(estimates)
    for n, ax in axes.items():
        out[n] = np.stack(
            [
                np.asarray(permute_states({n: estimates[n][b]}, {n: ax}, best[b])[n])
                for b in range(batch)
            ]
        )
    return out
