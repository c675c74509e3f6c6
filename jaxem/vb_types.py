"""The values `jaxem.VariationalBayesEM` works with: its state, its result and
its plan (what it reads from the model once per input signature)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax

__all__ = ["VBPlan", "VBResult", "VBState"]


class VBState(NamedTuple):
    """What the VBEM loop carries (a pytree).

    Attributes:
        q: ``{global site: tuple of arrays}``, the constructor arguments of its
            variational posterior (``(concentration,)`` for a Dirichlet,
            ``(concentration, rate)`` for a Gamma, ...), each shaped like the site.
        iteration: number of updates done.
        q_latents: with ``latents="mean_field"``, ``{latent site: q(z_site)}``
            (plate shape, then the site's values, as `jaxem.VEMState.q`), the
            start of the next coordinate ascent; empty with ``"exact"``.
        params: ``{numpyro.param site: value}``, point values that maximize the
            ELBO (`jaxem.vb_params`); empty when the model has none.
        opt_state: the optax state of the params on the gradient path.
    """

    q: dict
    iteration: jax.Array
    q_latents: dict = {}
    params: dict = {}
    opt_state: Any = ()


class VBResult(NamedTuple):
    """Result of `VariationalBayesEM.run`.

    Attributes:
        posteriors: ``{global site: NumPyro distribution}``, q(theta) of each
            global site (``dist.Dirichlet``, ``dist.Gamma``, ...), shaped like
            the site's prior. For a Normal-Wishart pair, ``dist.Wishart`` for the
            precision and the marginal ``dist.MultivariateStudentT`` of the mean
            (q(mu | Lam) is `jaxem.normal_wishart.mean_given_precision`); for a
            Normal-Gamma pair ``dist.Gamma`` and ``dist.StudentT``
            (`jaxem.normal_gamma.mean_given_precision`).
        elbo: the evidence lower bound at ``posteriors``, q(z) optimal for them:
            ``E_q[log p(x, z, theta)] - E_q[log q(z)] - E_q[log q(theta)]``.
        history: shape ``(max_iter,)``: the ELBO at the start of every
            iteration, NaN after ``num_iters``.
        num_iters: number of iterations.
        converged: whether the relative change of the ELBO fell below ``tol``.
        diverged: whether the run stopped on an ELBO or a parameter that was not
            finite.
        latent_marginals: ``{site: q(z)'s marginal of the site's factor}``,
            shaped like the site's enumerated log-probability, keyed by NumPyro's
            trace names (a ``scan``'s first step is a site of its own there): the
            engine's view, for expectations of factors. Use ``latent_posteriors``.
        latent_entropy: ``-E_q[log q(z)]``.
        q: the final `VBState`'s ``q`` (for a Normal-Wishart pair ``(nu, W)``
            for the precision, ``(m, beta)`` for the mean; for a Normal-Gamma
            pair ``(a, b)`` and ``(m, beta)``).
        latent_posteriors: ``{latent site: q(z)'s marginal}``, as
            [`jaxem.posterior`][jaxem.posterior] gives them for EM: the values on
            the last axis, a ``scan`` chain's per-step marginals ``(T, K)``.
        params: ``{numpyro.param site: value}`` (as `jaxem.EMResult.params`): point
            values that maximize the ELBO with q held; empty when the model has none.
        gradient: ``{param: gradient}``: the ELBO's gradient (q held) in each
            updated param's unconstrained value at ``params``; ``converged``
            also says the gain still to be had along it is negligible.
    """

    posteriors: dict
    elbo: jax.Array
    history: jax.Array
    num_iters: jax.Array
    converged: jax.Array
    diverged: jax.Array
    latent_marginals: dict
    latent_entropy: jax.Array
    q: dict
    latent_posteriors: dict
    params: dict = {}
    gradient: dict = {}


class VBPlan(NamedTuple):
    """What `VariationalBayesEM` reads from the model once per input signature."""

    readers: dict  # {site name: Reader}
    families: dict  # {global site: prior class}
    nesting: int
    groups: dict  # {precision site: NormalWishart or NormalGamma}
    nw_readers: dict  # {site name: NormalWishart or NormalGamma}
    powers: dict = {}  # {(site, argument): (global site, power)}: read through a power
    global_sites: tuple = ()  # in the user's order
    param_paths: dict = {}  # {numpyro.param site: ParamPath} (jaxem.vb_params)
