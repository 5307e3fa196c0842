"""The strategy registry: names → strategy classes, with plugin discovery.

Names are normalised before every lookup: lower-cased, with ``-`` and spaces read as ``_``, so
``"PCGrad"``, ``"pcgrad"`` and ``"Ortho-LoRA"`` all resolve. Third-party packages register strategies
through the entry-point group ``gradsurg.strategies``; those entry points are loaded lazily, on the
first lookup, once.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import inspect
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from gradsurg.errors import GradSurgWarning, InvalidOptionError, RegistrationError, UnknownStrategyError
from gradsurg.strategies.base import Need, Property, Requirement, Strategy

__all__ = [
    "ENTRY_POINT_GROUP",
    "StrategyInfo",
    "get_strategy",
    "list_strategies",
    "register_strategy",
    "resolve_strategy",
    "strategy_info",
]

ENTRY_POINT_GROUP = "gradsurg.strategies"
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")

S = TypeVar("S", bound=type[Strategy])


@dataclass(frozen=True)
class StrategyInfo:
    """What the registry knows about one strategy.

    Attributes:
        name: The canonical (normalised) name.
        cls: The strategy class.
        summary: One line describing the method.
        reference: The paper, with its arXiv link.
        properties: The :class:`~gradsurg.strategies.base.Property` names the strategy guarantees.
        requires: The :class:`~gradsurg.strategies.base.Requirement` names it needs from groups.
        needs: The :class:`~gradsurg.strategies.base.Need` names it needs from its caller (losses,
            state, learnable parameters, post-step losses).
        family: The kind of method (``"baseline"``, ``"projection"``, ``"gram"``, ``"coordinate"``, ``"loss"``).
        cost: Its cost in ``T`` tasks and ``n`` parameters beyond computing the task gradients.
        aliases: Other names that resolve to it.
    """

    name: str
    cls: type[Strategy]
    summary: str
    reference: str
    properties: frozenset[str]
    requires: frozenset[str]
    needs: frozenset[str] = frozenset()
    family: str = ""
    cost: str = ""
    aliases: tuple[str, ...] = ()


_REGISTRY: dict[str, StrategyInfo] = {}
_ALIASES: dict[str, str] = {}
_plugins_loaded = False


def normalize_name(name: str) -> str:
    """Lower-case ``name`` and read ``-`` and spaces as ``_`` (``"Ortho-LoRA"`` → ``"ortho_lora"``)."""
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def _checked_name(name: object) -> str:
    if not isinstance(name, str):
        raise RegistrationError(f"A strategy name must be a string; found {type(name).__name__} {name!r}.")
    normal = normalize_name(name)
    if not _NAME_RE.match(normal):
        raise RegistrationError(
            "A strategy name must start with a letter and contain only letters, digits, '_' or '-'; "
            f"found {name!r}."
        )
    return normal


def register_strategy(
    name: str, *, aliases: tuple[str, ...] | list[str] = (), replace: bool = False
) -> Callable[[S], S]:
    """Class decorator that registers a :class:`~gradsurg.Strategy` subclass under ``name``.

    Args:
        name: The public name (normalised: case-insensitive, ``-`` read as ``_``).
        aliases: Other names for the same strategy.
        replace: Allow replacing an existing registration of the same name (for reloading plugins).

    Example:
        >>> @register_strategy("my_method")
        ... class MyMethod(Strategy):
        ...     def _combine(self, grads, context):
        ...         return grads.sum(0)

    Raises:
        RegistrationError: The name or an alias is malformed or already taken, or the class is not a
            ``Strategy`` subclass, or it declares an unknown property or requirement.
    """
    canonical = _checked_name(name)
    alias_names = tuple(_checked_name(a) for a in aliases)

    def decorator(cls: S) -> S:
        if not (isinstance(cls, type) and issubclass(cls, Strategy)):
            raise RegistrationError(
                f"register_strategy({name!r}) must decorate a subclass of gradsurg.Strategy; found {cls!r}."
            )
        unknown = set(cls.properties) - Property.ALL
        if unknown:
            raise RegistrationError(
                f"Strategy {name!r} declares unknown properties {sorted(unknown)}; known: {sorted(Property.ALL)}."
            )
        unknown = set(cls.requires) - Requirement.ALL
        if unknown:
            raise RegistrationError(
                f"Strategy {name!r} declares unknown requirements {sorted(unknown)}; known: {sorted(Requirement.ALL)}."
            )
        unknown = set(cls.needs) - Need.ALL
        if unknown:
            raise RegistrationError(
                f"Strategy {name!r} declares unknown needs {sorted(unknown)}; known: {sorted(Need.ALL)}."
            )
        for taken in (canonical, *alias_names):
            holder = _REGISTRY.get(taken) or _REGISTRY.get(_ALIASES.get(taken, ""))
            if holder is not None and not (replace and holder.name == canonical):
                raise RegistrationError(
                    f"Strategy name {taken!r} must be unique; it is already registered by {holder.cls.__qualname__}."
                )
        doc_line = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        info = StrategyInfo(
            name=canonical,
            cls=cls,
            summary=cls.summary or doc_line,
            reference=cls.paper,
            properties=frozenset(cls.properties),
            requires=frozenset(cls.requires),
            needs=frozenset(cls.needs),
            family=cls.family,
            cost=cls.cost,
            aliases=alias_names,
        )
        type.__setattr__(cls, "name", canonical)
        _REGISTRY[canonical] = info
        for alias in alias_names:
            _ALIASES[alias] = canonical
        return cls

    return decorator


def _load_plugins() -> None:
    """Import every entry point of the group ``gradsurg.strategies`` (once).

    An entry point may name a module (importing it runs its ``@register_strategy`` decorators) or a
    ``Strategy`` subclass, which is registered under the entry point's name if it is not yet
    registered. A plugin that fails to load is skipped with a :class:`GradSurgWarning`.
    """
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = entry_point.load()
            is_strategy = isinstance(loaded, type) and issubclass(loaded, Strategy)
            if is_strategy and not any(info.cls is loaded for info in _REGISTRY.values()):
                register_strategy(entry_point.name)(loaded)
        except Exception as exc:  # a broken plugin must not break gradsurg
            warnings.warn(
                f"Strategy plugin {entry_point.name!r} ({entry_point.value}) could not be loaded and is skipped: "
                f"{type(exc).__name__}: {exc}",
                GradSurgWarning,
                stacklevel=3,
            )


def _lookup(name: str) -> StrategyInfo:
    if not isinstance(name, str):
        raise UnknownStrategyError(f"A strategy name must be a string; found {type(name).__name__} {name!r}.")
    _load_plugins()
    normal = normalize_name(name)
    info = _REGISTRY.get(normal) or _REGISTRY.get(_ALIASES.get(normal, ""))
    if info is not None:
        return info
    known = sorted(_REGISTRY)
    close = difflib.get_close_matches(normal, known + sorted(_ALIASES), n=1, cutoff=0.5)
    hint = f" Did you mean {_ALIASES.get(close[0], close[0])!r}?" if close else ""
    raise UnknownStrategyError(f"Unknown strategy {name!r}.{hint} Known strategies: {', '.join(known)}.")


def list_strategies() -> list[str]:
    """The canonical names of all registered strategies (plugins included), sorted."""
    _load_plugins()
    return sorted(_REGISTRY)


def strategy_info(name: str) -> StrategyInfo:
    """The :class:`StrategyInfo` of a registered strategy.

    Raises:
        UnknownStrategyError: ``name`` is not registered (the message lists the known names and
            suggests the closest).
    """
    return _lookup(name)


def get_strategy(name: str, **options: Any) -> Strategy:
    """Build the strategy registered as ``name`` with keyword ``options``.

    Example:
        >>> get_strategy("CAGrad", c=0.5)
        CAGrad(c=0.5, rescale=1)

    Raises:
        UnknownStrategyError: ``name`` is not registered.
        InvalidOptionError: An option is unknown or out of range.
    """
    info = _lookup(name)
    accepted = [
        p.name
        for p in inspect.signature(info.cls).parameters.values()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise InvalidOptionError(
            f"Options of strategy {info.name!r} must be among {accepted or 'none (it takes no options)'}; "
            f"found unknown option(s) {unknown}."
        )
    return info.cls(**options)


def resolve_strategy(spec: str | Strategy) -> Strategy:
    """A strategy from a name (built with default options) or an instance (returned as is)."""
    if isinstance(spec, Strategy):
        return spec
    if isinstance(spec, str):
        return get_strategy(spec)
    raise UnknownStrategyError(
        f"A strategy must be given as a registered name or a gradsurg.Strategy instance; found {type(spec).__name__}."
    )
