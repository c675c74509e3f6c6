"""Missing observations: marginalized exactly in the E-step.

An observed site may have missing entries in two ways:

* NumPyro's ``obs_mask`` (always honoured): NumPyro splits the site into an
  observed part, masked by ``obs_mask``, and a latent ``<name>_unobserved``
  part. A continuous latent part's density integrates to one, so jaxem drops
  it; the masked entries then simply drop out of the observed factor. A
  discrete latent part (the labels of a semi-supervised mixture) is enumerated
  like any discrete latent, and dropped only when no other site depends on
  it. ``obs_mask`` masks whole events (a row of a MultivariateNormal), as in
  NumPyro.
* NaN entries, when the model is wrapped with `nan_as_missing` (an
  explicit opt-in: without it NaN data stay an error, so a NaN typo never
  silently fits a different model). Entries are missing one by one, also
  inside an event: a MultivariateNormal row is scored by the marginal of its
  observed coordinates.

Missing entries are replaced by a value in the distribution's support before
any density is evaluated, so no NaN reaches values or gradients. The site's
distribution is wrapped in `MissingData`, which records which entries
are observed; the closed-form M-step of a MultivariateNormal then uses the
conditional moments of the missing coordinates given the observed ones
(`conditional_moments`). Everything happens per site, so it applies to
any model structure: mixtures, several latents, models with no latent at all.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from jax.scipy.linalg import cho_solve
from numpyro.primitives import Messenger

from jaxem.numpyro_internals import OBSERVED_SUFFIX, UNOBSERVED_SUFFIX, distribution_mask

__all__ = [
    "MissingData",
    "conditional_moments",
    "mask_like",
    "missing_log_prob",
    "nan_as_missing",
]


class MissingData(dist.Distribution):
    """A distribution whose value has missing entries, marginalized out.

    Args:
        base_dist: the site's distribution.
        observed: boolean array shaped like the value (batch and event dims):
            which entries are observed.
    """

    arg_constraints: dict = {}

    def __init__(self, base_dist, observed):
        self.base_dist = base_dist
        self.observed = observed
        super().__init__(base_dist.batch_shape, base_dist.event_shape)

    @property
    def support(self):
        return self.base_dist.support

    def sample(self, key, sample_shape=()):
        return self.base_dist.sample(key, sample_shape)

    def log_prob(self, value):
        return missing_log_prob(self.base_dist, self.observed, value)


def missing_log_prob(fn, observed, value):
    """Log-density of the observed entries of ``value`` (the others marginalized).

    Args:
        fn: the site's distribution (plate expansion, ``to_event`` and masks
            are unwrapped here).
        observed: boolean array broadcastable to ``value``'s shape.
        value: the data, missing entries filled with any value in the support.

    Returns:
        The log-density, shaped like ``fn.log_prob(value)``.
    """
    if isinstance(fn, dist.ExpandedDistribution):
        log_prob = missing_log_prob(fn.base_dist, observed, value)
        batch = jnp.shape(value)[: max(jnp.ndim(value) - fn.event_dim, 0)]
        return jnp.broadcast_to(log_prob, jnp.broadcast_shapes(fn.batch_shape, batch))
    if isinstance(fn, dist.MaskedDistribution):
        log_prob = missing_log_prob(fn.base_dist, observed, value)
        if distribution_mask(fn) is False:
            return jnp.zeros_like(log_prob)
        if distribution_mask(fn) is True:
            return log_prob
        return jnp.where(distribution_mask(fn), log_prob, 0.0)
    if isinstance(fn, dist.Independent):
        log_prob = missing_log_prob(fn.base_dist, observed, value)
        return jnp.sum(log_prob, axis=tuple(range(-fn.reinterpreted_batch_ndims, 0)))
    if type(fn) is dist.MultivariateNormal:
        observed = jnp.broadcast_to(observed, jnp.shape(value))
        return _masked_mvn_log_prob(fn.loc, fn.covariance_matrix, observed, value)
    if fn.event_dim:
        # A family without a closed-form marginal: an event is either observed
        # (all its entries) or missing. Partly missing events are reported
        # before fitting (tracing.check_values).
        observed = jnp.all(observed, axis=tuple(range(-fn.event_dim, 0)))
    return jnp.where(observed, fn.log_prob(value), 0.0)


# Up to this many coordinates, quantities that depend on a row only through its
# pattern of observed coordinates are computed once per possible pattern (2^D of
# them, a static number) and gathered per row by a one-hot contraction, instead
# of one D x D factorization per row.
_MAX_TABLE_DIM = 6


def _per_pattern(compute_fn, covariance, observed):
    """``compute_fn(covariance, observed)`` for every row, where the result depends
    on the row through its observed coordinates only.

    Rows are not grouped by their actual patterns (a data-dependent number of
    groups, which ``jit`` cannot shape): with few coordinates every possible
    pattern is computed and each row picks its own; otherwise each row is
    computed directly.
    """
    dim = covariance.shape[-1]
    num_patterns = 2**dim
    num_rows = math.prod(observed.shape[:-1])
    if dim > _MAX_TABLE_DIM or num_patterns > num_rows:
        return compute_fn(covariance, observed)
    bits = jnp.arange(dim)
    patterns = ((jnp.arange(num_patterns)[:, None] >> bits) & 1).astype(bool)
    table = compute_fn(covariance[..., None, :, :], patterns)
    index = jnp.sum(observed.astype(jnp.int32) << bits, axis=-1)
    one_hot = jax.nn.one_hot(index, num_patterns, dtype=covariance.dtype)
    return jax.tree.map(lambda t: _gather(one_hot, t, jnp.ndim(covariance) - 2), table)


def _gather(one_hot, table, cov_batch_ndim):
    """Row-wise entries of a per-pattern table (pattern axis after the covariance's
    batch dims), broadcast against the rows' batch dims."""
    event = "de"[: jnp.ndim(table) - cov_batch_ndim - 1]
    return jnp.einsum(f"...p,...p{event}->...{event}", one_hot, table)


