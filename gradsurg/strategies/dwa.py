"""``dwa``: Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gradsurg._math import safe_divide
from gradsurg.strategies.base import Context, Need, Property, check_option
from gradsurg.strategies.loss_weighting import (
    LossWeighting,
    TaskWeights,
    is_count,
    is_real,
    scaled_softmax,
    weight_dtype,
)
from gradsurg.strategies.registry import register_strategy

__all__ = ["DWA"]


@register_strategy("dwa", aliases=("dynamic_weight_average",))
class DWA(LossWeighting):
    r"""Dynamic Weight Average: weigh each task by how slowly its loss has been decreasing.

    With ``L̄ᵢ(k)`` the average loss of task ``i`` over window ``k`` (``window`` consecutive steps),
    the weights during window ``k ≥ 2`` are

    ``rᵢ = L̄ᵢ(k−1) / L̄ᵢ(k−2)``,  ``w = T · softmax(r / temperature)``,

    and ``w = 1`` during the first two windows; ``d = Σᵢ wᵢ gᵢ``.

    Paper: S. Liu, E. Johns, A. J. Davison, "End-to-End Multi-Task Learning with Attention",
    CVPR 2019, https://arxiv.org/abs/1803.10704 (eq. 1; official code ``lorenmt/mtan``).

    Choice of window. The paper and LibMTL use epoch-average losses (``rᵢ`` from the two previous
    epochs, weights constant over an epoch). A Surgeon only sees steps, so the default
    ``window=1`` uses the previous two steps' losses, ``rᵢ = Lᵢ(t−1)/Lᵢ(t−2)`` — the paper's formula
    with ``t`` counting steps; noisier than epoch averages. ``window=steps_per_epoch`` reproduces
    the epoch-level scheme exactly when every epoch has that many steps. A previous average of
    ``0`` gives ``rᵢ = 0`` instead of a division by zero.

    State (per group): the step count, the running sum of the current window and the last two
    window averages (``3T`` numbers).

    Scale: the weights are positive and sum to ``T``, so ``d`` has the scale of ``sum`` (equal to
    it during the first two windows and with one task).

    Cost: ``O(T n)`` per group (one weighted sum).

    Cross-check: against a plain re-implementation of LibMTL's ``DWA`` loop over several windows
    (weights to ``1e-12``), and a Surgeon state-dict round trip mid-run.

    Args:
        temperature: Softmax temperature (``> 0``; 2.0 in the paper and LibMTL).
        window: Steps per averaging window (integer ``≥ 1``; default 1).
    """

    family = "loss"
    cost = "O(T·n)"
    summary = "Weigh tasks by softmax of their recent loss-decrease ratios (Liu et al. 2019)."
    paper = (
        "S. Liu, E. Johns, A. J. Davison, End-to-End Multi-Task Learning with Attention, CVPR 2019. "
        "https://arxiv.org/abs/1803.10704"
    )
    properties = frozenset(
        {Property.SCALE_EQUIVARIANT, Property.ONE_TASK_IDENTITY, Property.ONE_TASK_POSITIVE, Property.IN_ROW_SPAN}
    )
    needs = frozenset({Need.LOSSES, Need.STATE})

    temperature: float
    window: int

    def __init__(self, *, temperature: float = 2.0, window: int = 1) -> None:
        name = type(self).__name__
        positive = is_real(temperature, low=0, open_low=True)
        check_option(positive, name, "temperature", "a finite number > 0", temperature)
        check_option(is_count(window, 1), name, "window", "an integer ≥ 1", window)
        self._set_options(temperature=float(temperature), window=window)

    def init_state(self, tasks: int, *, device: torch.device) -> dict[str, Any]:
        dtype = weight_dtype(device)
        return {
            "steps": 0,
            "window_sum": torch.zeros(tasks, dtype=dtype, device=device),
            "averages": torch.zeros(2, tasks, dtype=dtype, device=device),
        }

    def task_weights(self, grads: Tensor, context: Context) -> TaskWeights:
        losses = self.task_losses(context, grads)
        steps: int = context.state["steps"]
        window_sum: Tensor = context.state["window_sum"]
        averages: Tensor = context.state["averages"]
        if steps // self.window >= 2:
            weights = scaled_softmax(safe_divide(averages[1], averages[0]), self.temperature)
        else:
            weights = torch.ones_like(losses)
        window_sum = window_sum + losses
        if (steps + 1) % self.window == 0:
            averages = torch.stack([averages[1], window_sum / self.window])
            window_sum = torch.zeros_like(window_sum)
        state = {"steps": steps + 1, "window_sum": window_sum, "averages": averages}
        return TaskWeights(weights=weights, state=state)
