"""The model built once: its enumerated trace traced once per input signature.

Every part of a compiled EM step needs the model's enumerated trace: the E-step,
each closed-form stage (and the VJP that pulls its statistics back to the params),
the gradient path's objective, the M-step plan, the checks after a fit. Running
the model's Python body for each of them made compiling one step of a
four-parameter mixture trace the model about ten times.

`BuiltModel` runs it once per input signature (the shapes, dtypes and weak
types of the params and array arguments, the static arguments, the plate nesting,
whether log-probabilities are built, the x64 mode, whether restarts run under
``vmap``) under ``jax.make_jaxpr``. The non-array parts of the resulting
`EnumTrace` (site names, dims, distribution classes, shapes,
constraints) are kept as they are; every later call evaluates the cached jaxpr on
its inputs and puts the results in place of the
arrays. The program that comes out is the one the model's body would have
staged, so results do not change. The jaxpr is called through one ``jax.jit`` of
it: with concrete inputs one compiled program evaluates it; inside ``jit``,
``vmap``, ``grad`` or ``vjp`` it is one call equation in the caller's trace, whose
derivative, batching and lowering JAX makes once per jaxpr and reuses (its caches
are keyed on the jaxpr), rather than every operation of the model bound again at
every evaluation: an EM step evaluates the model several times (the E-step, each
closed-form stage, every value and gradient of the gradient path), and tracing
and lowering it took that many times the model's operations. XLA inlines the
calls, so the compiled program is the one the model's body would have made.

Distributions are rebuilt from their ``__dict__`` (not from NumPyro's pytree
fields, which leave out lazily computed attributes and a user family's own), with
the sharing of the trace kept: the distribution a ``constructor_args`` record
holds is the one under the site, as `jaxem.mstep` checks by identity.

The cache lives on the object: a fitter builds one in its constructor and passes
it wherever the model goes (it is called like the model, and hashes and compares
as the model does, so caches keyed on the model treat both alike).
"""

from __future__ import annotations

import functools
import types
import weakref
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.extend.core import ClosedJaxpr, jaxpr_as_fun
from jax.interpreters import partial_eval as pe

from jaxem.arguments import merge_args, split_args
from jaxem.batching import restarts_active
from jaxem.chain import find_chain
from jaxem.exceptions import ModelError
from jaxem.inspection import ModelStructure, model_structure
from jaxem.numpyro_internals import inside_handler
from jaxem.tracing import EnumTrace, enumerated_traces

__all__ = ["BuiltModel", "built_model"]


def built_model(model) -> BuiltModel:
    """``model`` built (`BuiltModel`); a built model is returned as it is."""
    return model if isinstance(model, BuiltModel) else BuiltModel(model)


