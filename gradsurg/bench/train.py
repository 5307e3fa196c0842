"""One benchmark run: train a fresh model with one method and seed, evaluate, time and measure it.

Every run of a seed starts from the same weights (:meth:`~gradsurg.bench.suites.base.Workload.build_model`)
and sees, for each of its tasks, the same sequence of batches (a :class:`BatchStream` seeded by the
seed and the task name only), so methods differ only in how the task gradients are combined.

One step: each task of the run draws its own batch, computes its cross-entropy loss with its own
head; the method writes ``.grad`` (:func:`~gradsurg.bench.methods.make_backward`); AdamW steps; the
learning rate follows a linear warm-up and a linear decay to 0. The step time is the wall time of
forward, backward and optimizer step (the conflict probe is excluded); the run reports the median
over its steps after the first. The peak memory covers the training steps (model construction
included), not the evaluation passes nor the conflict probe.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from gradsurg.bench.conflicts import conflict_share, task_gradients
from gradsurg.bench.memory import PeakMemory
from gradsurg.bench.methods import JOINT, Method, make_backward
from gradsurg.bench.metrics import score
from gradsurg.bench.suites.base import MultiTaskModel, TaskData, TrainConfig, Workload, sub_seed

__all__ = ["BatchStream", "Progress", "RunResult", "RunSpec", "evaluate", "train_run", "warm_up"]


class Progress(Protocol):
    """What a run reports its progress to (a ``tqdm`` bar satisfies it)."""

    def update(self, n: int = 1) -> Any: ...


@dataclass(frozen=True)
class RunSpec:
    """One run: a method, the tasks it trains (one for a single-task run) and a seed."""

    method: Method
    tasks: tuple[str, ...]
    seed: int

    @property
    def label(self) -> str:
        """Short description, e.g. ``"pcgrad, seed 1"`` or ``"single-task sst2, seed 0"``."""
        what = f"single-task {self.tasks[0]}" if self.method.name == "single" else self.method.key
        return f"{what}, seed {self.seed}"


@dataclass(frozen=True)
class RunResult:
    """Everything one run measured (stored as JSON in the run cache).

    Attributes:
        method: :attr:`Method.key`.
        tasks: The tasks trained.
        seed: The seed.
        final: Validation metric of each task after the last step (in ``[0, 1]``).
        eval_steps: Steps after which the validation metric was measured.
        curves: Validation metric of each task at each of ``eval_steps``.
        probe_steps: Steps at which the share of conflicting task pairs was measured.
        conflict_share: That share at each of ``probe_steps`` (empty for single-task runs).
        step_time_s: Median wall time of one training step, probe excluded.
        train_time_s: Wall time of the whole run, evaluation included.
        peak_memory_bytes: Peak memory above the level at the run's start (see
            :mod:`gradsurg.bench.memory`), or ``None`` where it cannot be measured.
        memory_kind: What ``peak_memory_bytes`` measures.
        device: The device the run used.
    """

    method: str
    tasks: tuple[str, ...]
    seed: int
    final: dict[str, float]
    eval_steps: tuple[int, ...]
    curves: dict[str, list[float]]
    probe_steps: tuple[int, ...]
    conflict_share: list[float]
    step_time_s: float
    train_time_s: float
    peak_memory_bytes: int | None
    memory_kind: str
    device: str

    def to_json(self) -> dict[str, Any]:
        """JSON-able form (tuples become lists)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunResult:
        """Inverse of :meth:`to_json`."""
        values = dict(data)
        for name in ("tasks", "eval_steps", "probe_steps"):
            values[name] = tuple(values[name])
        return cls(**values)


class BatchStream(Iterator[Tensor]):
    """Endless mini-batches of example indices of one task, reshuffled every epoch.

    The order depends only on ``(seed, task)``: a generator seeded by both draws one permutation of
    ``range(size)`` per epoch, and batches are consecutive slices of the concatenated permutations
    (so every batch has exactly ``batch_size`` indices, also across epoch boundaries).
    """

    def __init__(self, size: int, batch_size: int, seed: int, task: str) -> None:
        self._size = size
        self._batch_size = batch_size
        self._generator = torch.Generator().manual_seed(sub_seed(seed, "batches", task))
        self._buffer = torch.empty(0, dtype=torch.long)

    def __next__(self) -> Tensor:
        while self._buffer.numel() < self._batch_size:
            self._buffer = torch.cat([self._buffer, torch.randperm(self._size, generator=self._generator)])
        batch, self._buffer = self._buffer[: self._batch_size], self._buffer[self._batch_size :]
        return batch


