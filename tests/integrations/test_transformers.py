"""MultiTaskTrainer end to end on a tiny BERT (CPU): accumulation, logging, checkpoint and resume."""

from __future__ import annotations

import os
import pathlib
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import gradsurg as gs

transformers = pytest.importorskip("transformers")
from gradsurg.integrations.transformers import SURGEON_STATE_NAME, MultiTaskTrainer  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
VOCAB, SEQ, EXAMPLES = 30, 5, 16
TASKS = ("parity", "first")


class TwoTaskBert(nn.Module):
    """A one-layer BERT (hidden size 16) with one classification head per task."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        config = transformers.BertConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=16,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        self.bert = transformers.BertModel(config, add_pooling_layer=False)
        self.heads = nn.ModuleDict({task: nn.Linear(16, 2) for task in TASKS})

    def forward(self, task: str, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> dict[str, Tensor]:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]
        return {"loss": nn.functional.cross_entropy(self.heads[task](hidden), labels)}


def datasets() -> dict[str, list[dict[str, Tensor]]]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (EXAMPLES, SEQ), generator=generator)
    rules = {"parity": ids.sum(1) % 2, "first": (ids[:, 0] > VOCAB // 2).long()}
    return {
        task: [
            {"input_ids": ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": rules[task][i]}
            for i in range(EXAMPLES if task == "parity" else EXAMPLES // 2)  # a shorter dataset is cycled
        ]
        for task in TASKS
    }


def make_trainer(out: pathlib.Path, **overrides: Any) -> tuple[MultiTaskTrainer, TwoTaskBert]:
    model = TwoTaskBert()
    options: dict[str, Any] = {
        "output_dir": str(out),
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "max_steps": 4,
        "learning_rate": 0.05,
        "optim": "sgd",
        "lr_scheduler_type": "constant",
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": 2,
        "report_to": [],
        "use_cpu": True,
        "seed": 0,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
    }
    options.update(overrides)
    args = transformers.TrainingArguments(**options)
    surgeon = gs.Surgeon(gs.groups.per_module(model.bert), "gradvac", seed=0)  # state and randomness to resume
    return MultiTaskTrainer(model, args, train_datasets=datasets(), surgeon=surgeon), model


def params(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[MultiTaskTrainer, list[Tensor], pathlib.Path]:
    out = tmp_path_factory.mktemp("run")
    trainer, model = make_trainer(out)
    trainer.train()
    return trainer, params(model), out


def test_training_logs_conflicts_and_checkpoints_the_surgeon(
    uninterrupted: tuple[MultiTaskTrainer, list[Tensor], pathlib.Path],
) -> None:
    trainer, final, out = uninterrupted
    assert trainer.surgeon.steps == 4  # one surgery per optimizer step, not per micro-batch
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 4
    for entry in logged:
        assert 0.0 <= entry["gradsurg/conflict_share"] <= 1.0
        assert -1.0 <= entry["gradsurg/mean_cosine"] <= 1.0
    saved = torch.load(out / "checkpoint-2" / SURGEON_STATE_NAME, weights_only=True)
    assert saved["steps"] == 2
    assert any(not torch.equal(a, b) for a, b in zip(final, params(TwoTaskBert())))  # it trained


def test_resuming_from_a_checkpoint_gives_the_uninterrupted_parameters(
    uninterrupted: tuple[MultiTaskTrainer, list[Tensor], pathlib.Path], tmp_path: pathlib.Path
) -> None:
    _, final, out = uninterrupted
    resumed, model = make_trainer(tmp_path)
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert resumed.surgeon.steps == 4
    for a, b in zip(params(model), final):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_accumulated_micro_batches_equal_one_large_batch(
    uninterrupted: tuple[MultiTaskTrainer, list[Tensor], pathlib.Path], tmp_path: pathlib.Path
) -> None:
    _, final, _ = uninterrupted
    trainer, model = make_trainer(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=1)
    trainer.train()
    for a, b in zip(params(model), final):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fp16_and_train_dataset_are_refused(tmp_path: pathlib.Path) -> None:
    model = TwoTaskBert()
    surgeon = gs.Surgeon(gs.groups.whole(model.bert), "sum", seed=0)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    with pytest.raises(gs.InvalidOptionError, match="train_datasets"):
        MultiTaskTrainer(model, args, train_datasets=datasets(), surgeon=surgeon, train_dataset=[])
    object.__setattr__(args, "fp16", True)
    with pytest.raises(gs.InvalidOptionError, match="fp16"):
        MultiTaskTrainer(model, args, train_datasets=datasets(), surgeon=surgeon)
