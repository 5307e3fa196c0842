"""Small, batched, device-side solvers shared by the Gram-space strategies.

Everything here works on tiny ``T×T`` problems, batched over leading dimensions, with a fixed number
of operations and no host synchronisation (no ``.item()``, no data-dependent Python branching, no
``torch.linalg`` error checks), so it runs on the tensor's device inside a training step. The one
exception is the early stop of :func:`minimize_cagrad_dual`'s active-set steps, taken by default only
on CPU tensors, where reading a value synchronises nothing.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["EXACT_MAX_TASKS", "minimize_cagrad_dual", "project_simplex", "simplex_faces"]

EXACT_MAX_TASKS = 10
"""Up to this many tasks, :func:`minimize_cagrad_dual` enumerates all ``2ᵀ − 1`` faces of the simplex."""

_WARM_START_TASKS = 8  # above EXACT_MAX_TASKS: the faces of this many tasks are enumerated for the start
_RIDGE = 1000.0  # relative ridge on the diagonal of K_S, in units of the dtype's epsilon (rank-deficient faces)
_KKT_TOLERANCE = 1e-10  # early stop: optimality violation relative to max|b| + φ√(max diag K)


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


def simplex_faces(tasks: int, device: torch.device | None = None) -> Tensor:
    """The ``2ᵀ − 1`` non-empty faces of the simplex as 0/1 masks, ``Tensor[2ᵀ − 1, T]`` (built on ``device``)."""
    codes = torch.arange(1, 2**tasks, device=device).unsqueeze(-1)
    return (codes >> torch.arange(tasks, device=device)) & 1


class _Identity(NamedTuple):
    """Constants of the solves, built once per ``(T, dtype, device)`` and only ever read."""

    eye: Tensor  # I, [T, T]: the vertices, and the identity rows off a face
    ridge: Tensor  # 1 + 1000·eps·I, [T, T]: K ⊙ ridge raises the diagonal of K by 1000·eps relative
    one: Tensor  # 1, 0-d


@functools.lru_cache(maxsize=32)
def _identity(tasks: int, dtype: torch.dtype, device: torch.device) -> _Identity:
    """:class:`_Identity` for ``T = tasks``."""
    eye = torch.eye(tasks, dtype=dtype, device=device)
    return _Identity(eye, 1 + _RIDGE * torch.finfo(dtype).eps * eye, torch.ones((), dtype=dtype, device=device))


class _AllFaces(NamedTuple):
    """Constants of the enumeration of every face ``S`` of the simplex (masks ``m``), built once per
    ``(T, dtype, device)`` and only ever read."""

    masks: Tensor  # m as columns, [F, T, 1]
    inside: Tensor  # (m mᵀ) ⊙ ridge: K ⊙ inside is K_S with its ridged diagonal, zero elsewhere, [F, T, T]
    outside: Tensor  # diag(1 − m): the identity off the face, [F, T, T]


@functools.lru_cache(maxsize=32)
def _all_faces(tasks: int, dtype: torch.dtype, device: torch.device) -> _AllFaces:
    """:class:`_AllFaces` for ``T = tasks``."""
    masks = simplex_faces(tasks, device).to(dtype)
    inside = masks.unsqueeze(-1) * masks.unsqueeze(-2) * _identity(tasks, dtype, device).ridge
    return _AllFaces(masks.unsqueeze(-1), inside, torch.diag_embed(1 - masks))


class _Stationary(NamedTuple):
    """The stationary-point formula of :func:`minimize_cagrad_dual` on a batch of ``F`` faces."""

    solution: Tensor  # [p, q] = K_S⁻¹[1, b_S], zero off the face, [..., F, T, 2]
    sum_p: Tensor  # 1ᵀp, [..., F]
    sum_q: Tensor  # 1ᵀq, [..., F]
    lam: Tensor  # the larger root λ, NaN where there is none, [..., F]


def _stationary(system: Tensor, masks: Tensor, ones_b: Tensor, phi_squared: Tensor) -> _Stationary:
    """Solve the symmetric ``system`` (``K_S`` on each face, the identity elsewhere, ``Tensor[..., F, T, T]``) for the
    right-hand sides ``m ⊙ [1, b]`` (``masks``: ``m`` as columns; ``ones_b``: ``[1, b]``, ``Tensor[..., 1, T, 2]``)
    and the root ``λ`` of ``(1ᵀp) λ² − 2 (1ᵀq) λ + (bᵀq − φ²) = 0`` (``phi_squared``: ``Tensor[..., 1]``)."""
    # The system is symmetric: its transposed view has the column-major layout LAPACK works in (no copy).
    solution, _ = torch.linalg.solve_ex(system.mT, masks * ones_b)
    sum_p, sum_q = solution.sum(dim=-2).unbind(-1)
    b_q = (solution.select(-1, 1) @ ones_b.select(-1, 1).mT).squeeze(-1)
    discriminant = torch.addcmul(sum_q * sum_q, sum_p, phi_squared - b_q)
    return _Stationary(solution, sum_p, sum_q, (sum_q + discriminant.sqrt()) / sum_p)


def _ones_b(b: Tensor) -> Tensor:
    """``[1, b]`` as ``Tensor[..., 1, T, 2]``."""
    return torch.stack((torch.ones_like(b), b), dim=-1).unsqueeze(-3)


def _values(points: Tensor, k: Tensor, b: Tensor, phi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``Kw``, ``wᵀKw`` and ``f(w) = bᵀw + φ√(wᵀKw)`` for a batch of points ``w`` (``Tensor[..., k, T]``;
    ``Tensor[..., k]``)."""
    products = points @ k
    quadratic = (products * points).sum(dim=-1).clamp_min(0)
    return products, quadratic, torch.addcmul((points @ b.unsqueeze(-1)).squeeze(-1), phi, quadratic.sqrt())


