"""Tiny PEFT LoRA models of real architectures, and a plain PCGrad written for the tests.

The models are built offline from small configs (hidden size 16, two layers, no dropout) so that
two forwards over the same inputs give the same graph values.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor, nn

VOCAB = 40
HIDDEN = 16
SEQ = 6


@dataclass
class Arch:
    """How to build one tiny architecture and which modules LoRA targets."""

    name: str
    build: Callable[[], nn.Module]
    targets: list[str]
    fan_in_fan_out: bool = False


def _bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertModel(config, add_pooling_layer=False)


def _roberta() -> nn.Module:
    from transformers import RobertaConfig, RobertaModel

    config = RobertaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=SEQ + 4,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return RobertaModel(config, add_pooling_layer=False)


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2Model

    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=HIDDEN,
        n_layer=2,
        n_head=2,
        n_positions=16,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2Model(config)


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return LlamaModel(config)


class TinyMLP(nn.Module):
    """A custom two-layer MLP with a classification head (the head is a ``modules_to_save`` candidate)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(HIDDEN, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, HIDDEN)
        self.head = nn.Linear(HIDDEN, 3)

    def features(self, x: Tensor) -> Tensor:
        return torch.tanh(self.fc2(torch.tanh(self.fc1(x))))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


ARCHS = {
    "bert": Arch("bert", _bert, ["query", "value"]),
    "roberta": Arch("roberta", _roberta, ["query", "value"]),
    "gpt2": Arch("gpt2", _gpt2, ["c_attn"], fan_in_fan_out=True),
    "llama": Arch("llama", _llama, ["q_proj", "v_proj"]),
    "mlp": Arch("mlp", TinyMLP, ["fc1", "fc2"]),
}


def lora_model(arch: str, seed: int = 0, **lora: Any) -> nn.Module:
    """``peft.get_peft_model`` over the tiny ``arch`` with rank 2 LoRA on its usual targets."""
    from peft import LoraConfig, get_peft_model

    spec = ARCHS[arch]
    options: dict[str, Any] = {"r": 2, "lora_alpha": 4, "lora_dropout": 0.0, "target_modules": spec.targets}
    if spec.fan_in_fan_out:
        options["fan_in_fan_out"] = True
    options.update(lora)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return get_peft_model(spec.build(), LoraConfig(**options))


def features(model: nn.Module, inputs: Tensor) -> Tensor:
    """``[batch, HIDDEN]`` features of a tiny model: the first token's state, or the MLP's hidden layer."""
    if inputs.is_floating_point():
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        assert isinstance(base, TinyMLP)
        return base.features(inputs)
    return model(input_ids=inputs).last_hidden_state[:, 0]


def inputs_for(arch: str, batch: int = 4, seed: int = 1) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    if arch == "mlp":
        return torch.randn(batch, HIDDEN, generator=generator)
    return torch.randint(2, VOCAB, (batch, SEQ), generator=generator)


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable LoRA parameters found by name (an oracle independent of the adapter's structural walk)."""
    markers = (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B.", ".lora_magnitude_vector.")
    return {n: p for n, p in model.named_parameters() if p.requires_grad and any(m in n + "." for m in markers)}


def plain_pcgrad(
    grads: Tensor, order: Sequence[int], *, reference: str = "original", exact: bool = True
) -> tuple[Tensor, float]:
    """Ortho-LoRA's Algorithm 1 on one group, literally, on Python numbers.

    ``for i in order: for j in order, j ≠ i: if gᵢ·gⱼ < 0: gᵢ ← gᵢ − (gᵢ·gⱼ/‖gⱼ‖²) gⱼ``, with ``gⱼ`` the
    original gradient (``reference="original"``) or its current, possibly projected value
    (``"sequential"``); a zero ``gⱼ`` is skipped. ``exact=True`` computes with exact rationals
    (small inputs), ``exact=False`` with Python floats (model-sized inputs in general position).

    Returns:
        The projected rows (float64) and the smallest ``‖gⱼ‖²/‖gⱼ⁽⁰⁾‖²`` over the nonzero partners used
        (1.0 when none shrank), which tells how well conditioned the sequential reading was.
    """
    number: Callable[[float], Any] = Fraction if exact else float
    original = [[number(float(x)) for x in row] for row in grads.double()]
    current = [list(row) for row in original]
    conditioning = 1.0
    for i in order:
        for j in order:
            if j == i:
                continue
            partner = original[j] if reference == "original" else current[j]
            norm = _dot(partner, partner)
            if norm == 0:
                continue
            conditioning = min(conditioning, float(norm / _dot(original[j], original[j])))
            dot = _dot(current[i], partner)
            if dot < 0:
                current[i] = [x - dot / norm * y for x, y in zip(current[i], partner)]
    return torch.tensor([[float(x) for x in row] for row in current], dtype=torch.float64), conditioning


def _dot(x: Sequence[Any], y: Sequence[Any]) -> Any:
    return sum(a * b for a, b in zip(x, y))
