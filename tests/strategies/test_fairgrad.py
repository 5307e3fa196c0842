"""FairGrad: the α-fair equation, TorchJD (scipy least_squares) cross-check, scale, degenerate inputs, options."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import least_squares
from torchjd.aggregation import FairGrad as TorchJDFairGrad

import gradsurg as gs
from gradsurg.errors import GradSurgWarning, InvalidOptionError
from gradsurg.strategies.base import Context
from gradsurg.strategies.fairgrad import FairGrad
from tests.hyp import seeded

ALPHAS = [0.2, 0.5, 1.0, 2.0, 5.0]


def _grads(tasks: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(tasks, width, generator=seeded(seed), dtype=torch.float64) * torch.logspace(
        -1, 1, tasks
    ).double().unsqueeze(1)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize(("tasks", "width"), [(2, 5), (3, 8), (5, 30)])
def test_weights_solve_the_fairness_equation(alpha: float, tasks: int, width: int) -> None:
    grads = _grads(tasks, width)
    gram = grads @ grads.T
    w = FairGrad(alpha=alpha).weights(gram, Context())
    backward_error = (gram @ w - w.pow(-1 / alpha)).norm() / (gram.norm() * w.norm() + w.pow(-1 / alpha).norm())
    assert backward_error < 1e-7  # the ridge ε = 1e-8 on the cosine matrix
    tight = least_squares(
        lambda x: gram.numpy() @ x - x ** (-1 / alpha), np.ones(tasks) / tasks, bounds=(1e-12, np.inf), xtol=1e-15
    )
    torch.testing.assert_close(w, torch.from_numpy(tight.x), rtol=1e-6, atol=0)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_matches_torchjd(alpha: float) -> None:
    grads = _grads(3, 10, seed=1)
    expected = TorchJDFairGrad(alpha=alpha)(grads)
    torch.testing.assert_close(FairGrad(alpha=alpha)(grads), expected, rtol=1e-5, atol=1e-8)


def test_alpha_one_is_nash_mtl_without_clipping() -> None:
    grads = _grads(4, 12)
    torch.testing.assert_close(FairGrad()(grads), gs.get_strategy("nash_mtl", max_norm=0)(grads), rtol=1e-10, atol=0)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_scale_law_and_invariances(alpha: float) -> None:
    grads, strategy = _grads(4, 12), FairGrad(alpha=alpha)
    expected = strategy(grads)
    torch.testing.assert_close(strategy(grads * 10), expected * 10 ** ((1 - alpha) / (1 + alpha)), rtol=1e-8, atol=0)
    torch.testing.assert_close(strategy(grads[[3, 1, 0, 2]]), expected, rtol=1e-9, atol=1e-12)
    with_zero = torch.cat([torch.zeros(1, 12, dtype=torch.float64), grads])
    torch.testing.assert_close(strategy(with_zero), expected, rtol=1e-7, atol=1e-9)


def test_degenerate_inputs_stay_finite_without_warning() -> None:
    g = torch.tensor([[1.0, 2.0, -1.0]])
    assert torch.equal(FairGrad(alpha=2.0)(torch.cat([g, -g])), torch.zeros(3))
    assert torch.equal(FairGrad()(torch.zeros(3, 3)), torch.zeros(3))


def test_non_convergence_warns() -> None:
    with pytest.warns(GradSurgWarning, match="FairGrad solver did not converge"):
        FairGrad(alpha=5.0, iterations=1)(torch.tensor([[1.0, 2.0], [-1.0, -2.0], [0.5, 0.0]]))


@pytest.mark.parametrize(
    "options", [{"alpha": 0}, {"alpha": -1.0}, {"alpha": float("nan")}, {"alpha": True}, {"iterations": 0}]
)
def test_invalid_options(options: dict[str, object]) -> None:
    with pytest.raises(InvalidOptionError, match="of FairGrad must be"):
        FairGrad(**options)  # type: ignore[arg-type]
