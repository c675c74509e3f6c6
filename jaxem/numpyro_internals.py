"""NumPyro internals that jaxem relies on, all in one place.

Tested with numpyro >=0.22,<0.23 (the range ``pyproject.toml`` pins). None of
the names below is part of NumPyro's public API, so a minor release may change
them: upgrading NumPyro starts here, and every other jaxem module imports them
from this module rather than from NumPyro.

Private functions and global state:

* ``_promote_fn_shapes``, ``_promote_scanned_value_shapes`` and
  ``_subs_wrapper`` (``numpyro.contrib.control_flow.scan``): jaxem's
  first-order scan (`jaxem.scan`) substitutes and shapes the sites of a
  scan body exactly as NumPyro's enumerated scan does, so that the two trace
  the same sites.
* ``COERCIONS`` (``numpyro.distributions.distribution``): the list of hooks
  that NumPyro's ``DistributionMeta`` consults before constructing a
  distribution (``handlers.collapse`` uses it too). jaxem appends a hook only
  while it traces a model (`jaxem.tracing.enumerated_trace`) to record
  the constructor arguments the user wrote, and removes it on exit.
* ``_PYRO_STACK`` (``numpyro.primitives``, read by `inside_handler`): the
  stack of active effect handlers; jaxem's cached model traces are only valid
  when no outside handler sees the model's sites.
* The settings a ``numpyro.infer.NUTS``/``HMC`` instance keeps in private
  attributes (``_step_size``, ``_target_accept_prob``, ...), read by
  `hmc_kernel_settings` so that a user can hand SAEM/MCEM a configured
  kernel.
* ``MaskedDistribution._mask`` (`distribution_mask`): the mask given to
  ``handlers.mask`` or ``.mask()``; NumPyro has no public accessor.
* The classes of NumPyro's singleton constraints (``_Real``, ``_Simplex``,
  ``_PositiveDefinite``, ``_LowerCholesky``, ``_Dependent``): jaxem decides a
  param's domain and an argument's support from the class, which also covers
  constraints with arguments (``real`` and a ``Dependent`` with bounds). The
  classes of ``interval``, ``greater_than``, ``less_than`` and ``independent``
  are public under those names.

* The frames of NumPyro's ``sample`` primitive and of ``plate.process_message``
  (`failing_site`): the local ``name`` and ``msg`` name the site whose shape a
  plate rejected, which NumPyro's own error leaves out.

Site names NumPyro makes up (jaxem recognizes them, and must never show them
to a user: `user_site_name`):

* under enumeration, NumPyro's ``scan`` traces the first step of a scan body
  unrolled, each site renamed ``_PREV_<name>`` (`PREV_PREFIX`), and the
  later steps stacked along a dim named ``_time_<name>``
  (`TIME_PREFIX`);
* ``numpyro.sample(name, fn, obs=data, obs_mask=known)`` becomes an observed
  site ``<name>_observed`` (`OBSERVED_SUFFIX`) and a latent one
  ``<name>_unobserved`` (`UNOBSERVED_SUFFIX`).
"""

from __future__ import annotations

import numpyro
from numpyro.contrib.control_flow.scan import (
    _promote_fn_shapes,
    _promote_scanned_value_shapes,
    _subs_wrapper,
)
from numpyro.distributions import constraints
from numpyro.distributions.distribution import COERCIONS
from numpyro.primitives import _PYRO_STACK

__all__ = [
    "COERCIONS",
    "DependentConstraint",
    "LowerCholeskyConstraint",
    "PositiveDefiniteConstraint",
    "RealConstraint",
    "SimplexConstraint",
    "base_constraint",
    "OBSERVED_SUFFIX",
    "PREV_PREFIX",
    "TIME_PREFIX",
    "UNOBSERVED_SUFFIX",
    "distribution_mask",
    "failing_site",
    "inside_handler",
    "first_step_name",
    "is_first_step",
    "is_time_dim",
    "promote_fn_shapes",
    "promote_scanned_value_shapes",
    "subs_wrapper",
    "time_dim_name",
    "user_site_name",
]

