"""Variational EM: the E-step maximizes the ELBO over a restricted family.

Generalized EM maximizes

.. math:: \\mathrm{ELBO}(q, \\theta) = E_q[\\log p(x, z \\mid \\theta)] + H(q)
          = \\log p(x \\mid \\theta) - \\mathrm{KL}(q \\,\\|\\, p(z \\mid x, \\theta)).

Exact EM sets q to the posterior. Here q is fully factorized over the latent
sites, one categorical per site (and per plate element):

* mean field (no guide): block coordinate ascent, each factor set to the
  softmax of the gradient of :math:`E_q[\\log p]` with respect to it. The
  expected log joint is a sum over the enumerated factor tensors of the model
  of ``<product of the q's of the factor's latents, log factor>``, so autodiff
  gives the update for any model, and latents that share no factor are updated
  together (a greedy colouring of the latent interaction graph);
* a user guide (e.g. amortized by a small network): its parameters take optax
  steps on the ELBO, whose expectation over the guide is computed exactly
  from the guide's enumerated probabilities (no score-function noise).

The M-step is exact EM's (closed form where detected, optax otherwise), fed
with the factor marginals of q instead of the posterior's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.scipy.special import entr
from numpyro.distributions.transforms import biject_to

from jaxem.arguments import merge_args, split_args
from jaxem.chain import find_chain
from jaxem.em import EM
from jaxem.estep import check_params_complete, contract_factors, site_posterior, structure_and_args
from jaxem.exceptions import ModelError
from jaxem.gradient import default_optimizer, init_opt_state, safeguarded_steps, stationarity
from jaxem.inspection import inspect_model, model_structure
from jaxem.loop import (
    best_restart,
    iterate,
    raise_for_gradient,
    run_compiled,
    stationary,
    upper_bound,
)
from jaxem.precision import broken_down, recheck_in_float64
from jaxem.tracing import enumerated_trace

__all__ = ["VariationalEM", "VEMState", "VEMResult", "elbo"]


class VEMState(NamedTuple):
    """What the variational EM loop carries from one iteration to the next.

    Attributes:
        params: ``{param name: constrained value}`` of the model.
        opt_state: optax state of the model's gradient-path parameters.
        q: ``{latent site: probabilities}``, the variational marginals, each
            with the site's plate shape in front and its values on the last
            axis (the layout of :func:`jaxem.posterior`).
        guide_params: ``{guide param name: constrained value}`` (empty without
            a guide).
        guide_opt_state: optax state of the guide parameters.
        iteration: number of updates done.
    """

    params: dict
    opt_state: Any
    q: dict
    guide_params: dict
    guide_opt_state: Any
    iteration: jax.Array


class VEMResult(NamedTuple):
    """Result of :meth:`VariationalEM.run`.

    Attributes:
        params: ``{param name: constrained value}`` of the best restart.
        elbo: the ELBO at ``params`` after a final E-step.
        history: shape ``(max_iter,)``: the ELBO after the E-step of every
            iteration of the best restart (at the iteration's starting
            parameters), NaN after ``num_iters``.
        num_iters: number of updates done.
        converged: whether the relative change of the ELBO fell below ``tol``
            and ``params`` are a stationary point of the ELBO at ``q`` (as
            :attr:`jaxem.EMResult.converged`).
        diverged: whether the run stopped on an ELBO or parameter that was
            not finite or not credible (as :attr:`jaxem.EMResult.diverged`);
            ``params`` are then the last ones before it. Also True when the
            exact ``log_likelihood`` of a float32 fit, evaluated again in
            float64, shows a density broken down in float32 (as for EM;
            ``log_likelihood`` is then the float64 value, ``elbo`` is not).
        log_likelihood: the exact marginal log-likelihood at ``params`` (at
            least ``elbo``), or None where exact enumeration was judged
            intractable or was switched off.
        q: the variational marginals at ``params`` (see :class:`VEMState`).
        guide_params: the guide's parameters (empty without a guide).
        restart_elbos: shape ``(num_restarts,)``: the final ELBO of every
            restart. The restart kept is the one with the highest ELBO among
            those that did not diverge.
        restart_converged: shape ``(num_restarts,)``: ``converged`` of every
            restart.
        restart_diverged: shape ``(num_restarts,)``: ``diverged`` of every
            restart.
        restart_num_iters: shape ``(num_restarts,)``: ``num_iters`` of every
            restart.
        gradient: ``{param name: gradient}``: the gradient of the ELBO at
            ``q`` with respect to the unconstrained value of every model param
            that is not frozen, at ``params`` (as :attr:`jaxem.EMResult.gradient`).
    """

    params: dict
    elbo: jax.Array
    history: jax.Array
    num_iters: jax.Array
    converged: jax.Array
    diverged: jax.Array
    log_likelihood: jax.Array | None
    q: dict
    guide_params: dict
    restart_elbos: jax.Array
    restart_converged: jax.Array
    restart_diverged: jax.Array
    restart_num_iters: jax.Array
    gradient: dict


# ---------------------------------------------------------------------------
# The ELBO of a factorized q, from the enumerated factors of the model.
# ---------------------------------------------------------------------------


def _own_dim(site):
    dims = [d for d, n in site.dim_to_name.items() if n == site.name]
    return dims[0] if dims else None


def _latents(trace):
    """Latent sites with more than one value (a single value needs no q)."""
    return [
        name
        for name, site in trace.sites.items()
        if not site.is_observed and _own_dim(site) is not None
    ]


def _to_factor_layout(probs, site):
    """A site's q, ``plate shape + (K,)``, laid out like the enumerated factors:
    K at the site's enumeration dim, the plate dims at theirs."""
    dim = _own_dim(site)
    plates = jnp.shape(probs)[:-1]
    gap = -dim - 1 - len(plates)
    return jnp.reshape(jnp.moveaxis(probs, -1, 0), probs.shape[-1:] + (1,) * gap + plates)


