"""The Surgeon: per-task gradients → per-group strategy → ``.grad``.

Typical loop::

    surgeon = gs.Surgeon(gs.groups.whole(model), "pcgrad", seed=0)
    for batches in loader:
        optimizer.zero_grad()
        losses = {task: loss_fn(model(batch)) for task, batch in batches.items()}
        surgeon.backward(losses)       # instead of sum(losses.values()).backward()
        optimizer.step()
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gradsurg.errors import (
    IncompatibleGroupError,
    InvalidLossError,
    InvalidOptionError,
    InvalidStateError,
    NonFiniteGradientError,
)
from gradsurg.groups import ParamGroup, check_disjoint
from gradsurg.strategies.base import Context, Requirement, Strategy, check_finite
from gradsurg.strategies.registry import resolve_strategy

__all__ = ["Surgeon"]

StrategySpec = str | Strategy
_STATE_FORMAT = "gradsurg.Surgeon/1"


@dataclass(frozen=True)
class _Losses:
    names: list[str]
    tensors: list[Tensor]


class Surgeon:
    """Compute one gradient per task, combine each group's gradients with its strategy, write ``.grad``.

    Args:
        groups: The parameter groups (a :class:`~gradsurg.ParamGroup` or a sequence of them), e.g.
            from :mod:`gradsurg.groups` or :func:`gradsurg.adapters.peft.lora_groups`. They must not
            overlap.
        strategy: A registered name (``"pcgrad"``), a :class:`~gradsurg.Strategy` instance, or a
            mapping from group label to either, with ``"*"`` as the default for other labels
            (``{"lora_A": "pcgrad", "*": "sum"}``).
        seed: Seed of the Surgeon's own ``torch.Generator``, the only source of randomness (e.g.
            PCGrad's task order). ``None`` draws a random seed. Same seed and same inputs give
            bit-identical results; the generator is saved by :meth:`state_dict`.
        check_finite: Refuse a step whose task gradients hold NaN or Inf (one device sync per step).

    Semantics:
        * Per group, the strategy's direction is **added** to ``.grad`` like ``loss.backward()`` does,
          so ``optimizer.zero_grad()`` and accumulation over several calls behave as usual.
        * Parameters outside every group that the losses reach (task heads, ...) get the plain sum
          of the task gradients; a parameter no task reaches keeps ``.grad is None``.
        * Gradients of half-precision parameters are combined in float32 and cast back on write.
        * A step that raises leaves every ``.grad`` and the Surgeon's state as they were.

    Raises:
        InvalidGroupError: The groups overlap or are not ``ParamGroup`` instances.
        InvalidOptionError: The strategy mapping leaves a group label without a strategy, or names a
            label no group has.
        IncompatibleGroupError: A strategy's structural requirement is not met (e.g. ``ortho_lora``
            on groups that are not LoRA factors).
        UnknownStrategyError: A strategy name is not registered.
    """

    def __init__(
        self,
        groups: ParamGroup | Sequence[ParamGroup],
        strategy: StrategySpec | Mapping[str, StrategySpec],
        *,
        seed: int | None = None,
        check_finite: bool = True,
    ) -> None:
        group_list = [groups] if isinstance(groups, ParamGroup) else list(groups)
        if not group_list:
            raise InvalidOptionError("Surgeon `groups` must hold at least one ParamGroup; found none.")
        check_disjoint(group_list)
        self._groups: tuple[ParamGroup, ...] = tuple(group_list)
        self._strategies: dict[str, Strategy] = _assign_strategies(self._groups, strategy)
        self._check_finite = bool(check_finite)
        self._generator = torch.Generator()
        if seed is None:
            self._generator.seed()
        elif isinstance(seed, int) and not isinstance(seed, bool):
            self._generator.manual_seed(seed)
        else:
            raise InvalidOptionError(f"Surgeon `seed` must be an int or None; found seed={seed!r}.")
        self._steps = 0
        self._group_param_ids = {id(p) for g in self._groups for p in g.params}

    # ------------------------------------------------------------------ properties
    @property
    def groups(self) -> tuple[ParamGroup, ...]:
        """The parameter groups, in order."""
        return self._groups

    @property
    def strategies(self) -> Mapping[str, Strategy]:
        """The strategy of each group, by group name."""
        return dict(self._strategies)

    @property
    def steps(self) -> int:
        """Number of completed :meth:`backward` calls."""
        return self._steps

    def __repr__(self) -> str:
        kinds = sorted({repr(s) for s in self._strategies.values()})
        return f"Surgeon(groups={len(self._groups)}, strategies=[{', '.join(kinds)}], steps={self._steps})"

    # ------------------------------------------------------------------ the step
    def backward(self, losses: Sequence[Tensor] | Mapping[str, Tensor]) -> None:
        """Compute per-task gradients of ``losses`` and write the combined direction into ``.grad``.

        Args:
            losses: One scalar loss per task, as a sequence or a ``{task_name: loss}`` mapping. The
                losses may share one graph (one forward over all tasks) or come from separate
                forwards.

        Raises:
            InvalidLossError: ``losses`` is empty, or a loss is not a floating-point scalar that
                requires grad.
            NonFiniteGradientError: A task gradient holds NaN or Inf (names the task and group).
        """
        task_losses = _check_losses(losses)
        inputs, group_slots = self._inputs(task_losses.tensors)
        per_task = self._task_gradients(task_losses.tensors, inputs)
        state_before = self._generator.get_state()
        try:
            updates = self._combine(task_losses.names, inputs, group_slots, per_task)
        except BaseException:
            self._generator.set_state(state_before)
            raise
        for param, update in updates:
            _accumulate(param, update)
        self._steps += 1

    def _inputs(self, losses: list[Tensor]) -> tuple[list[Tensor], list[list[int | None]]]:
        """The leaves to differentiate: reached group parameters first, then other reached leaves.

        Returns the list of inputs and, per group, the position of each parameter in that list
        (``None`` for a parameter no task reaches).
        """
        reached = _reached_leaves(losses)
        reached_ids = {id(t) for t in reached}
        inputs: list[Tensor] = []
        slots: list[list[int | None]] = []
        for group in self._groups:
            group_slots: list[int | None] = []
            for p in group.params:
                if id(p) in reached_ids:
                    group_slots.append(len(inputs))
                    inputs.append(p)
                else:
                    group_slots.append(None)
            slots.append(group_slots)
        inputs.extend(t for t in reached if id(t) not in self._group_param_ids)
        return inputs, slots

    @staticmethod
    def _task_gradients(losses: list[Tensor], inputs: list[Tensor]) -> list[tuple[Tensor | None, ...]]:
        if not inputs:
            return [() for _ in losses]
        last = len(losses) - 1
        return [
            torch.autograd.grad(loss, inputs, retain_graph=t < last, allow_unused=True)
            for t, loss in enumerate(losses)
        ]

    def _combine(
        self,
        names: list[str],
        inputs: list[Tensor],
        group_slots: list[list[int | None]],
        per_task: list[tuple[Tensor | None, ...]],
    ) -> list[tuple[Tensor, Tensor]]:
        """All ``(parameter, update)`` pairs of the step, computed before anything is written."""
        step_seed = int(torch.randint(0, 2**62, (1,), generator=self._generator))
        work: list[tuple[ParamGroup, list[Tensor], Tensor]] = []
        for group, slots in zip(self._groups, group_slots):
            present = [(p, slot) for p, slot in zip(group.params, slots) if slot is not None]
            if present:
                matrix = _gradient_matrix([p for p, _ in present], [s for _, s in present], per_task)
                work.append((group, [p for p, _ in present], matrix))
        first_ungrouped = sum(s is not None for slots in group_slots for s in slots)
        ungrouped: list[tuple[Tensor, list[Tensor]]] = []
        for index in range(first_ungrouped, len(inputs)):
            task_grads = [g[index] for g in per_task if g[index] is not None]
            if task_grads:
                ungrouped.append((inputs[index], [_dense(g[index], inputs[index]) for g in per_task]))
        if self._check_finite:
            _check_all_finite(names, work, ungrouped)

        updates: list[tuple[Tensor, Tensor]] = []
        for group, params, matrix in work:
            context = Context(generator=torch.Generator().manual_seed(step_seed), group=group)
            direction = self._strategies[group.name]._combine(matrix, context)
            offset = 0
            for p in params:
                updates.append((p, direction[offset : offset + p.numel()].view_as(p)))
                offset += p.numel()
        for param, task_grads in ungrouped:
            updates.append((param, torch.stack(task_grads).sum(dim=0)))
        return updates

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-identically: the generator, the step count, the groups."""
        return {
            "format": _STATE_FORMAT,
            "steps": self._steps,
            "generator": self._generator.get_state(),
            "groups": [g.name for g in self._groups],
            "strategies": {name: repr(s) for name, s in self._strategies.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`.

        Raises:
            InvalidStateError: The state was not saved by a Surgeon with the same groups.
        """
        if not isinstance(state, Mapping) or state.get("format") != _STATE_FORMAT:
            found = state.get("format") if isinstance(state, Mapping) else type(state).__name__
            raise InvalidStateError(f"Surgeon state must have format {_STATE_FORMAT!r}; found {found!r}.")
        names = [g.name for g in self._groups]
        if list(state["groups"]) != names:
            raise InvalidStateError(
                f"Surgeon state must be saved with the same groups; saved {list(state['groups'])[:5]}..., "
                f"this Surgeon has {names[:5]}... ({len(state['groups'])} vs {len(names)} groups)."
            )
        generator_state = state["generator"]
        if not isinstance(generator_state, Tensor) or generator_state.dtype != torch.uint8:
            raise InvalidStateError("Surgeon state `generator` must be a uint8 tensor from Generator.get_state().")
        self._generator.set_state(generator_state.clone())
        self._steps = int(state["steps"])

    def parameters(self) -> Iterator[nn.Parameter]:
        """Learnable parameters of the strategies (none for the built-in gradient strategies)."""
        return iter(())


def _assign_strategies(
    groups: tuple[ParamGroup, ...], spec: StrategySpec | Mapping[str, StrategySpec]
) -> dict[str, Strategy]:
    if isinstance(spec, Mapping):
        labels = {g.label for g in groups}
        unused = sorted(set(spec) - labels - {"*"})
        if unused:
            raise InvalidOptionError(
                f"Strategy mapping keys must be group labels or '*'; found {unused}, "
                f"while the groups' labels are {sorted(labels)}."
            )
        missing = sorted(labels - set(spec)) if "*" not in spec else []
        if missing:
            raise InvalidOptionError(
                f"Strategy mapping must give a strategy for every group label (or a '*' default); "
                f"labels without one: {missing}."
            )
        resolved = {key: resolve_strategy(value) for key, value in spec.items()}
        chosen = {g.name: resolved.get(g.label, resolved.get("*")) for g in groups}
    else:
        single = resolve_strategy(spec)
        chosen = {g.name: single for g in groups}
    result: dict[str, Strategy] = {}
    for group in groups:
        strategy = chosen[group.name]
        assert strategy is not None
        _check_requirements(strategy, group)
        result[group.name] = strategy
    return result


def _check_requirements(strategy: Strategy, group: ParamGroup) -> None:
    if Requirement.LORA_FACTOR_GROUPS in strategy.requires and group.label not in Requirement.LORA_FACTOR_LABELS:
        name = strategy.name or type(strategy).__name__
        raise IncompatibleGroupError(
            f"Strategy {name!r} needs LoRA factor groups (label 'lora_A' or 'lora_B'); group {group.name!r} "
            f"has label {group.label!r}. Build the groups with gradsurg.adapters.peft.lora_groups(model), "
            "or map other labels to another strategy, e.g. {'lora_A': ..., 'lora_B': ..., '*': 'sum'}."
        )


def _check_losses(losses: Sequence[Tensor] | Mapping[str, Tensor]) -> _Losses:
    if isinstance(losses, Mapping):
        names = [str(k) for k in losses]
        tensors = list(losses.values())
    elif isinstance(losses, (str, bytes)) or not isinstance(losses, Sequence | Tensor):
        raise InvalidLossError(
            f"`losses` must be a sequence or a mapping of scalar loss tensors; found {type(losses).__name__}."
        )
    elif isinstance(losses, Tensor):
        raise InvalidLossError(
            f"`losses` must be a sequence or a mapping of scalar losses, one per task; found one tensor of "
            f"shape {tuple(losses.shape)} (use list(losses) if each entry is a task's loss)."
        )
    else:
        names = [str(i) for i in range(len(losses))]
        tensors = list(losses)
    if not tensors:
        raise InvalidLossError("`losses` must hold at least one task's loss; found none.")
    for name, loss in zip(names, tensors):
        if not isinstance(loss, Tensor):
            raise InvalidLossError(f"The loss of task {name!r} must be a tensor; found {type(loss).__name__}.")
        if loss.numel() != 1:
            raise InvalidLossError(
                f"The loss of task {name!r} must be a scalar; found shape {tuple(loss.shape)} "
                "(reduce it, e.g. with .mean())."
            )
        if not loss.is_floating_point():
            raise InvalidLossError(f"The loss of task {name!r} must be floating point; found dtype {loss.dtype}.")
        if not loss.requires_grad:
            raise InvalidLossError(
                f"The loss of task {name!r} must require grad (be computed from trainable parameters); "
                "it does not. Was it computed under torch.no_grad() or from detached tensors?"
            )
    return _Losses(names, tensors)


def _reached_leaves(losses: list[Tensor]) -> list[Tensor]:
    """The leaf tensors ``loss.backward()`` would write ``.grad`` to, in discovery order."""
    leaves: list[Tensor] = []
    seen_leaves: set[int] = set()
    seen_nodes: set[Any] = set()
    stack: list[Any] = []
    for loss in losses:
        if loss.grad_fn is None:  # the loss itself is a leaf that requires grad
            if id(loss) not in seen_leaves:
                seen_leaves.add(id(loss))
                leaves.append(loss)
            continue
        stack.append(loss.grad_fn)
        while stack:
            node = stack.pop()
            if node in seen_nodes:
                continue
            seen_nodes.add(node)
            variable = getattr(node, "variable", None)
            if variable is not None:
                if id(variable) not in seen_leaves:
                    seen_leaves.add(id(variable))
                    leaves.append(variable)
                continue
            stack.extend(child for child, _ in node.next_functions if child is not None)
    return leaves


def _combine_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _dense(grad: Tensor | None, like: Tensor) -> Tensor:
    if grad is None:
        return torch.zeros(like.shape, dtype=_combine_dtype(like.dtype), device=like.device)
    return grad.to(_combine_dtype(grad.dtype))


def _gradient_matrix(
    params: list[Tensor], slots: list[int], per_task: list[tuple[Tensor | None, ...]]
) -> Tensor:
    """``G ∈ ℝ^{T×n}``: row ``t`` is task ``t``'s gradient over ``params``, flattened and concatenated."""
    devices = {p.device for p in params}
    if len(devices) > 1:
        raise IncompatibleGroupError(
            f"A group's parameters must live on one device; found {sorted(str(d) for d in devices)}."
        )
    rows = [torch.cat([_dense(g[slot], p).reshape(-1) for p, slot in zip(params, slots)]) for g in per_task]
    return torch.stack(rows)


def _accumulate(param: Tensor, update: Tensor) -> None:
    update = update.to(param.dtype)
    if param.grad is None:
        param.grad = update.detach().clone()
    else:
        param.grad.add_(update)


def _check_all_finite(
    names: list[str], work: list[tuple[ParamGroup, list[Tensor], Tensor]], ungrouped: list[tuple[Tensor, list[Tensor]]]
) -> None:
    """One device sync for the whole step; only on failure look for the culprit to name it."""
    flags = [torch.isfinite(matrix).all() for _, _, matrix in work]
    flags += [torch.isfinite(g).all() for _, grads in ungrouped for g in grads]
    if not flags or bool(torch.stack(flags).all()):
        return
    for group, _, matrix in work:
        check_finite(matrix, Context(group=group), names)
    for param, grads in ungrouped:
        for name, grad in zip(names, grads):
            if not bool(torch.isfinite(grad).all()):
                raise NonFiniteGradientError(
                    f"The gradient of task {name!r} for a parameter outside every group (shape "
                    f"{tuple(param.shape)}) must be finite; found NaN or Inf."
                )
