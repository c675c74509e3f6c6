"""NumPyro's enumerated ``scan``, with the scanned steps evaluated all at once.

Under enumeration, the carry of a Markov chain's ``scan`` is the enumerated
support of the previous state, the same array at every step; the body then
depends on the step only through its slice of ``xs``. NumPyro nevertheless runs
the body in a ``lax.scan`` and stacks every site's distribution over time,
including arguments that do not vary (``mu[z]`` becomes T copies). Here the
body is traced once; outputs that depend on ``xs`` are evaluated under ``vmap``
over time, the others once, with a time dim of size 1 that broadcasts. When
the carry changes from step to step (e.g. an autoregressive model carrying
the previous observation), the steps run in ``lax.scan`` as in NumPyro.

Only first-order chains (``history=1``) scanned forward take this path
(`_first_order_scan`); it produces traces in the format of NumPyro's
enumerated scan, which `jaxem.chain` reads. Any other ``scan`` runs
NumPyro's own implementation.
"""

from __future__ import annotations

from contextlib import closing
from functools import partial

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from jax import lax
from jax.extend import core as jex_core
from numpyro import handlers
from numpyro.contrib.control_flow.scan import scan_enum, scan_wrapper
from numpyro.contrib.funsor import config_enumerate, enum, markov
from numpyro.contrib.funsor.enum_messenger import trace as packed_trace
from numpyro.distributions.batch_util import promote_batch_shape
from numpyro.ops.pytree import PytreeTrace
from numpyro.primitives import Messenger

from jaxem.exceptions import ModelError
from jaxem.numpyro_internals import (
    OBSERVED_SUFFIX,
    PREV_PREFIX,
    UNOBSERVED_SUFFIX,
    distribution_mask,
    is_first_step,
    promote_fn_shapes,
    promote_scanned_value_shapes,
    subs_wrapper,
    time_dim_name,
)
from jaxem.sorted_fields import with_distributions, with_sorted_fields

__all__ = ["enumerated_scan"]

# The handlers around a scan that reach its body (``substitute_stack``) and
# that the first-order scan applies itself.
_STEP_HANDLERS = ("condition", "substitute")


def enumerated_scan(
    f,
    init,
    xs,
    length,
    reverse,
    rng_key=None,
    substitute_stack=None,
    enum=False,
    history=1,
    first_available_dim=None,
):
    """Drop-in for NumPyro's ``scan_wrapper`` (the ``fn`` of a ``scan`` message)."""
    if length is None:
        length = jnp.shape(jax.tree.flatten(xs)[0][0])[0]
    if not (enum and history > 0):
        return scan_wrapper(
            f,
            init,
            xs,
            length,
            reverse,
            rng_key,
            substitute_stack,
            enum,
            history,
            first_available_dim,
        )
    substitute_stack = substitute_stack or []
    if length == 0:
        return _empty_scan(f, init, xs)
    first_order = (
        history == 1
        and length >= 1
        and not reverse
        and rng_key is None
        and all(kind in _STEP_HANDLERS for kind, _ in substitute_stack)
    )
    if not first_order:
        return scan_enum(
            f, init, xs, length, reverse, rng_key, substitute_stack, history, first_available_dim
        )
    return _first_order_scan(f, init, xs, length, substitute_stack, first_available_dim)


def _empty_scan(f, init, xs):
    """A scan of no steps (an HMM over ``x[1:]`` with one time step): no sites,
    the carry unchanged, and outputs with a leading dim of 0, shaped by running
    the body once, hidden, on zeros (NumPyro's own scan fails on it)."""
    x_step = jax.tree.map(lambda x: jnp.zeros(jnp.shape(x)[1:], jnp.result_type(x)), xs)
    with handlers.block():
        _, y = handlers.substitute(f, substitute_fn=_any_value)(init, x_step)
    ys = jax.tree.map(lambda y: jnp.zeros((0,) + jnp.shape(y), jnp.result_type(y)), y)
    return (0, None, init), (PytreeTrace({}), ys)


