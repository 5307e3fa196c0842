"""Data-parallel training (DDP, ``torchrun``): per-task gradients averaged over ranks.

Every rank computes the per-task gradients of its own batches. Before the strategy runs, the
Surgeon averages them over the ranks, so that every rank combines the same matrices ``G[T, n]``
with an identically seeded generator and writes the same direction. The average of task ``t`` is
taken over the ranks that had a batch of ``t``:

.. math:: \\bar g_t = \\frac{1}{|R_t|} \\sum_{r \\in R_t} g_t^{(r)}

(``|R_t|`` is the world size when every rank has every task), which equals the gradient of a
single process on the union of the ranks' batches when each rank's loss is a mean over equally
sized batches, exactly as DDP's own averaging does for ``loss.backward()``.

Cost: **one** small ``all_gather`` of a header (task count, a hash of the task names, of the
layout and of the Surgeon's generator state) that turns a disagreement between ranks into the same
clear error on every rank instead of a hang, then **one** ``all_reduce`` of a single flat buffer
holding every group matrix, the gradients of the other reached leaves, the task counts, the losses
and one "reached" flag per group parameter.

A rank without a batch for some task passes a ``{name: loss}`` mapping without that task (the
Surgeon must be built with ``tasks=[names]``): its gradient for the task counts as absent, not as
zero. Leaves outside every group (task heads) must be reached on every rank (their number and shapes
are checked); put heads that some rank may not reach into a group with strategy ``"sum"``.

The per-task gradients are computed with ``torch.autograd.grad``, which does not run the
``AccumulateGrad`` nodes DDP's reducer hooks into: DDP's own all-reduce never fires, so there is no
double communication and nothing to disable (``model.no_sync()`` is not needed).
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Sequence

import torch
from torch import Tensor
from torch import distributed as dist

from gradsurg.accumulation import TaskGradients, Work
from gradsurg.errors import InvalidLossError, InvalidOptionError, InvalidStateError
from gradsurg.groups import ParamGroup

__all__ = ["is_active", "synchronize"]

_HEADER_FIELDS = (
    "number of tasks",
    "task names (hash)",
    "number of leaves outside every group",
    "shapes of those leaves (hash)",
    "gradient buffer size",
    "Surgeon generator state (hash; seed every rank's Surgeon identically)",
)


def is_active(flag: bool | None) -> bool:
    """Whether per-task gradients are averaged over ranks, for the Surgeon option ``distributed``.

    Raises:
        InvalidOptionError: ``distributed=True`` without an initialised process group.
    """
    if flag is False:
        return False
    initialised = dist.is_available() and dist.is_initialized()
    if flag is True and not initialised:
        raise InvalidOptionError(
            "Surgeon `distributed=True` needs an initialised torch.distributed process group "
            "(torch.distributed.init_process_group, or a launch with torchrun); found none."
        )
    return initialised and (flag is True or dist.get_world_size() > 1)


def synchronize(
    grads: TaskGradients,
    flag: bool | None,
    groups: Sequence[ParamGroup],
    tasks: Sequence[str] | None,
    generator: torch.Generator,
) -> TaskGradients:
    """Average ``grads`` over the ranks (returned unchanged when distributed use is off).

    Args:
        grads: This rank's per-task gradients of the step.
        flag: The Surgeon option ``distributed``.
        groups: The Surgeon's groups (the buffer lays out every parameter of every group).
        tasks: The Surgeon's task names, if given (then a rank may lack some tasks).
        generator: The Surgeon's generator (its state must agree across ranks).

    Raises:
        InvalidLossError: The ranks disagree on the tasks, or a task is not one of ``tasks``.
        InvalidStateError: The ranks disagree on the leaves outside the groups or on the generator.
    """
    if not is_active(flag):
        return grads
    names = tuple(tasks) if tasks is not None else grads.names
    unknown = sorted(set(grads.names) - set(names))
    if unknown:
        raise InvalidLossError(f"`losses` must only hold the Surgeon's tasks {list(names)}; found {unknown}.")
    rows = [grads.names.index(n) if n in grads.names else None for n in names]
    reached = {id(p) for _, params, _ in grads.groups for p in params}
    parts = [
        torch.tensor([r is not None for r in rows], dtype=torch.float64),
        _expand(grads.losses.reshape(-1, 1), rows),
        torch.tensor([id(p) in reached for g in groups for p in g.params], dtype=torch.float64),
    ]
    parts += [_expand(matrix, rows) for matrix in _full_matrices(grads, groups, len(grads.names))]
    other_rows = [0] if grads.others_summed else rows
    parts += [_expand(torch.stack(g).reshape(len(g), -1), other_rows) for _, g in grads.others]
    dtype = functools.reduce(torch.promote_types, [p.dtype for p in parts[3:]], torch.float32)
    device = grads.losses.device
    flat = torch.cat([p.to(device=device, dtype=dtype).reshape(-1) for p in parts])
    _check_header(_header(names, grads, flat.numel(), generator, device))
    dist.all_reduce(flat)
    return _unflatten(flat, names, grads, groups)


def _expand(matrix: Tensor, rows: Sequence[int | None]) -> Tensor:
    """``matrix`` with one row per Surgeon task (zeros for the tasks this rank lacks)."""
    zero = torch.zeros_like(matrix[0])
    return torch.stack([matrix[r] if r is not None else zero for r in rows])


def _full_matrices(grads: TaskGradients, groups: Sequence[ParamGroup], tasks: int) -> list[Tensor]:
    """Per group, ``G[T, n]`` over **all** its parameters (zero columns for parameters not reached)."""
    reached = {group.name: (params, matrix) for group, params, matrix in grads.groups}
    matrices = []
    for group in groups:
        params, matrix = reached.get(group.name, ([], None))
        columns = {id(p): c for p, c in zip(params, _split(params, matrix))} if matrix is not None else {}
        like = matrix if matrix is not None else grads.losses
        matrices.append(
            torch.cat(
                [
                    columns.get(id(p), torch.zeros(tasks, p.numel(), dtype=like.dtype, device=like.device))
                    for p in group.params
                ],
                dim=1,
            )
        )
    return matrices


def _split(params: Sequence[Tensor], matrix: Tensor) -> list[Tensor]:
    return list(torch.split(matrix, [p.numel() for p in params], dim=1))


def _header(
    names: tuple[str, ...], grads: TaskGradients, size: int, generator: torch.Generator, device: torch.device
) -> Tensor:
    shapes = repr([(tuple(leaf.shape), len(g)) for leaf, g in grads.others]).encode()
    values = [
        len(names),
        zlib.crc32("\x00".join(names).encode()),
        len(grads.others),
        zlib.crc32(shapes),
        size,
        zlib.crc32(generator.get_state().numpy().tobytes()),
    ]
    return torch.tensor(values, dtype=torch.int64, device=device)


def _check_header(header: Tensor) -> None:
    """The same error on every rank when the ranks disagree (instead of a hang in ``all_reduce``)."""
    gathered = [torch.empty_like(header) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, header)
    table = torch.stack(gathered).tolist()
    for index, field in enumerate(_HEADER_FIELDS):
        values = [row[index] for row in table]
        if len(set(values)) > 1:
            error = InvalidLossError if index < 2 else InvalidStateError
            raise error(
                f"Every rank must give the Surgeon the same {field} in a distributed step; found "
                f"{', '.join(f'rank {r}: {v}' for r, v in enumerate(values))}."
            )


def _unflatten(
    flat: Tensor, names: tuple[str, ...], grads: TaskGradients, groups: Sequence[ParamGroup]
) -> TaskGradients:
    """The rank-averaged gradients from the reduced buffer (layout of :func:`synchronize`)."""
    tasks = len(names)
    counts = flat[:tasks]
    divisor = counts.clamp(min=1).unsqueeze(1)
    losses = flat[tasks : 2 * tasks] / counts.clamp(min=1)
    offset = 2 * tasks
    sizes = [p.numel() for g in groups for p in g.params]
    reached = (flat[offset : offset + len(sizes)] > 0).tolist()
    offset += len(sizes)
    work: list[Work] = []
    flags = iter(reached)
    for group in groups:
        n = sum(p.numel() for p in group.params)
        matrix = flat[offset : offset + tasks * n].view(tasks, n) / divisor
        offset += tasks * n
        keep = [next(flags) for _ in group.params]
        if any(keep):
            columns = _split(list(group.params), matrix)
            params: list[Tensor] = [p for p, k in zip(group.params, keep) if k]
            work.append((group, params, torch.cat([c for c, k in zip(columns, keep) if k], dim=1)))
    others: list[tuple[Tensor, list[Tensor]]] = []
    world = dist.get_world_size()
    for leaf, local in grads.others:
        count = len(local)
        block = flat[offset : offset + count * leaf.numel()].view(count, *leaf.shape)
        offset += count * leaf.numel()
        if grads.others_summed and bool((counts != world).any()):
            raise InvalidLossError(
                "With engine='segment' every rank must have a batch of every task in a distributed step (the "
                f"leaves outside the groups only have task-summed gradients); found task counts {counts.tolist()}."
            )
        scale = divisor.view(-1, *([1] * leaf.dim())) if not grads.others_summed else world
        others.append((leaf, list((block / scale).unbind(0))))
    return TaskGradients(names, losses, work, others, grads.others_summed, grads.scaled)
