"""gradsurg: multi-task gradient surgery for PyTorch.

Compute one gradient per task, let a strategy (PCGrad, CAGrad, Ortho-LoRA, ...) turn each parameter
group's per-task gradients into one direction, and write it into ``.grad`` for any optimizer::

    import gradsurg as gs

    surgeon = gs.Surgeon(gs.groups.whole(model), "pcgrad", seed=0)
    surgeon.backward([loss_a, loss_b])
    optimizer.step()
"""

from gradsurg import adapters, diagnostics, groups, strategies
from gradsurg.errors import (
    GradSurgError,
    GradSurgWarning,
    IncompatibleGroupError,
    InvalidGradientError,
    InvalidGroupError,
    InvalidLossError,
    InvalidOptionError,
    InvalidStateError,
    MissingDependencyError,
    MissingUpdateError,
    NoMatchingParametersError,
    NonFiniteGradientError,
    RegistrationError,
    UnknownStrategyError,
)
from gradsurg.groups import ParamGroup
from gradsurg.strategies import (
    GramStrategy,
    Need,
    Output,
    Property,
    Requirement,
    Strategy,
    StrategyInfo,
    get_strategy,
    list_strategies,
    register_strategy,
    strategy_info,
)
from gradsurg.surgeon import Surgeon

__version__ = "0.1.0"

__all__ = [
    "GradSurgError",
    "GradSurgWarning",
    "GramStrategy",
    "IncompatibleGroupError",
    "InvalidGradientError",
    "InvalidGroupError",
    "InvalidLossError",
    "InvalidOptionError",
    "InvalidStateError",
    "MissingDependencyError",
    "MissingUpdateError",
    "Need",
    "NoMatchingParametersError",
    "NonFiniteGradientError",
    "Output",
    "ParamGroup",
    "Property",
    "RegistrationError",
    "Requirement",
    "Strategy",
    "StrategyInfo",
    "Surgeon",
    "UnknownStrategyError",
    "__version__",
    "adapters",
    "diagnostics",
    "get_strategy",
    "groups",
    "list_strategies",
    "register_strategy",
    "strategies",
    "strategy_info",
]
