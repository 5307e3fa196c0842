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

A zero ``gⱼ`` never triggers a projection (``gᵢ·gⱼ = 0`` is not a conflict), and the division is
guarded so that no ``inf``/``nan`` appears even in the branch that is not taken.
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
    return projection_coefficients(gram, partners, outer, reference).sum(dim=-2)


def projection_coefficients(gram: Tensor, partners: Tensor, outer: Tensor, reference: Reference) -> Tensor:
    """The coefficients ``C`` of the projected gradients, ``gᵢ' = Σₘ Cᵢₘ gₘ`` (``Tensor[..., T, T]``).

    Takes the arguments of :func:`projection_weights`; ``C @ G`` gives every projected task gradient.
    """
    tasks = gram.shape[-1]
    coefficients = torch.eye(tasks, dtype=gram.dtype, device=gram.device).expand_as(gram).clone()
    if tasks == 1:
        return coefficients
    if reference == "original":
        # Everything indexed by the partner orders is gathered once, before the loop:
        # columns[..., k, i, m] = K[m, j_k(i)], inverse[..., i, k] = 1/‖g_{j_k(i)}‖² (0 for a zero gradient),
        # and one_hot[k, i] = e_{j_k(i)}; each step is then a handful of elementwise operations.
        index = partners.pin_memory().to(gram.device, non_blocking=True) if gram.is_cuda else partners
        columns = gram[..., :, index].permute(*range(gram.dim() - 2), -1, -2, -3)
        norms = gram.diagonal(dim1=-2, dim2=-1)[..., index]
        inverse = safe_divide(torch.ones_like(norms), norms)
        one_hot = torch.eye(tasks, dtype=gram.dtype, device=gram.device)[index].transpose(0, 1)
        steps = zip(columns.unbind(-3), inverse.unbind(-1), one_hot.unbind(0))
        for column, inverse_norm, partner in steps:
            # dots[..., i] = gᵢ'·g_{j(i)} = Σₘ C[i, m] K[m, j(i)]
            step_coef = torch.linalg.vecdot(coefficients, column).clamp_max_(0).mul_(inverse_norm)
            coefficients = torch.addcmul(coefficients, step_coef.unsqueeze(-1), partner, value=-1)
    else:
        for i in outer.tolist():
            for j in partners[i].tolist():
                ci, cj = coefficients[..., i, :], coefficients[..., j, :]
                kcj = (gram @ cj.unsqueeze(-1)).squeeze(-1)
                dot = (ci * kcj).sum(dim=-1)
                norm = (cj * kcj).sum(dim=-1)
                coef = safe_divide(dot.clamp_max(0), norm)
                coefficients[..., i, :] = ci - coef.unsqueeze(-1) * cj
    return coefficients