def _observed_inverse(covariance, observed):
    """``(S_vv^-1 embedded in D x D, log det S_vv)`` for the observed coordinates v.

    ``A = M S M + (I - M)``, M the diagonal indicator of the observed
    coordinates, has inverse ``S_vv^-1`` on the observed block and the identity
    on the missing one, and ``log det A = log det S_vv``.
    """
    m = observed.astype(covariance.dtype)
    eye = jnp.eye(covariance.shape[-1], dtype=covariance.dtype)
    block = m[..., :, None] * covariance * m[..., None, :] + eye * (1 - m)[..., None, :]
    tril = jnp.linalg.cholesky(block)
    inverse = cho_solve((tril, True), jnp.broadcast_to(eye, tril.shape))
    log_det = 2 * jnp.sum(jnp.log(jnp.diagonal(tril, axis1=-2, axis2=-1)), axis=-1)
    return m[..., :, None] * inverse * m[..., None, :], log_det


def _masked_mvn_log_prob(loc, covariance, observed, value):
    """log N(x_v | mu_v, S_vv) for every row, v its observed coordinates."""
    inverse, log_det = _per_pattern(_observed_inverse, covariance, observed)
    residual = value - loc  # the inverse is zero on the missing coordinates
    quadratic = jnp.einsum("...d,...de,...e->...", residual, inverse, residual)
    num_observed = jnp.sum(observed, axis=-1).astype(log_det.dtype)
    return -0.5 * (quadratic + log_det + num_observed * jnp.log(2 * jnp.pi))


def _regression(covariance, observed):
    """``(S P, V)``: P = S_vv^-1 embedded, so row h of S P is S_hv S_vv^-1, and V the
    conditional covariance of the missing coordinates (zero on the observed ones)."""
    inverse, _ = _observed_inverse(covariance, observed)
    gain = covariance @ inverse
    missing = 1 - observed.astype(covariance.dtype)
    cov = missing[..., :, None] * (covariance - gain @ covariance) * missing[..., None, :]
    return gain, 0.5 * (cov + jnp.swapaxes(cov, -1, -2))


