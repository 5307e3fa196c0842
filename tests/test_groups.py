"""Parameter groups: ParamGroup validation and the generic groupers whole / per_module / by_pattern."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import gradsurg as gs
from gradsurg.errors import InvalidGroupError, NoMatchingParametersError
from gradsurg.groups import ParamGroup, by_pattern, check_disjoint, per_module, whole


class Net(nn.Module):
    """encoder (Linear + LayerNorm), a frozen embedding, a decoder Linear and a root-level parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.embed.weight.requires_grad_(False)
        self.encoder = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
        self.decoder = nn.Linear(4, 2)
        self.scale = nn.Parameter(torch.ones(()))


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------- ParamGroup
def test_param_group_holds_an_ordered_tuple() -> None:
    a, b = nn.Parameter(torch.zeros(2, 3)), nn.Parameter(torch.zeros(4))
    group = ParamGroup("g", "label", [a, b])  # type: ignore[arg-type]
    assert group.params == (a, b)
    assert group.numel == 10
    assert repr(group) == "ParamGroup(name='g', label='label', params=2, numel=10)"


@pytest.mark.parametrize(
    ("name", "label", "params", "match"),
    [
        ("", "l", (nn.Parameter(torch.zeros(1)),), "`name` must be a non-empty string; found ''"),
        (3, "l", (nn.Parameter(torch.zeros(1)),), "`name` must be a non-empty string; found 3"),
        ("g", "", (nn.Parameter(torch.zeros(1)),), "`label` of group 'g' must be a non-empty string"),
        ("g", "l", (), "must hold at least one parameter; found none"),
        ("g", "l", ([1.0],), "every parameter must be a tensor; found list at position 0"),
        ("g", "l", (torch.zeros(2, 2),), r"must be trainable .* position 0 \(shape \(2, 2\)\) is frozen"),
        ("g", "l", (torch.zeros(2, dtype=torch.long),), "is frozen"),
    ],
)
def test_param_group_rejects_malformed_input(name: object, label: str, params: tuple, match: str) -> None:
    with pytest.raises(InvalidGroupError, match=match) as caught:
        ParamGroup(name, label, params)  # type: ignore[arg-type]
    assert isinstance(caught.value, ValueError)


