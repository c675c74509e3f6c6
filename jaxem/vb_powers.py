"""A Normal's scale written as a power of a global site, for variational Bayes EM.

A Gamma prior on a Normal's precision is written ``Normal(loc, 1 / jnp.sqrt(tau[z]))``
(``tau[z] ** -0.5``, ``lax.rsqrt(tau[z])``): the scale is ``sel(tau) ** -1/2``,
no selection of ``tau``. `jaxem.power_selection` recognizes such a power (the
structure of the jaxpr and its values at probe points); this module asks it about
the distribution arguments of the model's enumerated trace as a function of the
global sites' values, and selects moments through such an argument.

Selecting moments: the expected log-density is written from ``E_q[T(tau)]``
selected like ``tau`` (``E[log tau][z]``, ``E[tau][z]``). The argument is
``sel(tau) ** p``; its derivative at ``tau = 1`` in a direction ``t`` is exactly
``p * sel(t)`` (``d x^p / dx = p`` at 1), so ``sel(M)`` is a JVP at ones divided
by ``p``: linear in ``M`` and defined for every real moment (``E log tau < 0``).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpyro.distributions as dist

from jaxem.power_selection import PowerSelections, update_power

__all__ = ["PowerReads", "SUPPORTED_SPELLINGS", "select_moments"]

SUPPORTED_SPELLINGS = (
    "a Gamma prior on a Normal's precision tau, written "
    "dist.Normal(loc, 1 / jnp.sqrt(tau[z])), tau[z] ** -0.5 or jax.lax.rsqrt(tau[z])"
)


class PowerReads:
    """Which distribution arguments are a power of one global site.

    Args:
        site_args: ``{global site: value} -> {site: {argument: array}}``, the
            recorded constructor arguments of the model's enumerated trace.
        values: ``{global site: value}`` (shapes and dtypes).
    """

    def __init__(self, site_args: Callable, values: dict):
        self._site_args, self._values = site_args, dict(values)
        self._names = list(values)
        self._built = None

    def _build(self):
        if self._built is None:
            layout = []

            def flat(vals):
                out = self._site_args(dict(zip(self._names, vals)))
                keys, outputs = [], []
                for site, arguments in out.items():
                    for arg, value in arguments.items():
                        if isinstance(value, jax.Array):
                            keys.append((site, arg))
                            outputs.append(value)
                layout.append(keys)
                return outputs

            structs = [
                jax.ShapeDtypeStruct(jnp.shape(v), jnp.result_type(v))
                for v in self._values.values()
            ]
            try:
                closed = jax.make_jaxpr(flat)(structs)
            except Exception:  # noqa: BLE001 - a model jax cannot trace has no verified power
                self._built = ({}, None)
                return self._built
            keys = layout[-1]
            selections = PowerSelections(
                closed, [("arg", s, a) for s, a in keys], self._names, self._values, []
            )
            self._built = ({k: i for i, k in enumerate(keys)}, selections)
        return self._built

    def power(self, site: str, arg: str, source: str):
        """``p`` where ``site``'s Normal ``arg`` is ``sel(source) ** p`` exactly
        (p = -1/2: a precision, 1/2: a variance), else None."""
        index, selections = self._build()
        if (site, arg) not in index:
            return None
        update = selections.update(index[(site, arg)], source, dist.Normal)
        return None if update is None else update_power(update)

    def scaled_power(self, site: str, arg: str, source: str):
        """``(p, k)`` where ``site``'s ``arg`` is ``k * sel(source) ** p`` (``k > 0``
        an array shaped like the argument), else None."""
        index, selections = self._build()
        if (site, arg) not in index:
            return None
        found = selections.scaled_power(index[(site, arg)], source)
        return None if found is None else found[:2]


def select_moments(site_args, vals, powers):
    """The sites' arguments with ``vals`` (moments in place of the global sites'
    values) substituted, those in ``powers`` selected through their power.

    Args:
        site_args: as for `PowerReads`.
        vals: ``{global site: one moment array}``.
        powers: ``{(site, argument): (global site, p)}``.

    Returns:
        ``{site: {argument: value}}``: a plain substitution, except that an argument
        in ``powers`` holds ``sel(moment)`` (see the module doc).
    """
    if not powers:
        return site_args(vals)
    sources = {source for source, _ in powers.values()}
    primal = {n: (jnp.ones_like(v) if n in sources else v) for n, v in vals.items()}
    tangent = {n: (v if n in sources else jnp.zeros_like(v)) for n, v in vals.items()}
    out, lin = jax.jvp(site_args, (primal,), (tangent,))
    for (site, arg), (_, p) in powers.items():
        out[site][arg] = lin[site][arg] / p
    return out
