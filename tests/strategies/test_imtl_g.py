"""IMTL-G: equal projections on every unit gradient, against TorchJD and the paper's closed form."""

from __future__ import annotations

import pytest
import torch

from gradsurg.strategies.base import Context
from gradsurg.strategies.imtl_g import IMTLG
from tests.strategies.qp_helpers import (
    FULL_RANK_SHAPES,
    assert_batched_weights_match,
    assert_invalid,
    assert_surgeon_batched_equals_looped,
    full_rank,
    relative_error,
)


@pytest.mark.parametrize(("tasks", "width"), FULL_RANK_SHAPES)
def test_equal_projections_on_unit_gradients(tasks: int, width: int) -> None:
    """The defining property: d·uᵢ is the same for every task, and Σ w = 1."""
    grads = full_rank(tasks + 100 * width, tasks, width)
    d = IMTLG()(grads)
    projections = grads @ d / grads.norm(dim=1)
    assert float(projections.max() - projections.min()) <= 1e-8 * float(projections.abs().max())
    w = IMTLG().weights(grads @ grads.T, Context())
    assert abs(float(w.sum()) - 1) < 1e-10


@pytest.mark.parametrize(("tasks", "width"), [s for s in FULL_RANK_SHAPES if s[0] >= 2])
def test_paper_closed_form(tasks: int, width: int) -> None:
    """α₂..T = g₁Uᵀ(DUᵀ)⁻¹ with D = [g₁ − gᵢ], U = [u₁ − uᵢ]; α₁ = 1 − Σα₂..T."""
    grads = full_rank(tasks * 3 + width, tasks, width)
    units = grads / grads.norm(dim=1, keepdim=True)
    differences, unit_differences = grads[0] - grads[1:], units[0] - units[1:]
    rest = grads[0] @ unit_differences.T @ torch.linalg.inv(differences @ unit_differences.T)
    alpha = torch.cat([1 - rest.sum().unsqueeze(0), rest])
    assert relative_error(IMTLG()(grads), alpha @ grads, grads) < 1e-9


@pytest.mark.parametrize(("tasks", "width"), [*FULL_RANK_SHAPES, (4, 2), (6, 3)])
def test_matches_torchjd(tasks: int, width: int) -> None:
    aggregation = pytest.importorskip("torchjd.aggregation")
    grads = full_rank(tasks * 5 + width, tasks, width)
    assert relative_error(IMTLG()(grads), aggregation.IMTLG()(grads), grads) < 1e-9


def test_opposite_gradients_of_equal_norm_give_zero() -> None:
    """No combination with Σ w = 1 has equal projections on u and −u: Σ v = 0, so w = 0."""
    grads = torch.tensor([[1.0, -2.0, 0.5], [-1.0, 2.0, -0.5]], dtype=torch.float64)
    assert float(IMTLG()(grads).abs().max()) == 0.0
    aggregation = pytest.importorskip("torchjd.aggregation")
    assert float(aggregation.IMTLG()(grads).abs().max()) == 0.0


def test_sum_scale_and_batching() -> None:
    grads = full_rank(9, 3, 5)
    torch.testing.assert_close(IMTLG(scale="sum")(grads), 3 * IMTLG()(grads))
    assert_batched_weights_match(IMTLG())


def test_invalid_options() -> None:
    assert_invalid("imtl_g", scale="median")


def test_surgeon_batched_groups_equal_looped_groups() -> None:
    assert_surgeon_batched_equals_looped(IMTLG())
