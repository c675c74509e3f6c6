"""Online (stochastic) EM for data streamed in minibatches (Cappé and Moulines 2009).

Batch EM solves every closed-form M-step from sufficient statistics summed
over the whole dataset. Online EM keeps a running average of those statistics
instead, updated from one minibatch at a time with a decreasing step size
``gamma_t``,

$$
s_t = (1 - \\gamma_t)\\, s_{t-1} + \\gamma_t\\, \\bar s(Y_t; \\theta_{t-1}),
\\qquad \\theta_t = \\bar\\theta(s_t),
$$

where ``s_bar`` is the minibatch's statistics averaged per data point, and
``theta_bar`` the closed-form solve, as in batch EM. With ``sum gamma_t =
inf`` and ``sum gamma_t^2 < inf`` (``gamma_t = (t + 1)^{-kappa}``,
``0.5 < kappa <= 1``), i.i.d. minibatches and a complete-data model in the
exponential family with a unique closed-form ``theta_bar``, Cappé and
Moulines show that the iterates converge to the stationary points of the
Kullback-Leibler divergence from the data distribution to the model (for
epochs over a shuffled data set, its empirical distribution: the stationary
points of the batch likelihood). Staged updates (scales given the new
locations) follow the batch ECM order, each stage's statistics taken at the
parameters of the stages before. Parameters without a closed form take
optax steps on the minibatch's expected complete-data log-likelihood per data
point (a stochastic gradient of the log-likelihood, by Fisher's identity);
the theorem does not cover them, and with a constant learning rate they
fluctuate around the optimum.

With ``global_sites`` (parameters with priors) it is online MAP-EM: the prior
counts once for the whole data set of ``num_data`` points, so against the
running averages per data point its conjugate pseudo-statistics weigh
``1 / num_data`` (``s_t + pseudo / N``, the solve unchanged), as does its log
density in the optax steps' Q per data point.

References:
    O. Cappé and E. Moulines (2009). On-line expectation-maximization
    algorithm for latent data models. Journal of the Royal Statistical
    Society, Series B 71(3), 593-613.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxem.arguments import merge_args, split_args
from jaxem.built import built_model
from jaxem.checks import raise_for_fitted_arguments, validate
from jaxem.closed_form_step import closed_form_statistics_m_step
from jaxem.driver import Fitter
from jaxem.estep import e_step
from jaxem.exceptions import ConvergenceWarning, ModelError
from jaxem.fitter_m_step import MStep
from jaxem.global_sites import log_prior_of_trace, with_global_sites
from jaxem.gradient import gradient_m_step
from jaxem.identification import unidentified_from_statistics, warn_if_unidentified
from jaxem.inspection import model_structure
from jaxem.kernel import StepInfo
from jaxem.loop import all_finite, tree_where
from jaxem.regularization import warn_if_held_by_reg_covar
from jaxem.resolution import warn_if_scale_unresolved
from jaxem.weights import reject_case_weights

__all__ = ["OnlineEM", "OnlineEMState", "OnlineEMResult", "check_num_data", "power_decay"]


def power_decay(kappa: float = 0.6) -> Callable[[jax.Array], jax.Array]:
    """The step-size schedule ``gamma_t = (t + 1)^(-kappa)`` (``gamma_0 = 1``).

    ``0.5 < kappa <= 1`` gives ``sum gamma_t = inf`` and
    ``sum gamma_t^2 < inf``, the step-size conditions of Cappé and Moulines
    (2009); other values raise a ``ValueError``. ``kappa = 1`` makes the
    running statistics the plain mean of every minibatch's; a smaller
    ``kappa`` forgets the early minibatches faster, with more noise.

    Args:
        kappa: the decay exponent; default 0.6, as in ``OnlineEM``.

    Returns:
        The schedule ``t -> gamma_t``, ``t`` the number of minibatches
            processed before.

    Examples:
        >>> from jaxem.online import power_decay
        >>> [round(float(power_decay(1.0)(t)), 3) for t in range(3)]
        [1.0, 0.5, 0.333]
    """
    if not 0.5 < kappa <= 1.0:
        raise ValueError(f"kappa must be in (0.5, 1] for online EM to converge, got {kappa}")
    return lambda t: (jnp.asarray(t, jnp.result_type(float)) + 1.0) ** -kappa


class OnlineEMState(NamedTuple):
    """What online EM carries from one minibatch to the next (a pytree).

    Attributes:
        params: ``{param name: constrained value}``.
        statistics: ``{closed-form param name: tuple of running statistics}``,
            averages per data point of the statistics batch EM sums.
        opt_state: optax state of the gradient-path parameters.
        iteration: number of minibatch updates accepted (the step-size schedule's
            ``t``).
        num_rejected: number of minibatch updates rejected: the minibatch's
            log-likelihood, or the parameters or running statistics after its
            update, were not finite. A rejected update leaves the rest of the
            state as it was.
    """

    params: dict
    statistics: dict
    opt_state: Any
    iteration: jax.Array
    num_rejected: Any = 0


class OnlineEMResult(NamedTuple):
    """Result of `OnlineEM.run`.

    Online EM processes every minibatch it is given: a stochastic approximation
    of fixed length has no convergence test, and its parameters are not a
    stationary point of any one minibatch's likelihood, so there is no
    ``converged`` flag. Judge convergence from ``log_likelihoods`` over the
    last epoch, or with [`jaxem.log_likelihood`][jaxem.log_likelihood] on held-out data.

    Attributes:
        params: ``{param name: constrained value}`` after the last accepted
            update.
        state: the final `OnlineEMState` (to go on streaming).
        log_likelihoods: shape ``(num_batches,)``: every minibatch's
            log-likelihood at the parameters it was processed with.
        diverged: whether an update of this run was rejected (see
            ``num_rejected``); a `ConvergenceWarning`
            says which. ``params`` are then those of the updates accepted, which
            may be the ones at which a later minibatch's log-likelihood was not
            finite.
        num_rejected: number of minibatch updates of this run rejected because
            the minibatch's log-likelihood, or the parameters or running
            statistics after the update, were not finite.
        unidentified: ``{param name: bool array}`` as in
            [`jaxem.EMResult`][jaxem.EMResult], from the running normal equations.
    """

    params: dict
    state: OnlineEMState
    log_likelihoods: jax.Array
    diverged: jax.Array
    num_rejected: jax.Array
    unidentified: dict | None = None


def check_num_data(global_sites, num_data) -> float:
    """``num_data`` as a float, checked: required (a positive count) with global
    sites, and meaningless without them."""
    if not global_sites:
        if num_data is not None:
            raise ValueError(
                "jaxem: OnlineEM's num_data weighs the priors of global_sites; the model "
                "has none named. Drop num_data, or name the global sites."
            )
        return 1.0
    if num_data is None:
        raise ModelError(
            f"jaxem: OnlineEM with global_sites {global_sites} needs num_data=N, the number "
            "of data points of the whole data set (one epoch's minibatches together): the "
            "prior counts once for the whole data set, 1/N against the running averages "
            "per data point, and a stream of minibatches does not tell N."
        )
    if isinstance(num_data, bool) or not float(num_data) > 0 or not math.isfinite(num_data):
        raise ValueError(
            f"jaxem: num_data must be a positive number of data points, got {num_data!r}"
        )
    return float(num_data)


def _num_data_cells(trace) -> int:
    """The largest number of plate cells of any site: the number of data points
    the minibatch's statistics are averaged over."""
    sizes = [1]
    for site in trace.sites.values():
        shape = jnp.shape(site.log_prob)
        sizes.append(
            math.prod(shape[d] for d, name in site.dim_to_name.items() if name in site.plates)
        )
    return max(sizes)


