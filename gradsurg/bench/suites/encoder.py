"""Text-classification workloads on a Hugging Face encoder with a shared PEFT LoRA adapter.

Shared by the ``embedded`` and ``glue`` suites. The model of every run is

    features = pool(encoder_LoRA(text)),   logits_t = head_t(dropout(features)),

with LoRA (``peft.LoraConfig``: rank ``r``, ``lora_alpha``, ``lora_dropout``, target modules such as
``query``/``value``) as the only trainable part of the encoder, mean or first-token pooling, and one
linear head per task.

**Frozen lower layers are computed once.** With ``trainable_layers=k`` the LoRA adapter covers only
the top ``k`` transformer layers. The layers below it are then a fixed function of the input, so
their output is computed once per example (in eval mode, without dropout) when the suite is
prepared, stored in half precision, and each training step runs only the top ``k`` layers on it. This
is the same model as ``LoraConfig(layers_to_transform=<top k>)`` except that the frozen layers' own
dropout is not applied; it saves most of the compute on a CPU. ``trainable_layers=None`` puts LoRA on
every layer and tokenised inputs go through the whole model (the paper's setup).

Batches are trimmed to their longest example (right padding), and validation examples are sorted by
length so that evaluation wastes little on padding (metrics do not depend on order).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gradsurg.bench.suites.base import MultiTaskModel, TaskData, Workload, seeded_linear, sub_seed
from gradsurg.errors import InvalidOptionError

__all__ = ["EncoderConfig", "EncoderWorkload", "TextTask"]

_POOLINGS = ("mean", "cls")
_PRECOMPUTE_BATCH = 64


@dataclass(frozen=True)
class EncoderConfig:
    """Backbone, LoRA and head settings.

    Attributes:
        model: Folder (or hub id) of the pretrained encoder and its tokenizer.
        max_length: Inputs are truncated to this many tokens.
        pooling: ``"mean"`` (mean over tokens, sentence-transformers style) or ``"cls"`` (first token).
        lora_r: LoRA rank ``r``.
        lora_alpha: LoRA ``alpha`` (the update is scaled by ``alpha / r``).
        lora_dropout: Dropout on the LoRA branch's input.
        lora_targets: Names of the adapted linear modules.
        trainable_layers: LoRA on the top ``k`` layers only (the frozen layers below are computed
            once; see the module docstring), or ``None`` for every layer.
        head_dropout: Dropout on the pooled features before each task head.
    """

    model: str
    max_length: int
    pooling: str = "mean"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    lora_targets: tuple[str, ...] = ("query", "value")
    trainable_layers: int | None = None
    head_dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.pooling not in _POOLINGS:
            raise InvalidOptionError(f"Encoder option `pooling` must be one of {_POOLINGS}; found {self.pooling!r}.")
        for name in ("max_length", "lora_r"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InvalidOptionError(f"Encoder option `{name}` must be an int ≥ 1; found {name}={value!r}.")
        if self.trainable_layers is not None and self.trainable_layers < 1:
            raise InvalidOptionError(
                "Encoder option `trainable_layers` must be None or ≥ 1; "
                f"found trainable_layers={self.trainable_layers!r}."
            )


@dataclass(frozen=True)
class TextTask:
    """One text-classification task as raw text (``pair`` holds the second sentence of pair tasks)."""

    name: str
    metric: str
    num_classes: int
    train_text: Sequence[str]
    train_labels: Sequence[int]
    val_text: Sequence[str]
    val_labels: Sequence[int]
    train_pair: Sequence[str] | None = None
    val_pair: Sequence[str] | None = None


class _Precomputed(nn.Module):
    """Stands in for the embedding layer: the precomputed hidden states come in as ``inputs_embeds``."""

    def forward(self, *args: Any, inputs_embeds: Tensor | None = None, **kwargs: Any) -> Tensor:
        if inputs_embeds is None:
            raise InvalidOptionError("The top part of a split encoder needs `inputs_embeds` (precomputed states).")
        return inputs_embeds


class _EncoderBody(nn.Module):
    """``inputs`` → pooled, dropped-out features of the (LoRA-adapted) encoder."""

    def __init__(self, net: nn.Module, pooling: str, dropout: float) -> None:
        super().__init__()
        self.net = net
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)

    def forward(self, inputs: Mapping[str, Tensor]) -> Tensor:
        mask = inputs["attention_mask"]
        length = int(mask.sum(dim=1).max())
        mask = mask[:, :length]
        if "hidden" in inputs:
            hidden = self.net(inputs_embeds=inputs["hidden"][:, :length].float(), attention_mask=mask)
        else:
            hidden = self.net(input_ids=inputs["input_ids"][:, :length], attention_mask=mask)
        states: Tensor = hidden.last_hidden_state
        if self.pooling == "cls":
            pooled = states[:, 0]
        else:
            weights = mask.unsqueeze(-1).to(states.dtype)
            pooled = (states * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
        out: Tensor = self.dropout(pooled)
        return out


def _layers(model: nn.Module) -> nn.ModuleList:
    encoder = getattr(model, "encoder", None)
    layers = getattr(encoder, "layer", None)
    if not isinstance(layers, nn.ModuleList):
        raise InvalidOptionError(
            f"The backbone must be a BERT-like encoder with `encoder.layer` (a ModuleList of layers); found "
            f"{type(model).__name__}."
        )
    return layers


class EncoderWorkload(Workload):
    """Tokenised (and, with ``trainable_layers``, pre-encoded) tasks plus the model factory.

    Args:
        config: Backbone, LoRA and head settings.
        tasks: The tasks as raw text.
        device: Where the data and models live.

    Raises:
        InvalidOptionError: The backbone cannot be loaded from ``config.model`` or is not BERT-like, or
            ``trainable_layers`` exceeds its number of layers.
    """

    def __init__(self, config: EncoderConfig, tasks: Sequence[TextTask], device: torch.device) -> None:
        from transformers import AutoModel, AutoTokenizer

        self._config = config
        self._device = device
        try:
            tokenizer = AutoTokenizer.from_pretrained(config.model)
            model = AutoModel.from_pretrained(config.model)
        except (OSError, ValueError) as exc:
            raise InvalidOptionError(
                f"The backbone must be a folder (or reachable hub id) holding a transformers encoder and its "
                f"tokenizer; loading {config.model!r} failed: {exc}"
            ) from exc
        model.eval().requires_grad_(False)
        layers = _layers(model)
        total = len(layers)
        k = total if config.trainable_layers is None else config.trainable_layers
        if k > total:
            raise InvalidOptionError(
                f"Encoder option `trainable_layers` must be ≤ the backbone's {total} layers; found {k}."
            )
        self._hidden_size = int(model.config.hidden_size)
        self._split = config.trainable_layers is not None
        tokenizer.padding_side = "right"  # batches are trimmed to their longest example
        model.pooler = None
        if self._split:
            bottom = copy.deepcopy(model)
            bottom.encoder.layer = nn.ModuleList(list(layers)[: total - k])
            model.encoder.layer = nn.ModuleList(list(layers)[total - k :])
            model.embeddings = _Precomputed()
            self._bottom: nn.Module | None = bottom.to(device)
        else:
            self._bottom = None
        self._top = model
        self.tasks = tuple(self._tensorise(tokenizer, task) for task in tasks)
        self._bottom = None

    def _encode(self, tokenizer: Any, text: Sequence[str], pair: Sequence[str] | None) -> dict[str, Tensor]:
        batch = tokenizer(
            list(text),
            list(pair) if pair is not None else None,
            truncation=True,
            max_length=self._config.max_length,
            padding="max_length",
            return_tensors="pt",
        )
        ids, mask = batch["input_ids"].to(self._device), batch["attention_mask"].to(self._device)
        if self._bottom is None:
            return {"input_ids": ids, "attention_mask": mask}
        hidden = torch.zeros(*ids.shape, self._hidden_size, dtype=torch.float16, device=self._device)
        order = mask.sum(dim=1).argsort()
        with torch.no_grad():
            for start in range(0, len(order), _PRECOMPUTE_BATCH):
                index = order[start : start + _PRECOMPUTE_BATCH]
                length = int(mask[index].sum(dim=1).max())
                out = self._bottom(input_ids=ids[index, :length], attention_mask=mask[index, :length])
                hidden[index, :length] = out.last_hidden_state.to(torch.float16)
        return {"hidden": hidden, "attention_mask": mask}

    def _tensorise(self, tokenizer: Any, task: TextTask) -> TaskData:
        train = self._encode(tokenizer, task.train_text, task.train_pair)
        val = self._encode(tokenizer, task.val_text, task.val_pair)
        val_labels = torch.tensor(list(task.val_labels), dtype=torch.long, device=self._device)
        order = val["attention_mask"].sum(dim=1).argsort()
        return TaskData(
            name=task.name,
            metric=task.metric,
            num_classes=task.num_classes,
            train_inputs=train,
            train_labels=torch.tensor(list(task.train_labels), dtype=torch.long, device=self._device),
            val_inputs={k: v[order] for k, v in val.items()},
            val_labels=val_labels[order],
        )

    def build_model(self, seed: int) -> MultiTaskModel:
        from peft import LoraConfig, get_peft_model

        c = self._config
        torch.manual_seed(sub_seed(seed, "lora"))
        lora = LoraConfig(
            r=c.lora_r, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout, target_modules=list(c.lora_targets)
        )
        net = get_peft_model(copy.deepcopy(self._top), lora)
        body = _EncoderBody(net, c.pooling, c.head_dropout)
        heads = {
            task.name: seeded_linear(self._hidden_size, task.num_classes, seed, "head", task.name)
            for task in self.tasks
        }
        return MultiTaskModel(body, heads).to(self._device)
