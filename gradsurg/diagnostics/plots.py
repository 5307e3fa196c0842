"""Plots of conflict statistics (needs matplotlib: ``pip install 'gradsurg[plot]'``).

The functions read the rows written by :class:`~gradsurg.diagnostics.JSONLWriter` (or returned by
:meth:`~gradsurg.diagnostics.StepStats.records`), so they work on a live run or on a log file, and
save a PNG when ``path`` is given. They return the matplotlib ``Figure``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gradsurg.diagnostics.stats import StepStats
from gradsurg.errors import InvalidOptionError, missing_dependency

__all__ = ["conflict_heatmap", "cosine_matrices", "gradient_norms", "load_records", "short_names"]


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Read the rows of a JSONL file written by :class:`~gradsurg.diagnostics.JSONLWriter`."""
    with Path(path).open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise missing_dependency("matplotlib", "plot", "gradsurg.diagnostics.plots") from exc
    return plt


def _finish(figure: Any, path: str | Path | None) -> Any:
    figure.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=120)
    return figure


def short_names(names: Sequence[str]) -> list[str]:
    """The names without the dotted prefix they all share (``"<root>"``-like names are kept)."""
    if len(names) < 2:
        return [n.rsplit(".", 2)[-1] if len(n) > 40 else n for n in names]
    split = [n.split(".") for n in names]
    common = 0
    while all(len(parts) > common + 1 for parts in split) and len({parts[common] for parts in split}) == 1:
        common += 1
    return [".".join(parts[common:]) for parts in split]


def _checked(records: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    rows = list(records)
    if not rows:
        raise InvalidOptionError("The plot's `records` must hold at least one row; found none (no step recorded?).")
    return rows


def conflict_heatmap(records: Iterable[Mapping[str, Any]], path: str | Path | None = None) -> Any:
    """Heatmap of the share of conflicting task pairs, one row per group (layer), one column per step."""
    plt = _pyplot()
    rows = _checked(records)
    groups = list(dict.fromkeys(str(r["group"]) for r in rows))
    steps = sorted({int(r["step"]) for r in rows})
    column = {step: i for i, step in enumerate(steps)}
    line = {group: i for i, group in enumerate(groups)}
    grid = [[math.nan] * len(steps) for _ in groups]
    for r in rows:
        grid[line[str(r["group"])]][column[int(r["step"])]] = float(r["conflict_share"])
    figure, axis = plt.subplots(figsize=(min(14, 4 + len(steps) / 10), max(3, 0.25 * len(groups) + 1.5)))
    image = axis.imshow(grid, aspect="auto", interpolation="nearest", cmap="magma", vmin=0.0, vmax=1.0)
    axis.set_yticks(range(len(groups)), labels=short_names(groups), fontsize=7)
    ticks = list(range(0, len(steps), max(1, len(steps) // 10)))
    axis.set_xticks(ticks, labels=[str(steps[i]) for i in ticks])
    axis.set_xlabel("step")
    axis.set_title("Share of conflicting task pairs per group")
    figure.colorbar(image, ax=axis, label="conflict share")
    return _finish(figure, path)


def gradient_norms(records: Iterable[Mapping[str, Any]], path: str | Path | None = None) -> Any:
    """Each task's gradient norm over steps, over all groups together (``√Σ_groups ‖gᵢ‖²``)."""
    plt = _pyplot()
    rows = _checked(records)
    tasks = [key.split("/", 1)[1] for key in rows[0] if key.startswith("norm/")]
    totals: dict[int, dict[str, float]] = {}
    for r in rows:
        per_step = totals.setdefault(int(r["step"]), dict.fromkeys(tasks, 0.0))
        for task in tasks:
            per_step[task] += float(r[f"norm/{task}"]) ** 2
    steps = sorted(totals)
    figure, axis = plt.subplots(figsize=(7, 3.5))
    for task in tasks:
        axis.plot(steps, [math.sqrt(totals[s][task]) for s in steps], label=task)
    axis.set_xlabel("step")
    axis.set_ylabel("gradient norm")
    axis.set_yscale("log")
    axis.set_title("Task gradient norms")
    axis.legend(fontsize=8)
    return _finish(figure, path)


def cosine_matrices(
    stats: StepStats, path: str | Path | None = None, *, groups: Sequence[str] | None = None, limit: int = 12
) -> Any:
    """The pairwise cosine matrix of the task gradients of each group at one step.

    Args:
        stats: The step's statistics (e.g. ``surgeon.last_stats``).
        path: Where to save the PNG.
        groups: The groups to show (default: the first ``limit`` groups).
        limit: Maximum number of panels.
    """
    plt = _pyplot()
    names = list(groups) if groups is not None else list(stats.groups)[:limit]
    unknown = [n for n in names if n not in stats.groups]
    if unknown or not names:
        raise InvalidOptionError(
            f"`groups` of cosine_matrices must name groups of the step; found {unknown or 'none'}, "
            f"known: {list(stats.groups)[:8]}..."
        )
    columns = min(4, len(names))
    lines = math.ceil(len(names) / columns)
    figure, axes = plt.subplots(lines, columns, figsize=(3.4 * columns, 3.2 * lines), squeeze=False)
    image = None
    for axis, name, title in zip(axes.flat, names, short_names(names)):
        matrix = stats.groups[name].cosine.detach().cpu().float().numpy()
        image = axis.imshow(matrix, vmin=-1, vmax=1, cmap="coolwarm")
        axis.set_title(title, fontsize=7)
        axis.set_xticks(range(len(stats.tasks)), labels=stats.tasks, fontsize=6, rotation=45)
        first_column = list(axes.flat).index(axis) % columns == 0
        axis.set_yticks(range(len(stats.tasks)), labels=stats.tasks if first_column else [], fontsize=6)
    for axis in list(axes.flat)[len(names) :]:
        axis.axis("off")
    if image is not None:
        figure.colorbar(image, ax=axes.ravel().tolist(), label="cosine", shrink=0.8)
    figure.suptitle(f"Task-gradient cosines at step {stats.step}")
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=120)
    return figure
