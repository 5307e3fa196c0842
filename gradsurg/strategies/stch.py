"""``stch``: Smooth Tchebycheff scalarization (Lin et al., ICML 2024)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

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

__all__ = ["STCH"]

_EPS = 1e-20  # the constant of the official MTL code and LibMTL inside the logarithms


@register_strategy("stch", aliases=("smooth_tchebycheff",))
class STCH(LossWeighting):
    r"""Smooth Tchebycheff scalarization of the log-losses normalised by a nadir point.

    The paper's smooth Tchebycheff scalarization of objectives ``fᵢ`` with ideal point ``z*`` is
    ``g_μ = μ log Σᵢ exp(λᵢ (fᵢ − zᵢ*) / μ)``, a smooth maximum whose gradient weighs each
    objective by ``softmax(λ(f − z*)/μ)ᵢ λᵢ``. For multi-task learning the authors' code (followed
    by LibMTL ``STCH``) uses ``fᵢ = log(Lᵢ / nᵢ + 10⁻²⁰)`` with a nadir vector ``n``, ``z* = 0``,
    ``λ = 1``, multiplied by ``T``; by the chain rule the direction is ``d = Σᵢ wᵢ gᵢ`` with

    ``wᵢ = T · softmax(f / μ)ᵢ / (Lᵢ + 10⁻²⁰ nᵢ)``.

    Nadir vector: the first ``warmup_steps`` steps and the next ``nadir_steps`` steps optimise
    ``Σᵢ log(Lᵢ + 10⁻²⁰)`` (``wᵢ = 1/(Lᵢ + 10⁻²⁰)``); ``n`` is the average loss over the
    ``nadir_steps`` steps, and the smooth Tchebycheff weights apply from then on. LibMTL counts
    epochs (``STCH_warmup_epoch = 4``: four epochs of log-losses, then one averaging epoch);
    ``warmup_steps = 4 · steps_per_epoch`` and ``nadir_steps = steps_per_epoch`` reproduce it.
    A zero nadir entry is raised to the dtype's ``eps`` to keep the logarithm finite.

    Paper: X. Lin, X. Zhang, Z. Yang, F. Liu, Z. Wang, Q. Zhang, "Smooth Tchebycheff Scalarization for
    Multi-Objective Optimization", ICML 2024, https://arxiv.org/abs/2402.19078 (official code
    ``Xi-L/STCH``, ``STCH_MTL``).

    Scale: the weights of the log-loss gradients ``gᵢ/Lᵢ`` sum to ``T`` — the scale of the sum of
    log-loss gradients, independent of the losses' units (during warm-up exactly that sum).

    Cost: ``O(T n)`` per group; state ``2T`` numbers and a step count.

    Cross-check: several steps through warm-up, averaging and the Tchebycheff phase against a plain
    re-implementation of LibMTL's ``STCH`` loop (weights to ``1e-12`` relative).

    Args:
        mu: Smoothing ``μ`` (``> 0``; LibMTL ``STCH_mu`` default 1.0). Small ``μ`` approaches the
            plain Tchebycheff (max) scalarization.
        warmup_steps: Log-loss steps before the nadir averaging starts (integer ``≥ 0``; default 0).
        nadir_steps: Steps whose average loss is the nadir vector (integer ``≥ 1``; default 100).
    """

    family = "loss"
    cost = "O(T·n)"
    summary = "Smooth Tchebycheff (soft-max) scalarization of nadir-normalised log-losses (Lin et al. 2024)."
    paper = (
        "X. Lin et al., Smooth Tchebycheff Scalarization for Multi-Objective Optimization, ICML 2024. "
        "https://arxiv.org/abs/2402.19078"
    )
    properties = frozenset({Property.SCALE_EQUIVARIANT, Property.ONE_TASK_POSITIVE, Property.IN_ROW_SPAN})
    needs = frozenset({Need.LOSSES, Need.STATE})

    mu: float
    warmup_steps: int
    nadir_steps: int

    def __init__(self, *, mu: float = 1.0, warmup_steps: int = 0, nadir_steps: int = 100) -> None:
        name = type(self).__name__
        check_option(is_real(mu, low=0, open_low=True), name, "mu", "a finite number > 0", mu)
        check_option(is_count(warmup_steps, 0), name, "warmup_steps", "an integer ≥ 0", warmup_steps)
        check_option(is_count(nadir_steps, 1), name, "nadir_steps", "an integer ≥ 1", nadir_steps)
        self._set_options(mu=float(mu), warmup_steps=warmup_steps, nadir_steps=nadir_steps)

    def init_state(self, tasks: int, *, device: torch.device) -> dict[str, Any]:
        return {"steps": 0, "loss_sum": torch.zeros(tasks, dtype=weight_dtype(device), device=device)}

    def task_weights(self, grads: Tensor, context: Context) -> TaskWeights:
        losses = self.task_losses(context, grads, nonnegative=True)
        steps: int = context.state["steps"]
        loss_sum: Tensor = context.state["loss_sum"]
        state = {"steps": steps + 1, "loss_sum": loss_sum}
        if steps < self.warmup_steps + self.nadir_steps:
            if steps >= self.warmup_steps:
                state["loss_sum"] = loss_sum + losses
            return TaskWeights(weights=1.0 / (losses + _EPS), state=state)
        nadir = (loss_sum / self.nadir_steps).clamp_min(torch.finfo(loss_sum.dtype).eps)
        objectives = torch.log(losses / nadir + _EPS)
        weights = scaled_softmax(objectives, self.mu) / (losses + _EPS * nadir)
        return TaskWeights(weights=weights, state=state)
