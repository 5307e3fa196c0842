"""``rlw``: Random Loss Weighting (Lin et al., TMLR 2022)."""

from __future__ import annotations

import torch
from torch import Tensor

from gradsurg.strategies.base import Context, Property, check_choice
from gradsurg.strategies.loss_weighting import LossWeighting, TaskWeights, weight_dtype
from gradsurg.strategies.registry import register_strategy

__all__ = ["RLW"]

_DISTRIBUTIONS = ("normal", "uniform", "dirichlet", "bernoulli")


@register_strategy("rlw", aliases=("random_loss_weighting", "random_weighting"))
class RLW(LossWeighting):
    r"""Random Loss Weighting: fresh random task weights at every step.

    Each call draws ``λ̃ ∈ ℝᵀ`` from ``distribution`` and returns ``d = Σᵢ wᵢ gᵢ`` with

    * ``"normal"`` (default, the paper's main choice): ``λ̃ ~ N(0, I)``, ``w = softmax(λ̃)``;
    * ``"uniform"``: ``λ̃ ~ U(0, 1)ᵀ``, ``w = softmax(λ̃)``;
    * ``"dirichlet"``: ``λ̃ ~ Dir(1)``, ``w = softmax(λ̃)`` (LibMTL applies the softmax here too);
    * ``"bernoulli"``: ``λ̃ ~ Bernoulli(½)ᵀ`` redrawn until not all zero, ``w = λ̃`` (no softmax).

    Paper: B. Lin, F. Ye, Y. Zhang, I. W. Tsang, "Reasonable Effectiveness of Random Weighting: A
    Litmus Test for Multi-Task Learning", TMLR 2022, https://arxiv.org/abs/2111.10603 (LibMTL ``RLW``).

    Randomness: drawn on the CPU from the caller's generator (the Surgeon's, seeded and
    checkpointed), then moved to the device. The Surgeon gives every group of a step a generator in
    the same state, so all groups of a step share one weight vector, as the paper's single
    weighted loss does. LibMTL samples through ``torch.distributions`` from the global RNG, so its
    draws differ; the same draws give the same weights (tested to ``1e-12``).

    Scale: the softmax weights sum to 1 — the scale of ``mean`` on average (a random convex
    combination); ``"bernoulli"`` sums a random non-empty subset (scale between ``mean`` and ``sum``).

    Cost: ``O(T n)`` per group, plus ``T`` random numbers.

    Args:
        distribution: ``"normal"``, ``"uniform"``, ``"dirichlet"`` or ``"bernoulli"``.
    """

    family = "loss"
    cost = "O(T·n)"
    summary = "Random task weights (softmax of normal samples) at every step (Lin et al. 2022)."
    paper = (
        "B. Lin et al., Reasonable Effectiveness of Random Weighting: A Litmus Test for Multi-Task Learning, "
        "TMLR 2022. https://arxiv.org/abs/2111.10603"
    )
    properties = frozenset(
        {
            Property.SCALE_EQUIVARIANT,
            Property.ONE_TASK_IDENTITY,
            Property.ONE_TASK_POSITIVE,
            Property.IN_ROW_SPAN,
            Property.RANDOMIZED,
        }
    )

    distribution: str

    def __init__(self, *, distribution: str = "normal") -> None:
        check_choice(distribution, _DISTRIBUTIONS, type(self).__name__, "distribution")
        self._set_options(distribution=distribution)

    def sample(self, tasks: int, generator: torch.Generator | None) -> Tensor:
        """Draw one weight vector ``Tensor[T]`` (float64, CPU) from ``generator``."""
        dtype = torch.float64
        if self.distribution == "bernoulli":
            half = torch.full((tasks,), 0.5, dtype=dtype)
            while True:
                draw = torch.bernoulli(half, generator=generator)
                if bool(draw.any()):
                    return draw
        if self.distribution == "normal":
            logits = torch.randn(tasks, dtype=dtype, generator=generator)
        elif self.distribution == "uniform":
            logits = torch.rand(tasks, dtype=dtype, generator=generator)
        else:  # Dir(1): normalised Exp(1) draws
            exponential = torch.empty(tasks, dtype=dtype).exponential_(generator=generator)
            logits = exponential / exponential.sum()
        return torch.softmax(logits, dim=0)

    def task_weights(self, grads: Tensor, context: Context) -> TaskWeights:
        weights = self.sample(grads.shape[0], context.generator).to(dtype=weight_dtype(grads.device))
        return TaskWeights(weights=weights.to(grads.device), state=context.state)
