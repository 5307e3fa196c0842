"""``nash_mtl``: Multi-Task Learning as a Bargaining Game (Navon et al., ICML 2022)."""

from __future__ import annotations

import torch
from torch import Tensor

from gradsurg._math import safe_divide
from gradsurg.strategies.base import Context, GramStrategy, Property, check_option
from gradsurg.strategies.fixed_point import is_count, is_finite_number, solve_power_equation
from gradsurg.strategies.registry import register_strategy

__all__ = ["NashMTL"]


@register_strategy("nash_mtl", aliases=("nashmtl", "nash"))
class NashMTL(GramStrategy):
    r"""Nash-MTL: the Nash bargaining solution between the tasks, ``d = Σᵢ αᵢ gᵢ`` with ``K α = 1/α``.

    The tasks bargain over an update ``d`` in a ball; the Nash bargaining solution maximises
    ``Σᵢ log(gᵢ·d)`` and is ``d = Σᵢ αᵢ gᵢ`` with ``α > 0`` solving

    ``(G Gᵀ) α = 1/α``  (elementwise: ``αᵢ (Kα)ᵢ = 1``, ``K = G Gᵀ``).

    Then ``‖d‖² = αᵀKα = T``; when ``max_norm > 0`` and ``‖d‖ > max_norm`` the weights are scaled so
    that ``‖d‖ = max_norm`` (the clipping of the official code, applied here to this group's ``d``).

    Paper: A. Navon, A. Shamsian, I. Achituve, H. Maron, K. Kawaguchi, G. Chechik, A. Fetaya,
    "Multi-Task Learning as a Bargaining Game", ICML 2022, https://arxiv.org/abs/2202.01017
    (Algorithm 1; official code ``AvivNavon/nash-mtl``).

    Solver. The official code runs up to ``optim_niter=20`` convex-concave iterations of cvxpy/ECOS on
    the CPU. ``α`` is the unique minimiser of the convex ``½ αᵀKα − Σᵢ log αᵢ``, solved here on the
    tensor's device by damped Newton with a batched line search
    (:func:`~gradsurg.strategies.fixed_point.solve_power_equation`, a relative backward error below
    ``1e-6`` or a :class:`~gradsurg.errors.GradSurgWarning`). The official code divides ``K`` by its
    Frobenius norm before solving, but its constraint ``αᵢ (Kα)ᵢ ≥ 1`` is on the un-normalised ``K``,
    so its ``α`` solves the equation above for ``K`` itself (checked against TorchJD's port of it,
    which agrees to ``1e-6`` relative): the normalisation is only numerical conditioning and the
    solver here normalises internally.

    Differences from the official code: ``update_weights_every`` (reuse the weights for several
    steps) is not offered (always 1, the official default); the official ``max_norm`` call clips the
    parameters' ``.grad`` *before* the weighted backward pass, so it has no effect there, while here
    (as in TorchJD) ``max_norm`` clips the direction of each group; task-specific parameters outside
    the groups get the plain sum (the official code weights them by ``α`` too); when 0 lies in the
    convex hull of the task gradients (a zero gradient, two opposite ones) no solution exists and
    the official solver fails — here a ridge ``1e-8`` on the cosine matrix keeps it well posed: zero
    gradients are ignored and exactly opposite ones cancel.

    Scale: unclipped ``‖d‖ = √T`` whatever the scale of ``G`` (the direction is invariant to scaling
    ``G``); with the default ``max_norm=1`` the direction has norm ``min(√T, 1) = 1`` (``d = g/‖g‖``
    for one task). Cost: ``O(T²n)`` for ``K`` and ``d``, plus ``O(iterations · T³)`` for the solve.

    Cross-checked against ``torchjd.aggregation.NashMTL`` (cvxpy + ECOS; test-only dependency) and a
    tight ``scipy.optimize.least_squares`` solve.

    Args:
        max_norm: Largest norm of the direction; ``0`` disables clipping (default ``1.0``, official).
        iterations: Newton iterations of the solver (``≥ 1``, default 40).
    """

    family = "gram"
    cost = "O(T²·n) + a T×T Newton solve"
    summary = "Nash bargaining solution between the task gradients (Navon et al. 2022)."
    paper = "A. Navon et al., Multi-Task Learning as a Bargaining Game, ICML 2022. https://arxiv.org/abs/2202.01017"
    # Also permutation invariant, blind to zero rows and in the row span in exact arithmetic, but when 0 is
    # in the convex hull of the gradients the ridge-regularised weights are huge and cancel, so float32
    # results miss the conformance tolerances (relative to the input's size); tested on feasible inputs.
    properties = frozenset({Property.ONE_TASK_POSITIVE})
    batched = True

    max_norm: float
    iterations: int

    def __init__(self, *, max_norm: float = 1.0, iterations: int = 40) -> None:
        name = type(self).__name__
        check_option(is_finite_number(max_norm) and max_norm >= 0, name, "max_norm", "a finite number ≥ 0", max_norm)
        check_option(is_count(iterations), name, "iterations", "an integer ≥ 1", iterations)
        self._set_options(max_norm=float(max_norm), iterations=iterations)

    def weights(self, gram: Tensor, context: Context) -> Tensor:
        alpha, _ = solve_power_equation(gram, 1.0, iterations=self.iterations, tolerance=1e-6, method="Nash-MTL")
        if self.max_norm > 0:
            norm = ((gram @ alpha.unsqueeze(-1)).squeeze(-1) * alpha).sum(dim=-1, keepdim=True).clamp_min(0).sqrt()
            factor = torch.where(norm > self.max_norm, safe_divide(torch.full_like(norm, self.max_norm), norm), 1.0)
            alpha = alpha * factor
        return alpha
