"""Tests of the comparison report: gap recovered, aggregation over seeds, rendering and files."""

from __future__ import annotations

import csv
import json
import math
import pathlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gradsurg.bench.methods import Method
from gradsurg.bench.report import Stat, build_report, gap_recovered, render_tables, write_report
from tests.bench.helpers import fake_run, table_runs

TASKS = [("mnli", "accuracy"), ("qqp", "f1"), ("sst2", "accuracy")]
METHODS = [Method("single"), Method("joint"), Method("ortho_lora", "layer")]

# Table 1 of the Ortho-LoRA paper (arXiv 2601.09684), in [0, 1].
PAPER = {
    "single": {"mnli": [0.874], "qqp": [0.881], "sst2": [0.942]},
    "joint": {"mnli": [0.859], "qqp": [0.865], "sst2": [0.928]},
    "ortho_lora@layer": {"mnli": [0.871], "qqp": [0.879], "sst2": [0.939]},
}

finite = st.floats(-10, 10, allow_nan=False)


def _report(table: dict[str, dict[str, list[float]]], expected: int | None = None, methods: list[Method] = METHODS):
    runs = table_runs(table)
    return build_report(
        suite="test",
        summary="a test suite",
        command="gradsurg compare --suite test",
        config={"train": {"steps": 10}},
        environment={"device": "cpu"},
        tasks=TASKS,
        methods=methods,
        seeds=[0, 1, 2][: len(next(iter(table["joint"].values())))],
        runs=runs,
        expected_runs=expected if expected is not None else len(runs),
    )


def test_gap_recovered_reproduces_the_papers_table_1() -> None:
    assert gap_recovered(0.871, 0.859, 0.874) == pytest.approx(0.800, abs=1e-3)
    assert gap_recovered(0.879, 0.865, 0.881) == pytest.approx(0.875, abs=1e-3)
    assert gap_recovered(0.939, 0.928, 0.942) == pytest.approx(0.786, abs=1e-3)


@given(joint=finite, gap=st.floats(1e-3, 10), fraction=st.floats(-2, 2))
def test_gap_recovered_is_the_fraction_of_the_gap(joint: float, gap: float, fraction: float) -> None:
    assert gap_recovered(joint + fraction * gap, joint, joint + gap) == pytest.approx(fraction, abs=1e-6)


@given(joint=finite, method=finite, deficit=st.floats(0, 10))
def test_gap_recovered_is_undefined_without_a_gap(joint: float, method: float, deficit: float) -> None:
    assert gap_recovered(method, joint, joint - deficit) is None


def test_stat_uses_the_sample_standard_deviation() -> None:
    stat = Stat.of([1.0, 2.0, 3.0])
    assert stat is not None and (stat.mean, stat.std, stat.n) == (2.0, 1.0, 3)
    single = Stat.of([5.0])
    assert single is not None and single.std == 0.0
    assert Stat.of([]) is None


def test_average_gap_uses_task_averages_like_the_paper() -> None:
    report = _report(PAPER)
    ortho = report.rows[2]
    assert ortho.gap["mnli"] == pytest.approx(0.8, abs=1e-3)
    # The paper's average row: (89.63 - 88.40) / (89.90 - 88.40), not the mean of the three ratios.
    averages = {m: sum(v[0] for v in per.values()) / 3 for m, per in PAPER.items()}
    expected = (averages["ortho_lora@layer"] - averages["joint"]) / (averages["single"] - averages["joint"])
    assert ortho.gap["avg"] == pytest.approx(expected)
    mean_of_ratios = sum(ortho.gap[t] for t in ("mnli", "qqp", "sst2")) / 3  # type: ignore[misc]
    assert ortho.gap["avg"] != pytest.approx(mean_of_ratios, abs=1e-4)
    assert ortho.delta_single["avg"] == pytest.approx(averages["ortho_lora@layer"] - averages["single"])


def test_mean_std_and_paired_difference_over_seeds() -> None:
    table = {
        "single": {"mnli": [0.9, 0.8, 0.7], "qqp": [0.9, 0.9, 0.9], "sst2": [0.9, 0.9, 0.9]},
        "joint": {"mnli": [0.5, 0.6, 0.7], "qqp": [0.5, 0.5, 0.5], "sst2": [0.5, 0.5, 0.5]},
        "ortho_lora@layer": {"mnli": [0.6, 0.7, 0.8], "qqp": [0.5, 0.5, 0.5], "sst2": [0.5, 0.5, 0.5]},
    }
    report = _report(table)
    joint, ortho = report.rows[1], report.rows[2]
    assert joint.metrics["mnli"] == Stat(pytest.approx(0.6), pytest.approx(0.1), 3)  # type: ignore[arg-type]
    # Each seed of ortho_lora is exactly 0.1/3 above the same seed of joint: the paired std is 0.
    assert ortho.delta_joint is not None
    assert ortho.delta_joint.mean == pytest.approx(0.1 / 3)
    assert ortho.delta_joint.std == pytest.approx(0.0, abs=1e-12)
    assert ortho.average is not None and ortho.average.std > 0.0


