"""The Surgeon on a real nn.Module: a shared trunk, one head per task, and a module no task uses."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import gradsurg as gs
from gradsurg.strategies import PCGrad
from tests.conftest import MultiTaskNet, make_net

GroupsOf = Callable[[MultiTaskNet], list[gs.ParamGroup]]
GROUPINGS: dict[str, GroupsOf] = {
    "whole-trunk": lambda net: gs.groups.whole(net.trunk),
    "per-module-trunk": lambda net: gs.groups.per_module(net.trunk),
    "whole-model": lambda net: gs.groups.whole([*net.trunk.parameters(), *net.heads.parameters()]),
    "first-layer-only": lambda net: gs.groups.whole(net.trunk[0]),
}


def backward_grads(
    net: MultiTaskNet, reduce: Callable[[list[Tensor]], Tensor], **kwargs: object
) -> list[Tensor | None]:
    """``.grad`` of every parameter after the plain ``reduce(losses).backward()``."""
    net.zero_grad()
    reduce(net.losses(**kwargs)).backward()  # type: ignore[arg-type]
    grads = net.grads()
    net.zero_grad()
    return grads


def surgeon_grads(net: MultiTaskNet, surgeon: gs.Surgeon, **kwargs: object) -> list[Tensor | None]:
    net.zero_grad()
    surgeon.backward(net.losses(**kwargs))  # type: ignore[arg-type]
    grads = net.grads()
    net.zero_grad()
    return grads


def assert_grads_close(actual: list[Tensor | None], expected: list[Tensor | None], tol: float = 1e-6) -> None:
    assert [a is None for a in actual] == [e is None for e in expected]
    for a, e in zip(actual, expected):
        if a is not None and e is not None:
            torch.testing.assert_close(a, e, rtol=tol, atol=tol)


def total(losses: list[Tensor]) -> Tensor:
    return torch.stack(losses).sum()


def average(losses: list[Tensor]) -> Tensor:
    return torch.stack(losses).mean()


# ---------------------------------------------------------------------------------- sum and mean
@pytest.mark.parametrize("grouping", GROUPINGS)
def test_sum_reproduces_backward_of_the_summed_losses(net: MultiTaskNet, grouping: str) -> None:
    surgeon = gs.Surgeon(GROUPINGS[grouping](net), "sum", seed=0)
    assert_grads_close(surgeon_grads(net, surgeon), backward_grads(net, total))
    assert net.unused.weight.grad is None


def test_mean_equals_the_mean_on_groups_and_the_sum_elsewhere(net: MultiTaskNet) -> None:
    """Inside groups ``mean`` is (Σ losses / T).backward(); heads outside every group get the plain sum."""
    surgeon = gs.Surgeon(gs.groups.whole(net.trunk), "mean", seed=0)
    actual = surgeon_grads(net, surgeon)
    trunk = len(list(net.trunk.parameters()))
    heads = trunk + len(list(net.heads.parameters()))
    assert_grads_close(actual[:trunk], backward_grads(net, average)[:trunk])
    assert_grads_close(actual[trunk:heads], backward_grads(net, total)[trunk:heads])


def test_separate_forward_graphs_per_task(net: MultiTaskNet) -> None:
    """Each task's loss from its own forward over its own batch: still sum(losses).backward()."""
    batches = [torch.randn(5, 4, generator=torch.Generator().manual_seed(t)) for t in range(net.tasks)]
    surgeon = gs.Surgeon(gs.groups.per_module(net.trunk), "sum", seed=0)
    assert_grads_close(surgeon_grads(net, surgeon, batches=batches), backward_grads(net, total, batches=batches))


def test_shared_and_separate_graphs_give_the_same_step(net: MultiTaskNet) -> None:
    shared = surgeon_grads(net, gs.Surgeon(gs.groups.whole(net.trunk), "pcgrad", seed=3))
    separate = surgeon_grads(net, gs.Surgeon(gs.groups.whole(net.trunk), "pcgrad", seed=3), batches=[net.inputs] * 3)
    assert_grads_close(separate, shared)


