"""The enumerated trace: one log-probability tensor per sample site.

The model runs with its params substituted under NumPyro's ``enum`` (with
``first_available_dim`` worked out from the plate nesting), so each sample
site gives a log-probability tensor over the enumerated values of the
discrete latents and the plates (`enumerated_trace`). While tracing,
the constructor arguments of every distribution are recorded, so the M-step
sees ``covariance_matrix=Sigma[z]`` as the user wrote it rather than the
Cholesky factor NumPyro stores. Every ``scan`` runs as jaxem's first-order
scan (`jaxem.scan.enumerated_scan`).

The seeded trace that gives the params and the structure of a model is in
`jaxem.inspection`, the densities in `jaxem.densities`, the checks of
data and values in `jaxem.checks` and `jaxem.validation`.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.contrib.control_flow.scan import scan_wrapper
from numpyro.contrib.funsor import config_enumerate, enum
from numpyro.contrib.funsor.enum_messenger import trace as packed_trace
from numpyro.contrib.funsor.infer_util import plate_to_enum_plate
from numpyro.distributions.distribution import validation_enabled
from numpyro.distributions.util import is_identically_one
from numpyro.primitives import Messenger

from jaxem.arguments import is_array
from jaxem.chain import (
    labelled_scan_message,
)
from jaxem.densities import site_log_prob
from jaxem.exceptions import ModelError
from jaxem.labels import known_labels_in_trace, restrict_to_labels
from jaxem.masks import (
    uniform_where_masked,
)
from jaxem.memory import check_enumeration_size
from jaxem.missing import MissingData, MissingEntries
from jaxem.numpyro_internals import (
    COERCIONS,
    UNOBSERVED_SUFFIX,
    first_step_name,
    is_first_step,
    is_time_dim,
    time_dim_name,
)
from jaxem.scan import enumerated_scan
from jaxem.weights import CaseWeights, find_case_weights

__all__ = ["EnumTrace", "Site", "enumerated_trace", "enumerated_traces"]


class Site(NamedTuple):
    """One sample site of an enumerated trace.

    Attributes:
        name: site name.
        fn: the distribution (after NumPyro's plate broadcasting).
        value: observed data, or the enumerated support values of a latent.
        log_prob: log-probability tensor (scale applied), shaped by the
            enumeration dims and the plate dims.
        dim_to_name: ``{negative dim: enum variable or plate name}``.
        is_observed: whether the site is observed.
        plates: names of the plates the site sits in.
        plate_dims: ``{dim: plate name}`` of those plates, including plates of
            size 1 (which ``dim_to_name`` leaves out).
    """

    name: str
    fn: Any
    value: Any
    log_prob: Any
    dim_to_name: dict
    is_observed: bool
    plates: tuple[str, ...]
    plate_dims: dict = {}


class EnumTrace(NamedTuple):
    """The sample sites of an enumerated trace, the constructor arguments of
    their distributions (``{id(distribution): (class, {arg name: value})}``) and
    the case weights of its data plate (`jaxem.weights.CaseWeights`)."""

    sites: dict
    constructor_args: dict
    weights: CaseWeights | None = None  # a weighted data plate (jaxem.weights)


# ---------------------------------------------------------------------------
# Enumerated trace with recorded constructor arguments.
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def _record_constructor_args(records: dict):
    """Record the constructor arguments of every distribution built in the block.

    NumPyro's ``DistributionMeta`` consults ``COERCIONS`` before constructing a
    distribution (``handlers.collapse`` uses the same hook); this coercion builds
    the instance itself and keeps its bound arguments by ``id``.
    """

    def coerce(cls, args, kwargs):
        instance = type.__call__(cls, *args, **kwargs)
        try:
            bound = inspect.signature(cls).bind(*args, **kwargs)
            bound.apply_defaults()
            arguments = dict(bound.arguments)
        except TypeError:
            arguments = {}
        records[id(instance)] = (cls, arguments, instance)
        return instance

    COERCIONS.append(coerce)
    try:
        yield records
    finally:
        COERCIONS.remove(coerce)


@jax.tree_util.register_pytree_node_class
class _RecordedArgs:
    """Constructor arguments of one distribution, carried out of a ``scan`` body.

    Recorded arguments inside a ``lax.scan`` body are tracers of the body; as a
    pytree in the site's ``args`` slot (unused once a site has its value) they
    are stacked over time by the scan like the distribution itself.
    """

    def __init__(self, cls, arguments):
        self.cls = cls
        self.arguments = arguments

    def tree_flatten(self):
        keys = tuple(self.arguments)
        return tuple(self.arguments[k] for k in keys), (self.cls, keys)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(aux[0], dict(zip(aux[1], children)))


def _unwrap(fn):
    while isinstance(fn, (dist.ExpandedDistribution, dist.Independent, dist.MaskedDistribution)):
        fn = fn.base_dist
    return fn


class _StashArgs(Messenger):
    """Inside a scan body: put each sample site's recorded constructor arguments
    (array-valued ones) in its ``args`` slot."""

    def __init__(self, fn, records, labelled):
        self.records = records
        self.labelled = labelled
        super().__init__(fn)

    def process_message(self, msg):
        if msg["type"] != "sample":
            return
        if msg["name"].endswith(UNOBSERVED_SUFFIX) and isinstance(
            msg["fn"], dist.MaskedDistribution
        ):
            self.labelled.add(msg["name"][: -len(UNOBSERVED_SUFFIX)])
        # A latent site's value comes later from enumeration (config_enumerate
        # sits outside this handler); the slot is free once a site has a value.
        if msg["value"] is None and not msg["fn"].has_enumerate_support:
            return
        base = _unwrap(msg["fn"])
        record = self.records.get(id(base))
        if record is None or record[2] is not base:
            return
        arguments = {
            k: v
            for k, v in record[1].items()
            if is_array(v) or (isinstance(v, (int, float)) and not isinstance(v, bool))
        }
        msg["args"] = (_RecordedArgs(record[0], arguments),)


class _EnumeratedScan(Messenger):
    """Run every ``scan`` by `jaxem.scan.enumerated_scan`, its body under
    `_StashArgs`."""

    def __init__(self, fn, records):
        self.records = records
        # Sites with an obs_mask whose unobserved part is a latent of a scan body.
        self.labelled: set = set()
        super().__init__(fn)

    def process_message(self, msg):
        if msg["type"] == "control_flow" and msg["fn"] is scan_wrapper:
            body, *rest = msg["args"]
            msg["args"] = (_StashArgs(body, self.records, self.labelled), *rest)
            msg["fn"] = enumerated_scan


def _adopt_stacked_args(site, records) -> None:
    """Register the stacked constructor arguments of a scanned site under its
    (stacked) distribution, each argument's time axis placed at the site's time
    dim and its per-step batch dims right-aligned under the site's."""
    stash = site["args"][0] if len(site["args"]) == 1 else None
    if not isinstance(stash, _RecordedArgs) or is_first_step(site["name"]):
        return  # not in a scan body, or its first step (recorded as it ran)
    base, reinterpreted = site["fn"], 0
    if isinstance(base, MissingData):
        base = base.base_dist
    while isinstance(base, (dist.ExpandedDistribution, dist.Independent, dist.MaskedDistribution)):
        if isinstance(base, dist.Independent):
            reinterpreted += base.reinterpreted_batch_ndims
        base = base.base_dist
    if type(base) is not stash.cls:
        return
    # The time dim as NumPyro's scan places it; to_event dims are batch dims of
    # the base distribution, right of the site's.
    fn = site["fn"]
    time_ndim = min(len(fn.batch_shape), jnp.ndim(site["value"]) - fn.event_dim)
    batch_ndim = time_ndim + reinterpreted
    arguments = {}
    for name, value in stash.arguments.items():
        constraint = base.arg_constraints.get(name)
        try:
            event_ndim = constraint.event_dim if constraint is not None else 0
        except NotImplementedError:
            return
        value = jnp.asarray(value)
        step_batch_ndim = value.ndim - 1 - event_ndim
        pad = batch_ndim - 1 - step_batch_ndim
        if pad < 0:
            return
        arguments[name] = jnp.reshape(value, value.shape[:1] + (1,) * pad + value.shape[1:])
    records[id(base)] = (stash.cls, arguments, base)


def enumerated_trace(model, params, args, kwargs, max_plate_nesting, *, log_probs=True):
    """Trace ``model`` with ``params`` substituted and every latent enumerated.

    The discrete latents are enumerated in parallel in the dims left of the
    plates (``first_available_dim = -max_plate_nesting - 1``). Each site's
    log-probability tensor is computed unless ``log_probs`` is False (the
    M-step only needs distribution arguments; not building the densities
    keeps the compiled program small). A `jaxem.built.BuiltModel` answers
    from the trace it cached for these inputs' signature.
    """
    from jaxem.built import BuiltModel  # built.py builds on this module

    if isinstance(model, BuiltModel):
        return model.enumerated_trace(params, args, kwargs, max_plate_nesting, log_probs=log_probs)
    full, bare = _enumerated(model, params, args, kwargs, max_plate_nesting, log_probs)
    return full if log_probs else bare


def enumerated_traces(model, params, args, kwargs, max_plate_nesting):
    """``(enumerated_trace(..., log_probs=True), enumerated_trace(..., log_probs=False))``
    from one run of ``model`` (not a `jaxem.built.BuiltModel`: what it caches)."""
    return _enumerated(model, params, args, kwargs, max_plate_nesting, True)


def _enumerated(model, params, args, kwargs, max_plate_nesting, log_probs):
    """``(trace with log-probabilities or None without log_probs, trace without)``."""
    substituted = handlers.substitute(MissingEntries(model), data=params)
    records: dict = {}
    scans = _EnumeratedScan(substituted, records)
    enumerated = enum(config_enumerate(scans), first_available_dim=-max_plate_nesting - 1)
    # NumPyro's argument checks run eagerly on concrete arguments (each check a
    # small compiled program, seconds in all for a scan model); jaxem checks
    # data and params itself (check_values).
    with _record_constructor_args(records), plate_to_enum_plate(), validation_enabled(False):
        try:
            tr = packed_trace(enumerated).get_trace(*args, **kwargs)
        except ModelError:
            raise
        except (TypeError, ValueError) as err:
            # The known states of a scanned chain fail inside NumPyro's scan.
            if scans.labelled:
                raise ModelError(labelled_scan_message(min(scans.labelled))) from err
            if isinstance(err, TypeError):
                raise
            raise ModelError(_explain_trace_error(err)) from err
    for site in tr.values():
        if site["type"] == "sample":
            _adopt_stacked_args(site, records)
    labelled = known_labels_in_trace(tr)
    depended_on = {
        n
        for name, site in tr.items()
        if site["type"] == "sample"
        for n in site["infer"].get("dim_to_name", {}).values()
        if n != name
    }
    for name in scans.labelled:
        latent = name + UNOBSERVED_SUFFIX
        if {latent, first_step_name(latent)} & depended_on:
            raise ModelError(labelled_scan_message(name))
    if log_probs:
        _check_factor_sizes(tr, labelled, depended_on)
    sites, bare = {}, {}
    latent_names = {
        n for n, site in tr.items() if site["type"] == "sample" and not site["is_observed"]
    }
    case_weights = find_case_weights(tr, latent_names)
    time_names = {
        n
        for site in tr.values()
        for n in site.get("infer", {}).get("dim_to_name", {}).values()
        if is_time_dim(n)
    }
    for name, site in tr.items():
        if site["type"] != "sample":
            continue
        if name in labelled and name not in depended_on:
            # No site depends on the unobserved part: summed over its values, its
            # factor is exactly 1 (0 in log space), so it is left out.
            continue
        fn, value = site["fn"], site["value"]
        dim_to_name = dict(site["infer"].get("dim_to_name", {}))
        plates = tuple(f.name for f in site["cond_indep_stack"] if f.dim is not None)
        plate_dims = {f.dim: f.name for f in site["cond_indep_stack"] if f.dim is not None}
        bare[name] = Site(
            name, fn, value, None, dict(dim_to_name), site["is_observed"], plates, plate_dims
        )
        if not log_probs:
            continue
        try:
            if site["intermediates"]:
                log_prob = fn.log_prob(value, site["intermediates"])
            else:
                log_prob = site_log_prob(fn, value)
        except ValueError as err:
            raise ModelError(
                f"jaxem: cannot evaluate site '{name}': {err}. Check that the data of this "
                "site matches the shape of its plates and of its distribution."
            ) from err
        # A labelled latent (the unobserved part of an obs_mask site) keeps only the
        # label's cell where it is masked (restrict_to_labels), not K uniform ones.
        if not site["is_observed"] and name not in labelled:
            own = [d for d, n in dim_to_name.items() if n == name]
            log_prob = uniform_where_masked(log_prob, fn, own[0] if own else None)
        scale = site["scale"]
        # The sites of a weighted plate are weighted after their latents are summed
        # out (jaxem.weights), not here.
        weighted = case_weights is not None and case_weights.plate in plates
        if scale is not None and not is_identically_one(scale) and not weighted:
            log_prob = scale * log_prob
        if name in labelled:
            log_prob = restrict_to_labels(log_prob, value, fn.event_dim, *labelled[name])
        if first_step_name(name) in tr:
            _name_time_dim(name, site, log_prob, dim_to_name, time_names)
        _check_site_shape(name, log_prob, dim_to_name, max_plate_nesting)
        sites[name] = Site(
            name, fn, value, log_prob, dim_to_name, site["is_observed"], plates, plate_dims
        )
    without = EnumTrace(bare, records, case_weights)
    return (EnumTrace(sites, records, case_weights) if log_probs else None), without


def _check_factor_sizes(tr, labelled, depended_on) -> None:
    """Refuse factors too large for memory (`jaxem.memory`) from their
    shapes, before any is built: under ``jit`` this runs while tracing, so the
    error comes before a long compilation."""
    factors, latents, plates = {}, set(), set()
    for name, site in tr.items():
        if site["type"] != "sample" or (name in labelled and name not in depended_on):
            continue
        fn, value = site["fn"], site["value"]
        batch = jnp.shape(value)[: max(jnp.ndim(value) - fn.event_dim, 0)]
        try:
            shape = jnp.broadcast_shapes(tuple(fn.batch_shape), batch)
        except ValueError:
            continue  # reported when the factor is evaluated
        dim_to_name = site["infer"].get("dim_to_name", {})
        factors[name] = (shape, jnp.result_type(float), dim_to_name)
        if not site["is_observed"]:
            latents.add(name)
        plates.update(f.name for f in site["cond_indep_stack"] if f.dim is not None)
    check_enumeration_size(factors, latents, plates)


def _explain_trace_error(err: Exception) -> str:
    text = str(err)
    if "shape" in text or "broadcast" in text:
        return (
            f"jaxem: the model failed under enumeration: {text}. This usually means that "
            "data disagrees with the size of its plate: check that every observed array has "
            "the plate's size along the plate's dim."
        )
    return f"jaxem: the model failed under enumeration: {text}"


def _name_time_dim(name, site, log_prob, dim_to_name, time_names) -> None:
    """Name the time dim of a scanned site whose distribution is the same at
    every step but whose log-probability is not (a mask that varies): NumPyro
    names the time dim from the distribution's batch shape, where it has size 1."""
    fn = site["fn"]
    time_dim = -min(len(fn.batch_shape), jnp.ndim(site["value"]) - fn.event_dim)
    shape = jnp.shape(log_prob)
    if -time_dim <= len(shape) and shape[time_dim] != 1 and time_dim not in dim_to_name:
        dim_to_name[time_dim] = next(iter(sorted(time_names)), time_dim_name(name))


def _check_site_shape(name, log_prob, dim_to_name, max_plate_nesting) -> None:
    # Batch dims of a site beyond its plates and enumeration dims mean the data
    # has more dimensions than the model declares plates for.
    shape = jnp.shape(log_prob)
    for pos, size in enumerate(shape):
        dim = pos - len(shape)
        if size != 1 and dim not in dim_to_name:
            raise ModelError(
                f"jaxem: site '{name}' has batch shape {shape} but dim {dim} (size {size}) "
                "belongs to no plate. Wrap the site in a numpyro.plate for that dim, or declare "
                "the extra dims as event dims with .to_event()."
            )