def test_param_group_rejects_repeated_and_complex_parameters() -> None:
    p = nn.Parameter(torch.zeros(2))
    with pytest.raises(InvalidGroupError, match="position 1 repeats an earlier one"):
        ParamGroup("g", "l", (p, p))
    complex_param = nn.Parameter(torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(InvalidGroupError, match=r"must be floating point; found dtype torch\.complex64"):
        ParamGroup("g", "l", (complex_param,))


def test_param_group_is_frozen_and_meta_is_read_only() -> None:
    meta = {"layer": "q_proj"}
    group = ParamGroup("g", "l", (nn.Parameter(torch.zeros(1)),), meta=meta)
    meta["layer"] = "changed"  # the group copied it
    assert group.meta["layer"] == "q_proj"
    with pytest.raises(TypeError):
        group.meta["layer"] = "v_proj"  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        group.name = "h"  # type: ignore[misc]


def test_check_disjoint_rejects_overlaps_duplicate_names_and_non_groups() -> None:
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
    check_disjoint([ParamGroup("x", "l", (a,)), ParamGroup("y", "l", (b,))])
    overlap = r"must not overlap; a parameter of shape \(3,\) is in both 'x' and 'y'"
    with pytest.raises(InvalidGroupError, match=overlap):
        check_disjoint([ParamGroup("x", "l", (a,)), ParamGroup("y", "l", (b, a))])
    with pytest.raises(InvalidGroupError, match="'x' appears twice"):
        check_disjoint([ParamGroup("x", "l", (a,)), ParamGroup("x", "l", (b,))])
    with pytest.raises(InvalidGroupError, match="must be ParamGroup instances; found tuple"):
        check_disjoint([(a,)])  # type: ignore[list-item]


# ---------------------------------------------------------------------------------- whole
def test_whole_takes_the_trainable_parameters_of_a_module() -> None:
    net = Net()
    (group,) = whole(net)
    assert (group.name, group.label) == ("all", "all")
    assert list(group.params) == list(trainable(net).values())
    (named,) = whole(net.decoder.parameters(), name="dec", label="head")
    assert (named.name, named.label, named.params) == ("dec", "head", tuple(net.decoder.parameters()))


def test_whole_rejects_frozen_parameters_and_empty_input() -> None:
    net = Net()
    with pytest.raises(InvalidGroupError, match="frozen"):
        whole(net.embed.parameters())
    with pytest.raises(NoMatchingParametersError, match="iterable is empty"):
        whole([])
    net.requires_grad_(False)
    with pytest.raises(NoMatchingParametersError, match="Net has no trainable parameter"):
        whole(net)


# ---------------------------------------------------------------------------------- per_module
def test_per_module_makes_one_group_per_module_owning_trainable_parameters() -> None:
    net = Net()
    groups = per_module(net)
    assert [(g.name, g.label) for g in groups] == [
        ("<root>", "Net"),
        ("encoder.0", "Linear"),
        ("encoder.1", "LayerNorm"),
        ("decoder", "Linear"),
    ]  # the frozen embedding owns no trainable parameter
    assert groups[1].params == tuple(net.encoder[0].parameters())
    assert groups[0].meta["module"] == ""
    check_disjoint(groups)
    assert {id(p) for g in groups for p in g.params} == {id(p) for p in trainable(net).values()}


def test_per_module_labels() -> None:
    net = Net()
    assert {g.label for g in per_module(net, label="shared")} == {"shared"}
    labels = [g.label for g in per_module(net, label=lambda name, module: name.split(".")[0] or "root")]
    assert labels == ["root", "encoder", "encoder", "decoder"]


def test_per_module_rejects_a_model_without_trainable_parameters() -> None:
    with pytest.raises(NoMatchingParametersError, match="no module of Sequential owns a trainable parameter"):
        per_module(nn.Sequential(nn.ReLU()))
    with pytest.raises(InvalidGroupError, match=r"Expected an nn\.Module; found list"):
        per_module([nn.Linear(1, 1)])  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------- by_pattern
def test_by_pattern_mapping_groups_by_label() -> None:
    net = Net()
    groups = by_pattern(net, {"enc": "encoder.*", "rest": ["decoder.*", "scale"]})
    assert [(g.name, g.label) for g in groups] == [("enc", "enc"), ("rest", "rest")]
    assert groups[0].meta["names"] == ("encoder.0.weight", "encoder.0.bias", "encoder.1.weight", "encoder.1.bias")
    assert groups[1].meta["names"] == ("scale", "decoder.weight", "decoder.bias")  # model order
    assert groups[1].params == (net.scale, *net.decoder.parameters())


def test_by_pattern_sequence_and_single_string() -> None:
    net = Net()
    assert [g.name for g in by_pattern(net, ["*.weight", "*.bias"])] == ["*.weight", "*.bias"]
    (only,) = by_pattern(net, "decoder.*")
    assert only.label == "decoder.*"


def test_by_pattern_skips_frozen_parameters() -> None:
    (group,) = by_pattern(Net(), ["*weight"])
    assert "embed.weight" not in group.meta["names"]


def test_by_pattern_rejects_overlaps() -> None:
    with pytest.raises(InvalidGroupError, match=r"must not overlap.*'a' and 'b'"):
        by_pattern(Net(), {"a": "encoder.*", "b": "*.weight"})


@pytest.mark.parametrize(
    ("patterns", "match"),
    [
        ({"emb": "embed.*"}, r"must match at least one trainable parameter; it matches 1 parameter\(s\), all frozen"),
        ({"none": "nothing.*"}, "must match at least one trainable parameter; it matches no parameter name"),
        ([], "no pattern given"),
        ({}, "no pattern given"),
    ],
)
def test_by_pattern_rejects_empty_results(patterns: object, match: str) -> None:
    with pytest.raises(NoMatchingParametersError, match=match) as caught:
        by_pattern(Net(), patterns)  # type: ignore[arg-type]
    assert isinstance(caught.value, InvalidGroupError)


def test_groupers_are_exported() -> None:
    assert gs.groups.whole is whole
    assert gs.ParamGroup is ParamGroup
