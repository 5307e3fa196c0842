"""The interface every benchmark suite implements.

A suite is a recipe for a multi-task LoRA experiment: several classification **tasks**, each with its
own train and validation data, metric and head; a **backbone** shared by all tasks, adapted with one
LoRA adapter; and the **training settings** (steps, batch size per task, learning rate). It has two
halves:

* :class:`Suite` — cheap: a name, a JSON-able configuration (which is also the cache key of its
  runs) and a dependency check. Nothing is loaded.
* :class:`Workload` — what :meth:`Suite.prepare` returns once a run actually has to be computed: the
  loaded, tensorised task data and a factory :meth:`Workload.build_model` that builds a fresh
  :class:`MultiTaskModel` (the shared LoRA-adapted body plus one head per task) for a seed.

The runner never looks inside a suite beyond this interface, so a new suite is one module.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib.util
import sys
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from gradsurg.errors import InvalidOptionError, missing_dependency
from gradsurg.groups import ParamGroup

__all__ = [
    "METRICS",
    "MultiTaskModel",
    "Suite",
    "SuiteOverrides",
    "TaskData",
    "TrainConfig",
    "Workload",
    "reject_overrides",
    "require",
    "seeded_linear",
    "sub_seed",
    "with_steps",
]

#: The metrics a task may use: accuracy, binary F1 of class 1 (GLUE's QQP), and macro-averaged F1.
METRICS: tuple[str, ...] = ("accuracy", "f1", "macro_f1")


@dataclass(frozen=True)
class TrainConfig:
    """How every run of a suite is trained (the same for every method, so the comparison is fair).

    Attributes:
        steps: Optimizer steps. At every step each task of the run draws its **own** batch.
        batch_size: Examples per task per step (the paper uses 32).
        lr: Peak learning rate of AdamW (the paper uses 5e-4).
        weight_decay: AdamW's decoupled weight decay.
        warmup_steps: Steps of linear warm-up from 0 before the linear decay to 0 at ``steps``.
        eval_points: Number of validation evaluations, evenly spaced, the last one after the final
            step (its value is the run's result); the others draw the validation curves.
        probe_points: Number of steps, evenly spaced, at which the share of conflicting task pairs is
            measured (see :mod:`gradsurg.bench.conflicts`).
        eval_batch_size: Batch size of the validation passes (no gradients).
    """

    steps: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    warmup_steps: int = 0
    eval_points: int = 5
    probe_points: int = 20
    eval_batch_size: int = 256

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_points", "probe_points", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidOptionError(f"Training option `{name}` must be an int ≥ 1; found {name}={value!r}.")
        if not self.lr > 0:
            raise InvalidOptionError(f"Training option `lr` must be > 0; found lr={self.lr!r}.")
        if self.weight_decay < 0 or not 0 <= self.warmup_steps < self.steps:
            raise InvalidOptionError(
                "Training options must satisfy weight_decay ≥ 0 and 0 ≤ warmup_steps < steps; found "
                f"weight_decay={self.weight_decay!r}, warmup_steps={self.warmup_steps!r}, steps={self.steps!r}."
            )


@dataclass(frozen=True)
class SuiteOverrides:
    """Command-line options that change a suite's configuration (``None`` keeps the suite's default).

    Attributes:
        quick: Use the suite's small smoke-test configuration.
        steps: Training steps.
        model: Path (or hub id) of the backbone.
        data_dir: Folder of local data files (GLUE).
    """

    quick: bool = False
    steps: int | None = None
    model: str | None = None
    data_dir: str | None = None


@dataclass(frozen=True)
class TaskData:
    """One task, tensorised: inputs are dicts of tensors whose first dimension indexes examples.

    Attributes:
        name: The task's name (a column of the report).
        metric: One of :data:`METRICS`.
        num_classes: Number of classes of the task's head.
        train_inputs: Model inputs of the training examples, e.g. ``{"input_ids": ..., "attention_mask": ...}``.
        train_labels: ``Tensor[N_train]`` of class indices.
        val_inputs: Model inputs of the validation examples.
        val_labels: ``Tensor[N_val]`` of class indices.
    """

    name: str
    metric: str
    num_classes: int
    train_inputs: Mapping[str, Tensor]
    train_labels: Tensor
    val_inputs: Mapping[str, Tensor]
    val_labels: Tensor

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise InvalidOptionError(f"Metric of task {self.name!r} must be one of {METRICS}; found {self.metric!r}.")
        for split, inputs, labels in (
            ("train", self.train_inputs, self.train_labels),
            ("validation", self.val_inputs, self.val_labels),
        ):
            sizes = {k: v.shape[0] for k, v in inputs.items()}
            if not sizes or len(labels) == 0 or set(sizes.values()) != {len(labels)}:
                raise InvalidOptionError(
                    f"The {split} split of task {self.name!r} must hold at least one example, with one label "
                    f"per example in every input; found input sizes {sizes} and {len(labels)} labels."
                )


class MultiTaskModel(nn.Module):
    """A shared, LoRA-adapted body and one head per task: ``logits = head_t(body(inputs))``.

    Args:
        body: Maps a batch of inputs (a dict of tensors) to features ``Tensor[B, H]``. Its trainable
            parameters are the shared LoRA parameters; it must contain PEFT LoRA layers so that
            :meth:`lora_groups` can find the factors.
        heads: One module per task mapping features to logits.
    """

    def __init__(self, body: nn.Module, heads: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.body = body
        self.heads = nn.ModuleDict(dict(heads))

    def forward(self, task: str, inputs: Mapping[str, Tensor]) -> Tensor:
        """Logits ``Tensor[B, C_task]`` of ``task`` for a batch of inputs."""
        out: Tensor = self.heads[task](self.body(inputs))
        return out

    def shared_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters every task shares (the LoRA adapter), in module order."""
        return [p for p in self.body.parameters() if p.requires_grad]

    def lora_groups(self, granularity: str) -> list[ParamGroup]:
        """LoRA factor groups of the body (see :func:`gradsurg.adapters.peft.lora_groups`)."""
        from gradsurg.adapters.peft import lora_groups

        return lora_groups(self.body, granularity=granularity)  # type: ignore[arg-type]


