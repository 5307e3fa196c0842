"""Aligned-MTL: the aligned system is orthogonal with equal norms; against TorchJD for every scale mode."""

from __future__ import annotations

import pytest
import torch

from gradsurg.strategies.aligned_mtl import AlignedMTL
from tests.strategies.qp_helpers import (
    FULL_RANK_SHAPES,
    assert_batched_weights_match,
    assert_invalid,
    assert_surgeon_batched_equals_looped,
    full_rank,
    relative_error,
)

MODES = ["min", "median", "rmse"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("tasks", "width"), [(3, 5), (4, 4), (5, 2)])
def test_aligned_rows_are_orthogonal_with_equal_norms(mode: str, tasks: int, width: int) -> None:
    """The defining property: Ĝ = σBG has orthogonal rows of norm σ (on the rank-r row space)."""
    grads = full_rank(tasks * 17 + width, tasks, width)
    gram = grads @ grads.T
    aligned = AlignedMTL(scale_mode=mode).balance(gram) @ grads
    rank = min(tasks, width)
    eigenvalues = torch.linalg.eigvalsh(gram)[-rank:]
    sigma2 = {"min": eigenvalues.min(), "median": eigenvalues.median(), "rmse": eigenvalues.mean()}[mode]
    aligned_gram = aligned @ aligned.T
    # σBKBσ = σ² · (projector onto the row space of K): idempotent up to σ², with trace r σ².
    torch.testing.assert_close(aligned_gram @ aligned_gram, sigma2 * aligned_gram)
    torch.testing.assert_close(aligned_gram.trace(), rank * sigma2)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("tasks", "width"), [*FULL_RANK_SHAPES, (4, 2), (6, 3)])
def test_matches_torchjd(mode: str, tasks: int, width: int) -> None:
    aggregation = pytest.importorskip("torchjd.aggregation")
    grads = full_rank(tasks * 19 + width, tasks, width)
    ours = AlignedMTL(scale_mode=mode, scale="mean")(grads)
    assert relative_error(ours, aggregation.AlignedMTL(scale_mode=mode)(grads), grads) < 1e-9


def test_default_scale_is_the_sum() -> None:
    grads = full_rank(3, 4, 6)
    torch.testing.assert_close(AlignedMTL()(grads), 4 * AlignedMTL(scale="mean")(grads))


def test_zero_gradients_give_zero() -> None:
    assert float(AlignedMTL()(torch.zeros(3, 4)).abs().max()) == 0.0


def test_batched_weights() -> None:
    for mode in MODES:
        assert_batched_weights_match(AlignedMTL(scale_mode=mode))


def test_invalid_options() -> None:
    assert_invalid("aligned_mtl", scale_mode="max")
    assert_invalid("aligned_mtl", scale="median")


def test_surgeon_batched_groups_equal_looped_groups() -> None:
    assert_surgeon_batched_equals_looped(AlignedMTL())
    assert_surgeon_batched_equals_looped(AlignedMTL(scale_mode="median"))