# ---------------------------------------------------------------------------------- outside groups, unreached, adding
def test_parameters_outside_every_group_get_the_plain_sum(net: MultiTaskNet) -> None:
    """With PCGrad on the first layer only, the rest of the trunk and the heads get Σ of the task gradients."""
    surgeon = gs.Surgeon(gs.groups.whole(net.trunk[0]), "pcgrad", seed=0)
    actual = surgeon_grads(net, surgeon)
    expected = backward_grads(net, total)
    first = len(list(net.trunk[0].parameters()))
    assert_grads_close(actual[first:], expected[first:])
    assert not torch.allclose(actual[0], expected[0])  # the tasks conflict: PCGrad did change the first layer


def test_a_parameter_no_task_reaches_keeps_grad_none(net: MultiTaskNet) -> None:
    """Whether it is inside a group (with reached parameters) or outside every group."""
    inside = gs.groups.whole([*net.trunk.parameters(), *net.unused.parameters()])
    for groups in (inside, gs.groups.whole(net.trunk)):
        net.zero_grad()
        gs.Surgeon(groups, "pcgrad", seed=0).backward(net.losses())
        assert net.unused.weight.grad is None
        assert net.unused.bias.grad is None
        assert all(p.grad is not None for p in net.trunk.parameters())


def test_a_group_no_task_reaches_is_skipped(net: MultiTaskNet) -> None:
    groups = [*gs.groups.whole(net.trunk, name="trunk"), *gs.groups.whole(net.unused, name="unused")]
    surgeon = gs.Surgeon(groups, "pcgrad", seed=0)
    assert_grads_close(surgeon_grads(net, surgeon)[-2:], [None, None])


def test_backward_adds_to_existing_grad_like_backward(net: MultiTaskNet) -> None:
    surgeon = gs.Surgeon(gs.groups.per_module(net.trunk), "pcgrad", seed=0)
    once = surgeon_grads(net, surgeon)
    for p in net.all_parameters():
        p.grad = torch.ones_like(p)
    gs.Surgeon(gs.groups.per_module(net.trunk), "pcgrad", seed=0).backward(net.losses())
    expected = [None if g is None else g + 1 for g in once]
    expected = [torch.ones_like(p) if g is None else g for p, g in zip(net.all_parameters(), expected)]
    assert_grads_close(net.grads(), expected)


def test_two_backward_calls_accumulate(net: MultiTaskNet) -> None:
    surgeon = gs.Surgeon(gs.groups.whole(net.trunk), "sum", seed=0)
    net.zero_grad()
    surgeon.backward(net.losses())
    surgeon.backward(net.losses())
    twice = [None if g is None else g / 2 for g in net.grads()]
    assert_grads_close(twice, backward_grads(net, total))
    assert surgeon.steps == 2


# ---------------------------------------------------------------------------------- inputs
def test_dict_and_list_losses_give_the_same_step(net: MultiTaskNet) -> None:
    as_list = surgeon_grads(net, gs.Surgeon(gs.groups.whole(net.trunk), "pcgrad", seed=5))
    net.zero_grad()
    gs.Surgeon(gs.groups.whole(net.trunk), "pcgrad", seed=5).backward(dict(zip("abc", net.losses())))
    assert_grads_close(net.grads(), as_list, tol=0.0)


def test_a_single_group_is_accepted(net: MultiTaskNet) -> None:
    (group,) = gs.groups.whole(net.trunk)
    surgeon = gs.Surgeon(group, "sum", seed=0)
    assert surgeon.groups == (group,)
    assert_grads_close(surgeon_grads(net, surgeon), backward_grads(net, total))


# ---------------------------------------------------------------------------------- reproducibility
def train(net: MultiTaskNet, surgeon: gs.Surgeon, optimizer: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        surgeon.backward(net.losses())
        optimizer.step()


def trained(seed: int, steps: int = 4) -> list[Tensor]:
    net = make_net()
    surgeon = gs.Surgeon(gs.groups.per_module(net.trunk), "pcgrad", seed=seed)
    train(net, surgeon, torch.optim.SGD(net.all_parameters(), lr=0.1), steps)
    return [p.detach().clone() for p in net.all_parameters()]


def test_same_seed_is_bit_identical_and_the_seed_matters() -> None:
    first, again, other = trained(seed=11), trained(seed=11), trained(seed=12)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))  # PCGrad's task order is random