def _factor_weights(q, trace, names):
    """``{factor: product of the q's of the latents it is enumerated over}``."""
    laid_out = {j: _to_factor_layout(probs, trace.sites[j]) for j, probs in q.items()}
    weights = {}
    for name in names:
        weight = jnp.ones(())
        for latent in dict.fromkeys(trace.sites[name].dim_to_name.values()):
            if latent in laid_out:
                weight = weight * laid_out[latent]
        weights[name] = weight
    return weights


def _expected_log_joint(q, log_factors, trace, names=None):
    """:math:`E_q[\\log p] = \\sum_f \\langle \\prod_{j \\in f} q_j, \\log f \\rangle`."""
    names = list(trace.sites) if names is None else names
    total = 0.0
    for name, weight in _factor_weights(q, trace, names).items():
        log_factor = log_factors[name]
        # An impossible cell (log f = -inf) with q = 0 adds 0 and pushes the q
        # update away from it; with -inf itself both would be NaN.
        log_factor = jnp.maximum(log_factor, jnp.finfo(jnp.result_type(log_factor)).min)
        total = total + jnp.sum(weight * log_factor)
    return total


def _entropy(q):
    return sum(jnp.sum(entr(probs)) for probs in q.values())


def _elbo(q, log_factors, trace):
    return _expected_log_joint(q, log_factors, trace) + _entropy(q)


def _factor_marginals(q, log_factors, trace):
    """The marginals of q over each factor's cells, shaped like the factor (the
    gradient of ``E_q[log p]`` with respect to the log-factors, as exact EM's
    marginals are the gradient of the log-likelihood)."""
    weights = _factor_weights(q, trace, list(trace.sites))
    return jax.grad(lambda logs: sum(jnp.sum(weights[name] * logs[name]) for name in logs))(
        log_factors
    )


def _reject_chains(trace, what):
    """A factorized q cannot represent a Markov chain written with ``scan``: its
    steps are one stacked site, which would get one q for all time steps."""
    chain = find_chain(trace)
    if chain is not None:
        raise ModelError(
            f"jaxem: {what} does not support the Markov chain of site '{chain.name}' written "
            "with numpyro's scan: a factorized q would give all its time steps one factor. Use "
            "jaxem.EM, whose E-step is exact for chains (the forward-backward algorithm), or "
            "write the chain as a Python loop under numpyro.contrib.funsor.markov (one latent "
            "site per step)."
        )


