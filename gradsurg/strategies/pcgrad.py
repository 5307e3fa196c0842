"""``pcgrad``: Projecting Conflicting Gradients (Yu et al., NeurIPS 2020)."""

from __future__ import annotations

import torch
from torch import Tensor

from gradsurg.strategies.base import Context, GramStrategy, Property, check_choice, check_option
from gradsurg.strategies.projection import REFERENCES, Reference, per_task_orders, projection_weights
from gradsurg.strategies.registry import register_strategy

__all__ = ["PCGrad"]


@register_strategy("pcgrad", aliases=("pc_grad", "gradient_surgery"))
class PCGrad(GramStrategy):
    r"""PCGrad: remove from each task gradient its component along every gradient it conflicts with.

    For each task ``i``, starting from ``gᵢ' = gᵢ``, visit the other tasks ``j`` in a random order and
    whenever ``gᵢ'·gⱼ < 0`` set

    ``gᵢ' ← gᵢ' − (gᵢ'·gⱼ / ‖gⱼ‖²) gⱼ``

    then return ``d = Σᵢ gᵢ'`` (a **sum**, the paper's scale: with no conflict PCGrad equals ``sum``).

    Paper: T. Yu, S. Kumar, A. Gupta, S. Levine, K. Hausman, C. Finn, "Gradient Surgery for Multi-Task
    Learning", NeurIPS 2020, https://arxiv.org/abs/2001.06782 (Algorithm 1).

    Choices the paper leaves to the implementation, and ours:

    * ``gⱼ`` is the **original** task gradient (Algorithm 1, ``reference="original"``); the in-place
      reading where already projected gradients are used is ``reference="sequential"`` (tasks are
      then processed in index order).
    * Every task gets its **own** random order of the others, drawn from the generator the caller
      passes (the Surgeon's seeded ``torch.Generator``), so runs are reproducible; the official TF
      code's shuffle has no effect, and a popular PyTorch port uses the unseeded ``random`` module.
      ``shuffle=False`` visits the other tasks in index order (deterministic; used to cross-check
      against other implementations).
    * The projection runs in Gram space (see :mod:`gradsurg.strategies.projection`): identical
      mathematics, ``O(T³ + T²n)`` instead of ``O(T²n)`` Python-level vector work.

    Note that for ``T ≥ 3`` a later projection can re-introduce a conflict with a gradient projected
    against earlier; only the last projection of each task is guaranteed to leave it orthogonal.

    Args:
        reference: ``"original"`` (default, the paper) or ``"sequential"`` (in place).
        shuffle: Draw a random visiting order per task (default) or use index order.
    """

    family = "projection"
    cost = "O(T²·n + T³)"
    summary = "Project each task gradient off the gradients it conflicts with, then sum (Yu et al. 2020)."
    paper = (
        "T. Yu et al., Gradient Surgery for Multi-Task Learning, NeurIPS 2020. https://arxiv.org/abs/2001.06782"
    )
    batched = True
    properties = frozenset(
        {
            Property.SCALE_EQUIVARIANT,
            Property.ONE_TASK_IDENTITY,
            Property.ONE_TASK_POSITIVE,
            Property.SUM_WITHOUT_CONFLICT,
            Property.ZERO_ROWS_IGNORED,
            Property.IN_ROW_SPAN,
            Property.RANDOMIZED,
        }
    )

    def __init__(self, *, reference: Reference = "original", shuffle: bool = True) -> None:
        check_choice(reference, REFERENCES, type(self).__name__, "reference")
        check_option(isinstance(shuffle, bool), type(self).__name__, "shuffle", "a bool", shuffle)
        self._set_options(reference=reference, shuffle=shuffle)

    def task_orders(self, tasks: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """The outer processing order ``Tensor[T]`` and the partner orders ``Tensor[T, T−1]`` of one call."""
        return torch.arange(tasks), per_task_orders(tasks, generator, shuffle=self._options["shuffle"])

    def weights(self, gram: Tensor, context: Context) -> Tensor:
        outer, partners = self.task_orders(gram.shape[-1], context.generator)
        return projection_weights(gram, partners, outer, self._options["reference"])
