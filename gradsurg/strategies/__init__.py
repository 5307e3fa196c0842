"""Strategies: one module per method, registered by name.

Importing this package registers the built-in strategies. Use :func:`gradsurg.get_strategy` to build
one by name and :func:`gradsurg.register_strategy` to add your own.
"""

from gradsurg.strategies import cagrad, mean, ortho_lora, pcgrad, sum  # noqa: F401  (registration)
from gradsurg.strategies.base import Context, GramStrategy, Property, Requirement, Strategy
from gradsurg.strategies.cagrad import CAGrad
from gradsurg.strategies.mean import Mean
from gradsurg.strategies.ortho_lora import OrthoLoRA
from gradsurg.strategies.pcgrad import PCGrad
from gradsurg.strategies.registry import (
    ENTRY_POINT_GROUP,
    StrategyInfo,
    get_strategy,
    list_strategies,
    register_strategy,
    resolve_strategy,
    strategy_info,
)
from gradsurg.strategies.sum import Sum

__all__ = [
    "ENTRY_POINT_GROUP",
    "CAGrad",
    "Context",
    "GramStrategy",
    "Mean",
    "OrthoLoRA",
    "PCGrad",
    "Property",
    "Requirement",
    "Strategy",
    "StrategyInfo",
    "Sum",
    "get_strategy",
    "list_strategies",
    "register_strategy",
    "resolve_strategy",
    "strategy_info",
]
