"""Standard errors from the observed information, and EM's rate of convergence.

The observed information is the negative Hessian of the exact marginal
log-likelihood (the latents summed out by enumeration), taken by autodiff in
the unconstrained coordinates NumPyro's ``biject_to`` gives each param's
constraint, where a maximum in the interior is a smooth maximum:

$$
I(\\hat u) = -\\nabla^2_u \\log p(x \\mid \\theta(u)) \\big|_{u = \\hat u},
\\qquad \\operatorname{Cov}(\\hat u) \\approx I(\\hat u)^{-1}.
$$

The delta method carries it to the constrained params,
``Cov(theta) = J Cov(u) J^T`` with ``J = d theta / d u``: a simplex of K
entries gets the standard errors of all K and their (singular, rank K - 1)
covariance. The complete-data information is the Hessian of EM's ``Q``
(the expected complete-data log-likelihood under the posterior at the
estimate); by the missing-information principle (Orchard and Woodbury 1972;
Dempster, Laird and Rubin 1977) ``I_obs = I_complete - I_missing``, and the
largest eigenvalue of ``I_complete^{-1} I_missing``, the fraction of missing
information, is EM's rate of linear convergence.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.distributions.transforms import biject_to

from jaxem.arguments import split_args
from jaxem.built import built_model
from jaxem.estep import e_step, log_likelihood, structure_and_args
from jaxem.exceptions import ModelError, NumericalWarning
from jaxem.gradient import expected_log_joint

__all__ = ["StandardErrors", "standard_errors"]


class StandardErrors(NamedTuple):
    """Standard errors of a fit (`standard_errors`).

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
    """

    standard_errors: dict
    covariance: jax.Array
    index: dict
    information: jax.Array
    complete_information: jax.Array
    missing_fraction: jax.Array


def standard_errors(model, params, *args, frozen=(), **kwargs) -> StandardErrors:
    """Standard errors of a maximum likelihood fit, from the observed information.

    Args:
        model: the NumPyro model (with discrete latents, summed out exactly).
        params: the estimate, ``{param name: constrained value}``, or a fit result
            with a ``params`` field (``EM.run``'s). `jaxem.EM.standard_errors`
            passes the fitter's frozen params too.
        *args, **kwargs: the model's arguments (the data the fit used).
        frozen: names of params held fixed in the fit: they have no standard
            error, and the others' are conditional on their values.

    Returns:
        `StandardErrors`.

    Warns:
        NumericalWarning: the observed information is not positive definite (not
            a maximum, an estimate on the boundary of its constraint, or a
            direction the data do not identify); the warning names the params
            with large loadings on those directions, whose standard errors are NaN.

    Examples:
        >>> import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist
        >>> from numpyro.distributions import constraints
        >>> import jaxem
        >>> def model(x):
        ...     mu = numpyro.param("mu", jnp.array([-1.0, 1.0]))
        ...     with numpyro.plate("data", x.shape[0]):
        ...         z = numpyro.sample("z", dist.Categorical(jnp.array([0.5, 0.5])))
        ...         numpyro.sample("x", dist.Normal(mu[z], 1.0), obs=x)
        >>> x = jnp.concatenate([jnp.full(50, -3.0), jnp.full(50, 3.0)])
        >>> fit = jaxem.EM(model).run(jax.random.PRNGKey(0), x)
        >>> se = jaxem.standard_errors(model, fit, x)
        >>> [round(float(s), 3) for s in se.standard_errors["mu"]]  # 1 / sqrt(50)
        [0.141, 0.141]
    """
    if not isinstance(params, dict) and hasattr(params, "params"):
        params = params.params
    params = {name: jnp.asarray(value) for name, value in params.items()}
    model = built_model(model)
    arrays, spec = split_args(args, kwargs)
    structure, margs, mkwargs = structure_and_args(model, arrays, spec)
    unknown = sorted(set(frozen) - set(structure.param_names))
    if unknown:
        raise ValueError(f"jaxem: frozen names {unknown} are not params of the model.")
    missing = sorted(set(structure.param_names) - set(params))
    if missing:
        raise ValueError(f"jaxem: params are missing values for {missing}.")
    # Checks the data and the values (a named error rather than a NaN Hessian).
    log_likelihood(model, params, *args, **kwargs)
    free = [n for n in structure.param_names if n not in frozen]
    if not free:
        raise ModelError("jaxem: every param is frozen: there is nothing to give errors for.")
    transforms = {n: biject_to(structure.constraints[n]) for n in free}
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
            stacklevel=2,
        )

    def constrained(v):
        u = unravel(start.at[moving].set(v))
        values = {n: transforms[n](u[n]) for n in free}
        values = {
            n: jnp.where(held_of[n], params[n], value) if held_of[n].any() else value
            for n, value in values.items()
        }
        return {**params, **values}

    def objective(v):
        return log_likelihood(model, constrained(v), *args, **kwargs)

    nesting = structure.max_plate_nesting

    @jax.jit
    def derivatives(point, params):
        marginals = e_step(model, params, margs, mkwargs, nesting).marginals

        def q(v):
            return expected_log_joint(model, constrained(v), marginals, margs, mkwargs, nesting)

        return (
            _symmetric(-jax.hessian(objective)(point)),
            _symmetric(-jax.hessian(q)(point)),
            jax.jacobian(lambda v: _ravel(constrained(v), free)[0])(point),
        )

    # One compiled program: op by op, the model's trace is dispatched thousands of times.
    information, complete, jacobian = derivatives(flat[moving], params)
    cov_u, undetermined = _inverse(information, labels)
    covariance = jacobian @ cov_u @ jacobian.T
    # An entry that loads on an undetermined direction, or is held, has no variance.
    nan = np.concatenate(
        [
            held_of[n].ravel()
            if held_of[n].shape == jnp.shape(params[n])
            else np.zeros(int(np.prod(jnp.shape(params[n]))), bool)
            for n in free
        ]
    )
    if undetermined.size:
        # The constrained entries each undetermined unconstrained entry moves: itself
        # where the transform is elementwise, every entry of a simplex.
        sizes = [int(np.prod(jnp.shape(params[n]))) for n in free]
        offsets = dict(zip(free, np.cumsum([0, *sizes])))
        owners = [(n, i) for n in free for i, h in enumerate(held_of[n].ravel()) if not h]
        for k in undetermined:
            n, i = owners[k]
            elementwise = held_of[n].shape == jnp.shape(params[n])
            start = offsets[n] + (i if elementwise else 0)
            nan[start : start + (1 if elementwise else int(np.prod(jnp.shape(params[n]))))] = True
    covariance = jnp.where(nan[:, None] | nan[None, :], jnp.nan, covariance)
    variances = jnp.diag(covariance)
    errors = jnp.sqrt(jnp.maximum(variances, 0.0))  # NaN stays NaN
    index, offset = {}, 0
    for n in free:
        size = int(np.prod(jnp.shape(params[n])))
        index[n] = slice(offset, offset + size)
        offset += size
    errors = {n: errors[index[n]].reshape(jnp.shape(params[n])) for n in free}
    return StandardErrors(
        errors, covariance, index, information, complete, _missing_fraction(information, complete)
    )


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


def _symmetric(matrix):
    return 0.5 * (matrix + matrix.T)


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


def _inverse(information, labels):
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
        "Their standard errors are NaN.",
        NumericalWarning,
        stacklevel=3,
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
