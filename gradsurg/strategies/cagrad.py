"""``cagrad``: Conflict-Averse Gradient descent (Liu et al., NeurIPS 2021)."""

from __future__ import annotations

import torch
from torch import Tensor

from gradsurg.strategies.base import Context, GramStrategy, Property, check_choice, check_option
from gradsurg.strategies.registry import register_strategy
from gradsurg.strategies.solvers import minimize_cagrad_dual

__all__ = ["CAGrad"]

_RESCALE_MODES = (0, 1, 2)
# ‖g_w*‖ below this fraction of the typical gradient norm counts as the degenerate optimum g_w* = 0.
_DEGENERATE_RTOL = 1e-5


@register_strategy("cagrad", aliases=("ca_grad",))
class CAGrad(GramStrategy):
    r"""CAGrad: the update that maximises the worst task improvement in a ball around the mean gradient.

    With ``g₀ = (1/T) Σᵢ gᵢ`` and ``φ = c‖g₀‖``, CAGrad solves
    ``max_d minᵢ gᵢ·d  s.t. ‖d − g₀‖ ≤ φ`` through its dual over the simplex,

    ``w* = argmin_{w ∈ Δ} g_wᵀ g₀ + φ ‖g_w‖``,  ``g_w = Σᵢ wᵢ gᵢ``,

    and returns ``d = g₀ + (φ / ‖g_w*‖) g_w*``, divided by ``1`` (``rescale=0``), ``1 + c²``
    (``rescale=1``, the official supervised setting and the default) or ``1 + c`` (``rescale=2``).
    Everything only needs the Gram matrix ``K = G Gᵀ``: ``g_wᵀ g₀ = wᵀ K 1 / T``,
    ``‖g_w‖² = wᵀ K w``, ``‖g₀‖² = 1ᵀ K 1 / T²``.

    Paper: B. Liu, X. Liu, X. Jin, P. Stone, Q. Liu, "Conflict-Averse Gradient Descent for Multi-task
    Learning", NeurIPS 2021, https://arxiv.org/abs/2110.14048 (official code: ``Cranial-XIX/CAGrad``).

    Solver. The official code runs ``scipy.optimize.minimize`` (SLSQP) on the CPU from uniform
    weights, TorchJD runs cvxpy/Clarabel. Here the same convex problem (times ``T``, with relative
    tolerances only: the minimiser does not depend on the scale of ``G``) is solved on the tensor's
    device with no host synchronisation by :func:`~gradsurg.strategies.solvers.minimize_cagrad_dual`:
    for ``T ≤ 10`` an **exact active-set formula** evaluated on all ``2ᵀ − 1`` faces of the simplex at
    once (on a face ``S``, ``w_S ∝ λK_S⁻¹1 − K_S⁻¹b_S`` with ``λ`` the root of a quadratic; the best
    feasible candidate wins), a few dozen tensor operations and no iteration; for larger ``T``, the
    same enumeration on the 8 tasks the mean gradient helps least, then ``iterations`` steps of a
    primal active-set method that moves between faces with the same formula. On generic inputs the
    direction agrees with SLSQP run to tight tolerance to about ``1e-7`` relative up to ``T = 16``
    (SLSQP's own accuracy). When ``0`` lies in the convex hull of the task gradients (e.g. two
    exactly opposite gradients) the dual optimum can be ``g_w* = 0``, where ``g_w/‖g_w‖`` is
    undefined; the official code then depends on the ``1e-8`` constants it adds, which make its
    result scale dependent. We follow the paper's scale-free problem: when ``‖g_w*‖ ≤ 1e-5`` of the
    typical gradient norm, the primal optimum value is 0 and is reached by ``d = 0`` when the ball
    contains it (``c ≥ 1``), else by ``d = g₀`` (``0`` on the boundary of the hull); tested against
    the primal problem.

    Scale: with ``rescale=1`` and one task, ``d = g (1 + c)/(1 + c²)``. The official supervised
    trainer multiplies the direction by ``T`` to match a summed loss; pass ``scale="sum"`` for that.

    Args:
        c: Radius of the ball relative to ``‖g₀‖`` (``≥ 0``; 0.4 in the paper's NYUv2/Cityscapes runs,
            0.5 in the official script's default).
        rescale: 0, 1 or 2 as above.
        scale: ``"mean"`` (default, the paper's ``g₀``-based scale) or ``"sum"`` (times ``T``).
        iterations: Active-set steps of the solver when ``T > 10`` (``None``, the default: ``T``; else an
            integer ``≥ 1``, fewer steps are faster and may stop short of the optimum). The exact
            enumeration used up to 10 tasks does not iterate.
    """

    family = "gram"
    cost = "O(T²·n) + a T×T simplex solve"
    summary = "Maximise the worst-case task improvement in a ball around the mean gradient (Liu et al. 2021)."
    paper = (
        "B. Liu et al., Conflict-Averse Gradient Descent for Multi-task Learning, NeurIPS 2021. "
        "https://arxiv.org/abs/2110.14048"
    )
    batched = True
    properties = frozenset(
        {
            Property.SCALE_EQUIVARIANT,
            Property.ONE_TASK_POSITIVE,
            Property.PERMUTATION_INVARIANT,
            Property.IN_ROW_SPAN,
        }
    )

    def __init__(self, *, c: float = 0.4, rescale: int = 1, scale: str = "mean", iterations: int | None = None) -> None:
        name = type(self).__name__
        check_option(
            isinstance(c, (int, float)) and not isinstance(c, bool) and c >= 0 and c == c and c != float("inf"),
            name,
            "c",
            "a finite number ≥ 0",
            c,
        )
        check_choice(rescale, _RESCALE_MODES, name, "rescale")
        check_choice(scale, ("mean", "sum"), name, "scale")
        check_option(
            iterations is None
            or (isinstance(iterations, int) and not isinstance(iterations, bool) and iterations >= 1),
            name,
            "iterations",
            "None or an integer ≥ 1",
            iterations,
        )
        self._set_options(c=float(c), rescale=rescale, scale=scale, iterations=iterations)

    c: float
    rescale: int
    scale: str
    iterations: int | None

    def dual_weights(self, gram: Tensor) -> Tensor:
        """The dual solution ``w* ∈ Δ`` for ``gram`` (``Tensor[..., T, T]``)."""
        return minimize_cagrad_dual(*self._dual_problem(gram), iterations=self.iterations)

    def _dual_problem(self, gram: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``K = G Gᵀ``, ``b = K1 = T G g₀`` and ``φ = c√(1ᵀK1) = T c‖g₀‖``: the dual times ``T`` (its solution
        does not depend on the scale of the problem)."""
        b = gram.sum(dim=-1)
        return gram, b, (b.sum(dim=-1, keepdim=True).clamp_min(0) * self.c**2).sqrt()

    def weights(self, gram: Tensor, context: Context) -> Tensor:
        tasks = gram.shape[-1]
        k, b, phi = self._dual_problem(gram)
        w = minimize_cagrad_dual(k, b, phi, iterations=self.iterations)
        divisor = {0: 1.0, 1: 1.0 + self.c**2, 2: 1.0 + self.c}[self.rescale]
        factor = (float(tasks) if self.scale == "sum" else 1.0) / (divisor * tasks)
        # d = g₀ + (c‖g₀‖/‖g_w‖) g_w = (1 + (φ/‖g_w‖) w)ᵀG / T, times the rescale and scale factor.
        gw_squared = ((w.unsqueeze(-2) @ k).squeeze(-2) * w).sum(dim=-1, keepdim=True)
        weights = torch.addcmul(torch.full_like(w, factor), phi * gw_squared.rsqrt(), w, value=factor)
        # Degenerate case: 0 lies in the convex hull and the dual optimum is g_w* = 0 (value 0), so the
        # unit vector g_w/‖g_w‖ is undefined (the solver leaves a rounding-level g_w). The primal is then
        # solved by any d in the ball that conflicts with no task: d = 0 when the ball contains it
        # (c ≥ 1), else d = g₀ (0 on the boundary of the hull). Decided on the device, without a sync, with
        # ‖g_w‖ relative to the typical gradient norm √(mean diag K).
        trace = gram.diagonal(dim1=-2, dim2=-1).sum(dim=-1, keepdim=True)
        degenerate = gw_squared <= trace * (_DEGENERATE_RTOL**2 / tasks)
        return torch.where(degenerate, 0.0 if self.c >= 1 else factor, weights)
