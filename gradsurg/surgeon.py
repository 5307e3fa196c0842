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

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from gradsurg.accumulation import TaskGradients, all_finite, check_tasks, merge
from gradsurg.amp import LossScaling
from gradsurg.diagnostics.stats import GroupStats, StepStats, group_stats, split_stats
from gradsurg.distributed import is_active, synchronize
from gradsurg.engines import ENGINES, EngineResult, GradientEngine, LoopEngine, SegmentEngine
from gradsurg.errors import (
    IncompatibleGroupError,
    InvalidLossError,
    InvalidOptionError,
    InvalidStateError,
    MissingUpdateError,
    NonFiniteGradientError,
)
from gradsurg.groups import ParamGroup, check_disjoint
from gradsurg.strategies.base import (
    Context,
    GramStrategy,
    Need,
    Requirement,
    Strategy,
    check_finite,
    weight_dtype,
)
from gradsurg.strategies.registry import resolve_strategy

__all__ = ["Surgeon"]

StrategySpec = str | Strategy
_STATE_FORMAT = "gradsurg.Surgeon/1"


@dataclass(frozen=True)
class _Losses:
    names: list[str]
    tensors: list[Tensor]


_Work = tuple[ParamGroup, list[Tensor], Tensor]
"""One group of a step: the group, its parameters reached by some task, its gradient matrix."""


