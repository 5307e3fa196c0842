"""Writers that record :class:`~gradsurg.diagnostics.StepStats` as a training job runs.

A writer is a callable ``writer(stats)``: pass it to the Surgeon (``Surgeon(..., callbacks=[writer])``)
and it is called after every successful step. ``JSONLWriter`` and ``CSVWriter`` need no extra
dependency; ``TensorBoardWriter`` needs the ``tensorboard`` package (extra ``tensorboard``).
Each writer takes ``every=N`` to record one step in ``N`` (reading the values costs one device sync).
"""

from __future__ import annotations

import abc
import csv
import json
from pathlib import Path
from typing import IO, Any

from gradsurg.diagnostics.stats import StepStats
from gradsurg.errors import InvalidOptionError, missing_dependency

__all__ = ["CSVWriter", "JSONLWriter", "StatsWriter", "TensorBoardWriter"]


class StatsWriter(abc.ABC):
    """Base class: filters steps by ``every``; subclasses implement :meth:`write`."""

    def __init__(self, *, every: int = 1) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise InvalidOptionError(
                f"Option `every` of {type(self).__name__} must be an integer ≥ 1; found every={every!r}."
            )
        self.every = every

    def __call__(self, stats: StepStats) -> None:
        if stats.step % self.every == 0:
            self.write(stats)

    @abc.abstractmethod
    def write(self, stats: StepStats) -> None:
        """Record one step."""

    def close(self) -> None:  # noqa: B027  (optional hook: writers without resources need nothing)
        """Flush and release resources (also done by ``with writer: ...``)."""

    def __enter__(self) -> StatsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_for_append(path: str | Path, owner: str) -> IO[str]:
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        return target.open("a", encoding="utf-8", newline="")
    except OSError as exc:
        raise InvalidOptionError(
            f"The path of {owner} must be a writable file; found {str(target)!r} ({exc.strerror or exc})."
        ) from exc


class JSONLWriter(StatsWriter):
    """Append one JSON object per group and step to ``path`` (see :meth:`StepStats.records` for the keys).

    Raises:
        InvalidOptionError: ``path`` cannot be opened for writing (raised at construction).
    """

    def __init__(self, path: str | Path, *, every: int = 1) -> None:
        super().__init__(every=every)
        self.path = Path(path)
        self._file = _open_for_append(path, "JSONLWriter")

    def write(self, stats: StepStats) -> None:
        for row in stats.records():
            self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class CSVWriter(StatsWriter):
    """Append one CSV row per group and step to ``path``; the header is written with the first row.

    Raises:
        InvalidOptionError: ``path`` cannot be opened for writing (raised at construction).
    """

    def __init__(self, path: str | Path, *, every: int = 1) -> None:
        super().__init__(every=every)
        self.path = Path(path)
        self._file = _open_for_append(path, "CSVWriter")
        self._writer: csv.DictWriter[str] | None = None

    def write(self, stats: StepStats) -> None:
        rows = stats.records()
        if self._writer is None and rows:
            self._writer = csv.DictWriter(self._file, fieldnames=list(rows[0]))
            if self._file.tell() == 0:
                self._writer.writeheader()
        if self._writer is not None:
            self._writer.writerows(rows)
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardWriter(StatsWriter):
    """Log scalars to TensorBoard: ``conflict_share`` overall and per group, and each task's gradient norm.

    Args:
        log_dir: A directory, or an existing ``SummaryWriter``-like object with ``add_scalar``.
        every: Record one step in ``every``.
        prefix: Tag prefix.

    Raises:
        MissingDependencyError: ``tensorboard`` is not installed (extra ``tensorboard``).
        InvalidOptionError: ``log_dir`` cannot be created.
    """

    def __init__(self, log_dir: str | Path | Any, *, every: int = 1, prefix: str = "gradsurg") -> None:
        super().__init__(every=every)
        self.prefix = prefix
        self._summary: Any
        if hasattr(log_dir, "add_scalar"):
            self._summary = log_dir
            self._owned = False
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise missing_dependency("tensorboard", "tensorboard", "TensorBoardWriter") from exc
        try:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InvalidOptionError(
                f"The log_dir of TensorBoardWriter must be a writable directory; found {str(log_dir)!r} ({exc})."
            ) from exc
        self._summary = SummaryWriter(log_dir=str(log_dir))
        self._owned = True

    def write(self, stats: StepStats) -> None:
        add = self._summary.add_scalar
        add(f"{self.prefix}/conflict_share", float(stats.conflict_share()), stats.step)
        for row in stats.records():
            add(f"{self.prefix}/conflict_share/{row['group']}", row["conflict_share"], stats.step)
            for key, value in row.items():
                if key.startswith("norm/"):
                    add(f"{self.prefix}/{key}/{row['group']}", value, stats.step)

    def close(self) -> None:
        if self._owned:
            self._summary.close()
