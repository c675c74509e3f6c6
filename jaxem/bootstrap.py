"""The bootstrap of an EM fit: every replicate fitted at once under ``vmap``.

A nonparametric replicate resamples the elements of the data plate with
replacement; jaxem fits it as the original data with multinomial case weights
(how many times each element was drawn), so every replicate has the original
shapes and all of them run as one batched program. A parametric replicate
draws new observations from the fitted model and refits. Each replicate starts
from the fitted params, so it converges to the matching optimum in a few
iterations; for a mixture, each replicate's components are then matched to the
original fit's (the permutation of the component axis closest to it), since a
replicate may find the same optimum with its labels switched.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers
from numpyro.primitives import Messenger

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
        if msg["scale"] is not None:
            raise ModelError(
                f"jaxem: site '{msg['name']}' is already scaled: bootstrap the model without "
                "its numpyro.handlers.scale (the replicates' weights take its place)."
            )
        # One array per dim, shared by the sites: the case weights must be one object.
        if frame.dim not in self.reshaped:
            shape = (-1,) + (1,) * (-frame.dim - 1)
            self.reshaped[frame.dim] = jnp.reshape(self.weights, shape)
        msg["scale"] = self.reshaped[frame.dim]


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
        align: match each replicate's components to the original fit's (a
            mixture: one latent site, the params with a leading axis of its size
            permuted together). None: for a model with one latent site.

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
    latents = structure.latent_sites
    if align is None:
        align = len(latents) == 1
    if align:
        size = int(trace.sites[latents[0]].value.size) if latents else 0
        estimates = _align(estimates, {n: np.asarray(v) for n, v in params.items()}, size)
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


def _align(estimates: dict, original: dict, num_components: int) -> dict:
    """Permute each replicate's components (the leading axis of size K of the
    params that have one) to the permutation closest to the original fit, in
    squared differences scaled by each param's magnitude."""
    names = [n for n, v in original.items() if v.ndim and v.shape[0] == num_components]
    if num_components < 2 or not names or num_components > 8:
        return estimates
    scales = {n: np.mean(np.abs(original[n])) + 1e-12 for n in names}
    permutations = np.array(list(itertools.permutations(range(num_components))))
    cost = 0.0
    for n in names:
        permuted = estimates[n][:, permutations]  # (B, P, K, ...)
        diff = (permuted - original[n][None, None]) / scales[n]
        cost = cost + np.sum(diff.reshape(diff.shape[0], diff.shape[1], -1) ** 2, axis=-1)
    best = permutations[np.argmin(cost, axis=1)]  # (B, K)
    rows = np.arange(best.shape[0])[:, None]
    return {n: (v[rows, best] if n in names else v) for n, v in estimates.items()}
