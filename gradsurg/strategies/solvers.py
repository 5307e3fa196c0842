"""Small, batched, device-side solvers shared by the Gram-space strategies.

Everything here works on tiny ``T×T`` problems, batched over leading dimensions, with a fixed number
of operations and no host synchronisation (no ``.item()``, no data-dependent Python branching, no
``torch.linalg`` error checks), so it runs on the tensor's device inside a training step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from gradsurg._math import safe_divide

__all__ = ["EXACT_MAX_TASKS", "minimize_cagrad_dual", "minimize_on_simplex", "project_simplex", "simplex_faces"]

EXACT_MAX_TASKS = 10
"""Up to this many tasks, :func:`minimize_cagrad_dual` enumerates all ``2ᵀ − 1`` faces of the simplex."""

_RIDGE_ULPS = 1000.0  # relative ridge on K_S, in units of the dtype's epsilon (rank-deficient faces)


def project_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of each row of ``v`` (last dimension) onto the probability simplex.

    The sort-based algorithm of Held, Wolfe & Crowder (1974) / Duchi et al. (2008):
    ``θ = (Σ_{i≤ρ} u_i − 1)/ρ`` with ``u`` sorted decreasingly and ``ρ`` the largest index with
    ``u_ρ > (Σ_{i≤ρ} u_i − 1)/ρ``; the projection is ``max(v − θ, 0)``.
    """
    size = v.shape[-1]
    u, _ = torch.sort(v, dim=-1, descending=True)
    cumulative = u.cumsum(dim=-1) - 1
    ranks = torch.arange(1, size + 1, dtype=v.dtype, device=v.device)
    support = (u - cumulative / ranks > 0).sum(dim=-1, keepdim=True).clamp_min(1)
    theta = cumulative.gather(-1, support - 1) / support.to(v.dtype)
    return (v - theta).clamp_min(0)


def minimize_on_simplex(
    objective: Callable[[Tensor], Tensor],
    gradient: Callable[[Tensor], Tensor],
    start: Tensor,
    *,
    iterations: int,
    steps: Tensor,
) -> Tensor:
    """Minimise a convex function over the simplex by projected gradient with a batched line search.

    Each iteration evaluates the projected points ``P(w − η ∇f(w))`` for every step size ``η`` in
    ``steps`` at once, and keeps the best of them and the current point. The objective therefore
    never increases, no Lipschitz constant is needed, and the choice is made on the device with
    ``argmin`` instead of a host-side test.

    Args:
        objective: ``f(W)`` for a batch of points ``W[..., k, T]`` → ``Tensor[..., k]``.
        gradient: ``∇f(w)`` for points ``w[..., T]`` → ``Tensor[..., T]``.
        start: Feasible starting point ``Tensor[..., T]``.
        iterations: Number of iterations (fixed; no convergence test on the host).
        steps: Candidate step sizes ``Tensor[k]``.

    Returns:
        The final point, ``Tensor[..., T]``.
    """
    w = start
    etas = steps.to(dtype=start.dtype, device=start.device).unsqueeze(-1)
    for _ in range(iterations):
        candidates = project_simplex(w.unsqueeze(-2) - etas * gradient(w).unsqueeze(-2))
        candidates = torch.cat([candidates, w.unsqueeze(-2)], dim=-2)
        w = _best(candidates, objective(candidates))
    return w


def simplex_faces(tasks: int, device: torch.device | None = None) -> Tensor:
    """The ``2ᵀ − 1`` non-empty faces of the simplex as 0/1 masks, ``Tensor[2ᵀ − 1, T]`` (built on ``device``)."""
    codes = torch.arange(1, 2**tasks, device=device).unsqueeze(-1)
    return (codes >> torch.arange(tasks, device=device)) & 1


