"""Small, batched, device-side solvers shared by the Gram-space strategies.

Everything here works on tiny ``T×T`` problems, batched over leading dimensions, with a fixed number
of iterations and no host synchronisation (no ``.item()``, no data-dependent Python branching), so it
runs on the tensor's device inside a training step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["minimize_on_simplex", "project_simplex"]


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
        best = objective(candidates).argmin(dim=-1, keepdim=True)
        w = candidates.gather(-2, best.unsqueeze(-1).expand(*best.shape, w.shape[-1])).squeeze(-2)
    return w
