"""``gradnorm``: Gradient Normalization (Chen et al., ICML 2018)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gradsurg._math import safe_divide
from gradsurg.strategies.base import Context, Need, Property, check_option
from gradsurg.strategies.loss_weighting import LossWeighting, TaskWeights, is_real, scaled_softmax, weight_dtype
from gradsurg.strategies.registry import register_strategy

__all__ = ["GradNorm"]


@register_strategy("gradnorm", aliases=("grad_norm",))
class GradNorm(LossWeighting):
    r"""GradNorm: learn task weights that equalise the weighted gradient norms, adjusted by training rates.

    Learnable logits ``p ∈ ℝᵀ`` (``surgeon.parameters()``, key ``"logits"``, start at 1 as in
    LibMTL) give weights ``w = T · softmax(p)`` (positive, sum ``T``). With ``‖gᵢ‖`` the norm of
    task ``i``'s gradient on the group (the square root of the Gram diagonal), the inverse training
    rates ``L̃ᵢ = Lᵢ / Lᵢ(0)`` (``Lᵢ(0)``: the losses of the first step, kept in the state) and
    ``rᵢ = L̃ᵢ / mean(L̃)``, the parameters minimise

    ``L_grad = Σᵢ | wᵢ‖gᵢ‖ − mean(w‖g‖) · rᵢ^α |``

    with the target ``mean(w‖g‖) · rᵢ^α`` treated as a constant (paper, eq. 2). The direction is
    ``d = Σᵢ wᵢ gᵢ`` at the current weights (before the optimizer updates ``p``). The Surgeon
    averages ``L_grad`` over the groups that share the strategy (the paper applies it to the last
    shared layer only: map that group to ``gradnorm`` and the others to another strategy if you
    want exactly that).

    Paper: Z. Chen, V. Badrinarayanan, C.-Y. Lee, A. Rabinovich, "GradNorm: Gradient Normalization for
    Adaptive Loss Balancing in Deep Multitask Networks", ICML 2018, https://arxiv.org/abs/1711.02257.

    Renormalisation. The paper updates raw weights with the optimizer, then renormalises them to
    sum ``T`` after every step. A Surgeon never writes to the parameters after ``optimizer.step()``,
    so, like LibMTL, the weights are ``T · softmax(p)``: the constraint holds at every step by
    construction, the weights stay positive, and the gradient on ``p`` passes through the
    softmax. The trajectory therefore differs from the paper's projected update (not from LibMTL's).

    Differences from LibMTL: LibMTL uses epoch-average losses of the first epoch as ``L(0)`` and
    plain equal weights without updating ``p`` during that epoch; here ``L(0)`` is the first step's
    losses (the paper's choice) and the update starts at once (``r = 1`` at the first step). A zero
    initial loss gives ``L̃ᵢ = 0``.

    Scale: the weights sum to ``T``: the scale of ``sum`` (equal to it at the start, ``p`` uniform).

    Cost: ``O(T n)`` per group (``T`` norms and one weighted sum); objective ``O(T)``.

    Cross-check: several optimizer steps against a plain re-implementation of LibMTL's ``GradNorm``
    loop (weights, gradient on ``p`` and parameters after SGD steps, to ``1e-6`` relative).

    Args:
        alpha: Restoring-force strength ``α`` (``≥ 0``; 1.5 in LibMTL; the paper uses 0.12–3).
    """

    family = "loss"
    cost = "O(T·n); T learnable parameters"
    summary = "Learn task weights that balance weighted gradient norms by relative training rate (Chen et al. 2018)."
    paper = (
        "Z. Chen et al., GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep Multitask Networks, "
        "ICML 2018. https://arxiv.org/abs/1711.02257"
    )
    properties = frozenset(
        {Property.SCALE_EQUIVARIANT, Property.ONE_TASK_IDENTITY, Property.ONE_TASK_POSITIVE, Property.IN_ROW_SPAN}
    )
    needs = frozenset({Need.LOSSES, Need.STATE, Need.PARAMS})

    alpha: float

    def __init__(self, *, alpha: float = 1.5) -> None:
        check_option(is_real(alpha, low=0), type(self).__name__, "alpha", "a finite number ≥ 0", alpha)
        self._set_options(alpha=float(alpha))

    def init_params(self, tasks: int) -> dict[str, Tensor]:
        return {"logits": torch.ones(tasks)}

    def init_state(self, tasks: int, *, device: torch.device) -> dict[str, Any]:
        return {"steps": 0, "initial_losses": torch.zeros(tasks, dtype=weight_dtype(device), device=device)}

    def task_weights(self, grads: Tensor, context: Context) -> TaskWeights:
        losses = self.task_losses(context, grads)
        steps: int = context.state["steps"]
        initial: Tensor = losses if steps == 0 else context.state["initial_losses"]
        logits = self.learnable(context, "logits")
        weights = scaled_softmax(logits)
        ratio = safe_divide(losses, initial)
        rate = safe_divide(ratio, ratio.mean().expand_as(ratio))
        squares = context.gram.diagonal() if context.gram is not None else (grads * grads).sum(dim=1)
        norms = squares.to(logits.device, logits.dtype).clamp_min(0).sqrt()
        weighted = weights * norms
        target = (weighted.mean() * rate.to(weighted).pow(self.alpha)).detach()
        objective = (weighted - target).abs().sum()
        state = {"steps": steps + 1, "initial_losses": initial}
        return TaskWeights(weights=weights.detach(), state=state, objective=objective)
