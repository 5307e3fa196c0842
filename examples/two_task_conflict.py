"""Two regression tasks that compete for one shared trunk: ``sum`` vs ``pcgrad`` vs ``cagrad``.

The conflict is built in. Inputs ``x ∈ ℝ⁸``; ``c, u, v`` are three orthonormal directions.

* Task A predicts ``(x·c, x·u)``.
* Task B predicts ``2·(x·c, x·v)`` (same kind of target, twice the scale).

Both tasks read one shared linear trunk with only **two** features, each through its own linear head.
Both want the feature ``c``; the trunk's second feature can serve ``u`` (task A) or ``v`` (task B) but
not both, so the two tasks' gradients on the trunk point against each other (``g_A·g_B < 0``) on most
steps: the script counts them. No method can remove this trade-off, since the trunk is too small for
both tasks; the methods differ in where on it they end up. ``sum`` minimises the total loss, which
favours the task with the larger loss; PCGrad changes the direction whenever the gradients conflict,
CAGrad at every step, towards the task that gains least. The table reports what each method reaches;
nothing here is tuned for any of them.

Only the trunk is handed to the strategy (``gs.groups.whole(trunk)``): the heads are outside every
group, so each head gets its own task's plain gradient.

Run::

    python examples/two_task_conflict.py            # 300 steps, seed 0
    python examples/two_task_conflict.py --steps 1000 --seed 3
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import gradsurg as gs

INPUTS = 8
FEATURES = 2
SCALE_B = 2.0
NOISE = 0.1
SAMPLES = 1024
BATCH = 64
LEARNING_RATE = 0.02
METHODS = ("sum", "pcgrad", "cagrad")


@dataclass(frozen=True)
class Data:
    """Inputs and the two tasks' targets."""

    x: Tensor
    y_a: Tensor
    y_b: Tensor


@dataclass(frozen=True)
class Result:
    """Full-data losses after training, and how often the trunk gradients conflicted."""

    method: str
    loss_a: float
    loss_b: float
    relative_a: float
    relative_b: float
    conflict_rate: float

    @property
    def total(self) -> float:
        return self.loss_a + self.loss_b

    @property
    def worst_relative(self) -> float:
        """The larger of the two tasks' loss over its target variance (1.0 = the task learned nothing)."""
        return max(self.relative_a, self.relative_b)


class TwoHeads(nn.Module):
    """A shared linear trunk with ``FEATURES`` outputs and one linear head per task."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(INPUTS, FEATURES)
        self.head_a = nn.Linear(FEATURES, 2)
        self.head_b = nn.Linear(FEATURES, 2)

    def losses(self, x: Tensor, y_a: Tensor, y_b: Tensor) -> list[Tensor]:
        features = self.trunk(x)
        return [
            nn.functional.mse_loss(self.head_a(features), y_a),
            nn.functional.mse_loss(self.head_b(features), y_b),
        ]


def make_data(seed: int) -> Data:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(SAMPLES, INPUTS, generator=generator)
    directions, _ = torch.linalg.qr(torch.randn(INPUTS, 3, generator=generator))
    c, u, v = (x @ directions).unbind(dim=1)
    y_a = torch.stack([c, u], dim=1) + NOISE * torch.randn(SAMPLES, 2, generator=generator)
    y_b = SCALE_B * torch.stack([c, v], dim=1) + NOISE * torch.randn(SAMPLES, 2, generator=generator)
    return Data(x, y_a, y_b)


def build_strategy(method: str) -> gs.Strategy:
    if method == "cagrad":
        # scale="sum" puts CAGrad on the same scale as sum and PCGrad, so one learning rate fits all.
        return gs.get_strategy("cagrad", scale="sum")
    return gs.get_strategy(method)


def conflicts(trunk: nn.Module, losses: list[Tensor]) -> bool:
    """Whether the two tasks' gradients on the trunk have a negative dot product (for the table only)."""
    params = list(trunk.parameters())
    flat = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)]) for loss in losses]
    return bool(flat[0] @ flat[1] < 0)