def minimize_cagrad_dual(k: Tensor, b: Tensor, phi: Tensor, *, iterations: int) -> Tensor:
    r"""``argmin_{w ∈ Δ} f(w)``, ``f(w) = bᵀw + φ√(wᵀKw)``: the dual of CAGrad, solved on the device.

    **Exact active-set formula.** On the relative interior of a face ``S`` of the simplex the
    stationarity condition ``b_S + φ K_S w / √(wᵀKw) = λ 1`` (``λ`` the multiplier of ``1ᵀw = 1``)
    reads, with ``v = w / √(wᵀKw)``, ``K_S v = (λ1 − b_S)/φ`` and ``vᵀK_S v = 1``. Hence
    ``v ∝ λp − q`` with ``p = K_S⁻¹1`` and ``q = K_S⁻¹b_S``, and ``λ`` solves

    ``(1ᵀp) λ² − 2 (1ᵀq) λ + (b_Sᵀq − φ²) = 0``,

    so ``w_S = (λp − q) / 1ᵀ(λp − q)`` (``φ`` cancels). The minimiser is the stationary point of the
    face that contains it in its relative interior, so with ``T ≤`` :data:`EXACT_MAX_TASKS` every
    face is solved at once (one batched ``solve`` of the masked systems ``K⊙mmᵀ + diag(1 − m)``, a
    relative ridge of ``1000·eps`` on ``K_S`` for rank-deficient faces; the larger root ``λ`` with
    ``1ᵀv > 0``), the points with ``w ≥ 0`` and the ``T`` vertices are the candidates, and the one
    with the smallest ``f`` wins: about thirty tensor operations whatever ``T``, no iteration, no
    host synchronisation.

    For larger ``T`` (``2ᵀ`` faces would be too many) :func:`minimize_on_simplex` runs
    ``iterations`` projected-gradient steps from uniform weights, then ``T`` rounds of a primal
    active-set method finish the job: each round moves to the optimum of the current face (ratio
    test: a coordinate that would turn negative leaves the support), then adds the coordinate with
    the most negative reduced derivative and moves again (:func:`_active_set_step`).

    Args:
        k: ``Tensor[..., T, T]``, positive semi-definite (the normalised Gram matrix).
        b: ``Tensor[..., T]``.
        phi: ``Tensor[..., 1]``, ``≥ 0``.
        iterations: Iterations of the projected-gradient solver used when ``T >`` :data:`EXACT_MAX_TASKS`.

    Returns:
        ``Tensor[..., T]``, a minimiser on the simplex.
    """
    tasks = k.shape[-1]

    def objective(points: Tensor) -> Tensor:
        quadratic = ((points @ k) * points).sum(dim=-1).clamp_min(0)
        return (points * b.unsqueeze(-2)).sum(dim=-1) + phi * quadratic.sqrt()

    if tasks <= EXACT_MAX_TASKS:
        vertices = torch.eye(tasks, dtype=k.dtype, device=k.device).expand(*b.shape[:-1], tasks, tasks)
        candidates = torch.cat([_face_stationary_points(k, b, phi, simplex_faces(tasks, k.device)), vertices], -2)
        return _best(candidates, objective(candidates))

    def gradient(point: Tensor) -> Tensor:
        kw = (k @ point.unsqueeze(-1)).squeeze(-1)
        length = (point * kw).sum(dim=-1, keepdim=True).clamp_min(0).sqrt()
        return b + phi * safe_divide(kw, length)

    start = torch.full_like(b, 1.0 / tasks)
    steps = torch.logspace(-4, 2, 13, dtype=k.dtype, device=k.device)
    w = minimize_on_simplex(objective, gradient, start, iterations=iterations, steps=steps)
    for _ in range(tasks):
        w = _active_set_step(w, k, b, phi, None, objective)
        w = _active_set_step(w, k, b, phi, gradient(w), objective)
    return w


