"""Aggregate finished runs into the comparison report (the Ortho-LoRA paper's Table 1, plus cost).

For every method and task: the validation metric, mean ± sample standard deviation over seeds; the
average over tasks; the difference to single-task LoRA; the paired difference to joint LoRA (per
seed, same initialisation and batches, so it is less noisy than comparing two means); and the
**gap recovered**

    gap recovered_t = (method_t − joint_t) / (single_t − joint_t),

on the seed means, per task and on the task average (as the paper's Table 1: the average row is
``(avg_method − avg_joint) / (avg_single − avg_joint)``, not the mean of the per-task ratios). When
``single_t − joint_t ≤ 0`` joint training is not worse than single-task training, there is no gap,
and the ratio is reported as ``n/a``.

Cost: the median step time relative to joint LoRA, and the peak memory of a run above its starting
level (see :mod:`gradsurg.bench.memory`). The share of conflicting task pairs (see
:mod:`gradsurg.bench.conflicts`) is averaged over the probe steps and seeds.

The report is written as Markdown (``report.md``), CSV (``results.csv``, one row per method) and
JSON (``results.json``, with every run).
"""

from __future__ import annotations

import csv
import json
import math
import pathlib
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gradsurg.bench.methods import JOINT, SINGLE, Method
from gradsurg.bench.train import RunResult

__all__ = ["MethodRow", "Report", "Stat", "build_report", "gap_recovered", "render_tables", "write_report"]

MB = 1024 * 1024


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (``0`` for one value) of ``n`` values."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat | None:
        """The statistic of ``values``, or ``None`` when there are none."""
        if not values:
            return None
        return cls(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values))


def gap_recovered(method: float, joint: float, single: float) -> float | None:
    """``(method − joint) / (single − joint)``, or ``None`` when ``single − joint ≤ 0`` (no gap to recover)."""
    gap = single - joint
    if not gap > 0:
        return None
    return (method - joint) / gap


@dataclass
class MethodRow:
    """One row of the report: a method's results over its seeds."""

    key: str
    label: str
    per_seed: dict[str, dict[int, float]]
    metrics: dict[str, Stat | None]
    average: Stat | None
    average_per_seed: dict[int, float]
    step_time_s: float | None
    peak_memory_bytes: float | None
    conflict_steps: list[int] = field(default_factory=list)
    conflict_curve: list[Stat | None] = field(default_factory=list)
    conflict_mean: float | None = None
    eval_steps: list[int] = field(default_factory=list)
    curves: dict[str, list[Stat | None]] = field(default_factory=dict)
    delta_single: dict[str, float | None] = field(default_factory=dict)
    delta_joint: Stat | None = None
    gap: dict[str, float | None] = field(default_factory=dict)
    step_time_rel: float | None = None
    memory_rel: float | None = None


