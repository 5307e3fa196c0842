"""Strategy base classes.

A strategy turns one group's per-task gradient matrix ``G ∈ ℝ^{T×n}`` (one row per task) into one
update direction ``d ∈ ℝⁿ``. Strategies are immutable: options are keyword-only, validated when the
strategy is built and shown by ``repr``; anything that changes from step to step (random task
order, EMA state, ...) is passed in by the caller (the :class:`~gradsurg.Surgeon`).

:class:`GramStrategy` is the base for the many methods that only need the ``T×T`` Gram matrix
``K = G Gᵀ`` to compute task weights ``w`` and return ``d = wᵀ G``: two passes over the data,
whatever the method.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from gradsurg.errors import InvalidGradientError, InvalidLossError, InvalidOptionError, NonFiniteGradientError
from gradsurg.groups import ParamGroup

__all__ = ["Context", "GramStrategy", "Need", "Output", "Property", "Requirement", "Strategy"]


class Property:
    """Names of the properties a strategy may declare (checked by the conformance tests).

    Attributes:
        SCALE_EQUIVARIANT: ``f(αG) = α f(G)`` for every ``α > 0``.
        ONE_TASK_IDENTITY: with one task, ``f(g) = g``.
        ONE_TASK_POSITIVE: with one task, ``f(g) = β g`` for some ``β > 0`` (or 0 when ``g = 0``).
        PERMUTATION_INVARIANT: reordering the tasks does not change the result.
        SUM_WITHOUT_CONFLICT: when no pair of tasks conflicts (all ``gᵢ·gⱼ ≥ 0``), ``f(G) = Σᵢ gᵢ``.
        ZERO_ROWS_IGNORED: appending an all-zero task gradient does not change the result.
        IN_ROW_SPAN: the result is a linear combination of the task gradients.
        RANDOMIZED: the result depends on the generator (but is a function of its state).
    """

    SCALE_EQUIVARIANT = "scale_equivariant"
    ONE_TASK_IDENTITY = "one_task_identity"
    ONE_TASK_POSITIVE = "one_task_positive"
    PERMUTATION_INVARIANT = "permutation_invariant"
    SUM_WITHOUT_CONFLICT = "sum_without_conflict"
    ZERO_ROWS_IGNORED = "zero_rows_ignored"
    IN_ROW_SPAN = "in_row_span"
    RANDOMIZED = "randomized"

    ALL: ClassVar[frozenset[str]] = frozenset(
        {
            SCALE_EQUIVARIANT,
            ONE_TASK_IDENTITY,
            ONE_TASK_POSITIVE,
            PERMUTATION_INVARIANT,
            SUM_WITHOUT_CONFLICT,
            ZERO_ROWS_IGNORED,
            IN_ROW_SPAN,
            RANDOMIZED,
        }
    )


class Requirement:
    """Names of the structural requirements a strategy may declare on the groups it is used on.

    Attributes:
        LORA_FACTOR_GROUPS: every group is one LoRA factor (label ``lora_A`` or ``lora_B``), as built
            by :func:`gradsurg.adapters.peft.lora_groups`.
    """

    LORA_FACTOR_GROUPS = "lora_factor_groups"
    LORA_FACTOR_LABELS: ClassVar[frozenset[str]] = frozenset({"lora_A", "lora_B"})

    ALL: ClassVar[frozenset[str]] = frozenset({LORA_FACTOR_GROUPS})


class Need:
    """Names of what a strategy needs from its caller besides the gradient matrix.

    The :class:`~gradsurg.Surgeon` reads a strategy's ``needs`` and provides each of them; a direct
    call of a strategy that lacks one raises an error naming the argument to pass.

    Attributes:
        LOSSES: the step's task losses (detached), ``Context.losses``.
        STATE: state carried from step to step (EMA, warm starts, loss history), ``Context.state``,
            created by :meth:`Strategy.init_state` and checkpointed by the Surgeon.
        PARAMS: learnable parameters (e.g. uncertainty weights), created by
            :meth:`Strategy.init_params`; the Surgeon owns them (``surgeon.parameters()``), passes them
            in ``Context.params`` and writes to their ``.grad`` the gradient of the ``objective``
            that :meth:`Strategy.apply` returns (averaged over the groups that share the strategy).
        POST_STEP_LOSSES: the task losses after the optimizer step, given through
            ``surgeon.update(losses)``, which calls :meth:`Strategy.after_step`.
    """

    LOSSES = "losses"
    STATE = "state"
    PARAMS = "params"
    POST_STEP_LOSSES = "post_step_losses"

    ALL: ClassVar[frozenset[str]] = frozenset({LOSSES, STATE, PARAMS, POST_STEP_LOSSES})


@dataclass(frozen=True)
class Context:
    """What the caller supplies besides the gradients for one strategy call.

    Attributes:
        generator: Source of randomness (e.g. PCGrad's task order). ``None`` means the global RNG.
        group: The group the gradients belong to, if any (for messages and structural checks).
        losses: ``Tensor[T]``, the step's task losses, detached (for strategies that need them).
        state: The state of this strategy for this group before the step (never mutate it: return
            the new state from :meth:`Strategy.apply`).
        params: The learnable parameters of the strategy (for strategies that need them).
        step: Index of the step (0 for the first).
        gram: The Gram matrix ``G Gᵀ`` if the caller already computed it (the Surgeon does when it
            collects statistics), so that Gram-space strategies do not compute it twice.
    """

    generator: torch.Generator | None = None
    group: ParamGroup | None = None
    losses: Tensor | None = None
    state: Mapping[str, Any] = field(default_factory=dict)
    params: Mapping[str, Tensor] = field(default_factory=dict)
    step: int = 0
    gram: Tensor | None = None

    @property
    def where(self) -> str:
        """A phrase locating the call in messages, e.g. ``" in group 'encoder.0'"``."""
        return f" in group {self.group.name!r}" if self.group is not None else ""


class Strategy(abc.ABC):
    """Base class of every strategy.

    Subclasses implement :meth:`_combine` and declare class attributes used by the registry:

    * ``summary`` — one line (defaults to the first line of the docstring);
    * ``paper`` — the reference: title, venue, arXiv link;
    * ``properties`` — a subset of :class:`Property` names the conformance tests check;
    * ``requires`` — a subset of :class:`Requirement` names the Surgeon checks on the groups;
    * ``needs`` — a subset of :class:`Need` names: what the caller must provide besides gradients;
    * ``family`` — ``"baseline"``, ``"projection"``, ``"gram"`` (weights from the Gram matrix),
      ``"coordinate"`` or ``"loss"`` (weights from the losses), for the overview table;
    * ``cost`` — the cost in ``T`` and ``n`` beyond computing ``G``, e.g. ``"O(T²·n + T³)"``.

    Stateless gradient strategies implement :meth:`_combine` only. Strategies that need state,
    losses or learnable parameters override :meth:`apply` (and :meth:`init_state`,
    :meth:`init_params`, :meth:`after_step` as needed).

    Options are keyword-only arguments of ``__init__``; call :meth:`_set_options` with them so that
    ``repr`` and :attr:`options` show them.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    properties: ClassVar[frozenset[str]] = frozenset()
    requires: ClassVar[frozenset[str]] = frozenset()
    needs: ClassVar[frozenset[str]] = frozenset()
    family: ClassVar[str] = ""
    cost: ClassVar[str] = ""

    _options: dict[str, Any]

    def __init__(self) -> None:
        self._set_options()

    def _set_options(self, **options: Any) -> None:
        """Record the validated options: they become read-only attributes and appear in ``repr``."""
        object.__setattr__(self, "_options", dict(options))
        for key, value in options.items():
            object.__setattr__(self, key, value)

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError(f"Strategies are immutable; cannot set {key!r} on {type(self).__name__}.")

    def __delattr__(self, key: str) -> None:
        raise AttributeError(f"Strategies are immutable; cannot delete {key!r} from {type(self).__name__}.")

    @property
    def options(self) -> Mapping[str, Any]:
        """The options this strategy was built with."""
        return dict(self._options)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._options.items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Strategy) and type(self) is type(other) and self._options == other._options

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted((k, repr(v)) for k, v in self._options.items()))))

    def __call__(
        self,
        grads: Tensor,
        *,
        generator: torch.Generator | None = None,
        group: ParamGroup | None = None,
        losses: Tensor | None = None,
    ) -> Tensor:
        """Combine the per-task gradients of one group into one direction.

        A direct call is stateless: a stateful strategy starts from :meth:`init_state` every time
        (use a :class:`~gradsurg.Surgeon`, or :meth:`apply` with your own state, to carry state).

        Args:
            grads: ``Tensor[T, n]``, one row per task, floating point, finite, ``T ≥ 1``.
            generator: Randomness for randomized strategies (ignored by deterministic ones).
            group: The group the gradients belong to (used in messages).
            losses: ``Tensor[T]``, the task losses, for strategies whose ``needs`` include ``"losses"``.

        Returns:
            ``Tensor[n]`` with the dtype and device of ``grads``. ``grads`` is not modified.

        Raises:
            InvalidGradientError: ``grads`` is not a 2-D floating-point tensor with at least one row.
            NonFiniteGradientError: a row holds NaN or Inf.
            InvalidLossError: the strategy needs losses and none (or the wrong number) were given.
        """
        context = Context(generator=generator, group=group)
        check_grads(grads, context)
        check_finite(grads, context)
        tasks = grads.shape[0]
        context = Context(
            generator=generator,
            group=group,
            losses=self._checked_losses(losses, tasks, context),
            state=self.init_state(tasks, device=grads.device),
            params=self.init_params(tasks) if Need.PARAMS in self.needs else {},
        )
        return self.apply(grads, context).direction

    def _checked_losses(self, losses: Tensor | None, tasks: int, context: Context) -> Tensor | None:
        if Need.LOSSES not in self.needs:
            return losses
        if losses is None:
            raise InvalidLossError(
                f"Strategy {self.name or type(self).__name__!r} needs the task losses{context.where}: "
                "pass losses=Tensor[T] (a Surgeon passes them automatically)."
            )
        losses = torch.as_tensor(losses)
        if losses.shape != (tasks,):
            raise InvalidLossError(
                f"`losses` must have one entry per task, shape ({tasks},); found shape {tuple(losses.shape)}."
            )
        return losses.detach()

    def apply(self, grads: Tensor, context: Context) -> Output:
        """One step on validated ``grads``: the direction and the new state (default: unchanged)."""
        return Output(direction=self._combine(grads, context), state=context.state)

    @abc.abstractmethod
    def _combine(self, grads: Tensor, context: Context) -> Tensor:
        """Return the direction for validated ``grads`` (``Tensor[T, n]``)."""

    def init_state(self, tasks: int, *, device: torch.device) -> dict[str, Any]:
        """The state before the first step, for ``tasks`` tasks (stateless strategies: empty)."""
        return {}

    def init_params(self, tasks: int) -> dict[str, Tensor]:
        """Initial values of the learnable parameters, for ``tasks`` tasks (default: none)."""
        return {}

    def after_step(self, state: Mapping[str, Any], losses_before: Tensor, losses_after: Tensor) -> dict[str, Any]:
        """The new state once the losses after the optimizer step are known (default: unchanged)."""
        return dict(state)


