"""Model tracing and site classification.

Everything jaxem knows about a model comes from running it under NumPyro's
effect handlers:

* a seeded trace gives the ``numpyro.param`` sites (initial values and
  constraints), the plates and the kinds of the sample sites;
* an enumerated trace (NumPyro's ``enum`` with ``first_available_dim`` worked
  out from the plate nesting) gives one log-probability tensor per sample
  site, over the enumerated values of the discrete latents and the plates;
* while tracing, the constructor arguments of every distribution are
  recorded, so the M-step sees ``covariance_matrix=Sigma[z]`` as the user
  wrote it rather than the Cholesky factor NumPyro stores.
"""

from __future__ import annotations

import contextlib
import functools
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

from jaxem.arguments import check_init_params, is_array, merge_args, merge_init_params, split_args
from jaxem.chain import (
    chain_padding_problems,
    find_chain,
    labelled_scan_message,
    raise_for_chain_padding,
)
from jaxem.densities import site_log_prob
from jaxem.exceptions import ModelError
from jaxem.labels import known_labels_in_trace, restrict_to_labels
from jaxem.masks import (
    latent_mask_problems,
    mask_dtype_message,
    mask_of,
    raise_for_latent_masks,
    uniform_where_masked,
)
from jaxem.memory import check_enumeration_size
from jaxem.missing import MissingData, MissingEntries
from jaxem.numpyro_internals import (
    COERCIONS,
    UNOBSERVED_SUFFIX,
    distribution_mask,
    first_step_name,
    is_first_step,
    is_time_dim,
    time_dim_name,
)
from jaxem.scan import enumerated_scan
from jaxem.selection import dependencies
from jaxem.supports import argument_support, params_of_argument, raise_for_arguments
from jaxem.validation import (
    check_observed_site,
    check_values,
    core_family,
    describe_support,
    prior_sites,
    raise_for_invalid,
)

__all__ = [
    "ModelError",
    "ModelStructure",
    "EnumTrace",
    "Site",
    "split_args",
    "merge_args",
    "inspect_model",
    "model_structure",
    "validate",
    "raise_for_model_arguments",
    "enumerated_trace",
]


class ModelStructure(NamedTuple):
    """What a seeded trace of the model tells about it (static information).

    Attributes:
        param_names: names of the ``numpyro.param`` sites, in model order.
        constraints: ``{param name: constraint}``.
        latent_sites: names of the discrete latent sample sites, in model order.
        observed_sites: names of the observed sample sites.
        max_plate_nesting: number of batch dimensions used by plates.
    """

    param_names: tuple[str, ...]
    constraints: dict
    latent_sites: tuple[str, ...]
    observed_sites: tuple[str, ...]
    max_plate_nesting: int


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
    """The sample sites of an enumerated trace and the constructor arguments of
    their distributions (``{id(distribution): (class, {arg name: value})}``)."""

    sites: dict
    constructor_args: dict


# ---------------------------------------------------------------------------
# Seeded trace: params, plates, site kinds.
# ---------------------------------------------------------------------------


def _describe(fn) -> str:
    base = fn
    while hasattr(base, "base_dist"):
        base = base.base_dist
    return type(base).__name__


def _support_value(msg):
    if msg["type"] != "sample" or msg["is_observed"]:
        return None
    fn = msg["fn"]
    if not (fn.support.is_discrete and fn.has_enumerate_support):
        return None  # reported by inspect_model
    first = fn.enumerate_support(expand=False)[0]
    return jnp.broadcast_to(first, fn.shape(msg["kwargs"].get("sample_shape", ())))


