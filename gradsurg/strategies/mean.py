"""``mean``: the mean of the task gradients."""

from __future__ import annotations

from torch import Tensor

from gradsurg.strategies.base import Context, Property, Strategy
from gradsurg.strategies.registry import register_strategy

__all__ = ["Mean"]


@register_strategy("mean", aliases=("average",))
class Mean(Strategy):
    """Mean of the task gradients, ``d = (1/T) Σᵢ gᵢ``: what ``mean(losses).backward()`` computes.

    Scale: ``1/T`` of ``sum``; use it when the learning rate was tuned on a mean loss.
    """

    family = "baseline"
    cost = "O(T·n)"
    summary = "Mean of the task gradients; equals (sum(losses)/T).backward()."
    paper = "Baseline (equal weighting)."
    properties = frozenset(
        {
            Property.SCALE_EQUIVARIANT,
            Property.ONE_TASK_IDENTITY,
            Property.ONE_TASK_POSITIVE,
            Property.PERMUTATION_INVARIANT,
            Property.IN_ROW_SPAN,
        }
    )

    def _combine(self, grads: Tensor, context: Context) -> Tensor:
        return grads.mean(dim=0)
