"""Batched, device-side solvers for the small quadratic programs of MGDA, UPGrad and DualProj.

Both problems live in Gram space, on the ``T×T`` matrix ``K = G Gᵀ``, batched over leading
dimensions, on the tensor's device:

* :func:`project_dual_cone` — the weights of the projection of ``Gᵀu`` onto the dual cone
  ``{d : G d ≥ 0}`` of the rows (UPGrad, DualProj). By Proposition 1 of Quinton & Rey (2024) this is
  ``min_v vᵀ K v  s.t.  v ≥ u``, i.e. with ``v = u + x`` the non-negative least-squares problem
  ``min_{x ≥ 0} ‖Gᵀx + Gᵀu‖²``.
* :func:`min_norm_weights` — the minimum-norm point of the convex hull of the task gradients
  (MGDA): ``min_{w ∈ Δ} wᵀ K w``. It is solved as the least-distance problem
  ``min ‖y‖ s.t. G y ≥ 1`` through the non-negative least-squares problem
  ``min_{x ≥ 0} ‖Gᵀx‖² + (1ᵀx − 1)²`` (Lawson & Hanson 1974, ch. 23): ``w* = x*/1ᵀx*``. When ``0``
  lies in the hull the residual vanishes and ``x*`` itself is a convex combination with
  ``Gᵀx* = 0``.

Method. Both reduce to ``min_{x ≥ 0} ½ xᵀPx − qᵀx`` with ``P`` positive semi-definite, which
:func:`nonnegative_least_squares` solves exactly with the active-set method of Lawson & Hanson
(1974) in the Gram form of Bro & de Jong (1997): variables enter the passive set one at a time
(largest violated optimality condition first), the passive system is solved with a
pseudo-inverse (rank-deficient ``K`` is fine), and a step back along the segment keeps the
iterate feasible. The method terminates in finitely many steps at the exact optimum; each step is
batched with masks, and the loops stop as soon as no batch element has a violated condition (one
scalar read from the device per step: the only host synchronisations), after at most ``3T`` outer
steps of at most ``T`` inner steps each. ``K`` is divided by its trace first
(the minimisers do not depend on the scale of ``G``) and its eigenvalues at the rounding level are
set to zero (:func:`denoise_gram`; the Gram matrix of float32 gradients is only known to ``~ε₃₂``,
and rounding-level eigenvalues of either sign would make the problem non-convex or badly
conditioned). If the natural residual ``‖min(x, Px − q)‖∞`` of the result is above :data:`TOLERANCE`, a
:class:`~gradsurg.errors.GradSurgWarning` reports it and the (feasible) last iterate is used.

Cross-checked (tests) against ``quadprog`` through TorchJD's projector, against SciPy's ``nnls``,
against TorchJD's Frank-Wolfe MGDA and against the defining optimality conditions.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from gradsurg._math import safe_divide
from gradsurg.errors import GradSurgWarning

__all__ = [
    "RANK_RTOL",
    "TOLERANCE",
    "denoise_gram",
    "min_norm_weights",
    "nonnegative_least_squares",
    "normalize_gram",
    "project_dual_cone",
    "significant_spectrum",
    "symmetric_pinv_solve",
]

#: Relative rank cut-off for the closed-form methods (pseudo-inverses, eigen-decompositions): the
#: float32 machine epsilon, as in the official Aligned-MTL code (``torch.finfo().eps``). The Gram
#: matrix of float32 gradients is only known to about this precision, and inverting eigenvalues at
#: the rounding level would amplify rounding noise into the direction.
RANK_RTOL = torch.finfo(torch.float32).eps

#: Largest accepted natural residual of the optimality conditions (``K`` normalised to trace 1):
#: about ten float32 epsilons, the precision to which the Gram matrix of float32 gradients is known.
#: On float64 inputs the residual is typically ~1e-15.
TOLERANCE = 1e-6

# A variable enters the passive set when its optimality condition is violated by more than this.
_ENTER = 1e-13


def normalize_gram(gram: Tensor) -> Tensor:
    """``K / tr(K)`` for each matrix of the batch (an all-zero ``K`` stays zero)."""
    trace = gram.diagonal(dim1=-2, dim2=-1).sum(dim=-1)[..., None, None]
    return gram / torch.where(trace > 0, trace, torch.ones_like(trace))


def significant_spectrum(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``eigh`` of a symmetric PSD matrix, with a mask of the numerically significant eigenvalues.

    An eigenvalue is significant when it exceeds ``m·RANK_RTOL·λ_max``, where ``m`` counts the
    non-zero diagonal entries (the tasks with a non-zero gradient), so that appending zero task
    gradients never changes the rank decision.

    Returns:
        ``(eigenvalues, eigenvectors, significant)`` as from ``torch.linalg.eigh`` plus a bool mask.
    """
    eigenvalues, vectors = torch.linalg.eigh(matrix)
    nonzero = (matrix.diagonal(dim1=-2, dim2=-1) != 0).sum(dim=-1, keepdim=True).to(matrix.dtype)
    cutoff = eigenvalues[..., -1:].clamp_min(0) * nonzero * RANK_RTOL
    return eigenvalues, vectors, eigenvalues > cutoff