@dataclass
class Report:
    """Everything written to the output folder."""

    suite: str
    summary: str
    command: str
    config: dict[str, Any]
    environment: dict[str, Any]
    tasks: list[tuple[str, str]]
    seeds: list[int]
    rows: list[MethodRow]
    runs: list[RunResult]
    expected_runs: int
    memory_kind: str
    gaps: dict[str, Stat | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def noisy(self, column: str) -> bool:
        """Whether the single-task/joint gap of ``column`` (a task or ``"avg"``) is positive but within its seed noise.

        That is: over the seeds, the mean of ``single − joint`` is positive but not larger than its
        standard deviation, so a gap-recovered ratio with this gap as denominator is mostly noise.
        """
        gap = self.gaps.get(column)
        return gap is not None and gap.n > 1 and 0 < gap.mean <= gap.std

    @property
    def partial(self) -> bool:
        """Whether some planned runs are missing (interrupted comparison)."""
        return len(self.runs) < self.expected_runs


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _row(method: Method, task_names: list[str], runs: list[RunResult]) -> MethodRow:
    """Aggregate the runs of one method (single-task: the runs of every task)."""
    per_seed: dict[str, dict[int, float]] = {t: {} for t in task_names}
    for run in runs:
        for task, value in run.final.items():
            per_seed[task][run.seed] = value
    seeds = sorted({run.seed for run in runs})
    average_per_seed = {
        s: statistics.fmean(per_seed[t][s] for t in task_names)
        for s in seeds
        if all(s in per_seed[t] for t in task_names)
    }
    if method.name == SINGLE:
        # One step of each of the T single-task trainings: comparable to one joint step over T batches.
        per_task_times = [_mean([r.step_time_s for r in runs if r.tasks == (t,)]) for t in task_names]
        step_time = sum(t for t in per_task_times if t is not None) if None not in per_task_times else None
        per_task_memory = [
            _mean([float(r.peak_memory_bytes) for r in runs if r.tasks == (t,) and r.peak_memory_bytes is not None])
            for t in task_names
        ]
        memory = max((m for m in per_task_memory if m is not None), default=None)
    else:
        step_time = _mean([r.step_time_s for r in runs])
        memory = _mean([float(r.peak_memory_bytes) for r in runs if r.peak_memory_bytes is not None])
    row = MethodRow(
        key=method.key,
        label=method.label,
        per_seed=per_seed,
        metrics={t: Stat.of(list(per_seed[t].values())) for t in task_names},
        average=Stat.of(list(average_per_seed.values())),
        average_per_seed=average_per_seed,
        step_time_s=step_time,
        peak_memory_bytes=memory,
    )
    multi = [r for r in runs if r.conflict_share]
    if multi:
        row.conflict_steps = list(multi[0].probe_steps)
        row.conflict_curve = [
            Stat.of(
                [
                    r.conflict_share[i]
                    for r in multi
                    if len(r.conflict_share) > i and not math.isnan(r.conflict_share[i])
                ]
            )
            for i in range(len(row.conflict_steps))
        ]
        row.conflict_mean = _mean([v for r in multi for v in r.conflict_share if not math.isnan(v)])
    if runs:
        row.eval_steps = list(runs[0].eval_steps)
        row.curves = {
            t: [Stat.of([r.curves[t][i] for r in runs if t in r.curves]) for i in range(len(row.eval_steps))]
            for t in task_names
        }
    return row


def _paired(mine: Mapping[int, float], other: Mapping[int, float]) -> Stat | None:
    """Mean ± std over the common seeds of ``mine[seed] − other[seed]``."""
    return Stat.of([value - other[seed] for seed, value in mine.items() if seed in other])


def _compare(row: MethodRow, single: MethodRow | None, joint: MethodRow | None, task_names: list[str]) -> None:
    """Fill the differences, the gap recovered and the relative costs of ``row``."""
    for task in task_names:
        mine = row.metrics[task]
        base = single.metrics[task] if single else None
        row.delta_single[task] = mine.mean - base.mean if mine and base else None
        low = joint.metrics[task] if joint else None
        row.gap[task] = gap_recovered(mine.mean, low.mean, base.mean) if mine and base and low else None
    avg_single = single.average if single else None
    avg_joint = joint.average if joint else None
    row.delta_single["avg"] = row.average.mean - avg_single.mean if row.average and avg_single else None
    row.gap["avg"] = (
        gap_recovered(row.average.mean, avg_joint.mean, avg_single.mean)
        if row.average and avg_single and avg_joint
        else None
    )
    if joint is not None:
        row.delta_joint = _paired(row.average_per_seed, joint.average_per_seed)
        if row.step_time_s is not None and joint.step_time_s:
            row.step_time_rel = row.step_time_s / joint.step_time_s
        if row.peak_memory_bytes is not None and joint.peak_memory_bytes:
            row.memory_rel = row.peak_memory_bytes / joint.peak_memory_bytes


_MEMORY_NOTES = {
    "cuda_allocated": (
        "Peak memory: torch.cuda.max_memory_allocated during the training steps minus the memory allocated at the "
        "run's start (evaluation and the conflict probe excluded)."
    ),
    "cpu_peak_rss": (
        "Peak memory: growth of the process's peak resident set size during the training steps (Linux VmHWM, reset "
        "at the run's start; evaluation and the conflict probe excluded); it includes allocator slack, so "
        "differences of a few MB are noise."
    ),
    "unavailable": "Peak memory: not measurable on this platform (n/a).",
    "mixed": "Peak memory: runs measured in different ways (restored from the cache); compare with care.",
}


def build_report(
    *,
    suite: str,
    summary: str,
    command: str,
    config: Mapping[str, Any],
    environment: Mapping[str, Any],
    tasks: Sequence[tuple[str, str]],
    methods: Sequence[Method],
    seeds: Sequence[int],
    runs: Sequence[RunResult],
    expected_runs: int,
) -> Report:
    """Aggregate ``runs`` (possibly fewer than ``expected_runs``) into a :class:`Report`.

    Args:
        suite: Suite name.
        summary: One line describing the suite.
        command: The command line that produced the report.
        config: The suite's configuration.
        environment: Machine and library versions.
        tasks: ``(name, metric)`` of each task, in column order.
        methods: The methods, in row order (``single`` and ``joint`` first).
        seeds: The seeds planned.
        runs: The finished runs.
        expected_runs: How many runs were planned.
    """
    task_names = [name for name, _ in tasks]
    rows = [_row(m, task_names, [r for r in runs if r.method == m.key]) for m in methods]
    by_key = {row.key: row for row in rows}
    single, joint = by_key.get(SINGLE), by_key.get(JOINT)
    for row in rows:
        _compare(row, single, joint, task_names)
    kinds = {r.memory_kind for r in runs}
    memory_kind = kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else "unavailable")
    report = Report(
        suite=suite,
        summary=summary,
        command=command,
        config=dict(config),
        environment=dict(environment),
        tasks=list(tasks),
        seeds=list(seeds),
        rows=rows,
        runs=list(runs),
        expected_runs=expected_runs,
        memory_kind=memory_kind,
    )
    if single is not None and joint is not None:
        report.gaps = {t: _paired(single.per_seed[t], joint.per_seed[t]) for t in task_names}
        report.gaps["avg"] = _paired(single.average_per_seed, joint.average_per_seed)
    report.notes = _notes(report, single, joint, task_names)
    return report


