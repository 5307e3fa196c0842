"""The conflict projection shared by PCGrad and Ortho-LoRA, computed in Gram space.

For task ``i`` and a visiting order of the other tasks, whenever the running ``gᵢ`` conflicts with
``gⱼ`` (``gᵢ·gⱼ < 0``) it is replaced by ``gᵢ − (gᵢ·gⱼ / ‖gⱼ‖²) gⱼ``. Every projected gradient stays a
linear combination of the originals, ``gᵢ' = Σₖ Cᵢₖ gₖ``, so the whole procedure runs on the ``T×T``
Gram matrix ``K = G Gᵀ``: ``gᵢ'·gⱼ = (C K)ᵢⱼ``. The sum of the projected gradients is then
``Σᵢ gᵢ' = wᵀ G`` with ``w = 1ᵀ C``: two passes over ``G`` whatever ``T``.

``reference="original"`` projects against the original ``gⱼ`` (PCGrad, Yu et al. 2020, Alg. 1);
the rows of ``C`` are then independent and all tasks advance together, one partner per iteration.
``reference="sequential"`` projects against the *current* ``gⱼ'`` of tasks already visited (the
literal in-place reading of Ortho-LoRA's Algorithm 1), so tasks are processed one after another in
the outer order.

A zero ``gⱼ`` never triggers a projection (``gᵢ·gⱼ = 0`` is not a conflict): its ``1/‖gⱼ‖²`` is
taken as exactly 0, so no ``inf``/``nan`` reaches the result.

Cost of ``"original"``: after a handful of gathers, ``T − 1`` steps of two elementwise kernels on
``T × (T − 1)`` tensors (all tasks advance together), then one scatter for ``w`` — a fixed number of
operations, no host synchronisation.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from gradsurg._math import safe_divide

__all__ = [
    "REFERENCES",
    "Reference",
    "others_in_order",
    "per_task_orders",
    "projection_coefficients",
    "projection_weights",
]

Reference = Literal["original", "sequential"]
REFERENCES: tuple[Reference, ...] = ("original", "sequential")


def per_task_orders(tasks: int, generator: torch.Generator | None, *, shuffle: bool = True) -> Tensor:
    """For every task, its own order of visiting the other tasks (PCGrad: ``Tensor[T, T−1]``, CPU).

    With ``shuffle=False`` every task visits the others in index order.
    """
    index = torch.arange(tasks - 1)
    others = index + (index.unsqueeze(0) >= torch.arange(tasks).unsqueeze(1)).long()
    if not shuffle or tasks <= 2:
        return others
    keys = torch.rand(tasks, tasks - 1, generator=generator)
    return others.gather(1, keys.argsort(dim=1))


def others_in_order(order: Tensor) -> Tensor:
    """Partners of each task under one shared order ``π``: row ``i`` is ``π`` without ``i`` (``Tensor[T, T−1]``).

    Rows are indexed by task id (row ``i`` belongs to task ``i``), not by position in ``π``.
    """
    tasks = order.numel()
    table = order.unsqueeze(0).expand(tasks, tasks)
    keep = table != torch.arange(tasks).unsqueeze(1)
    return table[keep].reshape(tasks, tasks - 1)


def projection_weights(gram: Tensor, partners: Tensor, outer: Tensor, reference: Reference) -> Tensor:
    """Task weights ``w`` such that ``wᵀ G`` is the sum of the conflict-projected task gradients.

    Args:
        gram: ``Tensor[..., T, T]``, the Gram matrix ``G Gᵀ`` (batched over leading dimensions).
        partners: ``Tensor[T, T−1]``, row ``i`` lists the tasks task ``i`` is projected against, in order.
        outer: ``Tensor[T]``, the order in which tasks are processed (only used by ``"sequential"``).
        reference: ``"original"`` or ``"sequential"`` (see the module docstring).

    Returns:
        ``Tensor[..., T]``, the weights ``w = 1ᵀ C`` (``C`` from :func:`projection_coefficients`).
    """
    if reference == "sequential" or gram.shape[-1] == 1:
        return projection_coefficients(gram, partners, outer, reference).sum(dim=-2)
    steps, index = _original_steps(gram, partners)
    # w = 1ᵀC with C = I − Σₖ sᵢₖ e_{jₖ(i)}ᵀ: every step subtracts its multiple from its partner's weight.
    flat = index.flatten().expand(*gram.shape[:-2], -1)
    return torch.ones_like(gram[..., 0, :]).scatter_add_(-1, flat, steps.flatten(-2).neg())


def projection_coefficients(gram: Tensor, partners: Tensor, outer: Tensor, reference: Reference) -> Tensor:
    """The coefficients ``C`` of the projected gradients, ``gᵢ' = Σₘ Cᵢₘ gₘ`` (``Tensor[..., T, T]``).

    Takes the arguments of :func:`projection_weights`; ``C @ G`` gives every projected task gradient.
    """
    tasks = gram.shape[-1]
    coefficients = torch.eye(tasks, dtype=gram.dtype, device=gram.device).expand_as(gram).clone()
    if tasks == 1:
        return coefficients
    if reference == "original":
        steps, index = _original_steps(gram, partners)
        return coefficients.scatter_add_(-1, index.expand_as(steps), steps.neg())
    for i in outer.tolist():
        for j in partners[i].tolist():
            ci, cj = coefficients[..., i, :], coefficients[..., j, :]
            kcj = (gram @ cj.unsqueeze(-1)).squeeze(-1)
            dot = (ci * kcj).sum(dim=-1)
            norm = (cj * kcj).sum(dim=-1)
            coef = safe_divide(dot.clamp_max(0), norm)
            coefficients[..., i, :] = ci - coef.unsqueeze(-1) * cj
    return coefficients


def _original_steps(gram: Tensor, partners: Tensor) -> tuple[Tensor, Tensor]:
    """The projection steps of ``reference="original"``: ``gᵢ' = gᵢ − Σₖ sᵢₖ g_{jₖ(i)}``.

    Only the scaled inner products ``Eᵢₗ = gᵢ'·g_{jₗ(i)} / ‖g_{jₗ(i)}‖²`` of each running gradient with
    its own partners are tracked (``Tensor[..., T, T−1]``; 0 for a zero partner). Step ``k`` reads
    ``sᵢₖ = min(Eᵢₖ, 0)`` for all tasks at once and updates ``Eᵢₗ −= sᵢₖ K[jₖ(i), jₗ(i)] / ‖g_{jₗ(i)}‖²``:
    two elementwise kernels per partner, everything indexed by the orders being gathered before the loop.

    Returns:
        ``s`` (``Tensor[..., T, T−1]``) and the partner table on ``gram``'s device (``Tensor[T, T−1]``).
    """
    index = partners.pin_memory().to(gram.device, non_blocking=True) if gram.is_cuda else partners
    norms = gram.diagonal(dim1=-2, dim2=-1)[..., index]
    inverse = torch.where(norms > 0, norms, torch.inf).reciprocal_()  # 1/‖g_j‖², exactly 0 for a zero g_j
    scaled = gram.gather(-1, index.expand(*gram.shape[:-2], -1, -1)).mul_(inverse)
    cross = gram[..., index.unsqueeze(-1), index.unsqueeze(-2)].mul_(inverse.unsqueeze(-2))  # [..., i, k, l]
    steps = torch.empty_like(scaled)
    # Column views [..., T, 1] are taken once, so the loop creates no views: two kernels per partner.
    columns = zip(scaled.unsqueeze(-1).unbind(-2), steps.unsqueeze(-1).unbind(-2), cross.unbind(-2))
    for k, (value, step, row) in enumerate(columns):
        torch.clamp(value, max=0, out=step)
        if k + 1 < index.shape[-1]:
            scaled.addcmul_(step, row, value=-1)
    return steps, index
