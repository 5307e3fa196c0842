"""``aligned_mtl``: Aligned-MTL, independent component alignment (Senushkin et al., CVPR 2023)."""

from __future__ import annotations

import torch
from torch import Tensor

from gradsurg.strategies.base import Context, GramStrategy, Property, check_choice
from gradsurg.strategies.qp import significant_spectrum
from gradsurg.strategies.registry import register_strategy

__all__ = ["AlignedMTL"]

_SCALE_MODES = ("min", "median", "rmse")


@register_strategy("aligned_mtl", aliases=("alignedmtl",))
class AlignedMTL(GramStrategy):
    r"""Aligned-MTL: make the task gradients orthogonal and of equal norm, then combine them.

    With the eigen-decomposition of the Gram matrix ``K = G Gᵀ = V Λ Vᵀ`` restricted to its ``r``
    eigenvalues above the rank cut-off, Aligned-MTL replaces ``G`` by the aligned system
    ``Ĝ = σ B G`` with ``B = V Λ^{-1/2} Vᵀ`` — whose rows are orthogonal with equal norm ``σ``
    (the condition number of the system becomes 1) — and returns

    ``d = pᵀ Ĝ = (σ B p)ᵀ G``,  ``σ = √λ``

    where ``λ`` is the smallest kept eigenvalue (``scale_mode="min"``, the paper), their (lower)
    median (``"median"``) or their mean (``"rmse"``), and ``p`` the preference vector.

    Paper: D. Senushkin, N. Patakin, A. Kuznetsov, A. Konushin, "Independent Component Alignment for
    Multi-Task Learning", CVPR 2023, https://arxiv.org/abs/2305.19000 (Algorithm 1; official code
    ``SamsungLabs/MTL``, ``ProcrustesSolver``). Aligned-MTL-UB is the same computation on the
    gradients of a shared representation — here, on whatever parameter group it is given.

    Choices: as in the official code, eigenvalues at or below ``m·ε₃₂·λ_max`` are dropped
    (``torch.finfo().eps``, the float32 epsilon, :func:`~gradsurg.strategies.qp.significant_spectrum`),
    except that ``m`` counts the non-zero task gradients instead of all ``T`` tasks (so that zero
    gradients never change the rank decision); a zero Gram matrix gives ``d = 0``. TorchJD uses
    ``T`` and the epsilon of the Gram matrix's dtype.
    Cross-checked against TorchJD's ``AlignedMTL`` for every ``scale_mode`` (``1e-9`` relative on
    generic inputs, with ``scale="mean"``); the defining property (the aligned rows ``σBG`` are
    orthogonal with norm ``σ``) is tested.

    Scale: ``"sum"`` (default, the official code: ``p = 1``, the sum of the aligned gradients; with
    one task ``d = g``) or ``"mean"`` (``p = 1/T``, TorchJD's default).

    Cost: ``O(T² n)`` for the Gram matrix, ``O(T³)`` for the eigen-decomposition.

    Args:
        scale_mode: ``"min"`` (default, the paper), ``"median"`` or ``"rmse"``.
        scale: ``"sum"`` (default) or ``"mean"``.
    """

    family = "gram"
    cost = "O(T²·n + T³)"
    summary = "Align the task gradients into an orthogonal system of equal norms, then sum (Senushkin et al. 2023)."
    paper = (
        "D. Senushkin et al., Independent Component Alignment for Multi-Task Learning, CVPR 2023. "
        "https://arxiv.org/abs/2305.19000"
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

    scale_mode: str
    scale: str

    def __init__(self, *, scale_mode: str = "min", scale: str = "sum") -> None:
        name = type(self).__name__
        check_choice(scale_mode, _SCALE_MODES, name, "scale_mode")
        check_choice(scale, ("sum", "mean"), name, "scale")
        self._set_options(scale_mode=scale_mode, scale=scale)

    def _factors(self, gram: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(σ, V, r)`` with ``σB = σ V diag(r) Vᵀ``: ``r = λ^{-1/2}`` on the kept eigenvalues, 0 on the others."""
        eigenvalues, vectors, kept = significant_spectrum(gram)
        count = kept.sum(dim=-1, keepdim=True)
        if self.scale_mode == "rmse":
            level = (eigenvalues * kept).sum(dim=-1, keepdim=True) / count.clamp_min(1)
        else:
            # eigh sorts the eigenvalues in ascending order, so the kept ones (those above a cut-off) come last.
            last = gram.shape[-1] - 1
            smallest = last + 1 - count
            position = smallest + (count - 1) // 2 if self.scale_mode == "median" else smallest.clamp_max(last)
            level = eigenvalues.gather(-1, position)
        # Nothing kept (K = 0): r = 0, whatever σ.
        return level.clamp_min(0).sqrt(), vectors, torch.where(kept, eigenvalues.rsqrt(), 0.0)

    def balance(self, gram: Tensor) -> Tensor:
        """The balance transformation ``σ B`` (``Tensor[..., T, T]``) of Algorithm 1."""
        sigma, vectors, inverse_root = self._factors(gram)
        return sigma.unsqueeze(-1) * ((vectors * inverse_root.unsqueeze(-2)) @ vectors.mT)

    def weights(self, gram: Tensor, context: Context) -> Tensor:
        sigma, vectors, inverse_root = self._factors(gram)
        preference = 1.0 if self.scale == "sum" else 1.0 / gram.shape[-1]
        # σ B p with p = c·1: σ c V diag(r) Vᵀ1, where Vᵀ1 holds the column sums of V.
        coordinates = vectors.sum(dim=-2) * inverse_root * (sigma * preference)
        return (coordinates.unsqueeze(-2) @ vectors.mT).squeeze(-2)
