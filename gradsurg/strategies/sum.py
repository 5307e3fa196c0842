"""``sum``: the plain sum of the task gradients (joint training)."""

from __future__ import annotations

from torch import Tensor

from gradsurg.strategies.base import Context, Property, Strategy
from gradsurg.strategies.registry import register_strategy

__all__ = ["Sum"]


@register_strategy("sum", aliases=("joint", "linear_scalarization"))
class Sum(Strategy):
    """Sum of the task gradients, ``d = Σᵢ gᵢ``: exactly what ``sum(losses).backward()`` computes.

    The baseline every method is compared with ("joint training", "linear scalarization").
    """

    family = "baseline"
    cost = "O(T·n)"
    summary = "Sum of the task gradients; equals sum(losses).backward()."
    paper = "Baseline (joint training / linear scalarization)."
    properties = frozenset(
        {
            Property.SCALE_EQUIVARIANT,
            Property.ONE_TASK_IDENTITY,
            Property.ONE_TASK_POSITIVE,
            Property.PERMUTATION_INVARIANT,
            Property.SUM_WITHOUT_CONFLICT,
            Property.ZERO_ROWS_IGNORED,
            Property.IN_ROW_SPAN,
        }
    )

    def _combine(self, grads: Tensor, context: Context) -> Tensor:
        return grads.sum(dim=0)
