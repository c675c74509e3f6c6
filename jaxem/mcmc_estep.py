"""The Monte Carlo E-step: continuous latents drawn by NumPyro's HMC/NUTS.

A model for [`jaxem.SAEM`][jaxem.SAEM] and [`jaxem.MCEM`][jaxem.MCEM] has ``numpyro.param``
sites (the parameters), observed sample sites, and latent sample sites: every
continuous latent is drawn, every discrete one is summed out exactly inside the
target density by NumPyro's enumeration (as [`jaxem.EM`][jaxem.EM] does). The target of
the chains is ``p(z | x, theta)`` in unconstrained coordinates, for the current
params ``theta``; the chains are carried from one EM iteration to the next (warm
starts), their potential energy refreshed at each iteration's params, and their
step size and diagonal mass matrix adapted during a burn-in by NumPyro's own
window adaptation (the first ``num_warmup`` transitions, whatever iteration they
fall in). Chains run side by side under ``vmap``.

NumPyro's functional HMC (`numpyro.infer.hmc.hmc`) is used with a
``potential_fn_gen`` taking the params and the model's arrays, so the sampler's
state can live in the compiled EM loop.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from numpyro.contrib.funsor import config_enumerate, enum
from numpyro.contrib.funsor import log_density as enumerated_log_density
from numpyro.distributions.transforms import biject_to
from numpyro.handlers import seed, substitute, trace
from numpyro.infer.hmc import hmc
from numpyro.infer.util import log_density

from jaxem.arguments import check_model_call
from jaxem.enum_dims import raise_for_mixed_enum_dims
from jaxem.exceptions import ModelError
from jaxem.fit_warnings import user_stacklevel
from jaxem.global_sites import check_global_sites, global_site_names
from jaxem.missing import MissingData
from jaxem.numpyro_internals import hmc_kernel_settings
from jaxem.validation import model_failure, non_finite_data_error

__all__ = ["LatentModel", "LatentStructure", "Sampler", "SamplerInfo", "sampler_settings"]


class LatentStructure(NamedTuple):
    """What a seeded trace says about a model with continuous latents.

    Attributes:
        params: ``{param name: initial constrained value}``.
        constraints: ``{param name: constraint}``.
        continuous: ``{latent site name: support}``, the latents drawn.
        discrete: names of the discrete latent sites (enumerated).
        observed: names of the observed sample sites.
        nesting: the model's largest plate nesting.
        num_observations: number of observed entries (for BIC).
    """

    params: dict
    constraints: dict
    continuous: dict
    discrete: tuple
    observed: tuple
    nesting: int
    num_observations: int


def _base(fn):
    while isinstance(fn, (dist.MaskedDistribution, dist.ExpandedDistribution)):
        fn = fn.base_dist
    return fn


def _value_of_improper(site):
    if site["type"] == "sample" and not site["is_observed"]:
        if isinstance(_base(site["fn"]), dist.ImproperUniform):
            return jnp.zeros(site["fn"].shape(site["kwargs"].get("sample_shape", ())))
    return None


def _check_data(name, site) -> None:
    """A ModelError naming an observed site with NaN or infinite data (concrete data
    only; masked sites and `jaxem.nan_as_missing` sites may hold NaN)."""
    value = site["value"]
    if isinstance(value, jax.core.Tracer) or isinstance(site["fn"], MissingData):
        return
    if site.get("mask") is not None or isinstance(site["fn"], dist.MaskedDistribution):
        return
    count = int(np.sum(~np.isfinite(np.asarray(value, float))))
    if count:
        raise non_finite_data_error(name, count)


def _hint_global_site(name, site) -> None:
    """A continuous latent outside every plate is integrated out as one latent shared
    by all the data: legitimate, but usually a parameter with a prior whose name was
    left out of ``global_sites``."""
    if any(frame.dim is not None for frame in site["cond_indep_stack"]):
        return
    warnings.warn(
        f"jaxem: continuous latent site '{name}' is outside every plate, so it is one "
        "latent shared by all the data and the Monte Carlo E-step integrates it out. If it "
        "is a parameter with a prior, name it as a global site to estimate it (MAP): "
        f'global_sites=("{name}",) in the fitter (e.g. SAEM(model, '
        f'global_sites=("{name}",))). If one shared random effect is meant, ignore this.',
        UserWarning,
        stacklevel=user_stacklevel(),
    )


def _describe(fn) -> str:
    return type(fn).__name__


_KERNELS = {"nuts": "NUTS", "hmc": "HMC"}


def sampler_settings(kernel) -> tuple[str, dict]:
    """``(algo, init_kernel settings)`` from ``"nuts"``, ``"hmc"`` or a NumPyro
    ``NUTS``/``HMC`` instance (its settings are read, its model is not used)."""
    from numpyro.infer import HMC, NUTS

    if isinstance(kernel, str):
        if kernel.lower() not in _KERNELS:
            raise ValueError(f"kernel must be 'nuts', 'hmc' or a NUTS/HMC instance, got {kernel!r}")
        return _KERNELS[kernel.lower()], {}
    if isinstance(kernel, (NUTS, HMC)):
        algo = "NUTS" if isinstance(kernel, NUTS) else "HMC"
        settings = hmc_kernel_settings(kernel)
        return algo, settings
    raise ValueError(
        "kernel must be 'nuts', 'hmc' or a numpyro.infer.NUTS/HMC instance (its settings are "
        f"used; the chains' target is jaxem's), got {type(kernel).__name__}"
    )


class LatentModel:
    """A NumPyro model seen as ``p(x, z | theta)``: its structure and log densities.

    Args:
        model: the NumPyro model.
    """

    def __init__(self, model):
        self.model = model
        # The latents `_hint_global_site` has looked at (a fit inspects the model
        # several times; the hint is given once).
        self._hinted = set()

    def inspect(self, rng_key, args, kwargs) -> LatentStructure:
        """The model's params and latent sites (concrete, outside ``jit``), with a
        `ModelError` naming the site for what cannot be fitted."""
        check_model_call(self.model, args, kwargs)
        try:
            # An improper latent cannot be drawn: give it a value so that the check
            # below names it.
            model = substitute(self.model, substitute_fn=_value_of_improper)
            tr = trace(seed(model, rng_key)).get_trace(*args, **kwargs)
        except ModelError:
            raise
        except (ValueError, TypeError) as err:
            raise model_failure(err) from err
        params, constraints_, continuous, discrete, observed = {}, {}, {}, [], []
        nesting, num_obs = 0, 0
        global_sites = global_site_names(self.model)
        if global_sites:
            check_global_sites(global_sites, tr)
        for name, site in tr.items():
            if site["type"] == "param":
                params[name] = jnp.asarray(site["value"], jnp.result_type(float))
                constraints_[name] = site["kwargs"].get("constraint", dist.constraints.real)
                continue
            if site["type"] != "sample":
                continue
            for frame in site["cond_indep_stack"]:
                if frame.dim is not None:
                    nesting = max(nesting, -frame.dim)
            fn = site["fn"]
            if name in global_sites:
                # A parameter with a prior (MAP): constrained to the prior's support; its
                # log prior is a factor of the joint wherever the params are substituted.
                params[name] = jnp.asarray(site["value"], jnp.result_type(float))
                constraints_[name] = fn.support
                continue
            if site["is_observed"]:
                _check_data(name, site)
                observed.append(name)
                num_obs += int(np.size(site["value"]))
                continue
            base = _base(fn)
            if isinstance(base, dist.ImproperUniform):
                raise ModelError(
                    f"jaxem: latent sample site '{name}' has an improper density "
                    f"({_describe(base)}): its posterior need not be a distribution, and a "
                    "Monte Carlo E-step cannot draw from it. Give it a proper distribution "
                    "(e.g. a Normal with a scale param), or make it a numpyro.param."
                )
            if fn.support.is_discrete:
                if not fn.has_enumerate_support:
                    raise ModelError(
                        f"jaxem: latent sample site '{name}' ({_describe(base)}) is discrete "
                        "with a support that cannot be enumerated, and HMC cannot draw a "
                        "discrete value. Use a distribution with finite support (e.g. "
                        "Categorical over a truncated range) or observe the site."
                    )
                discrete.append(name)
            else:
                continuous[name] = fn.support
                if name not in self._hinted:
                    self._hinted.add(name)
                    _hint_global_site(name, site)
        if not params:
            raise ModelError(
                "jaxem: the model has no numpyro.param sites, so there are no parameters to "
                "fit. Declare each parameter with numpyro.param(name, init_value, "
                "constraint=...), or give it a prior as a numpyro.sample site and name it "
                "in global_sites=(...)."
            )
        if not continuous:
            raise ModelError(
                "jaxem: the model has no continuous latent sample site, so there is nothing "
                "for a Monte Carlo E-step to draw. Fit it with jaxem.EM, whose E-step is exact."
            )
        return LatentStructure(
            params, constraints_, continuous, tuple(discrete), tuple(observed), nesting, num_obs
        )

    # -- densities ---------------------------------------------------------------

    @staticmethod
    def constrain(structure, z_unc):
        """``(constrained latents, log |Jacobian| summed)`` of unconstrained ones."""
        z, logdet = {}, 0.0
        for name, support in structure.continuous.items():
            transform = biject_to(support)
            z[name] = transform(z_unc[name])
            logdet = logdet + jnp.sum(transform.log_abs_det_jacobian(z_unc[name], z[name]))
        return z, logdet

    @staticmethod
    def unconstrain(structure, z):
        """Unconstrained values of constrained latents."""
        return {n: biject_to(s).inv(z[n]) for n, s in structure.continuous.items()}

    def log_joint(self, structure, params, z, args, kwargs):
        """``log p(x, z | params)`` at constrained latents ``z``, discrete latents summed
        out by enumeration."""
        model = substitute(self.model, data={**params, **z})
        if structure.discrete:
            model = enum(config_enumerate(model), first_available_dim=-structure.nesting - 1)
            try:
                value, _ = enumerated_log_density(model, args, kwargs, {})
            except (TypeError, ValueError):
                tr = trace(seed(model, 0)).get_trace(*args, **kwargs)
                sites = [
                    (n, s["fn"], s["value"], n in structure.discrete)
                    for n, s in tr.items()
                    if s["type"] == "sample"
                ]
                raise_for_mixed_enum_dims(sites, structure.nesting)
                raise
        else:
            value, _ = log_density(model, args, kwargs, {})
        return value

    def log_target(self, structure, params, z_unc, args, kwargs):
        """The chains' target: ``log p(x, z | params)`` in unconstrained coordinates."""
        z, logdet = self.constrain(structure, z_unc)
        return self.log_joint(structure, params, z, args, kwargs) + logdet

    def elementwise(self, structure, params, z_unc, args, kwargs):
        """Every entry of every sample site's log-density and of the latents' log
        |Jacobian|, raveled into one vector whose sum is `log_target` (continuous
        latents only: an enumerated sum does not split into entries)."""
        z = {}
        parts = []
        for name, support in structure.continuous.items():
            transform = biject_to(support)
            z[name] = transform(z_unc[name])
            parts.append(jnp.ravel(transform.log_abs_det_jacobian(z_unc[name], z[name])))
        tr = trace(substitute(self.model, data={**params, **z})).get_trace(*args, **kwargs)
        for site in tr.values():
            if site["type"] != "sample":
                continue
            lp = site["fn"].log_prob(site["value"])
            if site.get("scale") is not None:
                lp = lp * site["scale"]
            parts.append(jnp.ravel(lp))
        return jnp.concatenate([jnp.ravel(p).astype(jnp.result_type(float)) for p in parts])

    def log_prior(self, names, params, args, kwargs):
        """The summed log-densities of the global sites ``names`` at ``params`` (their
        priors are outside the plates that hold data, so no latent enters them)."""
        model = seed(substitute(self.model, data=params), jax.random.PRNGKey(0))
        tr = trace(model).get_trace(*args, **kwargs)
        return sum(jnp.sum(tr[n]["fn"].log_prob(tr[n]["value"])) for n in names)

    def prior_draw(self, structure, params, rng_key, args, kwargs):
        """Unconstrained latents drawn from the model at ``params`` (initial chain
        values)."""
        tr = trace(seed(substitute(self.model, data=params), rng_key)).get_trace(*args, **kwargs)
        return self.unconstrain(structure, {n: tr[n]["value"] for n in structure.continuous})