def _any_value(msg):
    if msg["type"] == "sample" and not msg["is_observed"]:
        return msg["fn"].sample(jax.random.PRNGKey(0))
    return None


def _first_order_scan(f, init, xs, length, substitute_stack, first_available_dim):
    """An enumerated first-order Markov ``scan``, traced as NumPyro traces it.

    NumPyro's sum-product over a scan pairs two sets of sites: those of the
    first step, recorded as they run under the names ``_PREV_<name>``, and
    those of the later steps, stacked over a leading time dim named
    ``_time_<first sample site>``. The later steps are enumerated in a dim
    frame nested in the first step's, so the latent of step t gets a
    different dim from that of step t - 1; the carry therefore ends with the
    dims of the first step after an odd number of steps and with those of the
    later steps after an even number.
    """
    later_carry_shapes = []

    def later_step(wrapped_carry, x):
        index, _, carry = wrapped_carry
        # Distributions take their values' batch rank here; the values (the
        # new carry among them) are padded only once stacked, by _name_time_dim,
        # so that the carry's shape is recorded as the step produced it.
        with promote_fn_shapes(), packed_trace() as trace:
            new_carry, y = _step_model(f, index, length, substitute_stack)(carry, x)
        if not later_carry_shapes:
            later_carry_shapes.append(_leaf_shapes(new_carry))
        # A scan's carry keeps its shape: same elements, the previous step's dims.
        new_carry = jax.tree.map(lambda a, b: jnp.reshape(a, jnp.shape(b)), new_carry, carry)
        return (index + 1, None, new_carry), (PytreeTrace(trace), y)

    # The later steps' sites leave through the returned trace, stacked; only
    # the first step's sites reach the handlers around the scan as they run.
    with (
        handlers.block(hide_fn=_not_first_step),
        enum(first_available_dim=first_available_dim),
    ):
        # One markov frame for the first step, one nested in it for the rest.
        dim_frames = iter(markov(range(2), history=1))
        with closing(dim_frames):
            next(dim_frames)
            with handlers.scope(prefix=PREV_PREFIX, divider="", hide_types=["plate"]):
                first_step = _step_model(f, 0, length, substitute_stack)
                carry, y_first = first_step(init, jax.tree.map(lambda x: x[0], xs))
            first_carry_shapes = _leaf_shapes(carry)
            y_first = jax.tree.map(lambda y: jnp.stack([y]), y_first)
            if length == 1:
                return (1, None, carry), (PytreeTrace({}), y_first)
            next(dim_frames)
            (num_steps, _, carry), (stacked, ys) = _scan_steps(
                later_step, (1, None, carry), jax.tree.map(lambda x: x[1:], xs), length - 1, False
            )

    _name_time_dim(stacked.trace)
    ys = jax.tree.map(
        lambda first, later: jnp.concatenate(
            [first, jnp.reshape(later, later.shape[:1] + first.shape[1:])]
        ),
        y_first,
        ys,
    )
    carry_shapes = first_carry_shapes if length % 2 else later_carry_shapes[0]
    leaves, tree = jax.tree.flatten(carry)
    carry = jax.tree.unflatten(
        tree, [jnp.reshape(leaf, shape) for leaf, shape in zip(leaves, carry_shapes)]
    )
    return (num_steps, None, carry), (stacked, ys)


def _step_model(f, index, length, substitute_stack):
    """The scan body at step ``index``, under the substitutions of the handlers
    around the scan, with its discrete latents enumerated."""
    # NumPyro's potential energy reads the step index to transform only the
    # step's slice of a scanned value.
    model = handlers.infer_config(
        _ObsMaskParts(_NoNestedScan(f)), config_fn=lambda msg: {"_scan_current_index": index}
    )
    for kind, source in substitute_stack:
        step_values = partial(subs_wrapper, source, index, length)
        if kind == "condition":
            model = handlers.condition(model, condition_fn=step_values)
        else:
            model = handlers.substitute(model, substitute_fn=step_values)
    return config_enumerate(model)


