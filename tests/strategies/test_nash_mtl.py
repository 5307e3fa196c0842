"""Nash-MTL: the Nash bargaining equation, TorchJD (cvxpy) cross-check, degenerate inputs, options."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import least_squares

from gradsurg.errors import GradSurgWarning, InvalidOptionError
from gradsurg.strategies.base import Context
from gradsurg.strategies.nash_mtl import NashMTL
from tests.hyp import seeded

CASES = [(2, 5), (3, 8), (4, 16), (5, 30)]


def _grads(tasks: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(tasks, width, generator=seeded(seed), dtype=torch.float64) * torch.logspace(
        -1, 1, tasks
    ).double().unsqueeze(1)


@pytest.mark.parametrize(("tasks", "width"), CASES)
def test_weights_solve_the_bargaining_equation(tasks: int, width: int) -> None:
    grads = _grads(tasks, width)
    gram = grads @ grads.T
    alpha = NashMTL(max_norm=0).weights(gram, Context())
    torch.testing.assert_close(alpha * (gram @ alpha), torch.ones(tasks, dtype=torch.float64), rtol=1e-6, atol=0)
    reference = least_squares(lambda a: gram.numpy() @ a - 1 / a, np.ones(tasks), bounds=(1e-12, np.inf), xtol=1e-15)
    torch.testing.assert_close(alpha, torch.from_numpy(reference.x), rtol=1e-6, atol=0)


@pytest.mark.parametrize(("tasks", "width"), CASES[:3])
@pytest.mark.parametrize("max_norm", [0.0, 1.0])
def test_matches_torchjd(tasks: int, width: int, max_norm: float) -> None:
    pytest.importorskip("cvxpy")
    from torchjd.aggregation import NashMTL as TorchJDNashMTL

    # ECOS (inside TorchJD) is accurate on rows of similar norms; on badly scaled rows it is off by far more.
    grads = torch.randn(tasks, width, generator=seeded(tasks), dtype=torch.float64)
    expected = TorchJDNashMTL(n_tasks=tasks, max_norm=max_norm)(grads)
    torch.testing.assert_close(NashMTL(max_norm=max_norm)(grads), expected, rtol=1e-5, atol=1e-7)


def test_scale_and_norm() -> None:
    grads = _grads(3, 10)
    free = NashMTL(max_norm=0)
    torch.testing.assert_close(free(grads).norm(), torch.tensor(3.0, dtype=torch.float64).sqrt())
    torch.testing.assert_close(free(grads * 1e3), free(grads), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(NashMTL()(grads).norm(), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(NashMTL(max_norm=5.0)(grads), free(grads))


def test_permutation_and_zero_rows_on_a_feasible_problem() -> None:
    grads = _grads(4, 12)
    expected = NashMTL()(grads)
    torch.testing.assert_close(NashMTL()(grads[[2, 0, 3, 1]]), expected, rtol=1e-9, atol=1e-12)
    with_zero = torch.cat([grads[:2], torch.zeros(1, 12, dtype=torch.float64), grads[2:]])
    torch.testing.assert_close(NashMTL()(with_zero), expected, rtol=1e-7, atol=1e-9)


def test_degenerate_inputs_stay_finite_without_warning() -> None:
    g = torch.tensor([[1.0, 2.0, -1.0]])
    assert torch.equal(NashMTL()(torch.cat([g, -g])), torch.zeros(3))
    torch.testing.assert_close(NashMTL()(torch.cat([g, 2 * g])), g[0] / g.norm())
    assert torch.equal(NashMTL()(torch.zeros(2, 3)), torch.zeros(3))


def test_non_convergence_warns_and_returns_a_finite_direction() -> None:
    with pytest.warns(GradSurgWarning, match="Nash-MTL solver did not converge"):
        out = NashMTL(iterations=1)(torch.tensor([[1.0, 2.0], [-1.0, -2.0], [0.5, 0.0]]))
    assert bool(torch.isfinite(out).all())


def test_batched_weights_match_one_at_a_time() -> None:
    grams = torch.stack([(g @ g.T) for g in (_grads(3, 6, s) for s in range(4))])
    batched = NashMTL().weights(grams, Context())
    single = torch.stack([NashMTL().weights(k, Context()) for k in grams])
    torch.testing.assert_close(batched, single, rtol=1e-10, atol=0)


@pytest.mark.parametrize(
    "options", [{"max_norm": -1.0}, {"max_norm": float("inf")}, {"iterations": 0}, {"iterations": 2.5}]
)
def test_invalid_options(options: dict[str, object]) -> None:
    with pytest.raises(InvalidOptionError, match="of NashMTL must be"):
        NashMTL(**options)  # type: ignore[arg-type]
