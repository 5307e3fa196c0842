"""Gradient engines: how the Surgeon obtains one gradient per task.

* :class:`LoopEngine` (``"loop"``) — one ``torch.autograd.grad`` per task, retaining the graph only
  until the last task. Always correct, ``T`` backward passes.
* :class:`BatchedEngine` (``"batched"``) — one vectorised backward of the ``T`` losses with
  ``is_grads_batched=True`` (vmap over the backward). Same result; pays off when the losses share an
  expensive graph and every operation supports vmap.
* :class:`SegmentEngine` (``"segment"``) — **one** forward over the concatenated batch of all tasks
  and **one** backward of the summed loss. When every sample belongs to one task and samples do not
  interact in the forward pass, the gradient of a Linear-type layer ``y = x Wᵀ + b`` splits over
  samples: ``∂L/∂W = Σₙ δₙᵀ xₙ`` with ``δ = ∂L/∂y``. Forward hooks keep each layer's input ``x`` and
  the gradient edge of its output; the one backward returns ``δ`` at those edges (the group
  parameters' own summed gradients are not computed at all), and task ``t``'s gradient is the same sum restricted to
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
from torch.autograd.graph import GradientEdge, get_gradient_edge
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
        return EngineResult([tuple(None if g is None else g[t] for g in grads) for t in range(len(losses))])


@dataclass
class _Capture:
    """What the forward hook keeps of each call of a hooked layer: its input and its output's gradient edge."""

    inputs: list[Tensor] = field(default_factory=list)
    edges: list[GradientEdge] = field(default_factory=list)
    shapes: list[torch.Size] = field(default_factory=list)


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
        self._names: dict[nn.Module, str] = {}
        self._batchnorms: list[tuple[str, nn.Module]] = []

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
        # Names and BatchNorm layers are looked up once here, not in every step (a walk over every module).
        self._names = {module: name for name, module in model.named_modules()}
        batchnorm = nn.modules.batchnorm._BatchNorm
        self._batchnorms = [(name, module) for module, name in self._names.items() if isinstance(module, batchnorm)]
        for module in self._names:
            kind = _layer_kind(module)
            for param_name, param in module.named_parameters(recurse=False):
                if id(param) in wanted and kind is not None and param_name in ("weight", "bias"):
                    self._owners[id(param)] = (module, param_name, kind)
        self._unsupported = [_describe(g, p) for g in groups for p in g.params if id(p) not in self._owners]
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
        # The edge, not the tensor: an in-place op applied to the output later (ReLU(inplace=True), a residual
        # `+=`) re-points the tensor's grad_fn, while the edge keeps the gradient of the value the layer
        # produced. On more than 2 dimensions nn.Linear returns a reshaped view of a matrix product, and an
        # in-place op on a view rewrites the history of its base: the edge is then taken on the base (same
        # elements in the same order), whose producing node stays in the graph.
        base = output._base if output._is_view() else None
        same_layout = base is not None and base.numel() == output.numel() and base.is_contiguous()
        target = base if base is not None and same_layout and output.is_contiguous() and base.requires_grad else output
        capture.edges.append(get_gradient_edge(target))
        capture.shapes.append(output.shape)

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
        modules: dict[nn.Module, _Capture] = {}
        for param in inputs[:group_inputs]:
            module = self._owners[id(param)][0]
            if module not in modules:
                modules[module] = self._capture(module)
        others = [get_gradient_edge(leaf) for leaf in inputs[group_inputs:]]
        edges = [*others, *(edge for capture in modules.values() for edge in capture.edges)]
        total = torch.stack([loss.reshape(()) for loss in losses]).sum()
        # One backward of the summed loss to the other leaves and to the hooked layers' outputs: the group
        # parameters' own (summed) gradients are never computed, their per-task ones are built below.
        grads = torch.autograd.grad(total, edges, allow_unused=True)
        deltas = iter(grads[len(others) :])
        order, counts = _segments(ids, tasks)
        per_module: dict[nn.Module, tuple[Tensor, Tensor | None]] = {}
        for module, capture in modules.items():
            calls = zip(capture.inputs, capture.shapes, deltas)
            pairs = [(x, delta.reshape(shape)) for x, shape, delta in calls if delta is not None]
            if not pairs:  # its parameters are reached (they are inputs), so the gradient went around the output
                raise IncompatibleGroupError(
                    f"The segment engine could not read the output gradient of module {self._module_name(module)!r}: "
                    "the loss reaches its parameters but not through the output the forward hook saw (an in-place "
                    "operation on a view of the output, or the parameters used outside the layer). Use engine='loop'."
                )
            per_module[module] = self._module_task_grads(module, pairs, ids.numel(), order, counts)
        per_task: list[list[Tensor | None]] = [[None] * len(inputs) for _ in range(tasks)]
        for index, param in enumerate(inputs[:group_inputs]):
            module, param_name, kind = self._owners[id(param)]
            weight, bias = per_module[module]
            if kind == "conv1d":  # Conv1D stores W as [in, out]
                weight = weight.mT
            stacked = bias if param_name == "bias" else weight
            if stacked is not None:
                for t in range(tasks):
                    per_task[t][index] = stacked[t]
        for index, grad in enumerate(grads[: len(others)], start=group_inputs):
            per_task[0][index] = grad
        return EngineResult([tuple(row) for row in per_task], others_summed=True)

    def _capture(self, module: nn.Module) -> _Capture:
        capture = self._captures.get(module)
        if capture is None:
            raise IncompatibleGroupError(
                f"The segment engine did not see the forward pass of module {self._module_name(module)!r} with "
                "gradients enabled; run the forward of this step after building the Surgeon, with torch.enable_grad()."
            )
        return capture

    def _module_task_grads(
        self,
        module: nn.Module,
        pairs: list[tuple[Tensor, Tensor]],
        samples: int,
        order: Tensor | None,
        counts: list[int],
    ) -> tuple[Tensor, Tensor | None]:
        """Per-task ``δᵀx`` and ``Σδ`` of one layer, stacked over tasks (``Tensor[T, out, in]``, ``Tensor[T, out]``).

        ``Σδ`` only when the layer's bias is a group parameter. A layer called several times in the forward
        pass adds up its calls' contributions.
        """
        with_bias = self._owners.get(id(getattr(module, "bias", None)), (None, "", ""))[1] == "bias"
        weight: Tensor | None = None
        bias: Tensor | None = None
        for x, delta in pairs:
            if x.shape[0] != samples or delta.shape[0] != samples:
                raise InvalidLossError(
                    f"`task_ids` must give one task per sample of the batch; module {self._module_name(module)!r} "
                    f"saw a batch of {x.shape[0]} samples but task_ids has {samples} entries."
                )
            if order is not None:
                x, delta = x.index_select(0, order), delta.index_select(0, order)
            x = x.to(delta.dtype)
            if len(set(counts)) == 1:  # equal task sizes: one batched product for all tasks
                deltas = [delta.reshape(len(counts), -1, delta.shape[-1])]
                xs = [x.reshape(len(counts), -1, x.shape[-1])]
            else:
                deltas = [d.reshape(1, -1, d.shape[-1]) for d in torch.split(delta, counts)]
                xs = [x_t.reshape(1, -1, x_t.shape[-1]) for x_t in torch.split(x, counts)]
            w = _cat([_outer(d, x_t) for d, x_t in zip(deltas, xs)])
            weight = w if weight is None else weight + w
            if with_bias:
                b = _cat([d.sum(dim=-2) for d in deltas])
                bias = b if bias is None else bias + b
        assert weight is not None  # `pairs` is never empty
        return weight, bias

    def _check_no_batchnorm(self) -> None:
        for name, module in self._batchnorms:
            if module.training:
                raise IncompatibleGroupError(
                    f"The segment engine needs samples that do not interact in the forward pass; module {name!r} "
                    f"({type(module).__name__}) is in training mode and mixes samples. Use engine='loop', or put "
                    "it in eval mode."
                )

    def _module_name(self, module: nn.Module) -> str:
        return self._names.get(module, type(module).__name__)


ENGINES: dict[str, type[GradientEngine]] = {e.name: e for e in (LoopEngine, BatchedEngine, SegmentEngine)}


def _layer_kind(module: nn.Module) -> str | None:
    """``"linear"`` for ``y = x Wᵀ + b`` layers, ``"conv1d"`` for GPT-2's ``y = x W + b``, else None."""
    if isinstance(module, nn.Linear):
        return "linear"
    is_conv1d = type(module).__name__ == "Conv1D" and hasattr(module, "nf")
    return "conv1d" if is_conv1d and isinstance(getattr(module, "weight", None), Tensor) else None


def _outer(delta: Tensor, x: Tensor) -> Tensor:
    """``δᵀx`` over the sample dimension (``[..., m, out]``, ``[..., m, in]`` → ``[..., out, in]``).

    Computed as ``(xᵀδ)ᵀ`` when ``in < out``: BLAS is several times faster when the narrow factor is the
    left operand (a LoRA ``B`` factor: ``out = 384``, ``in = r = 8``).
    """
    if x.shape[-1] < delta.shape[-1]:
        return (x.mT @ delta).mT
    return delta.mT @ x


def _cat(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


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