def test_state_dict_resumes_bit_identically() -> None:
    """Train, checkpoint (model, optimizer, Surgeon), continue; vs restore everything fresh and continue."""
    net = make_net()
    surgeon = gs.Surgeon(gs.groups.per_module(net.trunk), "pcgrad", seed=21)
    optimizer = torch.optim.SGD(net.all_parameters(), lr=0.1, momentum=0.9)
    train(net, surgeon, optimizer, 3)
    saved = copy.deepcopy((net, optimizer.state_dict(), surgeon.state_dict()))
    train(net, surgeon, optimizer, 3)
    expected = [p.detach().clone() for p in net.all_parameters()]

    def resumed(seed: int | None) -> list[Tensor]:
        """Continue from the checkpoint with the saved Surgeon state (``seed=None``) or a fresh seed."""
        restored, optimizer_state, surgeon_state = copy.deepcopy(saved)
        fresh = gs.Surgeon(gs.groups.per_module(restored.trunk), "pcgrad", seed=999 if seed is None else seed)
        if seed is None:
            fresh.load_state_dict(surgeon_state)
            assert fresh.steps == 3
        fresh_optimizer = torch.optim.SGD(restored.all_parameters(), lr=0.1, momentum=0.9)
        fresh_optimizer.load_state_dict(optimizer_state)
        train(restored, fresh, fresh_optimizer, 3)
        return [p.detach().clone() for p in restored.all_parameters()]

    def same(params: list[Tensor]) -> bool:
        return all(torch.equal(a, b) for a, b in zip(params, expected))

    assert same(resumed(seed=None))
    # Only a few task orders are possible, so one fresh seed may repeat them by chance; several do not.
    assert not all(same(resumed(seed)) for seed in range(4))


# ---------------------------------------------------------------------------------- strategies per group
def per_task_matrix(losses: list[Tensor], params: list[nn.Parameter]) -> Tensor:
    """``G[T, n]`` of one group, from one ``torch.autograd.grad`` per task."""
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)]))
    return torch.stack(rows)


def flat_grads(params: tuple[nn.Parameter, ...]) -> Tensor:
    return torch.cat([p.grad.reshape(-1) for p in params])  # type: ignore[union-attr]


@pytest.mark.parametrize(("tasks", "strategy"), [(3, PCGrad(shuffle=False)), (2, PCGrad())])
def test_pcgrad_per_group_equals_an_independent_per_group_pcgrad(tasks: int, strategy: PCGrad) -> None:
    """Through the Surgeon, every group gets PCGrad of its own per-task gradients (computed here with
    ``torch.autograd.grad``); the visiting order is fixed (index order, or irrelevant for T = 2)."""
    net = make_net(tasks=tasks)
    groups = gs.groups.per_module(net.trunk)
    losses = net.losses()
    expected = [strategy(per_task_matrix(losses, list(g.params))) for g in groups]
    net.zero_grad()
    gs.Surgeon(groups, strategy, seed=0).backward(net.losses())
    for group, direction in zip(groups, expected):
        torch.testing.assert_close(flat_grads(group.params), direction, rtol=1e-6, atol=1e-6)


def test_strategy_mapping_with_a_default(net: MultiTaskNet) -> None:
    """{label: strategy, "*": default}: the first layer gets PCGrad (index order), the rest the sum."""
    label = lambda name, module: "first" if name == "0" else "other"  # noqa: E731
    groups = gs.groups.per_module(net.trunk, label=label)
    pcgrad = PCGrad(shuffle=False)
    surgeon = gs.Surgeon(groups, {"first": pcgrad, "*": "sum"}, seed=0)
    assert [type(s).__name__ for s in surgeon.strategies.values()] == ["PCGrad", "Sum"]
    losses = net.losses()
    expected = pcgrad(per_task_matrix(losses, list(groups[0].params)))
    summed = per_task_matrix(losses, list(groups[1].params)).sum(dim=0)
    net.zero_grad()
    surgeon.backward(net.losses())
    torch.testing.assert_close(flat_grads(groups[0].params), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(flat_grads(groups[1].params), summed, rtol=1e-6, atol=1e-6)
