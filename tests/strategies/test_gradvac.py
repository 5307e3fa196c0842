"""GradVac: TorchJD cross-check over several steps, PCGrad at the first step, checkpoint round trip."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torchjd.aggregation import GradVac as TorchJDGradVac

import gradsurg as gs
from gradsurg.errors import InvalidOptionError, InvalidStateError
from gradsurg.strategies.base import Context
from gradsurg.strategies.gradvac import GradVac
from tests.hyp import clone_generator, seeded
from tests.strategies.zoo_helpers import assert_resumes_identically


def _orders(tasks: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """The permutations TorchJD's ``torch.randperm`` must return to visit the tasks in our orders."""
    keys = torch.rand(tasks, tasks - 1, generator=clone_generator(generator))
    yield from keys.argsort(dim=1)


@pytest.mark.parametrize("tasks", [2, 3, 4])
@pytest.mark.parametrize("beta", [0.01, 0.5])
def test_matches_torchjd_over_several_steps(monkeypatch: pytest.MonkeyPatch, tasks: int, beta: float) -> None:
    ours, theirs = GradVac(beta=beta), TorchJDGradVac(beta=beta, eps=0.0)
    state = ours.init_state(tasks, device=torch.device("cpu"))
    base = torch.randn(tasks, 9, generator=seeded(tasks), dtype=torch.float64)
    for step in range(5):
        grads = base + 0.8 * torch.randn(tasks, 9, generator=seeded(100 + step), dtype=torch.float64)
        generator = seeded(step)
        if tasks > 2:
            orders = _orders(tasks, generator)
            monkeypatch.setattr(torch, "randperm", lambda n, *a, _orders=orders, **k: next(_orders))
        expected = theirs(grads)
        monkeypatch.undo()
        output = ours.apply(grads, Context(generator=generator, state=state))
        state = output.state
        torch.testing.assert_close(output.direction, expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(state["phi"], theirs.gramian_weighting._phi_t, rtol=1e-10, atol=1e-12)


def test_first_step_is_pcgrad() -> None:
    grads = torch.randn(4, 7, generator=seeded(3), dtype=torch.float64)
    pcgrad = gs.get_strategy("pcgrad")(grads, generator=seeded(5))
    torch.testing.assert_close(GradVac()(grads, generator=seeded(5)), pcgrad, rtol=1e-12, atol=1e-12)


def test_corrected_pair_reaches_the_target_similarity() -> None:
    """Two tasks: after the correction cos(g₁', g₂) equals the target φ̂₁₂ (φ̂₂₁ = −1: g₂ is never corrected)."""
    grads = torch.tensor([[1.0, 0.2, 0.0], [-0.3, 1.0, 0.5]], dtype=torch.float64)
    state = {"phi": torch.tensor([[0.0, 0.4], [-1.0, 0.0]], dtype=torch.float64)}
    weights, _ = GradVac().step(grads @ grads.T, state, Context(generator=seeded(0)))
    first = (weights - torch.tensor([0.0, 1.0], dtype=torch.float64)) @ grads  # g₁' = wᵀG − g₂
    cosine = torch.nn.functional.cosine_similarity(first, grads[1], dim=0)
    torch.testing.assert_close(cosine, torch.tensor(0.4, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_checkpoint_round_trip_mid_run() -> None:
    assert_resumes_identically(GradVac(beta=0.3))


def test_state_of_the_wrong_size_is_refused() -> None:
    grads = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(InvalidStateError, match="phi"):
        GradVac().apply(grads, Context(state={"phi": torch.zeros(2, 2)}))


@pytest.mark.parametrize("options", [{"beta": -0.1}, {"beta": 1.5}, {"beta": float("nan")}, {"shuffle": 1}])
def test_invalid_options(options: dict[str, object]) -> None:
    with pytest.raises(InvalidOptionError, match="of GradVac must be"):
        GradVac(**options)  # type: ignore[arg-type]
