"""Shared helpers of the benchmark scripts: interleaved timing, peak-memory probes, table printing.

Times are medians over repeats in which every variant runs once per repeat, in a rotating order,
so that load from other processes hits every variant alike. By default the clock is the process's
CPU time with torch on one thread (:func:`setup_clock`): on a machine shared with other jobs,
wall-clock blocks include the time the scheduler gives to others, CPU time does not. ``--wall``
switches to wall-clock time with torch's default threads. Ratios are what to read; absolute times
depend on the machine.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

_MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"


def reexec_with_mmap_threshold() -> None:
    """Re-run the script with glibc's mmap threshold fixed at 64 KiB (Linux; no-op elsewhere).

    With a fixed threshold every large tensor is its own mapping, returned to the system when
    freed, so the resident set size tracks live memory and peak-RSS growth is meaningful.
    """
    if sys.platform.startswith("linux") and _MMAP_ENV not in os.environ:
        os.environ[_MMAP_ENV] = "65536"
        os.execv(sys.executable, [sys.executable, *sys.argv])


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def peak_rss_growth_mib(fn: Callable[[], object]) -> float:
    """Peak resident-set growth (MiB) while ``fn`` runs: ``VmHWM`` after minus ``VmRSS`` before.

    Linux only (``/proc/self/clear_refs`` resets the high-water mark); NaN elsewhere.
    """
    clear = Path("/proc/self/clear_refs")
    if not clear.exists():
        return float("nan")
    clear.write_text("5")
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) / 1024


_clock: Callable[[], float] = time.process_time


@dataclass(frozen=True)
class StepArguments:
    """The command line shared by the MiniLM step benchmarks."""

    quick: bool
    tasks: int
    batch: int
    seq: int
    repeats: int
    clock: str


def step_arguments(description: str, default_repeats: int) -> StepArguments:
    """Parse ``--quick/--tasks/--batch/--seq/--repeats/--wall`` and set up the clock."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny batch, a few seconds")
    parser.add_argument("--tasks", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None, help="samples per task")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sample")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--wall", action="store_true", help="wall-clock time with torch's default threads")
    args = parser.parse_args()
    return StepArguments(
        quick=args.quick,
        tasks=args.tasks or (2 if args.quick else 4),
        batch=args.batch or (2 if args.quick else 8),
        seq=args.seq or (8 if args.quick else 32),
        repeats=args.repeats or (2 if args.quick else default_repeats),
        clock=setup_clock(args.wall),
    )


def setup_clock(wall: bool) -> str:
    """Choose the clock (CPU time with one torch thread, or wall time); returns a description."""
    global _clock
    import torch

    if wall:
        _clock = time.perf_counter
        return f"wall-clock time, {torch.get_num_threads()} torch threads"
    torch.set_num_threads(1)
    _clock = time.process_time
    return "process CPU time, 1 torch thread"


@dataclass
class Variant:
    """A timed callable with an untimed ``setup`` / ``teardown`` around each block of calls."""

    run: Callable[[], object]
    setup: Callable[[], object] = lambda: None
    teardown: Callable[[], object] = lambda: None


def _block(variant: Variant, number: int) -> float:
    """Seconds per call over ``number`` calls, between the variant's setup and teardown."""
    variant.setup()
    try:
        start = _clock()
        for _ in range(number):
            variant.run()
        return (_clock() - start) / number
    finally:
        variant.teardown()


def calibrate(variant: Variant, min_time: float) -> int:
    """How many calls make a block of at least ``min_time`` seconds (after one warm-up call)."""
    _block(variant, 1)
    number = 1
    while _block(variant, number) * number < min_time and number < 1 << 20:
        number *= 2
    return number


def as_variant(fn: Callable[[], object] | Variant) -> Variant:
    return fn if isinstance(fn, Variant) else Variant(fn)


def interleaved_medians(
    variants: dict[str, Callable[[], object] | Variant], *, repeats: int, min_time: float
) -> dict[str, float]:
    """Median seconds per call of each variant, measured in interleaved, rotating blocks."""
    prepared = {name: as_variant(fn) for name, fn in variants.items()}
    numbers = {name: calibrate(variant, min_time) for name, variant in prepared.items()}
    samples: dict[str, list[float]] = {name: [] for name in prepared}
    names = list(prepared)
    for repeat in range(repeats):
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
            samples[name].append(_block(prepared[name], numbers[name]))
    return {name: statistics.median(values) for name, values in samples.items()}


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain Markdown table (pastes into the docs as is)."""
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
    sys.stdout.flush()


def _fmt(value: object) -> str:
    if isinstance(value, float):
        if value != value:
            return "n/a"
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def ms(seconds: float) -> float:
    return seconds * 1e3
