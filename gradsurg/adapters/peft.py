"""LoRA factor groups for Hugging Face PEFT models.

Ortho-LoRA (Yang et al. 2026, https://arxiv.org/abs/2601.09684) projects conflicting task gradients
separately inside each LoRA factor: for a layer ``W = W₀ + s·B A`` with ``A ∈ ℝ^{r×k}`` and
``B ∈ ℝ^{d×r}``, the per-task gradients of ``A`` and those of ``B`` form two independent groups. This
module finds those factors **structurally** — every module that is a PEFT LoRA layer
(``peft.tuners.lora.LoraLayer``) and the adapters held in its ``lora_A`` / ``lora_B`` /
``lora_embedding_A`` / ``lora_embedding_B`` / ``lora_magnitude_vector`` containers — never by
matching parameter names, so it works for any architecture PEFT supports (``nn.Linear``, GPT-2's
``Conv1D`` with ``fan_in_fan_out=True``, embeddings, convolutions, quantized layers).

One line builds the groups and the :class:`~gradsurg.Surgeon`::

    import gradsurg as gs

    surgeon = gs.adapters.peft.surgeon(peft_model, "ortho_lora", seed=0)
    surgeon.backward({"sst2": loss_a, "mnli": loss_b})
    optimizer.step()

Labels of the groups:

* ``"lora_A"`` — a down-projection ``A`` (``lora_A`` or, for an embedding, ``lora_embedding_A``);
* ``"lora_B"`` — an up-projection ``B`` (with its bias when the adapter has ``lora_bias=True``);
* ``"lora_magnitude"`` — DoRA's magnitude vector, kept apart from ``A`` and ``B``.

Parameters outside the LoRA layers (``modules_to_save`` heads, task heads, any other trainable
parameter) are left out of the groups, so the Surgeon gives them the plain sum of the task gradients.

This module needs the ``peft`` extra (``pip install 'gradsurg[peft]'``); PEFT is imported when a
function is called, so importing the module costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from gradsurg.errors import InvalidGroupError, InvalidOptionError, NoMatchingParametersError, missing_dependency
from gradsurg.groups import ParamGroup
from gradsurg.strategies.base import Requirement, check_choice
from gradsurg.strategies.registry import resolve_strategy
from gradsurg.surgeon import StrategySpec, Surgeon

__all__ = [
    "GRANULARITIES",
    "LABEL_A",
    "LABEL_B",
    "LABEL_MAGNITUDE",
    "Granularity",
    "LayerFilter",
    "lora_groups",
    "surgeon",
]

LABEL_A = "lora_A"
LABEL_B = "lora_B"
LABEL_MAGNITUDE = "lora_magnitude"

Granularity = Literal["layer", "factor"]
GRANULARITIES: tuple[Granularity, ...] = ("layer", "factor")

#: ``layers=`` accepts one name, several names, or a predicate on the layer's qualified name.
LayerFilter = str | Iterable[str] | Callable[[str], bool]

# The PEFT containers of a LoRA layer (``ModuleDict`` / ``ParameterDict`` keyed by adapter name) and
# the label of the factor each one holds, in the order groups are emitted.
_CONTAINERS: tuple[tuple[str, str], ...] = (
    ("lora_A", LABEL_A),
    ("lora_embedding_A", LABEL_A),
    ("lora_B", LABEL_B),
    ("lora_embedding_B", LABEL_B),
    ("lora_magnitude_vector", LABEL_MAGNITUDE),
)
_FEATURE = "gradsurg.adapters.peft"


@dataclass(frozen=True)
class _Factor:
    """One factor of one adapter in one LoRA layer, with its trainable parameters."""

    layer: str
    adapter: str
    label: str
    container: str
    rank: int
    layer_type: str
    fan_in_fan_out: bool
    named: tuple[tuple[str, nn.Parameter], ...]


def lora_groups(
    model: nn.Module,
    *,
    adapter_name: str | Sequence[str] | None = None,
    granularity: Granularity = "layer",
    layers: LayerFilter | None = None,
) -> list[ParamGroup]:
    """Parameter groups of the LoRA factors of a PEFT model: ``A`` and ``B`` apart, per layer or in all.

    With ``granularity="layer"`` (the default, Ortho-LoRA's reading) every LoRA layer contributes one
    ``"lora_A"`` group and one ``"lora_B"`` group per adapter, so a strategy sees the per-task
    gradients ``G_A ∈ ℝ^{T×rk}`` and ``G_B ∈ ℝ^{T×dr}`` of each layer separately. With
    ``granularity="factor"`` all ``A`` factors of an adapter form one group and all ``B`` factors
    another (each row is then the concatenation over layers).

    Args:
        model: A model holding PEFT LoRA layers: a ``PeftModel`` from ``peft.get_peft_model``, its
            ``base_model``, or a model prepared with ``peft.inject_adapter_in_model``.
        adapter_name: The adapter(s) to group. ``None`` (default) takes the active adapter(s).
        granularity: ``"layer"`` (one group per factor per LoRA layer) or ``"factor"`` (one group for
            all ``A``'s and one for all ``B``'s of each adapter).
        layers: Restrict the groups to some LoRA layers: a qualified module name or a list of them
            (a name matches a layer whose qualified name equals it or ends with ``"." + name``, e.g.
            ``"layer.0.attention.self.query"``), or a predicate called with each LoRA layer's
            qualified name. LoRA parameters of other layers are left out, so they get the plain sum.

    Returns:
        The groups, adapter by adapter and layer by layer in ``model.named_modules()`` order. Each
        group's ``meta`` holds ``adapter``, ``factor`` (``"A"``, ``"B"`` or ``"magnitude"``),
        ``layer`` (the qualified layer name; ``None`` for ``granularity="factor"``), ``rank`` (``r``;
        ``None`` when a ``"factor"`` group mixes ranks), ``layers`` and ``ranks`` (tuples over the
        layers in the group), ``pair`` (equal for the ``A`` and ``B`` groups of the same layer and
        adapter), ``param_names`` (qualified names of the parameters), ``layer_types`` and
        ``fan_in_fan_out``.

    Raises:
        MissingDependencyError: PEFT is not installed (extra ``peft``).
        InvalidOptionError: ``granularity`` is not ``"layer"`` or ``"factor"``, or ``adapter_name``
            names an adapter the model does not have (the message lists those present).
        NoMatchingParametersError: The model has no PEFT LoRA layer, or ``layers`` selects none.
        InvalidGroupError: The LoRA parameters of a selected adapter are all frozen.

    Example:
        >>> groups = gs.adapters.peft.lora_groups(peft_model)
        >>> surgeon = gs.Surgeon(groups, "ortho_lora", seed=0)
    """
    check_choice(granularity, GRANULARITIES, "lora_groups", "granularity")
    lora_layer_cls = _lora_layer_class()
    if not isinstance(model, nn.Module):
        raise InvalidGroupError(f"lora_groups() expects an nn.Module; found {type(model).__name__}.")
    found = [(name, module) for name, module in model.named_modules() if isinstance(module, lora_layer_cls)]
    if not found:
        raise NoMatchingParametersError(
            f"lora_groups(): {type(model).__name__} must contain PEFT LoRA layers (modules that are "
            "peft.tuners.lora.LoraLayer, holding lora_A/lora_B or lora_embedding_A/lora_embedding_B); "
            "found none. Wrap the model with peft.get_peft_model(model, peft.LoraConfig(...)) first."
        )
    adapters = _resolve_adapters(found, adapter_name)
    selected = _select_layers(found, layers)
    groups: list[ParamGroup] = []
    for adapter in adapters:
        factors = _adapter_factors(selected, adapter)
        groups += _layer_groups(factors) if granularity == "layer" else _factor_groups(factors, adapter)
    return groups


def surgeon(
    model: nn.Module,
    strategy: StrategySpec | Mapping[str, StrategySpec] = "ortho_lora",
    *,
    seed: int | None = None,
    adapter_name: str | Sequence[str] | None = None,
    granularity: Granularity = "layer",
    layers: LayerFilter | None = None,
    **surgeon_options: Any,
) -> Surgeon:
    """Build the LoRA factor groups of ``model`` and a :class:`~gradsurg.Surgeon` over them, in one call.

    ``gs.adapters.peft.surgeon(model, "pcgrad")`` runs PCGrad inside every LoRA factor;
    ``"ortho_lora"`` (the default) is the same projection with one task order shared by all groups.

    DoRA's magnitude vectors (label ``"lora_magnitude"``) are not LoRA factors. When ``strategy``
    requires LoRA factor groups (as ``ortho_lora`` does), they get the plain ``"sum"``, like every
    parameter the Ortho-LoRA paper does not project; any other strategy is applied to them too (one
    group per magnitude vector). Pass a mapping such as
    ``{"lora_A": "ortho_lora", "lora_B": "ortho_lora", "lora_magnitude": "pcgrad"}`` to choose
    yourself; a mapping is handed to the Surgeon unchanged.

    Args:
        model: The PEFT model (see :func:`lora_groups`).
        strategy: A registered name, a :class:`~gradsurg.Strategy` instance, or a mapping from group
            label to either (``"*"`` for the rest).
        seed: Seed of the Surgeon's generator (the task order); ``None`` draws one.
        adapter_name: See :func:`lora_groups`.
        granularity: See :func:`lora_groups`.
        layers: See :func:`lora_groups`.
        **surgeon_options: Other keyword arguments of :class:`~gradsurg.Surgeon`
            (``check_finite``, ``collect_stats``, ...).

    Returns:
        The Surgeon; call ``surgeon.backward(losses)`` instead of ``sum(losses).backward()``.

    Raises:
        UnknownStrategyError: ``strategy`` names no registered strategy.
        GradSurgError: The errors of :func:`lora_groups` (PEFT missing, a bad option, no LoRA layer,
            a frozen adapter) and of :class:`~gradsurg.Surgeon`.

    Example:
        >>> surgeon = gs.adapters.peft.surgeon(peft_model, "ortho_lora", seed=0)
        >>> surgeon.backward([loss_task_1, loss_task_2, loss_task_3])
        >>> optimizer.step()
    """
    groups = lora_groups(model, adapter_name=adapter_name, granularity=granularity, layers=layers)
    return Surgeon(groups, _strategy_for(groups, strategy), seed=seed, **surgeon_options)


def _strategy_for(
    groups: Sequence[ParamGroup], strategy: StrategySpec | Mapping[str, StrategySpec]
) -> StrategySpec | Mapping[str, StrategySpec]:
    """Route DoRA magnitude groups to ``"sum"`` when the strategy only accepts LoRA factors."""
    if isinstance(strategy, Mapping):
        return strategy
    resolved = resolve_strategy(strategy)
    has_magnitude = any(g.label == LABEL_MAGNITUDE for g in groups)
    if has_magnitude and Requirement.LORA_FACTOR_GROUPS in resolved.requires:
        return {LABEL_A: resolved, LABEL_B: resolved, LABEL_MAGNITUDE: "sum"}
    return resolved


def _lora_layer_class() -> type[Any]:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError as exc:
        raise missing_dependency("peft", "peft", _FEATURE) from exc
    cls: type[Any] = LoraLayer
    return cls


def _adapters_present(found: Sequence[tuple[str, nn.Module]]) -> list[str]:
    names: dict[str, None] = {}
    for _, module in found:
        for container, _ in _CONTAINERS:
            names.update(dict.fromkeys(getattr(module, container, None) or ()))
    return list(names)


def _resolve_adapters(found: Sequence[tuple[str, nn.Module]], adapter_name: str | Sequence[str] | None) -> list[str]:
    present = _adapters_present(found)
    if adapter_name is None:
        active: dict[str, None] = {}
        for _, module in found:
            active.update(dict.fromkeys(getattr(module, "active_adapters", ())))
        requested = [a for a in active if a in present]
    else:
        requested = _name_list(adapter_name, "adapter_name", "an adapter name or a non-empty list of them")
    unknown = [a for a in requested if a not in present]
    if not requested or unknown:
        raise InvalidOptionError(
            f"Option `adapter_name` of lora_groups must name adapters of the model (default: the active "
            f"ones); found adapter_name={adapter_name!r}, while the adapters present are {present}."
        )
    return requested


def _name_list(value: object, option: str, requirement: str) -> list[str]:
    names = [value] if isinstance(value, str) else list(value) if isinstance(value, Iterable) else []
    if not names or not all(isinstance(n, str) for n in names):
        raise InvalidOptionError(f"Option `{option}` of lora_groups must be {requirement}; found {option}={value!r}.")
    return list(dict.fromkeys(names))


def _select_layers(found: Sequence[tuple[str, nn.Module]], layers: LayerFilter | None) -> list[tuple[str, nn.Module]]:
    if layers is None:
        return list(found)
    if callable(layers):
        selected = [(name, module) for name, module in found if layers(name)]
        if not selected:
            raise NoMatchingParametersError(
                f"lora_groups(): the `layers` predicate must accept at least one of the {len(found)} LoRA "
                f"layers; it accepted none (e.g. {found[0][0]!r})."
            )
        return selected
    wanted = _name_list(layers, "layers", "a layer name, a non-empty list of names or a predicate")
    for pattern in wanted:
        if not any(_name_matches(name, pattern) for name, _ in found):
            examples = [name for name, _ in found[:3]]
            raise NoMatchingParametersError(
                f"lora_groups(): every name in `layers` must match a LoRA layer (its qualified name or a "
                f"dotted suffix of it); {pattern!r} matches none. LoRA layers: {examples}"
                + (f" and {len(found) - 3} more." if len(found) > 3 else ".")
            )
    return [(name, module) for name, module in found if any(_name_matches(name, w) for w in wanted)]


def _name_matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern)


def _adapter_factors(layers: Sequence[tuple[str, nn.Module]], adapter: str) -> list[_Factor]:
    """The factors of ``adapter`` in ``layers`` that have at least one trainable parameter."""
    factors: list[_Factor] = []
    frozen: list[str] = []
    for layer_name, module in layers:
        for container, label in _CONTAINERS:
            holder = getattr(module, container, None)
            if holder is None or adapter not in holder:
                continue
            prefix = f"{layer_name}.{container}.{adapter}"
            item = holder[adapter]
            named = (
                [(prefix, item)]
                if isinstance(item, nn.Parameter)
                else [(f"{prefix}.{n}", p) for n, p in item.named_parameters()]
            )
            trainable = tuple((n, p) for n, p in named if p.requires_grad)
            frozen += [n for n, p in named if not p.requires_grad]
            if trainable:
                factors.append(
                    _Factor(
                        layer=layer_name,
                        adapter=adapter,
                        label=label,
                        container=container,
                        rank=_rank(module, adapter),
                        layer_type=type(module).__name__,
                        fan_in_fan_out=bool(getattr(module, "fan_in_fan_out", False)),
                        named=trainable,
                    )
                )
    if factors:
        return factors
    if frozen:
        raise InvalidGroupError(
            f"lora_groups(): the LoRA parameters of adapter {adapter!r} must be trainable "
            f"(requires_grad=True); all {len(frozen)} are frozen (e.g. {frozen[0]!r}). PEFT freezes adapters "
            "that are not active and models loaded for inference: call model.set_adapter(name), or load with "
            "PeftModel.from_pretrained(..., is_trainable=True)."
        )
    raise NoMatchingParametersError(
        f"lora_groups(): adapter {adapter!r} must have LoRA parameters in the selected layers; found none "
        f"in {len(layers)} selected layer(s)."
    )


def _rank(layer: Any, adapter: str) -> int:
    return int(layer.r[adapter])


def _layer_groups(factors: Sequence[_Factor]) -> list[ParamGroup]:
    return [
        _group(f"{f.layer}.{f.container}.{f.adapter}", [f], layer=f.layer, pair=f"{f.layer}:{f.adapter}")
        for f in factors
    ]


def _factor_groups(factors: Sequence[_Factor], adapter: str) -> list[ParamGroup]:
    groups: list[ParamGroup] = []
    for label in (LABEL_A, LABEL_B, LABEL_MAGNITUDE):
        members = [f for f in factors if f.label == label]
        if members:
            groups.append(_group(f"{label}.{adapter}", members, layer=None, pair=f"*:{adapter}"))
    return groups


def _group(name: str, members: Sequence[_Factor], *, layer: str | None, pair: str) -> ParamGroup:
    first = members[0]
    ranks = tuple(f.rank for f in members)
    return ParamGroup(
        name=name,
        label=first.label,
        params=tuple(p for f in members for _, p in f.named),
        meta={
            "adapter": first.adapter,
            "factor": first.label.removeprefix("lora_"),
            "layer": layer,
            "rank": ranks[0] if len(set(ranks)) == 1 else None,
            "layers": tuple(f.layer for f in members),
            "ranks": ranks,
            "pair": pair,
            "param_names": tuple(n for f in members for n, _ in f.named),
            "layer_types": tuple(f.layer_type for f in members),
            "fan_in_fan_out": tuple(f.fan_in_fan_out for f in members),
        },
    )
