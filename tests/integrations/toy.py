"""A tiny multi-task model with hand-built LoRA factor groups, shared by the scale-out tests.

``x → tanh(base(x) + x Aᵀ Bᵀ) → one linear head per task``: the LoRA factors ``A`` and ``B`` are
groups labelled ``lora_A`` / ``lora_B`` (so ``ortho_lora`` applies), ``base`` is a third group and
the heads stay outside every group (they get the plain sum of the task gradients).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

import gradsurg as gs

DIM = 6
RANK = 2
TASKS = ("a", "b")
STRATEGIES = ("sum", "pcgrad", "cagrad", "ortho_lora")


class ToyLoRA(nn.Module):
    """The toy model (deterministic initialisation from ``seed``)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.base = nn.Linear(DIM, DIM)
        with torch.no_grad():
            self.base.weight.copy_(torch.randn(DIM, DIM, generator=generator) / DIM**0.5)
            self.base.bias.copy_(torch.randn(DIM, generator=generator) * 0.1)
        self.lora_A = nn.Parameter(torch.randn(RANK, DIM, generator=generator) * 0.5)
        self.lora_B = nn.Parameter(torch.randn(DIM, RANK, generator=generator) * 0.5)
        self.heads = nn.ModuleList(nn.Linear(DIM, 1) for _ in TASKS)
        with torch.no_grad():
            for head in self.heads:
                head.weight.copy_(torch.randn(1, DIM, generator=generator))
                head.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        """``Tensor[N, T]``: every task's prediction for every sample."""
        hidden = torch.tanh(self.base(x) + x @ self.lora_A.T @ self.lora_B.T)
        return torch.cat([head(hidden) for head in self.heads], dim=1)

    def groups(self) -> list[gs.ParamGroup]:
        """Groups ``lora_A``, ``lora_B`` (LoRA factor labels) and ``base``."""
        return [
            gs.ParamGroup("layer.lora_A", "lora_A", (self.lora_A,)),
            gs.ParamGroup("layer.lora_B", "lora_B", (self.lora_B,)),
            gs.ParamGroup("base", "dense", tuple(self.base.parameters())),
        ]


def strategy_spec(name: str) -> str | Mapping[str, str]:
    """``ortho_lora`` on the LoRA factors (PCGrad elsewhere); other strategies on every group."""
    return {"lora_A": name, "lora_B": name, "*": "pcgrad"} if name == "ortho_lora" else name


def make_data(samples: int, seed: int = 1) -> tuple[Tensor, Tensor]:
    """Inputs and conflicting targets (task b's target is roughly minus task a's)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, DIM, generator=generator)
    target = x[:, :1] * 2.0
    y = torch.cat([target, -target + 0.3 * torch.randn(samples, 1, generator=generator)], dim=1)
    return x, y


def task_losses(model: nn.Module, x: Tensor, y: Tensor, scale: float = 1.0) -> dict[str, Tensor]:
    """Mean squared error of each task over the batch, times ``scale``."""
    out = model(x)
    return {task: ((out[:, t] - y[:, t]) ** 2).mean() * scale for t, task in enumerate(TASKS)}


def grads_of(model: nn.Module) -> list[Tensor | None]:
    """A copy of every parameter's ``.grad``."""
    return [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]


def assert_grads_close(actual: list[Tensor | None], expected: list[Tensor | None], tol: float = 1e-6) -> None:
    """Same ``None`` pattern and values within ``tol``."""
    assert [a is None for a in actual] == [e is None for e in expected]
    for a, e in zip(actual, expected):
        if a is not None and e is not None:
            torch.testing.assert_close(a, e, rtol=tol, atol=tol)