@torch.no_grad()
def evaluate(model: MultiTaskModel, task: TaskData, batch_size: int) -> float:
    """The task's validation metric (model in eval mode, no gradients; train mode is restored)."""
    was_training = model.training
    model.eval()
    predictions = []
    size = len(task.val_labels)
    for start in range(0, size, batch_size):
        inputs = {k: v[start : start + batch_size] for k, v in task.val_inputs.items()}
        predictions.append(model(task.name, inputs).argmax(dim=-1))
    model.train(was_training)
    return score(task.metric, torch.cat(predictions), task.val_labels, task.num_classes)


def _evenly_spaced(count: int, steps: int) -> list[int]:
    """``count`` distinct step counts in ``[1, steps]``, evenly spaced, ending at ``steps``."""
    return sorted({max(1, round(steps * k / count)) for k in range(1, count + 1)})


def _lr_lambda(config: TrainConfig) -> Any:
    """Linear warm-up to the peak over ``warmup_steps``, then linear decay to 0 at ``steps``."""

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        return max(0.0, (config.steps - step) / (config.steps - config.warmup_steps))

    return factor


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_run(
    workload: Workload, spec: RunSpec, config: TrainConfig, device: torch.device, progress: Progress | None = None
) -> RunResult:
    """Train, evaluate and measure one run.

    Args:
        workload: The prepared suite.
        spec: Method, tasks and seed.
        config: Training settings.
        device: Where the workload's tensors live.
        progress: Receives ``update(1)`` after every step.
    """
    started = time.perf_counter()
    tasks = [workload.task(name) for name in spec.tasks]
    with PeakMemory(device) as memory:
        model = workload.build_model(spec.seed)
        model.train()
        torch.manual_seed(sub_seed(spec.seed, "dropout"))
        stepper = make_backward(spec.method, model, spec.seed, spec.tasks)
        trainable = [p for p in model.parameters() if p.requires_grad] + stepper.parameters
        optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config))
        shared = model.shared_parameters()
        streams = {t.name: BatchStream(len(t.train_labels), config.batch_size, spec.seed, t.name) for t in tasks}
        eval_steps = _evenly_spaced(config.eval_points, config.steps)
        probe_steps = sorted({int(k * config.steps / config.probe_points) for k in range(config.probe_points)})
        probing = len(tasks) > 1
        curves: dict[str, list[float]] = {t.name: [] for t in tasks}
        conflicts: list[float] = []
        step_times: list[float] = []
        for step in range(config.steps):
            _sync(device)
            tick = time.perf_counter()
            losses = {}
            batches = {}
            for task in tasks:
                index = next(streams[task.name]).to(device)
                batches[task.name] = ({k: v[index] for k, v in task.train_inputs.items()}, task.train_labels[index])
                losses[task.name] = F.cross_entropy(model(task.name, batches[task.name][0]), batches[task.name][1])
            probe_time = 0.0
            if probing and step in probe_steps:
                _sync(device)
                probe_start = time.perf_counter()
                with memory.excluded():
                    conflicts.append(conflict_share(task_gradients(list(losses.values()), shared)))
                _sync(device)
                probe_time = time.perf_counter() - probe_start
            stepper.backward(losses)
            optimizer.step()
            if stepper.needs_post_step_losses and stepper.surgeon is not None:
                with torch.no_grad():  # FAMO: the same batches' losses under the new parameters
                    after = {name: F.cross_entropy(model(name, x), y) for name, (x, y) in batches.items()}
                stepper.surgeon.update(after)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            _sync(device)
            step_times.append(time.perf_counter() - tick - probe_time)
            if step + 1 in eval_steps:
                with memory.excluded():
                    for task in tasks:
                        curves[task.name].append(evaluate(model, task, config.eval_batch_size))
            if progress is not None:
                progress.update(1)
    timed = step_times[1:] or step_times
    return RunResult(
        method=spec.method.key,
        tasks=spec.tasks,
        seed=spec.seed,
        final={name: values[-1] for name, values in curves.items()},
        eval_steps=tuple(eval_steps),
        curves=curves,
        probe_steps=tuple(probe_steps) if probing else (),
        conflict_share=conflicts,
        step_time_s=statistics.median(timed),
        train_time_s=time.perf_counter() - started,
        peak_memory_bytes=memory.peak_bytes,
        memory_kind=memory.kind,
        device=str(device),
    )


def warm_up(workload: Workload, config: TrainConfig, device: torch.device) -> None:
    """One throwaway joint training step and evaluation, before any measured run.

    Lazy imports, kernel and allocator initialisation then happen here rather than inside the first
    run, whose step time and peak memory would otherwise include them.
    """
    spec = RunSpec(Method(JOINT), tuple(t.name for t in workload.tasks), 0)
    train_run(
        workload, spec, dataclasses.replace(config, steps=1, warmup_steps=0, eval_points=1, probe_points=1), device
    )
