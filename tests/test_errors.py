"""The error table: every user mistake raises a GradSurgError subclass (also the matching builtin) with a
plain message that names the thing, the requirement and the value found; a failed step changes nothing."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

import gradsurg as gs
from gradsurg import errors
from gradsurg.errors import (
    GradSurgError,
    IncompatibleGroupError,
    InvalidGradientError,
    InvalidGroupError,
    InvalidLossError,
    InvalidOptionError,
    InvalidStateError,
    MissingDependencyError,
    NonFiniteGradientError,
    UnknownStrategyError,
)
from gradsurg.strategies.base import Context, Need
from tests.conftest import MultiTaskNet, make_net

BUILTIN = {
    "UnknownStrategyError": KeyError,
    "RegistrationError": ValueError,
    "InvalidOptionError": ValueError,
    "InvalidGradientError": ValueError,
    "NonFiniteGradientError": FloatingPointError,
    "InvalidLossError": ValueError,
    "InvalidGroupError": ValueError,
    "NoMatchingParametersError": ValueError,
    "IncompatibleGroupError": ValueError,
    "InvalidStateError": ValueError,
    "MissingDependencyError": ImportError,
    "MissingUpdateError": RuntimeError,
}
ERROR_NAMES = sorted(name for name in errors.__all__ if name.endswith("Error") and name != "GradSurgError")


@pytest.mark.parametrize("name", ERROR_NAMES)
def test_every_error_is_a_gradsurg_error_and_the_documented_builtin(name: str) -> None:
    cls = getattr(errors, name)
    assert issubclass(cls, GradSurgError)
    assert name in BUILTIN, f"add {name} and its builtin to this table"
    assert issubclass(cls, BUILTIN[name])
    assert getattr(gs, name) is cls  # exported at the top level
    message = f"Thing {name} must be fine; found 'x'."
    assert str(cls(message)) == message  # KeyError would otherwise quote it


def test_gradsurg_warning_is_a_user_warning() -> None:
    assert issubclass(gs.GradSurgWarning, UserWarning)


def test_missing_dependency_names_the_extra() -> None:
    error = errors.missing_dependency("peft", "peft", "gradsurg.adapters.peft")
    assert isinstance(error, MissingDependencyError)
    assert isinstance(error, ImportError)
    assert str(error) == (
        "gradsurg.adapters.peft needs the optional dependency `peft`, which is not installed; "
        "install it with `pip install 'gradsurg[peft]'`."
    )


# ---------------------------------------------------------------------------------- the table
def _surgeon(net: MultiTaskNet, strategy: object = "sum") -> gs.Surgeon:
    return gs.Surgeon(gs.groups.whole(net.trunk, name="trunk"), strategy, seed=0)  # type: ignore[arg-type]


def _two_labels(net: MultiTaskNet, strategy: object) -> gs.Surgeon:
    """Groups labelled "first" (the first layer) and "rest"."""
    groups = gs.groups.per_module(net.trunk, label=lambda name, module: "first" if name == "0" else "rest")
    return gs.Surgeon(groups, strategy)  # type: ignore[arg-type]


class NeedsLosses(gs.Strategy):
    needs = frozenset({Need.LOSSES})

    def _combine(self, grads: Tensor, context: Context) -> Tensor:
        return grads.sum(dim=0)


def _detached(net: MultiTaskNet) -> list[Tensor]:
    return [loss.detach() for loss in net.losses()]


Case = tuple[str, Callable[[MultiTaskNet], object], type[GradSurgError], str]
CASES: list[Case] = [
    (
        "unknown-strategy",
        lambda net: gs.get_strategy("pcgard"),
        UnknownStrategyError,
        r"^Unknown strategy 'pcgard'\. Did you mean 'pcgrad'\? Known strategies: .*cagrad.*pcgrad.*sum",
    ),
    ("unknown-in-surgeon", lambda net: _surgeon(net, "cagrd"), UnknownStrategyError, "Did you mean 'cagrad'"),
    ("not-a-strategy", lambda net: _surgeon(net, 3), UnknownStrategyError, "found int"),
    ("bad-c", lambda net: gs.get_strategy("cagrad", c=-0.5), InvalidOptionError, r"Option `c` of CAGrad .*c=-0\.5\."),
    ("bad-rescale", lambda net: gs.get_strategy("cagrad", rescale=3), InvalidOptionError, "found rescale=3"),
    ("bad-reference", lambda net: gs.get_strategy("pcgrad", reference="x"), InvalidOptionError, "reference='x'"),
    ("unknown-option", lambda net: gs.get_strategy("pcgrad", c=1), InvalidOptionError, r"unknown option\(s\)"),
    ("grads-1d", lambda net: gs.get_strategy("sum")(torch.ones(3)), InvalidGradientError, r"2-D .* shape \(3,\)"),
    ("grads-3d", lambda net: gs.get_strategy("pcgrad")(torch.ones(2, 3, 4)), InvalidGradientError, r"\(2, 3, 4\)"),
    ("no-tasks", lambda net: gs.get_strategy("cagrad")(torch.ones(0, 3)), InvalidGradientError, "at least one task"),
    ("int-grads", lambda net: gs.get_strategy("mean")(torch.ones(2, 3).long()), InvalidGradientError, "int64"),
    ("not-a-tensor", lambda net: gs.get_strategy("sum")([[1.0, 2.0]]), InvalidGradientError, "found list"),
    (
        "nan-row",
        lambda net: gs.get_strategy("pcgrad")(torch.tensor([[1.0, 2.0], [float("nan"), 0.0]])),
        NonFiniteGradientError,
        "^The gradient of task 1 must be finite; found NaN or Inf",
    ),
    (
        "inf-row-with-group",
        lambda net: gs.get_strategy("sum")(torch.tensor([[float("inf")]]), group=gs.groups.whole(net.trunk)[0]),
        NonFiniteGradientError,
        "task 0 in group 'all'",
    ),
    ("strategy-needs-losses", lambda net: NeedsLosses()(torch.ones(2, 3)), InvalidLossError, "needs the task losses"),
    ("no-losses", lambda net: _surgeon(net).backward([]), InvalidLossError, "at least one task's loss; found none"),
    ("one-tensor", lambda net: _surgeon(net).backward(torch.ones(3)), InvalidLossError, r"one tensor of shape \(3,\)"),
    ("loss-str", lambda net: _surgeon(net).backward("loss"), InvalidLossError, "found str"),  # type: ignore[arg-type]
    ("loss-float", lambda net: _surgeon(net).backward([1.0]), InvalidLossError, "'0' must be a tensor; found float"),
    (
        "loss-not-scalar",
        lambda net: _surgeon(net).backward({"a": net.trunk(net.inputs).sum(), "b": net.trunk(net.inputs)}),
        InvalidLossError,
        r"task 'b' must be a scalar; found shape \(8, 5\)",
    ),
    ("loss-detached", lambda net: _surgeon(net).backward(_detached(net)), InvalidLossError, "'0' must require grad"),
    (
        "mapping-missing-label",
        lambda net: _two_labels(net, {"first": "pcgrad"}),
        InvalidOptionError,
        r"every group label .* without one: \['rest'\]",
    ),
    (
        "mapping-unknown-label",
        lambda net: _two_labels(net, {"Conv2d": "pcgrad", "*": "sum"}),
        InvalidOptionError,
        r"found \['Conv2d'\]",
    ),
    (
        "ortho-lora-on-plain-groups",
        lambda net: _surgeon(net, "ortho_lora"),
        IncompatibleGroupError,
        "'ortho_lora' needs LoRA factor groups .* group 'trunk' has label 'all'",
    ),
    ("no-groups", lambda net: gs.Surgeon([], "sum"), InvalidOptionError, "at least one ParamGroup"),
    (
        "overlapping-groups",
        lambda net: gs.Surgeon([*gs.groups.whole(net.trunk), *gs.groups.whole(net.trunk[0], name="first")], "sum"),
        InvalidGroupError,
        "must not overlap",
    ),
    ("bad-seed", lambda net: gs.Surgeon(gs.groups.whole(net.trunk), "sum", seed="x"), InvalidOptionError, "`seed`"),
    ("state-format", lambda net: _surgeon(net).load_state_dict({"steps": 1}), InvalidStateError, "format"),
    (
        "state-groups",
        lambda net: gs.Surgeon(gs.groups.per_module(net.trunk), "sum").load_state_dict(_surgeon(net).state_dict()),
        InvalidStateError,
        "same groups",
    ),
]


@pytest.mark.parametrize(("case", "action", "error", "pattern"), CASES, ids=[case[0] for case in CASES])
def test_error_table(case: str, action: Callable[[MultiTaskNet], object], error: type, pattern: str) -> None:
    with pytest.raises(error) as caught:
        action(make_net())
    assert re.search(pattern, str(caught.value)), str(caught.value)
    assert caught.type is error or issubclass(caught.type, error)
    assert BUILTIN[error.__name__] in inspect.getmro(caught.type)
    assert not str(caught.value).startswith(("'", '"'))  # the plain message, not a quoted repr


# ---------------------------------------------------------------------------------- non-finite steps
def _poisoned(net: MultiTaskNet, task: str = "b") -> dict[str, Tensor]:
    """The step's losses with task ``task`` multiplied by NaN (every gradient of that task is NaN)."""
    losses = dict(zip("abc", net.losses()))
    losses[task] = losses[task] * float("nan")
    return losses


