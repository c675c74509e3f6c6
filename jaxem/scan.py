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

``_scan_enum`` is NumPyro's ``numpyro.contrib.control_flow.scan.scan_enum``
(Copyright Contributors to the Pyro project, Apache-2.0), unchanged except for
the call of :func:`_scan_steps` in place of ``lax.scan``.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax, random
from jax.extend import core as jex_core
from numpyro import handlers
from numpyro.contrib.control_flow.scan import (
    _promote_fn_shapes,
    _promote_scanned_value_shapes,
    _subs_wrapper,
    scan_wrapper,
)
from numpyro.distributions.batch_util import promote_batch_shape
from numpyro.ops.pytree import PytreeTrace
from numpyro.util import not_jax_tracer

__all__ = ["enumerated_scan"]


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
    if enum and history > 0:
        return _scan_enum(
            f, init, xs, length, reverse, rng_key, substitute_stack, history, first_available_dim
        )
    return scan_wrapper(
        f, init, xs, length, reverse, rng_key, substitute_stack, enum, history, first_available_dim
    )


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
        parts = [jax.tree.flatten(part) for part in (new_carry, pytree_trace, y)]
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
    pytree_trace = jax.tree.unflatten(trace_tree, outputs[num_carry : num_carry + num_trace])
    ys = jax.tree.unflatten(y_tree, outputs[num_carry + num_trace :])
    return (i + length, rng_key, carry), (pytree_trace, ys)


