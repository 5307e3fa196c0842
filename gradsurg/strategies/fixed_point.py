"""The batched, device-side solver of ``K w = w^{-p}`` shared by Nash-MTL and FairGrad.

Nash-MTL (Navon et al. 2022) needs ``K α = 1/α`` and FairGrad (Ban & Ji 2024) ``K w = w^{-1/α}``,
both with ``K = G Gᵀ`` and ``w > 0``. Both are the stationarity condition of the strictly convex

``f(w) = ½ wᵀ K w − Σᵢ h(wᵢ)``,  ``h(w) = log w`` (``p = 1``) or ``w^{1−p}/(1−p)`` (``p ≠ 1``),

on ``w > 0`` (``h'(w) = w^{-p}``, ``h`` concave for ``p > 0``), so the solution is the unique
minimiser of ``f``, found here by damped Newton steps with a batched line search on ``f``.

Scaling. With ``m = maxᵢ Kᵢᵢ``, ``D = diag(K)/m`` and ``K̂ = D^{-1/2} (K/m) D^{-1/2}`` (the cosine
matrix), ``w = m^{-1/(1+p)} D^{-1/2} u`` where ``u`` solves ``K̂ u = c ⊙ u^{-p}`` with ``c = D^{(p−1)/2}``,
the minimiser of ``½ uᵀK̂u − Σᵢ cᵢ h(uᵢ)``: every row is on the same footing whatever its norm.
Zero gradients are taken out of the problem and get weight 0.

Existence. A solution exists exactly when no ``v ≥ 0, v ≠ 0`` has ``Kv = 0``, i.e. when 0 is not in
the convex hull of the (non-zero) task gradients (it fails for two opposite gradients); the official
codes then fail or stall. To always have a unique answer a ridge ``ε = 1e-8`` is added to ``K̂``
(whose diagonal is 1): on feasible problems this moves the solution by a relative ``O(ε)`` times the
conditioning, and exactly opposite gradients cancel. ``K`` is first projected onto the positive
semi-definite cone (eigenvalues clamped at 0): a Gram matrix computed in float32 can be slightly
indefinite.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from gradsurg.errors import GradSurgWarning

__all__ = ["RIDGE", "is_count", "is_finite_number", "solve_power_equation"]

RIDGE = 1e-8
"""Ridge ``ε`` added to the cosine matrix ``K̂`` (see the module docstring)."""

_POLISH = 4
"""Final Newton steps taken without the line search, once the objective can no longer tell progress apart."""

_STEPS = 2.0 ** -torch.arange(0, 31, dtype=torch.float64)


def is_finite_number(value: object) -> bool:
    """Whether ``value`` is a real ``int``/``float`` (not a bool), finite (option validation of this family)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < float("inf")