def minimize_cagrad_dual(
    k: Tensor, b: Tensor, phi: Tensor, *, iterations: int | None = None, stop_early: bool | None = None
) -> Tensor:
    r"""``argmin_{w ∈ Δ} f(w)``, ``f(w) = bᵀw + φ√(wᵀKw)``: the dual of CAGrad, solved on the device.

    **Exact active-set formula.** On the relative interior of a face ``S`` of the simplex the
    stationarity condition ``b_S + φ K_S w / √(wᵀKw) = λ 1`` (``λ`` the multiplier of ``1ᵀw = 1``)
    reads, with ``v = w / √(wᵀKw)``, ``K_S v = (λ1 − b_S)/φ`` and ``vᵀK_S v = 1``. Hence
    ``v ∝ λp − q`` with ``p = K_S⁻¹1`` and ``q = K_S⁻¹b_S``, and ``λ`` solves

    ``(1ᵀp) λ² − 2 (1ᵀq) λ + (b_Sᵀq − φ²) = 0``,

    so ``w_S = (λp − q) / 1ᵀ(λp − q)`` (``φ`` cancels). Only the larger root gives ``1ᵀv > 0``,
    and ``f(w_S) = λ`` (``f`` is positively homogeneous, so ``wᵀ∇f(w) = f(w)``). A face whose
    quadratic has no real root has no stationary point: ``f`` is unbounded below on its affine hull.
    The systems of a batch of faces are solved at once (``K⊙mmᵀ + diag(1 − m)`` for the mask ``m``,
    with the diagonal of ``K_S`` raised by ``1000·eps`` relative for rank-deficient faces). Nothing
    depends on the scale of ``K``, ``b`` and ``φ`` together.

    **Up to** :data:`EXACT_MAX_TASKS` **tasks** the minimiser is the stationary point of the face that
    contains it in its relative interior, so every face is solved in one batched ``solve``; the
    points with ``w ≥ 0`` and the ``T`` vertices are the candidates, and the one with the smallest
    ``f`` wins: a few dozen tensor operations whatever ``T``, no iteration (:func:`_enumerate_faces`).

    **Above that** (``2ᵀ`` faces would be too many) the same enumeration on the 8 tasks with the
    smallest ``bᵢ`` (the tasks the mean gradient helps least: with a small ``φ`` the support of the
    solution is among them) gives the start of ``iterations`` steps of a primal active-set method
    that moves between faces with the same formula (:func:`_active_set`): exact once it reaches the
    optimal face, and never increasing ``f``. Each step adds at most one task to the support outside
    the primal-dual guess, so the default is ``T`` steps; in our tests they reached the optimum on
    every input, rank-deficient and near-degenerate ones (``0`` in or near the convex hull of the
    gradients) included, which need the most steps (10 steps fell short on 4 of 600 random
    rank-deficient problems with ``T = 22`` to ``24``). On CPU tensors, where reading a value is not a
    device synchronisation, the steps stop as soon as the optimality conditions hold to ``1e-10``
    of ``max|b| + φ√(max diag K)`` (``rᵢ ≥ 0`` outside the support, ``rᵢ = 0`` on it; by convexity
    ``f`` is then within twice that of the optimum): often the warm start is already optimal.
    Elsewhere all steps run, with no host synchronisation.

    Args:
        k: ``Tensor[..., T, T]``, positive semi-definite (the Gram matrix).
        b: ``Tensor[..., T]``.
        phi: ``Tensor[..., 1]``, ``≥ 0``.
        iterations: Active-set steps when ``T >`` :data:`EXACT_MAX_TASKS` (each solves three faces);
            ``None`` (default): ``T``.
        stop_early: Stop the steps once the optimality conditions hold (reads a value on the host
            after each step). ``None`` (default): only for CPU tensors.

    Returns:
        ``Tensor[..., T]``, a minimiser on the simplex.
    """
    tasks = k.shape[-1]
    if tasks <= EXACT_MAX_TASKS:
        return _enumerate_faces(k, b, phi)
    index = b.topk(_WARM_START_TASKS, dim=-1, largest=False).indices
    rows = k.gather(-2, index.unsqueeze(-1).expand(*index.shape, tasks))
    columns = index.unsqueeze(-2).expand(*index.shape[:-1], _WARM_START_TASKS, _WARM_START_TASKS)
    warm = _enumerate_faces(rows.gather(-1, columns), b.gather(-1, index), phi)
    start = torch.zeros_like(b).scatter(-1, index, warm)
    early = k.device.type == "cpu" if stop_early is None else stop_early
    return _active_set(k, b, phi, start, iterations or tasks, early)