def _uniform_q(trace):
    q = {}
    for name in _latents(trace):
        site = trace.sites[name]
        shape = jnp.shape(site_posterior(site, site.log_prob))
        q[name] = jnp.full(shape, 1.0 / shape[-1], jnp.result_type(site.log_prob))
    return q


def _interactions(trace, latents):
    """``{latent: latents sharing a factor with it}``."""
    neighbours = {j: set() for j in latents}
    for site in trace.sites.values():
        involved = [n for n in site.dim_to_name.values() if n in neighbours]
        for a in involved:
            neighbours[a].update(b for b in involved if b != a)
    return neighbours


def _colour(trace):
    """Groups of latents that share no factor, greedily in model order: the
    ELBO is linear in each q_j given the others, so a whole group is updated
    at once and every update is exact coordinate ascent."""
    latents = _latents(trace)
    neighbours = _interactions(trace, latents)
    colour_of: dict = {}
    for j in latents:
        used = {colour_of[n] for n in neighbours[j] if n in colour_of}
        colour_of[j] = min(set(range(len(used) + 1)) - used)
    groups = [[] for _ in range(max(colour_of.values(), default=-1) + 1)]
    for j in latents:
        groups[colour_of[j]].append(j)
    return groups


def _coordinate_ascent(q, log_factors, trace, num_sweeps):
    """Mean-field E-step: ``num_sweeps`` sweeps over the groups of :func:`_colour`."""
    groups = _colour(trace)
    if len(groups) <= 1:
        num_sweeps = 1  # latents that share no factor: one sweep is the optimum
    touching = [
        [n for n, site in trace.sites.items() if set(group) & set(site.dim_to_name.values())]
        for group in groups
    ]

    def sweep(_, q):
        for group, names in zip(groups, touching):

            def partial_elj(sub, q=q, names=names):
                return _expected_log_joint({**q, **sub}, log_factors, trace, names)

            grads = jax.grad(partial_elj)({j: q[j] for j in group})
            q = {**q, **{j: jax.nn.softmax(g, axis=-1) for j, g in grads.items()}}
        return q

    return jax.lax.fori_loop(0, num_sweeps, sweep, q)


def _tractable(trace, max_cells):
    """Whether exact enumeration stays below ``max_cells`` cells per plate
    element: greedy (min-size) variable elimination on the latent graph."""
    sizes = {n: trace.sites[n].log_prob.shape[_own_dim(trace.sites[n])] for n in _latents(trace)}
    neighbours = _interactions(trace, list(sizes))
    while neighbours:

        def cost(j):
            return int(np.prod([sizes[n] for n in neighbours[j] | {j}], dtype=float))

        j = min(neighbours, key=cost)
        if cost(j) > max_cells:
            return False
        for n in neighbours[j]:
            neighbours[n] |= neighbours[j] - {n}
            neighbours[n].discard(j)
        del neighbours[j]
    return True


# ---------------------------------------------------------------------------
# Guides.
# ---------------------------------------------------------------------------


