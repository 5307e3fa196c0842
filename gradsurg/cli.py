"""The ``gradsurg`` command.

``gradsurg compare`` trains single-task LoRA, joint LoRA and every requested gradient-surgery strategy
on a benchmark suite, with the same seeds, steps and batches, and reports the validation metrics, the
share of the single-task/joint gap each method recovers, and its cost (see
:mod:`gradsurg.bench.runner`). With no option it runs the ``embedded`` suite.

Exit status: 0 on success, 2 on a usage error (unknown suite or strategy, bad option value, missing
optional dependency, unwritable output folder), 130 when interrupted with Ctrl-C (the finished runs
stay cached and a partial report is written).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence

from gradsurg.bench.methods import GRANULARITIES
from gradsurg.bench.runner import DEFAULT_STRATEGIES, CompareOptions, run_compare
from gradsurg.bench.suites import SUITES
from gradsurg.errors import GradSurgError
from gradsurg.strategies.registry import list_strategies

__all__ = ["build_parser", "main"]

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer; found {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``gradsurg`` and its ``compare`` subcommand."""
    import gradsurg

    parser = argparse.ArgumentParser(
        prog="gradsurg", description="Multi-task gradient surgery for PyTorch: benchmark tools."
    )
    parser.add_argument("--version", action="version", version=f"gradsurg {gradsurg.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    suites = "; ".join(f"{name}: {cls.summary}" for name, cls in SUITES.items())
    compare = commands.add_parser(
        "compare",
        help="compare single-task LoRA, joint LoRA and gradient-surgery strategies on a benchmark suite",
        description=(
            "Train single-task LoRA (one adapter per task, the upper bound), joint LoRA "
            "(sum(losses).backward(), the baseline) and each strategy on a suite, with the same seeds, steps "
            "and batches; print and save (Markdown, CSV, JSON, PNG) the per-task validation metrics (mean ± std "
            "over seeds), the share of the single-task/joint gap each method recovers, its step time relative "
            "to joint LoRA and its peak memory. Finished runs are cached in the output folder, so a repeated or "
            "interrupted comparison only computes what is missing. Strategies that do not need LoRA factor "
            "groups (pcgrad, cagrad, ...) see all shared LoRA parameters as one flattened group, as in their "
            "papers; ortho_lora gets one group per LoRA factor per layer."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    compare.add_argument("--suite", default="embedded", help=f"benchmark suite, one of {', '.join(SUITES)} ({suites})")
    compare.add_argument(
        "--strategies",
        default=DEFAULT_STRATEGIES,
        help="comma-separated strategies to compare with joint and single-task LoRA; any registered name: "
        + ", ".join(list_strategies()),
    )
    compare.add_argument(
        "--granularity",
        choices=GRANULARITIES,
        default="flat",
        help="parameter groups of strategies that do not require LoRA factors: flat (one group of all shared "
        "LoRA parameters, as in the PCGrad/CAGrad papers), layer (one group per LoRA factor per layer, like "
        "ortho_lora), factor (all A factors, all B factors); ortho_lora always uses layer",
    )
    compare.add_argument(
        "--seeds",
        type=_int,
        default=None,
        help="number of seeds 0..N-1 (default: the suite's: 3; 1 with --quick; synthetic 2)",
    )
    compare.add_argument("--steps", type=_int, default=None, help="training steps per run (default: the suite's)")
    compare.add_argument(
        "--quick",
        action="store_true",
        help="the suite's small smoke-test configuration (embedded: < 2 min on 2 CPU cores)",
    )
    compare.add_argument("--device", default=None, help="torch device, cpu or cuda (default: cuda when available)")
    compare.add_argument(
        "--out",
        default=None,
        help="output folder for the report and the run cache (default: gradsurg-runs/<suite>[-quick])",
    )
    compare.add_argument(
        "--model",
        default=None,
        help="backbone folder or hub id (embedded: packaged all-MiniLM-L6-v2; glue: roberta-base)",
    )
    compare.add_argument(
        "--data-dir", default=None, help="glue only: folder of local GLUE files (mnli/, qqp/, sst2/) instead of the hub"
    )
    compare.add_argument("--threads", type=_int, default=None, help="torch CPU threads (default: torch's choice)")
    compare.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    compare.add_argument("--no-plots", action="store_true", help="do not draw the PNG plots")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gradsurg`` console script; returns the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(args_list)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    options = CompareOptions(
        suite=args.suite,
        strategies=args.strategies,
        granularity=args.granularity,
        seeds=args.seeds,
        steps=args.steps,
        quick=args.quick,
        device=args.device,
        out=args.out,
        model=args.model,
        data_dir=args.data_dir,
        threads=args.threads,
        progress=not args.no_progress,
        plots=not args.no_plots,
        command=shlex.join(["gradsurg", *args_list]),
    )
    try:
        outcome = run_compare(options)
    except GradSurgError as exc:
        print(f"gradsurg compare: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\nInterrupted.", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_INTERRUPTED if outcome.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
