"""Strategies: one module per method, registered by name.

Importing this package imports every strategy module in it, which registers the built-in
strategies. Use :func:`gradsurg.get_strategy` to build one by name and
:func:`gradsurg.register_strategy` to add your own.
"""

import importlib
import pkgutil

from gradsurg.strategies.base import Context, GramStrategy, Need, Output, Property, Requirement, Strategy
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

_SUPPORT_MODULES = frozenset({"base", "registry", "solvers", "projection"})

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _SUPPORT_MODULES and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "ENTRY_POINT_GROUP",
    "CAGrad",
    "Context",
    "GramStrategy",
    "Mean",
    "Need",
    "OrthoLoRA",
    "Output",
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
