"""Standard errors of a Monte Carlo EM fit by Louis' (1982) identity.

With draws ``z_1..z_S`` of the latents from their posterior ``p(z | x, theta)`` at
the estimate, the observed information is the complete-data information less
the information the latents hide, both posterior expectations of complete-data
quantities (Louis 1982, eq. 3.1, with the score centred so that it holds at any
``theta``):

$$
I_{\\text{obs}} = E[-\\nabla^2_u \\log p(x, z \\mid \\theta(u))]
  - \\operatorname{Var}[\\nabla_u \\log p(x, z \\mid \\theta(u))],
$$

the expectations over ``z``, estimated by averages over the draws. The
derivatives are taken by autodiff in the same unconstrained coordinates as the
exact observed information, and carried to the constrained params by the same
delta method (`jaxem.delta_method`). Discrete latents not among the draws are
summed out exactly in ``log p(x, z | theta)``, as the fit does. The Monte Carlo
error of the standard errors is estimated by a grouped jackknife over blocks of
consecutive draws (blocks long enough to span the chains' autocorrelation).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from numpyro.handlers import seed, substitute, trace

from jaxem.delta_method import (
    StandardErrors,
    check_names,
    delta_method,
    inverse_or_none,
    param_index,
    symmetric,
    unconstrained_coordinates,
)
from jaxem.exceptions import ModelError
from jaxem.mcmc_estep import LatentModel, LatentStructure

__all__ = ["louis_standard_errors"]

# Blocks of the grouped jackknife of the Monte Carlo error.
NUM_BLOCKS = 10

_HINT = (
    "With Monte Carlo draws (Louis' identity), too few draws of the latents do this too: "
    "raise num_is_draws (or num_chains) of the fit. "
)


def louis_standard_errors(
    model, params, draws, *args, weights=None, frozen=(), **kwargs
) -> StandardErrors:
    """Standard errors from Louis' identity over draws of the latents.

    `jaxem.standard_errors` calls this for a [`jaxem.SAEM`][jaxem.SAEM] or
    [`jaxem.MCEM`][jaxem.MCEM] result, with the posterior draws its chains
    took at the fitted params (``result.draws``).

    Args:
        model: the NumPyro model.
        params: ``{param name: constrained value}``, or a result with ``params``.
        draws: ``{latent site name: (S, *shape)}``: draws of latent sites from
            their posterior at ``params`` (constrained values). Discrete latent
            sites not given are summed out by enumeration.
        *args, **kwargs: the model's arguments (the data the fit used).
        weights: ``(S,)`` weights of the draws (normalized here); None: equal
            weights (MCMC draws). With every configuration of the latents and
            their exact posterior probabilities, the identity is exact.
        frozen: names of params held fixed in the fit (no standard error).
            A Monte Carlo result does not record them: pass the fitter's.

    Returns:
        `jaxem.delta_method.StandardErrors`; ``monte_carlo_error`` holds the
        jackknife Monte Carlo standard error of each standard error (None with
        ``weights`` or fewer than ``2 * NUM_BLOCKS`` draws).

    Raises:
        ModelError: a continuous latent site has no draws, or draws that are not
            finite or have the wrong shape.

    Warns:
        NumericalWarning: the estimated information is not positive definite
            (see `jaxem.standard_errors`; too few draws also cause it).
    """
    if not isinstance(params, dict) and hasattr(params, "params"):
        params = params.params
    params = {name: jnp.asarray(value) for name, value in params.items()}
    draws = {name: jnp.asarray(value) for name, value in draws.items()}
    sizes = {int(v.shape[0]) for v in draws.values()}
    if len(sizes) != 1:
        raise ModelError(
            "jaxem: the draws of the latents must have one leading axis of draws, the same "
            f"for every site; got { ({n: tuple(v.shape) for n, v in draws.items()}) }."
        )
    num = sizes.pop()
    names, structure = _structure(model, params, draws, args, kwargs)
    check_names(names, params, frozen)
    coordinates = unconstrained_coordinates(names, structure.constraints, params, frozen)
    latent = LatentModel(model)

    @jax.jit
    def derivatives(point, draws):
        def one(z):
            def log_complete(v):
                p = coordinates.constrained(v)
                return latent.log_joint(structure, p, z, args, kwargs)

            return jax.grad(log_complete)(point), jax.hessian(log_complete)(point)

        scores, hessians = jax.vmap(one)(draws)
        return scores, hessians, coordinates.jacobian(point)

    scores, hessians, jacobian = derivatives(coordinates.point, draws)
    scores, hessians = np.asarray(scores), np.asarray(hessians)
    if not (np.all(np.isfinite(scores)) and np.all(np.isfinite(hessians))):
        raise ModelError(
            "jaxem: the complete-data log-likelihood or its derivatives are not finite at "
            "some draws of the latents: the draws do not come from the model at these params "
            "(check that the draws are the fit's result.draws, at result.params)."
        )
    w = np.full(num, 1.0 / num) if weights is None else np.asarray(weights, np.float64)
    if w.shape != (num,) or np.any(w < 0) or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f"jaxem: weights must be {num} finite non-negative numbers.")
    information, complete = _louis(scores, hessians, w / w.sum())
    dtype = jacobian.dtype
    error = None
    if weights is None and num >= 2 * NUM_BLOCKS:
        error = _jackknife(scores, hessians, np.asarray(jacobian), coordinates)
    result = delta_method(
        coordinates,
        jnp.asarray(information, dtype),
        jnp.asarray(complete, dtype),
        jacobian,
        hint=_HINT,
        monte_carlo_error=error,
    )
    if error is not None:
        # No Monte Carlo error where there is no standard error.
        error = {
            n: jnp.where(jnp.isnan(result.standard_errors[n]), jnp.nan, e) for n, e in error.items()
        }
        result = result._replace(monte_carlo_error=error)
    return result


def _louis(scores, hessians, w):
    """``(I_obs, I_complete)`` from per-draw scores ``(S, D)`` and Hessians
    ``(S, D, D)`` with normalized weights ``w``."""
    complete = -np.einsum("s,sij->ij", w, hessians)
    mean = w @ scores
    centred = scores - mean
    missing = np.einsum("s,si,sj->ij", w, centred, centred)
    return symmetric(complete - missing), symmetric(complete)


def _jackknife(scores, hessians, jacobian, coordinates) -> dict:
    """The grouped jackknife's standard error of every standard error, over
    ``NUM_BLOCKS`` blocks of consecutive draws (NaN where a re-estimate's
    information is not positive definite)."""
    num = scores.shape[0]
    blocks = np.array_split(np.arange(num), NUM_BLOCKS)
    estimates = []
    for block in blocks:
        keep = np.setdiff1d(np.arange(num), block)
        w = np.full(keep.size, 1.0 / keep.size)
        information, _ = _louis(scores[keep], hessians[keep], w)
        inverse = inverse_or_none(information)
        if inverse is None:
            estimates = None
            break
        estimates.append(np.sqrt(np.maximum(np.diag(jacobian @ inverse @ jacobian.T), 0.0)))
    size = jacobian.shape[0]
    if estimates is None:
        spread = np.full(size, np.nan)
    else:
        estimates = np.stack(estimates)
        b = len(blocks)
        spread = np.sqrt((b - 1) / b * np.sum((estimates - estimates.mean(0)) ** 2, axis=0))
    index = param_index(coordinates.free, coordinates.shapes)
    return {
        n: jnp.asarray(spread[index[n]].reshape(coordinates.shapes[n])) for n in coordinates.free
    }


def _structure(model, params, draws, args, kwargs) -> tuple[list, LatentStructure]:
    """``(param names, structure)``: the model's params, constraints and the discrete
    latents to sum out, from one trace at ``params`` (the latents drawn from the
    model); a ModelError for a latent with no draws, or draws that do not fit it."""
    tr = trace(seed(substitute(model, data=params), jax.random.PRNGKey(0)))
    sites = tr.get_trace(*args, **kwargs)
    names = [n for n, s in sites.items() if s["type"] == "param"]
    constraints_ = {n: sites[n]["kwargs"].get("constraint", dist.constraints.real) for n in names}
    samples = {n: s for n, s in sites.items() if s["type"] == "sample"}
    frames = [f for s in samples.values() for f in s["cond_indep_stack"] if f.dim is not None]
    nesting = max((-f.dim for f in frames), default=0)
    discrete, observed = [], []
    for name, site in samples.items():
        scale = site.get("scale")
        if scale is not None and not np.all(np.isin(np.asarray(scale), (0.0, 1.0))):
            # A weight w stands for w elements, each with a latent of its own: one draw
            # per element gives w^2, not w, times its score's variance.
            raise ModelError(
                f"jaxem: site '{name}' is scaled (case weights, or a subsampled plate): "
                "Louis' identity over draws of the latents takes each element's latents once, "
                "where a weight of w stands for w elements with latents of their own, so the "
                "missing information would be wrong. Replicate the weighted rows instead."
            )
        if site["is_observed"]:
            if name in draws:
                raise ModelError(
                    f"jaxem: the draws name site '{name}', which is observed: give draws of "
                    "the latent sites only."
                )
            observed.append(name)
            continue
        if name in draws:
            shape = tuple(np.shape(site["value"]))
            if tuple(draws[name].shape[1:]) != shape:
                raise ModelError(
                    f"jaxem: the draws of latent site '{name}' have shape "
                    f"{tuple(draws[name].shape[1:])} each, the site {shape}."
                )
            if not np.all(np.isfinite(np.asarray(draws[name]))):
                raise ModelError(
                    f"jaxem: the draws of latent site '{name}' are not all finite: the fit "
                    "diverged or its chains did not run; refit before computing standard errors."
                )
            continue
        if site["fn"].support.is_discrete:
            discrete.append(name)
            continue
        raise ModelError(
            f"jaxem: latent site '{name}' is continuous and has no draws: Louis' identity "
            "averages over draws of every continuous latent. Pass the fit's result (its "
            "draws hold every continuous latent), or draws of this site."
        )
    unknown = sorted(set(draws) - set(sites))
    if unknown:
        raise ModelError(f"jaxem: the draws name {unknown}, which are not sites of the model.")
    return names, LatentStructure(
        {n: params[n] for n in names if n in params},
        constraints_,
        {},
        tuple(discrete),
        tuple(observed),
        nesting,
        0,
    )
