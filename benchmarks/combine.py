"""Combine step alone: gradsurg's Gram-space strategies vs TorchJD's aggregators vs the bandwidth floor.

For every ``T`` (tasks) and ``n`` (parameters of one group) a random ``G[T, n]`` (float32, CPU)
with conflicting rows is combined by

* gradsurg — ``strategy.apply(G, Context(...))``, the path the Surgeon takes (the finite check
  is the Surgeon's, done once per step, and left out here);
* TorchJD — ``aggregator(G)`` (``torchjd.aggregation``);
* the floor — ``G @ G.T`` plus ``w @ G``: the two passes over ``G`` any Gram-space method needs.

Printed per row: times (ms), ``TorchJD / gradsurg`` (speed-up) and ``gradsurg / floor``, and the
relative difference of the two directions. Results are checked to 1e-5 for PCGrad
(``shuffle=False`` against TorchJD with its ``torch.randperm`` patched to the identity, i.e. both
visit the other tasks in index order) and CAGrad (``c = 0.4``, ``rescale=0``, TorchJD's scale; the
``rel. diff`` of the CAGrad rows is to a float64 SLSQP reference on the same Gram matrix, as TorchJD's Clarabel solve is
itself ~2e-5 away from it, both printed above the table); other pairs are shown for information
(their defaults may differ). Run: ``python benchmarks/combine.py [--quick]``.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from _common import interleaved_medians, ms, print_table, setup_clock

import gradsurg as gs
from gradsurg.strategies.base import Context

# gradsurg name and options -> TorchJD aggregator class name and arguments; `checked`: results must agree.
PAIRS: list[tuple[str, dict[str, Any], str, dict[str, Any], bool]] = [
    ("pcgrad", {"shuffle": False}, "PCGrad", {}, True),
    ("cagrad", {"c": 0.4, "rescale": 0}, "CAGrad", {"c": 0.4}, True),
    ("mgda", {}, "MGDA", {}, False),
    ("upgrad", {}, "UPGrad", {}, False),
    ("dualproj", {}, "DualProj", {}, False),
    ("imtl_g", {}, "IMTLG", {}, False),
    ("aligned_mtl", {}, "AlignedMTL", {}, False),
]
TOLERANCE = 1e-5


@contextlib.contextmanager
def index_order() -> Iterator[None]:
    """Make ``torch.randperm`` return the identity (TorchJD's PCGrad then visits tasks in index order)."""
    original = torch.randperm
    torch.randperm = lambda n, *args, **kwargs: torch.arange(n)  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.randperm = original


def gradient_matrix(tasks: int, size: int, seed: int) -> torch.Tensor:
    """``G[T, n]``: a shared component plus task-specific ones, with a few rows flipped (conflicts)."""
    generator = torch.Generator().manual_seed(seed)
    shared = torch.randn(1, size, generator=generator)
    rows = 0.6 * shared + torch.randn(tasks, size, generator=generator)
    rows[1::3] *= -0.5
    return rows * torch.rand(tasks, 1, generator=generator).add(0.5)


def torchjd_aggregator(name: str, options: dict[str, Any]) -> tuple[Callable[[torch.Tensor], torch.Tensor] | None, str]:
    try:
        import torchjd.aggregation as aggregation
    except ImportError:
        return None, "torchjd not installed (pip install 'gradsurg[bench]')"
    cls = getattr(aggregation, name, None)
    if cls is None:
        return None, f"torchjd has no {name}"
    try:
        return cls(**options), ""
    except ImportError as exc:  # CAGrad needs cvxpy + clarabel
        return None, f"TorchJD {name} skipped: {str(exc).splitlines()[0]}"


def combiner(strategy: gs.Strategy, grads: torch.Tensor) -> Callable[[], torch.Tensor]:
    """gradsurg's combine of ``grads`` as the Surgeon runs it (no finite check; a fresh seeded generator)."""

    def run() -> torch.Tensor:
        context = Context(generator=torch.Generator().manual_seed(0))
        return strategy.apply(grads, context).direction

    return run


def cagrad_reference(grads: torch.Tensor, c: float) -> torch.Tensor | None:
    """CAGrad's direction (``rescale=0``) from SciPy's SLSQP in float64 at tight tolerance (None without SciPy).

    The dual is solved on the float32 Gram matrix that gradsurg and TorchJD see, so the check
    measures the solvers, not float32 rounding of ``G Gᵀ`` (about 1e-5 relative at ``n = 1e6``).
    """
    try:
        from scipy.optimize import minimize
    except ImportError:
        return None
    g = grads.double()
    gram = (grads @ grads.T).double().numpy()  # the float32 Gram matrix both libraries start from
    k = gram / gram.diagonal().mean()
    b, phi, tasks = k.mean(axis=1), c * float(k.mean()) ** 0.5, len(gram)
    result = minimize(
        lambda w: b @ w + phi * max(float(w @ k @ w), 0.0) ** 0.5,
        [1.0 / tasks] * tasks,
        method="SLSQP",
        bounds=[(0.0, 1.0)] * tasks,
        constraints=({"type": "eq", "fun": lambda w: w.sum() - 1.0},),
        options={"ftol": 1e-15, "maxiter": 2000},
    )
    w = torch.from_numpy(result.x)
    gw = w @ g
    g0 = g.mean(dim=0)
    return g0 + c * g0.norm() / gw.norm() * gw


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds")
    parser.add_argument("--tasks", type=int, nargs="*", default=None)
    parser.add_argument("--sizes", type=float, nargs="*", default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--wall", action="store_true", help="wall-clock time with torch's default threads")
    args = parser.parse_args()
    tasks_list = args.tasks or ([2, 4] if args.quick else [2, 4, 8, 16])
    sizes = [int(s) for s in (args.sizes or ([1e3] if args.quick else [1e4, 1e6]))]
    repeats = args.repeats or (3 if args.quick else 7)
    min_time = 0.005 if args.quick else 0.05
    registered = set(gs.list_strategies())
    clock = setup_clock(args.wall)
    print(f"torch {torch.__version__}, float32, CPU, {clock}; medians of {repeats} interleaved repeats")
    notes: set[str] = set()
    rows = []
    failures = []
    for size in sizes:
        for tasks in tasks_list:
            grads = gradient_matrix(tasks, size, seed=tasks)
            weights = torch.rand(tasks)
            variants: dict[str, Callable[[], object]] = {
                "floor": lambda g=grads, w=weights: (g @ g.T, w @ g),
            }
            pairs = []
            for name, options, jd_name, jd_options, checked in PAIRS:
                if name not in registered:
                    notes.add(f"gradsurg strategy {name!r} not registered: skipped")
                    continue
                strategy = gs.get_strategy(name, **options)
                ours = combiner(strategy, grads)
                theirs, why = torchjd_aggregator(jd_name, jd_options)
                if why:
                    notes.add(why)
                variants[f"gs:{name}"] = ours
                if theirs is not None:
                    variants[f"jd:{name}"] = lambda a=theirs, g=grads: a(g)
                pairs.append((name, ours, theirs, checked))
            times = interleaved_medians(variants, repeats=repeats, min_time=min_time)
            floor = times["floor"]
            for name, ours, theirs, checked in pairs:
                difference = float("nan")
                got = ours()
                if theirs is not None:
                    with index_order():
                        expected = theirs(grads)
                    difference = relative(got, expected)
                if name == "cagrad":  # checked against a float64 reference: TorchJD's Clarabel stops at ~2e-5
                    reference = cagrad_reference(grads, c=0.4)
                    if reference is not None:
                        jd_note = "" if theirs is None else f", TorchJD {relative(expected, reference):.1e}"
                        difference = relative(got, reference)
                        print(f"cagrad T={tasks} n={size:.0e}: vs SLSQP float64 gradsurg {difference:.1e}{jd_note}")
                if checked and not difference <= TOLERANCE:
                    failures.append(f"{name} T={tasks} n={size}: relative difference {difference:.2e}")
                jd_time = times.get(f"jd:{name}", float("nan"))
                ours_time = times[f"gs:{name}"]
                rows.append(
                    [
                        name,
                        tasks,
                        f"{size:.0e}",
                        ms(ours_time),
                        ms(jd_time),
                        ms(floor),
                        jd_time / ours_time,
                        ours_time / floor,
                        difference,
                    ]
                )
    print_table(
        [
            "strategy",
            "T",
            "n",
            "gradsurg ms",
            "TorchJD ms",
            "floor ms",
            "TorchJD/gradsurg",
            "gradsurg/floor",
            "rel. diff",
        ],
        rows,
    )
    for note in sorted(notes):
        print("note:", note)
    for failure in failures:
        print("RESULT MISMATCH:", failure)
    print(f"results checked (pcgrad, cagrad) to {TOLERANCE:g} relative: {'FAILED' if failures else 'ok'}")


if __name__ == "__main__":
    main()