@dataclass(frozen=True)
class Output:
    """Result of :meth:`Strategy.apply`.

    Attributes:
        direction: ``Tensor[n]``, the update direction.
        state: The strategy's state after the step (the same mapping when unchanged).
        objective: For strategies with learnable parameters, a scalar built with autograd from
            ``Context.params``; its gradient is written to the parameters' ``.grad``.
        weights: For strategies of the form ``d = wᵀ G``, the task weights ``w`` (lets the
            diagnostics work in Gram space, with no extra pass over ``G``).
    """

    direction: Tensor
    state: Mapping[str, Any]
    objective: Tensor | None = None
    weights: Tensor | None = None


class GramStrategy(Strategy):
    """A strategy whose direction is ``d = wᵀ G`` with task weights ``w = weights(G Gᵀ)``.

    Subclasses implement :meth:`weights` on the ``T×T`` Gram matrix ``K = G Gᵀ``; it is computed in
    at least float64 precision for the small ``T×T`` work, while the two passes over ``G`` run in
    its own dtype.

    A subclass whose :meth:`weights` accepts leading batch dimensions (``Tensor[B, T, T]`` →
    ``Tensor[B, T]``, the same random draws for every batch entry) sets ``batched = True``: the
    Surgeon then combines all groups that share the strategy and a shape in one ``bmm``.
    """

    batched: ClassVar[bool] = False

    def apply(self, grads: Tensor, context: Context) -> Output:
        gram = context.gram if context.gram is not None else grads @ grads.T
        w = self.weights(gram.to(weight_dtype(grads)), context)
        direction = (w.to(grads.dtype) @ grads).reshape(grads.shape[1])
        return Output(direction=direction, state=context.state, weights=w)

    def _combine(self, grads: Tensor, context: Context) -> Tensor:
        return self.apply(grads, context).direction

    @abc.abstractmethod
    def weights(self, gram: Tensor, context: Context) -> Tensor:
        """Return task weights ``w ∈ ℝᵀ`` from the Gram matrix ``K = G Gᵀ`` (``Tensor[T, T]``)."""