def is_count(value: object) -> bool:
    """Whether ``value`` is an ``int`` (not a bool) ``≥ 1`` (option validation of this family)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _barrier(w: Tensor, c: Tensor, power: float) -> Tensor:
    """``Σᵢ cᵢ h(wᵢ)`` over the last dimension, ``-inf`` outside ``w > 0`` so that such points are never chosen."""
    positive = w > 0
    safe = torch.where(positive, w, torch.ones_like(w))
    values = safe.log() if power == 1.0 else safe.pow(1.0 - power) / (1.0 - power)
    return torch.where(positive.all(dim=-1), (c * values).sum(dim=-1), float("-inf"))


def solve_power_equation(
    gram: Tensor, power: float, *, iterations: int, tolerance: float, method: str
) -> tuple[Tensor, Tensor]:
    """Solve ``K w = w^{-power}`` for ``w > 0`` (batched over leading dimensions; see the module docstring).

    Args:
        gram: ``Tensor[..., T, T]``, a Gram matrix (float64 recommended).
        power: ``p > 0`` (1 for Nash-MTL, ``1/α`` for FairGrad).
        iterations: Number of damped Newton iterations (fixed, followed by 4 polishing Newton steps
            that only keep ``u > 0``; one host check at the end).
        tolerance: The relative residual ``‖K̂u − c u^{-p}‖ / (‖K̂‖‖u‖ + ‖c u^{-p}‖)`` of the scaled problem
            (a backward error: it stays meaningful when large weights cancel) above which a
            :class:`~gradsurg.errors.GradSurgWarning` is issued.
        method: Name of the calling strategy, for the warning.

    Returns:
        ``(w, residual)``: the weights ``Tensor[..., T]`` (0 for zero gradients) and the relative
        residual ``Tensor[...]``. When the residual exceeds ``tolerance`` a warning names it and the
        last iterate is returned (it never increased the objective and is finite and positive).
    """
    tasks = gram.shape[-1]
    present = gram.diagonal(dim1=-2, dim2=-1) > 0
    pairs = present.unsqueeze(-1) & present.unsqueeze(-2)
    eigenvalues, vectors = torch.linalg.eigh((gram + gram.transpose(-1, -2)) / 2)
    psd = ((vectors * eigenvalues.clamp_min(0).unsqueeze(-2)) @ vectors.transpose(-1, -2)) * pairs
    diagonal = psd.diagonal(dim1=-2, dim2=-1)
    top = diagonal.max(dim=-1, keepdim=True).values
    top = torch.where(top > 0, top, torch.ones_like(top))
    relative = diagonal / top
    present = present & (relative > 0)
    inv_sqrt = torch.where(present, relative, torch.ones_like(relative)).rsqrt() * present
    eye = torch.eye(tasks, dtype=gram.dtype, device=gram.device)
    absent = torch.diag_embed((~present).to(gram.dtype))
    k = inv_sqrt.unsqueeze(-1) * (psd / top.unsqueeze(-1)) * inv_sqrt.unsqueeze(-2) + absent + RIDGE * eye
    c = torch.where(present, relative, torch.ones_like(relative)).pow((power - 1.0) / 2.0)
    u = (c / k.diagonal(dim1=-2, dim2=-1)).pow(1.0 / (1.0 + power))  # exact for orthogonal gradients
    steps = _STEPS.to(dtype=gram.dtype, device=gram.device)
    steps = torch.cat([steps, steps.new_zeros(1)]).unsqueeze(-1)  # t = 0 keeps the current point

    def objective(points: Tensor) -> Tensor:
        quadratic: Tensor = ((points @ k) * points).sum(dim=-1) / 2
        return quadratic - _barrier(points, c.unsqueeze(-2), power)

    for iteration in range(iterations + _POLISH):
        gradient = (k @ u.unsqueeze(-1)).squeeze(-1) - c * u.pow(-power)
        hessian = k + torch.diag_embed(power * c * u.pow(-power - 1.0))
        newton = torch.linalg.solve(hessian, gradient.unsqueeze(-1)).squeeze(-1)
        candidates = u.unsqueeze(-2) - steps * newton.unsqueeze(-2)
        if iteration < iterations:
            score = objective(candidates)
        else:  # polish: the longest step that stays positive (the objective no longer resolves progress)
            score = torch.where((candidates > 0).all(dim=-1), -steps.squeeze(-1), float("inf"))
        best = score.argmin(dim=-1, keepdim=True)
        u = candidates.gather(-2, best.unsqueeze(-1).expand(*best.shape, tasks)).squeeze(-2)

    target = c * u.pow(-power)
    size = k.norm(dim=(-2, -1)) * u.norm(dim=-1) + target.norm(dim=-1)
    residual = ((k @ u.unsqueeze(-1)).squeeze(-1) - target).norm(dim=-1) / size
    worst = float(residual.max())
    if not worst <= tolerance:
        warnings.warn(
            f"The {method} solver did not converge in {iterations} iterations: relative residual "
            f"{worst:.3e} > {tolerance:.1e}; using its last iterate (increase `iterations`).",
            GradSurgWarning,
            stacklevel=3,
        )
    return u * inv_sqrt * top.pow(-1.0 / (1.0 + power)), residual