class Workload(abc.ABC):
    """A prepared suite: tensorised task data on the run device and a model factory.

    Attributes:
        tasks: The tasks, in report order.
    """

    tasks: tuple[TaskData, ...]

    def task(self, name: str) -> TaskData:
        """The task called ``name``."""
        for task in self.tasks:
            if task.name == name:
                return task
        raise KeyError(name)

    @abc.abstractmethod
    def build_model(self, seed: int) -> MultiTaskModel:
        """A fresh model on the run device: the same LoRA and head initialisation for the same seed.

        Every method and every single-task run of one seed must start from identical weights, so
        that the comparison only differs by how the task gradients are combined.
        """


class Suite(abc.ABC):
    """A benchmark suite: tasks, backbone, LoRA settings and training settings.

    Subclasses set :attr:`name` and :attr:`summary`, set :attr:`train` and :attr:`seeds` on instances, and
    implement
    :meth:`from_overrides`, :meth:`config`, :meth:`task_metrics`, :meth:`check_dependencies` and
    :meth:`prepare`.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    train: TrainConfig
    seeds: int

    @classmethod
    @abc.abstractmethod
    def from_overrides(cls, overrides: SuiteOverrides) -> Suite:
        """The suite with its default (or ``--quick``) configuration and the given overrides applied.

        Raises:
            InvalidOptionError: An override does not apply to this suite.
        """

    @abc.abstractmethod
    def config(self) -> dict[str, Any]:
        """The complete configuration as JSON-able data (it keys the run cache and is reported)."""

    @abc.abstractmethod
    def task_metrics(self) -> dict[str, str]:
        """``{task name: metric}`` in report order (known without loading any data)."""

    def task_names(self) -> tuple[str, ...]:
        """The task names, in report order."""
        return tuple(self.task_metrics())

    @abc.abstractmethod
    def check_dependencies(self) -> None:
        """Raise :class:`~gradsurg.MissingDependencyError` if an optional package the suite needs is missing."""

    @abc.abstractmethod
    def prepare(self, device: torch.device) -> Workload:
        """Load the data and the backbone (the expensive part; only called when a run must be computed)."""


def reject_overrides(suite: str, overrides: SuiteOverrides, *names: str) -> None:
    """Raise :class:`InvalidOptionError` if one of the named overrides is set for a suite that ignores it."""
    for name in names:
        value = getattr(overrides, name)
        if value is not None:
            option = "--" + name.replace("_", "-")
            raise InvalidOptionError(
                f"Option `{option}` does not apply to the {suite!r} suite; found {option}={value!r}."
            )


def with_steps(train: TrainConfig, steps: int | None) -> TrainConfig:
    """``train`` with ``steps`` replaced (warm-up capped to stay below it), or unchanged for ``None``."""
    if steps is None:
        return train
    return dataclasses.replace(train, steps=steps, warmup_steps=min(train.warmup_steps, max(0, steps - 1)))


def require(feature: str, extra: str, *modules: str) -> None:
    """Raise :class:`~gradsurg.MissingDependencyError` for the first of ``modules`` that cannot be imported.

    Only looks the modules up (``importlib.util.find_spec``); nothing is imported.

    Args:
        feature: What needs them, e.g. ``"the 'embedded' suite"``.
        extra: The pip extra that installs them, e.g. ``"bench"``.
        modules: Top-level module names.
    """
    for module in modules:
        if _missing(module):
            raise missing_dependency(module, extra, feature)


def _missing(module: str) -> bool:
    if module in sys.modules:
        return sys.modules[module] is None
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):
        return True


def sub_seed(seed: int, *salt: str) -> int:
    """A 63-bit seed derived from ``seed`` and the strings ``salt`` (stable across runs and platforms)."""
    return (seed * 1_000_003 + zlib.crc32("/".join(salt).encode())) % (2**63)


def seeded_linear(in_features: int, out_features: int, seed: int, *salt: str) -> nn.Linear:
    """An ``nn.Linear`` with PyTorch's default initialisation drawn from a generator seeded by ``(seed, salt)``.

    Used for task heads, so that task ``t``'s head starts from the same weights in its single-task
    run and in every multi-task run of the same seed.
    """
    layer = nn.Linear(in_features, out_features)
    generator = torch.Generator().manual_seed(sub_seed(seed, *salt))
    bound = 1.0 / in_features**0.5
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound, generator=generator)
        layer.bias.uniform_(-bound, bound, generator=generator)
    return layer
