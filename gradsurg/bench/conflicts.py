"""How often tasks conflict during training: the share of task pairs with opposing gradients.

Two tasks ``i`` and ``j`` **conflict** on the shared parameters when their gradients point in opposing
directions, ``gᵢ·gⱼ < 0`` (PCGrad, https://arxiv.org/abs/2001.06782, Definition 1; Ortho-LoRA,
https://arxiv.org/abs/2601.09684, Section 3). The benchmark measures, at a few steps of every
multi-task run, the share of the ``T(T−1)/2`` task pairs that conflict on the flattened vector of all
shared LoRA parameters, the same way for every method (so the curves are comparable: the measure
does not depend on how a method groups the parameters).

The probe takes the per-task gradients with ``torch.autograd.grad`` on the step's own losses, before
the method's backward pass, and is kept out of the step-time measurement.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from gradsurg.diagnostics.stats import group_stats

__all__ = ["conflict_share", "task_gradients"]


def conflict_share(grads: Tensor) -> float:
    """The share of task pairs ``i < j`` whose gradients conflict, ``gᵢ·gⱼ < 0``.

    Args:
        grads: ``Tensor[T, n]``, one gradient per task.

    Returns:
        A number in ``[0, 1]``; ``nan`` when there is no pair (``T < 2``). A pair with a zero gradient
        does not conflict.
    """
    tasks = grads.shape[0]
    if tasks < 2:
        return math.nan
    exact = grads.double()
    ones = torch.ones(tasks, dtype=exact.dtype, device=exact.device)
    return float(group_stats(exact @ exact.T, weights=ones).conflict_share)


def task_gradients(losses: Sequence[Tensor], params: Sequence[Tensor]) -> Tensor:
    """``Tensor[T, n]``: each loss's gradient over ``params``, flattened and concatenated.

    The graph is retained, so the caller can still run its own backward pass on the same losses.
    A parameter a loss does not reach contributes zeros.
    """
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, list(params), retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)]))
    return torch.stack(rows)