def conditional_moments(loc, covariance, observed, value):
    """Mean and covariance of the missing coordinates given the observed ones.

    For a row with observed coordinates v and missing ones h,

    $$
    m_h = \\mu_h + \\Sigma_{hv} \\Sigma_{vv}^{-1} (x_v - \\mu_v), \\qquad
    V_{hh} = \\Sigma_{hh} - \\Sigma_{hv} \\Sigma_{vv}^{-1} \\Sigma_{vh},
    $$

    and ``m_v = x_v``, ``V`` zero in the observed rows and columns, so that
    ``E[x] = m`` and ``E[x x^T] = m m^T + V``.

    Args:
        loc: ``(..., D)`` means.
        covariance: ``(..., D, D)`` covariances.
        observed: ``(..., D)`` boolean, which coordinates are observed.
        value: ``(..., D)`` data (missing coordinates filled with finite values).

    Returns:
        ``(m, V)`` shaped ``(..., D)`` and ``(..., D, D)`` (the broadcast batch).

    Examples:
        >>> import jax.numpy as jnp
        >>> cov = jnp.array([[1.0, 0.5], [0.5, 1.0]])
        >>> m, V = conditional_moments(jnp.zeros(2), cov, jnp.array([True, False]),
        ...                            jnp.array([2.0, 0.0]))
        >>> m.tolist(), V.tolist()
        ([2.0, 1.0], [[0.0, 0.0], [0.0, 0.75]])
    """
    gain, cov = _per_pattern(_regression, covariance, observed)
    mean = jnp.where(observed, value, loc + jnp.einsum("...de,...e->...d", gain, value - loc))
    return mean, cov


def mask_like(mask, shape):
    """An ``obs_mask`` as NumPyro stores it (broadcast to the distribution's
    batch shape, enumeration dims included) cut down to the data's ``shape``:
    the first entry along the dims where the data has none or size 1 (the mask
    comes from the data, so it does not vary along them)."""
    mask = jnp.asarray(mask)
    mask = mask[(0,) * max(jnp.ndim(mask) - len(shape), 0)]
    data_dims = shape[len(shape) - jnp.ndim(mask) :]
    return mask[tuple(slice(0, 1) if n == 1 else slice(None) for n in data_dims)]


def _fill(fn, value, observed):
    """Missing entries replaced by a point of the support: ``where`` on the data
    itself, so neither the density nor its gradient ever sees a NaN."""
    shape = jnp.shape(value)
    prototype = jnp.zeros(jnp.broadcast_shapes(fn.shape(), shape), jnp.result_type(value))
    fill = fn.support.feasible_like(prototype)
    # Dims along which the distribution varies but the data does not (enumerated
    # latents: left of the data's dims, or inside them for a scan's stacked
    # sites, whose data has a unit dim there): any entry.
    fill = fill[(0,) * (jnp.ndim(fill) - len(shape))]
    fill = fill[tuple(slice(0, 1) if n == 1 else slice(None) for n in shape)]
    # Likewise the mask of an obs_mask site, which NumPyro broadcasts to the
    # distribution's batch shape: the filled value keeps the data's shape (the
    # value NumPyro returns for a discrete site would otherwise carry the
    # enumeration dims of earlier latents into later steps of a markov loop).
    observed = mask_like(observed, shape)
    return jnp.where(observed, value, fill.astype(jnp.result_type(value)))


def _mask_outside(fn):
    """``Masked(Expanded(d), mask)`` for ``Expanded(Masked(d, mask))``: a plate outside
    an ``obs_mask`` that only broadcasts to it (shape (1,) against a plate of N) expands
    the masked distribution, where the split of the site below would miss the mask."""
    if isinstance(fn, dist.ExpandedDistribution) and isinstance(
        fn.base_dist, dist.MaskedDistribution
    ):
        mask = distribution_mask(fn.base_dist)
        if not isinstance(mask, bool):
            mask = jnp.broadcast_to(mask, fn.batch_shape)
        return fn.base_dist.base_dist.expand(fn.batch_shape).mask(mask)
    return fn


