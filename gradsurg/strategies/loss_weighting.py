"""Shared base of the loss-based weightings (``uw``, ``dwa``, ``rlw``, ``famo``, ``db_mtl``, ``gradnorm``, ``stch``).

Every one of them returns ``d = Σᵢ wᵢ rᵢ``: a weighted sum of rows ``rᵢ`` that are the task
gradients ``gᵢ`` (``db_mtl`` uses an EMA of rescaled gradients instead), with task weights ``w``
computed from the step's losses, the strategy's state or its learnable parameters. Subclasses of
:class:`LossWeighting` implement :meth:`LossWeighting.task_weights` only; the base class does the
combination, checks the losses and carries the state and the parameter objective to the
:class:`~gradsurg.Surgeon`.

Conventions shared by the family:

* The weights are computed in float64 (float32 on MPS) on the device of the gradients, and cast to
  the gradients' dtype for the single pass ``wᵀ R`` over the data.
* Step counters in the state are Python ints, so that warm-up and history logic never waits on the
  device; tensors in the state live on the device given to ``init_state``.
* Logarithmic methods (``famo``, ``db_mtl``, ``stch``) need losses ``≥ 0``: a negative loss raises
  :class:`~gradsurg.errors.InvalidLossError` (one T-element check per group and step) instead of
  silently turning the direction into NaN.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from gradsurg.errors import InvalidLossError, InvalidStateError
from gradsurg.strategies.base import Context, Need, Output, Strategy

__all__ = ["LossWeighting", "TaskWeights", "check_nonnegative", "is_count", "is_real", "scaled_softmax", "weight_dtype"]


@dataclass(frozen=True)
class TaskWeights:
    """What :meth:`LossWeighting.task_weights` returns for one group and step.

    Attributes:
        weights: ``Tensor[T]``, the task weights (no autograd graph).
        state: The strategy's new state for this group (the same mapping when unchanged).
        objective: For learnable weights, a scalar built with autograd from ``Context.params``.
        rows: ``Tensor[T, n]`` to combine instead of the gradients (``db_mtl``'s EMA buffer); the
            :class:`~gradsurg.strategies.base.Output` then carries no ``weights`` (``d ≠ wᵀG``).
    """

    weights: Tensor
    state: Mapping[str, Any]
    objective: Tensor | None = None
    rows: Tensor | None = None


class LossWeighting(Strategy):
    """Base of the strategies whose direction is ``d = Σᵢ wᵢ gᵢ`` with ``w`` from losses, state or parameters."""

    def apply(self, grads: Tensor, context: Context) -> Output:
        if not context.state and Need.STATE in self.needs:  # an empty state means "before the first step"
            context = replace(context, state=self.init_state(grads.shape[0], device=grads.device))
        result = self.task_weights(grads, context)
        rows = grads if result.rows is None else result.rows
        direction = (result.weights.to(device=grads.device, dtype=grads.dtype) @ rows).reshape(grads.shape[1])
        # The weights describe d = wᵀG only when the rows are the gradients themselves.
        weights = result.weights if result.rows is None else None
        return Output(direction=direction, state=result.state, objective=result.objective, weights=weights)

    def _combine(self, grads: Tensor, context: Context) -> Tensor:
        return self.apply(grads, context).direction

    @abc.abstractmethod
    def task_weights(self, grads: Tensor, context: Context) -> TaskWeights:
        """The task weights (and new state, objective) for validated ``grads`` (``Tensor[T, n]``)."""

    def task_losses(self, context: Context, grads: Tensor, *, nonnegative: bool = False) -> Tensor:
        """``context.losses`` as ``Tensor[T]`` in the weight dtype on the device of ``grads``.

        Raises:
            InvalidLossError: No losses, the wrong number, or (``nonnegative``) a negative loss.
        """
        name = self.name or type(self).__name__
        if context.losses is None:
            raise InvalidLossError(
                f"Strategy {name!r} needs the task losses{context.where}: pass losses=Tensor[T] when calling it "
                "directly, or Context(losses=...) to apply(); a Surgeon passes them automatically."
            )
        tasks = grads.shape[0]
        losses = context.losses.detach().reshape(-1).to(device=grads.device, dtype=weight_dtype(grads.device))
        if losses.shape != (tasks,):
            raise InvalidLossError(
                f"The losses given to strategy {name!r}{context.where} must have one entry per task, shape "
                f"({tasks},); found shape {tuple(context.losses.shape)}."
            )
        if nonnegative:
            check_nonnegative(losses, name, context.where)
        return losses

    def learnable(self, context: Context, key: str) -> Tensor:
        """The learnable parameter ``key`` from ``context.params``.

        Raises:
            InvalidStateError: The context does not hold it (use a Surgeon built with ``tasks=``).
        """
        if key not in context.params:
            name = self.name or type(self).__name__
            raise InvalidStateError(
                f"Strategy {name!r} needs its learnable parameter {key!r} in Context.params{context.where}; found "
                f"{sorted(context.params)} (a Surgeon built with tasks=... provides it; see surgeon.parameters())."
            )
        return context.params[key]


def check_nonnegative(losses: Tensor, strategy: str, where: str = "") -> None:
    """Raise :class:`InvalidLossError` if a loss is negative (for strategies that take its logarithm)."""
    if bool((losses < 0).any()):
        raise InvalidLossError(
            f"Strategy {strategy!r} takes the logarithm of the losses, so every loss must be ≥ 0{where}; "
            f"found {losses.tolist()} (shift the losses by a constant if they can be negative)."
        )


def weight_dtype(device: torch.device) -> torch.dtype:
    """float64 for the T-element weight arithmetic, float32 on backends without float64 (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def scaled_softmax(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``T · softmax(logits / temperature)``: positive weights that sum to the number of tasks ``T``."""
    return logits.shape[-1] * torch.softmax(logits / temperature, dim=-1)


def is_real(value: object, *, low: float = -math.inf, high: float = math.inf, open_low: bool = False) -> bool:
    """Whether ``value`` is a finite int or float (not a bool) in ``[low, high]`` (``(low, high]`` if ``open_low``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    above = value > low if open_low else value >= low
    return above and value <= high


def is_count(value: object, low: int = 0) -> bool:
    """Whether ``value`` is an int (not a bool) ``≥ low``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low
