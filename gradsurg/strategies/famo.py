"""``famo``: Fast Adaptive Multitask Optimization (Liu et al., NeurIPS 2023)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from gradsurg.strategies.base import Context, Need, Property, check_option
from gradsurg.strategies.loss_weighting import LossWeighting, TaskWeights, check_nonnegative, is_real, weight_dtype
from gradsurg.strategies.registry import register_strategy

__all__ = ["FAMO"]

_EPS = 1e-8  # the official code's constant inside the logarithms
_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, used by the official code


@register_strategy("famo")
class FAMO(LossWeighting):
    r"""FAMO: balance the tasks' log-loss decrease with O(1) work per step (no per-task gradients needed).

    Task logits ``ξ ∈ ℝᵀ`` (state, start at 0) give ``z = softmax(ξ)``. With ``Dᵢ = Lᵢ + 10⁻⁸`` the
    official code back-propagates ``Σᵢ zᵢ log Dᵢ / c`` with ``c = Σⱼ zⱼ / Dⱼ`` held constant, so

    ``wᵢ = (zᵢ / Dᵢ) / Σⱼ (zⱼ / Dⱼ)``,  ``d = Σᵢ wᵢ gᵢ``  (the weights sum to 1).

    After the optimizer step, ``surgeon.update(losses_after)`` (the same batch re-evaluated under
    the new parameters) calls :meth:`after_step`, which computes
    ``δ = log(L_before + 10⁻⁸) − log(L_after + 10⁻⁸)`` and the logit gradient
    ``∇ξ = J_softmax(ξ)ᵀ δ = z ⊙ (δ − zᵀδ)``, then takes one Adam step on ``ξ`` with learning rate
    ``lr``, coupled (L2) weight decay ``gamma`` and ``torch.optim.Adam``'s defaults
    ``β = (0.9, 0.999)``, ``ε = 10⁻⁸`` — exactly the official ``FAMO.update``.

    Paper: B. Liu, Y. Feng, P. Stone, Q. Liu, "FAMO: Fast Adaptive Multitask Optimization",
    NeurIPS 2023, https://arxiv.org/abs/2306.03792 (official code ``Cranial-XIX/FAMO``, ``famo.py``).

    Differences from the official code: the minimum losses are fixed at 0 (the official
    ``set_min_losses`` is not used by its experiments); the official ``backward`` also clips the
    shared parameters' gradient norm to 1.0 — a separate step, do it yourself with
    ``torch.nn.utils.clip_grad_norm_`` after ``surgeon.backward``. The logits and Adam moments are
    kept in float64 (the official code uses float32). Every group keeps its own copy of the logits;
    they receive the same losses, so they stay identical.

    Defaults: ``lr = 0.025`` (official ``w_lr`` and LibMTL), ``gamma = 1e-3`` (LibMTL's
    ``FAMO_w_gamma`` and the official NYUv2/Cityscapes runs; ``famo.py`` defaults to 0.01).

    Scale: weights sum to 1, so ``d`` has the scale of ``mean`` (equal to it at the first step when
    the losses are equal); one task gives ``d = g``.

    Cost: ``O(T n)`` per group, ``O(T)`` for the update; state ``3T`` numbers and a step count.

    Cross-check: several steps against a re-implementation of the official loop that uses
    ``torch.optim.Adam`` on the logits (weights and logits to ``1e-10``).

    Args:
        lr: Learning rate of the logits (``> 0``).
        gamma: Weight decay of the logits (``≥ 0``).
    """

    family = "loss"
    cost = "O(T·n); O(T) update after the step"
    summary = "Adapt task weights so every task's log-loss decreases at the same rate, O(1) per step (Liu et al. 2023)."
    paper = (
        "B. Liu, Y. Feng, P. Stone, Q. Liu, FAMO: Fast Adaptive Multitask Optimization, NeurIPS 2023. "
        "https://arxiv.org/abs/2306.03792"
    )
    properties = frozenset(
        {Property.SCALE_EQUIVARIANT, Property.ONE_TASK_IDENTITY, Property.ONE_TASK_POSITIVE, Property.IN_ROW_SPAN}
    )
    needs = frozenset({Need.LOSSES, Need.STATE, Need.POST_STEP_LOSSES})

    lr: float
    gamma: float

    def __init__(self, *, lr: float = 0.025, gamma: float = 1e-3) -> None:
        name = type(self).__name__
        check_option(is_real(lr, low=0, open_low=True), name, "lr", "a finite number > 0", lr)
        check_option(is_real(gamma, low=0), name, "gamma", "a finite number ≥ 0", gamma)
        self._set_options(lr=float(lr), gamma=float(gamma))

    def init_state(self, tasks: int, *, device: torch.device) -> dict[str, Any]:
        zeros = torch.zeros(tasks, dtype=weight_dtype(device), device=device)
        return {"logits": zeros, "exp_avg": zeros.clone(), "exp_avg_sq": zeros.clone(), "updates": 0}

    def task_weights(self, grads: Tensor, context: Context) -> TaskWeights:
        losses = self.task_losses(context, grads, nonnegative=True)
        ratio = torch.softmax(context.state["logits"], dim=0) / (losses + _EPS)
        return TaskWeights(weights=ratio / ratio.sum(), state=context.state)

    def after_step(self, state: Mapping[str, Any], losses_before: Tensor, losses_after: Tensor) -> dict[str, Any]:
        logits: Tensor = state["logits"]
        before, after = losses_before.to(logits), losses_after.to(logits)
        check_nonnegative(torch.cat([before, after]), self.name, " in surgeon.update()")
        delta = torch.log(before + _EPS) - torch.log(after + _EPS)
        z = torch.softmax(logits, dim=0)
        grad = z * (delta - (z * delta).sum()) + self.gamma * logits
        updates = int(state["updates"]) + 1
        exp_avg = _BETAS[0] * state["exp_avg"] + (1 - _BETAS[0]) * grad
        exp_avg_sq = _BETAS[1] * state["exp_avg_sq"] + (1 - _BETAS[1]) * grad * grad
        denominator = (exp_avg_sq / (1 - _BETAS[1] ** updates)).sqrt() + _EPS
        logits = logits - (self.lr / (1 - _BETAS[0] ** updates)) * exp_avg / denominator
        return {"logits": logits, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "updates": updates}
