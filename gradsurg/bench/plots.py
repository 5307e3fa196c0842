"""PNG plots of a comparison (matplotlib, non-interactive ``Agg`` backend).

* ``metrics.png`` — per-task validation metric (and the task average) of every method, bars with
  ± one standard deviation over seeds as error bars;
* ``curves.png`` — validation curves: metric against training step, one panel per task, mean over
  seeds with a ± std band;
* ``conflicts.png`` — share of conflicting task pairs on the shared LoRA parameters against
  training step, for every multi-task method (mean over seeds, ± std band).

matplotlib is part of the ``bench`` extra and is imported only here, when plots are drawn.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

from gradsurg.bench.report import Report, Stat
from gradsurg.errors import missing_dependency

__all__ = ["PLOT_FILES", "write_plots"]

#: The files :func:`write_plots` writes, in the order the report shows them.
PLOT_FILES: tuple[str, ...] = ("metrics.png", "curves.png", "conflicts.png")


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise missing_dependency("matplotlib", "bench", "The plots of `gradsurg compare`") from exc
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _color(index: int) -> str:
    """The colour of the method in row ``index``, the same in every plot."""
    return f"C{index % 10}"


def _band(
    axis: Any, steps: Sequence[int], stats: Sequence[Stat | None], label: str, color: str, limits: tuple[float, float]
) -> None:
    """Plot a mean line (×100) with a ± std band clipped to ``limits``, skipping missing points."""
    points = [(s, st) for s, st in zip(steps, stats) if st is not None]
    if not points:
        return
    xs = [s for s, _ in points]
    mean = [100 * st.mean for _, st in points]
    std = [100 * st.std for _, st in points]
    low, high = limits
    axis.plot(xs, mean, marker="o", markersize=3, label=label, color=color)
    axis.fill_between(
        xs,
        [max(low, m - d) for m, d in zip(mean, std)],
        [min(high, m + d) for m, d in zip(mean, std)],
        color=color,
        alpha=0.15,
    )


def _metrics(plt: Any, report: Report, path: pathlib.Path) -> None:
    groups = [*(name for name, _ in report.tasks), "avg"]
    rows = report.rows
    width = 0.8 / max(1, len(rows))
    figure, axis = plt.subplots(figsize=(max(6.0, 1.6 * len(groups) + 2), 4.2))
    for i, row in enumerate(rows):
        stats = [*(row.metrics[name] for name, _ in report.tasks), row.average]
        xs = [g + (i - (len(rows) - 1) / 2) * width for g in range(len(groups))]
        axis.bar(
            xs,
            [0.0 if s is None else 100 * s.mean for s in stats],
            width,
            yerr=[0.0 if s is None else 100 * s.std for s in stats],
            capsize=2,
            label=row.label,
            color=_color(i),
        )
    present = [100 * s.mean for row in rows for s in [*row.metrics.values(), row.average] if s is not None]
    if present:
        axis.set_ylim(max(0.0, min(present) - 10), min(100.0, max(present) + 5))
    axis.set_xticks(range(len(groups)))
    axis.set_xticklabels(groups, rotation=10)
    axis.set_ylabel("validation metric (×100)")
    axis.set_title(f"{report.suite}: validation metric, mean ± std over {len(report.seeds)} seed(s)")
    axis.legend(fontsize=8, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _curves(plt: Any, report: Report, path: pathlib.Path) -> None:
    count = len(report.tasks)
    figure, axes = plt.subplots(1, count, figsize=(4.2 * count, 3.6), squeeze=False)
    for axis, (name, metric) in zip(axes[0], report.tasks):
        for i, row in enumerate(report.rows):
            if name in row.curves:
                _band(axis, row.eval_steps, row.curves[name], row.label, _color(i), (0.0, 100.0))
        axis.set_title(f"{name} ({metric})", fontsize=10)
        axis.set_xlabel("step")
        axis.set_ylabel("validation metric (×100)")
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _conflicts(plt: Any, report: Report, path: pathlib.Path) -> None:
    figure, axis = plt.subplots(figsize=(6.4, 3.8))
    for i, row in enumerate(report.rows):
        if row.conflict_curve:
            _band(axis, row.conflict_steps, row.conflict_curve, row.label, _color(i), (0.0, 100.0))
    axis.set_xlabel("step")
    axis.set_ylabel("conflicting task pairs (%)")
    axis.set_ylim(-2, 102)
    axis.set_title("Share of task pairs with g_i·g_j < 0 on the shared LoRA parameters", fontsize=10)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_plots(report: Report, folder: pathlib.Path) -> list[pathlib.Path]:
    """Draw the three plots into ``folder``; return their paths (in :data:`PLOT_FILES` order).

    Raises:
        MissingDependencyError: matplotlib is not installed (extra ``bench``).
    """
    plt = _pyplot()
    paths = [folder / name for name in PLOT_FILES]
    for draw, path in zip((_metrics, _curves, _conflicts), paths):
        draw(plt, report, path)
    return paths
