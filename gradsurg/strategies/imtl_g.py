"""``imtl_g``: the gradient part of Impartial Multi-Task Learning (Liu et al., ICLR 2021)."""

from __future__ import annotations

import torch
from torch import Tensor

from gradsurg.strategies.base import Context, GramStrategy, Property, check_choice
from gradsurg.strategies.qp import symmetric_pinv_solve
from gradsurg.strategies.registry import register_strategy

__all__ = ["IMTLG"]

# Below this (dimensionless) value of |Σv|·Σ‖gᵢ‖ the weights are set to zero (no impartial direction).
_DEGENERATE = 1e-6


@register_strategy("imtl_g", aliases=("imtlg", "imtl"))
class IMTLG(GramStrategy):
    r"""IMTL-G: the combination of the task gradients with equal projections on every unit gradient.

    IMTL-G looks for ``d = Σᵢ wᵢ gᵢ`` with ``Σᵢ wᵢ = 1`` whose projections on the unit task
    gradients ``uᵢ = gᵢ/‖gᵢ‖`` are all equal: ``d·uᵢ = d·uⱼ``. The paper solves this with the
    differences ``D = [g₁ − gᵢ]`` and ``U = [u₁ − uᵢ]``: ``w₂..T = g₁Uᵀ(DUᵀ)⁻¹``, ``w₁ = 1 − Σ w₂..T``.
    In Gram space (``K = G Gᵀ``, ``s = (‖gᵢ‖)ᵢ = √diag K``) the condition reads ``K w ∝ s``, so

    ``v = K⁺ s``,  ``w = v / Σᵢ vᵢ``

    (the generalisation of Quinton & Rey 2024, which also covers linearly dependent gradients; with
    independent gradients it is the paper's closed form). When ``Σ v`` vanishes (e.g. two exactly
    opposite gradients) no such direction exists and ``w = 0``. Like the paper's, the result can
    conflict with every task when ``Σ v < 0``.

    Paper: L. Liu, Y. Li, Z. Kuang, J.-H. Xue, Y. Chen, W. Yang, Q. Liao, W. Zhang, "Towards
    Impartial Multi-task Learning", ICLR 2021, https://openreview.net/forum?id=IMPnRXEWpvr.
    The loss-scale part of IMTL (IMTL-L, learnable loss scales) is not part of this strategy.

    Choices: the pseudo-inverse treats eigenvalues below ``m·ε₃₂·λ_max`` as zero (``m`` the number
    of non-zero gradients, :func:`~gradsurg.strategies.qp.significant_spectrum`; TorchJD uses
    ``torch.linalg.pinv``'s float64 default), and ``Σ v`` counts as zero when
    ``|Σ v|·Σ‖gᵢ‖ ≤ 10⁻⁶`` (a scale-free test; TorchJD: ``|Σ v| < 10⁻¹²``).
    Cross-checked against TorchJD's ``IMTLG`` (``1e-9`` relative on generic
    inputs) and against the paper's closed form on linearly independent gradients; defining property
    (equal projections on every unit gradient) tested to ``1e-8`` relative.

    Scale: ``"mean"`` (default, ``Σ w = 1``: the paper's; with one task ``d = g``) or ``"sum"``
    (times ``T``, the scale of the summed loss).

    Cost: ``O(T² n)`` for the Gram matrix, ``O(T³)`` for the eigen-decomposition.

    Args:
        scale: ``"mean"`` (default) or ``"sum"``.
    """

    family = "gram"
    cost = "O(T²·n + T³)"
    summary = "Combination of the task gradients with equal projections on every unit gradient (Liu et al. 2021)."
    paper = (
        "L. Liu et al., Towards Impartial Multi-task Learning, ICLR 2021. https://openreview.net/forum?id=IMPnRXEWpvr"
    )
    batched = True
    properties = frozenset(
        {
            Property.SCALE_EQUIVARIANT,
            Property.ONE_TASK_IDENTITY,
            Property.ONE_TASK_POSITIVE,
            Property.PERMUTATION_INVARIANT,
            Property.ZERO_ROWS_IGNORED,
            Property.IN_ROW_SPAN,
        }
    )

    scale: str

    def __init__(self, *, scale: str = "mean") -> None:
        check_choice(scale, ("mean", "sum"), type(self).__name__, "scale")
        self._set_options(scale=scale)

    def weights(self, gram: Tensor, context: Context) -> Tensor:
        norms = gram.diagonal(dim1=-2, dim2=-1).sqrt()  # the diagonal of G Gᵀ holds sums of squares, ≥ 0
        v = symmetric_pinv_solve(gram, norms, rank_cutoff=True)
        total = v.sum(dim=-1, keepdim=True)
        degenerate = total.abs() * norms.sum(dim=-1, keepdim=True) <= _DEGENERATE
        w = v / total.masked_fill(degenerate, torch.inf)  # 0 where degenerate
        return w * float(gram.shape[-1]) if self.scale == "sum" else w