class OnlineEM(Fitter):
    """Online EM: one update per minibatch, streamed from the host.

    Args:
        model: a NumPyro model with ``numpyro.param`` sites, written for one
            minibatch (its plates sized by the minibatch).
        step_size: schedule ``t -> gamma_t`` (``t`` the number of minibatches
            processed before) for the closed-form parameters' running
            statistics; default `power_decay` with ``kappa = 0.6``.
            With ``gamma_0 = 1`` the first update is one batch-EM step on the
            first minibatch.
        optimizer: optax optimizer for the parameters without a closed form;
            default ``optax.adam(1e-2)``, its state carried across
            minibatches. A constant rate leaves them fluctuating around the
            optimum; an optax schedule that decays it removes that.
        m_step_iters: optimizer steps per minibatch (default 1).
        reg_covar: added to variances and covariance diagonals.
        frozen: names of parameters to keep at their initial values.
        global_sites: names of sample sites that are parameters with priors
            (`jaxem.with_global_sites`): online MAP-EM, the stochastic
            approximation of ``EM(model, global_sites=...)`` on the whole data set.
        num_data: with ``global_sites``, required: the number of data points of
            the whole data set (one epoch's minibatches together, counted like a
            minibatch's: the cells of its largest plate). The prior counts once
            for the whole data set, so against the running statistics, averages
            per data point, its pseudo-statistics (and, on the gradient path, its
            log density) weigh ``1 / num_data``. A stream does not tell its length:
            it is given here.
        m_step: ``"auto"`` (closed form where detected, optimizer steps
            otherwise), ``"gradient"`` (optimizer steps for every param), or
            ``{param name: "gradient"}``: optimizer steps for the params it
            names, as in [`jaxem.EM`][jaxem.EM].

    Examples:
        >>> import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist
        >>> from numpyro.distributions import constraints
        >>> from jaxem import OnlineEM
        >>> def mixture(x):
        ...     w = numpyro.param("w", jnp.ones(2) / 2, constraint=constraints.simplex)
        ...     mu = numpyro.param("mu", jnp.array([-1.0, 1.0]))
        ...     with numpyro.plate("data", x.shape[0]):
        ...         z = numpyro.sample("z", dist.Categorical(w))
        ...         numpyro.sample("x", dist.Normal(mu[z], 1.0), obs=x)
        >>> x = jnp.concatenate([jnp.full(500, -3.0), jnp.full(500, 3.0)])
        >>> x = jax.random.permutation(jax.random.PRNGKey(0), x)
        >>> batches = [(x[i : i + 100],) for i in range(0, 1000, 100)] * 3
        >>> result = OnlineEM(mixture).run(jax.random.PRNGKey(1), batches)
        >>> [round(float(m), 1) for m in result.params["mu"]]
        [-3.0, 3.0]

    References:
        O. Cappé and E. Moulines (2009). On-line expectation-maximization
        algorithm for latent data models. JRSS B 71(3), 593-613.
    """

    def __init__(
        self,
        model: Callable,
        *,
        step_size: Callable | None = None,
        optimizer: optax.GradientTransformation | None = None,
        m_step_iters: int = 1,
        reg_covar: float = 1e-6,
        frozen: Sequence[str] = (),
        global_sites: Sequence[str] = (),
        num_data: int | None = None,
        m_step: str | dict = "auto",
    ):
        self.global_sites = tuple(global_sites)
        self.num_data = check_num_data(self.global_sites, num_data)
        # Built once: every trace of the model below comes from its cache.
        self.model = built_model(with_global_sites(model, self.global_sites))
        self.step_size = step_size or power_decay(0.6)
        self.m_step_settings = MStep(
            self.model,
            mode=m_step,
            optimizer=optimizer or optax.adam(1e-2),
            num_steps=m_step_iters,
            reg_covar=reg_covar,
            frozen=frozen,
        )
        super().__init__()

    def _m_step(self, state, arrays, spec, step_size):
        args, kwargs = merge_args(arrays, spec)
        structure = model_structure(self.model, args, kwargs)
        nesting = structure.max_plate_nesting
        result = e_step(self.model, state.params, args, kwargs, nesting)
        # Its statistics are averages per data cell, not per unit of weight.
        reject_case_weights(result.trace, "OnlineEM")
        plan = self.m_step_settings.plan(state.params, arrays, spec, structure)
        scale = 1.0 / _num_data_cells(result.trace)
        # The prior counts once for the whole data set: 1 / N against averages per point.
        prior_weight = 1.0 / self.num_data if self.global_sites else 1.0

        def combine(name, statistics):
            running = state.statistics[name]
            return tuple(
                (1 - step_size) * old + step_size * scale * new
                for old, new in zip(running, statistics)
            )

        # A global site read by a closed form (a Normal-Wishart prior's mean reading
        # the precision) is no data: its statistics weigh 1 / N like its prior.
        closed_marginals = {
            n: m * (prior_weight / scale) if n in self.global_sites else m
            for n, m in result.marginals.items()
        }
        params, statistics = closed_form_statistics_m_step(
            self.model,
            state.params,
            closed_marginals,
            plan,
            args,
            kwargs,
            nesting,
            self.reg_covar,
            result.trace,
            combine_fn=combine if state.statistics else None,
            prior_weight=prior_weight,
        )
        # Q per data point: step sizes that do not depend on the batch size; a global
        # site's log prior (its own factor) per data point of the whole data set.
        marginals = {
            n: m * (prior_weight if n in self.global_sites else scale)
            for n, m in result.marginals.items()
        }
        params, opt_state = gradient_m_step(
            self.model,
            params,
            marginals,
            plan,
            structure,
            self.optimizer,
            state.opt_state,
            self.m_step_iters,
            args,
            kwargs,
        )
        # The data's log-likelihood: the E-step's log Z holds the log prior as a factor.
        log_lik = result.log_likelihood - log_prior_of_trace(result.trace, self.global_sites)
        return params, statistics, opt_state, log_lik

    def _step(self, rng_key, state, arrays, spec):
        """One minibatch's update (``rng_key`` not used: the E-step is exact)."""
        step_size = jnp.asarray(self.step_size(state.iteration), jnp.result_type(float))
        params, statistics, opt_state, log_lik = self._m_step(state, arrays, spec, step_size)
        new = OnlineEMState(params, statistics, opt_state, state.iteration + 1, state.num_rejected)
        # A non-finite update would turn every later one into NaN: skip this minibatch.
        ok = jnp.isfinite(log_lik) & all_finite((params, statistics))
        rejected = state._replace(num_rejected=state.num_rejected + 1)
        return tree_where(ok, new, rejected), StepInfo(log_lik, ok)

    def init(self, rng_key, *args, init_params=None, **kwargs) -> OnlineEMState:
        """Initial state from the ``numpyro.param`` initial values, shaped by one
        minibatch (``*args, **kwargs``: the model's arguments for it).

        Args:
            rng_key: PRNG key passed to callable initial values.
            init_params: optional ``{param name: constrained value}`` overriding
                some or all initial values.
        """
        arrays, spec = split_args(args, kwargs)
        self.m_step_settings.validate(rng_key, arrays, spec, init_params)
        return self.kernel.init(rng_key, arrays, spec, init_params)

    def _init_state(self, rng_key, arrays, spec, init_params):
        _, params, _, opt_state = self.m_step_settings.start(rng_key, arrays, spec, init_params)
        empty = OnlineEMState(params, {}, opt_state, jnp.zeros((), jnp.int32))
        shapes = jax.eval_shape(lambda a: self._m_step(empty, a, spec, jnp.ones(()))[1], arrays)
        statistics = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        zero = jnp.zeros((), jnp.int32)
        return OnlineEMState(params, statistics, opt_state, zero, zero)

    def update(self, state: OnlineEMState, *args, **kwargs):
        """Process one minibatch (compiled once per minibatch shape).

        An update whose log-likelihood, parameters or running statistics are
        not finite is rejected: ``new_state`` is ``state`` with
        ``num_rejected`` one higher. Nothing is warned here (the values are not
        known until read); ``run`` warns.

        Returns:
            ``(new_state, log_likelihood)``: the minibatch's log-likelihood at
            ``state``'s parameters.
        """
        return super().update(state, *args, **kwargs)

    def run(
        self,
        rng_key,
        batches: Iterable,
        *,
        init_params: dict | None = None,
        state: OnlineEMState | None = None,
        **kwargs,
    ) -> OnlineEMResult:
        """Stream minibatches from the host, one update each.

        Each update is dispatched asynchronously, so the next minibatch is
        read and copied to the device while the current one is processed.

        Args:
            rng_key: PRNG key for callable initial values.
            batches: iterable of tuples of the model's positional arguments,
                one tuple per minibatch (e.g. ``(x_batch,)``); several epochs
                are several passes, e.g. ``itertools.chain``.
            init_params: ``{param name: constrained value}`` overriding initial
                values.
            state: go on from this state instead of initializing.
            **kwargs: keyword arguments of the model, the same for every batch.

        Returns:
            An `OnlineEMResult`. A
            `NumericalWarning` says when a fitted
            variance is held up by ``reg_covar`` (and ``init`` when
            ``reg_covar`` is not small against the first minibatch's data).

        Raises:
            ModelError: the fitted params put a distribution argument outside its
                support (probabilities rescaled off the simplex, say), where the
                log-likelihood means nothing; checked on the last minibatch.
        """
        log_liks, rejected = [], []
        start = None if state is None else state.num_rejected
        for batch in batches:
            batch = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
            if state is None:
                state = self.init(rng_key, *batch, init_params=init_params, **kwargs)
            else:
                # NaN in a later minibatch must stop the run with a named error
                # rather than turn every parameter into NaN. A coordinate that one
                # minibatch never observes may be observed by others: not an error.
                arrays, spec = split_args(batch, kwargs)
                validate(self.model, rng_key, arrays, spec, fitting=False)
            if start is None:
                start = state.num_rejected
            state, log_lik = self.update(state, *batch, **kwargs)
            log_liks.append(log_lik)
            rejected.append(state.num_rejected)
        if state is None:
            raise ValueError("jaxem: OnlineEM.run got no minibatches.")
        num_rejected = jnp.asarray(state.num_rejected - start, jnp.int32)
        result = OnlineEMResult(
            dict(state.params), state, jnp.stack(log_liks), num_rejected > 0, num_rejected
        )
        _warn_about_rejections(result, jnp.stack(rejected) - start)
        return self._check_online_fit(result, *split_args(batch, kwargs))

    def _check_online_fit(self, result, arrays, spec):
        """After ``run``, on the last minibatch's arguments (concrete values): a
        ModelError for distribution arguments that the fitted params put outside
        their support (only a non-finite update is rejected, so one that leaves
        the support is kept), and a NumericalWarning for variances held up by
        ``reg_covar`` or below the resolution of their location, or for coefficients
        that the running normal equations do not identify (`jaxem.identification`).
        Returns the result with ``unidentified``."""
        args, kwargs = merge_args(arrays, spec)
        structure = model_structure(self.model, args, kwargs)
        raise_for_fitted_arguments(self.model, result.params, args, kwargs, structure)
        nesting = structure.max_plate_nesting
        plan = self.m_step_settings.plan(result.params, arrays, spec, structure)
        warn_if_held_by_reg_covar(result.params, plan, self.reg_covar)
        warn_if_scale_unresolved(self.model, result.params, args, kwargs, nesting, plan)
        prior_weight = 1.0 / self.num_data if self.global_sites else 1.0
        unidentified = unidentified_from_statistics(
            self.model, result.params, result.state.statistics, plan, args, kwargs, nesting,
            prior_weight,
        )  # fmt: skip
        warn_if_unidentified(unidentified, plan, "OnlineEM")
        return result._replace(unidentified=unidentified)


def _warn_about_rejections(result, rejected) -> None:
    """A ConvergenceWarning when updates were rejected (``rejected``: the running count
    after every minibatch)."""
    count = int(result.num_rejected)
    if count == 0:
        return
    first = int(np.argmax(np.asarray(rejected) > 0))
    warnings.warn(
        f"jaxem: OnlineEM diverged: {count} of {len(rejected)} minibatch updates were "
        f"rejected (the first at minibatch {first}, counting from 0) because the "
        "minibatch's log-likelihood, or the parameters or running statistics after the "
        "update, were not finite; those minibatches were skipped, and params come from "
        "the updates accepted. Causes: a variance collapsing onto a minibatch's points "
        "(reg_covar > 0, larger or shuffled minibatches), a component no point of a "
        "minibatch reaches (start the params nearer the data), or optax steps too large "
        "for the gradient-path params (a smaller learning rate).",
        ConvergenceWarning,
        stacklevel=3,
    )
