"""Gradient engines: loop, batched (vmap) and segment (hooks) give the same per-task gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradsurg as gs
from gradsurg.engines import BatchedEngine, LoopEngine, SegmentEngine

TASKS = 3


class MultiTaskMLP(nn.Module):
    """A shared trunk over sequences (Linear layers on the last dimension) and one head per task."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(8, 1) for _ in range(TASKS)])

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> list[torch.Tensor]:
        h = self.trunk(x).mean(dim=1)  # [N, L, 6] -> [N, 8]: positions of one sample interact, samples do not
        losses = []
        for t, head in enumerate(self.heads):
            mask = ids == t
            target = float(t) - 1.0
            losses.append((head(h[mask]).squeeze(-1) - target).pow(2).mean() * (t + 1))
        return losses


def _batch(order: str) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    if order == "shuffled":
        ids = ids[torch.randperm(ids.numel(), generator=generator)]
    return torch.randn(ids.numel(), 4, 6, generator=generator), ids


def _grads_after(model: MultiTaskMLP, engine: str, strategy: str, order: str) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    surgeon = gs.Surgeon(gs.groups.per_module(model.trunk), strategy, seed=0, engine=engine, model=model)
    x, ids = _batch(order)
    losses = model(x, ids)
    surgeon.backward(losses, task_ids=ids if engine in ("segment", "auto") else None)
    surgeon.close()  # remove the hooks before the next Surgeon hooks the same model
    return [p.grad.detach().clone() for p in model.parameters()]  # type: ignore[union-attr]


@pytest.mark.parametrize("strategy", ["sum", "pcgrad", "cagrad"])
@pytest.mark.parametrize("order", ["contiguous", "shuffled"])
@pytest.mark.parametrize("engine", ["segment", "batched", "auto"])
def test_engines_agree_with_the_loop(engine: str, order: str, strategy: str) -> None:
    model = MultiTaskMLP()
    expected = _grads_after(model, "loop", strategy, order)
    found = _grads_after(model, engine, strategy, order)
    for e, f in zip(expected, found):
        torch.testing.assert_close(f, e, rtol=1e-5, atol=1e-6)


def test_segment_per_task_gradients_equal_autograd() -> None:
    model = MultiTaskMLP()
    x, ids = _batch("shuffled")
    params = list(model.trunk.parameters())
    losses = model(x, ids)
    expected = [torch.autograd.grad(loss, params, retain_graph=True) for loss in losses]
    engine = SegmentEngine(model)
    engine.bind(gs.groups.per_module(model.trunk), None)
    losses = model(x, ids)
    result = engine.gradients(losses, params, len(params), ids)
    engine.close()
    for t in range(TASKS):
        for found, wanted in zip(result.per_task[t], expected[t]):
            assert found is not None
            torch.testing.assert_close(found, wanted, rtol=1e-5, atol=1e-6)


class InPlaceSharedTrunk(nn.Module):
    """Linear outputs modified in place (ReLU(inplace=True), ``+=``), a layer called twice, narrow and wide layers."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.wide = nn.Linear(6, 8)
        self.narrow = nn.Linear(8, 2)  # in > out: δᵀx
        self.expand = nn.Linear(2, 8)  # in < out: (xᵀδ)ᵀ
        self.heads = nn.ModuleList([nn.Linear(8, 1) for _ in range(TASKS)])

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> list[torch.Tensor]:
        z = self.narrow(torch.relu_(self.wide(x)))  # ReLU in place on the layer's own output
        h = self.expand(z)
        h += self.expand(z.tanh())  # the same layer a second time, and an in-place add on its output
        pooled = h.mean(dim=1)
        return [(head(pooled[ids == t]).squeeze(-1) - t).pow(2).mean() for t, head in enumerate(self.heads)]


@pytest.mark.parametrize("sizes", [(3, 3, 3), (1, 4, 2)], ids=["equal", "unequal"])
def test_segment_handles_in_place_ops_shared_layers_and_both_layouts(sizes: tuple[int, ...]) -> None:
    """The per-task gradients equal autograd's, whether the tasks have equal sizes (one batched product) or not."""
    model = InPlaceSharedTrunk()
    generator = torch.Generator().manual_seed(2)
    ids = torch.arange(TASKS).repeat_interleave(torch.tensor(sizes))
    ids = ids[torch.randperm(ids.numel(), generator=generator)]
    x = torch.randn(ids.numel(), 5, 6, generator=generator)
    trunk = [model.wide, model.narrow, model.expand]
    params = [p for layer in trunk for p in layer.parameters()]
    losses = model(x, ids)
    expected = [torch.autograd.grad(loss, params, retain_graph=True) for loss in losses]
    engine = SegmentEngine(model)
    engine.bind(gs.groups.whole(params), None)
    result = engine.gradients(model(x, ids), params, len(params), ids)
    engine.close()
    for t in range(TASKS):
        for found, wanted in zip(result.per_task[t], expected[t]):
            assert found is not None
            torch.testing.assert_close(found, wanted, rtol=1e-5, atol=1e-6)


