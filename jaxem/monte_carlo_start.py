"""The checks before a Monte Carlo EM fit, mixed into
`jaxem.monte_carlo.MonteCarloEM`: the chains' target and its gradient finite at
latents drawn from the model (a `ModelError` naming the latents otherwise), and the
importance sampler's independent blocks of latent coordinates, probed by a few
Jacobian-vector products (`jaxem.importance.dependence_probe`), from the dense
Jacobian only when some log-density entry depends on several coordinates.

The fitter supplies ``latent`` (`jaxem.mcmc_estep.LatentModel`), ``_structure``,
``_start_jit`` (`_start_values` compiled) and ``_pattern_jit`` (`_dense_pattern`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jaxem.arguments import merge_args, merge_init_params
from jaxem.exceptions import ModelError
from jaxem.global_sites import global_site_names
from jaxem.importance import (
    blocks_from_pattern,
    blocks_from_probe,
    dependence_probe,
    find_blocks,
    sparsity_pattern,
)
from jaxem.validation import good_values, raise_for_bad_values

__all__ = ["MonteCarloStart", "padded_members"]


class _ParamNames(NamedTuple):
    """What `jaxem.validation.good_values` reads of a model's structure."""

    param_names: tuple
    constraints: dict
    global_sites: tuple


class MonteCarloStart:
    """The checks before a fit and the importance sampler's blocks (see the module)."""

    def _start_values(self, rng_key, arrays, params, *, spec, with_pattern):
        """What the checks before a fit need, as one compiled program (run eagerly,
        every primitive of the model on the full data is a compilation of its own):
        the chains' target and its gradient at latents drawn from the model, and
        (``with_pattern``, continuous latents only) the one latent coordinate each
        log-density entry depends on, probed at two more draws
        (`jaxem.importance.dependence_probe`)."""
        structure = self._structure(arrays, spec)
        args, kwargs = merge_args(arrays, spec)
        z = self.latent.prior_draw(structure, params, rng_key, args, kwargs)
        value, grad = jax.value_and_grad(
            lambda z: self.latent.log_target(structure, params, z, args, kwargs)
        )(z)
        if not with_pattern or structure.discrete:
            return value, grad, None
        elementwise, points = self._pattern_points(rng_key, structure, params, args, kwargs)
        owner = dependence_probe(elementwise, points, jax.random.fold_in(rng_key, 8))
        return value, grad, owner

    def _pattern_points(self, rng_key, structure, params, args, kwargs):
        """``(z_flat -> log-density entries, two flat draws from the model)``."""
        keys = jax.random.split(jax.random.fold_in(rng_key, 7), 2)
        draws = jax.vmap(lambda k: self.latent.prior_draw(structure, params, k, args, kwargs))(keys)
        _, unravel = ravel_pytree(jax.tree.map(lambda x: x[0], draws))
        points = jax.vmap(lambda d: ravel_pytree(d)[0])(draws)

        def elementwise(zf):
            return self.latent.elementwise(structure, params, unravel(zf), args, kwargs)

        return elementwise, points

    def _dense_pattern(self, rng_key, arrays, params, *, spec):
        """Which log-density entries depend on which latent coordinates, from the dense
        Jacobian at the draws of `_start_values` (when an entry depends on several)."""
        structure = self._structure(arrays, spec)
        args, kwargs = merge_args(arrays, spec)
        elementwise, points = self._pattern_points(rng_key, structure, params, args, kwargs)
        return sparsity_pattern(elementwise, points)

    def _check_start(self, rng_key, arrays, spec, init_params, with_pattern=False):
        """Concrete checks before a fit: the chains' target and its gradient are finite
        at the initial draws (a ModelError naming the latent otherwise). Returns
        ``(structure, params, dependency probe or None, number of latent coordinates)``."""
        structure = self._structure(arrays, spec)
        params = merge_init_params(dict(structure.params), init_params)
        # A value outside its param's constraint (or its global site's prior support)
        # is named here, as EM and VariationalBayesEM name it, before it makes the
        # log-density below non-finite without a name.
        names = _ParamNames(
            tuple(structure.params), structure.constraints, global_site_names(self.latent.model)
        )
        raise_for_bad_values(names, good_values(names, params))
        value, grad, owner = self._start_jit(
            rng_key, arrays, params, spec=spec, with_pattern=with_pattern
        )
        if not np.isfinite(float(value)):
            raise ModelError(
                "jaxem: the log-density of the model is not finite at latents drawn from the "
                f"model at the initial params (latents {sorted(structure.continuous)}): check "
                "the initial values (init_params) and that every latent's distribution is "
                "proper and its support matches the values the model gives it."
            )
        bad = sorted(n for n, g in grad.items() if not np.all(np.isfinite(np.asarray(g))))
        if bad:
            raise ModelError(
                f"jaxem: the gradient of the log-density with respect to the latent sites {bad} "
                "is not finite at values drawn from the model: HMC/NUTS need a differentiable "
                "log-density of every continuous latent. Write the model so that it is "
                "differentiable in these latents (no rounding, no hard thresholds on them)."
            )
        num_coords = sum(int(np.size(g)) for g in grad.values())
        return structure, params, owner, num_coords

    @staticmethod
    def _blocks(owner, num_coords, dense_pattern):
        """The importance sampler's independent blocks of the ``num_coords`` latent
        coordinates: one block when discrete latents are summed out inside the
        density (then there is no ``owner``); from the probe's ``owner`` when every
        log-density entry depends on at most one coordinate; else from the dense
        pattern ``dense_pattern()`` computes."""
        if owner is None:
            return find_blocks(None, [np.zeros(num_coords)])
        blocks = blocks_from_probe(owner, num_coords)
        return blocks_from_pattern(dense_pattern()) if blocks is None else blocks


def padded_members(blocks):
    """The blocks' padded ``members`` for the block-by-block proposal, or None (one
    dense matrix) when padding to the largest block would cost more than that."""
    members = blocks.members
    if members is None or members.size * members.shape[1] > blocks.coordinate.size**2:
        return None
    return jnp.asarray(members)
