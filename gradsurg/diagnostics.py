"""Conflict diagnostics computed from the step's per-task gradients.

For each group the Surgeon records, from the Gram matrix ``K = G Gᵀ`` and the direction ``d``:

* ``norms[i] = ‖gᵢ‖``;
* ``cosine[i, j] = gᵢ·gⱼ / (‖gᵢ‖ ‖gⱼ‖)`` (0 where a gradient is zero);
* ``conflicts`` — the number of task pairs ``i < j`` with ``gᵢ·gⱼ < 0``, and ``conflict_share`` —
  that number over the ``T(T−1)/2`` pairs;
* ``direction_cosine[i] = cos(d, gᵢ)``;
* ``change = ‖d − Σᵢ gᵢ‖ / ‖Σᵢ gᵢ‖`` — how much the strategy changed the plain summed gradient.

All values are detached tensors on the gradients' device; nothing is synchronised with the host
until you read them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from gradsurg._math import safe_divide

__all__ = ["GroupStats", "StepStats", "group_stats"]


@dataclass(frozen=True)
class GroupStats:
    """Conflict statistics of one group at one step (see the module docstring for the formulas)."""

    norms: Tensor
    cosine: Tensor
    conflicts: Tensor
    conflict_share: Tensor
    direction_cosine: Tensor
    change: Tensor


@dataclass(frozen=True)
class StepStats:
    """Statistics of one :meth:`~gradsurg.Surgeon.backward` call.

    Attributes:
        step: Index of the step (0 for the first).
        tasks: The task names, in row order.
        groups: ``GroupStats`` by group name.
    """

    step: int
    tasks: tuple[str, ...]
    groups: Mapping[str, GroupStats]

    def conflict_share(self) -> Tensor:
        """Share of conflicting task pairs over all groups and pairs (0 with one task)."""
        if not self.groups:
            return torch.zeros(())
        conflicts = torch.stack([s.conflicts for s in self.groups.values()]).sum()
        tasks = len(self.tasks)
        pairs = max(tasks * (tasks - 1) // 2, 1) * len(self.groups)
        return conflicts.to(torch.float32) / pairs


def group_stats(grads: Tensor, direction: Tensor) -> GroupStats:
    """Compute :class:`GroupStats` from a group's gradient matrix ``G`` (``[T, n]``) and direction ``d``."""
    with torch.no_grad():
        g = grads.to(torch.float32) if grads.dtype in (torch.float16, torch.bfloat16) else grads
        d = direction.to(g.dtype)
        gram = g @ g.T
        norms = gram.diagonal().clamp_min(0).sqrt()
        outer = norms.unsqueeze(0) * norms.unsqueeze(1)
        cosine = safe_divide(gram, outer)
        tasks = g.shape[0]
        upper = torch.triu(torch.ones(tasks, tasks, dtype=torch.bool, device=g.device), diagonal=1)
        conflicts = ((gram < 0) & upper).sum()
        pairs = max(tasks * (tasks - 1) // 2, 1)
        projections = g @ d
        direction_cosine = safe_divide(projections, norms * d.norm())
        total = g.sum(dim=0)
        change = safe_divide((d - total).norm(), total.norm())
        return GroupStats(
            norms=norms,
            cosine=cosine,
            conflicts=conflicts,
            conflict_share=conflicts.to(torch.float32) / pairs,
            direction_cosine=direction_cosine,
            change=change,
        )
