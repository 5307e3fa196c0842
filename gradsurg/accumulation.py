"""The per-task gradients of one step, and their accumulation over micro-batches.

Gradient accumulation with surgery must run the strategy **once**, on the per-task gradients of the
effective batch, not once per micro-batch (PCGrad of a sum is not the sum of PCGrads). The Surgeon
therefore keeps a buffer of per-task gradients: ``surgeon.backward(losses, accumulate=True)`` adds
the micro-batch's gradients to it without touching ``.grad``, and ``surgeon.step()`` (or a last
``surgeon.backward(losses)`` without ``accumulate``) combines the accumulated gradients and writes
``.grad``.

With micro-batches ``m = 1..k``, the accumulated gradient of task ``t`` is

.. math:: G_t = \\sum_{m=1}^{k} \\nabla_\\theta L_t^{(m)},

the same as ``loss.backward()`` accumulating into ``.grad``. When every micro-batch loss is a mean
over its samples and is divided by ``k`` (the usual recipe), ``G_t`` is the gradient of the mean
loss over the whole effective batch, and the step equals one ``surgeon.backward`` on one batch ``k``
times as large.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from gradsurg.errors import InvalidLossError
from gradsurg.groups import ParamGroup

__all__ = ["TaskGradients", "all_finite", "check_tasks", "merge"]

Work = tuple[ParamGroup, list[Tensor], Tensor]
"""One group of a step: the group, its parameters reached by some task, its gradient matrix ``G[T, n]``."""


@dataclass(frozen=True)
class TaskGradients:
    """Everything a step combines: per-task gradients of the groups and of the other reached leaves.

    Attributes:
        names: The task names, in order.
        losses: ``Tensor[T]``, the task losses (detached; summed over accumulated micro-batches).
        groups: Per group reached by some task: the group, its reached parameters and ``G[T, n]``.
        others: Per reached leaf outside every group: the leaf and its per-task gradients (a single
            entry, the sum over tasks, when ``others_summed``).
        others_summed: The engine only gave the task-summed gradient of the leaves outside groups.
        scaled: Some of the gradients come from losses scaled by a ``GradScaler`` (and were unscaled).
    """

    names: tuple[str, ...]
    losses: Tensor
    groups: list[Work]
    others: list[tuple[Tensor, list[Tensor]]]
    others_summed: bool = False
    scaled: bool = False

    def tensors(self) -> list[Tensor]:
        """Every gradient tensor of the step (group matrices, then other leaves' gradients)."""
        return [matrix for _, _, matrix in self.groups] + [g for _, grads in self.others for g in grads]

    def map(self, fn: Callable[[Tensor], Tensor]) -> TaskGradients:
        """A copy with ``fn`` applied to every gradient tensor (not to the losses)."""
        return replace(
            self,
            groups=[(group, params, fn(matrix)) for group, params, matrix in self.groups],
            others=[(leaf, [fn(g) for g in grads]) for leaf, grads in self.others],
        )


def all_finite(grads: TaskGradients) -> bool:
    """Whether every gradient of the step is finite (one device sync for the whole step)."""
    flags = [torch.isfinite(t).all() for t in grads.tensors()]
    return not flags or bool(torch.stack(flags).all())


def check_tasks(total: TaskGradients | None, names: Sequence[str]) -> None:
    """Raise :class:`InvalidLossError` unless a micro-batch's tasks are those accumulated so far."""
    if total is not None and total.names != tuple(names):
        raise InvalidLossError(
            "Every micro-batch of an accumulated step must have the same tasks in the same order; the step "
            f"so far has {list(total.names)}, this micro-batch has {list(names)}."
        )


def merge(total: TaskGradients | None, new: TaskGradients, order: dict[str, int]) -> TaskGradients:
    """The sum of two micro-batches' per-task gradients (out of place: ``total`` is not modified).

    A parameter reached in only one of them counts as zero in the other.

    Args:
        total: The accumulated gradients so far (``None`` for the first micro-batch).
        new: The gradients of the next micro-batch.
        order: The position of each group name in the Surgeon, to keep groups in order.

    Raises:
        InvalidLossError: The micro-batches do not have the same tasks, in the same order.
    """
    if total is None:
        return new
    check_tasks(total, new.names)
    groups: dict[str, Work] = {group.name: (group, params, matrix) for group, params, matrix in total.groups}
    for group, params, matrix in new.groups:
        old = groups.get(group.name)
        groups[group.name] = (group, params, matrix) if old is None else _add_group(old, params, matrix)
    others: dict[int, tuple[Tensor, list[Tensor]]] = {id(leaf): (leaf, grads) for leaf, grads in total.others}
    summed = total.others_summed or new.others_summed
    for leaf, grads in new.others:
        previous = others.get(id(leaf))
        if previous is None:
            others[id(leaf)] = (leaf, grads)
        elif summed:
            others[id(leaf)] = (leaf, [torch.stack(previous[1]).sum(0) + torch.stack(grads).sum(0)])
        else:
            others[id(leaf)] = (leaf, [a + b for a, b in zip(previous[1], grads)])
    if summed:
        others = {key: (leaf, [torch.stack(grads).sum(0)]) for key, (leaf, grads) in others.items()}
    return TaskGradients(
        names=total.names,
        losses=total.losses + new.losses,
        groups=sorted(groups.values(), key=lambda item: order[item[0].name]),
        others=list(others.values()),
        others_summed=summed,
        scaled=total.scaled or new.scaled,
    )


def _add_group(old: Work, params: list[Tensor], matrix: Tensor) -> Work:
    group, old_params, old_matrix = old
    if [id(p) for p in old_params] == [id(p) for p in params]:
        return group, params, old_matrix + matrix
    # Different parameters reached: lay both out on the union, in the group's own order.
    columns = {id(p): c for p, c in zip(old_params, _columns(old_params, old_matrix))}
    for p, c in zip(params, _columns(params, matrix)):
        columns[id(p)] = columns[id(p)] + c if id(p) in columns else c
    union: list[Tensor] = [p for p in group.params if id(p) in columns]
    return group, union, torch.cat([columns[id(p)] for p in union], dim=1)


def _columns(params: list[Tensor], matrix: Tensor) -> list[Tensor]:
    return list(torch.split(matrix, [p.numel() for p in params], dim=1))
