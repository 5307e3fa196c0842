"""``upgrad``: Unconflicting Projection of Gradients (Quinton & Rey 2024)."""

from __future__ import annotations

from torch import Tensor

from gradsurg.strategies.base import Context, GramStrategy, Property, check_choice
from gradsurg.strategies.qp import project_dual_cone
from gradsurg.strategies.registry import register_strategy

__all__ = ["UPGrad"]


@register_strategy("upgrad", aliases=("up_grad",))
class UPGrad(GramStrategy):
    r"""UPGrad: project every task gradient onto the dual cone of all of them, then average.

    The dual cone of the rows of ``G`` is ``C = {d : gⱼ·d ≥ 0 ∀j}`` (the directions that conflict
    with no task). UPGrad returns

    ``d = (1/T) Σᵢ π_C(gᵢ)``

    where ``π_C`` is the Euclidean projection onto ``C``. By Proposition 1 of the paper,
    ``π_C(Gᵀu) = Gᵀv*`` with ``v* = argmin_{v ≥ u} vᵀKv`` (``K = G Gᵀ``), so every projection is a
    ``T``-dimensional QP in Gram space, and ``d = wᵀG`` with ``w = (1/T) Σᵢ v*(eᵢ)``. Since ``C`` is a
    convex cone, ``d ∈ C``: the result never conflicts with a task gradient (``gⱼ·d ≥ 0``).

    Paper: P. Quinton, V. Rey, "Jacobian Descent for Multi-Objective Optimization", 2024,
    https://arxiv.org/abs/2406.16232 (reference implementation: TorchJD, ``torchjd.aggregation.UPGrad``).

    Solver. TorchJD solves the ``T`` QPs with ``quadprog`` on the CPU, after dividing ``K`` by its
    trace and adding ``10⁻⁴ I`` to it (so its result may conflict with a task by about ``10⁻⁴`` of
    the scale). Here the ``T`` QPs are solved together, on the device, exactly (no regularisation)
    by :func:`~gradsurg.strategies.qp.project_dual_cone`, an active-set non-negative
    least-squares method. Cross-checked against TorchJD with ``QuadprogProjector(norm_eps=0,
    reg_eps=1e-13)`` on full-rank inputs (``1e-7`` relative) and with its defaults (``1e-3``
    relative, the effect of the regularisation); non-conflict tested to ``1e-9`` relative.

    Scale: ``"mean"`` (default, TorchJD's preference vector ``1/T``: with one task ``d = g``, and
    without conflicts ``d`` is the mean gradient) or ``"sum"`` (times ``T``: without conflicts ``d``
    is the sum of the gradients, the scale of the summed loss).

    Cost: ``O(T² n)`` for the Gram matrix, ``T`` batched QPs of size ``T`` (``O(T⁵)`` at worst).

    Args:
        scale: ``"mean"`` (default) or ``"sum"``.
    """

    family = "gram"
    cost = "O(T²·n) + T active-set solves of size T"
    summary = "Average of the task gradients projected onto the dual cone of all of them (Quinton & Rey 2024)."
    paper = (
        "P. Quinton, V. Rey, Jacobian Descent for Multi-Objective Optimization, 2024. https://arxiv.org/abs/2406.16232"
    )
    batched = True
    properties = frozenset(
        {
            Property.SCALE_EQUIVARIANT,
            Property.ONE_TASK_IDENTITY,
            Property.ONE_TASK_POSITIVE,
            Property.PERMUTATION_INVARIANT,
            Property.IN_ROW_SPAN,
        }
    )

    scale: str

    def __init__(self, *, scale: str = "mean") -> None:
        check_choice(scale, ("mean", "sum"), type(self).__name__, "scale")
        self._set_options(scale=scale)

    def preference(self, gram: Tensor) -> float:
        """The weight of every task in the vector(s) to project: ``1/T`` (``"mean"``) or 1 (``"sum"``)."""
        return 1.0 if self.scale == "sum" else 1.0 / gram.shape[-1]

    def weights(self, gram: Tensor, context: Context) -> Tensor:
        # v*(c eᵢ) = c v*(eᵢ): the projection onto a cone is positively homogeneous.
        return project_dual_cone(gram).sum(dim=-2) * self.preference(gram)