class _NoNestedScan(Messenger):
    """Reject a scan inside a scan body with a message in the user's terms
    (NumPyro's own fails on duplicated internal ``_PREV_`` names)."""

    def process_message(self, msg):
        if msg["type"] == "control_flow":
            raise ModelError(
                "jaxem: the model has a scan inside the body of another scan. jaxem contracts "
                "one first-order Markov chain per model: flatten the nested scans into one scan "
                "over the combined time steps, or write the outer loop as a plate if its "
                "iterations are independent."
            )


class _ObsMaskParts(Messenger):
    """The unobserved part of an ``obs_mask`` site in the scan body, as
    `jaxem.missing.MissingEntries` makes it outside a scan: an observed
    site of no weight (NumPyro would sample it, here with no random key).

    ``sample(name, fn, obs=x, obs_mask=m)`` is NumPyro's pair of sites
    ``<name>_observed`` (masked to ``m``) and ``<name>_unobserved`` (masked to
    ``~m``, a latent): the missing entries are marginalized, which for a
    site of the body means they score nothing.
    """

    def __init__(self, fn=None):
        self._observed_parts = set()
        super().__init__(fn)

    def process_message(self, msg):
        if msg["type"] != "sample":
            return
        name, fn = msg["name"], msg["fn"]
        if msg["is_observed"]:
            if name.endswith(OBSERVED_SUFFIX):
                self._observed_parts.add(name[: -len(OBSERVED_SUFFIX)])
            return
        base = name[: -len(UNOBSERVED_SUFFIX)]
        if name.endswith(UNOBSERVED_SUFFIX) and base in self._observed_parts:
            prototype = jnp.zeros(fn.shape(), jnp.result_type(float))
            msg["value"] = fn.support.feasible_like(prototype)
            msg["fn"] = fn.mask(False)
            msg["is_observed"] = True
            msg["infer"]["_jaxem_missing"] = True


def _not_first_step(site) -> bool:
    return not is_first_step(site.get("name") or "")


def _leaf_shapes(tree):
    return [jnp.shape(leaf) for leaf in jax.tree.leaves(tree)]


def _name_time_dim(trace) -> None:
    """Give the stacked sample sites of a scan their time dim: the leftmost
    batch dim once distribution and value have the same batch rank, named
    after the first sample site (dims of size 1 have no name to go by)."""
    time_name = None
    for name, site in trace.items():
        if site["type"] != "sample":
            continue
        time_name = time_name or time_dim_name(name)
        fn = _promote_masks(promote_batch_shape(site["fn"]))
        value = promote_scanned_value_shapes(site["value"], fn)
        batch_ndim = min(len(fn.batch_shape), jnp.ndim(value) - fn.event_dim)
        site["fn"], site["value"] = fn, value
        site["infer"]["dim_to_name"][-batch_ndim] = time_name


def _promote_masks(fn):
    """``fn`` with the batch shape of its masks: NumPyro's ``promote_batch_shape``
    takes a masked distribution's batch shape from its base distribution alone.

    Here the steps of a site's distribution are stacked leaf by leaf, and a
    leaf that is the same at every step keeps a time dim of size 1: a mask
    that varies over time inside a distribution that does not (a mask of shape
    (1,) broadcast over a plate, ``Expanded(Masked(d, mask))``) must give the
    whole distribution its time dim, as NumPyro's own scan (which stacks every
    leaf T times) does.
    """
    if isinstance(fn, dist.MaskedDistribution):
        base = _promote_masks(fn.base_dist)
        mask = distribution_mask(fn)
        if isinstance(mask, bool):
            return base.mask(mask) if base is not fn.base_dist else fn
        return dist.MaskedDistribution(base, mask)
    if isinstance(fn, dist.ExpandedDistribution):
        base = _promote_masks(fn.base_dist)
        if base.batch_shape == fn.base_dist.batch_shape:
            return fn
        return base.expand(jnp.broadcast_shapes(fn.batch_shape, base.batch_shape))
    if isinstance(fn, dist.Independent):
        base = _promote_masks(fn.base_dist)
        if base is fn.base_dist:
            return fn
        return dist.Independent(base, fn.reinterpreted_batch_ndims)
    return fn


