"""The bootstrap of an EM fit: every replicate fitted at once under ``vmap``.

A nonparametric replicate resamples the elements of the data plate with
replacement; jaxem fits it as the original data with multinomial case weights
(how many times each element was drawn), so every replicate has the original
shapes and all of them run as one batched program. A parametric replicate
draws new observations from the fitted model and refits. Each replicate starts
from the fitted params, so it converges to the matching optimum in a few
iterations; for a mixture or a hidden Markov model, each replicate's states are
then matched to the original fit's (`jaxem.alignment`: the permutation closest to
it, applied to every param axis the states index), since a replicate may find
the same optimum with its labels switched.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers
from numpyro.primitives import Messenger

from jaxem.alignment import align_states, match_states, num_states, state_axes
from jaxem.arguments import split_args
from jaxem.em import EM
from jaxem.estep import structure_and_args
from jaxem.exceptions import ModelError
from jaxem.tracing import enumerated_trace
from jaxem.weights import observation_plate

__all__ = ["BootstrapResult", "bootstrap"]


class BootstrapResult(NamedTuple):
    """Result of `bootstrap`.

    Attributes:
        params: ``{param name: (num_replicates, *shape)}``: every replicate's
            estimate (components aligned to the original fit for a mixture).
        standard_errors: ``{param name: shape}``: the replicates' standard deviation.
        intervals: ``{param name: (lower, upper)}``: percentile intervals.
        log_likelihoods: ``(num_replicates,)``.
        converged: ``(num_replicates,)``: whether each replicate's fit converged.
    """

    params: dict
    standard_errors: dict
    intervals: dict
    log_likelihoods: jax.Array
    converged: jax.Array


class _PlateWeights(Messenger):
    """Scale every sample site of ``plate`` by one weight per element."""

    def __init__(self, fn, plate, weights):
        self.plate = plate
        self.weights = weights
        self.reshaped: dict = {}
        super().__init__(fn)

    def process_message(self, msg):
        if msg["type"] != "sample":
            return
        frame = next((f for f in msg["cond_indep_stack"] if f.name == self.plate), None)
        if frame is None:
            return
        if msg["scale"] is not None and not _is_one(msg["scale"]):
            raise ModelError(
                f"jaxem: site '{msg['name']}' is already scaled: bootstrap the model without "
                "its numpyro.handlers.scale (the replicates' weights take its place)."
            )
        # One array per dim, shared by the sites: the case weights must be one object.
        if frame.dim not in self.reshaped:
            shape = (-1,) + (1,) * (-frame.dim - 1)
            self.reshaped[frame.dim] = jnp.reshape(self.weights, shape)
        msg["scale"] = self.reshaped[frame.dim]


def _is_one(scale) -> bool:
    """Whether a site's scale is a concrete 1 (a model's default case weight), which
    the replicates' weights may replace."""
    try:
        return bool(np.all(np.asarray(scale) == 1.0))
    except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return False


class _Resample(Messenger):
    """Observed sites draw new values (under ``seed``)."""

    def process_message(self, msg):
        if msg["type"] == "sample" and msg["is_observed"]:
            msg["value"] = None
            msg["is_observed"] = False
            msg["infer"] = {**msg.get("infer", {}), "_jaxem_resampled": True}


