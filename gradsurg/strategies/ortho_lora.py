"""``ortho_lora``: PCGrad inside each LoRA factor (Yang et al., 2026)."""

from __future__ import annotations

import torch
from torch import Tensor

from gradsurg.strategies.base import Requirement
from gradsurg.strategies.pcgrad import PCGrad
from gradsurg.strategies.projection import Reference, others_in_order
from gradsurg.strategies.registry import register_strategy

__all__ = ["OrthoLoRA"]


@register_strategy("ortho_lora", aliases=("ortholora",))
class OrthoLoRA(PCGrad):
    r"""Ortho-LoRA: the PCGrad projection applied separately to each LoRA factor.

    For every LoRA layer and each factor ``M ∈ {A, B}`` (one group per factor, built by
    :func:`gradsurg.adapters.peft.lora_groups`), with **one** random task order ``π`` per step shared
    by all groups: for ``i`` in ``π``, for ``j`` in ``π \ {i}``: if ``gᵢᴹ·gⱼᴹ < 0`` then
    ``gᵢᴹ ← gᵢᴹ − (gᵢᴹ·gⱼᴹ / ‖gⱼᴹ‖²) gⱼᴹ``; the update is ``Σᵢ gᵢᴹ`` (a sum, Algorithm 1).

    Projecting ``A`` and ``B`` independently ("structure-aware decoupling") lets tasks share input
    features (``A``) while they disagree on the output reconstruction (``B``), which a projection of
    the flattened ``[A, B]`` vector cannot express.

    Paper: Yang, Chen, Yang, Zeng and Yang, "Disentangling Task Conflicts in Multi-Task LoRA via Orthogonal Gradient
    Projection", 2026, https://arxiv.org/abs/2601.09684 (Algorithm 1). No official code was released.

    Choices the paper leaves open, and ours:

    * ``gⱼ`` is the **original** gradient by default (PCGrad's choice); ``reference="sequential"`` is
      the literal in-place reading of Algorithm 1, where ``gⱼ`` is the already projected gradient
      of a task processed earlier in ``π``.
    * Zero-norm gradients are guarded: at PEFT's default init ``B = 0``, so ``A``'s gradient is
      exactly zero at the first step; a zero ``gⱼ`` never triggers a projection.
    * The same ``π`` is used for every group of a step: the Surgeon hands every group a generator in
      the same state, and ``π`` is the first draw.

    Args:
        reference: ``"original"`` (default) or ``"sequential"``.
        shuffle: Draw ``π`` at random (default) or use index order.
    """

    family = "projection"
    cost = "O(T²·n + T³) per LoRA factor"
    summary = "PCGrad applied separately inside each LoRA factor A and B (Yang et al. 2026)."
    paper = (
        "Yang et al., Disentangling Task Conflicts in Multi-Task LoRA via Orthogonal Gradient Projection, "
        "2026. https://arxiv.org/abs/2601.09684"
    )
    properties = PCGrad.properties
    requires = frozenset({Requirement.LORA_FACTOR_GROUPS})

    def __init__(self, *, reference: Reference = "original", shuffle: bool = True) -> None:
        super().__init__(reference=reference, shuffle=shuffle)

    def task_orders(self, tasks: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        order = torch.randperm(tasks, generator=generator) if self._options["shuffle"] else torch.arange(tasks)
        return order, others_in_order(order)
