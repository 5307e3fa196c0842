"""``uw``: uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018)."""

from __future__ import annotations

import torch
from torch import Tensor

from gradsurg.strategies.base import Context, Need, Property, check_choice, check_option
from gradsurg.strategies.loss_weighting import LossWeighting, TaskWeights, is_real
from gradsurg.strategies.registry import register_strategy

__all__ = ["UncertaintyWeighting"]

_FORMS = ("plain", "regression")


@register_strategy("uw", aliases=("uncertainty", "uncertainty_weighting"))
class UncertaintyWeighting(LossWeighting):
    r"""Uncertainty weighting: learnable log-variances ``sᵢ`` weigh each task by ``exp(−sᵢ)``.

    The learnable parameters ``s ∈ ℝᵀ`` (``surgeon.parameters()``, key ``"log_variance"``) minimise,
    together with the model, the objective

    * ``form="plain"`` (default): ``Σᵢ exp(−sᵢ) Lᵢ + sᵢ``, weights ``wᵢ = exp(−sᵢ)``;
    * ``form="regression"``: ``Σᵢ ½ exp(−sᵢ) Lᵢ + ½ sᵢ``, weights ``wᵢ = ½ exp(−sᵢ)`` — the paper's
      Gaussian-likelihood form (eq. 7 with ``sᵢ = log σᵢ²``) and LibMTL's ``UW``.

    Both have the same minimiser ``sᵢ = log Lᵢ``; the regression form halves the weights and the
    gradient on ``s``. The direction is ``d = Σᵢ wᵢ gᵢ`` with ``w`` taken at the current ``s``
    (detached); the Surgeon writes ``∂objective/∂sᵢ = c (1 − exp(−sᵢ) Lᵢ)`` (``c = 1`` or ``½``) to
    ``s.grad`` for the user's optimizer, which must hold ``surgeon.parameters()``.

    Paper: A. Kendall, Y. Gal, R. Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for
    Scene Geometry and Semantics", CVPR 2018, https://arxiv.org/abs/1705.07115.

    Scale: ``Σᵢ wᵢ gᵢ`` with ``wᵢ = exp(−sᵢ)``: at ``s = 0`` (the default start) it equals ``sum``.
    LibMTL starts at ``s = −0.5`` with the regression form (weights ``≈ 0.82``).

    Cost: ``O(T n)`` per group (one weighted sum); the objective is ``O(T)``.

    Cross-check: against a plain re-implementation of LibMTL's ``UW`` loop (weights, the gradient on
    ``s`` and the resulting optimizer steps, to ``1e-6`` relative).

    Args:
        form: ``"plain"`` (``exp(−s)L + s``) or ``"regression"`` (the same with ``½`` factors).
        init: Initial log-variance ``s₀`` of every task (finite; default ``0.0``).
    """

    family = "loss"
    cost = "O(T·n); T learnable parameters"
    summary = "Learnable homoscedastic-uncertainty weights exp(−s) per task (Kendall et al. 2018)."
    paper = (
        "A. Kendall, Y. Gal, R. Cipolla, Multi-Task Learning Using Uncertainty to Weigh Losses for Scene Geometry "
        "and Semantics, CVPR 2018. https://arxiv.org/abs/1705.07115"
    )
    properties = frozenset({Property.SCALE_EQUIVARIANT, Property.ONE_TASK_POSITIVE, Property.IN_ROW_SPAN})
    needs = frozenset({Need.LOSSES, Need.PARAMS})

    form: str
    init: float

    def __init__(self, *, form: str = "plain", init: float = 0.0) -> None:
        name = type(self).__name__
        check_choice(form, _FORMS, name, "form")
        check_option(is_real(init), name, "init", "a finite number", init)
        self._set_options(form=form, init=float(init))

    def init_params(self, tasks: int) -> dict[str, Tensor]:
        return {"log_variance": torch.full((tasks,), self.init)}

    def task_weights(self, grads: Tensor, context: Context) -> TaskWeights:
        losses = self.task_losses(context, grads)
        s = self.learnable(context, "log_variance")
        factor = 0.5 if self.form == "regression" else 1.0
        objective = factor * (torch.exp(-s) * losses.to(s) + s).sum()
        weights = factor * torch.exp(-s.detach())
        return TaskWeights(weights=weights, state=context.state, objective=objective)
