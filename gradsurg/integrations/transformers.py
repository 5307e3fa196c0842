"""Hugging Face ``Trainer`` integration: :class:`MultiTaskTrainer`.

The trainer takes one dataset per task. Each batch of its data loader holds **one batch per task**
(``{task: batch}``; a shorter dataset is cycled), each collated by the usual data collator, so the
Trainer's shuffling, distributed sampling and resumption work unchanged. :meth:`training_step`
computes one loss per task and hands them to the :class:`~gradsurg.Surgeon` instead of calling
``loss.backward()``:

* **Gradient accumulation** follows the Trainer's: each task loss is divided by the number of
  micro-batches of the step, micro-batches are accumulated with ``surgeon.backward(...,
  accumulate=True)`` and the last one (``accelerator.sync_gradients``) combines them once, so the
  strategy sees the per-task gradients of the effective batch (see :mod:`gradsurg.accumulation`).
  The Trainer's optimizer, scheduler and gradient clipping then run as usual.
* **Logging**: every training log gains ``gradsurg/conflict_share`` (share of conflicting task pairs
  over all groups) and ``gradsurg/mean_cosine`` (mean pairwise cosine over the groups) of the last
  step, when the Surgeon collects statistics.
* **Checkpoints**: the Surgeon's :meth:`~gradsurg.Surgeon.state_dict` is saved as
  ``gradsurg_surgeon.pt`` in every checkpoint folder and restored with
  ``trainer.train(resume_from_checkpoint=...)``, so a resumed run continues bit-identically.
* **DDP** (``torchrun``): the Surgeon averages the per-task gradients over ranks itself (see
  :mod:`gradsurg.distributed`); build every rank's Surgeon with the same seed.

Mixed precision: ``bf16=True`` works (gradients are combined in float32). ``fp16=True`` is refused:
the Trainer's ``GradScaler`` unscales inside gradient clipping, which would unscale the Surgeon's
already unscaled gradients a second time; use bf16, or a plain loop with
``surgeon.backward(losses, scaler=scaler, optimizer=optimizer)`` (see :mod:`gradsurg.amp`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from gradsurg.errors import GradSurgWarning, InvalidLossError, InvalidOptionError, missing_dependency
from gradsurg.surgeon import Surgeon

try:
    from transformers import Trainer, default_data_collator
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise missing_dependency("transformers", "transformers", "gradsurg.integrations.transformers") from exc

__all__ = ["SURGEON_STATE_NAME", "MultiTaskTrainer", "TaskLoss", "TaskZip", "default_task_loss"]

SURGEON_STATE_NAME = "gradsurg_surgeon.pt"
"""File name of the Surgeon's state in a Trainer checkpoint folder."""

TaskLoss = Callable[[nn.Module, str, Mapping[str, Any]], Tensor]
"""``task_loss(model, task, batch) -> scalar loss``."""


def default_task_loss(model: nn.Module, task: str, batch: Mapping[str, Any]) -> Tensor:
    """``model(task=task, **batch)``, reading the loss from a tensor, a ``"loss"`` key or ``.loss``.

    Raises:
        InvalidLossError: The output holds no loss.
    """
    output = model(task=task, **batch)
    if isinstance(output, Tensor):
        return output
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if not isinstance(loss, Tensor):
        raise InvalidLossError(
            f"The model's output for task {task!r} must be a loss tensor, or hold one under 'loss' (as Hugging Face "
            f"model outputs do); found {type(output).__name__} without a loss. Pass task_loss=... to compute it."
        )
    return loss


class TaskZip(Dataset[dict[str, Any]]):
    """Item ``i`` is ``{task: datasets[task][i mod len]}``: one example of every task.

    Its length is that of the longest dataset; shorter ones are cycled.

    Raises:
        InvalidOptionError: No dataset is given, or one is empty.
    """

    def __init__(self, datasets: Mapping[str, Any]) -> None:
        if not datasets:
            raise InvalidOptionError("MultiTaskTrainer `train_datasets` must hold at least one task; found none.")
        sizes = {task: len(data) for task, data in datasets.items()}
        empty = sorted(task for task, size in sizes.items() if size == 0)
        if empty:
            raise InvalidOptionError(f"Every task dataset must hold at least one example; found empty: {empty}.")
        self.datasets = dict(datasets)
        self._length = max(sizes.values())

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {task: data[index % len(data)] for task, data in self.datasets.items()}


class _PerTaskCollator:
    """Collates each task's examples with the inner collator: ``{task: batch}``.

    Examples that are not ``{task: example}`` items of a :class:`TaskZip` (e.g. those of an
    evaluation dataset) go to the inner collator unchanged.
    """

    def __init__(self, inner: Callable[[list[Any]], Any], tasks: Sequence[str]) -> None:
        self.inner = inner
        self.tasks = tuple(tasks)

    def __call__(self, examples: Sequence[Any]) -> Any:
        if not (examples and isinstance(examples[0], Mapping) and tuple(examples[0]) == self.tasks):
            return self.inner(list(examples))
        return {task: self.inner([example[task] for example in examples]) for task in self.tasks}


