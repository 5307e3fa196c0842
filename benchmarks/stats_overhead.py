"""Cost of the Surgeon's conflict statistics (``collect_stats=True`` vs ``False``) as a share of a step.

Same MiniLM + LoRA setup as ``train_step.py`` (see ``_minilm.py``), Ortho-LoRA with the segment
engine. Two measurements, interleaved:

* the whole step with statistics on and off — the share is ``(on − off) / on`` (noisy: the
  difference is small against a full forward and backward);
* the statistics alone — :func:`gradsurg.diagnostics.stats.group_stats` and ``split_stats`` on the
  step's batched Gram matrices of the same shapes (the exact extra work), as a share of the step.

Run: ``python benchmarks/stats_overhead.py [--quick]``.
"""

from __future__ import annotations

import torch
from _common import interleaved_medians, ms, print_table, step_arguments
from _minilm import build
from train_step import surgeon_variant

from gradsurg.adapters.peft import lora_groups
from gradsurg.diagnostics.stats import group_stats, split_stats


def main() -> None:
    args = step_arguments(__doc__.splitlines()[0], default_repeats=7)
    tasks, batch, seq, repeats, clock = args.tasks, args.batch, args.seq, args.repeats, args.clock
    setup = build(tasks, batch, seq)
    print(f"MiniLM-L6 + LoRA, {tasks} tasks x {batch} samples x {seq} tokens, ortho_lora, segment engine; {clock}")
    shapes: dict[tuple[int, ...], int] = {}
    for group in lora_groups(setup.model):
        size = sum(p.numel() for p in group.params)
        shapes[(size,)] = shapes.get((size,), 0) + 1
    grams = [torch.randn(count, tasks, tasks, dtype=torch.float64) for count in shapes.values()]
    grams = [g @ g.transpose(-1, -2) for g in grams]
    weights = [torch.rand(g.shape[0], tasks, dtype=torch.float64) for g in grams]

    def stats_only() -> None:
        for gram, w in zip(grams, weights):
            split_stats(group_stats(gram, weights=w))

    variants = {
        "step, stats on": surgeon_variant(setup, "ortho_lora", "segment", True, collect_stats=True),
        "step, stats off": surgeon_variant(setup, "ortho_lora", "segment", True, collect_stats=False),
        "statistics alone": stats_only,
    }
    times = interleaved_medians(variants, repeats=repeats, min_time=0.0)
    on, off, alone = times["step, stats on"], times["step, stats off"], times["statistics alone"]
    print_table(
        ["measurement", "ms", "share of the step"],
        [
            ["step, stats on", ms(on), 1.0],
            ["step, stats off", ms(off), off / on],
            ["difference (on - off)", ms(on - off), (on - off) / on],
            ["statistics alone", ms(alone), alone / on],
        ],
    )
    print(
        f"target: statistics < 2% of the step; measured {100 * alone / on:.2f}% (alone), "
        f"{100 * (on - off) / on:.2f}% (difference)"
    )


if __name__ == "__main__":
    main()
