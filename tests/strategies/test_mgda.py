"""MGDA: the exact minimum-norm point of the convex hull, its normalisations and scale."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gradsurg as gs
from gradsurg.strategies import qp
from gradsurg.strategies.base import Context
from gradsurg.strategies.mgda import MGDA
from tests.hyp import any_gradient_matrix
from tests.strategies.qp_helpers import (
    FULL_RANK_SHAPES,
    assert_batched_weights_match,
    assert_invalid,
    assert_surgeon_batched_equals_looped,
    full_rank,
)


def assert_min_norm(grads: torch.Tensor, w: torch.Tensor, *, tol: float = 1e-9) -> None:
    """``d = wᵀG`` with ``w ∈ Δ`` and ``gᵢ·d ≥ ‖d‖²`` for all ``i``: the minimum-norm point of the hull."""
    scale = float(grads.norm(dim=1).max()) ** 2
    assert bool((w >= 0).all()) and abs(float(w.sum()) - 1) <= 1e-12
    d = w @ grads
    assert float((grads @ d - d @ d).min()) >= -tol * scale


@given(grads=any_gradient_matrix(dtype=st.just(torch.float64)))
def test_weights_give_the_minimum_norm_point(grads: torch.Tensor) -> None:
    assert_min_norm(grads, MGDA().weights(grads @ grads.T, Context()))


def test_two_tasks_closed_form() -> None:
    """Two tasks: w₁ = clip((g₂ − g₁)·g₂ / ‖g₁ − g₂‖², 0, 1) (the official two-point line search)."""
    for seed in range(10):
        g1, g2 = full_rank(seed, 2, 5)
        w1 = float(((g2 - g1) @ g2 / (g1 - g2).pow(2).sum()).clamp(0, 1))
        expected = w1 * g1 + (1 - w1) * g2
        torch.testing.assert_close(MGDA()(torch.stack([g1, g2])), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("tasks", "width"), FULL_RANK_SHAPES)
def test_matches_torchjd_frank_wolfe(tasks: int, width: int) -> None:
    aggregation = pytest.importorskip("torchjd.aggregation")
    grads = full_rank(tasks * 31 + width, tasks, width)
    expected = aggregation.MGDA(epsilon=1e-12, max_iters=5000)(grads)
    # Frank-Wolfe converges sublinearly; the exact solution is at least as good.
    assert float((MGDA()(grads)).norm()) <= float(expected.norm()) + 1e-9
    torch.testing.assert_close(MGDA()(grads), expected, rtol=0, atol=1e-4 * float(grads.norm(dim=1).sum()))


@pytest.mark.parametrize(("tasks", "width"), FULL_RANK_SHAPES)
def test_affine_hull_shortcut_matches_the_solver(tasks: int, width: int) -> None:
    """Full-rank K: the closed-form first step (w ∝ K⁻¹1 when ≥ 0) and the solver agree, interior or not."""
    for seed in range(4):
        grads = full_rank(seed * 41 + tasks * 7 + width, tasks, width)
        grads = grads + (2.0 if seed % 2 else 0.0) * grads[:1]  # odd seeds: a shared component, interior minima
        gram = grads @ grads.T
        k = gram / gram.trace()
        x, residual = qp.nonnegative_least_squares(k + 1, torch.ones(tasks, dtype=torch.float64), definite=True)
        assert float(residual) < 1e-12
        torch.testing.assert_close(qp.min_norm_weights(gram), x / x.sum(), rtol=0, atol=1e-10)


def test_zero_in_the_hull_gives_zero() -> None:
    grads = torch.tensor([[1.0, 2.0], [-2.0, -4.0], [0.5, -3.0]], dtype=torch.float64)
    assert float(MGDA()(grads).abs().max()) < 1e-12


def test_l2_normalization_weights_unit_gradients() -> None:
    grads = full_rank(3, 3, 6)
    units = grads / grads.norm(dim=1, keepdim=True)
    w = qp.min_norm_weights(units @ units.T)
    torch.testing.assert_close(MGDA(normalization="l2")(grads), w @ grads)


@pytest.mark.parametrize("normalization", ["loss", "loss+"])
def test_loss_normalizations(normalization: str) -> None:
    grads = full_rank(4, 3, 6)
    losses = torch.tensor([0.5, 2.0, 4.0], dtype=torch.float64)
    divisors = losses * (grads.norm(dim=1) if normalization == "loss+" else 1)
    scaled = grads / divisors.unsqueeze(1)
    w = qp.min_norm_weights(scaled @ scaled.T)
    torch.testing.assert_close(MGDA(normalization=normalization)(grads, losses=losses), w @ grads)


def test_loss_normalization_needs_losses() -> None:
    strategy = MGDA(normalization="loss")
    assert gs.Need.LOSSES in strategy.needs and gs.Need.LOSSES not in MGDA().needs
    with pytest.raises(gs.InvalidLossError, match="losses=Tensor"):
        strategy(full_rank(0, 2, 3))
    with pytest.raises(gs.InvalidLossError, match="must be > 0"):
        strategy(full_rank(0, 2, 3), losses=torch.tensor([1.0, 0.0]))


def test_loss_normalization_through_the_surgeon() -> None:
    model = torch.nn.Linear(3, 2).double()
    surgeon = gs.Surgeon(gs.groups.whole(list(model.parameters())), MGDA(normalization="loss+"), seed=0)
    x = torch.randn(5, 3, dtype=torch.float64)
    out = model(x)
    surgeon.backward([out[:, 0].pow(2).mean(), (out[:, 1] - 1).pow(2).mean()])
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in model.parameters())


def test_sum_scale_multiplies_by_the_number_of_tasks() -> None:
    grads = full_rank(5, 4, 6)
    torch.testing.assert_close(MGDA(scale="sum")(grads), 4 * MGDA()(grads))


def test_batched_weights() -> None:
    assert_batched_weights_match(MGDA())
    assert_batched_weights_match(MGDA(normalization="loss+"))


def test_invalid_options() -> None:
    assert_invalid("mgda", normalization="l1")
    assert_invalid("mgda", scale="max")


def test_surgeon_batched_groups_equal_looped_groups() -> None:
    assert_surgeon_batched_equals_looped(MGDA())
    assert_surgeon_batched_equals_looped(MGDA(normalization="l2"))