def test_no_gap_is_reported_as_na_and_explained() -> None:
    table = {
        "single": {"mnli": [0.8], "qqp": [0.7], "sst2": [0.9]},
        "joint": {"mnli": [0.7], "qqp": [0.75], "sst2": [0.9]},
        "ortho_lora@layer": {"mnli": [0.75], "qqp": [0.7], "sst2": [0.95]},
    }
    report = _report(table)
    ortho = report.rows[2]
    assert ortho.gap["mnli"] == pytest.approx(0.5)
    assert ortho.gap["qqp"] is None and ortho.gap["sst2"] is None
    assert any("n/a" in note and "qqp, sst2" in note for note in report.notes)
    cost_table = render_tables(report).split("\n\n")[1]
    ortho_line = next(line for line in cost_table.splitlines() if line.startswith("| ortho_lora"))
    cells = [c.strip() for c in ortho_line.strip("|").split("|")]
    # avg: single 80.0, joint 78.3, ortho_lora 80.0 -> the whole (small) average gap is recovered.
    assert cells[1:5] == ["50%", "n/a", "n/a", "100%"]


def test_gaps_within_seed_noise_are_flagged() -> None:
    table = {
        "single": {"mnli": [0.9, 0.8, 0.7], "qqp": [0.62, 0.5, 0.5], "sst2": [0.5, 0.5, 0.5]},
        "joint": {"mnli": [0.5, 0.4, 0.3], "qqp": [0.5, 0.55, 0.5], "sst2": [0.5, 0.5, 0.5]},
        "ortho_lora@layer": {"mnli": [0.7, 0.6, 0.5], "qqp": [0.6, 0.6, 0.5], "sst2": [0.5, 0.5, 0.5]},
    }
    report = _report(table)
    # mnli: single - joint = 0.4 on every seed (no noise); qqp: +0.12, -0.05, 0.0 (mean 0.023 < std 0.087).
    assert not report.noisy("mnli") and report.noisy("qqp") and not report.noisy("sst2")
    gap = report.gaps["qqp"]
    assert gap is not None and gap.mean == pytest.approx(0.07 / 3)
    cost_table = render_tables(report).split("\n\n")[1]
    ortho_line = next(line for line in cost_table.splitlines() if line.startswith("| ortho_lora"))
    cells = [c.strip() for c in ortho_line.strip("|").split("|")]
    assert cells[1] == "50%" and cells[2].endswith("%*") and cells[3] == "n/a"
    assert any(note.startswith("*: ") and "qqp (2.3 ± 8.7)" in note for note in report.notes)


def test_costs_are_relative_to_joint_and_single_sums_its_runs() -> None:
    runs = [
        *(fake_run("single", {t: 0.9}, step_time=0.1, memory=10 << 20) for t, _ in TASKS),
        fake_run("joint", dict.fromkeys(["mnli", "qqp", "sst2"], 0.5), step_time=0.2, memory=20 << 20),
        fake_run("ortho_lora@layer", dict.fromkeys(["mnli", "qqp", "sst2"], 0.6), step_time=0.3, memory=30 << 20),
    ]
    report = build_report(
        suite="t",
        summary="",
        command="",
        config={},
        environment={},
        tasks=TASKS,
        methods=METHODS,
        seeds=[0],
        runs=runs,
        expected_runs=len(runs),
    )
    single, joint, ortho = report.rows
    assert single.step_time_s == pytest.approx(0.3) and single.step_time_rel == pytest.approx(1.5)
    assert joint.step_time_rel == pytest.approx(1.0)
    assert ortho.step_time_rel == pytest.approx(1.5)
    assert ortho.memory_rel == pytest.approx(1.5)
    assert single.peak_memory_bytes == pytest.approx(10 << 20)


def test_partial_report_is_flagged() -> None:
    runs = table_runs({k: v for k, v in PAPER.items() if k != "ortho_lora@layer"})
    report = build_report(
        suite="t",
        summary="",
        command="",
        config={},
        environment={},
        tasks=TASKS,
        methods=METHODS,
        seeds=[0],
        runs=runs,
        expected_runs=len(runs) + 1,
    )
    assert report.partial
    assert report.rows[2].average is None and report.rows[2].gap["avg"] is None
    assert any(note.startswith("PARTIAL REPORT") for note in report.notes)
    assert "| ortho_lora (layer groups) | —" in render_tables(report)


def test_written_files_agree_with_the_report(tmp_path: pathlib.Path) -> None:
    report = _report(PAPER)
    paths = write_report(report, tmp_path, ["metrics.png"])
    assert [p.name for p in paths] == ["report.md", "results.csv", "results.json"]
    markdown = (tmp_path / "report.md").read_text()
    assert render_tables(report) in markdown and "![metrics](metrics.png)" in markdown
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [r["method"] for r in rows] == ["single", "joint", "ortho_lora@layer"]
    assert float(rows[2]["mnli_gap_recovered"]) == pytest.approx(0.8, abs=1e-3)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["rows"][2]["gap_recovered"]["avg"] == pytest.approx(report.rows[2].gap["avg"])
    assert len(data["runs"]) == len(report.runs) and not data["partial"]
    assert math.isclose(data["rows"][1]["conflict_share_mean"], 0.75)