def inspect_model(model, rng_key, args, kwargs, *, observed_values=False):
    """Run the model once under ``seed`` and classify its sites.

    Returns:
        ``(structure, initial_params)``: a :class:`ModelStructure` and the
        initial (constrained) values of the params, callable initial values
        called with keys derived from ``rng_key``, integer ones cast to the
        default float dtype (EM moves them continuously); with
        ``observed_values``, also ``{observed site: (distribution, data)}``.

    Raises:
        ModelError: no params, a param with a discrete constraint, a continuous
            or non-enumerable latent site, data whose shape is not the site's
            (:func:`jaxem.validation.check_observed_site`). Checks of values (NaN
            data, initial values outside their constraints) are in
            :func:`jaxem.validation.check_values`.
    """
    # Latent sites take a value of their support instead of a prior draw: the
    # trace is for params and structure, and sampling N labels would be staged
    # into every compiled program that inspects the model.
    no_sampling = handlers.substitute(MissingEntries(model), substitute_fn=_support_value)
    try:
        # NumPyro's own argument checks would reject an invalid initial value
        # without naming the param; jaxem's checks below do.
        with validation_enabled(False):
            tr = handlers.trace(handlers.seed(no_sampling, rng_key)).get_trace(*args, **kwargs)
    except ModelError:
        raise
    except ValueError as err:
        raise ModelError(
            mask_dtype_message(err) or f"jaxem: running the model failed: {err}"
        ) from err

    params, constraints_, latent, observed = {}, {}, [], []
    nesting = 0
    for name, site in tr.items():
        if site["type"] == "param":
            constraint = site["kwargs"].get("constraint", dist.constraints.real)
            params[name] = _float_param(name, site["value"], constraint)
            constraints_[name] = constraint
        elif site["type"] == "sample":
            for frame in site["cond_indep_stack"]:
                if frame.dim is not None:
                    nesting = max(nesting, -frame.dim)
            if site["is_observed"]:
                check_observed_site(name, site)
                observed.append(name)
                continue
            fn = site["fn"]
            if not fn.support.is_discrete:
                raise ModelError(
                    f"jaxem: latent sample site '{name}' ({_describe(fn)}) is continuous. EM "
                    "enumerates discrete latent sites only: observe it (obs=...), make it a "
                    "numpyro.param, or integrate it out of the model analytically."
                )
            if not fn.has_enumerate_support:
                raise ModelError(
                    f"jaxem: latent sample site '{name}' ({_describe(fn)}) is discrete but its "
                    "support cannot be enumerated (it is infinite or too large). Use a "
                    "distribution with finite support (e.g. Categorical over a truncated "
                    "range) or observe the site."
                )
            latent.append(name)
    if not params:
        raise ModelError(
            "jaxem: the model has no numpyro.param sites, so there are no parameters to fit. "
            "Declare each parameter with numpyro.param(name, init_value, constraint=...)."
        )
    labelled = [n for n in latent if n in known_labels_in_trace(tr)]
    if labelled:
        # The unobserved part of an obs_mask site that no site depends on is
        # dropped from the enumerated trace (enumerated_trace): observed data.
        kept = enumerated_trace(model, params, args, kwargs, nesting, log_probs=False).sites
        leaves = {n for n in labelled if n not in kept}
        observed = [n for n in tr if n in leaves or n in observed]
        latent = [n for n in latent if n not in leaves]
    structure = ModelStructure(tuple(params), constraints_, tuple(latent), tuple(observed), nesting)
    if observed_values:
        return structure, params, {n: (tr[n]["fn"], tr[n]["value"]) for n in observed}
    return structure, params


def _float_param(name, value, constraint):
    """An initial value in a float dtype: an integer one (``jnp.array([0, 1])``) would
    get no gradient (JAX's float0) and be truncated by every update."""
    if constraint.is_discrete:
        raise ModelError(
            f"jaxem: param '{name}' has the discrete constraint {constraint}. EM moves "
            "params continuously; a discrete unknown is a latent sample site (enumerated), "
            "a known one a model argument."
        )
    if jnp.issubdtype(jnp.result_type(value), jnp.inexact):
        return value
    return jnp.asarray(value, jnp.result_type(float))


def model_structure(model, args, kwargs) -> ModelStructure:
    """The :class:`ModelStructure` of a model, from an abstract trace.

    Nothing of the trace (initial values, latent samples) is staged into an
    enclosing ``jit``: only the static structure comes out. The structure depends
    on the arrays' shapes and dtypes alone, so it is traced once per model and
    signature (``run`` checks its inputs against it on every call).
    """
    arrays, spec = split_args(args, kwargs)
    leaves, treedef = jax.tree.flatten(arrays)
    signature = tuple((tuple(jnp.shape(a)), jnp.result_type(a)) for a in leaves)
    try:
        hash(model)
    except TypeError:  # a callable object without a hash: trace it every time
        return _trace_structure(model, spec, treedef, signature)
    return _cached_structure(model, spec, treedef, signature)


def _trace_structure(model, spec, treedef, signature) -> ModelStructure:
    found = []

    def structure_only(arrays):
        args, kwargs = merge_args(arrays, spec)
        structure, params = inspect_model(model, jax.random.PRNGKey(0), args, kwargs)
        found.append(structure)
        return params

    shapes = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in signature]
    jax.eval_shape(structure_only, jax.tree.unflatten(treedef, shapes))
    return found[0]


_cached_structure = functools.lru_cache(maxsize=256)(_trace_structure)


