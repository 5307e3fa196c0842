"""Parameter groups: the unit a strategy works on.

A :class:`ParamGroup` is an ordered set of trainable parameters whose per-task gradients are
flattened and concatenated into one row per task, ``G ∈ ℝ^{T×n}``. A strategy sees one group's
``G`` and returns one direction ``d ∈ ℝⁿ``, which the :class:`~gradsurg.Surgeon` writes back into the
parameters' ``.grad``.

The generic groupers here build groups from a plain ``nn.Module``:

* :func:`whole` — one group of all the given parameters (classic whole-model PCGrad);
* :func:`per_module` — one group per module that owns trainable parameters;
* :func:`by_pattern` — one group per glob pattern over qualified parameter names.

The LoRA-aware grouper lives in :mod:`gradsurg.adapters.peft`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from gradsurg.errors import InvalidGroupError, NoMatchingParametersError

__all__ = ["ParamGroup", "by_pattern", "check_disjoint", "per_module", "whole"]


@dataclass(frozen=True, eq=False)
class ParamGroup:
    """An ordered, named set of trainable parameters handled by one strategy call.

    Attributes:
        name: Unique, human-readable identifier (used in error messages, stats and checkpoints).
        label: The kind of group, used to pick a strategy from a mapping
            (``{"lora_A": "pcgrad", "*": "sum"}``) and to check structural requirements.
        params: The parameters, in the order their gradients are concatenated.
        meta: Read-only extra information (e.g. the LoRA layer name and rank).
    """

    name: str
    label: str
    params: tuple[nn.Parameter, ...]
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise InvalidGroupError(f"ParamGroup `name` must be a non-empty string; found {self.name!r}.")
        if not isinstance(self.label, str) or not self.label:
            raise InvalidGroupError(
                f"ParamGroup `label` of group {self.name!r} must be a non-empty string; found {self.label!r}."
            )
        params = tuple(self.params)
        if not params:
            raise InvalidGroupError(f"ParamGroup {self.name!r} must hold at least one parameter; found none.")
        seen: set[int] = set()
        for index, p in enumerate(params):
            if not isinstance(p, torch.Tensor):
                raise InvalidGroupError(
                    f"ParamGroup {self.name!r}: every parameter must be a tensor; "
                    f"found {type(p).__name__} at position {index}."
                )
            if not p.requires_grad:
                raise InvalidGroupError(
                    f"ParamGroup {self.name!r}: every parameter must be trainable (requires_grad=True); "
                    f"the parameter at position {index} (shape {tuple(p.shape)}) is frozen."
                )
            if not p.is_floating_point():
                raise InvalidGroupError(
                    f"ParamGroup {self.name!r}: parameters must be floating point; "
                    f"found dtype {p.dtype} at position {index}."
                )
            if id(p) in seen:
                raise InvalidGroupError(
                    f"ParamGroup {self.name!r}: a parameter may appear only once; "
                    f"position {index} repeats an earlier one."
                )
            seen.add(id(p))
        object.__setattr__(self, "params", params)
        object.__setattr__(self, "meta", MappingProxyType(dict(self.meta)))

    @property
    def numel(self) -> int:
        """Total number of scalar entries ``n`` of the group (the width of its gradient matrix)."""
        return sum(p.numel() for p in self.params)

    def __repr__(self) -> str:
        return f"ParamGroup(name={self.name!r}, label={self.label!r}, params={len(self.params)}, numel={self.numel})"


def check_disjoint(groups: Sequence[ParamGroup]) -> None:
    """Raise :class:`InvalidGroupError` if two groups share a parameter or a name."""
    owner: dict[int, str] = {}
    names: set[str] = set()
    for group in groups:
        if not isinstance(group, ParamGroup):
            raise InvalidGroupError(f"Groups must be ParamGroup instances; found {type(group).__name__}.")
        if group.name in names:
            raise InvalidGroupError(f"Group names must be unique; {group.name!r} appears twice.")
        names.add(group.name)
        for p in group.params:
            if id(p) in owner:
                raise InvalidGroupError(
                    f"Groups must not overlap; a parameter of shape {tuple(p.shape)} is in both "
                    f"{owner[id(p)]!r} and {group.name!r}."
                )
            owner[id(p)] = group.name


def _check_module(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise InvalidGroupError(f"Expected an nn.Module; found {type(model).__name__}.")


def _trainable_named(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    _check_module(model)
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def whole(
    params: nn.Module | Iterable[nn.Parameter], *, name: str = "all", label: str = "all"
) -> list[ParamGroup]:
    """One group holding all the parameters (whole-model surgery, as in the PCGrad paper).

    Args:
        params: A module (its trainable parameters are taken; frozen ones are skipped) or an
            iterable of parameters (every one must be trainable).
        name: The group's name.
        label: The group's label.

    Returns:
        A one-element list, so it can be passed to :class:`~gradsurg.Surgeon` directly.

    Raises:
        NoMatchingParametersError: No trainable parameter was given.
        InvalidGroupError: A listed parameter is frozen or repeated.
    """
    if isinstance(params, nn.Module):
        plist = [p for _, p in _trainable_named(params)]
        if not plist:
            raise NoMatchingParametersError(
                f"whole(): the module {type(params).__name__} has no trainable parameter "
                "(every parameter has requires_grad=False)."
            )
    else:
        plist = list(params)
        if not plist:
            raise NoMatchingParametersError("whole(): the parameter iterable is empty; expected at least one.")
    return [ParamGroup(name=name, label=label, params=tuple(plist))]


def per_module(model: nn.Module, *, label: str | Callable[[str, nn.Module], str] | None = None) -> list[ParamGroup]:
    """One group per module that directly owns trainable parameters (e.g. each ``Linear``).

    Args:
        model: The model to walk.
        label: The label of every group; a callable ``(module_name, module) -> label``; or ``None``
            for the module's class name (``"Linear"``, ``"LayerNorm"``, ...).

    Returns:
        Groups named after the module's qualified name (``"<root>"`` for the model itself), in
        ``model.named_modules()`` order.

    Raises:
        NoMatchingParametersError: The model has no trainable parameter.
    """
    _check_module(model)
    groups: list[ParamGroup] = []
    for module_name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if label is None:
            group_label = type(module).__name__
        elif callable(label):
            group_label = label(module_name, module)
        else:
            group_label = label
        groups.append(
            ParamGroup(name=module_name or "<root>", label=group_label, params=tuple(own), meta={"module": module_name})
        )
    if not groups:
        raise NoMatchingParametersError(
            f"per_module(): no module of {type(model).__name__} owns a trainable parameter."
        )
    return groups


def by_pattern(model: nn.Module, patterns: Mapping[str, str | Sequence[str]] | Sequence[str]) -> list[ParamGroup]:
    """One group per glob pattern over qualified parameter names (``fnmatch`` syntax).

    Only trainable parameters are considered. A pattern that matches no trainable parameter is an
    error, and so is a parameter matched by two patterns.

    Args:
        model: The model whose ``named_parameters()`` are matched.
        patterns: Either a mapping ``{label: pattern or [patterns]}`` (the group's name and label are
            the key) or a sequence of patterns (each group is named and labelled by its pattern).

    Example:
        >>> groups = by_pattern(model, {"encoder": "encoder.*", "decoder": ["decoder.*", "lm_head.*"]})

    Raises:
        NoMatchingParametersError: A pattern matches no trainable parameter.
        InvalidGroupError: A parameter is matched by two patterns.
    """
    items: list[tuple[str, list[str]]]
    if isinstance(patterns, Mapping):
        items = [(key, [value] if isinstance(value, str) else list(value)) for key, value in patterns.items()]
    elif isinstance(patterns, str):
        items = [(patterns, [patterns])]
    else:
        items = [(pattern, [pattern]) for pattern in patterns]
    if not items:
        raise NoMatchingParametersError("by_pattern(): no pattern given; expected at least one.")
    named = _trainable_named(model)
    all_names = {name for name, _ in model.named_parameters()}
    groups: list[ParamGroup] = []
    for key, globs in items:
        matched = [(n, p) for n, p in named if any(fnmatch.fnmatchcase(n, g) for g in globs)]
        if not matched:
            frozen = [n for n in all_names if any(fnmatch.fnmatchcase(n, g) for g in globs)]
            detail = (
                f"it matches {len(frozen)} parameter(s), all frozen (e.g. {sorted(frozen)[0]!r})"
                if frozen
                else "it matches no parameter name"
            )
            raise NoMatchingParametersError(
                f"by_pattern(): pattern {globs!r} for group {key!r} must match at least one trainable "
                f"parameter; {detail}."
            )
        names = tuple(n for n, _ in matched)
        groups.append(ParamGroup(name=key, label=key, params=tuple(p for _, p in matched), meta={"names": names}))
    check_disjoint(groups)
    return groups
