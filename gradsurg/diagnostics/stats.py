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
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from gradsurg._math import safe_divide

__all__ = ["GroupStats", "StepStats", "group_stats", "split_stats"]


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
        labels: The label of each group, by group name.
    """

    step: int
    tasks: tuple[str, ...]
    groups: Mapping[str, GroupStats]
    labels: Mapping[str, str] = field(default_factory=dict)

    def conflict_share(self, label: str | None = None) -> Tensor:
        """Share of conflicting task pairs over all groups (or those with ``label``) and pairs.

        0 with one task or no matching group.
        """
        chosen = [s for name, s in self.groups.items() if label is None or self.labels.get(name) == label]
        if not chosen:
            return torch.zeros(())
        conflicts = torch.stack([s.conflicts for s in chosen]).sum()
        tasks = len(self.tasks)
        pairs = max(tasks * (tasks - 1) // 2, 1) * len(chosen)
        return conflicts.to(torch.float32) / pairs

    def records(self) -> list[dict[str, Any]]:
        """One flat row per group, with Python numbers (reads the values from the device).

        Columns: ``step``, ``group``, ``label``, ``conflicts``, ``conflict_share``, ``min_cosine``,
        ``mean_cosine`` (over task pairs), ``change``, then ``norm/<task>`` and ``direction_cosine/<task>``.
        """
        rows: list[dict[str, Any]] = []
        tasks = len(self.tasks)
        upper = torch.triu(torch.ones(tasks, tasks, dtype=torch.bool), diagonal=1)
        for name, stats in self.groups.items():
            pairs = stats.cosine.detach().cpu()[upper]
            row: dict[str, Any] = {
                "step": self.step,
                "group": name,
                "label": self.labels.get(name, ""),
                "conflicts": int(stats.conflicts),
                "conflict_share": float(stats.conflict_share),
                "min_cosine": float(pairs.min()) if pairs.numel() else 1.0,
                "mean_cosine": float(pairs.mean()) if pairs.numel() else 1.0,
                "change": float(stats.change),
            }
            norms = stats.norms.detach().cpu().tolist()
            cosines = stats.direction_cosine.detach().cpu().tolist()
            row.update({f"norm/{task}": value for task, value in zip(self.tasks, norms)})
            row.update({f"direction_cosine/{task}": value for task, value in zip(self.tasks, cosines)})
            rows.append(row)
        return rows


def group_stats(
    gram: Tensor, *, weights: Tensor | None = None, grads: Tensor | None = None, direction: Tensor | None = None
) -> GroupStats:
    """Compute :class:`GroupStats` of one group.

    From the Gram matrix ``K = G Gᵀ`` and either the task weights ``w`` of a direction ``d = wᵀ G``
    (Gram-space strategies: no pass over ``G`` at all, since ``G d = K w``, ``‖d‖² = wᵀ K w`` and
    ``‖d − Σᵢ gᵢ‖² = (w − 1)ᵀ K (w − 1)``) or the gradients ``G`` and the direction ``d`` (one pass).

    With ``weights``, every input may carry leading batch dimensions (one per group of a batch).

    Args:
        gram: ``Tensor[..., T, T]``.
        weights: ``Tensor[..., T]`` such that ``d = wᵀ G``.
        grads: ``Tensor[T, n]`` (needed when ``weights`` is not given).
        direction: ``Tensor[n]`` (needed when ``weights`` is not given).
    """
    with torch.no_grad():
        k = gram.to(torch.float64) if gram.dtype != torch.float64 and gram.device.type != "mps" else gram
        tasks = k.shape[-1]
        norms = k.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
        cosine = safe_divide(k, norms.unsqueeze(-1) * norms.unsqueeze(-2))
        upper = torch.triu(torch.ones(tasks, tasks, dtype=torch.bool, device=k.device), diagonal=1)
        conflicts = ((k < 0) & upper).sum(dim=(-2, -1))
        total_norm = k.sum(dim=(-2, -1)).clamp_min(0).sqrt()
        if weights is not None:
            w = weights.to(k.dtype)
            projections = (k @ w.unsqueeze(-1)).squeeze(-1)
            d_norm = (w * projections).sum(dim=-1).clamp_min(0).sqrt()
            shift = w - 1
            change_norm = (shift * (k @ shift.unsqueeze(-1)).squeeze(-1)).sum(dim=-1).clamp_min(0).sqrt()
        elif grads is not None and direction is not None:
            d = direction.to(grads.dtype)
            projections = (grads @ d).to(k.dtype)
            d_norm = d.norm().to(k.dtype)
            change_norm = (d - grads.sum(dim=0)).norm().to(k.dtype)
        else:
            raise ValueError("group_stats needs `weights`, or both `grads` and `direction`.")
        return GroupStats(
            norms=norms,
            cosine=cosine,
            conflicts=conflicts,
            conflict_share=conflicts.to(k.dtype) / max(tasks * (tasks - 1) // 2, 1),
            direction_cosine=safe_divide(projections, norms * d_norm.unsqueeze(-1)),
            change=safe_divide(change_norm, total_norm),
        )


def split_stats(stats: GroupStats) -> list[GroupStats]:
    """Split the statistics of a batch of groups (leading dimension) into one ``GroupStats`` per group."""
    return [
        GroupStats(
            norms=stats.norms[b],
            cosine=stats.cosine[b],
            conflicts=stats.conflicts[b],
            conflict_share=stats.conflict_share[b],
            direction_cosine=stats.direction_cosine[b],
            change=stats.change[b],
        )
        for b in range(stats.norms.shape[0])
    ]