def denoise_gram(gram: Tensor) -> Tensor:
    """``K`` with its eigenvalues at or below the rank cut-off set to zero (PSD, with a clean rank).

    The Gram matrix of float32 gradients is only known to about ``ε₃₂`` relative precision: its
    null directions show up as eigenvalues of either sign at that level, which would make the QPs
    non-convex or badly conditioned. On float64 inputs of moderate condition number nothing changes.
    """
    eigenvalues, vectors, significant = significant_spectrum(gram)
    kept = torch.where(significant, eigenvalues, 0.0)
    cleaned: Tensor = (vectors * kept.unsqueeze(-2)) @ vectors.mT
    return cleaned


def _matvec(matrix: Tensor, vector: Tensor) -> Tensor:
    return (matrix @ vector.unsqueeze(-1)).squeeze(-1)


def _passive_solution(p: Tensor, q: Tensor, passive: Tensor) -> Tensor:
    """Solve ``P_SS s_S = q_S`` on the passive set ``S`` (pseudo-inverse), ``s = 0`` elsewhere."""
    f = passive.to(p.dtype)
    system = p * f.unsqueeze(-1) * f.unsqueeze(-2) + torch.diag_embed(1 - f)
    return symmetric_pinv_solve(system, q * f) * f


def symmetric_pinv_solve(matrix: Tensor, rhs: Tensor, *, rank_cutoff: bool = False) -> Tensor:
    """``A⁺ b`` for symmetric positive semi-definite ``A`` (``[..., T, T]``) and ``b`` (``[..., T]``).

    Through ``eigh``. Eigenvalues at or below ``T·ε·λ_max`` (``torch.linalg.pinv``'s default
    cut-off, ``ε`` of ``A``'s dtype) are treated as zero, or, with ``rank_cutoff=True``, those that
    :func:`significant_spectrum` does not keep.
    """
    if rank_cutoff:
        eigenvalues, vectors, significant = significant_spectrum(matrix)
    else:
        eigenvalues, vectors = torch.linalg.eigh(matrix)
        significant = eigenvalues > eigenvalues[..., -1:] * (matrix.shape[-1] * torch.finfo(matrix.dtype).eps)
    inverse = safe_divide(torch.ones_like(eigenvalues), torch.where(significant, eigenvalues, 0.0))
    coordinates = (vectors * rhs.unsqueeze(-1)).sum(dim=-2) * inverse
    return _matvec(vectors, coordinates)