def _notes(report: Report, single: MethodRow | None, joint: MethodRow | None, task_names: list[str]) -> list[str]:
    notes = [
        f"Validation metric ×100, mean ± sample std over {len(report.seeds)} seed(s) "
        f"({', '.join(map(str, report.seeds))}); the value of a run is the metric after its last step.",
        "Δ single: difference of the means to single-task LoRA. Δ joint (paired): per seed, the method's task "
        "average minus joint LoRA's (same initialisation and batches), mean ± std over seeds.",
        "Gap recovered = (method − joint) / (single − joint) on the seed means; the avg column uses the task "
        "averages (as the paper's Table 1).",
        "Step time: median wall time of one training step (forward, backward, optimizer step), relative to "
        "joint LoRA's plain `sum(losses).backward()`. Single-task: the sum over its runs (one step of each "
        "adapter, i.e. the same batches as one multi-task step).",
        _MEMORY_NOTES[report.memory_kind],
    ]
    if single and joint:
        no_gap = [t for t in task_names if (s := single.metrics[t]) and (j := joint.metrics[t]) and s.mean <= j.mean]
        if no_gap:
            notes.append(
                "n/a: joint LoRA is not worse than single-task LoRA on "
                + ", ".join(no_gap)
                + " (no negative transfer there), so there is no gap to recover and the ratio is undefined."
            )
        if single.average and joint.average and single.average.mean <= joint.average.mean:
            notes.append("n/a (avg): on average joint LoRA is not worse than single-task LoRA; no gap to recover.")
    noisy = [c for c in [*task_names, "avg"] if report.noisy(c)]
    if noisy:
        details = ", ".join(
            f"{c} ({100 * g.mean:.1f} ± {100 * g.std:.1f})" for c in noisy if (g := report.gaps[c]) is not None
        )
        notes.append(
            "*: the single-task − joint gap is within its seed-to-seed standard deviation for "
            + details
            + " points; gap-recovered ratios over such a gap are mostly noise."
        )
    if report.partial:
        notes.append(
            f"PARTIAL REPORT: {len(report.runs)} of {report.expected_runs} runs finished; rerun the same command "
            "to compute the missing ones (finished runs are cached)."
        )
    return notes