def test_segment_engine_on_gpt2_conv1d_and_lora() -> None:
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16)
    torch.manual_seed(0)
    base = transformers.GPT2Model(config).eval()
    for full_finetune in (True, False):
        model = base
        if not full_finetune:
            lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], lora_dropout=0.0, fan_in_fan_out=True)
            model = peft.get_peft_model(transformers.GPT2Model(config).eval(), lora)
            torch.nn.init.normal_(model.base_model.model.h[0].attn.c_attn.lora_B["default"].weight)
        groups = (
            gs.groups.by_pattern(model, {"c_attn": "h.0.attn.c_attn.*"})
            if full_finetune
            else gs.groups.by_pattern(model, {"lora": "*lora_*"})
        )
        ids = torch.tensor([0, 1, 1, 0])
        tokens = torch.randint(0, 50, (4, 5), generator=torch.Generator().manual_seed(2))
        results = []
        for engine in ("loop", "segment"):
            model.zero_grad(set_to_none=True)
            surgeon = gs.Surgeon(groups, "pcgrad", seed=0, engine=engine, model=model)
            hidden = model(input_ids=tokens).last_hidden_state
            losses = [hidden[ids == 0].mean(), -hidden[ids == 1].pow(2).mean()]
            surgeon.backward(losses, task_ids=ids if engine == "segment" else None)
            surgeon.close()
            results.append([p.grad.clone() for g in groups for p in g.params])  # type: ignore[union-attr]
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_auto_without_task_ids_uses_the_loop() -> None:
    model = MultiTaskMLP()
    surgeon = gs.Surgeon(gs.groups.per_module(model.trunk), "pcgrad", model=model)
    assert isinstance(surgeon.engine, LoopEngine)
    assert isinstance(gs.Surgeon(gs.groups.whole(model), "sum", engine="batched").engine, BatchedEngine)


def test_segment_engine_refuses_batchnorm_in_training_mode() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    linear_groups = [g for g in gs.groups.per_module(model) if g.label == "Linear"]
    with pytest.raises(gs.IncompatibleGroupError, match=r"shape \(4,\) in group '1'"):
        gs.Surgeon(gs.groups.per_module(model), "sum", engine="segment", model=model)
    surgeon = gs.Surgeon(linear_groups, "sum", engine="segment", model=model)
    out = model(torch.randn(4, 3))
    with pytest.raises(gs.IncompatibleGroupError, match=r"'1'.*BatchNorm1d"):
        surgeon.backward([out[:2].sum(), out[2:].sum()], task_ids=torch.tensor([0, 0, 1, 1]))


def test_segment_engine_bad_input() -> None:
    model = MultiTaskMLP()
    with pytest.raises(gs.InvalidOptionError, match="needs the model"):
        gs.Surgeon(gs.groups.per_module(model.trunk), "sum", engine="segment")
    with pytest.raises(gs.InvalidOptionError, match="engine"):
        gs.Surgeon(gs.groups.per_module(model.trunk), "sum", engine="fast")
    embedding = nn.Embedding(5, 3)
    with pytest.raises(gs.IncompatibleGroupError, match=r"nn\.Linear"):
        gs.Surgeon(gs.groups.whole(embedding), "sum", engine="segment", model=embedding)
    surgeon = gs.Surgeon(gs.groups.per_module(model.trunk), "sum", engine="segment", model=model)
    x, ids = _batch("contiguous")
    before = [p.grad for p in model.parameters()]
    with pytest.raises(gs.InvalidLossError, match="sample 2 has task id 7"):
        surgeon.backward(model(x, ids), task_ids=torch.tensor([0, 0, 7, 1, 1, 2, 2, 2, 2]))
    with pytest.raises(gs.InvalidLossError, match="needs `task_ids`"):
        surgeon.backward(model(x, ids))
    with pytest.raises(gs.InvalidLossError, match="9 samples but task_ids has 4"):
        surgeon.backward(model(x, ids), task_ids=torch.tensor([0, 1, 2, 2]))
    with pytest.raises(gs.InvalidLossError, match="1-D integer"):
        surgeon.backward(model(x, ids), task_ids=ids.float())
    assert [p.grad for p in model.parameters()] == before == [None] * len(before)
    assert surgeon.steps == 0


def test_segment_engine_refuses_parameters_used_outside_their_layer() -> None:
    """The weight reaches the loss only through a direct matmul, not through the layer's output: an error, no .grad."""
    layer = nn.Linear(4, 3)
    heads = nn.ModuleList([nn.Linear(3, 1) for _ in range(2)])
    model = nn.ModuleDict({"layer": layer, "heads": heads})
    surgeon = gs.Surgeon(gs.groups.whole(layer), "pcgrad", engine="segment", model=model, seed=0)
    x, ids = torch.randn(4, 4), torch.tensor([0, 0, 1, 1])
    layer(x)  # the hook sees a call whose output is never used
    hidden = x @ layer.weight.T
    losses = [heads[t](hidden[ids == t]).pow(2).mean() for t in range(2)]
    with pytest.raises(gs.IncompatibleGroupError, match="could not read the output gradient of module 'layer'"):
        surgeon.backward(losses, task_ids=ids)
    assert all(p.grad is None for p in model.parameters())
