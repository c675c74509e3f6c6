"""The warnings of a Monte Carlo EM fit (`jaxem.SAEM`, `jaxem.MCEM`), raised outside the
compiled loop on the concrete result."""

from __future__ import annotations

import warnings

from jaxem.exceptions import ConvergenceWarning, NumericalWarning

__all__ = ["warn_about_monte_carlo_fit"]


def warn_about_monte_carlo_fit(
    result, *, name: str, max_iter: int, convergence_rule: str, num_is_samples: int
) -> None:
    """Warn about divergent transitions, divergence, no convergence in ``max_iter``
    (``convergence_rule`` says what converging means for the fitter) and degenerate
    importance weights, on the concrete result."""
    divergences = int(result.num_divergences)
    if divergences:
        warnings.warn(
            f"jaxem: {name}'s chains made {divergences} divergent transitions: the "
            "draws of the latents may miss part of their posterior, and Q and the "
            "importance-sampling log-likelihood with them. Reparametrize the latents "
            "(non-centred random effects), raise num_warmup, or raise target_accept_prob "
            "(kernel=numpyro.infer.NUTS(model, target_accept_prob=0.95)).",
            NumericalWarning,
            stacklevel=3,
        )
    if bool(result.diverged):
        warnings.warn(
            f"jaxem: {name} diverged after {int(result.num_iters)} iterations: Q or "
            "a parameter became non-finite. The result holds the last finite parameters. "
            "Start elsewhere (init_params) or keep the parameters away from degenerate "
            "values.",
            ConvergenceWarning,
            stacklevel=3,
        )
    elif not bool(result.converged):
        warnings.warn(
            f"jaxem: {name} did not converge in max_iter={max_iter} iterations "
            f"({convergence_rule}). Raise max_iter.",
            ConvergenceWarning,
            stacklevel=3,
        )
    if float(result.min_ess) < 50:
        warnings.warn(
            f"jaxem: the importance weights of the log-likelihood estimate degenerate "
            f"(smallest effective sample size {float(result.min_ess):.0f} of "
            f"{num_is_samples}): log_likelihood and its standard error are "
            "doubtful. Raise num_is_samples and num_is_draws.",
            NumericalWarning,
            stacklevel=3,
        )