def over_chains(fn, *chains):
    """``jax.vmap(fn)(*chains)`` over the leading (chain) axis; with one chain, ``fn``
    on that chain alone, its outputs given the axis back. NUTS builds its trees in a
    ``while_loop`` whose ``vmap`` turns every branch into selects over both sides, so
    one chain is traced, compiled and run as the plain loop (the same arithmetic)."""
    if jax.tree.leaves(chains)[0].shape[0] != 1:
        return jax.vmap(fn)(*chains)
    out = fn(*jax.tree.map(lambda x: x[0], chains))
    return jax.tree.map(lambda x: jnp.expand_dims(x, 0), out)


class SamplerInfo(NamedTuple):
    """The chains' diagnostics over one iteration's transitions.

    Attributes:
        accept_prob: mean acceptance probability.
        num_divergences: divergent transitions after the adaptation (all chains).
        step_size: mean step size over the chains.
    """

    accept_prob: jax.Array
    num_divergences: jax.Array
    step_size: jax.Array


class Sampler:
    """Chains of NumPyro's HMC or NUTS on ``p(z | x, theta)``, vmapped.

    Args:
        latent: the `LatentModel`.
        algo: ``"NUTS"`` or ``"HMC"``.
        num_warmup: transitions (counted over the whole fit) during which the
            step size and the diagonal mass matrix are adapted.
        settings: keyword arguments of NumPyro's ``init_kernel`` (step_size,
            target_accept_prob, max_tree_depth, num_steps, trajectory_length,
            dense_mass, adapt_mass_matrix).
    """

    def __init__(self, latent: LatentModel, algo: str, num_warmup: int, settings: dict):
        self.latent = latent
        self.algo = algo
        self.num_warmup = int(num_warmup)
        self.settings = dict(settings)

    def _kernels(self, structure, spec_merge, params, arrays, z_example):
        """NumPyro's ``(init_kernel, sample_kernel)`` for this model; the init kernel is
        called once on one chain's latents because ``sample_kernel`` reads the
        adaptation schedule it sets up (its result is unused and compiled away)."""

        def potential_gen(params, arrays):
            args, kwargs = spec_merge(arrays)
            return lambda z: -self.latent.log_target(structure, params, z, args, kwargs)

        init_kernel, sample_kernel = hmc(potential_fn_gen=potential_gen, algo=self.algo)
        init_kernel(
            z_example,
            self.num_warmup,
            model_args=(params, arrays),
            rng_key=jax.random.PRNGKey(0),
            **self.settings,
        )
        return init_kernel, sample_kernel, potential_gen

    def init(self, rng_key, structure, spec_merge, params, arrays, z0):
        """Chain states at unconstrained latents ``z0`` (a leading chain axis)."""
        first = jax.tree.map(lambda x: x[0], z0)
        init_kernel, _, _ = self._kernels(structure, spec_merge, params, arrays, first)
        keys = jax.random.split(rng_key, jax.tree.leaves(z0)[0].shape[0])

        def one(z, key):
            return init_kernel(
                z, self.num_warmup, model_args=(params, arrays), rng_key=key, **self.settings
            )

        return over_chains(one, z0, keys)

    def transitions(
        self, rng_key, states, structure, spec_merge, params, arrays, num, buffer, collect
    ):
        """``num`` transitions of every chain at ``params`` (``num`` may be traced); the
        potential energy and its gradient are first refreshed at ``params`` (the chains
        come from the previous iteration's params). ``collect(buffer, i, z) -> buffer``
        stores the unconstrained draws of transition ``i``; returns ``(states, buffer,
        SamplerInfo)``."""
        first = jax.tree.map(lambda x: x[0], states.z)
        _, sample_kernel, potential_gen = self._kernels(
            structure, spec_merge, params, arrays, first
        )
        potential = potential_gen(params, arrays)
        energy, grad = over_chains(jax.value_and_grad(potential), states.z)
        states = states._replace(potential_energy=energy, z_grad=grad)
        num_chains = energy.shape[0]
        dtype = energy.dtype

        def body(i, carry):
            states, buffer, accept, divergences = carry
            keys = jax.random.split(jax.random.fold_in(rng_key, i), num_chains)
            # Divergences during the adaptation are part of tuning the step size (as in
            # Stan); those after it are reported.
            tuned = states.i >= self.num_warmup
            states = states._replace(rng_key=keys)
            states = over_chains(lambda s: sample_kernel(s, model_args=(params, arrays)), states)
            diverging = states.diverging & tuned
            buffer = collect(buffer, i, states.z)
            return (
                states,
                buffer,
                accept + jnp.mean(states.accept_prob),
                (divergences + jnp.sum(diverging)).astype(jnp.int32),
            )

        carry = (states, buffer, jnp.zeros((), dtype), jnp.zeros((), jnp.int32))
        states, buffer, accept, divergences = jax.lax.fori_loop(0, num, body, carry)
        info = SamplerInfo(
            accept / jnp.maximum(num, 1).astype(dtype),
            divergences,
            jnp.mean(states.adapt_state.step_size),
        )
        return states, buffer, info
