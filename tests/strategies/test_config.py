"""ConFIG: equal cosine with every task gradient and projection length, against TorchJD."""

from __future__ import annotations

import pytest
import torch

from gradsurg.strategies.config import ConFIG
from tests.strategies.qp_helpers import (
    FULL_RANK_SHAPES,
    assert_batched_weights_match,
    assert_surgeon_batched_equals_looped,
    full_rank,
    relative_error,
)


@pytest.mark.parametrize(("tasks", "width"), FULL_RANK_SHAPES)
def test_equal_cosines_and_projection_length(tasks: int, width: int) -> None:
    """The defining property: the same positive cosine with every gᵢ; ‖d‖ = Σᵢ gᵢ·d/‖d‖."""
    grads = full_rank(tasks * 13 + width, tasks, width)
    d = ConFIG()(grads)
    cosines = grads @ d / (grads.norm(dim=1) * d.norm())
    assert float(cosines.min()) > 0
    assert float(cosines.max() - cosines.min()) <= 1e-9
    torch.testing.assert_close(d.norm(), (grads @ d).sum() / d.norm())


@pytest.mark.parametrize(("tasks", "width"), [*FULL_RANK_SHAPES, (4, 2), (6, 3)])
def test_matches_torchjd(tasks: int, width: int) -> None:
    aggregation = pytest.importorskip("torchjd.aggregation")
    grads = full_rank(tasks * 11 + width, tasks, width)
    assert relative_error(ConFIG()(grads), aggregation.ConFIG()(grads), grads) < 1e-9


def test_opposite_gradients_give_zero() -> None:
    grads = torch.tensor([[1.0, -2.0, 0.5], [-3.0, 6.0, -1.5]], dtype=torch.float64)
    assert float(ConFIG()(grads).abs().max()) == 0.0


def test_identical_gradients_give_their_sum() -> None:
    g = full_rank(2, 1, 6)
    torch.testing.assert_close(ConFIG()(g.expand(3, 6)), 3 * g[0])


def test_batched_weights() -> None:
    assert_batched_weights_match(ConFIG())


def test_surgeon_batched_groups_equal_looped_groups() -> None:
    assert_surgeon_batched_equals_looped(ConFIG())
