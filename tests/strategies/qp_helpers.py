"""Helpers shared by the tests of the Gram/QP family (mgda, upgrad, dualproj, imtl_g, aligned_mtl, config)."""

from __future__ import annotations

import pytest
import torch

import gradsurg as gs
from gradsurg.strategies.base import Context, GramStrategy
from tests.hyp import seeded

# (tasks, width) pairs with tasks ≤ width: generic inputs are then linearly independent.
FULL_RANK_SHAPES = [(1, 3), (2, 2), (2, 7), (3, 5), (4, 4), (5, 9), (6, 12)]


def full_rank(seed: int, tasks: int, width: int) -> torch.Tensor:
    """A float64 ``[tasks, width]`` matrix with rows of varied norms (linearly independent if tasks ≤ width)."""
    generator = seeded(seed)
    rows = torch.randn(tasks, width, generator=generator, dtype=torch.float64)
    return rows * (0.1 + 3 * torch.rand(tasks, 1, generator=generator, dtype=torch.float64))


def relative_error(actual: torch.Tensor, expected: torch.Tensor, grads: torch.Tensor) -> float:
    """``‖actual − expected‖∞ / Σᵢ‖gᵢ‖``."""
    return float((actual.double() - expected.double()).abs().max() / grads.double().norm(dim=1).sum())


def assert_batched_weights_match(strategy: GramStrategy, seed: int = 0) -> None:
    """Weights of a batch of Gram matrices equal the weights of each matrix alone (``batched = True``)."""
    assert strategy.batched
    grams = torch.stack([(g @ g.T) for g in (full_rank(seed + i, 4, 3 + i) for i in range(3))])
    batched = strategy.weights(grams, Context(losses=torch.ones(4, dtype=torch.float64)))
    for index, gram in enumerate(grams):
        alone = strategy.weights(gram, Context(losses=torch.ones(4, dtype=torch.float64)))
        torch.testing.assert_close(batched[index], alone, rtol=1e-9, atol=1e-12)


def assert_invalid(name: str, **options: object) -> None:
    """Building strategy ``name`` with ``options`` raises InvalidOptionError naming the option."""
    with pytest.raises(gs.InvalidOptionError, match=f"`{next(iter(options))}`"):
        gs.get_strategy(name, **options)


def _surgeon_gradients(strategy: gs.Strategy, *, batch_groups: bool) -> list[torch.Tensor]:
    generator = seeded(0)
    layers = [torch.nn.Parameter(torch.randn(4, 4, generator=generator, dtype=torch.float64)) for _ in range(3)]
    x = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    groups = [group for i, layer in enumerate(layers) for group in gs.groups.whole([layer], name=f"layer{i}")]
    surgeon = gs.Surgeon(groups, strategy, seed=0, batch_groups=batch_groups)
    h = x
    for layer in layers:
        h = torch.tanh(h @ layer)
    surgeon.backward([h[:, 0].mean(), -2 * h[:, 1].mean(), (h[:, 2] - 1).pow(2).mean()])
    return [layer.grad.clone() for layer in layers if layer.grad is not None]


def assert_surgeon_batched_equals_looped(strategy: gs.Strategy) -> None:
    """Through a Surgeon, groups combined in one batch get the same update as one group at a time."""
    batched = _surgeon_gradients(strategy, batch_groups=True)
    looped = _surgeon_gradients(strategy, batch_groups=False)
    assert len(batched) == len(looped) == 3
    for a, b in zip(batched, looped):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
