"""The ``glue`` suite: the Ortho-LoRA paper's setup (Yang et al. 2026, https://arxiv.org/abs/2601.09684).

RoBERTa-base with one shared LoRA adapter (PEFT, rank 8, ``lora_alpha`` 16, dropout 0.1, on
``query`` and ``value`` of every layer) and one linear head per task on the ``<s>`` token; MNLI
(accuracy on ``validation_matched``), QQP (F1 of the "duplicate" class) and SST-2 (accuracy); AdamW
with learning rate 5e-4 decaying linearly to 0, 32 examples per task per step. The paper trains for
"10 epochs", which is ambiguous when every task draws its own batch each step (the tasks differ in
size by a factor of six); the default here is 10,000 steps, to be set with ``--steps``.

Data come from the Hugging Face hub (``datasets.load_dataset("glue", <task>)``) or, with
``--data-dir``, from local files: for each task a folder named like the hub config (``mnli``, ``qqp``,
``sst2``) or like the original GLUE download (``MNLI``, ``QQP``, ``SST-2``) holding a training and a
validation file in CSV, TSV, JSON or JSON-lines format:

=======  =====================================  ====================================================
task     files (any of these stems)             columns (hub names, or original GLUE names)
=======  =====================================  ====================================================
mnli     train, validation_matched/dev_matched  premise/sentence1, hypothesis/sentence2, label/gold_label
qqp      train, validation/dev                  question1, question2, label/is_duplicate
sst2     train, validation/dev                  sentence, label
=======  =====================================  ====================================================

String labels (``entailment``, ``neutral``, ``contradiction`` of the original MNLI files) are mapped to
the hub's class indices. The backbone is ``roberta-base`` from the hub, or any local folder given with
``--model``. Needs the ``glue`` extra (``datasets``) and ``peft``/``transformers``.
"""

from __future__ import annotations

import dataclasses
import pathlib
from dataclasses import dataclass, field
from typing import Any

import torch

from gradsurg.bench.suites.base import Suite, SuiteOverrides, TrainConfig, Workload, require, with_steps
from gradsurg.bench.suites.encoder import EncoderConfig, EncoderWorkload, TextTask
from gradsurg.errors import GradSurgError, InvalidOptionError

__all__ = ["GLUE_TASKS", "GlueConfig", "GlueDataError", "GlueSuite", "GlueTask", "load_glue_task"]

_EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv")


class GlueDataError(GradSurgError, ValueError):
    """A local GLUE file that is missing or lacks a column the task needs."""


@dataclass(frozen=True)
class GlueTask:
    """How to read one GLUE task.

    Attributes:
        name: Hub configuration name (``"mnli"``).
        folder: Folder name of the original GLUE download (``"MNLI"``).
        metric: The paper's metric.
        num_classes: Number of classes.
        columns: Text columns (hub names), one or two.
        aliases: Original GLUE column names → hub names.
        validation: Hub split used for validation and its file stems.
        label_names: String labels, in class-index order (for files that spell the labels out).
    """

    name: str
    folder: str
    metric: str
    num_classes: int
    columns: tuple[str, ...]
    aliases: tuple[tuple[str, str], ...]
    validation: tuple[str, ...]
    label_names: tuple[str, ...] = ()


GLUE_TASKS: dict[str, GlueTask] = {
    "mnli": GlueTask(
        "mnli",
        "MNLI",
        "accuracy",
        3,
        ("premise", "hypothesis"),
        (("sentence1", "premise"), ("sentence2", "hypothesis"), ("gold_label", "label")),
        ("validation_matched", "dev_matched"),
        ("entailment", "neutral", "contradiction"),
    ),
    "qqp": GlueTask(
        "qqp", "QQP", "f1", 2, ("question1", "question2"), (("is_duplicate", "label"),), ("validation", "dev")
    ),
    "sst2": GlueTask("sst2", "SST-2", "accuracy", 2, ("sentence",), (), ("validation", "dev")),
}


