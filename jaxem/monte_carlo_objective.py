"""The Monte Carlo estimate of ``Q`` over weighted stored draws and the M-step on
it, mixed into `jaxem.monte_carlo.MonteCarloEM`: ``Q(theta) = sum_slot weight *
mean_chain log p(x, z | theta)``, its gain between two params with a Monte Carlo
standard error, the closed-form params solved from averaged statistics
(`jaxem.monte_carlo_stats`) and optax steps on ``-Q`` for the others; and
``m_step_paths``, which params take which.

The fitter supplies ``latent`` (`jaxem.mcmc_estep.LatentModel`),
``closed_form`` (`jaxem.monte_carlo_stats.ClosedFormMStep`), ``frozen``,
``optimizer``, ``lbfgs``, ``m_step_iters`` and ``_structure``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree
from numpyro.distributions.transforms import biject_to

from jaxem.arguments import merge_args, split_args
from jaxem.loop import all_finite, tree_where

__all__ = ["MonteCarloObjective"]


class MonteCarloObjective:
    """``Q`` over weighted draws and its M-step (see the module)."""

    def m_step_paths(self, *args, **kwargs) -> dict:
        """How each parameter is updated, as [`jaxem.EM.m_step_paths`][jaxem.EM.m_step_paths]:
        ``{name: "closed-form (...)" | "gradient (...)" | "frozen" | "unused (...)"}``,
        planned on the model given a draw of its continuous latents."""
        arrays, spec = split_args(args, kwargs)
        structure = self._structure(arrays, spec)
        args, kwargs = merge_args(arrays, spec)
        z = self.latent.prior_draw(structure, structure.params, jax.random.PRNGKey(0), args, kwargs)
        z = self.latent.constrain(structure, z)[0]
        return self.closed_form.paths(structure.params, z, args, kwargs)

    def _closed_then_gradient(self, structure, params, draws, weights, args, kwargs):
        """The closed-form params solved from their statistics averaged over ``(draws,
        weights)`` (`jaxem.monte_carlo_stats`), then gradient steps on ``Q`` for the
        others: ``(params, Q at params, gain, gain_se)``."""
        start = self.closed_form.step(params, *self._flat(draws, weights), args, kwargs)
        return self._m_step(structure, params, draws, weights, args, kwargs, start)

    def _flat(self, draws, weights):
        """``(draws with one draw axis, the weight of each)``."""
        flat = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), draws)
        chains = _num_chains(draws)
        return flat, jnp.repeat(weights, chains) / chains

    def _per_draw(self, structure, params, draws, weights, args, kwargs):
        """``(weight of each draw, log p(x, z | params) of each draw, 0 where unused)``."""
        flat = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), draws)
        chains = _num_chains(draws)
        per_draw = jnp.repeat(weights, chains) / chains
        lp = jax.vmap(lambda z: self.latent.log_joint(structure, params, z, args, kwargs))(flat)
        return per_draw, jnp.where(per_draw > 0, lp, 0.0)

    def _q(self, structure, params, draws, weights, args, kwargs):
        """``sum_slot weight * mean_chain log p(x, z | params)``."""
        per_draw, lp = self._per_draw(structure, params, draws, weights, args, kwargs)
        return jnp.sum(per_draw * lp)

    def _free_names(self, params, draws, args, kwargs):
        """The params on the gradient path: neither frozen nor closed-form (planned on
        the model given the first of ``draws``, ``(slots, chains, ...)``)."""
        example = jax.tree.map(lambda x: x[0, 0], draws)
        closed = self.closed_form.closed_names(params, example, args, kwargs)
        return [n for n in params if n not in self.frozen and n not in closed]

    def _free_log_density(self, structure, params, free, draws, weights, args, kwargs):
        """``(u0, f, to_params)``: the params ``free`` as one flat vector ``u0`` in
        unconstrained coordinates, ``f(u) = Q / number of observations`` over ``(draws,
        weights)`` with the other params as in ``params``, and ``u -> params``."""
        transforms = {n: biject_to(structure.constraints[n]) for n in free}
        u0, unravel = ravel_pytree({n: transforms[n].inv(params[n]) for n in free})
        scale = max(structure.num_observations, 1)

        def to_params(u):
            values = unravel(u)
            return {**params, **{n: transforms[n](values[n]) for n in free}}

        def f(u):
            return self._q(structure, to_params(u), draws, weights, args, kwargs) / scale

        return u0, f, to_params

    def _gain(self, structure, old, new, draws, weights, args, kwargs):
        """``(Q(new) - Q(old), its Monte Carlo standard error, Q(old))`` over the same
        draws."""
        w, before = self._per_draw(structure, old, draws, weights, args, kwargs)
        _, after = self._per_draw(structure, new, draws, weights, args, kwargs)
        diff = after - before
        gain = jnp.sum(w * diff)
        return gain, jnp.sqrt(jnp.sum(w**2 * (diff - gain) ** 2)), jnp.sum(w * before)

    def _m_step(self, structure, params, draws, weights, args, kwargs, start=None):
        """``(new params, Q at params, gain, gain_se)``: ``m_step_iters`` optimizer steps
        on ``-Q`` in unconstrained coordinates for the params without a closed form,
        from ``start`` (params with the closed-form ones updated; default ``params``);
        they keep their values if ``Q`` would not rise."""
        new = self._optimized(structure, params, draws, weights, args, kwargs, start)
        gain, gain_se, q = self._gain(structure, params, new, draws, weights, args, kwargs)
        # Q at the params passed in (the optimizer starts from the closed-form update's).
        return new, q, gain, gain_se

    def _optimized(self, structure, params, draws, weights, args, kwargs, start=None):
        """The new params of `_m_step`, without its gain."""
        begin = params if start is None else start
        free = self._free_names(params, draws, args, kwargs)
        if not free:
            return begin
        transforms = {n: biject_to(structure.constraints[n]) for n in free}
        u0 = {n: transforms[n].inv(begin[n]) for n in free}
        scale = max(structure.num_observations, 1)

        def loss(u):
            p = {**begin, **{n: transforms[n](u[n]) for n in free}}
            return -self._q(structure, p, draws, weights, args, kwargs) / scale

        value_and_grad = (
            optax.value_and_grad_from_state(loss) if self.lbfgs else jax.value_and_grad(loss)
        )

        # Stop once the gradient is below the dtype's resolution: at a flat maximum a
        # line search only spends evaluations of Q (each over every stored draw).
        tol = jnp.sqrt(jnp.finfo(jnp.result_type(float)).eps)

        def body(carry):
            i, u, opt_state, _ = carry
            if self.lbfgs:
                value, grad = value_and_grad(u, state=opt_state)
            else:
                value, grad = value_and_grad(u)
            norm = optax.tree_utils.tree_norm(grad)
            updates, new_state = self.optimizer.update(
                grad, opt_state, u, value=value, grad=grad, value_fn=loss
            )
            moving = norm > tol
            u = tree_where(moving, optax.apply_updates(u, updates), u)
            return i + 1, u, tree_where(moving, new_state, opt_state), norm

        first = loss(u0)
        inf = jnp.array(jnp.inf, jnp.result_type(float))
        _, u, _, _ = jax.lax.while_loop(
            lambda c: (c[0] < self.m_step_iters) & (c[3] > tol),
            body,
            (jnp.zeros((), jnp.int32), u0, self.optimizer.init(u0), inf),
        )
        end = loss(u)
        better = jnp.isfinite(end) & all_finite(u) & (end <= first)
        u = tree_where(better, u, u0)
        return {**begin, **{n: transforms[n](u[n]) for n in free}}


def _num_chains(draws) -> int:
    """The chains of stored draws ``(slots, chains, ...)``."""
    return jax.tree.leaves(draws)[0].shape[1]