class BuiltModel:
    """A NumPyro model whose enumerated trace is traced once per input signature.

    Called like the model (any NumPyro handler can wrap it); passed as the model
    to `jaxem.tracing.enumerated_trace`, it answers from its cache.

    Args:
        model: the NumPyro model.
    """

    def __init__(self, model):
        self.model = model
        self._traces: dict = {}
        functools.update_wrapper(self, model, updated=())

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __hash__(self):
        return hash(self.model)

    def __eq__(self, other):
        other = other.model if isinstance(other, BuiltModel) else other
        return self.model == other

    def __repr__(self):
        return f"BuiltModel({self.model!r})"

    def has_chain(self) -> bool:
        """Whether a trace cached so far has a Markov chain (a ``scan``: `find_chain`);
        False before the first (and for a model whose traces are not cached)."""
        return any(getattr(c, "chain", False) for c in self._traces.values())

    def structure(self, args, kwargs) -> ModelStructure:
        """The model's `ModelStructure` for these arguments."""
        return model_structure(self.model, args, kwargs)

    def enumerated_trace(self, params, args, kwargs, max_plate_nesting, *, log_probs=True):
        """`jaxem.tracing.enumerated_trace` of the model, from the cache."""
        if inside_handler():
            # Inside another handler the model's sites go through it as well: its
            # effects cannot be cached with the trace.
            return self._direct(params, args, kwargs, max_plate_nesting, log_probs)
        arrays, spec = split_args(args, kwargs)
        return self.trace(params, arrays, spec, max_plate_nesting, log_probs=log_probs)

    def trace(self, params, arrays, spec, max_plate_nesting, *, log_probs=True) -> EnumTrace:
        """The enumerated trace at ``params`` for the model's array arguments ``arrays``
        and static ones ``spec`` (`jaxem.tracing.split_args`)."""
        leaves, treedef = jax.tree.flatten((params, list(arrays)))
        avals = tuple(_aval(x) for x in leaves)
        key = (
            spec,
            treedef,
            avals,
            max_plate_nesting,
            bool(log_probs),
            bool(jax.config.jax_enable_x64),
            # Under the restarts' vmap the rounding guards reduce their predicate
            # over the restarts (jaxem.batching): a different program.
            restarts_active(),
        )
        cached = self._traces.get(key)
        if cached is None:
            built = self._build(treedef, avals, spec, max_plate_nesting, log_probs)
            for kind, entry in built.items():  # the other kind too, from the same run
                self._traces.setdefault(key[:4] + (kind,) + key[5:], entry)
            cached = built[bool(log_probs)]
        if cached is _UNCACHED:
            args, kwargs = merge_args(arrays, spec)
            return self._direct(params, args, kwargs, max_plate_nesting, log_probs)
        return cached.evaluate(leaves)

    def _direct(self, params, args, kwargs, max_plate_nesting, log_probs):
        from jaxem.tracing import enumerated_trace

        return enumerated_trace(
            self.model, params, args, kwargs, max_plate_nesting, log_probs=log_probs
        )

    def _build(self, treedef, avals, spec, max_plate_nesting, log_probs) -> dict:
        """``{log_probs: cached entry}``: both kinds of trace (with and without
        log-probabilities) from one run of the model, the one without them
        evaluating only the part of the jaxpr it needs; a checks' trace without them
        and a fit's with them then cost one run. Where the log-probabilities cannot
        be built (a factor too large, a site that cannot be evaluated), a request
        without them gets its own run, as before; a request with them raises."""
        try:
            return self._build_both(treedef, avals, spec, max_plate_nesting)
        except Exception:  # noqa: BLE001
            if log_probs:
                raise
        return {False: self._build_without(treedef, avals, spec, max_plate_nesting)}

    def _build_both(self, treedef, avals, spec, max_plate_nesting) -> dict:
        found = []

        def traced(leaves):
            params, arrays = jax.tree.unflatten(treedef, leaves)
            args, kwargs = merge_args(arrays, spec)
            full, bare = enumerated_traces(self.model, params, args, kwargs, max_plate_nesting)
            outputs: list = []
            splitter = _Splitter(outputs)  # shared: the two traces share their arrays
            found.append((splitter.trace(full), splitter.trace(bare), _has_chain(full)))
            return outputs

        closed = self._jaxpr(traced, avals)
        if closed is _UNCACHED:
            return {True: _UNCACHED, False: _UNCACHED}
        full, bare, chain = found[0]
        used = _leaf_indices(bare)
        keep = [i in used for i in range(len(closed.jaxpr.outvars))]
        jaxpr, _ = pe.dce_jaxpr(closed.jaxpr, keep, instantiate=True)
        without = _Cached(ClosedJaxpr(jaxpr, closed.consts), bare, chain, sorted(used))
        return {True: _Cached(closed, full, chain), False: without}

    def _build_without(self, treedef, avals, spec, max_plate_nesting):
        found = []

        def traced(leaves):
            params, arrays = jax.tree.unflatten(treedef, leaves)
            args, kwargs = merge_args(arrays, spec)
            trace = self._direct(params, args, kwargs, max_plate_nesting, False)
            outputs: list = []
            found.append((_Splitter(outputs).trace(trace), _has_chain(trace)))
            return outputs

        closed = self._jaxpr(traced, avals)
        return closed if closed is _UNCACHED else _Cached(closed, *found[0])

    @staticmethod
    def _jaxpr(traced, avals):
        structs = [
            jax.ShapeDtypeStruct(shape, dtype, weak_type=weak) for shape, dtype, weak in avals
        ]
        try:
            closed = jax.make_jaxpr(traced)(structs)
        except _Unsupported:
            return _UNCACHED
        if any(isinstance(c, jax.core.Tracer) for c in closed.consts):
            return _UNCACHED  # the model closes over values of an enclosing trace
        return closed