def weight_dtype(grads: Tensor) -> torch.dtype:
    """float64 for the tiny ``T×T`` work, except on backends without float64 support (MPS)."""
    return torch.float32 if grads.device.type == "mps" else torch.float64


def check_grads(grads: Tensor, context: Context) -> None:
    """Validate the shape and dtype of a per-task gradient matrix.

    Raises:
        InvalidGradientError: With the requirement and the value found.
    """
    if not isinstance(grads, Tensor):
        raise InvalidGradientError(
            f"The gradient matrix{context.where} must be a torch.Tensor of shape [tasks, n]; "
            f"found {type(grads).__name__}."
        )
    if grads.dim() != 2:
        raise InvalidGradientError(
            f"The gradient matrix{context.where} must be 2-D [tasks, n]; found shape {tuple(grads.shape)}."
        )
    if grads.shape[0] == 0:
        raise InvalidGradientError(
            f"The gradient matrix{context.where} must have at least one task (row); found shape {tuple(grads.shape)}."
        )
    if not grads.is_floating_point():
        raise InvalidGradientError(
            f"The gradient matrix{context.where} must be floating point; found dtype {grads.dtype}."
        )


def check_finite(grads: Tensor, context: Context, task_names: list[str] | None = None) -> None:
    """Raise :class:`NonFiniteGradientError` naming the first task whose gradient has NaN or Inf."""
    if bool(torch.isfinite(grads.sum())):  # NaN and Inf propagate through the sum: one cheap reduction
        return
    finite = torch.isfinite(grads).all(dim=1)
    if bool(finite.all()):  # the sum overflowed, every entry is finite
        return
    task = int((~finite).nonzero()[0, 0])
    label = repr(task_names[task]) if task_names is not None else str(task)
    raise NonFiniteGradientError(
        f"The gradient of task {label}{context.where} must be finite; found NaN or Inf "
        "(check the task's loss, learning rate and mixed-precision settings)."
    )


def check_option(condition: bool, strategy: str, option: str, requirement: str, value: Any) -> None:
    """Raise :class:`InvalidOptionError` with the standard message unless ``condition`` holds."""
    if not condition:
        raise InvalidOptionError(f"Option `{option}` of {strategy} must be {requirement}; found {option}={value!r}.")


def check_choice(value: Any, choices: tuple[Any, ...], strategy: str, option: str) -> None:
    """Raise :class:`InvalidOptionError` unless ``value`` is one of ``choices`` (``True`` is not ``1``)."""
    is_choice = value in choices and (not isinstance(value, bool) or any(isinstance(c, bool) for c in choices))
    check_option(is_choice, strategy, option, "one of " + ", ".join(repr(c) for c in choices), value)
