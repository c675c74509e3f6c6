"""Variational Bayes EM: a posterior over the global sites, not a point.

Mean field q(theta) q(z) for a conjugate-exponential model (Beal 2003; Bishop,
PRML 10.2): each global site's q is in its prior's family
(`jaxem.expected_log`), and the discrete latents keep the exact
enumerated posterior given q(theta) (a chain's stays a chain's).

One iteration, at q(theta) with moments ``M = E_q[T(theta)]``:

* VB-E-step: the model's enumerated factors, with each factor that reads a
  global site replaced by its expectation under q (``E log w_z`` for
  ``Categorical(w)``, ...), contracted by the E-step's sum-product:
  ``log Z_q(M) = log sum_z exp E_q(theta)[log p(x, z | theta)]``; its gradient
  with respect to the factors is q(z)'s factor marginals.
* VB-M-step: every expected factor is linear in ``M``, so
  ``d log Z_q / d M`` is the expected sufficient statistics, and the optimal
  q(theta) has natural parameters ``prior's + d log Z_q / d M``.

The ELBO at q(theta), with q(z) optimal for it, is
``log Z_q(M) - sum_sites KL(q(theta_s) || p(theta_s))`` (exact); coordinate
ascent never lowers it.

With ``latents="mean_field"``, q(z) is a product over the latent sites (and
plate elements) instead, as in `jaxem.VariationalEM`: the VB-E-step is the
mean-field coordinate ascent of `jaxem.factorized` on the expected factors, the
ELBO ``E_q[log p] + H(q(z)) - KL`` and the statistics its gradient in ``M``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxem import vb_posterior
from jaxem.arguments import merge_args, split_args
from jaxem.built import built_model
from jaxem.estep import contract_factors, e_step, latent_posteriors
from jaxem.factorized import coordinate_ascent, elbo_of, factor_marginals, uniform_q
from jaxem.fit_warnings import warn_about_vb_fit
from jaxem.fitter_m_step import describe_plan
from jaxem.global_sites import with_global_sites
from jaxem.gradient import default_optimizer
from jaxem.inspection import model_structure
from jaxem.kernel import StepInfo
from jaxem.loop import (
    check_initial_values,
    initial_params,
    iterate,
    loop_key,
    run_with_progress,
    stationary,
)
from jaxem.vb_pairs import PAIRS
from jaxem.vb_params import VBParams
from jaxem.vb_plan import build_plan
from jaxem.vb_powers import select_moments
from jaxem.vb_sites import core_args, expected_site_log_prob
from jaxem.vb_types import VBPlan, VBResult, VBState

__all__ = ["VariationalBayesEM", "VBState", "VBResult"]


class VariationalBayesEM:
    """Variational Bayes EM: mean-field q(theta) q(z) for conjugate-exponential models.

    Every ``numpyro.sample`` site named in ``global_sites`` gets a variational
    posterior in its prior's family; the discrete latents are enumerated
    exactly given q(theta). Supported conjugate pairs: a Dirichlet prior on a
    Categorical's or Multinomial's ``probs``, a Beta prior on a Bernoulli's or
    Binomial's ``probs`` (counts fixed), a Gamma prior on a Poisson's or an
    Exponential's ``rate``, a Wishart (InverseWishart) prior on a known-mean
    MultivariateNormal's ``precision_matrix`` (``covariance_matrix``), a Normal prior on
    a Normal's ``loc`` (its scale known), a Gamma prior on a Normal's precision ``tau``
    (scale ``1 / jnp.sqrt(tau[z])``, its loc known) or an InverseGamma prior on its
    variance ``v`` (scale ``jnp.sqrt(v[z])``), independent priors on both (mean field,
    `jaxem.normal_mean_field`), the Normal-Gamma pair of a Normal's ``loc`` and
    precision (`jaxem.normal_gamma`), and the Normal-Wishart pair of a
    MultivariateNormal's ``loc`` and ``precision_matrix`` (`jaxem.normal_wishart`). The
    model's ``numpyro.param`` sites are point values that maximize the ELBO with q
    held (`jaxem.vb_params`: ``result.params``). The ELBO is exact and never decreases.

    Args:
        model: a NumPyro model whose parameters are sample sites with priors (and
            ``numpyro.param`` sites, fitted as point values).
        global_sites: names of those sample sites.
        latents: ``"exact"`` (default): q(z) is the exact posterior of the
            latents given q(theta) (a chain's by forward-backward).
            ``"mean_field"``: q(z) is a product of one categorical per latent
            site and plate element, updated by `jaxem.VariationalEM`'s
            mean-field coordinate ascent (cheaper where exact enumeration of
            coupled latents is not; a ``scan`` chain is an error, as there).
        e_step_iters: with ``"mean_field"``, coordinate-ascent sweeps over the
            latents per iteration, as in `jaxem.VariationalEM` (one when no two
            latents share a factor, where one sweep is the optimum).
        optimizer, m_step_iters, reg_covar: the M-step of the model's
            ``numpyro.param`` sites, point values that maximize the ELBO with q held
            (`jaxem.vb_params`; `m_step_paths` says how each is updated): as in
            [`jaxem.EM`][jaxem.EM].

    Examples:
        >>> import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist
        >>> from jaxem import VariationalBayesEM
        >>> def model(x, K=2):
        ...     w = numpyro.sample("w", dist.Dirichlet(jnp.ones(K)))
        ...     with numpyro.plate("components", K):
        ...         lam = numpyro.sample("lam", dist.Gamma(1.0, 0.1))
        ...     with numpyro.plate("data", x.shape[0]):
        ...         z = numpyro.sample("z", dist.Categorical(w))
        ...         numpyro.sample("x", dist.Poisson(lam[z]), obs=x)
        >>> x = jnp.array([0.0, 1.0, 0.0, 9.0, 11.0, 10.0])
        >>> fit = VariationalBayesEM(model, global_sites=("w", "lam")).run(
        ...     jax.random.PRNGKey(0), x)
        >>> sorted(round(float(m), 1) for m in fit.posteriors["lam"].mean)
        [0.6, 10.0]
    """

    name = "VariationalBayesEM"
    objective = "ELBO"

    def __init__(
        self,
        model: Callable,
        *,
        global_sites: Sequence[str],
        latents: str = "exact",
        e_step_iters: int = 5,
        optimizer: optax.GradientTransformation | None = None,
        m_step_iters: int = 10,
        reg_covar: float = 1e-6,
    ):
        if latents not in ("exact", "mean_field"):
            raise ValueError(
                f"jaxem: VariationalBayesEM's latents must be 'exact' (the latents' exact "
                f"posterior given q(theta)) or 'mean_field' (one factor per latent site), "
                f"got {latents!r}."
            )
        if e_step_iters < 1:
            raise ValueError(f"e_step_iters must be at least 1, got {e_step_iters}")
        self.latents = latents
        self.e_step_iters = int(e_step_iters)
        self.global_sites = tuple(global_sites)
        if not self.global_sites:
            raise ValueError(
                "jaxem: VariationalBayesEM needs global_sites=(...), the sample sites that "
                "are parameters with priors."
            )
        self.model = built_model(with_global_sites(model, self.global_sites))
        self.params_step = VBParams(
            self.model,
            self.global_sites,
            optimizer=optax.with_extra_args_support(optimizer or default_optimizer()),
            num_steps=m_step_iters,
            reg_covar=reg_covar,
        )
        self._plans: dict = {}
        self._update_jit = jax.jit(self._update, static_argnums=(2,))
        self._init_jit = jax.jit(self._init_state, static_argnums=(2,))
        self._run_jit = jax.jit(self._run, static_argnames=("spec", "max_iter", "progress_bar"))

    # -- the plan: which site reads which global site (Python, concrete) --------

    def _plan(self, arrays, spec, rng_key=None) -> VBPlan:
        key = (spec, tuple((jnp.shape(a), jnp.result_type(a)) for a in arrays))
        if key in self._plans:
            return self._plans[key]
        if any(isinstance(a, jax.core.Tracer) for a in arrays):
            raise ValueError("jaxem: VariationalBayesEM.run/init takes concrete arrays")
        rng_key = jax.random.PRNGKey(0) if rng_key is None else rng_key
        plan, seeded, structure = build_plan(
            self.model, self.global_sites, self.latents, arrays, spec, rng_key
        )
        plan = plan._replace(
            param_paths=self.params_step.route(plan, seeded, structure, arrays, spec)
        )
        self._families = plan.families
        self._groups = plan.groups
        self._plans[key] = plan
        return plan

    # -- one iteration ----------------------------------------------------------

    def _factors(self, moments, point, arrays, spec, plan, params):
        """The enumerated trace at ``point`` (values of the global sites) and
        ``params`` (of the ``numpyro.param`` sites) and its factors, each factor that
        reads a global site replaced by its expectation given the moments ``M``
        (``{global site: tuple of arrays}``), the global sites' own (prior) factors
        by zeros."""
        args, kwargs = merge_args(arrays, spec)
        trace = self.model.enumerated_trace({**params, **point}, args, kwargs, plan.nesting)
        num = max(len(m) for m in moments.values())

        def site_args(vals):
            tr = self.model.enumerated_trace(
                {**params, **vals}, args, kwargs, plan.nesting, log_probs=False
            )
            return {s: core_args(tr, site)[1] for s, site in tr.sites.items()}

        selected = []
        for j in range(num):
            vals = {n: m[min(j, len(m) - 1)] for n, m in moments.items()}
            selected.append(select_moments(site_args, vals, plan.powers))
        factors = {}
        for name, site in trace.sites.items():
            if name in self.global_sites:
                factors[name] = jnp.zeros_like(site.log_prob)
            elif name in plan.nw_readers:
                pair = PAIRS[type(plan.nw_readers[name])]
                loc = tuple(selected[j][name]["loc"] for j in range(2))
                precision = tuple(selected[j][name][pair.precision_arg] for j in range(2))
                lp = expected_site_log_prob(
                    site.fn,
                    site.value,
                    lambda v, a=loc, p=precision, e=pair.expected: e(v, a, p),
                )
                factors[name] = jnp.broadcast_to(lp, jnp.shape(site.log_prob))
            elif name in plan.readers:
                reader = plan.readers[name]
                _, arguments = core_args(trace, site)
                count = len(moments[reader.source])
                sel = (
                    tuple(selected[j][name][reader.argument] for j in range(count))
                    if reader.selected
                    else moments[reader.source]  # the weights of stick-breaking Beta sticks
                )
                lp = expected_site_log_prob(
                    site.fn, site.value, lambda v, a=arguments, s=sel, r=reader: r.expected(a, v, s)
                )
                factors[name] = jnp.broadcast_to(lp, jnp.shape(site.log_prob))
            else:
                # Reads no global site: a function of the params only.
                factors[name] = site.log_prob
        return trace, factors

    def _e_step(self, q, q_latents, arrays, spec, plan, params):
        """``(log Z_q, d log Z_q / dM, factor marginals, expected factors, trace,
        q_latents)``; with mean field, ``E_q[log p] + H(q(z))`` in place of ``log Z_q``."""
        moments = vb_posterior.moments(q, plan)
        # Any point in the support gives the factors that read no global site.
        point = vb_posterior.point(q, plan)
        if self.latents == "mean_field":
            return self._mean_field_e_step(moments, point, q_latents, arrays, spec, plan, params)

        def log_z(moments, factors_delta):
            trace, factors = self._factors(moments, point, arrays, spec, plan, params)
            factors = {n: f + factors_delta[n] for n, f in factors.items()}
            return contract_factors(factors, trace), (factors, trace)

        trace, factors = self._factors(moments, point, arrays, spec, plan, params)
        zeros = {n: jnp.zeros_like(f) for n, f in factors.items()}
        (value, (factors, trace)), (stats, marginals) = jax.value_and_grad(
            log_z, argnums=(0, 1), has_aux=True
        )(moments, zeros)
        return value, stats, marginals, factors, trace, q_latents

    def _mean_field_e_step(self, moments, point, q_latents, arrays, spec, plan, params):
        """Coordinate ascent in q(z) on the expected factors, then ``E_q[log p] +
        H(q(z))`` at the new q(z), its gradient in the moments (the expected
        statistics: the expected factors are linear in them) and q's factor marginals."""
        trace, factors = self._factors(moments, point, arrays, spec, plan, params)
        factors = jax.lax.stop_gradient(factors)
        q_latents = coordinate_ascent(q_latents, factors, trace, self.e_step_iters)

        def bound(moments):
            _, expected = self._factors(moments, point, arrays, spec, plan, params)
            return elbo_of(q_latents, expected, trace)

        value, stats = jax.value_and_grad(bound)(moments)
        marginals = factor_marginals(q_latents, factors, trace)
        return value, stats, marginals, factors, trace, q_latents

    # -- per family: single sites by `PRIOR_FAMILIES`, pairs by `vb_pairs.PAIRS` ------

    def _stats_at(self, marginals, moments, point, arrays, spec, plan, params):
        """``{site: moments} -> d E_q[log p] / dM`` with q(z)'s factor marginals
        held, at ``moments`` with those sites' replaced: the expected factors are
        linear in each site's moments, so this is the expected sufficient
        statistics for a VB-M-step at any q(theta)."""

        def expected(moments):
            _, factors = self._factors(moments, point, arrays, spec, plan, params)
            return sum(jnp.sum(marginals[n] * f) for n, f in factors.items())

        return lambda replaced: jax.grad(expected)({**moments, **replaced})

    def _elbo_and_update(self, state, arrays, spec, plan):
        """The latents' factors, then the parameters' posteriors: ``(ELBO after the
        former, state after both, aux)``."""
        value, stats, marginals, factors, trace, q_latents = self._e_step(
            state.q, state.q_latents, arrays, spec, plan, state.params
        )
        priors = vb_posterior.prior_values(trace, plan)
        elbo = value - vb_posterior.kl(state.q, priors, plan)
        moments, point = vb_posterior.moments(state.q, plan), vb_posterior.point(state.q, plan)
        restat = self._stats_at(marginals, moments, point, arrays, spec, plan, state.params)
        new_q = vb_posterior.new_q(priors, stats, plan, restat)
        # Then the params, up the ELBO at the new q(theta) and q(z) held.
        objective = self._param_objective(new_q, marginals, arrays, spec, plan)
        structure = model_structure(self.model, *merge_args(arrays, spec))
        held = (vb_posterior.point(new_q, plan), marginals, plan.param_paths)
        params, opt_state = self.params_step.update(
            objective, state.params, state.opt_state, *held, arrays, spec, structure
        )
        new_state = VBState(new_q, state.iteration + 1, q_latents, params, opt_state)
        return elbo, new_state, (value, marginals, factors)

    def _param_objective(self, q, marginals, arrays, spec, plan):
        """The ELBO in the params, q(theta) and q(z)'s factor marginals held (less
        H(q(z)), which is constant in them): ``params -> scalar``."""
        moments, point = vb_posterior.moments(q, plan), vb_posterior.point(q, plan)

        def objective(params):
            params = {n: params[n] for n in plan.param_paths}
            trace, factors = self._factors(moments, point, arrays, spec, plan, params)
            expected = sum(
                jnp.sum(jnp.where(marginals[n] > 0, marginals[n] * f, 0.0))
                for n, f in factors.items()
            )
            return expected - vb_posterior.kl(q, vb_posterior.prior_values(trace, plan), plan)

        return objective

    def _step(self, rng_key, state, arrays, spec):
        plan = self._plan(arrays, spec)
        elbo, new_state, _ = self._elbo_and_update(state, arrays, spec, plan)
        return new_state, StepInfo(elbo, jnp.array(True))

    def _init_state(self, rng_key, arrays, spec, init_params):
        """q(theta) from the posterior marginals of the latents at a point: a draw
        from the priors (or ``init_params``), then one VB-M-step. With mean field,
        the latents' mean-field q at the point (from uniform) in place of their
        posterior."""
        plan = self._plan(arrays, spec)
        args, kwargs = merge_args(arrays, spec)
        structure, point = initial_params(self.model, (), rng_key, arrays, spec, init_params)
        params = {n: jnp.asarray(point[n]) for n in plan.param_paths}
        trace = self.model.enumerated_trace(point, args, kwargs, plan.nesting)
        q_latents = {}
        if self.latents == "mean_field":
            log_factors = {n: s.log_prob for n, s in trace.sites.items()}
            q_latents = coordinate_ascent(uniform_q(trace), log_factors, trace, self.e_step_iters)
            marginals = factor_marginals(q_latents, log_factors, trace)
        else:
            marginals = e_step(self.model, point, args, kwargs, plan.nesting).marginals
        priors = vb_posterior.prior_values(trace, plan)
        # The expected factors are linear in the moments: their gradient, weighted by
        # the latents' posterior at the point, is the expected sufficient statistics
        # wherever it is taken (here at the priors' moments).
        moments = vb_posterior.moments(priors, plan)
        point = {n: point[n] for n in self.global_sites}
        stats_at = self._stats_at(marginals, moments, point, arrays, spec, plan, params)
        new_q = vb_posterior.new_q(priors, stats_at({}), plan, stats_at)
        opt_state = self.params_step.start(params, structure, plan.param_paths)
        return VBState(new_q, jnp.zeros((), jnp.int32), q_latents, params, opt_state)

    # -- public API -----------------------------------------------------------------

    def init(self, rng_key, *args, init_params=None, **kwargs) -> VBState:
        """Initial state: the latents' posterior (with mean field, their mean-field
        q) at a draw from the priors (or ``init_params``), then q(theta) from it
        (one VB-M-step)."""
        arrays, spec = split_args(args, kwargs)
        self._plan(arrays, spec, rng_key)
        check_initial_values(self.model, rng_key, arrays, spec, init_params)
        return self._init_jit(rng_key, arrays, spec, init_params)

    def _update(self, state, arrays, spec):
        new_state, info = self._step(None, state, arrays, spec)
        return new_state, info.objective

    def update(self, state, *args, **kwargs):
        """One iteration: ``(new_state, ELBO at state)`` (with mean field, at
        ``state``'s q(theta) and the q(z) that the iteration's coordinate ascent
        reaches from ``state.q_latents``)."""
        arrays, spec = split_args(args, kwargs)
        self._plan(arrays, spec)
        return self._update_jit(state, arrays, spec)

    def get_params(self, state) -> dict:
        """``{global site: q(theta)}`` as NumPyro distributions (the
        ``numpyro.param`` sites' values: ``state.params``)."""
        plan = VBPlan({}, self._families, 0, self._groups, {}, global_sites=self.global_sites)
        return vb_posterior.posteriors(state.q, plan)

    def _run(self, rng_key, arrays, init_params, tol, *, spec, max_iter, progress_bar):
        plan = self._plan(arrays, spec)
        start = self._init_state(rng_key, arrays, spec, init_params)

        def final(state):
            elbo, _, aux = self._elbo_and_update(state, arrays, spec, plan)
            return elbo, aux

        loop = iterate(
            lambda key, state: self._step(key, state, arrays, spec),
            loop_key(rng_key),
            start,
            lambda state: (state.q, state.params),
            final_fn=final,
            max_iter=max_iter,
            tol=tol,
            progress_bar=progress_bar,
        )
        log_z, marginals, factors = loop.aux
        expected = sum(jnp.sum(marginals[n] * f) for n, f in factors.items())
        posteriors = vb_posterior.posteriors(loop.state.q, plan)
        # The trace's structure (its sites and dims) for the per-site marginals; its
        # log-probabilities are unused, so XLA drops them.
        last = loop.state
        at = (vb_posterior.moments(last.q, plan), vb_posterior.point(last.q, plan))
        trace, _ = self._factors(*at, arrays, spec, plan, last.params)
        structure = model_structure(self.model, *merge_args(arrays, spec))
        latents = latent_posteriors(trace, factors, marginals, structure.latent_sites)
        # Converged also says the params are a stationary point of the ELBO (q held):
        # a run whose param steps were all rejected is not converged.
        objective = self._param_objective(loop.state.q, marginals, arrays, spec, plan)
        gradient, gain = self.params_step.stationarity(
            objective, loop.state.params, plan.param_paths, structure
        )
        return VBResult(
            posteriors,
            loop.value,
            loop.history,
            loop.num_iters,
            loop.converged & stationary(gain, loop.value, tol),
            loop.diverged,
            marginals,
            log_z - expected,
            loop.state.q,
            latents,
            loop.state.params,
            gradient,
        )

    def m_step_paths(self, *args, **kwargs) -> dict:
        """How each parameter is updated: ``{global site: "variational posterior
        (...)", param: "closed-form (...)" | "gradient (...)" | "unused (...)"}``
        (`jaxem.vb_params`)."""
        arrays, spec = split_args(args, kwargs)
        plan = self._plan(arrays, spec)
        posteriors = {
            n: f"variational posterior ({plan.families[n].__name__} prior)"
            for n in self.global_sites
        }
        return {**posteriors, **describe_plan(plan.param_paths)}

    def run(
        self, rng_key, *args, max_iter=200, tol=1e-5, init_params=None, progress_bar=False, **kwargs
    ) -> VBResult:
        """Run to convergence inside one compiled ``lax.while_loop``.

        Args:
            rng_key: PRNG key (draws the initial point from the priors).
            *args, **kwargs: the model's arguments.
            max_iter: maximum number of iterations.
            tol: stop when the relative change of the ELBO is at most ``tol``.
            init_params: ``{global site or param: value}``: the point whose latent
                posterior starts the fit, instead of a draw from the priors (and the
                params' initial values, instead of the model's).
            progress_bar: show a progress bar.

        Returns:
            `VBResult`.
        """
        if max_iter < 1:
            raise ValueError("max_iter must be at least 1")
        arrays, spec = split_args(args, kwargs)
        self._plan(arrays, spec, rng_key)
        check_initial_values(self.model, rng_key, arrays, spec, init_params)
        call = lambda: self._run_jit(  # noqa: E731
            rng_key,
            arrays,
            init_params,
            np.asarray(tol, jnp.result_type(float)),
            spec=spec,
            max_iter=int(max_iter),
            progress_bar=bool(progress_bar),
        )
        result = run_with_progress(call, progress_bar, max_iter, self.name)
        warn_about_vb_fit(result, name=self.name, max_iter=max_iter, tol=tol)
        return result