def _scan_enum(
    f,
    init,
    xs,
    length,
    reverse,
    rng_key=None,
    substitute_stack=None,
    history=1,
    first_available_dim=None,
):
    from numpyro.contrib.funsor import (
        config_enumerate,
        enum,
        markov,
    )
    from numpyro.contrib.funsor import (
        trace as packed_trace,
    )

    if substitute_stack is None:
        substitute_stack = []

    # amount number of steps to unroll
    history = min(history, length)
    unroll_steps = min(2 * history - 1, length)
    if reverse:
        x0 = jax.tree.map(lambda x: x[-unroll_steps:][::-1], xs)
        xs_ = jax.tree.map(lambda x: x[:-unroll_steps], xs)
    else:
        x0 = jax.tree.map(lambda x: x[:unroll_steps], xs)
        xs_ = jax.tree.map(lambda x: x[unroll_steps:], xs)

    carry_shapes = []

    def body_fn(wrapped_carry, x, prefix=None):
        i, rng_key, carry = wrapped_carry
        init = True if (not_jax_tracer(i) and i in range(unroll_steps)) else False
        rng_key, subkey = random.split(rng_key) if rng_key is not None else (None, None)

        # we need to tell unconstrained messenger in potential energy computation
        # that only the item at time `i` is needed when transforming
        fn = handlers.infer_config(f, config_fn=lambda msg: {"_scan_current_index": i})

        seeded_fn = handlers.seed(fn, subkey) if subkey is not None else fn
        for subs_type, subs_map in substitute_stack:
            subs_fn = partial(_subs_wrapper, subs_map, i, length)
            if subs_type == "condition":
                seeded_fn = handlers.condition(seeded_fn, condition_fn=subs_fn)
            elif subs_type == "substitute":
                seeded_fn = handlers.substitute(seeded_fn, substitute_fn=subs_fn)

        if init:
            # handler the name to match the pattern of sakkar_bilmes product
            with handlers.scope(
                prefix="_PREV_" * (unroll_steps - i), divider="", hide_types=["plate"]
            ):
                new_carry, y = config_enumerate(seeded_fn)(carry, x)
                trace = {}
        else:
            # Like scan_wrapper, we collect the trace of scan's transition function
            # `seeded_fn` here. To put time dimension to the correct position, we need to
            # promote shapes to make `fn` and `value`
            # at each site have the same batch dims (e.g. if `fn.batch_shape = (2, 3)`,
            # and value's batch_shape is (3,), then we promote shape of
            # value so that its batch shape is (1, 3)).
            # Here we will promote `fn` shape first. `value` shape will be promoted after scanned.
            # We don't promote `value` shape here because we need to store carry shape
            # at this step. If we reshape the `value` here, output carry might get wrong shape.
            with _promote_fn_shapes(), packed_trace() as trace:
                new_carry, y = config_enumerate(seeded_fn)(carry, x)

            # store shape of new_carry at a global variable
            if len(carry_shapes) < (history + 1):
                carry_shapes.append([jnp.shape(x) for x in jax.tree.flatten(new_carry)[0]])
            # make new_carry have the same shape as carry
            # FIXME: is this rigorous?
            new_carry = jax.tree.map(lambda a, b: jnp.reshape(a, jnp.shape(b)), new_carry, carry)
        return (i + 1, rng_key, new_carry), (PytreeTrace(trace), y)

    with (
        handlers.block(hide_fn=lambda site: not site.get("name", "nameless").startswith("_PREV_")),
        enum(first_available_dim=first_available_dim),
    ):
        wrapped_carry = (0, rng_key, init)
        y0s = []
        # We run unroll_steps + 1 where the last step is used for rolling with `lax.scan`
        for i in markov(range(unroll_steps + 1), history=history):
            if i < unroll_steps:
                wrapped_carry, (_, y0) = body_fn(wrapped_carry, jax.tree.map(lambda z: z[i], x0))  # noqa: B023
                if i > 0:
                    # reshape y1, y2,... to have the same shape as y0
                    y0 = jax.tree.map(lambda z0, z: jnp.reshape(z, jnp.shape(z0)), y0s[0], y0)
                y0s.append(y0)
                # shapes of the first `history - 1` steps are not useful to interpret the last carry
                # shape so we don't need to record them here
                if (i >= history - 1) and (len(carry_shapes) < history + 1):
                    carry_shapes.append(
                        [jnp.shape(x) for x in jax.tree.flatten(wrapped_carry[-1])[0]]
                    )
            else:
                # this is the last rolling step
                y0s = jax.tree.map(lambda *z: jnp.stack(z, axis=0), *y0s)
                # return early if length = unroll_steps
                if length == unroll_steps:
                    return wrapped_carry, (PytreeTrace({}), y0s)
                wrapped_carry, (pytree_trace, ys) = _scan_steps(
                    body_fn, wrapped_carry, xs_, length - unroll_steps, reverse
                )

    first_var = None
    for name, site in pytree_trace.trace.items():
        # currently, we only record sample or deterministic in the trace
        # we don't need to adjust `dim_to_name` for deterministic site
        if site["type"] not in ("sample",):
            continue
        # add `time` dimension, the name will be '_time_{first variable in the trace}'
        if first_var is None:
            first_var = name

        site["fn"] = promote_batch_shape(site["fn"])
        # we haven't promote shapes of values yet during `lax.scan`, so we do it here
        site["value"] = _promote_scanned_value_shapes(site["value"], site["fn"])

        # Note: site['infer']['dim_to_name'] is not enough to determine leftmost dimension because
        # we don't record 1-size dimensions in this field
        time_dim = -min(len(site["fn"].batch_shape), jnp.ndim(site["value"]) - site["fn"].event_dim)
        site["infer"]["dim_to_name"][time_dim] = f"_time_{first_var}"

    # similar to carry, we need to reshape due to shape alternating in markov
    ys = jax.tree.map(lambda z0, z: jnp.reshape(z, z.shape[:1] + jnp.shape(z0)[1:]), y0s, ys)
    # then join with y0s
    ys = jax.tree.map(lambda z0, z: jnp.concatenate([z0, z], axis=0), y0s, ys)
    # we also need to reshape `carry` to match sequential behavior
    i = (length + 1) % (history + 1)
    t, rng_key, carry = wrapped_carry
    carry_shape = carry_shapes[i]
    flatten_carry, treedef = jax.tree.flatten(carry)
    flatten_carry = [jnp.reshape(x, t1_shape) for x, t1_shape in zip(flatten_carry, carry_shape)]
    carry = jax.tree.unflatten(treedef, flatten_carry)
    wrapped_carry = (t, rng_key, carry)
    return wrapped_carry, (pytree_trace, ys)
