"""Standard errors from an information matrix in unconstrained coordinates.

What the exact observed information ([`jaxem.standard_errors`][jaxem.standard_errors])
and Louis' identity for Monte Carlo fits (`jaxem.louis`) share: the unconstrained
coordinates NumPyro's ``biject_to`` gives each param's constraint (entries on the
boundary of an elementwise constraint held at their values), the inverse of the
information over its well-determined directions (a warning naming the params in
the others), and the delta method ``Cov(theta) = J Cov(u) J^T`` with
``J = d theta / d u``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.distributions.transforms import biject_to

from jaxem.exceptions import ModelError, NumericalWarning

__all__ = [
    "Coordinates",
    "StandardErrors",
    "check_names",
    "delta_method",
    "inverse_or_none",
    "param_index",
    "symmetric",
    "unconstrained_coordinates",
]


class StandardErrors(NamedTuple):
    """Standard errors of a fit (`jaxem.standard_errors`).

    Attributes:
        standard_errors: ``{param name: standard errors}``, shaped like the
            param (every entry of a simplex); frozen params are left out. NaN
            for entries the information does not determine (see the warning).
        covariance: ``(P, P)``: the covariance of all the free params' entries,
            flattened and concatenated in the order of ``index``.
        index: ``{param name: slice}``: the rows of ``covariance`` that hold a
            param's entries (reshape to the param's shape).
        information: ``(D, D)``: the observed information in unconstrained
            coordinates (D: the free params' unconstrained size).
        complete_information: ``(D, D)``: the complete-data information there
            (the negative Hessian of EM's ``Q`` at the estimate).
        missing_fraction: the largest eigenvalue of ``I_complete^{-1} I_missing``:
            the fraction of missing information, which is EM's rate of linear
            convergence near the estimate (the error shrinks by this factor per
            iteration).
        monte_carlo_error: for a Monte Carlo fit (Louis' identity over posterior
            draws), ``{param name: the Monte Carlo standard error of its
            standard errors}`` (a grouped jackknife over blocks of draws); None
            for the exact observed information.
    """

    standard_errors: dict
    covariance: jax.Array
    index: dict
    information: jax.Array
    complete_information: jax.Array
    missing_fraction: jax.Array
    monte_carlo_error: dict | None = None


class Coordinates(NamedTuple):
    """The free params' unconstrained coordinates at an estimate
    (`unconstrained_coordinates`).

    Attributes:
        point: the moving coordinates' values at the estimate (flat).
        constrained: ``v -> {param name: constrained value}`` (every param,
            the frozen and held ones at their values) of moving coordinates ``v``.
        jacobian: ``v -> d (free params' entries, flat) / d v``.
        free: names of the free params, in model order.
        shapes: ``{free param name: shape}``.
        labels: a label per moving coordinate (``p[1, 3]``, or the param's
            name for a simplex), for warnings.
        held: ``{free param name: bool array}``: entries held on the boundary
            (elementwise constraints: the param's shape; otherwise its
            unconstrained shape).
    """

    point: jax.Array
    constrained: Callable
    jacobian: Callable
    free: list
    shapes: dict
    labels: list
    held: dict


def unconstrained_coordinates(
    param_names, constraints: dict, params: dict, frozen=(), stacklevel: int = 3
) -> Coordinates:
    """The unconstrained coordinates of the free params at ``params``.

    Args:
        param_names: every param of the model, in model order.
        constraints: ``{param name: constraint}``.
        params: ``{param name: constrained value}`` (all of them).
        frozen: names of params held fixed (no coordinates).
        stacklevel: of the warning about entries on a boundary.

    Raises:
        ValueError: ``frozen`` names a non-param, or ``params`` lacks a value.
        ModelError: every param is frozen, or a param with a constraint that is
            not elementwise (a simplex) is on its boundary.

    Warns:
        NumericalWarning: entries on the boundary of an elementwise constraint,
            held at their values.
    """
    check_names(param_names, params, frozen)
    free = [n for n in param_names if n not in frozen]
    if not free:
        raise ModelError("jaxem: every param is frozen: there is nothing to give errors for.")
    transforms = {n: biject_to(constraints[n]) for n in free}
    unconstrained = {n: transforms[n].inv(params[n]) for n in free}
    flat, unravel = _ravel(unconstrained, free)
    # Entries exactly on the boundary of an elementwise constraint (a probability of 0)
    # have no finite unconstrained value: held at their values, as if frozen.
    held = ~np.isfinite(np.asarray(flat))
    held_of = {n: np.asarray(h) > 0.5 for n, h in unravel(jnp.asarray(held, flat.dtype)).items()}
    _raise_for_boundary(unconstrained, params, transforms, held_of)
    moving = np.flatnonzero(~held)
    start = jnp.asarray(np.where(held, 0.0, np.asarray(flat)), flat.dtype)
    labels = [label for label, h in zip(_entry_labels(unconstrained, params), held) if not h]
    if held.any():
        on_boundary = [f"{n}{_entry(i)}" for n in free for i in zip(*np.nonzero(held_of[n]))]
        warnings.warn(
            f"jaxem: {', '.join(on_boundary)} {'is' if len(on_boundary) == 1 else 'are'} on the "
            "boundary of its constraint, where the log-likelihood has no derivative: held at "
            "its value, with a NaN standard error, the others' errors conditional on it.",
            NumericalWarning,
            stacklevel=stacklevel,
        )

    def constrained(v):
        u = unravel(start.at[moving].set(v))
        values = {n: transforms[n](u[n]) for n in free}
        values = {
            n: jnp.where(held_of[n], params[n], value) if held_of[n].any() else value
            for n, value in values.items()
        }
        return {**params, **values}

    def jacobian(v):
        return jax.jacobian(lambda v: _ravel(constrained(v), free)[0])(v)

    shapes = {n: jnp.shape(params[n]) for n in free}
    return Coordinates(flat[moving], constrained, jacobian, free, shapes, labels, held_of)


def check_names(param_names, params: dict, frozen) -> None:
    """A ValueError if ``frozen`` names a non-param or ``params`` lacks a param."""
    unknown = sorted(set(frozen) - set(param_names))
    if unknown:
        raise ValueError(f"jaxem: frozen names {unknown} are not params of the model.")
    missing = sorted(set(param_names) - set(params))
    if missing:
        raise ValueError(f"jaxem: params are missing values for {missing}.")


def delta_method(
    coordinates: Coordinates,
    information,
    complete,
    jacobian,
    *,
    hint: str = "",
    monte_carlo_error: dict | None = None,
    stacklevel: int = 3,
) -> StandardErrors:
    """`StandardErrors` of the constrained params from the information in the
    unconstrained coordinates.

    Args:
        coordinates: from `unconstrained_coordinates`.
        information: ``(D, D)`` observed information in the moving coordinates.
        complete: ``(D, D)`` complete-data information there.
        jacobian: ``coordinates.jacobian(coordinates.point)``.
        hint: a sentence added to the warning about an information that is not
            positive definite.
        monte_carlo_error: stored in the result.
        stacklevel: of that warning.

    Warns:
        NumericalWarning: the information is not positive definite; the params
            with large loadings on its undetermined directions are named and get
            NaN standard errors.
    """
    free, held_of, shapes = coordinates.free, coordinates.held, coordinates.shapes
    cov_u, undetermined = _inverse(information, coordinates.labels, hint, stacklevel + 1)
    covariance = jacobian @ cov_u @ jacobian.T
    # An entry that loads on an undetermined direction, or is held, has no variance.
    nan = np.concatenate(
        [
            held_of[n].ravel()
            if held_of[n].shape == shapes[n]
            else np.zeros(int(np.prod(shapes[n])), bool)
            for n in free
        ]
    )
    if undetermined.size:
        # The constrained entries each undetermined unconstrained entry moves: itself
        # where the transform is elementwise, every entry of a simplex.
        sizes = [int(np.prod(shapes[n])) for n in free]
        offsets = dict(zip(free, np.cumsum([0, *sizes])))
        owners = [(n, i) for n in free for i, h in enumerate(held_of[n].ravel()) if not h]
        for k in undetermined:
            n, i = owners[k]
            elementwise = held_of[n].shape == shapes[n]
            start = offsets[n] + (i if elementwise else 0)
            nan[start : start + (1 if elementwise else int(np.prod(shapes[n])))] = True
    covariance = jnp.where(nan[:, None] | nan[None, :], jnp.nan, covariance)
    errors = jnp.sqrt(jnp.maximum(jnp.diag(covariance), 0.0))  # NaN stays NaN
    index = param_index(free, shapes)
    errors = {n: errors[index[n]].reshape(shapes[n]) for n in free}
    return StandardErrors(
        errors,
        covariance,
        index,
        information,
        complete,
        _missing_fraction(information, complete),
        monte_carlo_error,
    )


def param_index(free, shapes) -> dict:
    """``{param name: slice}`` of each free param's entries in the flat vector."""
    index, offset = {}, 0
    for n in free:
        size = int(np.prod(shapes[n]))
        index[n] = slice(offset, offset + size)
        offset += size
    return index


def symmetric(matrix):
    """The symmetric part of a square matrix (a Hessian up to rounding)."""
    return 0.5 * (matrix + matrix.T)


def _ravel(values: dict, names: list):
    """``(flat, unravel)``: the entries of ``values[n]`` for ``n`` in ``names``, in
    that order (``ravel_pytree`` would sort the names)."""
    shapes = [jnp.shape(values[n]) for n in names]
    sizes = [int(np.prod(shape)) for shape in shapes]
    flat = jnp.concatenate([jnp.ravel(jnp.asarray(values[n])) for n in names])

    def unravel(vector):
        parts = jnp.split(vector, np.cumsum(sizes)[:-1])
        return {n: p.reshape(shape) for n, p, shape in zip(names, parts, shapes)}

    return flat, unravel


def _entry(index) -> str:
    return f"[{', '.join(str(int(i)) for i in index)}]" if len(index) else ""


def _entry_labels(unconstrained: dict, params: dict) -> list[str]:
    """A label per entry of the flattened unconstrained params: ``p[1, 3]`` where
    the transform is elementwise, the param's name where it is not (a simplex)."""
    labels = []
    for name, value in unconstrained.items():
        shape = jnp.shape(value)
        if shape != jnp.shape(params[name]):
            labels.extend([name] * int(np.prod(shape)))
            continue
        labels.extend(f"{name}{_entry(index)}" for index in np.ndindex(*shape))
    return labels


def _tolerance(matrix) -> float:
    """Eigenvalues below this fraction of the largest are rounding, not information."""
    return float(np.sqrt(np.finfo(np.dtype(matrix.dtype)).eps))


def inverse_or_none(information):
    """The inverse of a positive definite information, else None (no warning): for
    the jackknife's many re-estimates."""
    values, vectors = np.linalg.eigh(np.asarray(information))
    top = max(float(np.max(np.abs(values))), np.finfo(values.dtype).tiny)
    if np.any(values <= _tolerance(information) * top):
        return None
    return vectors @ np.diag(1.0 / values) @ vectors.T


def _inverse(information, labels, hint="", stacklevel=4):
    """``(covariance, undetermined directions' indices)``: the inverse of the
    information over its well-determined eigen-directions, with a
    NumericalWarning naming the params that load on the others."""
    values, vectors = np.linalg.eigh(np.asarray(information))
    top = max(float(np.max(np.abs(values))), np.finfo(values.dtype).tiny)
    bad = values <= _tolerance(information) * top
    if not np.any(bad):
        return jnp.asarray(vectors @ np.diag(1.0 / values) @ vectors.T), np.zeros(0, int)
    loadings = np.max(np.abs(vectors[:, bad]), axis=1)
    involved = list(dict.fromkeys(labels[i] for i in np.flatnonzero(loadings > 0.3)))
    smallest = float(np.min(values))
    kind = "negative" if smallest < -_tolerance(information) * top else "zero"
    warnings.warn(
        f"jaxem: the observed information is not positive definite (an eigenvalue is {kind}, "
        f"{smallest:.3g} against a largest of {top:.3g}), in directions that involve "
        f"{', '.join(involved)}. The estimate is not a strict maximum there: a saddle point or "
        "an unconverged fit (run longer), an estimate on the boundary of its constraint, or "
        "params the data do not identify (a component with no data, two equal components). "
        f"{hint}Their standard errors are NaN.",
        NumericalWarning,
        stacklevel=stacklevel,
    )
    good = ~bad
    cov = vectors[:, good] @ np.diag(1.0 / values[good]) @ vectors[:, good].T
    undetermined = np.flatnonzero(loadings > 0.3)
    return jnp.asarray(cov), undetermined


def _missing_fraction(information, complete):
    """The largest eigenvalue of ``I_c^{-1} (I_c - I_obs)``."""
    try:
        values = np.linalg.eigvals(
            np.linalg.solve(np.asarray(complete), np.asarray(complete - information))
        )
    except np.linalg.LinAlgError:
        return jnp.asarray(np.nan)
    return jnp.asarray(float(np.max(values.real)))


def _raise_for_boundary(unconstrained, params, transforms, held_of) -> None:
    """A param on the boundary of a constraint that is not elementwise (a simplex with a
    zero) cannot be held entry by entry."""
    for name, value in unconstrained.items():
        if held_of[name].any() and jnp.shape(value) != jnp.shape(params[name]):
            raise ModelError(
                f"jaxem: param '{name}' is on the boundary of its constraint "
                f"({transforms[name].codomain}), where the log-likelihood has no derivative. "
                "Standard errors from the observed information need an interior estimate: "
                "freeze the param (frozen=[...]), or drop the empty component."
            )
