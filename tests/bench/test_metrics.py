"""Tests of the validation metrics against per-class counting written out by hand."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gradsurg.bench.metrics import score
from gradsurg.errors import InvalidOptionError


def _f1_by_hand(predictions: list[int], labels: list[int], cls: int) -> float:
    tp = sum(1 for p, y in zip(predictions, labels) if p == y == cls)
    fp = sum(1 for p, y in zip(predictions, labels) if p == cls != y)
    fn = sum(1 for p, y in zip(predictions, labels) if y == cls != p)
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


pairs = st.integers(2, 5).flatmap(
    lambda k: st.lists(st.tuples(st.integers(0, k - 1), st.integers(0, k - 1)), min_size=1, max_size=40).map(
        lambda rows: (k, [p for p, _ in rows], [y for _, y in rows])
    )
)


@given(pairs)
def test_metrics_match_counting_by_hand(case: tuple[int, list[int], list[int]]) -> None:
    k, predictions, labels = case
    p, y = torch.tensor(predictions), torch.tensor(labels)
    assert score("accuracy", p, y, k) == pytest.approx(sum(a == b for a, b in zip(predictions, labels)) / len(labels))
    assert score("f1", p, y, k) == pytest.approx(_f1_by_hand(predictions, labels, 1))
    present = sorted(set(predictions) | set(labels))
    expected = sum(_f1_by_hand(predictions, labels, c) for c in present) / len(present)
    assert score("macro_f1", p, y, k) == pytest.approx(expected)


def test_macro_f1_does_not_reward_the_majority_class() -> None:
    labels = torch.tensor([0] * 9 + [1])
    always_zero = torch.zeros(10, dtype=torch.long)
    assert score("accuracy", always_zero, labels, 2) == pytest.approx(0.9)
    assert score("macro_f1", always_zero, labels, 2) == pytest.approx((18 / 19) / 2)


@pytest.mark.parametrize(
    ("metric", "predictions", "labels"),
    [("recall", [0], [0]), ("accuracy", [0, 1], [0]), ("accuracy", [], [])],
)
def test_bad_metric_inputs_are_refused(metric: str, predictions: list[int], labels: list[int]) -> None:
    with pytest.raises(InvalidOptionError):
        score(metric, torch.tensor(predictions, dtype=torch.long), torch.tensor(labels, dtype=torch.long), 2)
