"""``gradvac``: Gradient Vaccine (Wang et al., ICLR 2021)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from gradsurg._math import safe_divide
from gradsurg.errors import InvalidStateError
from gradsurg.strategies.base import Context, Need, Output, Property, Strategy, check_option, weight_dtype
from gradsurg.strategies.fixed_point import is_finite_number
from gradsurg.strategies.projection import per_task_orders
from gradsurg.strategies.registry import register_strategy

__all__ = ["GradVac"]


def _state_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


@register_strategy("gradvac", aliases=("grad_vac", "gradient_vaccine"))
class GradVac(Strategy):
    r"""GradVac: raise each pair's gradient similarity towards its running average, then sum.

    For each task ``i`` (starting from ``gᵢ' = gᵢ``) and each other task ``j`` in a random order,
    with ``φᵢⱼ = cos(gᵢ', gⱼ)`` and the target ``φ̂ᵢⱼ`` (an EMA kept across steps): if ``φᵢⱼ < φ̂ᵢⱼ``,

    ``gᵢ' ← gᵢ' + gⱼ · ‖gᵢ'‖ (φ̂ᵢⱼ √(1−φᵢⱼ²) − φᵢⱼ √(1−φ̂ᵢⱼ²)) / (‖gⱼ‖ √(1−φ̂ᵢⱼ²))``

    which sets the cosine of ``gᵢ'`` and ``gⱼ`` to exactly ``φ̂ᵢⱼ``; then, in every case,
    ``φ̂ᵢⱼ ← (1−β) φ̂ᵢⱼ + β φᵢⱼ``. The direction is ``d = Σᵢ gᵢ'``. With ``φ̂ = 0`` (the first step)
    this is PCGrad's projection; later steps also align gradients that merely fall below their
    usual similarity.

    Paper: Z. Wang, Y. Tsvetkov, O. Firat, Y. Cao, "Gradient Vaccine: Investigating and Improving
    Multi-task Optimization in Massively Multilingual Models", ICLR 2021,
    https://arxiv.org/abs/2010.05874 (Algorithm 2). The paper applies it per parameter group
    (per layer); here each Surgeon group is one such group and keeps its own ``φ̂`` (``T×T``).

    Choices: ``gⱼ`` is the original gradient and each task visits the others in its own random
    order drawn from the caller's generator (as TorchJD and LibMTL); every projected gradient stays a
    combination ``gᵢ' = Σₖ Cᵢₖ gₖ``, so the whole update runs on the ``T×T`` Gram matrix, vectorised
    over ``i`` and without host synchronisation; no ``1e-8`` is added to denominators (guarded
    divisions instead: a zero gradient is never corrected nor used for a correction, and a target
    ``|φ̂| = 1``, which no finite correction reaches, makes no correction).

    Scale: a sum, like PCGrad (the sum of the gradients when no similarity falls below its target).
    Cost: ``O(T²n)`` for ``K`` and ``d`` plus ``O(T³)``; state ``T×T`` per group.

    Cross-checked against ``torchjd.aggregation.GradVac`` (``eps=0``, same task orders) over several
    steps, state included.

    Args:
        beta: EMA rate ``β ∈ [0, 1]`` of the targets (default ``0.01``, the paper; TorchJD and LibMTL
            default to 0.5).
        shuffle: Draw a random visiting order per task (default) or use index order.
    """

    family = "projection"
    cost = "O(T²·n); state T×T per group"
    summary = "Align each pair of task gradients to its running-average similarity, then sum (Wang et al. 2021)."
    paper = (
        "Z. Wang, Y. Tsvetkov, O. Firat, Y. Cao, Gradient Vaccine: Investigating and Improving Multi-task "
        "Optimization in Massively Multilingual Models, ICLR 2021. https://arxiv.org/abs/2010.05874"
    )
    properties = frozenset(
        {
            Property.SCALE_EQUIVARIANT,
            Property.ONE_TASK_IDENTITY,
            Property.ONE_TASK_POSITIVE,
            Property.SUM_WITHOUT_CONFLICT,
            Property.ZERO_ROWS_IGNORED,
            Property.IN_ROW_SPAN,
            Property.RANDOMIZED,
        }
    )
    needs = frozenset({Need.STATE})

    beta: float
    shuffle: bool

    def __init__(self, *, beta: float = 0.01, shuffle: bool = True) -> None:
        name = type(self).__name__
        check_option(is_finite_number(beta) and 0 <= beta <= 1, name, "beta", "a number in [0, 1]", beta)
        check_option(isinstance(shuffle, bool), name, "shuffle", "a bool", shuffle)
        self._set_options(beta=float(beta), shuffle=shuffle)

    def init_state(self, tasks: int, *, device: torch.device) -> dict[str, Any]:
        """``phi``: the targets ``φ̂`` (``Tensor[T, T]``, zeros)."""
        return {"phi": torch.zeros(tasks, tasks, dtype=_state_dtype(device), device=device)}

    def _combine(self, grads: Tensor, context: Context) -> Tensor:
        return self.apply(grads, context).direction

    def apply(self, grads: Tensor, context: Context) -> Output:
        gram = (context.gram if context.gram is not None else grads @ grads.T).to(weight_dtype(grads))
        weights, phi = self.step(gram, context.state, context)
        direction = (weights.to(grads.dtype) @ grads).reshape(grads.shape[1])
        return Output(direction=direction, state={"phi": phi})

    def step(self, gram: Tensor, state: Mapping[str, Any], context: Context) -> tuple[Tensor, Tensor]:
        """The task weights ``w`` (``d = wᵀG``) and the new targets ``φ̂`` for the Gram matrix ``gram``."""
        tasks = gram.shape[0]
        phi_hat = state.get("phi")
        if not isinstance(phi_hat, Tensor) or phi_hat.shape != (tasks, tasks):
            found = tuple(phi_hat.shape) if isinstance(phi_hat, Tensor) else type(phi_hat).__name__
            raise InvalidStateError(
                f"GradVac state `phi`{context.where} must be a Tensor of shape ({tasks}, {tasks}); found {found} "
                "(the number of tasks changed, or the state comes from another strategy)."
            )
        phi_hat = phi_hat.to(dtype=gram.dtype, device=gram.device).clone()
        coefficients = torch.eye(tasks, dtype=gram.dtype, device=gram.device)
        partners = per_task_orders(tasks, context.generator, shuffle=self.shuffle).to(gram.device)
        rows = torch.arange(tasks, device=gram.device)
        norms = gram.diagonal().clamp_min(0).sqrt()
        for position in range(tasks - 1):
            j = partners[:, position]
            dots = coefficients @ gram  # dots[i, m] = gᵢ'·gₘ
            own = (dots * coefficients).sum(dim=1).clamp_min(0).sqrt()  # ‖gᵢ'‖
            cosine = safe_divide(dots[rows, j], own * norms[j])
            target = phi_hat[rows, j]
            target_sine = (1 - target.square()).clamp_min(0).sqrt()
            numerator = own * (target * (1 - cosine.square()).clamp_min(0).sqrt() - cosine * target_sine)
            step = safe_divide(numerator, norms[j] * target_sine)
            coefficients[rows, j] += torch.where(cosine < target, step, torch.zeros_like(step))
            phi_hat[rows, j] = (1 - self.beta) * target + self.beta * cosine
        return coefficients.sum(dim=0), phi_hat
