"""The warnings of a Monte Carlo EM fit (`jaxem.SAEM`, `jaxem.MCEM`), raised outside the
compiled loop on the concrete result."""

from __future__ import annotations

import warnings

from jaxem.exceptions import ConvergenceWarning, NumericalWarning
from jaxem.monte_carlo_stationarity import MIN_DRIFT_ESS

__all__ = ["warn_about_monte_carlo_fit"]


def warn_about_monte_carlo_fit(
    result,
    *,
    name: str,
    max_iter: int,
    convergence_rule: str,
    num_is_samples: int,
    stationarity_fix: str = "",
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
    elif not bool(result.stationarity.stationary) or (
        result.drift is not None and bool(result.drift.drifting)
    ):
        _warn_not_stationary(result, name, stationarity_fix)
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


def _named(z: dict) -> str:
    z = {k: float(v) for k, v in z.items()}
    return ", ".join(f"{k} ({z[k]:.1f} SE)" for k in sorted(z, key=z.get, reverse=True)[:3])


def _fewest(ess: dict) -> str:
    ess = {k: float(v) for k, v in ess.items()}
    return ", ".join(f"{k} ({ess[k]:.1f})" for k in sorted(ess, key=ess.get)[:3])


def _warn_not_stationary(result, name, fix):
    check, drift = result.stationarity, result.drift
    found = []
    if drift is not None and bool(drift.drifting) and float(drift.ess) < MIN_DRIFT_ESS:
        found.append(
            "they moved too slowly over the last half of the first phase (step size 1) to "
            "tell whether they had settled: "
            f"{float(drift.ess):.1f} effective iterations of its chain, fewer than "
            f"{MIN_DRIFT_ESS:g}, mostly in {_fewest(drift.param_ess)} (see result.drift)"
        )
    elif drift is not None and bool(drift.drifting):
        found.append(
            "they were still drifting at the end of the first phase (step size 1): the "
            "batch means of its last half trend beyond their Monte Carlo noise "
            f"(p = {float(drift.p_value):.2g}), mostly in {_named(drift.z)} "
            "(see result.drift)"
        )
    if not bool(check.definite):
        found.append(
            "Louis' estimate of the observed information at the params is not positive "
            "definite, which it is at a maximum: they are off it, or the posterior draws "
            "at them are too few to tell (raise num_is_draws); the score is largest in "
            f"{_named(check.score_z)} (see result.stationarity)"
        )
    elif not bool(check.stationary):
        found.append(
            "the score at the params is far from zero beyond its Monte Carlo error "
            f"(p = {float(check.p_value):.2g}), mostly in {_named(check.score_z)}, and "
            f"a Newton step would raise the log-likelihood by about {float(check.gain):.3g} "
            f"nats, where Monte Carlo noise alone gives {float(check.noise_gain):.2g} "
            "(see result.stationarity)"
        )
    warnings.warn(
        f"jaxem: {name} ended its run, but its params are doubtful as a maximum of the "
        f"log-likelihood: {'; and '.join(found)}. So converged is False. {fix}",
        ConvergenceWarning,
        stacklevel=4,
    )
