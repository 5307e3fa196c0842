"""Shared test configuration: hypothesis profiles and a small multi-task model.

Hypothesis profiles (select with ``HYPOTHESIS_PROFILE=<name>``):

* ``default`` — 50 examples per property, no per-example deadline (CPU timing varies);
* ``ci`` — the same, derandomized, so a CI run is reproducible;
* ``thorough`` — 1000 examples, for a local deep run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from hypothesis import settings
from torch import Tensor, nn

settings.register_profile("default", max_examples=50, deadline=None)
settings.register_profile("ci", max_examples=50, deadline=None, derandomize=True)
settings.register_profile("thorough", max_examples=1000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models: one intra-op thread avoids thread hand-offs that cost more than the work (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class MultiTaskNet:
    """A shared trunk, one linear head per task and a module no task uses, with fixed data."""

    trunk: nn.Sequential
    heads: nn.ModuleList
    unused: nn.Linear
    inputs: Tensor
    targets: Tensor

    @property
    def tasks(self) -> int:
        return len(self.heads)

    def all_parameters(self) -> list[nn.Parameter]:
        return [*self.trunk.parameters(), *self.heads.parameters(), *self.unused.parameters()]

    def losses(self, batches: list[Tensor] | None = None) -> list[Tensor]:
        """One scalar loss per task: one shared trunk forward over ``inputs`` (``batches=None``), or
        one separate forward per task over ``batches[t]`` (separate graphs)."""
        shared = self.trunk(self.inputs) if batches is None else None
        out = []
        for t, head in enumerate(self.heads):
            features = shared if batches is None else self.trunk(batches[t])
            assert features is not None
            out.append((head(features).squeeze(1) - self.targets[: features.shape[0], t]).pow(2).mean())
        return out

    def grads(self) -> list[Tensor | None]:
        return [None if p.grad is None else p.grad.clone() for p in self.all_parameters()]

    def zero_grad(self) -> None:
        for p in self.all_parameters():
            p.grad = None


def make_net(tasks: int = 3, seed: int = 0) -> MultiTaskNet:
    """A deterministic :class:`MultiTaskNet` (same seed, same weights and data)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        trunk = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5))
        heads = nn.ModuleList(nn.Linear(5, 1) for _ in range(tasks))
        unused = nn.Linear(2, 2)
    inputs = torch.randn(8, 4, generator=generator)
    # Opposite-signed targets make the tasks pull the trunk in conflicting directions.
    targets = torch.randn(8, tasks, generator=generator) * torch.tensor([(-1.0) ** t * 3 for t in range(tasks)])
    return MultiTaskNet(trunk, heads, unused, inputs, targets)


@pytest.fixture
def net() -> MultiTaskNet:
    return make_net()
