"""Parameters whose declared constraint is wider than the support of the
distribution argument they feed.

A parameter that reaches an argument by selection alone (indexing,
broadcasting: its entries are the argument's values) must be declared inside
the argument's support: EM's updates keep a parameter inside its own
constraint, not inside the argument's, so a ``real`` parameter used as
Categorical probabilities leaves the simplex and the fit reports a
log-likelihood above any possible value.
"""

from __future__ import annotations

from numpyro.distributions import constraints

__all__ = ["constraint_wider_than_support", "constraint_spelling"]


def _base(constraint):
    while isinstance(constraint, constraints._IndependentConstraint):
        constraint = constraint.base_constraint
    return constraint


def _is_real(constraint) -> bool:
    return isinstance(_base(constraint), constraints._Real)


def _upper_bounded(constraint) -> bool:
    base = _base(constraint)
    return isinstance(base, (constraints._Simplex, constraints._Interval, constraints._LessThan))


def constraint_wider_than_support(param_constraint, arg_constraint) -> bool:
    """Whether values satisfying ``param_constraint`` can lie outside
    ``arg_constraint`` (only the cases that can be decided from the constraints:
    an unconstrained param feeding a constrained argument, a param bounded below
    only feeding an argument bounded above). Undecided pairs give False."""
    if arg_constraint is None or _is_real(arg_constraint):
        return False
    if isinstance(_base(arg_constraint), constraints._Dependent):
        return False
    if _is_real(param_constraint):
        return True
    param_base = _base(param_constraint)
    return isinstance(param_base, constraints._GreaterThan) and _upper_bounded(arg_constraint)


def constraint_spelling(constraint) -> str:
    """How a user writes ``constraint``, e.g. ``constraints.simplex``."""
    for name in (
        "simplex",
        "positive",
        "nonnegative",
        "unit_interval",
        "positive_definite",
        "lower_cholesky",
        "corr_cholesky",
        "corr_matrix",
        "ordered_vector",
        "positive_ordered_vector",
        "softplus_positive",
        "softplus_lower_cholesky",
        "scaled_unit_lower_cholesky",
    ):
        if constraint is getattr(constraints, name, None):
            return f"constraints.{name}"
    base = _base(constraint)
    if base is not constraint:
        return constraint_spelling(base)
    if isinstance(base, constraints._Interval):
        return f"constraints.interval({base.lower_bound}, {base.upper_bound})"
    if isinstance(base, constraints._GreaterThan):
        return f"constraints.greater_than({base.lower_bound})"
    return repr(constraint)
