"""Gradient engines: how the Surgeon obtains one gradient per task.

* :class:`LoopEngine` (``"loop"``) — one ``torch.autograd.grad`` per task, retaining the graph only
  until the last task. Always correct, ``T`` backward passes.
* :class:`BatchedEngine` (``"batched"``) — one vectorised backward of the ``T`` losses with
  ``is_grads_batched=True`` (vmap over the backward). Same result; pays off when the losses share an
  expensive graph and every operation supports vmap.
* :class:`SegmentEngine` (``"segment"``) — **one** forward over the concatenated batch of all tasks
  and **one** backward of the summed loss. When every sample belongs to one task and samples do not
  interact in the forward pass, the gradient of a Linear-type layer ``y = x Wᵀ + b`` splits over
  samples: ``∂L/∂W = Σₙ δₙᵀ xₙ`` with ``δ = ∂L/∂y``. Forward hooks keep each layer's input ``x``,
  tensor hooks its output gradient ``δ``, and task ``t``'s gradient is the same sum restricted to
  its samples: ``∂Lₜ/∂W = Σ_{n ∈ t} δₙᵀ xₙ`` and ``∂Lₜ/∂b = Σ_{n ∈ t} δₙ`` (sums run over every
  position of a sequence too). The per-task gradients thus cost what one weight gradient costs.
  Supported layers: ``nn.Linear`` (LoRA's ``lora_A`` / ``lora_B`` are ``nn.Linear``) and GPT-2's
  ``Conv1D`` (``y = x W + b``). It is refused, with an error naming the module, for BatchNorm in
  training mode (it mixes samples) and for group parameters not owned by a supported layer.

The Surgeon picks with ``engine="auto"`` (the default): the segment engine when ``backward`` gets
``task_ids`` and the Surgeon was given the ``model`` (and every group parameter is supported), the
loop engine otherwise.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from gradsurg.errors import IncompatibleGroupError, InvalidLossError, InvalidOptionError
from gradsurg.groups import ParamGroup

__all__ = ["ENGINES", "BatchedEngine", "EngineResult", "GradientEngine", "LoopEngine", "SegmentEngine"]


@dataclass
class EngineResult:
    """Per-task gradients of the inputs.

    Attributes:
        per_task: ``per_task[t][i]``, task ``t``'s gradient of input ``i`` (``None`` where it does not
            reach it).
        others_summed: When ``True``, the inputs after the group parameters only have their gradient
            summed over tasks, stored as task 0's (the other tasks hold ``None``).
    """

    per_task: list[tuple[Tensor | None, ...]]
    others_summed: bool = False


class GradientEngine(abc.ABC):
    """Computes the per-task gradients of the group parameters (and the gradients of other leaves)."""

    name: ClassVar[str] = ""

    def bind(self, groups: Sequence[ParamGroup], model: nn.Module | None) -> None:  # noqa: B027  (optional hook)
        """Called once by the Surgeon with its groups and model (default: nothing to prepare)."""

    @abc.abstractmethod
    def gradients(
        self, losses: list[Tensor], inputs: list[Tensor], group_inputs: int, task_ids: Tensor | None
    ) -> EngineResult:
        """Gradients of each loss w.r.t. ``inputs``; the first ``group_inputs`` are group parameters."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LoopEngine(GradientEngine):
    """One ``torch.autograd.grad`` per task (``T`` backward passes); works for every model."""

    name = "loop"

    def gradients(
        self, losses: list[Tensor], inputs: list[Tensor], group_inputs: int, task_ids: Tensor | None
    ) -> EngineResult:
        if not inputs:
            return EngineResult([() for _ in losses])
        last = len(losses) - 1
        return EngineResult(
            [
                torch.autograd.grad(loss, inputs, retain_graph=t < last, allow_unused=True)
                for t, loss in enumerate(losses)
            ]
        )


class BatchedEngine(GradientEngine):
    """One vectorised backward of all the losses (``is_grads_batched=True``)."""

    name = "batched"

    def gradients(
        self, losses: list[Tensor], inputs: list[Tensor], group_inputs: int, task_ids: Tensor | None
    ) -> EngineResult:
        if not inputs:
            return EngineResult([() for _ in losses])
        stacked = torch.stack([loss.reshape(()) for loss in losses])
        eye = torch.eye(len(losses), dtype=stacked.dtype, device=stacked.device)
        try:
            grads = torch.autograd.grad(stacked, inputs, grad_outputs=eye, is_grads_batched=True, allow_unused=True)
        except RuntimeError as exc:
            raise IncompatibleGroupError(
                "The batched engine needs every operation of the backward pass to support vmap; this model's does "
                f"not ({str(exc).splitlines()[0]}). Use engine='loop'."
            ) from exc
        return EngineResult(
            [tuple(None if g is None else g[t] for g in grads) for t in range(len(losses))]
        )


