"""Run a comparison: plan the runs, take finished ones from the cache, compute the rest, report.

The plan for ``N`` seeds and ``T`` tasks: ``T`` single-task runs, one joint run and one run per
strategy, for every seed (same steps, same initialisation and same batches per seed). Every finished
run is cached at once (see :mod:`gradsurg.bench.cache`), so an interrupted comparison resumes where it
stopped and a repeated one computes nothing. Everything that can be checked — suite and strategy
names, options, optional dependencies, a writable output folder — is checked before any training.

On Ctrl-C the runs finished so far stay cached, a partial report is written, and
:attr:`CompareOutcome.interrupted` is set (the command then exits with status 130).
"""

from __future__ import annotations

import os
import pathlib
import platform
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import torch

import gradsurg
from gradsurg.bench.cache import RunCache, run_key_material
from gradsurg.bench.methods import JOINT, SINGLE, Method, parse_strategies
from gradsurg.bench.plots import write_plots
from gradsurg.bench.report import Report, build_report, render_tables, write_report
from gradsurg.bench.suites import get_suite
from gradsurg.bench.suites.base import Suite, SuiteOverrides, require
from gradsurg.bench.train import RunResult, RunSpec, train_run, warm_up
from gradsurg.errors import GradSurgError, InvalidOptionError

__all__ = ["DEFAULT_STRATEGIES", "CompareOptions", "CompareOutcome", "OutputFolderError", "run_compare"]

DEFAULT_STRATEGIES = "pcgrad,cagrad,ortho_lora"


class OutputFolderError(GradSurgError, PermissionError):
    """The output folder cannot be created or written to."""


@dataclass(frozen=True)
class CompareOptions:
    """Options of ``gradsurg compare`` (see ``gradsurg compare --help``)."""

    suite: str = "embedded"
    strategies: str = DEFAULT_STRATEGIES
    granularity: str = "flat"
    seeds: int | None = None
    steps: int | None = None
    quick: bool = False
    device: str | None = None
    out: str | None = None
    model: str | None = None
    data_dir: str | None = None
    threads: int | None = None
    progress: bool = True
    plots: bool = True
    command: str = "gradsurg compare"


