"""Builders of fake run results for the report tests (no training)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from gradsurg.bench.train import RunResult


def fake_run(
    method: str,
    finals: Mapping[str, float],
    seed: int = 0,
    *,
    step_time: float = 0.1,
    memory: int | None = 1 << 20,
    conflicts: Sequence[float] = (),
) -> RunResult:
    """A finished run of ``method`` whose tasks end at ``finals``."""
    tasks = tuple(finals)
    return RunResult(
        method=method,
        tasks=tasks,
        seed=seed,
        final=dict(finals),
        eval_steps=(5, 10),
        curves={t: [v / 2, v] for t, v in finals.items()},
        probe_steps=tuple(range(len(conflicts))),
        conflict_share=list(conflicts),
        step_time_s=step_time,
        train_time_s=1.0,
        peak_memory_bytes=memory,
        memory_kind="cpu_peak_rss" if memory is not None else "unavailable",
        device="cpu",
    )


def table_runs(table: Mapping[str, Mapping[str, Sequence[float]]]) -> list[RunResult]:
    """Runs from ``{method: {task: [value per seed]}}``; ``single`` gets one run per task and seed."""
    runs = []
    for method, per_task in table.items():
        seeds = len(next(iter(per_task.values())))
        for seed in range(seeds):
            if method == "single":
                runs += [fake_run("single", {t: v[seed]}, seed) for t, v in per_task.items()]
            else:
                runs.append(fake_run(method, {t: v[seed] for t, v in per_task.items()}, seed, conflicts=(0.5, 1.0)))
    return runs
