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

import jax
import jax.numpy as jnp

from jaxem.arguments import split_args
from jaxem.built import built_model
from jaxem.delta_method import (
    StandardErrors,
    check_names,
    delta_method,
    symmetric,
    unconstrained_coordinates,
)
from jaxem.estep import e_step, log_joint, log_likelihood, structure_and_args
from jaxem.exceptions import ConvergenceWarning
from jaxem.gradient import expected_log_joint
from jaxem.louis import louis_standard_errors
from jaxem.monte_carlo_types import MCResult

__all__ = ["StandardErrors", "standard_errors"]


def standard_errors(model, params, *args, frozen=(), **kwargs) -> StandardErrors:
    """Standard errors of a maximum likelihood fit, from the observed information.

    For a [`jaxem.SAEM`][jaxem.SAEM] or [`jaxem.MCEM`][jaxem.MCEM] result, the
    observed information comes from Louis' identity over the posterior draws of
    the latents the fit's chains took at its params (``result.draws``; see
    `jaxem.louis.louis_standard_errors`), and ``monte_carlo_error`` holds the
    Monte Carlo standard error of each standard error.

    For a MAP fit (``global_sites=``, through the fitter's ``standard_errors``
    method, whose model marks the global sites), the information is the negative
    Hessian of the objective the fit maximized, ``log p(x | theta) + log p(theta)``:
    the Laplace approximation, whose standard errors are posterior standard
    deviations and shrink with a tighter prior.

    Args:
        model: the NumPyro model (with discrete latents, summed out exactly).
        params: the estimate, ``{param name: constrained value}``, or a fit result
            with a ``params`` field (``EM.run``'s, or a Monte Carlo fit's).
            `jaxem.EM.standard_errors` passes the fitter's frozen params too.
        *args, **kwargs: the model's arguments (the data the fit used).
        frozen: names of params held fixed in the fit: they have no standard
            error, and the others' are conditional on their values. A result does
            not record them: the fitters' ``standard_errors`` methods pass them.

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
    if isinstance(params, MCResult):
        if not bool(params.converged):
            warnings.warn(
                "jaxem: the Monte Carlo fit did not converge (or diverged): its params need "
                "not be the maximum, and standard errors from the information there do not "
                "describe the estimate. Refit longer (max_iter, the schedule) first.",
                ConvergenceWarning,
                stacklevel=2,
            )
        return louis_standard_errors(
            model, params.params, params.draws, *args, frozen=frozen, **kwargs
        )
    if not isinstance(params, dict) and hasattr(params, "params"):
        params = params.params
    params = {name: jnp.asarray(value) for name, value in params.items()}
    model = built_model(model)
    arrays, spec = split_args(args, kwargs)
    structure, margs, mkwargs = structure_and_args(model, arrays, spec)
    check_names(structure.param_names, params, frozen)
    # Checks the data and the values (a named error rather than a NaN Hessian).
    log_likelihood(model, params, *args, **kwargs)
    coordinates = unconstrained_coordinates(
        structure.param_names, structure.constraints, params, frozen
    )
    constrained = coordinates.constrained

    # With global sites (MAP-EM) the objective the fit maximized is the log joint: its
    # curvature at the MAP is the Laplace approximation's, and the complete-data
    # information below includes the same log prior (Louis' path does too).
    def objective(v):
        return log_joint(model, constrained(v), *args, **kwargs)

    nesting = structure.max_plate_nesting

    @jax.jit
    def derivatives(point, params):
        marginals = e_step(model, params, margs, mkwargs, nesting).marginals

        def q(v):
            return expected_log_joint(model, constrained(v), marginals, margs, mkwargs, nesting)

        return (
            symmetric(-jax.hessian(objective)(point)),
            symmetric(-jax.hessian(q)(point)),
            coordinates.jacobian(point),
        )

    # One compiled program: op by op, the model's trace is dispatched thousands of times.
    information, complete, jacobian = derivatives(coordinates.point, params)
    return delta_method(coordinates, information, complete, jacobian)
