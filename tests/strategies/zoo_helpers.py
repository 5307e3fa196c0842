"""Helpers shared by the tests of the gradvac / nash_mtl / fairgrad / moco / graddrop family."""

from __future__ import annotations

import copy

import torch

import gradsurg as gs
from tests.hyp import seeded


def _losses(model: torch.nn.Module, step: int) -> list[torch.Tensor]:
    data = torch.randn(3, 8, 4, generator=seeded(step), dtype=torch.float64)
    targets = torch.randn(3, 8, generator=seeded(1000 + step), dtype=torch.float64)
    out = [model(data[t])[:, t] for t in range(3)]
    return [((o - y) ** 2).mean() for o, y in zip(out, targets)]


def _fresh(strategy: gs.Strategy) -> tuple[torch.nn.Module, gs.Surgeon, torch.optim.Optimizer]:
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    with torch.no_grad():
        for index, p in enumerate(model.parameters()):
            p.copy_(torch.randn(p.shape, generator=seeded(index), dtype=torch.float64))
    surgeon = gs.Surgeon(gs.groups.per_module(model), strategy, seed=7)
    return model, surgeon, torch.optim.SGD(model.parameters(), lr=0.05)


def _step(
    model: torch.nn.Module, surgeon: gs.Surgeon, optimizer: torch.optim.Optimizer, step: int
) -> list[torch.Tensor]:
    optimizer.zero_grad()
    surgeon.backward(_losses(model, step))
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    optimizer.step()
    return grads


def assert_resumes_identically(strategy: gs.Strategy, *, steps: int = 5, split: int = 2) -> None:
    """A Surgeon checkpoint taken mid-run and loaded into a fresh run continues bit-identically."""
    model, surgeon, optimizer = _fresh(strategy)
    reference = [_step(model, surgeon, optimizer, s) for s in range(steps)]

    model, surgeon, optimizer = _fresh(strategy)
    for s in range(split):
        _step(model, surgeon, optimizer, s)
    saved = copy.deepcopy((model.state_dict(), surgeon.state_dict(), optimizer.state_dict()))
    assert any(saved[1]["state"].values()), "the strategy kept no state to checkpoint"
    model, surgeon, optimizer = _fresh(strategy)
    model.load_state_dict(saved[0])
    surgeon.load_state_dict(saved[1])
    optimizer.load_state_dict(saved[2])
    for s in range(split, steps):
        resumed = _step(model, surgeon, optimizer, s)
        assert all(torch.equal(a, b) for a, b in zip(resumed, reference[s])), f"step {s} differs after resuming"
