"""Tests of one benchmark run on the synthetic suite: fairness (same start, same batches), groups, results."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("peft")

from gradsurg.bench.methods import Method, Stepper, make_backward, parse_strategies
from gradsurg.bench.suites.base import Workload
from gradsurg.bench.suites.synthetic import SyntheticSuite
from gradsurg.bench.train import BatchStream, RunSpec, train_run
from gradsurg.errors import InvalidOptionError, UnknownStrategyError
from gradsurg.surgeon import Surgeon

CPU = torch.device("cpu")
SUITE = SyntheticSuite()
CONFIG = dataclasses.replace(SUITE.train, steps=8, eval_points=2, probe_points=4)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (fixture in tests/conftest.py)


@pytest.fixture(scope="module")
def workload() -> Workload:
    return SUITE.prepare(CPU)


def _tasks(workload: Workload) -> tuple[str, ...]:
    return tuple(t.name for t in workload.tasks)


def _losses(model: torch.nn.Module, workload: Workload) -> dict[str, torch.Tensor]:
    return {
        t.name: torch.nn.functional.cross_entropy(model(t.name, {"x": t.train_inputs["x"][:16]}), t.train_labels[:16])
        for t in workload.tasks
    }


def test_batch_stream_depends_only_on_seed_and_task() -> None:
    first = [next(BatchStream(10, 4, 0, "a")) for _ in range(1)]
    stream = BatchStream(10, 4, 0, "a")
    batches = [next(stream) for _ in range(5)]
    assert torch.equal(batches[0], first[0])
    assert all(len(b) == 4 for b in batches)
    epoch = torch.cat(batches)[:10]
    assert sorted(epoch.tolist()) == list(range(10))  # every example once per epoch
    other_task = BatchStream(10, 4, 0, "b")
    other_seed = BatchStream(10, 4, 1, "a")
    assert not all(torch.equal(next(other_task), b) for b in batches[:3])
    assert not all(torch.equal(next(other_seed), b) for b in batches[:3])


def test_every_method_of_a_seed_starts_from_the_same_weights(workload: Workload) -> None:
    a, b, c = workload.build_model(3), workload.build_model(3), workload.build_model(4)
    state_a, state_b, state_c = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    lora_a = [k for k in state_a if "lora_A" in k]
    assert lora_a and not all(torch.equal(state_a[k], state_c[k]) for k in lora_a)
    trainable = {n for n, p in a.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("heads.") for n in trainable)


def test_joint_is_a_plain_sum_and_equals_the_sum_strategy(workload: Workload) -> None:
    grads = []
    for method in (Method("joint"), Method("sum")):
        model = workload.build_model(0)
        make_backward(method, model, 0, _tasks(workload)).backward(_losses(model, workload))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name])


def test_groups_flat_for_pcgrad_and_per_factor_for_ortho_lora(workload: Workload) -> None:
    model = workload.build_model(0)
    shared = sum(p.numel() for p in model.shared_parameters())
    flat = _surgeon(make_backward(Method("pcgrad"), model, 0, _tasks(workload))).groups
    assert len(flat) == 1 and flat[0].numel == shared
    (ortho,) = parse_strategies("ortho_lora", "flat")
    assert ortho.granularity == "layer"
    groups = _surgeon(make_backward(ortho, model, 0, _tasks(workload))).groups
    assert sorted(g.label for g in groups) == ["lora_A", "lora_A", "lora_B", "lora_B"]
    assert sum(g.numel for g in groups) == shared
    head_ids = {id(p) for p in model.heads.parameters()}
    assert not any(id(p) in head_ids for g in groups for p in g.params)


def _surgeon(stepper: Stepper) -> Surgeon:
    assert stepper.surgeon is not None
    return stepper.surgeon


@pytest.mark.parametrize("strategy", ["uw", "gradnorm", "famo", "dwa"])
def test_strategies_with_learnable_weights_or_post_step_losses_train(workload: Workload, strategy: str) -> None:
    """Every registered strategy runs in a comparison: learnable weights join the optimizer, FAMO gets its update."""
    tasks = tuple(t.name for t in workload.tasks)
    config = dataclasses.replace(CONFIG, steps=3, eval_points=1, probe_points=1)
    result = train_run(workload, RunSpec(method=Method(strategy), tasks=tasks, seed=0), config, CPU)
    assert set(result.final) == set(tasks) and all(0.0 <= v <= 1.0 for v in result.final.values())
    stepper = make_backward(Method(strategy), workload.build_model(0), 0, tasks)
    assert (len(stepper.parameters) > 0) == (strategy in ("uw", "gradnorm"))
    assert stepper.needs_post_step_losses == (strategy == "famo")


def test_parse_strategies_resolves_names_and_refuses_unknown_ones() -> None:
    methods = parse_strategies("PCGrad, cagrad,pc-grad,,ortho-lora", "layer")
    assert [m.key for m in methods] == ["pcgrad@layer", "cagrad@layer", "ortho_lora@layer"]
    with pytest.raises(UnknownStrategyError, match=r"Known strategies: .*pcgrad"):
        parse_strategies("pcgrad,nosuch")
    with pytest.raises(InvalidOptionError, match="--granularity"):
        parse_strategies("pcgrad", "module")


def test_a_run_is_reproducible_and_reports_what_it_measured(workload: Workload) -> None:
    tasks = SUITE.task_names()
    spec = RunSpec(Method("pcgrad"), tasks, 1)
    first, second = train_run(workload, spec, CONFIG, CPU), train_run(workload, spec, CONFIG, CPU)
    assert first.final == second.final and first.curves == second.curves
    assert first.conflict_share == second.conflict_share
    assert first.eval_steps == (4, 8)
    assert first.final == {t: first.curves[t][-1] for t in tasks}
    assert len(first.conflict_share) == len(first.probe_steps) == 4
    assert all(0.0 <= v <= 1.0 for v in first.conflict_share)
    assert first.step_time_s > 0 and first.train_time_s >= first.step_time_s
    single = train_run(workload, RunSpec(Method("single"), tasks[:1], 1), CONFIG, CPU)
    assert single.tasks == tasks[:1] and single.conflict_share == [] and single.probe_steps == ()
