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
    relative ridge of ``1000·eps`` on ``K_S`` for rank-deficient faces), both roots are kept when they
    give ``w ≥ 0``, the ``T`` vertices are added, and the candidate with the smallest ``f`` wins:
    about thirty tensor operations whatever ``T``, no iteration, no host synchronisation.

    For larger ``T`` (``2ᵀ`` faces would be too many) :func:`minimize_on_simplex` runs
    ``iterations`` projected-gradient steps from uniform weights, then the formula is applied to
    its support ``{i : wᵢ > 1e-6}`` ("polish"); the polished point is kept when it is feasible and
    has a smaller objective.

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
    candidates = torch.cat([_face_stationary_points(k, b, phi, _likely_supports(w, gradient(w))), w.unsqueeze(-2)], -2)
    return _best(candidates, objective(candidates))


def _likely_supports(w: Tensor, grad: Tensor) -> Tensor:
    """Candidate supports of the minimiser near ``w``, ``Tensor[..., 2L, T]``.

    At the minimiser the coordinates in the support have the smallest partial derivative ``λ``
    and the others a larger one; an approximate ``w`` identifies the support up to thresholds, so
    both ``{i : wᵢ > τ}`` and ``{i : ∇ᵢf − min ∇f ≤ τ·spread}`` are tried for several ``τ``.
    """
    taus = torch.logspace(-1, -8, 8, dtype=w.dtype, device=w.device).unsqueeze(-1)
    gap = grad - grad.min(dim=-1, keepdim=True).values
    spread = gap.max(dim=-1, keepdim=True).values.unsqueeze(-2)
    by_weight = w.unsqueeze(-2) > taus
    by_gradient = gap.unsqueeze(-2) <= taus * spread
    return torch.cat([by_weight, by_gradient], dim=-2)


def _face_stationary_points(k: Tensor, b: Tensor, phi: Tensor, masks: Tensor) -> Tensor:
    """The stationary points of :func:`minimize_cagrad_dual`'s formula on the faces ``masks``.

    Args:
        k, b, phi: As in :func:`minimize_cagrad_dual`.
        masks: 0/1 face masks, ``Tensor[F, T]`` or ``Tensor[..., F, T]``.

    Returns:
        ``Tensor[..., 2F, T]``: per face, the point of each root ``λ``, or NaN where it is not a
        point of the simplex (no real root, ``1ᵀp ≤ 0``, ``1ᵀv ≤ 0`` or a negative weight).
    """
    m = masks.to(k.dtype)
    eps = torch.finfo(k.dtype).eps
    scale = k.diagonal(dim1=-2, dim2=-1).mean(dim=-1)[..., None, None, None]
    eye = torch.eye(k.shape[-1], dtype=k.dtype, device=k.device)
    pair = m.unsqueeze(-1) * m.unsqueeze(-2)
    system = k.unsqueeze(-3) * pair + (1 - m).unsqueeze(-1) * eye + (_RIDGE_ULPS * eps) * scale * torch.diag_embed(m)
    masked_b = b.unsqueeze(-2) * m
    solution, _ = torch.linalg.solve_ex(system, torch.stack([m.expand_as(masked_b), masked_b], dim=-1))
    p, q = solution[..., 0], solution[..., 1]
    sum_p, sum_q = p.sum(dim=-1), q.sum(dim=-1)
    discriminant = sum_q**2 - sum_p * ((masked_b * q).sum(dim=-1) - phi**2)
    valid = (discriminant >= 0) & (sum_p > 0)
    root = discriminant.clamp_min(0).sqrt()
    points = []
    for sign in (1.0, -1.0):
        lam = safe_divide(sum_q + sign * root, sum_p)
        v = lam.unsqueeze(-1) * p - q
        total = v.sum(dim=-1, keepdim=True)
        w = safe_divide(v, total)
        feasible = valid & (total.squeeze(-1) > 0) & (w >= -(eps**0.5)).all(dim=-1)
        w = w.clamp_min(0)
        w = w / w.sum(dim=-1, keepdim=True).clamp_min(eps)
        points.append(torch.where(feasible.unsqueeze(-1), w, torch.full_like(w, float("nan"))))
    return torch.cat(points, dim=-2)


def _best(candidates: Tensor, values: Tensor) -> Tensor:
    """The candidate (``Tensor[..., k, T]``) with the smallest value (``Tensor[..., k]``; NaN never wins)."""
    best = torch.nan_to_num(values, nan=float("inf")).argmin(dim=-1, keepdim=True)
    return candidates.gather(-2, best.unsqueeze(-1).expand(*best.shape, candidates.shape[-1])).squeeze(-2)
