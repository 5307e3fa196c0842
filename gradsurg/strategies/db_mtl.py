"""``db_mtl``: Dual-Balancing Multi-Task Learning (Lin et al., 2023)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gradsurg._math import safe_divide
from gradsurg.errors import InvalidStateError
from gradsurg.strategies.base import Context, Need, check_option
from gradsurg.strategies.loss_weighting import LossWeighting, TaskWeights, is_real
from gradsurg.strategies.registry import register_strategy

__all__ = ["DBMTL"]

_EPS = 1e-8  # LibMTL's constant in log(L + 1e-8)


@register_strategy("db_mtl", aliases=("dbmtl", "dual_balancing"))
class DBMTL(LossWeighting):
    r"""Dual-Balancing MTL: log-transform the losses, then give every task's (EMA) gradient the largest norm.

    Loss-scale balancing: the task gradients are those of ``log(Lᵢ + 10⁻⁸)``,
    ``g̃ᵢ = gᵢ / (Lᵢ + 10⁻⁸)``. Gradient-magnitude balancing: an exponential moving average
    ``ĝ ∈ ℝ^{T×n}`` (state, starts at 0) with step-dependent factor ``βₜ = β / t^σ`` (``t = 1, 2, ...``),

    ``ĝᵢ ← g̃ᵢ + βₜ (ĝᵢ − g̃ᵢ)``,  ``αᵢ = maxⱼ ‖ĝⱼ‖ / ‖ĝᵢ‖``,  ``d = Σᵢ αᵢ ĝᵢ``.

    Paper: B. Lin, W. Jiang, F. Ye, Y. Zhang, P. Chen, Y.-C. Chen, S. Liu, J. T. Kwok, "Dual-Balancing
    for Multi-Task Learning", 2023, https://arxiv.org/abs/2308.12029 (LibMTL ``DB_MTL``, the
    authors' code).

    As in LibMTL the EMA starts at zero without bias correction, so the first direction is
    ``(1 − β) Σᵢ αᵢ g̃ᵢ``. LibMTL divides by ``‖ĝᵢ‖ + 10⁻⁸``; here a zero-norm row gets ``αᵢ = 0`` and
    other rows use the exact ratio (the result is then scale equivariant in ``G``).

    Memory: the EMA holds ``T × n`` numbers per group in the gradients' dtype — as much as the
    per-task gradients themselves (e.g. 3 tasks on a LoRA adapter of 4M parameters in float32:
    48 MB). It is checkpointed by ``surgeon.state_dict()``. If a group's size changes between steps
    (a parameter no task reaches), the EMA cannot continue and :class:`~gradsurg.errors.InvalidStateError`
    is raised.

    Scale: every scaled row ``αᵢĝᵢ`` has norm ``maxⱼ‖ĝⱼ‖``, where ``ĝ`` is an average of
    ``gᵢ / Lᵢ`` — the scale of the sum of log-loss gradients, independent of the losses' units.

    Cost: ``O(T n)`` per group (the EMA update, ``T`` norms, one weighted sum).

    Cross-check: several steps against a plain re-implementation of LibMTL's ``DB_MTL`` loop
    (directions to ``1e-10`` relative in float64), with ``beta_sigma`` both 0 and positive.

    Args:
        beta: EMA factor ``β`` (``0 ≤ β < 1``; LibMTL ``DB_beta`` default 0.9).
        beta_sigma: Decay exponent ``σ`` of ``βₜ = β/t^σ`` (``≥ 0``; LibMTL ``DB_beta_sigma`` default 0).
    """

    family = "loss"
    cost = "O(T·n); state T×n per group"
    summary = "Log-transformed losses and max-norm-balanced EMA gradients (Lin et al. 2023)."
    paper = "B. Lin et al., Dual-Balancing for Multi-Task Learning, 2023. https://arxiv.org/abs/2308.12029"
    needs = frozenset({Need.LOSSES, Need.STATE})

    beta: float
    beta_sigma: float

    def __init__(self, *, beta: float = 0.9, beta_sigma: float = 0.0) -> None:
        name = type(self).__name__
        check_option(is_real(beta, low=0) and beta < 1, name, "beta", "a number in [0, 1)", beta)
        check_option(is_real(beta_sigma, low=0), name, "beta_sigma", "a finite number ≥ 0", beta_sigma)
        self._set_options(beta=float(beta), beta_sigma=float(beta_sigma))

    def init_state(self, tasks: int, *, device: torch.device) -> dict[str, Any]:
        return {"steps": 0}  # the EMA buffer is created at the first step, when n is known

    def task_weights(self, grads: Tensor, context: Context) -> TaskWeights:
        losses = self.task_losses(context, grads, nonnegative=True)
        scaled = grads * (1.0 / (losses + _EPS)).to(grads.dtype).unsqueeze(1)
        buffer = context.state.get("buffer")
        if buffer is None:
            buffer = torch.zeros_like(grads)
        elif buffer.shape != grads.shape:
            raise InvalidStateError(
                f"The gradient EMA of DBMTL{context.where} has shape {tuple(buffer.shape)}; the step's gradients "
                f"must have the same shape, found {tuple(grads.shape)} (a parameter of the group was not reached "
                "by any task, or the number of tasks changed)."
            )
        steps = int(context.state["steps"]) + 1
        buffer = scaled + (self.beta / steps**self.beta_sigma) * (buffer - scaled)
        norms = buffer.norm(dim=1).to(losses.dtype)
        alpha = safe_divide(norms.max().expand_as(norms), norms)
        return TaskWeights(weights=alpha, state={"steps": steps, "buffer": buffer}, rows=buffer)