def test_nan_in_a_task_gradient_names_the_task_and_the_group() -> None:
    net = make_net()
    with pytest.raises(NonFiniteGradientError, match=r"^The gradient of task 'b' in group 'trunk' must be finite"):
        _surgeon(net, "pcgrad").backward(_poisoned(net))


def test_inf_outside_every_group_names_the_task() -> None:
    net = make_net()
    losses = dict(zip("abc", net.losses()))
    losses["c"] = losses["c"] + net.heads[2].weight.sum() * float("inf")  # only head c's gradient is infinite
    outside = r"task 'c' for a parameter outside every group \(shape \(1, 5\)\)"
    with pytest.raises(NonFiniteGradientError, match=outside):
        _surgeon(net, "pcgrad").backward(losses)


def identical(first: list[Tensor | None], second: list[Tensor | None]) -> bool:
    """Bit-identical gradients, ``None`` where the other is ``None``."""
    return all(
        (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
        for a, b in zip(first, second, strict=True)
    )


def test_a_failed_step_leaves_grads_and_surgeon_state_unchanged() -> None:
    """After a good step, a NaN loss in one task: every .grad (None included), the generator and the step
    count are as before, and the next good step is the one a Surgeon that never failed takes."""
    net, twin_net = make_net(), make_net()
    surgeon, twin = _surgeon(net, "pcgrad"), _surgeon(twin_net, "pcgrad")
    for model, owner in ((net, surgeon), (twin_net, twin)):
        model.zero_grad()
        owner.backward(model.losses())
    net.trunk[0].weight.grad = None  # grouped, reached by the failing task
    net.heads[1].weight.grad = None  # outside every group, reached by the failing task
    grads, state = net.grads(), surgeon.state_dict()

    with pytest.raises(NonFiniteGradientError):
        surgeon.backward(_poisoned(net))
    assert surgeon.steps == 1
    assert torch.equal(surgeon.state_dict()["generator"], state["generator"])
    assert identical(net.grads(), grads)

    for model, owner in ((net, surgeon), (twin_net, twin)):
        model.zero_grad()
        owner.backward(model.losses())
    assert identical(net.grads(), twin_net.grads())
