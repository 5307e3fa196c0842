"""The ``synthetic`` suite: a tiny frozen MLP with a shared LoRA adapter and planted competing tasks.

Seconds long; it exists to test the whole comparison pipeline end to end, not to rank methods.

Data: inputs ``x ~ N(0, I_d)``; task ``t`` labels ``y_t = [x_t > 0]`` (the sign of the ``t``-th
coordinate, so the teachers of the tasks are orthogonal). The backbone is a frozen random two-layer
MLP ``h = tanh(W₂ tanh(W₁ x))`` whose output is narrower (``bottleneck``) than the number of tasks;
LoRA (PEFT, rank ``rank``) adapts ``W₁`` and ``W₂``, and each task has its own linear head on ``h``. A
single-task adapter can devote the bottleneck to its own coordinate, while a shared adapter must
split it between the tasks: the tasks compete for the shared parameters, so joint training shows
negative transfer by construction. The data and the frozen weights are fixed by ``data_seed``; the
run seed only changes the LoRA and head initialisation, the batch order and dropout.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from gradsurg.bench.suites.base import (
    MultiTaskModel,
    Suite,
    SuiteOverrides,
    TaskData,
    TrainConfig,
    Workload,
    reject_overrides,
    require,
    seeded_linear,
    sub_seed,
    with_steps,
)

__all__ = ["SyntheticConfig", "SyntheticSuite"]


@dataclass(frozen=True)
class SyntheticConfig:
    """Sizes of the synthetic suite.

    Attributes:
        tasks: Number of tasks (at most ``inputs``).
        inputs: Input dimension ``d``.
        hidden: Width of the first layer.
        bottleneck: Width of the backbone's output ``h``.
        rank: LoRA rank on both layers.
        lora_alpha: LoRA scaling numerator (the update is ``alpha / rank · B A``).
        train_size: Training examples per task.
        val_size: Validation examples per task.
        data_seed: Seed of the data and of the frozen weights.
        train: Training settings.
    """

    tasks: int = 3
    inputs: int = 8
    hidden: int = 16
    bottleneck: int = 2
    rank: int = 2
    lora_alpha: int = 4
    train_size: int = 512
    val_size: int = 512
    data_seed: int = 0
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=60, batch_size=32, lr=2e-2, eval_points=4, probe_points=10)
    )


class _Trunk(nn.Module):
    """The frozen backbone ``h = tanh(W₂ tanh(W₁ x))``."""

    def __init__(self, inputs: int, hidden: int, bottleneck: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(inputs, hidden)
        self.fc2 = nn.Linear(hidden, bottleneck)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.fc2(torch.tanh(self.fc1(x))))


class _Body(nn.Module):
    """Adapts the PEFT-wrapped trunk to the suite interface (``inputs["x"]`` → features)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, inputs: Mapping[str, Tensor]) -> Tensor:
        out: Tensor = self.net(inputs["x"])
        return out


class _SyntheticWorkload(Workload):
    def __init__(self, config: SyntheticConfig, device: torch.device) -> None:
        self._config = config
        self._device = device
        generator = torch.Generator().manual_seed(config.data_seed)
        self._trunk = _Trunk(config.inputs, config.hidden, config.bottleneck)
        with torch.no_grad():
            for p in self._trunk.parameters():
                p.normal_(0.0, p.shape[-1] ** -0.5 if p.dim() > 1 else 0.1, generator=generator)
        self.tasks = tuple(self._task(t, generator) for t in range(config.tasks))

    def _task(self, t: int, generator: torch.Generator) -> TaskData:
        c = self._config
        x_train = torch.randn(c.train_size, c.inputs, generator=generator)
        x_val = torch.randn(c.val_size, c.inputs, generator=generator)
        return TaskData(
            name=f"task{t}",
            metric="accuracy",
            num_classes=2,
            train_inputs={"x": x_train.to(self._device)},
            train_labels=(x_train[:, t] > 0).long().to(self._device),
            val_inputs={"x": x_val.to(self._device)},
            val_labels=(x_val[:, t] > 0).long().to(self._device),
        )

    def build_model(self, seed: int) -> MultiTaskModel:
        from peft import LoraConfig, get_peft_model

        c = self._config
        torch.manual_seed(sub_seed(seed, "lora"))
        lora = LoraConfig(r=c.rank, lora_alpha=c.lora_alpha, target_modules=["fc1", "fc2"], lora_dropout=0.0)
        body = _Body(get_peft_model(copy.deepcopy(self._trunk), lora))
        heads = {
            task.name: seeded_linear(c.bottleneck, task.num_classes, seed, "head", task.name) for task in self.tasks
        }
        return MultiTaskModel(body, heads).to(self._device)


class SyntheticSuite(Suite):
    """Tiny planted-conflict suite for tests (see the module docstring)."""

    name = "synthetic"
    summary = "tiny frozen MLP + shared LoRA, planted competing tasks; seconds long, for tests"

    def __init__(self, config: SyntheticConfig | None = None, *, seeds: int = 2) -> None:
        self.settings = config or SyntheticConfig()
        self.train = self.settings.train
        self.seeds = seeds

    @classmethod
    def from_overrides(cls, overrides: SuiteOverrides) -> SyntheticSuite:
        reject_overrides(cls.name, overrides, "model", "data_dir")
        config = SyntheticConfig()
        if overrides.quick:
            config = dataclasses.replace(config, train=dataclasses.replace(config.train, steps=30))
        return cls(
            dataclasses.replace(config, train=with_steps(config.train, overrides.steps)),
            seeds=1 if overrides.quick else 2,
        )

    def config(self) -> dict[str, Any]:
        return {"suite": self.name, **dataclasses.asdict(self.settings)}

    def task_metrics(self) -> dict[str, str]:
        return {f"task{t}": "accuracy" for t in range(self.settings.tasks)}

    def check_dependencies(self) -> None:
        require(f"The {self.name!r} benchmark suite", "peft", "peft")

    def prepare(self, device: torch.device) -> Workload:
        return _SyntheticWorkload(self.settings, device)