def mvn_sites_of_params(model, rng_key, args, kwargs, params) -> dict:
    """``{param: names of the MultivariateNormal observed sites whose arguments
    depend on it}``, params reaching no such site left out.

    Read from the jaxpr of ``params -> (loc, scale_tril)`` of every such site
    in a seeded trace (:func:`jaxem.selection.dependencies`, which follows
    calls and ``scan`` bodies; the stacked site of a ``scan`` body is one site
    there). Other control flow makes every output depend on every input: a
    param may be reported to reach more sites than it does, never fewer.
    """
    names = tuple(params)
    sites = []

    def site_args(values):
        fixed = handlers.substitute(MissingEntries(model), data=dict(zip(names, values)))
        no_sampling = handlers.substitute(fixed, substitute_fn=_support_value)
        with validation_enabled(False):
            tr = handlers.trace(handlers.seed(no_sampling, rng_key)).get_trace(*args, **kwargs)
        sites.clear()
        outputs = []
        for name, site in tr.items():
            fn = site["fn"] if site["type"] == "sample" and site["is_observed"] else None
            # The part of an obs_mask site that is missing as a whole scores nothing.
            if fn is None:
                continue
            if isinstance(fn, dist.MaskedDistribution) and distribution_mask(fn) is False:
                continue
            core = core_family(fn.base_dist if isinstance(fn, MissingData) else fn)
            if type(core) is dist.MultivariateNormal:
                sites.append(name)
                outputs.append((core.loc, core.scale_tril))
        return outputs

    closed = jax.make_jaxpr(site_args)([params[name] for name in names])
    labels = dependencies(closed, [{name: True} for name in names])
    reach = {}
    for index, site in enumerate(sites):
        for name in {**labels[2 * index], **labels[2 * index + 1]}:
            reach.setdefault(name, []).append(site)
    return {name: tuple(found) for name, found in reach.items()}


def validate(model, rng_key, arrays, spec, params=None, *, fitting=True, frozen=()):
    """Raise a :class:`ModelError` for bad data or parameter values.

    Checks the observed data (NaN or infinite entries, values outside the
    support, missing-data problems, sites that are priors rather than data)
    and the parameters: the model's initial values, overridden by ``params``
    (a partial or full ``{param name: value}``). One compiled check per model
    and argument signature (eager checks would compile op by op); skipped when
    any input is a tracer (under ``jit``/``vmap`` nothing can be raised).
    With ``fitting``, also a model with nothing observed and MultivariateNormal
    coordinates that the data never observe, for the params not ``frozen``
    (:func:`jaxem.validation.raise_for_invalid`). Distribution arguments outside
    their support are an error too (:func:`jaxem.supports.argument_support`).

    Returns:
        The :class:`jaxem.validation.Validity` found, None under ``jit``/``vmap``.
    """
    check_init_params(params)
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((rng_key, arrays, params))):
        return None
    try:
        hash(model)
    except TypeError:
        validity = _validity(model, spec, rng_key, arrays, params)
    else:
        validity = _validity_jit(model, spec, rng_key, arrays, params)
    args, kwargs = merge_args(arrays, spec)

    def support_of(site):
        # Only on the way to an error: the support's bounds may be arrays, concrete here.
        _, initial = inspect_model(model, rng_key, args, kwargs)
        fixed = handlers.substitute(model, data=merge_init_params(initial, params))
        _, _, sites = inspect_model(fixed, rng_key, args, kwargs, observed_values=True)
        return describe_support(sites[site][0])

    structure = model_structure(model, args, kwargs)
    raise_for_invalid(structure, validity, fitting=fitting, frozen=frozen, support_of=support_of)
    if any(int(count) for count, _ in validity.arguments.values()):
        _, initial = inspect_model(model, rng_key, args, kwargs)
        merged = merge_init_params(initial, params)
        when = "initial" if fitting else "given"
        raise_for_model_arguments(model, args, kwargs, merged, validity.arguments, when)
    try:
        hash(model)
    except TypeError:
        problems = _mask_problems(model, spec, rng_key, arrays, params)
    else:
        problems = _mask_problems_jit(model, spec, rng_key, arrays, params)
    for key, bad in problems.items():
        if key[0] == "chain":
            raise_for_chain_padding(bad, key[1], key[2])
    raise_for_latent_masks({key[1:]: bad for key, bad in problems.items() if key[0] == "latent"})
    return validity


