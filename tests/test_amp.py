"""Mixed precision: GradScaler (float16 autocast) and bfloat16 parameters."""

from __future__ import annotations

import pytest
import torch

import gradsurg as gs
from tests.integrations.toy import (
    ToyLoRA,
    assert_grads_close,
    grads_of,
    make_data,
    strategy_spec,
    task_losses,
)


def fp16_losses(model: ToyLoRA, x: torch.Tensor, y: torch.Tensor, scale: float = 1.0) -> dict[str, torch.Tensor]:
    with torch.autocast("cpu", dtype=torch.float16):
        return task_losses(model, x, y, scale)


def scaler(init_scale: float = 2.0**10) -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cpu", init_scale=init_scale)


@pytest.mark.parametrize("strategy", ["sum", "pcgrad", "cagrad", "ortho_lora"])
def test_scaled_step_writes_the_unscaled_direction_and_the_optimizer_steps_once(strategy: str) -> None:
    x, y = make_data(8)
    plain = ToyLoRA()
    gs.Surgeon(plain.groups(), strategy_spec(strategy), seed=0).backward(fp16_losses(plain, x, y))
    model = ToyLoRA()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    amp = scaler()
    surgeon = gs.Surgeon(model.groups(), strategy_spec(strategy), seed=0)
    assert surgeon.backward(fp16_losses(model, x, y), scaler=amp, optimizer=optimizer)
    written = grads_of(model)
    assert_grads_close(written, grads_of(plain), tol=1e-5)
    before = [p.detach().clone() for p in model.parameters()]
    amp.step(optimizer)  # must not divide by the scale a second time
    amp.update()
    for p, p0, g in zip(model.parameters(), before, written):
        assert g is not None
        torch.testing.assert_close(p.detach(), p0 - 0.1 * g)
    assert amp.get_scale() == 2.0**10  # no overflow: the scale did not back off


def test_an_overflow_skips_the_step_and_lowers_the_scale() -> None:
    model = ToyLoRA()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    amp = scaler(init_scale=2.0**127)  # float32 overflows: s · L > 3.4e38
    surgeon = gs.Surgeon(model.groups(), "pcgrad", seed=0)
    generator = surgeon.state_dict()["generator"]
    before = [p.detach().clone() for p in model.parameters()]
    x, y = make_data(8)
    assert not surgeon.backward(task_losses(model, x, y), scaler=amp, optimizer=optimizer)
    assert all(p.grad is None for p in model.parameters())
    assert surgeon.steps == 0 and surgeon.last_stats is None
    assert torch.equal(surgeon.state_dict()["generator"], generator)
    amp.step(optimizer)
    amp.update()
    assert all(torch.equal(p, p0) for p, p0 in zip(model.parameters(), before))
    assert amp.get_scale() == 2.0**126
    amp = scaler()  # a sane scale: the next step goes through
    assert surgeon.backward(task_losses(model, x, y), scaler=amp, optimizer=optimizer)
    assert surgeon.steps == 1


def test_accumulated_micro_batches_with_a_scaler() -> None:
    x, y = make_data(8)
    plain = ToyLoRA()
    gs.Surgeon(plain.groups(), "pcgrad", seed=0).backward(task_losses(plain, x, y))
    model = ToyLoRA()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    amp = scaler()
    surgeon = gs.Surgeon(model.groups(), "pcgrad", seed=0)
    for xb, yb in zip(torch.split(x, 4), torch.split(y, 4)):
        surgeon.backward(task_losses(model, xb, yb, scale=0.5), scaler=amp, accumulate=True)
    with pytest.raises(gs.InvalidOptionError, match="used a GradScaler"):
        surgeon.step()  # the scaler would never learn about this step
    assert surgeon.accumulating and all(p.grad is None for p in model.parameters())
    assert surgeon.step(scaler=amp, optimizer=optimizer)
    assert_grads_close(grads_of(model), grads_of(plain), tol=1e-6)


def test_scaler_misuse_is_refused_with_a_clear_error() -> None:
    model = ToyLoRA()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    surgeon = gs.Surgeon(model.groups(), "sum", seed=0)
    x, y = make_data(4)
    with pytest.raises(gs.InvalidOptionError, match="optimizer="):
        surgeon.backward(task_losses(model, x, y), scaler=scaler())
    with pytest.raises(gs.InvalidOptionError, match="GradScaler"):
        surgeon.backward(task_losses(model, x, y), scaler=object())  # type: ignore[arg-type]
    amp = scaler()
    amp.scale(torch.ones(()))
    amp.unscale_(optimizer)  # unscaled already: the Surgeon's gradients would be unscaled twice
    with pytest.raises(gs.InvalidStateError, match="unscale"):
        surgeon.backward(task_losses(model, x, y), scaler=amp, optimizer=optimizer)
    assert all(p.grad is None for p in model.parameters())


def test_a_disabled_scaler_is_a_plain_step() -> None:
    x, y = make_data(4)
    plain = ToyLoRA()
    gs.Surgeon(plain.groups(), "cagrad", seed=0).backward(task_losses(plain, x, y))
    model = ToyLoRA()
    surgeon = gs.Surgeon(model.groups(), "cagrad", seed=0)
    off = torch.amp.GradScaler("cpu", enabled=False)
    assert surgeon.backward(task_losses(model, x, y), scaler=off)
    assert_grads_close(grads_of(model), grads_of(plain), tol=0.0)


def test_bfloat16_parameters_are_combined_in_float32() -> None:
    model = ToyLoRA().to(torch.bfloat16)
    x, y = make_data(8)
    losses = task_losses(model, x.to(torch.bfloat16), y.to(torch.bfloat16))
    params = list(model.parameters())
    rows = [torch.autograd.grad(loss, params, retain_graph=True) for loss in losses.values()]
    matrix = torch.stack([torch.cat([g.float().reshape(-1) for g in row]) for row in rows])
    expected = gs.get_strategy("cagrad")(matrix)
    gs.Surgeon(gs.groups.whole(model), "cagrad", seed=0).backward(losses)
    written = torch.cat([p.grad.reshape(-1) for p in params if p.grad is not None])
    assert written.dtype == torch.bfloat16
    torch.testing.assert_close(written, expected.to(torch.bfloat16), rtol=0, atol=0)
