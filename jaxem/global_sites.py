"""Global sites: sample sites that are parameters with priors (MAP-EM).

A NumPyro model written for NUTS declares its parameters as sample sites with
priors (``w = numpyro.sample("w", dist.Dirichlet(...))``). Named in
``global_sites=(...)``, such a site is a parameter to EM: a point value inside
the prior's support, whose prior density is one more factor of the joint. The
fitters then maximize ``log p(x | theta) + log p(theta)`` (MAP-EM).

The model is wrapped (`with_global_sites`) by a handler that marks each
global site observed: wherever jaxem substitutes the params (every enumerated
trace), the site's value is the param's and its log-probability the log prior,
a factor with no latent dims. So the E-step's log Z is the log joint, the
gradient path's Q includes the log prior, and its stationarity is that of the
log posterior, with no change to those modules. Where nothing is substituted (the
seeded trace that gives initial values), NumPyro draws the site from its prior.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpyro.distributions as dist
from numpyro.primitives import Messenger

from jaxem.conjugate import core_distribution
from jaxem.exceptions import ModelError

__all__ = [
    "GlobalSiteModel",
    "check_global_sites",
    "global_site_names",
    "log_prior_of_trace",
    "with_global_sites",
]


class _MarkGlobal(Messenger):
    """Mark the global sites observed (their value is a param's, or a prior draw)."""

    def __init__(self, fn, names):
        self.names = names
        super().__init__(fn)

    def process_message(self, msg):
        if msg["type"] == "sample" and msg["name"] in self.names:
            if msg["is_observed"]:
                raise ModelError(
                    f"jaxem: global site '{msg['name']}' is observed (obs=...): its value is "
                    "data, not a parameter. Leave it out of global_sites."
                )
            if isinstance(core_distribution(msg["fn"]), dist.ImproperUniform):
                # NumPyro cannot draw from it (a bare NotImplementedError), and it is
                # no prior: a flat log density of 0 is a param's.
                raise ModelError(
                    f"jaxem: global site '{msg['name']}' has an improper prior "
                    "(ImproperUniform): a global site is a parameter with a prior, which "
                    "jaxem draws its starting value from and adds to the objective. Give "
                    f"it a proper prior, or declare it numpyro.param('{msg['name']}', "
                    "init_value, constraint=...) (a flat prior: maximum likelihood)."
                )
            msg["is_observed"] = True


class GlobalSiteModel:
    """A model whose sample sites ``global_sites`` are parameters with priors.

    Called like the model; ``global_sites`` is read by the inspection of the model
    (`global_site_names`).

    Args:
        model: the NumPyro model.
        global_sites: names of its sample sites that are parameters.
    """

    def __init__(self, model, global_sites):
        self.model = model
        self.global_sites = tuple(global_sites)
        self._names = frozenset(self.global_sites)
        functools.update_wrapper(self, model, updated=())  # the model's signature

    def __call__(self, *args, **kwargs):
        with _MarkGlobal(None, self._names):
            return self.model(*args, **kwargs)

    def __hash__(self):
        return hash((self.model, self.global_sites))

    def __eq__(self, other):
        return (
            isinstance(other, GlobalSiteModel)
            and self.model == other.model
            and self.global_sites == other.global_sites
        )

    def __repr__(self):
        return f"GlobalSiteModel({self.model!r}, global_sites={self.global_sites})"


def with_global_sites(model, global_sites):
    """``model`` with its sample sites ``global_sites`` taken as parameters; the
    model itself when there are none.

    ``EM(model, global_sites=...)`` fits this model. Passed to
    [`jaxem.log_likelihood`][jaxem.log_likelihood], [`jaxem.posterior`][jaxem.posterior],
    [`jaxem.map_assignment`][jaxem.map_assignment], [`jaxem.bic`][jaxem.bic] or
    [`jaxem.aic`][jaxem.aic] with a
    MAP fit's params, it evaluates the model at the global sites' values:
    ``log_likelihood`` is the data's, ``log p(x | params)``, without the prior.

    Examples:
        >>> import jax.numpy as jnp, numpyro, numpyro.distributions as dist
        >>> import jaxem
        >>> def model(x):
        ...     mu = numpyro.sample("mu", dist.Normal(jnp.zeros(2), 10.0).to_event(1))
        ...     with numpyro.plate("data", x.shape[0]):
        ...         z = numpyro.sample("z", dist.Categorical(jnp.array([0.5, 0.5])))
        ...         numpyro.sample("x", dist.Normal(mu[z], 1.0), obs=x)
        >>> x, params = jnp.array([-1.0, 1.0]), {"mu": jnp.array([-1.0, 1.0])}
        >>> ll = jaxem.log_likelihood(jaxem.with_global_sites(model, ("mu",)), params, x)
        >>> round(float(ll), 4)
        -2.9703

    Raises:
        TypeError: ``global_sites`` is a string or holds something else than names.
    """
    if isinstance(global_sites, str):
        raise TypeError(
            f"global_sites must be a sequence of site names, got the string {global_sites!r}: "
            f"write global_sites=({global_sites!r},)"
        )
    names = tuple(global_sites or ())
    if not all(isinstance(n, str) for n in names):
        raise TypeError(f"global_sites must hold site names (strings), got {names!r}")
    if not names:
        return model
    return GlobalSiteModel(model, names)


def global_site_names(model) -> tuple[str, ...]:
    """The global sites of a model (`GlobalSiteModel`, possibly wrapped by
    `jaxem.built.BuiltModel`); ``()`` for a plain model."""
    seen = set()
    while model is not None and id(model) not in seen:
        seen.add(id(model))
        if isinstance(model, GlobalSiteModel):
            return model.global_sites
        # A BuiltModel holds the model as .model, a NumPyro handler as .fn.
        inner = getattr(model, "model", None)
        if not callable(inner):
            inner = getattr(model, "fn", None)
        model = inner if callable(inner) else None
    return ()


def check_global_sites(names, trace) -> None:
    """Named errors for global sites that cannot be parameters, from a seeded trace
    (``{name: site}``) of the wrapped model: a name that is no sample site, an
    observed or discrete site, a site inside a plate that holds data."""
    samples = {n: s for n, s in trace.items() if s["type"] == "sample"}
    params = [n for n, s in trace.items() if s["type"] == "param"]
    for name in names:
        if name in params:
            raise ModelError(
                f"jaxem: global_sites names '{name}', which is a numpyro.param site: it is "
                "already a parameter (without a prior). Leave it out of global_sites, or make "
                f"it a sample site with a prior: numpyro.sample('{name}', prior)."
            )
        if name not in samples:
            choices = ", ".join(f"'{n}'" for n in samples) or "none"
            raise ModelError(
                f"jaxem: global_sites names '{name}', which is not a sample site of the model "
                f"(its sample sites: {choices}). Name the sample sites whose values are "
                "parameters with priors."
            )
    data_plates = {
        frame.name: n
        for n, site in samples.items()
        if n not in names
        for frame in site["cond_indep_stack"]
        if frame.dim is not None
    }
    for name in names:
        site = samples[name]
        fn = site["fn"]
        if fn.support.is_discrete:
            raise ModelError(
                f"jaxem: global site '{name}' has a discrete prior ({type(fn).__name__}); EM "
                "moves parameters continuously. A discrete unknown is a latent site: leave it "
                "out of global_sites and EM enumerates it."
            )
        for frame in site["cond_indep_stack"]:
            if frame.name in data_plates:
                raise ModelError(
                    f"jaxem: global site '{name}' is inside plate '{frame.name}', which also "
                    f"holds site '{data_plates[frame.name]}': a global site is one parameter "
                    "for the whole data set, while a site in the data's plate has one value "
                    f"per observation. Move '{name}' out of that plate (a plate of its own "
                    "gives one value per component), or leave it out of global_sites (a "
                    "per-observation continuous latent is fitted by jaxem.MCEM or jaxem.SAEM)."
                )


def log_prior_of_trace(trace, names):
    """The log prior: the sum of the global sites' log-probabilities in an
    enumerated trace (`jaxem.tracing.EnumTrace`) at the params."""
    # A Python float: without global sites, adding it keeps the dtype of a value.
    total = 0.0
    for name in names:
        site = trace.sites.get(name)
        if site is not None:
            total = total + jnp.sum(site.log_prob)
    return total
