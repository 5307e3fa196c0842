"""MoCo: a plain loop over the paper's Algorithm 1 over several steps, checkpoint round trip, options."""

from __future__ import annotations

import pytest
import torch

from gradsurg.errors import InvalidOptionError, InvalidStateError
from gradsurg.strategies.base import Context
from gradsurg.strategies.moco import MoCo
from tests.hyp import seeded
from tests.strategies.zoo_helpers import assert_resumes_identically


def _project(v: list[float]) -> list[float]:
    """Euclidean projection onto the simplex by bisection on the threshold (independent of the library's)."""
    low, high = min(v) - 1.0, max(v)
    for _ in range(200):
        mid = (low + high) / 2
        if sum(max(x - mid, 0.0) for x in v) > 1:
            low = mid
        else:
            high = mid
    return [max(x - high, 0.0) for x in v]


def _reference(steps: list[torch.Tensor], beta: float, gamma: float, rho: float) -> list[list[float]]:
    tasks, width = steps[0].shape
    y = [[0.0] * width for _ in range(tasks)]
    lambd = [1.0 / tasks] * tasks
    out = []
    for grads in steps:
        g = grads.tolist()
        y = [[y[i][k] - beta * (y[i][k] - g[i][k]) for k in range(width)] for i in range(tasks)]
        gram = [[sum(y[i][k] * y[j][k] for k in range(width)) for j in range(tasks)] for i in range(tasks)]
        step = [sum(gram[i][j] * lambd[j] for j in range(tasks)) + rho * lambd[i] for i in range(tasks)]
        lambd = _project([lambd[i] - gamma * step[i] for i in range(tasks)])
        out.append([sum(lambd[i] * y[i][k] for i in range(tasks)) for k in range(width)])
    return out


@pytest.mark.parametrize(("beta", "gamma", "rho"), [(0.1, 0.1, 0.0), (0.5, 0.02, 0.1), (1.0, 0.3, 1.0)])
def test_matches_the_papers_algorithm_over_several_steps(beta: float, gamma: float, rho: float) -> None:
    steps = [torch.randn(3, 6, generator=seeded(s), dtype=torch.float64) for s in range(6)]
    strategy = MoCo(beta=beta, gamma=gamma, rho=rho)
    state = strategy.init_state(3, device=torch.device("cpu"))
    for grads, expected in zip(steps, _reference(steps, beta, gamma, rho)):
        output = strategy.apply(grads, Context(state=state))
        state = output.state
        torch.testing.assert_close(output.direction, torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=1e-12)


def test_one_task_fresh_state_is_damped_gradient() -> None:
    g = torch.randn(1, 5, generator=seeded(0))
    torch.testing.assert_close(MoCo(beta=0.25)(g), 0.25 * g[0])


def test_half_precision_gradients_keep_a_float32_state() -> None:
    output = MoCo().apply(torch.randn(2, 4).half(), Context(state=MoCo().init_state(2, device=torch.device("cpu"))))
    assert output.direction.dtype == torch.float16
    assert output.state["y"].dtype == torch.float32


def test_checkpoint_round_trip_mid_run() -> None:
    assert_resumes_identically(MoCo(beta=0.5, gamma=0.05, rho=0.1))


def test_state_of_the_wrong_width_is_refused() -> None:
    state = MoCo().init_state(2, device=torch.device("cpu"))
    state = MoCo().apply(torch.randn(2, 4), Context(state=state)).state
    with pytest.raises(InvalidStateError, match="`y`"):
        MoCo().apply(torch.randn(2, 5), Context(state=state))


@pytest.mark.parametrize(
    "options", [{"beta": 0.0}, {"beta": 1.5}, {"gamma": 0.0}, {"gamma": float("inf")}, {"rho": -1.0}]
)
def test_invalid_options(options: dict[str, object]) -> None:
    with pytest.raises(InvalidOptionError, match="of MoCo must be"):
        MoCo(**options)  # type: ignore[arg-type]
