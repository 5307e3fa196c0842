"""``config``: Conflict-Free Inverse Gradients (Liu et al., ICLR 2025)."""

from __future__ import annotations

import torch
from torch import Tensor

from gradsurg.strategies.base import Context, GramStrategy, Property
from gradsurg.strategies.qp import symmetric_pinv_solve
from gradsurg.strategies.registry import register_strategy

__all__ = ["ConFIG"]

# ‖U⁺1‖ is dimensionless and at least ~1/√T unless 1 has no component on the row space of U; below
# this it is rounding noise and the direction is 0.
_DEGENERATE = 1e-6


@register_strategy("config", aliases=("conflict_free",))
class ConFIG(GramStrategy):
    r"""ConFIG: the direction with equal cosine to every task gradient, as long as their projections.

    With unit gradients ``uᵢ = gᵢ/‖gᵢ‖`` (rows of ``U``), ConFIG takes the direction
    ``ĝ = U⁺ 1 / ‖U⁺ 1‖`` — the minimum-norm solution of ``uᵢ·x = 1`` for all ``i``, so ``ĝ`` has the
    same positive cosine with every task gradient (when the gradients are linearly independent) —
    and the length ``Σᵢ gᵢ·ĝ``:

    ``d = (Σᵢ gᵢ·ĝ) ĝ``

    In Gram space, with ``N = diag(‖gᵢ‖)`` and the cosine matrix ``C = N⁺KN⁺``: ``U⁺1 = Gᵀa`` with
    ``a = N⁺C⁺1``, ``‖U⁺1‖² = aᵀKa``, ``Σᵢ gᵢ·ĝ = 1ᵀKa/‖U⁺1‖``. Zero gradients get zero unit rows
    (as in the official code and TorchJD).

    Paper: Q. Liu, M. Chu, N. Thuerey, "ConFIG: Towards Conflict-free Training of Physics Informed
    Neural Networks", ICLR 2025, https://arxiv.org/abs/2408.11104 (official code:
    ``tum-pbs/ConFIG``, ``ConFIG_update`` with its defaults: equal weights, projection length,
    least-squares inverse).

    Choices: the pseudo-inverse treats eigenvalues of ``C`` below ``m·ε₃₂·λ_max`` as zero (``m`` the
    number of non-zero gradients, :func:`~gradsurg.strategies.qp.significant_spectrum`); the
    official code and TorchJD take ``pinv`` of the ``T×n`` matrix ``U`` with the default float
    cut-off. When ``‖U⁺1‖ ≤ 10⁻⁶`` (no direction has a positive cosine with every gradient, e.g. two
    opposite gradients) the result is ``0``; the official code's ``F.normalize`` uses ``10⁻¹²``.
    The official alternative length models (``TrackMinimum``, ...) and weight models are not offered.
    Cross-checked against TorchJD's ``ConFIG`` (``1e-9`` relative on generic inputs); the defining
    property (equal cosine with every task gradient, length = sum of the projections) is tested.

    Scale: the length is the **sum** of the projections of the task gradients on ``ĝ`` (the
    official scale); with one task ``d = g``, and with identical gradients ``d = Σᵢ gᵢ``.

    Cost: ``O(T² n)`` for the Gram matrix, ``O(T³)`` for the eigen-decomposition (instead of the
    ``O(T² n)`` SVD of ``U`` in the official code).
    """

    family = "gram"
    cost = "O(T²·n + T³)"
    summary = "Direction with equal cosine to every task gradient, length = sum of projections (Liu et al. 2024)."
    paper = (
        "Q. Liu, M. Chu, N. Thuerey, ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks, "
        "ICLR 2025. https://arxiv.org/abs/2408.11104"
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

    def weights(self, gram: Tensor, context: Context) -> Tensor:
        norms = gram.diagonal(dim1=-2, dim2=-1).sqrt()  # the diagonal of G Gᵀ holds sums of squares, ≥ 0
        inverse_norms = norms.masked_fill(norms == 0, torch.inf).reciprocal()  # 0 for a zero gradient
        cosines = gram * inverse_norms.unsqueeze(-1) * inverse_norms.unsqueeze(-2)
        a = inverse_norms * symmetric_pinv_solve(cosines, torch.ones_like(norms), rank_cutoff=True)
        ka = (gram @ a.unsqueeze(-1)).squeeze(-1)
        # (Σᵢ gᵢ·ĝ) ĝ with ĝ = Gᵀa/‖Gᵀa‖ is (1ᵀKa / aᵀKa) Gᵀa; 0 where ‖Gᵀa‖ ≤ _DEGENERATE.
        square = (a * ka).sum(dim=-1, keepdim=True)
        return a * (ka.sum(dim=-1, keepdim=True) / square.masked_fill(square <= _DEGENERATE**2, torch.inf))