def train(method: str, data: Data, *, steps: int, seed: int) -> Result:
    torch.manual_seed(seed)  # same initial weights for every method
    model = TwoHeads()
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    surgeon = gs.Surgeon(gs.groups.whole(model.trunk), build_strategy(method), seed=seed)
    batches = torch.Generator().manual_seed(seed)  # same batches for every method
    conflicting = 0
    for _ in range(steps):
        index = torch.randint(0, SAMPLES, (BATCH,), generator=batches)
        losses = model.losses(data.x[index], data.y_a[index], data.y_b[index])
        conflicting += conflicts(model.trunk, losses)
        optimizer.zero_grad()
        surgeon.backward(losses)
        optimizer.step()
    with torch.no_grad():
        loss_a, loss_b = (float(loss) for loss in model.losses(data.x, data.y_a, data.y_b))
    return Result(
        method=method,
        loss_a=loss_a,
        loss_b=loss_b,
        relative_a=loss_a / float(data.y_a.var()),
        relative_b=loss_b / float(data.y_b.var()),
        conflict_rate=conflicting / steps,
    )


def table(results: Sequence[Result]) -> str:
    header = (
        f"{'method':<8} {'loss A':>8} {'loss B':>8} {'total':>8} {'A rel.':>7} {'B rel.':>7} {'conflicting steps':>18}"
    )
    rows = [
        f"{r.method:<8} {r.loss_a:>8.4f} {r.loss_b:>8.4f} {r.total:>8.4f} {r.relative_a:>7.3f} "
        f"{r.relative_b:>7.3f} {r.conflict_rate:>17.0%}"
        for r in results
    ]
    return "\n".join([header, "-" * len(header), *rows])


def reading(results: Sequence[Result]) -> str:
    """One line naming the method with the lowest total loss and the one with the best worst task."""
    lowest_total = min(results, key=lambda r: r.total)
    most_balanced = min(results, key=lambda r: r.worst_relative)
    if lowest_total is most_balanced:
        return (
            f"Reading: {lowest_total.method} has both the lowest total loss ({lowest_total.total:.4f}) "
            f"and the best worst task (relative loss {lowest_total.worst_relative:.3f})."
        )
    return (
        f"Reading: {lowest_total.method} has the lowest total loss ({lowest_total.total:.4f}, worst task "
        f"{lowest_total.worst_relative:.3f}); {most_balanced.method} has the best worst task "
        f"({most_balanced.worst_relative:.3f}, total {most_balanced.total:.4f}): a trade-off, not a free win."
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--steps", type=int, default=300, help="SGD steps per method (default 300)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the weights and the Surgeon")
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated strategy names (default {','.join(METHODS)})",
    )
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be ≥ 1; found {args.steps}.")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unusable = sorted(set(args.methods) - set(usable_strategies()))
    if unusable:
        parser.error(f"--methods must be strategies this loop can run, {usable_strategies()}; found {unusable}.")
    return args


def usable_strategies() -> list[str]:
    """Registered strategies that need nothing this loop lacks (LoRA groups, learnable weights, an update call)."""
    enough = {gs.Need.LOSSES, gs.Need.STATE}
    return [
        name
        for name in gs.list_strategies()
        if not gs.strategy_info(name).requires and gs.strategy_info(name).cls.needs <= enough
    ]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tensors this small only lose time to thread hand-offs
    try:
        data = make_data(args.seed)
        results = [train(method, data, steps=args.steps, seed=args.seed) for method in args.methods]
    finally:
        torch.set_num_threads(threads)
    print(f"Two tasks, one 2-feature trunk, {args.steps} SGD steps, seed {args.seed}.")
    print("Losses are full-data MSE; 'rel.' is the loss over the task's target variance (1 = nothing learned).")
    print()
    print(table(results))
    print()
    print(reading(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
