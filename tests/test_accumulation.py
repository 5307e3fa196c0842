"""Gradient accumulation: the strategy runs once, on the per-task gradients of the effective batch."""

from __future__ import annotations

import pytest
import torch

import gradsurg as gs
from tests.integrations.toy import (
    STRATEGIES,
    TASKS,
    ToyLoRA,
    assert_grads_close,
    grads_of,
    make_data,
    strategy_spec,
    task_losses,
)

MICRO = 3
SIZE = 4


def one_batch_grads(strategy: str) -> list[torch.Tensor | None]:
    model = ToyLoRA()
    surgeon = gs.Surgeon(model.groups(), strategy_spec(strategy), seed=0)
    x, y = make_data(MICRO * SIZE)
    assert surgeon.backward(task_losses(model, x, y))
    return grads_of(model)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("finish", ["backward", "step"])
def test_micro_batches_equal_one_batch_k_times_as_large(strategy: str, finish: str) -> None:
    model = ToyLoRA()
    surgeon = gs.Surgeon(model.groups(), strategy_spec(strategy), seed=0)
    x, y = make_data(MICRO * SIZE)
    chunks = list(zip(torch.split(x, SIZE), torch.split(y, SIZE)))
    last = len(chunks) if finish == "step" else len(chunks) - 1
    for xb, yb in chunks[:last]:
        assert not surgeon.backward(task_losses(model, xb, yb, scale=1 / MICRO), accumulate=True)
        assert all(p.grad is None for p in model.parameters())  # .grad untouched while accumulating
    assert surgeon.accumulating
    if finish == "step":
        assert surgeon.step()
    else:
        xb, yb = chunks[-1]
        assert surgeon.backward(task_losses(model, xb, yb, scale=1 / MICRO))
    assert not surgeon.accumulating
    assert surgeon.steps == 1
    assert_grads_close(grads_of(model), one_batch_grads(strategy))


def test_surgery_on_the_effective_batch_differs_from_surgery_per_micro_batch() -> None:
    """The test above can fail: PCGrad per micro-batch (summed in .grad) is a different direction."""
    model = ToyLoRA()
    surgeon = gs.Surgeon(model.groups(), "pcgrad", seed=0)
    x, y = make_data(MICRO * SIZE)
    for xb, yb in zip(torch.split(x, SIZE), torch.split(y, SIZE)):
        surgeon.backward(task_losses(model, xb, yb, scale=1 / MICRO))  # writes .grad every time
    per_micro = grads_of(model)
    with pytest.raises(AssertionError):
        assert_grads_close(per_micro, one_batch_grads("pcgrad"))


def test_a_micro_batch_with_other_tasks_is_refused_and_leaves_the_buffer_as_it_was() -> None:
    model = ToyLoRA()
    surgeon = gs.Surgeon(model.groups(), "pcgrad", seed=0)
    x, y = make_data(2 * SIZE)
    (x0, x1), (y0, y1) = torch.split(x, SIZE), torch.split(y, SIZE)
    surgeon.backward(task_losses(model, x0, y0, scale=0.5), accumulate=True)
    wrong = task_losses(model, x1, y1, scale=0.5)
    with pytest.raises(gs.InvalidLossError, match="same tasks"):
        surgeon.backward({"a": wrong["a"]}, accumulate=True)
    with pytest.raises(gs.InvalidLossError, match="same tasks"):
        surgeon.backward(dict(reversed(wrong.items())))
    assert all(p.grad is None for p in model.parameters())
    surgeon.backward(task_losses(model, x1, y1, scale=0.5))
    reference = ToyLoRA()
    gs.Surgeon(reference.groups(), "pcgrad", seed=0).backward(task_losses(reference, x, y))
    assert_grads_close(grads_of(model), grads_of(reference))


def test_a_failed_step_leaves_grad_buffer_and_state_as_they_were() -> None:
    model = ToyLoRA()
    surgeon = gs.Surgeon(model.groups(), "pcgrad", seed=0)
    x, y = make_data(2 * SIZE)
    (x0, x1), (y0, y1) = torch.split(x, SIZE), torch.split(y, SIZE)
    surgeon.backward(task_losses(model, x0, y0, scale=0.5), accumulate=True)
    generator = surgeon.state_dict()["generator"]
    bad = task_losses(model, x1, y1, scale=0.5)
    with pytest.raises(gs.NonFiniteGradientError):
        surgeon.backward({"a": bad["a"], "b": bad["b"] * float("nan")})
    assert all(p.grad is None for p in model.parameters())
    assert surgeon.steps == 0 and surgeon.accumulating
    assert torch.equal(surgeon.state_dict()["generator"], generator)
    surgeon.backward(task_losses(model, x1, y1, scale=0.5))
    reference = ToyLoRA()
    gs.Surgeon(reference.groups(), "pcgrad", seed=0).backward(task_losses(reference, x, y))
    assert_grads_close(grads_of(model), grads_of(reference))


def test_step_without_accumulated_micro_batches_is_refused() -> None:
    surgeon = gs.Surgeon(ToyLoRA().groups(), "sum", seed=0)
    with pytest.raises(gs.MissingUpdateError, match="accumulated"):
        surgeon.step()


def test_parameters_reached_in_only_some_micro_batches_get_the_sum() -> None:
    """A head reached in one micro-batch only: its per-task gradient counts as zero elsewhere."""
    model = ToyLoRA()
    surgeon = gs.Surgeon(gs.groups.whole(model), "sum", seed=0)
    x, y = make_data(2 * SIZE)
    (x0, x1), (y0, y1) = torch.split(x, SIZE), torch.split(y, SIZE)
    first = task_losses(model, x0, y0)
    surgeon.backward(first, accumulate=True)
    hidden = torch.tanh(model.base(x1))  # a second micro-batch that does not reach the LoRA factors
    second = {t: ((model.heads[i](hidden).squeeze(-1) - y1[:, i]) ** 2).mean() for i, t in enumerate(TASKS)}
    surgeon.backward(second)
    reference = ToyLoRA()
    first_ref = task_losses(reference, x0, y0)
    hidden_ref = torch.tanh(reference.base(x1))
    second_ref = [((reference.heads[i](hidden_ref).squeeze(-1) - y1[:, i]) ** 2).mean() for i in range(len(TASKS))]
    torch.stack([*first_ref.values(), *second_ref]).sum().backward()
    assert_grads_close(grads_of(model), grads_of(reference))


def test_segment_engine_micro_batches_equal_one_batch() -> None:
    """The segment engine only gives task-summed gradients outside the groups: they accumulate too."""

    def run(chunks: int) -> list[torch.Tensor | None]:
        model = ToyLoRA()
        base = gs.groups.whole(model.base, name="base", label="dense")
        surgeon = gs.Surgeon(base, "pcgrad", seed=0, model=model, engine="segment")
        x, y = make_data(MICRO * SIZE)
        ids = torch.arange(len(x)) % len(TASKS)  # sample n belongs to task n mod T
        for index, (xb, yb, tb) in enumerate(zip(*(torch.split(t, len(x) // chunks) for t in (x, y, ids)))):
            out = model(xb)
            losses = {
                task: ((out[tb == t, t] - yb[tb == t, t]) ** 2).sum() / (ids == t).sum() for t, task in enumerate(TASKS)
            }
            surgeon.backward(losses, task_ids=tb, accumulate=index < chunks - 1)
        return grads_of(model)

    assert_grads_close(run(MICRO), run(1))