def _guide_q(guide, guide_params, args, kwargs, nesting, model_trace):
    """The guide's marginals and their logarithms, by enumerating its sites
    (checked against the model)."""
    gtrace = enumerated_trace(guide, guide_params, args, kwargs, nesting)
    latents = _latents(model_trace)
    observed = [n for n, s in gtrace.sites.items() if s.is_observed]
    guide_latents = [n for n, s in gtrace.sites.items() if not s.is_observed]
    if observed:
        raise ModelError(
            f"jaxem: the guide observes site(s) {observed}. A guide samples the model's "
            "latent sites only: remove obs=... from the guide."
        )
    missing = [n for n in latents if n not in guide_latents]
    extra = [n for n in guide_latents if n not in model_trace.sites]
    if missing or extra:
        raise ModelError(
            f"jaxem: the guide must sample exactly the model's latent sites {latents}; it "
            f"misses {missing} and has {extra} which the model does not sample."
        )
    q, log_q = {}, {}
    for name in latents:
        site = gtrace.sites[name]
        others = [n for n in site.dim_to_name.values() if n != name and n not in site.plates]
        if others:
            raise ModelError(
                f"jaxem: guide site '{name}' depends on the guide's latent site(s) {others}. "
                "VariationalEM's guides are factorized: each site's distribution may depend on "
                "the data and the guide's params only (compute it from those)."
            )
        probs = site_posterior(site, jnp.exp(site.log_prob))
        expected = jnp.shape(
            site_posterior(model_trace.sites[name], model_trace.sites[name].log_prob)
        )
        if jnp.shape(probs) != expected:
            raise ModelError(
                f"jaxem: guide site '{name}' has marginals of shape {jnp.shape(probs)} (plates, "
                f"values) but the model's site has {expected}. Use the model's plates and "
                "distribution support for the guide's site."
            )
        q[name], log_q[name] = probs, site_posterior(site, site.log_prob)
    return q, log_q


def _guide_elbo(q, log_q, log_factors, trace):
    # The entropy from the guide's log-probabilities: entr(q) has an infinite
    # derivative where a probability underflows to 0.
    entropy = -sum(jnp.sum(q[n] * jnp.where(q[n] > 0, log_q[n], 0.0)) for n in q)
    return _expected_log_joint(q, log_factors, trace) + entropy


# ---------------------------------------------------------------------------
# VariationalEM.
# ---------------------------------------------------------------------------


