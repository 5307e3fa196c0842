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

Method. Both reduce to ``min_{x ≥ 0} ½ xᵀPx − qᵀx`` with ``P`` positive semi-definite, solved
exactly by :func:`nonnegative_least_squares`: the active-set method of Lawson & Hanson (1974) in the
Gram form of Bro & de Jong (1997). Violated variables (``(q − Px)ⱼ > 0``) enter the passive set
``S``, the passive system ``P_SS s_S = q_S`` is solved (Cholesky factorisation), and a step back along
the segment from ``x`` to ``s`` keeps the iterate feasible. Classically one variable enters per step
(the most violated): the passive columns then stay linearly independent, so ``P_SS`` is positive
definite even when ``K`` is rank-deficient, and the objective decreases strictly from one passive
set to the next; the method ends after finitely many steps at the exact optimum. When ``K`` has full
rank after the denoising below, every principal submatrix of ``P`` is positive definite and no worse
conditioned than ``P`` (Cauchy interlacing), so all violated variables enter at once (after which the
step back removes only the blocking variables at zero): the objective still decreases strictly (the
entering block ``V`` has ``(q − Px)_Vᵀ s_V > 0``).

Most problems end after that first block step, so it is tried first (one factorisation, one
scalar read from the device): the variables violated at ``x = 0`` are made passive, and
``x = max(s, 0)`` is kept if its natural residual ``‖min(x, Px − q)‖∞`` (zero exactly at the
optimum: a certificate of optimality) is at the rounding level, ``min(TOLERANCE, 4096 ε)``.
Otherwise the full method runs, batched with masks; its loops stop as soon as no batch element has a
violated condition (one scalar read from the device per step), after at most ``3T`` outer steps of
at most ``T + 1`` inner steps each. Should its residual still be above the rounding level (a
Cholesky factorisation that met a numerically singular ``P_SS``), the problem is solved once more
with single entries and an eigen-decomposition pseudo-inverse for the passive systems
(:func:`symmetric_pinv_solve`), and the result with the smaller residual is kept.

``K`` is divided by its trace first (the minimisers do not depend on the scale of ``G``) and its
eigenvalues at the rounding level are set to zero (:func:`significant_spectrum`; the Gram matrix of
float32 gradients is only known to ``~ε₃₂``, and rounding-level eigenvalues of either sign would make
the problem non-convex or badly conditioned). If the natural residual of the result is above
:data:`TOLERANCE`, a :class:`~gradsurg.errors.GradSurgWarning` reports it and the (feasible) last
iterate is used.

References: C. L. Lawson, R. J. Hanson, "Solving Least Squares Problems", Prentice-Hall 1974,
https://doi.org/10.1137/1.9781611971217; R. Bro, S. de Jong, "A fast non-negativity-constrained
least squares algorithm", J. Chemometrics 11(5), 1997,
https://doi.org/10.1002/(SICI)1099-128X(199709/10)11:5%3C393::AID-CEM483%3E3.0.CO;2-L.

Cross-checked (tests) against ``quadprog`` through TorchJD's projector, against SciPy's ``nnls``,
against TorchJD's Frank-Wolfe MGDA and against the defining optimality conditions.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from gradsurg.errors import GradSurgWarning

