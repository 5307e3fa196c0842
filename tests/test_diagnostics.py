"""Conflict diagnostics: statistics, monitor-only mode, writers, plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gradsurg as gs
from gradsurg.diagnostics import CSVWriter, JSONLWriter, StepStats, TensorBoardWriter, group_stats


def _model() -> tuple[nn.Linear, nn.ModuleList, torch.Tensor]:
    torch.manual_seed(0)
    trunk = nn.Linear(4, 3)
    heads = nn.ModuleList([nn.Linear(3, 1) for _ in range(3)])
    return trunk, heads, torch.randn(6, 4)


def _losses(trunk: nn.Linear, heads: nn.ModuleList, x: torch.Tensor) -> dict[str, torch.Tensor]:
    h = trunk(x)
    return {"up": heads[0](h).mean(), "down": -heads[1](h).mean(), "square": heads[2](h).pow(2).mean()}


def _reference_stats(grads: torch.Tensor, direction: torch.Tensor) -> dict[str, torch.Tensor]:
    g = grads.double()
    d = direction.double()
    norms = g.norm(dim=1)
    cosine = torch.nn.functional.cosine_similarity(g.unsqueeze(1), g.unsqueeze(0), dim=-1)
    tasks = g.shape[0]
    conflicts = sum(int(g[i] @ g[j] < 0) for i in range(tasks) for j in range(i + 1, tasks))
    return {
        "norms": norms,
        "cosine": cosine,
        "conflicts": torch.tensor(conflicts),
        "direction_cosine": torch.nn.functional.cosine_similarity(g, d.unsqueeze(0), dim=-1),
        "change": (d - g.sum(0)).norm() / g.sum(0).norm(),
    }


@settings(max_examples=40, deadline=None)
@given(
    tasks=st.integers(2, 5),
    width=st.integers(1, 12),
    seed=st.integers(0, 2**16),
    use_weights=st.booleans(),
)
def test_group_stats_match_direct_computation(tasks: int, width: int, seed: int, use_weights: bool) -> None:
    generator = torch.Generator().manual_seed(seed)
    grads = torch.randn(tasks, width, generator=generator, dtype=torch.float64) + 0.1
    weights = torch.rand(tasks, generator=generator, dtype=torch.float64) + 0.2
    direction = weights @ grads
    gram = grads @ grads.T
    stats = (
        group_stats(gram, weights=weights)
        if use_weights
        else group_stats(gram, grads=grads, direction=direction)
    )
    expected = _reference_stats(grads, direction)
    torch.testing.assert_close(stats.norms, expected["norms"])
    torch.testing.assert_close(stats.cosine, expected["cosine"])
    assert int(stats.conflicts) == int(expected["conflicts"])
    assert float(stats.conflict_share) == pytest.approx(int(expected["conflicts"]) / (tasks * (tasks - 1) / 2))
    torch.testing.assert_close(stats.direction_cosine, expected["direction_cosine"])
    torch.testing.assert_close(stats.change, expected["change"])


def test_zero_gradient_gives_zero_cosines_not_nan() -> None:
    grads = torch.tensor([[0.0, 0.0], [1.0, -1.0]])
    stats = group_stats(grads @ grads.T, grads=grads, direction=grads.sum(0))
    assert torch.isfinite(stats.cosine).all() and float(stats.cosine[0, 1]) == 0.0
    assert torch.isfinite(stats.direction_cosine).all()


def test_last_stats_is_none_before_first_step_and_filled_after() -> None:
    trunk, heads, x = _model()
    surgeon = gs.Surgeon(gs.groups.per_module(trunk), "pcgrad", seed=0)
    assert surgeon.last_stats is None
    surgeon.backward(_losses(trunk, heads, x))
    stats = surgeon.last_stats
    assert isinstance(stats, StepStats)
    assert stats.step == 0 and stats.tasks == ("up", "down", "square")
    assert stats.labels == {"<root>": "Linear"}
    # "up" and "down" are exact opposites on the trunk's output: at least that pair conflicts.
    assert int(stats.groups["<root>"].conflicts) >= 1
    assert 0 < float(stats.conflict_share()) <= 1
    assert float(stats.conflict_share(label="Linear")) == float(stats.conflict_share())
    assert float(stats.conflict_share(label="no-such-label")) == 0.0


def test_collect_stats_false_records_nothing() -> None:
    trunk, heads, x = _model()
    surgeon = gs.Surgeon(gs.groups.whole(trunk), "pcgrad", seed=0, collect_stats=False)
    surgeon.backward(_losses(trunk, heads, x))
    assert surgeon.last_stats is None
    with pytest.raises(gs.InvalidOptionError, match="collect_stats"):
        gs.Surgeon(gs.groups.whole(trunk), "sum", collect_stats=False, callbacks=[print])


def test_stats_describe_the_applied_direction() -> None:
    trunk, heads, x = _model()
    surgeon = gs.Surgeon(gs.groups.whole(trunk), "pcgrad", seed=0)
    losses = _losses(trunk, heads, x)
    grads = torch.stack(
        [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(trunk.parameters()), retain_graph=True)])
            for loss in losses.values()
        ]
    )
    surgeon.backward(losses)
    applied = torch.cat([p.grad.reshape(-1) for p in trunk.parameters()])  # type: ignore[union-attr]
    expected = _reference_stats(grads, applied)
    stats = surgeon.last_stats
    assert stats is not None
    torch.testing.assert_close(stats.groups["all"].direction_cosine, expected["direction_cosine"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(stats.groups["all"].change, expected["change"], atol=1e-5, rtol=1e-4)


def test_monitor_only_writes_the_sum_and_reports_the_strategy() -> None:
    trunk, heads, x = _model()
    reference = [p.detach().clone() for p in trunk.parameters()]
    sum(_losses(trunk, heads, x).values()).backward()
    expected = [p.grad.clone() for p in trunk.parameters()]  # type: ignore[union-attr]
    trunk.zero_grad(set_to_none=True)
    heads.zero_grad(set_to_none=True)
    surgeon = gs.Surgeon(gs.groups.whole(trunk), "pcgrad", seed=0, monitor_only=True)
    surgeon.backward(_losses(trunk, heads, x))
    for p, e, r in zip(trunk.parameters(), expected, reference):
        torch.testing.assert_close(p.grad, e, atol=1e-6, rtol=1e-5)
        assert torch.equal(p.detach(), r)
    stats = surgeon.last_stats
    assert stats is not None
    # PCGrad would have changed the conflicting sum: the monitor reports by how much.
    assert float(stats.groups["all"].change) > 1e-3


def test_callbacks_and_writers(tmp_path: Path) -> None:
    trunk, heads, x = _model()
    seen: list[int] = []
    jsonl, csv_path = tmp_path / "logs" / "stats.jsonl", tmp_path / "stats.csv"
    with JSONLWriter(jsonl) as jw, CSVWriter(csv_path, every=2) as cw:
        surgeon = gs.Surgeon(
            gs.groups.per_module(trunk), "pcgrad", seed=0, callbacks=[jw, cw, lambda s: seen.append(s.step)]
        )
        for _ in range(4):
            surgeon.backward(_losses(trunk, heads, x))
    assert seen == [0, 1, 2, 3]
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert {"norm/up", "norm/down", "direction_cosine/square", "conflict_share", "group"} <= set(rows[0])
    with csv_path.open() as handle:
        table = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in table] == [0, 2]
    assert float(table[0]["conflict_share"]) == pytest.approx(rows[0]["conflict_share"])


def test_unwritable_writer_path_fails_at_construction(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(gs.InvalidOptionError, match="writable"):
        JSONLWriter(blocker / "stats.jsonl")
    with pytest.raises(gs.InvalidOptionError, match="writable"):
        CSVWriter(blocker / "stats.csv")
    with pytest.raises(gs.InvalidOptionError, match="every"):
        JSONLWriter(tmp_path / "ok.jsonl", every=0)


def test_tensorboard_writer_with_a_summary_like_object() -> None:
    class Recorder:
        def __init__(self) -> None:
            self.calls: list[tuple[str, float, int]] = []

        def add_scalar(self, tag: str, value: float, step: int) -> None:
            self.calls.append((tag, value, step))

    trunk, heads, x = _model()
    recorder = Recorder()
    surgeon = gs.Surgeon(gs.groups.whole(trunk), "sum", seed=0, callbacks=[TensorBoardWriter(recorder)])
    surgeon.backward(_losses(trunk, heads, x))
    tags = {tag for tag, _, _ in recorder.calls}
    assert "gradsurg/conflict_share" in tags and "gradsurg/norm/up/all" in tags
    assert all(step == 0 for _, _, step in recorder.calls)


def test_plots_write_png_files(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from gradsurg.diagnostics import plots

    trunk, heads, x = _model()
    log = tmp_path / "stats.jsonl"
    with JSONLWriter(log) as writer:
        surgeon = gs.Surgeon(gs.groups.per_module(heads), "pcgrad", seed=0, callbacks=[writer])
        for _ in range(3):
            h = trunk(x)
            surgeon.backward([heads[0](h).mean(), -heads[0](h).mean() + heads[1](h).mean()])
    records = plots.load_records(log)
    plots.conflict_heatmap(records, tmp_path / "heat.png")
    plots.gradient_norms(records, tmp_path / "norms.png")
    assert surgeon.last_stats is not None
    plots.cosine_matrices(surgeon.last_stats, tmp_path / "cos.png")
    for name in ("heat.png", "norms.png", "cos.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(gs.InvalidOptionError, match="at least one row"):
        plots.conflict_heatmap([], None)
    with pytest.raises(gs.InvalidOptionError, match="groups"):
        plots.cosine_matrices(surgeon.last_stats, None, groups=["nope"])