@dataclass(frozen=True)
class GlueConfig:
    """Settings of the glue suite.

    Attributes:
        tasks: GLUE tasks, in report order.
        data_dir: Folder of local files (see the module docstring), or ``None`` for the hub.
        max_train: Training examples per task (seeded random subsample), or ``None`` for all.
        max_val: Validation examples per task, or ``None`` for all (the paper).
        data_seed: Seed of the subsamples.
        encoder: Backbone, LoRA and head settings.
        train: Training settings.
    """

    tasks: tuple[str, ...] = ("mnli", "qqp", "sst2")
    data_dir: str | None = None
    max_train: int | None = None
    max_val: int | None = None
    data_seed: int = 0
    encoder: EncoderConfig = field(
        default_factory=lambda: EncoderConfig(
            model="roberta-base", max_length=128, pooling="cls", lora_r=8, lora_alpha=16, lora_dropout=0.1
        )
    )
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=10_000, batch_size=32, lr=5e-4, eval_points=10, probe_points=50)
    )


#: ``--quick``: a few hundred steps on subsamples (still RoBERTa-base: a GPU is advisable).
QUICK = dataclasses.replace(
    GlueConfig(),
    max_train=4_000,
    max_val=1_000,
    train=TrainConfig(steps=200, batch_size=32, lr=5e-4, eval_points=4, probe_points=10),
)


def _data_file(data_dir: pathlib.Path, task: GlueTask, stems: tuple[str, ...]) -> pathlib.Path:
    for folder in (task.name, task.folder):
        for stem in stems:
            for extension in _EXTENSIONS:
                path = data_dir / folder / f"{stem}{extension}"
                if path.is_file():
                    return path
    raise GlueDataError(
        f"GLUE task {task.name!r} needs a file {data_dir}/{task.name}/<stem><ext> (or under {task.folder}/) with "
        f"<stem> in {list(stems)} and <ext> in {list(_EXTENSIONS)}; found none."
    )


def _load_split(task: GlueTask, split: str, stems: tuple[str, ...], data_dir: pathlib.Path | None) -> Any:
    import datasets

    if data_dir is None:
        return datasets.load_dataset("glue", task.name, split=split)
    path = _data_file(data_dir, task, stems)
    builder = "json" if path.suffix in (".json", ".jsonl") else "csv"
    options: dict[str, Any] = {"delimiter": "\t", "quoting": 3} if path.suffix == ".tsv" else {}
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # the comparison has its own progress bars
    try:
        dataset = datasets.load_dataset(builder, data_files={"data": str(path)}, split="data", **options)
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    renames = {old: new for old, new in task.aliases if old in dataset.column_names and new not in dataset.column_names}
    dataset = dataset.rename_columns(renames) if renames else dataset
    missing = [c for c in (*task.columns, "label") if c not in dataset.column_names]
    if missing:
        raise GlueDataError(
            f"GLUE file {path} must have the columns {[*task.columns, 'label']} (or their original GLUE names); "
            f"missing {missing}, found {dataset.column_names}."
        )
    return dataset


def _labels(task: GlueTask, values: list[Any], where: str) -> list[int]:
    labels = []
    for value in values:
        label = task.label_names.index(value) if isinstance(value, str) and value in task.label_names else value
        try:
            label = int(label)
        except (TypeError, ValueError):
            label = -1
        if not 0 <= label < task.num_classes:
            raise GlueDataError(
                f"Labels of GLUE task {task.name!r} ({where}) must be class indices in [0, {task.num_classes})"
                + (f" or one of {list(task.label_names)}" if task.label_names else "")
                + f"; found {value!r}."
            )
        labels.append(label)
    return labels