class MultiTaskTrainer(Trainer):
    """A ``Trainer`` that trains several tasks at once, combining their gradients with a Surgeon.

    Args:
        model: The model; by default task ``t``'s loss is ``model(task=t, **batch)`` (see
            :func:`default_task_loss`).
        args: The ``TrainingArguments``.
        train_datasets: One dataset per task, ``{task: dataset}``.
        surgeon: The :class:`~gradsurg.Surgeon`, built on the groups of ``model`` (e.g.
            ``gs.Surgeon(gs.adapters.peft.lora_groups(model), "ortho_lora", seed=0)``). Give it the
            same seed on every rank.
        task_loss: ``task_loss(model, task, batch) -> loss`` (default :func:`default_task_loss`).
        data_collator: Collates the examples of **one** task (default: ``default_data_collator``).
        **kwargs: Passed to ``Trainer`` (``eval_dataset``, ``callbacks``, ``optimizers``, ...).

    Raises:
        InvalidOptionError: ``surgeon`` is not a Surgeon, ``train_dataset`` is given (use
            ``train_datasets``), or ``args.fp16`` is set (use ``bf16``).
    """

    def __init__(
        self,
        model: nn.Module,
        args: Any,
        *,
        train_datasets: Mapping[str, Any],
        surgeon: Surgeon,
        task_loss: TaskLoss = default_task_loss,
        data_collator: Callable[[list[Any]], Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(surgeon, Surgeon):
            raise InvalidOptionError(f"MultiTaskTrainer `surgeon` must be a gradsurg.Surgeon; found {surgeon!r}.")
        if "train_dataset" in kwargs:
            raise InvalidOptionError(
                "MultiTaskTrainer takes `train_datasets={task: dataset}`, one dataset per task; found train_dataset."
            )
        if getattr(args, "fp16", False):
            raise InvalidOptionError(
                "MultiTaskTrainer must not run with fp16=True (the Trainer's GradScaler would unscale the Surgeon's "
                "unscaled gradients a second time); found fp16=True. Use bf16=True."
            )
        self.surgeon = surgeon
        self.task_loss = task_loss
        super().__init__(
            model=model,
            args=args,
            train_dataset=TaskZip(train_datasets),
            data_collator=_PerTaskCollator(data_collator or default_data_collator, list(train_datasets)),
            **kwargs,
        )

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Tensor | int | None = None
    ) -> Tensor:
        """One micro-batch: per-task losses → ``surgeon.backward`` (accumulating until the last one).

        Returns:
            The detached sum of the task losses of this micro-batch (divided by the number of
            micro-batches, as the Trainer reports it).
        """
        model.train()
        inputs = self._prepare_inputs(inputs)
        micro_batches = max(int(getattr(self, "current_gradient_accumulation_steps", 1)), 1)
        with self.compute_loss_context_manager():
            losses = {task: self.task_loss(model, task, batch) / micro_batches for task, batch in inputs.items()}
        self.surgeon.backward(losses, accumulate=not self.accelerator.sync_gradients)
        return torch.stack([loss.detach().reshape(()) for loss in losses.values()]).sum()

    def _get_collator_with_removed_columns(
        self, data_collator: Callable[[list[Any]], Any], description: str | None = None
    ) -> Callable[[list[Any]], Any]:
        """Remove the columns the model does not take from each task's examples, not from ``{task: ...}``."""
        if isinstance(data_collator, _PerTaskCollator):
            inner = super()._get_collator_with_removed_columns(data_collator.inner, description)
            return _PerTaskCollator(inner, data_collator.tasks)
        return super()._get_collator_with_removed_columns(data_collator, description)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the last step's conflict figures to training logs (those with a ``loss``)."""
        stats = self.surgeon.last_stats
        if stats is not None and "loss" in logs:
            records = stats.records()
            logs = dict(logs)
            logs["gradsurg/conflict_share"] = float(stats.conflict_share())
            if records:
                logs["gradsurg/mean_cosine"] = sum(r["mean_cosine"] for r in records) / len(records)
        super().log(logs, start_time)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            torch.save(self.surgeon.state_dict(), os.path.join(output_dir, SURGEON_STATE_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, SURGEON_STATE_NAME)
        if not os.path.isfile(path):
            warnings.warn(
                f"The checkpoint {checkpoint!r} holds no {SURGEON_STATE_NAME}: the Surgeon starts from its initial "
                "state (its generator and strategy state are not those of the interrupted run).",
                GradSurgWarning,
                stacklevel=2,
            )
            return
        self.surgeon.load_state_dict(torch.load(path, weights_only=True))
