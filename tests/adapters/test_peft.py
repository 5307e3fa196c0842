"""``gradsurg.adapters.peft``: LoRA factor groups of real (tiny) PEFT models, and the one-line Surgeon."""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Sequence

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import Tensor, nn

import gradsurg as gs
from gradsurg.adapters.peft import LABEL_A, LABEL_B, LABEL_MAGNITUDE, lora_groups, surgeon
from gradsurg.strategies import OrthoLoRA, PCGrad, Sum
from tests.adapters.lora_helpers import (
    ARCHS,
    HIDDEN,
    TinyMLP,
    features,
    inputs_for,
    lora_model,
    lora_parameters,
    plain_pcgrad,
)

TASKS = 3
# PEFT calls a transformers method that transformers 5 deprecates; not ours to fix.
pytestmark = [
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.usefixtures("one_thread"),  # tiny models (fixture in tests/conftest.py)
]


def lora_layer_names(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Qualified names of the targeted modules, found by name (independent of the adapter's walk)."""
    return [n for n, _ in model.named_modules() if n.split(".")[-1] in targets and ".lora_" not in n]


def param_ids(groups: Sequence[gs.ParamGroup]) -> list[int]:
    return [id(p) for g in groups for p in g.params]


# ---------------------------------------------------------------------------------- group structure
@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("granularity", ["layer", "factor"])
def test_every_lora_parameter_is_in_exactly_one_group(arch: str, granularity: str) -> None:
    model = lora_model(arch)
    layers = lora_layer_names(model, ARCHS[arch].targets)
    assert layers
    groups = lora_groups(model, granularity=granularity)  # type: ignore[arg-type]

    assert len(groups) == (2 * len(layers) if granularity == "layer" else 2)
    assert sorted(g.label for g in groups) == sorted([LABEL_A, LABEL_B] * (len(groups) // 2))
    ids = param_ids(groups)
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in lora_parameters(model).values()}
    assert all(g.meta["adapter"] == "default" for g in groups)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_layer_groups_pair_a_with_b_and_record_the_layer(arch: str) -> None:
    model = lora_model(arch)
    named = dict(model.named_parameters())
    groups = lora_groups(model)
    by_pair: dict[str, dict[str, gs.ParamGroup]] = {}
    for g in groups:
        by_pair.setdefault(g.meta["pair"], {})[g.label] = g
    assert sorted(g.meta["layer"] for g in groups) == sorted(lora_layer_names(model, ARCHS[arch].targets) * 2)
    for pair in by_pair.values():
        a, b = pair[LABEL_A], pair[LABEL_B]
        assert a.meta["layer"] == b.meta["layer"]
        assert a.meta["rank"] == b.meta["rank"] == 2
        assert a.meta["fan_in_fan_out"] == (ARCHS[arch].fan_in_fan_out,)
        (weight_a,), (weight_b,) = a.params, b.params
        assert weight_a.shape[0] == 2 and weight_b.shape[1] == 2  # A: r × in, B: out × r
        assert named[a.meta["param_names"][0]] is weight_a


def test_gpt2_conv1d_factors_are_found_structurally() -> None:
    from transformers.pytorch_utils import Conv1D

    model = lora_model("gpt2")
    groups = lora_groups(model)
    layer = model.get_submodule(groups[0].meta["layer"])
    assert isinstance(layer.get_base_layer(), Conv1D)
    a, b = groups[0].params[0], groups[1].params[0]
    assert a.shape == (2, HIDDEN)  # the fused q, k, v projection: in = HIDDEN, out = 3·HIDDEN
    assert b.shape == (3 * HIDDEN, 2)


def test_factor_groups_concatenate_every_layer() -> None:
    model = lora_model("bert")
    layer_groups = lora_groups(model)
    factor_a, factor_b = lora_groups(model, granularity="factor")
    assert factor_a.params == tuple(p for g in layer_groups if g.label == LABEL_A for p in g.params)
    assert factor_b.params == tuple(p for g in layer_groups if g.label == LABEL_B for p in g.params)
    assert factor_a.meta["pair"] == factor_b.meta["pair"]
    assert factor_a.meta["layer"] is None
    assert factor_a.meta["layers"] == tuple(g.meta["layer"] for g in layer_groups if g.label == LABEL_A)


def test_works_on_a_model_prepared_with_inject_adapter_in_model() -> None:
    model = inject_adapter_in_model(LoraConfig(r=3, target_modules=["fc1", "fc2"]), TinyMLP())
    groups = lora_groups(model)
    assert [g.meta["layer"] for g in groups] == ["fc1", "fc1", "fc2", "fc2"]
    assert {g.meta["rank"] for g in groups} == {3}


# ---------------------------------------------------------------------------------- through the Surgeon
def make_heads(seed: int = 2) -> nn.ModuleList:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.ModuleList(nn.Linear(HIDDEN, 2) for _ in range(TASKS))


def task_losses(model: nn.Module, heads: nn.ModuleList, arch: str) -> list[Tensor]:
    x = inputs_for(arch)
    shared = features(model, x)
    labels = torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0], [0, 0, 1, 1]])
    return [nn.functional.cross_entropy(head(shared), labels[t]) for t, head in enumerate(heads)]


