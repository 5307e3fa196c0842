"""The methods a comparison runs, and how each one turns the task losses into ``.grad``.

* ``single`` — single-task LoRA: one fresh adapter per task, trained on that task alone (the upper
  bound of the Ortho-LoRA paper's Table 1; three adapters, so three times the parameters).
* ``joint`` — joint LoRA: one shared adapter, ``sum(losses).backward()``, exactly what users run
  today, and timed as such.
* any registered strategy (``pcgrad``, ``cagrad``, ``ortho_lora``, plugins, ...) — one shared adapter,
  ``Surgeon.backward(losses)``.

Parameter groups, as in the papers. A strategy that does not require LoRA factor groups (PCGrad,
CAGrad, ...) is applied, like in its paper, to **one group holding all shared LoRA parameters** (the
flattened vector; granularity ``flat``). A strategy that requires them (``ortho_lora``) gets
:func:`gradsurg.adapters.peft.lora_groups`: one group per LoRA factor per layer. This is the
comparison the Ortho-LoRA paper makes (PCGrad on the flattened adapter vs. the projection inside each
factor). ``--granularity layer`` (or ``factor``) runs the other strategies on the LoRA factor groups
too, e.g. to separate "PCGrad per factor" from Ortho-LoRA's shared task order. Task heads are outside
every group and get their own task's gradient (the plain sum over tasks, as only their task reaches
them).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from gradsurg.bench.suites.base import MultiTaskModel
from gradsurg.errors import InvalidOptionError
from gradsurg.groups import whole
from gradsurg.strategies.base import Need, Requirement
from gradsurg.strategies.registry import strategy_info
from gradsurg.surgeon import Surgeon

__all__ = ["GRANULARITIES", "Method", "Stepper", "make_backward", "parse_strategies"]

#: Parameter grouping of strategies that do not require LoRA factor groups.
GRANULARITIES: tuple[str, ...] = ("flat", "layer", "factor")

SINGLE = "single"
JOINT = "joint"

Backward = Callable[[Mapping[str, Tensor]], object]


@dataclass(frozen=True)
class Method:
    """One row of the report.

    Attributes:
        name: ``"single"``, ``"joint"`` or a registered strategy's canonical name.
        granularity: For strategies, the parameter grouping (see :data:`GRANULARITIES`).
    """

    name: str
    granularity: str = "flat"

    @property
    def is_strategy(self) -> bool:
        """Whether the method runs a strategy through the Surgeon."""
        return self.name not in (SINGLE, JOINT)

    @property
    def key(self) -> str:
        """Identifier used in file names, the cache and the JSON/CSV output."""
        return self.name if not self.is_strategy or self.granularity == "flat" else f"{self.name}@{self.granularity}"

    @property
    def label(self) -> str:
        """Row label of the report."""
        if self.name == SINGLE:
            return "Single-task LoRA"
        if self.name == JOINT:
            return "Joint LoRA (sum)"
        return self.name if self.granularity == "flat" else f"{self.name} ({self.granularity} groups)"


def parse_strategies(spec: str, granularity: str = "flat") -> list[Method]:
    """The strategy methods named in a comma-separated list, e.g. ``"pcgrad,cagrad,ortho_lora"``.

    Names are resolved by the registry (case-insensitive, ``-`` read as ``_``, aliases allowed);
    duplicates are dropped. A strategy that requires LoRA factor groups always gets ``layer``
    granularity (Ortho-LoRA's reading); the others get ``granularity``.

    Raises:
        UnknownStrategyError: A name is not registered (the message lists the registered ones).
        InvalidOptionError: ``granularity`` is not one of :data:`GRANULARITIES`.
    """
    if granularity not in GRANULARITIES:
        raise InvalidOptionError(
            f"Option `--granularity` must be one of {', '.join(GRANULARITIES)}; found {granularity!r}."
        )
    methods: dict[str, Method] = {}
    for raw in spec.split(","):
        if not raw.strip():
            continue
        info = strategy_info(raw.strip())
        needs_factors = Requirement.LORA_FACTOR_GROUPS in info.requires
        method = Method(info.name, "layer" if needs_factors else granularity)
        methods.setdefault(method.key, method)
    return list(methods.values())


@dataclass
class Stepper:
    """How one run turns a step's ``{task: loss}`` into ``.grad``, and what else it needs.

    Attributes:
        backward: Writes the step's direction into ``.grad``.
        parameters: Learnable parameters of the strategy (e.g. ``uw``'s log-variances), optimised
            with the model's.
        surgeon: The run's Surgeon (``None`` for ``joint`` and ``single``); strategies that need the
            losses after the optimizer step get them through ``surgeon.update``.
    """

    backward: Backward
    parameters: list[torch.nn.Parameter]
    surgeon: Surgeon | None = None

    @property
    def needs_post_step_losses(self) -> bool:
        """Whether :meth:`Surgeon.update` must be called after each optimizer step (FAMO)."""
        return self.surgeon is not None and any(
            Need.POST_STEP_LOSSES in s.needs for s in self.surgeon.strategies.values()
        )


def make_backward(method: Method, model: MultiTaskModel, seed: int, tasks: Sequence[str]) -> Stepper:
    """The :class:`Stepper` of ``method`` for a run on ``tasks``.

    ``joint`` and ``single`` call ``sum(losses).backward()`` directly (no Surgeon, no per-task
    gradients: the cost users pay today). A strategy gets a :class:`~gradsurg.Surgeon` seeded by
    ``seed`` over the groups described in the module docstring, told the task names (so strategies
    with learnable weights can create them before the optimizer is built).
    """
    if not method.is_strategy:

        def plain(losses: Mapping[str, Tensor]) -> None:
            values = list(losses.values())
            torch.autograd.backward(sum(values[1:], start=values[0]))  # = sum(losses).backward()

        return Stepper(plain, [])
    if method.granularity == "flat":
        groups = whole(model.shared_parameters(), name="lora", label="lora")
    else:
        groups = model.lora_groups(method.granularity)
    surgeon = Surgeon(groups, method.name, seed=seed, tasks=list(tasks))
    return Stepper(surgeon.backward, list(surgeon.parameters()), surgeon)