# ----------------------------------------------------------------------------------------------- rendering
def _pct(stat: Stat | None) -> str:
    if stat is None:
        return "—"
    return f"{100 * stat.mean:.1f} ± {100 * stat.std:.1f}" if stat.n > 1 else f"{100 * stat.mean:.1f}"


def _signed(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:+.1f}"


def _ratio(value: float | None, *, percent: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.0f}%" if percent else f"{value:.2f}×"


def _table(header: list[str], lines: list[list[str]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(header, *lines)]

    def fmt(cells: list[str]) -> str:
        return "| " + " | ".join(cell.ljust(w) for cell, w in zip(cells, widths)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(header), rule, *(fmt(line) for line in lines)])


def render_tables(report: Report) -> str:
    """The two Markdown tables: metrics, then gap recovered and cost."""
    names = [name for name, _ in report.tasks]
    metric_header = ["Method", *(f"{n} ({m})" for n, m in report.tasks), "Avg", "Δ single", "Δ joint (paired)"]
    metric_lines = []
    cost_lines = []
    for row in report.rows:
        is_reference = row.key in (SINGLE, JOINT)
        paired = (
            "—"
            if row.key == JOINT or row.delta_joint is None
            else (f"{100 * row.delta_joint.mean:+.1f} ± {100 * row.delta_joint.std:.1f}")
        )
        metric_lines.append(
            [
                row.label,
                *(_pct(row.metrics[n]) for n in names),
                _pct(row.average),
                "—" if row.key == SINGLE else _signed(row.delta_single.get("avg")),
                paired,
            ]
        )
        gaps = [
            "—"
            if is_reference
            else _ratio(row.gap.get(n), percent=True) + ("*" if row.gap.get(n) is not None and report.noisy(n) else "")
            for n in [*names, "avg"]
        ]
        time_ms = "—" if row.step_time_s is None else f"{1000 * row.step_time_s:.0f}"
        memory = "n/a" if row.peak_memory_bytes is None else f"{row.peak_memory_bytes / MB:.0f}"
        conflict = "—" if row.conflict_mean is None else f"{100 * row.conflict_mean:.0f}%"
        cost_lines.append(
            [row.label, *gaps, time_ms, _ratio(row.step_time_rel), memory, _ratio(row.memory_rel), conflict]
        )
    cost_header = [
        "Method",
        *(f"gap {n}" for n in names),
        "gap avg",
        "step ms",
        "× joint",
        "peak MB",
        "× joint",
        "conflicting pairs",
    ]
    return _table(metric_header, metric_lines) + "\n\n" + _table(cost_header, cost_lines)


def render_markdown(report: Report, plots: Sequence[str]) -> str:
    """The full ``report.md``."""
    train = report.config.get("train", {})
    settings = ", ".join(f"{k}={v}" for k, v in train.items())
    lines = [
        f"# gradsurg compare — suite `{report.suite}`",
        "",
        report.summary,
        "",
        f"Command: `{report.command}`",
        "",
        f"Training: {settings}.",
        "",
        "Environment: " + ", ".join(f"{k}={v}" for k, v in report.environment.items()) + ".",
        "",
        render_tables(report),
        "",
        *(f"- {note}" for note in report.notes),
        "",
        *(f"![{pathlib.Path(p).stem}]({p})" for p in plots),
        "",
    ]
    return "\n".join(lines)


