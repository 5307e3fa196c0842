"""Batched combine: groups sharing a strategy and a shape go through one bmm, with the same result."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradsurg as gs
from gradsurg.diagnostics.stats import group_stats, split_stats


def _model() -> tuple[nn.ModuleList, nn.ModuleList, torch.Tensor]:
    torch.manual_seed(0)
    layers = nn.ModuleList([nn.Linear(5, 5, bias=False) for _ in range(4)])
    heads = nn.ModuleList([nn.Linear(5, 1) for _ in range(3)])
    return layers, heads, torch.randn(8, 5)


def _losses(layers: nn.ModuleList, heads: nn.ModuleList, x: torch.Tensor) -> list[torch.Tensor]:
    h = x
    for layer in layers:
        h = torch.tanh(layer(h))
    return [heads[0](h).mean(), -2 * heads[1](h).mean(), (heads[2](h) - 1).pow(2).mean()]


@pytest.mark.parametrize(
    "strategy",
    [
        gs.get_strategy("pcgrad"),
        gs.get_strategy("pcgrad", reference="sequential"),
        gs.get_strategy("cagrad", rescale=2),
        gs.get_strategy("ortho_lora"),
        gs.get_strategy("ortho_lora", reference="sequential"),
    ],
    ids=repr,
)
def test_batched_and_looped_groups_give_the_same_gradients(strategy: gs.Strategy) -> None:
    layers, heads, x = _model()
    results = []
    for batch_groups in (True, False):
        groups = [gs.ParamGroup(name=f"l{i}", label="lora_A", params=(m.weight,)) for i, m in enumerate(layers)]
        surgeon = gs.Surgeon(groups, strategy, seed=3, batch_groups=batch_groups)
        layers.zero_grad(set_to_none=True)
        for _ in range(3):
            surgeon.backward(_losses(layers, heads, x))
        stats = surgeon.last_stats
        assert stats is not None
        results.append((torch.cat([m.weight.grad.reshape(-1) for m in layers]), stats))  # type: ignore[union-attr]
    (batched, batched_stats), (looped, looped_stats) = results
    torch.testing.assert_close(batched, looped, rtol=1e-5, atol=1e-7)
    for name, batched_group in batched_stats.groups.items():
        looped_group = looped_stats.groups[name]
        torch.testing.assert_close(batched_group.cosine, looped_group.cosine)
        torch.testing.assert_close(batched_group.direction_cosine, looped_group.direction_cosine, atol=1e-6, rtol=1e-5)


def test_batched_statistics_split_per_group() -> None:
    generator = torch.Generator().manual_seed(0)
    grads = torch.randn(3, 2, 7, generator=generator, dtype=torch.float64)
    weights = torch.rand(3, 2, generator=generator, dtype=torch.float64)
    gram = grads @ grads.transpose(-1, -2)
    split = split_stats(group_stats(gram, weights=weights))
    for b in range(3):
        single = group_stats(gram[b], weights=weights[b])
        torch.testing.assert_close(split[b].cosine, single.cosine)
        torch.testing.assert_close(split[b].direction_cosine, single.direction_cosine)
        torch.testing.assert_close(split[b].change, single.change)
        assert int(split[b].conflicts) == int(single.conflicts)