def _has_chain(trace) -> bool:
    try:
        return find_chain(trace) is not None
    except ModelError:
        return True  # a scan jaxem refuses: the E-step raises, whatever the options


def _aval(x):
    aval = jax.typeof(x)
    return tuple(aval.shape), aval.dtype, bool(getattr(aval, "weak_type", False))


class _Unsupported(Exception):
    """A trace holds arrays where they cannot be put back (an object without a
    ``__dict__``, a subclass of a container): it is not cached."""


_UNCACHED = object()


class _Cached:
    """One signature's closed jaxpr and the skeleton of its trace. ``positions``: the
    skeleton's leaf index of each output, where the jaxpr was cut down to the
    outputs a skeleton uses (None: output i is leaf i)."""

    def __init__(self, closed, skeleton, chain, positions=None):
        self.closed = closed
        self.skeleton = skeleton
        self.chain = chain  # a Markov chain (jaxem.compiling.loop_options)
        self.positions = positions
        evaluate = jaxpr_as_fun(closed)

        def model_trace(*leaves):
            return evaluate(*leaves)

        # One jit for every evaluation, concrete or traced (see the module's docstring);
        # its calls are named ``model_trace`` in jaxprs, HLO and profiles.
        self.function = jax.jit(model_trace)

    def evaluate(self, leaves) -> EnumTrace:
        outputs = list(self.function(*leaves))
        if self.positions is not None:
            placed: list = [None] * (max(self.positions, default=-1) + 1)
            for position, output in zip(self.positions, outputs):
                placed[position] = output
            outputs = placed
        return _rebuild_trace(self.skeleton, outputs)


# ---------------------------------------------------------------------------
# Splitting a trace into its static skeleton and its arrays, and back.
# ---------------------------------------------------------------------------


class _Static(NamedTuple):
    value: Any


class _Leaf(NamedTuple):
    index: int


class _Seq(NamedTuple):
    make: Any
    items: list


class _Dict(NamedTuple):
    items: list


class _Object:
    """An object rebuilt from its ``__dict__`` (one node per object: sharing kept)."""

    def __init__(self, cls):
        self.cls = cls
        self.attrs: list = []


class _TraceSkeleton(NamedTuple):
    sites: Any
    records: list  # [(class node, arguments node, instance node)]
    weights: Any = None  # the node of the trace's case weights


_OPAQUE = (
    str,
    bytes,
    int,
    float,
    complex,
    bool,
    type(None),
    np.ndarray,
    np.generic,
    jax.Array,
    type,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    types.ModuleType,
    functools.partial,
)