def _depends_on(jaxpr, sources):
    """For each output of a jaxpr, whether it depends on any of ``sources``."""
    tainted = set(sources)
    for eqn in jaxpr.eqns:
        if any(not isinstance(v, jex_core.Literal) and v in tainted for v in eqn.invars):
            tainted.update(eqn.outvars)
    return [not isinstance(v, jex_core.Literal) and v in tainted for v in jaxpr.outvars]


def _scan_steps(body_fn, wrapped_carry, xs, length, reverse):
    """``lax.scan(body_fn, wrapped_carry, xs, length, reverse)``, evaluated for all
    steps at once when the carry is the same at every step.

    The body is traced once. Its new carry must be computed from constants
    alone (the enumerated support of the step's latent, as for a Markov
    chain): not from the step's inputs, the incoming carry or any traced value
    such as a parameter. It is then the same at every step, the incoming
    carry of the first scanned step included (the previous step ran the same
    body), and the body is a function of the step's slice of ``xs`` only.
    """
    i, rng_key, carry = wrapped_carry
    if rng_key is not None or reverse:
        return lax.scan(body_fn, wrapped_carry, xs, length, reverse)
    x_leaves, x_tree = jax.tree.flatten(xs)
    carry_ids = {id(leaf) for leaf in jax.tree.leaves(carry)}
    trees = []

    def step(index, *x_step):
        (_, _, new_carry), (pytree_trace, y) = body_fn(
            (index, None, carry), jax.tree.unflatten(x_tree, x_step)
        )
        # Distributions' fields in the order of their names: the same program in every
        # process (see jaxem.sorted_fields).
        parts = [jax.tree.flatten(p) for p in (new_carry, with_sorted_fields(pytree_trace), y)]
        trees.append([tree for _, tree in parts])
        return [leaf for leaves, _ in parts for leaf in leaves]

    index = jax.ShapeDtypeStruct((), jnp.int32)
    x_step = [jax.ShapeDtypeStruct(jnp.shape(x)[1:], jnp.result_type(x)) for x in x_leaves]
    closed = jax.make_jaxpr(step)(index, *x_step)
    carry_tree, trace_tree, y_tree = trees[-1]
    num_carry, num_trace = carry_tree.num_leaves, trace_tree.num_leaves
    jaxpr = closed.jaxpr
    traced_consts = [
        v
        for v, c in zip(jaxpr.constvars, closed.consts)
        if isinstance(c, jax.core.Tracer) or id(c) in carry_ids
    ]
    if any(_depends_on(jaxpr, list(jaxpr.invars) + traced_consts)[:num_carry]):
        return lax.scan(body_fn, wrapped_carry, xs, length, reverse)
    varies = _depends_on(jaxpr, jaxpr.invars)
    run = jex_core.jaxpr_as_fun(closed)
    once = run(jnp.asarray(i, jnp.int32), *[x[0] for x in x_leaves])
    steps = jnp.asarray(i, jnp.int32) + jnp.arange(length, dtype=jnp.int32)
    stepped = jax.vmap(run)(steps, *x_leaves) if any(varies) else None
    # The time dim of the trace is the length of the chain only if some site varies.
    any_site_varies = any(varies[num_carry : num_carry + num_trace])
    outputs = []
    for pos, leaf in enumerate(once):
        if varies[pos]:
            outputs.append(stepped[pos])
        elif pos < num_carry + num_trace and any_site_varies:
            outputs.append(jnp.expand_dims(leaf, 0))  # one step, broadcast over time
        else:
            outputs.append(jnp.broadcast_to(leaf, (length,) + jnp.shape(leaf)))
    pytree_trace = with_distributions(
        jax.tree.unflatten(trace_tree, outputs[num_carry : num_carry + num_trace])
    )
    ys = jax.tree.unflatten(y_tree, outputs[num_carry + num_trace :])
    return (i + length, rng_key, carry), (pytree_trace, ys)