def _stat_json(stat: Stat | None) -> dict[str, float] | None:
    return None if stat is None else {"mean": stat.mean, "std": stat.std, "n": stat.n}


def _row_json(row: MethodRow) -> dict[str, Any]:
    return {
        "method": row.key,
        "label": row.label,
        "metrics": {t: _stat_json(s) for t, s in row.metrics.items()},
        "per_seed": {t: {str(k): v for k, v in values.items()} for t, values in row.per_seed.items()},
        "average": _stat_json(row.average),
        "delta_vs_single": row.delta_single,
        "delta_vs_joint_paired": _stat_json(row.delta_joint),
        "gap_recovered": row.gap,
        "step_time_s": row.step_time_s,
        "step_time_rel_joint": row.step_time_rel,
        "peak_memory_bytes": row.peak_memory_bytes,
        "peak_memory_rel_joint": row.memory_rel,
        "conflict_share_mean": row.conflict_mean,
        "conflict_steps": row.conflict_steps,
        "conflict_curve": [_stat_json(s) for s in row.conflict_curve],
        "eval_steps": row.eval_steps,
        "curves": {t: [_stat_json(s) for s in values] for t, values in row.curves.items()},
    }


def _csv_rows(report: Report) -> list[dict[str, Any]]:
    out = []
    for row in report.rows:
        record: dict[str, Any] = {"method": row.key, "label": row.label}
        for name, _ in report.tasks:
            stat = row.metrics[name]
            record[f"{name}_mean"] = None if stat is None else stat.mean
            record[f"{name}_std"] = None if stat is None else stat.std
            record[f"{name}_delta_vs_single"] = row.delta_single.get(name)
            record[f"{name}_gap_recovered"] = row.gap.get(name)
        record["avg_mean"] = None if row.average is None else row.average.mean
        record["avg_std"] = None if row.average is None else row.average.std
        record["seeds"] = 0 if row.average is None else row.average.n
        record["avg_delta_vs_single"] = row.delta_single.get("avg")
        record["avg_delta_vs_joint_paired_mean"] = None if row.delta_joint is None else row.delta_joint.mean
        record["avg_delta_vs_joint_paired_std"] = None if row.delta_joint is None else row.delta_joint.std
        record["avg_gap_recovered"] = row.gap.get("avg")
        record["step_time_s"] = row.step_time_s
        record["step_time_rel_joint"] = row.step_time_rel
        record["peak_memory_bytes"] = row.peak_memory_bytes
        record["peak_memory_rel_joint"] = row.memory_rel
        record["conflict_share_mean"] = row.conflict_mean
        out.append(record)
    return out


def write_report(report: Report, folder: pathlib.Path, plots: Sequence[str]) -> list[pathlib.Path]:
    """Write ``report.md``, ``results.csv`` and ``results.json`` into ``folder``; return their paths."""
    md = folder / "report.md"
    md.write_text(render_markdown(report, plots))
    table = folder / "results.csv"
    records = _csv_rows(report)
    with table.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    data = folder / "results.json"
    data.write_text(
        json.dumps(
            {
                "suite": report.suite,
                "summary": report.summary,
                "command": report.command,
                "config": report.config,
                "environment": report.environment,
                "tasks": [{"name": n, "metric": m} for n, m in report.tasks],
                "seeds": report.seeds,
                "partial": report.partial,
                "expected_runs": report.expected_runs,
                "memory_kind": report.memory_kind,
                "notes": report.notes,
                "gap_single_minus_joint": {c: _stat_json(s) for c, s in report.gaps.items()},
                "rows": [_row_json(row) for row in report.rows],
                "runs": [run.to_json() for run in report.runs],
            },
            indent=1,
        )
    )
    return [md, table, data]
