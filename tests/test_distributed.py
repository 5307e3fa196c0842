"""DDP for real: two processes on the gloo backend (CPU) against one process on the union of their batches."""

from __future__ import annotations

import contextlib
import pathlib
import socket
import traceback
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from torch import distributed as dist
from torch.nn.parallel import DistributedDataParallel

import gradsurg as gs
from tests.integrations.toy import STRATEGIES, TASKS, ToyLoRA, make_data, strategy_spec, task_losses

WORLD = 2
STEPS = 3
PER_RANK = 4


def heads_group(model: ToyLoRA) -> list[gs.ParamGroup]:
    """The heads as a "sum" group, so that a rank that lacks a task may leave its head unreached."""
    return [*model.groups(), gs.ParamGroup("heads", "head", tuple(model.heads.parameters()))]


def train(
    model: torch.nn.Module, toy: ToyLoRA, surgeon: gs.Surgeon, rank: int | None, drop: dict[int, str], micro: int
) -> list[torch.Tensor]:
    """``STEPS`` SGD steps; ``rank=None`` is the single process on the union of the ranks' batches.

    ``drop[step] = task``: at that step, the last rank has no batch of ``task``. ``micro > 1``: each
    rank accumulates its batch in that many micro-batches.
    """
    optimizer = torch.optim.SGD(toy.parameters(), lr=0.1)
    for step in range(STEPS):
        x, y = make_data(WORLD * PER_RANK, seed=step)
        optimizer.zero_grad()
        if rank is None:
            losses = task_losses(model, x, y)
            if step in drop:  # the task's average only covers the ranks that had it
                kept = task_losses(model, x[: (WORLD - 1) * PER_RANK], y[: (WORLD - 1) * PER_RANK])
                losses[drop[step]] = kept[drop[step]]
        else:
            xs, ys = x[rank * PER_RANK : (rank + 1) * PER_RANK], y[rank * PER_RANK : (rank + 1) * PER_RANK]
            for xb, yb in list(zip(torch.split(xs, PER_RANK // micro), torch.split(ys, PER_RANK // micro)))[:-1]:
                surgeon.backward(task_losses(model, xb, yb, scale=1 / micro), accumulate=True)
            losses = task_losses(model, xs[-PER_RANK // micro :], ys[-PER_RANK // micro :], scale=1 / micro)
            if step in drop and rank == WORLD - 1:
                del losses[drop[step]]
        surgeon.backward(losses)
        optimizer.step()
    return [p.detach().clone() for p in toy.parameters()]


def scenarios(rank: int | None) -> dict[str, Any]:
    """Every scenario's final parameters (or error message), in one process or on one rank."""
    results: dict[str, Any] = {}
    runs: dict[str, tuple[str, dict[int, str], int]] = {s: (s, {}, 1) for s in STRATEGIES}
    runs["missing-task"] = ("pcgrad", {1: "b"}, 1)
    runs["accumulated"] = ("cagrad", {}, 2)
    calls = {"all_reduce": 0, "all_gather": 0}
    for name, (strategy, drop, micro) in runs.items():
        toy = ToyLoRA()
        model = toy if rank is None else DistributedDataParallel(toy)
        groups = heads_group(toy) if drop else toy.groups()
        spec = strategy_spec(strategy) if not drop else {"head": "sum", "*": strategy}
        surgeon = gs.Surgeon(groups, spec, seed=0, tasks=list(TASKS))
        with counting(calls):
            results[name] = train(model, toy, surgeon, rank, drop, micro)
    if rank is not None:
        results["collectives"] = dict(calls)
        results["errors"] = disagreements(rank)
    return results


@contextlib.contextmanager
def counting(calls: dict[str, int]) -> Iterator[None]:
    """Count the collectives the Surgeon issues (DDP's own would be counted too, were they called)."""
    originals = {name: getattr(dist, name) for name in calls}

    def wrap(name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return originals[name](*args, **kwargs)

        return call

    for name in calls:
        setattr(dist, name, wrap(name))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def disagreements(rank: int) -> list[str]:
    """Ranks that disagree must all get the same clear error (not a hang)."""
    errors = []
    toy = ToyLoRA()
    x, y = make_data(PER_RANK)
    losses = task_losses(toy, x, y)
    order = losses if rank == 0 else dict(reversed(losses.items()))
    for surgeon, step_losses in [
        (gs.Surgeon(toy.groups(), "pcgrad", seed=0), order),
        (gs.Surgeon(toy.groups(), "pcgrad", seed=rank), task_losses(toy, x, y)),
    ]:
        try:
            surgeon.backward(step_losses)
        except gs.GradSurgError as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
    return errors


def worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.save(scenarios(rank), pathlib.Path(out) / f"rank{rank}.pt")
    except BaseException:
        (pathlib.Path(out) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("ddp")
    try:
        mp.spawn(worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    except Exception as exc:  # show the rank's own traceback
        logs = "\n".join(p.read_text() for p in sorted(out.glob("*.err")))
        raise AssertionError(f"a rank failed:\n{logs}") from exc
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def single() -> dict[str, Any]:
    return scenarios(None)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", [*STRATEGIES, "missing-task", "accumulated"])
def test_two_ranks_equal_one_process_on_the_union_of_their_batches(
    ranks: list[dict[str, Any]], single: dict[str, Any], name: str
) -> None:
    for result in ranks:
        for actual, expected in zip(result[name], single[name]):
            torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)
    for a, b in zip(ranks[0][name], ranks[1][name]):  # every rank computed the same direction
        assert torch.equal(a, b)


@pytest.mark.timeout(120)
def test_one_all_reduce_and_one_header_all_gather_per_optimizer_step(ranks: list[dict[str, Any]]) -> None:
    runs = len(STRATEGIES) + 2
    for result in ranks:
        assert result["collectives"] == {"all_reduce": runs * STEPS, "all_gather": runs * STEPS}


@pytest.mark.timeout(120)
def test_ranks_that_disagree_get_the_same_clear_error(ranks: list[dict[str, Any]]) -> None:
    for result in ranks:
        tasks, seeds = result["errors"]
        assert tasks.startswith("InvalidLossError") and "task names" in tasks
        assert seeds.startswith("InvalidStateError") and "generator" in seeds
    assert ranks[0]["errors"] == ranks[1]["errors"]


def test_distributed_true_without_a_process_group_is_refused() -> None:
    toy = ToyLoRA()
    x, y = make_data(4)
    with pytest.raises(gs.InvalidOptionError, match="process group"):
        gs.Surgeon(toy.groups(), "sum", seed=0, distributed=True).backward(task_losses(toy, x, y))
