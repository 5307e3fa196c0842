"""Tests of the peak-memory measurement (CPU: Linux peak RSS; skipped where unavailable)."""

from __future__ import annotations

import pytest
import torch

from gradsurg.bench.memory import PeakMemory

MB = 1 << 20


def _touch(megabytes: int) -> None:
    block = torch.ones(megabytes * MB // 4)  # written, so the pages are resident
    del block


def test_peak_counts_the_body_but_not_excluded_parts() -> None:
    with PeakMemory(torch.device("cpu")) as memory:
        if memory.kind == "unavailable":
            pytest.skip("peak RSS cannot be measured on this platform")
        _touch(96)
        with memory.excluded():
            _touch(384)
    assert memory.peak_bytes is not None
    assert 80 * MB <= memory.peak_bytes < 300 * MB


def test_unavailable_measurement_reports_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("gradsurg.bench.memory._reset_peak_rss", lambda: False)
    with PeakMemory(torch.device("cpu")) as memory:
        _touch(8)
    assert memory.kind == "unavailable" and memory.peak_bytes is None
