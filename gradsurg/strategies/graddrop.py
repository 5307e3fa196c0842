"""``graddrop``: Gradient Sign Dropout (Chen et al., NeurIPS 2020)."""

from __future__ import annotations

import torch
from torch import Tensor

from gradsurg._math import safe_divide
from gradsurg.errors import InvalidOptionError
from gradsurg.strategies.base import Context, Property, Strategy, check_option
from gradsurg.strategies.fixed_point import is_finite_number
from gradsurg.strategies.registry import register_strategy

__all__ = ["GradDrop"]


@register_strategy("graddrop", aliases=("grad_drop", "gradient_sign_dropout"))
class GradDrop(Strategy):
    r"""GradDrop: per coordinate, keep only the positive or only the negative task components, at random.

    Per coordinate ``k``, the positive sign purity ``Pₖ = ½ (1 + Σᵢ Gᵢₖ / Σᵢ |Gᵢₖ|)`` is the chance of
    keeping the positive side; with ``Uₖ`` uniform on ``[0, 1)`` from the generator, the mask is
    ``Mᵢₖ = 1[Pₖ > Uₖ]·1[Gᵢₖ > 0] + 1[Pₖ ≤ Uₖ]·1[Gᵢₖ < 0]`` and

    ``d = Σᵢ (ℓᵢ + (1 − ℓᵢ) Mᵢ) ⊙ gᵢ``

    with the leak ``ℓᵢ ∈ [0, 1]`` (``ℓ = 0``: pure GradDrop; ``ℓ = 1``: the plain sum).
    This is coordinate-wise, not in Gram space: the result is not a combination of the rows.

    Paper: Z. Chen, J. Ngiam, Y. Huang, T. Luong, H. Kretzschmar, Y. Chai, D. Anguelov, "Just Pick a
    Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout", NeurIPS 2020,
    https://arxiv.org/abs/2010.06808 (Algorithm 1 with ``f`` the identity, and the leak parameters
    of its Section 3).

    Choices: the paper applies GradDrop to the gradients at a shared activation layer (summed over
    the batch after multiplying by the sign of the activations); here, like TorchJD, it acts on each
    group's per-task parameter gradients. The paper's ``1[P < U]`` for the negative side is written
    ``1[P ≤ U]``: the two differ only when ``U = P`` exactly (probability zero), and this way exactly
    one sign is kept per coordinate (so ``U = 0`` does not drop a one-task gradient's negative
    entries). ``U`` is drawn on the CPU from the caller's generator in the dtype of the gradients
    (float32 for half types) and moved to their device. A column of zeros has ``P = ½`` (nothing to
    keep anyway).

    Scale: a sum (equals ``Σᵢ gᵢ`` wherever all tasks agree in sign). Cost: ``O(T n)``, one uniform draw
    per coordinate; stateless.

    Cross-checked against ``torchjd.aggregation.GradDrop`` with the same uniform draws (same seed),
    with and without leak.

    Args:
        leak: ``ℓ``, one number in ``[0, 1]`` for every task or a tuple of one per task (default
            ``0.0``, the paper's pure GradDrop).
    """

    family = "coordinate"
    cost = "O(T·n)"
    summary = "Keep, per coordinate, only one sign of the task gradients, chosen by sign purity (Chen et al. 2020)."
    paper = (
        "Z. Chen et al., Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout, "
        "NeurIPS 2020. https://arxiv.org/abs/2010.06808"
    )
    properties = frozenset(
        {
            Property.SCALE_EQUIVARIANT,
            Property.ONE_TASK_IDENTITY,
            Property.ONE_TASK_POSITIVE,
            Property.PERMUTATION_INVARIANT,
            Property.ZERO_ROWS_IGNORED,
            Property.RANDOMIZED,
        }
    )

    leak: float | tuple[float, ...]

    def __init__(self, *, leak: float | tuple[float, ...] = 0.0) -> None:
        name = type(self).__name__
        values = leak if isinstance(leak, tuple) else (leak,)
        valid = len(values) >= 1 and all(is_finite_number(v) and 0 <= v <= 1 for v in values)
        check_option(valid, name, "leak", "a number in [0, 1] or a non-empty tuple of them", leak)
        self._set_options(leak=tuple(float(v) for v in leak) if isinstance(leak, tuple) else float(leak))

    def _leaks(self, grads: Tensor) -> Tensor:
        tasks = grads.shape[0]
        if isinstance(self.leak, tuple):
            if len(self.leak) != tasks:
                raise InvalidOptionError(
                    f"Option `leak` of GradDrop must have one entry per task ({tasks}); found {len(self.leak)} "
                    f"entries, leak={self.leak!r}."
                )
            return torch.tensor(self.leak, dtype=grads.dtype, device=grads.device).unsqueeze(1)
        return torch.full((tasks, 1), self.leak, dtype=grads.dtype, device=grads.device)

    def _combine(self, grads: Tensor, context: Context) -> Tensor:
        leaks = self._leaks(grads)
        draw_dtype = grads.dtype if grads.dtype in (torch.float32, torch.float64) else torch.float32
        wide = grads.to(draw_dtype)
        purity = 0.5 * (1 + safe_divide(wide.sum(dim=0), wide.abs().sum(dim=0)))
        uniform = torch.rand(grads.shape[1], generator=context.generator, dtype=draw_dtype).to(grads.device)
        keep_positive = purity > uniform
        mask = torch.where(keep_positive, grads > 0, grads < 0).to(grads.dtype)
        return (grads * (leaks + (1 - leaks) * mask)).sum(dim=0)
