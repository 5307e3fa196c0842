"""Conflict diagnostics: measure task conflicts before and after surgery, at near-zero cost.

* :class:`StepStats` / :class:`GroupStats` — what the Surgeon records each step (``surgeon.last_stats``);
* writers (:class:`JSONLWriter`, :class:`CSVWriter`, :class:`TensorBoardWriter`) to pass as
  ``Surgeon(..., callbacks=[...])``;
* :mod:`gradsurg.diagnostics.plots` — heatmaps and curves (optional matplotlib).
"""

from gradsurg.diagnostics.stats import GroupStats, StepStats, group_stats
from gradsurg.diagnostics.writers import CSVWriter, JSONLWriter, StatsWriter, TensorBoardWriter

__all__ = ["CSVWriter", "GroupStats", "JSONLWriter", "StatsWriter", "StepStats", "TensorBoardWriter", "group_stats"]