@dataclass
class _Step:
    updates: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    states: dict[str, dict[str, Any]] = field(default_factory=dict)
    stats: dict[str, GroupStats] = field(default_factory=dict)


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
        tasks: The number of tasks or their names. Needed up front only by strategies with
            learnable parameters (so that :meth:`parameters` can be handed to an optimizer before
            the first step); when given, every step must have exactly these tasks.
        check_finite: Refuse a step whose task gradients hold NaN or Inf (one device sync per step).
        collect_stats: Record conflict statistics of every step in :attr:`last_stats` (computed from
            the Gram matrix the step needs anyway; Gram-space strategies reuse it).
        monitor_only: Compute the strategy and the statistics, but write the plain **sum** of the
            task gradients, as ``sum(losses).backward()`` would: measure conflicts (and what the
            strategy would change) in an existing job before adopting a method. The statistics then
            describe the strategy's direction, i.e. what it would do.
        callbacks: Callables invoked with the :class:`~gradsurg.diagnostics.StepStats` after each
            successful step, e.g. :class:`~gradsurg.diagnostics.JSONLWriter` (needs ``collect_stats``).
        batch_groups: Combine groups that share a batchable strategy and a shape (e.g. the LoRA
            factors of every layer) in one batched Gram computation instead of a loop over groups.
            The result is the same; ``False`` exists for benchmarks and debugging.
        engine: How per-task gradients are computed (see :mod:`gradsurg.engines`): ``"loop"`` (one
            backward per task), ``"batched"`` (one vmapped backward), ``"segment"`` (one forward over
            the concatenated batch and one backward, per-task gradients recovered by hooks; needs
            ``model`` and ``backward(..., task_ids=...)``), a :class:`~gradsurg.engines.GradientEngine`,
            or ``"auto"``: segment when ``task_ids`` are given and the model supports it, else loop.
        model: The model, needed by the segment engine to hook its layers.
        distributed: Average the per-task gradients over the ranks of ``torch.distributed`` before
            combining them, with one ``all_reduce`` per step (see :mod:`gradsurg.distributed`).
            ``None`` (the default): when a process group is initialised with more than one rank;
            ``True``: always (error when there is no process group); ``False``: never.

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
        tasks: int | Sequence[str] | None = None,
        check_finite: bool = True,
        collect_stats: bool = True,
        monitor_only: bool = False,
        callbacks: Sequence[Callable[[StepStats], object]] = (),
        batch_groups: bool = True,
        engine: str | GradientEngine = "auto",
        model: nn.Module | None = None,
        distributed: bool | None = None,
    ) -> None:
        group_list = [groups] if isinstance(groups, ParamGroup) else list(groups)
        if not group_list:
            raise InvalidOptionError("Surgeon `groups` must hold at least one ParamGroup; found none.")
        check_disjoint(group_list)
        self._groups: tuple[ParamGroup, ...] = tuple(group_list)
        self._strategies: dict[str, Strategy] = _assign_strategies(self._groups, strategy)
        self._check_finite = bool(check_finite)
        self._collect_stats = bool(collect_stats)
        self._monitor_only = bool(monitor_only)
        self._batch_groups = bool(batch_groups)
        self._engine, self._segment = _resolve_engine(engine, self._groups, model)
        self._callbacks = list(callbacks)
        if self._callbacks and not self._collect_stats:
            raise InvalidOptionError("Surgeon `callbacks` need statistics; found collect_stats=False.")
        for callback in self._callbacks:
            if not callable(callback):
                raise InvalidOptionError(f"Surgeon `callbacks` must be callables; found {callback!r}.")
        self._last_stats: StepStats | None = None
        self._generator = torch.Generator()
        if seed is None:
            self._generator.seed()
        elif isinstance(seed, int) and not isinstance(seed, bool):
            self._generator.manual_seed(seed)
        else:
            raise InvalidOptionError(f"Surgeon `seed` must be an int or None; found seed={seed!r}.")
        self._steps = 0
        self._group_param_ids = {id(p) for g in self._groups for p in g.params}
        self._tasks = _check_tasks(tasks)
        self._state: dict[str, dict[str, Any]] = {}
        self._params: dict[int, nn.ParameterDict] = {}
        self._last_losses: Tensor | None = None
        self._awaiting_update = False
        self._pending: TaskGradients | None = None
        self._group_order = {g.name: index for index, g in enumerate(self._groups)}
        self._distributed = distributed
        learners = [s for s in self._unique_strategies() if Need.PARAMS in s.needs]
        if learners and self._tasks is None:
            raise InvalidOptionError(
                f"Surgeon `tasks` must be given (a count or the task names) when a strategy has learnable "
                f"parameters ({', '.join(repr(s) for s in learners)}), so that surgeon.parameters() can be "
                "handed to an optimizer before the first step; found tasks=None."
            )
        for strategy in learners:
            assert self._tasks is not None
            initial = strategy.init_params(len(self._tasks))
            self._params[id(strategy)] = nn.ParameterDict({k: nn.Parameter(v.clone()) for k, v in initial.items()})

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

    @property
    def last_stats(self) -> StepStats | None:
        """Conflict statistics of the last completed step (see :mod:`gradsurg.diagnostics`).

        ``None`` before the first step, or when the Surgeon was built with ``collect_stats=False``.
        """
        return self._last_stats

    def __repr__(self) -> str:
        kinds = sorted({repr(s) for s in self._strategies.values()})
        return f"Surgeon(groups={len(self._groups)}, strategies=[{', '.join(kinds)}], steps={self._steps})"

    # ------------------------------------------------------------------ the step
    def backward(
        self,
        losses: Sequence[Tensor] | Mapping[str, Tensor],
        *,
        task_ids: Tensor | None = None,
        accumulate: bool = False,
        scaler: torch.amp.GradScaler | None = None,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> bool:
        """Compute per-task gradients of ``losses`` and write the combined direction into ``.grad``.

        Args:
            losses: One scalar loss per task, as a sequence or a ``{task_name: loss}`` mapping. The
                losses may share one graph (one forward over all tasks) or come from separate
                forwards.
            task_ids: For the segment engine: ``task_ids[n]`` is the task (index into ``losses``)
                of sample ``n`` of the concatenated batch the forward pass ran on.
            accumulate: Only add this micro-batch's per-task gradients to the Surgeon's buffer
                (``.grad`` is not touched); a later call without ``accumulate`` (or :meth:`step`)
                combines the accumulated gradients once (see :mod:`gradsurg.accumulation`).
            scaler: A ``torch.amp.GradScaler``: the losses are scaled, the per-task gradients
                unscaled in float32, and an overflow skips the step (see :mod:`gradsurg.amp`).
            optimizer: The optimizer ``scaler.step`` will step (needed with ``scaler``).

        Returns:
            Whether ``.grad`` was written: ``False`` for an accumulating call and for a step skipped
            because of a mixed-precision overflow.

        Raises:
            InvalidLossError: ``losses`` is empty, a loss is not a floating-point scalar that
                requires grad, or the tasks differ from those of the accumulated micro-batches.
            NonFiniteGradientError: A task gradient holds NaN or Inf (names the task and group).
        """
        scaling = LossScaling.create(scaler)
        if scaling is not None and not accumulate:
            LossScaling.check_optimizer(optimizer)
        grads = merge(self._pending, self._task_gradients(losses, task_ids, scaling), self._group_order)
        if accumulate:
            self._pending = grads
            return False
        return self._finish(grads, scaling, optimizer)

    def step(
        self, *, scaler: torch.amp.GradScaler | None = None, optimizer: torch.optim.Optimizer | None = None
    ) -> bool:
        """Combine the gradients accumulated by ``backward(..., accumulate=True)`` and write ``.grad``.

        Args:
            scaler: The ``GradScaler`` of the accumulated micro-batches, if any.
            optimizer: The optimizer ``scaler.step`` will step (needed with ``scaler``).

        Returns:
            Whether ``.grad`` was written (``False`` when a mixed-precision overflow skipped the step).

        Raises:
            MissingUpdateError: No micro-batch was accumulated since the last step.
        """
        if self._pending is None:
            raise MissingUpdateError(
                "surgeon.step() combines the gradients accumulated by surgeon.backward(losses, accumulate=True); "
                "found no accumulated micro-batch."
            )
        scaling = LossScaling.create(scaler)
        if scaling is not None:
            LossScaling.check_optimizer(optimizer)
        return self._finish(self._pending, scaling, optimizer)

    @property
    def accumulating(self) -> bool:
        """Whether micro-batches were accumulated and wait for :meth:`step`."""
        return self._pending is not None

    def _task_gradients(
        self, losses: Sequence[Tensor] | Mapping[str, Tensor], task_ids: Tensor | None, scaling: LossScaling | None
    ) -> TaskGradients:
        """The per-task gradients of one (micro-)batch, unscaled when a GradScaler scaled the losses."""
        task_losses = _check_losses(losses)
        self._check_step_tasks(task_losses.names)
        check_tasks(self._pending, task_losses.names)
        tensors = scaling.scale(task_losses.tensors) if scaling is not None else task_losses.tensors
        inputs, group_slots = self._inputs(tensors)
        group_inputs = sum(slot is not None for slots in group_slots for slot in slots)
        engine = self._segment if task_ids is not None and self._segment is not None else self._engine
        result = engine.gradients(tensors, inputs, group_inputs, task_ids)
        values = torch.stack([loss.detach().reshape(()) for loss in task_losses.tensors])
        grads = self._gather(task_losses.names, values, inputs, group_slots, result)
        return scaling.unscale(grads) if scaling is not None else grads

    def _finish(self, grads: TaskGradients, scaling: LossScaling | None, optimizer: Any) -> bool:
        """Check, combine and write one step's gradients (the accumulated ones, if any)."""
        LossScaling.check_combining_call(grads, scaling)
        grads = synchronize(grads, self._distributed, self._groups, self._tasks, self._generator)
        if scaling is not None and not all_finite(grads):
            scaling.record(optimizer, finite=False)
            self._pending = None
            return False
        if scaling is None and self._check_finite:
            _check_all_finite(list(grads.names), grads.groups, grads.others)
        generator_before = self._generator.get_state()
        try:
            step = self._combine(grads)
        except BaseException:
            self._generator.set_state(generator_before)
            raise
        if scaling is not None:
            scaling.record(optimizer, finite=True)
        self._pending = None
        for param, update in step.updates:
            _accumulate(param, update)
        self._state.update(step.states)
        if self._collect_stats:
            labels = {g.name: g.label for g in self._groups}
            self._last_stats = StepStats(step=self._steps, tasks=grads.names, groups=step.stats, labels=labels)
        self._last_losses = grads.losses
        self._awaiting_update = any(Need.POST_STEP_LOSSES in s.needs for s in self._unique_strategies())
        self._steps += 1
        if self._last_stats is not None:
            for callback in self._callbacks:
                callback(self._last_stats)
        return True

    def update(self, losses: Sequence[Tensor] | Mapping[str, Tensor]) -> None:
        """Give the task losses measured after ``optimizer.step()`` to strategies that need them (FAMO).

        Call it once per step, after the optimizer step, with the losses of the same batches
        re-evaluated under the new parameters (under ``torch.no_grad()`` is fine).

        Raises:
            MissingUpdateError: No :meth:`backward` happened since the last update.
            InvalidLossError: The losses are malformed or their count differs from the step's.
        """
        if self._last_losses is None or not self._awaiting_update:
            raise MissingUpdateError(
                "surgeon.update(losses) must follow surgeon.backward(losses) and optimizer.step(), once per "
                "step, and only for strategies that need the post-step losses; found no pending step."
            )
        task_losses = _check_losses(losses, need_grad=False)
        after = torch.stack([loss.detach().reshape(()) for loss in task_losses.tensors]).to(self._last_losses)
        if after.shape != self._last_losses.shape:
            raise InvalidLossError(
                f"surgeon.update() needs one loss per task, {self._last_losses.numel()}; found {after.numel()}."
            )
        self._state.update(
            {
                g.name: self._strategies[g.name].after_step(self._state.get(g.name, {}), self._last_losses, after)
                for g in self._groups
                if Need.POST_STEP_LOSSES in self._strategies[g.name].needs
            }
        )
        self._awaiting_update = False

    def _unique_strategies(self) -> list[Strategy]:
        unique: dict[int, Strategy] = {}
        for strategy in self._strategies.values():
            unique.setdefault(id(strategy), strategy)
        return list(unique.values())

    def _check_step_tasks(self, names: list[str]) -> None:
        if self._awaiting_update:
            raise MissingUpdateError(
                "A strategy of this Surgeon needs the losses after each optimizer step: call "
                "surgeon.update(losses_after_step) after optimizer.step() and before the next surgeon.backward()."
            )
        subset = is_active(self._distributed) and set(names) <= set(self._tasks or ())  # a rank may lack a task
        if self._tasks is not None and len(names) != len(self._tasks) and not subset:
            raise InvalidLossError(
                f"`losses` must hold one loss per task, {len(self._tasks)} as given by `tasks`; found {len(names)}."
            )

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

    def close(self) -> None:
        """Remove the hooks the segment engine registered on the model (a no-op for other engines)."""
        if self._segment is not None:
            self._segment.close()

    @property
    def engine(self) -> GradientEngine:
        """The engine used when ``backward`` gets no ``task_ids`` (see :mod:`gradsurg.engines`)."""
        return self._engine

    def _gather(
        self,
        names: list[str],
        losses: Tensor,
        inputs: list[Tensor],
        group_slots: list[list[int | None]],
        result: EngineResult,
    ) -> TaskGradients:
        """The engine's per-task gradients as one gradient matrix per reached group and the other leaves."""
        per_task = result.per_task
        work: list[_Work] = []
        for group, slots in zip(self._groups, group_slots):
            present = [(p, slot) for p, slot in zip(group.params, slots) if slot is not None]
            if present:
                matrix = _gradient_matrix([p for p, _ in present], [s for _, s in present], per_task)
                work.append((group, [p for p, _ in present], matrix))
        first_ungrouped = sum(s is not None for slots in group_slots for s in slots)
        ungrouped: list[tuple[Tensor, list[Tensor]]] = []
        for index in range(first_ungrouped, len(inputs)):
            if any(g[index] is not None for g in per_task):
                rows = per_task[:1] if result.others_summed else per_task
                ungrouped.append((inputs[index], [_dense(g[index], inputs[index]) for g in rows]))
        return TaskGradients(tuple(names), losses, work, ungrouped, result.others_summed)

    def _combine(self, grads: TaskGradients) -> _Step:
        """Everything the step writes (updates, new states, statistics), computed before anything is written."""
        step_seed = int(torch.randint(0, 2**62, (1,), generator=self._generator))
        names, losses, work, ungrouped = grads.names, grads.losses, grads.groups, grads.others
        step = _Step()
        objectives: dict[int, list[Tensor]] = {}
        batches, singles = self._batches(work)
        for batch in batches:
            self._combine_batch(batch, losses, step_seed, step)
        for group, params, matrix in singles:
            strategy = self._strategies[group.name]
            learnable = self._params.get(id(strategy))
            gram = matrix @ matrix.T if self._collect_stats else None
            context = Context(
                generator=torch.Generator().manual_seed(step_seed),
                group=group,
                losses=losses,
                state=self._state.get(group.name) or strategy.init_state(len(names), device=matrix.device),
                params=dict(learnable.items()) if learnable is not None else {},
                step=self._steps,
                gram=gram,
            )
            output = strategy.apply(matrix, context)
            direction = output.direction
            step.states[group.name] = dict(output.state)
            if output.objective is not None and learnable is not None:
                objectives.setdefault(id(strategy), []).append(output.objective)
            if gram is not None:
                step.stats[group.name] = group_stats(gram, weights=output.weights, grads=matrix, direction=direction)
            step.updates.extend(self._split_direction(params, matrix, direction))
        for param, dense_grads in ungrouped:
            step.updates.append((param, torch.stack(dense_grads).sum(dim=0)))
        for key, terms in objectives.items():
            learnable_params = list(self._params[key].values())
            param_grads = torch.autograd.grad(torch.stack(terms).mean(), learnable_params, allow_unused=True)
            step.updates.extend((p, g) for p, g in zip(learnable_params, param_grads) if g is not None)
        return step

    def _batches(self, work: list[_Work]) -> tuple[list[list[_Work]], list[_Work]]:
        """Split the groups into batches (same batchable strategy, shape, dtype, device) and the rest.

        A strategy is batchable when it is a :class:`~gradsurg.GramStrategy` with ``batched = True``
        and needs nothing but the gradients and the generator.
        """
        buckets: dict[tuple[Any, ...], list[_Work]] = {}
        singles: list[_Work] = []
        for item in work:
            group, _, matrix = item
            strategy = self._strategies[group.name]
            batchable = isinstance(strategy, GramStrategy) and strategy.batched and not strategy.needs - {Need.LOSSES}
            if self._batch_groups and batchable:
                key = (id(strategy), tuple(matrix.shape), matrix.dtype, matrix.device)
                buckets.setdefault(key, []).append(item)
            else:
                singles.append(item)
        batches = [items for items in buckets.values() if len(items) > 1]
        singles.extend(items[0] for items in buckets.values() if len(items) == 1)
        return batches, singles

    def _combine_batch(self, batch: list[_Work], losses: Tensor, step_seed: int, step: _Step) -> None:
        """One batched Gram computation (``bmm``) for groups that share a strategy and a shape.

        Every group sees a generator in the same state, exactly as on the one-group-at-a-time path,
        so both paths give the same directions.
        """
        strategy = self._strategies[batch[0][0].name]
        assert isinstance(strategy, GramStrategy)
        stacked = torch.stack([matrix for _, _, matrix in batch])
        gram = stacked @ stacked.transpose(-1, -2)
        context = Context(
            generator=torch.Generator().manual_seed(step_seed), losses=losses, step=self._steps, gram=gram
        )
        weights = strategy.weights(gram.to(weight_dtype(stacked)), context)
        directions = (weights.to(stacked.dtype).unsqueeze(-2) @ stacked).squeeze(-2)
        stats = split_stats(group_stats(gram, weights=weights)) if self._collect_stats else []
        for index, (group, params, matrix) in enumerate(batch):
            step.states[group.name] = {}
            if stats:
                step.stats[group.name] = stats[index]
            step.updates.extend(self._split_direction(params, matrix, directions[index]))

    def _split_direction(self, params: list[Tensor], matrix: Tensor, direction: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Cut a group's direction into per-parameter updates (the plain sum in monitor-only mode)."""
        if self._monitor_only:
            direction = matrix.sum(dim=0)
        updates: list[tuple[Tensor, Tensor]] = []
        offset = 0
        for p in params:
            updates.append((p, direction[offset : offset + p.numel()].view_as(p)))
            offset += p.numel()
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
            "state": {name: dict(state) for name, state in self._state.items()},
            "params": [{k: p.detach().clone() for k, p in self._params[id(s)].items()} for s in self._learners()],
            "last_losses": self._last_losses,
            "awaiting_update": self._awaiting_update,
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
        saved_params = list(state.get("params", []))
        learners = self._learners()
        if len(saved_params) != len(learners):
            raise InvalidStateError(
                f"Surgeon state must hold the learnable parameters of {len(learners)} strategies; "
                f"found {len(saved_params)}."
            )
        self._generator.set_state(generator_state.clone())
        self._steps = int(state["steps"])
        self._state = {name: dict(value) for name, value in state.get("state", {}).items()}
        with torch.no_grad():
            for strategy, values in zip(learners, saved_params):
                for key, param in self._params[id(strategy)].items():
                    param.copy_(values[key])
        self._last_losses = state.get("last_losses")
        self._awaiting_update = bool(state.get("awaiting_update", False))

    def _learners(self) -> list[Strategy]:
        return [s for s in self._unique_strategies() if id(s) in self._params]

    def parameters(self) -> Iterator[nn.Parameter]:
        """Learnable parameters of the strategies (e.g. uncertainty weights): hand them to an optimizer.

        Empty for strategies without learnable parameters.
        """
        for strategy in self._learners():
            yield from self._params[id(strategy)].values()


def _resolve_engine(
    spec: str | GradientEngine, groups: tuple[ParamGroup, ...], model: nn.Module | None
) -> tuple[GradientEngine, SegmentEngine | None]:
    """The default engine and, when usable, the segment engine used for steps that give ``task_ids``."""
    if isinstance(spec, GradientEngine):
        spec.bind(groups, model)
        return spec, spec if isinstance(spec, SegmentEngine) else None
    choices = ("auto", *ENGINES)
    if spec not in choices:
        raise InvalidOptionError(f"Surgeon `engine` must be one of {', '.join(map(repr, choices))}; found {spec!r}.")
    if spec in ("auto", "segment") and (model is not None or spec == "segment"):
        segment = SegmentEngine()
        segment.bind(groups, model)
        if segment.supported:
            return (segment if spec == "segment" else LoopEngine()), segment
        segment.close()
        if spec == "segment":
            raise IncompatibleGroupError(
                "Surgeon engine='segment' computes per-task gradients only for the weight and bias of nn.Linear "
                f"and GPT-2 Conv1D layers; found {', '.join(segment.unsupported[:3])}. Use engine='loop' or 'auto'."
            )
    if spec in ("auto", "segment"):
        return LoopEngine(), None
    engine = ENGINES[spec]()
    engine.bind(groups, model)
    return engine, None


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


def _check_tasks(tasks: int | Sequence[str] | None) -> tuple[str, ...] | None:
    if tasks is None:
        return None
    if isinstance(tasks, int) and not isinstance(tasks, bool):
        if tasks < 1:
            raise InvalidOptionError(f"Surgeon `tasks` must be ≥ 1; found tasks={tasks}.")
        return tuple(str(i) for i in range(tasks))
    if isinstance(tasks, Sequence) and not isinstance(tasks, str) and tasks and all(isinstance(t, str) for t in tasks):
        return tuple(tasks)
    raise InvalidOptionError(
        f"Surgeon `tasks` must be a positive int or a non-empty sequence of task names; found tasks={tasks!r}."
    )


def _check_losses(losses: Sequence[Tensor] | Mapping[str, Tensor], *, need_grad: bool = True) -> _Losses:
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
        if need_grad and not loss.requires_grad:
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


def _check_all_finite(names: list[str], work: list[_Work], ungrouped: list[tuple[Tensor, list[Tensor]]]) -> None:
    """One device sync for the whole step; only on failure look for the culprit to name it."""
    flags = [torch.isfinite(matrix.sum()) for _, _, matrix in work]
    flags += [torch.isfinite(g.sum()) for _, grads in ungrouped for g in grads]
    if not flags or bool(torch.stack(flags).all()):
        return
    for group, _, matrix in work:
        check_finite(matrix, Context(group=group), names)
    for param, grads in ungrouped:
        for name, grad in zip(names if len(grads) == len(names) else ["<sum of all tasks>"], grads):
            if not bool(torch.isfinite(grad).all()):
                raise NonFiniteGradientError(
                    f"The gradient of task {name!r} for a parameter outside every group (shape "
                    f"{tuple(param.shape)}) must be finite; found NaN or Inf."
                )