class VariationalEM:
    """Variational EM: the ELBO over a factorized q and the parameters.

    Same interface as :class:`jaxem.EM`; the objective is the ELBO, a lower
    bound of the log-likelihood that equals it when q is the posterior. With
    ``guide=None``, q is mean field (one categorical per latent site and plate
    element) updated by coordinate ascent; with a guide, q is the guide's
    distribution and its parameters take optax steps on the ELBO. Each
    iteration does an E-step (ELBO up in q), then exact EM's M-step with the
    marginals of q (ELBO up in the parameters), so the ELBO never decreases.

    Args:
        model: a NumPyro model with ``numpyro.param`` sites and discrete latents.
        guide: None for mean field, or a NumPyro guide with the model's
            arguments, sampling every latent site of the model from a
            distribution with the same support and plates, which may depend
            on the data and on the guide's own ``numpyro.param`` sites but
            not on the other latents (its expectations are computed exactly
            by enumerating each site).
        e_step_iters: coordinate-ascent sweeps (mean field; one when no two
            latents share a factor, where one sweep is the optimum) or
            optimizer steps on the guide parameters per iteration.
        guide_optimizer: optax optimizer for the guide; default ``optax.lbfgs()``.
        m_step, optimizer, m_step_iters, reg_covar, frozen: the M-step, as in
            :class:`jaxem.EM`.
        exact_log_likelihood: ``"auto"`` reports the exact log-likelihood at
            the final parameters in :class:`VEMResult` when exact enumeration
            needs at most ``2**20`` cells per plate element; True always,
            False never.

    Examples:
        >>> import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist
        >>> from numpyro.distributions import constraints
        >>> from jaxem import VariationalEM
        >>> def mixture(x, K=2):
        ...     w = numpyro.param("w", jnp.ones(K) / K, constraint=constraints.simplex)
        ...     mu = numpyro.param("mu", jnp.array([-1.0, 1.0]))
        ...     sigma = numpyro.param("sigma", jnp.ones(K), constraint=constraints.positive)
        ...     with numpyro.plate("data", x.shape[0]):
        ...         z = numpyro.sample("z", dist.Categorical(w))
        ...         numpyro.sample("x", dist.Normal(mu[z], sigma[z]), obs=x)
        >>> noise = jnp.tile(jnp.array([-0.5, 0.5]), 50)
        >>> x = jnp.concatenate([jnp.full(50, -3.0), jnp.full(50, 3.0)]) + noise
        >>> result = VariationalEM(mixture).run(jax.random.PRNGKey(0), x, max_iter=50)
        >>> [round(float(m), 3) for m in result.params["mu"]]
        [-3.0, 3.0]
        >>> bool(jnp.isclose(result.elbo, result.log_likelihood))  # mean field is exact here
        True
    """

    def __init__(
        self,
        model: Callable,
        guide: Callable | None = None,
        *,
        e_step_iters: int = 5,
        guide_optimizer: optax.GradientTransformation | None = None,
        m_step: str = "auto",
        optimizer: optax.GradientTransformation | None = None,
        m_step_iters: int = 10,
        reg_covar: float = 1e-6,
        frozen: Sequence[str] = (),
        exact_log_likelihood: bool | str = "auto",
    ):
        if e_step_iters < 1:
            raise ValueError(f"e_step_iters must be at least 1, got {e_step_iters}")
        if exact_log_likelihood not in ("auto", True, False):
            raise ValueError(
                f"exact_log_likelihood must be 'auto', True or False, got {exact_log_likelihood!r}"
            )
        # Exact EM's M-step machinery (planning, validation, initial values).
        self._em = EM(
            model,
            m_step=m_step,
            optimizer=optimizer,
            m_step_iters=m_step_iters,
            reg_covar=reg_covar,
            frozen=frozen,
        )
        self.model = model
        self.guide = guide
        self.e_step_iters = int(e_step_iters)
        self.guide_optimizer = optax.with_extra_args_support(guide_optimizer or default_optimizer())
        self.exact_log_likelihood = exact_log_likelihood
        self._update_jit = jax.jit(self._update_arrays, static_argnums=(2,))
        self._initial_gradient_jit = jax.jit(self._initial_gradient, static_argnums=(2,))
        self._run_jit = jax.jit(
            self._run_arrays, static_argnames=("spec", "max_iter", "num_restarts", "progress_bar")
        )

    # -- building blocks -----------------------------------------------------

    def _guide_structure(self, rng_key, args, kwargs, model_params):
        try:
            structure, params = inspect_model(self.guide, rng_key, args, kwargs)
        except ModelError as err:
            raise ModelError(f"jaxem: in the guide: {err}") from err
        clash = sorted(set(params) & set(model_params))
        if clash:
            raise ModelError(
                f"jaxem: the guide's params {clash} have the names of model params. Give the "
                "guide's params their own names."
            )
        return structure, params

    def _e_step(self, state, args, kwargs, structure, guide_constraints):
        """ELBO-maximizing q at ``state.params``: ``(state, elbo, marginals, trace)``."""
        nesting = structure.max_plate_nesting
        trace = enumerated_trace(self.model, state.params, args, kwargs, nesting)
        _reject_chains(trace, "VariationalEM")
        log_factors = {n: jax.lax.stop_gradient(s.log_prob) for n, s in trace.sites.items()}
        if self.guide is None:
            q = _coordinate_ascent(state.q, log_factors, trace, self.e_step_iters)
            state = state._replace(q=q)
        else:
            names = list(state.guide_params)
            transforms = {n: biject_to(guide_constraints[n]) for n in names}

            def constrained(unconstrained):
                return {n: transforms[n](u) for n, u in unconstrained.items()}

            def loss(unconstrained):
                guide_params = constrained(unconstrained)
                q, log_q = _guide_q(self.guide, guide_params, args, kwargs, nesting, trace)
                return -_guide_elbo(q, log_q, log_factors, trace)

            start = {n: transforms[n].inv(state.guide_params[n]) for n in names}
            chosen, guide_opt_state = safeguarded_steps(
                loss, start, self.guide_optimizer, state.guide_opt_state, self.e_step_iters
            )
            guide_params = constrained(chosen)
            q, _ = _guide_q(self.guide, guide_params, args, kwargs, nesting, trace)
            state = state._replace(q=q, guide_params=guide_params, guide_opt_state=guide_opt_state)
        return (
            state,
            _elbo(state.q, log_factors, trace),
            _factor_marginals(state.q, log_factors, trace),
            trace,
        )

    def _guide_constraints(self, args, kwargs):
        if self.guide is None:
            return {}
        structure, _ = inspect_model(self.guide, jax.random.PRNGKey(0), args, kwargs)
        return structure.constraints

    def _init_arrays(self, rng_key, arrays, spec, init_params):
        structure, params = self._em._initial_params(rng_key, arrays, spec, init_params)
        plan = self._em._plan(params, arrays, spec, structure)
        opt_state = init_opt_state(self._em.optimizer, params, structure.constraints, plan)
        args, kwargs = merge_args(arrays, spec)
        nesting = structure.max_plate_nesting
        trace = enumerated_trace(self.model, params, args, kwargs, nesting)
        _reject_chains(trace, "VariationalEM")
        if self.guide is None:
            return VEMState(params, opt_state, _uniform_q(trace), {}, (), jnp.zeros((), jnp.int32))
        guide_structure, guide_params = self._guide_structure(
            jax.random.fold_in(rng_key, 1), args, kwargs, params
        )
        q, _ = _guide_q(self.guide, guide_params, args, kwargs, nesting, trace)
        guide_opt_state = self.guide_optimizer.init(
            {n: biject_to(guide_structure.constraints[n]).inv(v) for n, v in guide_params.items()}
        )
        return VEMState(
            params, opt_state, q, guide_params, guide_opt_state, jnp.zeros((), jnp.int32)
        )

    def _update_arrays(self, state, arrays, spec):
        args, kwargs = merge_args(arrays, spec)
        structure = model_structure(self.model, args, kwargs)
        state, value, marginals, trace = self._e_step(
            state, args, kwargs, structure, self._guide_constraints(args, kwargs)
        )
        plan = self._em._plan(state.params, arrays, spec, structure)
        params, opt_state = self._em._m_step(
            state.params, state.opt_state, marginals, plan, args, kwargs, structure, trace
        )
        new_state = state._replace(
            params=params, opt_state=opt_state, iteration=state.iteration + 1
        )
        return new_state, value

    def _final(self, state, arrays, spec):
        """ELBO after a last E-step at the final params, and ``(state, exact
        log-likelihood, factor marginals of q)``."""
        args, kwargs = merge_args(arrays, spec)
        structure = model_structure(self.model, args, kwargs)
        state, value, marginals, trace = self._e_step(
            state, args, kwargs, structure, self._guide_constraints(args, kwargs)
        )
        exact = self.exact_log_likelihood
        if exact == "auto":
            exact = _tractable(trace, 2**20)
        log_lik = None
        if exact:
            log_lik = contract_factors({n: s.log_prob for n, s in trace.sites.items()}, trace)
        return value, (state, log_lik, marginals)

    def _fit_one(self, rng_key, arrays, init_params, tol, spec, max_iter, progress_bar):
        args, kwargs = merge_args(arrays, spec)
        structure = model_structure(self.model, args, kwargs)
        nesting = structure.max_plate_nesting
        start = self._init_arrays(rng_key, arrays, spec, init_params)
        loop = iterate(
            lambda state: self._update_arrays(state, arrays, spec),
            start,
            lambda state: (state.params, state.q, state.guide_params),
            final_fn=lambda state: self._final(state, arrays, spec),
            max_iter=max_iter,
            tol=tol,
            progress_bar=progress_bar,
            upper_bound=upper_bound(
                enumerated_trace(self.model, start.params, args, kwargs, nesting, log_probs=False)
            ),
        )
        dtype = loop.history.dtype
        last, log_lik, marginals = loop.aux
        if log_lik is not None:
            log_lik = log_lik.astype(dtype)
        free = [n for n in structure.param_names if n not in self._em.frozen]
        gradient, gain = stationarity(
            self.model, last.params, marginals, free, structure.constraints, args, kwargs, nesting
        )
        converged = loop.converged & stationary(gain, loop.value, tol)
        return VEMResult(
            last.params,
            loop.value,
            loop.history,
            loop.num_iters,
            converged,
            loop.diverged,
            log_lik,
            last.q,
            last.guide_params,
            loop.value,
            converged,
            loop.diverged,
            loop.num_iters,
            gradient,
        )

    def _run_arrays(
        self, rng_key, arrays, init_params, tol, *, spec, max_iter, num_restarts, progress_bar
    ):
        def fit(key):
            return self._fit_one(key, arrays, init_params, tol, spec, max_iter, progress_bar)

        result, fits = best_restart(
            fit, rng_key, num_restarts, lambda r: r.elbo, lambda r: r.diverged
        )
        return result._replace(
            restart_elbos=fits.elbo,
            restart_converged=fits.converged,
            restart_diverged=fits.diverged,
            restart_num_iters=fits.num_iters,
        )

    def _check_fit(self, result, arrays, spec):
        """After ``run``: exact EM's ModelError for gradient-path params whose gradient
        is not finite at the returned params, then the float32 exact log-likelihood (when
        reported) checked in float64; the result, updated."""
        args, kwargs = merge_args(arrays, spec)
        raise_for_gradient(
            result.gradient,
            self.m_step_paths(*args, **kwargs),
            objective="ELBO",
            at="at the values the fit stopped at (the initial values if they never moved)",
        )
        if result.log_likelihood is None:
            return result
        exact = recheck_in_float64(
            self.model, result.params, result.log_likelihood, arrays, spec, name="VariationalEM"
        )
        return result if exact is None else broken_down(result, exact, "restart_elbos", "elbo")

    def _initial_gradient(self, state, arrays, spec):
        """The gradient of the ELBO in the model params at ``state`` (q held)."""
        args, kwargs = merge_args(arrays, spec)
        structure = model_structure(self.model, args, kwargs)
        nesting = structure.max_plate_nesting
        trace = enumerated_trace(self.model, state.params, args, kwargs, nesting)
        log_factors = {n: jax.lax.stop_gradient(s.log_prob) for n, s in trace.sites.items()}
        free = [n for n in structure.param_names if n not in self._em.frozen]
        gradient, _ = stationarity(
            self.model,
            state.params,
            _factor_marginals(state.q, log_factors, trace),
            free,
            structure.constraints,
            args,
            kwargs,
            nesting,
        )
        return gradient

    # -- public API ----------------------------------------------------------

    def init(self, rng_key, *args, init_params=None, **kwargs) -> VEMState:
        """Initial state: model params from their ``numpyro.param`` initial values,
        q uniform (mean field) or the guide's at its initial params.

        Args:
            rng_key: PRNG key passed to callable initial values.
            *args, **kwargs: the model's (and the guide's) arguments.
            init_params: optional ``{param name: constrained value}`` overriding
                some or all of the model's initial values.

        Returns:
            A :class:`VEMState`.
        """
        arrays, spec = split_args(args, kwargs)
        self._em._validate(rng_key, arrays, spec, init_params)
        state = self._init_arrays(rng_key, arrays, spec, init_params)
        # As EM.init: the error run gives where it stops, here at the initial values.
        paths = self.m_step_paths(*args, **kwargs)
        if any(p.startswith("gradient") for p in paths.values()):
            gradient = self._initial_gradient_jit(state, arrays, spec)
            raise_for_gradient(gradient, paths, objective="ELBO", at="at the initial values")
        return state

    def update(self, state: VEMState, *args, **kwargs):
        """One variational EM iteration (compiled once per argument shape).

        As :meth:`jaxem.EM.update`, it makes none of ``run``'s checks.

        Returns:
            ``(new_state, elbo)``, the ELBO being the one after this
            iteration's E-step, at the parameters of ``state``.
        """
        arrays, spec = split_args(args, kwargs)
        return self._update_jit(state, arrays, spec)

    def get_params(self, state: VEMState) -> dict:
        """Constrained model parameter values ``{param name: value}`` of a state."""
        return dict(state.params)

    def run(
        self,
        rng_key,
        *args,
        max_iter: int = 100,
        tol: float = 1e-5,
        num_restarts: int = 1,
        init_params: dict | None = None,
        progress_bar: bool = False,
        **kwargs,
    ) -> VEMResult:
        """Run variational EM to convergence inside one compiled ``lax.while_loop``.

        Restarts run under ``vmap`` and the best final ELBO is kept.

        Args:
            rng_key: PRNG key; split into one key per restart.
            *args, **kwargs: the model's arguments.
            max_iter: maximum number of iterations.
            tol: stop when ``|elbo_t - elbo_{t-1}| <= tol * |elbo_t|``; 0 runs
                exactly ``max_iter`` iterations.
            num_restarts: number of restarts.
            init_params: ``{param name: constrained value}`` overriding the
                initial values of some model parameters in every restart.
            progress_bar: show a tqdm progress bar (iterations done).

        Returns:
            A :class:`VEMResult`.
        """
        return run_compiled(
            self._run_jit,
            self._em._validate,
            rng_key,
            args,
            kwargs,
            max_iter=max_iter,
            tol=tol,
            num_restarts=num_restarts,
            init_params=init_params,
            progress_bar=progress_bar,
            desc="VEM",
            objective="ELBO",
            check_fn=self._check_fit,
        )

    def m_step_paths(self, *args, **kwargs) -> dict:
        """How each model parameter is updated, as :meth:`jaxem.EM.m_step_paths`."""
        return self._em.m_step_paths(*args, **kwargs)


