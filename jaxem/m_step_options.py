"""The ``m_step=`` option every fitter takes: ``"auto"``, ``"gradient"``, or a dict
``{param name: "gradient"}`` that sends only the params it names down the gradient
path (the others as ``"auto"``). One validation and one reading of it for
`jaxem.mstep.plan_m_step` and the fitters."""

from __future__ import annotations

from collections.abc import Mapping

from jaxem.exceptions import ModelError

__all__ = ["check_m_step", "check_m_step_names", "forced_gradient", "forced_reason"]

_CHOICES = ("auto", "gradient")


def check_m_step(m_step):
    """``m_step`` as a fitter stores it: ``"auto"``, ``"gradient"``, or a dict of param
    names to ``"gradient"`` or ``"auto"`` (copied); a ValueError for anything else."""
    if isinstance(m_step, str) and m_step in _CHOICES:
        return m_step
    if isinstance(m_step, Mapping):
        bad = {k: v for k, v in m_step.items() if not isinstance(k, str) or v not in _CHOICES}
        if not bad:
            return dict(m_step)
        raise ValueError(
            "m_step as a dict maps param names to 'gradient' (or 'auto'), got "
            f"{bad!r}; e.g. m_step={{'beta': 'gradient'}}"
        )
    raise ValueError(
        f"m_step must be 'auto', 'gradient' or a dict {{param name: 'gradient'}}, got {m_step!r}"
    )


def forced_gradient(m_step) -> frozenset:
    """The params that ``m_step`` sends down the gradient path by name."""
    if isinstance(m_step, Mapping):
        return frozenset(k for k, v in m_step.items() if v == "gradient")
    return frozenset()


def forced_reason(name: str) -> str:
    """The reason `m_step_paths` gives for a param sent down the gradient path by name."""
    return f"m_step={{'{name}': 'gradient'}}"


def check_m_step_names(m_step, param_names) -> None:
    """A ModelError naming the keys of a dict ``m_step`` that are not params."""
    if not isinstance(m_step, Mapping):
        return
    unknown = sorted(set(m_step) - set(param_names))
    if unknown:
        raise ModelError(
            f"jaxem: m_step names {unknown}, which are not params of the model (its params: "
            f"{sorted(param_names)})."
        )