def nonnegative_least_squares(p: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    """``argmin_{x ≥ 0} ½ xᵀPx − qᵀx`` for each batch element, and its natural residual.

    Lawson-Hanson active set in Gram form (see the module docstring).

    Args:
        p: ``Tensor[..., T, T]``, symmetric positive semi-definite.
        q: ``Tensor[..., T]``.

    Returns:
        ``(x, residual)``: ``x ≥ 0`` of shape ``[..., T]`` and ``‖min(x, Px − q)‖∞`` of shape ``[...]``.
    """
    tasks = p.shape[-1]
    x = torch.zeros_like(q)
    passive = torch.zeros_like(q, dtype=torch.bool)
    for _ in range(3 * tasks):
        violation = q - _matvec(p, x)
        candidates = ~passive & (violation > _ENTER)
        entering = candidates.any(dim=-1, keepdim=True)
        if not bool(entering.any()):
            break
        best = torch.where(candidates, violation, torch.full_like(violation, -torch.inf)).argmax(dim=-1, keepdim=True)
        passive = passive | (torch.zeros_like(passive).scatter(-1, best, True) & entering)
        s = _passive_solution(p, q, passive)
        for _ in range(tasks):
            blocking = passive & (s <= 0) & entering
            stepping = blocking.any(dim=-1, keepdim=True)
            if not bool(stepping.any()):
                break
            ratios = torch.where(blocking, safe_divide(x, x - s), torch.full_like(x, torch.inf))
            alpha, leaving = ratios.min(dim=-1, keepdim=True)
            # The blocking variable leaves exactly (with those rounding left at or below zero).
            left = torch.zeros_like(passive).scatter(-1, leaving, True) & stepping
            x = torch.where(stepping, x + alpha.clamp(0, 1) * (s - x), x).masked_fill(left, 0)
            passive = passive & ~left & ~(stepping & (x <= 0))
            s = _passive_solution(p, q, passive)
        x = torch.where(entering, s.clamp_min(0), x)
    residual = torch.minimum(x, _matvec(p, x) - q).abs().amax(dim=-1)
    return x, residual


def _warn_if_unconverged(residual: Tensor, problem: str) -> None:
    worst = float(residual.max()) if residual.numel() else 0.0
    if worst > TOLERANCE:
        warnings.warn(
            f"The {problem} solver must reach a residual ≤ {TOLERANCE:g}; found {worst:.3e}. "
            "The last (feasible) iterate is used.",
            GradSurgWarning,
            stacklevel=4,
        )


def min_norm_weights(gram: Tensor) -> Tensor:
    """Weights ``w* ∈ Δ`` of the minimum-norm point ``Gᵀw*`` of the convex hull of the rows of ``G``.

    Args:
        gram: ``Tensor[..., T, T]``, the Gram matrix ``G Gᵀ`` (symmetric positive semi-definite).

    Returns:
        ``Tensor[..., T]`` on the simplex. The point ``Gᵀw*`` is unique; ``w*`` need not be (e.g.
        when ``0`` is in the hull), and one minimiser is returned.
    """
    k = denoise_gram(normalize_gram(gram))
    ones = torch.ones(gram.shape[:-1], dtype=gram.dtype, device=gram.device)
    x, residual = nonnegative_least_squares(k + ones.unsqueeze(-1) * ones.unsqueeze(-2), ones)
    _warn_if_unconverged(residual, "minimum-norm (MGDA)")
    total = x.sum(dim=-1, keepdim=True)
    uniform = ones / gram.shape[-1]
    return torch.where(total > 0, x / torch.where(total > 0, total, torch.ones_like(total)), uniform)


def project_dual_cone(gram: Tensor, u: Tensor) -> Tensor:
    """Weights ``v*`` with ``Gᵀv*`` the projection of ``Gᵀu`` onto the dual cone of the rows of ``G``.

    The result satisfies ``K v* ≥ 0`` (``Gᵀv*`` conflicts with no task gradient) and ``v* ≥ u``.

    Args:
        gram: ``Tensor[..., T, T]``, the Gram matrix ``G Gᵀ``.
        u: ``Tensor[..., m, T]`` or ``Tensor[..., T]``: one weight vector per vector to project, all
            with the same ``K``.

    Returns:
        ``v*`` with the shape of ``u``.
    """
    single = u.dim() == gram.dim() - 1
    batch_u = u.unsqueeze(-2) if single else u
    tasks = gram.shape[-1]
    k = denoise_gram(normalize_gram(gram)).unsqueeze(-3).expand(*batch_u.shape[:-1], tasks, tasks)
    x, residual = nonnegative_least_squares(k, -_matvec(k, batch_u))
    _warn_if_unconverged(residual, "dual-cone projection")
    v = batch_u + x
    return v.squeeze(-2) if single else v
