"""Tests of the conflicting-pair share and of the per-task gradient probe."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gradsurg.bench.conflicts import conflict_share, task_gradients


def test_conflict_share_counts_pairs_with_negative_dot_products() -> None:
    g = torch.tensor([[1.0, 0.0], [-1.0, 0.1], [0.0, 1.0], [0.0, 0.0]])
    # pairs: (0,1) conflict, (0,2) orthogonal, (0,3) zero, (1,2) aligned, (1,3) zero, (2,3) zero
    assert conflict_share(g) == pytest.approx(1 / 6)
    assert conflict_share(torch.tensor([[1.0, 2.0], [-1.0, -2.0]])) == 1.0
    assert math.isnan(conflict_share(torch.ones(1, 3)))


@given(st.integers(2, 6), st.integers(1, 8), st.integers(0, 2**31 - 1))
def test_conflict_share_is_symmetric_and_scale_free(tasks: int, n: int, seed: int) -> None:
    g = torch.randn(tasks, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    share = conflict_share(g)
    assert 0.0 <= share <= 1.0
    assert conflict_share(g.flip(0)) == share
    assert conflict_share(3.0 * g) == share
    assert conflict_share(torch.cat([g, g], dim=1)) == share


def test_task_gradients_keep_the_graph_and_fill_unreached_with_zeros() -> None:
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    v = torch.tensor([3.0], requires_grad=True)
    losses = [(w**2).sum(), (w * v).sum()]
    g = task_gradients(losses, [w, v])
    assert torch.equal(g, torch.tensor([[2.0, 4.0, 0.0], [3.0, 3.0, 3.0]]))
    sum(losses[1:], start=losses[0]).backward()  # the graph is still there for the method's backward
    assert w.grad is not None and torch.equal(w.grad, torch.tensor([5.0, 7.0]))
