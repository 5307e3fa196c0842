"""``dualproj``: projection of the mean gradient onto the dual cone of the task gradients."""

from __future__ import annotations

from torch import Tensor

from gradsurg.strategies.base import Context
from gradsurg.strategies.qp import project_dual_cone
from gradsurg.strategies.registry import register_strategy
from gradsurg.strategies.upgrad import UPGrad

__all__ = ["DualProj"]


@register_strategy("dualproj", aliases=("dual_proj",))
class DualProj(UPGrad):
    r"""DualProj: project the mean gradient onto the dual cone of the task gradients.

    (It shares UPGrad's options, properties and preference vector, hence the subclass.)

    With ``C = {d : gⱼ·d ≥ 0 ∀j}`` the dual cone of the rows of ``G``, DualProj returns

    ``d = π_C((1/T) Σᵢ gᵢ)``

    the closest direction to the mean gradient that conflicts with no task (the projection of
    Gradient Episodic Memory, Lopez-Paz & Ranzato 2017, Eq. 11). In Gram space ``d = Gᵀv*`` with
    ``v* = argmin_{v ≥ 1/T} vᵀKv`` (Quinton & Rey 2024, Proposition 1).

    Paper: P. Quinton, V. Rey, "Jacobian Descent for Multi-Objective Optimization", 2024,
    https://arxiv.org/abs/2406.16232 (reference implementation: TorchJD,
    ``torchjd.aggregation.DualProj``); D. Lopez-Paz, M. Ranzato, "Gradient Episodic Memory for
    Continual Learning", NeurIPS 2017, https://arxiv.org/abs/1706.08840.

    Solver: the QP is solved exactly on the device by
    :func:`~gradsurg.strategies.qp.project_dual_cone` (TorchJD: ``quadprog`` on the CPU, with the
    Gram matrix normalised by its trace and regularised by ``10⁻⁴ I``). Cross-checked against TorchJD
    with ``QuadprogProjector(norm_eps=0, reg_eps=1e-13)`` on full-rank inputs (``1e-7`` relative)
    and with its defaults (``1e-3`` relative); non-conflict tested to ``1e-9`` relative.

    Scale: ``"mean"`` (default, TorchJD's: with one task ``d = g``; without conflicts ``d`` is the
    mean gradient) or ``"sum"`` (times ``T``, the scale of the summed loss).

    Cost: ``O(T² n)`` for the Gram matrix and one QP of size ``T`` (``O(T⁴)`` at worst).

    Args:
        scale: ``"mean"`` (default) or ``"sum"``.
    """

    cost = "O(T²·n) + a T×T active-set solve"
    summary = "Project the mean gradient onto the dual cone of the task gradients (Quinton & Rey 2024)."

    def weights(self, gram: Tensor, context: Context) -> Tensor:
        return project_dual_cone(gram, self.preference(gram))
