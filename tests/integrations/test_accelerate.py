"""A model prepared by accelerate.Accelerator (one process, CPU), with gradient accumulation."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import gradsurg as gs
from tests.integrations.toy import STRATEGIES, ToyLoRA, make_data, strategy_spec, task_losses

accelerate = pytest.importorskip("accelerate")

MICRO, SIZE, STEPS = 2, 4, 2


@pytest.fixture
def fresh_state() -> Iterator[None]:
    """accelerate keeps process-wide singletons: start and end every test with fresh ones."""
    from accelerate.state import AcceleratorState, GradientState  # type: ignore[import-untyped]

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def plain_run(strategy: str) -> list[torch.Tensor]:
    """Reference: one surgeon.backward per step on the whole effective batch, no accelerate."""
    model = ToyLoRA()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    surgeon = gs.Surgeon(model.groups(), strategy_spec(strategy), seed=0)
    for step in range(STEPS):
        x, y = make_data(MICRO * SIZE, seed=step)
        optimizer.zero_grad()
        surgeon.backward(task_losses(model, x, y))
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_prepared_model_with_accumulation_equals_the_plain_loop(fresh_state: None, strategy: str) -> None:
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=MICRO)
    toy = ToyLoRA()
    surgeon = gs.Surgeon(toy.groups(), strategy_spec(strategy), seed=0)  # groups of the unwrapped model
    model, optimizer = accelerator.prepare(toy, torch.optim.SGD(toy.parameters(), lr=0.1))
    for step in range(STEPS):
        x, y = make_data(MICRO * SIZE, seed=step)
        for xb, yb in zip(torch.split(x, SIZE), torch.split(y, SIZE)):
            with accelerator.accumulate(model):
                losses = task_losses(model, xb, yb, scale=1 / MICRO)  # accelerator.backward would divide
                surgeon.backward(losses, accumulate=not accelerator.sync_gradients)
                optimizer.step()  # a no-op until the last micro-batch
                optimizer.zero_grad()
    assert surgeon.steps == STEPS
    for actual, expected in zip(accelerator.unwrap_model(model).parameters(), plain_run(strategy)):
        torch.testing.assert_close(actual.detach(), expected, rtol=1e-6, atol=1e-6)