# ---------------------------------------------------------------------------
# The ELBO as a function.
# ---------------------------------------------------------------------------


@partial(jax.jit, static_argnums=(0, 4))
def _elbo_jit(model, params, q, arrays, spec):
    structure, args, kwargs = structure_and_args(model, arrays, spec)
    check_params_complete(structure, params)
    trace = enumerated_trace(model, params, args, kwargs, structure.max_plate_nesting)
    _reject_chains(trace, "jaxem.elbo")
    latents = _latents(trace)
    if sorted(q) != sorted(latents):
        raise ValueError(
            f"jaxem: q must give marginals for the latent sites {latents}, got {sorted(q)}."
        )
    for name in latents:
        site = trace.sites[name]
        expected = jnp.shape(site_posterior(site, site.log_prob))
        if jnp.shape(q[name]) != expected:
            raise ValueError(
                f"jaxem: q['{name}'] has shape {jnp.shape(q[name])}, expected {expected} (the "
                "site's plate shape, then its number of values)."
            )
    return _elbo(q, {n: s.log_prob for n, s in trace.sites.items()}, trace)


def elbo(model, params, q, *args, **kwargs):
    """The ELBO of a factorized q: :math:`E_q[\\log p(x, z)] + H(q)`.

    Computed exactly from the model's enumerated factors (no sampling).

    Args:
        model: a NumPyro model with ``numpyro.param`` sites and discrete latents.
        params: ``{param name: constrained value}``.
        q: ``{latent site: probabilities}``, each shaped like the site's entry
            of :func:`jaxem.posterior` (plate shape, then the site's values);
            latents with a single value take no entry.
        *args, **kwargs: the model's arguments.

    Returns:
        Scalar ELBO, at most :func:`jaxem.log_likelihood`, with equality when
        q is the posterior and the posterior factorizes (mixtures).

    Examples:
        >>> import jax.numpy as jnp, numpyro, numpyro.distributions as dist
        >>> import jaxem
        >>> def model(x):
        ...     w = numpyro.param("w", jnp.array([0.5, 0.5]))
        ...     with numpyro.plate("data", x.shape[0]):
        ...         z = numpyro.sample("z", dist.Categorical(w))
        ...         numpyro.sample("x", dist.Normal(jnp.array([-1.0, 1.0])[z], 1.0), obs=x)
        >>> params, x = {"w": jnp.array([0.5, 0.5])}, jnp.zeros(3)
        >>> q = jaxem.posterior(model, params, x)
        >>> round(float(jaxem.elbo(model, params, q, x)), 4)
        -4.2568
    """
    arrays, spec = split_args(args, kwargs)
    return _elbo_jit(model, dict(params), dict(q), arrays, spec)