class MissingEntries(Messenger):
    """Handler that prepares observed sites with missing entries (see the module).

    Args:
        fn: the model.
        nan_sites: ``None`` (NaN is data, reported as an error before fitting),
            ``True`` (NaN is missing in every observed site) or a tuple of
            site names where NaN is missing.
    """

    def __init__(self, fn=None, nan_sites=None):
        self.nan_sites = nan_sites
        self._observed_parts = set()
        super().__init__(fn)

    def _nan_is_missing(self, name):
        if self.nan_sites is True:
            return True
        return bool(self.nan_sites) and name in self.nan_sites

    def process_message(self, msg):
        if msg["type"] != "sample" or msg["infer"].get("_jaxem_missing"):
            return
        fn, name = _mask_outside(msg["fn"]), msg["name"]
        if not msg["is_observed"]:
            # NumPyro's obs_mask: "<name>_unobserved" follows "<name>_observed" and
            # is masked to the missing events. Its density integrates to one:
            # an observed site with no weight, rather than a continuous latent.
            # A discrete part stays a latent and is enumerated (it may be the
            # label of a semi-supervised mixture, which later sites depend on):
            # jaxem.tracing.enumerated_trace restricts its known entries.
            base = name[: -len(UNOBSERVED_SUFFIX)]
            split = name.endswith(UNOBSERVED_SUFFIX) and base in self._observed_parts
            enumerable = fn.support.is_discrete and fn.has_enumerate_support
            if split and isinstance(fn, dist.MaskedDistribution) and not enumerable:
                prototype = jnp.zeros(fn.shape(), jnp.result_type(float))
                msg["value"] = fn.support.feasible_like(prototype)
                msg["fn"] = fn.mask(False)
                msg["is_observed"] = True
                msg["infer"]["_jaxem_missing"] = True
            return
        value = msg["value"]
        if isinstance(value, (list, tuple)):
            # Data given as a Python list, converted as by jnp.asarray (NumPyro
            # distributions take arrays only).
            value = jnp.asarray(value)
        msg["infer"]["_jaxem_missing"] = True
        if name.endswith(OBSERVED_SUFFIX) and isinstance(fn, dist.MaskedDistribution):
            self._observed_parts.add(name[: -len(OBSERVED_SUFFIX)])
            mask = distribution_mask(fn)
            if not isinstance(mask, bool):
                mask = jnp.reshape(mask, jnp.shape(mask) + (1,) * fn.event_dim)
                value = _fill(fn, value, mask)
        if self._nan_is_missing(name) and jnp.issubdtype(jnp.result_type(value), jnp.inexact):
            observed = ~jnp.isnan(value)
            value = _fill(fn, value, observed)
            fn = MissingData(fn, jnp.broadcast_to(observed, jnp.shape(value)))
        msg["value"], msg["fn"] = value, fn


class nan_as_missing:  # noqa: N801 (used like a function, as NumPyro's handlers)
    """Treat NaN entries of observed sites as missing values.

    The wrapped model is the same model with every NaN entry marginalized
    out: a missing discrete or univariate value drops out of its factor, a
    MultivariateNormal row is scored by the marginal of its observed
    coordinates, and the closed-form M-steps use the conditional expectations
    of the missing entries. Without the wrapper NaN data is an error.

    Args:
        model: a NumPyro model.
        sites: names of the observed sites where NaN means missing; default
            every observed site.

    Returns:
        A model (hashable, so ``jit`` caches keyed on it are reused).

    Examples:
        >>> import jax.numpy as jnp, numpyro, numpyro.distributions as dist
        >>> import jaxem
        >>> def model(x):
        ...     mu = numpyro.param("mu", jnp.zeros(2))
        ...     with numpyro.plate("data", x.shape[0]):
        ...         numpyro.sample("x", dist.MultivariateNormal(mu, jnp.eye(2)), obs=x)
        >>> x = jnp.array([[1.0, jnp.nan], [jnp.nan, 0.0]])
        >>> ll = jaxem.log_likelihood(jaxem.nan_as_missing(model), {"mu": jnp.zeros(2)}, x)
        >>> round(float(ll), 4)  # log N(1 | 0, 1) + log N(0 | 0, 1): NaN entries marginalized
        -2.3379
    """

    def __init__(self, model, sites=None):
        self.model = model
        self.sites = True if sites is None else tuple(sites)

    def __call__(self, *args, **kwargs):
        return MissingEntries(self.model, nan_sites=self.sites)(*args, **kwargs)

    def __eq__(self, other):
        return (
            isinstance(other, nan_as_missing)
            and self.model == other.model
            and self.sites == other.sites
        )

    def __hash__(self):
        return hash((nan_as_missing, self.model, self.sites))

    def __repr__(self):
        return f"nan_as_missing({self.model!r}, sites={self.sites!r})"