class _Splitter:
    """Walks a trace, collecting the tracers (the jaxpr's outputs) in ``outputs``."""

    def __init__(self, outputs):
        self.outputs = outputs
        self.indices: dict = {}
        self.memo: dict = {}

    def trace(self, trace: EnumTrace) -> _TraceSkeleton:
        sites = self.walk(trace.sites)
        # Only the records of distributions under a site are ever looked up; the
        # others (those built inside a scan body) hold tracers of that body.
        records = [
            (self.walk(cls), self.walk(arguments), self.walk(instance))
            for cls, arguments, instance in trace.constructor_args.values()
            if id(instance) in self.memo
        ]
        return _TraceSkeleton(sites, records, self.walk(trace.weights))

    def walk(self, x):
        if isinstance(x, jax.core.Tracer):
            index = self.indices.get(id(x))
            if index is None:
                index = self.indices[id(x)] = len(self.outputs)
                self.outputs.append(x)
            return _Leaf(index)
        if isinstance(x, _OPAQUE) and not isinstance(x, (tuple, list, dict)):
            return _Static(x)
        if id(x) in self.memo:
            return self.memo[id(x)]
        if type(x) in (tuple, list) or (isinstance(x, tuple) and hasattr(x, "_fields")):
            items = [self.walk(item) for item in x]
            if all(isinstance(item, _Static) for item in items):
                return self._keep(x, _Static(x))
            make = type(x)._make if hasattr(x, "_fields") else type(x)
            return self._keep(x, _Seq(make, items))
        if type(x) is dict:
            items = [(k, self.walk(v)) for k, v in x.items()]
            if all(isinstance(v, _Static) for _, v in items):
                return self._keep(x, _Static(x))
            return self._keep(x, _Dict(items))
        if isinstance(x, (tuple, list, dict, set, frozenset)) or not hasattr(x, "__dict__"):
            if any(isinstance(leaf, jax.core.Tracer) for leaf in _shallow(x)):
                raise _Unsupported(type(x).__name__)
            return _Static(x)
        node = self._keep(x, _Object(type(x)))
        # In the order of the names, not of the __dict__: NumPyro's tree_unflatten sets
        # a distribution's fields in the order of a set, which changes from one process
        # to the next, and so would the jaxpr's outputs (see jaxem.sorted_fields).
        node.attrs = [(k, self.walk(v)) for k, v in sorted(vars(x).items())]
        if all(isinstance(v, _Static) for _, v in node.attrs):
            return self._keep(x, _Static(x))
        return node

    def _keep(self, x, node):
        self.memo[id(x)] = node
        return node


def _shallow(x):
    if isinstance(x, dict):
        return list(x.values())
    try:
        return list(x)
    except TypeError:
        return []


def _leaf_indices(node, found=None, seen=None) -> set:
    """The output indices a skeleton's leaves refer to."""
    found = set() if found is None else found
    seen = set() if seen is None else seen
    if isinstance(node, _Leaf):
        found.add(node.index)
    elif isinstance(node, _Static) or id(node) in seen:
        pass
    elif isinstance(node, _TraceSkeleton):
        for part in (node.sites, node.weights, *(n for record in node.records for n in record)):
            _leaf_indices(part, found, seen)
    else:
        seen.add(id(node))
        if isinstance(node, _Seq):
            children = node.items
        elif isinstance(node, _Dict):
            children = [v for _, v in node.items]
        else:
            children = [v for _, v in node.attrs]
        for child in children:
            _leaf_indices(child, found, seen)
    return found


def _rebuild_trace(skeleton: _TraceSkeleton, outputs: list) -> EnumTrace:
    memo: dict = {}
    sites = _rebuild(skeleton.sites, outputs, memo)
    records = {}
    for cls, arguments, instance in skeleton.records:
        instance = _rebuild(instance, outputs, memo)
        records[id(instance)] = (
            _rebuild(cls, outputs, memo),
            _rebuild(arguments, outputs, memo),
            instance,
        )
    return EnumTrace(sites, records, _rebuild(skeleton.weights, outputs, memo))


def _rebuild(node, outputs, memo):
    if isinstance(node, _Static):
        return node.value
    if isinstance(node, _Leaf):
        return outputs[node.index]
    if id(node) in memo:
        return memo[id(node)]
    if isinstance(node, _Seq):
        value = node.make([_rebuild(item, outputs, memo) for item in node.items])
    elif isinstance(node, _Dict):
        value = {k: _rebuild(v, outputs, memo) for k, v in node.items}
    else:
        value = object.__new__(node.cls)
        memo[id(node)] = value  # before the attributes: an object may refer to itself
        for name, attr in node.attrs:
            attr = _rebuild(attr, outputs, memo)
            # A weak reference (a transform's cached inverse) points at an object of
            # the trace the skeleton was made from: dropped, recomputed on demand.
            value.__dict__[name] = None if isinstance(attr, weakref.ReferenceType) else attr
        return value
    memo[id(node)] = value
    return value
