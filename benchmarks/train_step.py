"""One training step on MiniLM + LoRA with 3–4 tasks: joint LoRA vs gradsurg (every engine) vs TorchJD vs a loop.

Every variant runs the same forward pass over the concatenated batch of all tasks, then:

* ``joint`` — ``sum(losses).backward()`` (plain multi-task LoRA, the reference);
* ``gs:<strategy>:<engine>[:nobatch]`` — ``surgeon.backward(losses, task_ids=...)`` with the LoRA
  factor groups (:func:`gradsurg.adapters.peft.lora_groups`), the given engine, statistics and the
  finite check on (the defaults), ``batch_groups`` on unless ``:nobatch``;
* ``torchjd:pcgrad`` — ``torchjd.autojac.mtl_backward`` (Jacobian of the LoRA parameters) then
  ``jac_to_grad(..., PCGrad())`` on all LoRA parameters as one matrix;
* ``loop:pcgrad`` — LibMTL-style: one ``autograd.grad`` per task with ``retain_graph``, PCGrad in a
  Python loop over flattened gradients, write ``.grad``.

Reported: median time per step and peak memory of a step, both as ratios to ``joint``. Memory is the
growth of the process's peak resident set size during one step (``VmHWM`` after resetting it,
minus ``VmRSS`` before; glibc's mmap threshold is pinned so freed tensors leave the RSS), i.e. the
step's transient CPU memory: activations kept for backward, gradients, per-task copies.
Run: ``python benchmarks/train_step.py [--quick] [--tasks 4 --batch 8 --seq 32]``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from _common import (
    Variant,
    interleaved_medians,
    ms,
    peak_rss_growth_mib,
    print_table,
    reexec_with_mmap_threshold,
    step_arguments,
)
from _minilm import Setup, build

import gradsurg as gs
from gradsurg.adapters.peft import lora_groups


def joint_step(setup: Setup) -> None:
    setup.zero_grad()
    torch.stack(setup.losses()).sum().backward()


def surgeon_variant(
    setup: Setup, strategy: str, engine: str, batch_groups: bool, *, collect_stats: bool = True
) -> Variant:
    """A gradsurg step; the Surgeon (and the segment engine's hooks) live only during a timed block."""
    holder: list[gs.Surgeon] = []

    def open_() -> None:
        holder.append(
            gs.Surgeon(
                lora_groups(setup.model),
                strategy,
                seed=0,
                engine=engine,
                model=setup.model,
                batch_groups=batch_groups,
                collect_stats=collect_stats,
            )
        )

    def run() -> None:
        setup.zero_grad()
        holder[0].backward(setup.losses(), task_ids=setup.task_ids if engine == "segment" else None)

    def close() -> None:
        holder.pop().close()

    return Variant(run, open_, close)


def torchjd_step(setup: Setup) -> Callable[[], None] | None:
    try:
        from torchjd.aggregation import PCGrad
        from torchjd.autojac import jac_to_grad, mtl_backward
    except ImportError:
        return None
    aggregator = PCGrad()
    shared = setup.lora_parameters()

    def run() -> None:
        setup.zero_grad()
        features = setup.features()
        mtl_backward(
            setup.losses(features),
            features=features,
            tasks_params=[list(h.parameters()) for h in setup.heads],
            shared_params=shared,
        )
        jac_to_grad(shared, aggregator)

    return run


def loop_step(setup: Setup) -> Callable[[], None]:
    """LibMTL-style: per-task backward with ``retain_graph``, PCGrad over flattened gradients."""
    shared = setup.lora_parameters()
    heads = list(setup.heads.parameters())

    def run() -> None:
        setup.zero_grad()
        losses = setup.losses()
        rows = []
        head_grads = [torch.zeros_like(p) for p in heads]
        for t, loss in enumerate(losses):
            grads = torch.autograd.grad(loss, shared + heads, retain_graph=t < len(losses) - 1, allow_unused=True)
            rows.append(torch.cat([g.reshape(-1) for g in grads[: len(shared)]]))
            for acc, g in zip(head_grads, grads[len(shared) :]):
                if g is not None:
                    acc += g
        matrix = torch.stack(rows)
        projected = matrix.clone()
        for i in range(len(rows)):
            for j in torch.randperm(len(rows)).tolist():
                dot = projected[i] @ matrix[j]
                if j != i and dot < 0:
                    projected[i] -= dot * matrix[j] / matrix[j].norm().pow(2)
        direction = projected.sum(dim=0)
        offset = 0
        for p in shared:
            p.grad = direction[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        for p, g in zip(heads, head_grads):
            p.grad = g

    return run


def variants(setup: Setup, quick: bool) -> dict[str, Callable[[], object] | Variant]:
    result: dict[str, Callable[[], object] | Variant] = {"joint": lambda: joint_step(setup)}
    engines = ("segment", "loop") if quick else ("segment", "batched", "loop")
    for engine in engines:
        for batch_groups in (True,) if quick else (True, False):
            suffix = "" if batch_groups else ":nobatch"
            result[f"gs:ortho_lora:{engine}{suffix}"] = surgeon_variant(setup, "ortho_lora", engine, batch_groups)
        if not quick:
            result[f"gs:pcgrad:{engine}"] = surgeon_variant(setup, "pcgrad", engine, True)
    jd = torchjd_step(setup)
    if jd is not None:
        result["torchjd:pcgrad"] = jd
    result["loop:pcgrad"] = loop_step(setup)
    return result


def usable(name: str, variant: Callable[[], object] | Variant) -> str:
    """Empty when one step runs, else why not (e.g. an operation without vmap support)."""
    v = variant if isinstance(variant, Variant) else Variant(variant)
    v.setup()
    try:
        v.run()
        return ""
    except Exception as exc:  # report and skip the variant
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    finally:
        v.teardown()


def ratio(value: float, reference: float) -> float:
    return value / reference if reference > 0 else float("nan")


def main() -> None:
    args = step_arguments(__doc__.splitlines()[0], default_repeats=5)
    tasks, batch, seq, repeats, clock = args.tasks, args.batch, args.seq, args.repeats, args.clock
    setup = build(tasks, batch, seq)
    print(
        f"MiniLM-L6 + LoRA r=8 on query/value (24 groups), {tasks} tasks x {batch} samples x {seq} tokens; "
        f"{clock}; medians of {repeats} interleaved repeats"
    )
    candidates = variants(setup, args.quick)
    runnable = {}
    for name, variant in candidates.items():
        why = usable(name, variant)
        if why:
            print(f"note: {name} skipped ({why})")
        else:
            runnable[name] = variant
    times = interleaved_medians(runnable, repeats=repeats, min_time=0.0)
    memory = {}
    for name, variant in runnable.items():
        v = variant if isinstance(variant, Variant) else Variant(variant)
        v.setup()
        try:
            memory[name] = peak_rss_growth_mib(v.run)
        finally:
            v.teardown()
    rows = [
        [name, ms(times[name]), times[name] / times["joint"], memory[name], ratio(memory[name], memory["joint"])]
        for name in runnable
    ]
    print_table(["variant", "ms/step", "time / joint", "peak MiB", "memory / joint"], rows)
    target = times.get("gs:ortho_lora:segment", float("nan")) / times["joint"]
    print(f"target: full ortho_lora step with the segment engine <= 1.05x joint; measured {target:.3f}x")


if __name__ == "__main__":
    reexec_with_mmap_threshold()
    main()