__all__ = [
    "RANK_RTOL",
    "TOLERANCE",
    "min_norm_weights",
    "nonnegative_least_squares",
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
# A solution is final when its natural residual is at most this many epsilons (and at most TOLERANCE).
_ROUNDING = 4096


class _Constants(NamedTuple):
    identity: Tensor  # [T, T]
    positions: Tensor  # [T, 1]: 0, ..., T − 1
    # 0-d tensors instead of Python scalars, which every op would wrap into a tensor again.
    zero: Tensor
    one: Tensor
    two: Tensor
    plus_inf: Tensor
    tiny: Tensor  # the smallest normal number
    enter: Tensor  # _ENTER
    minus_enter: Tensor


@functools.lru_cache(maxsize=64)
def _constants(tasks: int, device: torch.device, dtype: torch.dtype) -> _Constants:
    """Constant tensors of the solvers (cached: never modify them)."""

    def scalar(value: float) -> Tensor:
        return torch.tensor(value, dtype=dtype, device=device)

    return _Constants(
        identity=torch.eye(tasks, dtype=dtype, device=device),
        positions=torch.arange(tasks, device=device).unsqueeze(-1),
        zero=scalar(0.0),
        one=scalar(1.0),
        two=scalar(2.0),
        plus_inf=scalar(torch.inf),
        tiny=scalar(torch.finfo(dtype).tiny),
        enter=scalar(_ENTER),
        minus_enter=scalar(-_ENTER),
    )


def _constants_of(tensor: Tensor) -> _Constants:
    return _constants(tensor.shape[-1], tensor.device, tensor.dtype)


def _row_times(vector: Tensor, matrix: Tensor) -> Tensor:
    """``vᵀM`` for ``vector: [..., T]`` (one vector for all matrices when 1-D) and ``matrix: [..., T, T]``."""
    return vector @ matrix if vector.dim() == 1 else (vector.unsqueeze(-2) @ matrix).squeeze(-2)


def _gradient(p: Tensor, q: Tensor, x: Tensor) -> Tensor:
    """``Px − q`` for columns ``x``, ``q``: one fused multiply-add where the shapes allow it."""
    if x.dim() == 2:
        return torch.addmm(q, p, x, beta=-1)
    if x.dim() == 3:
        return torch.baddbmm(q, p.expand(x.shape[0], -1, -1), x, beta=-1)
    return p @ x - q


def significant_spectrum(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``eigh`` of a symmetric PSD matrix, with a mask of the numerically significant eigenvalues.

    An eigenvalue is significant when it exceeds ``m·RANK_RTOL·λ_max``, where ``m`` counts the
    non-zero diagonal entries (the tasks with a non-zero gradient), so that appending zero task
    gradients never changes the rank decision.

    Returns:
        ``(eigenvalues, vectors, significant)`` as from ``torch.linalg.eigh`` plus a bool mask.
    """
    eigenvalues, vectors = torch.linalg.eigh(matrix)
    # The diagonal of a PSD matrix is ≥ 0, so its signs count its non-zero entries; λ_max ≥ max Kᵢᵢ ≥ 0.
    nonzero = matrix.diagonal(dim1=-2, dim2=-1).sign().sum(dim=-1, keepdim=True)
    cutoff = torch.addcmul(_constants_of(matrix).zero, eigenvalues[..., -1:], nonzero, value=RANK_RTOL)
    return eigenvalues, vectors, eigenvalues > cutoff


def _normalized_gram(gram: Tensor, spectrum: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, bool]:
    """``K / tr(K)`` with its eigenvalues at or below the rank cut-off set to zero, and whether none was.

    ``spectrum`` is :func:`significant_spectrum` of ``K``. When every eigenvalue of every matrix of the
    batch is significant nothing is cut and ``K / tr(K)`` itself is returned, positive definite with a
    condition number below ``1/(m·RANK_RTOL)``. An all-zero ``K`` stays zero.
    """
    eigenvalues, vectors, significant = spectrum
    trace = eigenvalues.sum(dim=-1, keepdim=True)
    if bool(significant.all()):  # every eigenvalue is positive, so is the trace
        return gram / trace.unsqueeze(-1), True
    kept = torch.where(significant, eigenvalues, _constants_of(gram).zero)
    cleaned: Tensor = (vectors * (kept / trace.clamp_min(torch.finfo(gram.dtype).tiny)).unsqueeze(-2)) @ vectors.mT
    return cleaned, False


def symmetric_pinv_solve(matrix: Tensor, rhs: Tensor, *, rank_cutoff: bool = False) -> Tensor:
    """``A⁺ b`` for symmetric positive semi-definite ``A`` (``[..., T, T]``) and ``b`` (``[..., T]``).

    Through ``eigh``: ``A⁺ b = V Λ⁺ Vᵀ b``. Eigenvalues at or below ``T·ε·λ_max``
    (``torch.linalg.pinv``'s default cut-off, ``ε`` of ``A``'s dtype) are treated as zero, or, with
    ``rank_cutoff=True``, those that :func:`significant_spectrum` does not keep.
    """
    if rank_cutoff:
        eigenvalues, vectors, significant = significant_spectrum(matrix)
    else:
        eigenvalues, vectors = torch.linalg.eigh(matrix)
        significant = eigenvalues > eigenvalues[..., -1:] * (matrix.shape[-1] * torch.finfo(matrix.dtype).eps)
    # Λ⁺ Vᵀ b (the coordinates of dropped eigenvalues, inf or NaN where they are 0, are not selected).
    coordinates = torch.where(significant, _row_times(rhs, vectors) / eigenvalues, _constants_of(matrix).zero)
    return _row_times(coordinates, vectors.mT)


# Solves the masked passive system: (system, right-hand side, passive mask) -> solution, in column form.
_Solve = Callable[[Tensor, Tensor, Tensor], Tensor]


def _cholesky_solve(system: Tensor, rhs: Tensor, passive: Tensor) -> Tensor:
    # The identity rows decouple the passive block exactly: the solution is exactly 0 off the passive set.
    # A failed factorisation (a numerically singular block) shows in the residual, and the caller re-solves.
    factor, _ = torch.linalg.cholesky_ex(system)
    return torch.cholesky_solve(rhs, factor)


def _pinv_solve(system: Tensor, rhs: Tensor, passive: Tensor) -> Tensor:
    # Eigenvectors of equal eigenvalues may mix the two blocks (at the rounding level): masked.
    return symmetric_pinv_solve(system, rhs.squeeze(-1)).unsqueeze(-1) * passive


def _passive_solution(p: Tensor, q: Tensor, passive: Tensor, constants: _Constants, solve: _Solve) -> Tensor:
    """``P_SS s_S = q_S`` on the passive set ``S``; identity rows and a zero right-hand side give ``s = 0`` off it."""
    system = torch.where(passive & passive.mT, p, constants.identity)
    return solve(system, torch.where(passive, q, constants.zero), passive)


def _residual(p: Tensor, q: Tensor, x: Tensor) -> Tensor:
    """The natural residuals ``|min(x, Px − q)|`` (all zero exactly at the optimum)."""
    return torch.minimum(x, _gradient(p, q, x)).abs()


def _certified(p: Tensor, q: Tensor, s: Tensor) -> tuple[Tensor, float]:
    """``x = max(s, 0)`` and its largest natural residual."""
    x = s.clamp_min(0)
    return x, float(_residual(p, q, x).max()) if x.numel() else 0.0


def _active_set(p: Tensor, q: Tensor, constants: _Constants, *, block: bool, solve: _Solve) -> tuple[Tensor, float]:
    """The active-set method (module docstring) on ``p: [..., T, T]``, ``q: [..., T, 1]``: as :func:`_certified`."""
    tasks = p.shape[-1]
    x = torch.zeros_like(q)
    passive = torch.zeros_like(q, dtype=torch.bool)
    score = -q  # the gradient Px − q at x = 0, with nothing passive
    for _ in range(3 * tasks):
        entering = score < constants.minus_enter
        if not bool(entering.any()):
            break
        if not block:
            entering = entering & (constants.positions == score.argmin(dim=-2, keepdim=True))
        passive = passive | entering
        for _ in range(tasks + 1):
            s = _passive_solution(p, q, passive, constants, solve)
            blocking = passive & (s <= constants.zero)
            if not bool(blocking.any()):
                break
            # Move towards s until the first blocking variable reaches 0 (all the way where none blocks).
            ratios = torch.where(blocking, x / (x - s).clamp_min(constants.tiny), constants.two)
            alpha, leaving = ratios.min(dim=-2, keepdim=True)
            # The blocking variable leaves exactly (with those rounding left at or below zero).
            left = (constants.positions == leaving) & (alpha <= 1)
            x = torch.addcmul(x, alpha.clamp(0, 1), s - x).masked_fill(left, 0)
            passive = passive & ~(blocking & (x <= constants.zero))
        x = s.clamp_min(0)
        score = torch.where(passive, constants.plus_inf, _gradient(p, q, x))
    return _certified(p, q, x)


def _solve(p: Tensor, q: Tensor, *, definite: bool) -> tuple[Tensor, float]:
    """:func:`nonnegative_least_squares` in column form (``q: [..., T, 1]``, batch dimensions broadcast).

    Returns:
        ``x`` and its largest natural residual (at most ``_ENTER`` for ``x = 0``).
    """
    constants = _constants_of(p)
    entering = q > constants.enter
    if not bool(entering.any()):  # nothing is violated at x = 0
        return torch.zeros_like(q), _ENTER
    accepted = min(TOLERANCE, _ROUNDING * torch.finfo(p.dtype).eps)
    result = _certified(p, q, _passive_solution(p, q, entering, constants, _cholesky_solve))  # the first block step
    if result[1] <= accepted:
        return result
    result = _active_set(p, q, constants, block=definite, solve=_cholesky_solve)
    if not result[1] <= accepted:
        robust = _active_set(p, q, constants, block=False, solve=_pinv_solve)
        if robust[1] < result[1] or math.isnan(result[1]):
            result = robust
    return result


def nonnegative_least_squares(p: Tensor, q: Tensor, *, definite: bool = False) -> tuple[Tensor, Tensor]:
    """``argmin_{x ≥ 0} ½ xᵀPx − qᵀx`` for each batch element, and its natural residual.

    Lawson-Hanson active set in Gram form (see the module docstring).

    Args:
        p: ``Tensor[..., T, T]``, symmetric positive semi-definite.
        q: ``Tensor[..., T]``.
        definite: every ``P`` is positive definite and well conditioned, so that every principal
            submatrix can be factorised: all violated variables may enter at once.

    Returns:
        ``(x, residual)``: ``x ≥ 0`` of shape ``[..., T]`` and ``‖min(x, Px − q)‖∞`` of shape ``[...]``.
    """
    q = q.unsqueeze(-1)
    x, _ = _solve(p, q, definite=definite)
    return x.squeeze(-1), _residual(p, q, x).amax(dim=(-2, -1))


def _warn_if_unconverged(worst: float, problem: str) -> None:
    if worst > TOLERANCE:
        warnings.warn(
            f"The {problem} solver must reach a residual ≤ {TOLERANCE:g}; found {worst:.3e}. "
            "The last (feasible) iterate is used.",
            GradSurgWarning,
            stacklevel=4,
        )


def min_norm_weights(gram: Tensor) -> Tensor:
    """Weights ``w* ∈ Δ`` of the minimum-norm point ``Gᵀw*`` of the convex hull of the rows of ``G``.

    When ``K`` has full rank, the first block step of the solver makes every task passive: with
    ``y = K⁻¹1`` (from the eigen-decomposition of ``K``, Sherman–Morrison for ``K + 11ᵀ``) it gives
    ``w = y / 1ᵀy``, the minimum-norm point of the affine hull, which is the answer when ``y ≥ 0``
    (then ``gᵢ·d = ‖d‖²`` for every task); otherwise the solver runs.

    Args:
        gram: ``Tensor[..., T, T]``, the Gram matrix ``G Gᵀ`` (symmetric positive semi-definite).

    Returns:
        ``Tensor[..., T]`` on the simplex. The point ``Gᵀw*`` is unique; ``w*`` need not be (e.g.
        when ``0`` is in the hull), and one minimiser is returned.
    """
    spectrum = significant_spectrum(gram)
    eigenvalues, vectors, significant = spectrum
    # y = V Λ⁻¹ Vᵀ 1; inf where an eigenvalue is 0, but then K is not of full rank.
    y = _row_times(vectors.sum(dim=-2) / eigenvalues, vectors.mT)
    if bool(significant.all() & (y >= 0).all()):
        return y / y.sum(dim=-1, keepdim=True)
    k, full_rank = _normalized_gram(gram, spectrum)
    one = _constants_of(gram).one
    # P = K + 11ᵀ is positive definite where K is, with a condition number below (T + 1)/RANK_RTOL.
    x, worst = _solve(k + one, one.expand(*gram.shape[:-1], 1), definite=full_rank)
    _warn_if_unconverged(worst, "minimum-norm (MGDA)")
    # 1ᵀx > 0: the objective is 1 at x = 0 and every step of the solver decreases it.
    return (x / x.sum(dim=-2, keepdim=True)).squeeze(-1)


def project_dual_cone(gram: Tensor, u: Tensor | float | None = None) -> Tensor:
    """Weights ``v*`` with ``Gᵀv*`` the projection of ``Gᵀu`` onto the dual cone of the rows of ``G``.

    The result satisfies ``K v* ≥ 0`` (``Gᵀv*`` conflicts with no task gradient) and ``v* ≥ u``.

    Args:
        gram: ``Tensor[..., T, T]``, the Gram matrix ``G Gᵀ``.
        u: ``Tensor[..., m, T]`` or ``Tensor[..., T]``: one weight vector per vector to project, all
            with the same ``K`` (leading dimensions broadcast with those of ``gram``); a number ``c``
            for the one vector ``u = c·1``; or ``None`` (default) for the rows of the identity, one
            projection per task gradient.

    Returns:
        ``v*`` with the (broadcast) shape of ``u``: ``Tensor[..., T]`` for a number, ``Tensor[..., T, T]``
        (row ``i`` for ``u = eᵢ``) for ``None``.
    """
    k, full_rank = _normalized_gram(gram, significant_spectrum(gram))
    if u is None:  # one column q = −K eᵢ per task i (K is symmetric), all with the same P = K
        p, q, u = k.unsqueeze(-3), -k.unsqueeze(-1), _constants_of(gram).identity
    elif not isinstance(u, Tensor):  # the column q = −K u = −c K1
        p, q = k, k.sum(dim=-1, keepdim=True) * -u
    elif u.dim() == gram.dim() - 1:  # one vector u: the column q = −K u
        p, q = k, -(k @ u.unsqueeze(-1))
    else:  # one column q = −K u per row u, all with the same P = K
        p, q = k.unsqueeze(-3), -(u @ k).unsqueeze(-1)
    x, worst = _solve(p, q, definite=full_rank)
    _warn_if_unconverged(worst, "dual-cone projection")
    return x.squeeze(-1) + u