@dataclass
class _Capture:
    inputs: list[Tensor] = field(default_factory=list)
    output_grads: list[Tensor] = field(default_factory=list)


class SegmentEngine(GradientEngine):
    """Per-task gradients of Linear-type layers from one backward of the summed loss (see module docs).

    Args:
        model: The model whose forward computes all tasks' losses from one concatenated batch.
            Hooks are registered on the modules that own group parameters when the Surgeon binds
            the engine; :meth:`close` removes them.
    """

    name = "segment"

    def __init__(self, model: nn.Module | None = None) -> None:
        self._model = model
        self._handles: list[RemovableHandle] = []
        self._captures: dict[nn.Module, _Capture] = {}
        self._owners: dict[int, tuple[nn.Module, str, str]] = {}
        self._supported = False
        self._unsupported: list[str] = []

    # -------------------------------------------------------------- binding
    def bind(self, groups: Sequence[ParamGroup], model: nn.Module | None) -> None:
        model = self._model if self._model is not None else model
        if model is None:
            raise InvalidOptionError(
                "The segment engine needs the model: pass Surgeon(..., model=model) (or SegmentEngine(model)); "
                "found model=None."
            )
        self._model = model
        wanted = {id(p) for g in groups for p in g.params}
        for module in model.modules():
            kind = _layer_kind(module)
            for param_name, param in module.named_parameters(recurse=False):
                if id(param) in wanted and kind is not None and param_name in ("weight", "bias"):
                    self._owners[id(param)] = (module, param_name, kind)
        self._unsupported = [
            _describe(g, p) for g in groups for p in g.params if id(p) not in self._owners
        ]
        self._supported = not self._unsupported
        if self._supported:
            for module in {owner for owner, _, _ in self._owners.values()}:
                self._handles.append(module.register_forward_hook(self._forward_hook))

    @property
    def unsupported(self) -> list[str]:
        """Descriptions of the group parameters this engine cannot handle (empty when supported)."""
        return list(self._unsupported)

    @property
    def supported(self) -> bool:
        """Whether every group parameter is the weight or bias of a supported layer."""
        return self._supported

    def close(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._captures.clear()

    def _forward_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not (torch.is_grad_enabled() and isinstance(output, Tensor) and output.requires_grad and args):
            return
        capture = self._captures.setdefault(module, _Capture())
        capture.inputs.append(args[0].detach())
        index = len(capture.inputs) - 1

        def keep_grad(grad: Tensor) -> None:
            while len(capture.output_grads) <= index:
                capture.output_grads.append(torch.zeros(()))
            capture.output_grads[index] = grad.detach()

        output.register_hook(keep_grad)  # type: ignore[no-untyped-call]

    # -------------------------------------------------------------- gradients
    def gradients(
        self, losses: list[Tensor], inputs: list[Tensor], group_inputs: int, task_ids: Tensor | None
    ) -> EngineResult:
        try:
            return self._gradients(losses, inputs, group_inputs, task_ids)
        finally:
            self._captures.clear()

    def _gradients(
        self, losses: list[Tensor], inputs: list[Tensor], group_inputs: int, task_ids: Tensor | None
    ) -> EngineResult:
        tasks = len(losses)
        if not self._supported:
            raise IncompatibleGroupError(
                "The segment engine computes per-task gradients only for the weight and bias of nn.Linear and "
                f"GPT-2 Conv1D layers; unsupported group parameters: {', '.join(self._unsupported[:4])}. "
                "Use engine='loop'."
            )
        ids = _check_task_ids(task_ids, tasks)
        self._check_no_batchnorm()
        total = torch.stack([loss.reshape(()) for loss in losses]).sum()
        summed = torch.autograd.grad(total, inputs, allow_unused=True)
        order, counts = _segments(ids, tasks)
        per_module: dict[nn.Module, list[tuple[Tensor, Tensor]]] = {}
        per_task: list[list[Tensor | None]] = [[None] * len(inputs) for _ in range(tasks)]
        for index, param in enumerate(inputs[:group_inputs]):
            module, param_name, kind = self._owners[id(param)]
            if summed[index] is None:
                continue
            if module not in per_module:
                per_module[module] = self._module_task_grads(module, kind, ids.numel(), order, counts)
            for t, (weight_grad, bias_grad) in enumerate(per_module[module]):
                per_task[t][index] = weight_grad if param_name == "weight" else bias_grad
        for index in range(group_inputs, len(inputs)):
            per_task[0][index] = summed[index]
        return EngineResult([tuple(row) for row in per_task], others_summed=True)

    def _module_task_grads(
        self, module: nn.Module, kind: str, samples: int, order: Tensor | None, counts: list[int]
    ) -> list[tuple[Tensor, Tensor]]:
        capture = self._captures.get(module)
        name = self._module_name(module)
        if capture is None or len(capture.output_grads) != len(capture.inputs):
            raise IncompatibleGroupError(
                f"The segment engine did not see the forward pass of module {name!r} with gradients enabled; "
                "run the forward of this step after building the Surgeon, with torch.enable_grad()."
            )
        weights: list[Tensor] = []
        biases: list[Tensor] = []
        for x, delta in zip(capture.inputs, capture.output_grads):
            if x.shape[0] != samples or delta.shape[0] != samples:
                raise InvalidLossError(
                    f"`task_ids` must give one task per sample of the batch; module {name!r} saw a batch of "
                    f"{x.shape[0]} samples but task_ids has {samples} entries."
                )
            if order is not None:
                x, delta = x.index_select(0, order), delta.index_select(0, order)
            for t, (x_t, d_t) in enumerate(zip(torch.split(x, counts), torch.split(delta, counts))):
                x_flat = x_t.reshape(-1, x_t.shape[-1]).to(d_t.dtype)
                d_flat = d_t.reshape(-1, d_t.shape[-1])
                weight = d_flat.T @ x_flat if kind == "linear" else x_flat.T @ d_flat
                bias = d_flat.sum(dim=0)
                if len(weights) <= t:
                    weights.append(weight)
                    biases.append(bias)
                else:  # the module ran more than once in the forward pass: contributions add up
                    weights[t] = weights[t] + weight
                    biases[t] = biases[t] + bias
        return list(zip(weights, biases))

    def _check_no_batchnorm(self) -> None:
        assert self._model is not None
        for name, module in self._model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
                raise IncompatibleGroupError(
                    f"The segment engine needs samples that do not interact in the forward pass; module {name!r} "
                    f"({type(module).__name__}) is in training mode and mixes samples. Use engine='loop', or put "
                    "it in eval mode."
                )

    def _module_name(self, module: nn.Module) -> str:
        assert self._model is not None
        return next((n for n, m in self._model.named_modules() if m is module), type(module).__name__)


ENGINES: dict[str, type[GradientEngine]] = {e.name: e for e in (LoopEngine, BatchedEngine, SegmentEngine)}


def _layer_kind(module: nn.Module) -> str | None:
    """``"linear"`` for ``y = x Wᵀ + b`` layers, ``"conv1d"`` for GPT-2's ``y = x W + b``, else None."""
    if isinstance(module, nn.Linear):
        return "linear"
    is_conv1d = type(module).__name__ == "Conv1D" and hasattr(module, "nf")
    return "conv1d" if is_conv1d and isinstance(getattr(module, "weight", None), Tensor) else None


def _describe(group: ParamGroup, param: Tensor) -> str:
    return f"a parameter of shape {tuple(param.shape)} in group {group.name!r}"


def _check_task_ids(task_ids: Tensor | None, tasks: int) -> Tensor:
    if task_ids is None:
        raise InvalidLossError(
            "The segment engine needs `task_ids`: surgeon.backward(losses, task_ids=ids) with ids[n] the task "
            "of sample n of the concatenated batch."
        )
    if not isinstance(task_ids, Tensor) or task_ids.dim() != 1 or task_ids.dtype.is_floating_point:
        raise InvalidLossError(
            "`task_ids` must be a 1-D integer tensor with one task index per sample; found "
            f"{type(task_ids).__name__} {getattr(task_ids, 'shape', '')} {getattr(task_ids, 'dtype', '')}."
        )
    bad = ((task_ids < 0) | (task_ids >= tasks)).nonzero()
    if bad.numel():
        sample = int(bad[0, 0])
        raise InvalidLossError(
            f"`task_ids` must hold task indices in [0, {tasks}) (one per loss); sample {sample} has task id "
            f"{int(task_ids[sample])}."
        )
    return task_ids


def _segments(ids: Tensor, tasks: int) -> tuple[Tensor | None, list[int]]:
    """The permutation that sorts samples by task (``None`` when already sorted) and the task sizes."""
    counts = torch.bincount(ids, minlength=tasks).tolist()
    if ids.numel() < 2 or bool((ids[1:] >= ids[:-1]).all()):
        return None, counts
    return torch.argsort(ids, stable=True), counts
