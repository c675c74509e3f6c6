"""The ELBO of a factorized q over the discrete latents, computed exactly from the
model's enumerated factors: mean-field coordinate ascent, a guide's enumerated
marginals, and `elbo` (the public function).

The expected log joint is a sum over the enumerated factor tensors of the
model of ``<product of the q's of the factor's latents, log factor>``, so
autodiff gives the mean-field update for any model, and latents that share no
factor are updated together (a greedy colouring of the latent interaction
graph). A guide's expectation is computed from its enumerated probabilities
(no score-function noise).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import entr

from jaxem.arguments import split_args
from jaxem.chain import find_chain
from jaxem.estep import check_params_complete, site_posterior, structure_and_args
from jaxem.exceptions import ModelError
from jaxem.tracing import enumerated_trace

__all__ = [
    "colour",
    "coordinate_ascent",
    "elbo",
    "elbo_of",
    "expected_log_joint",
    "factor_marginals",
    "guide_elbo",
    "guide_q",
    "latent_names",
    "reject_chains",
    "tractable",
    "uniform_q",
]


# ---------------------------------------------------------------------------
# The ELBO of a factorized q, from the enumerated factors of the model.
# ---------------------------------------------------------------------------


def _own_dim(site):
    dims = [d for d, n in site.dim_to_name.items() if n == site.name]
    return dims[0] if dims else None


def latent_names(trace):
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


def expected_log_joint(q, log_factors, trace, names=None):
    """$E_q[\\log p] = \\sum_f \\langle \\prod_{j \\in f} q_j, \\log f \\rangle$."""
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


def elbo_of(q, log_factors, trace):
    return expected_log_joint(q, log_factors, trace) + _entropy(q)


def factor_marginals(q, log_factors, trace):
    """The marginals of q over each factor's cells, shaped like the factor (the
    gradient of ``E_q[log p]`` with respect to the log-factors, as exact EM's
    marginals are the gradient of the log-likelihood)."""
    weights = _factor_weights(q, trace, list(trace.sites))
    return jax.grad(lambda logs: sum(jnp.sum(weights[name] * logs[name]) for name in logs))(
        log_factors
    )


def reject_chains(trace, what, exact="jaxem.EM"):
    """A factorized q cannot represent a Markov chain written with ``scan``: its
    steps are one stacked site, which would get one q for all time steps.
    ``exact`` names the fit to use instead, whose E-step is exact for chains."""
    chain = find_chain(trace)
    if chain is not None:
        raise ModelError(
            f"jaxem: {what} does not support the Markov chain of site '{chain.name}' written "
            f"with numpyro's scan: a factorized q would give all its time steps one factor. Use "
            f"{exact}, whose E-step is exact for chains (the forward-backward algorithm), or "
            "write the chain as a Python loop under numpyro.contrib.funsor.markov (one latent "
            "site per step)."
        )


def uniform_q(trace):
    q = {}
    for name in latent_names(trace):
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


def colour(trace):
    """Groups of latents that share no factor, greedily in model order: the
    ELBO is linear in each q_j given the others, so a whole group is updated
    at once and every update is exact coordinate ascent."""
    latents = latent_names(trace)
    neighbours = _interactions(trace, latents)
    colour_of: dict = {}
    for j in latents:
        used = {colour_of[n] for n in neighbours[j] if n in colour_of}
        colour_of[j] = min(set(range(len(used) + 1)) - used)
    groups = [[] for _ in range(max(colour_of.values(), default=-1) + 1)]
    for j in latents:
        groups[colour_of[j]].append(j)
    return groups


def coordinate_ascent(q, log_factors, trace, num_sweeps):
    """Mean-field E-step: ``num_sweeps`` sweeps over the groups of `colour`."""
    groups = colour(trace)
    if len(groups) <= 1:
        num_sweeps = 1  # latents that share no factor: one sweep is the optimum
    touching = [
        [n for n, site in trace.sites.items() if set(group) & set(site.dim_to_name.values())]
        for group in groups
    ]

    def sweep(_, q):
        for group, names in zip(groups, touching):

            def partial_elj(sub, q=q, names=names):
                return expected_log_joint({**q, **sub}, log_factors, trace, names)

            grads = jax.grad(partial_elj)({j: q[j] for j in group})
            q = {**q, **{j: jax.nn.softmax(g, axis=-1) for j, g in grads.items()}}
        return q

    return jax.lax.fori_loop(0, num_sweeps, sweep, q)


def tractable(trace, max_cells):
    """Whether exact enumeration stays below ``max_cells`` cells per plate
    element: greedy (min-size) variable elimination on the latent graph."""
    sizes = {
        n: trace.sites[n].log_prob.shape[_own_dim(trace.sites[n])] for n in latent_names(trace)
    }
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


def guide_q(guide, guide_params, args, kwargs, nesting, model_trace):
    """The guide's marginals and their logarithms, by enumerating its sites
    (checked against the model)."""
    gtrace = enumerated_trace(guide, guide_params, args, kwargs, nesting)
    latents = latent_names(model_trace)
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


def guide_elbo(q, log_q, log_factors, trace):
    # The entropy from the guide's log-probabilities: entr(q) has an infinite
    # derivative where a probability underflows to 0.
    entropy = -sum(jnp.sum(q[n] * jnp.where(q[n] > 0, log_q[n], 0.0)) for n in q)
    return expected_log_joint(q, log_factors, trace) + entropy


# ---------------------------------------------------------------------------
# The ELBO as a function.
# ---------------------------------------------------------------------------


@partial(jax.jit, static_argnums=(0, 4))
def _elbo_jit(model, params, q, arrays, spec):
    structure, args, kwargs = structure_and_args(model, arrays, spec)
    check_params_complete(structure, params)
    trace = enumerated_trace(model, params, args, kwargs, structure.max_plate_nesting)
    reject_chains(trace, "jaxem.elbo")
    latents = latent_names(trace)
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
    return elbo_of(q, {n: s.log_prob for n, s in trace.sites.items()}, trace)


def elbo(model, params, q, *args, **kwargs):
    """The ELBO of a factorized q: $E_q[\\log p(x, z)] + H(q)$.

    Computed exactly from the model's enumerated factors (no sampling).

    Args:
        model: a NumPyro model with ``numpyro.param`` sites and discrete latents.
        params: ``{param name: constrained value}``.
        q: ``{latent site: probabilities}``, each shaped like the site's entry
            of [`jaxem.posterior`][jaxem.posterior] (plate shape, then the site's values);
            latents with a single value take no entry.
        *args, **kwargs: the model's arguments.

    Returns:
        Scalar ELBO, at most [`jaxem.log_likelihood`][jaxem.log_likelihood], with equality when
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