def _enumerate_faces(k: Tensor, b: Tensor, phi: Tensor) -> Tensor:
    """The exact minimiser: the best of every face's stationary point with ``w ≥ 0`` and the vertices."""
    faces, eye = _all_faces(k.shape[-1], k.dtype, k.device), _identity(k.shape[-1], k.dtype, k.device).eye
    system = torch.addcmul(faces.outside, k.unsqueeze(-3), faces.inside)
    stationary = _stationary(system, faces.masks, _ones_b(b), phi * phi)
    p, q = stationary.solution.unbind(-1)
    v = torch.addcmul(q, stationary.lam.unsqueeze(-1), p, value=-1)  # −(λp − q): the sign cancels below
    points = v / v.sum(dim=-1, keepdim=True)
    feasible = points.amin(dim=-1, keepdim=True) >= -(torch.finfo(k.dtype).eps ** 0.5)
    points = points.clamp_min(0)
    points = torch.where(feasible, points / points.sum(dim=-1, keepdim=True), float("nan"))
    candidates = torch.cat([points, eye.expand(*b.shape[:-1], *eye.shape)], dim=-2)
    return _best(candidates, _values(candidates, k, b, phi)[2]).squeeze(-2)


def _active_set(k: Tensor, b: Tensor, phi: Tensor, start: Tensor, iterations: int, stop_early: bool) -> Tensor:
    r"""``iterations`` steps of a primal active-set method for :func:`minimize_cagrad_dual`, from ``start``
    (fewer with ``stop_early``, once the optimality conditions hold).

    At ``w`` with support ``S = {wᵢ > 0}`` and reduced gradient ``r = ∇f(w) − f(w)1`` (``wᵀ∇f(w) =
    f(w)``), a step solves three faces at once: ``S``; ``S ∪ {j}`` for the ``j ∉ S`` with the smallest
    ``rⱼ`` (the task to enter when ``rⱼ < 0``); and a primal-dual active-set guess ``P`` (all tasks at
    first, then ``{i ∈ P : uᵢ > 0} ∪ {i ∉ P : rᵢ < 0}`` with ``u`` the stationary point of ``P``).
    On each face it takes two targets: the exact stationary point, and the minimiser on the face's
    affine hull of the quadratic ``bᵀw + φ(wᵀKw/μ + μ)/2 ≥ f(w)`` (``μ = √(wᵀKw)``; equal to ``f`` at
    ``w``), ``(λ'p − q) / 1ᵀ(λ'p − q)`` with ``λ' = (φ/μ + 1ᵀq)/1ᵀp``, which exists even where ``f``
    is unbounded below on the hull. From ``w`` it moves towards each target as far as the simplex
    allows (ratio test: the first coordinate to reach 0 leaves the support); the best of these six
    points and ``w`` is the next iterate, so ``f`` never increases.
    """
    tasks = k.shape[-1]
    info = torch.finfo(k.dtype)
    eye, ridge, one = _identity(tasks, k.dtype, k.device)
    ridged = (k * ridge).unsqueeze(-3)
    ones_b, phi_squared, b_row = _ones_b(b), phi * phi, b.unsqueeze(-2)
    w = start.unsqueeze(-2)  # the iterate as a row, [..., 1, T]
    kw, quadratic, value = _values(w, k, b, phi)  # [..., 1, T], [..., 1], [..., 1]
    guess = torch.ones_like(w, dtype=torch.bool)
    tolerance = None
    if stop_early:  # |r| is at most about max|b| + φ√(max diag K): the scale of the optimality test
        diagonal = k.diagonal(dim1=-2, dim2=-1).amax(dim=-1, keepdim=True)
        tolerance = torch.addcmul(b.abs().amax(dim=-1, keepdim=True), phi, diagonal.sqrt()) * _KKT_TOLERANCE
    for _ in range(iterations):
        slope = phi / quadratic.clamp_min(info.tiny).sqrt()
        reduced = torch.addcmul(b_row, slope.unsqueeze(-1), kw) - value.unsqueeze(-1)
        support = w > 0
        if tolerance is not None and _optimal(reduced, support, tolerance):
            break
        grown = support.scatter(-1, reduced.masked_fill(support, float("inf")).argmin(dim=-1, keepdim=True), True)
        masks = torch.cat([support, grown, guess], dim=-2).unsqueeze(-1)
        stationary = _stationary(torch.where(masks & masks.mT, ridged, eye), masks, ones_b, phi_squared)
        multipliers = torch.stack([stationary.lam, (slope + stationary.sum_q) / stationary.sum_p], dim=-1)
        p, q = stationary.solution.unsqueeze(-3).unbind(-1)
        v = torch.addcmul(q, multipliers.unsqueeze(-1), p, value=-1)  # −(λp − q): the sign cancels below
        targets = (v / v.sum(dim=-1, keepdim=True)).flatten(-3, -2)  # [..., 6, T], the guess's stationary point 5th
        guess = torch.where(guess, targets[..., 4:5, :] > 0, reduced < 0)
        step = w - targets
        ratios = torch.where(step > 0, w / step, one).amin(dim=-1, keepdim=True).clamp_max(1)
        moved = torch.addcmul(w, ratios, step, value=-1)
        candidates = torch.cat([moved.masked_fill(moved <= info.eps, 0.0), w], dim=-2)
        products, quadratics, values = _values(candidates, k, b, phi)
        table = torch.cat([candidates, products, quadratics.unsqueeze(-1), values.unsqueeze(-1)], dim=-1)
        w, kw, quadratic, value = _best(table, values).split_with_sizes([tasks, tasks, 1, 1], dim=-1)
        quadratic, value = quadratic.squeeze(-1), value.squeeze(-1)
    w = w.squeeze(-2)
    return w / w.sum(dim=-1, keepdim=True)


def _optimal(reduced: Tensor, support: Tensor, tolerance: Tensor) -> bool:
    """Whether the reduced gradient (``Tensor[..., 1, T]``) satisfies the optimality conditions on the simplex
    to ``tolerance`` (``Tensor[..., 1]``) everywhere in the batch: ``rᵢ ≥ 0`` off the support, ``rᵢ = 0`` on it.
    Reads the answer on the host."""
    violation = torch.where(support, reduced.abs(), (-reduced).clamp_min(0)).amax(dim=-1)
    return bool((violation <= tolerance).all())


def _best(candidates: Tensor, values: Tensor) -> Tensor:
    """The row of ``candidates`` (``Tensor[..., k, C]``) with the smallest value (``Tensor[..., k]``; NaN never
    wins), as ``Tensor[..., 1, C]``."""
    best = torch.nan_to_num(values, nan=float("inf")).argmin(dim=-1, keepdim=True)
    return candidates.gather(-2, best.unsqueeze(-1).expand(*best.shape, candidates.shape[-1]))