def raise_for_model_arguments(model, args, kwargs, params, found, when: str) -> None:
    """The :class:`ModelError` of :func:`jaxem.supports.raise_for_arguments` for the
    arguments ``found`` outside their support at ``params`` (all of them, concrete),
    naming the params each depends on (read from the model's jaxpr)."""
    nesting = model_structure(model, args, kwargs).max_plate_nesting

    def trace_fn(values):
        return enumerated_trace(model, values, args, kwargs, nesting, log_probs=False)

    def family_of(site):
        return core_family(trace_fn(params).sites[site].fn)

    def params_of(site, arg):
        return params_of_argument(trace_fn, params, site, arg)

    raise_for_arguments(found, when, params_of, family_of)


def _mask_problems(model, spec, rng_key, arrays, params) -> dict:
    """Masked latents that are not padding, on concrete masks: ``{("chain", site,
    plates): per sequence}`` for a ``scan`` chain, else ``{("latent", masked,
    dependent): bool}`` (see :mod:`jaxem.masks`). Empty without masked latents."""
    args, kwargs = merge_args(arrays, spec)
    structure, initial = inspect_model(model, rng_key, args, kwargs)
    params = merge_init_params(initial, params)
    nesting = structure.max_plate_nesting
    trace = enumerated_trace(model, params, args, kwargs, nesting, log_probs=False)
    if all(s.is_observed or mask_of(s.fn) is None for s in trace.sites.values()):
        return {}
    # The log-probabilities name the time dim of a scan whose mask varies over time.
    trace = enumerated_trace(model, params, args, kwargs, nesting)
    chain = find_chain(trace)
    if chain is not None:
        plates = tuple(chain.plate_dims[d] for d in sorted(chain.plate_dims))
        return {("chain", chain.name, plates): chain_padding_problems(trace, chain)}
    return {("latent", *key): bad for key, bad in latent_mask_problems(trace).items()}


_mask_problems_jit = jax.jit(_mask_problems, static_argnums=(0, 1))


def _validity(model, spec, rng_key, arrays, params):
    args, kwargs = merge_args(arrays, spec)
    structure, initial = inspect_model(model, rng_key, args, kwargs)
    merged = merge_init_params(initial, params)
    # The sites at the params being checked: a support may depend on them.
    fixed = handlers.substitute(model, data=merged)
    _, _, sites = inspect_model(fixed, rng_key, args, kwargs, observed_values=True)
    reach = None
    if any(
        isinstance(fn, MissingData) and type(core_family(fn)) is dist.MultivariateNormal
        for fn, _ in sites.values()
    ):
        reach = mvn_sites_of_params(model, rng_key, args, kwargs, initial)
    priors = prior_sites(model, rng_key, arrays, spec, merged)
    try:
        nesting = structure.max_plate_nesting
        trace = enumerated_trace(model, merged, args, kwargs, nesting, log_probs=False)
        arguments = argument_support(trace)
    except Exception:  # noqa: BLE001
        # A model that cannot be enumerated: the enumerated trace that every entry
        # point builds next reports what is wrong with it in its own words.
        arguments = None
    return check_values(structure, merged, sites, reach, priors, arguments)


_validity_jit = jax.jit(_validity, static_argnums=(0, 1))


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
    """Run every ``scan`` by :func:`jaxem.scan.enumerated_scan`, its body under
    :class:`_StashArgs`."""

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
    keeps the compiled program small).
    """
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
    sites = {}
    latent_names = {
        n for n, site in tr.items() if site["type"] == "sample" and not site["is_observed"]
    }
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
        if not log_probs:
            sites[name] = Site(
                name, fn, value, None, dim_to_name, site["is_observed"], plates, plate_dims
            )
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
        if scale is not None and not is_identically_one(scale):
            if any(n in latent_names for n in dim_to_name.values()):
                raise ModelError(
                    f"jaxem: site '{name}' is scaled (numpyro.handlers.scale or a subsampled "
                    "plate) and depends on an enumerated latent. A scale there changes the "
                    "marginal likelihood itself (c * log sum_z p rather than log sum_z p^c), so "
                    "jaxem rejects it: remove the scale, or replicate weighted data points."
                )
            log_prob = scale * log_prob
        if name in labelled:
            log_prob = restrict_to_labels(log_prob, value, fn.event_dim, *labelled[name])
        if first_step_name(name) in tr:
            _name_time_dim(name, site, log_prob, dim_to_name, time_names)
        _check_site_shape(name, log_prob, dim_to_name, max_plate_nesting)
        sites[name] = Site(
            name, fn, value, log_prob, dim_to_name, site["is_observed"], plates, plate_dims
        )
    return EnumTrace(sites, records)


def _check_factor_sizes(tr, labelled, depended_on) -> None:
    """Refuse factors too large for memory (:mod:`jaxem.memory`) from their
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