@dataclass
class CompareOutcome:
    """What :func:`run_compare` did."""

    report: Report
    out: pathlib.Path
    files: list[pathlib.Path]
    computed: int
    cached: int
    interrupted: bool = False
    seconds: float = 0.0


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InvalidOptionError(
            f"Option `--device` must be a torch device such as cpu or cuda; found {name!r}."
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidOptionError(
            "Option `--device` must name an available device; found --device=cuda, but CUDA is not available."
        )
    if device.type not in ("cpu", "cuda"):
        raise InvalidOptionError(f"Option `--device` must be cpu or cuda; found {name!r}.")
    return device


def _writable(folder: pathlib.Path) -> None:
    """Create ``folder`` and prove it writable, or raise :class:`OutputFolderError`."""
    probe = folder / f".write-test-{uuid.uuid4().hex}"
    try:
        (folder / "runs").mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise OutputFolderError(
            f"Option `--out` must be a folder that can be created and written; {str(folder)!r} is not "
            f"({type(exc).__name__}: {exc.strerror or exc})."
        ) from None


def _positive(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or value < 1):
        raise InvalidOptionError(f"Option `--{name}` must be an int ≥ 1; found --{name}={value!r}.")


def _plan(suite: Suite, methods: Sequence[Method], seeds: int) -> list[RunSpec]:
    tasks = suite.task_names()
    plan: list[RunSpec] = []
    for seed in range(seeds):
        for method in methods:
            if method.name == SINGLE:
                plan += [RunSpec(method, (task,), seed) for task in tasks]
            else:
                plan.append(RunSpec(method, tasks, seed))
    return plan


def _environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "gradsurg": gradsurg.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


class _RunProgress:
    """Advances the current run's bar by steps and the overall bar by task-steps."""

    def __init__(self, run_bar: Any, overall: Any, weight: int) -> None:
        self._run_bar = run_bar
        self._overall = overall
        self._weight = weight

    def update(self, n: int = 1) -> None:
        self._run_bar.update(n)
        self._overall.update(n * self._weight)

    def close(self) -> None:
        self._run_bar.close()


class _Bars:
    """tqdm progress bars (with ETA) on stderr: one for the whole comparison, one for the current run."""

    def __init__(self, enabled: bool, total_work: int) -> None:
        self._tqdm: Any = None
        self._overall: Any = None
        if enabled and total_work:
            require("The progress bars of `gradsurg compare`", "bench", "tqdm")
            from tqdm.auto import tqdm

            self._tqdm = tqdm
            self._overall = tqdm(
                total=total_work, desc="all runs", unit="task-step", file=sys.stderr, position=0, mininterval=1.0
            )

    def run(self, label: str, steps: int, weight: int) -> _RunProgress | None:
        """A progress for one run of ``steps`` steps over ``weight`` tasks (``None`` when disabled)."""
        if self._tqdm is None:
            return None
        bar = self._tqdm(
            total=steps, desc=label, unit="step", file=sys.stderr, position=1, leave=False, mininterval=0.5
        )
        return _RunProgress(bar, self._overall, weight)

    def close(self) -> None:
        if self._overall is not None:
            self._overall.close()


def run_compare(options: CompareOptions, stdout: TextIO | None = None) -> CompareOutcome:
    """Run (or resume) a comparison and write its report; see the module docstring.

    Raises:
        InvalidOptionError: Unknown suite, bad option value, or an option that does not apply.
        UnknownStrategyError: A name in ``strategies`` is not registered.
        MissingDependencyError: An optional dependency is missing (the message names the extra).
        OutputFolderError: The output folder is not writable.

    The torch thread count set by ``options.threads`` is restored on return.
    """
    started = time.perf_counter()
    suite_cls = get_suite(options.suite)
    methods = [Method(SINGLE), Method(JOINT), *parse_strategies(options.strategies, options.granularity)]
    _positive("seeds", options.seeds)
    _positive("steps", options.steps)
    _positive("threads", options.threads)
    device = _device(options.device)
    suite = suite_cls.from_overrides(
        SuiteOverrides(quick=options.quick, steps=options.steps, model=options.model, data_dir=options.data_dir)
    )
    suite.check_dependencies()
    if options.plots:
        require("The plots of `gradsurg compare`", "bench", "matplotlib")
    out = pathlib.Path(
        options.out or pathlib.Path("gradsurg-runs") / (suite.name + ("-quick" if options.quick else ""))
    )
    _writable(out)
    threads = torch.get_num_threads()
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    try:
        return _compare(options, suite, methods, device, out, stdout or sys.stdout, started)
    finally:
        torch.set_num_threads(threads)


def _compare(
    options: CompareOptions,
    suite: Suite,
    methods: list[Method],
    device: torch.device,
    out: pathlib.Path,
    out_stream: TextIO,
    started: float,
) -> CompareOutcome:
    """The comparison proper, once every option has been checked."""
    seeds = options.seeds or suite.seeds
    plan = _plan(suite, methods, seeds)
    config = suite.config()
    cache = RunCache(out / "runs")
    keyed = [(spec, run_key_material(config, spec, device.type)) for spec in plan]
    results: dict[int, RunResult] = {}
    for index, (_, material) in enumerate(keyed):
        cached = cache.load(cache.key(material))
        if cached is not None:
            results[index] = cached
    cached_count = len(results)
    missing = [i for i in range(len(plan)) if i not in results]
    print(
        f"gradsurg compare: suite {suite.name!r}, {len(plan)} runs ({seeds} seed(s) × "
        f"{', '.join(m.key for m in methods)}), {cached_count} cached, {len(missing)} to compute, device {device}.",
        file=sys.stderr,
    )
    interrupted = False
    computed = 0
    steps = suite.train.steps
    bars = _Bars(options.progress, sum(steps * len(plan[i].tasks) for i in missing))
    try:
        if missing:
            print(f"Preparing the {suite.name!r} suite (loading data and backbone)...", file=sys.stderr)
            workload = suite.prepare(device)
            warm_up(workload, suite.train, device)
            for number, index in enumerate(missing, start=1):
                spec, material = keyed[index]
                bar = bars.run(f"[{number}/{len(missing)}] {spec.label}", steps, len(spec.tasks))
                try:
                    result = train_run(workload, spec, suite.train, device, progress=bar)
                finally:
                    if bar is not None:
                        bar.close()
                cache.save(cache.key(material), material, result)
                results[index] = result
                computed += 1
    except KeyboardInterrupt:
        interrupted = True
        print("\nInterrupted: finished runs are cached; writing a partial report.", file=sys.stderr)
    finally:
        bars.close()

    report = build_report(
        suite=suite.name,
        summary=suite.summary,
        command=options.command,
        config=config,
        environment=_environment(device),
        tasks=list(suite.task_metrics().items()),
        methods=methods,
        seeds=list(range(seeds)),
        runs=[results[i] for i in sorted(results)],
        expected_runs=len(plan),
    )
    plot_files = write_plots(report, out) if options.plots and results else []
    files = write_report(report, out, [p.name for p in plot_files]) + plot_files
    print(render_tables(report), file=out_stream)
    for note in report.notes:
        print(f"- {note}", file=out_stream)
    elapsed = time.perf_counter() - started
    print(
        f"Computed {computed} run(s), {cached_count} from the cache, in {elapsed:.0f} s; report in {out}/ "
        f"({', '.join(p.name for p in files)}).",
        file=sys.stderr,
    )
    return CompareOutcome(report, out, files, computed, cached_count, interrupted, elapsed)