promote_fn_shapes = _promote_fn_shapes
promote_scanned_value_shapes = _promote_scanned_value_shapes
subs_wrapper = _subs_wrapper

RealConstraint = constraints._Real
SimplexConstraint = constraints._Simplex
PositiveDefiniteConstraint = constraints._PositiveDefinite
LowerCholeskyConstraint = constraints._LowerCholesky
DependentConstraint = constraints._Dependent

PREV_PREFIX = "_PREV_"
TIME_PREFIX = "_time"
OBSERVED_SUFFIX = "_observed"
UNOBSERVED_SUFFIX = "_unobserved"


def inside_handler() -> bool:
    """Whether a NumPyro effect handler is active (jaxem is called from inside one)."""
    return bool(_PYRO_STACK)


def user_site_name(name: str) -> str:
    """The site name a user wrote for a site of an enumerated ``scan``: its first
    step is traced as ``_PREV_<name>``."""
    while name.startswith(PREV_PREFIX):
        name = name[len(PREV_PREFIX) :]
    return name


def first_step_name(name: str) -> str:
    """The name under which NumPyro traces the first step of the scanned site ``name``."""
    return PREV_PREFIX + name


def is_first_step(name: str) -> bool:
    """Whether ``name`` is the first, unrolled step of a scanned site."""
    return name.startswith(PREV_PREFIX)


def time_dim_name(name: str) -> str:
    """The name NumPyro's scan gives the time dim of the stacked steps of ``name``."""
    return f"{TIME_PREFIX}_{name}"


def is_time_dim(dim_name) -> bool:
    """Whether a dim name (of a site's ``dim_to_name``) is a scan's time dim."""
    return str(dim_name).startswith(TIME_PREFIX)


def distribution_mask(fn):
    """The mask of a ``MaskedDistribution`` (an array, or a Python bool)."""
    return fn._mask


def base_constraint(constraint):
    """A constraint without its ``independent`` wrappers (a param of shape ``(K, D)``
    constrained ``positive`` elementwise is ``independent(positive, 1)``)."""
    while isinstance(constraint, constraints.independent):
        constraint = constraint.base_constraint
    return constraint


def hmc_kernel_settings(kernel) -> dict:
    """The ``init_kernel`` settings of a ``numpyro.infer.NUTS`` or ``HMC`` instance
    (`numpyro.infer.hmc.hmc`'s keyword arguments)."""
    from numpyro.infer import NUTS

    settings = {
        "step_size": kernel._step_size,
        "adapt_step_size": kernel._adapt_step_size,
        "adapt_mass_matrix": kernel._adapt_mass_matrix,
        "dense_mass": kernel._dense_mass,
        "target_accept_prob": kernel._target_accept_prob,
    }
    if isinstance(kernel, NUTS):
        settings["max_tree_depth"] = kernel._max_tree_depth
    else:
        settings["num_steps"] = kernel._num_steps
        settings["trajectory_length"] = kernel._trajectory_length
    return settings


def failing_site(err: BaseException):
    """``(site name, plate or None, the site's distribution or None)`` of the sample
    site NumPyro was processing when ``err`` was raised, read from the traceback: the
    local ``name`` of ``numpyro.primitives.sample`` and, when a plate rejected the
    site's shape, that plate (``self`` of its ``process_message``) and the message's
    ``fn``. None when the error was not raised inside a sample statement."""
    name, plate, fn = None, None, None
    tb = err.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        code = frame.f_code
        if code.co_name == "sample" and code.co_filename.endswith("numpyro/primitives.py"):
            name = frame.f_locals.get("name", name)
        owner = frame.f_locals.get("self")
        if code.co_name == "process_message" and isinstance(owner, numpyro.plate):
            plate, fn = owner, (frame.f_locals.get("msg") or {}).get("fn")
        tb = tb.tb_next
    return None if name is None else (name, plate, fn)