def bootstrap(
    em: EM,
    result,
    rng_key,
    *args,
    num_replicates: int = 100,
    kind: str = "nonparametric",
    level: float = 0.95,
    max_iter: int = 100,
    tol: float = 1e-6,
    align: bool | None = None,
    **kwargs,
) -> BootstrapResult:
    """Bootstrap standard errors and percentile intervals of an EM fit.

    Args:
        em: the [`jaxem.EM`][jaxem.EM] that made the fit (its settings are reused).
        result: the fit (its ``params``), or the fitted params.
        rng_key: PRNG key for the resampling.
        *args, **kwargs: the model's arguments, as given to ``run``.
        num_replicates: number of replicates, all fitted at once under ``vmap``.
        kind: ``"nonparametric"`` (resample the elements of the data plate, the
            plate that holds every sample site) or ``"parametric"`` (draw new
            observations from the fitted model).
        level: the coverage of the percentile intervals.
        max_iter, tol: each replicate's fit, which starts from the fitted params.
        align: match each replicate's states to the original fit's
            (`jaxem.alignment.align_states`: a mixture's components, a hidden
            Markov model's states, permuted in every param axis they index,
            both axes of a transition matrix). None: where the model's latent
            sites share one number of values and permuting them leaves the
            likelihood unchanged. True: a ModelError where they do not.

    Returns:
        `BootstrapResult`.

    Examples:
        >>> import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist
        >>> import jaxem
        >>> def model(x):
        ...     mu = numpyro.param("mu", jnp.array([-1.0, 1.0]))
        ...     with numpyro.plate("data", x.shape[0]):
        ...         z = numpyro.sample("z", dist.Categorical(jnp.array([0.5, 0.5])))
        ...         numpyro.sample("x", dist.Normal(mu[z], 1.0), obs=x)
        >>> x = jnp.concatenate([jnp.linspace(-4, -2, 50), jnp.linspace(2, 4, 50)])
        >>> em = jaxem.EM(model)
        >>> fit = em.run(jax.random.PRNGKey(0), x)
        >>> boot = jaxem.bootstrap(em, fit, jax.random.PRNGKey(1), x, num_replicates=20)
        >>> boot.params["mu"].shape
        (20, 2)
    """
    if kind not in ("nonparametric", "parametric"):
        raise ValueError(f"kind must be 'nonparametric' or 'parametric', got {kind!r}")
    if not isinstance(em, EM) or em.hard:
        raise ValueError("jaxem: bootstrap takes the (soft) EM that made the fit.")
    params = result if isinstance(result, dict) else result.params
    params = {n: jnp.asarray(v) for n, v in params.items()}
    model = em.model.model
    arrays, spec = split_args(args, kwargs)
    structure, margs, mkwargs = structure_and_args(em.model, arrays, spec)
    trace = enumerated_trace(em.model, params, margs, mkwargs, structure.max_plate_nesting)
    settings = dict(
        m_step=em.m_step,
        optimizer=em.optimizer,
        m_step_iters=em.m_step_iters,
        reg_covar=em.reg_covar,
        frozen=em.frozen,
        acceleration=em.acceleration,
    )
    keys = jax.random.split(rng_key, num_replicates)
    if kind == "nonparametric":
        plate, dim = observation_plate(
            trace, 'the nonparametric bootstrap (kind="parametric" does not)'
        )
        size = next(
            s.log_prob.shape[dim]
            for s in trace.sites.values()
            if plate in s.plates and -dim <= s.log_prob.ndim
        )

        def weighted(weights, *args, **kwargs):
            return _PlateWeights(model, plate, weights)(*args, **kwargs)

        refit = EM(weighted, **settings)

        def one(key):
            draws = jax.random.categorical(key, jnp.zeros(size), shape=(size,))
            counts = jnp.zeros(size).at[draws].add(1.0)
            return refit.run(
                key, counts, *args, max_iter=max_iter, tol=tol, init_params=params, **kwargs
            )

    else:

        def conditioned(observed, *args, **kwargs):
            return handlers.condition(model, data=observed)(*args, **kwargs)

        refit = EM(conditioned, **settings)

        def one(key):
            simulated = handlers.trace(
                handlers.seed(_Resample(handlers.substitute(model, data=params)), key)
            ).get_trace(*margs, **mkwargs)
            observed = {
                n: s["value"]
                for n, s in simulated.items()
                if s["type"] == "sample" and s["infer"].get("_jaxem_resampled")
            }
            return refit.run(
                key, observed, *args, max_iter=max_iter, tol=tol, init_params=params, **kwargs
            )

    fits = jax.vmap(one)(keys)
    estimates = {n: np.asarray(v) for n, v in fits.params.items()}
    if align or align is None:
        estimates = _aligned(em.model, estimates, params, align, args, kwargs)
    tail = (1.0 - level) / 2.0
    return BootstrapResult(
        params={n: jnp.asarray(v) for n, v in estimates.items()},
        standard_errors={n: jnp.asarray(np.std(v, axis=0, ddof=1)) for n, v in estimates.items()},
        intervals={
            n: (
                jnp.asarray(np.quantile(v, tail, axis=0)),
                jnp.asarray(np.quantile(v, 1.0 - tail, axis=0)),
            )
            for n, v in estimates.items()
        },
        log_likelihoods=fits.log_likelihood,
        converged=fits.converged,
    )


def _aligned(model, estimates, params, align, args, kwargs):
    """The replicates' states aligned to the fit (`jaxem.alignment`); with
    ``align=None``, only where the model has a label symmetry to undo."""
    if align:
        return align_states(model, estimates, params, *args, **kwargs)
    num = num_states(model, params, *args, **kwargs)
    axes = None if num is None else state_axes(model, params, num, *args, **kwargs)
    return estimates if axes is None else match_states(estimates, params, axes, num)