def expected_grads(
    model: nn.Module, heads: nn.ModuleList, arch: str, order: Sequence[int], *, factor: bool = False
) -> dict[int, Tensor]:
    """Independent computation: autograd per task, then plain PCGrad inside each LoRA factor."""
    params = [p for p in [*model.parameters(), *heads.parameters()] if p.requires_grad]
    per_task = [
        torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        for loss in task_losses(model, heads, arch)
    ]
    dense = [[torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)] for grads in per_task]
    result = {id(p): sum(d[k] for d in dense) for k, p in enumerate(params)}
    index = {id(p): k for k, p in enumerate(params)}
    lora = lora_parameters(model)
    factors: dict[str, list[nn.Parameter]] = {}
    for name, p in lora.items():
        layer, _, rest = name.partition(".lora_")
        key = rest.split(".")[0] if factor else f"{layer}/{rest.split('.')[0]}"
        factors.setdefault(key, []).append(p)
    for members in factors.values():
        matrix = torch.stack([torch.cat([d[index[id(p)]].reshape(-1) for p in members]) for d in dense])
        rows, _ = plain_pcgrad(matrix, order, exact=False)
        direction = rows.sum(dim=0).to(matrix.dtype)
        offset = 0
        for p in members:
            result[id(p)] = direction[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
    return result


def assert_grads_match(model: nn.Module, heads: nn.ModuleList, expected: dict[int, Tensor]) -> None:
    for p in [*model.parameters(), *heads.parameters()]:
        if p.requires_grad:
            assert p.grad is not None
            torch.testing.assert_close(p.grad, expected[id(p)], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama", "mlp"])
@pytest.mark.parametrize("granularity", ["layer", "factor"])
def test_surgeon_writes_pcgrad_per_factor_and_the_plain_sum_elsewhere(arch: str, granularity: str) -> None:
    model, heads = lora_model(arch, init_lora_weights=False), make_heads()
    ortho = OrthoLoRA(shuffle=False)  # index order, so the reference uses the same order
    surgeon(model, ortho, seed=0, granularity=granularity).backward(task_losses(model, heads, arch))  # type: ignore[arg-type]
    expected = expected_grads(model, heads, arch, range(TASKS), factor=granularity == "factor")
    assert_grads_match(model, heads, expected)
    plain_sum = expected_grads(model, heads, arch, [])  # no partner visited: the sum
    assert any(not torch.allclose(expected[k], plain_sum[k]) for k in expected), "no conflict: test is vacuous"


def test_one_task_order_per_step_is_shared_by_all_groups() -> None:
    model, heads = lora_model("bert", init_lora_weights=False), make_heads()
    groups = lora_groups(model)
    orders = list(itertools.permutations(range(TASKS)))
    candidates = {order: expected_grads(model, heads, "bert", order) for order in orders}
    distinct = {tuple(round(float(v.sum()), 5) for v in c.values()) for c in candidates.values()}
    assert len(distinct) > 1, "every order gives the same result: test is vacuous"
    used = set()
    for seed in range(6):
        for p in [*model.parameters(), *heads.parameters()]:
            p.grad = None
        gs.Surgeon(groups, "ortho_lora", seed=seed).backward(task_losses(model, heads, "bert"))
        matching = [
            order
            for order in orders
            if all(
                torch.allclose(p.grad, candidates[order][id(p)], rtol=1e-4, atol=1e-6) for g in groups for p in g.params
            )
        ]
        assert matching, f"seed {seed}: no single order explains every group"
        used.update(matching)
    assert len(used) > 1  # the order is drawn at random


def test_first_step_from_pefts_default_init_is_finite_and_leaves_a_still() -> None:
    model, heads = lora_model("bert"), make_heads()  # PEFT's default: B = 0
    s = surgeon(model, "ortho_lora", seed=0)
    s.backward(task_losses(model, heads, "bert"))
    for g in s.groups:
        for p in g.params:
            assert p.grad is not None and torch.isfinite(p.grad).all()
            if g.label == LABEL_A:
                assert not p.grad.any()
    assert any(p.grad.any() for g in s.groups if g.label == LABEL_B for p in g.params if p.grad is not None)


def test_pcgrad_per_factor_is_one_word_away() -> None:
    model = lora_model("bert")
    s = surgeon(model, "pcgrad", seed=0)
    assert [g.name for g in s.groups] == [g.name for g in lora_groups(model)]
    assert {type(strategy) for strategy in s.strategies.values()} == {PCGrad}


def test_surgeon_refuses_an_unknown_strategy() -> None:
    with pytest.raises(gs.UnknownStrategyError):
        surgeon(lora_model("mlp"), "not_a_strategy")


# ---------------------------------------------------------------------------------- DoRA, embeddings, adapters, heads
def test_dora_magnitude_has_its_own_label() -> None:
    model = lora_model("bert", use_dora=True)
    groups = lora_groups(model)
    magnitude = [g for g in groups if g.label == LABEL_MAGNITUDE]
    assert len(magnitude) == len(lora_layer_names(model, ARCHS["bert"].targets))
    magnitude_ids = {id(p) for g in magnitude for p in g.params}
    expected = {id(p) for n, p in lora_parameters(model).items() if ".lora_magnitude_vector." in n}
    assert magnitude_ids == expected
    assert all(g.meta["factor"] == "magnitude" for g in magnitude)
    assert set(param_ids(groups)) == {id(p) for p in lora_parameters(model).values()}
    with pytest.raises(gs.IncompatibleGroupError, match="lora_magnitude"):
        gs.Surgeon(groups, "ortho_lora")


def test_dora_magnitude_gets_the_plain_sum_under_ortho_lora() -> None:
    model, heads = lora_model("bert", use_dora=True, init_lora_weights=False), make_heads()
    s = surgeon(model, gs.get_strategy("ortho_lora", shuffle=False), seed=0)
    kinds = {g.label: type(s.strategies[g.name]) for g in s.groups}
    assert kinds == {LABEL_A: OrthoLoRA, LABEL_B: OrthoLoRA, LABEL_MAGNITUDE: Sum}
    s.backward(task_losses(model, heads, "bert"))
    # The reference treats only A and B as factors; the magnitude vectors fall to the plain sum.
    reference = expected_grads(model, heads, "bert", range(TASKS))
    plain = expected_grads(model, heads, "bert", [])
    for g in s.groups:
        for p in g.params:
            target = plain if g.label == LABEL_MAGNITUDE else reference
            torch.testing.assert_close(p.grad, target[id(p)], rtol=1e-4, atol=1e-6)


def test_dora_magnitude_follows_any_other_strategy_and_mappings_pass_through() -> None:
    model = lora_model("bert", use_dora=True)
    pcgrad = surgeon(model, "pcgrad")
    assert all(type(strategy) is PCGrad for strategy in pcgrad.strategies.values())
    mapping = {LABEL_A: "ortho_lora", LABEL_B: "ortho_lora", LABEL_MAGNITUDE: "pcgrad"}
    chosen = surgeon(model, mapping)
    assert {type(chosen.strategies[g.name]) for g in chosen.groups if g.label == LABEL_MAGNITUDE} == {PCGrad}


def test_embedding_lora_factors_are_labelled_a_and_b() -> None:
    model = lora_model("bert", target_modules=["word_embeddings", "query"])
    groups = [g for g in lora_groups(model) if g.meta["layer_types"] == ("Embedding",)]
    assert [g.label for g in groups] == [LABEL_A, LABEL_B]
    assert [g.meta["param_names"][0].split(".")[-2] for g in groups] == ["lora_embedding_A", "lora_embedding_B"]
    embedding_a, embedding_b = groups[0].params[0], groups[1].params[0]
    assert embedding_a.shape == (2, 40) and embedding_b.shape == (HIDDEN, 2)
    heads = make_heads()
    surgeon(model, "ortho_lora", seed=0).backward(task_losses(model, heads, "bert"))
    assert embedding_b.grad is not None and torch.isfinite(embedding_b.grad).all()


def add_second_adapter(model: nn.Module) -> None:
    model.add_adapter("second", LoraConfig(r=3, target_modules=["query"]))  # type: ignore[operator]


def test_several_adapters_default_to_the_active_one() -> None:
    model = lora_model("bert")
    add_second_adapter(model)
    assert {g.meta["adapter"] for g in lora_groups(model)} == {"default"}
    model.set_adapter("second")  # type: ignore[operator]
    groups = lora_groups(model)
    assert {g.meta["adapter"] for g in groups} == {"second"}
    assert {g.meta["rank"] for g in groups} == {3}
    assert len(groups) == 2 * 2  # "query" in each of the two layers


def test_several_active_adapters_and_an_explicit_choice() -> None:
    model = lora_model("bert")
    add_second_adapter(model)
    model.base_model.set_adapter(["default", "second"])  # both active and trainable
    both = lora_groups(model)
    assert [g.meta["adapter"] for g in both] == ["default"] * 8 + ["second"] * 4
    assert len({g.name for g in both}) == len(both)
    second = lora_groups(model, adapter_name="second")
    assert [g.name for g in second] == [g.name for g in both if g.meta["adapter"] == "second"]
    swapped = lora_groups(model, adapter_name=["second", "default"])
    assert [g.name for g in swapped] == [g.name for g in second] + [g.name for g in both[:8]]
    factor = lora_groups(model, granularity="factor")
    assert [(g.label, g.meta["adapter"]) for g in factor] == [
        (LABEL_A, "default"),
        (LABEL_B, "default"),
        (LABEL_A, "second"),
        (LABEL_B, "second"),
    ]


def test_modules_to_save_heads_stay_outside_and_get_the_plain_sum() -> None:
    model = lora_model("mlp", modules_to_save=["head"], init_lora_weights=False)
    saved = {n: p for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n}
    assert saved
    groups = lora_groups(model)
    assert not {id(p) for p in saved.values()} & set(param_ids(groups))
    x = inputs_for("mlp")
    targets = torch.tensor([0, 1, 2, 0])

    def losses() -> list[Tensor]:
        logits = model(x)
        return [nn.functional.cross_entropy(logits, (targets + t) % 3) for t in range(TASKS)]

    plain = torch.autograd.grad(sum(losses()), list(saved.values()))
    surgeon(model, "ortho_lora", seed=0).backward(losses())
    for p, g in zip(saved.values(), plain):
        torch.testing.assert_close(p.grad, g)


# ---------------------------------------------------------------------------------- layers=
@pytest.mark.parametrize(
    ("layers", "expected"),
    [
        ("encoder.layer.0.attention.self.query", ["layer.0.attention.self.query"]),
        (
            ["layer.1.attention.self.query", "layer.0.attention.self.value"],
            ["layer.0.attention.self.value", "layer.1.attention.self.query"],
        ),
        (lambda name: name.endswith("value"), ["layer.0.attention.self.value", "layer.1.attention.self.value"]),
    ],
)
def test_layers_filter_restricts_the_groups(
    layers: str | list[str] | Callable[[str], bool], expected: list[str]
) -> None:
    model = lora_model("bert")
    groups = lora_groups(model, layers=layers)
    found = sorted({g.meta["layer"].split("encoder.", 1)[1] for g in groups})
    assert found == sorted(expected)
    assert len(groups) == 2 * len(expected)
    left_out = set(id(p) for p in lora_parameters(model).values()) - set(param_ids(groups))
    assert len(left_out) == 2 * (4 - len(expected))


def test_layers_filter_errors() -> None:
    model = lora_model("bert")
    with pytest.raises(gs.NoMatchingParametersError, match=r"'attention\.self\.key' matches none"):
        lora_groups(model, layers=["attention.self.key"])
    with pytest.raises(gs.NoMatchingParametersError, match="predicate"):
        lora_groups(model, layers=lambda name: False)
    with pytest.raises(gs.InvalidOptionError, match="`layers`"):
        lora_groups(model, layers=[])
    with pytest.raises(gs.NoMatchingParametersError, match="'uery' matches none"):
        lora_groups(model, layers="uery")  # a dotted suffix, not a substring


# ---------------------------------------------------------------------------------- bad input
def test_a_model_without_lora_layers_is_refused() -> None:
    with pytest.raises(gs.NoMatchingParametersError, match=r"peft\.tuners\.lora\.LoraLayer"):
        lora_groups(TinyMLP())


def test_an_unknown_adapter_lists_the_adapters_present() -> None:
    model = lora_model("bert")
    add_second_adapter(model)
    with pytest.raises(gs.InvalidOptionError, match=r"adapter_name='nope'.*\['default', 'second'\]"):
        lora_groups(model, adapter_name="nope")


@pytest.mark.parametrize(("option", "value"), [("adapter_name", 5), ("adapter_name", []), ("layers", 3)])
def test_malformed_names_are_refused(option: str, value: object) -> None:
    with pytest.raises(gs.InvalidOptionError, match=f"`{option}` of lora_groups"):
        lora_groups(lora_model("mlp"), **{option: value})  # type: ignore[arg-type]


def test_frozen_lora_parameters_are_refused() -> None:
    model = lora_model("bert")
    add_second_adapter(model)  # added, not active: PEFT freezes it
    with pytest.raises(gs.InvalidGroupError, match=r"adapter 'second' must be trainable.*frozen"):
        lora_groups(model, adapter_name="second")
    inference = lora_model("bert", inference_mode=True)
    with pytest.raises(gs.InvalidGroupError, match="frozen"):
        surgeon(inference, "ortho_lora")


def test_an_unknown_granularity_is_refused() -> None:
    with pytest.raises(gs.InvalidOptionError, match=r"`granularity` of lora_groups.*'layer', 'factor'.*'matrix'"):
        lora_groups(lora_model("mlp"), granularity="matrix")  # type: ignore[arg-type]


def test_something_else_than_a_module_is_refused() -> None:
    with pytest.raises(gs.InvalidGroupError, match=r"nn\.Module; found dict"):
        lora_groups({})  # type: ignore[arg-type]


def test_missing_peft_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "peft" or m.startswith("peft.")]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(gs.MissingDependencyError, match=r"gradsurg\[peft\]"):
        lora_groups(TinyMLP())