def load_glue_task(
    name: str,
    *,
    data_dir: str | pathlib.Path | None = None,
    max_train: int | None = None,
    max_val: int | None = None,
    seed: int = 0,
) -> TextTask:
    """Load one GLUE task's training and validation split as a :class:`TextTask`.

    Args:
        name: ``"mnli"``, ``"qqp"`` or ``"sst2"``.
        data_dir: Folder of local files (module docstring), or ``None`` for the hub's ``glue`` dataset.
        max_train: Keep a seeded random subsample of this many training examples (``None``: all).
        max_val: The same for validation.
        seed: Seed of the subsamples.

    Raises:
        InvalidOptionError: Unknown task name.
        GlueDataError: A local file is missing, lacks a column, or has a label out of range.
        MissingDependencyError: ``datasets`` is not installed (extra ``glue``).
    """
    require("The 'glue' benchmark suite", "glue", "datasets")
    if name not in GLUE_TASKS:
        raise InvalidOptionError(f"GLUE task must be one of {list(GLUE_TASKS)}; found {name!r}.")
    task = GLUE_TASKS[name]
    folder = None if data_dir is None else pathlib.Path(data_dir)
    splits = []
    for split, stems, limit in (("train", ("train",), max_train), (task.validation[0], task.validation, max_val)):
        dataset = _load_split(task, split, stems, folder)
        if limit is not None and limit < len(dataset):
            dataset = dataset.shuffle(seed=seed).select(range(limit))
        columns = [[str(text) for text in dataset[c]] for c in task.columns]
        splits.append((columns, _labels(task, list(dataset["label"]), split)))
    (train_columns, train_labels), (val_columns, val_labels) = splits
    return TextTask(
        name=task.name,
        metric=task.metric,
        num_classes=task.num_classes,
        train_text=train_columns[0],
        train_pair=train_columns[1] if len(train_columns) > 1 else None,
        train_labels=train_labels,
        val_text=val_columns[0],
        val_pair=val_columns[1] if len(val_columns) > 1 else None,
        val_labels=val_labels,
    )


class GlueSuite(Suite):
    """RoBERTa-base + shared LoRA on MNLI, QQP and SST-2 (see the module docstring)."""

    name = "glue"
    summary = (
        "The Ortho-LoRA paper's setup: RoBERTa-base, one shared LoRA adapter (r=8, alpha=16, dropout 0.1, "
        "query/value), MNLI (accuracy, validation_matched), QQP (F1), SST-2 (accuracy)."
    )

    def __init__(self, config: GlueConfig | None = None, *, seeds: int = 3) -> None:
        self.settings = config or GlueConfig()
        self.train = self.settings.train
        self.seeds = seeds

    @classmethod
    def from_overrides(cls, overrides: SuiteOverrides) -> GlueSuite:
        config = QUICK if overrides.quick else GlueConfig()
        if overrides.model is not None:
            config = dataclasses.replace(config, encoder=dataclasses.replace(config.encoder, model=overrides.model))
        if overrides.data_dir is not None:
            if not pathlib.Path(overrides.data_dir).is_dir():
                raise InvalidOptionError(
                    f"Option `--data-dir` must be an existing folder; found --data-dir={overrides.data_dir!r}."
                )
            config = dataclasses.replace(config, data_dir=overrides.data_dir)
        return cls(
            dataclasses.replace(config, train=with_steps(config.train, overrides.steps)),
            seeds=1 if overrides.quick else 3,
        )

    def config(self) -> dict[str, Any]:
        return {"suite": self.name, **dataclasses.asdict(self.settings)}

    def task_metrics(self) -> dict[str, str]:
        return {name: GLUE_TASKS[name].metric for name in self.settings.tasks}

    def check_dependencies(self) -> None:
        feature = f"The {self.name!r} benchmark suite"
        require(feature, "glue", "datasets")
        require(feature, "peft", "peft", "transformers")

    def prepare(self, device: torch.device) -> Workload:
        s = self.settings
        tasks = [
            load_glue_task(name, data_dir=s.data_dir, max_train=s.max_train, max_val=s.max_val, seed=s.data_seed)
            for name in s.tasks
        ]
        return EncoderWorkload(s.encoder, tasks, device)
