"""Errors and warnings raised by gradsurg.

Every error subclasses :class:`GradSurgError` *and* the builtin exception a user would expect
(``KeyError`` for an unknown name, ``ValueError`` for a bad value, ...), so existing ``except``
clauses keep working. Messages follow one template: name the thing, state the requirement, show the
value found, e.g. ``"Option `c` of CAGrad must be ≥ 0; found c=-0.5."``
"""

from __future__ import annotations

__all__ = [
    "GradSurgError",
    "GradSurgWarning",
    "IncompatibleGroupError",
    "InvalidGradientError",
    "InvalidGroupError",
    "InvalidLossError",
    "InvalidOptionError",
    "InvalidStateError",
    "MissingDependencyError",
    "MissingUpdateError",
    "NoMatchingParametersError",
    "NonFiniteGradientError",
    "RegistrationError",
    "UnknownStrategyError",
]


class GradSurgError(Exception):
    """Base class of every error raised by gradsurg."""

    def __str__(self) -> str:  # KeyError would otherwise wrap the message in quotes
        return str(self.args[0]) if self.args else ""


class GradSurgWarning(UserWarning):
    """Base class of warnings emitted by gradsurg (e.g. a solver that did not converge)."""


class UnknownStrategyError(GradSurgError, KeyError):
    """A strategy name that is not registered (the message lists the known names)."""


class RegistrationError(GradSurgError, ValueError):
    """A malformed or duplicate strategy registration."""


class InvalidOptionError(GradSurgError, ValueError):
    """An option value outside its allowed range or of the wrong type."""


class InvalidGradientError(GradSurgError, ValueError):
    """A per-task gradient matrix of the wrong shape or dtype."""


class NonFiniteGradientError(GradSurgError, FloatingPointError):
    """A task gradient containing NaN or Inf (the message names the task and the group)."""


class InvalidLossError(GradSurgError, ValueError):
    """A loss that is not a floating-point scalar attached to the autograd graph."""


class InvalidGroupError(GradSurgError, ValueError):
    """A malformed parameter group: empty, frozen parameters, duplicates or overlaps."""


class NoMatchingParametersError(InvalidGroupError):
    """A grouper that found no trainable parameter matching what it looked for."""


class IncompatibleGroupError(GradSurgError, ValueError):
    """A strategy used on groups that do not have the structure it requires."""


class InvalidStateError(GradSurgError, ValueError):
    """A state dict that does not belong to this Surgeon or strategy."""


class MissingUpdateError(GradSurgError, RuntimeError):
    """A strategy that needs the losses after the optimizer step did not get them (call ``surgeon.update``)."""


class MissingDependencyError(GradSurgError, ImportError):
    """An optional dependency is not installed (the message names the pip extra)."""


def missing_dependency(module: str, extra: str, feature: str) -> MissingDependencyError:
    """Build the standard error for an optional dependency that failed to import.

    Args:
        module: The importable module that is missing, e.g. ``"peft"``.
        extra: The gradsurg extra that installs it, e.g. ``"peft"``.
        feature: What needs it, e.g. ``"gradsurg.adapters.peft"``.
    """
    return MissingDependencyError(
        f"{feature} needs the optional dependency `{module}`, which is not installed; "
        f"install it with `pip install 'gradsurg[{extra}]'`."
    )