def _active_set_step(
    w: Tensor, k: Tensor, b: Tensor, phi: Tensor, grad: Tensor | None, objective: Callable[[Tensor], Tensor]
) -> Tensor:
    """One primal active-set step from the feasible ``w`` (``grad`` = ``∇f(w)``).

    The coordinate outside the support ``S = {wᵢ > 0}`` with the most negative reduced derivative
    ``∂ᵢf − wᵀ∇f`` joins ``S`` (when one is negative). Then ``w`` moves towards the stationary point
    ``u`` of the face (:func:`_face_points`) as far as the simplex allows (ratio test: the first
    coordinate to reach 0 leaves the support). ``f`` is convex with its minimum on the face's affine
    hull at ``u``, so it decreases along the way; the result is kept only if ``f`` did not increase.
    """
    face = w > 0
    if grad is not None:
        reduced = grad - (w * grad).sum(dim=-1, keepdim=True)
        reduced = torch.where(face, torch.full_like(grad, float("inf")), reduced)
        entering = reduced.argmin(dim=-1, keepdim=True)
        face = face.scatter(-1, entering, reduced.gather(-1, entering) < 0) | face
    target, valid = _face_points(k, b, phi, face.unsqueeze(-2))
    target, valid = target.squeeze(-2), valid.squeeze(-2)
    shrinking = (target < w) & face
    ratios = torch.where(shrinking, w / torch.where(shrinking, w - target, torch.ones_like(w)), torch.ones_like(w))
    moved = (w + ratios.amin(dim=-1, keepdim=True).clamp(0, 1) * (target - w)).clamp_min(0)
    moved = torch.where(moved > torch.finfo(w.dtype).eps, moved, torch.zeros_like(moved))
    moved = moved / moved.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(w.dtype).eps)
    candidates = torch.stack([torch.where(valid, moved, w), w], dim=-2)
    return _best(candidates, objective(candidates))


def _face_points(k: Tensor, b: Tensor, phi: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    """The stationary point of :func:`minimize_cagrad_dual`'s formula on the affine hull of each face.

    Args:
        k, b, phi: As in :func:`minimize_cagrad_dual`.
        masks: 0/1 face masks, ``Tensor[F, T]`` or ``Tensor[..., F, T]``.

    Returns:
        The points ``Tensor[..., F, T]`` (summing to 1, possibly with negative weights) and
        whether each is valid, ``Tensor[..., F, 1]``: a real root ``λ`` with ``1ᵀp > 0`` giving
        ``1ᵀv > 0`` (the larger root when both do).
    """
    m = masks.to(k.dtype)
    eps = torch.finfo(k.dtype).eps
    eye = torch.eye(k.shape[-1], dtype=k.dtype, device=k.device)
    inside = masks.unsqueeze(-1).bool() & masks.unsqueeze(-2).bool()
    system = torch.where(inside, k.unsqueeze(-3), eye)  # K_S on the face, the identity elsewhere
    ridge = (_RIDGE_ULPS * eps) * k.diagonal(dim1=-2, dim2=-1).mean(dim=-1)[..., None, None]
    system.diagonal(dim1=-2, dim2=-1).add_(ridge * m)
    masked_b = b.unsqueeze(-2) * m
    solution, _ = torch.linalg.solve_ex(system, torch.stack([m.expand_as(masked_b), masked_b], dim=-1))
    p, q = solution[..., 0], solution[..., 1]
    sum_p, sum_q = p.sum(dim=-1, keepdim=True), q.sum(dim=-1, keepdim=True)
    discriminant = sum_q**2 - sum_p * ((masked_b * q).sum(dim=-1, keepdim=True) - phi.unsqueeze(-1) ** 2)
    root = discriminant.clamp_min(0).sqrt()
    v_large = safe_divide(sum_q + root, sum_p) * p - q
    v_small = safe_divide(sum_q - root, sum_p) * p - q
    v = torch.where(v_large.sum(dim=-1, keepdim=True) > 0, v_large, v_small)
    total = v.sum(dim=-1, keepdim=True)
    return safe_divide(v, total), (discriminant >= 0) & (sum_p > 0) & (total > 0)


def _face_stationary_points(k: Tensor, b: Tensor, phi: Tensor, masks: Tensor) -> Tensor:
    """The points of :func:`_face_points` that lie on the simplex (``w ≥ 0``); NaN rows elsewhere."""
    w, valid = _face_points(k, b, phi, masks)
    eps = torch.finfo(k.dtype).eps
    feasible = valid & (w >= -(eps**0.5)).all(dim=-1, keepdim=True)
    w = w.clamp_min(0)
    w = w / w.sum(dim=-1, keepdim=True).clamp_min(eps)
    return torch.where(feasible, w, torch.full_like(w, float("nan")))


def _best(candidates: Tensor, values: Tensor) -> Tensor:
    """The candidate (``Tensor[..., k, T]``) with the smallest value (``Tensor[..., k]``; NaN never wins)."""
    best = torch.nan_to_num(values, nan=float("inf")).argmin(dim=-1, keepdim=True)
    return candidates.gather(-2, best.unsqueeze(-1).expand(*best.shape, candidates.shape[-1])).squeeze(-2)
