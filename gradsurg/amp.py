"""Mixed precision: the Surgeon with ``torch.amp.GradScaler`` (float16 autocast).

``surgeon.backward(losses, scaler=scaler, optimizer=optimizer)``:

1. scales every task loss, ``s · Lₜ`` (``scaler.scale``), so that float16 gradients do not underflow;
2. computes the per-task gradients of the scaled losses and **unscales them in float32**,
   ``gₜ = ∇(s · Lₜ) / s``, before any strategy sees them (strategies that are not scale-equivariant,
   or that keep statistics across steps, must see true gradients);
3. checks all of them for Inf/NaN **once**;
4. on overflow, writes nothing, leaves the Surgeon's state (generator, strategy state, step count)
   as it was, and records the overflow in the scaler, so that ``scaler.step(optimizer)`` skips the
   optimizer step and ``scaler.update()`` lowers the scale;
5. otherwise writes the **unscaled** combined direction into ``.grad`` and marks the optimizer as
   already unscaled (what ``scaler.unscale_(optimizer)`` does), so that ``scaler.step(optimizer)``
   does not divide by ``s`` a second time. Gradient clipping between ``surgeon.backward`` and
   ``scaler.step`` therefore works on true gradients, as after ``scaler.unscale_``.

The optimizer is needed because a ``GradScaler`` records overflows per optimizer. Steps 4 and 5
call the public ``scaler.unscale_(optimizer)`` (which also unscales anything already in ``.grad``)
and then add the Surgeon's own overflow flag to the record ``unscale_`` leaves for that optimizer,
the one place where gradsurg relies on a ``GradScaler`` internal (``_per_optimizer_states``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from gradsurg.accumulation import TaskGradients
from gradsurg.errors import InvalidOptionError, InvalidStateError

__all__ = ["LossScaling"]


class LossScaling:
    """One step's use of a ``torch.amp.GradScaler``.

    Args:
        scaler: An enabled ``torch.amp.GradScaler`` (or ``torch.cuda.amp.GradScaler``).

    Raises:
        InvalidOptionError: ``scaler`` is not a GradScaler.
    """

    def __init__(self, scaler: Any) -> None:
        if not isinstance(scaler, torch.amp.GradScaler):
            raise InvalidOptionError(f"Surgeon `scaler` must be a torch.amp.GradScaler; found {type(scaler).__name__}.")
        self._scaler = scaler

    @staticmethod
    def create(scaler: Any) -> LossScaling | None:
        """``None`` when there is no scaler or it is disabled (``GradScaler(enabled=False)``)."""
        if scaler is None:
            return None
        scaling = LossScaling(scaler)
        return scaling if scaler.is_enabled() else None

    def scale(self, losses: Sequence[Tensor]) -> list[Tensor]:
        """The scaled losses ``s · Lₜ``."""
        return [self._scaler.scale(loss) for loss in losses]

    def unscale(self, grads: TaskGradients) -> TaskGradients:
        """The gradients divided by the scale used in :meth:`scale`, in float32 (or wider)."""
        inverse = 1.0 / self._scaler.get_scale()
        unscaled = grads.map(lambda t: t.to(torch.promote_types(t.dtype, torch.float32)) * inverse)
        return replace(unscaled, scaled=True)

    @staticmethod
    def check_combining_call(grads: TaskGradients, scaling: LossScaling | None) -> None:
        """Refuse to combine micro-batches scaled by a GradScaler in a call that has no scaler.

        Raises:
            InvalidOptionError: The scaler would not learn about the step (``scaler.step`` fails).
        """
        if grads.scaled and scaling is None:
            raise InvalidOptionError(
                "The combining call (surgeon.step() or surgeon.backward() without accumulate) must get "
                "`scaler=` and `optimizer=` when the accumulated micro-batches used a GradScaler; found no scaler."
            )

    @staticmethod
    def check_optimizer(optimizer: Any) -> None:
        """Raise :class:`InvalidOptionError` unless ``optimizer`` is a ``torch.optim.Optimizer``."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise InvalidOptionError(
                "surgeon.backward(..., scaler=scaler) must also get `optimizer=` (the optimizer that "
                "scaler.step() will step), because a GradScaler records overflows per optimizer; "
                f"found optimizer={type(optimizer).__name__}."
            )

    def record(self, optimizer: torch.optim.Optimizer, finite: bool) -> None:
        """Tell the scaler that ``optimizer``'s gradients are unscaled, and whether they overflowed.

        Raises:
            InvalidStateError: ``scaler.unscale_(optimizer)`` was already called since the last
                ``scaler.update()`` (gradients would be unscaled twice).
        """
        try:
            self._scaler.unscale_(optimizer)
        except RuntimeError as exc:
            raise InvalidStateError(
                "The GradScaler must not have unscaled this optimizer since its last update(): the Surgeon "
                "writes unscaled gradients and unscales for you (call scaler.update() after scaler.step() "
                f"every step, and do not call scaler.unscale_() before surgeon.backward); found: {exc}."
            ) from exc
        found = self._scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
        scale = self._scaler._scale
        assert scale is not None  # set by scale() earlier in the step
        flag = torch.full((), 0.0 if finite else 1.0, dtype=torch.float32, device=scale.device)
        found[scale.device] = found[scale.device] + flag if scale.device in found else flag
