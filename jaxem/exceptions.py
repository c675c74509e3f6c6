"""The exceptions and warnings jaxem raises, in one place so every module can import them."""

__all__ = ["ConvergenceWarning", "ModelError", "NumericalWarning", "a_or_an"]


class ModelError(ValueError):
    """A model or its data cannot be fitted by EM; the message says why and what to do."""


class ConvergenceWarning(UserWarning):
    """A fit stopped without meeting its convergence criterion, or diverged.

    Raised outside the compiled loop, once per call, as scikit-learn's
    ``sklearn.exceptions.ConvergenceWarning``. Silence it with
    ``warnings.simplefilter("ignore", jaxem.ConvergenceWarning)``.
    """


class NumericalWarning(UserWarning):
    """A result is finite but doubtful: rounding, a regularizer that dominates the data,
    or a density evaluated where it breaks down. The message says which site or parameter.
    """


def a_or_an(word: str) -> str:
    """``word`` with its indefinite article, for messages ("an Exponential")."""
    return f"{'an' if word[:1] in 'AEIOU' else 'a'} {word}"
