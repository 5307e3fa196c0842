"""Benchmarks behind ``gradsurg compare``: suites, training runs, run cache, report and plots.

* :mod:`gradsurg.bench.suites` — the suites (``embedded``, ``glue``, ``synthetic``) behind one
  interface;
* :mod:`gradsurg.bench.methods` — single-task, joint and strategy runs, and their parameter groups;
* :mod:`gradsurg.bench.train` — one run: training loop, evaluation, timing, memory, conflicts;
* :mod:`gradsurg.bench.runner` — the comparison: plan, cache, progress, Ctrl-C, report;
* :mod:`gradsurg.bench.report` and :mod:`gradsurg.bench.plots` — Markdown/CSV/JSON and PNG output.

Use it from Python as::

    from gradsurg.bench.runner import CompareOptions, run_compare

    outcome = run_compare(CompareOptions(suite="synthetic", seeds=2))
    print(outcome.report.rows[0].average)

Importing this package needs only torch; the suites import their optional dependencies
(``transformers``, ``peft``, ``datasets``, ...) when they load data or build models.
"""

from __future__ import annotations

__all__: list[str] = []
